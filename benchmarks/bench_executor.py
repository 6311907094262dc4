"""The executor's overhead against a plain torch loop, and its reallocation throughput.

Both run the same math on one CPU thread in a process of their own: the executor under the
single-device plan (runtime, engine, data movement, span recording), and
:mod:`executor.reference`, the textbook single-process loop over the same model functions. The
first ``--warmup`` iterations are left out of both. Goal: overhead ≤ 10 %. Then the
reallocation table of :mod:`benchmarks.bench_realloc` (goal: ≥ 70 % of gloo's point-to-point
bandwidth; ``--skip-realloc`` leaves it out)::

    python benchmarks/bench_executor.py
    python benchmarks/bench_executor.py --model tiny-4l-256h --iterations 6 --rounds 5
    python benchmarks/bench_executor.py --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from estimator.base.errors import cli_guard
from estimator.base.tables import format_table
from estimator.spec.cluster import Cluster, DeviceMesh
from estimator.spec.experiment import Experiment, load_experiment
from estimator.spec.models import get_model
from estimator.spec.plan import Layout, Plan
from estimator.spec.workflow import VALUE_ROLES
from executor.launch import launch
from executor.runtime import DTYPES, RunOptions, merge, run_rank

try:
    from benchmarks import bench_realloc  # python -m benchmarks.bench_executor
except ImportError:  # python benchmarks/bench_executor.py: this folder is on sys.path
    import bench_realloc

DEFAULT_EXPERIMENT = "examples/ppo-tiny-2xcpu.yaml"


def one_device(experiment: Experiment, model: str | None) -> Experiment:
    """The experiment on a one-device cluster, optionally with another model for every role."""
    models = experiment.models
    if model is not None:
        spec = get_model(model)
        models = {r: spec.as_value_model() if r in VALUE_ROLES else spec for r in models}
    return dataclasses.replace(experiment, models=models, cluster=Cluster(1, 1, "cpu"))


def _reference(rank: int, world: int, status, experiment: Experiment, iterations: int, dtype: str) -> list[float]:
    from executor import reference as R

    params = R.init_roles(experiment, DTYPES[dtype])
    optimizers = {}
    for role in ("actor", "critic"):
        for t in params[role].values():
            t.requires_grad_(True)
        optimizers[role] = torch.optim.Adam(list(params[role].values()), lr=experiment.hyper.lr)
    times = []
    for it in range(iterations):
        start = time.perf_counter()
        R.ppo_iteration(experiment, params, optimizers, it)
        times.append(time.perf_counter() - start)
    return times


def measure(experiment: Experiment, iterations: int, warmup: int, dtype: str, rounds: int) -> dict[str, float]:
    """Best of ``rounds`` alternating runs of each loop's steady-state iteration time: on a
    shared machine other work only ever adds time, so the minimum is the least disturbed."""
    plan = Plan({c: Layout(DeviceMesh(0, 1), 1, 1, 1, 1) for c in experiment.workflow.call_names})
    options = RunOptions(iterations, warmup, dtype)
    executor, plain = [], []
    for i in range(rounds):
        result = merge(launch(1, run_rank, (experiment, plan, options)), experiment, plan, options)
        executor.append(result.iteration_s)
        (ref_times,) = launch(1, _reference, (experiment, iterations, dtype))
        plain.append(statistics.fmean(ref_times[warmup:]))
        print(f"round {i + 1}/{rounds}: executor {executor[-1]:.4f} s, plain torch {plain[-1]:.4f} s",
              file=sys.stderr, flush=True)
    executor_s, plain_s = min(executor), min(plain)
    return {"executor_s": executor_s, "plain_torch_s": plain_s, "overhead": executor_s / plain_s - 1.0,
            "executor_rounds_s": executor, "plain_torch_rounds_s": plain}


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_executor", description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", nargs="?", default=DEFAULT_EXPERIMENT, help="a ppo experiment YAML")
    ap.add_argument("--model", help="model preset for every role (default: the experiment's)")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="alternating runs of each loop; the best counts")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--skip-realloc", action="store_true", help="leave out the reallocation throughput table")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    exp = one_device(load_experiment(args.experiment), args.model)
    if exp.algorithm != "ppo":
        ap.error("the plain-torch baseline runs ppo experiments")
    out = measure(exp, args.iterations, args.warmup, args.dtype, args.rounds)
    out.update(model=exp.models["actor"].name, iterations=args.iterations, warmup=args.warmup, dtype=args.dtype,
               rounds=args.rounds)
    realloc = [] if args.skip_realloc else bench_realloc.run(bench_realloc.BENCH_MODEL, 5, torch.float32)
    if args.json:
        print(json.dumps({**out, "realloc": realloc}, indent=2))
        return 0
    rows = [("loop", "iteration_s", "vs plain torch"),
            ("plain torch (executor.reference)", f"{out['plain_torch_s']:.4f}", ""),
            ("executor, single-device plan", f"{out['executor_s']:.4f}", f"{100 * out['overhead']:+.1f} %")]
    print(f"PPO, {out['model']}, {args.dtype}, 1 CPU thread; best of {args.rounds} rounds, each the mean of "
          f"{args.iterations - args.warmup} iterations after {args.warmup} warm-up")
    print(format_table(rows))
    if realloc:
        model = bench_realloc.BENCH_MODEL
        print(f"\nreallocation, {model.name} ({model.params / 1e6:.0f}M parameters, float32), 2 gloo processes, "
              "median of 5; goal >= 70 % of point-to-point bandwidth")
        print(bench_realloc.table(realloc))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
