"""The aten ops a piece of torch code dispatches, each with its FLOPs and bytes: the one recorder
behind both the op census the estimator charges (:mod:`calibration.census`, factored into shape
symbols by :mod:`calibration.opcount`) and the kernel rows a profile is fitted on
(:mod:`calibration.timing`, :mod:`calibration.kernels`, :mod:`calibration.overheads`). Both sides
count work by the same functions, so a profile fitted on these rows prices the census without a
bias by construction.

:func:`record` runs a function under :class:`Recorder`, a
:class:`~torch.utils._python_dispatch.TorchDispatchMode`, and returns one :class:`AtenOp` per
op that reached the dispatcher (forward and, when the function runs backward, the autograd
engine's ops too) — the "launches" a profile charges its per-dispatch host cost for. An op's
FLOPs and bytes are kept as sums of terms, each term a product of the op's dimensions
(:attr:`AtenOp.flop_terms`, :attr:`AtenOp.byte_terms`), so the census can factor every term
into a monomial of shape symbols.

The convention, op class by op class:

- FLOPs: torch's own formulas (``torch.utils.flop_counter.flop_registry``, what
  ``FlopCounterMode`` counts: ``2·m·n·k`` per matrix product); other ops count none (they are
  priced by their bytes).
- Attention (the ``_scaled_dot_product_*`` kernels, CPU flash included, forward and backward):
  FLOPs per attended (query, key) pair and query head: ``2·(d_q + d_v)`` forward (scores and
  the weighted sum of V, Korthikanti et al. 2022), ``2·(3·d_q + 2·d_v)`` backward (the scores
  recomputed, the gradients of the scores, of V, of Q and of K: five products, ``2.5×`` the
  forward at ``d_q = d_v``). Without ``is_causal`` every pair is attended, ``Tq·Tk``, and the
  count is torch's (``sdpa_flop_count``, ``sdpa_backward_flop_count``) with grouped K/V heads
  widened to the query heads they serve. With ``is_causal`` torch's counter counts the full
  square; here the pairs are those the mask keeps — query ``i`` attends keys ``0..i`` (torch's
  top-left causal mask, ``ones(Tq, Tk).tril()``): ``Tq·(Tq+1)/2`` for ``Tq ≤ Tk``, the same
  count :func:`estimator.cost.ops.attended_keys` and the fused op set use. It is kept exact as a
  sum of terms (``B·H·d·Tq² + B·H·d·Tq`` per width ``d``), which the census writes as a sum of
  monomials. This is the attention's work, not the CPU kernel's arithmetic: torch's CPU flash
  kernel computes whole blocks of up to 512 keys and masks the excess, so at ``Tk ≤ 512`` it
  multiplies the full square. Kernel rows and census count alike, so a profile prices attention
  at the rate per attended pair its rows achieved (there about half the kernel's arithmetic
  rate). An explicit ``attn_mask`` is not causal: every pair is computed and counted.
- Bytes: each distinct tensor an op reads, once, and each it writes, once, at its element
  size. A fresh output is written; an output that shares an input's storage is not a new write.
- Views and aliases (``view``, ``t``, ``slice``, ``transpose``, ``detach``, ``alias``,
  ``_unsafe_view``, ``lift_fresh``, …) and allocations (``empty*``, ``new_empty*``) move no
  bytes; they are still dispatched, so they count as launches (ops with no work).
- In-place ops (a mutable ``Tensor(a!)`` argument: ``add_``, ``mul_``, ``lerp_``,
  ``masked_fill_``, …): the target is read and written back, two accesses. ``copy_``,
  ``fill_``, ``zero_`` and the random fills overwrite their target without reading it (one
  write; ``copy_`` reads its source); an ``out=`` tensor is written only.
- Gathers (``embedding``, ``index_select``, ``gather``, ``index``): the indices are read, and
  the rows (elements) gathered are read from the table and written to the output — never the
  whole table.
- ``embedding_dense_backward`` (CPU: ``grad_weight = zeros(V, D)``, then
  ``grad_weight[idx[i]] += grad[i]`` per index): the whole table gradient written once (the
  zero fill), the indices and the output gradient read, and one table row read and written
  back per index.
- Collectives (``c10d`` namespaces) are not recorded: the links charge them.

Example::

    ops = record(lambda: F.linear(x, w))   # [t (view), view, mm, _unsafe_view]
    sum(o.flops for o in ops)              # 2·m·n·k
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
# No bytes moved: the output shares the input's storage (ops torch does not mark as views), or
# memory is only reserved.
NO_DATA = frozenset({aten._unsafe_view, aten.lift_fresh, aten.alias, aten._reshape_alias, aten.empty,
                     aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided})
# In-place ops that overwrite their target without reading it.
OVERWRITES = frozenset({aten.copy_, aten.fill_, aten.zero_, aten.normal_, aten.uniform_, aten.random_,
                        aten.exponential_, aten.bernoulli_})
# Gathers: op → the argument holding the table the indices select from.
GATHERS = {aten.embedding: "weight", aten.index_select: "self", aten.gather: "self", aten.index: "self"}
# Scaled-dot-product attention kernels: op → backward?
ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: False,
             aten._scaled_dot_product_flash_attention: False,
             aten._scaled_dot_product_efficient_attention: False,
             aten._scaled_dot_product_cudnn_attention: False,
             aten._scaled_dot_product_flash_attention_for_cpu_backward: True,
             aten._scaled_dot_product_flash_attention_backward: True,
             aten._scaled_dot_product_efficient_attention_backward: True,
             aten._scaled_dot_product_cudnn_attention_backward: True}


@dataclass(frozen=True)
class AtenOp:
    """One dispatched aten op: its FLOPs and bytes as sums of terms, each a product of the op's
    dimensions (a term per tensor access for bytes)."""

    name: str  # e.g. "aten.mm.default"
    flop_terms: tuple[int, ...] = ()  # floating-point operations, summed
    byte_terms: tuple[int, ...] = ()  # bytes of each tensor read or written in device memory

    def __post_init__(self) -> None:
        bad = [t for t in self.byte_terms if t < 0]
        if not self.name or bad or self.flops < 0:
            raise ValueError(f"aten op {self.name!r}: needs a name, bytes terms ≥ 0 (got {list(self.byte_terms)}) "
                             f"and FLOPs ≥ 0 (got {list(self.flop_terms)})")

    @property
    def flops(self) -> float:
        return float(sum(self.flop_terms))

    @property
    def bytes(self) -> float:
        return float(sum(self.byte_terms))

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


def _arguments(func: Any, args: tuple, kwargs: dict) -> Iterator[tuple[Any, Any]]:
    """(schema argument, value) of every argument of the call, defaults filled in."""
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            yield a, args[i]
        elif a.name in kwargs:
            yield a, kwargs[a.name]
        elif a.has_default_value():
            yield a, a.default_value


def _argument(func: Any, args: tuple, kwargs: dict, name: str) -> Any:
    for a, value in _arguments(func, args, kwargs):
        if a.name == name:
            return value
    raise ValueError(f"{func}: no argument {name!r} in its schema {func._schema}")


def _distinct(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors with data, each piece of memory once (the same tensor passed twice is read once)."""
    seen, out = set(), []
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.numel() and key not in seen:
            seen.add(key)
            out.append(t)
    return out


# ---- FLOPs ------------------------------------------------------------------------------------


def attended_pair_terms(tq: int, tk: int, causal: bool) -> tuple[tuple[int, int, int], ...]:
    """Twice the (query, key) pairs one head attends, as terms ``(c, x, y)`` summing ``c·x·y``.

    Not causal: ``2·Tq·Tk``. Causal (query ``i`` sees keys ``0..i``): ``Tq² + Tq`` for
    ``Tq ≤ Tk``; otherwise the first ``Tk`` queries see ``Tk(Tk+1)/2`` and the rest ``Tk`` each,
    ``2·Tq·Tk − Tk² + Tk``."""
    if not causal:
        return ((2, tq, tk),)
    if tq <= tk:
        return ((1, tq, tq), (1, tq, 1))
    return ((2, tq, tk), (-1, tk, tk), (1, tk, 1))


def attention_flop_terms(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...], causal: bool,
                         backward: bool) -> tuple[int, ...]:
    """FLOPs of scaled-dot-product attention on q (B, H, Tq, Dq), k (B, Hk, Tk, Dq),
    v (B, Hk, Tk, Dv); grouped K/V heads (``Hk`` dividing ``H``) serve ``H / Hk`` query heads each.

    Non-causal: torch's formulas (``sdpa_flop_count``, ``sdpa_backward_flop_count``), K and V
    widened to the query heads. Causal: torch counts the full square, which a causal kernel
    does not need; here ``2·(d_q + d_v)`` per attended pair forward and ``2·(3·d_q + 2·d_v)``
    backward (the same five products as torch's backward formula), over the pairs of
    :func:`attended_pair_terms`, one term per width and pair term."""
    if not (len(q) == len(k) == len(v) == 4) or k[1] <= 0 or q[1] % k[1] or v[1] != k[1] or k[2] != v[2]:
        raise ValueError(f"attention shapes q={tuple(q)}, k={tuple(k)}, v={tuple(v)}: need (B, heads, T, D) each, "
                         "K and V with the same heads and length, their heads dividing the query heads")
    b, h, tq, dq = q
    tk, dv = k[2], v[3]
    if not causal:
        kw, vw = (b, h, tk, k[3]), (b, h, tk, dv)
        fn = sdpa_backward_flop_count if backward else sdpa_flop_count
        args = ((b, h, tq, dv), (b, h, tq, dq), kw, vw) if backward else ((b, h, tq, dq), kw, vw)
        return (int(fn(*args)),)
    widths = ((dq, 3), (dv, 2)) if backward else ((dq, 1), (dv, 1))
    return tuple(m * c * b * h * d * x * y for d, m in widths for c, x, y in attended_pair_terms(tq, tk, True))


def _attention_flops(func: Any, args: tuple, kwargs: dict) -> tuple[int, ...]:
    q, k, v = (_argument(func, args, kwargs, n) for n in ("query", "key", "value"))
    causal = bool(_argument(func, args, kwargs, "is_causal"))
    return attention_flop_terms(tuple(q.shape), tuple(k.shape), tuple(v.shape), causal,
                                ATTENTION[func._overloadpacket])


def flop_terms(func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[int, ...]:
    """FLOPs of one dispatched op, as a sum of terms (empty: none)."""
    packet = func._overloadpacket
    if packet in ATTENTION:
        terms = _attention_flops(func, args, kwargs)
    elif packet in flop_registry:
        terms = (int(flop_registry[packet](*args, **kwargs, out_val=out)),)
    else:
        terms = ()
    return tuple(t for t in terms if t)


# ---- bytes ------------------------------------------------------------------------------------


def _gather_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[int, ...]:
    """Indices read; the rows gathered read from the table and written to the output."""
    table = GATHERS[func._overloadpacket]
    indices = [t for a, v in _arguments(func, args, kwargs) if a.name != table for t in _tensors(v)]
    rows = [_nbytes(t) for t in _distinct(_tensors(out))]
    return tuple(_nbytes(t) for t in _distinct(indices)) + tuple(rows) + tuple(rows)


def _embedding_backward_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[int, ...]:
    """``grad_weight = zeros(V, D)`` written once; the indices and the output gradient read; per
    index one table row read and written back (``grad_weight[idx[i]] += grad[i]``)."""
    grad, indices = (_argument(func, args, kwargs, n) for n in ("grad_output", "indices"))
    row = grad.numel() * out.element_size()
    return _nbytes(out), _nbytes(indices), _nbytes(grad), row, row


BYTE_RULES: dict[Any, Callable[[Any, tuple, dict, Any], tuple[int, ...]]] = {
    **{p: _gather_bytes for p in GATHERS}, aten.embedding_dense_backward: _embedding_backward_bytes}


def byte_terms(func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[int, ...]:
    """Bytes of one dispatched op: a term per distinct tensor read and per tensor written."""
    packet = func._overloadpacket
    if func.is_view or packet in NO_DATA:
        return ()
    if packet in BYTE_RULES:
        return tuple(t for t in BYTE_RULES[packet](func, args, kwargs, out) if t)
    read, written = [], []
    for a, value in _arguments(func, args, kwargs):
        tensors = _tensors(value)
        mutated = a.alias_info is not None and a.alias_info.is_write
        if mutated:
            written += tensors
        if not mutated or not (a.is_out or packet in OVERWRITES):
            read += tensors
    storages = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
    written += [t for t in _tensors(out) if t.untyped_storage().data_ptr() not in storages]
    return tuple(_nbytes(t) for t in _distinct(read) + _distinct(written))


# ---- recording --------------------------------------------------------------------------------


class Recorder(TorchDispatchMode):
    """Appends an :class:`AtenOp` to ``ops`` for every op dispatched inside it (collectives aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[AtenOp] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace not in COLLECTIVE_NAMESPACES:
            self.ops.append(AtenOp(str(func), flop_terms(func, args, kwargs, out),
                                   byte_terms(func, args, kwargs, out)))
        return out


def record(fn: Callable[[], Any]) -> list[AtenOp]:
    """The aten ops one call of ``fn`` dispatches, in order."""
    with Recorder() as rec:
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
