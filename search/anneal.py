"""Simulated annealing (MCMC) over joint plans, scored by the fast evaluator, in parallel chains.

A chain's state is one layout per call. Each step proposes one move:

- *call*: one call gets another layout — a fresh one from its space, another shape on the same
  mesh, the same shape on another mesh of that size (one where its tp stays inside nodes), or
  the mesh another call uses (a train
  call's new shape recomputes activations only where just that variant fits, or by chance);
- *reshape*: a role's home call gets other (dp, tp, pp) on its mesh, and so do the role's calls
  that shared its placement (moving one alone would make it reallocate);
- *role*: all calls of one role move together to another mesh (a random one, or the mesh of
  another role's call), keeping their shapes where the new size allows;
- *swap*: two roles exchange their home meshes (each role's calls on its home mesh move).

A move is accepted when the plan gets faster, or with probability ``exp(−Δ/T)`` where
``Δ = (new − current)/current`` is the relative slow-down — so the temperature means the same
on a 1-second and a 100-second iteration — and ``T`` falls geometrically from
:data:`T_START` to :data:`T_END` over the budget. Plans that do not fit are rejected, not
penalised; a chain that starts from a plan that does not fit walks downhill in overflow bytes
until one fits. A chain that has not improved its best for :data:`PATIENCE` evaluations goes
back to its best.

The last :data:`POLISH_SHARE` of a chain's budget *polishes* its best plan instead: one call
at a time, in call order, other shapes on the call's mesh are tried (:func:`polish_shapes`:
other degrees with its settings, other settings of its degrees) and the first that makes the
plan faster is kept, pass after pass until a whole pass improves nothing
(a local optimum under single-call reshapes, which the random proposals of a cold chain reach
only slowly: on the 7B PPO example, 3,000 annealed evaluations end 5 % above it). Budget left
after that goes back to annealing from the polished plan.

Starts: the baselines that fit and a greedy per-call plan (:func:`greedy_plan`), dealt out
to the chains in turn; each chain scores its share and walks from the best of them.

Budgets: with ``max_evals`` every chain evaluates exactly its share (split deterministically,
the first chains taking the remainder) and nothing depends on the clock, so a seed repeats
exactly; otherwise chains stop at a wall-clock deadline, checked every step. Chains run in
one process per core (``os.sched_getaffinity``), are seeded by ``(seed, chain)``, and their
results are merged in chain order, so scheduling never changes the answer.
"""

from __future__ import annotations

import heapq
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from estimator.profile.profiles import Profile
from estimator.sim.evaluator import Evaluator, call_s
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Layout
from search.space import CallSpace, Key, Space, make_layout, shape_of

# Tuned on the 7B example (30,000 evaluations, seeds 0-2: within 0.1 % of the best plan a
# 300 s search finds, against 1-6 % for 0.05 → 5e-4)
T_START = 0.2  # accept a 20 % slow-down with probability 1/e at the start
T_END = 5e-3  # … and a 0.5 % one at the end
PATIENCE = 2000  # evaluations without a new best before a chain returns to its best
RECOMPUTE_P = 0.25  # chance a proposed shape recomputes where it may either way
REPORT_EVERY_S = 0.25  # progress messages from chain processes
MAX_IDLE = 10_000  # proposals in a row that change nothing before a chain gives up
POLISH_SHARE = 0.3  # the last part of a chain's budget that polishes its best plan (module docstring)

GREEDY = "greedy"  # a start computed by the chain itself: greedy_plan
Progress = Callable[[int, int, float], None]  # (chain, evaluations so far, best period)


def default_chains() -> int:
    """One chain per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ChainResult:
    top: list[tuple[float, Key]]  # the best distinct plans that fit, fastest first
    evaluated: int  # plans evaluated
    slowest_eval_s: float  # the longest single evaluation (new layouts cost a lowering)


class _Top:
    """The ``k`` fastest distinct plans seen."""

    def __init__(self, k: int):
        self.k, self.heap, self.seen = k, [], set()

    def add(self, period: float, key: Key) -> None:
        if key in self.seen or (len(self.heap) >= self.k and period >= -self.heap[0][0]):
            return
        heapq.heappush(self.heap, (-period, key))
        self.seen.add(key)
        if len(self.heap) > self.k:
            self.seen.discard(heapq.heappop(self.heap)[1])

    def sorted(self) -> list[tuple[float, Key]]:
        return sorted((-p, k) for p, k in self.heap)


class Chain:
    """One annealing chain (see the module docstring)."""

    def __init__(self, experiment: Experiment, profile: Profile, space: Space, seed: tuple[int, int],
                 top_k: int, evaluator: Evaluator | None = None):
        self.ev = evaluator or Evaluator(experiment, profile)
        self.space, self.names = space, space.names
        self.rng = np.random.default_rng(list(seed))
        self.top = _Top(top_k)
        self.roles = {r: [self.names.index(c) for c in calls] for r, calls in space.roles.items()}
        self.home = {r: self.names.index(c) for r, c in space.homes.items()}
        self.evaluated, self.slowest = 0, 0.0

    def score(self, key: Key) -> tuple[bool, float]:
        """(fits, period if it fits else bytes over capacity)."""
        t = time.monotonic()
        r = self.ev.evaluate(self.space.plan(key))
        self.slowest = max(self.slowest, time.monotonic() - t)
        self.evaluated += 1
        if r.feasible:
            self.top.add(r.iteration_s, key)
            return True, r.iteration_s
        return False, r.peak_memory_bytes - self.ev.capacity

    # -- moves

    def _pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def _pick_shape(self, shapes):
        """A shape: (dp, tp, pp, micro-batches) uniformly, then recompute, sharding and offload —
        the first kept setting (none of them, where it fits) unless only one is kept, or with
        probability :data:`RECOMPUTE_P` one of the others uniformly — so a longer backward,
        sharded passes or host transfers are proposed where memory may need them without
        halving the moves elsewhere."""
        variants: dict[tuple, list] = {}
        for sh in shapes:
            variants.setdefault(sh[:4], []).append(sh)
        options = self._pick(list(variants.values()))
        if len(options) == 1 or self.rng.random() >= RECOMPUTE_P:
            return options[0]
        return options[1] if len(options) == 2 else self._pick(options[1:])

    def _fresh(self, cs: CallSpace) -> Layout | None:
        size = self._pick(cs.sizes)
        first = self._pick(cs.firsts[size])
        shapes = cs.shapes_on(DeviceMesh(first, size))  # none where no kept tp fits this run
        return make_layout(first, size, self._pick_shape(shapes)) if shapes else None

    def _on(self, cs: CallSpace, mesh: DeviceMesh, keep: Layout) -> Layout | None:
        shapes = cs.shapes_on(mesh)
        if mesh.first not in cs.firsts.get(mesh.size, ()) or not shapes:
            return None
        shape = shape_of(keep) if shape_of(keep) in shapes else self._pick_shape(shapes)
        return make_layout(mesh.first, mesh.size, shape)

    def _call_move(self, state: list[Layout]) -> list[Layout] | None:
        c = int(self.rng.integers(len(state)))
        cs, cur = self.space.calls[c], state[c]
        u = self.rng.random()
        size = cur.mesh.size
        if u < 0.3:
            new = self._fresh(cs)
        elif u < 0.55:
            new = make_layout(cur.mesh.first, size, self._pick_shape(cs.shapes_on(cur.mesh)))
        elif u < 0.75:
            first = self._pick(cs.firsts[size])
            new = make_layout(first, size, shape_of(cur)) if cs.fits(first, size, cur.tp) else None
        else:
            new = self._on(cs, state[int(self.rng.integers(len(state)))].mesh, cur)
        if new is None or new == cur:
            return None
        return state[:c] + [new] + state[c + 1:]

    def _placed(self, cs: CallSpace, mesh: DeviceMesh, degrees: tuple[int, int, int], keep: Layout) -> Layout | None:
        """``keep``'s call on ``mesh`` with these (dp, tp, pp), its micro-batches kept if valid."""
        shapes = [sh for sh in cs.shapes_on(mesh) if sh[:3] == degrees]
        if not shapes or mesh.first not in cs.firsts.get(mesh.size, ()):
            return None
        shape = shape_of(keep) if shape_of(keep) in shapes else self._pick_shape(shapes)
        return make_layout(mesh.first, mesh.size, shape)

    def _reshape_move(self, state: list[Layout]) -> list[Layout] | None:
        """A role's home gets other (dp, tp, pp) on its mesh, and with it every call of the role
        that ran on the home's placement, so none of them starts to reallocate."""
        role = self._pick(list(self.roles))
        home = state[self.home[role]]
        cs = self.space.calls[self.home[role]]
        shape = self._pick_shape(cs.shapes_on(home.mesh))
        new = list(state)
        for c in self.roles[role]:
            if shape_of(state[c])[:3] == shape_of(home)[:3] and state[c].mesh == home.mesh:
                lay = self._placed(self.space.calls[c], home.mesh, shape[:3], state[c])
                if lay is None:
                    return None
                new[c] = lay
        return None if new == state else new

    def _role_move(self, state: list[Layout]) -> list[Layout] | None:
        role = self._pick(list(self.roles))
        calls = self.roles[role]
        if self.rng.random() < 0.5:
            mesh = state[int(self.rng.integers(len(state)))].mesh
        else:
            sizes = sorted(set().union(*(self.space.calls[c].sizes for c in calls)))
            size = self._pick(sizes)
            mesh = DeviceMesh(self._pick(self.space.calls[calls[0]].firsts[size]), size)
        new = list(state)
        for c in calls:
            lay = self._on(self.space.calls[c], mesh, state[c])
            if lay is None:
                return None
            new[c] = lay
        return None if new == state else new

    def _swap_move(self, state: list[Layout]) -> list[Layout] | None:
        if len(self.roles) < 2:
            return None
        a, b = (list(self.roles)[int(i)] for i in self.rng.choice(len(self.roles), 2, replace=False))
        ma, mb = state[self.home[a]].mesh, state[self.home[b]].mesh
        if ma == mb:
            return None
        new = list(state)
        for role, src, dst in ((a, ma, mb), (b, mb, ma)):
            for c in self.roles[role]:
                if state[c].mesh == src:
                    lay = self._on(self.space.calls[c], dst, state[c])
                    if lay is None:
                        return None
                    new[c] = lay
        return new

    def polish(self, state: list[Layout], cost: float, spent: Callable[[], bool]) -> tuple[list[Layout], float]:
        """Coordinate descent from a plan that fits (its period ``cost``) over single-call
        reshapes on each call's mesh, first improvement kept, until a pass over every call
        improves nothing or ``spent()`` says the budget is over; the plan reached and its period."""
        improved = True
        while improved:
            improved = False
            for c, cs in enumerate(self.space.calls):
                for shape in polish_shapes(cs.shapes_on(state[c].mesh), shape_of(state[c])):
                    if spent():
                        return state, cost
                    lay = make_layout(state[c].mesh.first, state[c].mesh.size, shape)
                    if lay == state[c]:
                        continue
                    new = state[:c] + [lay] + state[c + 1:]
                    fits, new_cost = self.score(tuple(new))
                    if fits and new_cost < cost:
                        state, cost, improved = new, new_cost, True
        return state, cost

    def propose(self, state: list[Layout]) -> list[Layout] | None:
        u = self.rng.random()
        if u < 0.6:
            return self._call_move(state)
        if u < 0.75:
            return self._reshape_move(state)
        return self._role_move(state) if u < 0.9 else self._swap_move(state)

    # -- the walk

    def run(self, starts: list[Key | str], max_evals: int | None, deadline: float | None,
            progress: Progress | None = None, index: int = 0) -> ChainResult:
        """Walk from the best of ``starts`` (plans, or :data:`GREEDY` for :func:`greedy_plan`)."""
        t0 = time.monotonic()
        scored = []
        for start in starts:
            spent = self.evaluated >= max_evals if max_evals is not None else time.monotonic() >= deadline
            if scored and spent:  # the budget also bounds the starts (at least one is scored)
                break
            key = greedy_plan(self.space, self.ev) if start == GREEDY else start
            fits, cost = self.score(key)
            scored.append((not fits, cost, len(scored), key))
        _, _, _, key = min(scored)
        state, fits, cost = list(key), not min(scored)[0], min(scored)[1]
        best, best_state, since = (cost if fits else math.inf), list(state), 0
        last_report, idle, polished = t0, 0, False

        def spent() -> bool:
            return self.evaluated >= max_evals if max_evals is not None else time.monotonic() >= deadline

        while True:
            now = time.monotonic()
            if max_evals is not None:
                if self.evaluated >= max_evals:
                    break
                frac = self.evaluated / max_evals
            else:
                if now >= deadline:
                    break
                frac = (now - t0) / max(deadline - t0, 1e-9)
            if not polished and frac >= 1 - POLISH_SHARE and best < math.inf:
                polished = True
                state, cost = self.polish(list(best_state), best, spent)
                fits, since = True, 0
                if cost < best:
                    best, best_state = cost, list(state)
                continue
            temp = T_START * (T_END / T_START) ** frac
            new = self.propose(state)
            if new is None:
                idle += 1
                if idle >= MAX_IDLE:  # no move changes anything: the space is a single plan here
                    break
                continue
            idle = 0
            new_fits, new_cost = self.score(tuple(new))
            if new_fits and fits:
                delta = (new_cost - cost) / cost
                accept = delta <= 0 or self.rng.random() < math.exp(-delta / temp)
            else:
                accept = new_fits or (not fits and new_cost <= cost)
            if accept:
                state, fits, cost = new, new_fits, new_cost
                if fits and cost < best:
                    best, best_state, since = cost, list(state), 0
            since += 1
            if since >= PATIENCE and best < math.inf:
                state, fits, cost, since = list(best_state), True, best, 0
            if progress is not None and now - last_report >= REPORT_EVERY_S:
                progress(index, self.evaluated, best)
                last_report = now
        if progress is not None:
            progress(index, self.evaluated, best)
        return ChainResult(self.top.sorted(), self.evaluated, self.slowest)


def polish_shapes(shapes: list, current: tuple) -> list:
    """The reshapes :meth:`Chain.polish` tries for a call now at shape ``current`` among the
    ``shapes`` its mesh keeps: every other (dp, tp, pp), each with the current micro-batches,
    recompute, sharding and offload where kept (else its first kept setting), then every
    setting of the current (dp, tp, pp) — a pass of tens of plans per call, where trying every
    kept shape would take thousands on a large mesh."""
    by_degrees: dict[tuple, tuple] = {}
    for sh in shapes:
        if sh[:3] != current[:3] and (sh[:3] not in by_degrees or sh[3:] == current[3:]):
            by_degrees[sh[:3]] = sh
    return list(by_degrees.values()) + [sh for sh in shapes if sh[:3] == current[:3]]


def greedy_plan(space: Space, evaluator: Evaluator) -> Key:
    """Each call on the largest mesh it can use, with the (dp, tp, pp) fastest for it alone (at
    its fewest micro-batches that can fit)."""
    out = []
    for cs in space.calls:
        size = max(cs.sizes)
        mesh = DeviceMesh(cs.firsts[size][0], size)
        first: dict[tuple[int, int, int], tuple] = {}
        for sh in cs.shapes_on(mesh):
            first.setdefault(sh[:3], sh)
        layouts = [make_layout(mesh.first, size, sh) for sh in first.values()]
        out.append(min(layouts, key=lambda lay, n=cs.name: (call_s(evaluator.costs.call(n, lay)), lay)))
    return tuple(out)


def chain_starts(starts: list[Key | str], chains: int) -> list[list[Key | str]]:
    """Chain k scores starts k, k + chains, … and walks from the best; with more chains than
    starts, chain k takes start k mod their number."""
    return [starts[k::chains] or [starts[k % len(starts)]] for k in range(chains)]


def split_evals(max_evals: int | None, chains: int) -> list[int | None]:
    """Each chain's share of the evaluation budget: equal, the first chains taking the remainder."""
    if max_evals is None:
        return [None] * chains
    base, extra = divmod(max_evals, chains)
    return [base + (1 if k < extra else 0) for k in range(chains)]


def _chain_main(args: tuple, queue) -> None:
    experiment, profile, space, seed, top_k, starts, evals, deadline, index = args
    try:
        chain = Chain(experiment, profile, space, seed, top_k)
        result = chain.run(starts, evals, deadline, lambda k, n, b: queue.put(("progress", k, n, b)), index)
        queue.put(("done", index, result))
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
        queue.put(("error", index, f"{type(exc).__name__}: {exc}"))


def anneal(experiment: Experiment, profile: Profile, space: Space, starts: list[Key], *,
           max_evals: int | None, deadline: float | None, seed: int, chains: int, top_k: int,
           progress: Progress | None = None) -> tuple[list[tuple[float, Key]], int, float]:
    """Run ``chains`` chains from ``starts`` (:func:`chain_starts`); return the best distinct
    plans of all chains, fastest first, the plans evaluated and the longest single evaluation."""
    shares = split_evals(max_evals, chains)
    per_chain = chain_starts(starts, chains)
    jobs = [(experiment, profile, space, (seed, k), top_k, per_chain[k], shares[k], deadline, k)
            for k in range(chains)]
    if chains == 1:
        results = [Chain(experiment, profile, space, (seed, 0), top_k).run(per_chain[0], shares[0], deadline,
                                                                           progress, 0)]
    else:
        results = _run_processes(jobs, progress)
    merged: dict[Key, float] = {}
    for r in results:  # chain order: ties keep the lower chain's plan
        for period, key in r.top:
            merged.setdefault(key, period)
    top = sorted((p, k) for k, p in merged.items())[:top_k]
    return top, sum(r.evaluated for r in results), max(r.slowest_eval_s for r in results)


def _run_processes(jobs: list[tuple], progress: Progress | None) -> list[ChainResult]:
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_chain_main, args=(job, queue), daemon=True) for job in jobs]
    for p in procs:
        p.start()
    results: dict[int, ChainResult] = {}
    try:
        while len(results) < len(jobs):
            try:
                kind, index, payload, *rest = queue.get(timeout=1.0)
            except Exception:  # queue.Empty: check that no chain died without a word
                dead = [k for k, p in enumerate(procs) if k not in results and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"search chain {dead[0]} exited with code {procs[dead[0]].exitcode}") from None
                continue
            if kind == "progress" and progress is not None:
                progress(index, payload, rest[0])
            elif kind == "done":
                results[index] = payload
            elif kind == "error":
                raise RuntimeError(f"search chain {index} failed: {payload}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return [results[k] for k in range(len(jobs))]
