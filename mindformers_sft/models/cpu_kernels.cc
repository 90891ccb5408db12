// mindformers_sft CPU kernels (MindSpore Custom "aot" ops), fp32: what every kernel family shares.
// The families, each in its own file, compiled with this one as a single translation unit in the order of
// CPU_SOURCE_FILES (models/kernels.py), into one library:
//   cpu_attention_kernels.cc (+ cpu_attention_simd_kernels.cc, cpu_attention_gemm_kernels.cc): rotary embedding
//              + causal/segment-masked softmax attention with grouped KV heads, forward and backward, never
//              materializing the (S, T) score matrix (exact softmax; GEMMs over blocks of query rows, or SIMD rows).
//   cpu_cross_entropy_kernels.cc: per-row log-softmax loss and its gradient.
//   cpu_norm_kernels.cc: RMSNorm, SwiGLU: forward and backward.
//   cpu_adamw_kernels.cc: the flat AdamW step (trainer/optimizer.py).
//   cpu_moe_kernels.cc: the mixture-of-experts block (models/moe.py).
// Here: the includes, the thread pool (parallel_for), fexp, dtype checks, gemm, the MFSFT_OP export macro, and notify
// (writes to an eventfd when a graph reaches it: the host sleeps instead of spinning).
// Signature of every entry point: MindSpore's aot convention (nparam, params, ndims, shapes, dtypes, stream,
// extra); inputs then outputs in `params`; a non-zero return makes MindSpore raise.
#include <dlfcn.h>
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
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

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

// GEMM: oneDNN's dnnl_sgemm from MindSpore's own libdnnl when it is loaded in the process (its threadpool runtime
// runs it sequentially: callers parallelize over tasks), otherwise a plain loop. MFSFT_PLAIN_GEMM=1 (tests): the loop.
using SgemmFn = int (*)(char, char, int64_t, int64_t, int64_t, float, const float *, int64_t, const float *, int64_t,
                        float, float *, int64_t);

SgemmFn find_sgemm() {
  static SgemmFn fn = [] {
    const char *off = std::getenv("MFSFT_PLAIN_GEMM");
    if (off && std::strcmp(off, "1") == 0) return (SgemmFn) nullptr;
    void *s = dlsym(RTLD_DEFAULT, "dnnl_sgemm");
    if (!s) {
      void *h = dlopen("libdnnl.so.3", RTLD_NOW | RTLD_NOLOAD);
      if (h) s = dlsym(h, "dnnl_sgemm");
    }
    return (SgemmFn)s;
  }();
  return fn;
}

bool plain_gemm_forced() {
  const char *off = std::getenv("MFSFT_PLAIN_GEMM");
  return off && std::strcmp(off, "1") == 0;
}

// row-major C (M, N) = op(A) (M, K) @ op(B) (K, N) + beta * C; op = transpose when ta / tb
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb,
          float beta, float *C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  SgemmFn f = find_sgemm();
  if (K > 0 && f && f(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc) == 0) return;
  for (int64_t i = 0; i < M; ++i) {
    float *__restrict c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = beta == 0.0f ? 0.0f : beta * c[j];
    if (tb) {
      for (int64_t j = 0; j < N; ++j) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k) acc += (ta ? A[k * lda + i] : A[i * lda + k]) * B[j * ldb + k];
        c[j] += acc;
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const float a = ta ? A[k * lda + i] : A[i * lda + k];
        const float *__restrict b = B + k * ldb;
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      }
    }
  }
}

}  // namespace

#define MFSFT_OP(name, fn)                                                                                 \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,        \
                      void *stream, void *extra) {                                                         \
    return fn(nparam, params, ndims, shapes, dtypes);                                                      \
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
