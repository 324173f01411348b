// Kernels and launch logic of the CUDA backend of clip_reduce_noise, clip_reduce_noise_fused and
// clip_reduce_noise_grouped (math in clip_reduce_noise.h). clip_reduce_noise_cuda.cu compiles this
// with nvcc for the product; csrc/tests/test_clip_reduce_noise_cuda_emu.cpp compiles the same text
// for the CPU emulator (csrc/tests/cuda_emu.h) so CI executes it without a GPU.
//
// Isotropic noise: one kernel, one thread per element pair (2j, 2j+1): the clipped sum over the b
// samples (coalesced: consecutive threads read consecutive pairs), one Philox call for both normals,
// the final scale. When pairs alone are too few threads for the GPU, a first kernel sums chunks of
// samples into a few partial rows (crn_partial_kernel) and this one sums those.
// Regulated noise: the same kernel writes the clipped sum and Z (double), then one thread per column
// (side 0, xi = R^{-1} Z) or per row (side 1, xi = Z R^{-T}) back-substitutes in place in double and
// finishes the output.
// Fused: the weighted sum over samples is one GEMM (cuBLAS through at::matmul) on clip-scaled rows
// of L (b*T x p)^T (b*T x q), then the same noise kernels with b = 1.
// Grouped: the same per-pair and per-column bodies, for all layers in one launch each, driven by a
// per-layer descriptor table.
// Fused optimizer step (clip_reduce_noise, clip_reduce_noise_grouped; fused_update.h): the thread
// that writes an output element for the last time (crn_finish: the isotropic / no-noise end of the
// pair kernel, or the solve) also steps that element of the layer's parameter and optimizer state,
// from the rounded output value it wrote, exactly as the CPU backend does. No extra pass over memory:
// the parameter and state are read and written once, by the thread that already holds the gradient.
// Intermediate writes (the regulated sum, the split path's partial rows) never update.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "clip_reduce_noise/clip_reduce_noise.h"
#include "clip_reduce_noise/philox.h"
#include "common.h"
#include "cuda_compat.h"

namespace deer {
namespace crn_cuda {

// The last write of output element e (value v, computed in double) and the fused optimizer step of
// that element from the rounded value (u == nullptr: no update).
template <typename acc_t>
__device__ __forceinline__ void crn_finish(acc_t* __restrict__ out, int64_t e, double v, const UpdateArgs* u) {
  const acc_t o = static_cast<acc_t>(v);
  out[e] = o;
  if (u != nullptr) apply_update<acc_t>(*u, e, o);
}

// Element pair j of one layer: the clipped sum over its b samples, then the noise (isotropic or no
// noise: the final output and its update u; regulated: the sum and Z, for the solve kernel, which
// finishes the output and updates).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void crn_sum_noise_pair(const scalar_t* __restrict__ g, const acc_t* __restrict__ clip,
                                                   int64_t b, int64_t P, double noise_std, double inv_ebs,
                                                   const philox::Key& key, bool isotropic, acc_t* __restrict__ out,
                                                   double* __restrict__ z, const UpdateArgs* u, int64_t j) {
  const int64_t e0 = 2 * j, e1 = 2 * j + 1;
  if (e0 >= P) return;
  const bool has1 = e1 < P;
  acc_t s0 = 0, s1 = 0;
  for (int64_t i = 0; i < b; ++i) {
    const acc_t ci = clip[i];
    s0 += ci * static_cast<acc_t>(g[i * P + e0]);
    if (has1) s1 += ci * static_cast<acc_t>(g[i * P + e1]);
  }
  if (noise_std == 0.0) {
    crn_finish(out, e0, s0 * inv_ebs, u);
    if (has1) crn_finish(out, e1, s1 * inv_ebs, u);
    return;
  }
  double z0, z1;
  philox::normal_pair(key, static_cast<uint32_t>(j), &z0, &z1);
  if (isotropic) {
    crn_finish(out, e0, (s0 + noise_std * z0) * inv_ebs, u);
    if (has1) crn_finish(out, e1, (s1 + noise_std * z1) * inv_ebs, u);
  } else {  // intermediate: no update here
    out[e0] = s0;
    z[e0] = z0;
    if (has1) {
      out[e1] = s1;
      z[e1] = z1;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void crn_sum_noise_kernel(const scalar_t* __restrict__ g, const acc_t* __restrict__ clip, int64_t b,
                                     int64_t P, double noise_std, double inv_ebs, philox::Key key, bool isotropic,
                                     acc_t* __restrict__ out, double* __restrict__ z, UpdateArgs u) {
  crn_sum_noise_pair(g, clip, b, P, noise_std, inv_ebs, key, isotropic, out, z, &u,
                     blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x);
}

// Split sum over samples: block row y sums samples [y * chunk, (y + 1) * chunk) of pair j into
// part[y, :]. With b = 256 and a rank-8 layer (~9K element pairs) one thread per pair would leave
// most of the GPU idle, each thread walking all samples with one load in flight; the split gives
// every thread a short walk, and crn_sum_noise_kernel then sums the few partial rows (unit weights).
template <typename scalar_t, typename acc_t>
__global__ void crn_partial_kernel(const scalar_t* __restrict__ g, const acc_t* __restrict__ clip, int64_t b, int64_t P,
                                   int64_t chunk, acc_t* __restrict__ part) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t e0 = 2 * j, e1 = 2 * j + 1;
  if (e0 >= P) return;
  const bool has1 = e1 < P;
  const int64_t i0 = blockIdx.y * chunk, i1 = i0 + chunk < b ? i0 + chunk : b;
  acc_t s0 = 0, s1 = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const acc_t ci = clip[i];
    s0 += ci * static_cast<acc_t>(g[i * P + e0]);
    if (has1) s1 += ci * static_cast<acc_t>(g[i * P + e1]);
  }
  acc_t* row = part + blockIdx.y * P;
  row[e0] = s0;
  if (has1) row[e1] = s1;
}

// side 0: thread per column c, xi[:, c] = R^{-1} Z[:, c] (p = r rows). side 1: thread per row a,
// xi[a, :] = Z[a, :] R^{-T}, i.e. R xi[a, :]^T = Z[a, :]^T (q = r). In place in z, then finish out
// (the last write of each element, with its update u).
template <typename acc_t>
__device__ __forceinline__ void crn_solve_one(acc_t* __restrict__ out, double* __restrict__ z,
                                              const double* __restrict__ R, int64_t p, int64_t q, int64_t side,
                                              double noise_std, double inv_ebs, const UpdateArgs* u, int64_t idx) {
  if (side == 0) {
    if (idx >= q) return;
    const int64_t c = idx;
    for (int64_t a = p - 1; a >= 0; --a) {
      double s = z[a * q + c];
      for (int64_t k = a + 1; k < p; ++k) s -= R[a * p + k] * z[k * q + c];
      s /= R[a * p + a];
      z[a * q + c] = s;
      crn_finish(out, a * q + c, (out[a * q + c] + noise_std * s) * inv_ebs, u);
    }
  } else {
    if (idx >= p) return;
    const int64_t a = idx;
    double* za = z + a * q;
    for (int64_t c = q - 1; c >= 0; --c) {
      double s = za[c];
      for (int64_t k = c + 1; k < q; ++k) s -= R[c * q + k] * za[k];
      s /= R[c * q + c];
      za[c] = s;
      crn_finish(out, a * q + c, (out[a * q + c] + noise_std * s) * inv_ebs, u);
    }
  }
}

template <typename acc_t>
__global__ void crn_regulated_kernel(acc_t* __restrict__ out, double* __restrict__ z, const double* __restrict__ R,
                                     int64_t p, int64_t q, int64_t side, double noise_std, double inv_ebs,
                                     UpdateArgs u) {
  crn_solve_one(out, z, R, p, q, side, noise_std, inv_ebs, &u,
                blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x);
}

// Grouped launch: one row of int64 per layer (pointers as integers), blocks numbered across layers;
// a block finds its layer by the first-block column and runs the per-layer body. Layers are few (one
// per trained LoRA factor), so a linear scan of the table costs less than a cache miss. The fused
// updates ride in a parallel device table of L UpdateArgs (upds, row k = layer k; nullptr when no
// layer has one).
enum CrnDesc : int { kDG, kDClip, kDOut, kDZ, kDR, kDB, kDRows, kDCols, kDSide, kDLayer, kDSumBlock0, kDSolveBlock0,
                     kDescWidth };

__device__ __forceinline__ const int64_t* crn_find_layer(const int64_t* desc, int64_t L, int col, int64_t block) {
  int64_t k = 0;
  while (k + 1 < L && desc[(k + 1) * kDescWidth + col] <= block) ++k;
  return desc + k * kDescWidth;
}

// Layer d's row of the update table (d from crn_find_layer), or nullptr when there is no table.
__device__ __forceinline__ const UpdateArgs* crn_layer_update(const UpdateArgs* upds, const int64_t* desc,
                                                              const int64_t* d) {
  return upds != nullptr ? upds + (d - desc) / kDescWidth : nullptr;
}

template <typename scalar_t, typename acc_t>
__global__ void crn_grouped_sum_noise_kernel(const int64_t* __restrict__ desc, const UpdateArgs* __restrict__ upds,
                                             int64_t L, double noise_std, double inv_ebs, uint64_t seed,
                                             uint32_t step, uint32_t client) {
  const int64_t* d = crn_find_layer(desc, L, kDSumBlock0, blockIdx.x);
  const auto key = philox::make_key(seed, step, static_cast<uint32_t>(d[kDLayer]), client);
  const int64_t j = (blockIdx.x - d[kDSumBlock0]) * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  crn_sum_noise_pair(reinterpret_cast<const scalar_t*>(d[kDG]), reinterpret_cast<const acc_t*>(d[kDClip]), d[kDB],
                     d[kDRows] * d[kDCols], noise_std, inv_ebs, key, d[kDR] == 0, reinterpret_cast<acc_t*>(d[kDOut]),
                     reinterpret_cast<double*>(d[kDZ]), crn_layer_update(upds, desc, d), j);
}

// Solve blocks: only the regulated layers own any (the others' first block equals the next one's).
template <typename acc_t>
__global__ void crn_grouped_solve_kernel(const int64_t* __restrict__ desc, const UpdateArgs* __restrict__ upds,
                                         int64_t L, double noise_std, double inv_ebs) {
  const int64_t* d = crn_find_layer(desc, L, kDSolveBlock0, blockIdx.x);
  crn_solve_one(reinterpret_cast<acc_t*>(d[kDOut]), reinterpret_cast<double*>(d[kDZ]),
                reinterpret_cast<const double*>(d[kDR]), d[kDRows], d[kDCols], d[kDSide], noise_std, inv_ebs,
                crn_layer_update(upds, desc, d),
                (blockIdx.x - d[kDSolveBlock0]) * static_cast<int64_t>(blockDim.x) + threadIdx.x);
}

// The regulated solve divides by R's diagonal: a usable factor has a positive diagonal and a finite
// upper triangle (the CPU backend's rule). chol_ok gives that as a device bool (no host sync), so
// several factors can be checked with one sync.
inline at::Tensor chol_ok(const at::Tensor& R) {
  return at::logical_and((R.diagonal() > 0).all(), at::isfinite(R.triu()).all());
}

// R in double, or the CPU backend's error. One r x r reduction and one host sync per call.
inline at::Tensor chol_checked(const at::Tensor& chol) {
  auto R = chol.to(at::kDouble).contiguous();
  if (!chol_ok(R).item<bool>()) clip_reduce_noise_chol_error(R);
  return R;
}

// grads (b, p, q) contiguous on the launch's device; clip already in the accumulation dtype; u the
// layer's validated fused update (kind none: no update).
template <typename Stream>
at::Tensor crn_launch(const at::Tensor& grads, const at::Tensor& clip, double noise_std, double ebs,
                      const c10::optional<at::Tensor>& chol, int64_t noise_side, int64_t seed, int64_t step,
                      int64_t layer, int64_t client, const UpdateArgs& u, Stream stream) {
  const int64_t b = grads.size(0), p = grads.size(1), q = grads.size(2), P = p * q;
  auto out = at::empty({p, q}, grads.options().dtype(acc_dtype_of(grads)));
  if (P == 0) return out;
  const bool regulated = noise_std != 0.0 && chol.has_value() && chol->defined();
  at::Tensor z, R;
  if (regulated) {
    z = at::empty({p, q}, grads.options().dtype(at::kDouble));
    R = chol_checked(*chol);
  }
  const auto key = philox::make_key(static_cast<uint64_t>(seed), static_cast<uint32_t>(step),
                                    static_cast<uint32_t>(layer), static_cast<uint32_t>(client));
  const int threads = 256;
  const int64_t npairs = (P + 1) / 2;
  const double inv = 1.0 / ebs;
  const unsigned pair_blocks = static_cast<unsigned>((npairs + threads - 1) / threads);
  // Sample chunks so that pairs x chunks reach ~64K threads (see crn_partial_kernel).
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(b, (int64_t(1) << 16) / std::max<int64_t>(1, npairs)));
  const int64_t chunk = (b + want - 1) / std::max<int64_t>(1, want);
  const int64_t splits = b > 0 ? (b + chunk - 1) / chunk : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "clip_reduce_noise_cuda", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    // The update rides on the kernel that finishes the output: the sum + noise kernel (the second one
    // on the split path), or the solve when the noise is regulated.
    if (splits > 1) {
      auto part = at::empty({splits, P}, grads.options().dtype(out.scalar_type()));
      auto partial_sum = &crn_partial_kernel<scalar_t, acc_t>;
      DEER_LAUNCH(partial_sum, dim3(pair_blocks, static_cast<unsigned>(splits)), threads, stream,
                  grads.data_ptr<scalar_t>(), clip.data_ptr<acc_t>(), b, P, chunk, part.data_ptr<acc_t>());
      auto ones = at::ones({splits}, part.options());
      auto sum_noise = &crn_sum_noise_kernel<acc_t, acc_t>;
      DEER_LAUNCH(sum_noise, pair_blocks, threads, stream, part.data_ptr<acc_t>(), ones.data_ptr<acc_t>(), splits, P,
                  noise_std, inv, key, !regulated, out.data_ptr<acc_t>(), regulated ? z.data_ptr<double>() : nullptr,
                  u);
    } else {
      auto sum_noise = &crn_sum_noise_kernel<scalar_t, acc_t>;
      DEER_LAUNCH(sum_noise, pair_blocks, threads, stream, grads.data_ptr<scalar_t>(), clip.data_ptr<acc_t>(), b, P,
                  noise_std, inv, key, !regulated, out.data_ptr<acc_t>(), regulated ? z.data_ptr<double>() : nullptr,
                  u);
    }
    if (regulated) {
      const int64_t n = noise_side == 0 ? q : p;
      auto solve = &crn_regulated_kernel<acc_t>;
      DEER_LAUNCH(solve, static_cast<unsigned>((n + 127) / 128), 128, stream, out.data_ptr<acc_t>(),
                  z.data_ptr<double>(), R.data_ptr<double>(), p, q, noise_side, noise_std, inv, u);
    }
  });
  return out;
}

template <typename Stream>
at::Tensor clip_reduce_noise_launch(const at::Tensor& grads_in, const at::Tensor& clip_in, double noise_std,
                                    double expected_batch_size, const c10::optional<at::Tensor>& chol,
                                    int64_t noise_side, int64_t seed, int64_t step, int64_t layer, int64_t client,
                                    at::TensorList update_tensors, at::ArrayRef<double> update_hyper,
                                    Stream stream) {
  DEER_CHECK_ARG(grads_in.dim() == 3, "clip_reduce_noise: grads must be (b, p, q) per-sample gradients, got ",
                 grads_in.sizes());
  DEER_CHECK_ARG(at::isFloatingType(grads_in.scalar_type()), "clip_reduce_noise: grads must be floating point");
  const int64_t b = grads_in.size(0), p = grads_in.size(1), q = grads_in.size(2);
  clip_reduce_noise_check("clip_reduce_noise", b, p, q, clip_in, grads_in.device(), noise_std, expected_batch_size,
                          chol, noise_side, step, layer, client);
  const auto acc = acc_dtype_of(grads_in);
  const UpdateArgs u = clip_reduce_noise_update_args("clip_reduce_noise", update_tensors, update_hyper, 1, 0, p, q,
                                                     acc, grads_in.device());
  return crn_launch(grads_in.contiguous(), clip_in.to(acc).contiguous(), noise_std, expected_batch_size, chol,
                    noise_side, seed, step, layer, client, u, stream);
}

template <typename Stream>
at::Tensor clip_reduce_noise_fused_launch(const at::Tensor& left_in, const at::Tensor& right_in, double scale,
                                          const at::Tensor& clip_in, double noise_std, double expected_batch_size,
                                          const c10::optional<at::Tensor>& chol, int64_t noise_side, int64_t seed,
                                          int64_t step, int64_t layer, int64_t client, Stream stream) {
  DEER_CHECK_ARG(left_in.dim() == 3 && right_in.dim() == 3 && left_in.size(0) == right_in.size(0) &&
                     left_in.size(1) == right_in.size(1),
                 "clip_reduce_noise_fused: expects left (b, T, p) and right (b, T, q) sharing b and T; got ",
                 left_in.sizes(), " and ", right_in.sizes());
  DEER_CHECK_ARG(left_in.scalar_type() == right_in.scalar_type() && at::isFloatingType(left_in.scalar_type()),
                 "clip_reduce_noise_fused: left and right must share a floating dtype");
  const int64_t b = left_in.size(0), T = left_in.size(1), p = left_in.size(2), q = right_in.size(2);
  clip_reduce_noise_check("clip_reduce_noise_fused", b, p, q, clip_in, left_in.device(), noise_std,
                          expected_batch_size, chol, noise_side, step, layer, client);
  const auto acc = acc_dtype_of(left_in);
  // fp32 GEMM (TF32 off by torch default for matmul) on clip-weighted rows: sum_i clip_i scale L_i^T R_i.
  auto w = (clip_in.to(acc) * scale).view({b, 1, 1});
  auto Lw = (left_in.to(acc) * w).reshape({b * T, p});
  auto S = at::matmul(Lw.t(), right_in.to(acc).reshape({b * T, q})).contiguous();
  auto ones = at::ones({1}, S.options());
  return crn_launch(S.unsqueeze(0), ones, noise_std, expected_batch_size, chol, noise_side, seed, step, layer, client,
                    UpdateArgs{}, stream);  // the fused op has no optimizer step
}

// Every layer of a model: per-layer checks (inputs and fused updates, all before any launch), then
// (same dtype everywhere and enough element pairs in total to fill the GPU) one grouped sum + noise
// launch and, when any layer is regulated, one grouped solve launch; otherwise the per-layer path
// (whose sample split suits a few small layers better).
template <typename Stream>
std::vector<at::Tensor> clip_reduce_noise_grouped_launch(at::TensorList grads_in, at::TensorList clips,
                                                         double noise_std, double expected_batch_size,
                                                         const c10::List<c10::optional<at::Tensor>>& chols,
                                                         at::IntArrayRef sides, int64_t seed, int64_t step,
                                                         at::IntArrayRef layers, int64_t client,
                                                         at::TensorList update_tensors,
                                                         at::ArrayRef<double> update_hyper, Stream stream) {
  clip_reduce_noise_grouped_check(grads_in, clips, noise_std, expected_batch_size, chols, sides, step, layers,
                                  client);
  const int64_t L = static_cast<int64_t>(grads_in.size());
  std::vector<UpdateArgs> upds(L);
  bool any_update = false;
  for (int64_t k = 0; k < L; ++k) {
    upds[k] = clip_reduce_noise_update_args("clip_reduce_noise_grouped", update_tensors, update_hyper, L, k,
                                            grads_in[k].size(1), grads_in[k].size(2), acc_dtype_of(grads_in[k]),
                                            grads_in[k].device());
    any_update = any_update || upds[k].kind != kUpdateNone;
  }
  std::vector<at::Tensor> out(L);
  if (L == 0) return out;
  bool same_dtype = true;
  int64_t total_pairs = 0;
  for (int64_t k = 0; k < L; ++k) {
    same_dtype = same_dtype && grads_in[k].scalar_type() == grads_in[0].scalar_type();
    total_pairs += (grads_in[k].size(1) * grads_in[k].size(2) + 1) / 2;
  }
  if (!same_dtype || total_pairs < (int64_t(1) << 16)) {  // inputs already checked above
    for (int64_t k = 0; k < L; ++k)
      out[k] = crn_launch(grads_in[k].contiguous(), clips[k].to(acc_dtype_of(grads_in[k])).contiguous(), noise_std,
                          expected_batch_size, chols.get(k), sides[k], seed, step, layers[k], client, upds[k], stream);
    return out;
  }
  const auto acc = acc_dtype_of(grads_in[0]);
  const auto opts = grads_in[0].options();
  std::vector<at::Tensor> keep;  // contiguous inputs, clips, Z and R: alive until the launches are queued
  keep.reserve(4 * L);
  auto desc = at::empty({L, kDescWidth}, at::TensorOptions().dtype(at::kLong));
  int64_t* D = desc.data_ptr<int64_t>();
  // Every regulated layer's factor checked with one host sync (not one per layer).
  std::vector<at::Tensor> Rs(L), oks;
  for (int64_t k = 0; k < L; ++k) {
    const auto& ch = chols.get(k);
    if (noise_std != 0.0 && ch.has_value() && ch->defined()) {
      Rs[k] = ch->to(at::kDouble).contiguous();
      oks.push_back(chol_ok(Rs[k]));
    }
  }
  if (!oks.empty() && !at::stack(oks).all().item<bool>())
    for (int64_t k = 0; k < L; ++k)
      if (Rs[k].defined()) chol_checked(Rs[k]);  // raises with the per-layer message
  const int threads = 256, solve_threads = 128;
  int64_t sum_blocks = 0, solve_blocks = 0;
  for (int64_t k = 0; k < L; ++k) {
    auto g = grads_in[k].contiguous();
    auto c = clips[k].to(acc).contiguous();
    const int64_t b = g.size(0), p = g.size(1), q = g.size(2), P = p * q;
    out[k] = at::empty({p, q}, opts.dtype(acc));
    at::Tensor z;
    if (Rs[k].defined()) z = at::empty({p, q}, opts.dtype(at::kDouble));
    int64_t* d = D + k * kDescWidth;
    d[kDG] = reinterpret_cast<intptr_t>(g.data_ptr());
    d[kDClip] = reinterpret_cast<intptr_t>(c.data_ptr());
    d[kDOut] = reinterpret_cast<intptr_t>(out[k].data_ptr());
    d[kDZ] = z.defined() ? reinterpret_cast<intptr_t>(z.data_ptr()) : 0;
    d[kDR] = Rs[k].defined() ? reinterpret_cast<intptr_t>(Rs[k].data_ptr()) : 0;
    d[kDB] = b;
    d[kDRows] = p;
    d[kDCols] = q;
    d[kDSide] = sides[k];
    d[kDLayer] = layers[k];
    d[kDSumBlock0] = sum_blocks;
    d[kDSolveBlock0] = solve_blocks;
    sum_blocks += ((P + 1) / 2 + threads - 1) / threads;
    if (Rs[k].defined()) solve_blocks += ((sides[k] == 0 ? q : p) + solve_threads - 1) / solve_threads;
    keep.push_back(g);
    keep.push_back(c);
    if (z.defined()) keep.push_back(z);
  }
  DEER_CHECK_ARG(sum_blocks < (int64_t(1) << 31), "clip_reduce_noise_grouped: too many elements for one launch");
  const auto desc_dev = desc.to(grads_in[0].device());
  // The update table: the L validated UpdateArgs as bytes (plain data, same layout on host and
  // device), copied like desc; none at all when no layer steps its parameter.
  static_assert(std::is_trivially_copyable_v<UpdateArgs>, "UpdateArgs travels to the device as bytes");
  at::Tensor upds_dev;
  if (any_update) {
    auto upds_host = at::empty({static_cast<int64_t>(L * sizeof(UpdateArgs))}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(upds_host.data_ptr(), upds.data(), L * sizeof(UpdateArgs));
    upds_dev = upds_host.to(grads_in[0].device());
  }
  const UpdateArgs* upds_ptr = any_update ? static_cast<const UpdateArgs*>(upds_dev.data_ptr()) : nullptr;
  const double inv = 1.0 / expected_batch_size;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads_in[0].scalar_type(), "clip_reduce_noise_grouped", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    auto sum_noise = &crn_grouped_sum_noise_kernel<scalar_t, acc_t>;
    DEER_LAUNCH(sum_noise, static_cast<unsigned>(sum_blocks), threads, stream, desc_dev.data_ptr<int64_t>(), upds_ptr,
                L, noise_std, inv, static_cast<uint64_t>(seed), static_cast<uint32_t>(step),
                static_cast<uint32_t>(client));
    if (solve_blocks > 0) {  // some layer is regulated
      auto solve = &crn_grouped_solve_kernel<acc_t>;
      DEER_LAUNCH(solve, static_cast<unsigned>(solve_blocks), solve_threads, stream, desc_dev.data_ptr<int64_t>(),
                  upds_ptr, L, noise_std, inv);
    }
  });
  return out;
}

}  // namespace crn_cuda
}  // namespace deer
