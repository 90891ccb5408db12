"""The logits head fused with the cross entropy (kernels.head_cross_entropy, cpu_cross_entropy_kernels.cc) against
torch's F.cross_entropy on h @ W.T: per-row loss and the gradients of h and W, in PyNative and compiled, with rows
without a target (-1: loss and gradient 0), a vocabulary that is not a multiple of the kernel's block, the frozen-weight
variant (no weight gradient), and a target outside the vocabulary (the kernel refuses it)."""
import numpy as np
import pytest
import torch

import mindspore as ms
from mindspore import Parameter, Tensor

from mindformers_sft.models import kernels


def _case(rows=37, hidden=24, vocab=1100, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((rows, hidden)).astype(np.float32)
    w = (rng.standard_normal((vocab, hidden)) * 0.3).astype(np.float32)
    t = rng.integers(0, vocab, rows).astype(np.int32)
    t[::5] = -1                       # rows without a target
    g = rng.random(rows).astype(np.float32)      # upstream gradient of each row's loss
    return h, w, t, g


def _torch(h, w, t, g):
    th, tw = torch.tensor(h, dtype=torch.float64, requires_grad=True), torch.tensor(w, dtype=torch.float64,
                                                                                   requires_grad=True)
    loss = torch.nn.functional.cross_entropy(th @ tw.T, torch.tensor(t, dtype=torch.long), ignore_index=-1,
                                             reduction="none")
    (loss * torch.tensor(g, dtype=torch.float64)).sum().backward()
    return loss.detach().numpy(), th.grad.numpy(), tw.grad.numpy()


def _ours(h, w, t, g, weight_grad=True, jit=False):
    assert kernels.cpu_kernels(), kernels._CPU_STATE["error"]
    weight = Parameter(Tensor(w), name="head_weight")
    gt = Tensor(g)

    def fn(x, targets):
        return (kernels.head_cross_entropy(x, weight, targets, weight_grad) * gt).sum()
    grad = ms.value_and_grad(fn, 0, [weight])
    if jit:
        grad = ms.jit(grad)
    _, (dh, (dw,)) = grad(Tensor(h), Tensor(t))
    loss = kernels.head_cross_entropy(Tensor(h), weight, Tensor(t), weight_grad)
    return loss.asnumpy(), dh.asnumpy(), dw.asnumpy()


@pytest.mark.parametrize("jit", [False, True])
def test_loss_and_gradients_match_torch(jit):
    h, w, t, g = _case()
    loss, dh, dw = _ours(h, w, t, g, jit=jit)
    ref_loss, ref_dh, ref_dw = _torch(h, w, t, g)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-6)
    assert np.all(loss[t == -1] == 0) and np.all(dh[t == -1] == 0)


def test_frozen_weight_gives_the_same_input_gradient_and_no_weight_gradient():
    h, w, t, g = _case(seed=1)
    _, dh, dw = _ours(h, w, t, g, weight_grad=False, jit=True)
    _, ref_dh, _ = _torch(h, w, t, g)
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-4, atol=1e-6)
    assert not dw.any()


def test_rows_all_without_target():
    h, w, t, g = _case(rows=6, seed=2)
    t[:] = -1
    loss, dh, dw = _ours(h, w, t, g)
    assert not loss.any() and not dh.any() and not dw.any()


def test_target_outside_the_vocabulary_is_refused():
    h, w, t, g = _case(rows=4, seed=3)
    t[1] = w.shape[0]
    with pytest.raises(RuntimeError):
        _ours(h, w, t, g)


def test_model_loss_uses_it_and_equals_the_separate_head(monkeypatch):
    """CausalLM's loss with the fused head equals the separate matmul + cross entropy (MFSFT_FUSED_HEAD=0)."""
    from tests.paths import STORIES
    from mindformers_sft.pretrained import from_hf_dir
    rng = np.random.default_rng(4)
    ids = rng.integers(3, 500, (2, 33)).astype(np.int32)
    labels = ids.copy()
    labels[:, :10] = -100
    fused = from_hf_dir(STORIES)
    assert fused.fused_head and fused.head_weight() is not None
    monkeypatch.setenv("MFSFT_FUSED_HEAD", "0")
    plain = from_hf_dir(STORIES)
    assert not plain.fused_head
    a = fused.loss_sum_and_count(Tensor(ids), Tensor(labels))
    b = plain.loss_sum_and_count(Tensor(ids), Tensor(labels))
    np.testing.assert_allclose(a[0].asnumpy(), b[0].asnumpy(), rtol=1e-5)
    assert float(a[1].asnumpy()) == float(b[1].asnumpy()) == 2 * 23     # targets labels[:, 1:]: 32 per row, 9 ignored

