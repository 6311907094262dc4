"""Predict a plan's iteration time, per-call timeline and memory per device.

Usage::

    python -m estimator.predict examples/ppo-llama2-7b-8xh100.yaml
    python -m estimator.predict examples/ppo-llama2-7b-8xh100.yaml --json
    python -m estimator.predict examples/ppo-tiny-2xcpu.yaml --plan PLAN.json --iterations 5
    python -m estimator.predict examples/ppo-llama2-70b-128xh100.yaml --profile h100-sxm --trace trace.json
    python -m estimator.predict examples/dpo-llama3-8b-8xa100.yaml --profile calibration/profiles/a100-80g.json
    python -m estimator.predict --from verl overrides.txt --profile h100-vidur
    python -m estimator.predict --from areal config.yaml --profile h100-vidur --json
    python -m estimator.predict examples/grpo-llama3-8b-8xh100.yaml --stack executor

Without ``--plan`` it predicts the symmetric baseline (every call on all devices, tp across a
node, pp across nodes) and says so. ``--profile`` names a shipped profile or a profile file
(default: the cluster's device); ``--stack`` the software stack it prices (default: the
experiment's ``cluster.stack``, else ``megatron-vllm`` on a GPU and ``executor`` on a CPU;
:mod:`estimator.profile.pricing` says which profile then prices it, and the output names it).
``--trace`` writes a Chrome trace (open it in Perfetto).

Prints the steady-state iteration time, a per-call table (layout, start and duration in the
last simulated iteration, of which communication — collectives and moving inputs —, waiting
for inputs to be produced, and parameter reallocation; a verifier's host time is part of its
generate call's duration), peak memory
per device against capacity, model FLOP utilisation and the roofline lower bound. ``--json``
prints one object instead, with ``iteration_s``, ``profile``, ``profile_source`` (measured or
datasheet), ``profile_path``, ``stack`` (the software stack priced), ``op_set`` (``ops``: the op
set the profile charges, ``executor`` or ``fused``; ``stack``: the stack in words; ``stack_name``,
``terms``: whether the profile has the stack's own numbers, ``note``: why another profile of the
device prices it; ``text``: the line the table prints), ``feasible``, ``reasons``,
``peak_memory_bytes``, ``roofline_s``, ``mfu`` and ``calls.<name>.{start_s, duration_s, comm_s, wait_s,
realloc_s, reward_s, ...}`` (``reward_s``: a verifier's host time at the end of a generate call,
``reward_s_per_sample`` × the sequences of a data-parallel replica).

``--from FRAMEWORK CONFIG`` reads another framework's configuration instead of an experiment
file: the experiment and the plan it describes (:mod:`estimator.interop`; verl's Hydra overrides,
OpenRLHF's launch command, ReaLHF's Hydra overrides, AReaL's and NeMo-RL's YAML config, with the
keys ``python -m estimator.export`` writes; where a key is not given, the framework's default;
lengths at their caps, a config keeps only those, unless ``--gen-mean TOKENS`` gives the
responses' mean under the cap (continuous batching, as an experiment's ``gen_len: {max, mean}``);
the cluster's device is ``--profile``, default ``h100-sxm``), and predicts that plan; a key the
importer does not read exits 2 naming it.
The config's trainer names the stack priced (``cluster.stack``: NeMo-RL's and AReaL's
DTensor/FSDP trainer ``fsdp-vllm``, Megatron and verl's ``megatron-vllm``; ``--stack``
overrides it; OpenRLHF's DeepSpeed and ReaLHF's own trainer take the device's default).
``--json`` then also carries ``imported.experiment``, ``imported.plan`` and ``imported.notes``
(what the framework does that the plan does not say). The best plan for that config, overall
and inside the framework, is the search's: ``python -m search --from FRAMEWORK CONFIG``
(``--search`` here says so; the estimator does not import the search).

Exit codes: 0 predicted; 1 the plan does not fit in memory (the reasons are printed);
2 invalid experiment, profile or plan (one line per violated rule).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from estimator.base import rules
from estimator.base.errors import ConfigError, cli_guard
from estimator.base.io import check_output_path
from estimator.base.loading import check_input_path
from estimator.base.progress import LOG_INTERVAL_S, is_terminal
from estimator.base.tables import format_table
from estimator.baselines import symmetric_plan
from estimator.cost.lowering import Costs
from estimator.cost.memory import GiB, MemoryReport, plan_memory
from estimator.cost.roofline import mfu, roofline_s
from estimator.interop import IMPORTERS, importer
from estimator.profile.pricing import STACK_NAMES, default_stack, experiment_profile
from estimator.profile.profiles import Profile, load_profile, op_set
from estimator.sim.asynchrony import async_report
from estimator.sim.simulate import simulate
from estimator.sim.simulator import SimResult
from estimator.spec.experiment import Experiment, experiment_from_dict, load_experiment
from estimator.spec.plan import Plan, check
from estimator.spec.stack import EXECUTOR
from estimator.spec.stream import stream_problems

COMM_OPS = ("tp_allreduce", "dp_allreduce", "dp_reduce_scatter", "dp_allgather", "dp_shard_comm")
EXIT_INFEASIBLE = 1
TRACE_PER_DEVICE_MAX = 16  # larger clusters get one trace track per pipeline stage


class Progress:
    """Progress lines on stderr, only once a run has taken more than a second: every half second
    on a terminal, every :data:`estimator.base.progress.LOG_INTERVAL_S` in a log."""

    def __init__(self, quiet: bool = False):
        self.start = time.monotonic()
        self.last = self.start
        self.quiet = quiet
        self.every_s = 0.5 if is_terminal(sys.stderr) else LOG_INTERVAL_S

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if not self.quiet and now - self.start > 1.0 and now - self.last > self.every_s:
            print(f"  {message}", file=sys.stderr, flush=True)
            self.last = now


def call_rows(result: SimResult) -> dict[str, dict[str, float]]:
    """Per call of the last iteration: start (from the iteration's first start), duration, and
    of which communication (tensor/data-parallel collectives on its busiest stage, plus moving
    its inputs once they exist), waiting for inputs (until the last producer has finished: idle
    time, not communication), reallocation and host transfers of offloaded state (``host_s``,
    on its devices; a home's upload before it reallocates is in ``realloc_s``)."""
    last = max(result.records)[0]
    recs = {c: r for (it, c), r in result.records.items() if it == last}
    origin = min(r.start_s for r in recs.values())
    comm: dict[tuple[str, int], float] = {}
    reward: dict[str, float] = {}
    host: dict[tuple[str, int], float] = {}
    for start, end, _, it, call, op, _, stage, _ in result.rows:
        if it == last and op in COMM_OPS:
            comm[(call, stage)] = comm.get((call, stage), 0.0) + (end - start)
        elif it == last and op == "reward":
            reward[call] = end - start
        elif it == last and op == "offload" and stage >= 0:
            host[(call, stage)] = host.get((call, stage), 0.0) + (end - start)
    out = {}
    for c, r in recs.items():
        busiest = max((v for (call, _), v in comm.items() if call == c), default=0.0)
        out[c] = {"start_s": r.start_s - origin, "duration_s": r.duration_s,
                  "comm_s": busiest + r.data_s - r.wait_s, "wait_s": r.wait_s, "realloc_s": r.realloc_s,
                  "reward_s": reward.get(c, 0.0),
                  "host_s": max((v for (call, _), v in host.items() if call == c), default=0.0)}
    return out


def memory_groups(report: MemoryReport) -> list[tuple[str, float, str]]:
    """Consecutive devices with the same peak and call, as (device range, peak, call)."""
    out: list[tuple[int, int, float, str]] = []
    for d in report.devices:
        key = (round(d.peak_bytes / GiB, 1), d.during if d.call else "")
        if out and (out[-1][2], out[-1][3]) == key and out[-1][1] == d.device - 1:
            out[-1] = (out[-1][0], d.device, *key)
        else:
            out.append((d.device, d.device, *key))
    return [(str(a) if a == b else f"{a}-{b}", peak, call) for a, b, peak, call in out]


def predict(experiment: Experiment, plan: Plan, profile: Profile, iterations: int = 3,
            progress: Progress | None = None) -> tuple[SimResult, MemoryReport, dict[str, Any]]:
    """Simulate ``plan`` and check its memory; returns the result, the memory report and the
    summary object that ``--json`` prints."""
    costs = Costs(experiment, profile)
    result = simulate(experiment, plan, profile, iterations, costs=costs, progress=progress)
    memory = plan_memory(experiment, plan, profile.capacity_bytes, profile.stack)
    period = result.iteration_s
    rows = call_rows(result)
    summary = {
        "experiment": experiment.name,
        "profile": profile.name,
        "profile_source": profile.source,  # measured | datasheet
        "profile_path": profile.path,
        "stack": profile.stack,  # the software stack it is priced for (estimator.profile.pricing)
        "op_set": op_set(profile),  # the op costs and stack terms it is priced with (compute.ops)
        "iterations": result.iterations,  # simulated
        "warmup_iterations": result.warmup,  # before the steady state
        "drain_iterations": result.drain,  # after it (asynchronous: rollouts already generated)
        "max_staleness": experiment.max_staleness,
        "iteration_s": period,
        "feasible": memory.feasible,
        "reasons": memory.reasons(),
        "peak_memory_bytes": memory.peak.peak_bytes,
        "capacity_bytes": memory.capacity_bytes,
        "memory_per_device_bytes": [d.peak_bytes for d in memory.devices],
        "roofline_s": roofline_s(experiment, profile),
        "mfu": mfu(experiment, profile, period),
        "calls": {c: {**plan[c].to_dict(), **rows[c]} for c in experiment.workflow.topological_order()},
    }
    for c, v in summary["calls"].items():  # continuous-batching generation, in the last iteration
        ro = costs.call(c, plan[c], result.iterations - 1).rollout
        if ro is not None:
            v["generation"] = ro.summary()
    if experiment.workflow.asynchronous:
        summary["asynchrony"] = async_report(experiment, plan, result).to_dict()
        summary["asynchrony"]["streaming_mode"] = experiment.streaming
        # per streaming call, each replica's switch points: what the executor follows
        summary["asynchrony"]["switch_at"] = {g: s.switch_at for g, s in result.streams.items()}
        if experiment.streaming != "off":
            summary["asynchrony"]["not_streaming"] = {
                c.name: stream_problems(experiment, plan, c.name) for c in experiment.workflow.calls
                if c.kind == "generate" and c.name not in result.streams}
    return result, memory, summary


def _window(summary: dict[str, Any]) -> str:
    """Which simulated iterations the steady state is: all but the warm-up (and the drain)."""
    n, w, d = summary["iterations"], summary.get("warmup_iterations", 1), summary.get("drain_iterations", 0)
    text = f"steady state over {n} simulated iterations"
    if d:
        text = (f"steady state of iterations {w}-{n - d - 1} of {n} simulated: asynchronous with max staleness "
                f"{summary.get('max_staleness', 0)}, {w} warm-up and {d} drain iteration(s) left out")
    return text


def render(summary: dict[str, Any], memory: MemoryReport, plan_source: str) -> str:
    where = f"{summary['profile_source']}, {summary['profile_path']}" if summary.get("profile_path") else \
        summary["profile_source"]
    lines = [f"experiment {summary['experiment']} on profile {summary['profile']} ({where}): {plan_source}",
             summary["op_set"]["text"],
             f"predicted iteration time {summary['iteration_s']:.3f} s ({_window(summary)})"]
    a = summary.get("asynchrony")
    if a is not None:
        push = f"; weight push {a['push_s']:.3f} s to {', '.join(a['standing'])}" if a["standing"] else ""
        lines.append(f"{a['tokens_per_s']:,.0f} tokens trained/s; idle: rollout devices "
                     f"{100 * a['rollout_idle']:.1f} %, trainer devices {100 * a['trainer_idle']:.1f} %; "
                     "staleness of consumed samples mean "
                     f"{a['staleness_mean']:.2f}, max {a['staleness_max']}{push}")
        if a.get("streaming"):
            lines.append(f"streaming ({a['streaming_mode']}): {', '.join(a['streaming'])} serves consecutive "
                         "iterations as one stream, trained on as trajectories finish; "
                         f"{a['recomputed_tokens']:,} tokens prefilled again")
        for call, why in a.get("not_streaming", {}).items():
            lines.append(f"not streaming: {call}: {'; '.join(why)}")
    lines.append("")
    sharding = any("shard" in v for v in summary["calls"].values())  # a column only where a layout shards
    offloading = any("offload" in v for v in summary["calls"].values())  # … or offloads
    rows = [("call", "mesh", "dp", "tp", "pp", "micro") + (("shard",) if sharding else ())
            + (("offload",) if offloading else ())
            + ("start s", "duration s", "comm s", "wait s", "realloc s") + (("host s",) if offloading else ())]
    for c, v in summary["calls"].items():
        rows.append((c, v["mesh"], str(v["dp"]), str(v["tp"]), str(v["pp"]), str(v["micro_batches"]),
                     *((v.get("shard", "none"),) if sharding else ()),
                     *((v.get("offload", "none"),) if offloading else ()),
                     *(f"{v[k]:.3f}" for k in ("start_s", "duration_s", "comm_s", "wait_s", "realloc_s")),
                     *((f"{v['host_s']:.3f}",) if offloading else ())))
    lines += [format_table(rows), ""]
    gen = {c: v["generation"] for c, v in summary["calls"].items() if "generation" in v}
    if gen:
        rows = [("generation", "replicas", "engines", "cap", "KV pool", "peak running", "preempted", "tokens",
                 "tail s")]
        rows += [(c, str(g["replicas"]), str(g["engines_per_replica"]), str(g["max_concurrency"] or "-"),
                  f"{g['kv_tokens_per_engine']:,}" if g["kv_tokens_per_engine"] else "-", str(g["peak_running"]),
                  str(g["preemptions"]), f"{g['tokens']:,}", f"{g['tail_s']:.3f}") for c, g in gen.items()]
        lines += [format_table(rows), "(continuous batching, last simulated iteration; tail: from 90 % of "
                  "requests finished to the last)", ""]
    mem_rows = [("devices", "peak GiB", "capacity GiB", "largest call")]
    cap = f"{memory.capacity_bytes / GiB:.1f}"
    mem_rows += [(devs, f"{peak:.1f}", cap, call or "-") for devs, peak, call in memory_groups(memory)]
    lines += [format_table(mem_rows, right={1, 2}), ""]
    lines.append(f"model FLOP utilisation {100 * summary['mfu']:.1f} %")
    lines.append(f"roofline lower bound {summary['roofline_s']:.3f} s "
                 f"({summary['iteration_s'] / summary['roofline_s']:.2f}x above it)")
    lines.append("fits in memory" if summary["feasible"] else "DOES NOT FIT: " + "; ".join(summary["reasons"]))
    return "\n".join(lines)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m estimator.predict", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="experiment YAML file (with --from: the framework's config file)")
    parser.add_argument("--from", dest="source", metavar="FRAMEWORK",
                        help=f"read CONFIG of this framework ({', '.join(IMPORTERS)}) instead of an experiment file")
    parser.add_argument("--gen-mean", type=float, metavar="TOKENS",
                        help="with --from: responses of this mean length under the config's cap (log-normal, as "
                             "gen_len: {max, mean}); default: every response at the cap")
    parser.add_argument("--search", action="store_true",
                        help="with --from: the search's command for the best plans (python -m search --from)")
    parser.add_argument("--plan", help="plan JSON file (default: the symmetric baseline)")
    parser.add_argument("--profile", help="hardware profile name or file (default: the cluster's device)")
    parser.add_argument("--stack", choices=STACK_NAMES,
                        help="software stack to price (default: the experiment's cluster.stack, else megatron-vllm "
                             "on a GPU, executor on a CPU)")
    parser.add_argument("--iterations", type=int, default=3,
                        help="iterations to simulate (default 3; the first is warm-up)")
    parser.add_argument("--trace", help="write a Chrome trace (JSON) here")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    rules.integer("--iterations", args.iterations, lo=1, hi=rules.MAX_SIM_ITERATIONS)
    trace = check_output_path(args.trace, "--trace") if args.trace is not None else None
    if args.search:
        raise ConfigError(search_hint(args.source, args.experiment, args.profile, args.gen_mean))
    imported = None
    if args.source is not None:
        if args.plan is not None:
            importer(args.source)
            raise ConfigError(f"--plan: the {args.source} config describes the plan; give one or the other")
        experiment, plan, imported = import_config(args.source, args.experiment, args.profile, args.gen_mean)
    else:
        if args.gen_mean is not None:
            raise ConfigError("--gen-mean goes with --from FRAMEWORK CONFIG; an experiment file gives gen_len itself")
        experiment = load_experiment(args.experiment)
    profile = experiment_profile(experiment, args.profile, args.stack)
    if imported is not None:
        source = f"the plan of {args.source} config {args.experiment}"
    elif args.plan is not None:
        plan, source = check(Plan.load(args.plan), experiment), f"plan {args.plan}"
    else:
        plan, source = symmetric_plan(experiment, profile), "symmetric baseline plan (no --plan given)"
    progress = Progress(quiet=args.json)
    result, memory, summary = predict(experiment, plan, profile, args.iterations, progress)
    # One track per device up to TRACE_PER_DEVICE_MAX devices; beyond, one per pipeline stage
    # (its dp·tp devices run in lock-step) keeps the trace small enough for Perfetto.
    per_device = experiment.cluster.num_devices <= TRACE_PER_DEVICE_MAX
    if trace is not None:
        result.timeline(per_device).write_chrome_trace(trace)
    if args.json:
        print(json.dumps({**summary, "plan_source": source} | ({"imported": imported} if imported else {}),
                         indent=2))
    else:
        print(render(summary, memory, source))
        for note in (imported or {}).get("notes", []):
            print(f"note: {note}")
        if args.trace:
            tracks = "one track per device" if per_device else "one track per pipeline stage"
            print(f"wrote Chrome trace {args.trace} ({tracks}, plus one per link)")
    return 0 if memory.feasible else EXIT_INFEASIBLE


def search_hint(framework: str | None, config: str, profile: str | None, gen_mean: float | None = None) -> str:
    """Where ``--search`` goes: the search package's command (estimator sits below search)."""
    if framework is None:
        return "--search goes with --from FRAMEWORK CONFIG; for an experiment file: python -m search EXPERIMENT.yaml"
    importer(framework)
    flags = (f" --profile {profile}" if profile else "") + (f" --gen-mean {gen_mean:g}" if gen_mean else "")
    return (f"--search: the search is its own command: python -m search --from {framework} {config}{flags} (it "
            f"predicts the config, then finds the best plan overall and the best {framework} runs)")


def import_config(framework: str, path: str, profile: str | None,
                  gen_mean: float | None = None) -> tuple[Experiment, Plan, dict[str, Any]]:
    """The experiment and the checked plan that framework ``framework``'s config file at ``path``
    describes, on device ``profile`` (default ``h100-sxm``), and the record ``--json`` carries
    (``framework``, ``experiment`` as its file's mapping, ``plan``, ``notes``). A config keeps
    only the response cap; ``gen_mean`` (tokens) makes the responses the experiment file's
    ``gen_len: {max: cap, mean: gen_mean}`` instead of all at the cap."""
    read = importer(framework)
    device = profile or "h100-sxm"
    raw, plan, notes = read(_read_text(path), device)
    if raw["cluster"].get("stack") and default_stack(load_profile(device, key="--profile")) == EXECUTOR:
        # the framework's trainer is a production stack's; on a CPU device the executor prices it
        raw = raw | {"cluster": {k: v for k, v in raw["cluster"].items() if k != "stack"}}
    if gen_mean is not None:
        raw = raw | {"gen_len": {"max": raw["gen_len"], "mean": gen_mean}}
        notes = notes + [f"responses: a log-normal body of mean {gen_mean:g} tokens capped at {raw['gen_len']['max']} "
                         "(--gen-mean), drawn as an experiment file's gen_len: {max, mean}"]
    experiment = experiment_from_dict(raw, where=f"{framework} config {path}")
    imported = {"framework": framework, "experiment": raw, "plan": json.loads(plan.to_json()), "notes": notes}
    return experiment, check(plan, experiment), imported


def _read_text(path: str) -> str:
    target = check_input_path(path, "framework config")
    try:
        return target.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"framework config {path!r}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    return cli_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
