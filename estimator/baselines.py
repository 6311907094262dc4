"""Baseline plans: what a user gets without a search.

:func:`symmetric_plan` puts every call on every device with the layout a Megatron user would
pick first: tensor parallelism across the devices of a node, pipeline stages across nodes,
no data parallelism. Where the model cannot be split that way (tp must divide heads, kv
heads, ffn and vocabulary; pp may not exceed the layers; the batch must split over
dp·micro-batches) tp and pp step down and dp takes up the rest. Micro-batches: at least one
per pipeline stage, so pipelines fill; with a profile, more while a device would overflow.
"""

from __future__ import annotations

import dataclasses

from estimator.base.errors import ConfigError
from estimator.cost.memory import plan_memory
from estimator.profile.profiles import Profile
from estimator.spec.experiment import Experiment
from estimator.spec.plan import MICRO_BATCH_CHOICES, Layout, Plan, check, divisors, layout_problems
from estimator.spec.workflow import Call


def _candidates(call: Call, experiment: Experiment) -> list[Layout]:
    """Valid whole-cluster layouts, most tensor parallelism first, then most stages, each with
    the fewest micro-batches that is at least the number of stages (or the most that is valid)."""
    cl = experiment.cluster
    mesh = cl.whole()
    model = experiment.models[call.role]
    out = []
    for tp in sorted(divisors(cl.devices_per_node), reverse=True):
        for pp in sorted(divisors(cl.nodes), reverse=True):
            dp = mesh.size // (tp * pp)
            valid = [m for m in MICRO_BATCH_CHOICES
                     if not layout_problems(call, model, cl, Layout(mesh, dp, tp, pp, m))]
            if valid:
                enough = [m for m in valid if m >= pp]
                out.append(Layout(mesh, dp, tp, pp, enough[0] if enough else valid[-1]))
    return out


def symmetric_plan(experiment: Experiment, profile: Profile | None = None, recompute: str = "none") -> Plan:
    """Every call on all devices: tp = devices per node, pp = nodes, dp = 1, stepped down where
    the model or the batch does not allow it; with ``profile``, micro-batches raised call by call
    until the plan fits in memory (or no more are valid). ``recompute`` ("none" | "full"): the
    train calls' activation recompute (Megatron's ``--recompute-granularity full``)."""
    wf = experiment.workflow
    layouts = {}
    for name in wf.topological_order():
        cands = _candidates(wf[name], experiment)
        if not cands:
            raise ConfigError(f"call {name}: no whole-cluster layout is valid, so there is no symmetric "
                              "baseline plan for this experiment; give a plan with --plan")
        train = wf[name].kind == "train"
        layouts[name] = dataclasses.replace(cands[0], recompute=recompute) if train else cands[0]
    plan = check(Plan(layouts), experiment)
    if profile is None:
        return plan
    return _fit_micro_batches(plan, experiment, profile)


def _fit_micro_batches(plan: Plan, experiment: Experiment, profile: Profile) -> Plan:
    cl, wf = experiment.cluster, experiment.workflow
    layouts = dict(plan.layouts)
    while True:
        report = plan_memory(experiment, Plan(layouts), profile.capacity_bytes)
        if report.feasible:
            return Plan(layouts)
        name = report.peak.call
        if not name:
            return Plan(layouts)
        lay = layouts[name]
        more = [m for m in MICRO_BATCH_CHOICES if m > lay.micro_batches and not layout_problems(
            wf[name], experiment.models[wf[name].role], cl, Layout(lay.mesh, lay.dp, lay.tp, lay.pp, m))]
        if not more:
            return Plan(layouts)
        layouts[name] = dataclasses.replace(lay, micro_batches=more[0])
