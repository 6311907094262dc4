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


class ShardAdam:
    """``torch.optim.Adam`` over ``params`` (a device's shards), master weights if 16-bit."""

    def __init__(self, params: dict[str, Tensor], lr: float):
        self.params = list(params.values())
        self.mixed = any(p.dtype not in FULL_PRECISION for p in self.params)
        self.master = [p.detach().float().clone() for p in self.params] if self.mixed else self.params
        # multi-tensor (foreach) kernels on every device: one dispatch per Adam op for all
        # tensors, as torch picks by default on CUDA, instead of one per tensor on CPU
        self.adam = torch.optim.Adam(self.master, lr=lr, foreach=True)

    def step(self) -> None:
        if self.mixed:
            for p, m in zip(self.params, self.master):
                m.grad = None if p.grad is None else p.grad.float()
        self.adam.step()
        if self.mixed:
            with torch.no_grad():
                for p, m in zip(self.params, self.master):
                    p.copy_(m)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.mixed:
            for m in self.master:
                m.grad = None
