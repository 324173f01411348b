// CPU backend of per_sample_grad_norm (math in per_sample_grad_norm.h).
//
// Gradients: the register-tiled GEMM of psgn_tile.h, parallel over (sample, long-dimension block)
// work items, so a batch of 1 still uses every thread. fp16/bf16 inputs are widened to fp32 once
// (products summed over T tokens lose digits fast in half precision); fp64 stays fp64 (oracle path).
// Norms: a second pass over g_i, which is L2-resident per sample and p*q elements (tiny next to
// the T*(p+q) inputs the first pass streams); regulated metric on the columns (B phase) as
// <K, g^T g>, rank-1 updates with contiguous inner loops (psgn_tile.h).
#include "per_sample_grad_norm/per_sample_grad_norm.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <vector>

#include "common.h"
#include "per_sample_grad_norm/psgn_tile.h"

namespace deer {

std::tuple<int64_t, int64_t, int64_t, int64_t> per_sample_grad_norm_check(
    const at::Tensor& left, const at::Tensor& right,
    const c10::optional<at::Tensor>& gram, int64_t gram_side) {
  DEER_CHECK_ARG(left.dim() == 3 && right.dim() == 3,
                 "per_sample_grad_norm expects left (b, T, p) and right (b, T, q); got left ",
                 left.sizes(), " and right ", right.sizes(), ". Reshape 2-D inputs to (b, 1, features).");
  DEER_CHECK_ARG(left.size(0) == right.size(0) && left.size(1) == right.size(1),
                 "per_sample_grad_norm: left ", left.sizes(), " and right ", right.sizes(),
                 " must share batch and token dimensions");
  DEER_CHECK_ARG(left.scalar_type() == right.scalar_type(),
                 "per_sample_grad_norm: left and right must share a dtype, got ", left.scalar_type(),
                 " and ", right.scalar_type());
  DEER_CHECK_ARG(at::isFloatingType(left.scalar_type()),
                 "per_sample_grad_norm: inputs must be floating point (fp16, bf16, fp32, fp64), got ",
                 left.scalar_type());
  DEER_CHECK_ARG(left.device() == right.device(), "per_sample_grad_norm: left and right on different devices");
  const int64_t p = left.size(2), q = right.size(2);
  if (gram.has_value() && gram->defined()) {
    DEER_CHECK_ARG(gram_side == 0 || gram_side == 1, "per_sample_grad_norm: gram_side must be 0 (rows) or 1 (columns)");
    const int64_t k = gram_side == 1 ? q : p;
    DEER_CHECK_ARG(gram->dim() == 2 && gram->size(0) == k && gram->size(1) == k,
                   "per_sample_grad_norm: gram must be (", k, ", ", k, ") for gram_side=", gram_side,
                   ", got ", gram->sizes());
    DEER_CHECK_ARG(gram->device() == left.device(), "per_sample_grad_norm: gram on a different device");
  }
  return {left.size(0), left.size(1), p, q};
}

namespace {

template <typename acc_t>
void gemm_tn(const acc_t* L, const acc_t* R, int64_t nb, int64_t T, int64_t p, int64_t q, const acc_t* w,
             acc_t wconst, acc_t* out, int64_t v0, int64_t v1) {
  if constexpr (std::is_same_v<acc_t, double>)
    tile::gemm_tn_f64(L, R, nb, T, p, q, w, wconst, out, v0, v1);
  else
    tile::gemm_tn_f32(L, R, nb, T, p, q, w, wconst, out, v0, v1);
}

// Squared norm of one sample's g (p, q) in the op's metric (the ISA-dispatched loops of psgn_tile.h);
// work is resized to the scratch the metric needs.
template <typename acc_t>
acc_t sample_sq_norm(const acc_t* g, int64_t p, int64_t q, const acc_t* K, int64_t side, std::vector<acc_t>& work) {
  const auto need = static_cast<size_t>(tile::sq_norm_work(q, K == nullptr ? -1 : side));
  if (work.size() < need) work.resize(need);
  if constexpr (std::is_same_v<acc_t, double>)
    return tile::sq_norm_f64(g, p, q, K, side, work.data());
  else
    return tile::sq_norm_f32(g, p, q, K, side, work.data());
}

// Multiply-adds below which a chunk runs on the calling thread: a parallel region costs tens of
// microseconds, and far more on a loaded machine where the other thread must wait for a core.
constexpr int64_t kMinWork = 1 << 17;

template <typename acc_t>
void sq_norms_kernel(const acc_t* G, int64_t b, int64_t p, int64_t q, const acc_t* K, int64_t side, acc_t* N) {
  const int64_t per = std::max<int64_t>(1, p * q * (K ? std::min(p, q) : 1));
  at::parallel_for(0, b, std::max<int64_t>(1, kMinWork / per), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kg;
    for (int64_t i = begin; i < end; ++i) N[i] = sample_sq_norm(G + i * p * q, p, q, K, side, kg);
  });
}

// Per-sample g_i = scale * L_i^T R_i for all i, written to G (b, p, q). When every work item is a
// whole sample, its norm is taken right away (g_i still in cache, one parallel region); returns
// whether N was filled.
template <typename acc_t>
bool per_sample_gemm(const acc_t* L, const acc_t* R, int64_t b, int64_t T, int64_t p, int64_t q,
                     double scale, acc_t* G, const acc_t* K, int64_t side, acc_t* N) {
  const int64_t vdim = tile::vector_dim(p, q);
  const int64_t vb = std::is_same_v<acc_t, double> ? tile::vector_block_f64() : tile::vector_block_f32();
  // One work item per sample (whole rows stream through the prefetcher); small batches split the
  // long dimension so that every thread still gets work.
  const int64_t threads = at::get_num_threads();
  const int64_t want = b >= 2 * threads ? 1 : (2 * threads + b - 1) / b;
  const int64_t blk = std::max<int64_t>(vb, ((vdim + want - 1) / want + vb - 1) / vb * vb);
  const int64_t nvb = (vdim + blk - 1) / blk;
  const bool fuse_norm = nvb == 1;
  const int64_t item_work = std::max<int64_t>(1, T * p * q / nvb);
  at::parallel_for(0, b * nvb, std::max<int64_t>(1, kMinWork / item_work), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kg;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w / nvb, v0 = (w % nvb) * blk;
      const int64_t v1 = std::min(vdim, v0 + blk);
      gemm_tn<acc_t>(L + i * T * p, R + i * T * q, 1, T, p, q, nullptr, static_cast<acc_t>(scale),
                     G + i * p * q, v0, v1);
      if (fuse_norm) N[i] = sample_sq_norm(G + i * p * q, p, q, K, side, kg);
    }
  });
  return fuse_norm;
}

}  // namespace

at::Tensor per_sample_sq_norms_cpu(const at::Tensor& g_in, const at::Tensor& K_in, int64_t gram_side) {
  auto g = g_in.contiguous();
  const int64_t b = g.size(0), p = g.size(1), q = g.size(2);
  auto norms = at::empty({b}, g.options());
  at::Tensor K;
  if (K_in.defined()) K = K_in.to(g.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "per_sample_sq_norms_cpu", [&] {
    sq_norms_kernel<scalar_t>(g.data_ptr<scalar_t>(), b, p, q, K.defined() ? K.data_ptr<scalar_t>() : nullptr,
                              gram_side, norms.data_ptr<scalar_t>());
  });
  return norms;
}

std::tuple<at::Tensor, at::Tensor> per_sample_grad_norm_cpu(
    const at::Tensor& left_in, const at::Tensor& right_in, double scale,
    const c10::optional<at::Tensor>& gram, int64_t gram_side) {
  auto [b, T, p, q] = per_sample_grad_norm_check(left_in, right_in, gram, gram_side);
  const auto acc = acc_dtype_of(left_in);
  auto left = left_in.to(acc).contiguous();
  auto right = right_in.to(acc).contiguous();
  auto grads = at::empty({b, p, q}, left.options());
  auto norms = at::empty({b}, left.options());
  at::Tensor K;
  if (gram.has_value() && gram->defined()) K = gram->to(acc).contiguous();
  bool have_norms = false;
  if (T == 0) grads.zero_();
  else if (b > 0 && p > 0 && q > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc, "per_sample_grad_norm_cpu", [&] {
      have_norms = per_sample_gemm<scalar_t>(left.data_ptr<scalar_t>(), right.data_ptr<scalar_t>(), b, T, p, q, scale,
                                             grads.data_ptr<scalar_t>(), K.defined() ? K.data_ptr<scalar_t>() : nullptr,
                                             gram_side, norms.data_ptr<scalar_t>());
    });
  }
  if (!have_norms) norms = per_sample_sq_norms_cpu(grads, K, gram_side);
  return {grads, norms};
}

bool per_sample_grad_norm_ghost_pays(int64_t T, int64_t p, int64_t q) {
  // Materialise: T p q multiply-adds (+ the norm pass). Ghost: two Gram matrices, T^2 (p + q).
  return T * (p + q) < p * q;
}

// Device-generic (ATen ops): registered for CPU and CUDA. The materialise branch calls the device's
// fused kernel; the ghost branch is batched GEMMs (MKL / cuBLAS) on token Gram matrices.
at::Tensor per_sample_grad_norm_only(const at::Tensor& left_in, const at::Tensor& right_in, double scale,
                                     const c10::optional<at::Tensor>& gram, int64_t gram_side, int64_t method) {
  auto [b, T, p, q] = per_sample_grad_norm_check(left_in, right_in, gram, gram_side);
  DEER_CHECK_ARG(method >= 0 && method <= 2, "per_sample_grad_norm_only: method must be 0 (auto), 1 "
                 "(materialise) or 2 (ghost), got ", method);
  const bool ghost = method == 2 || (method == 0 && per_sample_grad_norm_ghost_pays(T, p, q));
  if (!ghost) {
#ifdef DEER_WITH_CUDA
    if (left_in.is_cuda()) return std::get<1>(per_sample_grad_norm_cuda(left_in, right_in, scale, gram, gram_side));
#endif
    return std::get<1>(per_sample_grad_norm_cpu(left_in, right_in, scale, gram, gram_side));
  }
  const auto acc = acc_dtype_of(left_in);
  auto L = left_in.to(acc), R = right_in.to(acc);
  const bool has_k = gram.has_value() && gram->defined();
  at::Tensor K = has_k ? gram->to(acc) : at::Tensor();
  auto LL = has_k && gram_side == 0 ? at::bmm(at::matmul(L, K), L.transpose(1, 2)) : at::bmm(L, L.transpose(1, 2));
  auto RR = has_k && gram_side == 1 ? at::bmm(at::matmul(R, K), R.transpose(1, 2)) : at::bmm(R, R.transpose(1, 2));
  return (LL * RR).sum({1, 2}) * (scale * scale);
}

}  // namespace deer
