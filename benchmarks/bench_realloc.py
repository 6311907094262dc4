"""Parameter reallocation throughput against plain point-to-point bandwidth, over gloo.

Two processes on this machine reallocate a model's parameters between layouts of devices 0-1
(:func:`executor.realloc.reallocate`) and, for comparison, send one tensor of the same byte
size from one process to the other. Throughput is the bytes that cross between devices divided
by the time of the slowest process::

    python -m benchmarks.bench_realloc                      # ~100M-parameter model, float32
    python -m benchmarks.bench_realloc --model tiny-4l-256h --repeats 10
    python -m benchmarks.bench_realloc --thp                # transparent huge pages for tensors
    python -m benchmarks.bench_realloc --json

The processes start as the executor starts its workers (:func:`executor.launch.launch`), so
freed memory is reused as in a run. A reallocation allocates the shards it returns; on CPU,
faulting fresh pages in costs about as much as the copy itself, while the point-to-point
baseline reuses one buffer. ``--default-malloc`` leaves malloc returning freed blocks to the
system, to show that cost; ``--thp`` sets ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's CPU allocator
then asks for transparent huge pages), which makes faulting cheaper.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from estimator.base.tables import format_table
from estimator.spec.cluster import DeviceMesh
from estimator.spec.models import PRESETS, ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import box_shape, realloc_plan, shard
from executor.launch import launch
from executor.realloc import reallocate

BENCH_MODEL = ModelSpec("bench-100m", 8, 768, 2048, 12, 4, 32000)
DEVICES_PER_NODE = 2


def _lay(mesh: str, dp: int, tp: int, pp: int) -> Layout:
    return Layout(DeviceMesh.parse(mesh), dp, tp, pp)


PAIRS = [
    ("0 -> 1", _lay("0", 1, 1, 1), _lay("1", 1, 1, 1)),
    ("0 -> 0-1 tp2", _lay("0", 1, 1, 1), _lay("0-1", 1, 2, 1)),
    ("0-1 tp2 -> 1", _lay("0-1", 1, 2, 1), _lay("1", 1, 1, 1)),
    ("0-1 tp2 -> 0-1 pp2", _lay("0-1", 1, 2, 1), _lay("0-1", 1, 1, 2)),
    ("0-1 pp2 -> 0-1 tp2", _lay("0-1", 1, 1, 2), _lay("0-1", 1, 2, 1)),
    ("0-1 pp2 -> 0-1 dp2", _lay("0-1", 1, 1, 2), _lay("0-1", 2, 1, 1)),
]


def moved_bytes(model: ModelSpec, src: Layout, dst: Layout, itemsize: int) -> int:
    """Bytes that cross between devices (local copies excluded)."""
    return sum(t.numel for t in realloc_plan(model, src, dst, DEVICES_PER_NODE) if t.src != t.dst) * itemsize


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _time_realloc(model: ModelSpec, src: Layout, dst: Layout, rank: int, dtype: torch.dtype) -> float:
    params = None
    if rank in src.mesh.devices:
        params = {n: torch.ones(box_shape(b), dtype=dtype) for n, b in shard(model, src, rank).items()}
    dist.barrier()
    start = time.perf_counter()
    reallocate(model, src, params, dst, rank, DEVICES_PER_NODE, dtype)
    return _slowest(time.perf_counter() - start)


def _time_p2p(buf: torch.Tensor, rank: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    if rank == 0:
        dist.send(buf, 1)
    else:
        dist.recv(buf, 0)
    return _slowest(time.perf_counter() - start)


def _worker(rank: int, world: int, status: Callable[[str], None], model: ModelSpec, repeats: int,
            dtype: torch.dtype) -> list[dict]:
    rows = []
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, src, dst in PAIRS:
        status(name)
        nbytes = moved_bytes(model, src, dst, itemsize)
        realloc, p2p = [], []
        buf = torch.ones(nbytes // itemsize, dtype=dtype)  # one buffer, reused: the best case of plain p2p
        for _ in range(repeats + 1):  # alternated, so both see the same machine load; first is warm-up
            realloc.append(_time_realloc(model, src, dst, rank, dtype))
            p2p.append(_time_p2p(buf, rank))
        del buf  # before the next pair allocates its own
        realloc, p2p = realloc[1:], p2p[1:]
        rows.append({"pair": name, "moved_bytes": nbytes, "realloc_s": statistics.median(realloc),
                     "p2p_s": statistics.median(p2p)})
        if rank == 0:
            print(f"reallocation {len(rows)}/{len(PAIRS)} ({name}) measured", file=sys.stderr, flush=True)
    return rows


def run(model: ModelSpec, repeats: int, dtype: torch.dtype, retain_memory: bool = True) -> list[dict]:
    rows = launch(2, _worker, (model, repeats, dtype), retain_memory=retain_memory)[0]
    for r in rows:
        r["realloc_gb_s"] = r["moved_bytes"] / r["realloc_s"] / 1e9
        r["p2p_gb_s"] = r["moved_bytes"] / r["p2p_s"] / 1e9
        r["ratio"] = r["realloc_gb_s"] / r["p2p_gb_s"]
    return rows


def table(rows: list[dict]) -> str:
    out = [("layouts", "moved MB", "realloc ms", "realloc GB/s", "p2p GB/s", "realloc / p2p")]
    out += [(r["pair"], f"{r['moved_bytes'] / 1e6:.1f}", f"{r['realloc_s'] * 1e3:.1f}", f"{r['realloc_gb_s']:.2f}",
             f"{r['p2p_gb_s']:.2f}", f"{100 * r['ratio']:.0f} %") for r in rows]
    return format_table(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BENCH_MODEL.name, help=f"{BENCH_MODEL.name} or a model preset")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--thp", action="store_true", help="transparent huge pages for tensor memory")
    parser.add_argument("--default-malloc", action="store_true",
                        help="let malloc return freed blocks to the system (executor.launch.retain_freed_memory off)")
    parser.add_argument("--json", action="store_true", help="print machine-readable rows")
    args = parser.parse_args(argv)
    model = BENCH_MODEL if args.model == BENCH_MODEL.name else PRESETS[args.model]
    if args.thp:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # read by the spawned workers' allocator
    rows = run(model, args.repeats, getattr(torch, args.dtype), retain_memory=not args.default_malloc)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{model.name}: {model.params / 1e6:.0f}M parameters, {args.dtype}, 2 gloo processes, "
              f"median of {args.repeats}{', huge pages' if args.thp else ''}"
              f"{', default malloc' if args.default_malloc else ''}")
        print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
