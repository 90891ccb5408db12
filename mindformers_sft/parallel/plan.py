"""Pre-flight checks of a parallel plan and the per-device memory table, before anything is compiled or loaded.

`preflight(cfg, mc, rank, log)` runs at every start (and is all that `--run_mode plan` does): it refuses layouts
that cannot work with a ConfigError naming the number to change, then prints the memory table of
`memory.estimate_memory` (its docstring holds the memory model).

Expert parallel (MindFormers' parallel_config.expert_parallel, for MoE models): the stacked expert weights of each
sparse layer are split on the expert axis over `expert_parallel` ranks of a pipeline stage, as MindFormers'
GroupedMLP lays them out on a (dp x mp / ep, ep) device matrix. Its rules (MindFormers' MoELayer and GroupedMLP):
num_experts % expert_parallel == 0, and expert_parallel divides data_parallel x model_parallel.
"""
from __future__ import annotations

from types import SimpleNamespace

from ..errors import ConfigError
from .memory import (DTYPE_BYTES, GIB, _get, activation_bytes_per_layer, estimate_memory,  # noqa: F401 (API)
                     param_counts, parse_memory)
from .shapes import expert_parallel, shapes_of
from .strategies import dims, layers_per_stage


def _gib(x):
    return f"{x / GIB:9.2f}"


def format_table(est) -> str:
    """The memory estimate as a text table (GiB per device)."""
    dp, mp, pp = est["data_parallel"], est["model_parallel"], est["pipeline_stage"]
    stage = est["stage"]
    where = [f"{est['layers']} layers"]
    if stage == 0:
        where.append("embedding")
    if stage == pp - 1:
        where.append("norm + lm_head")
    wb = DTYPE_BYTES[est["param_dtype"]]
    rec = est["recompute"]
    rec_txt = ("full" if rec is True else "none" if not rec else f"{list(rec)} layers per stage")
    mark = lambda cond: "  <- configured" if cond else ""  # noqa: E731
    rows = [
        ("weights", est["weights"], f"{est['params_per_device']:.3e} params x {wb} B ({est['param_dtype']})"),
        ("gradients", est["gradients"], f"{est['trainable_per_device']:.3e} trainable x {wb} B"
                                        + (" (LoRA adapters only)" if est["lora"] else "")),
    ]
    ep = est.get("expert_parallel", 1)
    if est.get("num_experts"):
        rows.insert(1, ("  of which expert weights", est["expert_weights"],
                        f"{est['num_experts']} experts / ep {ep} = {est['num_experts'] // ep} per device"))
    if est["grad_accumulation"]:
        rows.append(("gradient accumulation buffer", est["grad_accumulation"], "accu_grads (GA > 1 or pp > 1)"))
    rows += [
        ("optimizer states, unsharded", est["optimizer_states_unsharded"],
         f"AdamW m+v fp32{' + fp32 master' if wb < 4 else ''}" + mark(not est["optimizer_shard"])),
        (f"optimizer states, sharded / dp {dp}", est["optimizer_states_sharded"],
         ((f"experts / (dp x mp / ep) = / {max(dp * mp // ep, 1)}" if est.get("num_experts") else "")
          + mark(est["optimizer_shard"])).strip()),
        ("activations, no recompute", est["activations_no_recompute"],
         f"{est['micro_batches_in_flight']} micro-batch(es) in flight" + mark(not rec)),
        ("activations, full recompute", est["activations_full_recompute"], mark(rec is True).strip()),
    ]
    if rec and rec is not True:
        rows.append((f"activations, recompute {list(rec)}", est["activations"], "<- configured"))
    if est["logits"]:
        rows.append(("logits + softmax (fp32)", est["logits"], "last stage"))
    rows += [
        ("TOTAL (configured)", est["total"], ""),
        ("total without optimizer shard", est["total_no_optimizer_shard"], ""),
        ("total with optimizer shard", est["total_optimizer_shard"], ""),
        ("total without recompute", est["total_no_recompute"], ""),
        ("total with full recompute", est["total_full_recompute"], ""),
    ]
    if est.get("max_device_memory"):
        rows.append(("context.max_device_memory", est["max_device_memory"], ""))
    head = (f"per-device memory estimate, GiB (worst pipeline stage {stage} of {pp}: {', '.join(where)}; "
            f"dp {dp} x mp {mp} x pp {pp}{f' (ep {ep})' if est.get('num_experts') else ''}; "
            f"batch_size {est['batch_size']} x seq_length {est['seq_length']}; "
            f"compute {est['compute_dtype']}; recompute {rec_txt}"
            f"{'; flash attention' if est['flash_attention'] else ''})")
    width = max(len(r[0]) for r in rows)
    lines = [head, f"  {'component'.ljust(width)}  {'GiB':>9}  note"]
    lines += [f"  {name.ljust(width)}  {_gib(v)}  {note}".rstrip() for name, v, note in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- checks
def _divisors_ok(mc, mp, vocab_emb_dp):
    names = [("num_heads", mc.num_heads), ("n_kv_heads", mc.n_kv_heads)]
    if not all(shapes_of(mc).sparse):                 # a dense MLP exists: its intermediate size is split by mp
        names.append(("intermediate_size", mc.intermediate_size))
    if not vocab_emb_dp:
        names.append(("vocab_size", mc.vocab_size))
    return names, [(n, v) for n, v in names if v % mp]


def _target_dtypes(cfg, mc):
    """For --run_mode plan on a CPU host, plan with the YAML's dtypes (the target device's), not the CPU fallback."""
    raw = _get(cfg.model, "model_config") if cfg.get("model") else None
    if cfg.run_mode != "plan" or not isinstance(raw, dict):
        return mc
    from ..config.model_config import normalize_dtype
    import copy
    mc = copy.copy(mc)
    for k in ("compute_dtype", "param_init_type"):
        if raw.get(k):
            setattr(mc, k, normalize_dtype(raw[k], f"model_config.{k}"))
    return mc


def check_layout(mc, pc, world: int, recompute=None, log=print):
    """Raise ConfigError for a layout that cannot run; log warnings for ones that run badly."""
    dp, mp, pp = dims(pc)
    for k, v in (("data_parallel", dp), ("model_parallel", mp), ("pipeline_stage", pp)):
        if v < 1:
            raise ConfigError(f"parallel_config.{k} must be >= 1, got {v}")
    cp = int(_get(pc, "context_parallel", 1))
    if cp != 1:
        raise ConfigError(f"parallel_config.context_parallel {cp} is not supported (the model has no "
                          "context-parallel attention): set context_parallel to 1")
    vocab_emb_dp = bool(_get(pc, "vocab_emb_dp", True))
    names, bad = _divisors_ok(mc, mp, vocab_emb_dp)
    if bad:
        rest = world // pp if world % pp == 0 else world
        good = [m for m in range(1, rest + 1) if rest % m == 0 and not _divisors_ok(mc, m, vocab_emb_dp)[1]]
        what = ", ".join(f"model_config.{n} {v}" for n, v in bad)
        hint = ("; or set parallel_config.vocab_emb_dp True to keep the embedding whole"
                if any(n == "vocab_size" for n, _ in bad) else "")
        best = max([m for m in good if m <= mp] or [1])
        raise ConfigError(f"parallel_config.model_parallel {mp} does not divide {what}: set model_parallel to one "
                          f"of {good} (values dividing {', '.join(n for n, _ in names)} and the "
                          f"{rest} devices per pipeline stage), e.g. model_parallel {best} with data_parallel "
                          f"{rest // best} for {world} workers and pipeline_stage {pp}{hint}")
    counts = layers_per_stage(mc, pc)     # raises when pipeline_stage > num_layers or a bad offset
    if dp * mp * pp != world:
        if world % (mp * pp) == 0:
            fix = (f"set data_parallel to {world // (mp * pp)} for {world} workers with model_parallel {mp} and "
                   f"pipeline_stage {pp}")
        else:
            fix = (f"{world} workers is not a multiple of model_parallel {mp} x pipeline_stage {pp} = {mp * pp}: "
                   f"change model_parallel/pipeline_stage, or launch {dp * mp * pp} workers")
        raise ConfigError(f"parallel_config: data_parallel {dp} x model_parallel {mp} x pipeline_stage {pp} = "
                          f"{dp * mp * pp}, but {world} workers were launched; {fix}")
    micro = int(_get(pc, "micro_batch_num", 1))
    if pp > 1 and micro < pp:
        raise ConfigError(f"parallel_config.micro_batch_num {micro} must be >= pipeline_stage {pp} (otherwise "
                          f"stages idle): set micro_batch_num to at least {pp} (2 x pp = {2 * pp} or more keeps the "
                          "pipeline bubble small)")
    if isinstance(recompute, (list, tuple)):
        if len(recompute) != pp:
            raise ConfigError(f"recompute_config.recompute {list(recompute)} has {len(recompute)} entries but "
                              f"pipeline_stage is {pp}: give one layer count per stage (layers per stage: "
                              f"{counts}), e.g. recompute: {counts}")
        for i, (n, c) in enumerate(zip(recompute, counts)):
            if isinstance(n, bool):
                continue
            if not isinstance(n, int) or n < 0:
                raise ConfigError(f"recompute_config.recompute[{i}]: expected a layer count >= 0 or a bool, "
                                  f"got {n!r}")
            if n > c:
                raise ConfigError(f"recompute_config.recompute[{i}] = {n} exceeds the {c} layers of pipeline "
                                  f"stage {i} (layers per stage: {counts}): set it to at most {c}")
    elif recompute is not None and not isinstance(recompute, bool):
        raise ConfigError(f"recompute_config.recompute: expected True/False or a per-stage list of layer "
                          f"counts, got {recompute!r}")
    if _get(pc, "use_seq_parallel", False) and mp == 1:
        log("[plan] warning: parallel_config.use_seq_parallel has no effect with model_parallel 1 (it splits "
            "activations over the model-parallel group); set model_parallel > 1 or use_seq_parallel False")
    check_experts(mc, pc, log)
    return counts


def check_experts(mc, pc, log=print):
    """MindFormers' expert-parallel rules: num_experts % expert_parallel == 0 (MoELayer) and expert_parallel
    divides data_parallel x model_parallel (GroupedMLP.shard); the errors name the value to choose."""
    dp, mp, _ = dims(pc)
    ep = expert_parallel(pc)
    experts = shapes_of(mc).num_experts
    if ep < 1:
        raise ConfigError(f"parallel_config.expert_parallel must be >= 1, got {ep}")
    if not experts:
        if ep != 1:
            log(f"[plan] warning: parallel_config.expert_parallel {ep} is ignored (the model has no MoE layers)")
        return
    good = [e for e in range(1, dp * mp + 1) if experts % e == 0 and (dp * mp) % e == 0]
    if experts % ep:
        raise ConfigError(f"parallel_config.expert_parallel {ep} does not divide model_config.num_experts "
                          f"{experts}: set expert_parallel to one of {good} (values dividing num_experts {experts} "
                          f"and data_parallel {dp} x model_parallel {mp} = {dp * mp})")
    if (dp * mp) % ep:
        raise ConfigError(f"parallel_config.expert_parallel {ep} must divide data_parallel {dp} x model_parallel "
                          f"{mp} = {dp * mp} (the experts are spread over the ranks of one pipeline stage): set "
                          f"expert_parallel to one of {good}, or raise data_parallel x model_parallel to a multiple "
                          f"of {ep}")
    if mp > 1 and not _get(pc, "use_seq_parallel", False):
        log(f"[plan] warning: model_parallel {mp} with MoE layers and use_seq_parallel False: each of the {mp} "
            "model-parallel ranks routes the same tokens (MindFormers refuses this combination); set "
            "parallel_config.use_seq_parallel True")


_SINGLE = SimpleNamespace(data_parallel=1, model_parallel=1, pipeline_stage=1, micro_batch_num=1,
                          vocab_emb_dp=True, use_seq_parallel=False, context_parallel=1, expert_parallel=1)


def preflight(cfg, mc, rank, log=print):
    """Check the parallel plan against the model and the worker count, then print the memory estimate.

    Returns the estimate dict (None for eval/predict, which print nothing on success).
    """
    pc = cfg.parallel_config if cfg.use_parallel else _SINGLE
    world = rank.world_size if cfg.use_parallel else 1
    rc_cfg = cfg.recompute_config
    recompute = _get(rc_cfg, "recompute", False)
    if not cfg.use_parallel and isinstance(recompute, (list, tuple)):
        recompute = min(mc.num_layers, sum(mc.num_layers if n is True else int(n) for n in recompute))
        recompute = recompute == mc.num_layers or [recompute]
    check_layout(mc, pc, world, recompute, log)
    if cfg.run_mode not in ("plan", "train", "finetune"):
        return None
    dp, mp, pp = dims(pc)
    rc = cfg.runner_config
    batch, ga = int(rc.batch_size), int(rc.gradient_accumulation_steps or 1)
    if pp > 1 and ga > 1:
        log(f"[plan] warning: gradient_accumulation_steps {ga} with pipeline_stage {pp}: MindFormers accumulates "
            "over parallel_config.micro_batch_num instead; prefer gradient_accumulation_steps 1")
    seq = int(_get(cfg.train_dataset, "seq_length") or mc.seq_length)
    shard = _get(pc, "optimizer_shard", None)
    if shard is None:
        shard = bool(_get(cfg.get("parallel"), "enable_parallel_optimizer", False))
    shard = bool(shard) and dp > 1
    mdm = parse_memory(_get(cfg.context, "max_device_memory"))
    est = estimate_memory(_target_dtypes(cfg, mc), pc, recompute, shard, batch, seq,
                          gradient_accumulation_steps=ga,
                          recompute_slice_activation=bool(_get(rc_cfg, "recompute_slice_activation", False)),
                          max_device_memory=mdm)
    micro = int(_get(pc, "micro_batch_num", 1)) if pp > 1 else 1
    gb = batch * dp * micro * ga
    parts = [f"batch_size {batch}", f"data_parallel {dp}"] + ([f"micro_batch_num {micro}"] if pp > 1 else []) + \
        ([f"gradient_accumulation_steps {ga}"] if ga > 1 else [])
    log(f"[plan] {dp * mp * pp} device(s): data_parallel {dp} x model_parallel {mp} x pipeline_stage {pp}"
        + ("" if cfg.use_parallel else " (use_parallel False: parallel_config not used)"))
    if est["num_experts"]:
        ep = est["expert_parallel"]
        log(f"[plan] experts: {est['num_experts']} per MoE layer / expert_parallel {ep} = "
            f"{est['num_experts'] // ep} per device; {est['params_total'] / 1e9:.2f}B parameters, "
            f"{est['activated_total'] / 1e9:.2f}B activated per token")
    log(f"[plan] global batch {gb} sequences of {seq} tokens per optimizer step ({' x '.join(parts)})")
    if pp > 1:
        log(f"[plan] layers per pipeline stage {est['layers_per_stage']} (num_layers {mc.num_layers} // "
            f"{pp}, remainder on the last stages unless model_config.offset says otherwise); embedding on stage 0, "
            f"norm + lm_head on stage {pp - 1}")
    log("[plan] " + format_table(est))
    if mdm and est["total"] > mdm:
        log(f"[plan] warning: estimated {est['total'] / GIB:.1f} GiB per device exceeds context.max_device_memory "
            f"{_get(cfg.context, 'max_device_memory')}; enable optimizer sharding or recompute, raise "
            f"model_parallel / pipeline_stage{' / expert_parallel (with more devices)' if est['num_experts'] else ''}"
            ", or lower batch_size / seq_length")
    return est
