"""Shared helpers of the data tests (assets paths, small builders)."""
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSETS = os.path.join(ROOT, "assets")
LLAMA2 = os.path.join(ASSETS, "tokenizers", "llama2", "tokenizer.model")
QWEN2 = os.path.join(ASSETS, "tokenizers", "qwen2")
STORIES = os.path.join(ASSETS, "models", "stories260K")
ALPACA = os.path.join(ASSETS, "data", "alpaca_en_demo.json")
SHAREGPT = os.path.join(ASSETS, "data", "sharegpt_dummy_conversation.json")


def supervised_runs(ids, labels):
    """[(start, end)] of the maximal runs of supervised labels."""
    sup = np.asarray(labels) != -100
    edges = np.flatnonzero(np.diff(np.concatenate([[0], sup.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))
