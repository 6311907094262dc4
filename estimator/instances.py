"""The unrolled graph of call instances both the simulator and the evaluator schedule.

Instances come in (iteration, topological) order, which is also the order in which each
device runs the calls placed on it: a call instance starts on its mesh only after every
earlier instance on an overlapping mesh has ended (a runtime that gives each device a fixed
program runs them this way). Its predecessors are of three kinds:

- data: producers of what it reads, same iteration (their outputs are sent when they end);
- version: its role's train call of the previous iteration (the weights it needs);
- device: the latest earlier instance of every call whose mesh overlaps its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.plan import Plan
from estimator.workflow import CallInstance, Workflow


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


def device_preds(graph: InstanceGraph, plan: Plan) -> list[tuple[int, ...]]:
    """Per node: the latest earlier instance of each call whose mesh overlaps its mesh."""
    latest: dict[str, int] = {}
    out = []
    for i, node in enumerate(graph.nodes):
        mesh = plan[node.call].mesh
        out.append(tuple(j for c, j in latest.items() if plan[c].mesh.overlaps(mesh)))
        latest[node.call] = i
    return out
