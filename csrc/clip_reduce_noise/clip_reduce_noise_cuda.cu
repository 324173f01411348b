// CUDA backend of clip_reduce_noise, clip_reduce_noise_fused and clip_reduce_noise_grouped (with
// their fused optimizer step): the device guard and stream around the kernels and launch logic of
// clip_reduce_noise_cuda.cuh (shared with the CPU emulator test).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "clip_reduce_noise/clip_reduce_noise_cuda.cuh"

namespace deer {

at::Tensor clip_reduce_noise_cuda(const at::Tensor& grads, const at::Tensor& clip, double noise_std,
                                  double expected_batch_size, const c10::optional<at::Tensor>& chol,
                                  int64_t noise_side, int64_t seed, int64_t step, int64_t layer, int64_t client,
                                  at::TensorList update_tensors, at::ArrayRef<double> update_hyper) {
  c10::cuda::CUDAGuard guard(grads.device());
  return crn_cuda::clip_reduce_noise_launch(grads, clip, noise_std, expected_batch_size, chol, noise_side, seed, step,
                                            layer, client, update_tensors, update_hyper,
                                            at::cuda::getCurrentCUDAStream().stream());
}

at::Tensor clip_reduce_noise_fused_cuda(const at::Tensor& left, const at::Tensor& right, double scale,
                                        const at::Tensor& clip, double noise_std, double expected_batch_size,
                                        const c10::optional<at::Tensor>& chol, int64_t noise_side, int64_t seed,
                                        int64_t step, int64_t layer, int64_t client) {
  c10::cuda::CUDAGuard guard(left.device());
  return crn_cuda::clip_reduce_noise_fused_launch(left, right, scale, clip, noise_std, expected_batch_size, chol,
                                                  noise_side, seed, step, layer, client,
                                                  at::cuda::getCurrentCUDAStream().stream());
}

std::vector<at::Tensor> clip_reduce_noise_grouped_cuda(at::TensorList grads, at::TensorList clips, double noise_std,
                                                       double expected_batch_size,
                                                       const c10::List<c10::optional<at::Tensor>>& chols,
                                                       at::IntArrayRef noise_sides, int64_t seed, int64_t step,
                                                       at::IntArrayRef layers, int64_t client,
                                                       at::TensorList update_tensors,
                                                       at::ArrayRef<double> update_hyper) {
  DEER_CHECK_ARG(!grads.empty(), "clip_reduce_noise_grouped: no layers");
  c10::cuda::CUDAGuard guard(grads[0].device());
  return crn_cuda::clip_reduce_noise_grouped_launch(grads, clips, noise_std, expected_batch_size, chols, noise_sides,
                                                    seed, step, layers, client, update_tensors, update_hyper,
                                                    at::cuda::getCurrentCUDAStream().stream());
}

}  // namespace deer
