"""Entry point, as MindFormers' run_mindformer.py: `python run_mindformer.py --config X.yaml --run_mode finetune`."""
import sys

from mindformers_sft.cli import main

if __name__ == "__main__":
    sys.exit(main())
