"""A seeded sample of structurally diverse valid plans, for validating predictions.

Every structural kind the estimator models must be measured, so :func:`sample_plans` first
draws, kind by kind, a plan that has it (:data:`KINDS`: tensor, pipeline and data parallelism,
disjoint meshes, parameter reallocation, several micro-batches, activation recompute), then fills the sample with
random plans. Two kinds of draw alternate: *colocated* (every call on one mesh with one
(dp, tp, pp) shape, micro-batches per call) and *free* (each call its own valid layout from
:func:`estimator.spec.plan.enumerate_layouts`). Every plan passes :func:`estimator.spec.plan.check` and
fits in memory under the profile; no plan appears twice. Same seed, same sample.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from estimator.cost.memory import plan_memory
from estimator.profile.profiles import Profile
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Layout, Plan, enumerate_layouts, validate

KINDS = ("tp", "pp", "dp", "disjoint", "realloc", "micro_batches", "recompute")
TRIES_PER_PLAN = 400


def plan_kinds(plan: Plan, experiment: Experiment) -> set[str]:
    """The structural kinds of :data:`KINDS` that ``plan`` has."""
    lays = list(plan.layouts.values())
    kinds = {k for k, attr in (("tp", "tp"), ("pp", "pp"), ("dp", "dp"), ("micro_batches", "micro_batches"))
             if any(getattr(lay, attr) > 1 for lay in lays)}
    meshes = {lay.mesh for lay in lays}
    if any(lay.recompute != "none" for lay in lays):
        kinds.add("recompute")
    if any(not a.overlaps(b) for a, b in itertools.combinations(meshes, 2)):
        kinds.add("disjoint")
    wf = experiment.workflow
    homes = wf.home_calls()
    if any(not plan[c].same_placement(plan[homes[wf[c].role]]) for c in wf.call_names):
        kinds.add("realloc")
    return kinds


def _layouts(experiment: Experiment) -> dict[str, list[Layout]]:
    wf, cl = experiment.workflow, experiment.cluster
    return {c: enumerate_layouts(wf[c], experiment.models[wf[c].role], cl) for c in wf.topological_order()}


def _colocated(rng: random.Random, options: dict[str, list[Layout]]) -> Plan | None:
    """Every call on one mesh with one (mesh, dp, tp, pp) shape, each its own micro-batches."""
    common = set.intersection(*({lay.placement for lay in lays} for lays in options.values()))
    if not common:
        return None
    chosen = rng.choice(sorted(common, key=str))
    return Plan({c: rng.choice([lay for lay in lays if lay.placement == chosen]) for c, lays in options.items()})


def _free(rng: random.Random, options: dict[str, list[Layout]]) -> Plan:
    return Plan({c: rng.choice(lays) for c, lays in options.items()})


def _key(plan: Plan) -> tuple:
    return tuple(sorted((c, lay) for c, lay in plan.layouts.items()))


def sample_plans(experiment: Experiment, profile: Profile, n: int, seed: int = 0,
                 exclude: Sequence[Plan] = ()) -> tuple[list[Plan], list[str]]:
    """Up to ``n`` valid, memory-feasible, distinct plans (none equal to one in ``exclude``),
    covering every kind of :data:`KINDS` the experiment allows; and the kinds that no draw
    produced (e.g. ``tp`` when no model's heads split)."""
    options = _layouts(experiment)
    if any(not lays for lays in options.values()):
        empty = [c for c, lays in options.items() if not lays]
        raise ValueError(f"calls {empty} have no valid layout on {experiment.cluster}")
    rng = random.Random(seed)
    seen = {_key(p) for p in exclude}
    out: list[Plan] = []
    draws = itertools.count()

    def draw(want: str | None) -> Plan | None:
        for _ in range(TRIES_PER_PLAN):
            plan = _colocated(rng, options) if next(draws) % 2 else _free(rng, options)
            if plan is None or _key(plan) in seen or validate(plan, experiment):
                continue
            if want is not None and want not in plan_kinds(plan, experiment):
                continue
            if not plan_memory(experiment, plan, profile.capacity_bytes, profile.stack).feasible:
                continue
            seen.add(_key(plan))
            return plan
        return None

    missing = []
    for kind in KINDS:
        if len(out) >= n:
            break
        if any(kind in plan_kinds(p, experiment) for p in out):
            continue
        plan = draw(kind)
        if plan is None:
            missing.append(kind)
        else:
            out.append(plan)
    while len(out) < n:
        plan = draw(None)
        if plan is None:  # the plan space is exhausted (or nearly)
            break
        out.append(plan)
    return out, missing
