"""bf16/fp16 casting matches torch bit for bit; bf16 arrays interoperate with MindSpore."""
import mindspore as ms
import numpy as np
import pytest
import torch

from mindformers_sft.checkpoint import BF16, bf16_from_bits, cast, fp32_to_bf16_bits, is_bf16, to_np_dtype
from mindformers_sft.errors import CheckpointError, ConfigError

SPECIAL = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -9, -1 - 2 ** -8, 3.3e38, -3.39e38,
                    1e-40, -1e-42, 1.2e-38, np.inf, -np.inf, 0.0, -0.0, 65504.0, 6e-8, 65519.0],
                   dtype=np.float32)


def _torch_bits(x: np.ndarray, dt) -> np.ndarray:
    return torch.from_numpy(x).to(dt).view(torch.int16).numpy().view(np.uint16)


def _inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(20000).astype(np.float32) * np.exp(rng.uniform(-30, 30, 20000)).astype(np.float32)
    # every rounding case of the 16 dropped bits: ties, just below/above ties, for + and -
    base = rng.integers(0, 2 ** 15, 2000, dtype=np.uint32) << 16
    low = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    ties = (base[:, None] | low[None, :]).reshape(-1).view(np.float32)
    ties = ties[np.isfinite(ties)]
    x = np.concatenate([SPECIAL, x, ties, -ties])
    return x[~(np.abs(x) > 3.395e38) | np.isinf(x)]     # finite values that overflow bf16 are an error (below)


def test_fp32_to_bf16_matches_torch_bit_for_bit():
    x = _inputs()
    ours = cast(x, "bf16")
    assert ours.dtype == BF16 and is_bf16(ours)
    assert np.array_equal(ours.view(np.uint16), _torch_bits(x, torch.bfloat16))
    assert np.array_equal(fp32_to_bf16_bits(x), _torch_bits(x, torch.bfloat16))


def test_fp16_and_cross_casts_match_torch():
    x = _inputs()
    x16 = x[np.abs(x) < 65000]                            # no overflow (that is an error, tested below)
    assert np.array_equal(cast(x16, "fp16").view(np.uint16), _torch_bits(x16, torch.float16))
    b = cast(x16, "bf16")
    tb = torch.from_numpy(x16).to(torch.bfloat16)
    assert np.array_equal(cast(b, "fp16").view(np.uint16), tb.to(torch.float16).view(torch.int16).numpy()
                          .view(np.uint16))
    assert np.array_equal(cast(b, "fp32"), tb.to(torch.float32).numpy())              # exact widening
    h = x16.astype(np.float16)
    assert np.array_equal(cast(h, "bf16").view(np.uint16),
                          torch.from_numpy(h).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


def test_nan_stays_nan_and_same_dtype_is_no_copy():
    x = np.array([np.nan, -np.nan, 1.0], np.float32)
    assert np.isnan(cast(x, "bf16").astype(np.float32)[:2]).all()
    assert cast(x, "fp32") is x and cast(x, None) is x
    ints = np.arange(3, dtype=np.int64)
    assert cast(ints, "bf16") is ints                    # integer tensors are never cast


def test_overflow_to_fp16_names_the_tensor():
    x = np.array([1.0, 70000.0], np.float32)
    with pytest.raises(CheckpointError, match="m.ckpt: tensor 'w1': value 70000.0 at index \\[1\\] does not fit "
                                              "float16"):
        cast(x, "fp16", name="w1", where="m.ckpt")
    assert np.isinf(cast(np.array([np.inf], np.float32), "fp16")).all()   # inf in, inf out: fine
    with pytest.raises(CheckpointError, match="tensor 'w2'.*does not fit bfloat16"):
        cast(np.array([3.4e38], np.float32), "bf16", name="w2")


def test_bf16_arrays_interoperate_with_mindspore():
    bits = np.array([0x3F80, 0xC040, 0x7F80, 0x0001], np.uint16)
    a = bf16_from_bits(bits)
    t = ms.Tensor(a)
    assert t.dtype == ms.bfloat16
    back = t.asnumpy()
    assert back.dtype == BF16 and np.array_equal(back.view(np.uint16), bits)
    assert np.array_equal(a.astype(np.float32)[:3], np.array([1.0, -3.0, np.inf], np.float32))


def test_dtype_names():
    assert to_np_dtype("bf16") == BF16 and to_np_dtype("bfloat16") == BF16
    assert to_np_dtype("fp16") == np.float16 and to_np_dtype("FP32") == np.float32
    with pytest.raises(ConfigError, match="--dtype: 'int4' is not a dtype"):
        to_np_dtype("int4")
