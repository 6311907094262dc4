"""The aten ops a piece of torch code dispatches, each with its FLOPs and bytes.

:func:`record` runs a function under a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
and returns one :class:`AtenOp` per aten op that reached the dispatcher (forward and, when the
function runs backward, the autograd engine's ops too). These are the "launches" the profile's
``compute.launch.overhead_s`` is charged per, and the unit the fitted curves price:

- FLOPs come from torch's own FLOP formulas (``torch.utils.flop_counter.flop_registry``, the
  table ``FlopCounterMode`` uses: ``2·m·n·k`` per matrix product). The CPU flash-attention
  kernels have no entry there, so they are counted here as two products per attended key,
  ``4·B·H·Tq·Tk·D`` halved for causal attention (the estimator's ``attended_keys`` rule), and
  twice that for their backward (the registry's rule for the other attention backwards).
- Bytes are the sizes of every tensor read or written: tensor arguments plus fresh outputs.
  Views and aliases (``view``, ``t``, ``slice``, ``_unsafe_view``, ``detach``, …) move no
  data, so they are zero-work ops that still cost a dispatch; ``empty*`` allocate without
  touching memory; row gathers (``embedding``, ``index_select``) read the indices and the rows
  they return, not the whole table. An in-place update (``add_``, ``lerp_``, …) reads its
  target and writes it back, so the target counts twice; ``copy_`` only writes its target.

Example::

    ops = record(lambda: F.linear(x, w))   # [t (view), view, mm, _unsafe_view]
    sum(o.flops for o in ops)              # 2·m·n·k
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
# No device work at all: the output shares the input's storage, or memory is only reserved.
NO_DATA = frozenset({aten._unsafe_view, aten.lift_fresh, aten.empty, aten.empty_like, aten.empty_strided,
                     aten.new_empty, aten.new_empty_strided, aten.alias, aten._reshape_alias})
# Row gathers read the rows they return, not the whole table: indices in, rows read and written.
GATHERS = frozenset({aten.embedding, aten.index_select})
CPU_FLASH = (aten._scaled_dot_product_flash_attention_for_cpu,)
CPU_FLASH_BWD = (aten._scaled_dot_product_flash_attention_for_cpu_backward,)


@dataclass(frozen=True)
class AtenOp:
    """One dispatched aten op."""

    name: str  # e.g. "aten.mm.default"
    flops: float  # floating-point operations
    bytes: float  # bytes read + written in device memory

    @property
    def kind(self) -> str:
        """The op without its overload, as the census names kinds: ``aten.mm``."""
        return ".".join(self.name.split(".")[:2])

    @property
    def work(self) -> bool:
        """Whether the op does any device work (views and allocations do not)."""
        return self.flops > 0 or self.bytes > 0


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _flash_flops(q: torch.Tensor, k: torch.Tensor, causal: bool) -> float:
    """Scores and weighted sum: ``2·2·B·H·Tq·Tk·D``; a causal square pass attends half the keys."""
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    keys = tq * (tq + 1) / 2 + tq * (tk - tq) if causal else tq * tk
    return 4.0 * b * h * keys * d


def _flops(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    packet = func._overloadpacket
    if packet in CPU_FLASH:
        causal = bool(args[4]) if len(args) > 4 else bool(kwargs.get("is_causal", False))
        return _flash_flops(args[0], args[1], causal)
    if packet in CPU_FLASH_BWD:
        # (grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, ...)
        causal = bool(args[7]) if len(args) > 7 else bool(kwargs.get("is_causal", False))
        return 2.0 * _flash_flops(args[1], args[2], causal)
    fn = flop_registry.get(packet)
    return float(fn(*args, **kwargs, out_val=out)) if fn is not None else 0.0


def _bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> float:
    if func.is_view or func._overloadpacket in NO_DATA:
        return 0.0
    inputs = _tensors((args, kwargs))
    if func._overloadpacket in GATHERS:
        rows = sum(_nbytes(t) for t in _tensors(out))
        return float(2 * rows + sum(_nbytes(t) for t in inputs if not t.is_floating_point()))
    seen = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    outs = _tensors(out)
    fresh = [t for t in outs if t.untyped_storage().data_ptr() not in seen]
    # An in-place update reads its target and writes it back; a copy only writes its target.
    rewritten = [] if func._overloadpacket is aten.copy_ else [
        t for t in outs if t.untyped_storage().data_ptr() in seen and t.numel()]
    return float(sum(_nbytes(t) for t in inputs + fresh + rewritten))


class OpRecorder(TorchDispatchMode):
    """Appends an :class:`AtenOp` to ``ops`` for every aten op dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[AtenOp] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append(AtenOp(str(func), _flops(func, args, kwargs, out), _bytes(func, args, kwargs, out)))
        return out


def record(fn: Callable[[], Any]) -> list[AtenOp]:
    """The aten ops one call of ``fn`` dispatches, in order."""
    with OpRecorder() as rec:
        fn()
    return rec.ops


def encode(ops: list[AtenOp]) -> str:
    """Compact text of (flops, bytes, kind) per op for a CSV cell: ``"f:b:kind;…"`` (views
    ``0:0:aten.view``)."""
    return ";".join(f"{o.flops:.6g}:{o.bytes:.6g}:{o.kind}" for o in ops)


def decode(text: str) -> tuple[list[float], list[float]]:
    """Inverse of :func:`encode`: (flops per op, bytes per op); rows written before kinds were
    recorded (``"f:b;…"``) read alike."""
    if not isinstance(text, str) or not text:
        return [], []
    parts = [p.split(":") for p in text.split(";")]
    return [float(p[0]) for p in parts], [float(p[1]) for p in parts]
