// Shared helpers of the ctest programs: a failure counter, checks that print one line each, the
// expected-exception check, and the per-instruction-set child runs. Header-only, test-only.
#pragma once
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>

namespace deer::check {

inline int failures = 0;

inline void expect(const std::string& what, bool ok, double value = 0) {
  std::printf("%-66s %.3e  %s\n", what.c_str(), value, ok ? "ok" : "FAIL");
  if (!ok) ++failures;
}

// max |got - want| / max |want| <= rtol, and the shapes agree.
inline void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, double rtol) {
  const auto w = want.to(at::kDouble);
  const double err = (got.to(at::kDouble) - w).abs().max().item<double>();
  const double scale = w.abs().max().item<double>() + 1e-30;
  expect(what + " (rel err)", err <= rtol * scale && got.sizes() == want.sizes(), err / scale);
}

// A random symmetric positive definite k x k matrix in float64 (a metric K = M M^T + I).
inline at::Tensor random_spd(int64_t k) {
  auto M = torch::randn({k, k}, torch::kDouble);
  return M.matmul(M.t()) + torch::eye(k, torch::kDouble);
}

// fn() throws a c10::Error whose message contains `needle`.
template <typename Fn>
bool raises(Fn fn, const char* needle) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

// Re-runs this program once per value of the environment variable `var` (unless it is already set,
// i.e. in the children themselves), each child's exit status one check.
inline void run_env_children(int argc, char** argv, const char* var, std::initializer_list<const char*> values) {
  if (std::getenv(var) != nullptr || argc < 1) return;
  for (const char* v : values) {
    const std::string cmd = std::string(var) + "=" + v + " '" + argv[0] + "'";
    std::printf("--- child run: %s\n", cmd.c_str());
    std::fflush(stdout);
    expect(std::string("child run with ") + var + "=" + v, std::system(cmd.c_str()) == 0);
  }
}

// Once per narrower instruction set (DEER_CPU_ISA caps the runtime choice and never selects one the
// CPU lacks), so every instantiation is tested on one machine.
inline void run_isa_children(int argc, char** argv) { run_env_children(argc, argv, "DEER_CPU_ISA", {"avx2", "generic"}); }

inline int finish() {
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace deer::check
