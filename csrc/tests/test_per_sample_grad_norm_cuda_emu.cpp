// ctest: the CUDA kernels of per_sample_grad_norm, compiled from per_sample_grad_norm_cuda.cuh (the
// text nvcc compiles) and executed by the CPU emulator (cuda_emu.h), against float64 libtorch
// formulas on fresh random inputs with odd sizes, every kernel (thin for rank <= 8 with 16-byte and
// element loads, every padded rank 1/2/4/8; the tile kernel's three configurations, the thin shapes
// in a child run with DEER_CUDA_PSGN_KERNEL=tile), every metric and every input dtype. fp16/bf16
// inputs are compared with the float64 result on the same rounded inputs: the kernel widens them
// exactly and accumulates in fp32, so the fp32 bound applies. Also checks the emulator itself catches a missing __syncthreads.
// Exits non-zero on any failure; prints the seed of the inputs and of the thread schedule.
#include <torch/torch.h>

#include <cstdio>
#include <random>
#include <string>

#include "per_sample_grad_norm/per_sample_grad_norm_cuda.cuh"
#include "tests/check.h"

using namespace deer::check;

// Shared-memory exchange between neighbouring threads, with and without the barrier it needs.
__global__ void neighbour_kernel(const float* in, float* out, bool sync) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = in[t];
  if (sync) __syncthreads();
  out[t] = s[(t + 1) % 64];
}

int main(int argc, char** argv) {
  // Rank <= 8 shapes run the thin kernel by default; a child run sends them to the tile kernel.
  run_env_children(argc, argv, "DEER_CUDA_PSGN_KERNEL", {"tile"});
  std::printf("--- rank <= 8 kernel: %s\n", deer::psgn_cuda::thin_kernel_enabled() ? "thin" : "tile");
  std::random_device rd;
  const uint64_t seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  torch::manual_seed(seed);
  deer::emu::seed_schedule(seed);
  const int stream = 0;  // the emulator ignores streams

  // 0. The emulator is able to fail: without __syncthreads some threads read a neighbour's slot
  //    before it is written (the schedule interleaves threads in a shuffled order every phase).
  {
    auto in = torch::randn({64}), out = torch::zeros({64});
    int wrong_runs = 0;
    for (int rep = 0; rep < 20; ++rep) {
      in = torch::randn({64});
      deer::emu::launch(1, 64, &neighbour_kernel, in.data_ptr<float>(), out.data_ptr<float>(), false);
      wrong_runs += !torch::equal(out, in.roll(-1));
    }
    deer::emu::launch(1, 64, &neighbour_kernel, in.data_ptr<float>(), out.data_ptr<float>(), true);
    expect("emulator exposes a missing __syncthreads (runs of 20 wrong)",
           wrong_runs > 0 && torch::equal(out, in.roll(-1)), wrong_runs);
  }

  // B phase (q = r <= 8: thin 128 x 8 tiles), A phase (p = r <= 8: 8 x 128), square 64 x 64 (r > 8),
  // T = 0, 1, 97, ViT-B widths 768 / 2304, dims that are not multiples of any tile width.
  struct Case { int64_t b, T, p, q; } cases[] = {
      {1, 1, 3, 1},     {33, 97, 17, 4},  {2, 97, 2304, 8}, {2, 97, 8, 768},  {3, 2, 8, 129},
      {2, 9, 23, 16},   {4, 1, 40, 2},    {3, 17, 576, 8},  {2, 33, 3, 100},  {1, 5, 64, 64},
      {2, 13, 64, 129}, {1, 3, 129, 97},  {3, 97, 1, 37},   {2, 0, 5, 3},     {1, 40, 200, 130}};
  for (auto c : cases) {
    for (auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
      auto L = torch::randn({c.b, c.T, c.p}).to(dtype);
      auto R = torch::randn({c.b, c.T, c.q}).to(dtype);
      const double s = 0.7;
      auto g_ref = s * torch::einsum("btp,btq->bpq", {L.to(at::kDouble), R.to(at::kDouble)});
      const auto Kq = random_spd(c.q), Kp = random_spd(c.p);
      const double tol = dtype == at::kDouble ? 1e-12 : 1e-5;
      // K in the input dtype for fp32/fp64; fp16/bf16 callers pass an fp32 K (the op widens K to fp32).
      const auto kdtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
      const std::string name = "b=" + std::to_string(c.b) + " T=" + std::to_string(c.T) + " p=" +
                               std::to_string(c.p) + " q=" + std::to_string(c.q) + " " + c10::toString(dtype);
      auto [g, n] = deer::psgn_cuda::per_sample_grad_norm_launch(L, R, s, c10::nullopt, 1, stream);
      expect_close("grad " + name, g, g_ref, tol);
      expect_close("  euclidean norm", n, g_ref.pow(2).sum({1, 2}), tol);
      auto Kq_in = Kq.to(kdtype), Kp_in = Kp.to(kdtype);
      auto Kq_d = Kq_in.to(at::kDouble), Kp_d = Kp_in.to(at::kDouble);
      auto [g1, n1] = deer::psgn_cuda::per_sample_grad_norm_launch(L, R, s, Kq_in, 1, stream);
      expect_close("  metric norm, K on columns", n1, torch::einsum("bpq,qs,bps->b", {g_ref, Kq_d, g_ref}), tol);
      auto [g0, n0] = deer::psgn_cuda::per_sample_grad_norm_launch(L, R, s, Kp_in, 0, stream);
      expect_close("  metric norm, K on rows", n0, torch::einsum("bpq,ps,bsq->b", {g_ref, Kp_d, g_ref}), tol);
      expect_close("  grad unchanged by the metric", g0, g_ref, tol);
    }
  }
  // Bad input raises through the shared checks before any launch.
  expect("mismatched token dims rejected", raises([&] {
    deer::psgn_cuda::per_sample_grad_norm_launch(torch::randn({2, 3, 4}), torch::randn({2, 4, 5}), 1.0, c10::nullopt,
                                                 1, stream); }, "share batch and token"));
  return finish();
}
