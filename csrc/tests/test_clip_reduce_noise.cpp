// ctest: clip_reduce_noise on the CPU. Philox4x32-10 against ATen's independent engine (same key and
// counter -> same words), determinism of the keyed stream, distinct keys -> uncorrelated noise, the
// clipped sum and the fused weighted GEMM against libtorch formulas in float64, the regulated solve
// against torch's triangular solve, the fused optimizer step (SGD / Adam / AdamW, fused_update.h)
// against torch.optim's formulas in float64, and the input checks. Exits non-zero on any failure.
#include <ATen/core/PhiloxRNGEngine.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "clip_reduce_noise/clip_reduce_noise.h"
#include "clip_reduce_noise/philox.h"
#include "clip_reduce_noise/philox_normals.h"
#include "per_sample_grad_norm/psgn_tile.h"
#include "tests/check.h"
#include "tests/optim_step.h"

using namespace deer::check;

static double rel_err(const at::Tensor& got, const at::Tensor& want) {
  return (got.to(at::kDouble) - want).abs().max().item<double>() / (want.abs().max().item<double>() + 1e-300);
}

// A parameter and its optimizer state; a 0-element tensor for a buffer the optimizer does not use.
struct OptState {
  at::Tensor param, buf1, buf2;
  std::vector<at::Tensor> list() const { return {param, buf1, buf2}; }
  OptState clone() const { return {param.clone(), buf1.clone(), buf2.clone()}; }
};

static OptState random_state(const Optim& o, int64_t p, int64_t q, at::ScalarType dtype) {
  const auto v = o.start(p, q, dtype);
  return {v[0], v[1], v[2]};
}

// The independent reference: torch.optim's single-tensor SGD / Adam / AdamW step (maximize=False,
// amsgrad=False), written with the tensor ops of torch/optim/{sgd,adam}.py, in float64, applied to
// state s with gradient grad. Elements whose gradient is not finite keep their old values
// (fused_update.h's rule).
static OptState reference_step(const Optim& o, const at::Tensor& grad, const OptState& s) {
  auto g = grad.to(at::kDouble);
  const auto ok = torch::isfinite(g);
  g = torch::where(ok, g, torch::zeros_like(g));
  const auto p = s.param.to(at::kDouble), b1 = s.buf1.to(at::kDouble), b2 = s.buf2.to(at::kDouble);
  at::Tensor P, B1 = b1, B2 = b2;
  if (o.kind == deer::kUpdateSGD) {
    auto d = o.wd != 0 ? g.add(p, o.wd) : g;
    if (o.momentum != 0) {
      B1 = o.first ? d.clone() : b1.mul(o.momentum).add(d, 1 - o.dampening);
      d = o.nesterov ? d.add(B1, o.momentum) : B1;
    }
    P = p.add(d, -o.lr);
  } else {
    auto p1 = p;
    if (o.wd != 0) {
      if (o.kind == deer::kUpdateAdamW)
        p1 = p.mul(1 - o.lr * o.wd);
      else
        g = g.add(p, o.wd);
    }
    B1 = b1.lerp(g, 1 - o.beta1);
    B2 = b2.mul(o.beta2).addcmul(g, g, 1 - o.beta2);
    const double bc1 = 1 - std::pow(o.beta1, o.t), bc2 = 1 - std::pow(o.beta2, o.t);
    P = p1.addcdiv(B1, (B2.sqrt() / std::sqrt(bc2)).add(o.eps), -o.lr / bc1);
  }
  auto keep_nonfinite = [&](const at::Tensor& stepped, const at::Tensor& old) {
    return old.numel() == 0 ? old : torch::where(ok, stepped, old);
  };
  return {keep_nonfinite(P, p), keep_nonfinite(B1, b1), keep_nonfinite(B2, b2)};
}

// The op's fused step (got, from start) against the reference (want, from start): the parameter's
// step p - p0 (relative to the largest step, so a missing or wrong step cannot hide behind |p|) and
// each buffer the optimizer uses.
static void expect_state(const std::string& name, const Optim& o, const OptState& got, const OptState& start,
                         const OptState& want, double rtol) {
  const auto p0 = start.param.to(at::kDouble);
  expect_close(name + " param step", got.param.to(at::kDouble) - p0, want.param - p0, rtol);
  if (o.has_buf1())
    expect_close(name + (o.kind == deer::kUpdateSGD ? " momentum_buffer" : " exp_avg"), got.buf1, want.buf1, rtol);
  if (o.has_buf2()) expect_close(name + " exp_avg_sq", got.buf2, want.buf2, rtol);
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
      auto got = deer::clip_reduce_noise_cpu(g, clip, 0.0, ebs, c10::nullopt, 1, 1, 2, 3, 4, {}, {});
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
  auto clean = deer::clip_reduce_noise_cpu(g, clip, 0.0, 1.0, c10::nullopt, 1, seed, 5, 6, 7, {}, {});
  auto z = [&](int64_t s, int64_t st, int64_t l, int64_t cl) {
    return (deer::clip_reduce_noise_cpu(g, clip, 1.0, 1.0, c10::nullopt, 1, s, st, l, cl, {}, {}) - clean)
        .to(at::kDouble);
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
    auto base = deer::clip_reduce_noise_cpu(gg, cc, 0.0, 2.0, c10::nullopt, side, seed, 1, 2, 3, {}, {});
    auto Z = (deer::clip_reduce_noise_cpu(gg, cc, 1.0, 1.0, c10::nullopt, side, seed, 1, 2, 3, {}, {}) -
              deer::clip_reduce_noise_cpu(gg, cc, 0.0, 1.0, c10::nullopt, side, seed, 1, 2, 3, {}, {}));
    auto xi = side == 0 ? torch::linalg_solve_triangular(Rc, Z, true, true, false)
                        : torch::linalg_solve_triangular(Rc.t(), Z, false, false, false);
    auto want = base + 0.7 * xi / 2.0;
    auto got = deer::clip_reduce_noise_cpu(gg, cc, 0.7, 2.0, Rc, side, seed, 1, 2, 3, {}, {});
    const double e = rel_err(got, want);
    expect(side == 0 ? "regulated noise side 0 = R^-1 Z" : "regulated noise side 1 = Z R^-T", e <= 1e-12, e);
  }

  // 6. Bad input raises with a message naming the problem.
  expect("wrong clip shape rejected", raises([&] {
    deer::clip_reduce_noise_cpu(g, torch::rand({3}), 1.0, 1.0, c10::nullopt, 1, 0, 0, 0, 0, {}, {}); },
    "clip must be (b,)"));
  expect("wrong chol shape rejected", raises([&] {
    deer::clip_reduce_noise_cpu(g, clip, 1.0, 1.0, torch::eye(5), 1, 0, 0, 0, 0, {}, {}); }, "upper Cholesky factor"));
  expect("step >= 2^32 rejected", raises([&] {
    deer::clip_reduce_noise_cpu(g, clip, 1.0, 1.0, c10::nullopt, 1, 0, int64_t(1) << 32, 0, 0, {}, {}); },
    "[0, 2^32)"));
  expect("singular chol rejected", raises([&] {
    deer::clip_reduce_noise_cpu(g, clip, 1.0, 1.0, torch::zeros({q, q}), 1, 0, 0, 0, 0, {}, {}); },
    "positive definite"));

  // 7. Fused optimizer step: each kind, every noise path, odd sizes, fp32 and fp64 parameters, from a
  //    random start, against the float64 torch.optim formulas applied to the op's returned gradient.
  //    SGD with momentum runs two steps (first = 1 initialises the buffer, then first = 0).
  const Optim sgd{.name = "SGD", .kind = deer::kUpdateSGD, .lr = 0.1};
  const Optim sgdm_first{.name = "SGD momentum/nesterov/wd, first", .kind = deer::kUpdateSGD, .lr = 0.05,
                         .wd = 0.01, .momentum = 0.9, .dampening = 0.1, .nesterov = true, .first = true};
  const Optim sgdm = [&] {
    Optim o = sgdm_first;
    o.name = "SGD momentum/nesterov/wd, next";
    o.first = false;
    return o;
  }();
  const Optim adam{.name = "Adam L2 wd", .kind = deer::kUpdateAdam, .lr = 0.01, .wd = 0.05, .beta1 = 0.85,
                   .beta2 = 0.99, .eps = 1e-6, .t = 3};
  const Optim adamw{.name = "AdamW", .kind = deer::kUpdateAdamW, .lr = 0.05, .wd = 0.1, .beta1 = 0.8,
                    .beta2 = 0.995, .eps = 1e-7, .t = 5};
  const std::vector<std::vector<Optim>> runs = {{sgd}, {sgdm_first, sgdm}, {adam}, {adamw}};
  struct Noise { const char* name; int64_t b, p, q; double sigma; int64_t side; bool regulated; };
  const Noise noises[] = {{"no noise", 5, 13, 7, 0.0, 1, false},
                          {"isotropic", 5, 13, 7, 0.8, 1, false},
                          {"regulated side 0", 4, 6, 41, 0.8, 0, true},
                          {"regulated side 1", 3, 37, 5, 0.8, 1, true}};
  bool grad_unchanged = true;
  for (const auto& nz : noises) {
    c10::optional<at::Tensor> chol;
    if (nz.regulated) chol = torch::linalg_cholesky(random_spd(nz.side == 0 ? nz.p : nz.q)).t().contiguous();
    for (auto dtype : {at::kFloat, at::kDouble}) {
      const double tol = dtype == at::kDouble ? 1e-12 : 1e-5;
      for (const auto& run : runs) {
        OptState state = random_state(run[0], nz.p, nz.q, dtype);
        for (const auto& o : run) {
          auto gg = torch::randn({nz.b, nz.p, nz.q}, torch::dtype(dtype));
          auto cc = 0.1 + torch::rand({nz.b}, torch::dtype(dtype));
          const int64_t step = static_cast<int64_t>(rng() % 1000);
          OptState got = state.clone();
          auto out = deer::clip_reduce_noise_cpu(gg, cc, nz.sigma, 2.0, chol, nz.side, seed, step, 4, 5, got.list(),
                                                 o.hyper());
          grad_unchanged = grad_unchanged &&
                           torch::equal(out, deer::clip_reduce_noise_cpu(gg, cc, nz.sigma, 2.0, chol, nz.side, seed,
                                                                         step, 4, 5, {}, {}));
          expect_state(std::string("fused ") + o.name + ", " + nz.name + " " + c10::toString(dtype), o, got, state,
                       reference_step(o, out, state), tol);
          state = got;
        }
      }
    }
  }
  expect("fused step leaves the returned gradient bit-identical (all cases)", grad_unchanged);

  // A non-finite gradient element (+inf in one per-sample entry): returned as is, that element's
  // parameter and state untouched, every other element stepped.
  for (const Optim* o : {&adam, &sgdm}) {
    const int64_t pp = 9, qq = 11, e = 2 * qq + 3;
    auto gg = torch::randn({4, pp, qq});
    gg[1][2][3] = std::numeric_limits<float>::infinity();
    auto cc = 0.1 + torch::rand({4});
    const OptState start = random_state(*o, pp, qq, at::kFloat);
    OptState got = start.clone();
    auto out = deer::clip_reduce_noise_cpu(gg, cc, 0.8, 2.0, c10::nullopt, 1, seed, 1, 2, 3, got.list(), o->hyper());
    const std::string name = std::string("non-finite gradient, ") + o->name + ":";
    expect(name + " returned as +inf", std::isinf(out.view(-1)[e].item<float>()));
    bool untouched = true;
    const auto before = start.list(), after = got.list();
    for (int i = 0; i < 3; ++i)
      if (before[i].numel() > 0) untouched = untouched && torch::equal(after[i].view(-1)[e], before[i].view(-1)[e]);
    expect(name + " its param and state untouched", untouched);
    expect_state(name + " others", *o, got, start, reference_step(*o, out, start), 1e-5);
  }

  // The grouped op: each layer steps exactly as the single-layer op does; a layer without an update
  // (kind 0, 0-element tensors) is left alone.
  {
    auto g0 = torch::randn({3, 7, 9}), g1 = torch::randn({3, 10, 6});
    auto c0 = torch::rand({3}), c1 = torch::rand({3});
    const OptState s0 = random_state(adamw, 7, 9, at::kFloat);
    OptState grouped = s0.clone(), single = s0.clone();
    auto none = torch::empty({0});
    auto h = adamw.hyper();
    h.resize(2 * deer::kUpdateHyperWidth, 0.0);  // layer 1: kind 0 (no update)
    c10::List<c10::optional<at::Tensor>> chols;
    chols.push_back(c10::nullopt);
    chols.push_back(c10::nullopt);
    auto outs = deer::clip_reduce_noise_grouped_cpu({g0, g1}, {c0, c1}, 0.8, 2.0, chols, {1, 1}, seed, 3, {0, 1}, 5,
                                                    {grouped.param, grouped.buf1, grouped.buf2, none, none, none}, h);
    auto out0 = deer::clip_reduce_noise_cpu(g0, c0, 0.8, 2.0, c10::nullopt, 1, seed, 3, 0, 5, single.list(),
                                            adamw.hyper());
    expect("grouped fused step: layer 0 = the single-layer op's step",
           torch::equal(outs[0], out0) && torch::equal(grouped.param, single.param) &&
               torch::equal(grouped.buf1, single.buf1) && torch::equal(grouped.buf2, single.buf2));
  }

  // Bad update arguments raise with a message naming the problem, before anything is stepped.
  {
    auto gg = torch::randn({3, 5, 4});
    auto cc = torch::rand({3});
    const OptState s = random_state(adam, 5, 4, at::kFloat);
    const OptState s_before = s.clone();
    auto call = [&](const std::vector<at::Tensor>& ts, const std::vector<double>& h) {
      deer::clip_reduce_noise_cpu(gg, cc, 1.0, 1.0, c10::nullopt, 1, 0, 0, 0, 0, ts, h);
    };
    auto bad_kind = adam.hyper();
    bad_kind[deer::kHKind] = 7;
    auto short_hyper = adam.hyper();
    short_hyper.pop_back();
    expect("fused update: wrong param shape rejected", raises([&] {
      call({torch::zeros({5, 5}), s.buf1, s.buf2}, adam.hyper()); }, "param of layer 0 must be (5, 4)"));
    expect("fused update: param dtype other than the gradient's rejected", raises([&] {
      call({s.param.to(at::kDouble), s.buf1, s.buf2}, adam.hyper()); }, "but the private gradient is Float"));
    expect("fused update: non-contiguous param rejected", raises([&] {
      call({torch::zeros({4, 5}).t(), s.buf1, s.buf2}, adam.hyper()); }, "param of layer 0 must be contiguous"));
    expect("fused update: Adam without exp_avg_sq rejected", raises([&] {
      call({s.param, s.buf1, torch::empty({0})}, adam.hyper()); }, "exp_avg_sq of layer 0 must be (5, 4)"));
    expect("fused update: SGD momentum without its buffer rejected", raises([&] {
      call({s.param, torch::empty({0}), torch::empty({0})}, sgdm.hyper()); }, "momentum_buffer of layer 0 must be"));
    expect("fused update: two tensors for one layer rejected", raises([&] {
      call({s.param, s.buf1}, adam.hyper()); }, "needs 3 tensors (param, buf1, buf2)"));
    expect("fused update: a short update_hyper rejected", raises([&] {
      call(s.list(), short_hyper); }, "needs 3 tensors (param, buf1, buf2)"));
    expect("fused update: unknown kind rejected", raises([&] {
      call(s.list(), bad_kind); }, "must be 1 (SGD), 2 (Adam) or 3 (AdamW)"));
    // Grouped: layer 1's bad param fails the call before layer 0 (valid) steps.
    c10::List<c10::optional<at::Tensor>> chols;
    chols.push_back(c10::nullopt);
    chols.push_back(c10::nullopt);
    auto h2 = adam.hyper();
    const auto h1 = adam.hyper();
    h2.insert(h2.end(), h1.begin(), h1.end());
    expect("grouped fused update: a bad layer-1 param rejected", raises([&] {
      deer::clip_reduce_noise_grouped_cpu({gg, gg}, {cc, cc}, 1.0, 1.0, chols, {1, 1}, 0, 0, {0, 1}, 0,
                                          {s.param, s.buf1, s.buf2, torch::zeros({5}), s.buf1, s.buf2}, h2); },
      "param of layer 1 must be (5, 4)"));
    expect("rejected updates stepped nothing", torch::equal(s.param, s_before.param) &&
                                                   torch::equal(s.buf1, s_before.buf1) &&
                                                   torch::equal(s.buf2, s_before.buf2));
  }
  return finish();
}
