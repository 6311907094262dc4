"""The best plan a framework can run (``python -m search --framework NAME``), and the export.

The framework's space is reached by projection, not searched on its own: every plan the search
re-ranked (its best candidates and the baselines that were built) is projected onto what the
framework runs by its exporter (:mod:`estimator.interop`), the distinct projections are
simulated, and the fastest that fits in memory is the framework's plan (the fastest of all when
none fits, said so). So the framework's plan is the best projection of the search's best
plans, not the optimum of the framework's whole space; its predicted time against the overall
best is the cost of running in that framework. The projections are priced for the framework's
own trainer where the search prices a production stack (:func:`estimator.export.framework_profile`:
a NeMo-RL or AReaL plan that trains fully sharded runs DTensor/FSDP, ``fsdp-vllm``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from estimator.base.errors import ConfigError
from estimator.cost.memory import plan_memory
from estimator.export import framework_profile
from estimator.interop import exporter
from estimator.profile.profiles import Profile
from estimator.sim.simulate import simulate
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Plan
from search.run import SearchResult


@dataclass(frozen=True)
class FrameworkBest:
    framework: str
    plan: Plan  # the fastest projection that fits (the fastest of all when none fits)
    iteration_s: float  # its simulated steady-state period
    fits: bool
    projections: int  # distinct projected plans simulated
    overall_s: float  # the search's best plan, for the comparison
    stack: str | None = None  # the framework trainer's stack its time is priced for, where not the search's

    def line(self) -> str:
        slower = self.iteration_s / self.overall_s
        fits = "" if self.fits else "; none of them fits in memory, this is the fastest"
        stack = f", priced for its {self.stack} trainer" if self.stack else ""
        return (f"best plan {self.framework} can run (the best of {self.projections} projection(s) of the "
                f"search's re-ranked plans onto what {self.framework} runs{stack}): predicted "
                f"{self.iteration_s:.3f} s, {slower:.2f}x the best plan overall ({self.overall_s:.3f} s){fits}")

    def to_json(self) -> dict:
        return {"framework": self.framework, "iteration_s": self.iteration_s, "fits": self.fits,
                "projections": self.projections, "overall_s": self.overall_s, "stack": self.stack,
                "plan": {c: lay.to_dict() for c, lay in self.plan.layouts.items()}}


def framework_best(experiment: Experiment, profile: Profile, result: SearchResult, framework: str,
                   also: Sequence[Plan] = ()) -> FrameworkBest:
    """The fastest projection onto ``framework`` of the plans the search re-ranked (see above)
    and of the plans in ``also`` (a config imported from the framework, which it runs)."""
    module = exporter(framework)
    plans = [c.plan for c in result.candidates] + [b.plan for b in result.baselines.values() if b.plan is not None]
    plans += list(also)
    projections: dict[str, Plan] = {}
    refused = []
    for plan in plans:
        try:
            export = module.export(experiment, plan)
        except ConfigError as exc:
            refused.append(str(exc))
            continue
        projections.setdefault(export.plan.to_json(), (export.plan, framework_profile(export, profile)))
    if not projections:
        raise ConfigError(f"{framework} can run none of the search's plans: " + "; ".join(sorted(set(refused))))
    scored = []
    for i, (plan, theirs) in enumerate(projections.values()):
        fits = plan_memory(experiment, plan, theirs.capacity_bytes, theirs.stack).feasible
        scored.append((not fits, simulate(experiment, plan, theirs).iteration_s, i, plan, theirs.stack))
    unfit, seconds, _, plan, stack = min(scored, key=lambda t: t[:3])
    return FrameworkBest(framework, plan, seconds, not unfit, len(projections), result.iteration_s,
                         stack if stack != profile.stack else None)
