// per_sample_grad_norm: per-sample LoRA factor gradients and their squared norms in one pass.
//
//   g_i = scale * L_i^T R_i                 L: (b, T, p), R: (b, T, q), g: (b, p, q)
//   n_i = ||g_i||_F^2                       (gram undefined: Euclidean metric)
//   n_i = tr(g_i K g_i^T)  (gram_side = 1)   K: (q, q), acts on the columns (B phase: q = r)
//   n_i = tr(g_i^T K g_i)  (gram_side = 0)   K: (p, p), acts on the rows    (A phase: p = r)
//
// B phase: L = G (dL/dY), R = U = X A^T  ->  g = dL/dB (m x r), metric K = A A^T + lambda I.
// A phase: L = V = G B,  R = X           ->  g = dL/dA (r x n), metric K = B^T B + lambda I.
// Gradients and norms are written in fp32 (fp64 for fp64 inputs) whatever the input dtype.
#pragma once
#include <torch/types.h>
#include <tuple>

namespace deer {

std::tuple<at::Tensor, at::Tensor> per_sample_grad_norm_cpu(
    const at::Tensor& left, const at::Tensor& right, double scale,
    const c10::optional<at::Tensor>& gram, int64_t gram_side);

#ifdef DEER_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> per_sample_grad_norm_cuda(
    const at::Tensor& left, const at::Tensor& right, double scale,
    const c10::optional<at::Tensor>& gram, int64_t gram_side);
#endif

// Squared norms only (same metric as above), without returning the gradients.
//   method 0: choose by cost; 1: materialise g_i (tile GEMM, per sample) and reduce;
//   method 2: "ghost" norms from token Gram matrices, never forming g_i:
//     ||g_i||^2     = s^2 <L_i L_i^T, R_i R_i^T>          (T x T inner products)
//     tr(g K g^T)   = s^2 <L_i L_i^T, R_i K R_i^T>        (gram_side = 1)
//     tr(g^T K g)   = s^2 <L_i K L_i^T, R_i R_i^T>        (gram_side = 0)
//   Cost: materialise ~ T p q, ghost ~ T^2 (p + q). Ghost pays when T (p + q) < p q, which for LoRA
//   (one of p, q is the rank) holds only for very short sequences; method 0 applies that rule.
at::Tensor per_sample_grad_norm_only(const at::Tensor& left, const at::Tensor& right, double scale,
                                     const c10::optional<at::Tensor>& gram, int64_t gram_side, int64_t method);
// The rule method 0 applies: true when the ghost route is cheaper for these sizes.
bool per_sample_grad_norm_ghost_pays(int64_t T, int64_t p, int64_t q);

// Squared norms of already materialised gradients g (b, p, q) (fp32 or fp64) in the op's metric.
at::Tensor per_sample_sq_norms_cpu(const at::Tensor& g, const at::Tensor& K, int64_t gram_side);

// Shape/dtype validation shared by both backends; returns (b, T, p, q).
std::tuple<int64_t, int64_t, int64_t, int64_t> per_sample_grad_norm_check(
    const at::Tensor& left, const at::Tensor& right,
    const c10::optional<at::Tensor>& gram, int64_t gram_side);

}  // namespace deer
