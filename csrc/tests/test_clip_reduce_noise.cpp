// ctest: clip_reduce_noise on the CPU. Philox4x32-10 against ATen's independent engine (same key and
// counter -> same words), determinism of the keyed stream, distinct keys -> uncorrelated noise, the
// clipped sum and the fused weighted GEMM against libtorch formulas in float64, the regulated solve
// against torch's triangular solve, and the input checks. Exits non-zero on any failure.
#include <ATen/core/PhiloxRNGEngine.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "clip_reduce_noise/clip_reduce_noise.h"
#include "clip_reduce_noise/philox.h"
#include "clip_reduce_noise/philox_normals.h"
#include "per_sample_grad_norm/psgn_tile.h"
#include "tests/check.h"

using namespace deer::check;

static double rel_err(const at::Tensor& got, const at::Tensor& want) {
  return (got.to(at::kDouble) - want).abs().max().item<double>() / (want.abs().max().item<double>() + 1e-300);
}

int main(int argc, char** argv) {
  // The batched normals (and so the whole op) once per instruction set: the dispatched one here, the
  // narrower ones in child runs capped by DEER_CPU_ISA.
  run_isa_children(argc, argv);
  std::printf("--- instruction set: %s\n", deer::tile::isa());
  std::random_device rd;
  std::mt19937_64 rng((static_cast<uint64_t>(rd()) << 32) ^ rd());
  torch::manual_seed(rng());

  // 1. Philox words equal ATen's engine: key = seed, counter = (offset lo, offset hi, subseq lo, subseq hi).
  bool same = true;
  for (int rep = 0; rep < 200 && same; ++rep) {
    const uint64_t seed = rng();
    const deer::philox::U4 c{static_cast<uint32_t>(rng()), static_cast<uint32_t>(rng()),
                             static_cast<uint32_t>(rng()), static_cast<uint32_t>(rng())};
    at::Philox4_32 ref(seed, (uint64_t(c.w) << 32) | c.z, (uint64_t(c.y) << 32) | c.x);
    const auto got = deer::philox::philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    same = ref() == got.x && ref() == got.y && ref() == got.z && ref() == got.w;
  }
  expect("Philox4x32-10 matches ATen's engine (200 random keys)", same);
  // Published known-answer vector (Random123 kat_vectors): counter 0, key 0.
  const auto kat = deer::philox::philox4x32_10({0, 0, 0, 0}, 0, 0);
  expect("Philox4x32-10 known-answer vector", kat.x == 0x6627e8d5u && kat.y == 0xe169c58du &&
                                                 kat.z == 0xbc57ac4cu && kat.w == 0x9b00dbd8u);

  // 1b. Batched normals (vector Philox + libmvec Box-Muller) = philox.h's scalar normal_at to a few
  //     ulp, and bit-identical however a range is split (odd starts/ends, short and long pieces).
  {
    double worst = 0;
    bool split_ok = true;
    for (int rep = 0; rep < 20; ++rep) {
      const auto key = deer::philox::make_key(rng(), rng() % 1000, rng() % 50, rng() % 7);
      const int64_t e0 = static_cast<int64_t>(rng() % 1000), n = 1 + static_cast<int64_t>(rng() % 3000);
      std::vector<double> whole(n), pieces(n);
      deer::philox::fill_normals(key, e0, e0 + n, whole.data());
      for (int64_t i = 0; i < n; ++i) {
        const double want = deer::philox::normal_at(key, static_cast<uint64_t>(e0 + i));
        worst = std::max(worst, std::abs(whole[i] - want) / std::max(1.0, std::abs(want)));
      }
      for (int64_t a = 0; a < n;) {
        const int64_t len = std::min<int64_t>(n - a, 1 + static_cast<int64_t>(rng() % 37));
        deer::philox::fill_normals(key, e0 + a, e0 + a + len, pieces.data() + a);
        a += len;
      }
      split_ok = split_ok && std::memcmp(whole.data(), pieces.data(), sizeof(double) * n) == 0;
    }
    expect("batched normals = scalar normal_at (relative, 20 random ranges)", worst <= 1e-14, worst);
    expect("batched normals independent of how the range is split", split_ok);
  }

  // 2. Clipped sum (no noise) against libtorch, odd sizes and dtypes.
  struct Case { int64_t b, p, q; } cases[] = {{1, 1, 1}, {33, 17, 4}, {5, 64, 9}, {3, 8, 129}};
  for (auto c : cases) {
    for (auto dtype : {at::kFloat, at::kDouble}) {
      auto g = torch::randn({c.b, c.p, c.q}, torch::dtype(dtype));
      auto clip = torch::rand({c.b}, torch::dtype(dtype));
      const double ebs = 7.5;
      auto want = torch::einsum("b,bpq->pq", {clip.to(at::kDouble), g.to(at::kDouble)}) / ebs;
      auto got = deer::clip_reduce_noise_cpu(g, clip, 0.0, ebs, c10::nullopt, 1, 1, 2, 3, 4);
      char name[128];
      std::snprintf(name, sizeof name, "clipped mean b=%ld p=%ld q=%ld %s", c.b, c.p, c.q,
                    dtype == at::kDouble ? "f64" : "f32");
      const double e = rel_err(got, want);
      expect(name, e <= (dtype == at::kDouble ? 1e-12 : 1e-5), e);
    }
  }

  // 3. Fused weighted GEMM == clipped sum of materialised scale * L_i^T R_i.
  {
    auto L = torch::randn({6, 13, 37}, torch::kDouble), R = torch::randn({6, 13, 5}, torch::kDouble);
    auto clip = torch::rand({6}, torch::kDouble);
    auto g = 0.3 * torch::einsum("btp,btq->bpq", {L, R});
    auto want = torch::einsum("b,bpq->pq", {clip, g}) / 4.0;
    for (auto dtype : {at::kFloat, at::kDouble}) {
      auto got = deer::clip_reduce_noise_fused_cpu(L.to(dtype), R.to(dtype), 0.3, clip.to(dtype), 0.0, 4.0,
                                                   c10::nullopt, 1, 0, 0, 0, 0);
      const double e = rel_err(got, want);
      expect(dtype == at::kDouble ? "fused weighted GEMM f64" : "fused weighted GEMM f32",
             e <= (dtype == at::kDouble ? 1e-12 : 1e-5), e);
    }
  }

  // 4. Noise: the same key reproduces the output bit for bit; other keys are uncorrelated.
  const int64_t p = 300, q = 200;
  auto g = torch::randn({4, p, q}, torch::kFloat);
  auto clip = torch::rand({4});
  const int64_t seed = static_cast<int64_t>(rng() >> 1);
  auto clean = deer::clip_reduce_noise_cpu(g, clip, 0.0, 1.0, c10::nullopt, 1, seed, 5, 6, 7);
  auto z = [&](int64_t s, int64_t st, int64_t l, int64_t cl) {
    return (deer::clip_reduce_noise_cpu(g, clip, 1.0, 1.0, c10::nullopt, 1, s, st, l, cl) - clean).to(at::kDouble);
  };
  auto z0 = z(seed, 5, 6, 7);
  expect("same key -> identical noise", torch::equal(z0, z(seed, 5, 6, 7)));
  const double bound = 5.0 / std::sqrt(double(p * q));
  const std::pair<const char*, at::Tensor> others[] = {
      {"other seed uncorrelated", z(seed ^ 1, 5, 6, 7)}, {"other step uncorrelated", z(seed, 6, 6, 7)},
      {"other layer uncorrelated", z(seed, 5, 7, 7)}, {"other client uncorrelated", z(seed, 5, 6, 8)}};
  for (const auto& [name, zo] : others) {
    const double corr = (z0 * zo).mean().item<double>() / std::sqrt(z0.pow(2).mean().item<double>() * zo.pow(2).mean().item<double>());
    expect(name, std::abs(corr) < bound, corr);
  }
  const double var = z0.var().item<double>();
  expect("isotropic noise variance ~ 1 (5 sigma)", std::abs(var - 1.0) < 5 * std::sqrt(2.0 / (p * q)), var);

  // 5. Regulated noise = the isotropic draw mapped through R^{-1} (side 0) / R^{-T} (side 1).
  for (int64_t side : {0, 1}) {
    const int64_t r = 6, other = 41;
    const int64_t pp = side == 0 ? r : other, qq = side == 0 ? other : r;
    auto A = torch::randn({r, r}, torch::kDouble);
    auto K = A.matmul(A.t()) + 0.5 * torch::eye(r, torch::kDouble);
    auto Rc = torch::linalg_cholesky(K).t().contiguous();  // upper, K = R^T R
    auto gg = torch::randn({3, pp, qq}, torch::kDouble);
    auto cc = torch::rand({3}, torch::kDouble);
    auto base = deer::clip_reduce_noise_cpu(gg, cc, 0.0, 2.0, c10::nullopt, side, seed, 1, 2, 3);
    auto Z = (deer::clip_reduce_noise_cpu(gg, cc, 1.0, 1.0, c10::nullopt, side, seed, 1, 2, 3) -
              deer::clip_reduce_noise_cpu(gg, cc, 0.0, 1.0, c10::nullopt, side, seed, 1, 2, 3));
    auto xi = side == 0 ? torch::linalg_solve_triangular(Rc, Z, true, true, false)
                        : torch::linalg_solve_triangular(Rc.t(), Z, false, false, false);
    auto want = base + 0.7 * xi / 2.0;
    auto got = deer::clip_reduce_noise_cpu(gg, cc, 0.7, 2.0, Rc, side, seed, 1, 2, 3);
    const double e = rel_err(got, want);
    expect(side == 0 ? "regulated noise side 0 = R^-1 Z" : "regulated noise side 1 = Z R^-T", e <= 1e-12, e);
  }

  // 6. Bad input raises with a message naming the problem.
  expect("wrong clip shape rejected", raises([&] {
    deer::clip_reduce_noise_cpu(g, torch::rand({3}), 1.0, 1.0, c10::nullopt, 1, 0, 0, 0, 0); }, "clip must be (b,)"));
  expect("wrong chol shape rejected", raises([&] {
    deer::clip_reduce_noise_cpu(g, clip, 1.0, 1.0, torch::eye(5), 1, 0, 0, 0, 0); }, "upper Cholesky factor"));
  expect("step >= 2^32 rejected", raises([&] {
    deer::clip_reduce_noise_cpu(g, clip, 1.0, 1.0, c10::nullopt, 1, 0, int64_t(1) << 32, 0, 0); }, "[0, 2^32)"));
  expect("singular chol rejected", raises([&] {
    deer::clip_reduce_noise_cpu(g, clip, 1.0, 1.0, torch::zeros({q, q}), 1, 0, 0, 0, 0); }, "positive definite"));
  return finish();
}
