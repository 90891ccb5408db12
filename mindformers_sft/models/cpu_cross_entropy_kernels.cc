// Fused cross entropy (MindSpore Custom "aot" ops), fp32: per-row log-softmax loss and its gradient.
// Compiled as one translation unit after cpu_kernels.cc (models/kernels.py joins the sources in the order of
// CPU_SOURCE_FILES), so it uses that file's includes and helpers: parallel_for, n_threads, fexp, is_f32, is_i32.
namespace {

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

extern "C" int MfsftCrossEntropyFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  return ce_fwd(nparam, params, shapes, dtypes);
}

extern "C" int MfsftCrossEntropyBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  return ce_bwd(nparam, params, shapes, dtypes);
}
