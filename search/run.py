"""The search: plan space, start plans, exact search or annealing, re-ranking with the simulator.

:func:`run_search` builds the pruned space (:mod:`search.space`) and the four baselines
(:mod:`search.baselines`), then

1. hands the start plans — every baseline that fits (where none does, the least-memory plan of
   :func:`search.space.least_memory_plan` if it fits) and a greedy per-call plan (each call on
   all devices with the shape the evaluator finds fastest for it alone) — to the chains, each
   of which scores its share and walks from the best;
2. if the joint space has at most :data:`search.exact.EXACT_MAX_PLANS` plans, evaluates all of
   them (provably the evaluator's optimum); otherwise anneals in parallel chains
   (:mod:`search.anneal`) from the start plans, until ``max_evals`` plans (exactly, for runs
   that must repeat) or until :data:`ANNEAL_SHARE` of the time budget;
3. re-ranks the best ``top_k`` distinct plans, every baseline that fits and every plan the
   caller adds (``extra_starts``: the best synchronous plan, an imported config) with the full
   simulator, which decides. So the plan returned is never predicted slower than a baseline
   that fits, nor than a plan the caller adds. With a time budget, simulations stop at the
   budget's end (a candidate not simulated by then keeps its evaluator figure, flagged); with
   ``max_evals`` all run.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass

from estimator.base.errors import ConfigError
from estimator.base.progress import progress_bar
from estimator.cost.memory import fmt_bytes, plan_memory
from estimator.cost.roofline import mfu, roofline_s
from estimator.profile.profiles import Profile
from estimator.sim.evaluator import Evaluator
from estimator.sim.simulate import simulate
from estimator.spec.experiment import Experiment, experiment_from_dict
from estimator.spec.plan import Plan
from search.anneal import GREEDY, anneal, default_chains
from search.baselines import ALL_BASELINES, Baseline, build
from search.exact import EXACT_MAX_PLANS, exact_search
from search.space import Space, build_space, least_memory_plan, parts_text

ANNEAL_SHARE = 0.75  # of the time budget; the rest re-ranks with the simulator
TOP_K = 5  # distinct evaluator candidates the simulator re-ranks
DEFAULT_TIME_BUDGET_S = 20.0

# The built-in default: PPO with four LLaMA-2 7B models on one 8×H100 node (ReaL's smallest
# setting; the same as examples/ppo-llama2-7b-8xh100.yaml).
DEFAULT_EXPERIMENT = {
    "name": "ppo-llama2-7b-8xh100",
    "algorithm": "ppo",
    "models": {"actor": "llama2-7b", "critic": "llama2-7b", "ref": "llama2-7b", "reward": "llama2-7b"},
    "batch_size": 512, "prompt_len": 128, "gen_len": 128, "ppo_minibatches": 4,
    "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
}


def default_experiment() -> Experiment:
    return experiment_from_dict(DEFAULT_EXPERIMENT, where="built-in default experiment")


@dataclass(frozen=True)
class Candidate:
    plan: Plan
    evaluator_s: float | None  # the fast evaluator's period, None when the budget ended first
    simulator_s: float | None  # the simulator's, None when the budget ended first
    source: str  # "search" or "baseline <name>"


@dataclass(frozen=True)
class SearchResult:
    experiment: str
    profile: str
    plan: Plan  # the winner
    iteration_s: float  # the simulator's steady-state period (the evaluator's if not simulated)
    simulated: bool  # whether iteration_s comes from the simulator
    evaluator_s: float  # the evaluator's period for the winner
    evaluated: int  # plans the evaluator scored
    method: str  # "exact" (the whole space) or "anneal"
    chains: int
    space: Space
    baselines: dict[str, Baseline]
    candidates: tuple[Candidate, ...]  # re-ranked, in re-ranking order
    peak_memory_bytes: float
    capacity_bytes: float
    roofline_s: float
    mfu: float
    setup_s: float  # from the call until the search began evaluating plans
    search_s: float  # the exact search or annealing itself (before re-ranking)
    elapsed_s: float
    slowest_eval_s: float  # the longest single evaluation: how far a step can overrun the budget

    @property
    def space_log10(self) -> float:
        return self.space.log10_size

    @property
    def gap(self) -> float:
        """Relative difference of the evaluator's figure from the simulator's for the winner."""
        return self.evaluator_s / self.iteration_s - 1.0


def _sim_worker(experiment: Experiment, profile: Profile, jobs: list[tuple[int, Plan, bool]], queue) -> None:
    ev = None
    for i, plan, need_eval in jobs:
        if need_eval:
            ev = ev or Evaluator(experiment, profile)
            queue.put((i, "evaluator", ev.period_s(plan)))
        queue.put((i, "simulator", simulate(experiment, plan, profile).iteration_s))


def simulate_all(experiment: Experiment, profile: Profile, plans: list[Plan], known: list[float | None],
                 deadline: float | None, workers: int) -> tuple[list[float | None], list[float | None]]:
    """The evaluator's (where ``known`` has none) and the simulator's period of each plan; with a
    deadline, in ``workers`` processes stopped at it (figures not done by then are None)."""
    jobs = [(i, p, k is None) for i, (p, k) in enumerate(zip(plans, known))]
    evals, sims = list(known), [None] * len(plans)
    if deadline is None:
        ev = Evaluator(experiment, profile)
        evals = [k if k is not None else ev.period_s(p) for p, k in zip(plans, known)]
        return evals, [simulate(experiment, p, profile).iteration_s for p in plans]
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    workers = max(1, min(workers, len(plans)))
    procs = [ctx.Process(target=_sim_worker, daemon=True,
                         args=(experiment, profile, [j for j in jobs if j[0] % workers == w], queue))
             for w in range(workers)]
    for p in procs:
        p.start()
    try:
        while any(s is None for s in sims) and time.monotonic() < deadline:
            try:
                i, kind, seconds = queue.get(timeout=max(0.01, min(0.2, deadline - time.monotonic())))
            except Exception:  # queue.Empty
                if all(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("every simulation worker failed") from None
                continue
            (evals if kind == "evaluator" else sims)[i] = seconds
    finally:
        for p in procs:
            p.terminate()
            p.join(timeout=5)
    return evals, sims


def run_search(experiment: Experiment, profile: Profile, *, time_budget_s: float = DEFAULT_TIME_BUDGET_S,
               max_evals: int | None = None, seed: int = 0, chains: int | None = None,
               progress: bool | Callable[[float, int, float], None] = True, top_k: int = TOP_K,
               method: str = "auto", recompute: bool = True, uneven: bool = False,
               extra_starts: dict[str, Plan] | None = None) -> SearchResult:
    """Find the fastest plan that fits (see the module docstring). With ``max_evals`` the result
    depends only on the inputs and the seed; otherwise on ``time_budget_s`` seconds of search.
    ``method`` "auto" searches exactly when the space is small enough; "exact" or "anneal" force one.
    ``recompute=False`` keeps activation recompute out of the space, ``uneven=True`` puts every
    contiguous run of devices in it beside the aligned meshes (:func:`build_space`).
    ``progress``: True shows a progress bar on stderr; a callable gets (seconds since the call,
    plans evaluated, best period so far) as the search goes. ``extra_starts``: more plans (by
    label) the simulator re-ranks, like the baselines, and the chains start from where the space
    holds them (an imported config may lie outside it)."""
    if method not in ("auto", "exact", "anneal"):
        raise ConfigError(f"method={method!r} must be 'auto', 'exact' or 'anneal'")
    t0 = time.monotonic()
    chains = chains or default_chains()
    space = build_space(experiment, profile, recompute, uneven)
    baselines = {name: build(name, experiment, profile, simulate_it=False) for name in ALL_BASELINES}
    ev = Evaluator(experiment, profile)
    starts: list = [space.key(b.plan) for b in baselines.values() if b.feasible and space.contains(b.plan)]
    extra = dict(extra_starts or {})
    starts += [space.key(p) for p in extra.values() if space.contains(p)]
    if not starts:  # no baseline fits: start from the plan built to need little memory where it fits
        least = least_memory_plan(experiment, space, profile.capacity_bytes)
        if space.contains(least) and plan_memory(experiment, least, profile.capacity_bytes, profile.stack).feasible:
            starts.append(space.key(least))
    starts.append(GREEDY)  # computed by the chain that starts from it
    setup_s = time.monotonic() - t0
    exact = method == "exact" or (method == "auto" and space.size <= EXACT_MAX_PLANS)
    bar = _bar(progress is True, space.size if exact else max_evals)
    best: dict[int, tuple[int, float]] = {}

    def report(chain: int, evals: int, best_s: float) -> None:
        best[chain] = (evals, best_s)
        if callable(progress):
            progress(time.monotonic() - t0, sum(e for e, _ in best.values()), min(b for _, b in best.values()))
        if bar is not None:
            bar.n = sum(e for e, _ in best.values())
            bar.set_postfix_str(f"best {min(b for _, b in best.values()):.3f} s", refresh=False)
            bar.refresh()

    if exact:
        method, chains = "exact", 1
        t_exact = time.monotonic()
        top, evaluated = exact_search(space, ev, top_k, lambda n, b: report(0, n, b))
        slowest = time.monotonic() - t_exact
    else:
        method = "anneal"
        deadline = None if max_evals is not None else t0 + ANNEAL_SHARE * time_budget_s
        top, evaluated, slowest = anneal(experiment, profile, space, starts, max_evals=max_evals,
                                         deadline=deadline, seed=seed, chains=chains, top_k=top_k, progress=report)
    if bar is not None:
        bar.close()
    search_s = time.monotonic() - t0 - setup_s
    # simulated in this order while the budget lasts: the evaluator's best, the baselines (so the
    # speed-ups are the simulator's), then the other candidates
    found = [(space.plan(key), period, "search") for period, key in top]
    cands, seen = found[:1], {key for _, key in top}
    for b in baselines.values():
        if b.feasible and space.key(b.plan) not in seen:
            cands.append((b.plan, None, f"baseline {b.name}"))
            seen.add(space.key(b.plan))
    for label, p in extra.items():
        if space.key(p) not in seen:
            cands.append((p, None, label))
            seen.add(space.key(p))
    cands += found[1:]
    if not cands:
        raise ConfigError(no_fit_reason(experiment, profile, space, baselines, evaluated))
    deadline = None if max_evals is not None else t0 + time_budget_s
    evals, sims = simulate_all(experiment, profile, [c[0] for c in cands], [c[1] for c in cands], deadline, chains)
    candidates = tuple(Candidate(p, e, s, src) for (p, _, src), e, s in zip(cands, evals, sims))
    return _result(experiment, profile, space, baselines, candidates, evaluated, method, chains, setup_s, t0,
                   slowest, search_s)


def adopt(experiment: Experiment, profile: Profile, result: SearchResult, plan: Plan, simulator_s: float,
          source: str) -> SearchResult:
    """``result`` with one more simulated candidate, ``plan`` (from ``source``, such as a
    framework's projection of a re-ranked plan: :mod:`search.framework`), re-ranked with the
    others, so the best plan overall is never slower than a plan the search predicted that
    fits; ``plan`` must fit in memory."""
    if not plan_memory(experiment, plan, profile.capacity_bytes, profile.stack).feasible:
        raise ValueError(f"adopt: the plan from {source} does not fit in memory")
    extra = Candidate(plan, Evaluator(experiment, profile).period_s(plan), simulator_s, source)
    t0 = time.monotonic() - result.elapsed_s
    return _result(experiment, profile, result.space, dict(result.baselines), result.candidates + (extra,),
                   result.evaluated, result.method, result.chains, result.setup_s, t0, result.slowest_eval_s,
                   result.search_s)


def no_fit_reason(experiment: Experiment, profile: Profile, space: Space, baselines: dict[str, Baseline],
                  evaluated: int) -> str:
    """Why no plan fits, naming the tightest call and what fills the device: of the baselines
    and a plan built to need little memory (:func:`search.space.least_memory_plan`), the one
    with the lowest peak, its fullest device, the call running there at the peak and that
    device's bytes by part, against the capacity."""
    tried = [("a least-memory plan (each role at home on its largest mesh, most sharded and offloaded)",
              least_memory_plan(experiment, space, profile.capacity_bytes))]
    tried += [(f"baseline {b.name}", b.plan) for b in baselines.values() if b.plan is not None]
    reports = [(plan_memory(experiment, plan, profile.capacity_bytes, profile.stack), what, plan)
               for what, plan in tried]
    memory, what, plan = min(reports, key=lambda r: r[0].peak.peak_bytes)
    worst = memory.peak
    homes = experiment.workflow.home_calls()
    resident = [role for role, call in homes.items() if worst.device in plan[call].mesh.devices]
    return (f"no plan fits in {fmt_bytes(profile.capacity_bytes)} per device: no baseline fits and the search "
            f"found none among {evaluated:,} plans. Tightest plan tried, {what}: {worst.during} is "
            f"the tightest call, {fmt_bytes(worst.peak_bytes)} on device {worst.device} against "
            f"{fmt_bytes(memory.capacity_bytes)} ({parts_text(worst.parts)}; the device keeps the resident "
            f"state of {', '.join(resident) or 'no role'})"
            + (f"; {len(memory.over) - 1} more device(s) over capacity" if len(memory.over) > 1 else ""))


def _bar(progress: bool, total: int | None):
    if not progress:
        return None
    # tqdm puts ", " before a postfix itself: it goes inside the brackets
    return progress_bar(total=total, unit=" plans", desc="search",
                        bar_format="{desc}: {n_fmt} plans [{elapsed}, {rate_fmt}{postfix}]")


def _result(experiment: Experiment, profile: Profile, space: Space, baselines: dict[str, Baseline],
            candidates: tuple[Candidate, ...], evaluated: int, method: str, chains: int, setup_s: float,
            t0: float, slowest_eval_s: float, search_s: float) -> SearchResult:
    by_plan = {space.key(c.plan): c for c in candidates}
    for name, b in baselines.items():
        if b.feasible:
            c = by_plan[space.key(b.plan)]
            if c.simulator_s is not None:
                baselines[name] = dataclasses.replace(b, iteration_s=c.simulator_s)
            elif c.evaluator_s is not None:
                baselines[name] = dataclasses.replace(b, iteration_s=c.evaluator_s,
                                                      note="fast evaluator: the budget ended before its simulation")
            else:
                baselines[name] = dataclasses.replace(b, note="not predicted: the budget ended first")
    simulated = [c for c in candidates if c.simulator_s is not None]
    if simulated:
        win = min(simulated, key=lambda c: c.simulator_s)
        seconds = win.simulator_s
    else:  # the budget ended before the first simulation: the evaluator's best stands
        win = min((c for c in candidates if c.evaluator_s is not None), key=lambda c: c.evaluator_s)
        seconds = win.evaluator_s
    memory = plan_memory(experiment, win.plan, profile.capacity_bytes, profile.stack)
    return SearchResult(
        experiment=experiment.name, profile=profile.name, plan=win.plan, iteration_s=seconds,
        simulated=bool(simulated), evaluator_s=win.evaluator_s, evaluated=evaluated, method=method,
        chains=chains, space=space, baselines=baselines, candidates=candidates,
        peak_memory_bytes=memory.peak.peak_bytes, capacity_bytes=memory.capacity_bytes,
        roofline_s=roofline_s(experiment, profile), mfu=mfu(experiment, profile, seconds),
        setup_s=setup_s, search_s=search_s, elapsed_s=time.monotonic() - t0, slowest_eval_s=slowest_eval_s)
