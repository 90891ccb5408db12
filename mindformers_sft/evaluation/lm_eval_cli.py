"""lm-eval's own command line with our model registered (lm-eval finds models only among imported classes):

    python -m mindformers_sft.evaluation.lm_eval_cli --model mindformers_sft \
        --model_args config=configs/stories260k/lora_stories260k.yaml,load_checkpoint=output/stories260k_lora/checkpoint \
        --tasks alpaca_mc,alpaca_ppl --include_path assets/eval --batch_size 8

Every flag is lm-eval's (`lm-eval run --help`); the console script `mindformers-sft-lm-eval` is the same.
"""
from __future__ import annotations

import sys


def main(argv=None):
    from . import lm_eval_model  # noqa: F401  registers 'mindformers_sft'
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
