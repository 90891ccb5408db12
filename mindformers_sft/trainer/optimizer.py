"""AdamW with decoupled weight decay and bias correction (the update of torch.optim.AdamW and of
MindFormers' AdamW), from basic ops so it runs on CPU (MindSpore 2.10 CPU has no mint.optim.AdamW kernel)
and in graph mode.

Weight decay applies to matrices only: norms, biases (and anything 1-D) are exempt, as in MindFormers.
The learning rate is passed in on every step (the schedule lives on the host), so the optimizer holds
only its moments and step count, all of which are saved for exact resume.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops


def decays(param) -> bool:
    name = param.name
    return len(param.shape) > 1 and "norm" not in name and not name.endswith(".bias")


class AdamW(nn.Cell):
    """update(grads, lr): p <- p - lr*wd*p; m,v moments; p <- p - lr * m_hat / (sqrt(v_hat) + eps)."""

    def __init__(self, params, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        super().__init__(auto_prefix=False)
        self.params = ms.ParameterTuple(params)
        self.exp_avg = self.params.clone(prefix="adam_m", init="zeros")
        self.exp_avg_sq = self.params.clone(prefix="adam_v", init="zeros")
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.decay_flags = tuple(decays(p) for p in self.params)
        self.weight_decay = float(weight_decay)
        self.global_step = Parameter(Tensor(0, ms.int32), name="global_step", requires_grad=False)

    def construct(self, grads, lr):
        step = self.global_step + 1
        ops.assign(self.global_step, step)
        stepf = ops.cast(step, ms.float32)
        bc1 = 1.0 - ops.pow(Tensor(self.beta1, ms.float32), stepf)
        bc2 = 1.0 - ops.pow(Tensor(self.beta2, ms.float32), stepf)
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
            ops.assign(m, m_new)
            ops.assign(v, v_new)
            ops.assign(p, ops.cast(p32, p.dtype))
        return step

    def state_arrays(self) -> dict:
        """Optimizer state as name -> numpy (moments, step), for checkpoints."""
        out = {p.name: p.asnumpy() for p in list(self.exp_avg) + list(self.exp_avg_sq)}
        out["global_step"] = np.array(int(self.global_step.asnumpy()), np.int32)
        return out

    def load_state_arrays(self, arrays: dict, source: str = ""):
        from ..errors import CheckpointError
        for p in list(self.exp_avg) + list(self.exp_avg_sq) + [self.global_step]:
            if p.name not in arrays:
                raise CheckpointError(f"{source}: optimizer state '{p.name}' missing; cannot resume exactly")
            a = np.asarray(arrays[p.name])
            if tuple(a.shape) != tuple(p.shape):
                raise CheckpointError(f"{source}: optimizer state '{p.name}' has shape {a.shape}, "
                                      f"expected {tuple(p.shape)}")
            p.set_data(Tensor(a, p.dtype))
