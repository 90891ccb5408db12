// Fused attention (MindSpore Custom "aot" ops), fp32: rotary embedding + causal/segment-masked softmax attention
// with grouped KV heads, forward and backward, never materializing the (S, T) score matrix (flash-attention
// style, exact softmax). Shapes, visibility, the generic (any head_dim) path and the entry points; the paths
// tried first, compiled after this file: GEMMs over blocks of query rows (cpu_attention_gemm_kernels.cc, when
// oneDNN's sgemm is found), then the fixed-head_dim SIMD rows (cpu_attention_simd_kernels.cc).
// Compiled as one translation unit after cpu_kernels.cc (models/kernels.py joins the sources in the order of
// CPU_SOURCE_FILES), so it uses that file's includes and helpers: parallel_for, n_threads, fexp, is_f32, is_i32.
#include <memory>
#include <unordered_map>

namespace {

struct Dims {
  int64_t B, NQ, NK, S, T, D, rep;
  bool bsnd;  // layout of q/k/v/o and their gradients: (B, S, N, D) if true, else (B, N, S, D)
  int64_t off(int64_t b, int64_t h, int64_t i, int64_t n, int64_t len) const {
    return bsnd ? ((b * len + i) * n + h) * D : ((b * n + h) * len + i) * D;
  }
};

Dims dims_of(int64_t **shapes, bool bsnd) {
  Dims m;
  m.bsnd = bsnd;
  m.B = shapes[0][0];
  m.NQ = bsnd ? shapes[0][2] : shapes[0][1];
  m.S = bsnd ? shapes[0][1] : shapes[0][2];
  m.NK = bsnd ? shapes[1][2] : shapes[1][1];
  m.T = bsnd ? shapes[1][1] : shapes[1][2];
  m.D = shapes[0][3];
  m.rep = m.NK > 0 ? m.NQ / m.NK : 0;
  return m;
}

// Keys query i of row b may see: j in [jbeg[b * S + i], jend[i]). jend: those j with k position <= q position
// (`exact` when k positions are sorted: then every j < jend[i] passes the position test; otherwise each key is
// tested). jbeg: the first key of the query's segment in row b (keys before it are in other segments, masked
// anyway: skipping them changes no result); 0 where the row's segments are all equal (useg[b] false) or the
// segment has no key. Segments are compared per key where useg[b].
// The work of a (batch, kv head) is split in `nblk` blocks of query rows of about equal work (the keys they see),
// so that few (batch, kv head) pairs (a flat packed sequence: B = 1) still keep every thread busy; blocks holds
// row b's nblk + 1 query-row boundaries at b * (nblk + 1). nblk depends on the shapes only, not on the thread count.
constexpr int64_t kAttnTasks = 16;  // (batch, kv head, block) tasks aimed at

struct Visibility {
  std::vector<int64_t> jend, jbeg, blocks;
  std::vector<char> useg;
  int64_t S = 0, nblk = 1;
  bool exact = true;
  Visibility(const int32_t *qpos, const int32_t *kpos, const int32_t *qseg, const int32_t *kseg, int64_t B,
             int64_t S_, int64_t T, int64_t NK)
      : jend(S_), jbeg(B * S_, 0), useg(B, 0), S(S_) {
    for (int64_t j = 1; j < T; ++j)
      if (kpos[j] < kpos[j - 1]) exact = false;
    for (int64_t i = 0; i < S; ++i) {
      if (exact) {
        jend[i] = std::upper_bound(kpos, kpos + T, qpos[i]) - kpos;
        continue;
      }
      int64_t e = 0;
      for (int64_t j = 0; j < T; ++j)
        if (kpos[j] <= qpos[i]) e = j + 1;
      jend[i] = e;
    }
    for (int64_t b = 0; b < B; ++b) {
      const int32_t *qs = qseg + b * S, *ks = kseg + b * T;
      const int32_t v = S > 0 ? qs[0] : (T > 0 ? ks[0] : 0);
      bool u = false;
      for (int64_t i = 0; i < S && !u; ++i) u = qs[i] != v;
      for (int64_t j = 0; j < T && !u; ++j) u = ks[j] != v;
      useg[b] = u;
      if (!u) continue;
      std::unordered_map<int32_t, int64_t> first;
      for (int64_t j = T - 1; j >= 0; --j) first[ks[j]] = j;
      for (int64_t i = 0; i < S; ++i) {
        const auto f = first.find(qs[i]);
        jbeg[b * S + i] = f == first.end() ? 0 : std::min(f->second, jend[i]);
      }
    }
    const int64_t tasks = std::max<int64_t>(1, B * NK);
    nblk = tasks >= kAttnTasks ? 1 : std::min((kAttnTasks + tasks - 1) / tasks, std::max<int64_t>(1, S / 16));
    blocks.assign(B * (nblk + 1), S);
    for (int64_t b = 0; b < B; ++b) {
      int64_t *bl = blocks.data() + b * (nblk + 1);
      bl[0] = 0;
      if (nblk == 1) continue;
      double total = 0.0;
      for (int64_t i = 0; i < S; ++i) total += (double)(jend[i] - jbeg[b * S + i] + 8);
      double acc = 0.0;
      int64_t k = 1;
      for (int64_t i = 0; i < S && k < nblk; ++i) {
        acc += (double)(jend[i] - jbeg[b * S + i] + 8);
        while (k < nblk && acc >= total * (double)k / (double)nblk) bl[k++] = i + 1;
      }
    }
  }
  int64_t begin(int64_t b, int64_t i) const { return jbeg[b * S + i]; }
  const int64_t *block(int64_t b) const { return blocks.data() + b * (nblk + 1); }
};

// y = x * cos + rotate_half(x) * sin  (rotate_half(x) = cat(-x[h:], x[:h]))
inline void rope(const float *x, const float *c, const float *s, float *y, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; ++d) y[d] = x[d] * c[d] + (-x[d + h]) * s[d];
  for (int64_t d = h; d < D; ++d) y[d] = x[d] * c[d] + x[d - h] * s[d];
}

// gradient of rope w.r.t. x, given the gradient g of y
inline void rope_t(const float *g, const float *c, const float *s, float *x, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t d = 0; d < h; ++d) x[d] = g[d] * c[d] + g[d + h] * s[d + h];
  for (int64_t d = h; d < D; ++d) x[d] = g[d] * c[d] - g[d - h] * s[d - h];
}

// (D, T) copies of head g of batch b: KT with the rotary embedding applied (cos/sin rows (B, T, D)), VT
void load_kv(const float *k, const float *v, const float *kc, const float *ks, const Dims &m, int64_t b, int64_t g,
             float *KT, float *VT) {
  const int64_t T = m.T, D = m.D;
  std::vector<float> r(D);
  for (int64_t j = 0; j < T; ++j) {
    const int64_t o = m.off(b, g, j, m.NK, T);
    rope(k + o, kc + (b * T + j) * D, ks + (b * T + j) * D, r.data(), D);
    for (int64_t d = 0; d < D; ++d) KT[d * T + j] = r[d];
    for (int64_t d = 0; d < D; ++d) VT[d * T + j] = v[o + d];
  }
}

// s[j] = qs . k_j for jb <= j < jend (qs already scaled); masked keys -> -inf; returns the number of visible keys
inline int64_t row_scores(const float *qs, const float *KT, int64_t D, int64_t T, int64_t jb, int64_t jend,
                          float *__restrict s, bool exact, const int32_t *kpos, int32_t qp, bool useg,
                          const int32_t *kseg, int32_t qsg) {
  for (int64_t j = jb; j < jend; ++j) s[j] = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float qd = qs[d];
    const float *__restrict kt = KT + d * T;
    for (int64_t j = jb; j < jend; ++j) s[j] += qd * kt[j];
  }
  int64_t vis = jend - jb;
  if (!exact || useg) {
    const float ninf = -std::numeric_limits<float>::infinity();
    vis = 0;
    for (int64_t j = jb; j < jend; ++j) {
      const bool ok = (exact || kpos[j] <= qp) && (!useg || kseg[j] == qsg);
      s[j] = ok ? s[j] : ninf;
      vis += ok;
    }
  }
  return vis;
}

// s[j] = exp(s[j] - mx) for lo <= j < hi (masked -inf -> 0); returns their sum
inline float exp_shifted(float *__restrict s, int64_t lo, int64_t hi, float mx) {
  float l = 0.0f;
  for (int64_t j = lo; j < hi; ++j) {
    const float p = fexp(s[j] - mx);
    s[j] = p;
    l += p;
  }
  return l;
}

struct AttnArgs {
  const float *q, *k, *v, *qc, *qsn, *kc, *ksn, *scale;
  const int32_t *qpos, *kpos, *qseg, *kseg;
};

// inputs 0..11: q, k, v, q_cos, q_sin (B,S,D), k_cos, k_sin (B,T,D), q_pos (S,), k_pos (T,), q_seg (B,S),
// k_seg (B,T), scale (1,)
bool parse_attn(void **params, const char **dtypes, AttnArgs &a) {
  for (int i : {0, 1, 2, 3, 4, 5, 6, 11})
    if (!is_f32(dtypes[i])) return false;
  for (int i : {7, 8, 9, 10})
    if (!is_i32(dtypes[i])) return false;
  a.q = (const float *)params[0];
  a.k = (const float *)params[1];
  a.v = (const float *)params[2];
  a.qc = (const float *)params[3];
  a.qsn = (const float *)params[4];
  a.kc = (const float *)params[5];
  a.ksn = (const float *)params[6];
  a.qpos = (const int32_t *)params[7];
  a.kpos = (const int32_t *)params[8];
  a.qseg = (const int32_t *)params[9];
  a.kseg = (const int32_t *)params[10];
  a.scale = (const float *)params[11];
  return true;
}

// the GEMM path (cpu_attention_gemm_kernels.cc); false when oneDNN's sgemm is not found or MFSFT_ATTN_GEMM=0
bool fwd_gemm(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, float *o, float *lse);
bool bwd_gemm(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, const float *o, const float *lse,
              const float *dout, float *dq, float *dk, float *dv);
// the fixed-head_dim path (cpu_attention_simd_kernels.cc); false when head_dim is not one it has
bool fwd_fixed(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, float *o, float *lse);
bool bwd_fixed(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, const float *o, const float *lse,
               const float *dout, float *dq, float *dk, float *dv);

// outputs: o (like q), lse (B, NQ, S): log-sum-exp of each row's scaled scores (+inf: the row sees no key and,
// as with an additive -1e9 mask, o is the mean of v over all keys)
int attn_fwd(int nparam, void **params, int64_t **shapes, const char **dtypes, bool bsnd) {
  AttnArgs a;
  if (nparam != 14 || !parse_attn(params, dtypes, a) || !is_f32(dtypes[12]) || !is_f32(dtypes[13])) return 1;
  float *o = (float *)params[12], *lse = (float *)params[13];
  const Dims m = dims_of(shapes, bsnd);
  if (m.NK <= 0 || m.NQ % m.NK || m.D % 2) return 2;
  const float scale = a.scale[0];
  const Visibility vis(a.qpos, a.kpos, a.qseg, a.kseg, m.B, m.S, m.T, m.NK);
  if (fwd_gemm(a, m, vis, scale, o, lse) || fwd_fixed(a, m, vis, scale, o, lse)) return 0;
  parallel_for(m.B * m.NK, [&](int64_t task) {  // any other (even) head_dim
    const int64_t b = task / m.NK, g = task % m.NK, S = m.S, T = m.T, D = m.D;
    std::vector<float> KT(D * T), VT(D * T), s(T), qr(D);
    load_kv(a.k, a.v, a.kc, a.ksn, m, b, g, KT.data(), VT.data());
    const int32_t *qs = a.qseg + b * S, *ks = a.kseg + b * T;
    const bool useg = vis.useg[b];
    for (int64_t h = g * m.rep; h < (g + 1) * m.rep; ++h) {
      for (int64_t i = 0; i < S; ++i) {
        const int64_t row = (b * m.NQ + h) * S + i, qo = m.off(b, h, i, m.NQ, S);
        float *oi = o + qo;
        rope(a.q + qo, a.qc + (b * S + i) * D, a.qsn + (b * S + i) * D, qr.data(), D);
        for (int64_t d = 0; d < D; ++d) qr[d] *= scale;
        const int64_t jb = vis.begin(b, i), jend = vis.jend[i];
        const int64_t nvis = row_scores(qr.data(), KT.data(), D, T, jb, jend, s.data(), vis.exact, a.kpos, a.qpos[i],
                                        useg, ks, qs[i]);
        if (nvis == 0) {
          for (int64_t d = 0; d < D; ++d) {
            float acc = 0.0f;
            for (int64_t j = 0; j < T; ++j) acc += VT[d * T + j];
            oi[d] = acc / (float)T;
          }
          lse[row] = std::numeric_limits<float>::infinity();
          continue;
        }
        float *__restrict sp = s.data();
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = jb; j < jend; ++j) mx = std::max(mx, sp[j]);
        const float l = exp_shifted(sp, jb, jend, mx), inv = 1.0f / l;
        for (int64_t d = 0; d < D; ++d) {
          const float *__restrict vt = VT.data() + d * T;
          float acc = 0.0f;
          for (int64_t j = jb; j < jend; ++j) acc += sp[j] * vt[j];
          oi[d] = acc * inv;
        }
        lse[row] = mx + std::log(l);
      }
    }
  });
  return 0;
}

// inputs 0..11 as the forward, 12: o, 13: lse, 14: grad of o; outputs: dq, dk, dv
int attn_bwd(int nparam, void **params, int64_t **shapes, const char **dtypes, bool bsnd) {
  AttnArgs a;
  if (nparam != 18 || !parse_attn(params, dtypes, a)) return 1;
  for (int i = 12; i < 18; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const float *o = (const float *)params[12], *lse = (const float *)params[13], *dout = (const float *)params[14];
  float *dq = (float *)params[15], *dk = (float *)params[16], *dv = (float *)params[17];
  const Dims m = dims_of(shapes, bsnd);
  if (m.NK <= 0 || m.NQ % m.NK || m.D % 2) return 2;
  const float scale = a.scale[0];
  const Visibility vis(a.qpos, a.kpos, a.qseg, a.kseg, m.B, m.S, m.T, m.NK);
  if (bwd_gemm(a, m, vis, scale, o, lse, dout, dq, dk, dv) || bwd_fixed(a, m, vis, scale, o, lse, dout, dq, dk, dv))
    return 0;
  parallel_for(m.B * m.NK, [&](int64_t task) {  // any other (even) head_dim
    const int64_t b = task / m.NK, g = task % m.NK, S = m.S, T = m.T, D = m.D;
    std::vector<float> KT(D * T), VT(D * T), dKT(D * T, 0.0f), dVT(D * T, 0.0f), s(T), dp(T), qr(D), qsc(D),
        dqr(D);
    load_kv(a.k, a.v, a.kc, a.ksn, m, b, g, KT.data(), VT.data());
    const int32_t *qs = a.qseg + b * S, *ks = a.kseg + b * T;
    const bool useg = vis.useg[b];
    for (int64_t h = g * m.rep; h < (g + 1) * m.rep; ++h) {
      for (int64_t i = 0; i < S; ++i) {
        const int64_t row = (b * m.NQ + h) * S + i, qo = m.off(b, h, i, m.NQ, S);
        const float *oi = o + qo, *gi = dout + qo, *qc = a.qc + (b * S + i) * D, *qsn = a.qsn + (b * S + i) * D;
        float *dqi = dq + qo;
        const float L = lse[row];
        if (std::isinf(L) && L > 0) {  // no visible key: o = mean(v); d/dv_j = do / T; nothing for q, k
          for (int64_t d = 0; d < D; ++d) {
            dqi[d] = 0.0f;
            const float gd = gi[d] / (float)T;
            float *__restrict dvt = dVT.data() + d * T;
            for (int64_t j = 0; j < T; ++j) dvt[j] += gd;
          }
          continue;
        }
        rope(a.q + qo, qc, qsn, qr.data(), D);
        for (int64_t d = 0; d < D; ++d) qsc[d] = qr[d] * scale;
        const int64_t jb = vis.begin(b, i), jend = vis.jend[i];
        row_scores(qsc.data(), KT.data(), D, T, jb, jend, s.data(), vis.exact, a.kpos, a.qpos[i], useg, ks, qs[i]);
        float Di = 0.0f;
        for (int64_t d = 0; d < D; ++d) Di += gi[d] * oi[d];
        float *__restrict sp = s.data();
        float *__restrict dpp = dp.data();
        for (int64_t j = jb; j < jend; ++j) {
          sp[j] = fexp(sp[j] - L);  // probabilities
          dpp[j] = 0.0f;
        }
        for (int64_t d = 0; d < D; ++d) {
          const float gd = gi[d];
          const float *__restrict vt = VT.data() + d * T;
          float *__restrict dvt = dVT.data() + d * T;
          for (int64_t j = jb; j < jend; ++j) {
            dpp[j] += gd * vt[j];
            dvt[j] += sp[j] * gd;
          }
        }
        for (int64_t j = jb; j < jend; ++j) dpp[j] = sp[j] * (dpp[j] - Di) * scale;  // d(scaled score) * scale
        for (int64_t d = 0; d < D; ++d) {
          const float qd = qr[d];
          const float *__restrict kt = KT.data() + d * T;
          float *__restrict dkt = dKT.data() + d * T;
          float acc = 0.0f;
          for (int64_t j = jb; j < jend; ++j) {
            acc += dpp[j] * kt[j];
            dkt[j] += dpp[j] * qd;
          }
          dqr[d] = acc;
        }
        rope_t(dqr.data(), qc, qsn, dqi, D);
      }
    }
    for (int64_t j = 0; j < T; ++j) {  // back through the rotary embedding of k
      const int64_t ko = m.off(b, g, j, m.NK, T);
      for (int64_t d = 0; d < D; ++d) dqr[d] = dKT[d * T + j];
      rope_t(dqr.data(), a.kc + (b * T + j) * D, a.ksn + (b * T + j) * D, dk + ko, D);
      for (int64_t d = 0; d < D; ++d) dv[ko + d] = dVT[d * T + j];
    }
  });
  return 0;
}

}  // namespace

#define MFSFT_ATTN(name, fn, layout)                                                                       \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,        \
                      void *stream, void *extra) {                                                         \
    return fn(nparam, params, shapes, dtypes, layout);                                                     \
  }
MFSFT_ATTN(MfsftAttnFwdBNSD, attn_fwd, false)
MFSFT_ATTN(MfsftAttnFwdBSND, attn_fwd, true)
MFSFT_ATTN(MfsftAttnBwdBNSD, attn_bwd, false)
MFSFT_ATTN(MfsftAttnBwdBSND, attn_bwd, true)
