"""The unrolled graph of call instances both the simulator and the evaluator schedule.

Instances come in the order of :meth:`estimator.spec.workflow.Workflow.program` — (slot,
topological) order, the slot being the iteration in synchronous training, with the weight
pushes below — which is also the order in which each device runs the instances placed on it
(the executor walks this very program). An instance occupies its mesh from its start to its end
and, when it runs away from its role's home layout, the home's devices too until its
reallocation ends (they send the weights). It starts once every device it occupies is free.

Asynchronous plans add one more kind of instance. A generate call that keeps a standing
rollout copy of the actor (:func:`estimator.spec.plan.standing_copies`) does not reallocate;
instead, after each actor update a *weight push* (call name ``push:<generate call>``, iteration
of the update) sends the new weights from the home layout to the copy, on the same
point-to-point pairs a reallocation would use. The push holds the home's devices (they send)
and the copy's (generation pauses for it, between two generate calls: no request is
interrupted, so no tokens are discarded) from its start to its end, and the generate call of
iteration ``i + lag`` waits for the push of iteration ``i`` instead of the update itself.

A generate call that *streams* (:mod:`estimator.spec.stream`) keeps its standing copy busy
across iterations: its instance of iteration ``j`` is the stretch of the stream up to the moment
the share of iteration ``j`` is done, and the stream — not the instance's start — waits for each
push, at the switch the rule puts it; such a push holds only the home's devices here
(:func:`occupied`).

Predecessors are of three kinds:

- data: producers of what it reads, same iteration (their outputs are sent when they end);
- version: its role's train call ``lag`` iterations earlier (the weights it needs), or the
  push of that update to its standing copy; a push's only version predecessor is its update;
- device: the latest earlier instance that occupies one of its devices — until that instance
  ends where what it holds meets them, until its reallocation ends where only its home does
  (:func:`device_preds`).
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.spec.cluster import DeviceMesh
from estimator.spec.plan import Layout, Plan
from estimator.spec.workflow import PUSH, CallInstance, Workflow, push_target


@dataclass(frozen=True)
class InstanceGraph:
    nodes: tuple[CallInstance, ...]  # (slot, topological) order, each push right after its update
    data_preds: tuple[tuple[int, ...], ...]  # per node: indices of its producers
    version_preds: tuple[tuple[int, ...], ...]  # per node: the updates (or pushes) whose weights it needs
    data_succs: tuple[tuple[int, ...], ...]  # per node: indices of its consumers


def instance_graph(workflow: Workflow, iterations: int, standing: frozenset[str] = frozenset()) -> InstanceGraph:
    """``standing``: generate calls with a standing copy (:func:`~estimator.spec.plan.standing_copies`)."""
    _, edges = workflow.unroll(iterations)
    nodes = workflow.program(iterations, standing)
    index = {n: i for i, n in enumerate(nodes)}
    data = [[] for _ in nodes]
    version = [[] for _ in nodes]
    succs = [[] for _ in nodes]
    for a, b in edges:
        if b.call in standing and a.iteration != b.iteration:
            a = CallInstance(a.iteration, PUSH + b.call)  # the update reaches the copy through its push
        i, j = index[a], index[b]
        if a.iteration == b.iteration:
            data[j].append(i)
            succs[i].append(j)
        else:
            version[j].append(i)
    for j, n in enumerate(nodes):
        if push_target(n.call) is not None:
            version[j].append(index[workflow.pushed_update(n)])
    freeze = lambda lists: tuple(tuple(dict.fromkeys(x)) for x in lists)  # noqa: E731
    return InstanceGraph(tuple(nodes), freeze(data), freeze(version), freeze(succs))


@dataclass(frozen=True)
class DevicePreds:
    """Per node, the earlier instances it waits for on shared devices."""

    ended: tuple[tuple[int, ...], ...]  # must have ended (their mesh meets this node's devices)
    reallocated: tuple[tuple[int, ...], ...]  # must have reallocated (only their home does)


Occupancy = tuple[tuple[DeviceMesh, ...], tuple[DeviceMesh, ...]]  # (held to the end, held while reallocating)


def occupied(call: str, plan: Plan, homes: dict[str, Layout], standing: frozenset[str] = frozenset(),
             streaming: frozenset[str] = frozenset()) -> Occupancy:
    """The meshes an instance of ``call`` holds until it ends, and those it holds only while it
    reallocates (its home's, when it runs elsewhere). A push holds the home's and the copy's
    meshes to its end — only the home's where the copy streams (``streaming``,
    :mod:`estimator.spec.stream`: the stream takes it in between its own steps); a call with a
    standing copy holds only its own."""
    target = push_target(call)
    if target is not None:
        return ((homes[target].mesh,) if target in streaming else (plan[target].mesh, homes[target].mesh)), ()
    layout, home = plan[call], homes[call]
    lent = () if call in standing or layout.same_placement(home) else (home.mesh,)
    return (layout.mesh,), lent


def _meet(a: tuple[DeviceMesh, ...], b: tuple[DeviceMesh, ...]) -> bool:
    return any(x.overlaps(y) for x in a for y in b)


def device_preds(graph: InstanceGraph, plan: Plan, homes: dict[str, Layout],
                 standing: frozenset[str] = frozenset(), streaming: frozenset[str] = frozenset()) -> DevicePreds:
    """``homes``: call name → the home layout of its role (where its weights live)."""
    names = dict.fromkeys(n.call for n in graph.nodes)
    occ = {c: occupied(c, plan, homes, standing, streaming) for c in names}
    latest: dict[str, int] = {}
    ended, reallocated = [], []
    for i, node in enumerate(graph.nodes):
        held, lent = occ[node.call]
        mine = held + lent
        e, r = [], []
        for c, j in latest.items():
            theirs_held, theirs_lent = occ[c]
            if _meet(theirs_held, mine):
                e.append(j)
            elif _meet(theirs_lent, mine):
                r.append(j)
        ended.append(tuple(e))
        reallocated.append(tuple(r))
        latest[node.call] = i
    return DevicePreds(tuple(ended), tuple(reallocated))
