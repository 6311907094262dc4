"""Offload of a trained role's home state to host memory (``Layout.offload`` of its train call):
what one device moves, when, and how.

- ``optimizer``: the optimizer's own tensors — the float32 master weights where they are a copy
  (a 16-bit model; :class:`executor.optim.ShardAdam`, the chunk of :class:`executor.zero.ZeroAdam`)
  and Adam's two moments — live in a host buffer except during the role's train call;
- ``all``: the role's home parameters too (its shards, or under ``shard="full"`` its chunks),
  except during the role's train call and the role's other calls that read them (at home, or on
  the home's devices while they send a reallocation).

A tensor moved out keeps its identity (the optimizer's lists, the parameter dicts and the
engine address it by object): its data is copied to a host tensor and the device tensor is
given an empty storage (``Tensor.data``), so the device copy is freed; moved back, it gets a
copy of the host tensor on its device again. On a GPU that is ``.to("cpu")`` and back over the
host link; on the CPU executor host memory is the device's own, so both are copies in host
memory (``.to(copy=True)``), which is what the estimator prices for a CPU profile
(:mod:`estimator.cost.offload`). The weights uploaded for a call other than the train call are
not copied back after it: the host copy is still current, so they are only freed. Gradients are
never moved: every optimizer step ends with ``zero_grad`` (``grad = None``), so between train
calls there are none. Values are copied exactly, so a plan computes the same update with or
without offload.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def optimizer_tensors(optimizer: object) -> list[Tensor]:
    """The optimizer state of :class:`~executor.optim.ShardAdam` or
    :class:`~executor.zero.ZeroAdam` that exists now: master weights where they are a copy of the
    parameters, and the Adam moments once a step has made them (``torch.optim.Adam``'s ``step``
    counters stay where they are)."""
    adam = getattr(optimizer, "adam", None)
    if hasattr(optimizer, "chunk"):  # ZeroAdam: its master chunk, stepped by a ShardAdam
        return [optimizer.chunk, *optimizer_tensors(adam)]
    out = [m for m, p in zip(optimizer.master, optimizer.params) if m is not p]
    if adam is not None:  # torch.optim.Adam (GPU): its per-parameter state dicts
        out += [v for state in adam.state.values() for k, v in state.items()
                if k != "step" and isinstance(v, Tensor)]
    out += [t for pair in optimizer.state if pair is not None for t in pair]
    return out


class Offloader:
    """One device's host buffer for one role's home state (see the module docstring)."""

    def __init__(self, setting: str, params: dict[str, Tensor], optimizer: object):
        self.setting = setting
        self.params = list(params.values())
        self.optimizer = optimizer
        self.host: dict[int, tuple[Tensor, torch.device]] = {}  # id → (host copy, the device it came from)
        self.away: set[int] = set()  # ids of tensors whose device copy is freed

    def _state(self) -> list[Tensor]:
        return optimizer_tensors(self.optimizer) if self.optimizer is not None else []

    def weights(self) -> list[Tensor]:
        """The parameters this device keeps on the host between calls (under ``all``)."""
        return self.params if self.setting == "all" else []

    def state(self) -> list[Tensor]:
        """What leaves the device after each train call: the optimizer state, and the parameters
        under ``all`` (a tensor that is both, full-precision master weights, once)."""
        seen, out = set(), []
        for t in self._state() + self.weights():
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def download(self, tensors: Iterable[Tensor]) -> int:
        """Copy each tensor's data to a host tensor and free its device copy; returns bytes moved."""
        moved = 0
        with torch.no_grad():
            for t in tensors:
                if id(t) in self.away:
                    continue
                self.host[id(t)] = (t.detach().to("cpu", copy=True), t.device)
                moved += t.numel() * t.element_size()
                self.drop([t])
        return moved

    def drop(self, tensors: Iterable[Tensor]) -> None:
        """Free the device copies of tensors whose host copy is current (no copy back)."""
        for t in tensors:
            if id(t) not in self.host:
                raise RuntimeError("offload: a tensor without a host copy cannot be dropped")
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            self.away.add(id(t))

    def upload(self, tensors: Iterable[Tensor]) -> int:
        """Give each freed tensor a device copy of its host data again (the host copy stays,
        current until the tensor changes); returns bytes moved."""
        moved = 0
        with torch.no_grad():
            for t in tensors:
                if id(t) not in self.away:
                    continue
                copy, device = self.host[id(t)]
                t.data = copy.to(device, copy=True)
                self.away.discard(id(t))
                moved += t.numel() * t.element_size()
        return moved

    def resident(self, t: Tensor) -> bool:
        return id(t) not in self.away
