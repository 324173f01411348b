// Test-only: one fused optimizer step as clip_reduce_noise takes it (fused_update.h), shared by the
// CPU ctest (against torch.optim's float64 formulas) and the CUDA-emulator ctest (against the CPU).
#pragma once
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "clip_reduce_noise/fused_update.h"

namespace deer::check {

// The kind, torch.optim's hyper-parameters and the step count t after this step (torch.optim's
// state["step"]); hyper() flattens them into the op's kUpdateHyperWidth update_hyper scalars.
struct Optim {
  const char* name;
  int kind;
  double lr, wd = 0, momentum = 0, dampening = 0;
  bool nesterov = false, first = false;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  int64_t t = 1;

  bool has_buf1() const { return kind != kUpdateSGD || momentum != 0; }  // momentum_buffer / exp_avg
  bool has_buf2() const { return kind != kUpdateSGD; }                   // exp_avg_sq
  std::vector<double> hyper() const {
    std::vector<double> h(kUpdateHyperWidth);
    h[kHKind] = kind;
    h[kHLr] = lr;
    h[kHWeightDecay] = wd;
    h[kHMomentum] = momentum;
    h[kHDampening] = dampening;
    h[kHNesterov] = nesterov;
    h[kHFirst] = first;
    h[kHBeta1] = beta1;
    h[kHBeta2] = beta2;
    h[kHEps] = eps;
    h[kHStepSize] = lr / (1 - std::pow(beta1, t));
    h[kHBias2Sqrt] = std::sqrt(1 - std::pow(beta2, t));
    return h;
  }
  // A random start (param, buf1, buf2; not zeros: every term of the formulas matters), with
  // exp_avg_sq > 0 and a 0-element tensor for a buffer the kind does not use. Parameters of
  // LoRA-factor size (|p| ~ 0.1): an fp32 step is resolved only to p's rounding (ulp(p) / step), so
  // small p keeps that far below the 1e-5 tolerance with steps of ~lr.
  std::vector<at::Tensor> start(int64_t p, int64_t q, at::ScalarType dtype) const {
    const auto opt = torch::dtype(dtype);
    return {0.1 * torch::randn({p, q}, opt), has_buf1() ? torch::randn({p, q}, opt) : torch::empty({0}, opt),
            has_buf2() ? 0.01 + torch::rand({p, q}, opt) : torch::empty({0}, opt)};
  }
};

}  // namespace deer::check
