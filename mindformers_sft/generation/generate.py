"""Autoregressive generation with the model's KV cache: one prefill, then one decode step per new token."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np

from ..errors import ConfigError


def _eos_set(model, eos_token_id) -> set:
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        return set()
    return set(eos_token_id) if isinstance(eos_token_id, (list, tuple, set)) else {int(eos_token_id)}


def pick_token(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng) -> int:
    """Next token of one row of fp32 logits (V,): greedy when temperature <= 0, else sampling with temperature,
    top-k (0 = off) and top-p (1.0 = off) drawn from the numpy generator `rng`."""
    if temperature <= 0:
        return int(logits.argmax(-1))
    logits = logits.astype(np.float64) / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = np.partition(logits, vocab - top_k)[vocab - top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop = np.zeros(vocab, dtype=bool)
        drop[order] = (np.cumsum(sorted_p) - sorted_p) >= top_p
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum()
    return int(rng.choice(vocab, p=probs))


def _pick(logits: np.ndarray, do_sample, temperature, top_k, top_p, rng) -> np.ndarray:
    """Next token per row from fp32 logits (B, V): greedy, or sampling (rows in order, one shared generator)."""
    if not do_sample or temperature <= 0:
        return logits.argmax(-1)
    return np.array([pick_token(row, temperature, top_k, top_p, rng) for row in logits])


def _generate_batch(model, ids: np.ndarray, max_new_tokens, do_sample, temperature, top_k, top_p, eos, rng):
    b = ids.shape[0]
    out = [list(map(int, row)) for row in ids]
    done = np.zeros(b, dtype=bool)
    logits, cache = model.prefill(ids)
    for step in range(max_new_tokens):
        nxt = _pick(logits.asnumpy().astype(np.float32), do_sample, temperature, top_k, top_p, rng)
        for i in range(b):
            if not done[i]:
                out[i].append(int(nxt[i]))
                done[i] = int(nxt[i]) in eos
        if done.all() or step == max_new_tokens - 1:
            break
        logits, cache = model.decode_step(nxt.astype(np.int32), cache)
    return out


def generate(model, input_ids: Union[Sequence[Sequence[int]], np.ndarray], max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: Optional[Union[int, List[int]]] = None, seed: Optional[int] = None) -> List[List[int]]:
    """Generate up to `max_new_tokens` after each prompt; returns the full sequences (prompt + new tokens).

    Each sequence stops at its first eos token (included in the output). eos_token_id None uses
    model.config.eos_token_id. Greedy unless do_sample; sampling uses temperature, top_k (0 = off) and
    top_p (1.0 = off) on fp32 logits with a numpy generator seeded by `seed`. Prompts of equal length are
    decoded as one batch; prompts of different lengths are decoded in groups of equal length.
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    prompts = [list(map(int, p)) for p in (input_ids.tolist() if isinstance(input_ids, np.ndarray) else input_ids)]
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("input_ids: every prompt needs at least one token")
    if max_new_tokens == 0:
        return prompts
    eos = _eos_set(model, eos_token_id)
    rng = np.random.default_rng(seed)
    results: List[Optional[List[int]]] = [None] * len(prompts)
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for _, idx in sorted(by_len.items()):
        ids = np.array([prompts[i] for i in idx], dtype=np.int32)
        for i, seq in zip(idx, _generate_batch(model, ids, max_new_tokens, do_sample, temperature, top_k, top_p,
                                               eos, rng)):
            results[i] = seq
    return results
