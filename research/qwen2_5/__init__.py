"""Qwen2.5 registrations, loaded with `--register_path research/qwen2_5` as in MindFormers.

Qwen2/Qwen2.5 are the Llama-family decoder with q/k/v biases (model_config.qkv_has_bias: True) and,
for the small sizes, tied embeddings; these arch names map onto it.
"""
from mindformers_sft.models.registry import register_arch

for _name in ("Qwen2ForCausalLM", "ParallelQwen2ForCausalLM", "ParallelQwenForCausalLM", "Qwen2_5ForCausalLM"):
    register_arch(_name, "qwen2")
