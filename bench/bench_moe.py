"""MoE fine-tuning throughput against transformers' Qwen3MoeForCausalLM on this CPU, side by side in one script.

Config (small, not a toy): hidden 256, 4 layers (heads 4, kv heads 2, head_dim 64), 8 experts top-2,
moe_intermediate 256, vocab 32000, seq 512, batch 4, fp32, router aux loss on (coef 0.001, as transformers with
output_router_logits). Same init (the transformers model is saved and loaded by ours with from_hf_dir), same
batches (random token ids, fixed seed), same full fine-tuning with AdamW (lr 1e-4, weight decay 0.01, clip 1.0),
same thread count, the two sides alternating step by step. Prints tokens/s of each and the ratio
(ours / reference), then the same for dense Qwen3 (intermediate 512 = top-2 x 256: the same active expert flops).

    .venv/bin/python bench/bench_moe.py [--steps 8] [--warmup 2] [--quick] [--block]

--quick: seq 128, 3 timed steps (a smoke run). --block: the MoE block alone (forward + backward of
models/moe.py's MoEBlock vs Qwen3MoeSparseMoeBlock on batch x seq tokens), also with the basic-op fallback.
MFSFT_CPU_KERNELS=0 measures ours without the fused CPU kernels.
"""
import argparse
import os
import sys
import tempfile
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COMMON = dict(vocab_size=32000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, norm_topk_prob=True,
           decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=True, router_aux_loss_coef=0.001,
           intermediate_size=512)


def hf_model(moe: bool):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    if moe:
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, **MOE)).float()
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, intermediate_size=512)).float()


def batches(batch, seq, n):
    rs = np.random.RandomState(0)
    return [rs.randint(0, COMMON["vocab_size"], (batch, seq + 1)).astype(np.int32) for _ in range(n)]


def reference(model, lr):
    """One training step of transformers + torch AdamW: ids (B, S+1) -> loss."""
    import torch
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def step(ids):
        opt.zero_grad()
        t = torch.from_numpy(ids).long()
        out = model(input_ids=t[:, :-1])      # the same S inputs and S targets as ours (HF would shift labels)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), t[:, 1:].flatten())
        if getattr(out, "aux_loss", None) is not None:    # as Qwen3MoeForCausalLM adds it to the loss
            loss = loss + model.config.router_aux_loss_coef * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()
    return step


def ours(hf_dir, lr):
    """One training step of ours (TrainStep, one compiled graph): ids (B, S+1) -> loss; and the kernels flag."""
    import mindspore as ms
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.runtime.launch_blocking()
    from mindformers_sft.pretrained import from_hf_dir
    from mindformers_sft.trainer.optimizer import AdamW
    from mindformers_sft.trainer.step import TrainStep
    model = from_hf_dir(hf_dir)
    train = TrainStep(model, AdamW(model.trainable_params(), weight_decay=0.01), 1.0, None, jit=True)
    return (lambda ids: float(train([{"input_ids": ids, "labels": ids}], lr).loss)), model.cpu_kernel


def compare(name, moe, data, a, lr=1e-4):
    """Both sides step through the same batches, alternating step by step (a shared machine's load falls on both
    alike); each side's time is the sum of its own steps."""
    import torch
    ref = hf_model(moe)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d, safe_serialization=True)
        ref_step = reference(ref, lr)
        our_step, kern = ours(d, lr)
    times, losses = {"ref": 0.0, "ours": 0.0}, {"ref": [], "ours": []}
    for i, ids in enumerate(data):
        for side, step in (("ref", ref_step), ("ours", our_step)):
            t0 = time.perf_counter()
            loss = step(ids)
            if i >= a.warmup:
                times[side] += time.perf_counter() - t0
                losses[side].append(loss)
    tok = data[0].shape[0] * (data[0].shape[1] - 1) * (len(data) - a.warmup)
    ref_l, our_l = losses["ref"], losses["ours"]
    print(f"{name}: batch {data[0].shape[0]} x seq {data[0].shape[1] - 1}, {len(data) - a.warmup} timed steps after "
          f"{a.warmup} warm-up, {torch.get_num_threads()} torch threads")
    print(f"  transformers+torch AdamW: {tok / times['ref']:8.0f} tokens/s  (losses {ref_l[0]:.5f} .. {ref_l[-1]:.5f})")
    print(f"  mindformers_sft:          {tok / times['ours']:8.0f} tokens/s  (losses {our_l[0]:.5f} .. "
          f"{our_l[-1]:.5f}; fused CPU kernels {'on' if kern else 'off'})")
    print(f"  speed ratio (ours / reference): {times['ref'] / times['ours']:.2f}x")


def block(a):
    """MoE block alone: forward + backward (input, router and expert gradients) per second."""
    import torch
    import mindspore as ms
    from mindspore import Tensor
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    from mindformers_sft.models import kernels
    from mindformers_sft.convert.names_qwen3 import experts_stack as stack_experts
    from mindformers_sft.models.moe import MoEBlock
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    torch.manual_seed(0)
    ref = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=256, num_experts=8,
                                                num_experts_per_tok=2, norm_topk_prob=True))
    x = np.random.RandomState(0).randn(a.batch, a.seq, 256).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)

    def ref_step():
        y, logits = ref(xt)
        (y.square().sum() + logits.sum()).backward()
    cfg = types.SimpleNamespace(hidden_size=256, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                                norm_topk_prob=True)
    w1, w2 = stack_experts(*([getattr(m, n).weight.detach().numpy() for m in ref.experts]
                             for n in ("gate_proj", "up_proj", "down_proj")))

    def our_fn(kernel):
        blk = MoEBlock(cfg, False, kernel)
        blk.router.weight.set_data(Tensor(ref.gate.weight.detach().numpy()))
        blk.experts.weight1.set_data(Tensor(w1))
        blk.experts.weight2.set_data(Tensor(w2))

        def loss(xx):
            y, logits = blk(xx)
            return ops_sum(y * y) + ops_sum(logits)
        from mindspore import ops
        ops_sum = ops.sum
        fn = ms.jit(ms.value_and_grad(loss, 0, blk.trainable_params()))
        xm = Tensor(x)
        return lambda: fn(xm)[0].asnumpy()

    def rates(f, g):
        """it/s of f and g, alternating call by call (the machine's load falls on both alike)."""
        for _ in range(a.warmup):
            f(), g()
        tf = tg = 0.0
        for _ in range(a.steps):
            t0 = time.perf_counter()
            f()
            t1 = time.perf_counter()
            g()
            tf, tg = tf + t1 - t0, tg + time.perf_counter() - t1
        return a.steps / tf, a.steps / tg
    print(f"MoE block fwd+bwd, {a.batch * a.seq} tokens, hidden 256, 8 experts top-2, moe_intermediate 256:")
    for kernel in ([True, False] if kernels.cpu_kernels() else [False]):
        r, o = rates(ref_step, our_fn(kernel))
        print(f"  transformers Qwen3MoeSparseMoeBlock {r:7.2f} it/s, ours "
              f"({'fused CPU kernel' if kernel else 'basic-op fallback'}) {o:7.2f} it/s: ratio {o / r:.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="seq 128, 3 timed steps")
    ap.add_argument("--block", action="store_true", help="the MoE block alone")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense Qwen3 comparison")
    a = ap.parse_args()
    if a.quick:
        a.seq, a.steps, a.warmup = 128, 3, 1
    if a.block:
        block(a)
        return
    data = batches(a.batch, a.seq, a.steps + a.warmup)
    compare("Qwen3-MoE (8 experts top-2)", True, data, a)
    if not a.no_dense:
        compare("Qwen3 dense (intermediate 512)", False, data, a)


if __name__ == "__main__":
    main()
