"""Unpadding (trainer/unpad.py): one step on the flat packed sequence of the rows' prefixes equals one step on the
padded batch (MFSFT_UNPAD=0): rows of different lengths, an already-packed batch, gradient accumulation."""
import numpy as np
import pytest

from mindformers_sft.models import kernels, state_dict_numpy
from mindformers_sft.pretrained import from_hf_dir
from mindformers_sft.trainer import unpad
from mindformers_sft.trainer.optimizer import AdamW
from mindformers_sft.trainer.step import TrainStep, graph_shape, selects_rows

from tests.paths import STORIES

LR, WD, CLIP = 1e-4, 0.1, 1.0
IGN = -100


def _rows_batch(seed=0, b=4, s=40):
    """Prompt, answer, then padding (ignored, pad token 0) of a different length per row; one row with no target."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 512, (b, s + 1)).astype(np.int32)
    labels = np.full_like(ids, IGN)
    for r, (p, e) in enumerate([(5, 18), (10, 41), (3, 9), (7, 7)][:b]):   # answer labels[p:e]; row 3: none
        labels[r, p:e] = ids[r, p:e]
        ids[r, e:] = 0
    return {"input_ids": ids, "labels": labels}


def _packed_batch(seed=1, b=2, s=48):
    """Already packed: 2-3 samples per row (positions restart, segment ids 1, 2, ...), padding segment 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 512, (b, s + 1)).astype(np.int32)
    labels = np.full_like(ids, IGN)
    seg = np.zeros((b, s), np.int32)
    pos = np.zeros((b, s), np.int32)
    for r, lengths in enumerate([[12, 20, 9], [30, 10]]):
        o = 0
        for n, length in enumerate(lengths):
            seg[r, o:o + length] = n + 1
            pos[r, o:o + length] = np.arange(length)
            labels[r, o + 4:o + length] = ids[r, o + 4:o + length]   # a prompt part of 3 targets per sample
            o += length
        pos[r, o:] = np.arange(s - o)
        ids[r, o:] = 0
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg}


def _step(monkeypatch, flag, micro_batches, jit=False):
    monkeypatch.setenv("MFSFT_UNPAD", flag)
    model = from_hf_dir(STORIES)
    assert selects_rows(model)
    runner = TrainStep(model, AdamW(model.trainable_params(), 0.9, 0.999, 1e-8, WD), CLIP, None, jit=jit)
    out = runner(micro_batches, LR)
    return out, state_dict_numpy(model)


def _same_step(monkeypatch, micro_batches, jit=False):
    w0 = state_dict_numpy(from_hf_dir(STORIES))
    ref, w_ref = _step(monkeypatch, "0", micro_batches, jit)
    out, w = _step(monkeypatch, "1", micro_batches, jit)
    assert out.tokens == ref.tokens
    assert abs(out.loss - ref.loss) <= 1e-5 * abs(ref.loss), (out.loss, ref.loss)
    assert abs(out.grad_norm - ref.grad_norm) <= 1e-4 * ref.grad_norm, (out.grad_norm, ref.grad_norm)
    for name, arr in w.items():
        np.testing.assert_allclose(arr, w_ref[name], rtol=0, atol=1e-5, err_msg=name)
        d, d_ref = arr - w0[name], w_ref[name] - w0[name]
        if np.linalg.norm(d_ref) > 0:
            assert np.linalg.norm(d - d_ref) / np.linalg.norm(d_ref) < 1e-2, name


pytestmark = pytest.mark.skipif(not kernels.cpu_kernels(), reason="unpadding needs the fused CPU kernels")


def test_unpad_layout():
    mb = _packed_batch()
    f = unpad.unpad(mb, IGN)
    last = unpad.prefix_lengths(mb["input_ids"], mb["labels"], IGN)
    assert list(last) == [40, 39]        # 1 + the index of the last supervised target in labels[b, 1:]
    k = f["segment_ids"].shape[1]
    assert k == 84 and f["input_ids"].shape == (1, 85) and f["labels"].shape == (1, 85)   # 79 -> 7/8 of 96
    # (row, segment) pairs distinct across rows, the tail segment 0 with ignored targets
    assert list(np.unique(f["segment_ids"][0, :79])) == [1, 2, 3, 4, 5]
    assert (f["segment_ids"][0, 79:] == 0).all() and (f["labels"][0, 80:] == IGN).all()
    np.testing.assert_array_equal(f["position_ids"][0, 40:79], mb["position_ids"][1, :39])
    np.testing.assert_array_equal(f["labels"][0, 41:80], mb["labels"][1, 1:40])
    np.testing.assert_array_equal(f["input_ids"][0, 40:79], mb["input_ids"][1, :39])
    assert unpad.padding_share([mb], IGN) == pytest.approx(1 - 79 / 96)


def test_unpad_step_equals_padded_rows_of_different_lengths(monkeypatch):
    mb = _rows_batch()
    assert graph_shape(mb, IGN, unpadding=True)[2] == (1, 81)      # 17 + 40 + 8 + 0 = 65 -> 80 of 160 (+1)
    _same_step(monkeypatch, [mb])


def test_unpad_step_equals_padded_packed_batch(monkeypatch):
    _same_step(monkeypatch, [_packed_batch()])


def test_unpad_step_equals_padded_with_accumulation(monkeypatch):
    _same_step(monkeypatch, [_rows_batch(seed=2), _rows_batch(seed=3, b=2)])


def test_unpad_step_equals_padded_compiled(monkeypatch):
    _same_step(monkeypatch, [_rows_batch(seed=4)], jit=True)
