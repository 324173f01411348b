// CUDA backend of per_sample_grad_norm (see per_sample_grad_norm.h for the math).
// One thread block per sample: the block accumulates g_i = scale * L_i^T R_i in fp32 registers
// (each thread owns a strided set of the p*q entries), writes it, then reduces the norm.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.h"
#include "per_sample_grad_norm/per_sample_grad_norm.h"

namespace deer {
namespace {

template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shm) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  v = threadIdx.x < nw ? shm[threadIdx.x] : acc_t(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // valid in thread 0
}

template <typename scalar_t, typename acc_t>
__global__ void psgn_grad_kernel(const scalar_t* __restrict__ L, const scalar_t* __restrict__ R,
                                 int64_t T, int64_t p, int64_t q, acc_t scale,
                                 acc_t* __restrict__ G, acc_t* __restrict__ N, bool euclid) {
  __shared__ acc_t shm[32];
  const int64_t i = blockIdx.x;
  const scalar_t* Li = L + i * T * p;
  const scalar_t* Ri = R + i * T * q;
  acc_t* g = G + i * p * q;
  acc_t part = 0;
  for (int64_t e = threadIdx.x; e < p * q; e += blockDim.x) {
    const int64_t a = e / q, c = e % q;
    acc_t s = 0;
    for (int64_t t = 0; t < T; ++t) s += static_cast<acc_t>(Li[t * p + a]) * static_cast<acc_t>(Ri[t * q + c]);
    s *= scale;
    g[e] = s;
    part += s * s;
  }
  if (euclid) {
    acc_t tot = block_sum(part, shm);
    if (threadIdx.x == 0) N[i] = tot;
  }
}

// Metric norm from the written gradient: side 1 -> sum_a g_a^T K g_a, side 0 -> sum K[a,a'] <g_a, g_a'>.
template <typename acc_t>
__global__ void psgn_metric_kernel(const acc_t* __restrict__ G, const acc_t* __restrict__ K,
                                   int64_t p, int64_t q, int64_t side, acc_t* __restrict__ N) {
  __shared__ acc_t shm[32];
  const int64_t i = blockIdx.x;
  const acc_t* g = G + i * p * q;
  acc_t part = 0;
  if (side == 1) {
    for (int64_t e = threadIdx.x; e < p * q; e += blockDim.x) {
      const int64_t a = e / q, c = e % q;
      acc_t kc = 0;
      for (int64_t d = 0; d < q; ++d) kc += K[c * q + d] * g[a * q + d];
      part += g[e] * kc;
    }
  } else {
    for (int64_t e = threadIdx.x; e < p * q; e += blockDim.x) {
      const int64_t a = e / q, c = e % q;
      acc_t kc = 0;
      for (int64_t a2 = 0; a2 < p; ++a2) kc += K[a * p + a2] * g[a2 * q + c];
      part += g[e] * kc;
    }
  }
  acc_t tot = block_sum(part, shm);
  if (threadIdx.x == 0) N[i] = tot;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> per_sample_grad_norm_cuda(
    const at::Tensor& left_in, const at::Tensor& right_in, double scale,
    const c10::optional<at::Tensor>& gram, int64_t gram_side) {
  auto [b, T, p, q] = per_sample_grad_norm_check(left_in, right_in, gram, gram_side);
  c10::cuda::CUDAGuard guard(left_in.device());
  auto left = left_in.contiguous();
  auto right = right_in.contiguous();
  const auto acc_dtype = left.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = left.options().dtype(acc_dtype);
  auto grads = at::empty({b, p, q}, opts);
  auto norms = at::empty({b}, opts);
  if (b == 0) return {grads, norms};
  const bool euclid = !(gram.has_value() && gram->defined());
  at::Tensor K;
  if (!euclid) K = gram->to(acc_dtype).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, left.scalar_type(), "per_sample_grad_norm_cuda", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    psgn_grad_kernel<scalar_t, acc_t><<<b, threads, 0, stream>>>(
        left.data_ptr<scalar_t>(), right.data_ptr<scalar_t>(), T, p, q, static_cast<acc_t>(scale),
        grads.data_ptr<acc_t>(), norms.data_ptr<acc_t>(), euclid);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!euclid) {
      psgn_metric_kernel<acc_t><<<b, threads, 0, stream>>>(grads.data_ptr<acc_t>(), K.data_ptr<acc_t>(), p, q,
                                                           gram_side, norms.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grads, norms};
}

}  // namespace deer
