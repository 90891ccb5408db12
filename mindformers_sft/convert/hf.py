"""Hugging Face <-> MindFormers weight conversion (Llama-2/3, Qwen2/2.5, Qwen3, Qwen3-MoE), streamed.

Llama-family conversion is a rename (see :mod:`.names`); Qwen3 fuses q/k/v and gate/up and stacks MoE experts
(:mod:`.layout_qwen3`). Values are copied bit for bit (or cast with ``--dtype``). The input is read group by
group (:mod:`.plan`: one tensor, a layer's q/k/v, one MoE layer's experts), so peak memory stays near the
largest group plus one memory-mapped input shard, whatever the model size, for every output format (CKPT
included: see :mod:`mindformers_sft.checkpoint.ckpt_io`).

Every tensor is checked before anything is written: its name must be a weight of the family, its shape
must be the one :func:`expected_shapes` derives from the model config, and no expected tensor may be
missing. Errors name the file and the tensor.

Model config beside MindFormers weights
    HF -> MindFormers writes the source ``config.json`` (verbatim, ``torch_dtype`` set to the output dtype)
    to a sidecar ``<output stem>.config.json`` next to the output (``llama.ckpt`` -> ``llama.config.json``;
    see :func:`sidecar_config_path`) and, for ``.safetensors`` output, also into the file's metadata
    (``__metadata__["hf_config"]``, beside ``"format": "ms"``). MindFormers -> HF takes the config from
    ``--config`` (an HF ``config.json`` or a MindFormers YAML with ``model.model_config``), else the sidecar,
    else the safetensors metadata, else a ``config.json`` in the input's directory.

Tied embeddings (``tie_word_embeddings: true``): the MindFormers side has no ``lm_head.weight`` /
``output_layer.weight`` (the head shares the embedding), and the HF side is written without it too, as
``save_pretrained`` does. An ``lm_head.weight`` present in a tied input (stories260K has one, equal to the
embedding) is dropped: HF ignores it when loading a tied model, so nothing is lost.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from ..checkpoint.dtypes import dtype_name, to_np_dtype
from ..checkpoint import (CkptWriter, SafetensorsWriter, ShardedSafetensorsWriter, TensorInfo,
                          atomic_write_json, checkpoint_files, file_format, file_infos, infos_of_files,
                          parse_size)
from ..errors import CheckpointError, ConfigError, SFTError
from .layouts import layout_for
from .names import is_ignored_hf, is_ignored_mf
from .plan import Plan, out_dtype, output_spec, plan, write_all
from .spec import (HF_CONFIG_METADATA_KEY, MF_ARCH_FLAGS, ModelSpec, apply_flags, find_config_for_mf,
                   load_model_config, model_family, sidecar_config_path, spec_from_hf_dict)

def _plan(infos: "OrderedDict[str, TensorInfo]", spec: ModelSpec, to_mf: bool, input_path: str) -> Plan:
    """Check every tensor of the input against the config's layout; the groups to convert."""
    layout = layout_for(spec.config, None if to_mf else infos)
    return plan(infos, layout, to_mf, input_path, spec.source,
                is_ignored_hf if to_mf else is_ignored_mf)


def _set_config_dtype(hf_cfg: dict, name: Optional[str]):
    """Record the weights' dtype in an HF config: in `dtype` (transformers >= 4.56) and/or `torch_dtype`,
    whichever the config has (`torch_dtype` if neither)."""
    if not name:
        return
    keys = [k for k in ("dtype", "torch_dtype") if k in hf_cfg] or ["torch_dtype"]
    for k in keys:
        hf_cfg[k] = name


def _torch_dtype(p: Plan, dtype) -> Optional[str]:
    ds = {out_dtype(g.srcs[0], dtype) for g in p.groups}
    return dtype_name(next(iter(ds))) if len(ds) == 1 else None


@dataclass
class ConvertResult:
    tensors: int
    bytes: int
    output_path: str
    files: List[str] = field(default_factory=list)
    config_path: str = ""
    dtype: Optional[str] = None

    def summary(self) -> str:
        mib = self.bytes / 2 ** 20
        dt = f" {self.dtype}" if self.dtype else ""
        return (f"convert_weight: {self.tensors} tensors,{dt} {self.bytes} bytes ({mib:.2f} MiB) -> "
                f"{self.output_path} (config: {self.config_path})")


# ------------------------------------------------------------------------------------------ HF -> MF
def _hf_input(input_path: str) -> Tuple[List[str], str]:
    """(weight files, directory holding config.json) of an HF model dir, index.json or .safetensors file."""
    if not os.path.exists(input_path):
        raise CheckpointError(f"{input_path}: no such file or directory")
    files = checkpoint_files(input_path)
    for p in files:
        if file_format(p) != "safetensors":
            raise CheckpointError(f"{p}: not a safetensors file; HF -> MindFormers reads *.safetensors "
                                  "(with model.safetensors.index.json when sharded)")
    d = input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))
    return files, d


def convert_hf_to_mf(input_path: str, output_path: str, model: Optional[str] = None, dtype=None,
                     config: Optional[str] = None, qkv_concat: Optional[bool] = None,
                     arch: Optional[dict] = None) -> ConvertResult:
    """Convert an HF Llama/Qwen2 model (dir, index.json or .safetensors) to MindFormers names in one
    ``.ckpt`` or ``.safetensors`` file, streaming, plus the ``<stem>.config.json`` sidecar."""
    model_family(model)
    np_dtype = to_np_dtype(dtype)
    out = os.path.abspath(output_path)
    fmt = "ckpt" if out.lower().endswith(".ckpt") else "safetensors" if out.lower().endswith(".safetensors") \
        else None
    if fmt is None:
        raise ConfigError(f"--output_path: '{output_path}' must end with .ckpt (MindSpore) or .safetensors")
    files, hf_dir = _hf_input(input_path)
    if config is not None:
        spec = load_model_config(config, model)
    else:
        cpath = os.path.join(hf_dir, "config.json")
        if not os.path.isfile(cpath):
            raise ConfigError(f"{cpath}: no Hugging Face config.json beside the weights; pass --config")
        spec = load_model_config(cpath, model)
    apply_flags(spec, qkv_concat, arch)
    p = _plan(infos_of_files(files), spec, to_mf=True, input_path=input_path)

    hf_cfg = dict(spec.hf_config)
    tdt = _torch_dtype(p, np_dtype)
    _set_config_dtype(hf_cfg, tdt)
    cfg_json = json.dumps(hf_cfg, ensure_ascii=False)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if fmt == "ckpt":
        writer = CkptWriter(out)
    else:
        writer = SafetensorsWriter(out, metadata={"format": "ms", HF_CONFIG_METADATA_KEY: cfg_json},
                                   spec=output_spec(p, np_dtype))
    write_all(writer, p, np_dtype)
    side = sidecar_config_path(out)
    atomic_write_json(side, hf_cfg)
    return ConvertResult(p.count, writer.nbytes, out, [out], side, tdt)


# ------------------------------------------------------------------------------------------ MF -> HF
def convert_mf_to_hf(input_path: str, output_path: str, model: Optional[str] = None, dtype=None,
                     config: Optional[str] = None, max_shard_size="5GB", spec: Optional[ModelSpec] = None,
                     arch: Optional[dict] = None) -> ConvertResult:
    """Convert MindFormers weights (.ckpt/.safetensors file or a directory of them) to an HF model directory
    (config.json + model.safetensors, sharded with model.safetensors.index.json above `max_shard_size`)."""
    model_family(model)
    np_dtype = to_np_dtype(dtype)
    shard = parse_size(max_shard_size)
    if not os.path.exists(input_path):
        raise CheckpointError(f"{input_path}: no such file or directory")
    out = os.path.abspath(output_path)
    if os.path.isfile(out) or out.lower().endswith((".bin", ".safetensors", ".ckpt", ".pth")):
        raise ConfigError(f"--output_path: '{output_path}' must be a directory (the Hugging Face model dir "
                          "to write config.json and model*.safetensors into)")
    files = checkpoint_files(input_path)
    if spec is None:
        spec = load_model_config(config, model) if config is not None else find_config_for_mf(files, input_path,
                                                                                               model)
    apply_flags(spec, None, arch)
    p = _plan(infos_of_files(files), spec, to_mf=False, input_path=input_path)

    hf_cfg = dict(spec.hf_config)
    tdt = _torch_dtype(p, np_dtype)
    _set_config_dtype(hf_cfg, tdt)
    os.makedirs(out, exist_ok=True)
    writer = ShardedSafetensorsWriter(out, shard, metadata={"format": "pt"},
                                      spec=output_spec(p, np_dtype))
    res = write_all(writer, p, np_dtype)
    cfg_path = os.path.join(out, "config.json")
    atomic_write_json(cfg_path, hf_cfg)
    return ConvertResult(p.count, writer.nbytes, out, res["files"], cfg_path, tdt)


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_weight.py",
        description="Convert Llama/Qwen2/Qwen3/Qwen3-MoE weights between Hugging Face (safetensors) and "
                    "MindFormers (.ckpt or .safetensors) names and layouts, streaming one tensor group at a time.")
    p.add_argument("--model", default=None,
                   help="llama | qwen2 | qwen2_5 | qwen3 | qwen3_moe (default: the config's model_type)")
    p.add_argument("--reversed", action="store_true", help="MindFormers -> Hugging Face directory")
    p.add_argument("--input_path", default=None,
                   help="HF model dir / index.json / .safetensors (forward); MindFormers .ckpt / .safetensors "
                        "file or directory (--reversed)")
    p.add_argument("--output_path", default=None,
                   help="OUT.ckpt or OUT.safetensors (forward); a directory (--reversed)")
    p.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (default: keep the input dtype)")
    p.add_argument("--config", "--config_path", dest="config", default=None,
                   help="HF config.json or MindFormers YAML (default: beside the input)")
    p.add_argument("--max_shard_size", default="5GB", help="--reversed: shard size, e.g. 5GB, 500MB, 10MB")
    p.add_argument("--peft_path", default=None,
                   help="--reversed from a LoRA checkpoint: also write a PEFT adapter directory here")
    p.add_argument("--base_path", default=None,
                   help="--reversed from a LoRA checkpoint: base weights (default: recorded in its meta.json)")
    # MindFormers' per-model convert_weight.py flags (HF side / MindSpore side paths).
    p.add_argument("--torch_ckpt_dir", "--torch_ckpt_path", dest="hf_path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mindspore_ckpt_path", dest="ms_path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--qkv_concat", default=None,
                   help="qwen3: true (default, MindFormers 1.8's fused linear_qkv / linear_fc1) or false "
                        "(linear_q/k/v, mlp.gating/hidden); llama/qwen2: only false")
    for flag in MF_ARCH_FLAGS:   # MindFormers' reverse-conversion flags: checked against the model config
        p.add_argument(f"--{flag}", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max_worker", type=int, default=None, help=argparse.SUPPRESS)   # one streaming process here
    return p


def _bool_flag(value, flag: str) -> Optional[bool]:
    if value is None:
        return None
    v = str(value).strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise ConfigError(f"{flag}: '{value}' is not a boolean (true/false)")


def run(argv: Optional[Sequence[str]] = None) -> ConvertResult:
    """Parse flags and convert; raises SFTError (ConfigError / CheckpointError) on bad input."""
    args = build_parser().parse_args(argv)
    args.qkv_concat = _bool_flag(args.qkv_concat, "--qkv_concat")
    args.arch = {f: getattr(args, f) for f in MF_ARCH_FLAGS if getattr(args, f) is not None}
    src_alias, dst_alias = (args.ms_path, args.hf_path) if args.reversed else (args.hf_path, args.ms_path)
    for flag, val, alias, aname in (("--input_path", args.input_path, src_alias, "input"),
                                    ("--output_path", args.output_path, dst_alias, "output")):
        if val is not None and alias is not None and os.path.abspath(val) != os.path.abspath(alias):
            raise ConfigError(f"{flag} and its old alias name two different {aname} paths")
    inp = args.input_path or src_alias
    outp = args.output_path or dst_alias
    if not inp:
        raise ConfigError("--input_path is required")
    if not outp:
        raise ConfigError("--output_path is required")
    model_family(args.model)
    if args.reversed:
        return _reversed(args, inp, outp)
    return convert_hf_to_mf(inp, outp, args.model, args.dtype, args.config, args.qkv_concat, args.arch)


def _reversed(args, inp, outp) -> ConvertResult:
    """MindFormers -> HF. A training checkpoint directory resolves to its newest verified file; a LoRA
    checkpoint is merged into its base (and exported as a PEFT adapter with --peft_path)."""
    from ..checkpoint.loading import _training_rank_dir, resolve
    from ..checkpoint.transform import is_sliced
    if os.path.isdir(inp) and is_sliced(inp):
        raise CheckpointError(f"{inp} holds model/pipeline-parallel slices (one rank's file is not the model): "
                              "assemble them first with python -m mindformers_sft.tools.merge_ckpt --src_dir "
                              f"{inp} --strategy_dir STRATEGY --output_path merged.ckpt, then convert merged.ckpt")
    entry = None
    if os.path.isdir(inp) and _training_rank_dir(inp, 0) is not None or os.path.isfile(inp):
        _, inp, entry = resolve(inp, warn=lambda m: print(m, file=sys.stderr))
    from ..checkpoint.loading import OPT_PREFIXES
    from .lora_export import EXPERT_LORA_SUFFIXES, LORA_SUFFIXES, export_lora
    if os.path.isfile(inp) and any(k.endswith(LORA_SUFFIXES + EXPERT_LORA_SUFFIXES) and not k.startswith(OPT_PREFIXES)
                                   for k in file_infos(inp)):
        res = export_lora(inp, outp, args.peft_path, args.config, args.base_path, args.dtype, args.max_shard_size)
        files = checkpoint_files(res["output_path"])
        return ConvertResult(res["merged_layers"], sum(os.path.getsize(f) for f in files), res["output_path"],
                             files, os.path.join(res["output_path"], "config.json"), args.dtype)
    if args.peft_path:
        raise ConfigError(f"--peft_path: {inp} holds no LoRA adapters")
    spec = None
    if args.config is None and entry and entry.get("hf_config"):
        spec = spec_from_hf_dict(entry["hf_config"], os.path.join(os.path.dirname(inp), "meta.json"),
                                  model_family(args.model), entry.get("weight_layout"))
    return convert_mf_to_hf(inp, outp, args.model, args.dtype, args.config, args.max_shard_size, spec=spec,
                            arch=args.arch)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry: prints a one-line summary; errors go to stderr with exit code 1."""
    try:
        res = run(argv)
    except SFTError as e:
        print(f"convert_weight: error: {e}", file=sys.stderr)
        return 1
    print(res.summary(), flush=True)
    return 0
