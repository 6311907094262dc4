"""Cluster and DeviceMesh: where calls can run.

Devices are numbered globally, node-major: device ``n·devices_per_node + k`` is the k-th
device of node n. A mesh is a contiguous run of devices that is either an aligned
power-of-two slice of one node or a contiguous run of whole nodes (ReaL's rule). The rule
lives in :meth:`Cluster.mesh_problems` so other shapes can be admitted in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from estimator.base import rules
from estimator.base.errors import ConfigError


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


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

    def mesh_problems(self, mesh: DeviceMesh) -> list[str]:
        """Why ``mesh`` is not a valid mesh of this cluster (empty list: it is)."""
        dpn = self.devices_per_node
        if mesh.last >= self.num_devices:
            return [f"mesh {mesh} exceeds the cluster's {self.num_devices} devices (0-{self.num_devices - 1})"]
        if mesh.size >= dpn:
            if mesh.first % dpn or mesh.size % dpn:
                return [f"mesh {mesh} must be whole nodes (multiples of {dpn} devices starting at a node boundary)"]
            return []
        if not is_power_of_two(mesh.size) or dpn % mesh.size or mesh.first % mesh.size:
            return [f"mesh {mesh} must be an aligned power-of-two slice of one node "
                    f"(size dividing {dpn}, first device a multiple of the size)"]
        return []

    def mesh_sizes(self) -> dict[int, int]:
        """Mesh size → how many valid meshes have it (as :meth:`meshes` lists, without listing)."""
        dpn = self.devices_per_node
        out = {}
        size = 1
        while size < dpn:
            if dpn % size == 0:
                out[size] = -(-self.num_devices // size)
            size *= 2
        out.update({n * dpn: self.nodes - n + 1 for n in range(1, self.nodes + 1)})
        return out

    def num_meshes(self) -> int:
        return sum(self.mesh_sizes().values())

    def meshes(self) -> list[DeviceMesh]:
        """Every valid mesh, by size then first device."""
        dpn = self.devices_per_node
        out = []
        size = 1
        while size < dpn:
            if dpn % size == 0:
                out.extend(DeviceMesh(f, size) for f in range(0, self.num_devices, size))
            size *= 2
        for n in range(1, self.nodes + 1):
            out.extend(DeviceMesh(start * dpn, n * dpn) for start in range(self.nodes - n + 1))
        return out
