// Kernels and launch logic of the CUDA backend of per_sample_grad_norm (math in
// per_sample_grad_norm.h). per_sample_grad_norm_cuda.cu compiles this with nvcc for the product;
// csrc/tests/test_per_sample_grad_norm_cuda_emu.cpp compiles the same text for the CPU emulator
// (csrc/tests/cuda_emu.h) so CI executes it without a GPU.
//
// Gradients: one thread block per (sample, BP x BQ output tile). The block walks the T tokens in
// chunks of KT, staging L[t, tile rows] and R[t, tile cols] in shared memory with coalesced loads,
// and each thread accumulates a TP x TQ register micro-tile in fp32 (fp64 for fp64 inputs). Tile
// shapes follow the LoRA shapes: a thin BQ = 8 tile when q is the rank (B phase), a thin BP = 8 tile
// when p is the rank (A phase), square 64 x 64 otherwise.
// Euclidean norms: each block reduces the squares of its tile into its own slot of a (b, tiles)
// buffer, summed afterwards (deterministic, no atomics). Metric norms: a second kernel over g.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

#include "common.h"
#include "cuda_compat.h"
#include "per_sample_grad_norm/per_sample_grad_norm.h"

namespace deer {
namespace psgn_cuda {

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

template <int BP, int BQ, int TP, int TQ, int KT>
struct TileCfg {
  static constexpr int bp = BP, bq = BQ, tp = TP, tq = TQ, kt = KT;
  static constexpr int ntx = BQ / TQ, nty = BP / TP, threads = ntx * nty;
};

template <typename scalar_t, typename acc_t, typename Cfg>
__global__ void __launch_bounds__(Cfg::threads)
psgn_tile_kernel(const scalar_t* __restrict__ L, const scalar_t* __restrict__ R, int64_t T, int64_t p, int64_t q,
                 int64_t tiles_q, int64_t ntiles, acc_t scale, acc_t* __restrict__ G, acc_t* __restrict__ partial) {
  constexpr int BP = Cfg::bp, BQ = Cfg::bq, TP = Cfg::tp, TQ = Cfg::tq, KT = Cfg::kt;
  constexpr int NTX = Cfg::ntx, NTY = Cfg::nty, NT = Cfg::threads;
  __shared__ acc_t Ls[KT][BP];
  __shared__ acc_t Rs[KT][BQ];
  __shared__ acc_t red[32];
  const int64_t i = blockIdx.x / ntiles;
  const int64_t tile = blockIdx.x % ntiles;
  const int64_t p0 = (tile / tiles_q) * BP, q0 = (tile % tiles_q) * BQ;
  const int tid = threadIdx.x, tx = tid % NTX, ty = tid / NTX;
  const scalar_t* Li = L + i * T * p;
  const scalar_t* Ri = R + i * T * q;
  acc_t acc[TP][TQ];
#pragma unroll
  for (int u = 0; u < TP; ++u)
#pragma unroll
    for (int v = 0; v < TQ; ++v) acc[u][v] = acc_t(0);
  for (int64_t t0 = 0; t0 < T; t0 += KT) {
    for (int idx = tid; idx < KT * BP; idx += NT) {
      const int kk = idx / BP, a = idx % BP;
      const int64_t t = t0 + kk, ga = p0 + a;
      Ls[kk][a] = (t < T && ga < p) ? static_cast<acc_t>(Li[t * p + ga]) : acc_t(0);
    }
    for (int idx = tid; idx < KT * BQ; idx += NT) {
      const int kk = idx / BQ, c = idx % BQ;
      const int64_t t = t0 + kk, gc = q0 + c;
      Rs[kk][c] = (t < T && gc < q) ? static_cast<acc_t>(Ri[t * q + gc]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < KT; ++kk) {
      acc_t lv[TP], rv[TQ];
#pragma unroll
      for (int u = 0; u < TP; ++u) lv[u] = Ls[kk][ty + u * NTY];
#pragma unroll
      for (int v = 0; v < TQ; ++v) rv[v] = Rs[kk][tx + v * NTX];
#pragma unroll
      for (int u = 0; u < TP; ++u)
#pragma unroll
        for (int v = 0; v < TQ; ++v) acc[u][v] += lv[u] * rv[v];
    }
    __syncthreads();
  }
  acc_t part = 0;
#pragma unroll
  for (int u = 0; u < TP; ++u)
#pragma unroll
    for (int v = 0; v < TQ; ++v) {
      const int64_t a = p0 + ty + u * NTY, c = q0 + tx + v * NTX;
      if (a < p && c < q) {
        const acc_t val = acc[u][v] * scale;
        G[(i * p + a) * q + c] = val;
        part += val * val;
      }
    }
  const acc_t tot = block_sum(part, red);
  if (threadIdx.x == 0) partial[i * ntiles + tile] = tot;
}

// Metric norm from the written gradient: side 1 -> sum_a g_a K g_a^T, side 0 -> sum K[a,a'] <g_a, g_a'>.
template <typename acc_t>
__global__ void psgn_metric_kernel(const acc_t* __restrict__ G, const acc_t* __restrict__ K,
                                   int64_t p, int64_t q, int64_t side, acc_t* __restrict__ N) {
  __shared__ acc_t shm[32];
  const int64_t i = blockIdx.x;
  const acc_t* g = G + i * p * q;
  acc_t part = 0;
  for (int64_t e = threadIdx.x; e < p * q; e += blockDim.x) {
    const int64_t a = e / q, c = e % q;
    acc_t kc = 0;
    if (side == 1)
      for (int64_t d = 0; d < q; ++d) kc += K[c * q + d] * g[a * q + d];
    else
      for (int64_t a2 = 0; a2 < p; ++a2) kc += K[a * p + a2] * g[a2 * q + c];
    part += g[e] * kc;
  }
  acc_t tot = block_sum(part, shm);
  if (threadIdx.x == 0) N[i] = tot;
}

template <typename scalar_t, typename acc_t, typename Cfg, typename Stream>
void launch_tiles(const at::Tensor& left, const at::Tensor& right, int64_t b, int64_t T, int64_t p, int64_t q,
                  double scale, at::Tensor& grads, at::Tensor& norms, bool euclid, Stream stream) {
  const int64_t tiles_p = (p + Cfg::bp - 1) / Cfg::bp, tiles_q = (q + Cfg::bq - 1) / Cfg::bq;
  const int64_t ntiles = tiles_p * tiles_q;
  DEER_CHECK_ARG(b * ntiles < (int64_t(1) << 31), "per_sample_grad_norm (cuda): batch x tiles too large for one launch");
  auto partial = at::empty({b, ntiles}, grads.options());
  auto kernel = &psgn_tile_kernel<scalar_t, acc_t, Cfg>;
  DEER_LAUNCH(kernel, static_cast<unsigned>(b * ntiles), Cfg::threads, stream, left.data_ptr<scalar_t>(),
              right.data_ptr<scalar_t>(), T, p, q, tiles_q, ntiles, static_cast<acc_t>(scale),
              grads.data_ptr<acc_t>(), partial.data_ptr<acc_t>());
  if (euclid) at::sum_out(norms, partial, {1});
}

// Everything but the device guard: checks, tile choice, launches. Inputs on the launch's device.
template <typename Stream>
std::tuple<at::Tensor, at::Tensor> per_sample_grad_norm_launch(const at::Tensor& left_in, const at::Tensor& right_in,
                                                               double scale, const c10::optional<at::Tensor>& gram,
                                                               int64_t gram_side, Stream stream) {
  auto [b, T, p, q] = per_sample_grad_norm_check(left_in, right_in, gram, gram_side);
  auto left = left_in.contiguous();
  auto right = right_in.contiguous();
  const auto acc_dtype = left.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = left.options().dtype(acc_dtype);
  auto grads = at::empty({b, p, q}, opts);
  auto norms = at::empty({b}, opts);
  if (b == 0 || p == 0 || q == 0) return {grads.zero_(), norms.zero_()};
  const bool euclid = !(gram.has_value() && gram->defined());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, left.scalar_type(), "per_sample_grad_norm_cuda", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    if (q <= 8)  // B phase: q = r
      launch_tiles<scalar_t, acc_t, TileCfg<128, 8, 4, 1, 16>>(left, right, b, T, p, q, scale, grads, norms, euclid,
                                                               stream);
    else if (p <= 8)  // A phase: p = r
      launch_tiles<scalar_t, acc_t, TileCfg<8, 128, 1, 4, 16>>(left, right, b, T, p, q, scale, grads, norms, euclid,
                                                               stream);
    else
      launch_tiles<scalar_t, acc_t, TileCfg<64, 64, 4, 4, 16>>(left, right, b, T, p, q, scale, grads, norms, euclid,
                                                               stream);
    if (!euclid) {
      at::Tensor K = gram->to(acc_dtype).contiguous();
      auto kernel = &psgn_metric_kernel<acc_t>;
      DEER_LAUNCH(kernel, static_cast<unsigned>(b), 256, stream, grads.data_ptr<acc_t>(), K.data_ptr<acc_t>(), p, q,
                  gram_side, norms.data_ptr<acc_t>());
    }
  });
  return {grads, norms};
}

}  // namespace psgn_cuda
}  // namespace deer
