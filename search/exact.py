"""Exact search: every joint plan of a small space, scored by the fast evaluator.

When the product of the calls' kept layouts (:mod:`search.space`) is at most
:data:`EXACT_MAX_PLANS`, enumerating it costs seconds, and the fastest plan that fits is then
provably the evaluator's optimum over the whole space: memory pruning only drops layouts that
cannot fit in any plan. Plans are enumerated in a fixed order (calls in topological order,
each call's layouts by mesh size, first device, shape) and scored in batches with
:meth:`Evaluator.evaluate_many`; ties keep the earlier plan.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from estimator.sim.evaluator import Evaluator
from search.space import Key, Space

EXACT_MAX_PLANS = 200_000  # ~10 s of batched evaluation on one core
BATCH = 4096

def exact_search(space: Space, evaluator: Evaluator, top_k: int,
                 progress: Callable[[int, float], None] | None = None) -> tuple[list[tuple[float, Key]], int]:
    """The ``top_k`` fastest distinct plans that fit, fastest first, and the plans evaluated."""
    per_call = [c.layouts() for c in space.calls]
    top: list[tuple[float, int, Key]] = []  # (period, enumeration index, plan)
    evaluated = 0
    product = itertools.product(*per_call)
    while True:
        batch = list(itertools.islice(product, BATCH))
        if not batch:
            break
        r = evaluator.evaluate_many([space.plan(key) for key in batch])
        ok = np.flatnonzero(r.feasible)
        best = ok[np.argsort(r.iteration_s[ok], kind="stable")][:top_k]
        top += [(float(r.iteration_s[i]), evaluated + int(i), batch[i]) for i in best]
        top = sorted(top)[:top_k]
        evaluated += len(batch)
        if progress is not None:
            progress(evaluated, top[0][0] if top else float("inf"))
    return [(p, key) for p, _, key in top], evaluated
