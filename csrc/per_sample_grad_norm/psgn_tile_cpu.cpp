// Instantiates the register-tiled GEMM of psgn_tile_impl.h for AVX-512, AVX2+FMA and the baseline ISA
// and picks one at run time from the CPU's feature bits. This file includes no torch headers, so the
// ISA-specific code cannot leak into inline functions shared with the rest of the extension.
#include "per_sample_grad_norm/psgn_tile.h"

#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

namespace deer::tile {

// The fixed-rank Gram loops use rank-wide vector types even where the ISA's registers are narrower
// (GCC splits them); they never cross a function boundary that matters for the ABI.
// (Template instantiation happens at the end of this file, so the pragma stays on for all of it.)
#pragma GCC diagnostic ignored "-Wpsabi"

namespace generic {
#define DEER_VBYTES 16
#define DEER_NV 2
#include "per_sample_grad_norm/psgn_tile_impl.h"
#undef DEER_VBYTES
#undef DEER_NV
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DEER_TILE_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
// 16 ymm registers: 8 accumulators of 8 floats (one register each) plus operands.
#define DEER_VBYTES 32
#define DEER_NV 1
#include "per_sample_grad_norm/psgn_tile_impl.h"
#undef DEER_VBYTES
#undef DEER_NV
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
// 32 zmm registers: 8 x 2 accumulators of 16 floats (two registers per row of the short dimension).
#define DEER_VBYTES 64
#define DEER_NV 2
#include "per_sample_grad_norm/psgn_tile_impl.h"
#undef DEER_VBYTES
#undef DEER_NV
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {
enum class Isa { generic, avx2, avx512 };
Isa detect_hardware() {
#ifdef DEER_TILE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::generic;
}
// DEER_CPU_ISA=avx2|generic caps the choice (tests run every instantiation on one machine); it never
// selects an instruction set the CPU lacks.
Isa detect() {
  Isa hw = detect_hardware();
  const char* want = std::getenv("DEER_CPU_ISA");
  if (want == nullptr) return hw;
  Isa cap = std::strcmp(want, "generic") == 0 ? Isa::generic : std::strcmp(want, "avx2") == 0 ? Isa::avx2 : Isa::avx512;
  return static_cast<int>(cap) < static_cast<int>(hw) ? cap : hw;
}
const Isa kIsa = detect();
}  // namespace

void gemm_tn_f32(const float* L, const float* R, int64_t nb, int64_t T, int64_t p, int64_t q,
                 const float* weights, float wconst, float* out, int64_t v_begin, int64_t v_end) {
#ifdef DEER_TILE_X86
  if (kIsa == Isa::avx512) return avx512::gemm_tn_f32(L, R, nb, T, p, q, weights, wconst, out, v_begin, v_end);
  if (kIsa == Isa::avx2) return avx2::gemm_tn_f32(L, R, nb, T, p, q, weights, wconst, out, v_begin, v_end);
#endif
  generic::gemm_tn_f32(L, R, nb, T, p, q, weights, wconst, out, v_begin, v_end);
}

void gemm_tn_f64(const double* L, const double* R, int64_t nb, int64_t T, int64_t p, int64_t q,
                 const double* weights, double wconst, double* out, int64_t v_begin, int64_t v_end) {
#ifdef DEER_TILE_X86
  if (kIsa == Isa::avx512) return avx512::gemm_tn_f64(L, R, nb, T, p, q, weights, wconst, out, v_begin, v_end);
  if (kIsa == Isa::avx2) return avx2::gemm_tn_f64(L, R, nb, T, p, q, weights, wconst, out, v_begin, v_end);
#endif
  generic::gemm_tn_f64(L, R, nb, T, p, q, weights, wconst, out, v_begin, v_end);
}

float sq_norm_f32(const float* g, int64_t p, int64_t q, const float* K, int64_t side, float* work) {
#ifdef DEER_TILE_X86
  if (kIsa == Isa::avx512) return avx512::sq_norm_f32(g, p, q, K, side, work);
  if (kIsa == Isa::avx2) return avx2::sq_norm_f32(g, p, q, K, side, work);
#endif
  return generic::sq_norm_f32(g, p, q, K, side, work);
}

double sq_norm_f64(const double* g, int64_t p, int64_t q, const double* K, int64_t side, double* work) {
#ifdef DEER_TILE_X86
  if (kIsa == Isa::avx512) return avx512::sq_norm_f64(g, p, q, K, side, work);
  if (kIsa == Isa::avx2) return avx2::sq_norm_f64(g, p, q, K, side, work);
#endif
  return generic::sq_norm_f64(g, p, q, K, side, work);
}

int64_t vector_block_f32() { return kIsa == Isa::avx512 ? 32 : 8; }
int64_t vector_block_f64() { return kIsa == Isa::avx512 ? 16 : 4; }
const char* isa() { return kIsa == Isa::avx512 ? "avx512" : kIsa == Isa::avx2 ? "avx2" : "generic"; }

}  // namespace deer::tile
