// clip_reduce_noise: the clipped, noised mean gradient of one trained LoRA factor.
//
//   out = (sum_i clip_i * g_i + noise_std * xi) / expected_batch_size        g: (b, p, q), out: (p, q)
//   xi = Z                    chol undefined (isotropic noise)
//   xi = R^{-1} Z             chol = R (r x r, upper, K = R^T R), noise_side = 0, p = r (A phase)
//   xi = Z R^{-T}             noise_side = 1, q = r (B phase)
// Z ~ N(0, I) (p x q) from Philox4x32-10 keyed by (seed, step, layer, client) (see philox.h for the
// counter layout). Regulated xi has covariance K^{-1} per column (side 0) or per row (side 1).
// noise_std = 0 skips the noise entirely: the output is exactly the clipped sum / expected_batch_size.
// Only the upper triangle of chol is read.
//
// clip_reduce_noise_fused: same output with g_i = scale * L_i^T R_i never materialised:
//   sum_i clip_i g_i = scale * sum_i clip_i L_i^T R_i, one weighted GEMM over all b*T tokens.
// Output dtype: fp32 (fp64 when the gradients / factors are fp64).
//
// Fused optimizer step (clip_reduce_noise and clip_reduce_noise_grouped): with non-empty
// update_tensors / update_hyper the op also applies torch.optim's SGD / Adam / AdamW step to each
// layer's parameter where it writes that element of the output (math in fused_update.h). Per layer:
// three tensors (param, buf1, buf2; a 0-element tensor for a buffer the optimizer does not use) and
// kUpdateHyperWidth doubles; param and buffers are (p, q), contiguous, in the output's dtype, on the
// gradients' device. Empty lists: no update.
#pragma once
#include <torch/types.h>

#include <vector>

#include "clip_reduce_noise/fused_update.h"

namespace deer {

at::Tensor clip_reduce_noise_cpu(const at::Tensor& grads, const at::Tensor& clip, double noise_std,
                                 double expected_batch_size, const c10::optional<at::Tensor>& chol,
                                 int64_t noise_side, int64_t seed, int64_t step, int64_t layer, int64_t client,
                                 at::TensorList update_tensors, at::ArrayRef<double> update_hyper);
at::Tensor clip_reduce_noise_fused_cpu(const at::Tensor& left, const at::Tensor& right, double scale,
                                       const at::Tensor& clip, double noise_std, double expected_batch_size,
                                       const c10::optional<at::Tensor>& chol, int64_t noise_side, int64_t seed,
                                       int64_t step, int64_t layer, int64_t client);

// clip_reduce_noise_grouped: every trained LoRA factor of a model in one call, out[k] equal to
// clip_reduce_noise(grads[k], clips[k], noise_std, expected_batch_size, chols[k], noise_sides[k],
// seed, step, layers[k], client) (same Philox keys, so the same noise). One parallel region over
// the layers on the CPU, one launch over all layers on CUDA, instead of several per layer.
std::vector<at::Tensor> clip_reduce_noise_grouped_cpu(at::TensorList grads, at::TensorList clips, double noise_std,
                                                      double expected_batch_size,
                                                      const c10::List<c10::optional<at::Tensor>>& chols,
                                                      at::IntArrayRef noise_sides, int64_t seed, int64_t step,
                                                      at::IntArrayRef layers, int64_t client,
                                                      at::TensorList update_tensors, at::ArrayRef<double> update_hyper);

#ifdef DEER_WITH_CUDA
std::vector<at::Tensor> clip_reduce_noise_grouped_cuda(at::TensorList grads, at::TensorList clips, double noise_std,
                                                       double expected_batch_size,
                                                       const c10::List<c10::optional<at::Tensor>>& chols,
                                                       at::IntArrayRef noise_sides, int64_t seed, int64_t step,
                                                       at::IntArrayRef layers, int64_t client,
                                                       at::TensorList update_tensors,
                                                       at::ArrayRef<double> update_hyper);
at::Tensor clip_reduce_noise_cuda(const at::Tensor& grads, const at::Tensor& clip, double noise_std,
                                  double expected_batch_size, const c10::optional<at::Tensor>& chol,
                                  int64_t noise_side, int64_t seed, int64_t step, int64_t layer, int64_t client,
                                  at::TensorList update_tensors, at::ArrayRef<double> update_hyper);
at::Tensor clip_reduce_noise_fused_cuda(const at::Tensor& left, const at::Tensor& right, double scale,
                                        const at::Tensor& clip, double noise_std, double expected_batch_size,
                                        const c10::optional<at::Tensor>& chol, int64_t noise_side, int64_t seed,
                                        int64_t step, int64_t layer, int64_t client);
#endif

// Raises the error for a chol that is not the factor of a positive definite K (both backends).
[[noreturn]] void clip_reduce_noise_chol_error(const at::Tensor& R);

// Shared validation of the grouped op: the lists (one entry per layer, one device) and every layer
// with clip_reduce_noise_check, before any work, so a bad entry fails with its own message.
void clip_reduce_noise_grouped_check(at::TensorList grads, at::TensorList clips, double noise_std,
                                     double expected_batch_size, const c10::List<c10::optional<at::Tensor>>& chols,
                                     at::IntArrayRef noise_sides, int64_t step, at::IntArrayRef layers,
                                     int64_t client);

// Layer k's fused update from the op's lists (layers entries expected; empty lists give kind none),
// validated against the layer's (p, q), output dtype and device. Shared by the CPU and CUDA backends.
UpdateArgs clip_reduce_noise_update_args(const char* what, at::TensorList update_tensors,
                                         at::ArrayRef<double> update_hyper, int64_t layers, int64_t k, int64_t p,
                                         int64_t q, at::ScalarType out_dtype, const at::Device& device);

// Shared validation of (p, q, clip, noise arguments); `what` names the op in messages.
void clip_reduce_noise_check(const char* what, int64_t b, int64_t p, int64_t q, const at::Tensor& clip,
                             const at::Device& device, double noise_std, double expected_batch_size,
                             const c10::optional<at::Tensor>& chol, int64_t noise_side, int64_t step,
                             int64_t layer, int64_t client);

}  // namespace deer
