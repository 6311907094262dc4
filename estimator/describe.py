"""Describe an experiment: its models, calls, cluster and how many layouts each call has.

The cluster line counts its meshes — every contiguous run of devices — and of them the
aligned ones the search takes by default (``--json``: ``cluster.runs``, ``cluster.meshes``);
each call's layouts are counted on the aligned meshes.

A verifier reward (``models.reward: rule``) is listed as the reward role's row with no model
(``verifier`` in ``--json``: its ``reward_s_per_sample``), and ``old_logprobs`` says whether
the generate call writes the old log-probs or ``actor_inf`` recomputes them. It prices nothing,
but says which software stack the experiment's plans are priced for and on which profile
(``cluster.stack`` and ``cluster.priced`` in ``--json``; :mod:`estimator.profile.pricing`).

Usage::

    python -m estimator.describe examples/ppo-llama2-7b-8xh100.yaml
    python -m estimator.describe examples/ppo-llama2-7b-8xh100.yaml --json
    python -m estimator.describe examples/ppo-tiny-2xcpu.yaml --plan examples/plans/ppo-tiny-2xcpu/tp2.json

With ``--plan`` it also checks the plan against the experiment and prints it as a table.

Exit codes: 0 on success, 2 when the experiment or plan is invalid (one line per violated rule,
naming the key or the call, the value and the rule).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from estimator.base.errors import cli_guard
from estimator.base.tables import format_table
from estimator.cost.ops import call_flops
from estimator.profile.pricing import experiment_profile
from estimator.profile.profiles import op_set
from estimator.spec.experiment import Experiment, load_experiment
from estimator.spec.plan import Plan, check, count_layouts
from estimator.spec.workflow import GENERATING


def describe(exp: Experiment) -> dict[str, Any]:
    """The experiment as one JSON-ready object."""
    models = {
        role: {"name": m.name, "params": m.params, "bytes_bf16": m.bytes(), "layers": m.layers,
               "hidden": m.hidden, "ffn": m.ffn, "heads": m.heads, "kv_heads": m.kv_heads,
               "vocab": m.vocab, "head": m.head}
        for role, m in exp.models.items()
    }
    wf = exp.workflow
    calls = []
    for name in wf.topological_order():
        c = wf[name]
        model = exp.models[c.role]
        w = c.workload
        calls.append({
            "name": name, "kind": c.kind, "role": c.role, "model": model.name,
            "after": wf.predecessors(name),
            "workload": {"seqs": w.seqs, "prompt_len": w.prompt_len, "gen_len": w.gen_len,
                         "minibatches": w.minibatches, "paired": w.paired, "greedy": w.greedy},
            "flops": call_flops(c, model, exp.lengths(0) if exp.params.variable else None),
            "layouts": count_layouts(c, model, exp.cluster),
        })
    cl = exp.cluster
    lengths = {"prompt": exp.params.prompt_lengths, "gen": exp.params.gen_lengths}
    rows = exp.rollout_rows
    drawn = exp.lengths(0) if rows else None
    return {
        "name": exp.name,
        "algorithm": exp.algorithm,
        "models": models,
        # a verifier in place of a reward model (models.reward: rule), else None
        "verifier": {"reward_s_per_sample": exp.reward_s_per_sample} if exp.verifier else None,
        "old_logprobs": exp.params.old_logprobs if exp.algorithm in GENERATING else None,
        "calls": calls,
        "lengths": {k: d.summary() | {"kind": d.kind, "at_cap": round(d.cap_mass(), 6)} for k, d in lengths.items()},
        # the sequences one iteration generates: prompt + response tokens of iteration 0's draw
        "tokens_per_iteration": int(drawn[0].sum() + drawn[1].sum()) if rows else None,
        "version_edges": [list(e) for e in wf.version_edges()],
        "cluster": {"nodes": cl.nodes, "devices_per_node": cl.devices_per_node, "devices": cl.num_devices,
                    # aligned meshes (the search's default, the per-call layouts below), of every run
                    "device": cl.device, "meshes": cl.num_meshes(), "runs": cl.num_meshes(uneven=True)},
    }


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def render(info: dict[str, Any]) -> str:
    cl = info["cluster"]
    parts = [f"experiment {info['name']}: {info['algorithm']} on {cl['nodes']} node(s) x "
             f"{cl['devices_per_node']} {cl['device']} = {cl['devices']} devices, {cl['runs']:,} meshes (contiguous "
             f"runs), {cl['meshes']:,} of them aligned (searched by default; layouts below)"]
    if cl.get("priced"):  # the stack its plans are priced for (describe itself prices nothing)
        parts.append(f"stack: {cl['priced']}")
    parts.append("")
    rows = [("role", "model", "params", "bf16 bytes", "layers", "hidden", "heads/kv", "head")]
    rows += [(r, m["name"], _human(m["params"]), _human(m["bytes_bf16"], "B"), str(m["layers"]), str(m["hidden"]),
              f"{m['heads']}/{m['kv_heads']}", m["head"]) for r, m in info["models"].items()]
    if info["verifier"] is not None:
        seconds = info["verifier"]["reward_s_per_sample"]
        rows.append(("reward", f"rule (verifier, {seconds:g} s per sample)", "-", "-", "-", "-", "-", "-"))
    parts += [format_table(rows), ""]
    rows = [("call", "kind", "role", "after", "seqs", "prompt", "gen", "minibatches", "FLOPs", "layouts")]
    rows += [(c["name"], c["kind"], c["role"], ",".join(c["after"]) or "-", str(c["workload"]["seqs"]),
              str(c["workload"]["prompt_len"]), str(c["workload"]["gen_len"]), str(c["workload"]["minibatches"]),
              _human(c["flops"]), str(c["layouts"])) for c in info["calls"]]
    parts.append(format_table(rows, right={4, 5, 6, 7, 8, 9}))
    lengths = info["lengths"]
    if any(d["kind"] != "fixed" for d in lengths.values()):
        rows = [("lengths", "kind", "mean", "p50", "p90", "p99", "max", "at cap")]
        rows += [(k, d["kind"], f"{d['mean']:.1f}", f"{d['p50']:g}", f"{d['p90']:g}", f"{d['p99']:g}",
                  f"{d['max']:g}", f"{100 * d['at_cap']:.1f} %") for k, d in lengths.items()]
        parts += ["", format_table(rows)]
    if info["old_logprobs"] is not None:
        how = ("actor_inf recomputes them" if info["old_logprobs"] == "recompute"
               else "the generate call writes them")
        parts += ["", f"old log-probs: {info['old_logprobs']} ({how})"]
    if info["tokens_per_iteration"] is not None:
        parts += ["", f"tokens per iteration (prompt + response, iteration 0): {info['tokens_per_iteration']:,}"]
    if info["version_edges"]:
        edges = ", ".join(f"{a}(i) -> {b}(i+{lag})" for a, b, lag in info["version_edges"])
        parts += ["", f"version edges: {edges}"]
    return "\n".join(parts)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m estimator.describe", description=__doc__.split("\n")[0])
    ap.add_argument("experiment", help="experiment YAML file (see examples/)")
    ap.add_argument("--plan", help="plan JSON file to check against the experiment")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    exp = load_experiment(args.experiment)
    profile = experiment_profile(exp)  # a bad profile or stack is an invalid experiment
    plan = check(Plan.load(args.plan), exp) if args.plan is not None else None
    info = describe(exp)
    info["cluster"] |= {"stack": profile.stack, "priced": op_set(profile)["text"]}
    if plan is not None:
        info["plan"] = {c: lay.to_dict() for c, lay in plan.layouts.items()}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(render(info))
        if plan is not None:
            print(f"\nplan {args.plan} is valid:\n{plan.table()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
