"""Convert Llama/Qwen2 weights between Hugging Face and MindFormers (MindSpore Transformers) layouts.

    python convert_weight.py --model llama --input_path HF_DIR --output_path OUT.ckpt [--dtype bf16]
    python convert_weight.py --model qwen2_5 --reversed --input_path OUT.ckpt --output_path HF_DIR \
        [--config config.json|model.yaml] [--max_shard_size 5GB]

Flags and behaviour: mindformers_sft/convert/hf.py.
"""
import sys

from mindformers_sft.convert import main

if __name__ == "__main__":
    sys.exit(main())
