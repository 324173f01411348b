// ctest: the CUDA kernels of clip_reduce_noise and clip_reduce_noise_fused, compiled from
// clip_reduce_noise_cuda.cuh (the text nvcc compiles) and executed by the CPU emulator (cuda_emu.h).
// Against float64 libtorch formulas on fresh random inputs with odd sizes (odd element counts, so
// the last thread owns half a Philox pair): the clipped sum, isotropic noise element by element
// (Z from philox::normal_at, whose words test_clip_reduce_noise checks against ATen's engine),
// regulated noise on both sides against torch's triangular solve, the fused GEMM route, every input
// dtype, and the CPU backend's output for the same key; the fused optimizer step (SGD / Adam / AdamW)
// on every kernel path (one kernel, split sum, regulated solve, grouped kernels, grouped fallback)
// against the CPU backend's fused step. Exits non-zero on any failure.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <iterator>
#include <string>
#include <vector>

#include "clip_reduce_noise/clip_reduce_noise_cuda.cuh"
#include "tests/check.h"
#include "tests/optim_step.h"

using namespace deer::check;

// Z (p, q) in float64 as the kernels must draw it: element e from pair e / 2 of the keyed stream.
static at::Tensor philox_z(int64_t p, int64_t q, uint64_t seed, int64_t step, int64_t layer, int64_t client) {
  auto Z = torch::empty({p, q}, torch::kDouble);
  const auto key = deer::philox::make_key(seed, static_cast<uint32_t>(step), static_cast<uint32_t>(layer),
                                          static_cast<uint32_t>(client));
  double* z = Z.data_ptr<double>();
  for (int64_t e = 0; e < p * q; ++e) z[e] = deer::philox::normal_at(key, static_cast<uint64_t>(e));
  return Z;
}

static std::vector<at::Tensor> clones(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.clone());
  return out;
}

// The kernels' fused step (got) against the CPU backend's (cpu), both taken from `start` (param,
// buf1, buf2): the parameter's step p - p0 (relative to the largest step, so a missing step cannot
// hide behind |p|) and each buffer in use.
static void expect_same_step(const std::string& name, const std::vector<at::Tensor>& got,
                             const std::vector<at::Tensor>& cpu, const std::vector<at::Tensor>& start, double rtol) {
  const auto p0 = start[0].to(at::kDouble);
  expect_close(name + " param step", got[0].to(at::kDouble) - p0, cpu[0].to(at::kDouble) - p0, rtol);
  for (int i = 1; i < 3; ++i)
    if (start[i].numel() > 0) expect_close(name + (i == 1 ? " buf1" : " buf2"), got[i], cpu[i], rtol);
}

int main() {
  std::random_device rd;
  std::mt19937_64 rng((static_cast<uint64_t>(rd()) << 32) ^ rd());
  const uint64_t seed = rng();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  torch::manual_seed(seed);
  deer::emu::seed_schedule(seed);
  const int stream = 0;
  using deer::crn_cuda::clip_reduce_noise_launch;
  using deer::crn_cuda::clip_reduce_noise_fused_launch;

  // (b, p, q): single element, odd p*q, more pairs than one 256-thread block, ViT-B B phase (768 x 8)
  // and A phase (8 x 2304), rank 1 and 64.
  // (45, 64, 64): 2048 pairs, so the sample sum is split in chunks of 2 (the last one short).
  struct Case { int64_t b, p, q; } cases[] = {{1, 1, 1}, {33, 17, 5}, {5, 64, 9}, {3, 8, 129}, {2, 768, 8},
                                              {2, 8, 2304}, {4, 1, 37}, {3, 97, 1}, {2, 64, 65}, {45, 64, 64}};
  for (auto c : cases) {
    const uint64_t key_seed = rng();
    const int64_t step = rng() % 100000, layer = rng() % 97, client = rng() % 13;
    const auto Z = philox_z(c.p, c.q, key_seed, step, layer, client);
    for (auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
      auto g = torch::randn({c.b, c.p, c.q}).to(dtype);
      auto clip = torch::rand({c.b}, torch::dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));
      const double ebs = 6.5, sigma = 0.9;
      const double tol = dtype == at::kDouble ? 1e-12 : 1e-5;
      auto S = torch::einsum("b,bpq->pq", {clip.to(at::kDouble), g.to(at::kDouble)});
      const std::string name = "b=" + std::to_string(c.b) + " p=" + std::to_string(c.p) + " q=" +
                               std::to_string(c.q) + " " + c10::toString(dtype);
      const auto s64 = static_cast<int64_t>(key_seed);
      expect_close("clipped mean, no noise " + name,
                   clip_reduce_noise_launch(g, clip, 0.0, ebs, c10::nullopt, 1, s64, step, layer, client, {}, {},
                                            stream),
                   S / ebs, tol);
      auto iso =
          clip_reduce_noise_launch(g, clip, sigma, ebs, c10::nullopt, 1, s64, step, layer, client, {}, {}, stream);
      expect_close("  isotropic noise", iso, (S + sigma * Z) / ebs, tol);
      if (dtype == at::kFloat || dtype == at::kDouble)
        expect_close("  isotropic = CPU backend, same key", iso,
                     deer::clip_reduce_noise_cpu(g, clip, sigma, ebs, c10::nullopt, 1, s64, step, layer, client, {},
                                                 {}),
                     tol);
      // Regulated: K on the rank side, the one of p, q that is <= 8 (both sides for tiny shapes).
      for (int64_t side : {0, 1}) {
        const int64_t r = side == 0 ? c.p : c.q;
        if (r > 64) continue;
        auto A = torch::randn({r, r}, torch::kDouble);
        auto K = A.matmul(A.t()) + 0.5 * torch::eye(r, torch::kDouble);
        auto Rc = torch::linalg_cholesky(K).t().contiguous();  // upper, K = R^T R
        auto xi = side == 0 ? torch::linalg_solve_triangular(Rc, Z, true, true, false)
                            : torch::linalg_solve_triangular(Rc.t(), Z, false, false, false);
        auto chol_in = Rc.to(dtype == at::kDouble ? at::kDouble : at::kFloat);
        auto xi_in = side == 0 ? torch::linalg_solve_triangular(chol_in.to(at::kDouble), Z, true, true, false)
                               : torch::linalg_solve_triangular(chol_in.to(at::kDouble).t(), Z, false, false, false);
        expect_close(std::string("  regulated noise, side ") + (side == 0 ? "0 (R^-1 Z)" : "1 (Z R^-T)"),
                     clip_reduce_noise_launch(g, clip, sigma, ebs, chol_in, side, s64, step, layer, client, {}, {},
                                              stream),
                     (S + sigma * xi_in) / ebs, tol);
      }
    }
  }

  // Fused: sum_i clip_i * scale * L_i^T R_i as one weighted GEMM, then the same noise kernels.
  {
    const int64_t b = 6, T = 13, p = 37, q = 5;
    auto L = torch::randn({b, T, p}, torch::kDouble), R = torch::randn({b, T, q}, torch::kDouble);
    auto clip = torch::rand({b}, torch::kDouble);
    auto S = torch::einsum("b,bpq->pq", {clip, 0.3 * torch::einsum("btp,btq->bpq", {L, R})});
    const auto Z = philox_z(p, q, 77, 3, 2, 1);
    for (auto dtype : {at::kFloat, at::kDouble}) {
      auto got = clip_reduce_noise_fused_launch(L.to(dtype), R.to(dtype), 0.3, clip.to(dtype), 0.5, 4.0, c10::nullopt,
                                                1, 77, 3, 2, 1, stream);
      expect_close(std::string("fused weighted GEMM + isotropic noise ") + c10::toString(dtype), got,
                   (S + 0.5 * Z) / 4.0, dtype == at::kDouble ? 1e-12 : 1e-5);
    }
  }

  // Grouped: a model's worth of layers in one launch (same dtype, >= 2^16 element pairs in total:
  // six 2304 x 8 B-phase layers, an 8 x 3072 A-phase one, both regulated and isotropic, a zero-solve
  // layer between regulated ones), each output equal to the float64 formula for its own key.
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    struct Layer { int64_t b, p, q, side; bool regulated; } spec[] = {
        {3, 2304, 8, 1, true}, {3, 2304, 8, 1, false}, {2, 8, 3072, 0, true}, {3, 2304, 8, 1, true},
        {2, 768, 8, 1, false}, {3, 2304, 8, 1, true},  {3, 2304, 8, 1, false}, {3, 2304, 8, 1, true},
        {2, 64, 65, 0, true}};
    std::vector<at::Tensor> gs, cs, wants;
    c10::List<c10::optional<at::Tensor>> chols;
    std::vector<int64_t> sides, layer_ids;
    const uint64_t gseed = rng();
    const int64_t step = 41, client = 5;
    const double ebs = 7.0, sigma = 1.3;
    for (size_t k = 0; k < std::size(spec); ++k) {
      const auto& L = spec[k];
      auto g = torch::randn({L.b, L.p, L.q}).to(dtype);
      auto c = torch::rand({L.b});
      const int64_t lid = 3 * static_cast<int64_t>(k) + 1;
      auto S = torch::einsum("b,bpq->pq", {c.to(at::kDouble), g.to(at::kDouble)});
      auto Z = philox_z(L.p, L.q, gseed, step, lid, client);
      c10::optional<at::Tensor> ch;
      if (L.regulated) {
        const int64_t r = L.side == 0 ? L.p : L.q;
        auto A = torch::randn({r, r}, torch::kDouble);
        auto Rc = torch::linalg_cholesky(A.matmul(A.t()) + 0.5 * torch::eye(r, torch::kDouble)).t().contiguous();
        ch = Rc.to(at::kFloat);
        const auto R64 = ch->to(at::kDouble);
        Z = L.side == 0 ? torch::linalg_solve_triangular(R64, Z, true, true, false)
                        : torch::linalg_solve_triangular(R64.t(), Z, false, false, false);
      }
      wants.push_back((S + sigma * Z) / ebs);
      gs.push_back(g);
      cs.push_back(c);
      chols.push_back(ch);
      sides.push_back(L.side);
      layer_ids.push_back(lid);
    }
    auto outs = deer::crn_cuda::clip_reduce_noise_grouped_launch(gs, cs, sigma, ebs, chols, sides,
                                                                 static_cast<int64_t>(gseed), step, layer_ids, client,
                                                                 {}, {}, stream);
    expect("grouped: one output per layer", outs.size() == std::size(spec));
    for (size_t k = 0; k < outs.size(); ++k)
      expect_close("grouped layer " + std::to_string(k) + (spec[k].regulated ? " regulated " : " isotropic ") +
                       c10::toString(dtype), outs[k], wants[k], 1e-5);
    // Few element pairs in total: the per-layer path, bit for bit the per-layer op.
    std::vector<at::Tensor> small_g{gs[4].narrow(1, 0, 40)}, small_c{cs[4]};
    c10::List<c10::optional<at::Tensor>> small_ch;
    small_ch.push_back(c10::nullopt);
    auto small = deer::crn_cuda::clip_reduce_noise_grouped_launch(small_g, small_c, sigma, ebs, small_ch, {1}, 9, 1,
                                                                  {2}, 0, {}, {}, stream);
    expect("grouped, few pairs: equals the per-layer op exactly",
           torch::equal(small[0], clip_reduce_noise_launch(small_g[0], small_c[0], sigma, ebs, c10::nullopt, 1, 9, 1, 2,
                                                           0, {}, {}, stream)));
    // One bad factor fails the whole call with the per-layer message, before any launch.
    auto bad = chols;
    bad.set(0, c10::optional<at::Tensor>(torch::zeros({8, 8})));
    expect("grouped: a singular chol is rejected", raises([&] {
      deer::crn_cuda::clip_reduce_noise_grouped_launch(gs, cs, sigma, ebs, bad, sides, 1, step, layer_ids, client,
                                                       {}, {}, stream); }, "positive definite"));
    expect("grouped: list lengths must agree", raises([&] {
      deer::crn_cuda::clip_reduce_noise_grouped_launch(gs, cs, sigma, ebs, chols, {1}, 1, step, layer_ids, client,
                                                       {}, {}, stream); }, "one entry per layer"));
  }

  // Fused optimizer step, per layer: the kernels step each element where they write it for the last
  // time (the pair kernel for isotropic / no noise, the solve for regulated noise; b = 1 runs one
  // sum kernel, b > 1 the split path, whose second kernel updates). Against the CPU backend's fused
  // step (itself checked against torch.optim's float64 formulas in test_clip_reduce_noise) on clones
  // of the same random start; fp32 parameters for fp32 / bf16 gradients, fp64 for fp64.
  const Optim updates[] = {
      {.name = "SGD", .kind = deer::kUpdateSGD, .lr = 0.1},
      {.name = "SGD momentum/nesterov/wd", .kind = deer::kUpdateSGD, .lr = 0.05, .wd = 0.01, .momentum = 0.9,
       .dampening = 0.1, .nesterov = true},
      {.name = "Adam L2 wd", .kind = deer::kUpdateAdam, .lr = 0.01, .wd = 0.05, .beta1 = 0.85, .beta2 = 0.99,
       .eps = 1e-6, .t = 3},
      {.name = "AdamW", .kind = deer::kUpdateAdamW, .lr = 0.05, .wd = 0.1, .beta1 = 0.8, .beta2 = 0.995, .eps = 1e-7,
       .t = 5}};
  {
    struct UCase { const char* what; int64_t b, p, q; double sigma; int64_t side; bool regulated; } ucases[] = {
        {"isotropic, one kernel", 1, 37, 11, 0.9, 1, false},
        {"isotropic, split", 33, 17, 5, 0.9, 1, false},
        {"no noise, split", 5, 9, 13, 0.0, 1, false},
        {"regulated side 0, one kernel", 1, 8, 129, 0.9, 0, true},
        {"regulated side 0, split", 3, 6, 45, 0.9, 0, true},
        {"regulated side 1, one kernel", 1, 97, 5, 0.9, 1, true},
        {"regulated side 1, split", 2, 768, 8, 0.9, 1, true},
        {"isotropic, split", 45, 64, 64, 0.9, 1, false},
        {"regulated side 0, split", 45, 64, 64, 0.9, 0, true}};
    bool grad_unchanged = true;
    for (const auto& c : ucases) {
      c10::optional<at::Tensor> chol;
      if (c.regulated) chol = torch::linalg_cholesky(random_spd(c.side == 0 ? c.p : c.q)).t().contiguous();
      for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
        const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
        auto g = torch::randn({c.b, c.p, c.q}).to(dtype);
        auto clip = 0.1 + torch::rand({c.b}, torch::dtype(acc));
        const int64_t s64 = static_cast<int64_t>(rng() >> 1), step = rng() % 1000, layer = rng() % 97,
                      client = rng() % 13;
        const double ebs = 2.0, tol = dtype == at::kDouble ? 1e-12 : 1e-5;
        const auto plain =
            clip_reduce_noise_launch(g, clip, c.sigma, ebs, chol, c.side, s64, step, layer, client, {}, {}, stream);
        for (const auto& u : updates) {
          const auto start = u.start(c.p, c.q, acc);
          auto got = clones(start), cpu = clones(start);
          auto out = clip_reduce_noise_launch(g, clip, c.sigma, ebs, chol, c.side, s64, step, layer, client, got,
                                              u.hyper(), stream);
          deer::clip_reduce_noise_cpu(g, clip, c.sigma, ebs, chol, c.side, s64, step, layer, client, cpu, u.hyper());
          grad_unchanged = grad_unchanged && torch::equal(out, plain);
          expect_same_step(std::string("fused ") + u.name + ", " + c.what + " b=" + std::to_string(c.b) + " p=" +
                               std::to_string(c.p) + " q=" + std::to_string(c.q) + " " + c10::toString(dtype),
                           got, cpu, start, tol);
        }
      }
    }
    expect("fused step leaves the returned gradient bit-identical (per-layer cases)", grad_unchanged);
  }

  // Fused optimizer step, grouped: a kind per layer (index into updates; -1: kind 0 with real
  // tensors, which must stay untouched), on the grouped kernels (>= 2^16 element pairs, the update
  // table on the device) and on the per-layer fallback (few pairs), against the CPU grouped op on
  // clones of the same start.
  {
    struct GLayer { int64_t b, p, q, side; bool regulated; int update; };
    const std::vector<GLayer> big = {{3, 2304, 8, 1, true, 0},  {3, 2304, 8, 1, false, 1}, {2, 8, 3072, 0, true, 2},
                                     {3, 2304, 8, 1, true, 3},  {2, 768, 8, 1, false, -1}, {3, 2304, 8, 1, false, 0},
                                     {3, 2304, 8, 1, true, 1},  {2, 64, 65, 0, true, 2},   {3, 2304, 8, 1, false, 3}};
    const std::vector<GLayer> small = {{2, 40, 8, 1, false, 1}, {3, 6, 21, 0, true, 2}, {2, 16, 8, 1, true, -1},
                                       {1, 9, 7, 1, false, 3},  {2, 5, 11, 1, true, 0}};
    for (const auto* spec : {&big, &small}) {
      const std::string path = spec == &big ? "grouped kernels" : "grouped fallback";
      std::vector<at::Tensor> gs, cs, start;
      std::vector<double> hyper;
      c10::List<c10::optional<at::Tensor>> chols;
      std::vector<int64_t> sides, layer_ids;
      for (size_t k = 0; k < spec->size(); ++k) {
        const auto& L = (*spec)[k];
        gs.push_back(torch::randn({L.b, L.p, L.q}));
        cs.push_back(torch::rand({L.b}));
        chols.push_back(L.regulated ? c10::optional<at::Tensor>(
                                          torch::linalg_cholesky(random_spd(L.side == 0 ? L.p : L.q)).t().contiguous())
                                    : c10::nullopt);
        sides.push_back(L.side);
        layer_ids.push_back(3 * static_cast<int64_t>(k) + 1);
        const Optim& u = updates[L.update >= 0 ? L.update : 2];
        auto h = u.hyper();
        if (L.update < 0) h[deer::kHKind] = deer::kUpdateNone;
        hyper.insert(hyper.end(), h.begin(), h.end());
        const auto s = u.start(L.p, L.q, at::kFloat);
        start.insert(start.end(), s.begin(), s.end());
      }
      const int64_t gseed = static_cast<int64_t>(rng() >> 1), step = 41, client = 5;
      const double ebs = 7.0, sigma = 1.3;
      auto got = clones(start), cpu = clones(start);
      const auto plain = deer::crn_cuda::clip_reduce_noise_grouped_launch(gs, cs, sigma, ebs, chols, sides, gseed, step,
                                                                          layer_ids, client, {}, {}, stream);
      const auto outs = deer::crn_cuda::clip_reduce_noise_grouped_launch(gs, cs, sigma, ebs, chols, sides, gseed, step,
                                                                         layer_ids, client, got, hyper, stream);
      deer::clip_reduce_noise_grouped_cpu(gs, cs, sigma, ebs, chols, sides, gseed, step, layer_ids, client, cpu, hyper);
      bool grad_unchanged = true;
      for (size_t k = 0; k < spec->size(); ++k) {
        const auto& L = (*spec)[k];
        grad_unchanged = grad_unchanged && torch::equal(outs[k], plain[k]);
        auto layer_of = [&](const std::vector<at::Tensor>& ts) {
          return std::vector<at::Tensor>(ts.begin() + 3 * k, ts.begin() + 3 * k + 3);
        };
        const std::string name = path + " layer " + std::to_string(k) + (L.regulated ? " regulated" : " isotropic");
        if (L.update < 0)
          expect(name + ", no update: param and state untouched", torch::equal(got[3 * k], start[3 * k]) &&
                                                                      torch::equal(got[3 * k + 1], start[3 * k + 1]) &&
                                                                      torch::equal(got[3 * k + 2], start[3 * k + 2]));
        else
          expect_same_step(name + ", " + updates[L.update].name, layer_of(got), layer_of(cpu), layer_of(start), 1e-5);
      }
      expect(path + ": fused step leaves the outputs bit-identical", grad_unchanged);
      // A bad update in one layer fails the whole call before any launch: nothing steps.
      auto bad = clones(start);
      bad[3 * 3] = torch::zeros({5});
      expect(path + ": a bad layer-3 param rejected", raises([&] {
        deer::crn_cuda::clip_reduce_noise_grouped_launch(gs, cs, sigma, ebs, chols, sides, gseed, step, layer_ids,
                                                         client, bad, hyper, stream); }, "param of layer 3 must be ("));
      expect(path + ": rejected call stepped nothing",
             torch::equal(bad[0], start[0]) && torch::equal(bad[1], start[1]));
    }
  }

  // Bad input: the CPU backend's checks and messages.
  auto g = torch::randn({4, 6, 3});
  auto clip = torch::rand({4});
  expect("singular chol rejected", raises([&] {
    clip_reduce_noise_launch(g, clip, 1.0, 1.0, torch::zeros({3, 3}), 1, 0, 0, 0, 0, {}, {}, stream); },
    "positive definite"));
  expect("non-finite chol rejected", raises([&] {
    auto Rn = torch::eye(3); Rn[0][2] = NAN;
    clip_reduce_noise_launch(g, clip, 1.0, 1.0, Rn, 1, 0, 0, 0, 0, {}, {}, stream); }, "positive definite"));
  expect("wrong clip shape rejected", raises([&] {
    clip_reduce_noise_launch(g, torch::rand({3}), 1.0, 1.0, c10::nullopt, 1, 0, 0, 0, 0, {}, {}, stream); },
    "clip must be (b,)"));
  expect("step >= 2^32 rejected", raises([&] {
    clip_reduce_noise_launch(g, clip, 1.0, 1.0, c10::nullopt, 1, 0, int64_t(1) << 32, 0, 0, {}, {}, stream); },
    "[0, 2^32)"));
  return finish();
}
