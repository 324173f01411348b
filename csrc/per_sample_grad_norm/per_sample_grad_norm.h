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

// Shape/dtype validation shared by both backends; returns (b, T, p, q).
std::tuple<int64_t, int64_t, int64_t, int64_t> per_sample_grad_norm_check(
    const at::Tensor& left, const at::Tensor& right,
    const c10::optional<at::Tensor>& gram, int64_t gram_side);

}  // namespace deer
