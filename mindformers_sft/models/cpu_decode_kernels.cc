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
              int64_t ldy, bool accumulate) {
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
  }, R * N * K >= kMinThreadedWork ? R * N * K : 0);
}

// a linear (with its LoRA update, dropout off) of R rows: y (R, ldy) columns [0, N)
void apply(const Linear &l, const float *x, int64_t R, int64_t K, int64_t N, float *y, int64_t ldy, bool acc,
           std::vector<float> &tmp) {
  matmul_t(x, R, K, l.w, N, l.bias, y, ldy, acc);
  if (!l.a) return;
  tmp.assign(R * l.rank, 0.f);
  matmul_t(x, R, K, l.a, l.rank, nullptr, tmp.data(), l.rank, false);
  for (auto &t : tmp) t *= l.scaling;
  matmul_t(tmp.data(), R, l.rank, l.b, N, nullptr, y, ldy, true);
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

int step(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 5 || !is_i32(dtypes[0]) || !is_i32(dtypes[1]) || std::strcmp(dtypes[2], "bool") != 0 ||
      std::strcmp(dtypes[3], "int64") != 0 || !is_f32(dtypes[4]) || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2)
    return 1;
  const int32_t *tokens = (const int32_t *)params[0], *positions = (const int32_t *)params[1];
  const bool *keymask = (const bool *)params[2];
  const int64_t *t = (const int64_t *)params[3];
  float *logits = (float *)params[4];
  const int64_t B = shapes[0][0], S = shapes[0][1], TS = shapes[2][1], T = TS - S, R = B * S;
  const int64_t L = t[kLayers], H = t[kHidden], NQ = t[kHeads], NKV = t[kKvHeads], D = t[kHeadDim],
                I = t[kInter], V = t[kVocab], qkv_mode = t[kQkvMode], mlp_mode = t[kMlpMode], C = t[kCapacity];
  const float eps = f32_of(t[kEps]);
  if (shapes[1][0] != B || shapes[1][1] != S || shapes[2][0] != B || t[kCacheRows] != B || T < 0 || TS > C ||
      D % 2 || NQ % NKV)
    return 2;
  const int64_t rep = NQ / NKV, QKV = (NQ + 2 * NKV) * D, QD = NQ * D;
  const float *embed = (const float *)t[kEmbed], *inv_freq = (const float *)t[kInvFreq];
  float *cache = (float *)t[kCache];   // (L, 2, B, NKV, C, D)

  // rows r = b * S + s: the s-th new token of sequence b, at cache column T + s
  std::vector<float> x(R * H), xn(R * H), qkv(R * QKV), o(R * QD), gu(R * 2 * I), act(R * I), tmp;
  std::vector<float> cosv(R * D / 2), sinv(R * D / 2), bias(B * TS);
  for (int64_t i = 0; i < B * TS; ++i) bias[i] = keymask[i] ? 0.f : -INFINITY;   // (B, T + S) additive mask
  for (int64_t r = 0; r < R; ++r) {
    std::memcpy(&x[r * H], embed + (int64_t)tokens[r] * H, H * sizeof(float));
    for (int64_t i = 0; i < D / 2; ++i) {
      const float f = (float)positions[r] * inv_freq[i];
      cosv[r * D / 2 + i] = std::cos(f);
      sinv[r * D / 2 + i] = std::sin(f);
    }
  }
  // offsets of q head h, k head g, v head g inside a row of qkv
  auto q_off = [&](int64_t h) { return qkv_mode == 2 ? (h / rep) * (rep + 2) * D + (h % rep) * D : h * D; };
  auto k_off = [&](int64_t g) { return qkv_mode == 2 ? g * (rep + 2) * D + rep * D : QD + g * D; };
  auto v_off = [&](int64_t g) { return qkv_mode == 2 ? g * (rep + 2) * D + (rep + 1) * D : QD + NKV * D + g * D; };
  const float scale = 1.0f / std::sqrt((float)D);
  const int64_t attn_work = R * NQ * (T + S) * D * 2;

  for (int64_t l = 0; l < L; ++l) {
    const int64_t *lt = t + kHeader + l * kPerLayer;
    auto lin = [&](int which) { return linear_at(lt + kLin0 + which * kLin); };
    for (int64_t r = 0; r < R; ++r) rms_norm(&x[r * H], (const float *)lt[kAttnNorm], eps, H, &xn[r * H]);
    if (qkv_mode == 0) {
      apply(lin(kQ), xn.data(), R, H, QD, qkv.data(), QKV, false, tmp);
      apply(lin(kK), xn.data(), R, H, NKV * D, qkv.data() + QD, QKV, false, tmp);
      apply(lin(kV), xn.data(), R, H, NKV * D, qkv.data() + QD + NKV * D, QKV, false, tmp);
    } else {
      apply(lin(kQ), xn.data(), R, H, QKV, qkv.data(), QKV, false, tmp);
    }
    const float *qn = (const float *)lt[kQNorm], *kn = (const float *)lt[kKNorm];
    float *kc = cache + (l * 2) * B * NKV * C * D, *vc = cache + (l * 2 + 1) * B * NKV * C * D;
    for (int64_t r = 0; r < R; ++r) {
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
        std::memcpy(kc + ((b * NKV + g) * C + col) * D, row + k_off(g), D * sizeof(float));
        std::memcpy(vc + ((b * NKV + g) * C + col) * D, row + v_off(g), D * sizeof(float));
      }
    }
    // attention: one task per (row, kv head) serves its `rep` query heads (each key and value row loaded once);
    // token s of sequence b sees cache columns [0, T + s] where its key mask is true
    parallel_for(R * NKV, [&](int64_t task) {
      const int64_t r = task / NKV, g = task % NKV, b = r / S, s = r % S;
      attend_group(&qkv[r * QKV + q_off(g * rep)], D, rep, kc + (b * NKV + g) * C * D, vc + (b * NKV + g) * C * D,
                   &bias[b * TS], T + s + 1, D, scale, &o[r * QD + g * rep * D]);
    }, attn_work >= kMinThreadedWork ? attn_work : 0);
    apply(lin(kO), o.data(), R, QD, H, x.data(), H, true, tmp);
    for (int64_t r = 0; r < R; ++r) rms_norm(&x[r * H], (const float *)lt[kFfnNorm], eps, H, &xn[r * H]);
    if (mlp_mode == 0) {
      apply(lin(kGate), xn.data(), R, H, I, gu.data(), 2 * I, false, tmp);
      apply(lin(kUp), xn.data(), R, H, I, gu.data() + I, 2 * I, false, tmp);
    } else {
      apply(lin(kGate), xn.data(), R, H, 2 * I, gu.data(), 2 * I, false, tmp);
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < I; ++i) {
        const float g = gu[r * 2 * I + (mlp_mode == 2 ? 2 * i : i)];
        const float u = gu[r * 2 * I + (mlp_mode == 2 ? 2 * i + 1 : I + i)];
        act[r * I + i] = g / (1.0f + std::exp(-g)) * u;
      }
    apply(lin(kDown), act.data(), R, I, H, x.data(), H, true, tmp);
  }
  // logits of each sequence's last new token
  for (int64_t b = 0; b < B; ++b)
    rms_norm(&x[(b * S + S - 1) * H], (const float *)t[kFinalNorm], eps, H, &xn[b * H]);
  matmul_t(xn.data(), B, H, (const float *)t[kOutput], V, nullptr, logits, V, false);
  return 0;
}

}  // namespace decode

MFSFT_OP(MfsftDecodeStep, decode::step)
