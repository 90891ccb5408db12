"""Unpadding: a micro-batch (B, S+1) becomes one flat packed sequence (1, K+1) of its rows' real prefixes.

Positions after a row's last supervised target cannot change the loss (attention is causal: no earlier position
sees them, and their own targets are ignored), so the trainer's step computes only the prefixes: row b keeps its
model positions 0 .. last_b - 1, last_b = 1 + the index of its last supervised target in labels[b, 1:] (0 if none).
The prefixes are concatenated into one sequence, each (row, original segment) with a segment id of its own and the
row's own position ids, so the packed attention (causal within a segment) gives every kept position exactly what it
had: same loss and gradients up to float summation order. The attention kernel skips the keys of earlier segments
(models/cpu_attention_kernels.cc, jbeg), so the cost is sum(len_b^2) / 2, not K^2 / 2.

K (the sum of the prefixes) is rounded up to a multiple of UNPAD_BUCKET x B x S (at most B x S): at most
1 / UNPAD_BUCKET sequence lengths per (B, S), and for each the supervised-row list of step.supervised_rows (buckets of
ROW_BUCKET x K): at most 1/UNPAD_BUCKET x 1/ROW_BUCKET = 8 x 4 = 32 compiled graphs per micro-batch shape (a few in
practice: K varies little between batches). The tail of the flat sequence is segment 0 with ignored targets.

`MFSFT_UNPAD=0` turns it off (the padded (B, S) batch is computed as is).
"""
from __future__ import annotations

import os

import numpy as np

UNPAD_BUCKET = 0.125     # the flat length K is padded to a multiple of this fraction of the batch's B x S positions


def enabled() -> bool:
    return os.environ.get("MFSFT_UNPAD", "1") != "0"


def prefix_lengths(input_ids, labels, ignore_id) -> np.ndarray:
    """(B,) the number of model positions of each row that reach a supervised target (last_b)."""
    targets = np.asarray(labels if labels is not None else input_ids)[:, 1:]
    sup = targets != ignore_id
    s = targets.shape[1]
    return np.where(sup.any(1), s - np.argmax(sup[:, ::-1], 1), 0).astype(np.int64)


def flat_length(input_ids, labels, ignore_id, bucket=UNPAD_BUCKET) -> int:
    """K: the sum of the prefixes rounded up to a multiple of `bucket` x B x S (at least one bucket, at most B x S)."""
    b, s1 = np.shape(input_ids)
    total = b * (s1 - 1)
    step = max(1, -(-int(bucket * total * 1024) // 1024))
    n = int(prefix_lengths(input_ids, labels, ignore_id).sum())
    return min(total, max(step, -(-n // step) * step))


def unpad(mb: dict, ignore_id: int, bucket=UNPAD_BUCKET) -> dict:
    """The micro-batch (numpy: input_ids, labels (B, S+1), optional position_ids, segment_ids (B, S)) as one flat
    sequence: input_ids, labels (1, K+1) (the last token and the first label are fillers: the model reads
    input_ids[:, :-1] and predicts labels[:, 1:]), position_ids and segment_ids (1, K)."""
    ids = np.asarray(mb["input_ids"])
    labels = mb.get("labels")
    targets = np.asarray(labels if labels is not None else ids)[:, 1:]
    pos, seg = mb.get("position_ids"), mb.get("segment_ids")
    last = prefix_lengths(ids, labels, ignore_id)
    k = flat_length(ids, labels, ignore_id, bucket)
    f_ids = np.zeros((1, k + 1), ids.dtype)
    f_labels = np.full((1, k + 1), ignore_id, targets.dtype)
    f_pos = np.zeros((1, k), np.int32)
    f_seg = np.zeros((1, k), np.int32)
    o, next_id = 0, 1
    for b, n in enumerate(last):
        if n == 0:
            continue
        f_ids[0, o:o + n] = ids[b, :n]
        f_labels[0, o + 1:o + 1 + n] = targets[b, :n]
        f_pos[0, o:o + n] = np.asarray(pos)[b, :n] if pos is not None else np.arange(n)
        if seg is None:
            f_seg[0, o:o + n] = next_id
            next_id += 1
        else:    # each (row, segment) its own id; padding (0) inside the prefix stays one segment of the row
            u, inv = np.unique(np.asarray(seg)[b, :n], return_inverse=True)
            f_seg[0, o:o + n] = next_id + inv.reshape(-1)
            next_id += len(u)
        o += n
    return {"input_ids": f_ids, "labels": f_labels, "position_ids": f_pos, "segment_ids": f_seg}


def padding_share(batches, ignore_id) -> float:
    """The fraction of the batches' model positions after every row's last supervised target (skipped)."""
    total = sum(np.asarray(b["input_ids"]).shape[0] * (np.asarray(b["input_ids"]).shape[1] - 1) for b in batches)
    kept = sum(int(prefix_lengths(b["input_ids"], b.get("labels"), ignore_id).sum()) for b in batches)
    return 1.0 - kept / max(total, 1)
