"""Start one process per device on this machine (gloo) and watch them.

Each worker says what it is doing now (the call it entered) in a small shared-memory buffer,
which costs nothing per call, and reports through files in a private temporary directory:
``error.R`` holds rank R's traceback if it raised, ``result.R`` what it returns. The parent
polls the workers' exit codes; the first one to fail makes it kill every other worker and raise
:class:`WorkerFailed` naming the rank, the call it was in and why — a crash never turns into a
hang. Workers also die with the parent (``PR_SET_PDEATHSIG`` on Linux), so no process outlives
a killed run.

Workers keep the memory they free for reuse (:func:`retain_freed_memory`), as the CUDA caching
allocator does on GPUs: a run allocates and frees tensors of the same sizes over and over
(reallocated weights, activations), and on CPU faulting fresh pages in costs about as much as
filling them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from estimator.base.io import atomic_write_text

POLL_S = 0.05
GRACE_S = 1.0  # after a failure, how long to wait for other ranks' reports before killing them
# Collective timeout: how long a rank waits for a peer before the run fails. A peer may be
# busy that long in one call (a 70B generation keeps the ranks waiting for its output idle), so
# minutes, not seconds; a peer that stopped is reported by name when its waiting peers time out.
DEFAULT_TIMEOUT_S = 300.0
STATUS_BYTES = 256  # room for "call <name> (iteration <i>)"
# glibc mallopt parameters (malloc.h) and the largest value they take (a C int).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOPT_MAX = 2**31 - 1


class WorkerFailed(RuntimeError):
    """A worker raised or died; names the rank and the call it was in."""

    def __init__(self, rank: int, where: str, reason: str, details: str = ""):
        self.rank, self.where, self.reason, self.details = rank, where, reason, details
        super().__init__(f"rank {rank} failed in {where}: {reason}")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        except OSError:
            pass


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 2 GiB for reuse; whether it applied.

    By default a block over 32 MiB is a private mapping, unmapped when freed, and free memory at
    the top of the heap goes back to the system, so the next tensor of that size faults every
    page in again. Here such blocks come from the heap and the heap is not trimmed below 2 GiB
    of free memory: the process stays at about its peak footprint instead (plus what
    fragmentation leaves). No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # another libc: other knobs
        return False
    return all(libc.mallopt(param, MALLOPT_MAX) == 1 for param in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))


def _child(rank: int, world: int, workdir: str, timeout_s: float, retain_memory: bool, where: Any, fn: Callable,
           args: tuple) -> None:
    import torch
    import torch.distributed as dist

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    if retain_memory:
        retain_freed_memory()
    torch.set_num_threads(1)
    work = Path(workdir)

    def status(text: str) -> None:
        where.value = text.encode()[:STATUS_BYTES - 1]

    try:
        status("start-up")
        # Rendezvous through a file in the private directory: no port to race other programs for.
        dist.init_process_group("gloo", init_method=f"file://{work / 'rendezvous'}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world, status, *args)
        tmp = work / f"result.{rank}.tmp"
        torch.save(result, tmp)
        os.replace(tmp, work / f"result.{rank}")
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure is reported to the parent
        atomic_write_text(work / f"error.{rank}", f"{time.time()}\n{traceback.format_exc()}")
        os._exit(1)  # skip interpreter teardown: peers may be blocked on this rank


def _reason(work: Path, rank: int, code: int) -> tuple[str, str, float]:
    """(one-line reason, full traceback, time of failure) of a failed rank."""
    err = work / f"error.{rank}"
    if err.exists():
        stamp, _, tb = err.read_text().partition("\n")
        last = next((ln for ln in reversed(tb.strip().splitlines()) if ln.strip()), "error")
        return last.strip(), tb, float(stamp)
    how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return f"{how} without a traceback", "", 0.0  # died abruptly: the likeliest root cause


def _where(status: Any) -> str:
    return status.value.decode(errors="replace") or "start-up"


def _stop(procs: list[Any]) -> None:
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.kill()
    for p in started:
        p.join(timeout=10)


def launch(world: int, fn: Callable, args: tuple = (), timeout_s: float = DEFAULT_TIMEOUT_S,
           retain_memory: bool = True) -> list[Any]:
    """Run ``fn(rank, world, status, *args)`` in ``world`` gloo processes; results by rank.

    ``fn`` must be importable (it is pickled into spawned processes) and call ``status(text)``
    to say where it is. Raises :class:`WorkerFailed` as soon as any process fails.
    ``retain_memory=False`` leaves the workers' malloc at its defaults (see
    :func:`retain_freed_memory`).
    """
    # The parent imports torch only to read the results: its seconds of import would otherwise
    # delay every worker's start. Arguments hold no tensors, so stdlib spawn pickles them.
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="rlhf-plan-run-") as workdir:
        work = Path(workdir)
        status = [ctx.Array("c", STATUS_BYTES, lock=False) for _ in range(world)]
        procs = [ctx.Process(target=_child, args=(r, world, workdir, timeout_s, retain_memory, status[r], fn, args),
                             daemon=True) for r in range(world)]
        try:
            with _sigint_ignored():  # workers are born ignoring Ctrl-C: the parent alone stops them
                for p in procs:
                    p.start()
            _watch(procs, work, status)
        finally:
            _stop(procs)
        import torch

        return [torch.load(work / f"result.{r}", weights_only=False) for r in range(world)]


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while starting workers: an ignored signal stays ignored across exec, and
    Python then installs no KeyboardInterrupt handler, so a Ctrl-C mid-start prints no worker
    traceback. No-op off the main thread (only it may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _watch(procs: list[Any], work: Path, status: list[Any]) -> None:
    """Return when every process exited cleanly; raise on the first failure."""
    while True:
        codes = [p.exitcode for p in procs]
        if any(c not in (None, 0) for c in codes):
            time.sleep(GRACE_S)  # let peers that noticed the failure report too
            _raise_failure([p.exitcode for p in procs], work, status, procs)
        if all(c == 0 for c in codes):
            return
        time.sleep(POLL_S)


def _raise_failure(codes: list[int | None], work: Path, status: list[Any], procs: list[Any] | None = None) -> None:
    """Blame the rank that died without a report, else a rank that stopped responding while its
    peers timed out waiting for it, else the one that failed first."""
    failed = []
    for rank, code in enumerate(codes):
        if code not in (None, 0):
            reason, details, when = _reason(work, rank, code)
            failed.append((when, rank, reason, details))
    when, rank, reason, details = min(failed)
    silent = [r for r, c in enumerate(codes) if c is None]
    if when and silent and any(_timed_out(d) for _, _, _, d in failed):
        hung = silent[0]
        state = _proc_state(procs[hung].pid) if procs is not None else None
        how = "is stopped (SIGSTOP)" if state in ("T", "t") else "is still running but silent"
        raise WorkerFailed(hung, _where(status[hung]), f"stopped responding: rank(s) "
                           f"{', '.join(str(r) for _, r, _, _ in sorted(failed))} timed out waiting for it; "
                           f"it {how}", details)
    raise WorkerFailed(rank, _where(status[rank]), reason, details)


def _timed_out(traceback_text: str) -> bool:
    """Whether a worker's traceback is a collective timeout (gloo: "Timed out waiting ...")."""
    return "timed out" in traceback_text.lower() or "timeout" in traceback_text.lower()


def _proc_state(pid: int | None) -> str | None:
    """A process's state letter from ``/proc/PID/stat`` (``T``: stopped), None off Linux."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
