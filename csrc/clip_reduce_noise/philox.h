// Counter-based Gaussian noise shared by the CPU and CUDA kernels of clip_reduce_noise (host and
// device code; no torch headers). Written from the Philox4x32-10 definition (Salmon et al., SC'11,
// "Parallel random numbers: as easy as 1, 2, 3"); cross-checked against ATen's engine in ctest.
//
// Counter layout (the guarantee that no two noise elements ever share random bits):
//   key      = (seed lo 32, seed hi 32)                       64-bit run seed
//   counter  = (j, layer, step, client)                       four 32-bit words
//   where j = e / 2 is the pair index of element e of the row-major (p, q) noise matrix Z.
// One Philox call gives four 32-bit words = two 64-bit uniforms -> two normals (Box-Muller):
// element 2j takes r cos(theta), element 2j + 1 takes r sin(theta).
// Distinct (seed, step, layer, client, element) tuples therefore use distinct (key, counter) pairs
// as long as step, layer, client < 2^32 and p * q <= 2^33; the callers check those ranges.
// Philox is a bijection of the counter for each key, so distinct counters give independent-looking
// streams; the same tuple always reproduces the same noise (on CPU and on CUDA: the transform is
// done in double precision with the same formula on both, so results agree to the last float bit
// except in rare cases where libm and CUDA's double sin/log differ by an ulp before rounding).
// The CPU backend draws in batches through philox_normals.h: the same words and uniforms, with
// vector log/sin/cos (libmvec) on AVX2/AVX-512, so the same remark applies there.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DEER_HD __host__ __device__ __forceinline__
#else
#define DEER_HD inline
#endif

namespace deer::philox {

struct U4 { uint32_t x, y, z, w; };

// Philox4x32 round multipliers and Weyl key increments; the uniforms' scale and Box-Muller's angle.
// One definition for the scalar code here and the vector code of philox_normals_cpu.cpp.
constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
constexpr double kInv53 = 1.0 / 9007199254740992.0;  // 2^-53
constexpr double kTwoPi = 6.283185307179586476925286766559;

DEER_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
}

// Philox4x32 with 10 rounds: round function, then a Weyl-sequence key bump between rounds.
DEER_HD U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kM0, c.x, &hi0);
    const uint32_t lo1 = mulhilo(kM1, c.z, &hi1);
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

struct Key {
  uint32_t k0, k1;          // seed
  uint32_t layer, step, client;
};

DEER_HD Key make_key(uint64_t seed, uint32_t step, uint32_t layer, uint32_t client) {
  return Key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), layer, step, client};
}

// Two independent N(0, 1) draws for pair index j. Uniforms from 53 of 64 bits each:
// u1 in (0, 1] (log never sees 0; largest |z| = sqrt(2 * 53 ln 2) ~ 8.6), u2 in [0, 1).
DEER_HD void normal_pair(const Key& k, uint32_t j, double* z0, double* z1) {
  const U4 r = philox4x32_10(U4{j, k.layer, k.step, k.client}, k.k0, k.k1);
  const uint64_t a = (static_cast<uint64_t>(r.y) << 32) | r.x;
  const uint64_t b = (static_cast<uint64_t>(r.w) << 32) | r.z;
  const double u1 = (static_cast<double>(a >> 11) + 1.0) * kInv53;
  const double u2 = static_cast<double>(b >> 11) * kInv53;
  const double rad = sqrt(-2.0 * log(u1));
  const double theta = kTwoPi * u2;
  *z0 = rad * cos(theta);
  *z1 = rad * sin(theta);
}

// Element e of the noise matrix Z (row-major index).
DEER_HD double normal_at(const Key& k, uint64_t e) {
  double z0, z1;
  normal_pair(k, static_cast<uint32_t>(e >> 1), &z0, &z1);
  return (e & 1) ? z1 : z0;
}

}  // namespace deer::philox
