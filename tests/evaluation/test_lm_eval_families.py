"""The lm-eval backend on the other families (Qwen2 with qkv bias, Qwen3 with q/k norms; Qwen tokenizers: no bos,
so the eos is the loglikelihood prefix) against lm-eval's HFLM over transformers: tiny random models in Hugging
Face layout, loaded by path on both sides. max_length 32 forces left truncation and several rolling windows."""
import os
import shutil

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from mindformers_sft.evaluation.lm_eval_model import MindFormersLM
from tests.paths import ASSETS

COMMON = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, rope_theta=1e6)
TEXT = ("Once upon a time, a small robot named Bolt lived in a quiet town. Every morning he watered the flowers, "
        "and every evening he counted the stars until he fell asleep.")


def _hf_dir(tmp_path, family):
    torch.manual_seed(0)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **COMMON))
    with torch.no_grad():                     # weights large enough for peaked, input-dependent predictions
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    out = tmp_path / family
    model.save_pretrained(str(out), safe_serialization=True)
    tok = os.path.join(ASSETS, "tokenizers", family)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok, f), out / f)
    return str(out)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_family_matches_hflm(tmp_path, family):
    path = _hf_dir(tmp_path, family)
    ours = MindFormersLM(pretrained=path, batch_size=3, max_length=32)
    ref = HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=3, max_length=32)
    assert ours.prefix_token_id == ref.prefix_token_id == ref.tokenizer.eos_token_id
    ll = [Instance("loglikelihood", {}, (TEXT[:40], TEXT[40:60]), 0),
          Instance("loglikelihood", {}, ("", "Hello world"), 1),
          Instance("loglikelihood", {}, (TEXT, " The end."), 2),
          Instance("loglikelihood", {}, ("你好，", "世界"), 3)]
    a, b = ours.loglikelihood(ll), ref.loglikelihood(ll)
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-4, rtol=1e-6)
    assert [g for _, g in a] == [g for _, g in b]
    assert ours.truncations["loglikelihood"] == 1
    rolling = [Instance("loglikelihood_rolling", {}, (TEXT,), 0), Instance("loglikelihood_rolling", {}, ("Hi.",), 1)]
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolling), ref.loglikelihood_rolling(rolling),
                               atol=1e-4, rtol=1e-6)
    gen = [Instance("generate_until", {}, (TEXT[:50], {"until": ["\n\n"], "max_gen_toks": 6}), 0),
           Instance("generate_until", {}, ("Bolt", {"until": ["\n\n"], "max_gen_toks": 6}), 1)]
    out = ours.generate_until(gen)
    assert out == ref.generate_until(gen) and any(out), out
