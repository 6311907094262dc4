"""The tiny world every test shares: a 2-layer model, small clusters, the example experiments,
and a helper that runs a function in N gloo processes."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from estimator.spec.cluster import Cluster
from estimator.spec.experiment import Experiment, load_experiment
from estimator.spec.models import PRESETS, ModelSpec
from estimator.spec.workflow import WorkflowParams

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def tiny_model() -> ModelSpec:
    return PRESETS["tiny-2l-128h"]


@pytest.fixture
def cluster4() -> Cluster:
    """One node of 4 devices."""
    return Cluster(1, 4, "cpu")


def tiny_experiment(algorithm: str = "ppo", nodes: int = 1, devices_per_node: int = 4,
                    batch_size: int = 8, minibatches: int = 2, group_size: int = 1) -> Experiment:
    from estimator.spec.workflow import ROLES, VALUE_ROLES

    model = PRESETS["tiny-2l-128h"]
    models = {r: (model.as_value_model() if r in VALUE_ROLES else model) for r in ROLES[algorithm]}
    params = WorkflowParams(batch_size, 16, 16, minibatches, group_size)
    return Experiment(algorithm, models, params, Cluster(nodes, devices_per_node, "cpu"))


@pytest.fixture
def ppo_tiny() -> Experiment:
    return load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - reported to the parent test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(world: int, fn: Callable, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; return results by rank.

    ``fn`` must be a module-level function (it is pickled into spawned processes). A failure
    on any rank fails the caller with that rank's traceback.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout_s)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
