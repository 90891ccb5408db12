"""The compiled prefill and decode step (models/decode_graph.py: static KV cache, one graph per shape) against
transformers' generate and against the concatenating PyNative cache, including a cache that grows past 256."""
import os

import numpy as np
import pytest
import torch
import transformers

from mindformers_sft.generation.engine import Engine, SamplingParams
from mindformers_sft.generation import generate
from mindformers_sft.models import decode_graph
from mindformers_sft.pretrained import from_hf_dir

STORIES = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "models", "stories260K")
PROMPTS = [[1, 403, 407, 261, 378], [1, 403, 407], [1, 378, 261, 403, 407, 261, 300, 301]]


@pytest.fixture(autouse=True)
def graph_decode(monkeypatch):
    """These tests are about the compiled decode graph: the fused CPU decode step (test_fused_decode.py) is off."""
    monkeypatch.setenv("MFSFT_FUSED_DECODE", "0")


@pytest.fixture(scope="module")
def model():
    return from_hf_dir(STORIES)


def _hf_left_padded(prompts, new):
    hf = transformers.LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=0)
    return [row[width:].tolist() for row in out]


def test_engine_batch_equals_transformers_with_one_compiled_shape(model):
    new = 30
    outs = Engine(model, eos_ids=[], max_batch=3).generate(PROMPTS, SamplingParams(max_tokens=new))
    assert outs == _hf_left_padded(PROMPTS, new)
    # 29 decode steps of the same 3 rows: one (batch, capacity) shape, i.e. one compiled graph
    assert decode_graph.graph_of(model).shapes == [(3, decode_graph.MIN_CAPACITY)]
    # the prompts (3 to 8 tokens) were prefilled together, left-padded to the smallest prefill width
    assert model._prefill_graph.shapes == [(3, decode_graph.MIN_PREFILL)]


def test_cache_growing_past_capacity_equals_pynative_cache(model, monkeypatch):
    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(3, 500, 250).tolist()
    got = generate(model, [prompt], max_new_tokens=12, eos_token_id=[])[0]
    assert (1, 2 * decode_graph.MIN_CAPACITY) in decode_graph.graph_of(model).shapes
    monkeypatch.setenv("MFSFT_GRAPH_DECODE", "0")
    assert got == generate(model, [prompt], max_new_tokens=12, eos_token_id=[])[0]


def test_capacity_is_a_power_of_two_holding_the_sequence():
    assert decode_graph.capacity_for(1) == decode_graph.MIN_CAPACITY
    assert decode_graph.capacity_for(257) == 512 and decode_graph.capacity_for(512) == 512
