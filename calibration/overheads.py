"""Fixed costs of the executor's runtime: per call and per micro-batch pass through a stage.

Measured on minimal work — a tiny model on one device, micro-batches of one row of one or two
tokens — by running the executor's own code and comparing it with the kernels it runs:

- ``stage_kernels``: one stage pass as bare model functions (embedding, rotary context,
  blocks, final norm and head of :mod:`executor.model`) on one token;
- ``engine_forward`` at 1, 2, 4, 8 micro-batches: :meth:`executor.engine.Engine.forward` on
  the same one-token micro-batches, with a :class:`executor.recorder.Recorder` marking each
  micro-batch as the runtime does. Its time outside the marked micro-batch computations
  (``engine_forward_unmarked``: each run less its own marked spans, so a preemption that hits
  the kernels cancels) grows by the engine's bookkeeping per micro-batch (input hand-off,
  marks, output lists): the slope over micro-batches;
- ``call`` at 1, 2, 4, 8 micro-batches: what the runtime does per call around the compute
  (:meth:`executor.runtime.RankRuntime._compute`): build the :class:`Engine` and the
  :class:`executor.calls.CallRun`, open the recorder's spans and run an inference call
  (``ref_inf``: forward and response log-probs) through :func:`executor.calls.run_call`.
  The intercept at zero micro-batches of its time outside the marked computations
  (``call_unmarked``) is the fixed cost of a call.

:func:`calibration.fit_compute.executor_section` turns these rows into the profile's
``executor`` section.

Usage::

    from calibration.overheads import measure_overheads
    rows = measure_overheads(device="cpu", repeats=31)   # a DataFrame of raw rows, ≈2 s
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from calibration.aten import record
from calibration.timing import DTYPES, Clock, _Threads, torch_device
from estimator.base.errors import ConfigError
from estimator.spec.cluster import Cluster, DeviceMesh
from estimator.spec.experiment import Experiment
from estimator.spec.models import PRESETS
from estimator.spec.plan import Layout
from estimator.spec.workflow import VALUE_ROLES, WorkflowParams
from executor import model as M
from executor.calls import CallRun, run_call
from executor.comm import GroupRegistry
from executor.engine import Engine
from executor.recorder import Recorder

MODEL = "tiny-2l-128h"
MICRO_BATCHES = (1, 2, 4, 8)


def _experiment(rows: int) -> Experiment:
    """PPO on the tiny model with ``rows`` sequences of one prompt and one generated token."""
    m = PRESETS[MODEL]
    roles = ("actor", "critic", "ref", "reward")
    models = {r: (m.as_value_model() if r in VALUE_ROLES else m) for r in roles}
    return Experiment("ppo", models, WorkflowParams(rows, 1, 1, 1, 1), Cluster(1, 1, "cpu"))


def _row(op: str, batch: int, seq: int, samples: np.ndarray, launches: int, device: str, dtype: str) -> dict:
    return {"family": "executor", "op": op, "model": MODEL, "tp": 1, "batch": batch, "seq": seq, "kv": 0,
            "phase": "", "size": 0, "piece": False, "flops": 0.0, "bytes": 0.0, "launches": launches,
            "work_ops": 0, "median_s": float(np.median(samples)), "p10_s": float(np.percentile(samples, 10)),
            "p90_s": float(np.percentile(samples, 90)), "repeats": len(samples), "inner": 1, "rotate": 1,
            "device": device, "dtype": dtype, "ops": ""}


def _time(fn: Callable[[], object], repeats: int, warmup: int, clock: Clock) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = clock.start()
        fn()
        out.append(clock.stop(t0))
    return np.asarray(out)


def measure_overheads(device: str = "cpu", dtype: str = "float32", repeats: int = 31, warmup: int = 5,
                      progress: Callable[[int], object] | None = None) -> pd.DataFrame:
    """Raw rows ``executor``/{``stage_kernels``, ``engine_forward[_unmarked]``, ``call[_unmarked]``} (see the module
    docstring); ``progress(1)`` after each of the ``1 + 2·len(MICRO_BATCHES)`` measurements."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}")
    dev, dt = torch_device(device), DTYPES[dtype]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    clock = Clock(dev)
    model = PRESETS[MODEL]
    params = {n: t.to(dev) for n, t in M.init_params(model, seed=0, dtype=dt).items()}
    token = torch.zeros((1, 1), dtype=torch.long, device=dev)
    rows = []

    def tick() -> None:
        if progress is not None:
            progress(1)

    with _Threads(dev), torch.no_grad():
        def kernels() -> torch.Tensor:
            x = M.embed(params, token)
            ctx = M.context(model, 0, 1, x.dtype, x.device)
            return M.final(params, M.blocks(params, range(model.layers), x, ctx), model)

        rec = Recorder(0, dev)
        configs: list[tuple[str, int, int, Callable[[], object]]] = [("stage_kernels", 1, 1, kernels)]
        for m in MICRO_BATCHES:
            layout = Layout(DeviceMesh(0, 1), 1, 1, 1, micro_batches=m)
            engine = Engine(model, layout, 0, params, GroupRegistry(1), dev,
                            mark=lambda op, mb: rec.fine(0, "bench", op, mb, 0))
            configs.append(("engine_forward", m, 1, lambda e=engine, b=[token] * m: e.forward(b)))
            configs.append(("call", m, 2, _call(m, params, dev, rec)))
        samples: list[list[float]] = [[] for _ in configs]
        outside: list[list[float]] = [[] for _ in configs]
        for _ in range(warmup):
            for *_, fn in configs:
                fn()
        for _ in range(repeats):  # round robin, so drifting load touches every configuration alike
            for k, (*_, fn) in enumerate(configs):
                rec.spans.clear()
                total = _time(fn, 1, 0, clock)[0]
                rec.finish()
                marked = sum(sp.end_s - sp.start_s for sp in rec.spans if sp.micro_batch >= 0)
                samples[k].append(total)
                outside[k].append(total - marked)
        for (op, m, seq, fn), ts, out in zip(configs, samples, outside):
            rows.append(_row(op, m, seq, np.asarray(ts), len(record(fn)) if op == "stage_kernels" else 0, name,
                             dtype))
            if op != "stage_kernels":
                rows.append(_row(op + "_unmarked", m, seq, np.asarray(out), 0, name, dtype))
            tick()
    return pd.DataFrame(rows)


def _call(m: int, params: M.Params, dev: torch.device, rec: Recorder) -> Callable[[], object]:
    """One ``ref_inf`` call of ``m`` one-row micro-batches, as the runtime runs a call."""
    exp = _experiment(m)
    call = exp.workflow["ref_inf"]
    layout = Layout(DeviceMesh(0, 1), 1, 1, 1, micro_batches=m)
    seq = torch.zeros((m, 2), dtype=torch.long, device=dev)
    inputs = {"seq": [((0, m), seq)]}

    def run() -> object:
        with rec.span(0, call.name, "call", 0):
            engine = Engine(exp.models["ref"], layout, 0, params, GroupRegistry(1), dev,
                            mark=lambda op, mb: rec.fine(0, call.name, op, mb, 0))
            c = CallRun(exp, call, layout, 0, 0, engine, inputs, span=lambda op: rec.span(0, call.name, op, 0))
            with rec.span(0, call.name, "compute", 0):
                return run_call(c, None)

    return run
