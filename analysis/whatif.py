"""What if: the best plan's predicted speed as the cluster, workload or models change.

Usage::

    python -m analysis.whatif examples/ppo-llama2-7b-8xh100.yaml --vary nodes=1,2,4
    python -m analysis.whatif examples/ppo-llama2-7b-8xh100.yaml --vary gen_len=128,256,512 --vary nodes=1,2
    python -m analysis.whatif examples/ppo-llama2-7b-8xh100.yaml --vary actor=llama2-7b,llama2-13b --json
    python -m analysis.whatif examples/grpo-qwen2.5-7b-16xh100.yaml --vary device=h100-sxm,h800,a100-80g
    python -m analysis.whatif examples/grpo-llama3-8b-8xh100.yaml --vary max_staleness=0,1,2,4
    python -m analysis.whatif examples/grpo-llama3-8b-8xh100.yaml --vary gen_devices=2,4,6 --vary max_staleness=0,2
    python -m analysis.whatif examples/grpo-llama3-8b-8xh100.yaml --vary max_staleness=1,2 --vary streaming=off,keep

Keys: ``nodes``, ``devices_per_node``, ``device`` (the cluster), ``gen_len``, ``prompt_len``,
``batch_size``, ``group_size``, ``max_staleness`` (the workload; η 0 is synchronous), ``streaming``
(``off``, ``recompute``, ``keep``: :mod:`estimator.spec.stream`; off wherever η is 0), ``gen_devices``
(not searched: devices ``0..k-1`` generate and the rest train, :func:`search.baselines.disaggregated`,
so throughput reads against the generation share of devices), or a role of the algorithm that holds a model
(``actor``, ``critic``, …; not ``reward`` when it is a verifier, ``reward: rule``) set to a
model preset. Several ``--vary`` make a grid. At every point the
experiment is changed with :func:`dataclasses.replace`, the search finds its best plan
(``search.run_search``), the simulator times it and every baseline (``search.baselines``), and
the row gets the best iteration time, throughput (tokens/s: every sequence's prompt and
generated tokens; samples/s: sequences trained), GPU-hours per 1,000 steps and the speedup
over each baseline that fits, and what the steady state does with the devices
(:mod:`estimator.sim.asynchrony`: tokens trained per second, rollout and trainer idle fractions,
mean staleness of the consumed samples). Every row names its ``profile``, ``stack`` (the
software stack priced, the experiment's ``cluster.stack`` or its device's default) and
``op_set`` (the profile's
``compute.ops``: ``executor`` prices this project's eager executor, ``fused`` a fused
Megatron/vLLM-style stack). A point where no plan exists (a call fits nowhere, or no plan
fits) is kept as a row with ``status`` "no plan" and the search's ``reason``, and the table
names it; the other points go on. ``--out`` (default
``analysis/results/whatif-<experiment>``) receives ``whatif.csv``, ``whatif.png`` (the points
with a plan), ``whatif.json`` and each point's best plan under ``plans/``.

Exit codes: 0 at least one point has a plan; 1 no point has one (the CSV names each reason);
2 an unknown key, a bad value, or a point whose experiment or profile is invalid (named,
before any search).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from estimator.base import rules
from estimator.base.errors import ConfigError, cli_guard
from estimator.base.io import atomic_write_json, atomic_write_text, check_output_dir
from estimator.base.progress import progress_bar
from estimator.base.tables import format_table
from estimator.profile.pricing import for_stack
from estimator.profile.profiles import Profile, load_profile
from estimator.sim.asynchrony import async_report
from estimator.sim.simulate import simulate
from estimator.spec.experiment import Experiment, load_experiment
from estimator.spec.models import get_model
from estimator.spec.plan import Plan, check
from estimator.spec.stack import STACKS, get_stack
from estimator.spec.workflow import GENERATING, MAX_STALENESS, ROLES, STREAMING, VALUE_ROLES

CLUSTER_KEYS = {"nodes": int, "devices_per_node": int, "device": str}
WORKLOAD_KEYS = {"gen_len": int, "prompt_len": int, "batch_size": int, "group_size": int, "max_staleness": int,
                 "streaming": str}
# not the experiment but the plan: devices 0..k-1 generate, the rest train (no search at that point)
PLAN_KEYS = {"gen_devices": int}
# the bounds an experiment file has for the same keys (estimator/base/rules.py says why)
LIMITS = {"nodes": rules.MAX_DEVICES, "devices_per_node": rules.MAX_DEVICES_PER_NODE,
          "gen_len": rules.MAX_SEQ_TOKENS, "prompt_len": rules.MAX_SEQ_TOKENS, "batch_size": rules.MAX_BATCH,
          "group_size": rules.MAX_GROUP, "max_staleness": MAX_STALENESS, "gen_devices": rules.MAX_DEVICES}
ZERO_ALLOWED = ("max_staleness",)  # 0 is synchronous
Searcher = Callable[[Experiment, Profile], Plan]  # the best plan the search finds
Baselines = Callable[[Experiment, Profile], dict[str, Plan]]  # baseline name → plan (those that fit)
PLANNED, NO_PLAN = "planned", "no plan"  # a row's status
EXIT_NO_POINT_PLANNED = 1


def parse_vary(texts: Sequence[str], algorithm: str, roles: Sequence[str] | None = None) -> dict[str, list[Any]]:
    """``["nodes=1,2", "actor=llama2-13b"]`` → ``{"nodes": [1, 2], "actor": ["llama2-13b"]}``.

    ``roles``: the roles that hold a model (default every role of ``algorithm``); a verifier
    reward (``models.reward: rule``) holds none, so ``reward`` cannot be varied."""
    roles = ROLES[algorithm] if roles is None else tuple(roles)
    out: dict[str, list[Any]] = {}
    for text in texts:
        key, sep, values = text.partition("=")
        kind = (CLUSTER_KEYS.get(key) or WORKLOAD_KEYS.get(key) or PLAN_KEYS.get(key)
                or (str if key in roles or key == "stack" else None))
        if not sep or not values:
            raise ConfigError(f"--vary {text!r} must look like KEY=V1,V2,…")
        if kind is None and key in ROLES[algorithm]:
            raise ConfigError(f"--vary {text!r}: models.{key} is a rule (a verifier), which holds no model to vary")
        if kind is None:
            allowed = [*CLUSTER_KEYS, "stack", *WORKLOAD_KEYS, *PLAN_KEYS, *roles]
            raise ConfigError(f"--vary {text!r}: unknown key {key!r}; allowed: {allowed}")
        if key in out:
            raise ConfigError(f"--vary {key} given twice")
        items = [v.strip() for v in values.split(",")]
        if kind is int:
            lo = 0 if key in ZERO_ALLOWED else 1
            bad = [v for v in items if not v.isdigit() or int(v) < lo]
            if bad:
                raise ConfigError(f"--vary {key}={values}: {bad} must be "
                                  f"{'non-negative' if lo == 0 else 'positive'} integers")
            big = [v for v in items if int(v) > LIMITS[key]]
            if big:
                raise ConfigError(f"--vary {key}={values}: {big} exceed the limit {LIMITS[key]:,}")
        if key == "stack":
            for v in items:
                get_stack(v, f"--vary {key}")
        if key == "streaming":
            bad = [v for v in items if v not in STREAMING]
            if bad:
                raise ConfigError(f"--vary {key}={values}: {bad} must be one of {', '.join(STREAMING)}")
        out[key] = [kind(v) for v in items]
        twice = sorted({str(v) for v in out[key] if out[key].count(v) > 1})
        if twice:
            raise ConfigError(f"--vary {key}={values}: {twice} given more than once; each value is one point")
    if not out:
        raise ConfigError("give at least one --vary KEY=V1,V2,…")
    return out


def apply(experiment: Experiment, point: Mapping[str, Any]) -> Experiment:
    """The experiment with ``point``'s values (cluster fields, workload fields, role models)."""
    cluster = dataclasses.replace(experiment.cluster, **{k: v for k, v in point.items() if k in CLUSTER_KEYS})
    label = ",".join(f"{k}={v}" for k, v in point.items())
    workload = {k: v for k, v in point.items() if k in WORKLOAD_KEYS}
    if workload.get("max_staleness") and experiment.algorithm not in GENERATING:
        raise ConfigError(f"point {label}: max_staleness applies to algorithms that generate, not to "
                          f"{experiment.algorithm}")
    for key in ("prompt_len", "gen_len"):  # a fixed length follows the new count; a distribution cannot
        dist = getattr(experiment.params, f"{key.split('_')[0]}_lengths")
        if key in workload and not dist.fixed:
            raise ConfigError(f"point {label}: --vary {key} needs a fixed {key}; the experiment's is a "
                              f"distribution ({dist.kind}), whose shape a new count would not say")
        if key in workload:
            workload[f"{key.split('_')[0]}_lengths"] = None
    params = dataclasses.replace(experiment.params, **workload)
    if params.max_staleness == 0:  # a stream needs η ≥ 1: at η = 0 every rollout is synchronous
        params = dataclasses.replace(params, streaming="off")
    models = dict(experiment.models)
    for role, name in point.items():
        if role in models:
            spec = get_model(name)
            models[role] = spec.as_value_model() if role in VALUE_ROLES else spec
    try:
        for role, name in point.items():
            if role in models:
                spec = get_model(name)
                models[role] = spec.as_value_model() if role in VALUE_ROLES else spec
        if params.prompt_len + params.gen_len > rules.MAX_SEQ_TOKENS:
            raise ConfigError(f"prompt_len + gen_len = {params.prompt_len + params.gen_len:,} tokens exceeds the "
                              f"limit {rules.MAX_SEQ_TOKENS:,} per sequence")
        if params.batch_size * params.group_size > rules.MAX_BATCH:
            raise ConfigError(f"batch_size·group_size = {params.batch_size * params.group_size:,} sequences "
                              f"exceeds the limit {rules.MAX_BATCH:,} per iteration")
        return dataclasses.replace(experiment, cluster=cluster, params=params, models=models,
                                   stack=point.get("stack", experiment.stack), name=f"{experiment.name}[{label}]")
    except ConfigError as exc:
        raise ConfigError(f"--vary point {label}: {exc}") from None


def samples_per_iteration(experiment: Experiment) -> int:
    """Sequences the iteration trains on (its train call's, else its first call's)."""
    calls = experiment.workflow.calls
    train = [c for c in calls if c.kind == "train"]
    return (train or list(calls))[0].workload.seqs


def point_row(experiment: Experiment, profile: Profile, best: Plan, baselines: Mapping[str, Plan],
              iterations: int = 3) -> dict[str, Any]:
    """The figures of one point: the best plan's predicted time, throughput, cost and speedups."""
    result = simulate(experiment, best, profile, iterations)
    best_s = result.iteration_s
    seqs = samples_per_iteration(experiment)
    tokens = seqs * (experiment.params.prompt_len + experiment.params.gen_len)
    run = async_report(experiment, best, result)
    row: dict[str, Any] = {
        "best_iteration_s": best_s, "tokens_per_s": tokens / best_s, "samples_per_s": seqs / best_s,
        "gpu_hours_per_1000_steps": best_s * 1000 * experiment.cluster.num_devices / 3600,
        "tokens_trained_per_s": run.tokens_per_s, "rollout_idle": run.rollout_idle,
        "trainer_idle": run.trainer_idle, "staleness_mean": run.staleness_mean,
    }
    for name, plan in baselines.items():
        base_s = simulate(experiment, plan, profile, iterations).iteration_s
        row[f"{name}_iteration_s"] = base_s
        row[f"speedup_over_{name}"] = base_s / best_s
    return row


def point_label(point: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items())


def sweep(experiment: Experiment, varies: Mapping[str, list[Any]], profile_arg: str | None, searcher: Searcher,
          baselines: Baselines, out: Path) -> pd.DataFrame:
    """One row per grid point (progress bar on stderr); each point's best plan is written to
    ``out/plans``. Every point's experiment and profile are checked before any search, so bad
    input fails at once; a point where no plan exists (the search raises :class:`ConfigError`:
    a call fits nowhere, or no plan fits) gets ``status`` "no plan" and the ``reason``, and the
    sweep goes on."""
    if profile_arg is not None and "device" in varies:
        raise ConfigError("--profile and --vary device exclude each other: each device brings its own profile")
    points = [dict(zip(varies, values)) for values in itertools.product(*varies.values())]
    checked = []
    for point in points:
        exp = apply(experiment, point)
        if profile_arg is not None:
            profile = for_stack(load_profile(profile_arg, "--profile"), exp.stack)
        else:
            profile = for_stack(load_profile(exp.cluster.device, f"--vary point {point_label(point)}"), exp.stack)
        checked.append((point, exp, profile))
    rows = []
    (out / "plans").mkdir(parents=True, exist_ok=True)
    for i, (point, exp, profile) in enumerate(progress_bar(checked, desc="what-if points", unit="point")):
        where = {**point, "profile": profile.name, "op_set": profile.ops, "stack": profile.stack}
        try:
            best = check(searcher(exp, profile) if "gen_devices" not in point
                         else split_plan(exp, profile, point["gen_devices"]), exp)
        except ConfigError as exc:
            rows.append({**where, "status": NO_PLAN, "reason": str(exc), "plan_file": ""})
            continue
        plan_file = out / "plans" / f"point-{i:02d}.json"
        atomic_write_text(plan_file, best.to_json())
        rows.append({**where, "status": PLANNED, "reason": "", **point_row(exp, profile, best, baselines(exp, profile)),
                     "plan_file": str(plan_file.relative_to(out))})
    return pd.DataFrame(rows)


# the printed table (the idle fractions and the other columns are in whatif.csv, --json and the PNG)
TABLE_COLUMNS = {"best_iteration_s": "best s", "tokens_trained_per_s": "tokens/s", "samples_per_s": "samples/s",
                 "gpu_hours_per_1000_steps": "GPU-h/1k steps"}


def _figure(v: float | None) -> str:
    if v is None or pd.isna(v):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def plot_sweep(df: pd.DataFrame, keys: Sequence[str], out: Path) -> Path:
    """Best iteration time, throughput, GPU-hours and speedups against the first varied key,
    one line per combination of the others."""
    from analysis.plot import _save, plt

    x, rest = keys[0], list(keys[1:])
    numeric = pd.api.types.is_numeric_dtype(df[x])
    speedups = [c for c in df.columns if c.startswith("speedup_over_")]
    panels = [("best_iteration_s", "best iteration time (s)"),
              ("tokens_trained_per_s", "tokens trained/s (drawn lengths)"),
              ("samples_per_s", "samples/s"), ("gpu_hours_per_1000_steps", "GPU-hours per 1,000 steps")]
    fig, grid = plt.subplots(2, 3, figsize=(13, 7.5))
    idle_ax = grid.flat[5] if speedups else grid.flat[4]
    axes = list(grid.flat)[:len(panels) + (1 if speedups else 0)]
    for ax in list(grid.flat)[len(axes):]:
        ax.set_visible(ax is idle_ax)
    groups = df.groupby(rest, sort=False) if rest else [((), df)]
    for key, g in groups:
        label = ", ".join(f"{k}={v}" for k, v in zip(rest, key if isinstance(key, tuple) else (key,)))
        xs = g[x] if numeric else g[x].astype(str)
        style = "-" if numeric else ""  # no line between unordered values (devices, models)
        for ax, (col, _) in zip(axes, panels):
            ax.plot(xs, g[col], marker="o", linestyle=style, label=label or None)
        for col in speedups:
            axes[-1].plot(xs, g[col], marker="o", linestyle=style,
                          label=f"{col.removeprefix('speedup_over_')} {label}".strip())
        for col, mark in (("rollout_idle", "o"), ("trainer_idle", "s")):
            idle_ax.plot(xs, 100 * g[col], marker=mark, linestyle=style,
                         label=f"{col.split('_')[0]} {label}".strip())
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
    if speedups:
        axes[-1].axhline(1.0, color="black", linewidth=0.8)
        axes[-1].set_title("speedup of the best plan over each baseline", fontsize=10)
        axes[-1].legend(fontsize=7)
    idle_ax.set_title("idle share of the steady state (%)", fontsize=10)
    idle_ax.set_ylim(-5, 105)
    idle_ax.legend(fontsize=7)
    for ax in [*axes, idle_ax]:
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    if rest:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def split_plan(experiment: Experiment, profile: Profile, gen_devices: int) -> Plan:
    """The plan of a ``gen_devices`` point: that many devices generate, the rest train
    (:func:`search.baselines.disaggregated`)."""
    from search.baselines import disaggregated

    return disaggregated(experiment, profile, gen_devices)


def search_functions(budget_s: float, seed: int, max_evals: int | None = None) -> tuple[Searcher, Baselines]:
    """The search (``budget_s`` per point, or exactly ``max_evals`` plans so runs repeat) and
    the baselines that can be built, from the ``search`` package."""
    import search.baselines as sb
    from search import run_search

    def searcher(exp: Experiment, profile: Profile) -> Plan:
        return run_search(exp, profile, time_budget_s=budget_s, max_evals=max_evals, seed=seed, progress=False).plan

    def baselines(exp: Experiment, profile: Profile) -> dict[str, Plan]:
        built = {n: sb.build(n, exp, profile) for n in sb.BASELINES}
        # a speedup over a plan that does not fit in memory means nothing
        return {n: b.plan for n, b in built.items() if b.feasible}

    return searcher, baselines


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.whatif", description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", help="experiment YAML file")
    ap.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2", help="a key and its values")
    ap.add_argument("--profile", help="profile name or file (default: each point's cluster device)")
    ap.add_argument("--search-budget-s", type=float, default=10.0, help="search time per point (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the search (default 0)")
    ap.add_argument("--search-evals", type=int, help="plans the search evaluates per point instead of the "
                    "time budget, so runs repeat exactly")
    ap.add_argument("--out", help="output directory (default analysis/results/whatif-<experiment>)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    return ap


def _main(argv: list[str] | None, functions: tuple[Searcher, Baselines] | None = None) -> int:
    args = _parser().parse_args(argv)
    rules.real("--search-budget-s", args.search_budget_s, positive=True)
    rules.integer("--seed", args.seed, lo=0, hi=rules.MAX_SEED)
    if args.search_evals is not None:
        rules.integer("--search-evals", args.search_evals, lo=1)
    experiment = load_experiment(args.experiment)
    varies = parse_vary(args.vary, experiment.algorithm, tuple(experiment.models))
    out_arg = args.out if args.out is not None else str(Path("analysis", "results", f"whatif-{experiment.name}"))
    check_output_dir(out_arg, "--out")  # before the first search; "" is refused, not taken as "."
    out = Path(out_arg)
    searcher, baselines = functions or search_functions(args.search_budget_s, args.seed, args.search_evals)
    df = sweep(experiment, varies, args.profile, searcher, baselines, out)
    planned = df["status"] == PLANNED
    atomic_write_text(out / "whatif.csv", df.to_csv(index=False, float_format="%.9g"))
    atomic_write_json(out / "whatif.json", json.loads(df.to_json(orient="records")))
    if planned.any():
        plot_sweep(df[planned], list(varies), out / "whatif.png")
    if args.json:
        print(df.to_json(orient="records", indent=2))
    else:
        print(render(df, list(varies), out))
    if not planned.any():
        print(f"error: no point of the sweep has a plan; {out / 'whatif.csv'} names each point's reason",
              file=sys.stderr)
        return EXIT_NO_POINT_PLANNED
    return 0


def render(df: pd.DataFrame, keys: Sequence[str], out: Path) -> str:
    """The sweep as a table that fits a terminal: the varied keys, whether the point has a plan,
    the best plan's figures under short headings and the speed-up over each baseline that fits
    ("vs megatron"; dashes where none); then the points without a plan with their reasons and
    the stack each profile priced. The baselines' own times and the full column names are in
    whatif.csv and ``--json``."""
    speedups = [c for c in df.columns if c.startswith("speedup_over_")]
    failed = df[df["status"] != PLANNED]
    status = ("status",) if not failed.empty else ()  # a column only where some point has no plan
    rows = [(*keys, *status, *TABLE_COLUMNS.values(), *(f"vs {c.removeprefix('speedup_over_')}" for c in speedups))]
    for _, r in df.iterrows():
        rows.append((*(str(r[k]) for k in keys), *((str(r["status"]),) if status else ()),
                     *(_figure(r.get(c)) for c in TABLE_COLUMNS),
                     *(("-" if pd.isna(r[c]) else f"{r[c]:.2f}x") for c in speedups)))
    lines = [format_table(rows, right=set(range(len(keys) + len(status), len(rows[0])))), ""]
    if not failed.empty:
        lines.append(f"{len(failed)} of {len(df)} point(s) have no plan:")
        lines += [f"  {point_label({k: r[k] for k in keys})}: {r['reason']}" for _, r in failed.iterrows()]
        lines.append("")
    for name, ops, stack in dict.fromkeys(zip(df["profile"], df["op_set"], df["stack"])):
        lines.append(f"profile {name}: priced for {stack} ({STACKS[stack].words}; compute.ops={ops})")
    lines.append(f"wrote {out} (whatif.csv and whatif.json also hold each baseline's iteration time)")
    return "\n".join(lines)


def main(argv: list[str] | None = None, functions: tuple[Searcher, Baselines] | None = None) -> int:
    return cli_guard(lambda a: _main(a, functions), argv)


if __name__ == "__main__":
    sys.exit(main())
