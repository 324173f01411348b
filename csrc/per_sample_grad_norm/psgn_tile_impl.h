// Body of the register-tiled GEMM (see psgn_tile.h). Deliberately without include guard: psgn_tile_cpu.cpp
// includes it once per instruction set, inside a namespace and under `#pragma GCC target`, with
// DEER_VBYTES (bytes per SIMD register for that ISA) and DEER_NV (registers per accumulator row along
// the long dimension) defined. Accumulation width along the long dimension: VW = DEER_NV * lanes.

static constexpr int kNS = 8;  // accumulators along the short dimension (the LoRA rank side)

// GCC vector extensions: locals of these types live in SIMD registers (plain acc_t arrays of the
// same size were kept on the stack, one load and one store per FMA: 3x slower).
// Values use the naturally aligned vector types (locals may spill to the stack); memory is accessed
// through the element-aligned, may_alias twins: one unaligned vector load or store per access.
// (memcpy into the vectors was split into 16-byte moves and a stack round trip under the AVX2 pragma.)
typedef float vf __attribute__((vector_size(DEER_VBYTES)));
typedef double vd __attribute__((vector_size(DEER_VBYTES)));
typedef float vf_u __attribute__((vector_size(DEER_VBYTES), aligned(4), __may_alias__));
typedef double vd_u __attribute__((vector_size(DEER_VBYTES), aligned(8), __may_alias__));
template <typename acc_t> struct VecOf;
template <> struct VecOf<float> { typedef vf type; typedef vf_u unaligned; };
template <> struct VecOf<double> { typedef vd type; typedef vd_u unaligned; };
template <typename acc_t>
using vec_t = typename VecOf<acc_t>::type;
template <typename acc_t>
static constexpr int kLanes = DEER_VBYTES / sizeof(acc_t);
template <typename acc_t>
static constexpr int kVW = DEER_NV * kLanes<acc_t>;

template <typename vec, typename acc_t>
static inline vec vload(const acc_t* p) { return *reinterpret_cast<const typename VecOf<acc_t>::unaligned*>(p); }
template <typename vec, typename acc_t>
static inline void vstore(acc_t* p, const vec& v) { *reinterpret_cast<typename VecOf<acc_t>::unaligned*>(p) = v; }

// x in every lane (a broadcast load when x comes from memory).
template <typename acc_t, int... I>
static inline vec_t<acc_t> splat_impl(acc_t x, std::integer_sequence<int, I...>) {
  return vec_t<acc_t>{((void)I, x)...};
}
template <typename acc_t>
static inline vec_t<acc_t> splat(acc_t x) {
  return splat_impl<acc_t>(x, std::make_integer_sequence<int, kLanes<acc_t>>{});
}

// One tile over tokens [0, T) of one sample: buf[s][w] += wi * sum_t V[t, w] * S[t, s], long-dim
// entries w < vlen. The weight is applied once per call (NS * NV multiply-adds per chunk of tokens)
// instead of on every token's broadcast operand. FULL: vlen == VW, plain vector loads.
template <typename acc_t, int NS, bool FULL>
static inline void tile(const acc_t* __restrict V, int64_t ldv, const acc_t* __restrict S, int64_t lds,
                        acc_t wi, int64_t T, int vlen, acc_t* __restrict buf) {
  using vec = vec_t<acc_t>;
  constexpr int L = kLanes<acc_t>, NV = DEER_NV;
  vec acc[NS][NV];
#pragma GCC unroll 8
  for (int s = 0; s < NS; ++s)
#pragma GCC unroll 4
    for (int k = 0; k < NV; ++k) acc[s][k] = vec{};
  for (int64_t t = 0; t < T; ++t) {
    const acc_t* vr = V + t * ldv;
    const acc_t* sr = S + t * lds;
    vec vv[NV];
    if constexpr (FULL) {
#pragma GCC unroll 4
      for (int k = 0; k < NV; ++k) vv[k] = vload<vec>(vr + k * L);
    } else {
      acc_t tmp[NV * L];
      for (int w = 0; w < NV * L; ++w) tmp[w] = w < vlen ? vr[w] : acc_t(0);
#pragma GCC unroll 4
      for (int k = 0; k < NV; ++k) vv[k] = vload<vec>(tmp + k * L);
    }
#pragma GCC unroll 8
    for (int s = 0; s < NS; ++s) {
      const vec bs = splat<acc_t>(sr[s]);
#pragma GCC unroll 4
      for (int k = 0; k < NV; ++k) acc[s][k] += bs * vv[k];
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s < NS; ++s)
#pragma GCC unroll 4
    for (int k = 0; k < NV; ++k) {
      vstore<vec>(buf + (s * NV + k) * L, vload<vec>(buf + (s * NV + k) * L) + splat<acc_t>(wi) * acc[s][k]);
    }
}

template <typename acc_t, int NS>
static inline void tile_ns(const acc_t* V, int64_t ldv, const acc_t* S, int64_t lds, acc_t wi, int64_t T,
                           int vlen, acc_t* buf) {
  if (vlen == kVW<acc_t>)
    tile<acc_t, NS, true>(V, ldv, S, lds, wi, T, vlen, buf);
  else
    tile<acc_t, NS, false>(V, ldv, S, lds, wi, T, vlen, buf);
}

// Memory order: tokens in chunks of kTC (outer), tiles across [v_begin, v_end) (inner). Each chunk
// then reads kTC rows of the long operand left to right, kTC long sequential streams the hardware
// prefetcher follows; walking all T rows per tile instead gives T short strided reads per tile and
// runs at half the bandwidth. Accumulators live in a per-thread scratch (L1/L2) between chunks.
// 16 rows: at ViT row strides (768 or 2304 floats) 32 rows map onto too few L1 sets and ran 2x
// slower on a Zen 4 core; 8-16 measured alike.
static constexpr int64_t kTC = 16;

template <typename acc_t>
static void gemm_tn(const acc_t* L, const acc_t* R, int64_t nb, int64_t T, int64_t p, int64_t q,
                    const acc_t* weights, acc_t wconst, acc_t* out, int64_t v_begin, int64_t v_end) {
  constexpr int VW = kVW<acc_t>;
  // Long dimension along p (B phase: L = G, p = m) or along q (A phase: R = X, q = n).
  const bool v_is_p = p >= q;
  const acc_t* V = v_is_p ? L : R;
  const acc_t* S = v_is_p ? R : L;
  const int64_t ldv = v_is_p ? p : q, lds = v_is_p ? q : p;
  const int64_t sdim = lds;
  const int64_t o_v = v_is_p ? q : 1, o_s = v_is_p ? 1 : q;  // out[a*q + c]
  const int64_t nvt = (v_end - v_begin + VW - 1) / VW, nst = (sdim + kNS - 1) / kNS;
  const int64_t tsz = int64_t(kNS) * VW;
  thread_local std::vector<acc_t> scratch;
  scratch.assign(nvt * nst * tsz, acc_t(0));
  acc_t* buf = scratch.data();
  for (int64_t i = 0; i < nb; ++i) {
    const acc_t wi = weights ? weights[i] * wconst : wconst;
    const acc_t* Vi = V + i * T * ldv;
    const acc_t* Si = S + i * T * lds;
    for (int64_t t0 = 0; t0 < T; t0 += kTC) {
      const int64_t tc = T - t0 < kTC ? T - t0 : kTC;
      for (int64_t vt = 0; vt < nvt; ++vt) {
        const int64_t v0 = v_begin + vt * VW;
        const int vlen = static_cast<int>(v_end - v0 < VW ? v_end - v0 : VW);
        for (int64_t st = 0; st < nst; ++st) {
          const int64_t s0 = st * kNS;
          const int64_t ns = sdim - s0 < kNS ? sdim - s0 : kNS;
          const acc_t* Vt = Vi + t0 * ldv + v0;
          const acc_t* St = Si + t0 * lds + s0;
          acc_t* b = buf + (vt * nst + st) * tsz;
          switch (ns) {
#define DEER_TILE_CASE(n) \
  case n: tile_ns<acc_t, n>(Vt, ldv, St, lds, wi, tc, vlen, b); break;
            DEER_TILE_CASE(1) DEER_TILE_CASE(2) DEER_TILE_CASE(3) DEER_TILE_CASE(4)
            DEER_TILE_CASE(5) DEER_TILE_CASE(6) DEER_TILE_CASE(7) DEER_TILE_CASE(8)
#undef DEER_TILE_CASE
            default: break;
          }
        }
      }
    }
  }
  // Scatter the tiles into the row-major (p, q) output (transposing when the long dim is p).
  for (int64_t vt = 0; vt < nvt; ++vt) {
    const int64_t v0 = v_begin + vt * VW;
    const int64_t vlen = v_end - v0 < VW ? v_end - v0 : VW;
    for (int64_t st = 0; st < nst; ++st) {
      const int64_t s0 = st * kNS;
      const int64_t ns = sdim - s0 < kNS ? sdim - s0 : kNS;
      const acc_t* b = buf + (vt * nst + st) * tsz;
      if (v_is_p) {  // out (p, q) row-major with p the long dim: write each output row contiguously
        for (int64_t w = 0; w < vlen; ++w)
          for (int64_t s = 0; s < ns; ++s) out[(v0 + w) * o_v + s0 + s] = b[s * VW + w];
      } else {
        for (int64_t s = 0; s < ns; ++s)
          for (int64_t w = 0; w < vlen; ++w) out[v0 + w + (s0 + s) * o_s] = b[s * VW + w];
      }
    }
  }
}

static void gemm_tn_f32(const float* L, const float* R, int64_t nb, int64_t T, int64_t p, int64_t q,
                        const float* weights, float wconst, float* out, int64_t v_begin, int64_t v_end) {
  gemm_tn<float>(L, R, nb, T, p, q, weights, wconst, out, v_begin, v_end);
}
static void gemm_tn_f64(const double* L, const double* R, int64_t nb, int64_t T, int64_t p, int64_t q,
                        const double* weights, double wconst, double* out, int64_t v_begin, int64_t v_end) {
  gemm_tn<double>(L, R, nb, T, p, q, weights, wconst, out, v_begin, v_end);
}

// <K, g^T g> for g (p, Q) row-major with Q a compile-time rank: the rows of M = g^T g are Q-lane
// vectors held in registers, each row of g adds Q broadcast multiply-adds.
template <typename acc_t, int Q>
struct RowVec {
  typedef acc_t type __attribute__((vector_size(Q * sizeof(acc_t))));
  typedef acc_t unaligned __attribute__((vector_size(Q * sizeof(acc_t)), aligned(sizeof(acc_t)), __may_alias__));
};
template <typename row, typename acc_t, int... I>
static inline row splat_row(acc_t x, std::integer_sequence<int, I...>) {
  return row{((void)I, x)...};
}
template <typename acc_t, int Q>
static acc_t gram_norm_fixed(const acc_t* __restrict g, int64_t p, const acc_t* __restrict K) {
  using row = typename RowVec<acc_t, Q>::type;
  row M[Q];
#pragma GCC unroll 16
  for (int c = 0; c < Q; ++c) M[c] = row{};
  for (int64_t a = 0; a < p; ++a) {
    const row ga = *reinterpret_cast<const typename RowVec<acc_t, Q>::unaligned*>(g + a * Q);
#pragma GCC unroll 16
    for (int c = 0; c < Q; ++c) M[c] += splat_row<row>(g[a * Q + c], std::make_integer_sequence<int, Q>{}) * ga;
  }
  acc_t n = 0;
  for (int c = 0; c < Q; ++c)
    for (int d = 0; d < Q; ++d) n += K[c * Q + d] * M[c][d];
  return n;
}

// sum_e x[e] * y[e] with a few independent vector partial sums.
template <typename acc_t>
static inline acc_t dot(const acc_t* __restrict x, const acc_t* __restrict y, int64_t len) {
  using vec = vec_t<acc_t>;
  constexpr int L = kLanes<acc_t>;
  vec s0{}, s1{};
  int64_t e = 0;
  for (; e + 2 * L <= len; e += 2 * L) {
    s0 += vload<vec>(x + e) * vload<vec>(y + e);
    s1 += vload<vec>(x + e + L) * vload<vec>(y + e + L);
  }
  s0 += s1;
  acc_t out = 0;
  for (int l = 0; l < L; ++l) out += s0[l];
  for (; e < len; ++e) out += x[e] * y[e];
  return out;
}

// Squared norm of one sample's g (p, q) row-major in the op's metric (see psgn_tile.h); `work` is
// scratch of at least max(p, q) * max(p, q) elements (caller-owned, reused across samples).
template <typename acc_t>
static acc_t sq_norm(const acc_t* __restrict g, int64_t p, int64_t q, const acc_t* __restrict K, int64_t side,
                     acc_t* __restrict work) {
  if (K == nullptr) {  // ||g||_F^2 with a few independent partial sums (vectorised)
    constexpr int kAcc = 4 * kLanes<acc_t>;
    acc_t part[kAcc] = {};
    const int64_t P = p * q;
    int64_t e = 0;
    for (; e + kAcc <= P; e += kAcc)
      for (int j = 0; j < kAcc; ++j) part[j] += g[e + j] * g[e + j];
    acc_t n = 0;
    for (; e < P; ++e) n += g[e] * g[e];
    for (int j = 0; j < kAcc; ++j) n += part[j];
    return n;
  }
  if (side == 1) {
    // tr(g K g^T) = <K, g^T g>: the (q x q) Gram of g's columns, one rank-1 update per row, then one
    // inner product with K. q is the rank (B phase); common ranks get fixed-size register loops.
    switch (q) {
      case 1: return gram_norm_fixed<acc_t, 1>(g, p, K);
      case 2: return gram_norm_fixed<acc_t, 2>(g, p, K);
      case 4: return gram_norm_fixed<acc_t, 4>(g, p, K);
      case 8: return gram_norm_fixed<acc_t, 8>(g, p, K);
      case 16: return gram_norm_fixed<acc_t, 16>(g, p, K);
      default: break;
    }
    acc_t* M = work;
    if (q > 16) {  // larger ranks: M = g^T g by the register-tiled GEMM above (rows of g as tokens)
      gemm_tn<acc_t>(g, g, 1, p, q, q, nullptr, acc_t(1), M, 0, q);
      acc_t n = 0;
      for (int64_t e = 0; e < q * q; ++e) n += K[e] * M[e];
      return n;
    }
    for (int64_t e = 0; e < q * q; ++e) M[e] = 0;
    for (int64_t a = 0; a < p; ++a) {
      const acc_t* ga = g + a * q;
      for (int64_t c = 0; c < q; ++c) {
        const acc_t gc = ga[c];
        acc_t* Mc = M + c * q;
#pragma GCC ivdep
        for (int64_t d = 0; d < q; ++d) Mc[d] += gc * ga[d];
      }
    }
    acc_t n = 0;
    for (int64_t e = 0; e < q * q; ++e) n += K[e] * M[e];
    return n;
  }
  // side 0: tr(g^T K g) = sum_{a, a'} K[a, a'] <g_a, g_a'>, p = k rows of length q (the rank, A
  // phase): the p (p + 1) / 2 row inner products, each a contiguous vectorised dot.
  // Two-level summation: each row's terms go to their own partial sum, then the p partials to n.
  // One running sum over all p (p + 1) / 2 terms grew its rounding error with p^2 (fp32 at p = 576
  // with a dense K: 1.3e-5 relative, past the 1e-5 bound); two levels keep it near p eps.
  (void)work;
  acc_t n = 0;
  for (int64_t a = 0; a < p; ++a) {
    const acc_t* ga = g + a * q;
    acc_t row = K[a * p + a] * dot(ga, ga, q);
    for (int64_t a2 = a + 1; a2 < p; ++a2) row += (K[a * p + a2] + K[a2 * p + a]) * dot(ga, g + a2 * q, q);
    n += row;
  }
  return n;
}

static float sq_norm_f32(const float* g, int64_t p, int64_t q, const float* K, int64_t side, float* work) {
  return sq_norm<float>(g, p, q, K, side, work);
}
static double sq_norm_f64(const double* g, int64_t p, int64_t q, const double* K, int64_t side, double* work) {
  return sq_norm<double>(g, p, q, K, side, work);
}
