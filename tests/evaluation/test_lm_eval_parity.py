"""Our lm-eval backend against lm-eval's own Hugging Face backend (HFLM over transformers) on the bundled
stories260K model and the bundled tasks: per-request loglikelihoods within 1e-4, is_greedy and accuracies
identical, greedy generations identical; base weights and a LoRA model (random nonzero adapters; HF side: the
merged weights). Loglikelihoods agree within 1e-4 + 1e-6 relative (fp32 sums). max_length 256 forces left truncation (multiple choice) and several rolling windows."""
import os
import shutil

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from mindformers_sft.evaluation.lm_eval_model import MindFormersLM
from tests.paths import ASSETS, ROOT, STORIES

TASKS = os.path.join(ASSETS, "eval")
MAX_LEN = 256
LIMITS = {"alpaca_mc": 6, "alpaca_ppl": 3, "alpaca_gen": 3}


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=TASKS, include_defaults=False)


def _run(lm, tm, task):
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=LIMITS[task], task_manager=tm, log_samples=True,
                                  bootstrap_iters=0)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples


def _flat(resps):
    """Numbers and flags of one sample's responses: [[(ll, greedy)], ...] or [[ll]] or [[text]]."""
    nums, flags, texts = [], [], []
    for r in resps:
        for x in (r[0] if isinstance(r[0], (list, tuple)) else r):
            if isinstance(x, bool):
                flags.append(x)
            elif isinstance(x, str):
                texts.append(x)
            else:
                nums.append(float(x))
    return nums, flags, texts


def _compare(ours, ref, tm, tasks):
    for task in tasks:
        res_o, s_o = _run(ours, tm, task)
        res_r, s_r = _run(ref, tm, task)
        assert [s["doc_id"] for s in s_o] == [s["doc_id"] for s in s_r]
        n_flags = 0
        for a, b in zip(s_o, s_r):
            na, fa, ta = _flat(a["resps"])
            nb, fb, tb = _flat(b["resps"])
            assert len(na) == len(nb)
            # 1e-4, plus 1e-6 relative: the reference sums hundreds of fp32 log-probs in fp32 (|ll| ~ 600 has an
            # fp32 spacing of 6e-5)
            np.testing.assert_allclose(na, nb, atol=1e-4, rtol=1e-6, err_msg=f"{task} doc {a['doc_id']}")
            assert fa == fb and ta == tb, (task, a["doc_id"], fa, fb, ta, tb)
            n_flags += len(fa) + len(ta)
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            if metric in res_r:
                assert res_o[metric] == res_r[metric], (task, metric)
        for metric in ("word_perplexity,none", "bits_per_byte,none"):
            if metric in res_r:
                assert abs(res_o[metric] - res_r[metric]) <= 1e-4 * max(1.0, abs(res_r[metric])), (task, metric)
        if task == "alpaca_gen":
            assert n_flags == LIMITS[task] and any(t for _, _, t in [_flat(s["resps"]) for s in s_r])


@pytest.fixture(scope="module")
def base_pair():
    ours = MindFormersLM(load_checkpoint=STORIES, batch_size=4, max_length=MAX_LEN)
    ref = HFLM(pretrained=STORIES, dtype="float32", device="cpu", batch_size=4, max_length=MAX_LEN)
    return ours, ref


def test_base_model_matches_hflm(task_manager, base_pair):
    _compare(*base_pair, task_manager, ["alpaca_mc", "alpaca_ppl", "alpaca_gen"])


def test_long_prompts_truncated_from_the_left_as_hflm(base_pair):
    """Context + continuation longer than max_length: both keep the last max_length tokens; ours counts it.
    Also an empty context (scored after the bos prefix token) and a prompt too long for generation."""
    from lm_eval.api.instance import Instance
    ours, ref = base_pair
    long_ctx = " ".join(["Once upon a time there was a little dog who liked to run in the park."] * 30)
    reqs = [Instance("loglikelihood", {}, (long_ctx, " The end."), 0),
            Instance("loglikelihood", {}, ("", "Lily went to the park."), 1),
            Instance("loglikelihood", {}, ("Tom had a red ball.", " He liked it."), 2)]
    before = dict(ours.truncations)
    a, b = ours.loglikelihood(reqs), ref.loglikelihood(reqs)
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-4, rtol=1e-6)
    assert [g for _, g in a] == [g for _, g in b]
    assert ours.truncations["loglikelihood"] == before["loglikelihood"] + 1
    gen = [Instance("generate_until", {}, (long_ctx, {"until": ["."], "max_gen_toks": 8}), 0)]
    assert ours.generate_until(gen) == ref.generate_until(gen)
    assert ours.truncations["generate_until"] == before["generate_until"] + 1


def test_lora_model_matches_hflm_on_merged_weights(task_manager, tmp_path):
    from safetensors.numpy import save_file
    from mindformers_sft import run
    from mindformers_sft.config import load_config
    from mindformers_sft.convert.names import mf_to_hf
    from mindformers_sft.pet.lora import merged_state
    from mindspore import Tensor
    cfg = load_config(os.path.join(ROOT, "configs", "stories260k", "lora_stories260k.yaml"), [],
                      {"load_checkpoint": STORIES, "run_mode": "eval", "context.device_target": "CPU",
                       "processor.tokenizer.vocab_file": STORIES})
    model = run.build_model(cfg, log=lambda *a: None)
    rng = np.random.default_rng(0)
    adapters = [p for p in model.get_parameters() if p.name.endswith((".lora_a", ".lora_b"))]
    assert len(adapters) == 2 * 7 * model.config.num_layers
    for p in adapters:
        p.set_data(Tensor(rng.normal(0, 0.05, p.shape).astype(np.float32)))
    tok = run.check_tokenizer(cfg, model.config)
    hf_dir = tmp_path / "merged"
    hf_dir.mkdir()
    merged = {mf_to_hf(k): np.ascontiguousarray(v) for k, v in merged_state(model).items()}
    merged.pop("lm_head.weight", None)                                    # tied embeddings
    save_file(merged, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(STORIES, f), hf_dir / f)
    ours = MindFormersLM(model=model, tokenizer=tok, batch_size=4, max_length=MAX_LEN)
    ref = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=4, max_length=MAX_LEN)
    base = HFLM(pretrained=STORIES, dtype="float32", device="cpu", batch_size=4, max_length=MAX_LEN)
    _, s_base = _run(base, task_manager, "alpaca_ppl")
    _, s_ref = _run(ref, task_manager, "alpaca_ppl")
    assert abs(_flat(s_base[0]["resps"])[0][0] - _flat(s_ref[0]["resps"])[0][0]) > 1e-2   # adapters matter
    _compare(ours, ref, task_manager, ["alpaca_mc", "alpaca_ppl"])
