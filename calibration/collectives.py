"""Collective microbenchmarks over torch.distributed: what each collective the executor issues
costs, per message size and group size (gloo on CPU, one thread per process; NCCL on CUDA).

Every kind the executor issues is timed the way it issues it: ``dist.all_reduce`` in place
(tensor-parallel and data-parallel all-reduces), ``dist.all_gather`` into a list (the LM head's
vocabulary gather), ``dist.broadcast`` from the group's first rank (sampled tokens),
``batch_isend_irecv`` of one message from rank 0 to rank 1 (pipeline sends), and
``reduce_scatter_tensor``. A size is nccl-tests' ``size``: the buffer of an all-reduce,
broadcast or message, the gathered output of an all-gather, the input of a reduce-scatter.

Each (kind, group size, size) is warmed up, then timed ``repeats`` times; before each timed
repeat the group meets at a barrier, and a repeat runs enough back-to-back calls to last
about ``min_repeat_s``; its time per call runs from the last rank's start to the last rank's
end on one host (the slowest rank's own time across hosts), so neither a barrier's exit skew
nor an early rank's wait is charged. The rows hold the median and the 10th/90th
percentiles over the repeats. Groups are the first ``g`` ranks for every power of two
``g`` from 2 to the world size (and the world size itself).

Run locally (spawned processes) or from ranks under torchrun::

    from calibration.collectives import GRIDS, run_local
    raw = run_local(GRIDS["quick"], world_size=2)          # pandas DataFrame of raw rows
    raw = run_local(GRIDS["full"], world_size=8, device="cuda")   # NCCL, one GPU per process

    # torchrun --nproc-per-node 8 script.py, after init_process_group:
    rows = measure(GRIDS["full"], device=torch.device("cuda", local_rank))
"""

from __future__ import annotations

import functools
import math
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from estimator.base.errors import ConfigError

KINDS = ("all_reduce", "all_gather", "broadcast", "p2p", "reduce_scatter")
COLUMNS = ("kind", "link_class", "group", "group_size", "size_bytes", "median_s", "p10_s", "p90_s",
           "repeats", "calls", "backend")
ELEMENT = 4  # float32 elements: the executor's default parameter dtype


def size_grid(max_bytes: int, min_bytes: int = 4) -> list[int]:
    """Message sizes from ``min_bytes`` to ``max_bytes``: every 4·2^k and 6·2^k bytes, so a
    fit on the powers of two can be checked on the sizes in between."""
    out = []
    k = 0
    while ELEMENT << k <= max_bytes:
        out += [s for s in (ELEMENT << k, (6 << k) if k else 0) if min_bytes <= s <= max_bytes]
        k += 1
    return sorted(set(out))


@dataclass(frozen=True)
class Grid:
    """What to time and how often."""

    sizes: tuple[int, ...]  # message sizes, bytes
    kinds: tuple[str, ...] = KINDS
    warmup: int = 2  # untimed calls per (kind, group, size)
    repeats: int = 7  # timed repeats; the median and spread are over these
    min_repeat_s: float = 2e-3  # a repeat runs back-to-back calls for about this long
    max_calls: int = 64  # at most this many calls per repeat
    group_sizes: tuple[int, ...] = field(default=())  # empty: every size the world allows

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            raise ConfigError(f"collective grid: unknown kind(s) {unknown}; known: {list(KINDS)}")
        if not self.sizes or min(self.sizes) < 1:
            raise ConfigError(f"collective grid: sizes {list(self.sizes)} must be positive bytes")
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError(f"collective grid: repeats={self.repeats} must be >= 1, warmup={self.warmup} >= 0")


GRIDS = {
    "tiny": Grid(tuple(size_grid(1 << 14)), warmup=1, repeats=3, min_repeat_s=2e-4, max_calls=4),
    # a repeat of many back-to-back calls: one or two calls per repeat leave small messages at the
    # mercy of a process's wake-up on a virtual machine (medians scattered over 0.1–2 ms on 2
    # vCPUs); the cost of one collective issued between computations is measured on its own
    # (measure_in_situ) against these
    "quick": Grid(tuple(size_grid(64 << 20)), repeats=9, min_repeat_s=1e-2),
    "full": Grid(tuple(size_grid(256 << 20)), repeats=15, min_repeat_s=1e-2),
}


def groups_for(world_size: int, wanted: Sequence[int] = ()) -> list[int]:
    """Group sizes to time: ``wanted``, or powers of two up to the world size and the world."""
    sizes = sorted(set(wanted) or {2 ** k for k in range(1, int(math.log2(world_size)) + 1)} | {world_size})
    bad = [g for g in sizes if not 2 <= g <= world_size]
    if bad:
        raise ConfigError(f"collective group sizes {bad} must lie in 2..world size {world_size}")
    return sizes


def _op(kind: str, size: int, g: int, rank: int, group: dist.ProcessGroup, device: torch.device) -> Callable[[], None]:
    """One call of ``kind`` as the executor issues it, on buffers allocated once."""
    n = max(1, size // ELEMENT)
    if kind == "all_reduce":
        buf = torch.ones(n, device=device)
        return lambda: dist.all_reduce(buf, group=group)
    if kind == "broadcast":
        buf = torch.ones(n, device=device)
        return lambda: dist.broadcast(buf, dist.get_global_rank(group, 0), group=group)
    part = max(1, n // g)
    if kind == "all_gather":
        x, outs = torch.ones(part, device=device), [torch.empty(part, device=device) for _ in range(g)]
        return lambda: dist.all_gather(outs, x, group=group)
    if kind == "reduce_scatter":
        x, out = torch.ones(part * g, device=device), torch.empty(part, device=device)
        return lambda: dist.reduce_scatter_tensor(out, x, group=group)
    buf = torch.ones(n, device=device)  # p2p: rank 0 → rank 1, as a pipeline stage sends
    peer, post = (1, dist.isend) if rank == 0 else (0, dist.irecv)

    def p2p() -> None:
        for work in dist.batch_isend_irecv([dist.P2POp(post, buf, peer)]):
            work.wait()
    return p2p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_one(op: Callable[[], None], grid: Grid, group: dist.ProcessGroup, device: torch.device,
              shared_clock: bool) -> tuple[np.ndarray, int]:
    """Per-call seconds of each timed repeat, and calls per repeat.

    With a clock all ranks share (one host: ``time.perf_counter`` is the system's monotonic
    clock), a repeat lasts from the last rank's start to the last rank's end, so the skew of
    the barrier's exit is not charged; otherwise it is the slowest rank's own elapsed time.
    """
    t0 = time.perf_counter()
    for _ in range(max(1, grid.warmup)):
        op()
    _sync(device)
    est = torch.tensor([(time.perf_counter() - t0) / max(1, grid.warmup)], dtype=torch.float64, device=device)
    dist.all_reduce(est, op=dist.ReduceOp.MAX, group=group)  # every rank runs the same number of calls
    calls = int(min(grid.max_calls, max(1, math.ceil(grid.min_repeat_s / max(est.item(), 1e-9)))))
    marks = torch.zeros(2, grid.repeats, dtype=torch.float64, device=device)  # (start, end) per repeat
    for r in range(grid.repeats):
        dist.barrier(group=group)
        _sync(device)
        marks[0, r] = time.perf_counter()
        for _ in range(calls):
            op()
        _sync(device)
        marks[1, r] = time.perf_counter()
    if shared_clock:
        dist.all_reduce(marks, op=dist.ReduceOp.MAX, group=group)
        return (marks[1] - marks[0]).cpu().numpy() / calls, calls
    elapsed = marks[1] - marks[0]
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return elapsed.cpu().numpy() / calls, calls


def measure(grid: Grid, device: torch.device | None = None, tick: Callable[[int], None] | None = None,
            shared_clock: bool = False) -> list[dict]:
    """Time ``grid`` inside an initialised default process group; every rank calls it, rank
    0 gets the rows (the others an empty list). ``tick(n)`` reports n more cases done;
    ``shared_clock``: all ranks run on one host (see :func:`_time_one`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = device or torch.device("cpu")
    backend = str(dist.get_backend())
    rows: list[dict] = []
    for g in groups_for(world, grid.group_sizes):
        group = dist.new_group(list(range(g)))  # every rank takes part in creating every group
        for kind in grid.kinds:
            if kind == "p2p" and g != 2:
                continue
            for size in grid.sizes:
                if rank < g:
                    op = _op(kind, size, g, rank, group, device)
                    times, calls = _time_one(op, grid, group, device, shared_clock)
                    if rank == 0:
                        p10, med, p90 = np.percentile(times, [10, 50, 90])
                        rows.append(dict(kind=kind, link_class="intra", group=str(g), group_size=g,
                                         size_bytes=_actual_bytes(kind, size, g), median_s=med, p10_s=p10,
                                         p90_s=p90, repeats=grid.repeats, calls=calls, backend=backend))
                if tick is not None and rank == 0:
                    tick(1)
        dist.barrier()
    return rows


IN_SITU = "in_situ"  # rows of :func:`measure_in_situ`: the extra cost of a collective between computations
IN_SITU_P2P = "in_situ_p2p"  # rows of :func:`measure_in_situ_p2p`: the same for a pipeline message
# one rank of the executor's tiny-2l-128h at tp 2, a whole stage pass as tensor parallelism runs
# it: a decode step of 4 rows and a forward of 4 rows × 16 tokens
IN_SITU_SHAPES = {"decode": dict(rows=4, tokens=1, kv_len=24), "forward": dict(rows=4, tokens=16, kv_len=16)}
IN_SITU_BLOCK = dict(group=2, kv_heads=1, half_head_dim=16, hidden=128, ffn=128, vocab_local=128, tp=2,
                     response=1, vocab=256, numel=1, positions=64)
IN_SITU_LAYERS = 2
IN_SITU_STEPS = 32  # stage passes per timed repeat


def _own_elapsed(body: Callable[[], None], repeats: int, group: dist.ProcessGroup, device: torch.device) -> float:
    """Median over ``repeats`` of the slowest rank's own time for ``body``, barrier before each."""
    times = torch.zeros(repeats, dtype=torch.float64)
    for r in range(repeats):
        dist.barrier(group=group)
        _sync(device)
        t0 = time.perf_counter()
        body()
        _sync(device)
        times[r] = time.perf_counter() - t0
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    return float(times.median())


def _stage_pass(v: dict, phase: str, tp: bool) -> list[Callable[[], object]]:
    """The thunks of one stage pass of the executor (:mod:`calibration.census`'s pieces, with
    the engine's hooks on a real group when ``tp``): the vocab-parallel embedding (one
    all-reduce), ``IN_SITU_LAYERS`` blocks (two each), the head (an all-gather of the logits)
    and, in a decode step, the token choice (a broadcast). Creates groups: every rank calls it."""
    from calibration.census import block_forward, choose, embed, head

    decode = phase == "decode"
    return [embed(v, torch.float32, tp, ""),
            *[block_forward(v, torch.float32, tp, "", cache=decode, decode=decode) for _ in range(IN_SITU_LAYERS)],
            head(v, torch.float32, tp, "", "lm"),
            *([choose(v, torch.float32, tp, "")] if decode else [])]


def measure_in_situ(device: torch.device | None = None, repeats: int = 15) -> list[dict]:
    """What a tensor-parallel collective costs where the executor issues it: between the
    computations of a whole stage pass. Ranks 0 and 1 run ``IN_SITU_STEPS`` passes of the
    executor's tensor-parallel stage (:func:`_stage_pass` on a real two-rank group: all-reduces
    after the embedding and each block's halves, an all-gather of the logits, in a decode step a
    broadcast of the chosen tokens), then the same pass without the group (its computations
    alone), and each kind of collective of the pass alone, back to back at the pass's sizes —
    what the profile's curves price. (pass − computations − collectives) / collectives is what
    arriving at different moments, waking a waiting process and alternating kinds add to each
    collective, and what the hooks' autograd functions cost; a block alone (two all-reduces of
    one kind a step) missed the last two and read 150 us where whole decode steps at tp 2 paid
    about 400 us more per collective than the curves. Rank 0 gets one row per shape (decode
    step, forward): kind ``in_situ``, ``median_s`` the extra seconds per collective. Every rank
    takes part in creating the groups."""
    rank = dist.get_rank()
    device = device or torch.device("cpu")
    group = dist.new_group([0, 1])
    rows: list[dict] = []
    for phase, shape in IN_SITU_SHAPES.items():
        v = {**IN_SITU_BLOCK, **shape}
        decode = phase == "decode"
        tp_pass = _stage_pass(v, phase, True)  # creates groups
        if rank >= 2:
            continue
        local_pass = _stage_pass(v, phase, False)
        rows_tokens = v["rows"] * (1 if decode else v["tokens"])
        hidden = torch.ones(rows_tokens * v["hidden"], device=device)
        logits = torch.ones(rows_tokens * v["vocab_local"], device=device)
        gathered = [torch.empty_like(logits) for _ in range(2)]
        token = torch.zeros(v["rows"], dtype=torch.long, device=device)
        reduces = 1 + 2 * IN_SITU_LAYERS
        alone = {"all_reduce": functools.partial(dist.all_reduce, hidden, group=group),
                 "all_gather": functools.partial(dist.all_gather, gathered, logits, group=group)}
        if decode:
            alone["broadcast"] = functools.partial(dist.broadcast, token, 0, group=group)
        count = {"all_reduce": reduces, "all_gather": 1, "broadcast": 1}

        def steps(thunks: list[Callable[[], object]], times: int = 1) -> None:
            for _ in range(IN_SITU_STEPS):
                for fn in thunks:
                    for _ in range(times):
                        fn()

        steps(tp_pass)  # warm-up
        t_tp = _own_elapsed(functools.partial(steps, tp_pass), repeats, group, device)
        t_local = _own_elapsed(functools.partial(steps, local_pass), repeats, group, device)
        t_coll = sum(_own_elapsed(functools.partial(steps, [fn], count[k]), repeats, group, device)
                     for k, fn in alone.items())
        if rank == 0:
            n = IN_SITU_STEPS * sum(count[k] for k in alone)
            rows.append(dict(kind=IN_SITU, link_class="intra", group="2", group_size=2,
                             size_bytes=hidden.numel() * ELEMENT, median_s=(t_tp - t_local - t_coll) / n,
                             p10_s=t_local / IN_SITU_STEPS, p90_s=t_coll / n, repeats=repeats, calls=n,
                             backend=str(dist.get_backend())))
    dist.barrier()
    return rows


def measure_in_situ_p2p(device: torch.device | None = None, repeats: int = 15) -> list[dict]:
    """What a pipeline message costs where the executor sends it: between the computations of
    two stages. Rank 0 runs ``IN_SITU_STEPS`` forward micro-batches of the executor's block
    (one rank of tiny-2l-128h, 4 rows of 16 tokens) and sends each micro-batch's activations
    through the engine's :class:`executor.comm.StageLink` (queued, posted with the stage's next
    step); rank 1 receives each and runs the block on it. Against the ideal pipeline — both
    ranks computing at once, ``steps + 1`` blocks, plus each message at its back-to-back time
    — (pipeline − ideal) / steps is what a message adds between computations: a sender that
    keeps computing after posting leaves the transport's own thread little time to run. Rank 0
    gets one row: kind ``in_situ_p2p``, ``median_s`` the extra seconds per message."""
    from calibration.census import block_forward
    from executor.comm import StageLink

    rank = dist.get_rank()
    device = device or torch.device("cpu")
    group = dist.new_group([0, 1])
    if rank >= 2:
        dist.barrier()
        return []
    v = {**IN_SITU_BLOCK, **IN_SITU_SHAPES["forward"], "tp": 1}
    shape = (v["rows"], v["tokens"], v["hidden"])
    step = block_forward(v, torch.float32, False, "")
    buf = torch.ones(shape, device=device)
    link = StageLink()

    def pipeline() -> None:
        for _ in range(IN_SITU_STEPS):
            if rank == 0:
                link.flush()  # the engine's first stage posts queued sends before computing
                step()
                link.send(buf, 1)
            else:
                link.recv(shape, buf.dtype, device, 0)
                step()
        link.wait()

    def alone() -> None:
        for _ in range(IN_SITU_STEPS):
            step()

    def messages() -> None:
        for _ in range(IN_SITU_STEPS):
            if rank == 0:
                dist.send(buf, 1)
            else:
                dist.recv(buf, 0)

    pipeline()  # warm-up
    t_pipe = _own_elapsed(pipeline, repeats, group, device)
    t_block = _own_elapsed(alone, repeats, group, device) / IN_SITU_STEPS
    t_msg = _own_elapsed(messages, repeats, group, device) / IN_SITU_STEPS
    rows: list[dict] = []
    if rank == 0:
        extra = (t_pipe - (IN_SITU_STEPS + 1) * t_block - IN_SITU_STEPS * t_msg) / IN_SITU_STEPS
        rows.append(dict(kind=IN_SITU_P2P, link_class="intra", group="2", group_size=2,
                         size_bytes=buf.numel() * ELEMENT, median_s=extra, p10_s=t_block, p90_s=t_msg,
                         repeats=repeats, calls=IN_SITU_STEPS, backend=str(dist.get_backend())))
    dist.barrier()
    return rows


def in_situ_overhead_s(raw: pd.DataFrame, kind: str = IN_SITU) -> float | None:
    """The extra seconds per collective between computations (:func:`measure_in_situ`; kind
    ``in_situ_p2p``: per pipeline message, :func:`measure_in_situ_p2p`): the median over its
    rows, never below zero; None without such rows."""
    rows = raw[raw["kind"] == kind]
    return None if rows.empty else max(0.0, float(rows["median_s"].median()))


def _actual_bytes(kind: str, size: int, g: int) -> int:
    """The size that was moved: whole elements, and a whole element per rank for gather/scatter."""
    n = max(1, size // ELEMENT)
    return ELEMENT * (max(1, n // g) * g if kind in ("all_gather", "reduce_scatter") else n)


def cases(grid: Grid, world_size: int) -> int:
    """How many (kind, group, size) cases :func:`measure` times: the progress bar's total."""
    per = sum(1 for g in groups_for(world_size, grid.group_sizes) for k in grid.kinds if k != "p2p" or g == 2)
    return per * len(grid.sizes)


def _worker(rank: int, world: int, port: int, grid: Grid, queue, device_type: str, in_situ: bool = False) -> None:
    torch.set_num_threads(1)  # one core per simulated device, as the executor runs
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))  # a peer that died fails the run, not hangs it
    try:
        rows = measure(grid, device, tick=lambda n: queue.put(("tick", n)), shared_clock=True)
        if in_situ:
            rows += measure_in_situ(device) + measure_in_situ_p2p(device)
        if rank == 0:
            queue.put(("rows", rows))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(grid: Grid, world_size: int = 2, progress=None, device: str = "cpu", in_situ: bool = False
              ) -> pd.DataFrame:
    """Spawn ``world_size`` processes on this host and time ``grid``: gloo on CPU, or NCCL
    with one GPU per process (``device="cuda"``); ``progress`` is a tqdm bar (or anything with
    ``update(n)``) advanced once per case. ``in_situ`` adds :func:`measure_in_situ`'s rows."""
    if world_size < 2:
        raise ConfigError(f"collective benchmarks need a world size of at least 2, got {world_size}")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"collective benchmarks: device={device!r} must be 'cpu' or 'cuda'")
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise ConfigError(f"collective benchmarks over NCCL need one GPU per process: world size {world_size}, "
                          f"{torch.cuda.device_count()} GPU(s) visible")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(world_size, _free_port(), grid, queue, device, in_situ),
                               nprocs=world_size,
                               join=False, start_method="spawn")
    try:
        rows = _collect(procs, queue, progress)
    except BaseException:  # interrupted or a worker failed: leave no process behind
        for proc in procs.processes:
            if proc.is_alive():
                proc.terminate()
        raise
    return frame(rows)


def _collect(procs, queue, progress) -> list[dict]:
    """Forward progress ticks until the workers exit; rank 0's rows."""
    rows = None
    while True:
        while not queue.empty():
            what, payload = queue.get()
            if what == "tick" and progress is not None:
                progress.update(payload)
            elif what == "rows":
                rows = payload
        if procs.join(timeout=0.05):  # raises if a worker failed
            break
    while not queue.empty():
        what, payload = queue.get()
        rows = payload if what == "rows" else rows
    return rows or []


def frame(rows: list[dict]) -> pd.DataFrame:
    """Raw rows as a DataFrame with :data:`COLUMNS` in order."""
    return pd.DataFrame(rows, columns=list(COLUMNS))


def with_sizes(grid: Grid, sizes: Sequence[int]) -> Grid:
    """``grid`` with extra message sizes (e.g. an experiment's activation all-reduces)."""
    return replace(grid, sizes=tuple(sorted(set(grid.sizes) | {int(s) for s in sizes})))
