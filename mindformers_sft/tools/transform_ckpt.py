"""Re-slice a checkpoint for another parallel layout (MindFormers' transform_ckpt), offline.

    python -m mindformers_sft.tools.transform_ckpt --src_checkpoint SRC --dst_checkpoint_dir DST \\
        (--dst_strategy FILE_OR_DIR | --config YAML [--options parallel_config.model_parallel=4 ...]) \\
        [--src_strategy FILE_OR_DIR] [--prefix checkpoint_]

SRC is a complete checkpoint (CKPT/safetensors file, Hugging Face directory, training output) or, with
--src_strategy, a distributed one (rank_N/ directories). DST receives rank_N/{prefix}N.ckpt for every rank of the
destination layout. That layout comes from a strategy file MindSpore wrote (--dst_strategy), or is predicted from
a YAML's parallel_config and the model (--config): the predicted strategy files are written to DST/strategy/ and
describe the slices our shard strategies ask for (see mindformers_sft/parallel/layout.py). Without either, the
result is one complete checkpoint in DST/rank_0 (the same as merge_ckpt).
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import SFTError


def predicted_strategy(config: str, options, src: str, dst_dir: str, warn=print) -> str:
    """Write the predicted strategy files of `config`'s parallel_config for the parameters of complete `src`."""
    from ..checkpoint import file_infos
    from ..checkpoint.loading import resolve
    from ..config import load_config
    from ..parallel.layout import write_strategy
    from ..build import model_config
    cfg = load_config(config, options, overrides={"load_checkpoint": src})
    mc = model_config(cfg, log=lambda *a: None)
    kind, path, _ = resolve(src, warn=warn)
    if kind == "hf":
        from ..checkpoint.loading import read_hf_dir
        shapes = {k: v.shape for k, v in read_hf_dir(path).items()}
    else:
        shapes = {k: i.shape for k, i in file_infos(path).items()}
    return write_strategy(shapes, mc, cfg.parallel_config, os.path.join(dst_dir, "strategy"))


def _record(src: str, warn) -> dict:
    """What the source says about itself (architecture, LoRA base, step): its meta.json entry, or the
    config.json of a Hugging Face directory."""
    import json
    from ..checkpoint import transform
    from ..checkpoint.loading import is_hf_dir, resolve
    if is_hf_dir(src):
        with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
            return {"hf_config": json.load(f)}
    if os.path.isdir(src) and transform._rank_dirs(transform.checkpoint_root(src)):
        return transform.meta_entry(transform.rank_files(src, warn)[0])
    return transform.meta_entry(resolve(src, warn=warn)[1])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mindformers_sft.tools.transform_ckpt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src_checkpoint", required=True)
    ap.add_argument("--src_strategy", "--src_strategy_path_or_dir", default=None,
                    help="strategy file or directory describing a distributed SRC")
    ap.add_argument("--dst_checkpoint_dir", required=True)
    ap.add_argument("--dst_strategy", default=None, help="strategy file or directory of the destination layout")
    ap.add_argument("--config", default=None, help="YAML whose parallel_config gives the destination layout")
    ap.add_argument("--options", nargs="*", default=[], help="key=value overrides of --config")
    ap.add_argument("--prefix", default="checkpoint_")
    a = ap.parse_args(argv)
    from ..checkpoint import transform
    warn = (lambda m: print(m, file=sys.stderr))
    work = os.path.abspath(a.dst_checkpoint_dir) + ".work"
    try:
        if a.dst_strategy and a.config:
            raise SFTError("give either --dst_strategy or --config, not both")
        src, src_strategy = a.src_checkpoint, None
        if a.src_strategy or (os.path.isdir(src) and transform.is_sliced(src)):
            src_strategy = transform.find_strategy(a.src_strategy, src, work)
        dst_strategy = None
        if a.dst_strategy:
            dst_strategy = transform.find_strategy(a.dst_strategy, a.dst_strategy, work)
        elif a.config:
            if src_strategy:       # the predicted layout needs the complete shapes: assemble first
                complete = transform.to_complete(src, src_strategy, os.path.join(work, "complete.ckpt"), warn)
                src, src_strategy = complete, None
            dst_strategy = predicted_strategy(a.config, a.options, src, work, warn)
        record, layout = _record(a.src_checkpoint, warn), None
        files = transform.to_layout(src, dst_strategy, a.dst_checkpoint_dir, src_strategy, a.prefix, warn)
        if a.config:
            from ..config import load_config
            from ..parallel.strategies import dims
            dp, mp, pp = dims(load_config(a.config, a.options).parallel_config)
            layout = {"data_parallel": dp, "model_parallel": mp, "pipeline_stage": pp, "sliced": mp * pp > 1}
        elif not dst_strategy:
            layout = {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1, "sliced": False}
        else:
            layout = {"sliced": True}
        for f in files.values():     # architecture, LoRA base and layout travel with the slices
            transform.write_meta(f, record, a.src_checkpoint, layout)
        if dst_strategy:
            import shutil
            os.makedirs(os.path.join(a.dst_checkpoint_dir, "strategy"), exist_ok=True)
            shutil.copy(dst_strategy, os.path.join(a.dst_checkpoint_dir, "strategy", os.path.basename(dst_strategy)))
    except SFTError as e:
        print(f"transform_ckpt: error: {e}", file=sys.stderr)
        return 1
    finally:
        if os.path.isdir(work):
            import shutil
            shutil.rmtree(work)
    print(f"ranks={len(files)} dst_checkpoint_dir={a.dst_checkpoint_dir} "
          f"strategy={os.path.join(a.dst_checkpoint_dir, 'strategy') if dst_strategy else '(complete)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
