"""The one place that picks Ascend fused kernels or basic ops, by device.

MindSpore's CPU backend has no kernels for rms_norm, rotary_position_embedding, flash_attention_score or
swiglu, and no bf16 compute; there every function below uses basic ops only (matmul, softmax, rsqrt, mean,
sigmoid, ...). On Ascend the small branches marked `# Ascend` call the fused ops of `mindspore.ops`
(they cannot be run on this machine; they are written against the documented APIs).

Graph mode cannot call `mindspore.get_context` inside `construct`, so each function takes `fused`:
Cells evaluate `use_fused()` once in `__init__` and pass the result. `fused=None` asks `use_fused()`
at call time (PyNative only).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

_BMM = ops.BatchMatMul()
_BMM_TB = ops.BatchMatMul(transpose_b=True)
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


def attention(q, k, v, mask, scale: float, fused=None):
    """Scaled dot-product attention with grouped KV heads.

    q: (B, Nq, S, D); k, v: (B, Nk, T, D) with Nq a multiple of Nk (head h uses kv head h // (Nq/Nk), as
    HF repeat_kv); mask: bool (B, 1, S, T), True where attending is allowed. Returns (B, Nq, S, D) in q's dtype.
    On CPU: scores and softmax in fp32 with an additive mask; kv heads are not copied (q is grouped instead).
    """
    b, nq, s, d = q.shape
    nk, t = k.shape[1], k.shape[2]
    if _fused(fused) and q.dtype != ms.float32:  # Ascend: flash attention, attn_mask 1 = discard
        drop = ops.cast(ops.logical_not(mask), ms.uint8)
        return ops.flash_attention_score(q, k, v, nq, attn_mask=drop, scalar_value=scale, input_layout="BNSD")
    rep = nq // nk
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
