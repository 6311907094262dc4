"""Run a plan for real: K iterations of an experiment's workflow, timed per call.

On CPU it starts one gloo process per device of the experiment's cluster itself::

    python -m executor.run examples/ppo-tiny-2xcpu.yaml --plan examples/plans/ppo-tiny-2xcpu/dp2.json
    python -m executor.run examples/ppo-tiny-2xcpu.yaml --plan examples/plans/ppo-tiny-2xcpu/disjoint.json \\
        --iterations 4 --trace trace.json --json

On GPUs it runs under ``torchrun``, one process per GPU (NCCL, ``cuda:LOCAL_RANK``); rank 0
prints the results. Across nodes, run this on every node with its ``--node_rank``::

    torchrun --nnodes 16 --nproc_per_node 8 --node_rank N --master_addr HOST0 --master_port 29500 \\
        -m executor.run examples/ppo-llama2-70b-128xh100.yaml --plan plan.json --dtype bfloat16

The plan is validated first; an invalid plan exits with code 2 and one line per violated rule
before any process starts. So does a local run this host cannot hold: one process per device
of the experiment's cluster (all of them, even those the plan leaves idle, which a note says),
each holding what the estimator's memory model predicts for its device in the run's dtype plus
the Python and torch runtime, summed against the host's available memory (``MemAvailable``);
the error gives the figures. The first ``--warmup`` iterations (default 1 when there are more
than one) are left out of the steady-state iteration time. ``--json`` prints ``iteration_s``
(steady state), ``iterations_s`` (each), ``warmup_iterations``, ``drain_iterations`` and per
call ``duration_s`` (its compute, first start to last end over its devices), ``realloc_s``,
``data_s`` and ``span_s`` (entry to exit, waiting for inputs included).

An asynchronous experiment (``async: {max_staleness: η}``) runs as the estimator predicts it:
the rollouts of iteration j are generated η iterations ahead, with the weights of update
j − η − 1; a generate call on devices apart from the actor's home keeps a standing copy that a
weight push (``push:<call>`` in the timeline and under ``pushes``) refreshes after each update.
``--iterations`` counts as in ``python -m estimator.predict``: 2η warm-up and η drain iterations
are run besides them, and by default left out of the steady state with the first one. Under
``async.streaming`` (or ``--streaming recompute|keep``) a standing copy that runs nothing else
serves its rollouts as one stream across iterations (:mod:`executor.stream`), taking each
version at the switch points ``--switch-at`` gives (the prediction's: ``python -m
estimator.predict --json`` reports them under ``asynchrony.switch_at``, and
``analysis.validate`` passes them), else where the engine first needs it; ``--json`` says
which calls stream, and at which points, under ``streaming``.
A worker that fails stops the run with exit code 1, naming its rank and call; a rank that stops
responding (hung, or stopped with SIGSTOP) is the one named once its peers' collective timeout
expires (``--timeout-s``, default 300 s). Experiment, profile, plan, prompts, checkpoints and
output paths are all checked before torch is imported. SIGTERM or Ctrl-C stops every worker,
removes the run's temporary files and exits with 143 or 130 after one ``error:`` line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from estimator.base import rules
from estimator.base.errors import ConfigError, cli_guard
from estimator.base.io import check_output_path
from estimator.base.tables import format_table
from estimator.cost.lowering import Costs
from estimator.cost.rollout import continuous
from estimator.profile.profiles import Profile, load_profile
from estimator.spec.experiment import Experiment, load_experiment
from estimator.spec.plan import Plan, check
from estimator.spec.stream import streaming_calls
from estimator.spec.workflow import MAX_STALENESS, PUSH, STREAMING, steady_iterations
from executor.checkpoint import check_checkpoint
from executor.prompts import check_prompts

if TYPE_CHECKING:
    from executor.options import RunOptions
    from executor.runtime import RunResult

# torch (and everything that imports it) is imported only once the input is known to be valid:
# importing it takes seconds, and an invalid plan should be refused at once.
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
DTYPE_NAMES = ("bfloat16", "float32", "float64")  # executor.runtime.DTYPES; a test holds them equal
DEFAULT_TIMEOUT_S = 300.0  # executor.launch.DEFAULT_TIMEOUT_S; a test holds them equal


# What one process of a CPU run holds besides its model state: the interpreter, torch and gloo.
# Measured: the largest worker's peak RSS of `python -m executor.run examples/ppo-tiny-2xcpu.yaml
# --plan examples/plans/ppo-tiny-2xcpu/dp2.json --iterations 2` with torch 2.13 (CPU) was 299 MiB,
# its model state a few MiB; the parent process that starts the workers holds about as much.
PROCESS_BASE_BYTES = 300 * 2**20
DTYPE_BYTES = {"bfloat16": 2, "float32": 4, "float64": 8}


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so every ``finally`` (workers, temp files) runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted("SIGTERM")


def parse_fault(text: str | None) -> tuple[int, str] | None:
    """``RANK:CALL`` → (rank, call)."""
    if text is None:
        return None
    m = re.fullmatch(r"([0-9]{1,9}):(.+)", text)
    if m is None:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise ConfigError(f"--inject-fault {shown!r} must look like RANK:CALL, e.g. 1:actor_train")
    return int(m.group(1)), m.group(2)


def check_fault(fault: tuple[int, str] | None, experiment: Experiment, plan: Plan) -> None:
    """A fault must name a rank and a call that rank runs, or it would never fire."""
    if fault is None:
        return
    rank, call = fault
    world = experiment.cluster.num_devices
    if rank >= world:
        raise ConfigError(f"--inject-fault: rank {rank} is out of range; the cluster has ranks 0-{world - 1}")
    if call not in experiment.workflow:
        raise ConfigError(f"--inject-fault: unknown call {call!r}; calls: {list(experiment.workflow.call_names)}")
    mesh = plan[call].mesh
    if rank not in mesh.devices:
        raise ConfigError(f"--inject-fault: rank {rank} never runs {call} (its mesh is {mesh}), so the fault "
                          "would never fire")


def options_from(args: argparse.Namespace, experiment: Experiment, plan: Plan) -> tuple[int, int, tuple | None]:
    """Check the flags; (iterations to run, warm-up iterations, fault). An asynchronous
    workflow runs its warm-up and drain besides ``--iterations`` (:func:`steady_iterations`)
    and leaves them out of the steady state by default, as the simulator does."""
    rules.integer("--iterations", args.iterations, lo=1, hi=rules.MAX_RUN_ITERATIONS)
    wf = experiment.workflow
    total = steady_iterations(wf, args.iterations)
    # the first iteration is warm-up when there are more; an asynchronous run's 2η more always are
    warmup = args.warmup if args.warmup is not None else wf.warmup - (0 if args.iterations > 1 else 1)
    if not 0 <= warmup < total - wf.drain:
        extra = (f" (with max_staleness={wf.staleness}, {total} iterations run, the last {wf.drain} of them "
                 "drain)") if wf.asynchronous else ""
        raise ConfigError(f"--warmup={warmup} must be below --iterations={args.iterations}{extra}")
    rules.real("--timeout-s", args.timeout_s, positive=True, hi=rules.MAX_TIMEOUT_S)
    fault = parse_fault(args.inject_fault)
    check_fault(fault, experiment, plan)
    return total, warmup, fault


def host_available_bytes() -> tuple[float, str] | None:
    """Memory this host can give a new run without swapping, and where the figure comes from:
    ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the free pages ``os.sysconf`` reports;
    None when neither is known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemAvailable" and value.split()[1:] == ["kB"]:
                return float(value.split()[0]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "free pages (os.sysconf)"
    except (ValueError, OSError, AttributeError):
        return None


def in_run_dtype(parts: dict[str, float], dtype: str) -> dict[str, float]:
    """The memory model's bytes by part (:mod:`estimator.cost.memory`: bf16 weights, gradients,
    copies, activations and KV cache; 12 bytes of fp32 Adam state per parameter) as the
    executor holds them in ``dtype``: tensors scale with the element size; a 16-bit run keeps
    fp32 master weights and moments (12 bytes per parameter, as modelled), a float32 or
    float64 run updates its parameters in place and keeps two moments of its own dtype."""
    scale = DTYPE_BYTES[dtype] / DTYPE_BYTES["bfloat16"]
    out = {k: v * scale for k, v in parts.items()}
    if "optimizer" in parts and DTYPE_BYTES[dtype] >= 4:
        out["optimizer"] = parts["optimizer"] * (2 * DTYPE_BYTES[dtype]) / 12
    return out


def check_host_memory(experiment: Experiment, plan: Plan, dtype: str,
                      available: tuple[float, str] | None = None) -> str | None:
    """Refuse a CPU run this host cannot hold, before any process starts.

    A local run starts one process per device of the experiment's cluster on this host, each
    holding what the memory model predicts for its device (:func:`estimator.cost.memory.plan_memory`,
    in the run dtype: :func:`in_run_dtype`) plus :data:`PROCESS_BASE_BYTES`, and the parent one
    more base. Raises :class:`ConfigError` with the figures when their sum exceeds the host's
    available memory (:func:`host_available_bytes`); returns a note when the plan leaves some of
    the cluster's devices idle (their processes start all the same), else None."""
    from estimator.cost.memory import fmt_bytes, plan_memory

    world = experiment.cluster.num_devices
    used = sorted({d for lay in plan.layouts.values() for d in lay.mesh.devices})
    idle = "" if len(used) == world else (
        f"the plan uses {len(used)} of the cluster's {world} devices ({', '.join(map(str, used))}), but a run "
        f"starts one process per device of the cluster, so {world - len(used)} of them only idle")
    memory = plan_memory(experiment, plan, float("inf"), None)
    per_device = [in_run_dtype(d.parts, dtype) for d in memory.devices]
    totals = [sum(p.values()) + PROCESS_BASE_BYTES for p in per_device]
    need = sum(totals) + PROCESS_BASE_BYTES
    available = available if available is not None else host_available_bytes()
    if available is not None and need > available[0]:
        worst = max(range(world), key=lambda d: (totals[d], -d))
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in per_device[worst].items() if v > 0)
        raise ConfigError(
            f"this host cannot hold the run: it needs about {fmt_bytes(need)} of host memory and "
            f"{fmt_bytes(available[0])} is available ({available[1]}): {world} worker processes on this host, "
            f"one per device of {experiment.name}'s {world}-device cluster, the fullest (device {worst}, during "
            f"{memory.devices[worst].call or 'no call'}) {fmt_bytes(totals[worst])} in {dtype} ({parts}, plus "
            f"{fmt_bytes(PROCESS_BASE_BYTES)} of Python and torch per process, the parent's included)"
            + (f"; {idle}" if idle else "")
            + "; run a smaller experiment (e.g. examples/*-tiny-2xcpu.yaml) or run it on its GPUs under torchrun")
    return f"note: {idle}" if idle else None


def run_local(experiment: Experiment, plan: Plan, options: RunOptions,
              timeout_s: float = DEFAULT_TIMEOUT_S) -> RunResult:
    """Run on this machine: one gloo process per device of the experiment's cluster."""
    from executor.launch import launch

    world = experiment.cluster.num_devices
    if options.progress:
        print(f"starting {world} gloo worker processes (one per device of {experiment.name})", file=sys.stderr,
              flush=True)
    results = launch(world, _run_rank, (experiment, plan, options), timeout_s=timeout_s)
    from executor.runtime import merge

    return merge(results, experiment, plan, options, backend="gloo", world_size=world)


def _run_rank(*args: Any) -> Any:
    """:func:`executor.runtime.run_rank`, imported in the worker: the parent never imports torch
    before its workers start (their own import of it is the start-up's largest part)."""
    from executor.runtime import run_rank

    return run_rank(*args)


def run_torchrun(experiment: Experiment, plan: Plan, options: RunOptions, timeout_s: float) -> RunResult | None:
    """Run as one rank started by torchrun; rank 0 returns the merged result, others None."""
    import torch
    import torch.distributed as dist

    from executor.runtime import merge, run_rank

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != experiment.cluster.num_devices:
        raise ConfigError(f"torchrun started {world} processes; the experiment's cluster has "
                          f"{experiment.cluster.num_devices} devices")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if rank == 0 and options.progress:
        print(f"rank 0 of {world} under torchrun ({backend}) started", file=sys.stderr, flush=True)
    where = ["start-up"]  # what this rank is doing; run_rank appends as it goes
    try:
        result = run_rank(rank, world, where.append, experiment, plan, options, device)
        gathered: list[Any] = [None] * world if rank == 0 else []
        dist.gather_object(result, gathered if rank == 0 else None, dst=0)
    except Exception as exc:
        # torchrun stops the other ranks; say where this one was (no teardown: peers may hang in it)
        print(f"error: rank {rank} failed in {where[-1]}: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise
    # Free every process group before destroying them: torch's first optimizer leaves a traceback
    # cycle (a lazy import) that pins this rank's runtime, and a gloo group still alive at
    # interpreter exit aborts the process ("terminate called without an active exception").
    gc.collect()
    dist.destroy_process_group()
    return merge(gathered, experiment, plan, options, backend=backend, world_size=world) if rank == 0 else None


def report(result: RunResult, experiment: Experiment, plan: Plan,
           points: dict[str, list[tuple[int, ...]]] | None = None) -> dict[str, Any]:
    stats = result.call_stats()
    empty = {"duration_s": 0.0, "span_s": 0.0, "realloc_s": 0.0, "data_s": 0.0}
    return {
        "experiment": experiment.name,
        "iteration_s": result.iteration_s,
        "iterations_s": result.iterations_s,
        "warmup_iterations": result.warmup,
        "drain_iterations": result.drain,
        "max_staleness": experiment.workflow.staleness,
        "streaming": {"mode": experiment.streaming, "calls": sorted(streaming_calls(experiment, plan)),
                      "switch_at": {c: [list(p) for p in ps] for c, ps in (points or {}).items()}},
        "initial_weights": {role: experiment.checkpoints.get(role, "seeded") for role in experiment.models},
        "calls": {name: {**stats.get(name, empty), **plan[name].to_dict()}
                  for name in experiment.workflow.topological_order()},
        # weight pushes to standing rollout copies: duration_s is the push itself
        "pushes": {name: stats[name] for name in sorted(stats) if name.startswith(PUSH)},
    }


def table(rep: dict[str, Any], experiment: Experiment) -> str:
    warm, drain, n = rep["warmup_iterations"], rep["drain_iterations"], len(rep["iterations_s"])
    drained = drain if n > warm + drain else 0

    def note(i: int) -> str:
        return "warm-up (excluded)" if i < warm else "drain (excluded)" if i >= n - drained else ""

    its = [("iteration", "time_s", "")] + [(str(i), f"{t:.4f}", note(i)) for i, t in enumerate(rep["iterations_s"])]
    rows = [("call", "role", "kind", "mesh", "dp", "tp", "pp", "mb", "compute_s", "realloc_s", "data_s", "span_s")]
    for name, c in rep["calls"].items():
        call = experiment.workflow[name]
        times = (f"{c[k]:.4f}" for k in ("duration_s", "realloc_s", "data_s", "span_s"))
        rows.append((name, call.role, call.kind, c["mesh"], str(c["dp"]), str(c["tp"]), str(c["pp"]),
                     str(c["micro_batches"]), *times))
    homes = experiment.workflow.home_calls()
    for name, c in rep["pushes"].items():  # home mesh → the standing copy's
        target = name[len(PUSH):]
        role = experiment.workflow[target].role
        meshes = f"{rep['calls'][homes[role]]['mesh']}→{rep['calls'][target]['mesh']}"
        rows.append((name, role, "push", meshes, "", "", "", "", f"{c['duration_s']:.4f}", "", "",
                     f"{c['span_s']:.4f}"))
    left = f"{warm} warm-up iteration{'s' if warm != 1 else ''}" + (f" and {drained} drain" if drained else "")
    steady = (f"steady-state iteration: {rep['iteration_s']:.4f} s (excludes {left})" if warm else
              f"iteration: {rep['iteration_s']:.4f} s (no warm-up excluded; use --iterations > 1)")
    if rep["max_staleness"]:
        steady += f"; asynchronous, max_staleness {rep['max_staleness']}"
    if rep["streaming"]["calls"]:
        steady += f"; {', '.join(rep['streaming']['calls'])} streamed ({rep['streaming']['mode']})"
    weights = "initial weights: " + "; ".join(f"{role} {src}" for role, src in rep["initial_weights"].items())
    return "\n\n".join([format_table(its, right={1}), format_table(rows, right=set(range(4, 12))), steady,
                        weights])


def stream_points(experiment: Experiment, plan: Plan, options: RunOptions) -> dict[str, list[tuple[int, ...]]]:
    """Every streaming call's switch points per replica as the run will take them
    (:func:`executor.stream.engine_streams`; a ConfigError where the rule refuses given ones).
    Imports torch only where a call streams."""
    calls = sorted(streaming_calls(experiment, plan))
    if not calls:
        return {}
    from executor.stream import engine_streams

    return {c: [s.switch_at for s in engine_streams(experiment, plan, c, options)] for c in calls}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m executor.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", help="experiment YAML file")
    ap.add_argument("--plan", required=True, help="plan JSON file (rlhf-plan/plan-v1)")
    ap.add_argument("--iterations", type=int, default=3, help="iterations to run (default 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="iterations left out of the steady-state time (default 1 if iterations > 1)")
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="parameter dtype (default float32)")
    ap.add_argument("--trace", help="write a Chrome trace (Perfetto) of the measured timeline here")
    ap.add_argument("--timeline", help="write the measured timeline (rlhf-plan/timeline-v1 JSON) here")
    ap.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                    help=f"collective timeout per operation (default {DEFAULT_TIMEOUT_S:.0f})")
    ap.add_argument("--max-staleness", type=int, default=None,
                    help="train asynchronously with this staleness η, overriding the experiment's async.max_staleness")
    ap.add_argument("--streaming", choices=STREAMING, default=None,
                    help="serve a standing rollout copy as one stream (recompute | keep) or not (off), overriding "
                         "the experiment's async.streaming; needs max_staleness ≥ 1")
    ap.add_argument("--switch-at", metavar="JSON",
                    help='a streaming call\'s switch points per replica (ops run when it takes each version), '
                         'e.g. \'{"actor_gen": [[398, 610]]}\'; default: where each replica needs the version')
    ap.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    ap.add_argument("--inject-fault", metavar="RANK:CALL",
                    help="testing only: RANK exits abruptly when it starts CALL's compute")
    return ap


def engine_pools(experiment: Experiment, plan: Plan, profile: Profile) -> dict[str, int]:
    """KV tokens per engine replica of every continuous-batching generate call: the pool the
    estimator gives it (:mod:`estimator.cost.rollout`, ``kv_fraction`` of the experiment's
    device), so the run admits and preempts as predicted."""
    costs = Costs(experiment, profile)
    wf = experiment.workflow
    return {c: costs.kv_tokens(c, plan[c]) * plan[c].micro_batches for c in wf.call_names
            if continuous(wf[c], plan[c])}


def with_async(experiment: Experiment, max_staleness: int | None, streaming: str | None) -> Experiment:
    """The experiment under ``--max-staleness`` and ``--streaming`` (None: the file's
    ``async.max_staleness`` / ``async.streaming``; a new η keeps the file's streaming where it
    allows one)."""
    if max_staleness is None and streaming is None:
        return experiment
    eta = experiment.max_staleness if max_staleness is None else rules.integer(
        "--max-staleness", max_staleness, lo=0, hi=MAX_STALENESS)
    if streaming not in (None, "off") and eta < 1:
        raise ConfigError(f"--streaming {streaming} needs max_staleness ≥ 1 (--max-staleness), not {eta}: with 0 "
                          "no rollout of the next iteration may start before the update")
    return experiment.with_staleness(eta, streaming)


def parse_switch_at(text: str | None, experiment: Experiment, plan: Plan) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``--switch-at`` JSON → call → per replica its switch points; each call must stream under
    the plan and have one list of whole numbers, in order, per data-parallel replica."""
    if text is None:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--switch-at is not JSON ({exc.msg} at character {exc.pos})") from None
    streaming = streaming_calls(experiment, plan)
    if not isinstance(raw, dict):
        raise ConfigError('--switch-at must be an object, call → per replica a list of ops, e.g. {"actor_gen": [[96]]}')
    out = {}
    for call, points in raw.items():
        if call not in streaming:
            raise ConfigError(f"--switch-at: {call!r} does not stream under this plan (streaming: "
                              f"{', '.join(sorted(streaming)) or 'none'})")
        ok = isinstance(points, list) and len(points) == plan[call].dp and all(
            isinstance(p, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p)
            and p == sorted(p) for p in points)
        if not ok:
            raise ConfigError(f"--switch-at {call}: {json.dumps(points)[:80]} must be {plan[call].dp} list(s) (one a "
                              "replica) of ops run, whole numbers ≥ 0 in order")
        out[call] = tuple(tuple(p) for p in points)
    return out


def check_models(experiment: Experiment) -> None:
    """The executor's transformer has no q/k norms and heads exactly hidden/heads wide: refuse a
    model that needs either (Qwen3) with the reason, before any process starts."""
    for role, m in experiment.models.items():
        if m.qk_norm or m.attention_head_dim:
            raise ConfigError(f"models.{role}: model {m.name!r} has "
                              + ("q/k norms" if m.qk_norm else "")
                              + (" and " if m.qk_norm and m.attention_head_dim else "")
                              + (f"heads of {m.head_dim} (not hidden/heads)" if m.attention_head_dim else "")
                              + ", which this project's executor does not implement; the estimator prices it "
                              "on a production stack (cluster.stack)")


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    # Everything is checked here, before torch is imported or any process starts.
    outputs = {flag: check_output_path(getattr(args, flag.strip("-")), flag)
               for flag in ("--trace", "--timeline") if getattr(args, flag.strip("-")) is not None}
    experiment = load_experiment(args.experiment)
    check_models(experiment)
    experiment = with_async(experiment, args.max_staleness, args.streaming)
    profile = load_profile(experiment.cluster.device, key="cluster.device")
    plan = check(Plan.load(args.plan), experiment)
    kv_tokens = engine_pools(experiment, plan, profile)
    iterations, warmup, fault = options_from(args, experiment, plan)
    switch_at = parse_switch_at(args.switch_at, experiment, plan)
    check_prompts(experiment)
    for role, path in experiment.checkpoints.items():
        try:
            check_checkpoint(path, experiment.models[role])
        except ConfigError as exc:
            raise ConfigError(f"models.{role}: {exc}") from None

    from executor.launch import WorkerFailed
    from executor.options import RunOptions

    options = RunOptions(iterations, warmup, args.dtype, fault=fault, timeout_s=args.timeout_s, progress=True,
                         kv_tokens=kv_tokens, drain=experiment.workflow.drain, switch_at=switch_at)
    points = stream_points(experiment, plan, options)  # refuses points the rule refuses, before any process starts
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not under_torchrun:  # every process of a local run lives on this host
        note = check_host_memory(experiment, plan, args.dtype)
        if note:
            print(note, file=sys.stderr)
    try:
        if under_torchrun:
            result = run_torchrun(experiment, plan, options, args.timeout_s)
        else:
            result = run_local(experiment, plan, options, args.timeout_s)
    except WorkerFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.details:
            print(exc.details.rstrip(), file=sys.stderr)
        return EXIT_FAILED
    if result is None:  # a torchrun rank other than 0
        return 0
    if "--trace" in outputs:
        result.timeline.write_chrome_trace(outputs["--trace"])
    if "--timeline" in outputs:
        result.timeline.save(outputs["--timeline"])
    rep = report(result, experiment, plan, points)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(table(rep, experiment))
    # where the files went: after the table, or on stderr so that --json's stdout stays one object
    wrote = {"--trace": f"wrote Chrome trace {args.trace} (open it in Perfetto)",
             "--timeline": f"wrote measured timeline {args.timeline} (rlhf-plan/timeline-v1)"}
    for flag in outputs:
        print(wrote[flag], file=sys.stderr if args.json else sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; SIGTERM and Ctrl-C stop the workers, print one line and exit 130/143."""
    in_main_thread = _is_main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return cli_guard(_main, argv)
    except KeyboardInterrupt as exc:
        how = "SIGTERM" if isinstance(exc, Interrupted) else "Ctrl-C"
        print(f"error: interrupted by {how}; every worker was stopped", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Interrupted) else EXIT_INTERRUPTED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
