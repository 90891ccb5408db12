"""MindSpore-native supervised fine-tuning for Llama-2/3 and Qwen2/2.5, MindFormers-compatible."""
__version__ = "0.1.0"
