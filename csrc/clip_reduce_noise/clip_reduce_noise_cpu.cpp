// CPU backend of clip_reduce_noise and clip_reduce_noise_fused (math in clip_reduce_noise.h).
//
// Clipped sum: parallel over chunks of the p*q output; each chunk walks the b samples with a
// contiguous, vectorised axpy (fp32 accumulation for fp16/bf16/fp32 gradients, fp64 for fp64).
// Fused: the weighted register-tiled GEMM of psgn_tile.h over all b*T tokens, clip_i * scale riding
// on the broadcast operand, parallel over blocks of the long dimension.
// Noise: Z from philox.h in double, the triangular solve in double (K may be ill-conditioned:
// lambda is often small), added once at the end.
#include "clip_reduce_noise/clip_reduce_noise.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "clip_reduce_noise/philox.h"
#include "clip_reduce_noise/philox_normals.h"
#include "common.h"
#include "per_sample_grad_norm/psgn_tile.h"

namespace deer {

void clip_reduce_noise_check(const char* what, int64_t b, int64_t p, int64_t q, const at::Tensor& clip,
                             const at::Device& device, double noise_std, double expected_batch_size,
                             const c10::optional<at::Tensor>& chol, int64_t noise_side, int64_t step,
                             int64_t layer, int64_t client) {
  DEER_CHECK_ARG(clip.dim() == 1 && clip.size(0) == b, what, ": clip must be (b,) = (", b,
                 ",) with one clipping factor per sample, got ", clip.sizes());
  DEER_CHECK_ARG(at::isFloatingType(clip.scalar_type()), what, ": clip must be floating point, got ", clip.scalar_type());
  DEER_CHECK_ARG(clip.device() == device, what, ": clip is on ", clip.device(), " but the gradients are on ", device);
  DEER_CHECK_ARG(noise_std >= 0 && std::isfinite(noise_std), what, ": noise_std must be finite and >= 0, got ", noise_std);
  DEER_CHECK_ARG(expected_batch_size > 0 && std::isfinite(expected_batch_size), what,
                 ": expected_batch_size must be > 0, got ", expected_batch_size);
  constexpr int64_t u32 = int64_t(1) << 32;
  DEER_CHECK_ARG(step >= 0 && step < u32 && layer >= 0 && layer < u32 && client >= 0 && client < u32, what,
                 ": step, layer and client must lie in [0, 2^32) (they are 32-bit Philox counter words), got step=",
                 step, " layer=", layer, " client=", client);
  DEER_CHECK_ARG(p * q <= (int64_t(1) << 33), what, ": p*q = ", p * q,
                 " exceeds 2^33 noise elements, the size of one Philox stream");
  if (chol.has_value() && chol->defined()) {
    DEER_CHECK_ARG(noise_side == 0 || noise_side == 1, what, ": noise_side must be 0 (xi = R^{-1} Z, A phase, "
                   "K acts on the p rows) or 1 (xi = Z R^{-T}, B phase, K acts on the q columns), got ", noise_side);
    const int64_t r = noise_side == 0 ? p : q;
    DEER_CHECK_ARG(chol->dim() == 2 && chol->size(0) == r && chol->size(1) == r, what, ": chol must be the (", r, ", ",
                   r, ") upper Cholesky factor R of K = R^T R for noise_side=", noise_side, " and gradients (", p,
                   ", ", q, "), got ", chol->sizes());
    DEER_CHECK_ARG(chol->device() == device, what, ": chol is on ", chol->device(), " but the gradients are on ", device);
    DEER_CHECK_ARG(at::isFloatingType(chol->scalar_type()), what, ": chol must be floating point");
  }
}

UpdateArgs clip_reduce_noise_update_args(const char* what, at::TensorList ts, at::ArrayRef<double> h,
                                         int64_t layers, int64_t k, int64_t p, int64_t q, at::ScalarType out_dtype,
                                         const at::Device& device) {
  UpdateArgs u;
  if (ts.empty() && h.empty()) return u;
  DEER_CHECK_ARG(static_cast<int64_t>(ts.size()) == 3 * layers &&
                     static_cast<int64_t>(h.size()) == kUpdateHyperWidth * layers,
                 what, ": a fused update needs 3 tensors (param, buf1, buf2) and ", int(kUpdateHyperWidth),
                 " scalars per layer; got ", ts.size(), " tensors and ", h.size(), " scalars for ", layers,
                 " layer(s). Build them with deer.ops.FusedUpdate.");
  const double* hk = h.data() + k * kUpdateHyperWidth;
  for (int i = 0; i < kUpdateHyperWidth; ++i)
    DEER_CHECK_ARG(std::isfinite(hk[i]), what, ": fused update scalar ", i, " of layer ", k, " is not finite (",
                   hk[i], ")");
  const int kind = static_cast<int>(hk[kHKind]);
  if (kind == kUpdateNone) return u;
  DEER_CHECK_ARG(kind == kUpdateSGD || kind == kUpdateAdam || kind == kUpdateAdamW, what, ": fused update kind of layer ",
                 k, " must be 1 (SGD), 2 (Adam) or 3 (AdamW), got ", hk[kHKind]);
  const bool adam = kind != kUpdateSGD;
  const bool needs1 = adam || hk[kHMomentum] != 0, needs2 = adam;
  const char* names[3] = {"param", adam ? "exp_avg" : "momentum_buffer", "exp_avg_sq"};
  void* ptrs[3] = {nullptr, nullptr, nullptr};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = ts[3 * k + i];
    if (i == 1 && !needs1) continue;
    if (i == 2 && !needs2) continue;
    DEER_CHECK_ARG(t.defined() && t.dim() == 2 && t.size(0) == p && t.size(1) == q, what, ": fused update ", names[i],
                   " of layer ", k, " must be (", p, ", ", q, ") like the gradient, got ",
                   t.defined() ? t.sizes() : at::IntArrayRef{});
    DEER_CHECK_ARG(t.scalar_type() == out_dtype, what, ": fused update ", names[i], " of layer ", k, " is ",
                   t.scalar_type(), " but the private gradient is ", out_dtype,
                   " (fp32, fp64 for fp64 gradients); keep the LoRA factors in that dtype or step without fusion");
    DEER_CHECK_ARG(t.device() == device, what, ": fused update ", names[i], " of layer ", k, " is on ", t.device(),
                   " but the gradients are on ", device);
    DEER_CHECK_ARG(t.is_contiguous(), what, ": fused update ", names[i], " of layer ", k, " must be contiguous");
    ptrs[i] = t.data_ptr();
  }
  u.kind = kind;
  u.param = ptrs[0];
  u.buf1 = ptrs[1];
  u.buf2 = ptrs[2];
  u.lr = hk[kHLr];
  u.weight_decay = hk[kHWeightDecay];
  u.momentum = hk[kHMomentum];
  u.dampening = hk[kHDampening];
  u.nesterov = hk[kHNesterov] != 0;
  u.first = hk[kHFirst] != 0;
  u.beta1 = hk[kHBeta1];
  u.beta2 = hk[kHBeta2];
  u.eps = hk[kHEps];
  u.step_size = hk[kHStepSize];
  u.bias2_sqrt = hk[kHBias2Sqrt];
  DEER_CHECK_ARG(!adam || u.bias2_sqrt > 0, what, ": fused Adam update of layer ", k,
                 " needs sqrt(1 - beta2^t) > 0, got ", u.bias2_sqrt);
  return u;
}

namespace {

// Grain sizes: a parallel region costs tens of microseconds, and far more on a loaded machine where
// the second thread waits for a core, so work below ~0.5 ms per chunk runs on the calling thread.
constexpr int64_t kPairGrain = 4096;     // pairs per chunk of the regulated solves (scaled by the solve's cost)
constexpr int64_t kNoiseGrain = 1 << 16; // isotropic noise elements per chunk (3-25 ns each, by instruction set)
constexpr int64_t kSumWork = 1 << 18;    // multiply-adds per chunk of the clipped sum

// The fused optimizer step of a block (apply_update_range), compiled a second time for AVX2+FMA:
// there fma_rn is one vfmadd and the loop vectorises 8 wide, where the baseline build would call
// glibc's fmaf per element. Chosen once, by deer::tile::isa() (capped by DEER_CPU_ISA for the tests).
#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx2,fma"))) void update_range_fma(const UpdateArgs& u, const T* g, int64_t e0, int64_t e1) {
  apply_update_range(u, g, e0, e1);
}
#endif

template <typename T>
void update_range(const UpdateArgs& u, const T* g, int64_t e0, int64_t e1) {
  if (u.kind == kUpdateNone) return;
#if defined(__x86_64__)
  static const bool has_fma = std::strcmp(tile::isa(), "generic") != 0;
  if (has_fma) return update_range_fma(u, g, e0, e1);
#endif
  apply_update_range(u, g, e0, e1);
}

// out (p, q) already holds the clipped sum; add noise_std * xi and divide by the expected batch size.
// The fused optimizer step (u) runs on each finished block while it is still in L1.
template <typename out_t>
void add_noise_and_scale(out_t* out, int64_t p, int64_t q, double noise_std, double ebs,
                         const double* R, int64_t side, uint64_t seed, int64_t step, int64_t layer, int64_t client,
                         const UpdateArgs& u = UpdateArgs{}) {
  const int64_t P = p * q;
  const double inv = 1.0 / ebs;
  if (noise_std == 0.0) {
    at::parallel_for(0, P, kSumWork, [&](int64_t b0, int64_t b1) {
      for (int64_t e = b0; e < b1; ++e) out[e] = static_cast<out_t>(out[e] * inv);
      update_range(u, out, b0, b1);
    });
    return;
  }
  const auto key = philox::make_key(seed, static_cast<uint32_t>(step), static_cast<uint32_t>(layer),
                                    static_cast<uint32_t>(client));
  if (R == nullptr) {  // isotropic: Z in blocks of kNoiseBlock elements (stack scratch), then the update
    constexpr int64_t kNoiseBlock = 512;
    at::parallel_for(0, P, kNoiseGrain, [&](int64_t e0, int64_t e1) {
      double z[kNoiseBlock];
      for (int64_t b0 = e0; b0 < e1; b0 += kNoiseBlock) {
        const int64_t n = std::min(kNoiseBlock, e1 - b0);
        philox::fill_normals(key, b0, b0 + n, z);
        out_t* o = out + b0;
        for (int64_t i = 0; i < n; ++i) o[i] = static_cast<out_t>((o[i] + noise_std * z[i]) * inv);
        update_range(u, out, b0, b0 + n);
      }
    });
    return;
  }
  if (side == 0) {
    // xi = R^{-1} Z: back substitution on whole rows, xi_a = (Z_a - sum_{k>a} R[a,k] xi_k) / R[a,a].
    // Parallel over column blocks; each block keeps its (p x width) slice of xi in double.
    at::parallel_for(0, q, std::max<int64_t>(64, 2 * kPairGrain / std::max<int64_t>(1, p * p)), [&](int64_t c0, int64_t c1) {
      const int64_t w = c1 - c0;
      std::vector<double> xi(p * w);
      for (int64_t a = p - 1; a >= 0; --a) {
        double* xa = xi.data() + a * w;
        philox::fill_normals(key, a * q + c0, a * q + c1, xa);
        for (int64_t k = a + 1; k < p; ++k) {
          const double rak = R[a * p + k];
          const double* xk = xi.data() + k * w;
          for (int64_t c = 0; c < w; ++c) xa[c] -= rak * xk[c];
        }
        const double d = 1.0 / R[a * p + a];
        for (int64_t c = 0; c < w; ++c) {
          xa[c] *= d;
          out_t& o = out[a * q + c0 + c];
          o = static_cast<out_t>((o + noise_std * xa[c]) * inv);
        }
        update_range(u, out, a * q + c0, a * q + c1);
      }
    });
  } else {
    // xi = Z R^{-T}  <=>  R xi_a^T = Z_a^T for every row a: back substitution along the row (q = r).
    // Blocks of rows at once: Z for the block in one vector draw (rows of q = r elements are too
    // short for it), transposed to (q, rows) so the back substitution runs across rows with
    // contiguous axpys; each row sees the same operations in the same order as a row-by-row solve.
    at::parallel_for(0, p, std::max<int64_t>(16, 2 * kPairGrain / std::max<int64_t>(1, q * q)), [&](int64_t a0, int64_t a1) {
      const int64_t rows = std::max<int64_t>(8, 512 / q);
      std::vector<double> zb(rows * q), xt(q * rows);
      for (int64_t r0 = a0; r0 < a1; r0 += rows) {
        const int64_t nr = std::min(a1, r0 + rows) - r0;
        philox::fill_normals(key, r0 * q, (r0 + nr) * q, zb.data());
        for (int64_t c = q - 1; c >= 0; --c) {
          double* xc = xt.data() + c * rows;
          for (int64_t i = 0; i < nr; ++i) xc[i] = zb[i * q + c];
          for (int64_t k = c + 1; k < q; ++k) {
            const double rck = R[c * q + k];
            const double* xk = xt.data() + k * rows;
            for (int64_t i = 0; i < nr; ++i) xc[i] -= rck * xk[i];
          }
          const double d = R[c * q + c];
          for (int64_t i = 0; i < nr; ++i) xc[i] /= d;
        }
        for (int64_t i = 0; i < nr; ++i) {
          out_t* o = out + (r0 + i) * q;
          for (int64_t c = 0; c < q; ++c) o[c] = static_cast<out_t>((o[c] + noise_std * xt[c * rows + i]) * inv);
        }
        update_range(u, out, r0 * q, (r0 + nr) * q);
      }
    });
  }
}

at::Tensor chol_as_double(const c10::optional<at::Tensor>& chol) {
  if (!(chol.has_value() && chol->defined())) return at::Tensor();
  auto R = chol->to(at::kDouble).contiguous();
  const int64_t r = R.size(0);
  const double* d = R.data_ptr<double>();
  bool ok = true;  // a plain scan: r x r is tiny, ATen reductions would cost more than the noise
  for (int64_t a = 0; a < r && ok; ++a) {
    ok = d[a * r + a] > 0;
    for (int64_t k = a; k < r && ok; ++k) ok = std::isfinite(d[a * r + k]);
  }
  if (!ok) clip_reduce_noise_chol_error(R);
  return R;
}

}  // namespace

void clip_reduce_noise_chol_error(const at::Tensor& R) {
  DEER_CHECK_ARG(false, "clip_reduce_noise: chol must be the upper Cholesky factor of a positive definite K (finite, "
                 "positive diagonal); got diagonal ", R.diagonal().cpu(), ". Use a ridge lambda > 0 when the frozen "
                 "factor is rank deficient (B = 0 at initialisation).");
}

namespace {

// One layer on validated inputs (clip_reduce_noise_check / clip_reduce_noise_grouped_check and the
// parsed update u): shared by the single-layer op and each layer of the grouped op.
at::Tensor crn_cpu_layer(const at::Tensor& grads_in, const at::Tensor& clip_in, double noise_std,
                         double expected_batch_size, const c10::optional<at::Tensor>& chol, int64_t noise_side,
                         int64_t seed, int64_t step, int64_t layer, int64_t client, const UpdateArgs& u) {
  const int64_t b = grads_in.size(0), p = grads_in.size(1), q = grads_in.size(2);
  auto grads = grads_in.contiguous();
  const auto acc = acc_dtype_of(grads);
  auto out = at::zeros({p, q}, grads.options().dtype(acc));
  auto clip = clip_in.to(acc).contiguous();
  auto R = chol_as_double(chol);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "clip_reduce_noise_cpu", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    const scalar_t* g = grads.data_ptr<scalar_t>();
    const acc_t* c = clip.data_ptr<acc_t>();
    acc_t* o = out.data_ptr<acc_t>();
    const int64_t P = p * q;
    at::parallel_for(0, P, std::max<int64_t>(2048, kSumWork / std::max<int64_t>(1, b)), [&](int64_t e0, int64_t e1) {
      for (int64_t i = 0; i < b; ++i) {
        const acc_t ci = c[i];
        const scalar_t* gi = g + i * P;
        for (int64_t e = e0; e < e1; ++e) o[e] += ci * static_cast<acc_t>(gi[e]);
      }
    });
    add_noise_and_scale<acc_t>(o, p, q, noise_std, expected_batch_size, R.defined() ? R.data_ptr<double>() : nullptr,
                               noise_side, static_cast<uint64_t>(seed), step, layer, client, u);
  });
  return out;
}

}  // namespace

at::Tensor clip_reduce_noise_cpu(const at::Tensor& grads, const at::Tensor& clip, double noise_std,
                                 double expected_batch_size, const c10::optional<at::Tensor>& chol,
                                 int64_t noise_side, int64_t seed, int64_t step, int64_t layer, int64_t client,
                                 at::TensorList update_tensors, at::ArrayRef<double> update_hyper) {
  DEER_CHECK_ARG(grads.dim() == 3, "clip_reduce_noise: grads must be (b, p, q) per-sample gradients, got ",
                 grads.sizes());
  DEER_CHECK_ARG(at::isFloatingType(grads.scalar_type()), "clip_reduce_noise: grads must be floating point, got ",
                 grads.scalar_type());
  const int64_t b = grads.size(0), p = grads.size(1), q = grads.size(2);
  clip_reduce_noise_check("clip_reduce_noise", b, p, q, clip, grads.device(), noise_std, expected_batch_size, chol,
                          noise_side, step, layer, client);
  const UpdateArgs u = clip_reduce_noise_update_args("clip_reduce_noise", update_tensors, update_hyper, 1, 0, p, q,
                                                     acc_dtype_of(grads), grads.device());
  return crn_cpu_layer(grads, clip, noise_std, expected_batch_size, chol, noise_side, seed, step, layer, client, u);
}

void clip_reduce_noise_grouped_check(at::TensorList grads, at::TensorList clips, double noise_std,
                                     double expected_batch_size, const c10::List<c10::optional<at::Tensor>>& chols,
                                     at::IntArrayRef noise_sides, int64_t step, at::IntArrayRef layers,
                                     int64_t client) {
  const size_t L = grads.size();
  DEER_CHECK_ARG(clips.size() == L && chols.size() == L && noise_sides.size() == L && layers.size() == L,
                 "clip_reduce_noise_grouped: grads, clips, chols, noise_sides and layers must have one entry per "
                 "layer; got ", L, ", ", clips.size(), ", ", chols.size(), ", ", noise_sides.size(), " and ",
                 layers.size());
  for (size_t k = 0; k < L; ++k) {
    DEER_CHECK_ARG(grads[k].device() == grads[0].device(), "clip_reduce_noise_grouped: every layer's gradients must "
                   "be on one device; layer ", k, " is on ", grads[k].device(), ", layer 0 on ", grads[0].device());
    DEER_CHECK_ARG(grads[k].dim() == 3, "clip_reduce_noise_grouped: grads[", k, "] must be (b, p, q), got ",
                   grads[k].sizes());
    DEER_CHECK_ARG(at::isFloatingType(grads[k].scalar_type()), "clip_reduce_noise_grouped: grads[", k,
                   "] must be floating point, got ", grads[k].scalar_type());
    clip_reduce_noise_check("clip_reduce_noise_grouped", grads[k].size(0), grads[k].size(1), grads[k].size(2),
                            clips[k], grads[k].device(), noise_std, expected_batch_size, chols.get(k), noise_sides[k],
                            step, layers[k], client);
  }
}

std::vector<at::Tensor> clip_reduce_noise_grouped_cpu(at::TensorList grads, at::TensorList clips, double noise_std,
                                                      double expected_batch_size,
                                                      const c10::List<c10::optional<at::Tensor>>& chols,
                                                      at::IntArrayRef noise_sides, int64_t seed, int64_t step,
                                                      at::IntArrayRef layers, int64_t client,
                                                      at::TensorList update_tensors,
                                                      at::ArrayRef<double> update_hyper) {
  clip_reduce_noise_grouped_check(grads, clips, noise_std, expected_batch_size, chols, noise_sides, step, layers,
                                  client);
  const int64_t L = static_cast<int64_t>(grads.size());
  // Every layer's update parsed and validated once, before any layer's work (errors on this thread).
  std::vector<UpdateArgs> upds(L);
  for (int64_t k = 0; k < L; ++k)
    upds[k] = clip_reduce_noise_update_args("clip_reduce_noise_grouped", update_tensors, update_hyper, L, k,
                                            grads[k].size(1), grads[k].size(2), acc_dtype_of(grads[k]),
                                            grads[k].device());
  std::vector<at::Tensor> out(L);
  // One parallel region: each thread takes whole layers (the per-layer kernels run inline inside it),
  // instead of a fork/join per layer and stage.
  at::parallel_for(0, L, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      out[k] = crn_cpu_layer(grads[k], clips[k], noise_std, expected_batch_size, chols.get(k), noise_sides[k], seed,
                             step, layers[k], client, upds[k]);
  });
  return out;
}

at::Tensor clip_reduce_noise_fused_cpu(const at::Tensor& left_in, const at::Tensor& right_in, double scale,
                                       const at::Tensor& clip_in, double noise_std, double expected_batch_size,
                                       const c10::optional<at::Tensor>& chol, int64_t noise_side, int64_t seed,
                                       int64_t step, int64_t layer, int64_t client) {
  DEER_CHECK_ARG(left_in.dim() == 3 && right_in.dim() == 3 && left_in.size(0) == right_in.size(0) &&
                     left_in.size(1) == right_in.size(1),
                 "clip_reduce_noise_fused: expects left (b, T, p) and right (b, T, q) sharing b and T; got ",
                 left_in.sizes(), " and ", right_in.sizes());
  DEER_CHECK_ARG(left_in.scalar_type() == right_in.scalar_type() && at::isFloatingType(left_in.scalar_type()),
                 "clip_reduce_noise_fused: left and right must share a floating dtype, got ", left_in.scalar_type(),
                 " and ", right_in.scalar_type());
  DEER_CHECK_ARG(left_in.device() == right_in.device(), "clip_reduce_noise_fused: left and right on different devices");
  const int64_t b = left_in.size(0), T = left_in.size(1), p = left_in.size(2), q = right_in.size(2);
  clip_reduce_noise_check("clip_reduce_noise_fused", b, p, q, clip_in, left_in.device(), noise_std,
                          expected_batch_size, chol, noise_side, step, layer, client);
  const auto acc = acc_dtype_of(left_in);
  auto L = left_in.to(acc).contiguous();
  auto Rt = right_in.to(acc).contiguous();
  auto clip = clip_in.to(acc).contiguous();
  auto out = at::zeros({p, q}, L.options());
  auto R = chol_as_double(chol);
  AT_DISPATCH_FLOATING_TYPES(acc, "clip_reduce_noise_fused_cpu", [&] {
    const int64_t vdim = tile::vector_dim(p, q);
    const int64_t vb = std::is_same_v<scalar_t, double> ? tile::vector_block_f64() : tile::vector_block_f32();
    // One contiguous long-dim range per thread: every thread streams its share of every row.
    // (Small problems: one chunk, no parallel region.)
    const int64_t threads = b * T * p * q < 2 * kSumWork ? 1 : at::get_num_threads();
    const int64_t blk = std::max<int64_t>(vb, ((vdim + threads - 1) / threads + vb - 1) / vb * vb);
    const int64_t nvb = (vdim + blk - 1) / blk;
    if (b > 0 && T > 0 && p > 0 && q > 0) {
      at::parallel_for(0, nvb, 1, [&](int64_t w0, int64_t w1) {
        const int64_t v0 = w0 * blk, v1 = std::min(vdim, w1 * blk);
        if constexpr (std::is_same_v<scalar_t, double>)
          tile::gemm_tn_f64(L.data_ptr<double>(), Rt.data_ptr<double>(), b, T, p, q, clip.data_ptr<double>(), scale,
                            out.data_ptr<double>(), v0, v1);
        else
          tile::gemm_tn_f32(L.data_ptr<float>(), Rt.data_ptr<float>(), b, T, p, q, clip.data_ptr<float>(),
                            static_cast<float>(scale), out.data_ptr<float>(), v0, v1);
      });
    }
    add_noise_and_scale<scalar_t>(out.data_ptr<scalar_t>(), p, q, noise_std, expected_batch_size,
                                  R.defined() ? R.data_ptr<double>() : nullptr, noise_side,
                                  static_cast<uint64_t>(seed), step, layer, client);
  });
  return out;
}

}  // namespace deer
