// Fused RMSNorm and SwiGLU (MindSpore Custom "aot" ops), fp32, forward and backward.
// Compiled as one translation unit after cpu_kernels.cc (models/kernels.py joins the sources in the order of
// CPU_SOURCE_FILES), so it uses that file's includes and helpers: parallel_for, n_threads, fexp, is_f32, is_i32.

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

MFSFT_OP(MfsftRmsNormFwd, rms_fwd)
MFSFT_OP(MfsftRmsNormBwd, rms_bwd)
MFSFT_OP(MfsftSwigluFwd, swiglu_fwd)
MFSFT_OP(MfsftSwigluBwd, swiglu_bwd)
