"""KV-cache generation on the bundled stories260K model, checked against transformers' generate."""
import os

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer

from mindformers_sft.errors import ConfigError
from mindformers_sft.generation import generate
from mindformers_sft.pretrained import from_hf_dir

STORIES = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "models", "stories260K")
PROMPT = [1, 403, 407, 261, 378]  # "<s> Once upon a time"
REFERENCE_TEXT = ("<s> Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")


@pytest.fixture(scope="module")
def model():
    return from_hf_dir(STORIES)


@pytest.fixture(scope="module")
def greedy40(model):
    return generate(model, [PROMPT], max_new_tokens=40)[0]


def test_greedy_equals_transformers_and_reference_text(greedy40):
    hf = transformers.LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=40, pad_token_id=0)[0].tolist()
    assert greedy40 == ref
    assert len(greedy40) == len(PROMPT) + 40 and greedy40[:5] == PROMPT
    text = Tokenizer.from_file(os.path.join(STORIES, "tokenizer.json")).decode(greedy40, skip_special_tokens=False)
    assert text.startswith(REFERENCE_TEXT), text


def test_batch_equals_single_and_stops_per_sequence_at_eos(model, greedy40):
    """Choose the 6th generated token as eos: the sequence ends right after it (eos included)."""
    eos = greedy40[len(PROMPT) + 5]
    first = greedy40.index(eos, len(PROMPT))
    other = [1, 403, 407, 261, 378 + 1]
    alone_other = generate(model, [other], max_new_tokens=12, eos_token_id=[eos, 10_000])[0]
    batch = generate(model, np.array([PROMPT, other]), max_new_tokens=12, eos_token_id=[eos, 10_000])
    assert batch[0] == greedy40[:first + 1] and batch[0][-1] == eos
    assert batch[1] == alone_other
    # prompts of different lengths are grouped; order of results follows the input
    mixed = generate(model, [other, PROMPT[:3]], max_new_tokens=4, eos_token_id=eos)
    assert mixed[0] == alone_other[:len(other) + 4]
    assert mixed[1] == generate(model, [PROMPT[:3]], max_new_tokens=4, eos_token_id=eos)[0]
    assert len(mixed[1]) <= 3 + 4


def test_sampling_seeded_reproducible_and_top_k1_is_greedy(model, greedy40):
    a = generate(model, [PROMPT], 20, do_sample=True, temperature=1.0, seed=123)
    b = generate(model, [PROMPT], 20, do_sample=True, temperature=1.0, seed=123)
    assert a == b
    others = [generate(model, [PROMPT], 20, do_sample=True, temperature=1.5, seed=s)[0] for s in (1, 2)]
    assert any(o != greedy40[:len(o)] for o in others + a)  # sampling is not greedy
    k1 = generate(model, [PROMPT], 20, do_sample=True, top_k=1, seed=7)[0]
    assert k1 == greedy40[:len(PROMPT) + 20]
    p_small = generate(model, [PROMPT], 20, do_sample=True, top_p=1e-6, seed=7)[0]
    assert p_small == greedy40[:len(PROMPT) + 20]


def test_generate_rejects_empty_prompt(model):
    with pytest.raises(ConfigError, match="at least one token"):
        generate(model, [[]], 3)
    assert generate(model, [PROMPT], 0) == [PROMPT]
