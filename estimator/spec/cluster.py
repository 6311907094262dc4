"""Cluster and DeviceMesh: where calls can run.

Devices are numbered globally, node-major: device ``n·devices_per_node + k`` is the k-th
device of node n. A mesh is any contiguous run of the cluster's devices — ``0-5`` and ``6-7``
(AReaL's three quarters of a node generating, the rest training), ``0-11`` and ``12-15`` on two
nodes of 8. What keeps a layout's tensor-parallel groups inside a node is a rule of the layout
(:meth:`Cluster.tp_problem`): with the rank order of :class:`estimator.spec.plan.Layout`
(tensor-parallel ranks innermost and contiguous), tp must divide the mesh's devices on every
node it spans.

ReaL's rule — an aligned power-of-two slice of one node or a run of whole nodes
(:meth:`Cluster.aligned`) — survives as the default list of :meth:`Cluster.meshes`: the
search's default space, linear in the devices where the runs of a cluster of N devices are
N(N+1)/2, and what ReaLHF's device meshes can say. ``meshes(uneven=True)`` lists every run.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

from estimator.base import rules
from estimator.base.errors import ConfigError


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def straddling_group(first: int, size: int, tp: int, per_node: int) -> range | None:
    """The first tensor-parallel group of the mesh of ``size`` devices from ``first`` that
    straddles a node boundary (nodes of ``per_node`` devices), or None when none does.

    The groups are ``tp`` neighbouring devices from the mesh's first, ``first + j·tp …
    first + (j+1)·tp − 1`` (the last one cut at the mesh's end when tp does not divide its
    size), so one straddles exactly when a node boundary ``B`` (a multiple of ``per_node``)
    inside the mesh, ``first < B < first + size``, is not a multiple of tp away from ``first``.
    Boundaries lie ``per_node`` apart: when the first two inside the mesh are aligned, tp
    divides their distance and every later one is aligned too — only two need a look. For tp
    dividing the size this is: tp divides the mesh's devices on every node it spans."""
    end = first + size
    for boundary in itertools.islice(range((first // per_node + 1) * per_node, end, per_node), 2):
        if (boundary - first) % tp:
            start = first + (boundary - first) // tp * tp
            return range(start, min(start + tp, end))
    return None


def fitting_count(firsts: range, size: int, tp: int, per_node: int) -> int:
    """How many meshes of ``size`` devices starting at ``firsts`` keep every tensor-parallel
    group of ``tp`` inside a node (:func:`straddling_group`). Whether one does depends on its
    first device modulo ``per_node`` alone, which repeats every ``per_node / gcd(step,
    per_node)`` starts of the range, so one period is checked."""
    period = per_node // math.gcd(firsts.step, per_node)
    return sum(len(range(i, len(firsts), period)) for i in range(min(period, len(firsts)))
               if straddling_group(firsts[i], size, tp, per_node) is None)


@dataclass(frozen=True, order=True)
class DeviceMesh:
    """Devices ``first .. first + size - 1`` (global ids)."""

    first: int  # global id of the first device
    size: int  # number of devices

    def __post_init__(self) -> None:
        if self.first < 0 or self.size < 1:
            raise ConfigError(f"mesh first={self.first}, size={self.size}: need first >= 0, size >= 1")

    @property
    def devices(self) -> range:
        return range(self.first, self.first + self.size)

    @property
    def last(self) -> int:
        return self.first + self.size - 1

    def overlaps(self, other: DeviceMesh) -> bool:
        return self.first <= other.last and other.first <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.size == 1 else f"{self.first}-{self.last}"

    @classmethod
    def parse(cls, text: str) -> DeviceMesh:
        """Parse ``"3"`` or ``"0-7"`` (inclusive device range)."""
        # at most 9 digits: more devices than any cluster, and int() of thousands of digits is slow
        if isinstance(text, int) and not isinstance(text, bool):
            text = str(text)  # a single device written as a JSON number
        m = re.fullmatch(r"\s*(\d{1,9})\s*(?:-\s*(\d{1,9})\s*)?", text) if isinstance(text, str) else None
        if not m:
            shown = text if len(repr(text)) <= 60 else f"{repr(text)[:57]}..."
            raise ConfigError(f"mesh {shown!r} must be a device id or an inclusive range like '0-7' "
                              "(a string of at most 9-digit numbers)")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise ConfigError(f"mesh {text!r}: last device {last} is before first {first}")
        return cls(first, last - first + 1)


@dataclass(frozen=True)
class Cluster:
    """nodes × devices_per_node devices of one profile, with intra- and inter-node links."""

    nodes: int
    devices_per_node: int
    device: str  # hardware profile name, e.g. "h100-sxm"

    def __post_init__(self) -> None:
        problems = []
        for key, hi in (("nodes", rules.MAX_DEVICES), ("devices_per_node", rules.MAX_DEVICES_PER_NODE)):
            try:
                rules.integer(key, getattr(self, key), lo=1, hi=hi)
            except ConfigError as exc:
                problems.append(str(exc))
        if not problems and self.nodes * self.devices_per_node > rules.MAX_DEVICES:
            problems.append(f"{self.nodes}·{self.devices_per_node} devices exceed the limit {rules.MAX_DEVICES:,}")
        if not isinstance(self.device, str) or not self.device:
            problems.append(f"device={self.device!r} must be a non-empty profile name")
        if problems:
            raise ConfigError("cluster: " + "; ".join(problems))

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def node_of(self, device: int) -> int:
        return device // self.devices_per_node

    def mesh_nodes(self, mesh: DeviceMesh) -> range:
        return range(self.node_of(mesh.first), self.node_of(mesh.last) + 1)

    def whole(self) -> DeviceMesh:
        return DeviceMesh(0, self.num_devices)

    def node_parts(self, mesh: DeviceMesh) -> tuple[int, ...]:
        """The mesh's devices on each node it spans, in node order."""
        dpn = self.devices_per_node
        return tuple(min(mesh.last + 1, (n + 1) * dpn) - max(mesh.first, n * dpn) for n in self.mesh_nodes(mesh))

    def mesh_problems(self, mesh: DeviceMesh) -> list[str]:
        """Why ``mesh`` is not a mesh of this cluster (empty list: it is): any contiguous run of
        its devices is one."""
        if mesh.last >= self.num_devices:
            return [f"mesh {mesh} exceeds the cluster's {self.num_devices} devices (0-{self.num_devices - 1})"]
        return []

    def aligned(self, mesh: DeviceMesh) -> bool:
        """Whether ``mesh`` is one of ReaL's shapes: an aligned power-of-two slice of one node
        (size dividing the devices per node, first device a multiple of the size) or a run of
        whole nodes."""
        dpn = self.devices_per_node
        if mesh.last >= self.num_devices:
            return False
        if mesh.size >= dpn:
            return mesh.first % dpn == 0 and mesh.size % dpn == 0
        return is_power_of_two(mesh.size) and dpn % mesh.size == 0 and mesh.first % mesh.size == 0

    def tp_problem(self, mesh: DeviceMesh, tp: int) -> str | None:
        """Why tensor parallelism of degree ``tp`` on ``mesh`` would cross a node (None: its
        groups stay inside nodes, :func:`straddling_group`)."""
        dpn = self.devices_per_node
        if tp > dpn:
            return (f"tp={tp} spans nodes; tensor-parallel groups must fit in one node of {dpn} devices "
                    f"(tp at most {dpn})")
        group = straddling_group(mesh.first, mesh.size, tp, dpn)
        if group is None:
            return None
        parts = ", ".join(map(str, self.node_parts(mesh)))
        return (f"tp={tp} spans nodes on mesh {mesh}: its tensor-parallel group {group[0]}-{group[-1]} straddles "
                f"nodes {self.node_of(group[0])} and {self.node_of(group[-1])} (nodes of {dpn} devices); tp must "
                f"divide the mesh's devices on each node ({parts})")

    def mesh_starts(self, uneven: bool = False) -> dict[int, range]:
        """Mesh size → the first devices of the meshes :meth:`meshes` lists with that size,
        sizes ascending: ReaL's aligned shapes, or with ``uneven`` every contiguous run."""
        n, dpn = self.num_devices, self.devices_per_node
        if uneven:
            return {size: range(n - size + 1) for size in range(1, n + 1)}
        out = {}
        size = 1
        while size < dpn:
            if dpn % size == 0:
                out[size] = range(0, n, size)
            size *= 2
        out.update({k * dpn: range(0, (self.nodes - k) * dpn + 1, dpn) for k in range(1, self.nodes + 1)})
        return out

    def mesh_sizes(self, uneven: bool = False) -> dict[int, int]:
        """Mesh size → how many meshes :meth:`meshes` lists with it, without listing them."""
        return {size: len(firsts) for size, firsts in self.mesh_starts(uneven).items()}

    def num_meshes(self, uneven: bool = False) -> int:
        return sum(self.mesh_sizes(uneven).values())

    def tp_mesh_counts(self, tp: int, uneven: bool = False) -> dict[int, int]:
        """Mesh size → how many of the meshes :meth:`meshes` lists with it keep the
        tensor-parallel groups of ``tp`` inside nodes (:meth:`tp_problem`), without listing them."""
        if tp > self.devices_per_node:
            return {size: 0 for size in self.mesh_starts(uneven)}
        return {size: fitting_count(firsts, size, tp, self.devices_per_node)
                for size, firsts in self.mesh_starts(uneven).items()}

    def meshes(self, uneven: bool = False) -> list[DeviceMesh]:
        """Meshes by size, then first device: ReaL's aligned shapes (:meth:`aligned`), or with
        ``uneven`` every contiguous run of the cluster's devices — N(N+1)/2 of them on N devices."""
        return [DeviceMesh(first, size) for size, firsts in self.mesh_starts(uneven).items() for first in firsts]
