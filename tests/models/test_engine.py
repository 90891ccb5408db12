"""The batched engine (generation/engine.py) on the bundled stories260K model: prompts of different lengths in one
left-padded batch, rows joining and leaving between decode steps, per-row sampling; greedy answers checked against
transformers' generate (one prompt at a time) and against our own single-request generate()."""
import numpy as np
import pytest
import torch
import transformers

from mindformers_sft.errors import ConfigError
from mindformers_sft.generation import generate
from mindformers_sft.generation.engine import Engine, SamplingParams
from mindformers_sft.pretrained import from_hf_dir
from tests.paths import STORIES

PROMPTS = [[1, 403, 407, 261, 378], [1, 403, 407], [1, 403, 407, 261, 378, 300, 301, 302, 303, 304, 305], [1, 300],
           [1, 412, 305, 267], [1, 403]]
NEW = 24


@pytest.fixture(scope="module")
def model():
    m = from_hf_dir(STORIES)
    m.set_train(False)
    return m


@pytest.fixture(scope="module")
def hf_greedy():
    hf = transformers.LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            seq = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW, pad_token_id=0,
                              eos_token_id=2)[0].tolist()
            out.append(seq[len(p):])
    return out


def test_mixed_lengths_and_continuous_joins_equal_transformers(model, hf_greedy):
    # 6 prompts through 3 slots: rows of different lengths share the batch, finished rows leave, waiting ones join
    engine = Engine(model, eos_ids=[2], max_batch=3, max_context=512)
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=NEW))
    assert out == hf_greedy
    assert engine.stats()["running"] == 0
    # different budgets per row: short rows leave early, the others go on unchanged
    budgets = [3, NEW, 7, NEW, 1, 12]
    out = engine.generate(PROMPTS, [SamplingParams(max_tokens=b) for b in budgets])
    assert out == [h[:b] for h, b in zip(hf_greedy, budgets)]
    # ignore_eos generates max_tokens whatever comes
    eos = hf_greedy[0][3]
    other_eos = Engine(model, eos_ids=[eos], max_batch=3, max_context=512)
    assert other_eos.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW))[0] == \
        hf_greedy[0][:hf_greedy[0].index(eos) + 1]
    assert other_eos.generate([PROMPTS[0]], SamplingParams(max_tokens=NEW, ignore_eos=True))[0] == hf_greedy[0]
    # our own single-request path agrees too
    assert generate(model, [PROMPTS[2]], NEW, eos_token_id=[2])[0][len(PROMPTS[2]):] == hf_greedy[2]


def test_threaded_submit_stop_ids_cancel_and_seeded_sampling(model, hf_greedy):
    engine = Engine(model, eos_ids=[2], max_batch=4, max_context=512)
    engine.start()
    try:
        # a stop id ends its row (included, finish 'stop'); max_tokens ends with 'length'
        stop_at = hf_greedy[0][4]
        r1 = engine.submit(PROMPTS[0], SamplingParams(max_tokens=NEW, stop_token_ids=[stop_at]))
        r2 = engine.submit(PROMPTS[1], SamplingParams(max_tokens=5))
        assert list(r1) == hf_greedy[0][:hf_greedy[0].index(stop_at) + 1] and r1.finish_reason == "stop"
        assert list(r2) == hf_greedy[1][:5] and r2.finish_reason == "length"
        # a cancelled request frees its slot; the others finish unchanged
        long = engine.submit(PROMPTS[3], SamplingParams(max_tokens=400))
        other = engine.submit(PROMPTS[4], SamplingParams(max_tokens=NEW))
        it = iter(long)
        next(it)
        long.cancel()
        assert list(other) == hf_greedy[4]
        list(it)
        assert long.finish_reason == "cancelled" and len(long.tokens) < 400
        # a seeded sample does not depend on what it is batched with
        params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=11)
        alone = engine.generate([PROMPTS[0]], [params])[0]
        together = engine.generate([PROMPTS[2], PROMPTS[0], PROMPTS[5]],
                                   [SamplingParams(max_tokens=16, temperature=1.3, seed=1), params,
                                    SamplingParams(max_tokens=16)])
        assert together[1] == alone and together[2] == hf_greedy[5][:16]
        assert alone != hf_greedy[0][:16]
    finally:
        engine.stop()
    assert engine.stats() == {"running": 0, "waiting": 0, "max_batch": 4, "cancelled": 1}


def test_context_limit_and_bad_params(model):
    engine = Engine(model, eos_ids=[], max_batch=2, max_context=12)
    out = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=50))[0]
    assert len(PROMPTS[2]) + len(out) == 12          # stopped by the context, not by max_tokens
    with pytest.raises(ConfigError, match="12"):
        engine.submit(list(range(1, 13)), SamplingParams())
    for bad, match in ((SamplingParams(max_tokens=0), "max_tokens"), (SamplingParams(top_p=0.0), "top_p"),
                       (SamplingParams(temperature=-1.0), "temperature")):
        with pytest.raises(ConfigError, match=match):
            engine.submit(PROMPTS[0], bad)
    with pytest.raises(ConfigError, match="at least one token"):
        engine.submit([], SamplingParams())
    assert np.array_equal(engine.key_mask, np.zeros((0, 0), bool))


def _tiny_hf(family, path):
    from tests.models.test_qwen3_vs_hf import randomize
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    if family == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))     # qkv bias
    elif family == "qwen3":
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    else:
        hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1,
            norm_topk_prob=True, **common))
    hf = randomize(hf, 3).eval()
    hf.save_pretrained(path, safe_serialization=True)
    return hf


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe"])
def test_every_family_batches_through_the_same_path(family, tmp_path):
    hf = _tiny_hf(family, str(tmp_path))
    model = from_hf_dir(str(tmp_path))
    model.set_train(False)
    prompts = [[1, 5, 9, 13, 17, 21], [1, 40], [1, 60, 61, 62]]
    with torch.no_grad():
        ref = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8, pad_token_id=0,
                           eos_token_id=2)[0].tolist()[len(p):] for p in prompts]
    assert Engine(model, eos_ids=[2], max_batch=2, max_context=256).generate(prompts, SamplingParams(max_tokens=8)) \
        == ref


def test_a_failing_step_fails_its_rows_and_the_engine_goes_on(model, hf_greedy):
    class Flaky:
        """The model, failing on its 3rd call."""
        def __init__(self):
            self.config, self.calls = model.config, 0

        def forward_with_cache(self, *args, **kw):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("device lost")
            return model.forward_with_cache(*args, **kw)

    engine = Engine(Flaky(), eos_ids=[2], max_batch=2, max_context=512)
    engine.start()
    try:
        bad = engine.submit(PROMPTS[0], SamplingParams(max_tokens=NEW))
        list(bad)
        assert bad.finish_reason == "error" and "device lost" in bad.error
        assert engine.generate([PROMPTS[1]], SamplingParams(max_tokens=NEW)) == [hf_greedy[1]]
    finally:
        engine.stop()
