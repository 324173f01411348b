// Kernels and launch logic of the CUDA backend of per_sample_grad_norm (math in
// per_sample_grad_norm.h). per_sample_grad_norm_cuda.cu compiles this with nvcc for the product;
// csrc/tests/test_per_sample_grad_norm_cuda_emu.cpp compiles the same text for the CPU emulator
// (csrc/tests/cuda_emu.h) so CI executes it without a GPU.
//
// Two gradient kernels:
// - psgn_thin_kernel for shapes with a rank side <= 8 (every LoRA layer at the usual ranks; see its
//   comment): registers hold all rank columns, the long input streams through with 16-byte loads.
// - psgn_tile_kernel otherwise (and for rank <= 8 under DEER_CUDA_PSGN_KERNEL=tile): one thread block
//   per (sample, BP x BQ output tile) walks the T tokens in chunks of KT, staging L[t, tile rows] and
//   R[t, tile cols] in shared memory, each thread accumulating a TP x TQ register micro-tile. Tiles:
//   128 x 8 (B phase), 8 x 128 (A phase), 64 x 64 when neither side is a small rank.
// Accumulation in fp32 (fp64 for fp64 inputs). Norms: each block reduces its part into its own slot
// of a (b, blocks) buffer, summed afterwards (deterministic, no atomics); the thin kernel also does
// the regulated metric in that pass (K on the rank side), otherwise a second kernel reads g.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
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

// Thin LoRA shapes (one of p, q is the rank r <= 8; W, the other, is long): the input on the long
// side ("big": L = G in the B phase, R = X in the A phase) is nearly all the bytes, so each thread
// owns VEC consecutive long-side columns and every rank column: acc[VEC][RK] in registers. Per
// token a thread makes one 16-byte load of big (coalesced across the warp; no shared-memory
// staging of it), reads the token's r small-side values from shared memory (one broadcast per
// warp; staged KT tokens at a time), and does VEC * RK FMAs. RK is r rounded up to 1, 2, 4 or 8;
// the padding columns are zero and never written. Norms are reduced per block as in
// psgn_tile_kernel; the regulated metric too, in the same pass: K acts on the rank side, which each
// thread holds whole for its columns, so ||g||_K^2 = sum over long-side columns w of v_w^T K v_w,
// v_w = the thread's RK values of column w (K staged in shared memory, zero-padded to RK x RK).
constexpr int kThinThreads = 128, kThinKT = 32;

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) VecT {
  scalar_t v[VEC];
};

template <typename scalar_t, typename acc_t, int VEC, int RK, bool BIG_IS_LEFT>
__global__ void __launch_bounds__(kThinThreads)
psgn_thin_kernel(const scalar_t* __restrict__ big, const scalar_t* __restrict__ small, int64_t T, int64_t W, int r,
                 int64_t nblk, bool vec_ok, acc_t scale, const acc_t* __restrict__ K, acc_t* __restrict__ G,
                 acc_t* __restrict__ partial) {
  __shared__ acc_t Ss[kThinKT][RK];
  __shared__ acc_t Ks[RK][RK];
  __shared__ acc_t red[32];
  if (K != nullptr)  // read after the first barrier of the token loop (or the reduction's)
    for (int idx = threadIdx.x; idx < RK * RK; idx += kThinThreads) {
      const int c = idx / RK, d = idx % RK;
      Ks[c][d] = (c < r && d < r) ? K[c * r + d] : acc_t(0);
    }
  const int64_t i = blockIdx.x / nblk, blk = blockIdx.x % nblk;
  const int64_t w0 = (blk * kThinThreads + threadIdx.x) * VEC;
  const scalar_t* Bi = big + i * T * W;
  const scalar_t* Si = small + i * T * r;
  acc_t acc[VEC][RK];
#pragma unroll
  for (int u = 0; u < VEC; ++u)
#pragma unroll
    for (int c = 0; c < RK; ++c) acc[u][c] = acc_t(0);
  const bool full = vec_ok && w0 + VEC <= W;
  for (int64_t t0 = 0; t0 < T; t0 += kThinKT) {
    for (int idx = threadIdx.x; idx < kThinKT * RK; idx += kThinThreads) {
      const int kk = idx / RK, c = idx % RK;
      const int64_t t = t0 + kk;
      Ss[kk][c] = (t < T && c < r) ? static_cast<acc_t>(Si[t * r + c]) : acc_t(0);
    }
    __syncthreads();
    const int nk = static_cast<int>(T - t0 < kThinKT ? T - t0 : kThinKT);
    if (w0 < W) {
#pragma unroll 4
      for (int kk = 0; kk < nk; ++kk) {
        acc_t bv[VEC];
        const scalar_t* row = Bi + (t0 + kk) * W + w0;
        if (full) {
          const VecT<scalar_t, VEC> x = *reinterpret_cast<const VecT<scalar_t, VEC>*>(row);
#pragma unroll
          for (int u = 0; u < VEC; ++u) bv[u] = static_cast<acc_t>(x.v[u]);
        } else {
#pragma unroll
          for (int u = 0; u < VEC; ++u) bv[u] = w0 + u < W ? static_cast<acc_t>(row[u]) : acc_t(0);
        }
#pragma unroll
        for (int c = 0; c < RK; ++c) {
          const acc_t sv = Ss[kk][c];
#pragma unroll
          for (int u = 0; u < VEC; ++u) acc[u][c] += bv[u] * sv;
        }
      }
    }
    __syncthreads();
  }
  if (T == 0) __syncthreads();  // no token loop ran: Ks must still be visible before use
  acc_t part = 0;
#pragma unroll
  for (int u = 0; u < VEC; ++u) {
    const int64_t w = w0 + u;
    if (w >= W) continue;
    acc_t v[RK];
#pragma unroll
    for (int c = 0; c < RK; ++c) {
      v[c] = acc[u][c] * scale;
      if (c >= r) continue;
      // B phase: g (W, r) row-major; A phase: g (r, W) row-major.
      if (BIG_IS_LEFT)
        G[(i * W + w) * r + c] = v[c];
      else
        G[(i * r + c) * W + w] = v[c];
    }
    if (K == nullptr) {
#pragma unroll
      for (int c = 0; c < RK; ++c) part += v[c] * v[c];
    } else {
#pragma unroll
      for (int c = 0; c < RK; ++c) {
        acc_t kv = 0;
#pragma unroll
        for (int d = 0; d < RK; ++d) kv += Ks[c][d] * v[d];
        part += v[c] * kv;
      }
    }
  }
  const acc_t tot = block_sum(part, red);
  if (threadIdx.x == 0) partial[i * nblk + blk] = tot;
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

template <typename scalar_t, typename acc_t, bool BIG_IS_LEFT, typename Stream>
void launch_thin(const at::Tensor& big, const at::Tensor& small, int64_t b, int64_t T, int64_t W, int64_t r,
                 double scale, const at::Tensor& K, at::Tensor& grads, at::Tensor& norms, Stream stream) {
  constexpr int VEC = static_cast<int>(16 / sizeof(scalar_t));  // 16-byte loads: 4 fp32, 8 fp16/bf16, 2 fp64
  const int64_t nblk = (W + kThinThreads * VEC - 1) / (kThinThreads * VEC);
  DEER_CHECK_ARG(b * nblk < (int64_t(1) << 31), "per_sample_grad_norm (cuda): batch x blocks too large for one launch");
  auto partial = at::empty({b, nblk}, grads.options());
  // 16-byte loads need every row start aligned: W a multiple of VEC and an aligned base.
  const bool vec_ok = W % VEC == 0 && reinterpret_cast<uintptr_t>(big.data_ptr<scalar_t>()) % (sizeof(scalar_t) * VEC) == 0;
  const unsigned grid = static_cast<unsigned>(b * nblk);
  auto go = [&](auto kernel) {
    DEER_LAUNCH(kernel, grid, kThinThreads, stream, big.data_ptr<scalar_t>(), small.data_ptr<scalar_t>(), T, W,
                static_cast<int>(r), nblk, vec_ok, static_cast<acc_t>(scale),
                K.defined() ? K.data_ptr<acc_t>() : nullptr, grads.data_ptr<acc_t>(), partial.data_ptr<acc_t>());
  };
  if (r <= 1) go(&psgn_thin_kernel<scalar_t, acc_t, VEC, 1, BIG_IS_LEFT>);
  else if (r <= 2) go(&psgn_thin_kernel<scalar_t, acc_t, VEC, 2, BIG_IS_LEFT>);
  else if (r <= 4) go(&psgn_thin_kernel<scalar_t, acc_t, VEC, 4, BIG_IS_LEFT>);
  else go(&psgn_thin_kernel<scalar_t, acc_t, VEC, 8, BIG_IS_LEFT>);
  at::sum_out(norms, partial, {1});
}

// DEER_CUDA_PSGN_KERNEL=tile sends the rank <= 8 shapes to the shared-memory tile kernel instead of
// the thin one (read per call, so a benchmark can time both in one process).
inline bool thin_kernel_enabled() {
  const char* v = std::getenv("DEER_CUDA_PSGN_KERNEL");
  return v == nullptr || std::strcmp(v, "tile") != 0;
}

// Everything but the device guard: checks, kernel choice, launches. Inputs on the launch's device.
template <typename Stream>
std::tuple<at::Tensor, at::Tensor> per_sample_grad_norm_launch(const at::Tensor& left_in, const at::Tensor& right_in,
                                                               double scale, const c10::optional<at::Tensor>& gram,
                                                               int64_t gram_side, Stream stream) {
  auto [b, T, p, q] = per_sample_grad_norm_check(left_in, right_in, gram, gram_side);
  auto left = left_in.contiguous();
  auto right = right_in.contiguous();
  const auto acc_dtype = acc_dtype_of(left);
  auto opts = left.options().dtype(acc_dtype);
  auto grads = at::empty({b, p, q}, opts);
  auto norms = at::empty({b}, opts);
  if (b == 0 || p == 0 || q == 0) return {grads.zero_(), norms.zero_()};
  const bool euclid = !(gram.has_value() && gram->defined());
  const bool thin = thin_kernel_enabled();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, left.scalar_type(), "per_sample_grad_norm_cuda", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    // Thin kernel when a side is a rank <= 8 (B phase: q = r, the long side is L's; A phase: p = r,
    // R's). It computes the metric norm itself when K acts on that rank side (always, from deer's
    // engine); a K on the long side falls back to the separate metric pass below.
    const at::Tensor K = euclid ? at::Tensor() : gram->to(acc_dtype).contiguous();
    const bool thin_b = thin && q <= 8, thin_a = thin && !thin_b && p <= 8;
    bool metric_done = euclid;
    if (thin_b || thin_a) {
      const bool fuse = !euclid && gram_side == (thin_b ? 1 : 0);
      const at::Tensor K_fused = fuse ? K : at::Tensor();
      if (thin_b)
        launch_thin<scalar_t, acc_t, true>(left, right, b, T, p, q, scale, K_fused, grads, norms, stream);
      else
        launch_thin<scalar_t, acc_t, false>(right, left, b, T, q, p, scale, K_fused, grads, norms, stream);
      metric_done = euclid || fuse;
    } else if (q <= 8) {
      launch_tiles<scalar_t, acc_t, TileCfg<128, 8, 4, 1, 16>>(left, right, b, T, p, q, scale, grads, norms, euclid,
                                                               stream);
    } else if (p <= 8) {
      launch_tiles<scalar_t, acc_t, TileCfg<8, 128, 1, 4, 16>>(left, right, b, T, p, q, scale, grads, norms, euclid,
                                                               stream);
    } else {
      launch_tiles<scalar_t, acc_t, TileCfg<64, 64, 4, 4, 16>>(left, right, b, T, p, q, scale, grads, norms, euclid,
                                                               stream);
    }
    if (!metric_done) {
      auto kernel = &psgn_metric_kernel<acc_t>;
      DEER_LAUNCH(kernel, static_cast<unsigned>(b), 256, stream, grads.data_ptr<acc_t>(), K.data_ptr<acc_t>(), p, q,
                  gram_side, norms.data_ptr<acc_t>());
    }
  });
  return {grads, norms};
}

}  // namespace psgn_cuda
}  // namespace deer
