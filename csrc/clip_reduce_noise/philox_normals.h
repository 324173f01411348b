// Batched N(0, 1) draws of the keyed Philox stream for the CPU backend (no torch headers; one
// implementation per instruction set in philox_normals_cpu.cpp, picked like the tile GEMM's:
// deer::tile::isa(), capped by DEER_CPU_ISA).
//
// The element values are those of philox::normal_at (philox.h): the same Philox words, the same
// exact uniforms, Box-Muller in double. The AVX-512 / AVX2 versions evaluate log, sin and cos with
// glibc's vector math library (libmvec, a few ulp in double) where philox.h uses scalar libm, so a
// double may differ in its last bits from the scalar value; after rounding to the fp32 output the
// two agree except in rare cases, as with the CUDA kernel's device math. Within one instruction set
// an element's value never depends on how a range is split (threads, column blocks): every pair is
// computed by the same vector routine, boundary pairs included.
#pragma once
#include <cstdint>

#include "clip_reduce_noise/philox.h"

namespace deer::philox {

// dst[i] = Z[e0 + i] for the row-major elements [e0, e1) of the stream keyed by k.
void fill_normals(const Key& k, int64_t e0, int64_t e1, double* dst);

}  // namespace deer::philox
