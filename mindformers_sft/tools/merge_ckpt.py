"""python -m mindformers_sft.tools.merge_ckpt --src_dir OUTPUT [--output_path merged.ckpt] [--strategy_dir DIR]

Merge the rank_N checkpoints of a distributed run into one complete checkpoint, which
run_mindformer.py --load_checkpoint and convert_weight.py --reversed take like any other."""
import argparse
import sys

from ..checkpoint.merge import merge_data_parallel, merge_sliced
from ..errors import SFTError


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mindformers_sft.tools.merge_ckpt", description=__doc__)
    ap.add_argument("--src_dir", required=True, help="training output dir (or its checkpoint/ dir) with rank_N/")
    ap.add_argument("--output_path", default="merged.ckpt", help="merged .ckpt or .safetensors")
    ap.add_argument("--strategy_dir", "--src_strategy_path_or_dir", dest="strategy", default=None,
                    help="strategy file, or dir of per-rank/per-stage files, of a model/pipeline-parallel run")
    ap.add_argument("--keep_optimizer", action="store_true", help="keep adam_m/adam_v/global_step")
    a = ap.parse_args(argv)
    try:
        if a.strategy:
            res = merge_sliced(a.src_dir, a.strategy, a.output_path, a.keep_optimizer,
                               warn=lambda m: print(m, file=sys.stderr))
        else:
            res = merge_data_parallel(a.src_dir, a.output_path, a.keep_optimizer,
                                      warn=lambda m: print(m, file=sys.stderr))
    except SFTError as e:
        print(f"merge_ckpt: error: {e}", file=sys.stderr)
        return 1
    print(" ".join(f"{k}={v}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
