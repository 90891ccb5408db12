// mindformers_sft CPU kernels (MindSpore Custom "aot" ops), fp32.
//   attention: rotary embedding + causal/segment-masked softmax attention with grouped KV heads, forward and
//              backward, never materializing the (S, T) score matrix (flash-attention style, exact softmax).
//   cross entropy: per-row log-softmax loss and its gradient.
//   RMSNorm, SwiGLU: forward and backward.
//   notify: writes to an eventfd when a graph reaches it (the host sleeps instead of spinning).
// Signature of every entry point: MindSpore's aot convention (nparam, params, ndims, shapes, dtypes, stream,
// extra); inputs then outputs in `params`; a non-zero return makes MindSpore raise.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>
#include <sched.h>

namespace {

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

// exp(x) with relative error < 2e-7 on [-87.3, 88]; exactly 0 below -87.3 (incl. -inf); vectorizable
inline float fexp(float x) {
  const float lo = -87.3f, hi = 88.0f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float r2 = r * r;
  float y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
             1.6666665459e-1f) * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  float s = bits_to_float(((int32_t)n + 127) << 23);
  return x < lo ? 0.0f : y * s;
}

int n_threads() {
  static int n = [] {
    const char *e = std::getenv("MFSFT_KERNEL_THREADS");
    int v = e ? std::atoi(e) : 0;
    if (v <= 0) {
      cpu_set_t set;
      v = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : (int)std::thread::hardware_concurrency();
    }
    return std::max(1, v);
  }();
  return n;
}

// f(0) .. f(n-1) on up to n_threads() threads; `work` (elements touched in all) below kMinParallelWork runs on
// the calling thread (starting a thread costs more than such a kernel)
constexpr int64_t kMinParallelWork = 1 << 17;

template <class F>
void parallel_for(int64_t n, F f, int64_t work = kMinParallelWork) {
  int nt = work < kMinParallelWork ? 1 : (int)std::min<int64_t>(n_threads(), n);
  if (nt <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next(0);
  auto worker = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < n;) f(i);
  };
  std::vector<std::thread> ts;
  for (int t = 1; t < nt; ++t) ts.emplace_back(worker);
  worker();
  for (auto &t : ts) t.join();
}

bool is_f32(const char *t) { return std::strcmp(t, "float32") == 0 || std::strcmp(t, "float") == 0; }
bool is_i32(const char *t) { return std::strcmp(t, "int32") == 0 || std::strcmp(t, "int") == 0; }

// ---------------------------------------------------------------------------------------------------------------
// attention
// ---------------------------------------------------------------------------------------------------------------
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

// Keys row i may see: those j < jend[i]; `exact` when k positions are sorted (then every j < jend[i] passes the
// position test); otherwise each key is tested. Segments are compared per key when they are not all equal.
struct Visibility {
  std::vector<int64_t> jend;
  bool exact = true;
  Visibility(const int32_t *qpos, const int32_t *kpos, int64_t S, int64_t T) : jend(S) {
    for (int64_t j = 1; j < T; ++j)
      if (kpos[j] < kpos[j - 1]) exact = false;
    for (int64_t i = 0; i < S; ++i) {
      int64_t e = 0;
      for (int64_t j = 0; j < T; ++j)
        if (kpos[j] <= qpos[i]) e = j + 1;
      jend[i] = e;
    }
  }
};

bool seg_uniform(const int32_t *qs, const int32_t *ks, int64_t S, int64_t T) {
  const int32_t v = S > 0 ? qs[0] : (T > 0 ? ks[0] : 0);
  for (int64_t i = 0; i < S; ++i)
    if (qs[i] != v) return false;
  for (int64_t j = 0; j < T; ++j)
    if (ks[j] != v) return false;
  return true;
}

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

// s[j] = qs . k_j for j < jend (qs already scaled); masked keys -> -inf; returns the number of visible keys
inline int64_t row_scores(const float *qs, const float *KT, int64_t D, int64_t T, int64_t jend, float *__restrict s,
                          bool exact, const int32_t *kpos, int32_t qp, bool useg, const int32_t *kseg, int32_t qsg) {
  for (int64_t j = 0; j < jend; ++j) s[j] = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float qd = qs[d];
    const float *__restrict kt = KT + d * T;
    for (int64_t j = 0; j < jend; ++j) s[j] += qd * kt[j];
  }
  int64_t vis = jend;
  if (!exact || useg) {
    const float ninf = -std::numeric_limits<float>::infinity();
    vis = 0;
    for (int64_t j = 0; j < jend; ++j) {
      const bool ok = (exact || kpos[j] <= qp) && (!useg || kseg[j] == qsg);
      s[j] = ok ? s[j] : ninf;
      vis += ok;
    }
  }
  return vis;
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


// ---- fixed head_dim (8, 16, 32, 64, 128): chunks of W keys, accumulators in registers -----------------------
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
// padded; key positions/segments padded likewise (padding is never visible: j < jend <= T).
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
  const int64_t jend = vis.jend[i], cend = round_up(jend);
  vf mxv[R];
  for (int r = 0; r < R; ++r) mxv[r] = vsplat(ninf);
  vi cnt = vi{};
  for (int64_t c0 = 0; c0 < cend; c0 += W) {
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
  for (int64_t c0 = 0; c0 < cend; c0 += W) {
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

template <int D>
void fwd_task(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, float *o, float *lse, int64_t b,
              int64_t g) {
  const KVBlock kv(a, m, b, g);
  std::vector<float> sbuf(2 * kv.Tp);
  const bool useg = !seg_uniform(a.qseg + b * m.S, a.kseg + b * m.T, m.S, m.T);
  const vi lanes = lane_ids();
  for (int64_t h = g * m.rep; h < (g + 1) * m.rep;) {
    const bool two = h + 1 < (g + 1) * m.rep;
    for (int64_t i = 0; i < m.S; ++i) {
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
  const int64_t jend = vis.jend[i], cend = round_up(jend);
  vf dqa[R][D];
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < D; ++d) dqa[r][d] = vf{};
  for (int64_t c0 = 0; c0 < cend; c0 += W) {
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

template <int D>
void bwd_task(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, const float *o, const float *lse,
              const float *dout, float *dq, float *dk, float *dv, int64_t b, int64_t g) {
  const KVBlock kv(a, m, b, g);
  const int64_t Tp = kv.Tp, T = m.T;
  std::vector<float> dKTb(D * Tp, 0.0f), dVTb(D * Tp, 0.0f);
  float *dKT = dKTb.data(), *dVT = dVTb.data();
  const bool useg = !seg_uniform(a.qseg + b * m.S, a.kseg + b * T, m.S, T);
  const vi lanes = lane_ids();
  for (int64_t h = g * m.rep; h < (g + 1) * m.rep;) {
    const bool two = h + 1 < (g + 1) * m.rep;
    for (int64_t i = 0; i < m.S; ++i) {
      if (two)
        bwd_rows<D, 2>(a, m, vis, kv, scale, o, lse, dout, dq, dKT, dVT, b, h, i, useg, lanes);
      else
        bwd_rows<D, 1>(a, m, vis, kv, scale, o, lse, dout, dq, dKT, dVT, b, h, i, useg, lanes);
    }
    h += two ? 2 : 1;
  }
  for (int64_t j = 0; j < T; ++j) {  // back through the rotary embedding of k
    const int64_t ko = m.off(b, g, j, m.NK, T);
    float r[D];
    for (int d = 0; d < D; ++d) r[d] = dKT[d * Tp + j];
    rope_t(r, a.kc + (b * T + j) * D, a.ksn + (b * T + j) * D, dk + ko, D);
    for (int d = 0; d < D; ++d) dv[ko + d] = dVT[d * Tp + j];
  }
}

#define MFSFT_HEAD_DIMS(X) X(8) X(16) X(32) X(64) X(128)

bool fwd_fixed(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, float *o, float *lse) {
  switch (m.D) {
#define MFSFT_CASE(d)                                                                                        \
  case d:                                                                                                    \
    parallel_for(m.B * m.NK, [&](int64_t t) { fwd_task<d>(a, m, vis, scale, o, lse, t / m.NK, t % m.NK); }); \
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
#define MFSFT_CASE(d)                                                                                         \
  case d:                                                                                                     \
    parallel_for(m.B * m.NK,                                                                                  \
                 [&](int64_t t) { bwd_task<d>(a, m, vis, scale, o, lse, dout, dq, dk, dv, t / m.NK, t % m.NK); }); \
    return true;
    MFSFT_HEAD_DIMS(MFSFT_CASE)
#undef MFSFT_CASE
    default:
      return false;
  }
}

// outputs: o (like q), lse (B, NQ, S): log-sum-exp of each row's scaled scores (+inf: the row sees no key and,
// as with an additive -1e9 mask, o is the mean of v over all keys)
int attn_fwd(int nparam, void **params, int64_t **shapes, const char **dtypes, bool bsnd) {
  AttnArgs a;
  if (nparam != 14 || !parse_attn(params, dtypes, a) || !is_f32(dtypes[12]) || !is_f32(dtypes[13])) return 1;
  float *o = (float *)params[12], *lse = (float *)params[13];
  const Dims m = dims_of(shapes, bsnd);
  if (m.NK <= 0 || m.NQ % m.NK || m.D % 2) return 2;
  const float scale = a.scale[0];
  const Visibility vis(a.qpos, a.kpos, m.S, m.T);
  if (fwd_fixed(a, m, vis, scale, o, lse)) return 0;
  parallel_for(m.B * m.NK, [&](int64_t task) {  // any other (even) head_dim
    const int64_t b = task / m.NK, g = task % m.NK, S = m.S, T = m.T, D = m.D;
    std::vector<float> KT(D * T), VT(D * T), s(T), qr(D);
    load_kv(a.k, a.v, a.kc, a.ksn, m, b, g, KT.data(), VT.data());
    const int32_t *qs = a.qseg + b * S, *ks = a.kseg + b * T;
    const bool useg = !seg_uniform(qs, ks, S, T);
    for (int64_t h = g * m.rep; h < (g + 1) * m.rep; ++h) {
      for (int64_t i = 0; i < S; ++i) {
        const int64_t row = (b * m.NQ + h) * S + i, qo = m.off(b, h, i, m.NQ, S);
        float *oi = o + qo;
        rope(a.q + qo, a.qc + (b * S + i) * D, a.qsn + (b * S + i) * D, qr.data(), D);
        for (int64_t d = 0; d < D; ++d) qr[d] *= scale;
        const int64_t jend = vis.jend[i];
        const int64_t nvis =
            row_scores(qr.data(), KT.data(), D, T, jend, s.data(), vis.exact, a.kpos, a.qpos[i], useg, ks, qs[i]);
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
        for (int64_t j = 0; j < jend; ++j) mx = std::max(mx, sp[j]);
        float l = 0.0f;
        for (int64_t j = 0; j < jend; ++j) {
          const float p = fexp(sp[j] - mx);
          sp[j] = p;
          l += p;
        }
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < D; ++d) {
          const float *__restrict vt = VT.data() + d * T;
          float acc = 0.0f;
          for (int64_t j = 0; j < jend; ++j) acc += sp[j] * vt[j];
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
  const Visibility vis(a.qpos, a.kpos, m.S, m.T);
  if (bwd_fixed(a, m, vis, scale, o, lse, dout, dq, dk, dv)) return 0;
  parallel_for(m.B * m.NK, [&](int64_t task) {  // any other (even) head_dim
    const int64_t b = task / m.NK, g = task % m.NK, S = m.S, T = m.T, D = m.D;
    std::vector<float> KT(D * T), VT(D * T), dKT(D * T, 0.0f), dVT(D * T, 0.0f), s(T), dp(T), qr(D), qsc(D),
        dqr(D);
    load_kv(a.k, a.v, a.kc, a.ksn, m, b, g, KT.data(), VT.data());
    const int32_t *qs = a.qseg + b * S, *ks = a.kseg + b * T;
    const bool useg = !seg_uniform(qs, ks, S, T);
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
        const int64_t jend = vis.jend[i];
        row_scores(qsc.data(), KT.data(), D, T, jend, s.data(), vis.exact, a.kpos, a.qpos[i], useg, ks, qs[i]);
        float Di = 0.0f;
        for (int64_t d = 0; d < D; ++d) Di += gi[d] * oi[d];
        float *__restrict sp = s.data();
        float *__restrict dpp = dp.data();
        for (int64_t j = 0; j < jend; ++j) {
          sp[j] = fexp(sp[j] - L);  // probabilities
          dpp[j] = 0.0f;
        }
        for (int64_t d = 0; d < D; ++d) {
          const float gd = gi[d];
          const float *__restrict vt = VT.data() + d * T;
          float *__restrict dvt = dVT.data() + d * T;
          for (int64_t j = 0; j < jend; ++j) {
            dpp[j] += gd * vt[j];
            dvt[j] += sp[j] * gd;
          }
        }
        for (int64_t j = 0; j < jend; ++j) dpp[j] = sp[j] * (dpp[j] - Di) * scale;  // d(scaled score) * scale
        for (int64_t d = 0; d < D; ++d) {
          const float qd = qr[d];
          const float *__restrict kt = KT.data() + d * T;
          float *__restrict dkt = dKT.data() + d * T;
          float acc = 0.0f;
          for (int64_t j = 0; j < jend; ++j) {
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

// ---------------------------------------------------------------------------------------------------------------
// cross entropy over the last axis: logits (N, V) fp32, targets (N,) int32 in [0, V)
// ---------------------------------------------------------------------------------------------------------------
constexpr int64_t kRowsPerTask = 64;

// outputs: loss (N,) = logsumexp(row) - row[target], lse (N,)
int ce_fwd(int nparam, void **params, int64_t **shapes, const char **dtypes) {
  if (nparam != 4 || !is_f32(dtypes[0]) || !is_i32(dtypes[1]) || !is_f32(dtypes[2]) || !is_f32(dtypes[3])) return 1;
  const float *x = (const float *)params[0];
  const int32_t *t = (const int32_t *)params[1];
  float *loss = (float *)params[2], *lse = (float *)params[3];
  const int64_t N = shapes[0][0], V = shapes[0][1];
  std::atomic<bool> bad(false);
  parallel_for((N + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    for (int64_t n = task * kRowsPerTask; n < std::min(N, (task + 1) * kRowsPerTask); ++n) {
      const float *__restrict r = x + n * V;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < V; ++j) mx = std::max(mx, r[j]);
      float l = 0.0f;
      for (int64_t j = 0; j < V; ++j) l += fexp(r[j] - mx);
      const float z = mx + std::log(l);
      lse[n] = z;
      if (t[n] < 0 || t[n] >= V) {
        bad = true;
        loss[n] = 0.0f;
      } else {
        loss[n] = z - r[t[n]];
      }
    }
  }, 2 * N * V);
  return bad ? 3 : 0;
}

// inputs: logits, targets, lse, grad of loss (N,); output: grad of logits (N, V)
int ce_bwd(int nparam, void **params, int64_t **shapes, const char **dtypes) {
  if (nparam != 5) return 1;
  for (int i : {0, 2, 3, 4})
    if (!is_f32(dtypes[i])) return 1;
  if (!is_i32(dtypes[1])) return 1;
  const float *x = (const float *)params[0], *lse = (const float *)params[2], *gl = (const float *)params[3];
  const int32_t *t = (const int32_t *)params[1];
  float *dx = (float *)params[4];
  const int64_t N = shapes[0][0], V = shapes[0][1];
  parallel_for((N + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    for (int64_t n = task * kRowsPerTask; n < std::min(N, (task + 1) * kRowsPerTask); ++n) {
      const float *__restrict r = x + n * V;
      float *__restrict dr = dx + n * V;
      const float z = lse[n], g = gl[n];
      for (int64_t j = 0; j < V; ++j) dr[j] = fexp(r[j] - z) * g;
      if (t[n] >= 0 && t[n] < V) dr[t[n]] -= g;
    }
  }, 2 * N * V);
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

extern "C" int MfsftCrossEntropyFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  return ce_fwd(nparam, params, shapes, dtypes);
}

extern "C" int MfsftCrossEntropyBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  return ce_bwd(nparam, params, shapes, dtypes);
}

// ---------------------------------------------------------------------------------------------------------------
// completion signal: a graph ends with this op (inputs: whatever it must follow); it writes to an eventfd so that
// the host thread can sleep until then instead of spinning in MindSpore's wait. Output: int32 (1,) = 1.
// ---------------------------------------------------------------------------------------------------------------
static std::atomic<int> g_notify_fd{-1};

extern "C" int MfsftSetNotifyFd(int fd) {
  g_notify_fd = fd;
  return 0;
}

extern "C" int MfsftNotify(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam < 1 || !is_i32(dtypes[nparam - 1])) return 1;
  *(int32_t *)params[nparam - 1] = 1;
  const int fd = g_notify_fd.load();
  if (fd >= 0) {
    const uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof(one));
    (void)r;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm over the last axis: x (..., H) fp32, weight (H,), eps (1,) -> y = weight * (x / sqrt(mean(x^2) + eps))
// ---------------------------------------------------------------------------------------------------------------
namespace {

int64_t rows_of(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i + 1 < nd; ++i) n *= shape[i];
  return n;
}

constexpr int64_t kNormRows = 128;

// outputs: y (like x), rstd (rows,)
int rms_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 5) return 1;
  for (int i = 0; i < 5; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const float *x = (const float *)params[0], *w = (const float *)params[1];
  const float eps = *(const float *)params[2];
  float *y = (float *)params[3], *rstd = (float *)params[4];
  const int64_t H = shapes[0][ndims[0] - 1], N = rows_of(ndims[0], shapes[0]);
  parallel_for((N + kNormRows - 1) / kNormRows, [&](int64_t task) {
    for (int64_t n = task * kNormRows; n < std::min(N, (task + 1) * kNormRows); ++n) {
      const float *__restrict xr = x + n * H;
      float *__restrict yr = y + n * H;
      float ss = 0.0f;
      for (int64_t h = 0; h < H; ++h) ss += xr[h] * xr[h];
      const float r = 1.0f / std::sqrt(ss / (float)H + eps);
      rstd[n] = r;
      for (int64_t h = 0; h < H; ++h) yr[h] = (xr[h] * r) * w[h];
    }
  }, N * H);
  return 0;
}

// inputs: x, weight, eps, rstd, dy; outputs: dx, dweight
int rms_bwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 7) return 1;
  for (int i = 0; i < 7; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const float *x = (const float *)params[0], *w = (const float *)params[1], *rstd = (const float *)params[3];
  const float *dy = (const float *)params[4];
  float *dx = (float *)params[5], *dw = (float *)params[6];
  const int64_t H = shapes[0][ndims[0] - 1], N = rows_of(ndims[0], shapes[0]);
  const int64_t tasks = (N + kNormRows - 1) / kNormRows;
  std::vector<float> part(tasks * H, 0.0f);  // per-task partial sums of dweight (summed in a fixed order)
  parallel_for(tasks, [&](int64_t task) {
    float *__restrict pw = part.data() + task * H;
    for (int64_t n = task * kNormRows; n < std::min(N, (task + 1) * kNormRows); ++n) {
      const float *__restrict xr = x + n * H, *__restrict gr = dy + n * H;
      float *__restrict dr = dx + n * H;
      const float r = rstd[n];
      float dot = 0.0f;
      for (int64_t h = 0; h < H; ++h) {
        dot += gr[h] * w[h] * xr[h];
        pw[h] += gr[h] * (xr[h] * r);
      }
      const float c = r * r * r * dot / (float)H;
      for (int64_t h = 0; h < H; ++h) dr[h] = gr[h] * w[h] * r - xr[h] * c;
    }
  }, 2 * N * H);
  for (int64_t h = 0; h < H; ++h) dw[h] = 0.0f;
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t h = 0; h < H; ++h) dw[h] += part[t * H + h];
  return 0;
}

// SwiGLU: silu(gate) * up, gate/up same shape fp32
int swiglu_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 3) return 1;
  for (int i = 0; i < 3; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const float *g = (const float *)params[0], *u = (const float *)params[1];
  float *y = (float *)params[2];
  int64_t n = 1;
  for (int i = 0; i < ndims[0]; ++i) n *= shapes[0][i];
  constexpr int64_t kChunk = 1 << 15;
  parallel_for((n + kChunk - 1) / kChunk, [&](int64_t task) {
    const int64_t e = std::min(n, (task + 1) * kChunk);
    for (int64_t i = task * kChunk; i < e; ++i) {
      const float s = 1.0f / (1.0f + fexp(-g[i]));
      y[i] = g[i] * s * u[i];
    }
  }, n);
  return 0;
}

// inputs: gate, up, dy; outputs: dgate, dup
int swiglu_bwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 5) return 1;
  for (int i = 0; i < 5; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const float *g = (const float *)params[0], *u = (const float *)params[1], *dy = (const float *)params[2];
  float *dg = (float *)params[3], *du = (float *)params[4];
  int64_t n = 1;
  for (int i = 0; i < ndims[0]; ++i) n *= shapes[0][i];
  constexpr int64_t kChunk = 1 << 15;
  parallel_for((n + kChunk - 1) / kChunk, [&](int64_t task) {
    const int64_t e = std::min(n, (task + 1) * kChunk);
    for (int64_t i = task * kChunk; i < e; ++i) {
      const float s = 1.0f / (1.0f + fexp(-g[i]));
      const float silu = g[i] * s;
      du[i] = dy[i] * silu;
      dg[i] = dy[i] * u[i] * (s + silu * (1.0f - s));
    }
  }, 2 * n);
  return 0;
}

}  // namespace

#define MFSFT_OP(name, fn)                                                                                 \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,        \
                      void *stream, void *extra) {                                                         \
    return fn(nparam, params, ndims, shapes, dtypes);                                                      \
  }
MFSFT_OP(MfsftRmsNormFwd, rms_fwd)
MFSFT_OP(MfsftRmsNormBwd, rms_bwd)
MFSFT_OP(MfsftSwigluFwd, swiglu_fwd)
MFSFT_OP(MfsftSwigluBwd, swiglu_bwd)

// ---------------------------------------------------------------------------------------------------------------
// AdamW step on many small fp32 parameters at once (trainer/optimizer.py, flat mode): the elementwise arithmetic
// of the basic-ops update in the same order, without reassociation (bit-identical results)
// ---------------------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC optimize("no-associative-math", "fp-contract=off")
namespace {

int64_t numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

// inputs: inv (1,), k gradients; output: (1,) sum over all elements of (g * inv)^2
int grad_sq_sum(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int k = nparam - 2;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const float inv = *(const float *)params[0];
  double acc = 0.0;
  for (int t = 0; t < k; ++t) {
    const float *g = (const float *)params[1 + t];
    const int64_t n = numel(ndims[1 + t], shapes[1 + t]);
    for (int64_t i = 0; i < n; ++i) {
      const float x = g[i] * inv;
      acc += (double)(x * x);
    }
  }
  *(float *)params[nparam - 1] = (float)acc;
  return 0;
}

// inputs: k gradients, k parameters, m (N,), v (N,), scal (6,) = [lr, bc1, bc2, inv_tokens, clip factor, apply],
//         hyper (6,) = [beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay], decays (k,) 1/0;
// outputs: m (N,), v (N,), k parameters. With apply == 0 the outputs are the inputs.
int adamw_flat(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if ((nparam - 7) % 3 != 0) return 1;
  const int k = (nparam - 7) / 3;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const float *m = (const float *)params[2 * k], *v = (const float *)params[2 * k + 1];
  const float *scal = (const float *)params[2 * k + 2], *hyper = (const float *)params[2 * k + 3];
  const float *decays = (const float *)params[2 * k + 4];
  float *mo = (float *)params[2 * k + 5], *vo = (float *)params[2 * k + 6];
  const float lr = scal[0], bc1 = scal[1], bc2 = scal[2], inv = scal[3], factor = scal[4];
  const bool apply = scal[5] != 0.0f;
  const float b1 = hyper[0], omb1 = hyper[1], b2 = hyper[2], omb2 = hyper[3], eps = hyper[4], wd = hyper[5];
  const float step_lr = lr / bc1, coef = lr * wd;
  int64_t off = 0;
  for (int t = 0; t < k; ++t) {
    const float *g = (const float *)params[t], *p = (const float *)params[k + t];
    float *po = (float *)params[2 * k + 7 + t];
    const int64_t n = numel(ndims[k + t], shapes[k + t]);
    if (!apply) {
      std::memcpy(po, p, n * sizeof(float));
      std::memcpy(mo + off, m + off, n * sizeof(float));
      std::memcpy(vo + off, v + off, n * sizeof(float));
      off += n;
      continue;
    }
    const bool decay = decays[t] != 0.0f && wd > 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float gi = (g[i] * inv) * factor;
      float pi = p[i];
      if (decay) pi = pi - coef * pi;
      const float mi = b1 * m[off + i] + omb1 * gi;
      const float vi = b2 * v[off + i] + (omb2 * gi) * gi;
      const float denom = std::sqrt(vi / bc2) + eps;
      po[i] = pi - (step_lr * mi) / denom;
      mo[off + i] = mi;
      vo[off + i] = vi;
    }
    off += n;
  }
  return 0;
}

}  // namespace
#pragma GCC pop_options

MFSFT_OP(MfsftGradSqSum, grad_sq_sum)
MFSFT_OP(MfsftAdamWFlat, adamw_flat)
