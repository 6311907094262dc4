"""A synthetic world for exact estimator tests: a linear hardware profile with round numbers
(efficiency 1, no latency, no launch cost) and hand-made lowered calls with stub costs, so a
timeline can be computed by hand."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from estimator.cost.engine import NONE as NO_MOVES
from estimator.cost.engine import Moves
from estimator.cost.lowering import CallCost, StageCost
from estimator.cost.offload import NONE, OffloadCost
from estimator.cost.pieces import StageTime
from estimator.cost.transfers import Pair, isolated_transfer_s, pair_ports
from estimator.profile.profiles import COLLECTIVES, Profile, profile_from_dict
from estimator.spec.cluster import Cluster, DeviceMesh
from estimator.spec.plan import Layout, Plan
from estimator.spec.workflow import Call, Workflow, Workload

CITE = {"cite": "synthetic test profile"}


def linear_profile_dict(peak: float = 1e12, bw: float = 1e12, link_bw: float = 1e9, alpha: float = 0.0,
                        capacity: float = 80e9, launch: float = 0.0) -> dict:
    link = {k: {"alpha_s": alpha, "busbw_bytes_per_s": link_bw, **CITE} for k in COLLECTIVES}
    return {
        "format": "rlhf-plan/profile-v1", "name": "linear", "source": "datasheet", "device": "synthetic",
        "date": "2026-01-01", "software": {},
        "compute": {"peak": {"flops_per_s": peak, **CITE},
                    "efficiency": {"by": "flops", "interpolation": "log-linear", "points": [[1.0, 1.0]], **CITE},
                    "launch": {"overhead_s": launch, **CITE}},
        "memory": {"capacity": {"bytes": capacity, **CITE}, "bandwidth": {"bytes_per_s": bw, **CITE},
                   "efficiency": {"by": "bytes", "interpolation": "log-linear", "points": [[1.0, 1.0]], **CITE}},
        "links": {"intra": {"name": "synthetic intra", **link}, "inter": {"name": "synthetic inter", **link}},
    }


def linear_profile(**kw) -> Profile:
    return profile_from_dict(linear_profile_dict(**kw))


def stage(layout: Layout, k: int, fwd: float, bwd: float = 0.0, send: float = 0.0, dpn: int = 8,
          dp_allreduce: float = 0.0, optimizer: float = 0.0, decode: tuple = ()) -> StageCost:
    """Stage ``k`` of ``layout`` with round task times (no tensor-parallel communication)."""
    block = layout.dp * layout.tp
    devices = tuple(range(layout.mesh.first + k * block, layout.mesh.first + (k + 1) * block))
    fwd_ports, bwd_ports = (), ()
    if k < layout.pp - 1:
        pairs = [(d, d + block) for d in devices]
        fwd_ports = tuple(p for s, d in pairs for p in pair_ports(s, d, dpn))
        bwd_ports = tuple(p for s, d in pairs for p in pair_ports(d, s, dpn))
    return StageCost(k, devices, StageTime(fwd, 0.0), StageTime(bwd, 0.0), send if k < layout.pp - 1 else 0.0,
                     fwd_ports, bwd_ports, dp_allreduce, (), optimizer, "intra", decode)


def call_cost(name: str, kind: str, layout: Layout, fwd: float, bwd: float = 0.0, send: float = 0.0,
              minibatches: int = 1, dpn: int = 8, **kw) -> CallCost:
    stages = tuple(stage(layout, k, fwd, bwd, send, dpn, **kw) for k in range(layout.pp))
    return CallCost(name, kind, layout, stages, layout.micro_batches, minibatches, 0.0)


@dataclass
class StubCosts:
    """Stands in for :class:`estimator.cost.lowering.Costs` with hand-made calls and transfers."""

    calls: dict[str, CallCost]
    homes: dict[str, str]
    profile: Profile
    dpn: int = 8
    num_devices: int = 8
    realloc: dict[tuple[str, str], dict[Pair, int]] = field(default_factory=dict)  # (role, call) → pairs
    data: dict[tuple[str, str], dict[Pair, int]] = field(default_factory=dict)  # (producer, consumer) → pairs
    offloads: dict[str, OffloadCost] = field(default_factory=dict)  # call → its host transfers

    varying: bool = False  # every iteration alike
    production: bool = False  # no production stack: no refit beyond reallocation, no host copies

    def call(self, name: str, layout: Layout, iteration: int = 0) -> CallCost:
        return self.calls[name]

    def realloc_pairs(self, role: str, home: Layout, layout: Layout, call: str | None = None) -> dict[Pair, int]:
        return next((v for (r, c), v in self.realloc.items() if r == role and self.calls[c].layout == layout), {})

    def realloc_s(self, role: str, home: Layout, layout: Layout, call: str | None = None) -> float:
        return isolated_transfer_s(self.realloc_pairs(role, home, layout), self.profile, self.num_devices,
                                   self.dpn, True)

    def refits(self, call: str | None) -> bool:
        return False

    def refit_fixed_s(self, role: str, call: str | None) -> float:
        return 0.0

    def shares(self, layouts: dict[str, Layout]) -> bool:
        return False

    def moves(self, name: str, layouts: dict[str, Layout], shares: bool) -> Moves:
        return NO_MOVES

    def data_pairs(self, producer: str, src: Layout, consumer: str, dst: Layout) -> dict[Pair, int]:
        return self.data.get((producer, consumer), {})

    def offload(self, name: str, layout: Layout, home: Layout) -> OffloadCost:
        return self.offloads.get(name, NONE)

    def data_s(self, producer: str, src: Layout, consumer: str, dst: Layout) -> float:
        return isolated_transfer_s(self.data_pairs(producer, src, consumer, dst), self.profile,
                                   self.num_devices, self.dpn)


def world(calls: list[Call], nodes: int = 1, devices_per_node: int = 8) -> SimpleNamespace:
    """An experiment-like object with a custom workflow (the simulator reads only these)."""
    return SimpleNamespace(workflow=Workflow("custom", tuple(calls)), models={},
                           cluster=Cluster(nodes, devices_per_node, "synthetic"))


def workload(seqs: int = 8) -> Workload:
    return Workload(seqs, 4, 4)


def lay(first: int, size: int, dp: int = 1, tp: int | None = None, pp: int = 1, mb: int = 1) -> Layout:
    tp = size // (dp * pp) if tp is None else tp
    return Layout(DeviceMesh(first, size), dp, tp, pp, mb)


def plan_of(layouts: dict[str, Layout]) -> Plan:
    return Plan(layouts)
