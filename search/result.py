"""The search report: the winner's table, its baselines and speed-ups, where the time goes, JSON.

The per-call table, memory and roofline lines are :func:`estimator.predict.render`'s, from one
more simulation of the winner (:func:`estimator.predict.predict`), so ``python -m search`` and
``python -m estimator.predict --plan`` print the same figures for the same plan.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from estimator.base.tables import format_table
from estimator.cost.memory import MemoryReport
from estimator.predict import render
from estimator.spec.plan import Plan
from search.framework import FrameworkBest
from search.run import SearchResult


def speedups(result: SearchResult) -> dict[str, float | None]:
    """Per baseline: its predicted iteration time over the winner's (None when it does not fit)."""
    return {n: (b.iteration_s / result.iteration_s if b.iteration_s else None) for n, b in result.baselines.items()}


def overlap_groups(calls: dict[str, dict[str, float]]) -> list[list[str]]:
    """Calls of the last iteration grouped by overlapping [start, end): groups in time order."""
    order = sorted(calls, key=lambda c: (calls[c]["start_s"], c))
    groups: list[list[str]] = []
    end = -1.0
    eps = 1e-9
    for c in order:
        start, stop = calls[c]["start_s"], calls[c]["start_s"] + calls[c]["duration_s"]
        if groups and start < end - eps:
            groups[-1].append(c)
            end = max(end, stop)
        else:
            groups.append([c])
            end = stop
    return groups


def where_time_goes(summary: dict[str, Any]) -> list[str]:
    """Two lines: which calls overlap, and what reallocation costs."""
    calls = summary["calls"]
    groups = overlap_groups(calls)
    line1 = "in time order, '+' running together: " + " -> ".join(" + ".join(g) for g in groups)
    moved = {c: v["realloc_s"] for c, v in calls.items() if v["realloc_s"] > 0}
    if moved:
        total = sum(moved.values())
        top = max(moved, key=moved.get)
        share = 100 * total / summary["iteration_s"]
        line2 = (f"reallocation: {len(moved)} call(s) move parameters, {total:.3f} s in all "
                 f"({share:.1f} % of the iteration time); most: {top} {moved[top]:.3f} s")
    else:
        line2 = "reallocation: none, every call runs on its role's home layout"
    return [line1, line2]


NOTE_WIDTH = 64  # characters of a baseline's note per table line; --json has the whole reason


def baseline_table(result: SearchResult) -> str:
    """Each baseline's time and the speed-up over it; a long note (why it does not fit) wraps onto
    lines of its own, so the table stays as wide as its columns."""
    rows = [("baseline", "iteration s", "speedup of the searched plan", "note")]
    for name, b in result.baselines.items():
        sp = speedups(result)[name]
        if b.iteration_s is None:
            why = b.note or ""
            if b.reason:
                why = f"does not fit: {b.reason}" if b.plan else f"not applicable: {b.reason}"
            cells = (name, "-", "-")
        else:
            why, cells = b.note or "", (name, f"{b.iteration_s:.3f}", f"{sp:.2f}x")
        lines = textwrap.wrap(why, NOTE_WIDTH) or [""]
        rows += [(*cells, lines[0])] + [("", "", "", line) for line in lines[1:]]
    return format_table(rows, right={1, 2})


def render_report(result: SearchResult, summary: dict[str, Any], memory: MemoryReport) -> str:
    how = ("exact search over the whole space" if result.method == "exact"
           else f"simulated annealing, {result.chains} chain(s), each polishing its best plan")
    lines = [f"plan space: 10^{result.space_log10:.1f} plans", result.space.table(), "",
             f"searched {result.evaluated:,} plans ({how}) in {result.elapsed_s:.1f} s; "
             f"the simulator re-ranked {sum(c.simulator_s is not None for c in result.candidates)} of "
             f"{len(result.candidates)} candidates", ""]
    lines.append(render(summary, memory, "searched plan"))
    if result.simulated:
        lines.append(f"fast evaluator {result.evaluator_s:.3f} s vs simulator {result.iteration_s:.3f} s for this plan "
                     f"({100 * result.gap:+.2f} %)")
    else:
        lines.append("the time budget ended before the simulator re-ranked any candidate: the plan is the "
                     "fast evaluator's best")
    lines += ["", baseline_table(result), "", "where the time goes:"]
    lines += [f"  {line}" for line in where_time_goes(summary)]
    return "\n".join(lines)


def result_json(result: SearchResult, summary: dict[str, Any]) -> dict[str, Any]:
    sp = speedups(result)
    return {
        "experiment": result.experiment,
        "profile": result.profile,
        "stack": summary["stack"],  # the software stack it was priced for
        "op_set": summary["op_set"],  # the op costs and stack terms it was priced with
        "iteration_s": result.iteration_s,
        "simulated": result.simulated,
        "evaluator_s": result.evaluator_s,
        "evaluator_gap": result.gap,
        "plan": json.loads(result.plan.to_json()),
        "baselines": {n: {"iteration_s": b.iteration_s, "speedup": sp[n], "reason": b.reason, "note": b.note,
                          "plan": json.loads(b.plan.to_json()) if b.plan else None}
                      for n, b in result.baselines.items()},
        "evaluated": result.evaluated,
        "method": result.method,
        "chains": result.chains,
        "space_log10": result.space_log10,
        "space": result.space.summary()["calls"],
        "candidates": [{"source": c.source, "evaluator_s": c.evaluator_s, "simulator_s": c.simulator_s}
                       for c in result.candidates],
        "roofline_s": result.roofline_s,
        "mfu": result.mfu,
        "peak_memory_bytes": result.peak_memory_bytes,
        "capacity_bytes": result.capacity_bytes,
        "calls": summary["calls"],
        "where_time_goes": where_time_goes(summary),
        "setup_s": result.setup_s,
        "slowest_eval_s": result.slowest_eval_s,
        "elapsed_s": result.elapsed_s,
    }


# ---- a config imported from a framework (python -m search --from) -----------------------------

def speedups_over(imported: dict[str, Any], result: SearchResult,
                  best: FrameworkBest | None) -> dict[str, float | None]:
    """The imported config's predicted time over the best plan's, overall and in the framework
    (None where the config does not fit: no speed-up over a plan that cannot run)."""
    if not imported["fits"]:
        return {"overall": None, "framework": None}
    return {"overall": imported["iteration_s"] / result.iteration_s,
            "framework": imported["iteration_s"] / best.iteration_s if best is not None else None}


def imported_text(imported: dict[str, Any]) -> str:
    """The imported config: its plan, predicted time, memory verdict and the importer's notes."""
    fits = "fits in memory" if imported["fits"] else "DOES NOT FIT: " + "; ".join(imported["reasons"])
    plan = Plan.from_data(imported["plan"], where="imported plan")
    lines = [f"imported {imported['framework']} config {imported['config']}: predicted "
             f"{imported['iteration_s']:.3f} s per iteration, {fits}", plan.table()]
    return "\n".join(lines + [f"note: {n}" for n in imported["notes"]])


def comparison_table(imported: dict[str, Any], result: SearchResult, best: FrameworkBest | None) -> str:
    """The imported config against the best plan overall and the best the framework runs."""
    sp = speedups_over(imported, result, best)
    fw = imported["framework"]
    rows = [("plan", "iteration s", "speed-up over the config")]
    rows.append((f"imported {fw} config", f"{imported['iteration_s']:.3f}",
                 "1.00x" if imported["fits"] else "does not fit"))
    rows.append(("best plan overall", f"{result.iteration_s:.3f}",
                 f"{sp['overall']:.2f}x" if sp["overall"] else "-"))
    if best is not None:
        rows.append((f"best plan {best.framework} runs", f"{best.iteration_s:.3f}",
                     f"{sp['framework']:.2f}x" if sp["framework"] else "-"))
    return format_table(rows, right={1, 2})
