"""Adam on a device's home shards, with float32 master weights for low-precision models.

Adam is elementwise, so running it on each device's shards computes exactly the update of the
unsharded model: the optimizer state simply lives where the shards live (the model's home
layout). For 16-bit parameters the state and a float32 copy of the weights (the master
weights) are kept, as in mixed-precision training (Micikevicius et al. 2018): gradients are
cast up, Adam updates the master copy, and the result is rounded into the model's weights —
16 bytes per parameter, the figure the estimator's memory model charges.
"""

from __future__ import annotations

import torch
from torch import Tensor

FULL_PRECISION = (torch.float32, torch.float64)
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults


class ShardAdam:
    """``torch.optim.Adam`` over ``params`` (a device's shards), master weights if 16-bit.

    On GPUs it is ``torch.optim.Adam`` itself (its multi-tensor step, the kernels the cost
    model charges). On CPU, where ``torch.optim.Adam`` runs its single-tensor step
    (torch/optim/adam.py ``_single_tensor_adam``), that step is run here op for op, so results
    are bitwise the same: constructing a ``torch.optim`` optimizer imports ``torch._dynamo``
    (its ``__init__`` is wrapped in ``torch._disable_dynamo``), seconds of every CPU worker's
    start-up before its first call.
    """

    sharded = False  # steps whole parameters (executor.zero.ZeroAdam steps a chunk)

    def __init__(self, params: dict[str, Tensor], lr: float):
        self.params = list(params.values())
        self.lr = lr
        self.mixed = any(p.dtype not in FULL_PRECISION for p in self.params)
        self.master = [p.detach().float().clone() for p in self.params] if self.mixed else self.params
        on_cpu = all(m.device.type == "cpu" for m in self.master)
        self.adam = None if on_cpu else torch.optim.Adam(self.master, lr=lr, betas=BETAS, eps=EPS)
        # per-parameter state, made at its first step with a gradient (as torch.optim does)
        self.state: list[tuple[Tensor, Tensor] | None] = [None] * len(self.master)
        self.steps = [0] * len(self.master)

    def step(self) -> None:
        if self.mixed:
            for p, m in zip(self.params, self.master):
                m.grad = None if p.grad is None else p.grad.float()
        if self.adam is not None:
            self.adam.step()
        else:
            self._cpu_step()
        if self.mixed:
            with torch.no_grad():
                for p, m in zip(self.params, self.master):
                    p.copy_(m)

    def _cpu_step(self) -> None:
        beta1, beta2 = BETAS
        with torch.no_grad():
            for i, param in enumerate(self.master):
                grad = param.grad
                if grad is None:
                    continue
                if self.state[i] is None:
                    self.state[i] = (torch.zeros_like(param, memory_format=torch.preserve_format),
                                     torch.zeros_like(param, memory_format=torch.preserve_format))
                exp_avg, exp_avg_sq = self.state[i]
                self.steps[i] += 1
                step = float(self.steps[i])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = self.lr / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(EPS)
                param.addcdiv_(exp_avg, denom, value=-step_size)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.mixed:
            for m in self.master:
                m.grad = None
