"""Plan search: the pruned plan space, annealing and exact search, baselines, ``python -m search``.

``search.run_search(experiment, profile, time_budget_s=…, max_evals=…, seed=…)`` is the Python
entry point (:mod:`search.run`); imported lazily so ``python -m search.baselines`` runs alone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_search", "SearchResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from search import run

        return getattr(run, name)
    raise AttributeError(f"module 'search' has no attribute {name!r}")
