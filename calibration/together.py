"""Kernel timings taken the way the CPU executor runs: every simulated device busy at once.

The CPU executor runs one single-threaded process per device, and in a plan that spans
several devices they all compute at the same time. On a small host those processes share
more than cores — memory bandwidth, caches, and on a virtual machine the physical cores
behind its vCPUs — so one process's ops take longer when its siblings are busy (measured
here: a 128×128×512 product 40 % longer, a 1 MB add 20 % longer, the dispatch of a tiny op
75 % longer with two processes than with one). A profile for such plans has to be measured
under that load.

:func:`measure_together` starts ``world`` processes that time the same kernel grid
(:func:`calibration.kernels.measure`) and the runtime's fixed costs
(:func:`calibration.overheads.measure_overheads`) case by case in step — a barrier after each
case, so every process starts the next case with the others — and returns rank 0's rows.
"""

from __future__ import annotations

import os
import queue as queue_mod
import tempfile
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
import torch.multiprocessing as mp

WAIT_S = 600.0  # a case longer than this means a sibling died or hung


def _worker(rank: int, world: int, cases: list, level: str, dtype: str, barrier: Any, out: Any,
            parent: int, rows_path: str) -> None:
    from calibration import kernels, overheads

    torch.set_num_threads(1)  # one core per simulated device, as the executor runs

    def step(n: int = 1) -> None:
        if os.getppid() != parent:  # the calibration was killed: stop, leave nothing behind
            os._exit(1)
        barrier.wait(WAIT_S)  # the next case starts on every process together
        if rank == 0:
            out.put(("tick", n))

    raw_k = kernels.measure(cases, "cpu", dtype, level, progress=step)
    raw_o = overheads.measure_overheads("cpu", dtype, progress=step)
    if rank == 0:
        # the rows go through a file and only a short message through the queue, so no process
        # ever blocks at exit on a pipe nobody reads
        pd.concat([raw_k, raw_o], ignore_index=True).to_pickle(rows_path)
        out.put(("rows", rows_path))


def measure_together(cases: list, level: str, dtype: str, world: int,
                     progress: Callable[[int], object] | None = None) -> pd.DataFrame:
    """Rank 0's raw kernel and fixed-cost rows, timed while ``world`` processes run the grid in step."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(world), ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="rlhf-plan-kernels-") as tmp:
        rows_path = os.path.join(tmp, "rows.pkl")
        procs = [ctx.Process(target=_worker, args=(r, world, cases, level, dtype, barrier, out, os.getpid(),
                                                    rows_path), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        try:
            while True:
                try:
                    kind, value = out.get(timeout=1.0)
                except queue_mod.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    if dead or all(p.exitcode is not None for p in procs):
                        raise RuntimeError(f"kernel timing process(es) {dead or list(range(world))} ended without "
                                           f"their rows (exit {[p.exitcode for p in procs]})") from None
                    continue
                if kind == "rows":
                    return pd.read_pickle(value)
                if progress is not None:
                    progress(value)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
