"""Convert weights between Hugging Face and MindFormers (MindSpore Transformers) layouts:
Llama-2/3, Qwen2/2.5 (renames), Qwen3 and Qwen3-MoE (MindFormers 1.8 names: fused linear_qkv / linear_fc1,
stacked experts weight1/weight2).

    python convert_weight.py --model llama --input_path HF_DIR --output_path OUT.ckpt [--dtype bf16]
    python convert_weight.py --model qwen3_moe --input_path HF_DIR --output_path OUT.safetensors
    python convert_weight.py --model qwen2_5 --reversed --input_path OUT.ckpt --output_path HF_DIR \
        [--config config.json|model.yaml] [--max_shard_size 5GB]
    python convert_weight.py --reversed --input_path OUTPUT/checkpoint --output_path MERGED_HF_DIR \
        [--peft_path ADAPTER_DIR]          # a LoRA run: merged weights, and a PEFT adapter

Flags and behaviour: mindformers_sft/convert/hf.py.
"""
import sys

from mindformers_sft.convert import main

if __name__ == "__main__":
    sys.exit(main())
