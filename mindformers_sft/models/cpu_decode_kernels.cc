// The fused decode step (models/fused_decode.py): the new tokens of every row (one per decode step, or whole
// left-padded prompts at prefill) through the WHOLE decoder in one kernel call -- embedding, every layer (RMSNorm,
// q/k/v projections with optional bias, LoRA and per-head q/k RMSNorm, rotary embedding, grouped-query attention
// over the KV cache, output projection, SwiGLU MLP) and the logits.
// Compiled after cpu_kernels.cc (CPU_SOURCE_FILES), so it uses that file's parallel_for, is_f32, is_i32.
//
// Why one kernel: a decode step of a small model is ~100 tiny ops; MindSpore spends ~40 us launching each on CPU,
// far more than their arithmetic. Weights are read in place (pointers in `table`, see fused_decode.py), the new
// token's k and v are written in place into the host KV cache (column T of every layer), every projection is one
// (B x K) . (N x K)^T product over all rows (weights read once per step).
// A prefill (many rows) runs differently: each layer's weights are transposed once (K x N, so the matmul tiles
// accumulate over k without horizontal sums) and blocks of rows go through the layer on the kernel threads, in
// two passes (q/k/v into the cache; then attention and the MLP, which need every row's k and v).
//
// Inputs: tokens int32 (B, S), positions int32 (B, S), key mask bool (B, T + S) (T: the cache's length; columns
// T.. are the new tokens, each seeing the columns up to its own; False hides a key), table int64 (see the k*
// constants below, written by fused_decode.DecodePlan). Output: logits fp32 (B, 1, V) of each row's last token.
// S = 1 is a decode step; S > 1 with T = 0 is a prefill of (left-padded) prompts.
#include <cmath>

namespace decode {

// table header slots
constexpr int kLayers = 0, kHidden = 1, kHeads = 2, kKvHeads = 3, kHeadDim = 4, kInter = 5, kVocab = 6,
              kQkvMode = 7, kMlpMode = 8, kEps = 9, kEmbed = 10, kFinalNorm = 11, kOutput = 12, kInvFreq = 13,
              kCache = 14, kCapacity = 15, kCacheRows = 16, kHeader = 20;
// per layer: norms, then linears of kLin slots each: weight, bias, lora_a, lora_b, rank, scaling (float bits)
constexpr int kAttnNorm = 0, kFfnNorm = 1, kQNorm = 2, kKNorm = 3, kLin0 = 4, kLin = 6, kLinears = 7;
constexpr int kPerLayer = kLin0 + kLin * kLinears;
// linear order in a layer: q (or fused qkv), k, v, o, gate (or fused gate|up), up, down
constexpr int kQ = 0, kK = 1, kV = 2, kO = 3, kGate = 4, kUp = 5, kDown = 6;
// modes: 0 separate matrices, 1 one fused matrix [q; k; v] / [gate; up], 2 fused and interleaved (qkv per kv
// group [q heads of the group, k, v]; gate|up per row pair [gate_i, up_i])

// a decode step's pieces are small: threads (started per call by parallel_for) only for >= 2M multiply-adds
constexpr int64_t kMinThreadedWork = 1 << 21;

inline float f32_of(int64_t bits) {
  int32_t b = (int32_t)bits;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

struct Linear {
  const float *w, *bias, *a, *b;
  int64_t rank;
  float scaling;
};

Linear linear_at(const int64_t *slot) {
  return {(const float *)slot[0], (const float *)slot[1], (const float *)slot[2], (const float *)slot[3], slot[4],
          f32_of(slot[5])};
}

inline float dot(const float *x, const float *w, int64_t k) {
  float s = 0.f;
  for (int64_t i = 0; i < k; ++i) s += x[i] * w[i];
  return s;
}

// y[r * ldy + n] (+)= x[r * K ..] . w[n * K ..] (+ bias[n]) for r < R, n < N: tiles of 4 rows of x by 4 rows of w
// (16 independent sums over k: each loaded vector is used four times), a block of 16 rows of w per task
void matmul_t(const float *x, int64_t R, int64_t K, const float *w, int64_t N, const float *bias, float *y,
              int64_t ldy, bool accumulate, bool threads) {
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  auto put = [&](int64_t r, int64_t n, float v) {
    v += bias ? bias[n] : 0.f;
    y[r * ldy + n] = accumulate ? y[r * ldy + n] + v : v;
  };
  parallel_for(blocks, [&](int64_t blk) {
    const int64_t n0 = blk * kBlock, n1 = std::min(N, n0 + kBlock);
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) {
      const float *__restrict x0 = x + r * K, *__restrict x1 = x0 + K, *__restrict x2 = x1 + K,
                  *__restrict x3 = x2 + K;
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) {
        const float *__restrict w0 = w + n * K, *__restrict w1 = w0 + K, *__restrict w2 = w1 + K,
                    *__restrict w3 = w2 + K;
        // 16 sums, each vectorized over k by the compiler (written out: a 4x4 array would be vectorized over i, j)
        float s00 = 0.f, s01 = 0.f, s02 = 0.f, s03 = 0.f, s10 = 0.f, s11 = 0.f, s12 = 0.f, s13 = 0.f;
        float s20 = 0.f, s21 = 0.f, s22 = 0.f, s23 = 0.f, s30 = 0.f, s31 = 0.f, s32 = 0.f, s33 = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          const float a0 = x0[k], a1 = x1[k], a2 = x2[k], a3 = x3[k], b0 = w0[k], b1 = w1[k], b2 = w2[k], b3 = w3[k];
          s00 += a0 * b0, s01 += a0 * b1, s02 += a0 * b2, s03 += a0 * b3;
          s10 += a1 * b0, s11 += a1 * b1, s12 += a1 * b2, s13 += a1 * b3;
          s20 += a2 * b0, s21 += a2 * b1, s22 += a2 * b2, s23 += a2 * b3;
          s30 += a3 * b0, s31 += a3 * b1, s32 += a3 * b2, s33 += a3 * b3;
        }
        const float sums[4][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}, {s20, s21, s22, s23},
                                  {s30, s31, s32, s33}};
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) put(r + i, n + j, sums[i][j]);
      }
      for (; n < n1; ++n)
        for (int i = 0; i < 4; ++i) put(r + i, n, dot(x + (r + i) * K, w + n * K, K));
    }
    for (; r < R; ++r) {        // the last R % 4 rows (all rows of a decode step with fewer than 4 sequences)
      const float *__restrict xr = x + r * K;
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) {
        const float *__restrict w0 = w + n * K, *__restrict w1 = w0 + K, *__restrict w2 = w1 + K,
                    *__restrict w3 = w2 + K;
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          const float xv = xr[k];
          s0 += xv * w0[k];
          s1 += xv * w1[k];
          s2 += xv * w2[k];
          s3 += xv * w3[k];
        }
        put(r, n, s0);
        put(r, n + 1, s1);
        put(r, n + 2, s2);
        put(r, n + 3, s3);
      }
      for (; n < n1; ++n) put(r, n, dot(xr, w + n * K, K));
    }
  }, threads && R * N * K >= kMinThreadedWork ? R * N * K : 0);
}

// y[r * ldy + n] (+)= x[r * K ..] . wt[.. n] (+ bias[n]) with the weight transposed (K, N) (a prefill: many rows):
// tiles of 4 rows by 32 columns accumulated over k (each weight vector loaded once per 4 rows, no horizontal sums)
void matmul_kn(const float *x, int64_t R, int64_t K, const float *wt, int64_t N, const float *bias, float *y,
               int64_t ldy, bool accumulate) {
  constexpr int64_t NB = 32;
  auto put = [&](int64_t r, int64_t n, float v) {
    v += bias ? bias[n] : 0.f;
    y[r * ldy + n] = accumulate ? y[r * ldy + n] + v : v;
  };
  int64_t r = 0;
  for (; r < R; r += 4) {
    const int64_t nr = std::min<int64_t>(4, R - r);
    int64_t n = 0;
    for (; n + NB <= N; n += NB) {
      float acc[4][NB] = {};
      for (int64_t k = 0; k < K; ++k) {
        const float *__restrict wk = wt + k * N + n;
        for (int64_t i = 0; i < 4; ++i) {
          const float xv = i < nr ? x[(r + i) * K + k] : 0.f;
          for (int64_t j = 0; j < NB; ++j) acc[i][j] += xv * wk[j];
        }
      }
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t j = 0; j < NB; ++j) put(r + i, n + j, acc[i][j]);
    }
    for (; n < N; ++n)
      for (int64_t i = 0; i < nr; ++i) {
        float sum = 0.f;
        for (int64_t k = 0; k < K; ++k) sum += x[(r + i) * K + k] * wt[k * N + n];
        put(r + i, n, sum);
      }
  }
}

// a linear (with its LoRA update, dropout off) of R rows: y (R, ldy) columns [0, N)
void apply(const Linear &l, const float *x, int64_t R, int64_t K, int64_t N, float *y, int64_t ldy, bool acc,
           std::vector<float> &tmp, bool threads, const float *wt = nullptr) {
  if (wt)
    matmul_kn(x, R, K, wt, N, l.bias, y, ldy, acc);
  else
    matmul_t(x, R, K, l.w, N, l.bias, y, ldy, acc, threads);
  if (!l.a) return;
  tmp.assign(R * l.rank, 0.f);
  matmul_t(x, R, K, l.a, l.rank, nullptr, tmp.data(), l.rank, false, threads);
  for (auto &t : tmp) t *= l.scaling;
  matmul_t(tmp.data(), R, l.rank, l.b, N, nullptr, y, ldy, true, threads);
}

void rms_norm(const float *x, const float *w, float eps, int64_t n, float *y) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

// softmax attention of `rep` query heads (head r at q + r * q_step) over n keys/values (rows of D) with an additive
// mask (0 or -inf); outputs (rep, D) contiguous at out. DD > 0: the head dim known at compile time (unrolled)
template <int DD>
void attend_group_d(const float *q, int64_t q_step, int64_t rep, const float *__restrict ks,
                    const float *__restrict vs, const float *mb, int64_t n, int64_t d_rt, float scale, float *out) {
  const int64_t D = DD > 0 ? DD : d_rt;
  std::vector<float> p(n), acc_rt(DD > 0 ? 0 : D);
  float acc_ct[DD > 0 ? DD : 1];
  float *__restrict acc = DD > 0 ? acc_ct : acc_rt.data();   // the output row, kept in registers when DD > 0
  for (int64_t r = 0; r < rep; ++r) {
    const float *__restrict qr = q + r * q_step;
    float m = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      const float *__restrict kj = ks + j * D;
      float dotv = 0.f;
      for (int64_t i = 0; i < D; ++i) dotv += qr[i] * kj[i];
      p[j] = dotv * scale + mb[j];
      m = std::max(m, p[j]);
    }
    for (int64_t i = 0; i < D; ++i) acc[i] = 0.f;
    if (m != -INFINITY) {           // every key hidden (a left-padding token): zeros, never NaN
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = fexp(p[j] - m);      // exactly 0 at a hidden key (-inf)
        sum += p[j];
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < n; ++j) {
        const float pj = p[j] * inv;
        const float *__restrict vj = vs + j * D;
        for (int64_t i = 0; i < D; ++i) acc[i] += pj * vj[i];
      }
    }
    std::memcpy(out + r * D, acc, D * sizeof(float));
  }
}

void attend_group(const float *q, int64_t q_step, int64_t rep, const float *ks, const float *vs, const float *mb,
                  int64_t n, int64_t D, float scale, float *out) {
  switch (D) {
    case 8: return attend_group_d<8>(q, q_step, rep, ks, vs, mb, n, D, scale, out);
    case 16: return attend_group_d<16>(q, q_step, rep, ks, vs, mb, n, D, scale, out);
    case 32: return attend_group_d<32>(q, q_step, rep, ks, vs, mb, n, D, scale, out);
    case 64: return attend_group_d<64>(q, q_step, rep, ks, vs, mb, n, D, scale, out);
    case 128: return attend_group_d<128>(q, q_step, rep, ks, vs, mb, n, D, scale, out);
    default: return attend_group_d<0>(q, q_step, rep, ks, vs, mb, n, D, scale, out);
  }
}

// everything one call needs, shared by the phases below
struct Step {
  int64_t B, S, T, TS, R, L, H, NQ, NKV, D, I, V, qkv_mode, mlp_mode, C, rep, QKV, QD;
  float eps, scale;
  const int64_t *t;
  float *cache;               // (L, 2, B, NKV, C, D)
  std::vector<float> x, xn, qkv, o, gu, act, cosv, sinv, bias;

  // offsets of q head h, k head g, v head g inside a row of qkv
  int64_t q_off(int64_t h) const { return qkv_mode == 2 ? (h / rep) * (rep + 2) * D + (h % rep) * D : h * D; }
  int64_t k_off(int64_t g) const { return qkv_mode == 2 ? g * (rep + 2) * D + rep * D : QD + g * D; }
  int64_t v_off(int64_t g) const { return qkv_mode == 2 ? g * (rep + 2) * D + (rep + 1) * D : QD + NKV * D + g * D; }
  const int64_t *layer(int64_t l) const { return t + kHeader + l * kPerLayer; }
  Linear lin(int64_t l, int which) const { return linear_at(layer(l) + kLin0 + which * kLin); }
  float *kc(int64_t l) const { return cache + (l * 2) * B * NKV * C * D; }
  float *vc(int64_t l) const { return cache + (l * 2 + 1) * B * NKV * C * D; }

  // a prefill's weights of the current layer transposed to (K, N) (matmul_kn), or none (matmul_t)
  std::vector<float> wt[kLinears];
  bool transposed = false;
  const float *w_t(int which) const { return transposed && !wt[which].empty() ? wt[which].data() : nullptr; }

  // (N, K) of linear `which` (N = 0: not present in this layout)
  std::pair<int64_t, int64_t> shape_of(int which) const {
    const bool f = qkv_mode != 0, g = mlp_mode != 0;
    switch (which) {
      case kQ: return {f ? QKV : QD, H};
      case kK: case kV: return {f ? 0 : NKV * D, H};
      case kO: return {H, QD};
      case kGate: return {g ? 2 * I : I, H};
      case kUp: return {g ? 0 : I, H};
      default: return {H, I};
    }
  }

  // transpose layer l's weights (each read once: a small cost next to a prefill's many rows)
  void transpose_layer(int64_t l) {
    transposed = true;
    for (int which = 0; which < kLinears; ++which) {
      const Linear li = lin(l, which);
      const auto [N, K] = shape_of(which);
      if (!li.w || N == 0) {
        wt[which].clear();
        continue;
      }
      wt[which].resize(N * K);
      float *dst = wt[which].data();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) dst[k * N + n] = li.w[n * K + k];
    }
  }

  // rows [r0, r1) of layer l: attention norm, q/k/v projections, q/k norm, rotary embedding; k, v into the cache
  void project(int64_t l, int64_t r0, int64_t r1, bool threads, std::vector<float> &tmp) {
    const int64_t *lt = layer(l), n = r1 - r0;
    for (int64_t r = r0; r < r1; ++r) rms_norm(&x[r * H], (const float *)lt[kAttnNorm], eps, H, &xn[r * H]);
    const float *xr = &xn[r0 * H];
    float *qr = &qkv[r0 * QKV];
    if (qkv_mode == 0) {
      apply(lin(l, kQ), xr, n, H, QD, qr, QKV, false, tmp, threads, w_t(kQ));
      apply(lin(l, kK), xr, n, H, NKV * D, qr + QD, QKV, false, tmp, threads, w_t(kK));
      apply(lin(l, kV), xr, n, H, NKV * D, qr + QD + NKV * D, QKV, false, tmp, threads, w_t(kV));
    } else {
      apply(lin(l, kQ), xr, n, H, QKV, qr, QKV, false, tmp, threads, w_t(kQ));
    }
    const float *qn = (const float *)lt[kQNorm], *kn = (const float *)lt[kKNorm];
    float *kcl = kc(l), *vcl = vc(l);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / S, col = T + r % S;
      float *row = &qkv[r * QKV];
      const float *cs = &cosv[r * D / 2], *sn = &sinv[r * D / 2];
      auto rope = [&](float *v, const float *norm) {
        if (norm) rms_norm(v, norm, eps, D, v);
        for (int64_t i = 0; i < D / 2; ++i) {
          const float a = v[i], c = v[i + D / 2];
          v[i] = a * cs[i] - c * sn[i];
          v[i + D / 2] = c * cs[i] + a * sn[i];
        }
      };
      for (int64_t h = 0; h < NQ; ++h) rope(row + q_off(h), qn);
      for (int64_t g = 0; g < NKV; ++g) {
        rope(row + k_off(g), kn);
        std::memcpy(kcl + ((b * NKV + g) * C + col) * D, row + k_off(g), D * sizeof(float));
        std::memcpy(vcl + ((b * NKV + g) * C + col) * D, row + v_off(g), D * sizeof(float));
      }
    }
  }

  // attention of a decode step (one token per row): one task per (row, kv head) serves its `rep` query heads
  void attend_decode(int64_t l) {
    const float *kcl = kc(l), *vcl = vc(l);
    const int64_t work = R * NQ * TS * D * 2;
    parallel_for(R * NKV, [&](int64_t task) {
      const int64_t r = task / NKV, g = task % NKV, b = r / S, s = r % S;
      attend_group(&qkv[r * QKV + q_off(g * rep)], D, rep, kcl + (b * NKV + g) * C * D,
                   vcl + (b * NKV + g) * C * D, &bias[b * TS], T + s + 1, D, scale, &o[r * QD + g * rep * D]);
    }, work >= kMinThreadedWork ? work : 0);
  }

  // rows [r0, r1) of layer l after attention: output projection (+ residual), ffn norm, gate/up, SwiGLU, down
  void mlp(int64_t l, int64_t r0, int64_t r1, bool threads, std::vector<float> &tmp) {
    const int64_t *lt = layer(l), n = r1 - r0;
    apply(lin(l, kO), &o[r0 * QD], n, QD, H, &x[r0 * H], H, true, tmp, threads, w_t(kO));
    for (int64_t r = r0; r < r1; ++r) rms_norm(&x[r * H], (const float *)lt[kFfnNorm], eps, H, &xn[r * H]);
    float *gr = &gu[r0 * 2 * I];
    if (mlp_mode == 0) {
      apply(lin(l, kGate), &xn[r0 * H], n, H, I, gr, 2 * I, false, tmp, threads, w_t(kGate));
      apply(lin(l, kUp), &xn[r0 * H], n, H, I, gr + I, 2 * I, false, tmp, threads, w_t(kUp));
    } else {
      apply(lin(l, kGate), &xn[r0 * H], n, H, 2 * I, gr, 2 * I, false, tmp, threads, w_t(kGate));
    }
    for (int64_t r = r0; r < r1; ++r) {
      const float *gur = &gu[r * 2 * I];
      float *ar = &act[r * I];
      for (int64_t i = 0; i < I; ++i) {
        const float g = gur[mlp_mode == 2 ? 2 * i : i], u = gur[mlp_mode == 2 ? 2 * i + 1 : I + i];
        ar[i] = g / (1.0f + fexp(-g)) * u;
      }
    }
    apply(lin(l, kDown), &act[r0 * I], n, I, H, &x[r0 * H], H, true, tmp, threads, w_t(kDown));
  }
};

// a prefill of at least this many rows runs in blocks of kPrefillBlock rows on the kernel threads (each block's
// projections, attention and MLP on one thread); fewer rows (a decode step) split each matmul instead
constexpr int64_t kPrefillRows = 32, kPrefillBlock = 16;

int step(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 5 || !is_i32(dtypes[0]) || !is_i32(dtypes[1]) || std::strcmp(dtypes[2], "bool") != 0 ||
      std::strcmp(dtypes[3], "int64") != 0 || !is_f32(dtypes[4]) || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2)
    return 1;
  const int32_t *tokens = (const int32_t *)params[0], *positions = (const int32_t *)params[1];
  const bool *keymask = (const bool *)params[2];
  const int64_t *t = (const int64_t *)params[3];
  float *logits = (float *)params[4];
  Step st;
  st.t = t;
  st.B = shapes[0][0], st.S = shapes[0][1], st.TS = shapes[2][1], st.T = st.TS - st.S, st.R = st.B * st.S;
  st.L = t[kLayers], st.H = t[kHidden], st.NQ = t[kHeads], st.NKV = t[kKvHeads], st.D = t[kHeadDim];
  st.I = t[kInter], st.V = t[kVocab], st.qkv_mode = t[kQkvMode], st.mlp_mode = t[kMlpMode], st.C = t[kCapacity];
  st.eps = f32_of(t[kEps]);
  const int64_t B = st.B, S = st.S, TS = st.TS, R = st.R, H = st.H, D = st.D;
  if (shapes[1][0] != B || shapes[1][1] != S || shapes[2][0] != B || t[kCacheRows] != B || st.T < 0 || TS > st.C ||
      D % 2 || st.NQ % st.NKV)
    return 2;
  st.rep = st.NQ / st.NKV, st.QKV = (st.NQ + 2 * st.NKV) * D, st.QD = st.NQ * D;
  st.scale = 1.0f / std::sqrt((float)D);
  st.cache = (float *)t[kCache];
  const float *embed = (const float *)t[kEmbed], *inv_freq = (const float *)t[kInvFreq];

  // rows r = b * S + s: the s-th new token of sequence b, at cache column T + s
  st.x.resize(R * H), st.xn.resize(R * H), st.qkv.resize(R * st.QKV), st.o.resize(R * st.QD);
  st.gu.resize(R * 2 * st.I), st.act.resize(R * st.I), st.cosv.resize(R * D / 2), st.sinv.resize(R * D / 2);
  st.bias.resize(B * TS);
  for (int64_t i = 0; i < B * TS; ++i) st.bias[i] = keymask[i] ? 0.f : -INFINITY;   // (B, T + S) additive mask
  for (int64_t r = 0; r < R; ++r) {
    std::memcpy(&st.x[r * H], embed + (int64_t)tokens[r] * H, H * sizeof(float));
    for (int64_t i = 0; i < D / 2; ++i) {
      const float f = (float)positions[r] * inv_freq[i];
      st.cosv[r * D / 2 + i] = std::cos(f);
      st.sinv[r * D / 2 + i] = std::sin(f);
    }
  }
  std::vector<float> tmp;
  if (R >= kPrefillRows) {
    // prefill: row blocks on the kernel threads; attention needs every row's k, v of the layer, so two passes
    const int64_t blocks = (R + kPrefillBlock - 1) / kPrefillBlock;
    auto rows = [&](int64_t blk) { return std::make_pair(blk * kPrefillBlock, std::min(R, (blk + 1) * kPrefillBlock)); };
    for (int64_t l = 0; l < st.L; ++l) {
      st.transpose_layer(l);
      parallel_for(blocks, [&](int64_t blk) {
        std::vector<float> tl;
        auto [r0, r1] = rows(blk);
        st.project(l, r0, r1, false, tl);
      }, R * H * st.QKV);
      parallel_for(blocks, [&](int64_t blk) {
        std::vector<float> tl;
        auto [r0, r1] = rows(blk);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t g = 0; g < st.NKV; ++g) {
            const int64_t b = r / S, s = r % S;
            attend_group(&st.qkv[r * st.QKV + st.q_off(g * st.rep)], D, st.rep, st.kc(l) + (b * st.NKV + g) * st.C * D,
                         st.vc(l) + (b * st.NKV + g) * st.C * D, &st.bias[b * TS], st.T + s + 1, D, st.scale,
                         &st.o[r * st.QD + g * st.rep * D]);
          }
        st.mlp(l, r0, r1, false, tl);
      }, R * H * st.I);
    }
  } else {
    for (int64_t l = 0; l < st.L; ++l) {
      st.project(l, 0, R, true, tmp);
      st.attend_decode(l);
      st.mlp(l, 0, R, true, tmp);
    }
  }
  // logits of each sequence's last new token
  for (int64_t b = 0; b < B; ++b)
    rms_norm(&st.x[(b * S + S - 1) * H], (const float *)t[kFinalNorm], st.eps, H, &st.xn[b * H]);
  matmul_t(st.xn.data(), B, H, (const float *)t[kOutput], st.V, nullptr, logits, st.V, false, true);
  return 0;
}

}  // namespace decode

MFSFT_OP(MfsftDecodeStep, decode::step)
