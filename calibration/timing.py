"""Timing kernel cases: warm-up, rotated inputs, median of repeats, and the aten ops they issue.

On CPU each case runs on one thread (``torch.set_num_threads(1)``, as every executor process
does) and is timed with the host clock; on CUDA with CUDA events on the current stream
(``device="cuda"``; refused with a message when no GPU is visible). A sample runs the case
back to back until it lasts at least the level's ``sample_s`` (one call for cases that need
untimed set-up between calls, such as a backward after its forward), cycling through several
independently allocated input sets — as many as it takes to exceed :data:`ROTATE_BYTES`, at
most :data:`MAX_ROTATE` — so a case does not run from caches its predecessor warmed. Each row
reports the median of the samples and their 10th and 90th percentiles.

:func:`measure_compose` measures how host dispatch and device work combine: a stream of tiny
ops alone, one large matrix product alone, and the product followed by the stream. When the
host waits for each op (CPU) the pair takes the sum; when kernels run asynchronously (CUDA)
the host issues the stream while the product runs and the pair takes about the longer one.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from calibration.aten import encode, record
from calibration.benches import Bench, Maker, build, grad_mode
from estimator.base.errors import ConfigError
from estimator.base.host import cpu_model

ROTATE_BYTES = 32 << 20  # more than the last-level cache of the CPUs and GPUs at hand
MAX_ROTATE = 16
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
COMPOSE_STREAM = 200  # tiny ops in the dispatch stream


def torch_device(device: str) -> torch.device:
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda': no CUDA device is visible to torch "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use device='cpu'")
        return torch.device("cuda", torch.cuda.current_device())
    if device != "cpu":
        raise ConfigError(f"device={device!r} must be 'cpu' or 'cuda'")
    return torch.device("cpu")


def device_info(device: str) -> dict[str, str]:
    """What the measurement ran on: device model and software versions."""
    info = {"torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        dev = torch_device(device)
        info.update(gpu=torch.cuda.get_device_name(dev), cuda=str(torch.version.cuda),
                    cudnn=str(torch.backends.cudnn.version()))
        if hasattr(torch.cuda, "nccl"):
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        info["cpu"] = cpu_model()
    return info


class Clock:
    """Host clock on CPU; CUDA events (after draining the stream) on a GPU."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"

    def start(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        torch.cuda.synchronize()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, t0: Any) -> float:
        if not self.cuda:
            return time.perf_counter() - t0
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        return t0.elapsed_time(ev) / 1e3


def _nbytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_nbytes(v) for v in tree)
    return 0


def _input_sets(bench: Bench) -> list[dict]:
    first = bench.args()
    n = int(np.clip(math.ceil(ROTATE_BYTES / max(_nbytes(first), 1)), 1, MAX_ROTATE))
    return [first] + [bench.args() for _ in range(n - 1)]


def time_bench(bench: Bench, repeats: int, warmup: int, sample_s: float, clock: Clock) -> tuple[np.ndarray, int, int]:
    """Per-call seconds of each sample, calls per sample, input sets rotated."""
    sets = _input_sets(bench)
    i = 0

    def once() -> float:
        nonlocal i
        a = sets[i % len(sets)]
        i += 1
        state = bench.prepare(a) if bench.prepare else None
        t0 = clock.start()
        bench.run(a, state)
        return clock.stop(t0)

    with grad_mode(bench):
        first = [once() for _ in range(max(warmup, 1))]
        inner = 1 if bench.prepare else int(np.clip(math.ceil(sample_s / max(min(first), 1e-9)), 1, 10_000))
        samples = []
        for _ in range(repeats):
            if inner == 1:
                samples.append(once())
                continue
            t0 = clock.start()
            for _ in range(inner):
                bench.run(sets[i % len(sets)], None)
                i += 1
            samples.append(clock.stop(t0) / inner)
    return np.asarray(samples), inner, len(sets)


def _ops(bench: Bench) -> list:
    a = bench.args()
    with grad_mode(bench):
        state = bench.prepare(a) if bench.prepare else None
        return record(lambda: bench.run(a, state))


def case_row(case: Any, level: Any, mk: Maker, clock: Clock, device_name: str) -> dict:
    """Time one case and describe it."""
    bench = build(case, mk)
    ops = _ops(bench)
    samples, inner, rotate = time_bench(bench, level.repeats, level.warmup, level.sample_s, clock)
    return {"family": case.family, "op": case.op, "model": case.model, "tp": case.tp, "batch": case.batch,
            "seq": case.seq, "kv": case.kv, "phase": case.phase, "size": case.size, "piece": case.piece,
            "layers": case.spec.layers if case.spec is not None else 0,
            "flops": sum(o.flops for o in ops), "bytes": sum(o.bytes for o in ops), "launches": len(ops),
            "work_ops": sum(o.work for o in ops),
            "median_s": float(np.median(samples)), "p10_s": float(np.percentile(samples, 10)),
            "p90_s": float(np.percentile(samples, 90)), "repeats": len(samples), "inner": inner,
            "rotate": rotate, "device": device_name, "dtype": str(mk.dtype).removeprefix("torch."),
            "ops": encode(ops)}


class _Threads:
    """One intra-op thread on CPU for the duration (each executor process runs so)."""

    def __init__(self, dev: torch.device):
        self.cpu, self.saved = dev.type == "cpu", torch.get_num_threads()

    def __enter__(self) -> None:
        if self.cpu:
            torch.set_num_threads(1)

    def __exit__(self, *exc: Any) -> None:
        if self.cpu:
            torch.set_num_threads(self.saved)


def measure(cases: list, level: Any, device: str = "cpu", dtype: str = "float32",
            progress: Callable[[int], object] | None = None, seed: int = 0,
            again: Callable[[Callable[[], list[dict]]], None] | None = None) -> pd.DataFrame:
    """One raw row per case (see :func:`case_row`), plus the composition rows. ``again``: called
    after each case (and after the composition rows) with a thunk that times it once more, for a
    caller that times each case a second way right after the first (:mod:`calibration.together`)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}")
    dev = torch_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    mk, clock = Maker(dev, DTYPES[dtype], seed), Clock(dev)
    rows = []
    with _Threads(dev):
        for case in cases:
            rows.append(case_row(case, level, mk, clock, name))
            if progress is not None:
                progress(1)
            if again is not None:
                again(lambda case=case: [case_row(case, level, mk, clock, name)])
        rows += measure_compose(mk, clock, level, name)
        if again is not None:
            again(lambda: measure_compose(mk, clock, level, name))
    return pd.DataFrame(rows)


def measure_compose(mk: Maker, clock: Clock, level: Any, device_name: str) -> list[dict]:
    """Rows ``compose``/{``big``, ``stream``, ``both``}: see the module docstring."""
    n = 8192 if clock.cuda else 256
    a, b = mk.randn(n, n), mk.randn(n, n)
    x = mk.randn(1)

    def big() -> None:
        torch.mm(a, b)

    def stream() -> None:
        for _ in range(COMPOSE_STREAM):
            torch.add(x, x)

    def both() -> None:
        big()
        stream()

    fns = {"big": big, "stream": stream, "both": both}
    samples: dict[str, list[float]] = {op: [] for op in fns}
    with torch.no_grad():
        for _ in range(max(level.warmup, 1)):
            both()
        for _ in range(level.repeats):  # round robin, so drifting load touches all three alike
            for op, fn in fns.items():
                t0 = clock.start()
                fn()
                samples[op].append(clock.stop(t0))
    rows = []
    for op, ts in samples.items():
        rows.append({"family": "compose", "op": op, "model": "", "tp": 1, "batch": 0, "seq": 0, "kv": 0,
                     "phase": "", "size": n if op != "stream" else COMPOSE_STREAM, "piece": False,
                     "flops": 2.0 * n ** 3 if op != "stream" else 0.0, "bytes": 0.0, "launches": 0,
                     "work_ops": 0, "median_s": float(np.median(ts)),
                     "p10_s": float(np.percentile(ts, 10)), "p90_s": float(np.percentile(ts, 90)),
                     "repeats": len(ts), "inner": 1, "rotate": 1, "device": device_name,
                     "dtype": str(mk.dtype).removeprefix("torch."), "ops": ""})
    return rows
