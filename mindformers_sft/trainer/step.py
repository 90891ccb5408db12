"""One optimizer step: gradient accumulation over micro-batches, data-parallel all-reduce, global-norm
clipping, loss scaling, and the AdamW update.

The loss is token-weighted across everything that forms the step: each micro-batch contributes the
gradient of its *sum* of token losses, and the total is divided by the number of supervised tokens of
the whole (global) batch. So 4 micro-batches of 1 give exactly the update of one batch of 4, and data
parallel ranks give exactly the update of the single-process global batch.

Compiled graphs (jit): one graph per micro-batch (value and gradients) and one for scaling, clipping and the
update, which is applied inside the graph only when the grad norm and the loss are finite. A step of one
micro-batch without data parallelism is a single graph. The host sleeps while a graph runs (until its completion
signal with our CPU kernels, kernels.CompletionSignal) instead of spinning in MindSpore's wait, which on a
machine with few cores takes a core from the kernels it waits for.

Supervised rows only (CPU kernels, models whose loss is the plain token cross-entropy): the logits head and the
cross-entropy run on the positions whose target is supervised, gathered on the host's list (`supervised_rows`),
not on every position: prompt and padding positions carry no loss, and the head (hidden x vocab) is the largest
matmul of a small model. The list is padded to a multiple of ROW_BUCKET of the positions (ignored targets): at most
1/ROW_BUCKET graph shapes are compiled (a dynamic row axis would need shape inference our fused kernels do not
have). Same loss and gradients up to float summation order.

Unpadding (same condition, unless MFSFT_UNPAD=0; trainer/unpad.py): each micro-batch first becomes one flat packed
sequence (1, K) of its rows' prefixes up to their last supervised target (the positions after it cannot change the
loss), each (row, segment) a segment of its own with its own positions, K rounded up to a multiple of 1/8 of B x S;
the supervised-row list then indexes that sequence (buckets of ROW_BUCKET x K). The packed attention (causal within
a segment; the CPU kernel skips earlier segments' keys) gives the kept positions exactly what they had, so the loss
and gradients are the same up to float summation order, and gradient accumulation and data parallelism stay
token-weighted as above (each micro-batch still contributes its sum and its count). Compiled graphs: at most
8 x 4 = 32 per micro-batch shape (flat length x row-list length), a few in practice.
"""
from __future__ import annotations

import math
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..errors import TrainingError
from ..models import kernels
from . import unpad as _unpad

BATCH_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")
ROW_BUCKET = 0.25       # supervised-row lists are padded to a multiple of this fraction of the batch's positions


def supervised_rows(input_ids, labels, ignore_id, bucket=ROW_BUCKET):
    """(rows, targets) int32 (K,): the flat indices into the (B, S) model positions (input_ids[:, :-1]) whose target
    (labels[:, 1:], or input_ids[:, 1:]) is not `ignore_id`, and those targets; K is rounded up to a multiple of
    `bucket` x B x S (at least one bucket, at most B x S) with padding rows 0 whose target is `ignore_id`."""
    targets = np.asarray(labels if labels is not None else input_ids)[:, 1:].reshape(-1)
    rows = np.flatnonzero(targets != ignore_id).astype(np.int32)
    step = max(1, -(-int(bucket * targets.size * 1024) // 1024))
    k = min(targets.size, max(step, -(-rows.size // step) * step))
    out_rows = np.zeros(k, np.int32)
    out_targets = np.full(k, ignore_id, np.int32)
    out_rows[:rows.size] = rows
    out_targets[:rows.size] = targets[rows]
    return out_rows, out_targets


def step_inputs(mb, ignore_id, rows=True, unpadding=None):
    """(keys, dict of numpy arrays) a micro-batch is passed to the compiled step as: with `rows` (selects_rows) the
    supervised-row list of the batch, unpadded first (unpad.py) unless `unpadding` is False (default: MFSFT_UNPAD);
    without `rows` the batch as is (BATCH_KEYS). The arrays' shapes are the graph's shapes."""
    if not rows:
        return BATCH_KEYS, mb
    if _unpad.enabled() if unpadding is None else unpadding:
        mb = _unpad.unpad(mb, ignore_id)
    r, targets = supervised_rows(mb["input_ids"], mb.get("labels"), ignore_id)
    return ("rows", "row_targets", "input_ids", "position_ids", "segment_ids"), dict(mb, rows=r, row_targets=targets)


def graph_shape(mb, ignore_id, rows=True, unpadding=None):
    """The shapes that decide which compiled graph a micro-batch runs (a new one compiles once)."""
    keys, d = step_inputs(mb, ignore_id, rows, unpadding)
    return tuple(np.shape(d[k]) if d.get(k) is not None else None for k in keys)


def selects_rows(model) -> bool:
    """Whether the head may run on the supervised rows only: our CPU kernels, the plain CausalLM loss (a model with
    a loss of its own, e.g. MoE's aux loss, keeps the full path), no semi-auto sharding of the logits."""
    from ..models.causal_lm import CausalLM
    if not getattr(model, "cpu_kernel", False) or type(model).loss_sum_and_count is not CausalLM.loss_sum_and_count:
        return False
    return ms.get_auto_parallel_context("parallel_mode") in ("stand_alone", "data_parallel")


class StepResult(dict):
    __getattr__ = dict.__getitem__


class TrainStep:
    def __init__(self, model, optimizer, max_grad_norm=None, loss_scale=None, jit=True, data_parallel=False):
        self.model = model
        self.optimizer = optimizer
        self.weights = optimizer.params
        self.max_grad_norm = max_grad_norm
        self.loss_scale = loss_scale          # LossScaler or None (fp32)
        self.reducer = nn.DistributedGradReducer(self.weights, mean=False) if data_parallel else None
        self.allreduce = ops.AllReduce() if data_parallel else None
        self.clip = float(max_grad_norm or 0.0)
        self.jit = jit
        self._flat = bool(getattr(optimizer, "flat", False))     # AdamW's update modes (optimizer.py)
        self._fused = bool(getattr(optimizer, "fused", False))
        # compiled graphs end with a completion signal where our CPU kernels exist: the host sleeps until then
        # instead of spinning in MindSpore's wait (see kernels.CompletionSignal)
        self._signal = kernels.completion_signal() if jit else None
        self._graph_time = {}    # compiled function -> durations (s) of its last runs
        self._compiled = set()
        self._rows = selects_rows(model)
        if hasattr(model, "set_head_trainable"):    # a frozen head (LoRA): its weight's gradient is not computed
            head = model.head_weight()
            model.set_head_trainable(head is None or any(w is head for w in self.weights))
        loss_fn = self._rows_loss_sum if self._rows else self._scaled_loss_sum
        grad_fn = ms.value_and_grad(loss_fn, None, self.weights, has_aux=True)

        def micro(scale, *batch):
            (loss, count), grads = grad_fn(scale, *batch)
            return loss, count, grads

        def micro_signalled(scale, *batch):
            (loss, count), grads = grad_fn(scale, *batch)
            return loss, count, grads, kernels.notify(loss, count, *grads)

        def add(acc, grads):
            return tuple(a + g for a, g in zip(acc, grads))

        def whole(scale, lr, *batch):
            """One micro-batch, no data parallelism: the whole step in one graph (as micro + _finish)."""
            (loss, count), grads = grad_fn(scale, *batch)
            inv = 1.0 / (ops.maximum(count, 1.0) * scale)
            return (loss, count) + self._finish(grads, inv, lr, ops.isfinite(loss))

        self._micro = ms.jit(micro_signalled if self._signal else micro) if jit else micro
        self._add = ms.jit(add) if jit else add
        self._update = ms.jit(self._finish) if jit else self._finish
        self._whole = ms.jit(whole) if jit else whole

    def _var(self, tensors):
        """A tuple of tensors passed to a jit function as variables (not constants baked into the graph)."""
        return ms.mutable(tuple(tensors)) if self.jit else tuple(tensors)

    def _scaled_loss_sum(self, scale, input_ids, labels, position_ids=None, segment_ids=None):
        s, n = self.model.loss_sum_and_count(input_ids, labels, position_ids, segment_ids)
        return s * scale, n

    def _rows_loss_sum(self, scale, rows, row_targets, input_ids, position_ids=None, segment_ids=None):
        """_scaled_loss_sum with the head and cross-entropy on the given flat rows only (supervised_rows)."""
        m = self.model
        tokens = input_ids[:, :-1]
        position_ids, mask = m._inputs(tokens, position_ids, segment_ids)
        h = m._decoder(tokens, position_ids, mask)
        h = ops.gather(ops.reshape(h, (-1, h.shape[-1])), rows, 0)
        s, n = m._ce_sum_and_count(ops.expand_dims(h, 0), ops.expand_dims(row_targets, 0))
        return s * scale, n

    def _finish(self, grads, inv_tokens, lr, loss_finite):
        """Scale by 1/tokens, global norm, clip, and the optimizer update unless the norm or the loss is not
        finite (then nothing changes). One compiled graph; returns (norm, finite[, completion token])."""
        opt = self.optimizer
        if self._fused:   # CPU kernels: norm and the whole update in two kernels (same arithmetic)
            norm = ops.reshape(ops.sqrt(kernels.grad_sq_sum(inv_tokens, grads)), ())
            finite = ops.logical_and(ops.isfinite(norm), loss_finite)
            factor = ops.minimum(self.clip / (norm + 1e-6), 1.0) if self.clip > 0 else ops.ones((), ms.float32)
            step = opt.update_fused(grads, lr, inv_tokens, factor, finite)
            if self._signal is None:
                return norm, finite
            return norm, finite, kernels.notify(norm, step)
        if self._flat:    # many small parameters: one flat vector (same elementwise arithmetic)
            g = opt.flatten(grads) * inv_tokens
            norm = ops.sqrt(ops.sum(ops.square(g)))
        else:
            g = tuple(x * inv_tokens for x in grads)
            norm = ops.sqrt(ops.addn([ops.sum(ops.square(ops.cast(x, ms.float32))) for x in g]))
        finite = ops.logical_and(ops.isfinite(norm), loss_finite)
        if self.clip > 0:
            factor = ops.minimum(self.clip / (norm + 1e-6), 1.0)
            g = g * factor if self._flat else tuple(x * factor for x in g)
        step = opt(g, lr, finite)     # available once the update is done
        if self._signal is None:
            return norm, finite
        return norm, finite, kernels.notify(norm, step)

    def _run(self, fn, *args):
        """Call a compiled graph and wait for it without spinning: until its completion signal, or (without our
        CPU kernels) for most of its last duration; then MindSpore's own (spinning) wait finishes the job."""
        if not self.jit:
            return fn(*args)
        past = self._graph_time.setdefault(fn, [])      # durations of its last runs (not the compiling one)
        compiled = fn in self._compiled
        if self._signal is not None:
            self._signal.clear()
        t = time.perf_counter()
        out = fn(*args)
        if self._signal is not None:
            self._signal.wait(max(1.0, 4.0 * max(past)) if past else 10.0)
        elif past:
            time.sleep(0.8 * min(past))
        out[0].asnumpy()
        if compiled:
            past.append(time.perf_counter() - t)
            del past[:-5]
        else:
            self._compiled.add(fn)
        return out

    def __call__(self, micro_batches, lr: float) -> StepResult:
        """micro_batches: list of dicts of numpy arrays (keys from BATCH_KEYS). Returns loss, grad_norm, tokens."""
        scale = self.loss_scale.value if self.loss_scale else 1.0
        scale_t = Tensor(scale, ms.float32)
        batches = []
        for mb in micro_batches:
            # rows: (rows, targets, input_ids, position_ids, segment_ids) of the unpadded batch, see _rows_loss_sum
            keys, mb = step_inputs(mb, self.model.ignore_token_id, self._rows)
            args = [Tensor(mb[k]) if mb.get(k) is not None else None for k in keys]
            while args and args[-1] is None:
                args.pop()
            batches.append(args)
        if len(batches) == 1 and self.reducer is None:
            loss, count, norm, finite = self._run(self._whole, scale_t, Tensor(lr, ms.float32), *batches[0])[:4]
            tokens = float(count.asnumpy())
            return self._result(float(loss.asnumpy()) / scale / max(tokens, 1.0), tokens, norm, finite)
        acc = None
        loss_sum = 0.0
        tokens = 0.0
        for args in batches:
            loss, count, grads = self._run(self._micro, scale_t, *args)[:3]
            acc = grads if acc is None else self._add(self._var(acc), self._var(grads))
            loss_sum += float(loss.asnumpy()) / scale
            tokens += float(count.asnumpy())
        if self.reducer is not None:
            acc = self.reducer(acc)
            tot = self.allreduce(Tensor(np.array([loss_sum, tokens], np.float32))).asnumpy()
            loss_sum, tokens = float(tot[0]), float(tot[1])
        loss = loss_sum / max(tokens, 1.0)
        inv = Tensor(1.0 / (max(tokens, 1.0) * scale), ms.float32)
        # the update is applied inside the graph only if the grad norm and the loss are finite
        norm, finite = self._run(self._update, self._var(acc), inv, Tensor(lr, ms.float32),
                                 Tensor(math.isfinite(loss)))[:2]
        return self._result(loss, tokens, norm, finite)

    def _result(self, loss, tokens, norm, finite) -> StepResult:
        finite = bool(finite.asnumpy())
        skipped = False
        if self.loss_scale is not None:
            skipped = not self.loss_scale.update(finite)
        elif not finite:
            raise TrainingError(f"loss is {loss} (grad norm {float(norm.asnumpy())}): not finite; "
                                "the update was not applied")
        return StepResult(loss=loss, grad_norm=float(norm.asnumpy()), tokens=tokens, skipped=skipped)


class LossScaler:
    """Static or dynamic loss scale (MindFormers' DynamicLossScaleUpdateCell semantics) for fp16 on Ascend."""

    def __init__(self, value=65536.0, factor=2.0, window=1000, dynamic=True):
        self.value, self.factor, self.window, self.dynamic = float(value), float(factor), int(window), dynamic
        self.good = 0

    def update(self, finite: bool) -> bool:
        """Returns True if the step may be applied."""
        if not self.dynamic:
            return finite
        if not finite:
            self.value = max(self.value / self.factor, 1.0)
            self.good = 0
            return False
        self.good += 1
        if self.good >= self.window:
            self.value *= self.factor
            self.good = 0
        return True

    @classmethod
    def from_config(cls, scale_sense, compute_dtype):
        if compute_dtype != "float16" and not isinstance(scale_sense, dict):
            if scale_sense in (None, 1, 1.0):
                return None
        if isinstance(scale_sense, dict):
            return cls(value=scale_sense.get("loss_scale_value", 65536), factor=scale_sense.get("scale_factor", 2),
                       window=scale_sense.get("scale_window", 1000),
                       dynamic=scale_sense.get("type", "DynamicLossScaleUpdateCell") != "FixedLossScaleUpdateCell")
        if scale_sense is None:
            return cls() if compute_dtype == "float16" else None
        return cls(value=float(scale_sense), dynamic=False)
