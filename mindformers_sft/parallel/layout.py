"""Which slice of each parameter a rank holds under a parallel_config, written as MindSpore strategy files.

MindSpore describes a sharded parameter by a *tensor layout*: a device matrix (the ranks of one pipeline stage
arranged as a grid; here [dp, mp], so rank r of a stage sits at (r // mp, r % mp)) and a tensor map (for each
dimension of the parameter, which device-matrix axis splits it, counted from the right: 0 = mp, 1 = dp,
-1 = not split). Pipeline stage s holds the ranks s*dp*mp .. (s+1)*dp*mp - 1.

From `strategies.layer_strategies` (MindFormers' column/row-parallel Llama):
  column-parallel weight (out, in)   wq wk wv w1 w3, lm_head if vocab-parallel   tensor_map [0, -1]
  its bias (out,)                                                               [0]
  row-parallel weight (out, in)      wo w2                                      [-1, 0]
  embedding (vocab, hidden)          vocab-parallel: [0, -1]; else replicated
  LoRA on a column layer             lora_a (r, in) replicated, lora_b (out, r) [0, -1]
  LoRA on a row layer                lora_a (r, in) [-1, 0], lora_b (out, r) replicated
  norms, everything else             replicated
  adam_m.<p>, adam_v.<p>             as <p>
Qwen3 / Qwen3-MoE (MindFormers 1.8 names, `decoder.layers.N.`): linear_qkv, linear_q/k/v, linear_fc1, gating, hidden
are column-parallel, linear_proj and linear_fc2 row-parallel, embedding.word_embeddings / output_layer as the
embedding / lm_head. Stacked experts (mlp.experts.weight1 (E*h, 2F), weight2 (E*F, h), and their LoRA lora_a1,
lora_b1, lora_a2, lora_b2 (E, ...)) are sliced on axis 0 by expert_parallel: their device matrix is MindFormers' MoE
matrix [dp*mp // ep, ep] (rank r of a stage holds expert block r % ep) with tensor map [0, -1, ...].

`write_strategy` saves these layouts in MindSpore's JSON strategy-file format (one file per pipeline stage,
merged by MindSpore's `merge_pipeline_strategys`), which `mindspore.transform_checkpoints` and
`transform_checkpoint_by_rank` read. They are the layouts our shard strategies ask for. On Ascend, the strategy
file MindSpore writes when it compiles (`strategy_ckpt_save_file`) is the authority: it also records optimizer
sharding (`enable_parallel_optimizer`), which these predicted layouts leave out.
"""
from __future__ import annotations

import json
import os
import re

from ..errors import ConfigError
from .shapes import expert_parallel
from .strategies import QWEN3_COLUMN, QWEN3_ROW, dims, stage_of_layer, vocab_parallel

COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3") + QWEN3_COLUMN
ROW = ("attention.wo", "feed_forward.w2") + QWEN3_ROW
_LAYER = re.compile(r"^(?:model|decoder)\.layers\.(\d+)\.(.+)$")
_EXPERTS = re.compile(r"^decoder\.layers\.\d+\.mlp\.experts\.(weight1|weight2|lora_a1|lora_b1|lora_a2|lora_b2)$")
EMBEDDINGS = ("model.tok_embeddings.embedding_weight", "lm_head.weight", "embedding.word_embeddings.weight",
              "output_layer.weight")
OPT_PREFIXES = ("adam_m.", "adam_v.")


def _strip(name: str) -> str:
    for p in OPT_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def is_expert(name: str) -> bool:
    """A stacked expert tensor (or its LoRA / Adam moments), sliced on axis 0 by expert_parallel."""
    return bool(_EXPERTS.match(_strip(name)))


def dev_matrix(name: str, pc) -> list:
    """Device matrix of parameter `name`'s layout: [dp, mp], or [dp*mp // ep, ep] for stacked experts."""
    dp, mp, _ = dims(pc)
    if is_expert(name):
        ep = expert_parallel(pc)
        if ep < 1 or (dp * mp) % ep:
            raise ConfigError(f"parameter {name}: parallel_config.expert_parallel {ep} must divide data_parallel "
                              f"{dp} x model_parallel {mp} = {dp * mp}")
        return [dp * mp // ep, ep]
    return [dp, mp]


def tensor_map(name: str, ndim: int, mc, pc) -> list:
    """MindSpore tensor map of parameter `name` (MindFormers naming) with `ndim` dimensions."""
    name = _strip(name)
    _, mp, _ = dims(pc)
    whole = [-1] * ndim
    if is_expert(name):
        return ([0] + whole[1:]) if expert_parallel(pc) > 1 else whole
    if mp == 1:
        return whole
    m = _LAYER.match(name)
    if m:
        rest = m.group(2)
        for col in COLUMN:
            if rest == f"{col}.weight" or rest == f"{col}.lora_b":
                return [0, -1]
            if rest == f"{col}.bias":
                return [0]
        for row in ROW:
            if rest == f"{row}.weight" or rest == f"{row}.lora_a":
                return [-1, 0]
        return whole
    if name in EMBEDDINGS and vocab_parallel(mc, pc):
        return [0, -1]
    return whole


def stages_of(name: str, mc, pc) -> list:
    """Pipeline stages that hold parameter `name` (a tied embedding lives on the first and the last)."""
    for p in OPT_PREFIXES:
        if name.startswith(p):
            return stages_of(name[len(p):], mc, pc)
    _, _, pp = dims(pc)
    m = _LAYER.match(name)
    if m:
        return [stage_of_layer(mc, pc)[int(m.group(1))]]
    if name.startswith(("model.tok_embeddings.", "embedding.")):
        return sorted({0, pp - 1}) if mc.tie_word_embeddings else [0]
    if name.startswith(("model.norm_out.", "lm_head.", "decoder.final_layernorm.", "output_layer.")):
        return [pp - 1]
    return list(range(pp))          # global_step and other scalars


def layouts(shapes: dict, mc, pc) -> dict:
    """{stage: {name: (tensor_map, shape, dev_matrix)}} for every named parameter shape, checked for divisibility."""
    _, _, pp = dims(pc)
    out = {s: {} for s in range(pp)}
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        tmap, dev = tensor_map(name, len(shape), mc, pc), dev_matrix(name, pc)
        what = "expert_parallel" if is_expert(name) else "model_parallel"
        for d, t in zip(shape, tmap):
            if t == 0 and d % dev[-1]:
                raise ConfigError(f"parameter {name} {list(shape)} is split by {what} {dev[-1]}, but {d} is "
                                  f"not divisible by {dev[-1]}: choose a {what} that divides {d}")
        for s in stages_of(name, mc, pc):
            out[s][name] = (tmap, shape, dev)
    return out


def slice_of(array, tmap, rank_in_stage: int, dp: int, mp: int):
    """The part of the complete `array` that rank `rank_in_stage` of a stage holds under a device matrix [dp, mp]
    (for stacked experts pass dev_matrix's [dp*mp // ep, ep])."""
    coord = {1: rank_in_stage // mp, 0: rank_in_stage % mp}
    size = {1: dp, 0: mp}
    index = []
    for d, t in zip(array.shape, tmap):
        if t < 0:
            index.append(slice(None))
        else:
            n = d // size[t]
            index.append(slice(coord[t] * n, (coord[t] + 1) * n))
    return array[tuple(index)]


def _stage_doc(items: dict, stage: int) -> dict:
    """One pipeline stage's layouts in MindSpore's JSON strategy-file format."""
    return {
        "current_stage": stage,
        "parallel_strategy_item": {f"stage{stage}": {"stage": stage, "parallel_strategys": []}},
        "parallel_layout_item": {
            name: {"dev_matrix": list(dev), "tensor_map": tmap, "param_split_shape": [], "indices_offset": [],
                   "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}
            for name, (tmap, _, dev) in sorted(items.items())},
    }


def write_strategy(shapes: dict, mc, pc, directory: str) -> str:
    """MindSpore JSON strategy files of `shapes` under `pc` in `directory`; returns the file to give MindSpore's
    checkpoint transforms (the single stage's file, or all stages merged with `merge_pipeline_strategys`)."""
    dp, mp, pp = dims(pc)
    per_stage = layouts(shapes, mc, pc)
    stage_dir = os.path.join(directory, "stages")
    os.makedirs(stage_dir, exist_ok=True)
    files = []
    for stage, items in per_stage.items():
        path = os.path.join(stage_dir, f"ckpt_strategy_stage{stage}.json")
        _write_json(path, _stage_doc(items, stage))
        files.append(path)
    if pp == 1:
        return files[0]
    import mindspore as ms
    merged = os.path.join(directory, "merged_ckpt_strategy.json")
    ms.merge_pipeline_strategys(stage_dir, merged)
    return merged


def write_rank_strategy(shapes: dict, mc, pc, path: str, rank: int):
    """The strategy file of one rank (its stage's layouts), as MindSpore writes per rank at compile."""
    dp, mp, _ = dims(pc)
    stage = rank // (dp * mp)
    _write_json(path, _stage_doc(layouts(shapes, mc, pc)[stage], stage))
    return path


def _write_json(path, doc):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
