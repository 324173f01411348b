// ctest: the CPU kernel of per_sample_grad_norm against a float64 libtorch formula on fresh random
// inputs with odd sizes, all three metrics, plus the input checks. Exits non-zero on any failure.
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "per_sample_grad_norm/per_sample_grad_norm.h"
#include "tests/check.h"

using namespace deer::check;

int main(int argc, char** argv) {
  // Every instruction set the tile GEMM and norms were instantiated for: the dispatched one here, the
  // narrower ones in child runs capped by DEER_CPU_ISA (never above what the CPU supports).
  run_isa_children(argc, argv);
  std::printf("--- instruction set: %s\n", std::getenv("DEER_CPU_ISA") ? std::getenv("DEER_CPU_ISA") : "dispatched");
  std::random_device rd;
  torch::manual_seed(rd());  // fresh inputs every run
  // Ranks 1, 2, 4, 8, 16 take the fixed-size Gram loops of the column metric; 3 and 129 the generic ones;
  // (17, 576, 8) is a ViT-tiny qkv layer; long dims that are not multiples of the tile width.
  struct Case { int64_t b, T, p, q; } cases[] = {{1, 1, 3, 1}, {33, 97, 17, 4}, {5, 7, 64, 8}, {3, 2, 8, 129},
                                                 {2, 9, 23, 16}, {4, 1, 40, 2}, {3, 17, 576, 8}, {2, 33, 3, 100},
                                                 {1, 5, 64, 64}};
  for (auto c : cases) {
    for (auto dtype : {at::kFloat, at::kDouble}) {
      auto L = torch::randn({c.b, c.T, c.p}, torch::dtype(dtype));
      auto R = torch::randn({c.b, c.T, c.q}, torch::dtype(dtype));
      const double s = 0.7;
      auto g_ref = s * torch::einsum("btp,btq->bpq", {L.to(at::kDouble), R.to(at::kDouble)});
      const auto Kq = random_spd(c.q), Kp = random_spd(c.p);
      const double tol = dtype == at::kDouble ? 1e-12 : 1e-5;
      char name[128];
      auto [g, n] = deer::per_sample_grad_norm_cpu(L, R, s, c10::nullopt, 1);
      std::snprintf(name, sizeof name, "grad b=%ld T=%ld p=%ld q=%ld %s", c.b, c.T, c.p, c.q,
                    dtype == at::kDouble ? "f64" : "f32");
      expect_close(name, g, g_ref, tol);
      expect_close("  euclidean norm", n, g_ref.pow(2).sum({1, 2}), tol);
      auto [g1, n1] = deer::per_sample_grad_norm_cpu(L, R, s, Kq.to(dtype), 1);
      expect_close("  metric norm, K on columns", n1, torch::einsum("bpq,qs,bps->b", {g_ref, Kq, g_ref}), tol);
      auto [g0, n0] = deer::per_sample_grad_norm_cpu(L, R, s, Kp.to(dtype), 0);
      expect_close("  metric norm, K on rows", n0, torch::einsum("bpq,ps,bsq->b", {g_ref, Kp, g_ref}), tol);
      // Norms only: materialised (1) and ghost (2, token Gram matrices; fp32 cancellation over T^2
      // signed terms gets a looser bound) against the same float64 formulas.
      const double gtol = dtype == at::kDouble ? 1e-10 : 1e-4;
      for (int64_t method : {1, 2}) {
        const double t = method == 1 ? tol : gtol;
        expect_close(method == 1 ? "  norm only (materialise), euclidean" : "  norm only (ghost), euclidean",
                     deer::per_sample_grad_norm_only(L, R, s, c10::nullopt, 1, method), g_ref.pow(2).sum({1, 2}), t);
        expect_close(method == 1 ? "  norm only (materialise), K on columns" : "  norm only (ghost), K on columns",
                     deer::per_sample_grad_norm_only(L, R, s, Kq.to(dtype), 1, method),
                     torch::einsum("bpq,qs,bps->b", {g_ref, Kq, g_ref}), t);
        expect_close(method == 1 ? "  norm only (materialise), K on rows" : "  norm only (ghost), K on rows",
                     deer::per_sample_grad_norm_only(L, R, s, Kp.to(dtype), 0, method),
                     torch::einsum("bpq,ps,bsq->b", {g_ref, Kp, g_ref}), t);
      }
    }
  }
  // Bad input must raise, naming the problem.
  expect("mismatched token dims rejected", raises([] {
    deer::per_sample_grad_norm_cpu(torch::randn({2, 3, 4}), torch::randn({2, 4, 5}), 1.0, c10::nullopt, 1); },
    "share batch and token"));
  // The cost rule: ghost for one token, materialise for ViT sequences.
  const bool rule = deer::per_sample_grad_norm_ghost_pays(1, 768, 8) && !deer::per_sample_grad_norm_ghost_pays(197, 2304, 8);
  expect("ghost cost rule", rule);
  return finish();
}
