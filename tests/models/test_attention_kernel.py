"""The fused CPU attention kernel (models/cpu_attention*_kernels.cc: the GEMM path and the SIMD rows) against a
torch reference, forward and backward, on packed sequences: segments as contiguous runs (each query skips the keys
before its segment's first key, `jbeg`), padding segment 0, rows with different segment layouts, a flat packed
sequence of B = 1 with few kv heads (work split by blocks of query rows), the generic (odd head_dim) path, many
(batch, kv head) pairs, unsorted key positions and rows that see no key."""
import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mindspore as ms
from mindspore import Tensor

from mindformers_sft.models import kernels

pytestmark = pytest.mark.skipif(not kernels.cpu_kernels(), reason="fused CPU kernels unavailable")


def _rope_tables(pos, d, theta=10000.0):
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos[..., None].astype(np.float64) * inv                      # (B, S, D/2)
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _segments(b, s, layouts):
    seg = np.zeros((b, s), np.int32)
    pos = np.zeros((b, s), np.int32)
    for r, lengths in enumerate(layouts):
        o = 0
        for n, length in enumerate(lengths):
            seg[r, o:o + length] = n + 1
            pos[r, o:o + length] = np.arange(length)
            o += length
        pos[r, o:] = np.arange(s - o)        # padding: segment 0
    return seg, pos


def _reference(q, k, v, cos, sin, seg, scale, gout):
    """torch: rotary embedding, causal attention within equal segment ids, grouped kv heads; (o, dq, dk, dv)."""
    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    c, s_ = torch.tensor(cos, dtype=torch.float64)[:, :, None], torch.tensor(sin, dtype=torch.float64)[:, :, None]

    def rope(x):
        h = x.shape[-1] // 2
        return x * c + torch.cat([-x[..., h:], x[..., :h]], -1) * s_
    rep = q.shape[2] // k.shape[2]
    qr = rope(tq).transpose(1, 2)                                       # (B, Nq, S, D)
    kr = rope(tk).repeat_interleave(rep, 2).transpose(1, 2)
    vr = tv.repeat_interleave(rep, 2).transpose(1, 2)
    S = q.shape[1]
    sg = torch.tensor(seg)
    mask = torch.tril(torch.ones(S, S, dtype=torch.bool))[None] & (sg[:, :, None] == sg[:, None, :])
    scores = (qr @ kr.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    o = (torch.softmax(scores, -1) @ vr).transpose(1, 2)               # (B, S, Nq, D)
    (o * torch.tensor(gout, dtype=torch.float64)).sum().backward()
    return o.detach().numpy(), tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy()


def _ours(q, k, v, cos, sin, seg, scale, gout):
    S = q.shape[1]
    index = Tensor(np.arange(S, dtype=np.int32))
    sg = Tensor(seg)
    c, s_ = Tensor(cos), Tensor(sin)
    sc = Tensor(np.array([scale], np.float32))

    def f(q, k, v):
        o = kernels.cpu_attention(q, k, v, c, s_, (index, index, sg, sg), sc)
        return (o * Tensor(gout)).sum(), o
    (_, o), grads = ms.value_and_grad(f, (0, 1, 2), has_aux=True)(Tensor(q), Tensor(k), Tensor(v))
    return (o.asnumpy(),) + tuple(g.asnumpy() for g in grads)


CASES = {
    # name: (B, S, Nq, Nk, D, segment lengths per row)
    "flat_packed_b1_3kv": (1, 120, 9, 3, 64, [[5, 37, 20, 41]]),           # 17 padding positions at the end
    "two_rows_16": (2, 96, 4, 2, 16, [[30, 30, 11], [1, 60, 35]]),
    "generic_head_dim_6": (1, 50, 4, 2, 6, [[10, 17, 15]]),
    "many_pairs_nblk1": (4, 40, 8, 4, 32, [[40], [12, 20], [3, 3, 3, 30], [25]]),
}


@pytest.fixture(params=["gemm", "rows"])
def path(request, monkeypatch):
    """The GEMM path over blocks of query rows (taken when oneDNN's sgemm is found, as here) and the SIMD rows."""
    monkeypatch.setenv("MFSFT_ATTN_GEMM", "1" if request.param == "gemm" else "0")
    lib = ctypes.CDLL(kernels.cpu_kernel_library())
    assert lib.MfsftAttnGemmEnabled() == (request.param == "gemm")
    return request.param


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_kernel_matches_torch_on_packed_segments(name, path):
    B, S, nq, nk, D, layouts = CASES[name]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, S, nq, D)).astype(np.float32)
    k = rng.standard_normal((B, S, nk, D)).astype(np.float32)
    v = rng.standard_normal((B, S, nk, D)).astype(np.float32)
    gout = rng.standard_normal((B, S, nq, D)).astype(np.float32)
    seg, pos = _segments(B, S, layouts)
    cos, sin = _rope_tables(pos, D)
    scale = D ** -0.5
    ref = _reference(q, k, v, cos, sin, seg, scale, gout)
    out = _ours(q, k, v, cos, sin, seg, scale, gout)
    for what, a, r in zip(("o", "dq", "dk", "dv"), out, ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=2e-5, err_msg=what)


def test_packed_segments_equal_separate_sequences(path):
    """Each segment of a flat packed sequence gives what it gives alone (forward and gradients)."""
    lengths, nq, nk, D = [37, 5, 64, 19], 9, 3, 64
    S = sum(lengths)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, S, nq, D)).astype(np.float32)
    k = rng.standard_normal((1, S, nk, D)).astype(np.float32)
    v = rng.standard_normal((1, S, nk, D)).astype(np.float32)
    gout = rng.standard_normal((1, S, nq, D)).astype(np.float32)
    seg, pos = _segments(1, S, [lengths])
    cos, sin = _rope_tables(pos, D)
    packed = _ours(q, k, v, cos, sin, seg, D ** -0.5, gout)
    o = 0
    for n in lengths:
        sl = slice(o, o + n)
        alone = _ours(q[:, sl], k[:, sl], v[:, sl], cos[:, sl], sin[:, sl], np.ones((1, n), np.int32), D ** -0.5,
                      gout[:, sl])
        for what, a, p in zip(("o", "dq", "dk", "dv"), alone, packed):
            np.testing.assert_allclose(p[:, sl], a, rtol=1e-5, atol=1e-6, err_msg=f"{what} of segment at {o}")
        o += n


def test_gemm_path_with_the_plain_gemm_loop_in_subprocess():
    """Without oneDNN (MFSFT_PLAIN_GEMM=1: cpu_kernels.cc's own loop) the GEMM path gives the same numbers."""
    env = dict(os.environ, MFSFT_PLAIN_GEMM="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        f"{__file__}::test_attention_kernel_matches_torch_on_packed_segments", "-k", "gemm"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"{len(CASES)} passed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_unsorted_key_positions_and_rows_without_keys(path):
    """Key positions in any order (each key tested) and queries that see no key: as an additive -1e9 mask (torch),
    such a row is the mean of v over all keys."""
    rng = np.random.default_rng(2)
    B, S, nq, nk, D = 2, 70, 4, 2, 32
    q, k, v, gout = (rng.standard_normal(sh).astype(np.float32)
                     for sh in ((B, S, nq, D), (B, S, nk, D), (B, S, nk, D), (B, S, nq, D)))
    cos, sin = _rope_tables(np.tile(np.arange(S), (B, 1)), D)
    qpos, kpos = (np.arange(S) - 3).astype(np.int32), rng.permutation(S).astype(np.int32)
    seg = np.ones((B, S), np.int32)
    seg[1, 30:] = 2
    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    c, s_ = torch.tensor(cos, dtype=torch.float64)[:, :, None], torch.tensor(sin, dtype=torch.float64)[:, :, None]

    def rope(x):
        h = x.shape[-1] // 2
        return x * c + torch.cat([-x[..., h:], x[..., :h]], -1) * s_
    qr, kr = rope(tq).transpose(1, 2), rope(tk).repeat_interleave(2, 2).transpose(1, 2)
    vr = tv.repeat_interleave(2, 2).transpose(1, 2)
    sg = torch.tensor(seg)
    mask = (torch.tensor(kpos)[None, :] <= torch.tensor(qpos)[:, None])[None] & (sg[:, :, None] == sg[:, None, :])
    scores = ((qr @ kr.transpose(-1, -2)) * 0.3).masked_fill(~mask[:, None], -1e9)
    o = (torch.softmax(scores, -1) @ vr).transpose(1, 2)
    (o * torch.tensor(gout, dtype=torch.float64)).sum().backward()
    index = (Tensor(qpos), Tensor(kpos), Tensor(seg), Tensor(seg))

    def f(q, k, v):
        o = kernels.cpu_attention(q, k, v, Tensor(cos), Tensor(sin), index, Tensor(np.array([0.3], np.float32)))
        return (o * Tensor(gout)).sum(), o
    (_, ours), grads = ms.value_and_grad(f, (0, 1, 2), has_aux=True)(Tensor(q), Tensor(k), Tensor(v))
    for what, a, r in zip(("o", "dq", "dk", "dv"), [ours] + list(grads),
                          (o.detach(), tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(a.asnumpy(), r.numpy(), rtol=1e-4, atol=2e-5, err_msg=what)
