"""The fused AdamW kernel (cpu_adamw_kernels.cc, MfsftAdamWFlat) gives bit for bit what numpy's float32 gives for
the same operations in the same order (the basic-ops update of trainer/optimizer.py), on lengths with vector tails
and with weight decay on some parameters only. (test_step_vs_torch checks the whole step against torch's AdamW.)"""
import ctypes

import numpy as np
import pytest

from mindformers_sft.models import kernels


def _call(arrays, dtypes):
    lib = ctypes.CDLL(kernels.cpu_kernel_library())
    k = len(arrays)
    params = (ctypes.c_void_p * k)(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * k)(*[1] * k)
    dims = [(ctypes.c_int64 * 1)(a.size) for a in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * k)(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims])
    types = (ctypes.c_char_p * k)(*[t.encode() for t in dtypes])
    return lib.MfsftAdamWFlat(k, params, ndims, shapes, types, None, None)


@pytest.mark.parametrize("sizes", [(1000, 37, 4096), (5, 16, 15, 70000)])
def test_adamw_kernel_bitwise_equals_float32_reference(sizes):
    assert kernels.cpu_kernels()
    rng = np.random.default_rng(0)
    f32 = np.float32
    g = [rng.standard_normal(s).astype(f32) for s in sizes]
    p = [rng.standard_normal(s).astype(f32) for s in sizes]
    n = sum(sizes)
    m = (rng.random(n) * 0.1).astype(f32)
    v = (rng.random(n) * 0.01).astype(f32)
    lr, bc1, bc2, inv, factor = f32(1e-3), f32(0.19), f32(0.0019), f32(0.37), f32(0.8)
    b1, b2, eps, wd = f32(0.9), f32(0.999), f32(1e-8), f32(0.01)
    scal = np.array([lr, bc1, bc2, inv, factor, 1.0], f32)
    hyper = np.array([b1, f32(1) - b1, b2, f32(1) - b2, eps, wd], f32)
    decays = np.array([i % 2 == 0 for i in range(len(sizes))], f32)
    want_p, want_m, want_v, off = [], [], [], 0
    for t, (gt, pt) in enumerate(zip(g, p)):
        gi = (gt * inv) * factor
        pi = pt - (lr * wd) * pt if decays[t] else pt.copy()
        mi = b1 * m[off:off + gt.size] + hyper[1] * gi
        vi = b2 * v[off:off + gt.size] + (hyper[3] * gi) * gi
        want_p.append(pi - ((lr / bc1) * mi) / (np.sqrt(vi / bc2) + eps))
        want_m.append(mi)
        want_v.append(vi)
        off += gt.size
    token = np.zeros(1, np.int32)
    arrays = g + p + [m, v, scal, hyper, decays, token]
    assert _call(arrays, ["float32"] * (len(arrays) - 1) + ["int32"]) == 0
    for got, want in zip(p, want_p):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(m, np.concatenate(want_m))
    np.testing.assert_array_equal(v, np.concatenate(want_v))
    assert token[0] == 1
