"""`--run_mode predict --predict_data FILE`: generated_predictions.jsonl rows and BLEU-4 / ROUGE metrics, checked
against sacrebleu and rouge-score called directly here (jieba-segmented words for Chinese); seeded sampling."""
import json
import os

import jieba
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from mindformers_sft import cli
from mindformers_sft.evaluation.metrics import generation_metrics
from tests.paths import ALPACA, ROOT, SHAREGPT

CONFIG = os.path.join(ROOT, "configs", "stories260k", "lora_stories260k.yaml")


def _predict(out, data, *extra):
    rc = cli.main(["--config", CONFIG, "--run_mode", "predict", "--output_dir", str(out), "--predict_data", data,
                   "--max_new_tokens", "8", "--eval_batch_size", "4", *extra])
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "generated_predictions.jsonl", encoding="utf-8")]
    return rows, json.load(open(out / "predict_results.json", encoding="utf-8"))


class _Jieba:
    def tokenize(self, text):
        return [w for w in jieba.cut(text) if w.strip()]


def _reference_metrics(preds, labels, chinese=False):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Jieba() if chinese else None)
    scores = [scorer.score(l, p) for p, l in zip(preds, labels)]
    out = {f"rouge-{k[-1].lower()}": 100 * sum(s[k].fmeasure for s in scores) / len(scores)
           for k in ("rouge1", "rouge2", "rougeL")}
    out["bleu-4"] = sacrebleu.corpus_bleu(preds, [labels], tokenize="zh" if chinese else "13a").score
    return out


def test_alpaca_heldout_rows_and_metrics(tmp_path):
    rows, res = _predict(tmp_path, ALPACA, "--predict_split", "train[90%:]", "--predict_limit", "6")
    records = json.load(open(ALPACA, encoding="utf-8"))
    start = len(records) * 90 // 100
    assert [r["label"] for r in rows] == [rec["output"] for rec in records[start:start + 6]]
    assert all(r["prompt"].startswith("<s>") and records[start]["instruction"] in rows[0]["prompt"] for r in rows)
    assert all(isinstance(r["prediction"], str) for r in rows) and any(r["prediction"] for r in rows)
    ref = _reference_metrics([r["prediction"] for r in rows], [r["label"] for r in rows])
    for k, v in ref.items():
        assert res[k] == pytest.approx(v, abs=1e-4), k
    assert res["samples"] == 6 and res["do_sample"] is False


def test_sharegpt_label_is_last_answer_and_sampling_is_seeded(tmp_path):
    args = ("--predict_limit", "3", "--do_sample", "True", "--temperature", "1.0", "--seed", "7")
    rows_a, _ = _predict(tmp_path / "a", SHAREGPT, *args)
    rows_b, _ = _predict(tmp_path / "b", SHAREGPT, *args)
    rows_c, _ = _predict(tmp_path / "c", SHAREGPT, *args[:-1], "8")
    convs = json.load(open(SHAREGPT, encoding="utf-8"))[:3]
    assert [r["label"] for r in rows_a] == [c["conversations"][-1]["value"] for c in convs]
    assert [r["prediction"] for r in rows_a] == [r["prediction"] for r in rows_b]
    assert [r["prediction"] for r in rows_a] != [r["prediction"] for r in rows_c]


def test_chinese_scored_on_jieba_words():
    preds = ["今天天气很好，我们去公园散步。", "我喜欢吃苹果和香蕉", "机器学习是人工智能的一个分支"]
    labels = ["今天天气不错，我们去公园散步吧。", "我喜欢吃香蕉", "深度学习是机器学习的一个分支"]
    ours = generation_metrics(preds, labels)
    ref = _reference_metrics(preds, labels, chinese=True)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-4), k
    # character-level scoring would differ: the words matter
    assert ours["rouge-2"] != pytest.approx(_reference_metrics([" ".join(p) for p in preds],
                                                               [" ".join(l) for l in labels])["rouge-2"], abs=1e-3)


def test_prompt_longer_than_context_is_truncated_and_counted(tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"instruction": "Tell a story. " * 200, "input": "", "output": "Once."}) + "\n"
                    + json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n", encoding="utf-8")
    rows, res = _predict(tmp_path / "out", str(data))
    assert res["truncated_prompts"] == 1 and len(rows) == 2
