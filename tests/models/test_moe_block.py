"""models/moe.py against transformers 4.57's Qwen3MoeSparseMoeBlock / load_balancing_loss_func (torch autograd
as the gradient reference), on both the fused CPU kernel path and the basic-op fallback."""
import types

import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, load_balancing_loss_func

from mindformers_sft.errors import CheckpointError
from mindformers_sft.models import kernels
from mindformers_sft.convert.names_qwen3 import experts_stack as stack_experts, experts_unstack as unstack_experts
from mindformers_sft.models.moe import MoEBlock, load_balancing_loss

H, F, E, K = 32, 24, 8, 2
PATHS = [True, False]   # fused CPU kernel, basic-op fallback


@pytest.fixture(scope="module", autouse=True)
def cpu():
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    assert kernels.cpu_kernels(), "the fused CPU kernels must build here (g++)"


def make_pair(norm, cpu_kernel, seed=0, starve=()):
    """HF block with random weights (std 0.2) and ours with the same weights; experts in `starve` get router rows
    that lose to every other expert on positive inputs."""
    torch.manual_seed(seed)
    ref = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E,
                                                num_experts_per_tok=K, norm_topk_prob=norm))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
        for e in starve:
            ref.gate.weight[e] = -ref.gate.weight[e].abs() - 0.5
    cfg = types.SimpleNamespace(hidden_size=H, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=F,
                                norm_topk_prob=norm, param_init_type="float32", compute_dtype="float32",
                                initializer_range=0.02)
    ours = MoEBlock(cfg, False, cpu_kernel)
    w1, w2 = stack_experts(*([getattr(m, n).weight.detach().numpy() for m in ref.experts]
                             for n in ("gate_proj", "up_proj", "down_proj")))
    ours.router.weight.set_data(Tensor(ref.gate.weight.detach().numpy()))
    ours.experts.weight1.set_data(Tensor(w1))
    ours.experts.weight2.set_data(Tensor(w2))
    return ref, ours


def ref_grads(ref, x, gy, gl):
    xt = torch.from_numpy(x).requires_grad_(True)
    y, logits = ref(xt)
    ((y * torch.from_numpy(gy)).sum() + (logits * torch.from_numpy(gl)).sum()).backward()
    zero = torch.zeros
    gates = [m.gate_proj.weight.grad if m.gate_proj.weight.grad is not None else zero(F, H) for m in ref.experts]
    ups = [m.up_proj.weight.grad if m.up_proj.weight.grad is not None else zero(F, H) for m in ref.experts]
    downs = [m.down_proj.weight.grad if m.down_proj.weight.grad is not None else zero(H, F) for m in ref.experts]
    g1, g2 = stack_experts([g.numpy() for g in gates], [u.numpy() for u in ups], [d.numpy() for d in downs])
    return y.detach().numpy(), logits.detach().numpy(), xt.grad.numpy(), ref.gate.weight.grad.numpy(), g1, g2


def our_grads(ours, x, gy, gl, jit=False):
    params = [ours.router.weight, ours.experts.weight1, ours.experts.weight2]

    def loss(xx):
        y, logits = ours(xx)
        return (y * Tensor(gy)).sum() + (logits * Tensor(gl)).sum(), y, logits
    fn = ms.value_and_grad(loss, grad_position=0, weights=params, has_aux=True)
    if jit:
        fn = ms.jit(fn)
    (_, y, logits), (gx, (gr, g1, g2)) = fn(Tensor(x))
    return y.asnumpy(), logits.asnumpy(), gx.asnumpy(), gr.asnumpy(), g1.asnumpy(), g2.asnumpy()


def data(seed, positive=False):
    rs = np.random.RandomState(seed)
    x = rs.randn(2, 7, H).astype(np.float32)
    return (np.abs(x) if positive else x), rs.randn(2, 7, H).astype(np.float32), rs.randn(14, E).astype(np.float32)


def check(ours_out, ref_out):
    names = ("output", "router logits", "d input", "d router.weight", "d weight1", "d weight2")
    for name, a, b in zip(names, ours_out, ref_out):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_stack_unstack_layout_is_mindformers():
    rs = np.random.RandomState(0)
    gates, ups, downs = [rs.randn(3, 4) for _ in range(2)], [rs.randn(3, 4) for _ in range(2)], [rs.randn(4, 3)
                                                                                                  for _ in range(2)]
    w1, w2 = stack_experts(gates, ups, downs)
    assert w1.shape == (2 * 4, 2 * 3) and w2.shape == (2 * 3, 4)
    # MindFormers 1.8: concat(gate, up) on axis 0 per expert, stack, transpose(0, 2, 1), reshape(E*H, -1)
    mf = np.stack([np.concatenate([g, u], 0) for g, u in zip(gates, ups)]).transpose(0, 2, 1).reshape(8, -1)
    np.testing.assert_array_equal(w1, mf)
    np.testing.assert_array_equal(w2, np.stack(downs).transpose(0, 2, 1).reshape(6, -1))
    for a, b in zip(unstack_experts(w1, w2, 2), (gates, ups, downs)):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    with pytest.raises(CheckpointError, match="weight2"):
        unstack_experts(w1, w2[:-1], 2)


@pytest.mark.parametrize("cpu_kernel", PATHS, ids=["fused", "basic"])
@pytest.mark.parametrize("norm", [True, False], ids=["norm_topk", "no_norm"])
def test_block_matches_transformers(cpu_kernel, norm):
    ref, ours = make_pair(norm, cpu_kernel)
    x, gy, gl = data(1)
    check(our_grads(ours, x, gy, gl), ref_grads(ref, x, gy, gl))


@pytest.mark.parametrize("cpu_kernel", PATHS, ids=["fused", "basic"])
def test_experts_without_tokens(cpu_kernel):
    ref, ours = make_pair(True, cpu_kernel, seed=3, starve=(2, 6, 7))
    x, gy, gl = data(2, positive=True)
    with torch.no_grad():
        chosen = torch.topk(ref.gate(torch.from_numpy(x).view(-1, H)), K, -1).indices.unique().tolist()
    assert not {2, 6, 7} & set(chosen) and len(chosen) >= 2
    got = our_grads(ours, x, gy, gl)
    check(got, ref_grads(ref, x, gy, gl))
    g1, g2 = got[4].reshape(E, H, 2 * F), got[5].reshape(E, F, H)
    for e in (2, 6, 7):
        assert not g1[e].any() and not g2[e].any()      # exact zeros


@pytest.mark.parametrize("cpu_kernel", PATHS, ids=["fused", "basic"])
def test_graph_mode_matches_transformers(cpu_kernel):
    ref, ours = make_pair(False, cpu_kernel, seed=4)
    x, gy, gl = data(5)
    check(our_grads(ours, x, gy, gl, jit=True), ref_grads(ref, x, gy, gl))


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss(masked):
    rs = np.random.RandomState(7)
    logits = [rs.randn(2 * 6, E).astype(np.float32) for _ in range(3)]
    mask = np.ones((2, 6), np.int64)
    mask[0, 4:] = 0
    mask[1, :1] = 0
    lt = tuple(torch.from_numpy(l).requires_grad_(True) for l in logits)
    ref = load_balancing_loss_func(lt, E, K, torch.from_numpy(mask) if masked else None)
    ref.backward()

    def f(*ls):
        return load_balancing_loss(ls, E, K, Tensor(mask.astype(np.int32)) if masked else None)
    val, grads = ms.value_and_grad(f, grad_position=(0, 1, 2))(*[Tensor(l) for l in logits])
    np.testing.assert_allclose(val.asnumpy(), ref.item(), rtol=1e-5, atol=1e-6)
    for g, t in zip(grads, lt):
        np.testing.assert_allclose(g.asnumpy(), t.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cpu_kernel", PATHS, ids=["fused", "basic"])
def test_experts_lora_matches_peft(cpu_kernel):
    from peft import LoraConfig, inject_adapter_in_model
    ref, ours = make_pair(True, cpu_kernel, seed=8)
    rank, alpha = 4, 8.0
    new = ours.experts.enable_lora(rank, alpha, 0.0)
    assert [p.name for p in new] == ["experts.lora_a1", "experts.lora_b1", "experts.lora_a2", "experts.lora_b2"]
    rs = np.random.RandomState(9)
    a1, b1 = rs.randn(E, rank, H).astype(np.float32) * 0.2, rs.randn(E, 2 * F, rank).astype(np.float32) * 0.2
    a2, b2 = rs.randn(E, rank, F).astype(np.float32) * 0.2, rs.randn(E, H, rank).astype(np.float32) * 0.2
    for p, v in zip(new, (a1, b1, a2, b2)):
        p.set_data(Tensor(v))
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                       target_modules=["gate_proj", "up_proj", "down_proj"]), ref)
    with torch.no_grad():
        for e, m in enumerate(ref.experts):
            for lin, a, b in ((m.gate_proj, a1[e], b1[e, :F]), (m.up_proj, a1[e], b1[e, F:]),
                              (m.down_proj, a2[e], b2[e])):
                lin.lora_A["default"].weight.copy_(torch.from_numpy(a))
                lin.lora_B["default"].weight.copy_(torch.from_numpy(b))
    x, gy, _ = data(10)
    xt = torch.from_numpy(x)
    y_ref = ref(xt)[0]
    (y_ref * torch.from_numpy(gy)).sum().backward()
    g_b1 = np.stack([np.concatenate([m.gate_proj.lora_B["default"].weight.grad.numpy(),
                                     m.up_proj.lora_B["default"].weight.grad.numpy()], 0) for m in ref.experts])
    g_a2 = np.stack([m.down_proj.lora_A["default"].weight.grad.numpy() for m in ref.experts])

    def loss(xx):
        return (ours(xx)[0] * Tensor(gy)).sum()
    _, (gb1, ga2) = ms.value_and_grad(loss, None, weights=[new[1], new[2]])(Tensor(x))
    np.testing.assert_allclose(ours(Tensor(x))[0].asnumpy(), y_ref.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gb1.asnumpy(), g_b1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ga2.asnumpy(), g_a2, rtol=1e-4, atol=1e-5)
    # merged weights: the same block without adapters gives the same output
    m1, m2 = ours.experts.merged_weights()
    _, plain = make_pair(True, cpu_kernel, seed=8)
    plain.experts.weight1.set_data(Tensor(m1))
    plain.experts.weight2.set_data(Tensor(m2))
    np.testing.assert_allclose(plain(Tensor(x))[0].asnumpy(), y_ref.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_fused_kernel_plain_gemm_in_subprocess():
    """The kernel's own GEMM loop (used when MindSpore's oneDNN sgemm is not found) gives the same numbers."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, MFSFT_PLAIN_GEMM="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        f"{__file__}::test_block_matches_transformers", "-k", "fused"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
