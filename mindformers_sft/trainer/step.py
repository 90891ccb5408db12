"""One optimizer step: gradient accumulation over micro-batches, data-parallel all-reduce, global-norm
clipping, loss scaling, and the AdamW update.

The loss is token-weighted across everything that forms the step: each micro-batch contributes the
gradient of its *sum* of token losses, and the total is divided by the number of supervised tokens of
the whole (global) batch. So 4 micro-batches of 1 give exactly the update of one batch of 4, and data
parallel ranks give exactly the update of the single-process global batch.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..errors import TrainingError

BATCH_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")


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
        grad_fn = ms.value_and_grad(self._scaled_loss_sum, None, self.weights, has_aux=True)

        def micro(scale, *batch):
            (loss, count), grads = grad_fn(scale, *batch)
            return loss, count, grads

        def add(acc, grads):
            return tuple(a + g for a, g in zip(acc, grads))

        opt = optimizer

        def apply(grads, lr):
            return opt(grads, lr)

        self.jit = jit
        self._micro = ms.jit(micro) if jit else micro
        self._add = ms.jit(add) if jit else add
        self._update = ms.jit(self._finish) if jit else self._finish
        self._apply = ms.jit(apply) if jit else apply

    def _var(self, tensors):
        """A tuple of tensors passed to a jit function as variables (not constants baked into the graph)."""
        return ms.mutable(tuple(tensors)) if self.jit else tuple(tensors)

    def _scaled_loss_sum(self, scale, input_ids, labels, position_ids=None, segment_ids=None):
        s, n = self.model.loss_sum_and_count(input_ids, labels, position_ids, segment_ids)
        return s * scale, n

    def _finish(self, grads, inv_tokens, lr, clip):
        grads = tuple(g * inv_tokens for g in grads)
        sq = [ops.sum(ops.square(ops.cast(g, ms.float32))) for g in grads]
        norm = ops.sqrt(ops.addn(sq))
        finite = ops.isfinite(norm)
        if clip > 0:
            factor = ops.minimum(clip / (norm + 1e-6), 1.0)
            grads = tuple(g * factor for g in grads)
        return grads, norm, finite

    def __call__(self, micro_batches, lr: float) -> StepResult:
        """micro_batches: list of dicts of numpy arrays (keys from BATCH_KEYS). Returns loss, grad_norm, tokens."""
        scale = self.loss_scale.value if self.loss_scale else 1.0
        scale_t = Tensor(scale, ms.float32)
        acc = None
        loss_sum = 0.0
        tokens = 0.0
        for mb in micro_batches:
            args = [Tensor(mb[k]) if mb.get(k) is not None else None for k in BATCH_KEYS]
            while args and args[-1] is None:
                args.pop()
            loss, count, grads = self._micro(scale_t, *args)
            acc = grads if acc is None else self._add(self._var(acc), self._var(grads))
            loss_sum += float(loss.asnumpy()) / scale
            tokens += float(count.asnumpy())
        if self.reducer is not None:
            acc = self.reducer(acc)
            tot = self.allreduce(Tensor(np.array([loss_sum, tokens], np.float32))).asnumpy()
            loss_sum, tokens = float(tot[0]), float(tot[1])
        loss = loss_sum / max(tokens, 1.0)
        inv = Tensor(1.0 / (max(tokens, 1.0) * scale), ms.float32)
        clip = float(self.max_grad_norm or 0.0)
        grads, norm, finite = self._update(self._var(acc), inv, Tensor(lr, ms.float32), Tensor(clip, ms.float32))
        finite = bool(finite.asnumpy()) and math.isfinite(loss)
        skipped = False
        if self.loss_scale is not None:
            skipped = not self.loss_scale.update(finite)
        if finite:
            self._apply(self._var(grads), Tensor(lr, ms.float32))
        elif self.loss_scale is None:
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
