"""Paths of the bundled assets (copied from their sources with their licenses; see assets/README.md)."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")
STORIES = os.path.join(ASSETS, "models", "stories260K")
LLAMA2_TOKENIZER = os.path.join(ASSETS, "tokenizers", "llama2", "tokenizer.model")
QWEN2_TOKENIZER = os.path.join(ASSETS, "tokenizers", "qwen2")
ALPACA = os.path.join(ASSETS, "data", "alpaca_en_demo.json")
SHAREGPT = os.path.join(ASSETS, "data", "sharegpt_dummy_conversation.json")
