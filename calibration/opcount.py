"""Recording the aten ops a piece of executor code dispatches, as functions of shape symbols.

A piece runs under :class:`OpRecorder`, a ``TorchDispatchMode`` that sees every aten op below
autograd: its name, the tensors it reads and writes, and — from the formulas of
``torch.utils.flop_counter`` — its FLOPs. Every dimension of the piece is a product of shape
symbols whose values are distinct primes of at least 11 (:data:`SYMBOL_PRIMES`), so each
observed count factors uniquely into a constant times a monomial of the symbols
(:func:`monomial`): an output of ``19·29·37`` elements is ``rows·tokens·hidden``. Ops with the
same name and the same symbolic work are merged; a count that differs between two recordings at different
primes is factored alike (``tp`` ``empty_like`` buffers of an all-gather), one that does not
is a constant. :func:`check_against` then re-runs the
piece with other primes and requires the symbolic record to predict those counts exactly, so
a coincidence (eleven identical ops read as ``rows``) cannot pass.

Bytes are each distinct tensor an op reads or writes, once (an in-place op's destination is
both), at its element size. Views, ``_unsafe_view`` and allocations move no bytes; they are still dispatched,
so they count as launches (the host cost of dispatch). Collectives (``c10d``) are charged by
the links, not here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

Mono = tuple[int, tuple[tuple[str, int], ...]]  # (constant, ((symbol, exponent), ...)) sorted
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
ALLOCATIONS = ("empty", "empty_like", "new_empty", "empty_strided", "_unsafe_view")  # no bytes moved
aten = torch.ops.aten


def _cpu_sdpa_flops(func, args, out) -> int | None:
    """torch's counter has no formula for the CPU flash kernels; use its generic SDPA ones
    with K/V widened to the query heads (grouped heads are read once per query head)."""
    if func is aten._scaled_dot_product_flash_attention_for_cpu.default:
        q, k = args[0], args[1]
        kv = (k.shape[0], q.shape[1], k.shape[2], k.shape[3])
        return sdpa_flop_count(tuple(q.shape), kv, kv)
    if func is aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
        grad, q, k = args[0], args[1], args[2]
        kv = (k.shape[0], q.shape[1], k.shape[2], k.shape[3])
        return sdpa_backward_flop_count(tuple(grad.shape), tuple(q.shape), kv, kv)
    return None


def op_flops(func, args, kwargs, out) -> int:
    cpu = _cpu_sdpa_flops(func, args, out)
    if cpu is not None:
        return int(cpu)
    formula = flop_registry.get(func._overloadpacket)
    return int(formula(*args, **kwargs, out_val=out)) if formula else 0


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


@dataclass
class OpRecorder(TorchDispatchMode):
    """Every aten op dispatched inside the ``with`` block: (name, flops, [(numel, itemsize)])."""

    ops: list[tuple[str, int, tuple[tuple[int, int], ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in COLLECTIVE_NAMESPACES:
            return out
        name = f"{func.namespace}.{func._overloadpacket.__name__}"
        moved: tuple[tuple[int, int], ...] = ()
        if not func.is_view and func._overloadpacket.__name__ not in ALLOCATIONS:
            seen, touched = set(), []
            for t in _tensors(args) + _tensors(kwargs) + _tensors(out):
                # the same memory once, whether an in-place destination or an alias of an input
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
                if key not in seen:
                    seen.add(key)
                    touched.append((t.numel(), t.element_size()))
            moved = tuple(touched)
        self.ops.append((name, op_flops(func, args, kwargs, out), moved))
        return out


def monomial(n: int, primes: dict[int, str]) -> Mono:
    """``n`` as constant × Π symbol^exponent; raises if a factor of ≥ 11 is no symbol's prime."""
    if n == 0:
        return (0, ())
    exps: dict[str, int] = {}
    for p, sym in primes.items():
        while n % p == 0:
            n //= p
            exps[sym] = exps.get(sym, 0) + 1
    rest = n
    for q in (2, 3, 5, 7):  # constants are products of small primes
        while rest % q == 0:
            rest //= q
    if rest != 1:
        raise ValueError(f"factor {rest} of an observed count belongs to no shape symbol")
    return (n, tuple(sorted(exps.items())))


def _add(terms: dict, mono: Mono) -> None:
    c, key = mono
    terms[key] = terms.get(key, 0) + c


def _merge(ops: list, values: dict[str, int]) -> Counter:
    """Ops with the same name and symbolic work, counted."""
    primes = {v: k for k, v in values.items()}
    merged: Counter = Counter()
    for name, flops, moved in ops:
        terms: dict = {}
        # equal tensors first multiplied up, so tp equal buffers read as tp, not a constant
        for (numel, size), k in Counter(moved).items():
            _add(terms, monomial(k * numel * size, primes))
        merged[(name, monomial(flops, primes), tuple(sorted((k, c) for k, c in terms.items() if c)))] += 1
    return merged


def symbolic(ops: list, values: dict[str, int], other_ops: list, other: dict[str, int]) -> list[dict]:
    """Census entries (op, count, flops and bytes as monomials) from recordings of one piece at
    two prime assignments: a count the same in both is a constant (seven views), one that
    changes is a monomial of the symbols (``tp`` buffers)."""
    primes = {v: k for k, v in values.items()}
    merged, again = _merge(ops, values), _merge(other_ops, other)
    out = []
    for (name, flops, nbytes), count in merged.items():
        same = again.get((name, flops, nbytes)) == count
        out.append({"op": name, "count": encode((count, ()) if same else monomial(count, primes)),
                    "flops": encode(flops), "bytes": [encode((c, k)) for k, c in nbytes]})
    return sorted(out, key=lambda e: (e["op"], str(e)))


def encode(mono: Mono) -> list:
    return [mono[0], dict(mono[1])]


def evaluate(mono: list, values: dict[str, float]) -> float:
    c, exps = mono
    out = float(c)
    for sym, e in exps.items():
        out *= values[sym] ** e
    return out


def totals(entries: list[dict], values: dict[str, float]) -> tuple[float, float, float]:
    """(ops dispatched, FLOPs, bytes) of a census piece at ``values``."""
    n = f = b = 0.0
    for e in entries:
        k = evaluate(e["count"], values)
        n += k
        f += k * evaluate(e["flops"], values)
        b += k * sum(evaluate(t, values) for t in e["bytes"])
    return n, f, b


def record(run: Callable[[dict[str, int]], Callable[[], None]], values: dict[str, int]) -> list:
    """Ops of one piece: ``run(values)`` prepares inputs and returns the thunk to record."""
    thunk = run(values)
    rec = OpRecorder()
    with rec:
        thunk()
    return rec.ops


def check_against(entries: list[dict], ops: list, values: dict[str, int], piece: str) -> None:
    """The symbolic record must predict a recording at other primes exactly."""
    want = (float(len(ops)), float(sum(f for _, f, _ in ops)),
            float(sum(n * s for _, _, moved in ops for n, s in moved)))
    got = totals(entries, values)
    if any(abs(g - w) > 1e-9 * max(1.0, w) for g, w in zip(got, want)):
        raise ValueError(f"census piece {piece!r}: the symbolic record predicts (ops, flops, bytes) "
                         f"{got} at {values}, but the executor did {want}")
