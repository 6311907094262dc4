"""Simulating a plan: the one entry every command calls.

On a profile that knows how devices share a host (a CPU profile's ``host`` section), each call
is charged with its host weight, the fixed point :func:`estimator.sim.hostshare.fixed_point`
finds on the fast evaluator's schedule; the discrete-event simulator
(:class:`estimator.sim.simulator.Simulation`) then runs with those weights, so the evaluator
and the simulator charge the same blended costs. On any other profile every call is charged as
profiled.
"""

from __future__ import annotations

from collections.abc import Callable

from estimator.cost.lowering import Costs
from estimator.profile.profiles import Profile
from estimator.sim.evaluator import Evaluator
from estimator.sim.simulator import SimResult, Simulation
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Plan


def host_weights(experiment: Experiment, plan: Plan, profile: Profile, iterations: int,
                 costs: Costs | None = None) -> dict[str, float]:
    """call → its host weight under ``plan`` (empty when the profile says nothing of sharing)."""
    if profile.host is None:
        return {}
    return Evaluator(experiment, profile, iterations, costs).call_weights(plan)


def simulate(experiment: Experiment, plan: Plan, profile: Profile, iterations: int = 3,
             costs: Costs | None = None, progress: Callable[[str], None] | None = None) -> SimResult:
    """Simulate ``iterations`` iterations of ``plan``; see :class:`~estimator.sim.simulator.SimResult`."""
    costs = costs if costs is not None else Costs(experiment, profile)
    weights = host_weights(experiment, plan, profile, iterations, costs)
    return Simulation(experiment, plan, profile, iterations, costs, progress, weights=weights).run()
