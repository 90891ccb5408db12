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

// inputs: inv (1,), k gradients; output: (1,) sum over all elements of (g * inv)^2, accumulated in double by
// (gradient, chunk) tasks on the kernel threads, 8 lanes each, the partial sums added in task order (the same
// result whatever the thread count)
int grad_sq_sum(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int k = nparam - 2;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32(dtypes[i])) return 1;
  const float inv = *(const float *)params[0];
  constexpr int64_t kChunk = 1 << 16;
  std::vector<int64_t> size(k), first(k + 1, 0);
  for (int t = 0; t < k; ++t) {
    size[t] = numel(ndims[1 + t], shapes[1 + t]);
    first[t + 1] = first[t] + (size[t] + kChunk - 1) / kChunk;
  }
  std::vector<double> partial(first[k], 0.0);
  parallel_for(first[k], [&](int64_t task) {
    const int t = (int)(std::upper_bound(first.begin(), first.end(), task) - first.begin()) - 1;
    const float *g = (const float *)params[1 + t];
    const int64_t lo = (task - first[t]) * kChunk, hi = std::min(size[t], lo + kChunk);
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8)
      for (int j = 0; j < 8; ++j) {
        const float x = g[i + j] * inv;
        lane[j] += (double)(x * x);
      }
    for (; i < hi; ++i) {
      const float x = g[i] * inv;
      lane[0] += (double)(x * x);
    }
    partial[task] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }, first[k] * kChunk);
  double acc = 0.0;
  for (double x : partial) acc += x;
  *(float *)params[nparam - 1] = (float)acc;
  return 0;
}

// One AdamW update of T = float or a vector of floats (GCC vector types: the operators act per lane, no FMA under
// this file's pragma), the operations in the basic-ops order, so every lane gives the scalar loop's bits. Written
// with vector types because std::sqrt's errno keeps GCC from vectorizing the scalar loop under that pragma.
struct AdamWCoef {
  float inv, factor, coef, b1, omb1, b2, omb2, bc2, eps, step_lr;
};

inline float lanes_sqrt(float x) { return std::sqrt(x); }
#if defined(__AVX512F__)
#define MFSFT_ADAMW_LANES
using AdamWLanes = __m512;
constexpr int64_t kAdamWLanes = 16;
inline __m512 lanes_sqrt(__m512 x) { return _mm512_sqrt_ps(x); }
#elif defined(__AVX__)
#define MFSFT_ADAMW_LANES
using AdamWLanes = __m256;
constexpr int64_t kAdamWLanes = 8;
inline __m256 lanes_sqrt(__m256 x) { return _mm256_sqrt_ps(x); }
#endif

template <class T>
inline void adamw_update(const AdamWCoef &c, bool decay, const float *g, float *p, float *m, float *v) {
  T gi, pi, mi, vi;
  std::memcpy(&gi, g, sizeof(T));
  std::memcpy(&pi, p, sizeof(T));
  std::memcpy(&mi, m, sizeof(T));
  std::memcpy(&vi, v, sizeof(T));
  gi = (gi * c.inv) * c.factor;
  if (decay) pi = pi - c.coef * pi;
  mi = c.b1 * mi + c.omb1 * gi;
  vi = c.b2 * vi + (c.omb2 * gi) * gi;
  pi = pi - (c.step_lr * mi) / (lanes_sqrt(vi / c.bc2) + c.eps);
  std::memcpy(p, &pi, sizeof(T));
  std::memcpy(m, &mi, sizeof(T));
  std::memcpy(v, &vi, sizeof(T));
}

// inputs: k gradients, k parameters, m (N,), v (N,), scal (6,) = [lr, bc1, bc2, inv_tokens, clip factor, apply],
//         hyper (6,) = [beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay], decays (k,) 1/0;
// output: a token, int32 (1,). The parameters, m and v are updated where they are (the inputs: no copies, no Assign
// ops in the graph); with apply == 0 nothing changes.
int adamw_flat(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if ((nparam - 6) % 2 != 0 || !is_i32(dtypes[nparam - 1])) return 1;
  const int k = (nparam - 6) / 2;
  for (int i = 0; i < nparam - 1; ++i)
    if (!is_f32(dtypes[i])) return 1;
  float *m = (float *)params[2 * k], *v = (float *)params[2 * k + 1];
  const float *scal = (const float *)params[2 * k + 2], *hyper = (const float *)params[2 * k + 3];
  const float *decays = (const float *)params[2 * k + 4];
  *(int32_t *)params[nparam - 1] = 1;
  const float lr = scal[0], bc1 = scal[1], bc2 = scal[2], inv = scal[3], factor = scal[4];
  if (scal[5] == 0.0f) return 0;     // not applied
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
    const float *g = (const float *)params[t];
    float *p = (float *)params[k + t];
    const int64_t n = offs[t + 1] - offs[t], off = offs[t];
    const int64_t lo = (task - first[t]) * kChunk, hi = std::min(n, lo + kChunk);
    const bool decay = decays[t] != 0.0f && wd > 0.0f;
    const AdamWCoef c{inv, factor, coef, b1, omb1, b2, omb2, bc2, eps, step_lr};
    int64_t i = lo;
#ifdef MFSFT_ADAMW_LANES
    for (; i + kAdamWLanes <= hi; i += kAdamWLanes)
      adamw_update<AdamWLanes>(c, decay, g + i, p + i, m + off + i, v + off + i);
#endif
    for (; i < hi; ++i) adamw_update<float>(c, decay, g + i, p + i, m + off + i, v + off + i);
  }, offs[k]);
  return 0;
}

}  // namespace
#pragma GCC pop_options

MFSFT_OP(MfsftGradSqSum, grad_sq_sum)
MFSFT_OP(MfsftAdamWFlat, adamw_flat)
