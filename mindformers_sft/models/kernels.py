"""The one place that picks Ascend fused kernels or basic ops, by device (kept as one module past 400 lines on
purpose: every device-specific choice of the models stands here, so Ascend-only code has one home).

MindSpore's CPU backend has no kernels for rms_norm, rotary_position_embedding, flash_attention_score or
swiglu, and no bf16 compute; there every function below uses basic ops only (matmul, softmax, rsqrt, mean,
sigmoid, ...). On Ascend the small branches marked `# Ascend` call the fused ops of `mindspore.ops`
(they cannot be run on this machine; they are written against the documented APIs).

On CPU (fp32 compute) fused kernels of our own are used when a C++ compiler is available (`cpu_kernels()`):
`cpu_attention` (rotary embedding + causal/segment-masked softmax attention with grouped KV heads, forward and
backward, flash-attention style: the (S, T) scores are never stored), `cpu_rms_norm`, `cpu_swiglu`,
`cross_entropy`, and `notify` (a graph's completion signal, see CompletionSignal). They are MindSpore `Custom`
"aot" ops with their own backward, compiled once from the C++ sources `cpu_*kernels.cc` (next to this file, shipped
as package data; one file per kernel family, see CPU_SOURCE_FILES) into a per-user cache (`MFSFT_KERNEL_CACHE`,
default ~/.cache/mindformers_sft/kernels, keyed by the sources, flags and CPU).
`MFSFT_CPU_KERNELS=0` disables them; without a compiler everything falls back to basic ops (a one-line notice
on stderr). `MFSFT_KERNEL_THREADS` sets their thread count (default: the CPUs this process may run on).
Numerics: fp32 throughout, exact softmax; they differ from the basic ops by float rounding only (~1e-6).

Graph mode cannot call `mindspore.get_context` inside `construct`, so each function takes `fused`:
Cells evaluate `use_fused()` once in `__init__` and pass the result. `fused=None` asks `use_fused()`
at call time (PyNative only).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
import subprocess
import sys
import tempfile

import mindspore as ms
from mindspore import nn, ops

_BMM = ops.BatchMatMul()                       # parallel/strategies.py shards these two (Ascend)
_BMM_TB = ops.BatchMatMul(transpose_b=True)
# the CPU basic-ops attention (custom backward) has primitives of its own
_CPU_BMM = ops.BatchMatMul()
_CPU_BMM_TB = ops.BatchMatMul(transpose_b=True)
_CPU_BMM_TA = ops.BatchMatMul(transpose_a=True)
_CPU_SOFTMAX = ops.Softmax(-1)
_CPU_SUM_KEEP = ops.ReduceSum(keep_dims=True)
NEG_INF = -1e9  # additive mask value; finite so that a fully masked row gives a uniform row, not NaN


def use_fused() -> bool:
    """True only when the current device target is Ascend."""
    return ms.get_context("device_target") == "Ascend"


def _fused(fused):
    return use_fused() if fused is None else fused


def rms_norm(x, weight, eps: float, fused=None):
    """RMSNorm computed in fp32: x / sqrt(mean(x^2) + eps) * weight, returned in x's dtype."""
    dtype = x.dtype
    x32 = ops.cast(x, ms.float32)
    w32 = ops.cast(weight, ms.float32)
    if _fused(fused):  # Ascend
        y, _ = ops.rms_norm(x32, w32, eps)
        return ops.cast(y, dtype)
    var = ops.mean(ops.square(x32), -1, keep_dims=True)
    y = x32 * ops.rsqrt(var + eps)
    if dtype != ms.float32:
        y = ops.cast(ops.cast(y, dtype), ms.float32)  # as HF: normalized value rounded to the model dtype first
    return ops.cast(y * w32, dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


def apply_rope(q, k, cos, sin, fused=None):
    """Rotary embedding, HF rotate_half convention. q: (B, Nq, S, D), k: (B, Nk, S, D), cos/sin: (B, 1, S, D)."""
    cos = ops.cast(cos, q.dtype)
    sin = ops.cast(sin, q.dtype)
    if _fused(fused) and q.dtype != ms.float32:  # Ascend: mode 0 = rotate_half, layout BNSD with B1SD cos/sin
        return (ops.rotary_position_embedding(q, cos, sin, 0),
                ops.rotary_position_embedding(k, cos, sin, 0))
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def attention_bias(mask):
    """Bool mask (B, 1, S, T) -> the additive fp32 mask of `attention` on CPU (0 visible, NEG_INF hidden).

    Build it once per forward and pass it to every layer instead of the bool mask.
    """
    return ops.cast(ops.logical_not(mask), ms.float32) * NEG_INF


class _GroupedSoftmaxAttention(nn.Cell):
    """(o, p) = (softmax(qg @ k^T + bias) @ v, softmax(...)) on grouped queries qg (B, Nk, rep*S, D), already scaled.

    Custom backward: the softmax gradient uses rowsum(dP * P) = rowsum(dO * O) (a reduction over D instead of
    over the (S, T) scores) and reuses the forward probabilities p.
    """

    def construct(self, qg, k, v, bias):
        b, nk, rs, _ = qg.shape
        s, t = bias.shape[2], bias.shape[3]
        scores = ops.reshape(_CPU_BMM_TB(qg, k), (b, nk, rs // s, s, t)) + ops.expand_dims(bias, 1)
        p = ops.reshape(_CPU_SOFTMAX(scores), (b, nk, rs, t))
        return _CPU_BMM(p, v), p

    def bprop(self, qg, k, v, bias, out, dout):
        o, p = out
        do = dout[0]
        ds = p * (_CPU_BMM_TB(do, v) - _CPU_SUM_KEEP(do * o, -1))
        return _CPU_BMM(ds, k), _CPU_BMM_TA(ds, qg), _CPU_BMM_TA(p, do), ops.zeros_like(bias)


_GROUPED_ATTENTION = _GroupedSoftmaxAttention()


def attention(q, k, v, mask, scale: float, fused=None):
    """Scaled dot-product attention with grouped KV heads.

    q: (B, Nq, S, D); k, v: (B, Nk, T, D) with Nq a multiple of Nk (head h uses kv head h // (Nq/Nk), as
    HF repeat_kv); mask: bool (B, 1, S, T), True where attending is allowed (on CPU also the fp32 additive mask
    of `attention_bias`). Returns (B, Nq, S, D) in q's dtype.
    On CPU: scores and softmax in fp32 with an additive mask; kv heads are not copied (q is grouped instead).
    """
    b, nq, s, d = q.shape
    nk, t = k.shape[1], k.shape[2]
    rep = nq // nk
    if not _fused(fused):  # CPU
        bias = mask if mask.dtype == ms.float32 else attention_bias(mask)
        qg = ops.reshape(ops.cast(q, ms.float32) * scale, (b, nk, rep * s, d))
        out, _ = _GROUPED_ATTENTION(qg, ops.cast(k, ms.float32), ops.cast(v, ms.float32), bias)
        return ops.cast(ops.reshape(out, (b, nq, s, d)), q.dtype)
    if q.dtype != ms.float32:  # Ascend: flash attention, attn_mask 1 = discard
        drop = ops.cast(ops.logical_not(mask), ms.uint8)
        return ops.flash_attention_score(q, k, v, nq, attn_mask=drop, scalar_value=scale, input_layout="BNSD")
    qg = ops.reshape(q, (b, nk, rep * s, d))
    scores = _BMM_TB(ops.cast(qg, ms.float32), ops.cast(k, ms.float32))                # q @ k^T
    scores = ops.reshape(scores, (b, nk, rep, s, t)) * scale
    additive = ops.cast(ops.logical_not(mask), ms.float32) * NEG_INF          # (B, 1, S, T)
    scores = scores + ops.expand_dims(additive, 1)
    probs = ops.cast(ops.softmax(scores, -1), v.dtype)
    out = _BMM(ops.reshape(probs, (b, nk, rep * s, t)), v)                   # (B, Nk, rep*S, D)
    return ops.reshape(out, (b, nq, s, d))


def swiglu(gate, up, fused=None):
    """silu(gate) * up."""
    if _fused(fused) and gate.dtype != ms.float32:  # Ascend: swiglu splits its input, first half is the gate
        return ops.swiglu(ops.cat((gate, up), -1), -1)
    return gate * ops.sigmoid(gate) * up


# ---------------------------------------------------------------------------------------------------------------
# Fused CPU kernels (MindSpore Custom "aot" ops built from the cpu_*kernels.cc files next to this one)
# ---------------------------------------------------------------------------------------------------------------
_CPU_STATE = {"ops": None, "error": None, "so": None, "signal": None}
_ATTN_BSND = None
_CROSS_ENTROPY = None
_NOTIFY = None
_RMS_NORM = None
_SWIGLU = None
_GRAD_SQ_SUM = None
_HEAD_CROSS_ENTROPY = None


def _cache_dir() -> str:
    d = os.environ.get("MFSFT_KERNEL_CACHE")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mindformers_sft", "kernels")


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        import platform
        return platform.machine() + platform.processor()


# The C++ sources of the fused CPU kernels, one file per kernel family (package data of mindformers_sft.models,
# pyproject.toml: package-data), compiled in this order as ONE translation unit: cpu_kernels.cc (includes and
# shared helpers) first, each family after the files it uses; one library, one cache entry keyed by all of them.
CPU_SOURCE_FILES = ("cpu_kernels.cc", "cpu_attention_kernels.cc", "cpu_attention_simd_kernels.cc",
                    "cpu_attention_gemm_kernels.cc", "cpu_cross_entropy_kernels.cc", "cpu_norm_kernels.cc",
                    "cpu_adamw_kernels.cc", "cpu_moe_kernels.cc", "cpu_decode_kernels.cc")


@functools.lru_cache(maxsize=None)
def _cpu_source() -> str:
    """The C++ source of the fused CPU kernels: the CPU_SOURCE_FILES (next to this module) joined in order."""
    files = importlib.resources.files(__package__ or "mindformers_sft.models")
    return "".join(f'#line 1 "{name}"\n' + files.joinpath(name).read_text(encoding="utf-8")
                   for name in CPU_SOURCE_FILES)


def _build_library() -> str:
    """Compile the CPU_SOURCE_FILES once per (sources, flags, compiler, CPU) into the cache; returns the .so path."""
    source = _cpu_source()
    cxx = os.environ.get("CXX", "g++")
    common = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
              "-shared", "-fPIC", "-std=c++17", "-pthread"]
    errors = []
    for flags in (common + ["-march=native"], common):
        key = hashlib.sha256("\0".join([source, cxx, *flags, _cpu_id()]).encode()).hexdigest()[:20]
        for d in (_cache_dir(), os.path.join(tempfile.gettempdir(), f"mindformers_sft-{os.getuid()}")):
            so = os.path.join(d, f"mfsft_cpu_kernels_{key}.so")
            if os.path.isfile(so):
                return so
            try:
                os.makedirs(d, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=d) as tmp:
                    src, out = os.path.join(tmp, "kernels.cc"), os.path.join(tmp, "kernels.so")
                    with open(src, "w", encoding="utf-8") as f:
                        f.write(source)
                    r = subprocess.run([cxx, *flags, "-o", out, src], capture_output=True, text=True, timeout=300)
                    if r.returncode != 0:
                        errors.append(f"{cxx} {' '.join(flags)}: {(r.stderr or r.stdout).strip()[-500:]}")
                        break  # the compiler failed: another directory will not help
                    os.replace(out, so)  # atomic: concurrent ranks may build the same file
                return so
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{d}: {e}")
    raise RuntimeError("; ".join(errors))


def _make_ops(so: str):
    f32 = ms.float32

    def attn(layout):
        bwd = ops.Custom(f"{so}:MfsftAttnBwd{layout}", out_shape=lambda q, k, v, *rest: (q, k, v),
                         out_dtype=lambda *a: (f32, f32, f32), func_type="aot")

        def bprop(q, k, v, qc, qs, kc, ks, qi, ki, qg, kg, scale, out, dout):
            dq, dk, dv = bwd(q, k, v, qc, qs, kc, ks, qi, ki, qg, kg, scale, out[0], out[1], dout[0])
            z = ops.zeros_like
            return dq, dk, dv, z(qc), z(qs), z(kc), z(ks), z(qi), z(ki), z(qg), z(kg), z(scale)

        def lse_shape(q, *rest):
            return [q[0], q[2], q[1]] if layout == "BSND" else [q[0], q[1], q[2]]
        return ops.Custom(f"{so}:MfsftAttnFwd{layout}", out_shape=lambda q, *rest: (q, lse_shape(q)),
                          out_dtype=lambda *a: (f32, f32), func_type="aot", bprop=bprop)

    ce_bwd = ops.Custom(f"{so}:MfsftCrossEntropyBwd", out_shape=lambda x, *rest: x, out_dtype=lambda *a: f32,
                        func_type="aot")

    def ce_bprop(x, t, out, dout):
        return ce_bwd(x, t, out[1], dout[0]), ops.zeros_like(t)
    ce = ops.Custom(f"{so}:MfsftCrossEntropyFwd", out_shape=lambda x, t: ([x[0]], [x[0]]),
                    out_dtype=lambda *a: (f32, f32), func_type="aot", bprop=ce_bprop)
    head_ce_bwd = ops.Custom(f"{so}:MfsftHeadCeBwd", out_shape=lambda h, w, *rest: (h, w),
                             out_dtype=lambda *a: (f32, f32), func_type="aot")
    head_ce_bwd_h = ops.Custom(f"{so}:MfsftHeadCeBwdInput", out_shape=lambda h, *rest: h, out_dtype=lambda *a: f32,
                               func_type="aot")

    def head_ce_bprop(h, w, t, out, dout):
        dh, dw = head_ce_bwd(h, w, t, out[2], out[1], dout[0])
        return dh, dw, ops.zeros_like(t)

    def head_ce_bprop_frozen(h, w, t, out, dout):     # no gradient for the weight: half the backward's GEMMs
        return head_ce_bwd_h(h, w, t, out[2], out[1], dout[0]), ops.zeros_like(w), ops.zeros_like(t)

    def head_ce(name, bprop):
        return ops.Custom(f"{so}:{name}", out_shape=lambda h, w, t: ([h[0]], [h[0]], [h[0], w[0]]),
                          out_dtype=lambda *a: (f32, f32, f32), func_type="aot", bprop=bprop)
    head_ce = (head_ce("MfsftHeadCeFwd", head_ce_bprop), head_ce("MfsftHeadCeFwdFrozen", head_ce_bprop_frozen))
    notify = ops.Custom(f"{so}:MfsftNotify", out_shape=lambda *a: [1], out_dtype=lambda *a: ms.int32,
                        func_type="aot")
    grad_sq = ops.Custom(f"{so}:MfsftGradSqSum", out_shape=lambda *a: [1], out_dtype=lambda *a: f32,
                         func_type="aot")

    rms_bwd = ops.Custom(f"{so}:MfsftRmsNormBwd", out_shape=lambda x, w, *rest: (x, w),
                         out_dtype=lambda *a: (f32, f32), func_type="aot")

    def rms_bprop(x, w, eps, out, dout):
        dx, dw = rms_bwd(x, w, eps, out[1], dout[0])
        return dx, dw, ops.zeros_like(eps)
    rms = ops.Custom(f"{so}:MfsftRmsNormFwd", out_shape=lambda x, w, e: (x, x[:-1]),
                     out_dtype=lambda *a: (f32, f32), func_type="aot", bprop=rms_bprop)

    swiglu_bwd = ops.Custom(f"{so}:MfsftSwigluBwd", out_shape=lambda g, u, d: (g, u),
                            out_dtype=lambda *a: (f32, f32), func_type="aot")

    def swiglu_bprop(g, u, out, dout):
        return swiglu_bwd(g, u, dout)
    swiglu_op = ops.Custom(f"{so}:MfsftSwigluFwd", out_shape=lambda g, u: g, out_dtype=lambda *a: f32,
                           func_type="aot", bprop=swiglu_bprop)
    return attn("BSND"), ce, notify, rms, swiglu_op, grad_sq, head_ce


def cpu_kernels() -> bool:
    """True when the fused CPU kernels can be used: device CPU, not disabled, and the library builds."""
    global _ATTN_BSND, _CROSS_ENTROPY, _NOTIFY, _RMS_NORM, _SWIGLU, _GRAD_SQ_SUM, _HEAD_CROSS_ENTROPY
    if ms.get_context("device_target") != "CPU" or os.environ.get("MFSFT_CPU_KERNELS", "1") == "0":
        return False
    if _CPU_STATE["ops"] is None and _CPU_STATE["error"] is None:
        try:
            so = _build_library()
            (_ATTN_BSND, _CROSS_ENTROPY, _NOTIFY, _RMS_NORM, _SWIGLU, _GRAD_SQ_SUM,
             _HEAD_CROSS_ENTROPY) = _CPU_STATE["ops"] = _make_ops(so)
            _CPU_STATE["so"] = so
        except Exception as e:  # no compiler, unwritable cache, MindSpore refusing the op: basic ops instead
            _CPU_STATE["error"] = f"{type(e).__name__}: {e}"
            print(f"[kernels] fused CPU kernels unavailable, using basic ops ({_CPU_STATE['error'][:300]})",
                  file=sys.stderr)
    return _CPU_STATE["ops"] is not None


def cpu_attention(q, k, v, cos, sin, spec, scale):
    """Rotary embedding + masked softmax attention in one CPU kernel (needs `cpu_kernels()`), fp32.

    q: (B, S, Nq, D), k, v: (B, S, Nk, D), BEFORE the rotary embedding, layout BSND; cos, sin: (B, S, D);
    spec = (q_index (S,), k_index (S,), q_seg (B, S), k_seg (B, S)) int32 with the visibility of `make_mask`
    (k_index ascending); scale: fp32 Tensor (1,). Returns (B, S, Nq, D). No gradient flows to cos/sin.
    """
    q_index, k_index, q_seg, k_seg = spec
    o, _ = _ATTN_BSND(q, k, v, cos, sin, cos, sin, q_index, k_index, q_seg, k_seg, scale)
    return o


def cpu_rms_norm(x, weight, eps):
    """RMSNorm in one CPU kernel (needs `cpu_kernels()`): x (..., H) fp32, weight (H,) fp32, eps fp32 Tensor (1,)."""
    y, _ = _RMS_NORM(x, weight, eps)
    return y


def cpu_swiglu(gate, up):
    """silu(gate) * up in one CPU kernel (needs `cpu_kernels()`), fp32."""
    return _SWIGLU(gate, up)


def cross_entropy(logits, targets, kernel: bool):
    """Per-row logsumexp(logits) - logits[target]: logits (N, V) fp32, targets (N,) int32 in [0, V). Returns (N,).

    kernel=True: one CPU kernel (needs `cpu_kernels()`); otherwise basic ops.
    """
    if kernel:
        loss, _ = _CROSS_ENTROPY(logits, targets)
        return loss
    m = ops.stop_gradient(ops.amax(logits, -1, True))
    lse = ops.log(ops.sum(ops.exp(logits - m), -1)) + ops.squeeze(m, -1)
    return lse - ops.squeeze(ops.gather_elements(logits, 1, ops.expand_dims(targets, -1)), -1)


def head_cross_entropy(h, weight, targets, weight_grad=True):
    """The logits head and the cross entropy in one CPU kernel (needs `cpu_kernels()`), fp32: h (N, H), weight
    (V, H) (logits = h @ weight.T), targets (N,) int32 in [0, V), or -1 for a row without a target (its loss and
    gradient are 0 and it costs nothing). Returns the per-row loss (N,), as cross_entropy(h @ weight.T, targets);
    gradients flow to h and weight. The kernel runs the head's GEMMs by blocks
    of the vocabulary and does each block's softmax work while the block is in cache (cpu_cross_entropy_kernels.cc);
    the logits are kept for the backward, their gradient is never written out whole. weight_grad=False: the
    weight's gradient is zeros (not computed; for a frozen weight)."""
    loss, _, _ = _HEAD_CROSS_ENTROPY[0 if weight_grad else 1](h, weight, targets)
    return loss


class CompletionSignal:
    """Lets the host thread sleep until a compiled graph has (nearly) finished.

    MindSpore's `Tensor.asnumpy()` waits for a running graph by spinning at 100% of a core; on a machine with few
    cores that spinning thread takes the CPU from the kernels it waits for. A graph that ends with `notify(...)`
    (a kernel of ours that writes to an eventfd) can be waited for with `wait()` first, which sleeps in `select`;
    the `asnumpy()` that follows then finds the results ready.
    """

    def __init__(self, so: str):
        import ctypes
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lib = ctypes.CDLL(so)      # the library MindSpore loaded: same handle, same global fd
        self._lib.MfsftSetNotifyFd(self.fd)

    def clear(self):
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def wait(self, timeout: float) -> bool:
        """True when notified within `timeout` seconds (the counter is reset)."""
        import select
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            self.clear()
        return bool(ready)


def completion_signal():
    """The process-wide CompletionSignal, or None without the CPU kernels (then `notify` must not be used)."""
    if not cpu_kernels() or not hasattr(os, "eventfd"):
        return None
    if _CPU_STATE["signal"] is None:
        try:
            _CPU_STATE["signal"] = CompletionSignal(_CPU_STATE["so"])
        except (OSError, AttributeError):
            return None
    return _CPU_STATE["signal"]


def grad_sq_sum(inv, grads):
    """In a graph (needs `cpu_kernels()`): sum over all gradients of (g * inv)^2, fp32 (1,); one kernel."""
    return _GRAD_SQ_SUM(inv, *grads)


def adamw_flat_op(n_params: int):
    """The fused AdamW update of trainer/optimizer.py (flat mode) for `n_params` fp32 parameters (needs
    `cpu_kernels()`): op(*grads, *params, m, v, scal, hyper, decays) -> int32 (1,) token; the parameters and the
    moments are updated where they are (no copies, no Assign ops), see cpu_adamw_kernels.cc. A graph must return
    (or depend on) the token, and nothing in it may read the parameters after the op."""
    return ops.Custom(f"{_CPU_STATE['so']}:MfsftAdamWFlat", out_shape=lambda *s: [1],
                      out_dtype=lambda *a: ms.int32, func_type="aot")


def notify(*tensors):
    """In a compiled graph: an int32 (1,) token computed after all `tensors`; signals `completion_signal()`.
    Return the token from the graph (an unused op would be pruned)."""
    return _NOTIFY(*tensors)


# ---------------------------------------------------------------------------------------------------------------
# MoE (models/moe.py): the fused CPU library's path and the Ascend grouped-matmul experts
# ---------------------------------------------------------------------------------------------------------------
def cpu_kernel_library() -> str:
    """Path of the built CPU kernel library (needs `cpu_kernels()`), for ops defined next to their model code."""
    return _CPU_STATE["so"]


def moe_experts_ascend(x, probs, idx, w1, w2, num_experts: int):  # Ascend (not runnable on CPU)
    """Ascend: token permute by expert, two grouped matmuls with swiglu between, weighted unpermute.

    x (T, H), probs (T, K) in x's dtype, idx (T, K) int32, w1 (E, H, 2F) gate|up, w2 (E, F, H). Returns (T, H).
    """
    from mindspore.ops.auto_generate import GroupedMatmul
    permuted, sorted_indices = ops.moe_token_permute(x, idx)
    counts = ops.sum(ops.cast(ops.one_hot(ops.reshape(idx, (-1,)), num_experts, ms.Tensor(1, ms.int32),
                                          ms.Tensor(0, ms.int32)), ms.int32), 0)
    group_list = ops.cast(ops.cumsum(counts, 0), ms.int64)                # cumulative ends, one per expert
    gmm = GroupedMatmul(split_item=3, group_type=0)
    h = gmm([permuted], [w1], None, None, None, None, None, group_list)[0]
    o = gmm([ops.swiglu(h, -1)], [w2], None, None, None, None, None, group_list)[0]
    return ops.moe_token_unpermute(o, sorted_indices, probs)
