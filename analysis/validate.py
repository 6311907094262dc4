"""Validate predictions on real executions: predict plans, run them, compare, draw.

Usage::

    python -m analysis.validate examples/ppo-tiny-2xcpu.yaml --plans 20 --out analysis/results/ppo-tiny-2xcpu
    python -m analysis.validate examples/dpo-tiny-2xcpu.yaml --plan-dir examples/plans/dpo-tiny-2xcpu --runs 3
    python -m analysis.validate examples/grpo-tiny-2xcpu.yaml --plans 4 --iterations 3 --runs 1 --json
    python -m analysis.validate examples/ppo-tiny-2xcpu.yaml --rescore analysis/results/ppo-tiny-2xcpu --out /tmp/ppo
    python -m analysis.validate examples/ppo-tiny-2xcpu.yaml --replot analysis/results/ppo-tiny-2xcpu
    python -m analysis.validate examples/grpo-longtail-tiny-2xcpu.yaml --max-staleness 1 --plans 12 \
        --out analysis/results/grpo-longtail-tiny-2xcpu-async1

The plans, exactly ``--plans`` of them: the searched best plan (:func:`search.run_search`, at
most ``--search-evals`` plans, seeded, so it repeats exactly), every baseline that fits
(:mod:`search.baselines`; those that do not fit, or that ``--plans`` leaves no room for, are
named with the reason), then a seeded sample covering every structural kind
(:mod:`analysis.sampler`) up to ``--plans`` (fewer only when no further distinct plan fits,
which a note says); or exactly the plan files in ``--plan-dir``. Each plan is simulated for
``--iterations`` iterations and run with ``python -m executor.run`` in ``--runs`` fresh
processes, one run at a time (progress bar on stderr). Everything is written into ``--out``
(default ``analysis/results/<experiment>``), each file atomically. ``--replot DIR`` runs and
predicts nothing: it redraws the figures of an earlier validation in DIR from its tables and
timelines. ``--rescore DIR`` runs nothing: it predicts the plans of an earlier validation in
DIR again — with this tree's model and ``--profile`` — against the runs measured there, so a
change to the model or the profile is judged on the same measurements:

- ``plans/<id>.json`` the plans, ``timelines/<id>.predicted.json`` and ``<id>.measured-<r>.json``;
- ``plans.csv`` (per plan: predicted and measured iteration time, the runs' min and max, the
  errors, and per call predicted and measured duration), ``calls.csv``, ``ops.csv``
  (:mod:`analysis.compare`);
- ``scatter.png``, ``errors.png``, ``timelines.png`` (the measured-best plan, predicted above
  measured) (:mod:`analysis.plot`);
- ``summary.txt`` and ``summary.json``: median and max absolute error per iteration, call kind
  and op kind, Spearman and Kendall rank correlation, whether the predicted-best plan is the
  measured-best.

Run again into the same ``--out``, it removes the plan and timeline files of plans the earlier
run had and this one has not (named by their plan ids; nothing else in the directory), so the
directory holds one validation.

Exit codes: 0 done (runs that failed are listed and left out); 1 no plan could be measured;
2 invalid experiment, profile, plan or option.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from estimator.base.errors import ConfigError, cli_guard
from estimator.base.io import atomic_write_json, atomic_write_text, check_output_dir
from estimator.base.loading import load_json
from estimator.base.progress import progress_bar
from estimator.profile.pricing import experiment_profile
from estimator.profile.profiles import Profile, op_set
from estimator.sim.simulate import simulate
from estimator.spec.experiment import Experiment, load_experiment
from estimator.spec.plan import Plan, check
from estimator.spec.timeline import Timeline
from estimator.spec.workflow import STREAMING
from executor.run import with_async

ROOT = Path(__file__).resolve().parent.parent
PER_DEVICE_MAX = 16  # predicted timelines of larger clusters keep one device per stage
EXIT_NOTHING_MEASURED = 1
# (experiment, plan file, iterations, timeline out); a streaming plan's runs also get ``switch_at``
Runner = Callable[..., Timeline]


SEARCH_TIME_CAP_S = 3600.0  # run_search needs a time budget; with max_evals it is not what stops it


@dataclass
class Candidate:
    """One plan to validate and what became of it."""

    id: str
    plan: Plan
    origin: str  # baseline | search | sample | file
    predicted: Timeline | None = None
    measured: list[Timeline] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    switch_at: dict[str, list[list[int]]] = field(default_factory=dict)  # a stream's predicted switch points


def search_plans(experiment: Experiment, profile: Profile, seed: int,
                 max_evals: int) -> tuple[list[Candidate], list[str]]:
    """Every baseline that can be built and fits, and the searched best plan, with notes on
    the baselines left out and why."""
    import search.baselines as sb
    from search import run_search

    out, notes = [], []
    for name in sb.BASELINES:
        built = sb.build(name, experiment, profile)
        if built.plan is None or built.iteration_s is None:
            notes.append(f"baseline {name} left out: {built.reason}")
            continue
        out.append(Candidate(f"baseline-{name}", built.plan, "baseline"))
    # an evaluation budget, not a wall-clock one: the same seed gives the same plan on any machine
    best = run_search(experiment, profile, time_budget_s=SEARCH_TIME_CAP_S, max_evals=max_evals, seed=seed,
                      progress=False)
    out.append(Candidate("searched-best", best.plan, "search"))
    notes.append(f"searched best plan: {best.evaluated} plans evaluated (seed {seed}, at most {max_evals})")
    return out, notes


def choose(experiment: Experiment, profile: Profile, n: int, seed: int,
           max_evals: int) -> tuple[list[Candidate], list[str]]:
    """Exactly ``n`` plans where that many exist: the searched best, the baselines that fit in
    their order while ``n`` leaves room (those left out are named), then a sample; fewer only
    when the sample runs out of distinct plans that fit (said in a note)."""
    from analysis.sampler import sample_plans

    first, notes = search_plans(experiment, profile, seed, max_evals)
    unique: dict[str, Candidate] = {}
    for c in first:
        same = unique.setdefault(c.plan.to_json(), c)
        if same is not c:
            notes.append(f"{c.id} is the same plan as {same.id}; validated once as {same.id}")
    found = list(unique.values())
    # the searched best first, then the baselines in their order; listed baselines first
    keep = {id(c) for c in sorted(found, key=lambda c: c.origin != "search")[:n]}
    for c in found:
        if id(c) not in keep:
            notes.append(f"{c.id} left out: --plans {n} leaves no room for it (the searched best comes first, "
                         "then the baselines in their order)")
    kept = [c for c in found if id(c) in keep]
    want = max(n - len(kept), 0)
    sampled, missing = sample_plans(experiment, profile, want, seed, exclude=[c.plan for c in found])
    cands = kept + [Candidate(f"sample-{i:02d}", p, "sample") for i, p in enumerate(sampled)]
    if missing:
        notes.append(f"no valid plan of kind(s) {missing} exists for this experiment; the sample lacks them")
    if len(sampled) < want:
        notes.append(f"only {len(cands)} of --plans {n}: the sample found no further distinct plan that is valid "
                     "and fits in memory")
    return cands, notes


def from_dir(directory: Path, experiment: Experiment) -> list[Candidate]:
    files = sorted(directory.glob("*.json"))
    if not files:
        raise ConfigError(f"--plan-dir {str(directory)!r}: no *.json plan files")
    return [Candidate(f.stem, check(Plan.load(str(f)), experiment), "file") for f in files]


def from_results(directory: Path, experiment: Experiment) -> tuple[list[Candidate], list[str]]:
    """The plans and measured runs of an earlier validation in ``directory``, to predict again."""
    files = sorted((directory / "plans").glob("*.json"))
    if not files:
        raise ConfigError(f"--rescore {str(directory)!r}: no plans/*.json (not a validation output directory)")
    origins: dict[str, str] = {}
    summary = directory / "summary.json"
    if summary.is_file():
        doc = load_json(summary, f"--rescore {summary}")
        origins = {str(p.get("plan")): str(p.get("origin", "file"))
                   for p in doc.get("plans", []) if isinstance(p, dict)}
    cands = []
    for f in files:
        c = Candidate(f.stem, check(Plan.load(str(f)), experiment), origins.get(f.stem, "file"))
        runs = sorted((directory / "timelines").glob(f"{f.stem}.measured-*.json"))
        c.measured = [Timeline.load(r) for r in runs]
        if not runs:
            c.failures.append("no measured run in the rescored directory")
        cands.append(c)
    return cands, [f"measured runs from {directory}, predicted again"]


def run_executor(experiment_path: Path, plan_file: Path, iterations: int, out: Path, timeout_s: float = 900.0,
                 max_staleness: int | None = None, streaming: str | None = None,
                 switch_at: dict[str, list[list[int]]] | None = None) -> Timeline:
    """One fresh ``python -m executor.run`` process; its measured timeline. A streaming plan
    runs at the switch points given (the prediction's), so both sides serve the same stream."""
    # the executor of this very tree, whatever the caller's working directory
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "executor.run", str(experiment_path), "--plan", str(plan_file),
           "--iterations", str(iterations), "--timeline", str(out), "--json"]
    cmd += ["--max-staleness", str(max_staleness)] if max_staleness is not None else []
    cmd += ["--streaming", streaming] if streaming is not None else []
    cmd += ["--switch-at", json.dumps(switch_at)] if switch_at else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")] or lines[-1:] or ["no output"]
        raise RuntimeError(f"exit {proc.returncode}: " + "; ".join(errors[:3]) + (" …" if len(errors) > 3 else ""))
    return Timeline.load(out)


def measure(cands: list[Candidate], experiment_path: Path, out: Path, iterations: int, runs: int,
            runner: Runner) -> None:
    """Run every plan ``runs`` times, one run at a time, with a progress bar."""
    with progress_bar(total=len(cands) * runs, desc="executor runs", unit="run") as bar:
        for c in cands:
            for r in range(runs):
                bar.set_postfix_str(f"{c.id} run {r + 1}/{runs}")
                try:
                    points = {"switch_at": c.switch_at} if c.switch_at else {}
                    c.measured.append(runner(experiment_path, out / "plans" / f"{c.id}.json", iterations,
                                             out / "timelines" / f"{c.id}.measured-{r}.json", **points))
                except (RuntimeError, subprocess.TimeoutExpired, ConfigError) as exc:
                    c.failures.append(f"run {r}: {exc}")
                bar.update()


def predict(cands: list[Candidate], experiment: Experiment, profile: Profile, iterations: int, out: Path) -> None:
    per_device = experiment.cluster.num_devices <= PER_DEVICE_MAX
    for sub in ("plans", "timelines"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for c in cands:
        atomic_write_text(out / "plans" / f"{c.id}.json", c.plan.to_json())
        res = simulate(experiment, c.plan, profile, iterations)
        c.predicted = res.timeline(per_device)
        c.switch_at = {g: s.switch_at for g, s in res.streams.items()}
        c.predicted.save(out / "timelines" / f"{c.id}.predicted.json")


def report(cands: list[Candidate], experiment: Experiment, out: Path, notes: list[str], settings: dict[str, Any],
           profile: Profile) -> dict[str, Any]:
    """Join, summarise, write the CSVs, figures and summary; the summary as a dict."""
    from analysis import compare

    kinds = {c: experiment.workflow[c].kind for c in experiment.workflow.call_names}
    done = [c for c in cands if c.measured]
    if not done:
        raise RuntimeError("no plan could be measured: " + "; ".join(f"{c.id}: {c.failures[-1]}" for c in cands))
    producers: dict[str, list[str]] = {}
    for prod, cons, _ in experiment.workflow.edges():
        producers.setdefault(cons, []).append(prod)
    # an asynchronous run's steady state: after Workflow.warmup iterations, before its drain
    wf = experiment.workflow
    warmup = wf.warmup if wf.asynchronous else None
    plans, calls, ops = compare.join([compare.compare_plan(c.id, c.predicted, c.measured, kinds, warmup, producers,
                                                           wf.drain) for c in done])
    origin = {c.id: c.origin for c in cands}
    plans.insert(1, "plan_file", [f"plans/{p}.json" for p in plans["plan"]])
    plans.insert(2, "origin", plans["plan"].map(origin))
    wide = compare.plans_wide(plans.rename(columns={"predicted_s": "predicted_iteration_s",
                                                    "measured_s": "measured_iteration_s"}), calls)
    for name, df in (("plans.csv", wide), ("calls.csv", calls), ("ops.csv", ops)):
        atomic_write_text(out / name, df.to_csv(index=False, float_format="%.9g"))
    s = compare.summary(plans, calls, ops)
    best = plans.loc[plans["measured_s"].idxmin(), "plan"]
    chosen = next(c for c in done if c.id == best)
    draw(out, experiment.name, profile, plans, calls, ops, chosen.predicted, chosen.measured[0])
    failed = {c.id: c.failures for c in cands if c.failures}
    notes = notes + host_notes(profile, [t for c in done for t in c.measured])
    per_plan = json.loads(plans.drop(columns=["plan_file"]).to_json(orient="records"))
    priced = op_set(profile)
    doc = {"experiment": experiment.name, "op_set": priced, "settings": settings, "notes": notes,
           "failed_runs": failed,
           "plans": per_plan, **json.loads(json.dumps(s, default=_plain))}
    text = "\n".join([f"validation of {experiment.name}: {len(done)} plans measured", f"predictions {priced['text']}",
                      *[f"note: {n}" for n in notes],
                      *[f"failed: {k}: {'; '.join(v)}" for k, v in failed.items()], "",
                      compare.plan_table(plans), "", compare.summary_table(s), "",
                      f"settings: {json.dumps(settings)}"])
    atomic_write_text(out / "summary.txt", text + "\n")
    atomic_write_json(out / "summary.json", _nan_to_none(doc))
    return {"text": text, "summary": _nan_to_none(doc)}


def host_notes(profile: Profile, measured: list[Timeline]) -> list[str]:
    """A note when the runs were measured on another machine than the profile: a profile
    prices one CPU (or GPU) model (``software.cpu`` / ``software.gpu``, written by the
    calibration), and the runs' ``meta.host`` (written by the executor) names theirs; an error
    then measures the two machines' difference as much as the model's."""
    out = []
    for key in ("gpu", "cpu"):
        want = profile.software.get(key)
        hosts = sorted({str(h[key]) for t in measured if (h := (t.meta or {}).get("host") or {}).get(key)})
        if want and hosts and hosts != [want]:
            out.append(f"the runs were measured on {key} {', '.join(hosts)}; profile {profile.name} on {want}: "
                       "calibrate on the measuring host (python -m estimator.calibrate) to judge the model, not "
                       "the difference of the machines")
        if want and hosts:
            break
    return out


def draw(out: Path, experiment: str, profile: Profile, plans: Any, calls: Any, ops: Any, predicted: Timeline,
         measured: Timeline) -> list[Path]:
    """The figures: ``scatter.png``, ``errors.png`` and ``timelines.png`` (the measured-best
    plan's ``predicted`` above its first ``measured`` run)."""
    from analysis import plot

    best = plans.loc[plans["measured_s"].idxmin(), "plan"]
    figures = [plot.scatter(plans, out / "scatter.png", scatter_title(experiment, list(plans["origin"]), profile)),
               plot.error_bars(calls, ops, out / "errors.png"),
               plot.stacked(predicted, measured, out / "timelines.png", f"{experiment}, plan {best}")]
    # a continuous-batching generation: its running batch, predicted against measured
    gens = sorted({c.call for c in predicted.counters if c.name == "running"})
    its = measured.iterations
    for call in gens:
        fig = plot.running_batch(predicted, measured, call, its[-1] if its else 0, out / f"running-{call}.png",
                                 f"{experiment}, plan {best}: {call} running batch (last iteration)")
        if fig is not None:
            figures.append(fig)
    return figures


def replot(directory: Path, experiment: Experiment, profile: Profile) -> list[Path]:
    """Redraw the figures of an earlier validation in ``directory`` from its tables and
    timelines, predicting and running nothing."""
    import pandas as pd

    try:
        plans = pd.read_csv(directory / "plans.csv").rename(
            columns={"predicted_iteration_s": "predicted_s", "measured_iteration_s": "measured_s"})
        calls, ops = pd.read_csv(directory / "calls.csv"), pd.read_csv(directory / "ops.csv")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--replot {str(directory)!r}: {exc} (not a validation output directory)") from None
    best = plans.loc[plans["measured_s"].idxmin(), "plan"]
    predicted = Timeline.load(directory / "timelines" / f"{best}.predicted.json")
    measured = Timeline.load(directory / "timelines" / f"{best}.measured-0.json")
    return draw(directory, experiment.name, profile, plans, calls, ops, predicted, measured)


def scatter_title(experiment: str, origins: list[str], profile: Profile) -> str:
    """Experiment, profile and plans, e.g. ``ppo-tiny-2xcpu on profile cpu (this project's eager
    executor)`` over ``20 plans (4 baselines, the searched best, 15 sampled): …``."""
    def part(origin: str, n: int) -> str:
        if origin == "search":
            return "the searched best"
        one, many = {"baseline": ("baseline", "baselines"), "sample": ("sampled", "sampled"),
                     "file": ("from a file", "from files")}.get(origin, (origin, origin))
        return f"{n} {one if n == 1 else many}"

    what = ", ".join(part(o, origins.count(o)) for o in dict.fromkeys(origins))
    return (f"{experiment} on profile {profile.name} ({op_set(profile)['stack']})\n"
            f"{len(origins)} plans ({what}): measured (x) vs predicted (y) iteration time")


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else str(x)


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", help="experiment YAML file")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--plans", type=int, default=20, help="plans to validate (default 20)")
    which.add_argument("--plan-dir", help="validate exactly the plan files (*.json) in this directory")
    which.add_argument("--replot", metavar="DIR",
                       help="run and predict nothing: redraw the figures of an earlier validation in DIR from its "
                            "tables and timelines")
    which.add_argument("--rescore", metavar="DIR",
                       help="run nothing: predict the plans of an earlier validation in DIR again (this model, "
                            "--profile) against the runs measured there, and write the comparison into --out")
    ap.add_argument("--iterations", type=int, default=3, help="iterations per run; the first is warm-up (default 3)")
    ap.add_argument("--runs", type=int, default=3, help="fresh executor runs per plan (default 3)")
    ap.add_argument("--profile", help="profile name or file (default: the cluster's device)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the plan sample and the search (default 0)")
    ap.add_argument("--search-evals", type=int, default=20_000,
                    help="plans the search evaluates at most, so runs repeat exactly (default 20000)")
    ap.add_argument("--out", help="output directory (default analysis/results/<experiment>)")
    ap.add_argument("--max-staleness", type=int, default=None,
                    help="validate asynchronous training with this staleness η (overrides the experiment's)")
    ap.add_argument("--streaming", choices=STREAMING, default=None,
                    help="validate streaming rollouts (recompute | keep) or none (off), overriding the "
                         "experiment's async.streaming")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return ap


def _main(argv: list[str] | None, runner: Runner = run_executor) -> int:
    args = _parser().parse_args(argv)
    for flag in ("plans", "iterations", "runs", "search_evals"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be at least 1")
    experiment = load_experiment(args.experiment)
    experiment = with_async(experiment, args.max_staleness, args.streaming)
    if runner is run_executor and (args.max_staleness is not None or args.streaming is not None):
        runner = functools.partial(run_executor, max_staleness=args.max_staleness, streaming=args.streaming)
    profile = experiment_profile(experiment, args.profile)
    if args.replot:
        drawn = replot(Path(args.replot), experiment, profile)
        print(json.dumps({"wrote": [str(f) for f in drawn]}) if args.json else
              "\n".join(f"wrote {f}" for f in drawn))
        return 0
    out_arg = args.out if args.out is not None else str(Path("analysis", "results", experiment.name))
    check_output_dir(out_arg, "--out")  # before any plan is predicted or run; "" is refused, not taken as "."
    out = Path(out_arg)
    if args.rescore:
        cands, notes = from_results(Path(args.rescore), experiment)
    elif args.plan_dir:
        cands, notes = from_dir(Path(args.plan_dir), experiment), [f"plans from {args.plan_dir}"]
    else:
        cands, notes = choose(experiment, profile, args.plans, args.seed, args.search_evals)
    runs = max(len(c.measured) for c in cands) if args.rescore else args.runs
    settings = {"experiment": str(args.experiment), "plans": len(cands), "iterations": args.iterations,
                "runs": runs, "profile": profile.name, "seed": args.seed, "max_staleness": experiment.max_staleness,
                "streaming": experiment.streaming,
                **({"rescored": str(args.rescore)} if args.rescore else {})}
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    predict(cands, experiment, profile, args.iterations, out)
    if not args.rescore:
        measure(cands, Path(args.experiment), out, args.iterations, args.runs, runner)
    elif Path(args.rescore).resolve() != out.resolve():
        for c in cands:  # the measured runs go with the comparison they belong to
            for r, tl in enumerate(c.measured):
                tl.save(out / "timelines" / f"{c.id}.measured-{r}.json")
    return _finish(cands, experiment, out, notes, settings, args.json, profile)


OWN_FILES = {"plans": re.compile(r"^(?P<id>[^.]+)\.json$"),
             "timelines": re.compile(r"^(?P<id>[^.]+)\.(predicted|measured-\d+)\.json$")}


def clear_stale(out: Path, ids: set[str]) -> list[str]:
    """Remove the plan and timeline files an earlier validation left in ``out`` for plans this
    one does not have (their names say whose they are), so the directory holds one run; other
    files are left alone. The names removed."""
    gone = []
    for sub, own in OWN_FILES.items():
        for f in sorted((out / sub).glob("*.json")) if (out / sub).is_dir() else []:
            m = own.match(f.name)
            if m and m.group("id") not in ids:
                f.unlink()
                gone.append(f"{sub}/{f.name}")
    return gone


def _finish(cands: list[Candidate], experiment: Experiment, out: Path, notes: list[str], settings: dict[str, Any],
            as_json: bool, profile: Profile) -> int:
    gone = clear_stale(out, {c.id for c in cands})
    if gone:
        notes = notes + [f"removed {len(gone)} file(s) of plans an earlier validation in {out} had and this one "
                         "has not"]
    try:
        rep = report(cands, experiment, out, notes, settings, profile)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOTHING_MEASURED
    print(json.dumps(rep["summary"], indent=2) if as_json else rep["text"] + f"\n\nwrote {out}")
    return 0


def main(argv: list[str] | None = None, runner: Runner = run_executor) -> int:
    return cli_guard(lambda a: _main(a, runner), argv)


if __name__ == "__main__":
    sys.exit(main())
