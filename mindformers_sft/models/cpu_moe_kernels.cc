// mindformers_sft CPU kernels for the mixture-of-experts block (models/moe.py), fp32, forward and backward.
// Compiled as one translation unit after cpu_kernels.cc (models/kernels.py joins the two sources), so it uses that
// file's helpers: parallel_for, n_threads, fexp, gemm, is_f32, is_i32.
//
// Shapes: x (T, H) tokens; p (T, K) routing weights; idx (T, K) int32 expert of each (token, slot) assignment;
// w1 (E*H, 2F) = per expert (H, 2F), columns [0, F) gate, [F, 2F) up; w2 (E*F, H) = per expert (F, H).
// The T*K assignments are sorted by expert (stable counting sort); each expert's rows are gathered and multiplied
// by its weights with a GEMM (grouped matmul); an expert with no row does no work and gets a zero gradient.
// GEMMs: cpu_kernels.cc's gemm (oneDNN's sgemm, sequential, one call per task).
#include <memory>

namespace {

struct MoeDims {
  int64_t T, K, H, F, E;
};

// x, p, idx, w1, w2 = params 0..4
bool moe_dims(int *ndims, int64_t **shapes, const char **dtypes, MoeDims &d) {
  for (int i = 0; i < 5; ++i)
    if (ndims[i] != 2) return false;
  if (!is_f32(dtypes[0]) || !is_f32(dtypes[1]) || !is_i32(dtypes[2]) || !is_f32(dtypes[3]) || !is_f32(dtypes[4]))
    return false;
  d.T = shapes[0][0], d.H = shapes[0][1], d.K = shapes[1][1];
  if (shapes[1][0] != d.T || shapes[2][0] != d.T || shapes[2][1] != d.K || d.H <= 0 || shapes[3][0] % d.H) return false;
  d.E = shapes[3][0] / d.H, d.F = shapes[3][1] / 2;
  return shapes[3][1] == 2 * d.F && shapes[4][0] == d.E * d.F && shapes[4][1] == d.H;
}

// stable counting sort of the assignments by expert: order[r] = assignment (t * K + slot) of sorted row r;
// rows start[e] .. start[e + 1] belong to expert e. False when an expert index is out of range.
bool sort_by_expert(const int32_t *idx, int64_t n, int64_t E, int32_t *order, std::vector<int64_t> &start) {
  start.assign(E + 1, 0);
  for (int64_t a = 0; a < n; ++a) {
    if (idx[a] < 0 || idx[a] >= E) return false;
    ++start[idx[a] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> pos(start.begin(), start.end() - 1);
  for (int64_t a = 0; a < n; ++a) order[pos[idx[a]]++] = (int32_t)a;
  return true;
}

struct Chunk {
  int64_t e, r0, n;
};
constexpr int64_t kMoeRows = 256;  // rows per task: large enough for an efficient GEMM, small enough to balance

std::vector<Chunk> chunks_of(const std::vector<int64_t> &start) {
  std::vector<Chunk> c;
  for (int64_t e = 0; e + 1 < (int64_t)start.size(); ++e)
    for (int64_t r = start[e]; r < start[e + 1]; r += kMoeRows)
      c.push_back({e, r, std::min(kMoeRows, start[e + 1] - r)});
  return c;
}

// outputs: y (T, H), act (T*K, 2F) gate|up pre-activations in sorted order, order (T*K,), o (T*K, H) expert outputs
// by assignment (unweighted)
int moe_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  MoeDims d;
  if (nparam != 9 || !moe_dims(ndims, shapes, dtypes, d)) return 1;
  const float *x = (const float *)params[0], *p = (const float *)params[1];
  const int32_t *idx = (const int32_t *)params[2];
  const float *w1 = (const float *)params[3], *w2 = (const float *)params[4];
  float *y = (float *)params[5], *act = (float *)params[6], *o = (float *)params[8];
  int32_t *order = (int32_t *)params[7];
  const int64_t T = d.T, K = d.K, H = d.H, F = d.F, N = T * K;
  std::vector<int64_t> start;
  if (!sort_by_expert(idx, N, d.E, order, start)) return 3;
  const std::vector<Chunk> chunks = chunks_of(start);
  parallel_for((int64_t)chunks.size(), [&](int64_t c) {
    const Chunk ch = chunks[c];
    std::vector<float> xg(ch.n * H), a(ch.n * F), out(ch.n * H);
    for (int64_t r = 0; r < ch.n; ++r) std::memcpy(&xg[r * H], x + (order[ch.r0 + r] / K) * H, H * sizeof(float));
    float *ar = act + ch.r0 * 2 * F;
    gemm(false, false, ch.n, 2 * F, H, xg.data(), H, w1 + ch.e * H * 2 * F, 2 * F, 0.0f, ar, 2 * F);
    for (int64_t r = 0; r < ch.n; ++r)
      for (int64_t f = 0; f < F; ++f) {
        const float g = ar[r * 2 * F + f];
        a[r * F + f] = g / (1.0f + fexp(-g)) * ar[r * 2 * F + F + f];
      }
    gemm(false, false, ch.n, H, F, a.data(), F, w2 + ch.e * F * H, H, 0.0f, out.data(), H);
    for (int64_t r = 0; r < ch.n; ++r) std::memcpy(o + (int64_t)order[ch.r0 + r] * H, &out[r * H], H * sizeof(float));
  }, N * H * F * 6);
  parallel_for((T + 63) / 64, [&](int64_t task) {
    for (int64_t t = task * 64; t < std::min(T, (task + 1) * 64); ++t) {
      float *__restrict yr = y + t * H;
      for (int64_t h = 0; h < H; ++h) yr[h] = 0.0f;
      for (int64_t j = 0; j < K; ++j) {
        const float w = p[t * K + j];
        const float *__restrict orow = o + (t * K + j) * H;
        for (int64_t h = 0; h < H; ++h) yr[h] += w * orow[h];
      }
    }
  }, N * H);
  return 0;
}

// inputs: x, p, idx, w1, w2, act, order, o, dy (T, H); outputs: dx (T, H), dp (T, K), dw1, dw2
int moe_bwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  MoeDims d;
  if (nparam != 13 || !moe_dims(ndims, shapes, dtypes, d)) return 1;
  const float *x = (const float *)params[0], *p = (const float *)params[1];
  const float *w1 = (const float *)params[3], *w2 = (const float *)params[4];
  const float *act = (const float *)params[5], *o = (const float *)params[7], *dy = (const float *)params[8];
  const int32_t *idx = (const int32_t *)params[2], *order = (const int32_t *)params[6];
  float *dx = (float *)params[9], *dp = (float *)params[10], *dw1 = (float *)params[11], *dw2 = (float *)params[12];
  const int64_t T = d.T, K = d.K, H = d.H, F = d.F, E = d.E, N = T * K;
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t a = 0; a < N; ++a) {
    if (idx[a] < 0 || idx[a] >= E) return 3;
    ++start[idx[a] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const std::vector<Chunk> chunks = chunks_of(start);
  // sorted-row buffers for the weight gradients: gathered x, swiglu output, d(output), d(act); dx per assignment
  // (every element is written before it is read: no zero fill)
  std::unique_ptr<float[]> xg_(new float[N * H]), a_(new float[N * F]), dout_(new float[N * H]),
      dact_(new float[N * 2 * F]), dxa_(new float[N * H]);
  float *xg = xg_.get(), *a = a_.get(), *dout = dout_.get(), *dact = dact_.get(), *dxa = dxa_.get();
  parallel_for((int64_t)chunks.size(), [&](int64_t c) {
    const Chunk ch = chunks[c];
    std::vector<float> da(ch.n * F);
    for (int64_t r = ch.r0; r < ch.r0 + ch.n; ++r) {
      const int64_t asg = order[r], t = asg / K;
      const float w = p[asg];
      const float *__restrict g = dy + t * H, *__restrict orow = o + asg * H;
      float *__restrict dor = &dout[r * H];
      float dot = 0.0f;
      for (int64_t h = 0; h < H; ++h) {
        dor[h] = w * g[h];
        dot += g[h] * orow[h];
      }
      dp[asg] = dot;
      std::memcpy(&xg[r * H], x + t * H, H * sizeof(float));
    }
    gemm(false, true, ch.n, F, H, &dout[ch.r0 * H], H, w2 + ch.e * F * H, H, 0.0f, da.data(), F);
    for (int64_t r = 0; r < ch.n; ++r) {
      const float *__restrict ar = act + (ch.r0 + r) * 2 * F;
      float *__restrict dr = &dact[(ch.r0 + r) * 2 * F];
      float *__restrict sr = &a[(ch.r0 + r) * F];
      for (int64_t f = 0; f < F; ++f) {
        const float gt = ar[f], up = ar[F + f], s = 1.0f / (1.0f + fexp(-gt)), silu = gt * s, g = da[r * F + f];
        sr[f] = silu * up;
        dr[F + f] = g * silu;
        dr[f] = g * up * (s + silu * (1.0f - s));
      }
    }
    std::vector<float> dxg(ch.n * H);
    gemm(false, true, ch.n, H, 2 * F, &dact[ch.r0 * 2 * F], 2 * F, w1 + ch.e * H * 2 * F, 2 * F, 0.0f, dxg.data(), H);
    for (int64_t r = 0; r < ch.n; ++r) std::memcpy(&dxa[(int64_t)order[ch.r0 + r] * H], &dxg[r * H], H * sizeof(float));
  }, N * H * F * 8);
  // weight gradients: one task per (expert, matrix); an expert without rows gets zeros
  parallel_for(2 * E, [&](int64_t task) {
    const int64_t e = task / 2, s = start[e], n = start[e + 1] - start[e];
    if (task % 2 == 0) {
      float *g = dw1 + e * H * 2 * F;
      if (n == 0) std::memset(g, 0, H * 2 * F * sizeof(float));
      else gemm(true, false, H, 2 * F, n, &xg[s * H], H, &dact[s * 2 * F], 2 * F, 0.0f, g, 2 * F);
    } else {
      float *g = dw2 + e * F * H;
      if (n == 0) std::memset(g, 0, F * H * sizeof(float));
      else gemm(true, false, F, H, n, &a[s * F], F, &dout[s * H], H, 0.0f, g, H);
    }
  }, N * H * F * 6);
  parallel_for((T + 63) / 64, [&](int64_t task) {
    for (int64_t t = task * 64; t < std::min(T, (task + 1) * 64); ++t) {
      float *__restrict r = dx + t * H;
      for (int64_t h = 0; h < H; ++h) r[h] = 0.0f;
      for (int64_t j = 0; j < K; ++j)
        for (int64_t h = 0; h < H; ++h) r[h] += dxa[(t * K + j) * H + h];
    }
  }, N * H);
  return 0;
}

}  // namespace

MFSFT_OP(MfsftMoeFwd, moe_fwd)
MFSFT_OP(MfsftMoeBwd, moe_bwd)
