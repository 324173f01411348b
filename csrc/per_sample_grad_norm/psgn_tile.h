// Register-tiled "transposed-left" GEMM used by the CPU kernels of per_sample_grad_norm and
// clip_reduce_noise_fused (plain C++, no torch headers: psgn_tile_cpu.cpp compiles it once per ISA).
//
//   out[a, c] = sum_{i < nb} w_i * sum_{t < T} L[i, t, a] * R[i, t, c]        out: (p, q) row-major
//   L: (nb, T, p), R: (nb, T, q) contiguous; w_i = wconst * (weights ? weights[i] : 1).
//
// LoRA shapes are lopsided (one of p, q is the rank r = 1..64, the other 768..4096), which general
// GEMM libraries handle poorly (MKL: ~5 GFLOP/s for T = 197, p = 2304, q = 8 here). The tile keeps
// NS x VW accumulators in registers: VW runs along the long dimension ("vector" side: contiguous
// loads), NS along the short one ("broadcast" side). Each token costs VW/lanes loads, NS broadcasts
// and NS*VW/lanes FMAs, so the kernel streams L and R once at close to memory bandwidth.
// Accumulation is in acc_t (fp32 for fp32 inputs, fp64 for fp64): callers convert fp16/bf16 first.
#pragma once
#include <cstdint>

namespace deer::tile {

// Computes out[..] for the long-dimension range [v_begin, v_end) (all of the short dimension).
// Splitting [0, max(p, q)) into ranges gives independent work items for threads.
void gemm_tn_f32(const float* L, const float* R, int64_t nb, int64_t T, int64_t p, int64_t q,
                 const float* weights, float wconst, float* out, int64_t v_begin, int64_t v_end);
void gemm_tn_f64(const double* L, const double* R, int64_t nb, int64_t T, int64_t p, int64_t q,
                 const double* weights, double wconst, double* out, int64_t v_begin, int64_t v_end);

// Squared norm of one g (p, q) row-major: ||g||_F^2 (K null), tr(g K g^T) (side 1, K: q x q) or
// tr(g^T K g) (side 0, K: p x p). `work`: scratch of sq_norm_work(q, side) elements.
float sq_norm_f32(const float* g, int64_t p, int64_t q, const float* K, int64_t side, float* work);
double sq_norm_f64(const double* g, int64_t p, int64_t q, const double* K, int64_t side, double* work);
inline int64_t sq_norm_work(int64_t q, int64_t side) { return side == 1 ? q * q : q; }

// Length of the long ("vector") dimension and the preferred granularity of [v_begin, v_end) ranges.
inline int64_t vector_dim(int64_t p, int64_t q) { return p >= q ? p : q; }
int64_t vector_block_f32();
int64_t vector_block_f64();
// Which instruction set the runtime dispatch picked: "avx512", "avx2" or "generic".
const char* isa();

}  // namespace deer::tile
