"""Hardware profiles: what one device computes, stores and moves, and where each number comes from.

A profile is a JSON file (``calibration/profiles/<name>.json``) in one format for measured and
datasheet profiles. Every object that holds numbers also holds ``cite`` (a datasheet,
paper or public benchmark) or ``command`` (the measurement that produced them)::

    {"format": "rlhf-plan/profile-v2", "name": "h100-sxm", "source": "datasheet",
     "device": "NVIDIA H100 80GB HBM3 (SXM5)", "date": "2026-11-21", "software": {},
     "compute": {"peak": {"flops_per_s": 989.4e12, "cite": "..."},
                 "efficiency": {"by": "flops", "interpolation": "log-linear",
                                "points": [[2.1e9, 0.18], ...], "cite": "..."},
                 "launch": {"overhead_s": 5e-6, "cite": "..."},  # optional: grad_ and backward_overhead_s
                 "compose": {"mode": "overlap", "cite": "..."},  # optional, default overlap
                 "dtype": "bfloat16",  # optional: the run dtype (float32 for the CPU executor)
                 "ops": "executor",  # optional: the op census it charges (executor | fused)
                 "kernels": {"floor_s": ..., "by_kernel": {"rms_norm": {"bandwidth_efficiency": ...,
                             "floor_s": ...}}, "cite": ...}},  # optional: per fused-kernel figures
     "memory": {"capacity": {"bytes": ..., "cite": ...}, "bandwidth": {"bytes_per_s": ..., "cite": ...},
                "efficiency": {"by": "bytes", ...}},
     "links": {"intra": {"name": "...", "all_reduce": {"alpha_s": ..., "busbw_bytes_per_s": ..., "cite": ...},
                         "all_gather": {"curves": {"2": [[size_bytes, time_s], ...], "8": [...]},
                                        "command": ...}, "reduce_scatter": ..., "p2p": ..., "broadcast": ...},
               "inter": {..., "all_reduce": {"curves": {"2x8": [...]}, "alpha_s": ..., ...}}},
     "executor": {"call_overhead_s": ..., "micro_batch_overhead_s": ..., "command": "..."},  # optional
     "host_link": {"h2d_bytes_per_s": ..., "d2h_bytes_per_s": ..., "alpha_s": ..., "cite": ...},  # optional;
                   # or {"copy": "memory", "command": ...}: host memory is the device's own (CPU profiles)
     "stacks": {...}}  # optional: the production stacks' own costs (estimator/profile/stacks.py)

Compute time of one op is device time (FLOPs at the efficiency curve, bytes at the memory
curve, the longer) combined with host dispatch (``launch.overhead_s`` per aten op under
``no_grad``; ``grad_overhead_s`` per op autograd records and ``backward_overhead_s`` per op of a
backward pass where the profile measured them) by ``+`` (``compose`` serial) or ``max``
(overlap): :meth:`Profile.op_s`. The ``executor`` section holds
the runtime's own bookkeeping per call and per micro-batch stage pass (default 0). The optional
``trainer`` section says where the training software priced departs from the op census
(:mod:`estimator.profile.trainer`: Megatron's unfused attention, vocab-parallel loss,
contiguous gradient buffer, fused optimizer).

Efficiency curves map an op's size (FLOPs or bytes) to the fraction of peak it reaches; they
are looked up by interpolation in log(size) between points (or as steps, Calculon-style) and
held flat beyond the first and last point.

Links (``estimator/profile/collectives.py`` has the whole rule): each collective kind on each link class
holds measured time curves per group size — interpolated in log(size)–log(time), held at the
smallest size's time below it, extended at the last segment's bandwidth beyond the largest,
and served to a group size not measured from the nearest measured one scaled by the bus
factors — or a latency + nccl-tests *bus* bandwidth, so a collective over ``n`` ranks takes
``alpha_s + factor(n)·S/busbw`` (nccl-tests doc/PERFORMANCE.md): all-reduce ``2(n−1)/n``,
all-gather and reduce-scatter ``(n−1)/n``, broadcast and point-to-point 1. A collective over
several nodes uses a measured ``"<nodes>x<per_node>"`` curve of ``links.inter`` where one
exists and composes the intra-node and inter-node phases only where none does.

The host link (``host_link``, optional: a profile without it cannot price offload; parsed by
:func:`estimator.profile.stacks.parse_host_link`) carries a device's copies to and from host
memory — the offload of :mod:`estimator.cost.offload` and a production stack's sleep, wake and
reference swap (:mod:`estimator.cost.engine`), all through :meth:`Profile.host_copy_s`: an
upload at ``h2d_bytes_per_s``, a download at ``d2h_bytes_per_s`` per device, each copy issued
from the host at the launch cost of one op (:meth:`Profile.dispatch_s`) plus the link's
``alpha_s``, every device on a link of its own (a GPU's PCIe link); or ``"copy": "memory"``
where host memory *is* the device's memory (the CPU executor), so a copy to host memory is one
op reading and writing its bytes in device memory (:meth:`Profile.op_s`).

Format ``rlhf-plan/profile-v2`` adds the curves; a ``rlhf-plan/profile-v1`` file (α + busbw
only) still loads unchanged.

Loading parses and checks the file once and precomputes the lookup tables, so cost functions
in the hot loop only interpolate.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from estimator.base.errors import ConfigError, did_you_mean
from estimator.base.io import atomic_write_json
from estimator.base.loading import is_file, load_json
from estimator.base.rules import MAX_LATENCY_S
from estimator.profile.collectives import COLLECTIVES, LINK_CLASSES, LinkCost, bus_factor, number, parse_links
from estimator.profile.stacks import EngineTerms, HostLink, StackTerms, parse_host_link, parse_stacks
from estimator.profile.trainer import Trainer, parse_trainer
from estimator.spec.stack import STACKS

__all__ = ["COLLECTIVES", "FORMATS", "LINK_CLASSES", "PROFILE_DIR", "PROFILE_FORMAT", "Curve", "LinkCost",
           "Profile", "bus_factor", "known_profiles", "load_profile", "profile_from_dict"]

PROFILE_FORMAT = "rlhf-plan/profile-v2"  # what new files are written in
FORMATS = ("rlhf-plan/profile-v1", PROFILE_FORMAT)  # what loads; v1 has no collective curves
PROFILE_DIR = Path(__file__).resolve().parents[2] / "calibration" / "profiles"
SOURCES = ("measured", "datasheet")
INTERPOLATIONS = ("log-linear", "step")
COMPOSE_MODES = ("serial", "overlap")
RUN_DTYPES = ("bfloat16", "float32")  # the dtypes the op census records
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
DISPATCH_MODES = ("nograd", "grad", "backward")
DISPATCH_KEYS = ("grad_overhead_s", "backward_overhead_s")  # optional in compute.launch
OP_SETS = ("executor", "fused")  # the op censuses a profile can charge (estimator.cost.census.OP_SET_PATHS)
ALONE_TERMS = ("flops", "bytes", "dispatch", "executor")  # host.alone: one factor per cost term
MAX_HOST_DEVICES = 1024  # host.devices: simulated devices sharing one host's cores


@dataclass(frozen=True)
class HostSharing:
    """How a host's simulated devices slow each other down (the CPU executor: one process per
    device on one machine). The profile's compute figures hold with all ``devices`` busy; a
    device computing alone takes ``alone[term]`` times as long for each term of an op's cost
    (device FLOPs, memory traffic, host dispatch, the executor's fixed costs). With ``k`` of the
    host's devices busy (itself included) a call's cost lies between the alone and the all-busy
    figures at :meth:`weight` of ``k`` (:mod:`estimator.sim.hostshare`)."""

    devices: int  # simulated devices that were busy at once when the compute figures were taken
    alone: dict[str, float]  # term → time alone / time with every device busy

    def weight(self, busy: float) -> float:
        """Where ``busy`` devices (fractional: a time average) lie between alone (0) and every
        device busy (1)."""
        if self.devices <= 1:
            return 1.0
        return min(max((busy - 1.0) / (self.devices - 1), 0.0), 1.0)


@dataclass(frozen=True)
class Curve:
    """Efficiency in (0, 1] against op size; flat beyond the first and last point."""

    points: tuple[tuple[float, float], ...]  # (size in FLOPs or bytes, efficiency), ascending
    interpolation: str = "log-linear"  # log-linear | step (value of the largest size <= x)
    _logx: list[float] = field(init=False, repr=False, compare=False)
    _ys: list[float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if not self.points:
            problems.append("needs at least one point")
        sizes = [p[0] for p in self.points]
        if any(s <= 0 for s in sizes) or sizes != sorted(set(sizes)):
            problems.append(f"sizes {sizes} must be positive and strictly ascending")
        bad = [e for _, e in self.points if not 0 < e <= 1]
        if bad:
            problems.append(f"efficiencies {bad} must lie in (0, 1]")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation={self.interpolation!r} must be one of {INTERPOLATIONS}")
        if problems:
            raise ConfigError("efficiency curve: " + "; ".join(problems))
        object.__setattr__(self, "_logx", [math.log(s) for s in sizes])
        object.__setattr__(self, "_ys", [float(e) for _, e in self.points])

    def __call__(self, size: float) -> float:
        """Efficiency of one op of ``size``."""
        xs, ys = self._logx, self._ys
        if size <= 0:
            return ys[0]
        x = math.log(size)
        i = bisect.bisect_right(xs, x)
        if i == 0:
            return ys[0]
        if i == len(xs) or self.interpolation == "step":
            return ys[i - 1]
        w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return ys[i - 1] + w * (ys[i] - ys[i - 1])

    def many(self, sizes: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`__call__`."""
        x = np.log(np.maximum(np.asarray(sizes, dtype=float), 1e-300))
        if self.interpolation == "log-linear":
            return np.interp(x, self._logx, self._ys)
        idx = np.searchsorted(self._logx, x, side="right") - 1
        return np.asarray(self._ys)[np.clip(idx, 0, len(self._ys) - 1)]


@dataclass(frozen=True, kw_only=True)
class Profile:
    """One device kind: compute, memory and links, with the provenance of every number.

    Fields are grouped as the profile file's sections are (``compute``, ``memory``, ``links``,
    ``executor``, ``host``); the file itself is kept in ``raw``."""

    # the header
    name: str
    source: str  # measured | datasheet
    device: str  # device model in words
    date: str  # ISO date the figures were collected
    software: dict[str, str]  # versions (driver, CUDA, torch, NCCL) of a measurement
    # compute
    peak_flops: float  # dense bf16 FLOP/s
    flops_efficiency: Curve  # by FLOPs of one op
    launch_overhead_s: float  # per aten op dispatched outside autograd (inference, generation), seconds
    grad_overhead_s: float | None = None  # per op dispatched while autograd records (training forward)
    backward_overhead_s: float | None = None  # per op the autograd engine runs in a backward pass
    compose: str = "overlap"  # serial | overlap: how host dispatch and device work combine
    dtype: str = "bfloat16"  # run dtype the device's figures are for (selects the op census)
    # device time of an op inside the executor's model code against the same op timed alone, per dispatch mode
    device_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ops: str = "executor"  # op census charged: executor (eager aten ops) | fused (one entry per fused kernel)
    kernel_floor_s: float = 0.0  # shortest time any kernel takes on the device, seconds
    # fused kernel → (bandwidth efficiency, floor_s[, FLOPs efficiency]) where the profile measured it
    kernels: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # memory
    capacity_bytes: float  # device memory, bytes
    mem_bandwidth_Bps: float  # device memory bandwidth, bytes/s
    mem_efficiency: Curve  # by bytes of one op
    # links
    links: dict[str, dict[str, LinkCost]]  # link class → collective → cost
    link_names: dict[str, str]  # link class → what it is, e.g. "NVLink 4 via NVSwitch"
    # executor: the runtime's own costs beyond its ops
    call_overhead_s: float = 0.0  # bookkeeping per call, seconds
    micro_batch_overhead_s: float = 0.0  # bookkeeping per micro-batch stage pass, seconds
    collective_overhead_s: float = 0.0  # extra per collective issued between computations, seconds
    p2p_overhead_s: float = 0.0  # extra per pipeline message sent between computations, seconds
    checkpoint_s: tuple[float, float] = (0.0, 0.0)  # activation checkpointing per block, (forward, backward), s
    # host
    host: HostSharing | None = None  # devices of one host slow each other down (CPU); None: they do not
    host_link: HostLink | None = None  # device ↔ host copies (PCIe), where the profile gives them
    # the production stacks' own costs on this device (estimator.profile.stacks), by stack name
    stacks: dict[str, StackTerms] = field(default_factory=dict)
    # the stack this instance prices (estimator.profile.pricing.for_stack); "" : none named, the
    # op census of compute.ops and nothing beyond it
    stack: str = ""
    stack_note: str = ""  # why another profile of the device was taken for the stack, if one was
    # the training software priced, where it departs from the op census (estimator.profile.trainer)
    trainer: Trainer = field(default_factory=Trainer)
    # where it came from
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)  # the file
    path: str = ""  # where it was loaded from
    _by_kinds: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # kinds → figures

    def alone(self) -> Profile:
        """The same device computing while its host's other devices idle (``host.alone``); the
        profile itself when it says nothing about sharing a host."""
        if self.host is None:
            return self
        a = self.host.alone

        def scaled(x: float | None, term: str) -> float | None:
            return None if x is None else x * a[term]

        return replace(self, peak_flops=self.peak_flops / a["flops"],
                       mem_bandwidth_Bps=self.mem_bandwidth_Bps / a["bytes"],
                       launch_overhead_s=self.launch_overhead_s * a["dispatch"],
                       grad_overhead_s=scaled(self.grad_overhead_s, "dispatch"),
                       backward_overhead_s=scaled(self.backward_overhead_s, "dispatch"),
                       call_overhead_s=self.call_overhead_s * a["executor"],
                       micro_batch_overhead_s=self.micro_batch_overhead_s * a["executor"], host=None)
    @property
    def terms(self) -> StackTerms | None:
        """The engine, refit and trainer numbers of the stack this instance prices (None: the
        executor, no stack named, or a device without numbers for it)."""
        return self.stacks.get(self.stack)

    @property
    def engine(self) -> EngineTerms | None:
        """The serving engine's own costs where a production stack with numbers is priced."""
        terms = self.terms
        return terms.generation if terms is not None else None

    def kernel_figures(self, kinds: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row of ``kinds``: bandwidth efficiency, floor and FLOPs efficiency (NaN where the
        profile has none of its own), looked up once per tuple of kernel names."""
        if kinds not in self._by_kinds:
            figures = [self.kernels.get(k) for k in kinds]
            self._by_kinds[kinds] = (np.array([f[0] if f else np.nan for f in figures]),
                                     np.array([f[1] if f else self.kernel_floor_s for f in figures]),
                                     np.array([f[2] if f and len(f) > 2 else np.nan for f in figures]))
        return self._by_kinds[kinds]

    def dispatch_s(self, mode: str = "nograd") -> float:
        """Host cost of one aten op in ``mode`` (:data:`DISPATCH_MODES`): in eager PyTorch an
        op that autograd records (it builds the graph node) or that the autograd engine runs
        costs more host time than the same op under ``no_grad``; a profile that does not say
        charges every mode the ``launch.overhead_s``."""
        if mode == "grad" and self.grad_overhead_s is not None:
            return self.grad_overhead_s
        if mode == "backward" and self.backward_overhead_s is not None:
            return self.backward_overhead_s
        return self.launch_overhead_s

    def in_model_scale(self, mode: str = "nograd") -> float:
        """How much longer an op's device time is inside the executor's model code than the
        same op timed alone (``compute.in_model``, per dispatch mode; 1 when the profile does
        not say): operands and outputs of a pass's many tensors are not the warm, reused ones
        of an op timed in a loop."""
        return self.device_scale[DISPATCH_MODES.index(mode)]

    @property
    def elem_bytes(self) -> int:
        """Bytes of one element in the run dtype: what activations, gradients and parameters
        the executor sends weigh (bf16 on GPUs, float32 for the CPU executor)."""
        return DTYPE_BYTES[self.dtype]

    def compute_s(self, flops: float) -> float:
        """Seconds to do ``flops`` in one op at the fitted efficiency."""
        return flops / (self.peak_flops * self.flops_efficiency(flops)) if flops > 0 else 0.0

    def memory_s(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` through device memory in one op."""
        return nbytes / (self.mem_bandwidth_Bps * self.mem_efficiency(nbytes)) if nbytes > 0 else 0.0

    def op_s(self, flops: float, nbytes: float, launches: float = 1, mode: str = "nograd",
             in_model: bool = True) -> float:
        """Device time — the longer of compute at the fitted efficiency and memory traffic at
        the fitted bandwidth — combined with host time, ``launches`` aten ops dispatched at
        :meth:`dispatch_s` each: added when ``compose`` is serial (CPU: dispatch and kernel
        run one after the other on one thread), the longer of the two when it is overlap
        (CUDA: launches are asynchronous, so a stream of ops is bound by whichever is slower).
        ``in_model``: the op runs inside the model's code (``compute.in_model`` applies); the
        optimizer's and the gradient copies' ops do not."""
        scale = self.in_model_scale(mode) if in_model else 1.0
        device = max(self.compute_s(flops), self.memory_s(nbytes)) * scale
        if (flops > 0 or nbytes > 0) and self.kernel_floor_s:
            device = max(device, self.kernel_floor_s)
        host = launches * self.dispatch_s(mode)
        return device + host if self.compose == "serial" else max(device, host)

    def ops_s_many(self, flops: np.ndarray, nbytes: np.ndarray, launches: np.ndarray | float = 1,
                   mode: str = "nograd", kinds: tuple[str, ...] | None = None,
                   in_model: bool = True) -> np.ndarray:
        """Vectorised :meth:`op_s` over arrays of ops. ``kinds`` names the kernel of each row
        (the first axis): a kernel the profile measured (``compute.kernels``) moves its bytes
        at its own bandwidth efficiency instead of the by-bytes curve, and no kernel takes less
        than its floor (the profile's kernel floor where it has none of its own)."""
        flops = np.asarray(flops, dtype=float)
        nbytes = np.asarray(nbytes, dtype=float)
        compute = np.where(flops > 0, flops / (self.peak_flops * self.flops_efficiency.many(flops)), 0.0)
        mem_eff = self.mem_efficiency.many(nbytes)
        floor = self.kernel_floor_s
        if kinds is not None and self.kernels:
            shape = (len(kinds),) + (1,) * (nbytes.ndim - 1)
            scale, floor, own = (a.reshape(shape) for a in self.kernel_figures(tuple(kinds)))
            mem_eff = np.where(np.isnan(scale), mem_eff, scale)
            if not np.isnan(own).all():
                compute = np.where(np.isnan(own) | (flops <= 0), compute, flops / (self.peak_flops * own))
        memory = np.where(nbytes > 0, nbytes / (self.mem_bandwidth_Bps * mem_eff), 0.0)
        device = np.maximum(compute, memory) * (self.in_model_scale(mode) if in_model else 1.0)
        if self.kernel_floor_s or self.kernels:
            device = np.where((flops > 0) | (nbytes > 0), np.maximum(device, floor), 0.0)
        host = np.asarray(launches, dtype=float) * self.dispatch_s(mode)
        return device + host if self.compose == "serial" else np.maximum(device, host)

    def link(self, link_class: str, kind: str) -> LinkCost:
        return self.links[link_class][kind]

    def collective_s(self, kind: str, size_bytes: float, n: int, link_class: str = "intra") -> float:
        """One collective of ``size_bytes`` per rank over ``n`` ranks on one link class."""
        if n <= 1 or size_bytes <= 0:
            return 0.0
        return self.links[link_class][kind].time_s(size_bytes, n)

    def group_collective_s(self, kind: str, size_bytes: float, per_node: int, nodes: int,
                           fewest: int | None = None) -> float:
        """A collective over ``per_node`` ranks on each of ``nodes`` nodes: a measured multi-node
        curve where the profile has one for that shape; otherwise hierarchically, the
        intra-node phase on NVLink, then ``1/per_node`` of the data per rank across nodes on
        each rank's own NIC (a two-level ring).

        ``fewest``: where nodes hold different numbers of the group's ranks (a mesh that is
        not whole nodes, ``0-11`` on nodes of 8), ``per_node`` is the most on one node and
        ``fewest`` the least. The intra-node phase then takes as long as on the fullest node,
        and across nodes each rank of the emptiest node carries ``1/fewest`` of the data on its
        NIC, the slowest share; measured multi-node curves are of even shapes and not used."""
        fewest = per_node if fewest is None else fewest
        if nodes <= 1:
            return self.collective_s(kind, size_bytes, per_node, "intra")
        if size_bytes <= 0:
            return 0.0
        measured = (self.links["inter"][kind].multi_node_s(size_bytes, nodes, per_node)
                    if fewest == per_node else None)
        if measured is not None:
            return measured
        if kind == "p2p" or kind == "broadcast":
            return self.collective_s(kind, size_bytes, 2, "inter")
        intra = self.collective_s(kind, size_bytes, per_node, "intra")
        return intra + self.collective_s(kind, size_bytes / fewest, nodes, "inter")

    def in_call_s(self, kind: str, size_bytes: float, n: int, link_class: str = "intra") -> float:
        """A collective a call issues between its computations (tensor- and data-parallel): the
        curve's time plus ``executor.collective_overhead_s``, what arriving at different moments
        adds there (:func:`calibration.collectives.measure_in_situ`)."""
        if n <= 1 or size_bytes <= 0:
            return 0.0
        return self.collective_s(kind, size_bytes, n, link_class) + self.collective_overhead_s

    def in_call_group_s(self, kind: str, size_bytes: float, per_node: int, nodes: int) -> float:
        """:meth:`in_call_s` of a group of ``per_node`` ranks on each of ``nodes`` nodes: inside
        one node its curve, across nodes :meth:`group_collective_s` (a measured multi-node
        curve, else the intra-node phase and the inter-node phase on the NICs), plus
        ``executor.collective_overhead_s`` either way."""
        if nodes <= 1:
            return self.in_call_s(kind, size_bytes, per_node, "intra")
        if size_bytes <= 0:
            return 0.0
        return self.group_collective_s(kind, size_bytes, per_node, nodes) + self.collective_overhead_s

    def stage_send_s(self, size_bytes: float, link_class: str) -> float:
        """One pipeline message between stages as the executor sends it, between computations:
        its back-to-back time plus ``executor.p2p_overhead_s``."""
        return self.p2p_s(size_bytes, link_class) + (self.p2p_overhead_s if size_bytes > 0 else 0.0)

    def p2p_s(self, size_bytes: float, link_class: str) -> float:
        """One point-to-point message."""
        if size_bytes <= 0:
            return 0.0
        return self.links[link_class]["p2p"].time_s(size_bytes, 2)

    def host_copy_s(self, nbytes: float, copies: int = 1, direction: str = "upload") -> float:
        """``nbytes`` copied between one device and host memory in ``copies`` copies (one per
        tensor), one ``direction`` (``"upload"``: host to device at ``h2d_bytes_per_s``,
        ``"download"``: device to host at ``d2h_bytes_per_s``): each copy issued at
        :meth:`dispatch_s` plus the link's ``alpha_s``, the bytes at the link's rate; or — host
        memory being the device's own (``"copy": "memory"``) — each copy an op that reads and
        writes its share in device memory. Raises :class:`ConfigError` on a profile without a
        host link."""
        link = self.host_link
        if link is None:
            raise ConfigError(f"profile {self.name}: has no host_link section, so it cannot price offload "
                              "(moving training state to host memory); add one with its source, or plan "
                              "with offload: none")
        if nbytes <= 0 or copies <= 0:
            return 0.0
        if link.copy == "memory":
            return copies * self.op_s(0.0, 2.0 * nbytes / copies, 1, in_model=False)
        return copies * (self.dispatch_s() + link.alpha_s) + nbytes / link.bytes_per_s(direction)

    def provenance(self) -> dict[str, str]:
        """Dotted path of every group of numbers → its citation or command."""
        out: dict[str, str] = {}

        def walk(node: Any, path: str) -> None:
            if isinstance(node, dict):
                where = node.get("cite") or node.get("command")
                if where and ("curves" in node or any(isinstance(v, (int, float, list)) for v in node.values())):
                    out[path] = str(where)
                for k, v in node.items():
                    walk(v, f"{path}.{k}" if path else k)

        walk({k: self.raw[k] for k in ("compute", "memory", "links", "executor", "host_link", "stacks", "trainer")
              if k in self.raw}, "")
        return out

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.raw)


# ---- loading ------------------------------------------------------------------------------


def known_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path, key: str = "") -> Profile:
    """A shipped profile by name (``calibration/profiles/<name>.json``) or a profile file by path,
    read through :mod:`estimator.base.loading` and checked; ``key`` (e.g. ``"cluster.device"``)
    prefixes every error so it names where the profile was given."""
    prefix = f"{key}: " if key else ""
    text = str(name_or_path)
    if not text.strip():
        raise ConfigError(f"{prefix}the hardware profile name is empty; known profiles: "
                          f"{', '.join(known_profiles())} (or give a path to a profile .json)")
    path = Path(text)
    if not (text.endswith(".json") or "/" in text or "\0" in text or is_file(path)):
        path = PROFILE_DIR / f"{text}.json"
        if not is_file(path):
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise ConfigError(f"{prefix}unknown hardware profile {shown!r}{did_you_mean(text, known_profiles())}; "
                              f"known profiles: {', '.join(known_profiles())} (or give a path to a profile .json)")
    try:
        data = load_json(path, "hardware profile", expect=dict)
        return profile_from_dict(data, where=f"profile {path}", path=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def _obj(data: Any, key: str, where: str, keys: tuple[str, ...], numbers: bool = True,
         optional: tuple[str, ...] = ()) -> dict:
    """``data[key]`` as an object with exactly ``keys`` (+ cite/command when it holds numbers,
    + any of ``optional``)."""
    node = data.get(key) if isinstance(data, dict) else None
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: {key} must be an object with keys {list(keys)}")
    extra = (("cite", "command") if numbers else ("name",)) + optional
    unknown = sorted(set(node) - set(keys) - set(extra))
    missing = sorted(set(keys) - set(node))
    if unknown or missing:
        raise ConfigError(f"{where}: {key}: " + "; ".join(
            ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing key(s) {missing}"] if missing else []))
            + f"; allowed: {sorted(set(keys) | set(extra))}")
    if numbers and not (str(node.get("cite", "")).strip() or str(node.get("command", "")).strip()):
        raise ConfigError(f"{where}: {key} needs a 'cite' (source of the figures) or a 'command' "
                          "(the measurement that produced them)")
    return node


# Upper bounds no device comes near: a launch or link latency of a second, a petabyte of memory
# (a GB200 has 192 GB) — above them is a typo or a unit error. Rates have none: a huge rate is
# how a synthetic profile makes a resource free.
# every fixed cost in seconds is a latency: above MAX_LATENCY_S it is a mistake, not a device
_LIMITS = {**{k: MAX_LATENCY_S for k in ("overhead_s", "alpha_s", "call_overhead_s", "micro_batch_overhead_s",
                                         "collective_overhead_s", "checkpoint_forward_s", "checkpoint_backward_s",
                                         "p2p_overhead_s", "grad_overhead_s", "backward_overhead_s")},
           "bytes": 1e15}


def _positive(node: dict, key: str, where: str, zero_ok: bool = False) -> float:
    return number(node, key, where, zero_ok, _LIMITS.get(key))


def _curve(node: dict, where: str, by: str) -> Curve:
    if node["by"] != by:
        raise ConfigError(f"{where}.by={node['by']!r} must be {by!r}")
    pts = node["points"]
    if not isinstance(pts, list) or not all(isinstance(p, list) and len(p) == 2 for p in pts):
        raise ConfigError(f"{where}.points must be a list of [size, efficiency] pairs")
    wrong = [v for p in pts for v in p if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if wrong:
        raise ConfigError(f"{where}.points: {wrong[:3]!r} must be numbers")
    try:
        return Curve(tuple((float(s), float(e)) for s, e in pts), node["interpolation"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def profile_from_dict(data: Any, where: str = "profile", path: str = "") -> Profile:
    """Check a parsed profile document and build its lookup object."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a JSON object")
    top = ("format", "name", "source", "device", "date", "software", "compute", "memory", "links")
    optional = {"notes", "executor", "host", "host_link", "stacks", "trainer"}
    unknown = sorted(set(data) - set(top) - optional)
    missing = sorted(set(top) - set(data))
    if unknown or missing:
        raise ConfigError(f"{where}: " + "; ".join(
            ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing key(s) {missing}"] if missing else []))
            + f"; allowed: {sorted(set(top) | optional)}")
    if data["format"] not in FORMATS:
        raise ConfigError(f"{where}: format={data['format']!r} must be one of {FORMATS}")
    if data["source"] not in SOURCES:
        raise ConfigError(f"{where}: source={data['source']!r} must be one of {SOURCES}")
    if not isinstance(data["software"], dict):
        raise ConfigError(f"{where}: software must be an object of name → version")
    compute = _obj(data, "compute", where, ("peak", "efficiency", "launch"), numbers=False,
                   optional=("compose", "dtype", "ops", "kernels", "in_model"))
    memory = _obj(data, "memory", where, ("capacity", "bandwidth", "efficiency"), numbers=False)
    w = f"{where}: compute"
    peak = _obj(compute, "peak", w, ("flops_per_s",))
    launch = _obj(compute, "launch", w, ("overhead_s",), optional=DISPATCH_KEYS)
    ceff = _obj(compute, "efficiency", w, ("by", "interpolation", "points"))
    m = f"{where}: memory"
    cap = _obj(memory, "capacity", m, ("bytes",))
    bw = _obj(memory, "bandwidth", m, ("bytes_per_s",))
    meff = _obj(memory, "efficiency", m, ("by", "interpolation", "points"))
    links, names = parse_links(data["links"], where, curves_allowed=data["format"] != FORMATS[0])
    compose, dtype = _compose(compute, w)
    call_s, mb_s, coll_s, ckpt_f, ckpt_b, p2p_s = _executor(data, where)
    ops = compute.get("ops", "executor")
    if ops not in OP_SETS:
        raise ConfigError(f"{w}.ops={ops!r} must be one of {OP_SETS}")
    floor_s, kernels = _kernels(compute, w)
    return Profile(
        name=str(data["name"]), source=data["source"], device=str(data["device"]), date=str(data["date"]),
        software={str(k): str(v) for k, v in data["software"].items()},
        peak_flops=_positive(peak, "flops_per_s", f"{w}.peak"),
        flops_efficiency=_curve(ceff, f"{w}.efficiency", "flops"),
        launch_overhead_s=_positive(launch, "overhead_s", f"{w}.launch", zero_ok=True),
        capacity_bytes=_positive(cap, "bytes", f"{m}.capacity"),
        mem_bandwidth_Bps=_positive(bw, "bytes_per_s", f"{m}.bandwidth"),
        mem_efficiency=_curve(meff, f"{m}.efficiency", "bytes"),
        links=links, link_names=names, raw=data, path=path, compose=compose, dtype=dtype,
        call_overhead_s=call_s, micro_batch_overhead_s=mb_s, host=_host(data, where), collective_overhead_s=coll_s,
        ops=ops, kernel_floor_s=floor_s, kernels=kernels, device_scale=_in_model(compute, w),
        checkpoint_s=(ckpt_f, ckpt_b), p2p_overhead_s=p2p_s, trainer=parse_trainer(data, where),
        host_link=parse_host_link(data, where), stacks=parse_stacks(data, where),
        **{k: _positive(launch, k, f"{w}.launch", zero_ok=True) for k in DISPATCH_KEYS if k in launch},
    )


def _in_model(compute: dict, where: str) -> tuple[float, float, float]:
    """The optional ``compute.in_model`` section: {mode: scale ≥ 1/4 and ≤ 4 for each of
    :data:`DISPATCH_MODES` it names, command | cite}; modes it does not name scale by 1."""
    if "in_model" not in compute:
        return (1.0, 1.0, 1.0)
    node = _obj(compute, "in_model", where, (), optional=DISPATCH_MODES)
    out = []
    for mode in DISPATCH_MODES:
        v = node.get(mode, 1.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.25 <= v <= 4.0:
            raise ConfigError(f"{where}.in_model.{mode}={v!r} must be a number in [0.25, 4]")
        out.append(float(v))
    return tuple(out)


def _compose(compute: dict, where: str) -> tuple[str, str]:
    """``compute.compose`` ({"mode": serial | overlap, cite | command}, default overlap) and
    ``compute.dtype`` (the run dtype, default bfloat16)."""
    mode = "overlap"
    if "compose" in compute:
        node = _obj(compute, "compose", where, ("mode",))
        mode = node["mode"]
        if mode not in COMPOSE_MODES:
            raise ConfigError(f"{where}.compose.mode={mode!r} must be one of {COMPOSE_MODES}")
    dtype = compute.get("dtype", "bfloat16")
    if dtype not in RUN_DTYPES:
        raise ConfigError(f"{where}.dtype={dtype!r} must be one of {RUN_DTYPES}")
    return mode, dtype


EXECUTOR_OPTIONAL = ("collective_overhead_s", "checkpoint_forward_s", "checkpoint_backward_s", "p2p_overhead_s")


def _executor(data: dict, where: str) -> tuple[float, ...]:
    """The optional ``executor`` section: bookkeeping per call and per micro-batch pass, and
    (optional, 0 when absent) the extra cost of a collective issued between computations,
    activation checkpointing's own cost per block in the forward and in the backward, and the
    extra cost of a pipeline message sent between computations."""
    if "executor" not in data:
        return (0.0,) * (2 + len(EXECUTOR_OPTIONAL))
    node = _obj(data, "executor", where, ("call_overhead_s", "micro_batch_overhead_s"), optional=EXECUTOR_OPTIONAL)
    w = f"{where}: executor"
    more = tuple(_positive(node, k, w, zero_ok=True) if k in node else 0.0 for k in EXECUTOR_OPTIONAL)
    return (_positive(node, "call_overhead_s", w, zero_ok=True),
            _positive(node, "micro_batch_overhead_s", w, zero_ok=True), *more)


def _host(data: dict, where: str) -> HostSharing | None:
    """The optional ``host`` section: {"devices": n, "alone": {term: factor}, cite | command}."""
    if "host" not in data:
        return None
    node = _obj(data, "host", where, ("devices", "alone"), numbers=False, optional=("cite", "command"))
    w = f"{where}: host"
    devices = node["devices"]
    if isinstance(devices, bool) or not isinstance(devices, int) or not 1 <= devices <= MAX_HOST_DEVICES:
        raise ConfigError(f"{w}.devices={devices!r} must be an integer from 1 to {MAX_HOST_DEVICES}")
    alone = _obj(node, "alone", w, ALONE_TERMS)
    factors = {}
    for term in ALONE_TERMS:
        f = _positive(alone, term, f"{w}.alone")
        if f > 1.0:
            raise ConfigError(f"{w}.alone.{term}={f!r} must be at most 1 (a device alone is never slower "
                              f"than with its host's other devices busy)")
        factors[term] = f
    return HostSharing(devices, factors)


def _kernels(compute: dict, where: str) -> tuple[float, dict[str, tuple[float, ...]]]:
    """The optional ``compute.kernels`` section: a floor no kernel goes below and, per fused
    kernel the profile measured, its bandwidth efficiency in (0, 1.5] (above 1 where a kernel's
    operands stay in the on-chip cache), its own floor and, optionally, its own FLOPs efficiency
    (a kernel slower than a GEMM of its size, e.g. attention), with a ``cite`` of its own."""
    if "kernels" not in compute:
        return 0.0, {}
    node = _obj(compute, "kernels", where, ("floor_s", "by_kernel"))
    w = f"{where}.kernels"
    floor = number(node, "floor_s", w, True, MAX_LATENCY_S)
    if not isinstance(node["by_kernel"], dict):
        raise ConfigError(f"{w}.by_kernel must be an object of kernel name → figures")
    out = {}
    for name, entry in node["by_kernel"].items():
        keys = {"bandwidth_efficiency", "floor_s"}
        if not isinstance(entry, dict) or not keys <= set(entry) <= keys | {"flops_efficiency", "cite"}:
            raise ConfigError(f"{w}.by_kernel.{name} must be an object with keys "
                              "['bandwidth_efficiency', 'floor_s'] (optional: 'flops_efficiency', 'cite')")
        at = f"{w}.by_kernel.{name}"
        figures = (number(entry, "bandwidth_efficiency", at, False, 1.5),
                   number(entry, "floor_s", at, True, MAX_LATENCY_S))
        if "flops_efficiency" in entry:
            figures += (number(entry, "flops_efficiency", at, False, 1.0),)
        out[str(name)] = figures
    return floor, out


# ---- which software stack a profile prices ---------------------------------------------------

OP_SET_STACKS = {"executor": "this project's eager executor", "fused": "a fused Megatron/vLLM-style stack"}


def op_set(profile: Profile) -> dict[str, Any]:
    """Which op set ``profile`` charges (``compute.ops``), the stack that is, the shipped
    profiles of the same device that charge the other op set (so a figure can be redone for
    the other stack), and ``text``: all that in one line, e.g. ``priced for this project's
    eager executor (profile h100-sxm, compute.ops=executor); for a fused Megatron/vLLM-style
    stack on this device use h100-vidur``. A profile priced for a named stack
    (:func:`estimator.profile.pricing.for_stack`) says that stack instead:
    ``stack_name``, whether the profile has numbers for its own costs (``terms``) and why
    another profile of the device was taken (``note``)."""
    if profile.stack:
        return _stack_line(profile)
    others = []
    for path in sorted(PROFILE_DIR.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        compute = doc.get("compute") if isinstance(doc, dict) else None
        if (isinstance(compute, dict) and doc.get("device") == profile.device
                and compute.get("ops", "executor") != profile.ops):
            others.append(path.stem)
    text = f"priced for {OP_SET_STACKS[profile.ops]} (profile {profile.name}, compute.ops={profile.ops})"
    if others:
        other = next(v for k, v in OP_SET_STACKS.items() if k != profile.ops)
        text += f"; for {other} on this device use {', '.join(others)}"
    return {"ops": profile.ops, "stack": OP_SET_STACKS[profile.ops], "profile": profile.name,
            "other_stack_profiles": others, "text": text}


def _stack_line(profile: Profile) -> dict[str, Any]:
    stack = STACKS[profile.stack]
    text = f"priced for {stack.name} ({stack.words}) on profile {profile.name} (compute.ops={profile.ops}"
    if stack.production:
        text += (f"; engine, refit and trainer terms from stacks.{stack.name})" if profile.terms is not None
                 else "; no engine, refit or trainer terms for this device: kernels, links and host copies only)")
    else:
        text += ")"
    if profile.stack_note:
        text += f"; {profile.stack_note}"
    return {"ops": profile.ops, "stack": stack.words, "stack_name": stack.name, "terms": profile.terms is not None,
            "note": profile.stack_note, "profile": profile.name, "other_stack_profiles": [], "text": text}


def op_set_line(profile: Profile) -> str:
    """:func:`op_set`'s one line."""
    return op_set(profile)["text"]
