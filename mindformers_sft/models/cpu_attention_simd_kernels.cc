// Fused attention, fixed head_dim (8, 16, 32, 64, 128): chunks of W keys, accumulators in SIMD registers.
// Compiled after cpu_attention_kernels.cc (uses its Dims, Visibility, AttnArgs, load helpers), which calls
// fwd_fixed / bwd_fixed.
// Compiled as one translation unit after cpu_kernels.cc (models/kernels.py joins the sources in the order of
// CPU_SOURCE_FILES), so it uses that file's includes and helpers: parallel_for, n_threads, fexp, is_f32, is_i32.
namespace {

// keys per chunk: one native SIMD register of floats (vector types wider than the hardware's would be emulated,
// slowly)
#if defined(__AVX512F__)
constexpr int64_t W = 16;
#elif defined(__AVX__)
constexpr int64_t W = 8;
#else
constexpr int64_t W = 4;
#endif

inline int64_t round_up(int64_t n) { return (n + W - 1) / W * W; }

// Per (batch, kv head): K (after the rotary embedding) and V transposed to (D, Tp), Tp = T rounded up to W, zero
// padded; key positions/segments padded likewise (padding is never visible: j < jend <= T). Chunks of a query run
// from its jbeg rounded down to W (the keys before jbeg in that chunk are in other segments: masked) to jend.
struct KVBlock {
  int64_t Tp;
  std::vector<float> KT, VT;
  std::vector<int32_t> kp, kg;
  KVBlock(const AttnArgs &a, const Dims &m, int64_t b, int64_t g)
      : Tp(round_up(m.T)), KT(m.D * Tp, 0.0f), VT(m.D * Tp, 0.0f), kp(Tp, std::numeric_limits<int32_t>::max()),
        kg(Tp, 0) {
    const int64_t T = m.T, D = m.D;
    std::vector<float> r(D);
    for (int64_t j = 0; j < T; ++j) {
      const int64_t o = m.off(b, g, j, m.NK, T);
      rope(a.k + o, a.kc + (b * T + j) * D, a.ksn + (b * T + j) * D, r.data(), D);
      for (int64_t d = 0; d < D; ++d) KT[d * Tp + j] = r[d];
      for (int64_t d = 0; d < D; ++d) VT[d * Tp + j] = a.v[o + d];
      kp[j] = a.kpos[j];
      kg[j] = a.kseg[b * T + j];
    }
  }
};

// W-lane vectors (GCC/Clang vector extensions)
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

inline vf vload(const float *p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vi vloadi(const int32_t *p) {
  vi v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float *p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf vsplat(float x) { return vf{} + x; }
inline float hsum(vf v) {
  float t = 0.0f;
  for (int64_t l = 0; l < W; ++l) t += v[l];
  return t;
}

// fexp on W lanes
inline vf vfexp(vf x) {
  const vf lo = vsplat(-87.3f), hi = vsplat(88.0f);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf y = xc * 1.44269504088896341f + 0.5f;
  const vf t = __builtin_convertvector(__builtin_convertvector(y, vi), vf);
  const vf n = t - (y < t ? vsplat(1.0f) : vsplat(0.0f));  // floor(y)
  vf r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const vf r2 = r * r;
  vf p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
          1.6666665459e-1f) * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf sc;
  std::memcpy(&sc, &e, sizeof(sc));
  return x < lo ? vsplat(0.0f) : p * sc;
}

inline vi lane_ids() {
  vi v;
  for (int64_t l = 0; l < W; ++l) v[l] = (int32_t)l;
  return v;
}

// visibility mask (-1 / 0 per lane) of keys c0 .. c0+W-1 for a query seeing j < jend (position qp, segment qg)
inline vi chunk_mask(const KVBlock &kv, int64_t c0, int64_t jend, bool exact, int32_t qp, bool useg, int32_t qg,
                     vi lanes) {
  vi m = (lanes + (int32_t)c0) < (int32_t)jend;
  if (!exact) m &= vloadi(kv.kp.data() + c0) <= qp;
  if (useg) m &= vloadi(kv.kg.data() + c0) == qg;
  return m;
}

// Rows are processed R at a time: the R query heads of a kv group at the same position share the keys they see,
// so each K/V (and dK/dV) vector is loaded once for R rows.
template <int D, int R>
void fwd_rows(const AttnArgs &a, const Dims &m, const Visibility &vis, const KVBlock &kv, float scale, float *o,
              float *lse, float *s, int64_t b, int64_t h0, int64_t i, bool useg, vi lanes) {
  const int64_t Tp = kv.Tp, S = m.S, T = m.T;
  const float *KT = kv.KT.data(), *VT = kv.VT.data();
  const float ninf = -std::numeric_limits<float>::infinity();
  const int32_t *qsg = a.qseg + b * S;
  float q[R][D];
  int64_t qo[R];
  for (int r = 0; r < R; ++r) {
    qo[r] = m.off(b, h0 + r, i, m.NQ, S);
    rope(a.q + qo[r], a.qc + (b * S + i) * D, a.qsn + (b * S + i) * D, q[r], D);
    for (int d = 0; d < D; ++d) q[r][d] *= scale;
  }
  const int64_t jend = vis.jend[i], cend = round_up(jend), cbeg = vis.begin(b, i) / W * W;
  vf mxv[R];
  for (int r = 0; r < R; ++r) mxv[r] = vsplat(ninf);
  vi cnt = vi{};
  for (int64_t c0 = cbeg; c0 < cend; c0 += W) {
    vf acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vf{};
#pragma GCC unroll 16
    for (int d = 0; d < D; ++d) {
      const vf k = vload(KT + d * Tp + c0);
      for (int r = 0; r < R; ++r) acc[r] += q[r][d] * k;
    }
    const vi mk = chunk_mask(kv, c0, jend, vis.exact, a.qpos[i], useg, qsg[i], lanes);
    cnt -= mk;
    for (int r = 0; r < R; ++r) {
      const vf x = mk != 0 ? acc[r] : vsplat(ninf);
      vstore(s + r * Tp + c0, x);
      mxv[r] = x > mxv[r] ? x : mxv[r];
    }
  }
  int64_t nvis = 0;
  for (int64_t l = 0; l < W; ++l) nvis += cnt[l];
  if (nvis == 0) {  // as an additive -1e9 mask: uniform over all keys
    for (int r = 0; r < R; ++r) {
      for (int d = 0; d < D; ++d) {
        float t = 0.0f;
        for (int64_t j = 0; j < T; ++j) t += VT[d * Tp + j];
        o[qo[r] + d] = t / (float)T;
      }
      lse[(b * m.NQ + h0 + r) * S + i] = std::numeric_limits<float>::infinity();
    }
    return;
  }
  float mx[R];
  for (int r = 0; r < R; ++r) {
    mx[r] = ninf;
    for (int64_t l = 0; l < W; ++l) mx[r] = mxv[r][l] > mx[r] ? mxv[r][l] : mx[r];
  }
  vf oacc[R][D], lsum[R];
  for (int r = 0; r < R; ++r) {
    lsum[r] = vf{};
    for (int d = 0; d < D; ++d) oacc[r][d] = vf{};
  }
  for (int64_t c0 = cbeg; c0 < cend; c0 += W) {
    vf p[R];
    for (int r = 0; r < R; ++r) {
      p[r] = vfexp(vload(s + r * Tp + c0) - mx[r]);
      lsum[r] += p[r];
    }
#pragma GCC unroll 16
    for (int d = 0; d < D; ++d) {
      const vf v = vload(VT + d * Tp + c0);
      for (int r = 0; r < R; ++r) oacc[r][d] += p[r] * v;
    }
  }
  for (int r = 0; r < R; ++r) {
    const float l = hsum(lsum[r]), inv = 1.0f / l;
    for (int d = 0; d < D; ++d) o[qo[r] + d] = hsum(oacc[r][d]) * inv;
    lse[(b * m.NQ + h0 + r) * S + i] = mx[r] + std::log(l);
  }
}

// query rows [i0, i1) of batch b, kv head g
template <int D>
void fwd_task(const AttnArgs &a, const Dims &m, const Visibility &vis, const KVBlock &kv, float scale, float *o,
              float *lse, int64_t b, int64_t g, int64_t i0, int64_t i1) {
  std::vector<float> sbuf(2 * kv.Tp);
  const bool useg = vis.useg[b];
  const vi lanes = lane_ids();
  for (int64_t h = g * m.rep; h < (g + 1) * m.rep;) {
    const bool two = h + 1 < (g + 1) * m.rep;
    for (int64_t i = i0; i < i1; ++i) {
      if (two)
        fwd_rows<D, 2>(a, m, vis, kv, scale, o, lse, sbuf.data(), b, h, i, useg, lanes);
      else
        fwd_rows<D, 1>(a, m, vis, kv, scale, o, lse, sbuf.data(), b, h, i, useg, lanes);
    }
    h += two ? 2 : 1;
  }
}

template <int D, int R>
void bwd_rows(const AttnArgs &a, const Dims &m, const Visibility &vis, const KVBlock &kv, float scale, const float *o,
              const float *lse, const float *dout, float *dq, float *dKT, float *dVT, int64_t b, int64_t h0,
              int64_t i, bool useg, vi lanes) {
  const int64_t Tp = kv.Tp, S = m.S, T = m.T;
  const float *KT = kv.KT.data(), *VT = kv.VT.data();
  const int32_t *qsg = a.qseg + b * S;
  const float *qc = a.qc + (b * S + i) * D, *qsn = a.qsn + (b * S + i) * D;
  float qr[R][D], qs[R][D], gv[R][D], Di[R], L[R];
  int64_t qo[R];
  bool any_empty = false;
  for (int r = 0; r < R; ++r) {
    qo[r] = m.off(b, h0 + r, i, m.NQ, S);
    L[r] = lse[(b * m.NQ + h0 + r) * S + i];
    any_empty = any_empty || (std::isinf(L[r]) && L[r] > 0);
    rope(a.q + qo[r], qc, qsn, qr[r], D);
    Di[r] = 0.0f;
    for (int d = 0; d < D; ++d) {
      qs[r][d] = qr[r][d] * scale;
      gv[r][d] = dout[qo[r] + d];
      Di[r] += gv[r][d] * o[qo[r] + d];
    }
  }
  if (any_empty) {  // no visible key (then for all R rows): o = mean(v); d/dv_j = do / T; nothing for q, k
    for (int r = 0; r < R; ++r)
      for (int d = 0; d < D; ++d) {
        dq[qo[r] + d] = 0.0f;
        const float gd = gv[r][d] / (float)T;
        for (int64_t j = 0; j < T; ++j) dVT[d * Tp + j] += gd;
      }
    return;
  }
  const int64_t jend = vis.jend[i], cend = round_up(jend), cbeg = vis.begin(b, i) / W * W;
  vf dqa[R][D];
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < D; ++d) dqa[r][d] = vf{};
  for (int64_t c0 = cbeg; c0 < cend; c0 += W) {
    vf sv[R], dp[R];
    for (int r = 0; r < R; ++r) sv[r] = dp[r] = vf{};
#pragma GCC unroll 16
    for (int d = 0; d < D; ++d) {
      const vf k = vload(KT + d * Tp + c0), v = vload(VT + d * Tp + c0);
      for (int r = 0; r < R; ++r) {
        sv[r] += qs[r][d] * k;
        dp[r] += gv[r][d] * v;
      }
    }
    const vi mk = chunk_mask(kv, c0, jend, vis.exact, a.qpos[i], useg, qsg[i], lanes);
    vf p[R], ds[R];
    for (int r = 0; r < R; ++r) {
      p[r] = mk != 0 ? vfexp(sv[r] - L[r]) : vf{};
      ds[r] = p[r] * (dp[r] - Di[r]) * scale;  // d(scaled score) * scale
    }
#pragma GCC unroll 16
    for (int d = 0; d < D; ++d) {
      float *dvt = dVT + d * Tp + c0, *dkt = dKT + d * Tp + c0;
      const vf k = vload(KT + d * Tp + c0);
      vf gsum = vload(dvt), ksum = vload(dkt);
      for (int r = 0; r < R; ++r) {
        gsum += p[r] * gv[r][d];
        ksum += ds[r] * qr[r][d];
        dqa[r][d] += ds[r] * k;
      }
      vstore(dvt, gsum);
      vstore(dkt, ksum);
    }
  }
  for (int r = 0; r < R; ++r) {
    float dqr[D];
    for (int d = 0; d < D; ++d) dqr[d] = hsum(dqa[r][d]);
    rope_t(dqr, qc, qsn, dq + qo[r], D);
  }
}

// query rows [i0, i1) of batch b, kv head g; adds to dKT, dVT (D, Tp)
template <int D>
void bwd_task(const AttnArgs &a, const Dims &m, const Visibility &vis, const KVBlock &kv, float scale, const float *o,
              const float *lse, const float *dout, float *dq, float *dKT, float *dVT, int64_t b, int64_t g, int64_t i0,
              int64_t i1) {
  const bool useg = vis.useg[b];
  const vi lanes = lane_ids();
  for (int64_t h = g * m.rep; h < (g + 1) * m.rep;) {
    const bool two = h + 1 < (g + 1) * m.rep;
    for (int64_t i = i0; i < i1; ++i) {
      if (two)
        bwd_rows<D, 2>(a, m, vis, kv, scale, o, lse, dout, dq, dKT, dVT, b, h, i, useg, lanes);
      else
        bwd_rows<D, 1>(a, m, vis, kv, scale, o, lse, dout, dq, dKT, dVT, b, h, i, useg, lanes);
    }
    h += two ? 2 : 1;
  }
}

// dk, dv of batch b, kv head g from dKT, dVT (D, Tp): back through the rotary embedding of k
template <int D>
void store_dkv(const AttnArgs &a, const Dims &m, int64_t Tp, const float *dKT, const float *dVT, float *dk, float *dv,
               int64_t b, int64_t g) {
  for (int64_t j = 0; j < m.T; ++j) {
    const int64_t ko = m.off(b, g, j, m.NK, m.T);
    float r[D];
    for (int d = 0; d < D; ++d) r[d] = dKT[d * Tp + j];
    rope_t(r, a.kc + (b * m.T + j) * D, a.ksn + (b * m.T + j) * D, dk + ko, D);
    for (int d = 0; d < D; ++d) dv[ko + d] = dVT[d * Tp + j];
  }
}

// The tasks: (batch, kv head) when there are enough of them (vis.nblk == 1: each builds its K/V block and
// accumulates dK/dV alone), else (batch, kv head, block of query rows) with the K/V blocks built first and one
// dK/dV buffer per task, summed in block order (deterministic) before the rotary backward.
template <int D>
void fwd_all(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, float *o, float *lse) {
  const int64_t nb = vis.nblk, G = m.B * m.NK;
  if (nb == 1) {
    parallel_for(G, [&](int64_t t) {
      const int64_t b = t / m.NK, g = t % m.NK;
      const KVBlock kv(a, m, b, g);
      fwd_task<D>(a, m, vis, kv, scale, o, lse, b, g, 0, m.S);
    });
    return;
  }
  std::vector<std::unique_ptr<KVBlock>> kvs(G);
  parallel_for(G, [&](int64_t t) { kvs[t].reset(new KVBlock(a, m, t / m.NK, t % m.NK)); });
  parallel_for(G * nb, [&](int64_t t) {
    const int64_t bg = t / nb, k = t % nb, b = bg / m.NK, g = bg % m.NK;
    const int64_t *bl = vis.block(b);
    fwd_task<D>(a, m, vis, *kvs[bg], scale, o, lse, b, g, bl[k], bl[k + 1]);
  });
}

template <int D>
void bwd_all(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, const float *o, const float *lse,
             const float *dout, float *dq, float *dk, float *dv) {
  const int64_t nb = vis.nblk, G = m.B * m.NK;
  if (nb == 1) {
    parallel_for(G, [&](int64_t t) {
      const int64_t b = t / m.NK, g = t % m.NK;
      const KVBlock kv(a, m, b, g);
      std::vector<float> dKT(D * kv.Tp, 0.0f), dVT(D * kv.Tp, 0.0f);
      bwd_task<D>(a, m, vis, kv, scale, o, lse, dout, dq, dKT.data(), dVT.data(), b, g, 0, m.S);
      store_dkv<D>(a, m, kv.Tp, dKT.data(), dVT.data(), dk, dv, b, g);
    });
    return;
  }
  std::vector<std::unique_ptr<KVBlock>> kvs(G);
  parallel_for(G, [&](int64_t t) { kvs[t].reset(new KVBlock(a, m, t / m.NK, t % m.NK)); });
  const int64_t Tp = round_up(m.T), n = D * Tp;
  std::vector<float> buf((size_t)(G * nb * 2 * n), 0.0f);  // per task: dKT, dVT
  parallel_for(G * nb, [&](int64_t t) {
    const int64_t bg = t / nb, k = t % nb, b = bg / m.NK, g = bg % m.NK;
    const int64_t *bl = vis.block(b);
    float *dKT = buf.data() + t * 2 * n;
    bwd_task<D>(a, m, vis, *kvs[bg], scale, o, lse, dout, dq, dKT, dKT + n, b, g, bl[k], bl[k + 1]);
  });
  parallel_for(G, [&](int64_t bg) {
    float *dKT = buf.data() + bg * nb * 2 * n;
    for (int64_t k = 1; k < nb; ++k) {
      const float *src = dKT + k * 2 * n;
      for (int64_t x = 0; x < 2 * n; ++x) dKT[x] += src[x];
    }
    store_dkv<D>(a, m, Tp, dKT, dKT + n, dk, dv, bg / m.NK, bg % m.NK);
  });
}

#define MFSFT_HEAD_DIMS(X) X(8) X(16) X(32) X(64) X(128)

bool fwd_fixed(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, float *o, float *lse) {
  switch (m.D) {
#define MFSFT_CASE(d)                         \
  case d:                                     \
    fwd_all<d>(a, m, vis, scale, o, lse);     \
    return true;
    MFSFT_HEAD_DIMS(MFSFT_CASE)
#undef MFSFT_CASE
    default:
      return false;
  }
}

bool bwd_fixed(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, const float *o, const float *lse,
               const float *dout, float *dq, float *dk, float *dv) {
  switch (m.D) {
#define MFSFT_CASE(d)                                            \
  case d:                                                        \
    bwd_all<d>(a, m, vis, scale, o, lse, dout, dq, dk, dv);      \
    return true;
    MFSFT_HEAD_DIMS(MFSFT_CASE)
#undef MFSFT_CASE
    default:
      return false;
  }
}

}  // namespace
