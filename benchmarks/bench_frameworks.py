"""What each framework's restrictions cost: the best plan overall against the best plan inside
each framework's space, predicted.

    python benchmarks/bench_frameworks.py
    python benchmarks/bench_frameworks.py examples/grpo-llama3-8b-8xh100.yaml --max-evals 3000 --json

For every experiment (default: the 7B PPO, 70B PPO and 8B GRPO examples) the search runs once
(``--max-evals`` plans, ``--seed``: the same table on any machine), then every framework's best
plan is the fastest projection of the search's re-ranked plans onto what that framework runs
(:func:`search.framework.framework_best`). The best plan overall is the fastest of the search's
own and every framework's plan that fits (a projection can beat a short search: ``search s``
beside ``best s`` shows it). Each cell is that plan's simulated iteration time and its ratio to
the best plan overall; ``*`` marks a framework none of whose projections fits
in memory (the fastest is shown), ``-`` one that runs none of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from estimator.base.errors import ConfigError
from estimator.base.tables import format_table
from estimator.interop import FRAMEWORKS
from estimator.profile.pricing import experiment_profile
from estimator.spec.experiment import load_experiment
from search.framework import framework_best
from search.run import run_search

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["examples/ppo-llama2-7b-8xh100.yaml", "examples/ppo-llama2-70b-128xh100.yaml",
           "examples/grpo-llama3-8b-8xh100.yaml"]


def measure(path: str, max_evals: int, seed: int) -> dict:
    experiment = load_experiment(ROOT / path if not Path(path).is_absolute() else path)
    profile = experiment_profile(experiment)  # priced for the experiment's stack, as the search prices it
    result = run_search(experiment, profile, max_evals=max_evals, seed=seed, progress=False)
    row = {"experiment": experiment.name, "profile": profile.name, "stack": profile.stack,
           "search_s": result.iteration_s, "frameworks": {}}
    for name in FRAMEWORKS:
        try:
            best = framework_best(experiment, profile, result, name)
        except ConfigError as exc:
            row["frameworks"][name] = {"iteration_s": None, "fits": False, "reason": str(exc)}
            continue
        row["frameworks"][name] = {"iteration_s": best.iteration_s, "fits": best.fits}
    # a framework's plan is a plan too: where a projection beats the search's own best, it is the best found
    fitting = [f["iteration_s"] for f in row["frameworks"].values() if f["fits"]]
    row["best_s"] = min([result.iteration_s, *fitting])
    for f in row["frameworks"].values():
        if f["iteration_s"] is not None:
            f["slower"] = f["iteration_s"] / row["best_s"]
    return row


def render(rows: list[dict]) -> str:
    table = [("experiment", "stack", "search s", "best s", *FRAMEWORKS)]
    for r in rows:
        cells = []
        for name in FRAMEWORKS:
            f = r["frameworks"][name]
            cells.append("-" if f["iteration_s"] is None else
                         f"{f['iteration_s']:.2f} ({f['slower']:.2f}x){'' if f['fits'] else '*'}")
        table.append((r["experiment"], r["stack"] or "-", f"{r['search_s']:.2f}", f"{r['best_s']:.2f}", *cells))
    notes = [f"  {r['experiment']} / {name}: {f['reason']}" for r in rows for name, f in r["frameworks"].items()
             if f["iteration_s"] is None]
    return "\n".join([format_table(table), "(* no projection fits in memory: the fastest shown; - runs none of the "
                      "plans:)", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", default=DEFAULT, help="experiment YAML files")
    parser.add_argument("--max-evals", type=int, default=1000, help="plans the search evaluates (default 1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = [measure(p, args.max_evals, args.seed) for p in args.experiments]
    print(json.dumps(rows, indent=2) if args.json else render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
