"""The aten ops a piece of executor code dispatches, as functions of shape symbols.

A piece is recorded by :func:`calibration.aten.record` — the recorder the kernel benchmarks
use too, so the census and the rows a profile is fitted on count FLOPs and bytes by one
convention (its module docstring states it: views and allocations move no bytes, in-place
targets are read and written, gathers read the rows they return, causal attention counts the
pairs its mask keeps, …). Every dimension of the piece is a product of shape symbols whose
values are distinct primes of at least 11 (:data:`calibration.census.PRIMES_A`), so each term
of an op's FLOPs or bytes factors uniquely into a constant times a monomial of the symbols
(:func:`monomial`): an output of ``19·29·37`` elements is ``rows·tokens·hidden``. An op's
FLOPs are the sum of its terms' monomials (causal attention's ``B·H·d·T² + B·H·d·T``: two),
and so are its bytes (one term per tensor access). Ops with the same name and the same
symbolic work are merged; a count that differs between two recordings at different primes is
factored alike (``tp`` ``empty_like`` buffers of an all-gather), one that does not is a
constant. :func:`check_against` then requires the symbolic record to predict a recording at
other primes exactly, so a coincidence (eleven identical ops read as ``rows``) cannot pass.

Census entries: ``{"op", "count", "flops", "bytes"}``; ``count`` a monomial ``[c, {symbol:
exponent}]``, ``flops`` one monomial or a list of them (summed; :mod:`estimator.cost.census` reads
both), ``bytes`` a list of monomials (summed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from calibration.aten import AtenOp
from calibration.aten import record as record_ops

Mono = tuple[int, tuple[tuple[str, int], ...]]  # (constant, ((symbol, exponent), ...)) sorted
Terms = tuple[tuple[tuple[tuple[str, int], ...], int], ...]  # ((exponents, constant), ...) sorted


def monomial(n: int, primes: dict[int, str]) -> Mono:
    """``n`` as constant × Π symbol^exponent; raises if a factor of ≥ 11 is no symbol's prime."""
    if n == 0:
        return (0, ())
    sign, n = (-1 if n < 0 else 1), abs(n)
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
    return (sign * n, tuple(sorted(exps.items())))


def factor(terms: tuple[int, ...], primes: dict[int, str]) -> Terms:
    """A sum of terms as a sum of monomials, equal monomials merged. Equal terms are first
    multiplied up, so ``tp`` equal buffers read as ``tp``, not as a constant."""
    out: dict[tuple[tuple[str, int], ...], int] = {}
    for term, k in Counter(terms).items():
        c, exps = monomial(k * term, primes)
        out[exps] = out.get(exps, 0) + c
    return tuple(sorted((e, c) for e, c in out.items() if c))


def _merge(ops: list[AtenOp], values: dict[str, int]) -> Counter:
    """Ops with the same name and symbolic work, counted."""
    primes = {v: k for k, v in values.items()}
    return Counter((o.kind, factor(o.flop_terms, primes), factor(o.byte_terms, primes)) for o in ops)


def encode(mono: Mono) -> list:
    return [mono[0], dict(mono[1])]


def _flops_entry(flops: Terms) -> list:
    """One monomial, or a list of them where the FLOPs are a sum."""
    monos = [encode((c, e)) for e, c in flops]
    return monos[0] if len(monos) == 1 else (monos or [0, {}])


def symbolic(ops: list[AtenOp], values: dict[str, int], other_ops: list[AtenOp], other: dict[str, int]) -> list[dict]:
    """Census entries (op, count, flops and bytes as monomials) from recordings of one piece at
    two prime assignments: a count the same in both is a constant (seven views), one that
    changes is a monomial of the symbols (``tp`` buffers)."""
    primes = {v: k for k, v in values.items()}
    merged, again = _merge(ops, values), _merge(other_ops, other)
    out = []
    for (name, flops, nbytes), count in merged.items():
        same = again.get((name, flops, nbytes)) == count
        out.append({"op": name, "count": encode((count, ()) if same else monomial(count, primes)),
                    "flops": _flops_entry(flops), "bytes": [encode((c, e)) for e, c in nbytes]})
    return sorted(out, key=lambda e: (e["op"], str(e)))


def evaluate(mono: list, values: dict[str, float]) -> float:
    c, exps = mono
    out = float(c)
    for sym, e in exps.items():
        out *= values[sym] ** e
    return out


def flop_monomials(node: list) -> list:
    """An entry's FLOPs as a list of monomials (one monomial or a list of them)."""
    return node if node and isinstance(node[0], list) else [node]


def totals(entries: list[dict], values: dict[str, float]) -> tuple[float, float, float]:
    """(ops dispatched, FLOPs, bytes) of a census piece at ``values``."""
    n = f = b = 0.0
    for e in entries:
        k = evaluate(e["count"], values)
        n += k
        f += k * sum(evaluate(t, values) for t in flop_monomials(e["flops"]))
        b += k * sum(evaluate(t, values) for t in e["bytes"])
    return n, f, b


def record(run: Callable[[dict[str, int]], Callable[[], None]], values: dict[str, int]) -> list[AtenOp]:
    """Ops of one piece: ``run(values)`` prepares inputs and returns the thunk to record."""
    return record_ops(run(values))


def check_against(entries: list[dict], ops: list[AtenOp], values: dict[str, int], piece: str) -> None:
    """The symbolic record must predict a recording at other primes exactly."""
    want = (float(len(ops)), sum(o.flops for o in ops), sum(o.bytes for o in ops))
    got = totals(entries, values)
    if any(abs(g - w) > 1e-9 * max(1.0, w) for g, w in zip(got, want)):
        raise ValueError(f"census piece {piece!r}: the symbolic record predicts (ops, flops, bytes) "
                         f"{got} at {values}, but the executor did {want}")
