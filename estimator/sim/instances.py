"""The unrolled graph of call instances both the simulator and the evaluator schedule.

Instances come in (iteration, topological) order, which is also the order in which each
device runs the calls placed on it (a runtime that gives each device a fixed program runs them
this way, as the executor does). An instance occupies its mesh from its start to its end and,
when it runs away from its role's home layout, the home's devices too until its reallocation
ends (they send the weights). It starts once every device it occupies is free. Its
predecessors are of three kinds:

- data: producers of what it reads, same iteration (their outputs are sent when they end);
- version: its role's train call of the previous iteration (the weights it needs);
- device: the latest earlier instance of every call that occupies one of its devices — until
  that instance ends where its mesh meets them, until its reallocation ends where only its
  home does (:func:`device_preds`).
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.spec.cluster import DeviceMesh
from estimator.spec.plan import Layout, Plan
from estimator.spec.workflow import CallInstance, Workflow


@dataclass(frozen=True)
class InstanceGraph:
    nodes: tuple[CallInstance, ...]  # (iteration, topological) order
    data_preds: tuple[tuple[int, ...], ...]  # per node: indices of its producers
    version_preds: tuple[tuple[int, ...], ...]  # per node: indices of last iteration's train calls
    data_succs: tuple[tuple[int, ...], ...]  # per node: indices of its consumers


def instance_graph(workflow: Workflow, iterations: int) -> InstanceGraph:
    nodes, edges = workflow.unroll(iterations)
    index = {n: i for i, n in enumerate(nodes)}
    data = [[] for _ in nodes]
    version = [[] for _ in nodes]
    succs = [[] for _ in nodes]
    for a, b in edges:
        i, j = index[a], index[b]
        if a.iteration == b.iteration:
            data[j].append(i)
            succs[i].append(j)
        else:
            version[j].append(i)
    freeze = lambda lists: tuple(tuple(dict.fromkeys(x)) for x in lists)  # noqa: E731
    return InstanceGraph(tuple(nodes), freeze(data), freeze(version), freeze(succs))


@dataclass(frozen=True)
class DevicePreds:
    """Per node, the earlier instances it waits for on shared devices."""

    ended: tuple[tuple[int, ...], ...]  # must have ended (their mesh meets this node's devices)
    reallocated: tuple[tuple[int, ...], ...]  # must have reallocated (only their home does)


def occupied(call: str, plan: Plan, homes: dict[str, Layout]) -> tuple[DeviceMesh, ...]:
    """The meshes an instance of ``call`` occupies: its own, and its home's when it reallocates."""
    layout, home = plan[call], homes[call]
    return (layout.mesh,) if layout.same_placement(home) else (layout.mesh, home.mesh)


def _meet(a: tuple[DeviceMesh, ...], b: tuple[DeviceMesh, ...]) -> bool:
    return any(x.overlaps(y) for x in a for y in b)


def device_preds(graph: InstanceGraph, plan: Plan, homes: dict[str, Layout]) -> DevicePreds:
    """``homes``: call name → the home layout of its role (where its weights live)."""
    occ = {c: occupied(c, plan, homes) for c in homes}
    latest: dict[str, int] = {}
    ended, reallocated = [], []
    for i, node in enumerate(graph.nodes):
        mine = occ[node.call]
        e, r = [], []
        for c, j in latest.items():
            theirs = occ[c]
            if _meet((theirs[0],), mine):
                e.append(j)
            elif _meet(theirs[1:], mine):
                r.append(j)
        ended.append(tuple(e))
        reallocated.append(tuple(r))
        latest[node.call] = i
    return DevicePreds(tuple(ended), tuple(reallocated))
