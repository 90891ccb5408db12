// Fused cross entropy (MindSpore Custom "aot" ops), fp32: per-row log-softmax loss and its gradient; and the
// logits head fused with it (the head's GEMMs by blocks of the vocabulary, each block's softmax work done while the
// block is in cache, the gradient of the logits never written out whole).
// Compiled as one translation unit after cpu_kernels.cc (models/kernels.py joins the sources in the order of
// CPU_SOURCE_FILES), so it uses that file's includes and helpers: parallel_for, n_threads, fexp, gemm, is_f32,
// is_i32.
namespace {

// max of x[0 .. n) (-inf for n == 0), with vector intrinsics where the build has them (a plain max loop is not
// vectorized without -ffinite-math-only, which the masks' -inf rule out)
inline float row_max(const float *__restrict x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 v = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) v = _mm512_max_ps(v, _mm512_loadu_ps(x + i));
  m = _mm512_reduce_max_ps(v);
#elif defined(__AVX__)
  __m256 v = _mm256_set1_ps(m);
  for (; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + i));
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  for (float l : lanes) m = std::max(m, l);
#endif
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
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
      const float mx = row_max(r, V);
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

// ---------------------------------------------------------------------------------------------------------------
// logits head + cross entropy: h (R, H), W (V, H) fp32 (logits = h W^T), targets (R,) int32 in [0, V), or -1 for a
// row without a target (no loss, no gradient, no work: the rows with targets are gathered first, and the logits of
// the c-th of them are row c of the logits output). Each thread takes a contiguous range of vocabulary blocks of
// kHeadBlock rows of W (dnnl_sgemm runs sequentially in each thread, cpu_kernels.cc gemm).
// ---------------------------------------------------------------------------------------------------------------
constexpr int64_t kHeadBlock = 512;   // vocabulary rows per block: its logits are reused while in cache

struct HeadRows {
  std::vector<int64_t> idx;    // the rows with a target, in order
  std::vector<float> h;        // their hidden states (idx.size(), H)
  bool bad = false;            // a target outside [-1, V)
  HeadRows(const float *h_all, const int32_t *t, int64_t R, int64_t H, int64_t V) {
    for (int64_t r = 0; r < R; ++r) {
      if (t[r] >= 0 && t[r] < V) idx.push_back(r);
      else if (t[r] != -1) bad = true;
    }
    h.resize(idx.size() * H);
    for (size_t c = 0; c < idx.size(); ++c) std::memcpy(&h[c * H], h_all + idx[c] * H, H * sizeof(float));
  }
};

struct VocabSplit {
  int64_t blocks, threads;
  explicit VocabSplit(int64_t V)
      : blocks((V + kHeadBlock - 1) / kHeadBlock), threads(std::min<int64_t>(n_threads(), blocks)) {}
  int64_t first(int64_t t) const { return blocks * t / threads; }
};

// outputs: loss (R,) = lse - logits[target] (0 without a target), lse (R,), logits (R, V) (kept for the backward)
int head_ce_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 6 || ndims[0] != 2 || ndims[1] != 2 || !is_i32(dtypes[2])) return 1;
  for (int i : {0, 1, 3, 4, 5})
    if (!is_f32(dtypes[i])) return 1;
  const float *w = (const float *)params[1];
  const int32_t *t = (const int32_t *)params[2];
  float *loss = (float *)params[3], *lse = (float *)params[4], *logits = (float *)params[5];
  const int64_t R = shapes[0][0], H = shapes[0][1], V = shapes[1][0];
  if (shapes[1][1] != H) return 1;
  const HeadRows rows((const float *)params[0], t, R, H, V);
  const int64_t C = (int64_t)rows.idx.size();
  std::fill(loss, loss + R, 0.0f);
  std::fill(lse, lse + R, 0.0f);
  if (C == 0) return rows.bad ? 3 : 0;
  const VocabSplit split(V);
  const float ninf = -std::numeric_limits<float>::infinity();
  // per thread and row: running max and sum of exp(x - max) over the thread's blocks
  std::vector<float> mx(split.threads * C, ninf), sm(split.threads * C, 0.0f);
  parallel_for(split.threads, [&](int64_t th) {
    float *m = mx.data() + th * C, *s = sm.data() + th * C;
    for (int64_t b = split.first(th); b < split.first(th + 1); ++b) {
      const int64_t j0 = b * kHeadBlock, n = std::min(kHeadBlock, V - j0);
      gemm(false, true, C, n, H, rows.h.data(), H, w + j0 * H, H, 0.0f, logits + j0, V);
      for (int64_t c = 0; c < C; ++c) {
        const float *__restrict x = logits + c * V + j0;
        const float nm = std::max(m[c], row_max(x, n));
        float acc = 0.0f;
        for (int64_t j = 0; j < n; ++j) acc += fexp(x[j] - nm);
        s[c] = (m[c] == ninf ? 0.0f : s[c] * fexp(m[c] - nm)) + acc;
        m[c] = nm;
      }
    }
  }, C * V);
  for (int64_t c = 0; c < C; ++c) {
    float M = ninf, S = 0.0f;
    for (int64_t th = 0; th < split.threads; ++th) M = std::max(M, mx[th * C + c]);
    for (int64_t th = 0; th < split.threads; ++th)
      if (mx[th * C + c] != ninf) S += sm[th * C + c] * fexp(mx[th * C + c] - M);
    const int64_t r = rows.idx[c];
    lse[r] = M + std::log(S);
    loss[r] = lse[r] - logits[c * V + t[r]];
  }
  return rows.bad ? 3 : 0;
}

// inputs: h, W, targets, logits, lse, grad of loss (R,); outputs: grad of h (R, H)[, grad of W (V, H)] (a frozen
// W: no gradient, half the work). Per block: dL = (softmax - onehot) * g in a thread's buffer, dW[block] = dL^T h,
// dh += dL W[block] (rows with a target only; the others' dh is 0).
int head_ce_bwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if ((nparam != 7 && nparam != 8) || !is_i32(dtypes[2])) return 1;
  for (int i = 0; i < nparam; ++i)
    if (i != 2 && !is_f32(dtypes[i])) return 1;
  const float *w = (const float *)params[1];
  const int32_t *t = (const int32_t *)params[2];
  const float *logits = (const float *)params[3], *lse = (const float *)params[4], *gl = (const float *)params[5];
  float *dh = (float *)params[6], *dw = nparam == 8 ? (float *)params[7] : nullptr;
  const int64_t R = shapes[0][0], H = shapes[0][1], V = shapes[1][0];
  const HeadRows rows((const float *)params[0], t, R, H, V);
  const int64_t C = (int64_t)rows.idx.size();
  const VocabSplit split(V);
  // per thread: the gradient of the gathered rows (C, H), summed and scattered into dh at the end
  std::vector<float> part(split.threads * C * H);
  parallel_for(split.threads, [&](int64_t th) {
    float *acc = part.data() + th * C * H;
    std::vector<float> dl(C * kHeadBlock);
    bool first = true;
    for (int64_t b = split.first(th); b < split.first(th + 1); ++b) {
      const int64_t j0 = b * kHeadBlock, n = std::min(kHeadBlock, V - j0);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t r = rows.idx[c];
        const float *__restrict x = logits + c * V + j0;
        float *__restrict d = dl.data() + c * n;
        const float z = lse[r], g = gl[r];
        for (int64_t j = 0; j < n; ++j) d[j] = fexp(x[j] - z) * g;
        if (t[r] >= j0 && t[r] < j0 + n) d[t[r] - j0] -= g;
      }
      if (dw) {
        if (C > 0) gemm(true, false, n, H, C, dl.data(), n, rows.h.data(), H, 0.0f, dw + j0 * H, H);
        else std::fill(dw + j0 * H, dw + (j0 + n) * H, 0.0f);
      }
      gemm(false, false, C, H, n, dl.data(), n, w + j0 * H, H, first ? 0.0f : 1.0f, acc, H);
      first = false;
    }
    if (first) std::fill(acc, acc + C * H, 0.0f);
  }, C * V);
  std::fill(dh, dh + R * H, 0.0f);
  parallel_for((C + 63) / 64, [&](int64_t task) {
    for (int64_t c = task * 64; c < std::min(C, (task + 1) * 64); ++c) {
      float *__restrict o = dh + rows.idx[c] * H;
      for (int64_t th = 0; th < split.threads; ++th) {
        const float *__restrict p = part.data() + th * C * H + c * H;
        for (int64_t k = 0; k < H; ++k) o[k] += p[k];
      }
    }
  }, C * H);
  return 0;
}

}  // namespace

// two names per kernel: the op with a frozen weight (no dW output) must not share its name with the other
// (MindSpore caches an op's inferred outputs by name and inputs)
MFSFT_OP(MfsftHeadCeFwd, head_ce_fwd)
MFSFT_OP(MfsftHeadCeFwdFrozen, head_ce_fwd)
MFSFT_OP(MfsftHeadCeBwd, head_ce_bwd)
MFSFT_OP(MfsftHeadCeBwdInput, head_ce_bwd)

extern "C" int MfsftCrossEntropyFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  return ce_fwd(nparam, params, shapes, dtypes);
}

extern "C" int MfsftCrossEntropyBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  return ce_bwd(nparam, params, shapes, dtypes);
}
