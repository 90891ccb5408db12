// Fused attention by blocks of query rows with GEMMs: the path taken when oneDNN's sgemm is found (any even
// head_dim). Per (batch, kv head, block of up to kQBlock query positions): the rep query heads of the kv group at
// those positions are the M rows of the GEMMs, the keys the block sees ([min jbeg, max jend)) the L columns:
//   forward   S = Q K^T, row softmax over the visible keys (scaled, masked), O = P V;
//   backward  S and P recomputed from the forward's log-sum-exp, dP = dO V^T, dS = P (dP - rowsum(dO O)),
//             dQ = dS K, dK += dS^T Q, dV += P^T dO.
// Exact softmax, no (S, T) matrix: at most (M, L) per task. The keys of a block's rows that a row may not see are
// masked, which costs at most a block's triangle of extra products. Rows that see no key behave as in the other
// paths (o = mean of v over all keys, lse = +inf). MFSFT_ATTN_GEMM=0 selects the row-by-row SIMD path instead.
// Compiled after cpu_attention_kernels.cc (Dims, Visibility, AttnArgs, rope, rope_t), which calls fwd_gemm /
// bwd_gemm; uses cpu_kernels.cc's parallel_for, fexp and gemm.
namespace {

constexpr int64_t kQBlock = 64;  // query positions per block: GEMMs of rep * 64 rows

bool attn_gemm_enabled() {
  const char *e = std::getenv("MFSFT_ATTN_GEMM");
  if (e && std::strcmp(e, "0") == 0) return false;
  return find_sgemm() != nullptr || plain_gemm_forced();
}

// K of batch b, kv head g after the rotary embedding, (T, D) row-major; V is read in place (row stride ldv)
struct KeyRows {
  std::vector<float> K;
  const float *V;
  int64_t ldv;
  KeyRows(const AttnArgs &a, const Dims &m, int64_t b, int64_t g) : K(m.T * m.D) {
    const int64_t D = m.D;
    for (int64_t j = 0; j < m.T; ++j)
      rope(a.k + m.off(b, g, j, m.NK, m.T), a.kc + (b * m.T + j) * D, a.ksn + (b * m.T + j) * D, &K[j * D], D);
    V = a.v + m.off(b, g, 0, m.NK, m.T);
    ldv = m.T > 1 ? m.off(b, g, 1, m.NK, m.T) - m.off(b, g, 0, m.NK, m.T) : D;
  }
};

// One block of query positions [i0, i0 + n) of batch b, kv head g: rows r = hl * n + (i - i0), hl < rep.
struct QBlock {
  int64_t b, g, i0, n, M, kb, L;
  QBlock(const Dims &m, const Visibility &vis, int64_t b_, int64_t g_, int64_t i0_, int64_t n_)
      : b(b_), g(g_), i0(i0_), n(n_), M(m.rep * n_) {
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
    for (int64_t i = i0; i < i0 + n; ++i) {
      lo = std::min(lo, vis.begin(b, i));
      hi = std::max(hi, vis.jend[i]);
    }
    kb = std::min(lo, hi);
    L = hi - kb;
  }
  int64_t pos(int64_t r) const { return i0 + r % n; }
  int64_t head(const Dims &m, int64_t r) const { return g * m.rep + r / n; }
};

// Q rows of the block after the rotary embedding (unscaled), (M, D)
void load_q(const AttnArgs &a, const Dims &m, const QBlock &blk, float *Q) {
  const int64_t D = m.D;
  for (int64_t r = 0; r < blk.M; ++r) {
    const int64_t i = blk.pos(r), qo = m.off(blk.b, blk.head(m, r), i, m.NQ, m.S);
    rope(a.q + qo, a.qc + (blk.b * m.S + i) * D, a.qsn + (blk.b * m.S + i) * D, Q + r * D, D);
  }
}

// Row r of S (L keys from blk.kb, unscaled products) -> the scaled scores of the keys its query sees, -inf
// elsewhere; returns [lo, hi), the row's key range relative to kb (outside it the caller writes 0)
inline void mask_row(const AttnArgs &a, const Dims &m, const Visibility &vis, const QBlock &blk, int64_t r,
                     float scale, float *__restrict s, int64_t &lo, int64_t &hi) {
  const int64_t i = blk.pos(r), b = blk.b;
  lo = vis.begin(b, i) - blk.kb;
  hi = vis.jend[i] - blk.kb;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t j = lo; j < hi; ++j) s[j] *= scale;
  if (vis.exact && !vis.useg[b]) return;
  const int32_t qp = a.qpos[i], qg = a.qseg[b * m.S + i];
  const int32_t *kp = a.kpos + blk.kb, *kg = a.kseg + b * m.T + blk.kb;
  const bool useg = vis.useg[b], exact = vis.exact;
  for (int64_t j = lo; j < hi; ++j) {
    const bool ok = (exact || kp[j] <= qp) && (!useg || kg[j] == qg);
    s[j] = ok ? s[j] : ninf;
  }
}

// o of a row that sees no key: the mean of v over all keys (as an additive -1e9 mask)
void mean_v(const Dims &m, const KeyRows &kr, float *o) {
  for (int64_t d = 0; d < m.D; ++d) {
    float t = 0.0f;
    for (int64_t j = 0; j < m.T; ++j) t += kr.V[j * kr.ldv + d];
    o[d] = t / (float)m.T;
  }
}

void fwd_block(const AttnArgs &a, const Dims &m, const Visibility &vis, const KeyRows &kr, float scale, float *o,
               float *lse, const QBlock &blk, std::vector<float> &Q, std::vector<float> &S, std::vector<float> &O) {
  const int64_t D = m.D, M = blk.M, L = blk.L;
  Q.resize(M * D), S.resize(M * std::max<int64_t>(L, 1)), O.resize(M * D);
  load_q(a, m, blk, Q.data());
  gemm(false, true, M, L, D, Q.data(), D, kr.K.data() + blk.kb * D, D, 0.0f, S.data(), L);
  std::vector<char> empty(M, 0);
  for (int64_t r = 0; r < M; ++r) {
    float *__restrict s = S.data() + r * L;
    int64_t lo, hi;
    mask_row(a, m, vis, blk, r, scale, s, lo, hi);
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = lo; j < hi; ++j) mx = s[j] > mx ? s[j] : mx;
    const int64_t row = (blk.b * m.NQ + blk.head(m, r)) * m.S + blk.pos(r);
    for (int64_t j = 0; j < lo; ++j) s[j] = 0.0f;
    for (int64_t j = std::max<int64_t>(hi, 0); j < L; ++j) s[j] = 0.0f;
    if (std::isinf(mx)) {  // no visible key
      for (int64_t j = lo; j < hi; ++j) s[j] = 0.0f;
      empty[r] = 1;
      lse[row] = std::numeric_limits<float>::infinity();
      continue;
    }
    const float l = exp_shifted(s, lo, hi, mx), inv = 1.0f / l;
    for (int64_t j = lo; j < hi; ++j) s[j] *= inv;
    lse[row] = mx + std::log(l);
  }
  gemm(false, false, M, D, L, S.data(), L, kr.V + blk.kb * kr.ldv, kr.ldv, 0.0f, O.data(), D);
  for (int64_t r = 0; r < M; ++r) {
    float *dst = o + m.off(blk.b, blk.head(m, r), blk.pos(r), m.NQ, m.S);
    if (empty[r])
      mean_v(m, kr, dst);
    else
      std::memcpy(dst, &O[r * D], D * sizeof(float));
  }
}

// adds this block's dK, dV (rotated-key gradients, (T, D) row-major) into dK, dV; writes its rows of dq
void bwd_block(const AttnArgs &a, const Dims &m, const Visibility &vis, const KeyRows &kr, float scale,
               const float *o, const float *lse, const float *dout, float *dq, float *dK, float *dV, const QBlock &blk,
               std::vector<float> &Q, std::vector<float> &G, std::vector<float> &S, std::vector<float> &dP) {
  const int64_t D = m.D, M = blk.M, L = blk.L, b = blk.b;
  Q.resize(M * D), G.resize(M * D), S.resize(M * std::max<int64_t>(L, 1)), dP.resize(M * std::max<int64_t>(L, 1));
  load_q(a, m, blk, Q.data());
  std::vector<float> Di(M);
  std::vector<char> empty(M, 0);
  for (int64_t r = 0; r < M; ++r) {
    const int64_t qo = m.off(b, blk.head(m, r), blk.pos(r), m.NQ, m.S);
    std::memcpy(&G[r * D], dout + qo, D * sizeof(float));
    float t = 0.0f;
    for (int64_t d = 0; d < D; ++d) t += G[r * D + d] * o[qo + d];
    Di[r] = t;
    const float Lr = lse[(b * m.NQ + blk.head(m, r)) * m.S + blk.pos(r)];
    empty[r] = std::isinf(Lr) && Lr > 0;
  }
  gemm(false, true, M, L, D, Q.data(), D, kr.K.data() + blk.kb * D, D, 0.0f, S.data(), L);
  gemm(false, true, M, L, D, G.data(), D, kr.V + blk.kb * kr.ldv, kr.ldv, 0.0f, dP.data(), L);
  for (int64_t r = 0; r < M; ++r) {
    float *__restrict s = S.data() + r * L, *__restrict dp = dP.data() + r * L;
    int64_t lo, hi;
    mask_row(a, m, vis, blk, r, scale, s, lo, hi);
    const float Lr = lse[(b * m.NQ + blk.head(m, r)) * m.S + blk.pos(r)];
    for (int64_t j = 0; j < L; ++j) {
      const bool in = j >= lo && j < hi && !empty[r];
      const float p = in ? fexp(s[j] - Lr) : 0.0f;
      s[j] = p;                                  // P
      dp[j] = p * (dp[j] - Di[r]) * scale;       // d(scaled score) * scale
    }
  }
  std::vector<float> dQ(M * D);
  gemm(false, false, M, D, L, dP.data(), L, kr.K.data() + blk.kb * D, D, 0.0f, dQ.data(), D);
  gemm(true, false, L, D, M, dP.data(), L, Q.data(), D, 1.0f, dK + blk.kb * D, D);
  gemm(true, false, L, D, M, S.data(), L, G.data(), D, 1.0f, dV + blk.kb * D, D);
  for (int64_t r = 0; r < M; ++r) {
    const int64_t i = blk.pos(r), qo = m.off(b, blk.head(m, r), i, m.NQ, m.S);
    if (empty[r]) {  // no visible key: o = mean(v); d/dv_j = do / T; nothing for q, k
      for (int64_t d = 0; d < D; ++d) dq[qo + d] = 0.0f;
      for (int64_t j = 0; j < m.T; ++j)
        for (int64_t d = 0; d < D; ++d) dV[j * D + d] += G[r * D + d] / (float)m.T;
      continue;
    }
    rope_t(&dQ[r * D], a.qc + (b * m.S + i) * D, a.qsn + (b * m.S + i) * D, dq + qo, D);
  }
}

// The tasks as the SIMD path: (batch, kv head) x vis.nblk blocks of query rows of about equal work; each task
// walks its rows kQBlock at a time. With nblk > 1 each task has its own dK/dV buffer, summed in block order.
bool fwd_gemm(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, float *o, float *lse) {
  if (!attn_gemm_enabled()) return false;
  const int64_t nb = vis.nblk, G = m.B * m.NK;
  std::vector<std::unique_ptr<KeyRows>> krs(G);
  parallel_for(G, [&](int64_t t) { krs[t].reset(new KeyRows(a, m, t / m.NK, t % m.NK)); }, m.B * m.T * m.NK * m.D);
  parallel_for(G * nb, [&](int64_t t) {
    const int64_t bg = t / nb, k = t % nb, b = bg / m.NK, g = bg % m.NK;
    const int64_t *bl = vis.block(b);
    std::vector<float> Q, S, O;
    for (int64_t i = bl[k]; i < bl[k + 1]; i += kQBlock)
      fwd_block(a, m, vis, *krs[bg], scale, o, lse, QBlock(m, vis, b, g, i, std::min(kQBlock, bl[k + 1] - i)), Q,
                S, O);
  });
  return true;
}

bool bwd_gemm(const AttnArgs &a, const Dims &m, const Visibility &vis, float scale, const float *o, const float *lse,
              const float *dout, float *dq, float *dk, float *dv) {
  if (!attn_gemm_enabled()) return false;
  const int64_t nb = vis.nblk, G = m.B * m.NK, n = m.T * m.D;
  std::vector<std::unique_ptr<KeyRows>> krs(G);
  parallel_for(G, [&](int64_t t) { krs[t].reset(new KeyRows(a, m, t / m.NK, t % m.NK)); }, m.B * m.T * m.NK * m.D);
  std::vector<float> buf((size_t)(G * nb * 2 * n), 0.0f);  // per task: dK, dV (T, D)
  parallel_for(G * nb, [&](int64_t t) {
    const int64_t bg = t / nb, k = t % nb, b = bg / m.NK, g = bg % m.NK;
    const int64_t *bl = vis.block(b);
    float *dK = buf.data() + t * 2 * n;
    std::vector<float> Q, Gb, S, dP;
    for (int64_t i = bl[k]; i < bl[k + 1]; i += kQBlock)
      bwd_block(a, m, vis, *krs[bg], scale, o, lse, dout, dq, dK, dK + n,
                QBlock(m, vis, b, g, i, std::min(kQBlock, bl[k + 1] - i)), Q, Gb, S, dP);
  });
  parallel_for(G, [&](int64_t bg) {
    float *dK = buf.data() + bg * nb * 2 * n, *dV = dK + n;
    for (int64_t k = 1; k < nb; ++k) {
      const float *src = dK + k * 2 * n;
      for (int64_t x = 0; x < 2 * n; ++x) dK[x] += src[x];
    }
    const int64_t b = bg / m.NK, g = bg % m.NK, D = m.D;
    for (int64_t j = 0; j < m.T; ++j) {  // back through the rotary embedding of k
      const int64_t ko = m.off(b, g, j, m.NK, m.T);
      rope_t(dK + j * D, a.kc + (b * m.T + j) * D, a.ksn + (b * m.T + j) * D, dk + ko, D);
      std::memcpy(dv + ko, dV + j * D, D * sizeof(float));
    }
  });
  return true;
}

}  // namespace

// 1 when attention takes the GEMM path in this process (tests and benches ask through ctypes)
extern "C" int MfsftAttnGemmEnabled() { return attn_gemm_enabled() ? 1 : 0; }
