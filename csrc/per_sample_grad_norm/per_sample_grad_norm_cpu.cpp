#include "per_sample_grad_norm/per_sample_grad_norm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <vector>

#include "common.h"

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

template <typename scalar_t>
void psgn_cpu_kernel(const scalar_t* L, const scalar_t* R, int64_t b, int64_t T, int64_t p, int64_t q,
                     double scale, const typename acc_type<scalar_t>::type* K, int64_t gram_side,
                     typename acc_type<scalar_t>::type* G, typename acc_type<scalar_t>::type* N) {
  using acc_t = typename acc_type<scalar_t>::type;
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rrow(q), tmp;
    for (int64_t i = begin; i < end; ++i) {
      acc_t* g = G + i * p * q;
      std::fill(g, g + p * q, acc_t(0));
      const scalar_t* Li = L + i * T * p;
      const scalar_t* Ri = R + i * T * q;
      // Rank-1 updates token by token: the inner loop runs over contiguous q and vectorises.
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t c = 0; c < q; ++c) rrow[c] = static_cast<acc_t>(Ri[t * q + c]);
        for (int64_t a = 0; a < p; ++a) {
          const acc_t la = static_cast<acc_t>(Li[t * p + a]);
          acc_t* ga = g + a * q;
          for (int64_t c = 0; c < q; ++c) ga[c] += la * rrow[c];
        }
      }
      const acc_t s = static_cast<acc_t>(scale);
      for (int64_t e = 0; e < p * q; ++e) g[e] *= s;
      acc_t n = 0;
      if (K == nullptr) {
        for (int64_t e = 0; e < p * q; ++e) n += g[e] * g[e];
      } else if (gram_side == 1) {  // tr(g K g^T) = sum_a g_a^T K g_a over rows a
        tmp.assign(q, acc_t(0));
        for (int64_t a = 0; a < p; ++a) {
          const acc_t* ga = g + a * q;
          for (int64_t c = 0; c < q; ++c) {
            acc_t kc = 0;
            for (int64_t d = 0; d < q; ++d) kc += K[c * q + d] * ga[d];
            n += ga[c] * kc;
          }
        }
      } else {  // tr(g^T K g) = sum_{a,a'} K[a,a'] <g_a, g_a'>
        for (int64_t a = 0; a < p; ++a)
          for (int64_t a2 = 0; a2 < p; ++a2) {
            const acc_t kaa = K[a * p + a2];
            if (kaa == acc_t(0)) continue;
            acc_t dot = 0;
            for (int64_t c = 0; c < q; ++c) dot += g[a * q + c] * g[a2 * q + c];
            n += kaa * dot;
          }
      }
      N[i] = n;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> per_sample_grad_norm_cpu(
    const at::Tensor& left_in, const at::Tensor& right_in, double scale,
    const c10::optional<at::Tensor>& gram, int64_t gram_side) {
  auto [b, T, p, q] = per_sample_grad_norm_check(left_in, right_in, gram, gram_side);
  auto left = left_in.contiguous();
  auto right = right_in.contiguous();
  const auto acc_dtype = left.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = left.options().dtype(acc_dtype);
  auto grads = at::empty({b, p, q}, opts);
  auto norms = at::empty({b}, opts);
  at::Tensor K;
  if (gram.has_value() && gram->defined()) K = gram->to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, left.scalar_type(), "per_sample_grad_norm_cpu", [&] {
    using acc_t = typename acc_type<scalar_t>::type;
    psgn_cpu_kernel<scalar_t>(left.data_ptr<scalar_t>(), right.data_ptr<scalar_t>(), b, T, p, q, scale,
                              K.defined() ? K.data_ptr<acc_t>() : nullptr, gram_side,
                              grads.data_ptr<acc_t>(), norms.data_ptr<acc_t>());
  });
  return {grads, norms};
}

}  // namespace deer
