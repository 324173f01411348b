// Instantiates the register-tiled GEMM of psgn_tile_impl.h for AVX-512, AVX2+FMA and the baseline ISA
// and picks one at run time from the CPU's feature bits. This file includes no torch headers, so the
// ISA-specific code cannot leak into inline functions shared with the rest of the extension.
#include "per_sample_grad_norm/psgn_tile.h"

#include <vector>

namespace deer::tile {

namespace generic {
#define DEER_VW_F32 8
#define DEER_VW_F64 4
#include "per_sample_grad_norm/psgn_tile_impl.h"
#undef DEER_VW_F32
#undef DEER_VW_F64
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DEER_TILE_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
// 16 ymm registers: 8 accumulators of 8 floats (one register each) plus operands.
#define DEER_VW_F32 8
#define DEER_VW_F64 4
#include "per_sample_grad_norm/psgn_tile_impl.h"
#undef DEER_VW_F32
#undef DEER_VW_F64
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
// 32 zmm registers: 8 x 2 accumulators of 16 floats (two registers per row of the short dimension).
#define DEER_VW_F32 32
#define DEER_VW_F64 16
#include "per_sample_grad_norm/psgn_tile_impl.h"
#undef DEER_VW_F32
#undef DEER_VW_F64
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {
enum class Isa { generic, avx2, avx512 };
Isa detect() {
#ifdef DEER_TILE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::generic;
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

int64_t vector_block_f32() { return kIsa == Isa::avx512 ? 32 : 8; }
int64_t vector_block_f64() { return kIsa == Isa::avx512 ? 16 : 4; }
const char* isa() { return kIsa == Isa::avx512 ? "avx512" : kIsa == Isa::avx2 ? "avx2" : "generic"; }

}  // namespace deer::tile
