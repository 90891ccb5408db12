"""Over-long samples: which tokens of a rendered, tokenized conversation are kept in ``seq_length + 1``.

A sample is its token ids and the token spans ``[start, end)`` of its assistant turns (the supervised parts).
The modes, after the peers they follow:

* ``proportional`` (the default: every sample is kept) -- LLaMA-Factory's ``cutoff_len`` rule (its supervised
  processor with ``infer_seqlen``): the sample is a list of (source, target) pairs, source = the tokens before an
  assistant turn (system, user, template glue), target = the assistant turn. Turn by turn, with the budget that is
  left: a target shorter than half the budget is kept whole and the source gets the rest; else a source shorter
  than half the budget is kept whole and the target gets the rest; else both shrink in proportion to their
  lengths. Each part keeps its first tokens. Once the budget is spent the remaining turns are dropped. With
  ``mask_history`` the last turns are served first (they are the supervised ones).
* ``cut`` -- FastChat's ``preprocess`` (``truncation=True, max_length=model_max_length``) and MindFormers'
  ``llama_preprocess``: the first ``seq_length + 1`` tokens, labels masked as in the whole sample.
* ``turn`` -- cut after the last whole assistant turn that fits; a sample whose first exchange does not fit is
  rejected.
* ``drop`` -- an over-long sample is rejected.

Template glue after the last assistant turn (the ``\\n`` after ``<|im_end|>``) that does not fit is dropped in
every mode but ``cut`` without counting as a truncation (nothing supervised is lost). A truncated sample left
with no supervised token is rejected (by the caller) with the mode in the reason.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from .formats import RecordError

TRUNCATIONS = ("proportional", "cut", "turn", "drop")
DEFAULT_TRUNCATION = "proportional"

Span = Tuple[int, int]


def proportional_split(source_len: int, target_len: int, budget: int) -> Tuple[int, int]:
    """(source, target) lengths kept of one turn with `budget` tokens left (LLaMA-Factory's rule, above)."""
    if 2 * target_len < budget:
        cap = budget
    elif 2 * source_len < budget:
        cap = budget - source_len
    else:
        # the same float expression as the reference, so rounding agrees to the token
        cap = int(budget * (target_len / (source_len + target_len)))
    t = min(target_len, cap)
    return min(source_len, max(budget - t, 0)), t


def proportional_keep(n: int, spans: Sequence[Span], max_len: int, last_first: bool = False) -> np.ndarray:
    """Indices (ascending) of the tokens kept by the proportional rule from a sample of n tokens."""
    pairs, prev = [], 0
    for ts, te in spans:
        pairs.append((prev, ts, te))
        prev = te
    kept, used = [], 0
    for a, ts, te in (reversed(pairs) if last_first else pairs):
        if used >= max_len:
            break
        s, t = proportional_split(ts - a, te - ts, max_len - used)
        kept.append((a, s, ts, t))
        used += s + t
    kept.sort()
    parts = [np.arange(a, a + s) for a, s, _, _ in kept]
    parts += [np.arange(ts, ts + t) for _, _, ts, t in kept]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def fit(n: int, spans: List[Span], max_len: int, mode: str, last_first: bool = False):
    """(keep, label_spans, truncated) for a sample of n tokens with assistant `spans`.

    keep: an int (the first `keep` tokens) or an index array; label_spans: the assistant spans to supervise,
    in the coordinates of the tokens *before* `keep` is applied (labels are computed on the whole sample, then
    the kept tokens are taken). RecordError when the mode rejects the sample."""
    if n <= max_len:
        return n, spans, False
    if mode == "cut":
        lost = not spans or spans[-1][1] > max_len          # anything past the last reply is glue
        return max_len, spans, lost
    if spans and spans[-1][1] <= max_len:
        return spans[-1][1], spans, False                   # only glue after the last reply is over
    if mode == "drop":
        raise RecordError(f"too long: {n} tokens > seq_length + 1 = {max_len} (truncation: drop)")
    if mode == "turn":
        keep = [sp for sp in spans if sp[1] <= max_len]
        if not keep:
            first = spans[0][1] if spans else n
            raise RecordError(f"too long: the first exchange alone has {first} tokens > seq_length + 1 = "
                              f"{max_len} (truncation: turn)")
        return keep[-1][1], keep, True
    if mode == "proportional":
        if not spans:
            return max_len, spans, True
        return proportional_keep(n, spans, max_len, last_first), spans, True
    raise RecordError(f"internal: truncation {mode!r}; expected one of {', '.join(TRUNCATIONS)}")
