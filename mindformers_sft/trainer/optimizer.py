"""AdamW with decoupled weight decay and bias correction (the update of torch.optim.AdamW and of
MindFormers' AdamW), from basic ops so it runs on CPU (MindSpore 2.10 CPU has no mint.optim.AdamW kernel)
and in graph mode.

Weight decay applies to matrices only: norms, biases (and anything 1-D) are exempt, as in MindFormers.
The learning rate is passed in on every step (the schedule lives on the host), so the optimizer holds
only its moments and step count, all of which are saved for exact resume.

Flat mode: when the trainable parameters are all fp32 and small in total (LoRA adapters, small models: at most
FLAT_MAX elements), or of any size with our fused CPU kernels (one kernel updates them all in place of a graph of a
dozen ops per parameter, which on a 135M model took minutes and gigabytes to compile), the moments live in two flat fp32 vectors and the update runs on the concatenated
gradients and parameters (split back and assigned): the same elementwise arithmetic in a handful of kernels
instead of a dozen per parameter, which is what a step costs on CPU when the parameters are many and small.
Checkpointed state is the same either way (`adam_m.<name>`, `adam_v.<name>`, `global_step`).
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..models import kernels

FLAT_MAX = 1 << 25  # elements


def decays(param) -> bool:
    name = param.name
    return len(param.shape) > 1 and "norm" not in name and not name.endswith(".bias")


def _flat(tensors):
    return ops.cat([ops.reshape(ops.cast(t, ms.float32), (-1,)) for t in tensors])


class AdamW(nn.Cell):
    """update(grads, lr[, apply]): p <- p - lr*wd*p; m,v moments; p <- p - lr * m_hat / (sqrt(v_hat) + eps).

    `apply` (bool scalar Tensor, optional): when False the parameters, moments and step count keep their values
    (the update is computed and discarded), so a non-finite step can be skipped inside a compiled graph.
    """

    def __init__(self, params, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        super().__init__(auto_prefix=False)
        self.params = ms.ParameterTuple(params)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.decay_flags = tuple(decays(p) for p in self.params)
        self.weight_decay = float(weight_decay)
        self.global_step = Parameter(Tensor(0, ms.int32), name="global_step", requires_grad=False)
        self.sizes = tuple(int(np.prod(p.shape)) for p in self.params)
        all32 = all(p.dtype == ms.float32 for p in self.params)
        # with our CPU kernels the flat update is one kernel whatever the size (no concatenated copies); the
        # per-parameter graph it replaces compiles slowly and keeps several temporaries per parameter alive
        self.flat = all32 and 0 < sum(self.sizes) and (sum(self.sizes) <= FLAT_MAX or kernels.cpu_kernels())
        if self.flat:
            n = sum(self.sizes)
            self.exp_avg_flat = Parameter(Tensor(np.zeros(n, np.float32)), name="adam_m_flat", requires_grad=False)
            self.exp_avg_sq_flat = Parameter(Tensor(np.zeros(n, np.float32)), name="adam_v_flat",
                                             requires_grad=False)
            mask = np.concatenate([np.full(k, 1.0 if d else 0.0, np.float32)
                                   for k, d in zip(self.sizes, self.decay_flags)])
            self.decay_mask = Tensor(mask) if 0 < mask.sum() < mask.size else None
            # on CPU with our kernels: the whole flat update in one kernel, in place (kernels.adamw_flat_op)
            self.fused = kernels.cpu_kernels()
            if self.fused:
                self._fused_op = kernels.adamw_flat_op(len(self.params))
                self._hyper = Tensor(np.array([self.beta1, 1.0 - self.beta1, self.beta2, 1.0 - self.beta2, self.eps,
                                               self.weight_decay], np.float32))
                self._decays = Tensor(np.array(self.decay_flags, np.float32))
        else:
            self.fused = False
            self.exp_avg = self.params.clone(prefix="adam_m", init="zeros")
            self.exp_avg_sq = self.params.clone(prefix="adam_v", init="zeros")

    def flatten(self, grads):
        """The gradients (one per parameter) as the flat fp32 vector `construct` takes in flat mode."""
        return _flat(grads)

    def _keep(self, apply, new, old):
        return new if apply is None else ops.select(apply, new, old)

    def construct(self, grads, lr, apply=None):
        """grads: one per parameter, or in flat mode also the flat vector of `flatten(grads)`."""
        step = self.global_step + 1
        ops.assign(self.global_step, self._keep(apply, step, self.global_step))
        stepf = ops.cast(step, ms.float32)
        bc1 = 1.0 - ops.pow(Tensor(self.beta1, ms.float32), stepf)
        bc2 = 1.0 - ops.pow(Tensor(self.beta2, ms.float32), stepf)
        if self.flat:
            done = self._update_flat(grads if isinstance(grads, Tensor) else _flat(grads), lr, bc1, bc2, apply)
            return ops.depend(step, done)
        news = ()
        for i in range(len(self.params)):
            p, g, m, v = self.params[i], grads[i], self.exp_avg[i], self.exp_avg_sq[i]
            g = ops.cast(g, ms.float32)
            p32 = ops.cast(p, ms.float32)
            if self.decay_flags[i] and self.weight_decay > 0.0:
                p32 = p32 - lr * self.weight_decay * p32
            m_new = self.beta1 * m + (1.0 - self.beta1) * g
            v_new = self.beta2 * v + (1.0 - self.beta2) * g * g
            denom = ops.sqrt(v_new / bc2) + self.eps
            p32 = p32 - (lr / bc1) * m_new / denom
            news += (ops.assign(m, self._keep(apply, m_new, m)), ops.assign(v, self._keep(apply, v_new, v)),
                     ops.assign(p, self._keep(apply, ops.cast(p32, p.dtype), p)))
        return ops.depend(step, news)   # the step count, available once every assignment is done

    def update_fused(self, grads, lr, inv_tokens, factor, apply):
        """`fused` mode: construct(flatten(grads) * inv_tokens * factor, lr, apply) in one kernel (the same
        arithmetic, in the same order); grads one per parameter, the other arguments scalar Tensors."""
        step = self.global_step + 1
        ops.assign(self.global_step, ops.select(apply, step, self.global_step))
        stepf = ops.cast(step, ms.float32)
        bc1 = 1.0 - ops.pow(Tensor(self.beta1, ms.float32), stepf)
        bc2 = 1.0 - ops.pow(Tensor(self.beta2, ms.float32), stepf)
        scal = ops.stack([ops.reshape(ops.cast(x, ms.float32), ()) for x in (lr, bc1, bc2, inv_tokens, factor, apply)])
        # in place: the kernel writes the parameters and moments where they are (its inputs) and returns a token
        # (the gradients it reads were computed from the parameters: everything that reads them comes before it)
        done = self._fused_op(*grads, *self.params, self.exp_avg_flat, self.exp_avg_sq_flat, scal, self._hyper,
                              self._decays)
        return ops.depend(step, done)

    def _update_flat(self, g, lr, bc1, bc2, apply):
        """The loop of `construct` on concatenated vectors (elementwise: the same numbers)."""
        p0 = _flat(self.params)
        p32 = p0
        m, v = self.exp_avg_flat, self.exp_avg_sq_flat
        if self.weight_decay > 0.0 and any(self.decay_flags):
            coef = lr * self.weight_decay
            if self.decay_mask is not None:
                coef = coef * self.decay_mask
            p32 = p32 - coef * p32
        m_new = self.beta1 * m + (1.0 - self.beta1) * g
        v_new = self.beta2 * v + (1.0 - self.beta2) * g * g
        denom = ops.sqrt(v_new / bc2) + self.eps
        p32 = p32 - (lr / bc1) * m_new / denom
        if apply is not None:
            m_new = ops.select(apply, m_new, m)
            v_new = ops.select(apply, v_new, v)
            p32 = ops.select(apply, p32, p0)
        done = (ops.assign(self.exp_avg_flat, m_new), ops.assign(self.exp_avg_sq_flat, v_new))
        parts = ops.split(p32, self.sizes)
        for i in range(len(self.params)):
            p = self.params[i]
            done += (ops.assign(p, ops.reshape(parts[i], p.shape)),)
        return done

    def _moment_names(self):
        return [f"adam_m.{p.name}" for p in self.params], [f"adam_v.{p.name}" for p in self.params]

    def state_arrays(self) -> dict:
        """Optimizer state as name -> numpy (moments, step), for checkpoints."""
        if self.flat:
            out = {}
            for names, flat in zip(self._moment_names(), (self.exp_avg_flat, self.exp_avg_sq_flat)):
                parts = np.split(flat.asnumpy(), np.cumsum(self.sizes)[:-1])
                out.update({n: a.reshape(p.shape) for n, a, p in zip(names, parts, self.params)})
        else:
            out = {p.name: p.asnumpy() for p in list(self.exp_avg) + list(self.exp_avg_sq)}
        out["global_step"] = np.array(int(self.global_step.asnumpy()), np.int32)
        return out

    def state_shapes(self) -> dict:
        """name -> shape of `state_arrays`, without reading any data."""
        out = {}
        for names in self._moment_names():
            out.update({n: tuple(p.shape) for n, p in zip(names, self.params)})
        out["global_step"] = ()
        return out

    def load_state_arrays(self, arrays: dict, source: str = ""):
        from ..errors import CheckpointError

        def get(name, shape):
            if name not in arrays:
                raise CheckpointError(f"{source}: optimizer state '{name}' missing; cannot resume exactly")
            a = np.asarray(arrays[name])
            if tuple(a.shape) != tuple(shape):
                raise CheckpointError(f"{source}: optimizer state '{name}' has shape {a.shape}, "
                                      f"expected {tuple(shape)}")
            return a

        if self.flat:
            flats = [np.concatenate([get(n, p.shape).astype(np.float32).reshape(-1)
                                     for n, p in zip(names, self.params)]) for names in self._moment_names()]
            step = get("global_step", self.global_step.shape)
            self.exp_avg_flat.set_data(Tensor(flats[0]))
            self.exp_avg_sq_flat.set_data(Tensor(flats[1]))
            self.global_step.set_data(Tensor(step, self.global_step.dtype))
            return
        for p in list(self.exp_avg) + list(self.exp_avg_sq) + [self.global_step]:
            p.set_data(Tensor(get(p.name, p.shape), p.dtype))
