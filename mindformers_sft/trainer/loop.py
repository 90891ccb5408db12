"""The training loop: batches from the BatchPlan, one TrainStep per optimizer step, callbacks, periodic
eval and checkpoints, exact resume, and a last good checkpoint when anything goes wrong."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import mindspore as ms
from mindspore import Tensor

from ..checkpoint.loading import _training_rank_dir, split
from ..checkpoint.training_state import CheckpointManager
from ..data.prefetch import Prefetcher
from ..data.sampler import BatchPlan, collate
from ..errors import TrainingError
from ..models import load_state_dict
from ..parallel import RankInfo
from ..parallel.strategies import dims
from .callbacks import History, LossMonitor, TensorBoard, plot_loss_curve
from .lr_schedule import build_lr_schedule
from .optimizer import AdamW
from .step import BATCH_KEYS, LossScaler, TrainStep


@dataclass
class TrainResult:
    step: int
    losses: list = field(default_factory=list)
    eval_losses: list = field(default_factory=list)
    last_checkpoint: str = ""


def _callback(cfg, type_):
    for cb in cfg.callbacks or []:
        if cb.get("type") == type_:
            return cb
    return None


def evaluate(model, dataset, batch_size=1, jit=False):
    """Token-weighted mean loss and perplexity over the whole dataset."""
    fn = ms.jit(model.loss_sum_and_count) if jit else model.loss_sum_and_count
    total, count = 0.0, 0.0
    model.set_train(False)
    for start in range(0, len(dataset), batch_size):
        b = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        args = [Tensor(b[k]) if k in b else None for k in BATCH_KEYS]
        s, n = fn(*args)
        total += float(s.asnumpy())
        count += float(n.asnumpy())
    model.set_train(True)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def trainable_arrays(model, optimizer, full: bool) -> dict:
    params = model.get_parameters() if full else optimizer.params
    out = {p.name: p.asnumpy() for p in params}
    out.update(optimizer.state_arrays())
    return out


def trainable_arrays_shapes(model, optimizer, full: bool) -> dict:
    """name -> shape of what `trainable_arrays` saves, without copying any data."""
    params = model.get_parameters() if full else optimizer.params
    shapes = {p.name: tuple(p.shape) for p in params}
    shapes.update(optimizer.state_shapes())
    return shapes


def train(cfg, model, train_ds, eval_ds=None, rank: RankInfo = RankInfo(), stream=None) -> TrainResult:
    rc, out_dir = cfg.runner_config, cfg.output_dir
    os.makedirs(out_dir, exist_ok=True)
    plan = BatchPlan(len(train_ds), rc.batch_size, rc.gradient_accumulation_steps, rank.dp_size, rank.dp_rank,
                     seed=cfg.seed, shuffle=cfg.train_dataset.data_loader.shuffle)
    total = plan.steps_per_epoch * rc.epochs
    if rc.max_steps and rc.max_steps > 0:
        total = min(total, rc.max_steps)
    sched = build_lr_schedule(cfg.lr_schedule, total)
    trainable = [p for p in model.trainable_params()]
    full = len(trainable) == len(list(model.get_parameters()))
    opt = AdamW(trainable, cfg.optimizer.beta1, cfg.optimizer.beta2, cfg.optimizer.eps, cfg.optimizer.weight_decay)

    ck = _callback(cfg, "CheckpointMonitor") or {}
    manager = CheckpointManager(out_dir, rank.rank, ck.get("prefix", "llama"), ck.get("keep_checkpoint_max", 5),
                                ck.get("checkpoint_format", "ckpt"))
    save_every = int(ck.get("save_checkpoint_steps", 0) or 0) if ck else 0
    monitor_cfg = _callback(cfg, "MFLossMonitor") or {}
    monitor = LossMonitor(total, monitor_cfg.get("per_print_times", 1), stream=stream,
                          log_file=os.path.join(out_dir, f"train_rank_{rank.rank}.log"), rank=rank.rank)
    tb = TensorBoard(os.path.join(out_dir, "tensorboard")) if rank.is_main and _callback(cfg, "TensorBoardMonitor") \
        else None
    history = History(os.path.join(out_dir, "loss_history.jsonl")) if rank.is_main else None
    eval_every = int(cfg.eval_step_interval or -1) if cfg.do_eval and eval_ds is not None else -1
    eval_cb = _callback(cfg, "EvalCallBack")
    if eval_cb and eval_ds is not None:
        eval_every = int(eval_cb.get("step_interval", 100))

    step, entry = 0, None
    _, mp, pp = dims(cfg.parallel_config) if cfg.use_parallel else (1, 1, 1)
    # recorded in meta.json; `sliced`: under semi-auto parallel each rank saves its slices (model parallel and/or
    # optimizer sharding), under data parallel a whole replica
    layout = {"data_parallel": rank.dp_size, "model_parallel": mp, "pipeline_stage": pp, "sliced": rank.semi_auto}
    if cfg.resume_training:
        name = cfg.resume_training if isinstance(cfg.resume_training, str) else None
        entry, arrays = manager.latest(name, warn=monitor.message)
        if entry and rank.semi_auto:
            # Ascend (not run here): parameters are loaded whole before the compile slices them, so assemble
            # all ranks' slices first (MindSpore's transform, with the strategy files in OUTPUT/strategy)
            from ..checkpoint.transform import resume_arrays
            arrays = resume_arrays(out_dir, rank.rank, warn=monitor.message)
        if entry is None:
            monitor.message(f"[resume] no checkpoint under {manager.dir}; starting from step 0")
        else:
            src = os.path.join(manager.dir, entry["file"])
            base, adapters, _ = split(arrays)
            weights = {**base, **adapters}
            load_state_dict(model, weights, strict=False, source=src)
            opt.load_state_arrays(arrays, source=src)
            step = int(entry["step"])
            monitor.message(f"[resume] {src}: step {step}, epoch {entry['epoch']}, "
                            f"consumed samples {entry['consumed_samples']}")
    if step >= total and total > 0 and cfg.resume_training:
        monitor.message(f"[resume] already at step {step} of {total}; nothing to train")

    scaler = LossScaler.from_config(cfg.runner_wrapper.scale_sense, model.config.compute_dtype)
    if scaler and entry and entry.get("loss_scale"):
        scaler.value = float(entry["loss_scale"])
    clip = cfg.runner_wrapper.max_grad_norm if cfg.runner_wrapper.use_clip_grad else None
    # data parallel: our reducer sums gradients and token counts over ranks; under semi-auto parallel MindSpore
    # inserts those reductions into the compiled graph itself
    runner = TrainStep(model, opt, clip, scaler, jit=(cfg.context.mode == 0) or rank.semi_auto,
                       data_parallel=rank.dp_size > 1 and not rank.semi_auto)
    result = TrainResult(step=step)
    last_saved = step
    hf_config = model.config.to_hf_config()   # lets convert_weight.py --reversed find the architecture
    base_ckpt = ""
    if not full:   # adapter-only checkpoints record the base weights they apply to
        base_ckpt = (entry or {}).get("base_checkpoint") or ""
        if not base_ckpt and cfg.load_checkpoint and _training_rank_dir(cfg.load_checkpoint, rank.rank) is None:
            base_ckpt = os.path.abspath(cfg.load_checkpoint)

    def save(at):
        nonlocal last_saved
        epoch = at // plan.steps_per_epoch if plan.steps_per_epoch else 0
        path = manager.save(trainable_arrays(model, opt, full), at, epoch, at * plan.global_batch,
                            extra={"loss_scale": scaler.value if scaler else None, "seed": cfg.seed,
                                   "full_weights": full, "base_checkpoint": base_ckpt, "parallel": layout,
                                   "pet_config": model.config.pet_config, "hf_config": hf_config,
                                   "weight_layout": model.config.weight_layout(),
                                   "tokenizer": cfg.processor.tokenizer.vocab_file or ""})
        last_saved = at
        result.last_checkpoint = path
        return path

    if cfg.use_parallel and not rank.semi_auto:
        # data parallel: MindSpore writes no strategy file (it does at a semi-auto compile, Ascend); record the
        # (replicated) layout of this rank's checkpoint beside it, as MindFormers' OUTPUT/strategy/ holds them
        from ..parallel.layout import write_rank_strategy
        names = trainable_arrays_shapes(model, opt, full)
        write_rank_strategy(names, model.config, layout, os.path.join(out_dir, "strategy",
                                                                      f"ckpt_strategy_rank_{rank.rank}.json"),
                            rank.rank)
    model.set_train(True)
    # which samples this rank trained on, step by step (appended across resumes)
    order_log = open(os.path.join(out_dir, f"data_order_rank_{rank.rank}.jsonl"), "a", encoding="utf-8")
    # the next batches are read and collated by a thread while this step runs (data/prefetch.py)
    batches = Prefetcher(plan, train_ds, step, total) if step < total else iter(())
    try:
        for at, epoch, indices, micro in batches:
            assert at == step, (at, step)
            ms.set_seed(int(cfg.seed) * 1_000_003 + step)   # dropout masks are a function of the step: exact resume
            order_log.write(f'{{"step": {step + 1}, "epoch": {epoch}, "samples": {sum(indices, [])}}}\n')
            lr = sched(step)
            res = runner(micro, lr)
            step += 1
            result.step = step
            result.losses.append(res.loss)
            monitor.on_step(step, epoch, res.loss, lr, res.grad_norm, res.tokens, res.skipped)
            if history:
                history.add(kind="train", step=step, loss=res.loss, lr=lr, grad_norm=res.grad_norm)
            if tb:
                tb.scalars(step, **{"train/loss": res.loss, "train/lr": lr, "train/grad_norm": res.grad_norm})
            if eval_every > 0 and step % eval_every == 0:
                ev = evaluate(model, eval_ds, rc.batch_size)
                result.eval_losses.append((step, ev["loss"]))
                monitor.message(f"eval at step {step}: loss {ev['loss']:.6f} perplexity {ev['perplexity']:.3f}")
                if history:
                    history.add(kind="eval", step=step, loss=ev["loss"], perplexity=ev["perplexity"])
                if tb:
                    tb.scalars(step, **{"eval/loss": ev["loss"], "eval/perplexity": ev["perplexity"]})
            if save_every and step % save_every == 0:
                save(step)
        if ck and last_saved != step:
            save(step)
    except (TrainingError, Exception, KeyboardInterrupt) as e:
        if ck and step > last_saved:
            path = save(step)
            monitor.message(f"[stopped] {type(e).__name__}: {e}\n[stopped] the last good state (step {step}) "
                            f"is saved in {path}; resume with --resume_training True")
        raise
    finally:
        if rank.is_main and history and history.rows():
            plot_loss_curve(history, os.path.join(out_dir, "loss_curve.png"))
        if tb:
            tb.close()
        monitor.close()
        order_log.close()
        if isinstance(batches, Prefetcher):
            batches.close()
    return result
