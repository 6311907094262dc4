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

With ``alone``, right after every case rank 0 times it once more while the other processes
wait at the barrier, as an executor process waits in a collective for work that runs on its
sibling; those rows say how much faster a device is while its host-mates idle. Timing the two
back to back, case by case, keeps a slow drift of a shared host (minutes of a neighbour's load)
out of the ratio: timed as two passes of the whole grid, minutes apart, the drift between the
passes entered the fitted factors (a 2026-12-07 calibration read an idle host-mate as 18 %
faster dispatch, where the executor's own decode steps with the sibling idle ran no faster
than with it busy).
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
            parent: int, rows_path: str, alone: bool) -> None:
    from calibration import kernels, overheads

    torch.set_num_threads(1)  # one core per simulated device, as the executor runs

    def sync() -> None:
        if os.getppid() != parent:  # the calibration was killed: stop, leave nothing behind
            os._exit(1)
        barrier.wait(WAIT_S)

    def step(n: int = 1) -> None:
        sync()  # the next case starts on every process together
        if rank == 0:
            out.put(("tick", n))

    alone_rows: list[dict] = []

    def again(time_it: Callable[[], list[dict]]) -> None:
        if rank == 0:  # the case once more, the others waiting at the barrier
            alone_rows.extend(time_it())
        sync()

    raw_k = kernels.measure(cases, "cpu", dtype, level, progress=step, again=again if alone else None)
    raw_o = overheads.measure_overheads("cpu", dtype, progress=step)
    if alone:
        again(lambda: overheads.measure_overheads("cpu", dtype).to_dict("records"))
    if rank == 0:
        # the rows go through a file and only a short message through the queue, so no process
        # ever blocks at exit on a pipe nobody reads
        rows = {"busy": pd.concat([raw_k, raw_o], ignore_index=True),
                "alone": pd.DataFrame(alone_rows) if alone else None}
        pd.to_pickle(rows, rows_path)
        out.put(("rows", rows_path))


def measure_together(cases: list, level: str, dtype: str, world: int,
                     progress: Callable[[int], object] | None = None, alone: bool = False
                     ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Rank 0's raw kernel and fixed-cost rows, timed while ``world`` processes run the grid in
    step; with ``alone`` also rank 0's rows timed while the others wait (else None)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(world), ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="rlhf-plan-kernels-") as tmp:
        rows_path = os.path.join(tmp, "rows.pkl")
        procs = [ctx.Process(target=_worker, args=(r, world, cases, level, dtype, barrier, out, os.getpid(),
                                                    rows_path, alone), daemon=True) for r in range(world)]
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
                    rows = pd.read_pickle(value)
                    return rows["busy"], rows["alone"]
                if progress is not None:
                    progress(value)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
