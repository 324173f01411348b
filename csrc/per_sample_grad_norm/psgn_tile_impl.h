// Body of the register-tiled GEMM (see psgn_tile.h). Deliberately without include guard: psgn_tile_cpu.cpp
// includes it once per instruction set, inside a namespace and under `#pragma GCC target`, with
// DEER_VW_F32 / DEER_VW_F64 (accumulator width along the long dimension) defined for that ISA.

static constexpr int kNS = 8;  // accumulators along the short dimension (the LoRA rank side)

// One tile over tokens [0, T) of one sample: acc[s][w] (held in registers, loaded from and stored to
// the contiguous scratch `buf`) += w_i * sum_t V[t, w] * S[t, s]; long-dim entries w < vlen.
// FULL: vlen == VW, so loads need no bounds and the compiler emits plain vector loads.
template <typename acc_t, int VW, int NS, bool FULL>
static inline void tile(const acc_t* __restrict V, int64_t ldv, const acc_t* __restrict S, int64_t lds,
                        acc_t wi, int64_t T, int vlen, acc_t* __restrict buf) {
  acc_t acc[NS][VW];
  for (int s = 0; s < NS; ++s)
    for (int w = 0; w < VW; ++w) acc[s][w] = buf[s * VW + w];
  for (int64_t t = 0; t < T; ++t) {
    const acc_t* vr = V + t * ldv;
    const acc_t* sr = S + t * lds;
    acc_t vv[VW];
    if constexpr (FULL) {
      for (int w = 0; w < VW; ++w) vv[w] = vr[w];
    } else {
      for (int w = 0; w < VW; ++w) vv[w] = w < vlen ? vr[w] : acc_t(0);
    }
    // The per-sample weight rides on the broadcast operand: NS multiplies per token, not NS*VW.
    for (int s = 0; s < NS; ++s) {
      const acc_t bs = sr[s] * wi;
      for (int w = 0; w < VW; ++w) acc[s][w] += bs * vv[w];
    }
  }
  for (int s = 0; s < NS; ++s)
    for (int w = 0; w < VW; ++w) buf[s * VW + w] = acc[s][w];
}

template <typename acc_t, int VW, int NS>
static inline void tile_ns(const acc_t* V, int64_t ldv, const acc_t* S, int64_t lds, acc_t wi, int64_t T,
                           int vlen, acc_t* buf) {
  if (vlen == VW)
    tile<acc_t, VW, NS, true>(V, ldv, S, lds, wi, T, vlen, buf);
  else
    tile<acc_t, VW, NS, false>(V, ldv, S, lds, wi, T, vlen, buf);
}

// Memory order: tokens in chunks of kTC (outer), tiles across [v_begin, v_end) (inner). Each chunk
// then reads kTC rows of the long operand left to right, kTC long sequential streams the hardware
// prefetcher follows; walking all T rows per tile instead gives T short strided reads per tile and
// runs at half the bandwidth. Accumulators live in a per-thread scratch (L1/L2) between chunks.
static constexpr int64_t kTC = 16;

template <typename acc_t, int VW>
static void gemm_tn(const acc_t* L, const acc_t* R, int64_t nb, int64_t T, int64_t p, int64_t q,
                    const acc_t* weights, acc_t wconst, acc_t* out, int64_t v_begin, int64_t v_end) {
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
  case n: tile_ns<acc_t, VW, n>(Vt, ldv, St, lds, wi, tc, vlen, b); break;
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
      for (int64_t s = 0; s < ns; ++s)
        for (int64_t w = 0; w < vlen; ++w) out[(v0 + w) * o_v + (s0 + s) * o_s] = b[s * VW + w];
    }
  }
}

static void gemm_tn_f32(const float* L, const float* R, int64_t nb, int64_t T, int64_t p, int64_t q,
                        const float* weights, float wconst, float* out, int64_t v_begin, int64_t v_end) {
  gemm_tn<float, DEER_VW_F32>(L, R, nb, T, p, q, weights, wconst, out, v_begin, v_end);
}
static void gemm_tn_f64(const double* L, const double* R, int64_t nb, int64_t T, int64_t p, int64_t q,
                        const double* weights, double wconst, double* out, int64_t v_begin, int64_t v_end) {
  gemm_tn<double, DEER_VW_F64>(L, R, nb, T, p, q, weights, wconst, out, v_begin, v_end);
}
