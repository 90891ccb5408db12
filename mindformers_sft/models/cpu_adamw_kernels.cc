// The flat AdamW step and its gradient-norm reduction (MindSpore Custom "aot" ops), fp32.
// Compiled as one translation unit after cpu_kernels.cc (models/kernels.py joins the sources in the order of
// CPU_SOURCE_FILES), so it uses that file's includes and helpers: parallel_for, n_threads, fexp, is_f32, is_i32.

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
  // (parameter, chunk) tasks of at most kChunk elements, on the kernel threads (elementwise: same numbers)
  constexpr int64_t kChunk = 1 << 16;
  std::vector<int64_t> offs(k + 1, 0), first(k + 1, 0);
  for (int t = 0; t < k; ++t) {
    const int64_t n = numel(ndims[k + t], shapes[k + t]);
    offs[t + 1] = offs[t] + n;
    first[t + 1] = first[t] + (n + kChunk - 1) / kChunk;
  }
  parallel_for(first[k], [&](int64_t task) {
    const int t = (int)(std::upper_bound(first.begin(), first.end(), task) - first.begin()) - 1;
    const float *g = (const float *)params[t], *p = (const float *)params[k + t];
    float *po = (float *)params[2 * k + 7 + t];
    const int64_t n = offs[t + 1] - offs[t], off = offs[t];
    const int64_t lo = (task - first[t]) * kChunk, hi = std::min(n, lo + kChunk);
    if (!apply) {
      std::memcpy(po + lo, p + lo, (hi - lo) * sizeof(float));
      std::memcpy(mo + off + lo, m + off + lo, (hi - lo) * sizeof(float));
      std::memcpy(vo + off + lo, v + off + lo, (hi - lo) * sizeof(float));
      return;
    }
    const bool decay = decays[t] != 0.0f && wd > 0.0f;
    for (int64_t i = lo; i < hi; ++i) {
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
  }, offs[k]);
  return 0;
}

}  // namespace
#pragma GCC pop_options

MFSFT_OP(MfsftGradSqSum, grad_sq_sum)
MFSFT_OP(MfsftAdamWFlat, adamw_flat)
