"""Write a plan in another RLHF framework's configuration, and what running it there costs.

Usage::

    python -m estimator.export verl examples/ppo-llama2-7b-8xh100.yaml plan.json --out verl-run/
    python -m estimator.export openrlhf examples/grpo-llama3-8b-8xh100.yaml plan.json --out run/ --json
    python -m estimator.export openrlhf examples/ppo-llama2-7b-8xh100.yaml plan.json --out run/ --legacy-flags
    python -m estimator.export realhf examples/ppo-llama2-7b-8xh100.yaml plan.json --out run/
    python -m estimator.export areal examples/grpo-llama3-8b-8xh100.yaml plan.json --out run/
    python -m estimator.export nemo-rl examples/grpo-llama3-8b-8xh100.yaml plan.json --out run/

FRAMEWORK is one of ``verl``, ``openrlhf``, ``realhf``, ``areal`` or ``nemo-rl``
(:mod:`estimator.interop`; each exporter's docstring cites the framework's commit its keys come
from). Where the framework
cannot express the plan, the exporter projects it onto the nearest plan the framework runs; the
command predicts both with the simulator and prints every change (call, field, the plan's value,
the framework's, why) and the cost, e.g. ``verl can run this plan only as …: predicted 41.2 s
against 35.0 s``. Into ``--out`` (created if missing) it writes the framework's files —
``overrides.txt`` (verl, ReaLHF: one Hydra override per line), ``command.sh`` (OpenRLHF: the
launch command, one flag per line; ``--legacy-flags``: OpenRLHF's flat spelling before 2026-04),
``config.yaml`` (AReaL, NeMo-RL: an overlay of their config) — and
``export.json`` with ``framework``, ``commit``, ``projected``, ``changes``, ``notes``,
``predicted_s``, ``projected_predicted_s``, ``projected_fits`` and both plans, each file
atomically. ``--json`` prints that object. The projection is priced for the framework's own
trainer where the experiment is priced on a production stack (``projected_stack``: NeMo-RL's
and AReaL's DTensor/FSDP trainer ``fsdp-vllm``, their Megatron and verl's ``megatron-vllm``;
``framework_stack`` says which the framework runs, ``stack`` the experiment's), so that
importing the files again predicts the same.

An experiment a framework cannot take at all (an algorithm or a reward model it has no place
for) is refused with the reason. Exit codes: 0 written; 2 invalid input or a refused experiment
(an unknown framework is named with the closest name).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from estimator.base import rules
from estimator.base.errors import ConfigError, cli_guard
from estimator.base.io import atomic_write_json, atomic_write_text, check_output_dir
from estimator.base.tables import format_table
from estimator.interop import FRAMEWORKS, exporter
from estimator.interop.common import Export
from estimator.predict import predict
from estimator.profile.pricing import STACK_NAMES, experiment_profile, for_stack
from estimator.profile.profiles import Profile, op_set
from estimator.spec.experiment import Experiment, load_experiment
from estimator.spec.plan import Plan, check
from estimator.spec.stack import priced_stack

RECORD = "export.json"


def make_export(framework: str, experiment: Experiment, plan: Plan, legacy_flags: bool = False) -> Export:
    """The framework's export of a checked plan (``legacy_flags``: OpenRLHF only)."""
    module = exporter(framework)
    if legacy_flags and framework != "openrlhf":
        raise ConfigError(f"--legacy-flags applies to openrlhf only, not to {framework}")
    return module.export(experiment, plan, legacy_flags=True) if legacy_flags else module.export(experiment, plan)


def framework_profile(export: Export, profile: Profile) -> Profile:
    """The profile the framework's run of the projected plan is priced on: ``profile`` for the
    framework's own production stack (:attr:`Export.stack`: NeMo-RL's and AReaL's DTensor/FSDP
    trainer is ``fsdp-vllm``, Megatron ``megatron-vllm``) where ``profile`` prices a production
    stack; ``profile`` itself on this project's executor or for a framework no stack describes."""
    if export.stack is None or export.stack == profile.stack or not priced_stack(profile.stack).production:
        return profile
    return for_stack(profile, export.stack)


def predict_export(export: Export, experiment: Experiment, profile: Profile, iterations: int = 3) -> dict[str, Any]:
    """The ``export.json`` object: the export with the simulator's steady-state iteration time
    of the given plan (on ``profile``) and of the projected one (on :func:`framework_profile`;
    the same figure when nothing was projected on the same stack)."""
    _, _, given = predict(experiment, export.given, profile, iterations)
    projected = given
    theirs = framework_profile(export, profile)
    if export.projected or theirs is not profile:
        _, _, projected = predict(experiment, export.plan, theirs, iterations)
    record = export.record(given["iteration_s"], projected["iteration_s"])
    return record | {"profile": profile.name, "stack": profile.stack, "priced": op_set(profile)["text"],
                     "projected_stack": theirs.stack, "fits": given["feasible"],
                     "projected_fits": projected["feasible"], "projected_reasons": projected["reasons"]}


def write_export(export: Export, record: dict[str, Any], out: Path) -> list[str]:
    """Write the framework's files and ``export.json`` (last) into ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in export.files.items():
        atomic_write_text(out / name, text, what=f"export file {name}")
        written.append(str(out / name))
    atomic_write_json(out / RECORD, record, what=f"export file {RECORD}")
    return written + [str(out / RECORD)]


def cost_line(record: dict[str, Any]) -> str:
    """One sentence: what the framework runs and what that costs against the plan."""
    fw, given, proj = record["framework"], record["predicted_s"], record["projected_predicted_s"]
    ours, theirs = record.get("stack"), record.get("projected_stack", record.get("stack"))
    how = f"can run this plan only as {record['summary']}" if record["projected"] else "runs this plan as given"
    if theirs == ours and not record["projected"]:
        return f"{fw} {how}: predicted {given:.1f} s"
    delta = 100.0 * (proj / given - 1.0)
    fits = "" if record["projected_fits"] else " (and it does not fit in memory: " + \
        "; ".join(record["projected_reasons"]) + ")"
    if theirs != ours:
        return (f"{fw} {how}, priced for its {theirs} trainer: predicted {proj:.1f} s against {given:.1f} s for "
                f"{ours} ({delta:+.1f} %){fits}")
    return f"{fw} {how}: predicted {proj:.1f} s against {given:.1f} s ({delta:+.1f} %){fits}"


def render(record: dict[str, Any], written: list[str]) -> str:
    """The changes as a table (each rule once, numbered, under it), the cost, the notes, the files."""
    lines = [f"{record['framework']}: keys of {record['repo']} at commit {record['commit'][:12]}", ""]
    if record["changes"]:
        rules: dict[str, int] = {}
        for c in record["changes"]:
            rules.setdefault(c["why"], len(rules) + 1)
        rows = [("call", "field", "plan", record["framework"], "rule")]
        rows += [(c["call"], c["field"], c["given"], c["exported"],
                  f"[{rules[c['why']]}]") for c in record["changes"]]
        lines += [format_table(rows, right=set()), ""]
        lines += [f"[{i}] {why}" for why, i in rules.items()]
        lines.append("")
    lines.append(cost_line(record))
    if record.get("priced"):
        lines.append(record["priced"])
    lines += [f"note: {n}" for n in record["notes"]]
    lines += [""] + [f"wrote {w}" for w in written]
    return "\n".join(lines)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m estimator.export", description=__doc__.split("\n")[0])
    parser.add_argument("framework", help=f"one of {', '.join(FRAMEWORKS)}")
    parser.add_argument("experiment", help="experiment YAML file")
    parser.add_argument("plan", help="plan JSON file (python -m search --out writes one)")
    parser.add_argument("--out", required=True, help="directory to write the framework's files into")
    parser.add_argument("--profile", help="hardware profile name or file (default: the cluster's device)")
    parser.add_argument("--stack", choices=STACK_NAMES,
                        help="software stack to price (default: the experiment's cluster.stack, else megatron-vllm "
                             "on a GPU, executor on a CPU)")
    parser.add_argument("--iterations", type=int, default=3, help="iterations to simulate (default 3)")
    parser.add_argument("--legacy-flags", action="store_true",
                        help="openrlhf: the flat flag spelling of OpenRLHF before 2026-04 (--actor_num_nodes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    exporter(args.framework)  # a wrong name costs nothing
    rules.integer("--iterations", args.iterations, lo=1, hi=rules.MAX_SIM_ITERATIONS)
    out = check_output_dir(args.out, "--out")
    experiment = load_experiment(args.experiment)
    profile = experiment_profile(experiment, args.profile, args.stack)
    plan = check(Plan.load(args.plan), experiment)
    export = make_export(args.framework, experiment, plan, args.legacy_flags)
    record = predict_export(export, experiment, profile, args.iterations)
    written = write_export(export, record, out)
    print(json.dumps(record, indent=2) if args.json else render(record, written))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
