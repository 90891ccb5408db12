"""Pre-flight checks of a parallel plan and a per-device memory estimate, before anything is compiled or loaded.

`preflight(cfg, mc, rank, log)` runs at every start (and is all that `--run_mode plan` does): it refuses layouts
that cannot work with a ConfigError naming the number to change, then prints the memory table.

Memory model (bytes per device, worst pipeline stage; `estimate_memory` returns it as a dict):
  weights      per-device parameters x bytes(param_init_type). Matrices and q/k/v biases are split by
               model_parallel (column- or row-wise); norms are replicated; the embedding and lm_head are split
               by model_parallel only when vocab-parallel (vocab_emb_dp False), as MindFormers. Stage 0 holds the
               embedding, the last stage the final norm and lm_head (and a copy of a tied embedding when pp > 1).
               LoRA adapter weights are added to the frozen base.
  gradients    trainable parameters only (LoRA: the adapters) x bytes(param_init_type): MindSpore's gradient of
               a parameter has the parameter's dtype, so fp32 parameters (these YAMLs) give fp32 gradients even
               with a bf16 compute_dtype. Plus an accumulation buffer of the same size when
               gradient_accumulation_steps > 1 or pipeline_stage > 1 (MindFormers' accu_grads).
  optimizer    AdamW m and v in fp32 = 8 B per trainable parameter, + a 4 B fp32 master copy when
               param_init_type is bf16/fp16. With optimizer sharding (parallel_config.optimizer_shard, or
               parallel.enable_parallel_optimizer when that is unset) the states are divided by data_parallel.
               Weights and gradients are NOT divided by dp here (conservative: MindSpore's parallel optimizer
               also slices parameters above parallel_optimizer_threshold, then all-gathers them for the step).
  activations  per layer and micro-batch, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
               Transformer Models", eqs. 1-2) for 2-byte activations, scaled by bytes(compute_dtype) / 2:
                 no recompute:                 s*b*h * (10 + 24/t + 5*a*s/(h*t))
                 with sequence parallel:       s*b*h * (34/t + 5*a*s/(h*t))
                 full recompute (stored input): 2*s*b*h  (/ t with sequence parallel or recompute_slice_activation)
               t = model_parallel, a = num_heads, s = seq_length, b = batch_size (per data-parallel rank and
               micro-batch), h = hidden_size. With use_flash_attention the 5as/h term (the s x s scores, softmax
               and its dropout mask) is dropped: flash attention does not store them. The GPT constants are used
               unchanged for Llama's SwiGLU MLP (an approximation). A recomputed layer needs its full activations
               once more while it is recomputed: + one layer (one micro-batch) when any layer is recomputed.
               Pipeline (1F1B): stage i keeps min(pp - i, micro_batch_num) micro-batches in flight.
  logits       last stage: fp32 logits and their softmax for the loss, 2 x 4 B x s*b*V (/ mp if vocab-parallel).
GiB = 2**30 bytes; context.max_device_memory "58GB" is read as 58 GiB, as MindSpore does.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

from ..errors import ConfigError
from .strategies import COLUMN, LINEARS, OPS, dims, layers_per_stage, vocab_parallel

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GIB = 1 << 30


def _get(obj, key, default=None):
    if obj is None or isinstance(obj, str):
        return default
    v = obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)
    return default if v is None else v


# ---------------------------------------------------------------------------------------------- parameter counts
def _linear_shapes(mc) -> dict:
    """name -> (in_features, out_features) of the decoder layer's projections."""
    h, kv, inter = mc.hidden_size, mc.n_kv_heads * mc.head_dim, mc.intermediate_size
    return {"attention.wq": (h, h), "attention.wk": (h, kv), "attention.wv": (h, kv), "attention.wo": (h, h),
            "feed_forward.w1": (h, inter), "feed_forward.w3": (h, inter), "feed_forward.w2": (inter, h)}


def param_counts(mc) -> dict:
    """Parameters of the whole model, by component (not sharded)."""
    shapes = _linear_shapes(mc)
    parts = {n: i * o for n, (i, o) in shapes.items()}
    if mc.qkv_has_bias:
        for n in ("attention.wq", "attention.wk", "attention.wv"):
            parts[n + ".bias"] = shapes[n][1]
    parts["norms"] = 2 * mc.hidden_size
    layer = sum(parts.values())
    emb = mc.vocab_size * mc.hidden_size
    head = 0 if mc.tie_word_embeddings else emb
    return {"embedding": emb, "layer": layer, "layer_parts": parts, "norm_out": mc.hidden_size, "lm_head": head,
            "total": emb + mc.num_layers * layer + mc.hidden_size + head}


def _lora_adapters(mc, mp: int) -> tuple:
    """(per-layer adapter params per device (list), lm_head adapter params per device, total adapters)."""
    if not mc.pet_config:
        return None, 0, 0
    from ..pet.lora import parse_pet_config
    pet = parse_pet_config(mc.pet_config)
    r, pattern = pet["lora_rank"], re.compile(pet["target_modules"])
    shapes = _linear_shapes(mc)
    per_layer, total = [], 0
    for i in range(mc.num_layers):
        n_dev = 0
        for name in LINEARS:
            if pattern.fullmatch(f"model.layers.{i}.{name}"):
                fin, fout = shapes[name]
                total += r * (fin + fout)
                # column-parallel base: lora_a (r, in) replicated, lora_b (out, r) split; row-parallel: the reverse
                n_dev += r * fin + fout * r // mp if OPS[name][1] == COLUMN else r * fin // mp + fout * r
        per_layer.append(n_dev)
    head = 0
    if not mc.tie_word_embeddings and pattern.fullmatch("lm_head"):
        total += r * (mc.hidden_size + mc.vocab_size)
        head = r * mc.hidden_size + r * mc.vocab_size
    return per_layer, head, total


# ---------------------------------------------------------------------------------------------- memory estimate
def activation_bytes_per_layer(mc, pc, batch_size: int, seq_length: int, recompute: bool,
                               slice_activation: bool = False) -> int:
    """Activation bytes one decoder layer keeps for backward, for one micro-batch (see the module docstring)."""
    _, t, _ = dims(pc)
    s, b, h, a = seq_length, batch_size, mc.hidden_size, mc.num_heads
    sp = t > 1 and bool(_get(pc, "use_seq_parallel", False))
    scale = DTYPE_BYTES[mc.compute_dtype] / 2
    if recompute:
        return int(2 * s * b * h * scale / (t if (sp or slice_activation) else 1))
    attn = 0.0 if mc.use_flash_attention else 5.0 * a * s / (h * t)
    coeff = (34.0 / t if sp else 10.0 + 24.0 / t) + attn
    return int(s * b * h * coeff * scale)


def _recompute_counts(recompute, layer_counts) -> list:
    """Layers fully recomputed on each stage (recompute True/False/None or a per-stage list)."""
    if recompute is None or recompute is False:
        return [0] * len(layer_counts)
    if recompute is True:
        return list(layer_counts)
    out = []
    for n, c in zip(recompute, layer_counts):
        out.append(c if n is True else 0 if n is False else min(int(n), c))
    return out


def estimate_memory(mc, pc, recompute, optimizer_shard, batch_size, seq_length, *, gradient_accumulation_steps=1,
                    recompute_slice_activation=False, max_device_memory=None) -> dict:
    """Per-device memory estimate (bytes) on the worst pipeline stage; see the module docstring for the model.

    Keys (bytes unless noted): weights, gradients, grad_accumulation, optimizer_states (as configured),
    optimizer_states_unsharded, optimizer_states_sharded, activations (as configured), activations_no_recompute,
    activations_full_recompute, logits, total (as configured), total_no_optimizer_shard, total_optimizer_shard,
    total_no_recompute, total_full_recompute, max_device_memory (or None); and, not bytes: params_total,
    trainable_total, params_per_device, trainable_per_device, stage, layers_per_stage, recompute_per_stage,
    micro_batches_in_flight, optimizer_shard, data_parallel, model_parallel, pipeline_stage, stages (per-stage
    dicts with the same byte keys).
    """
    dp, mp, pp = dims(pc)
    counts = layers_per_stage(mc, pc)
    rec = _recompute_counts(recompute, counts)
    pcount = param_counts(mc)
    vp = vocab_parallel(mc, pc)
    h = mc.hidden_size
    layer_dev = (pcount["layer"] - pcount["layer_parts"]["norms"]) // mp + pcount["layer_parts"]["norms"]
    emb_dev = pcount["embedding"] // mp if vp else pcount["embedding"]
    head_dev = 0 if mc.tie_word_embeddings else emb_dev
    lora_layers, lora_head, lora_total = _lora_adapters(mc, mp)
    wbytes = DTYPE_BYTES[mc.param_init_type]
    opt_per_param = 8 + (4 if wbytes < 4 else 0)
    micro = max(1, int(_get(pc, "micro_batch_num", 1)))
    accumulate = gradient_accumulation_steps > 1 or pp > 1
    stages, start = [], 0
    for i, n_layers in enumerate(counts):
        layer_ids = range(start, start + n_layers)
        start += n_layers
        params = n_layers * layer_dev
        if i == 0:
            params += emb_dev
        if i == pp - 1:
            params += h + (head_dev if not mc.tie_word_embeddings else (emb_dev if pp > 1 else 0))
        adapters = 0
        if lora_layers is not None:
            adapters = sum(lora_layers[j] for j in layer_ids) + (lora_head if i == pp - 1 else 0)
        trainable = adapters if lora_layers is not None else params
        params += adapters
        in_flight = min(pp - i, micro) if pp > 1 else 1

        def act(n_rec, _n=n_layers, _f=in_flight):
            full = activation_bytes_per_layer(mc, pc, batch_size, seq_length, False)
            kept = activation_bytes_per_layer(mc, pc, batch_size, seq_length, True, recompute_slice_activation)
            return _f * (n_rec * kept + (_n - n_rec) * full) + (full if n_rec else 0)

        st = {"stage": i, "layers": n_layers, "recompute_layers": rec[i], "micro_batches_in_flight": in_flight,
              "params_per_device": params, "trainable_per_device": trainable,
              "weights": params * wbytes, "gradients": trainable * wbytes,
              "grad_accumulation": trainable * wbytes if accumulate else 0,
              "optimizer_states_unsharded": trainable * opt_per_param,
              "optimizer_states_sharded": -(-trainable * opt_per_param // dp),
              "activations": act(rec[i]), "activations_no_recompute": act(0),
              "activations_full_recompute": act(n_layers),
              "logits": (2 * 4 * seq_length * batch_size * mc.vocab_size // (mp if vp else 1)) if i == pp - 1 else 0}
        st["optimizer_states"] = st["optimizer_states_sharded" if optimizer_shard else "optimizer_states_unsharded"]
        fixed = st["weights"] + st["gradients"] + st["grad_accumulation"] + st["logits"]
        st["total"] = fixed + st["optimizer_states"] + st["activations"]
        st["total_no_optimizer_shard"] = fixed + st["optimizer_states_unsharded"] + st["activations"]
        st["total_optimizer_shard"] = fixed + st["optimizer_states_sharded"] + st["activations"]
        st["total_no_recompute"] = fixed + st["optimizer_states"] + st["activations_no_recompute"]
        st["total_full_recompute"] = fixed + st["optimizer_states"] + st["activations_full_recompute"]
        stages.append(st)
    worst = max(stages, key=lambda x: x["total"])
    est = dict(worst)
    for k in ("total_no_optimizer_shard", "total_optimizer_shard", "total_no_recompute", "total_full_recompute"):
        est[k] = max(x[k] for x in stages)     # each variant's own worst stage
    est.update(params_total=pcount["total"] + lora_total,
               trainable_total=lora_total if lora_layers is not None else pcount["total"],
               layers_per_stage=counts, recompute_per_stage=rec, optimizer_shard=bool(optimizer_shard),
               data_parallel=dp, model_parallel=mp, pipeline_stage=pp, batch_size=batch_size,
               seq_length=seq_length, stages=stages, max_device_memory=max_device_memory,
               param_dtype=mc.param_init_type, compute_dtype=mc.compute_dtype, lora=lora_layers is not None,
               flash_attention=bool(mc.use_flash_attention), recompute=recompute)
    return est


def parse_memory(value):
    """'58GB' / '1024MB' / '1TB' / a number of GB -> bytes (GB = 2**30, as MindSpore's max_device_memory)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * GIB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)I?B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"context.max_device_memory: '{value}' is not a size like '58GB'")
    return int(float(m.group(1)) * {"": GIB, "K": 1 << 10, "M": 1 << 20, "G": GIB, "T": 1 << 40}[m.group(2).upper()])


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
    if est["grad_accumulation"]:
        rows.append(("gradient accumulation buffer", est["grad_accumulation"], "accu_grads (GA > 1 or pp > 1)"))
    rows += [
        ("optimizer states, unsharded", est["optimizer_states_unsharded"],
         f"AdamW m+v fp32{' + fp32 master' if wb < 4 else ''}" + mark(not est["optimizer_shard"])),
        (f"optimizer states, sharded / dp {dp}", est["optimizer_states_sharded"], mark(est["optimizer_shard"]).strip()),
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
            f"dp {dp} x mp {mp} x pp {pp}; batch_size {est['batch_size']} x seq_length {est['seq_length']}; "
            f"compute {est['compute_dtype']}; recompute {rec_txt}"
            f"{'; flash attention' if est['flash_attention'] else ''})")
    width = max(len(r[0]) for r in rows)
    lines = [head, f"  {'component'.ljust(width)}  {'GiB':>9}  note"]
    lines += [f"  {name.ljust(width)}  {_gib(v)}  {note}".rstrip() for name, v, note in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- checks
def _divisors_ok(mc, mp, vocab_emb_dp):
    names = [("num_heads", mc.num_heads), ("n_kv_heads", mc.n_kv_heads), ("intermediate_size", mc.intermediate_size)]
    if not vocab_emb_dp:
        names.append(("vocab_size", mc.vocab_size))
    return names, [(n, v) for n, v in names if v % mp]


def _target_dtypes(cfg, mc):
    """For --run_mode plan on a CPU host, plan with the YAML's dtypes (the target device's), not the CPU fallback."""
    raw = _get(cfg.model, "model_config") if cfg.get("model") else None
    if cfg.run_mode != "plan" or not isinstance(raw, dict):
        return mc
    from ..models.config import normalize_dtype
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
    if int(_get(pc, "expert_parallel", 1)) != 1:
        log("[plan] warning: parallel_config.expert_parallel is ignored (the model has no MoE layers)")
    return counts


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
    log(f"[plan] global batch {gb} sequences of {seq} tokens per optimizer step ({' x '.join(parts)})")
    if pp > 1:
        log(f"[plan] layers per pipeline stage {est['layers_per_stage']} (num_layers {mc.num_layers} // "
            f"{pp}, remainder on the last stages unless model_config.offset says otherwise); embedding on stage 0, "
            f"norm + lm_head on stage {pp - 1}")
    log("[plan] " + format_table(est))
    if mdm and est["total"] > mdm:
        log(f"[plan] warning: estimated {est['total'] / GIB:.1f} GiB per device exceeds context.max_device_memory "
            f"{_get(cfg.context, 'max_device_memory')}; enable optimizer sharding or recompute, raise "
            "model_parallel / pipeline_stage, or lower batch_size / seq_length")
    return est
