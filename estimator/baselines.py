"""Baseline plans: what a user gets without a search.

:func:`symmetric_plan` puts every call on every device with the layout a Megatron user would
pick first: tensor parallelism across the devices of a node, pipeline stages across nodes,
no data parallelism. Where the model cannot be split that way (tp must divide heads, kv
heads, ffn and vocabulary; pp may not exceed the layers; the batch must split over
dp·micro-batches) tp and pp step down and dp takes up the rest. Micro-batches: at least one
per pipeline stage, so pipelines fill; with a profile, more while a device would overflow.
Where lengths vary, a generate call runs one virtual engine per stage and the other calls a
token budget of :data:`BUDGET_START` longest rows, halved while a device would overflow.
The same two rules (:func:`closest_layout`, :func:`fit_micro_batches`) build every baseline of
:mod:`search.baselines`. Every call is placed, so the actor's recomputed old log-probs
(``actor_inf``) run on all devices like the reference's inference, and a verifier reward
(``models.reward: rule``) has no call to place.
"""

from __future__ import annotations

import dataclasses

from estimator.base.errors import ConfigError
from estimator.cost.memory import plan_memory
from estimator.profile.profiles import Profile
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment
from estimator.spec.plan import MICRO_BATCH_CHOICES, Layout, Plan, check, divisors, layout_problems

BUDGET_START = 8  # a baseline's token budget per micro-batch, in longest rows, where lengths vary


def closest_layout(experiment: Experiment, name: str, mesh: DeviceMesh, tp: int, pp: int) -> Layout | None:
    """The layout of call ``name`` on ``mesh`` closest to (tp, pp): tp steps down first, then pp,
    dp takes the rest; the fewest micro-batches that is at least the number of stages (or the
    most that is valid). None when no degrees are valid."""
    call, cl = experiment.workflow[name], experiment.cluster
    model = experiment.models[call.role]
    w = call.workload
    for t in sorted(divisors(tp), reverse=True):
        for p in sorted(divisors(pp), reverse=True):
            if mesh.size % (t * p):
                continue
            dp = mesh.size // (t * p)
            if w.lengths_vary:  # what frameworks run where lengths vary
                if call.kind == "generate":  # one virtual engine per stage, as vLLM
                    lay = Layout(mesh, dp, t, p, p)
                else:  # dynamic batching: a token budget, as much as BUDGET_START longest rows
                    lay = Layout(mesh, dp, t, p, 1, max_tokens_per_micro_batch=BUDGET_START * w.seq_len
                                 * (2 if w.paired else 1))
                if not layout_problems(call, model, cl, lay):
                    return lay
                continue
            valid = [m for m in MICRO_BATCH_CHOICES
                     if not layout_problems(call, model, cl, Layout(mesh, dp, t, p, m))]
            if valid:
                enough = [m for m in valid if m >= p]
                return Layout(mesh, dp, t, p, enough[0] if enough else valid[-1])
    return None


def symmetric_plan(experiment: Experiment, profile: Profile | None = None, recompute: str = "none") -> Plan:
    """Every call on all devices: tp = devices per node, pp = nodes, dp = 1, stepped down where
    the model or the batch does not allow it; with ``profile``, micro-batches raised call by call
    until the plan fits in memory (or no more are valid). ``recompute`` ("none" | "full"): the
    train calls' activation recompute (Megatron's ``--recompute-granularity full``)."""
    wf, cl = experiment.workflow, experiment.cluster
    layouts = {}
    for name in wf.topological_order():
        lay = closest_layout(experiment, name, cl.whole(), cl.devices_per_node, cl.nodes)
        if lay is None:
            raise ConfigError(f"call {name}: no whole-cluster layout is valid, so there is no symmetric "
                              "baseline plan for this experiment; give a plan with --plan")
        train = wf[name].kind == "train"
        layouts[name] = dataclasses.replace(lay, recompute=recompute) if train else lay
    plan = check(Plan(layouts), experiment)
    if profile is None:
        return plan
    return fit_micro_batches(experiment, profile, plan)


def fit_micro_batches(experiment: Experiment, profile: Profile, plan: Plan) -> Plan:
    """Raise the micro-batches of the call at the fullest device until the plan fits (or no
    larger valid count is left)."""
    wf, layouts = experiment.workflow, dict(plan.layouts)
    while True:
        report = plan_memory(experiment, Plan(layouts), profile.capacity_bytes, profile.stack)
        name = report.peak.call
        if report.feasible or not name:
            return Plan(layouts)
        lay = layouts[name]
        if lay.token_budget:  # a smaller budget, down to one longest row
            w = wf[name].workload
            smaller = dataclasses.replace(lay, max_tokens_per_micro_batch=lay.max_tokens_per_micro_batch // 2)
            if smaller.max_tokens_per_micro_batch < w.seq_len * (2 if w.paired else 1):
                return Plan(layouts)
            layouts = {**layouts, name: smaller}
            continue
        more = [m for m in MICRO_BATCH_CHOICES if m > lay.micro_batches and not layout_problems(
            wf[name], experiment.models[wf[name].role], experiment.cluster,
            dataclasses.replace(lay, micro_batches=m, recompute="none"))]
        if not more:
            return Plan(layouts)
        layouts = {**layouts, name: dataclasses.replace(lay, micro_batches=more[0])}
