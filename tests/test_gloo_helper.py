"""The gloo spawn helper itself: results come back by rank, failures surface."""

from __future__ import annotations

import pytest

from tests.conftest import run_gloo


def _allreduce(rank: int, world: int, base: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([base + rank], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def _fail_on_one(rank: int, world: int) -> int:
    if rank == 1:
        raise RuntimeError("planned failure")
    return rank


def test_run_gloo_returns_results_by_rank():
    assert run_gloo(2, _allreduce, 10.0) == [21.0, 21.0]


def test_run_gloo_reports_failing_rank():
    with pytest.raises(AssertionError, match="rank 1"):
        run_gloo(2, _fail_on_one)
