"""Generation metrics of predictions against references, on a 0-100 scale as LLaMA-Factory reports them
(`predict_with_generate`: bleu-4, rouge-1, rouge-2, rouge-l):

- BLEU-4: sacrebleu's corpus BLEU (4-grams, brevity penalty, its default smoothing), tokenizer '13a', or 'zh'
  (CJK characters apart, the WMT convention) when any reference or prediction holds Chinese/Japanese/Korean text.
- ROUGE-1/2/L: rouge-score's F-measure per sample, averaged. Texts with CJK characters are segmented into
  words with jieba (as LLaMA-Factory's compute_metrics does before rouge-chinese); other texts use
  rouge-score's default tokenizer (lowercase, alphanumeric runs, no stemming).
"""
from __future__ import annotations

import logging
import re
from typing import Dict, List, Sequence

from ..errors import ConfigError

CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def has_cjk(text: str) -> bool:
    return bool(CJK.search(text or ""))


def jieba_words(text: str) -> List[str]:
    import jieba
    jieba.setLogLevel(logging.WARNING)
    return [w.strip().lower() for w in jieba.cut(text) if w.strip()]


class RougeTokenizer:
    """rouge-score's tokenizer interface: jieba words for text with CJK characters, the default otherwise."""

    def __init__(self):
        from rouge_score.tokenizers import DefaultTokenizer
        self.default = DefaultTokenizer(use_stemmer=False)

    def tokenize(self, text: str) -> List[str]:
        return jieba_words(text) if has_cjk(text) else self.default.tokenize(text)


def bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu
    cjk = any(has_cjk(t) for t in list(predictions) + list(references))
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize="zh" if cjk else "13a").score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=RougeTokenizer())
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)          # score(target, prediction)
        for k in ROUGE_TYPES:
            sums[k] += scores[k].fmeasure
    n = max(len(predictions), 1)
    return {"rouge-1": 100 * sums["rouge1"] / n, "rouge-2": 100 * sums["rouge2"] / n,
            "rouge-l": 100 * sums["rougeL"] / n}


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """{'bleu-4', 'rouge-1', 'rouge-2', 'rouge-l'} on 0-100, rounded to 4 decimals."""
    if len(predictions) != len(references):
        raise ConfigError(f"metrics: {len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ConfigError("metrics: no predictions to score")
    out = {"bleu-4": bleu4(predictions, references), **rouge(predictions, references)}
    return {k: round(v, 4) for k, v in out.items()}
