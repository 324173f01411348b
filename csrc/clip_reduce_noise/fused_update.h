// The optimizer step of one trained LoRA factor, fused into clip_reduce_noise's last write (host
// and device code; no torch headers). Where the op writes element e of its private gradient g, it
// also steps that element of the parameter and its optimizer state, so the gradient is never
// written to .grad and read back by a separate optimizer pass.
//
// The arithmetic is torch.optim's single-tensor step (maximize=False, amsgrad=False), in the
// parameter's dtype (= the op's output dtype: fp32, or fp64 for fp64 gradients):
//   SGD    d = g + wd p;  momentum != 0: buf = first ? d : momentum buf + (1 - dampening) d,
//          d = nesterov ? d + momentum buf : buf;                       p -= lr d
//   Adam   g += wd p (L2);  AdamW: p *= 1 - lr wd (decoupled)
//          m += (1 - beta1) (g - m);  v = beta2 v + (1 - beta2) g^2
//          p -= step_size m / (sqrt(v) / sqrt(1 - beta2^t) + eps),    step_size = lr / (1 - beta1^t)
// Scalars that depend on the step count t (step_size, sqrt(1 - beta2^t), first) come from the
// caller, which owns the optimizer's state dict.
//
// A non-finite g leaves that element's parameter and state untouched: a NaN never reaches the
// weights. The caller sees it in the returned gradient and refuses the step loudly.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "clip_reduce_noise/philox.h"  // DEER_HD

// Forced inlining on the host: the CPU backend compiles the block loop a second time for AVX2+FMA
// (clip_reduce_noise_cpu.cpp), and only code inlined into that clone gets its instructions.
#if defined(__CUDACC__)
#define DEER_UPDATE_HD DEER_HD
#else
#define DEER_UPDATE_HD inline __attribute__((always_inline))
#endif

namespace deer {

enum UpdateKind : int { kUpdateNone = 0, kUpdateSGD = 1, kUpdateAdam = 2, kUpdateAdamW = 3 };

// Layout of the op's float[] update_hyper: kUpdateHyperWidth doubles per layer, in this order.
enum UpdateHyper : int {
  kHKind, kHLr, kHWeightDecay, kHMomentum, kHDampening, kHNesterov, kHFirst, kHBeta1, kHBeta2, kHEps,
  kHStepSize, kHBias2Sqrt, kUpdateHyperWidth
};

// One layer's update: the parameter and state buffers (same shape, dtype and contiguous layout as
// the op's output; buf1 = momentum_buffer or exp_avg, buf2 = exp_avg_sq) and the step's scalars.
// Plain data, so a CUDA kernel takes it by value or from a per-layer device table.
struct UpdateArgs {
  int kind = kUpdateNone;
  bool nesterov = false, first = false;
  void* param = nullptr;
  void* buf1 = nullptr;
  void* buf2 = nullptr;
  double lr = 0, weight_decay = 0, momentum = 0, dampening = 0;
  double beta1 = 0, beta2 = 0, eps = 0, step_size = 0, bias2_sqrt = 1;
};

// Finite test written as a compare so that a CPU loop of steps stays vectorisable (NaN compares
// false; deer never builds with -ffinite-math-only).
template <typename T>
DEER_UPDATE_HD bool update_isfinite(T x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::fabs(x) <= std::numeric_limits<T>::max();
#endif
}

// a / b correctly rounded: nvcc's --use_fast_math makes a float '/' approximate (2 ulp), torch's is not.
template <typename T>
DEER_UPDATE_HD T div_rn(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) return __fdiv_rn(a, b);
#endif
  return a / b;
}

// a * b + c rounded once: torch.optim's add(..., alpha=) and lerp are fused multiply-adds, and where
// g + wd p nearly cancels (Adam's L2 decay) a second rounding would be a large relative error that
// Adam's m / sqrt(v) then amplifies. On the CPU, std::fma is one instruction inside the AVX2+FMA
// clone of the block loop (clip_reduce_noise_cpu.cpp) and glibc's correctly rounded call elsewhere.
template <typename T>
DEER_UPDATE_HD T fma_rn(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) return fmaf(a, b, c);
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// sqrt correctly rounded in T (IEEE sqrt on the CPU; the _rn intrinsic on a device, where fast-math
// would otherwise approximate a float sqrt).
template <typename T>
DEER_UPDATE_HD T sqrt_rn(T a) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) return __fsqrt_rn(a);
  return sqrt(a);
#else
  return std::sqrt(a);
#endif
}

// Element e's step with the optimizer's branches resolved at compile time. Branch-free in the
// element: a non-finite g computes on 0 and every store writes back the old value, so a loop of
// these is straight-line arithmetic and selects.
// kGuard = false: the caller knows g is finite (a CPU block it has scanned), so no selects remain
// and the loop's stores are unconditional (GCC will not vectorise a loop of conditional stores).
template <int kKind, bool kMomentum, bool kNesterov, bool kFirst, bool kGuard, typename T>
DEER_UPDATE_HD void step_element(const UpdateArgs& u, int64_t e, T g) {
  T* P = static_cast<T*>(u.param);
  const bool ok = !kGuard || update_isfinite(g);
  const T g0 = ok ? g : T(0);
  const T p_old = P[e];
  T p = p_old;
  // Weight decay as selects, not branches (loop-invariant, so a CPU loop stays straight-line): with
  // weight_decay = 0 torch adds nothing, and the select adds an exact 0 (never 0 * p).
  const bool decay = u.weight_decay != 0;
  const T wd = static_cast<T>(u.weight_decay);
  // Each multiply-add below is one of torch's fused ones (add with alpha, lerp): fma_rn.
  if constexpr (kKind == kUpdateSGD) {
    const T d0 = decay ? fma_rn(wd, p, g0) : g0;                           // grad.add(param, alpha=wd)
    T d = d0;
    if constexpr (kMomentum) {
      T* B = static_cast<T*>(u.buf1);
      const T b_old = B[e];
      const T mom = static_cast<T>(u.momentum);
      // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
      const T buf = kFirst ? d0 : fma_rn(static_cast<T>(1.0 - u.dampening), d0, mom * b_old);
      B[e] = ok ? buf : b_old;
      d = kNesterov ? fma_rn(mom, buf, d0) : buf;                          // grad.add(buf, alpha=momentum)
    }
    P[e] = ok ? fma_rn(static_cast<T>(-u.lr), d, p) : p_old;              // param.add_(grad, alpha=-lr)
  } else {  // Adam (L2 decay on g) / AdamW (decoupled decay on p)
    T gg = g0;
    if constexpr (kKind == kUpdateAdamW)
      p = decay ? p * static_cast<T>(1.0 - u.lr * u.weight_decay) : p;
    else
      gg = decay ? fma_rn(wd, p, g0) : g0;                                 // grad.add(param, alpha=wd)
    T* M = static_cast<T*>(u.buf1);
    T* V = static_cast<T*>(u.buf2);
    const T m_old = M[e], v_old = V[e];
    // exp_avg.lerp_(grad, w), w = 1 - beta1: torch's lerp is m + w (g - m) for w < 0.5, else
    // g - (1 - w) (g - m), each one fused multiply-add.
    const T w = static_cast<T>(1.0 - u.beta1);
    const T m = w < T(0.5) ? fma_rn(w, gg - m_old, m_old) : fma_rn(-(T(1) - w), gg - m_old, gg);
    const T v = static_cast<T>(u.beta2) * v_old + static_cast<T>(1.0 - u.beta2) * gg * gg;
    M[e] = ok ? m : m_old;
    V[e] = ok ? v : v_old;
    const T denom = div_rn(sqrt_rn(v), static_cast<T>(u.bias2_sqrt)) + static_cast<T>(u.eps);
    P[e] = ok ? p - static_cast<T>(u.step_size) * div_rn(m, denom) : p_old;
  }
}

// Calls body.template run<kind, momentum, nesterov, first>() for u's configuration (7 variants).
template <typename Body>
DEER_UPDATE_HD void dispatch_update(const UpdateArgs& u, const Body& body) {
  switch (u.kind) {
    case kUpdateSGD:
      if (u.momentum == 0) return body.template run<kUpdateSGD, false, false, false>();
      if (u.nesterov)
        return u.first ? body.template run<kUpdateSGD, true, true, true>()
                       : body.template run<kUpdateSGD, true, true, false>();
      return u.first ? body.template run<kUpdateSGD, true, false, true>()
                     : body.template run<kUpdateSGD, true, false, false>();
    case kUpdateAdam:
      return body.template run<kUpdateAdam, false, false, false>();
    case kUpdateAdamW:
      return body.template run<kUpdateAdamW, false, false, false>();
    default:
      return;
  }
}

template <typename T>
struct UpdateOne {
  const UpdateArgs& u;
  int64_t e;
  T g;
  template <int K, bool M, bool N, bool F>
  DEER_UPDATE_HD void run() const { step_element<K, M, N, F, true>(u, e, g); }
};

template <typename T>
struct UpdateRange {
  const UpdateArgs& u;
  const T* g;
  int64_t e0, e1;
  template <int K, bool M, bool N, bool F>
  DEER_UPDATE_HD void run() const {
    // A local copy: the loop's stores cannot alias it, so its scalars stay in registers. A block
    // with a non-finite gradient (rare: the engine refuses such a step) takes the guarded loop.
    const UpdateArgs lu = u;
    int bad = 0;  // an int OR-reduction: GCC vectorises it (not a bool &=)
    for (int64_t e = e0; e < e1; ++e) bad |= update_isfinite(g[e]) ? 0 : 1;
    if (bad == 0)
      for (int64_t e = e0; e < e1; ++e) step_element<K, M, N, F, false>(lu, e, g[e]);
    else
      for (int64_t e = e0; e < e1; ++e) step_element<K, M, N, F, true>(lu, e, g[e]);
  }
};

// Steps element e with gradient g (T = the parameter's dtype): one GPU thread's epilogue.
template <typename T>
DEER_HD void apply_update(const UpdateArgs& u, int64_t e, T g) {
  if (u.kind != kUpdateNone) dispatch_update(u, UpdateOne<T>{u, e, g});
}

// Steps elements [e0, e1) with gradients g[e0, e1): a CPU block's epilogue, run while the block of
// private gradient it just wrote is still in L1; one dispatch, then a vectorisable loop.
template <typename T>
DEER_UPDATE_HD void apply_update_range(const UpdateArgs& u, const T* g, int64_t e0, int64_t e1) {
  if (u.kind != kUpdateNone) dispatch_update(u, UpdateRange<T>{u, g, e0, e1});
}

}  // namespace deer
