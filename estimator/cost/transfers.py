"""Bytes that move between devices and the links that carry them.

Parameter reallocation and call outputs move as point-to-point messages, one per (sender,
receiver) pair. :func:`realloc_bytes` is an aggregated, exact equivalent of
:func:`estimator.spec.sharding.realloc_plan` — it sums bytes per pair per (pipeline stage,
tensor-parallel slice) instead of per parameter, so it stays fast for 70B models on 128
devices — and :func:`data_bytes` sums :func:`estimator.spec.sharding.rows_plan` per pair.

Links. Every device has four ports: NVLink out and in (to devices of its node, through the
switch) and NIC out and in (to other nodes; one NIC per device). A message from ``s`` to ``d``
holds ``s``'s out-port and ``d``'s in-port of the class its route needs; a collective holds
both ports of every member (NIC ports too when it spans nodes). :class:`LinkBook` shares ports
first come, first served: a transfer starts when all its ports are free and holds them for its
whole duration (``α + S/B`` from the profile), so two transfers on one port take twice as long
as one. A transfer reserves all its ports at once rather than holding some while waiting for
others, which would idle them.
"""

from __future__ import annotations

import dataclasses
import math
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable

from estimator.cost.pieces import BF16, FP32, INT64, layer_split_params
from estimator.profile.profiles import Profile
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import (
    box_numel,
    data_needs,
    flat_chunk,
    output_holders,
    pick_sender,
    rows_plan,
    shard,
    shard_groups,
)
from estimator.spec.workflow import Call

Pair = tuple[int, int]  # (sender, receiver) global device ids
NVL_OUT, NVL_IN, NIC_OUT, NIC_IN = range(4)
PORT_NAMES = ("nvlink-out", "nvlink-in", "nic-out", "nic-in")


def _overlap(a: range, b: range) -> int:
    return max(0, min(a.stop, b.stop) - max(a.start, b.start))


def realloc_bytes(model: ModelSpec, src: Layout, dst: Layout, devices_per_node: int,
                  elem_bytes: int = BF16) -> dict[Pair, int]:
    """Bytes (``elem_bytes`` per parameter, bf16 by default) each (sender, receiver) pair moves
    when ``model`` goes from ``src`` to ``dst``; pairs with ``sender == receiver`` are local copies. Equal to summing
    :func:`~estimator.spec.sharding.realloc_plan` per pair, including its choice of sender among the
    replicas that hold a slice (data-parallel ranks; every tensor-parallel rank for replicated
    parameters; both ends of a pipeline for tied embeddings)."""
    h, L = model.hidden, model.layers
    split_layer, rep_layer = layer_split_params(model), model.replicated_params_per_layer
    embed = model.vocab * h
    tied = model.tied_embeddings and model.head == "lm"
    head_split = 0 if model.head == "value" or tied else embed
    last_rep = model.norm_params + (h if model.head == "value" else 0)  # final norm (+ value head)
    lcm = math.lcm(src.tp, dst.tp)
    last = src.pp - 1
    embed_stages = [0, last] if tied and last > 0 else [0]
    src_layers = [src.stage_layers(L, k) for k in range(src.pp)]
    out: dict[Pair, int] = defaultdict(int)

    def split_from(d: int, stages: list[int], lo: int, hi: int, numel: int) -> None:
        for stp in range(src.tp):
            ov = _overlap(range(lo, hi), range(stp * lcm // src.tp, (stp + 1) * lcm // src.tp))
            if ov:
                holders = [src.device(i, stp, s) for s in stages for i in range(src.dp)]
                out[(pick_sender(holders, d, devices_per_node), d)] += numel * ov // lcm * elem_bytes

    def replicated_from(d: int, stage: int, numel: int) -> None:
        holders = [src.device(i, t, stage) for t in range(src.tp) for i in range(src.dp)]
        out[(pick_sender(holders, d, devices_per_node), d)] += numel * elem_bytes

    for d in dst.mesh.devices:
        _, dtp, dpp = dst.coords(d)
        lo, hi = dtp * lcm // dst.tp, (dtp + 1) * lcm // dst.tp
        dst_layers = dst.stage_layers(L, dpp)
        if dpp == 0 or (dpp == dst.pp - 1 and tied):
            split_from(d, embed_stages, lo, hi, embed)
        if dpp == 0 and model.position_params:  # the learned position table: first stage, replicated
            replicated_from(d, 0, model.position_params)
        for spp in range(src.pp):
            common = _overlap(dst_layers, src_layers[spp])
            if common:
                split_from(d, [spp], lo, hi, common * split_layer)
                replicated_from(d, spp, common * rep_layer)
        if dpp == dst.pp - 1:
            if head_split:
                split_from(d, [last], lo, hi, head_split)
            replicated_from(d, last, last_rep)
    return dict(out)


def gather_bytes(model: ModelSpec, layout: Layout, elem_bytes: int = BF16) -> dict[Pair, int]:
    """Bytes per pair of the all-gather that makes whole again the parameters a sharded home
    (``shard="full"``) splits over its data-parallel ranks: within each data-parallel group
    every rank sends its chunk of every flat group (:func:`estimator.spec.sharding.shard_groups`,
    padded to equal chunks) to every other rank — a reallocation whose destination is every
    rank. Empty for a layout that does not shard its parameters."""
    if not layout.sharded:
        return {}
    out: dict[Pair, int] = {}
    for k in range(layout.pp):
        boxes = shard(model, layout, layout.device(0, 0, k))
        groups = shard_groups(model, layout, layout.device(0, 0, k))
        chunk = sum(flat_chunk(sum(box_numel(boxes[n]) for n in names), layout.dp) for names in groups.values())
        for t in range(layout.tp):
            ranks = [layout.device(i, t, k) for i in range(layout.dp)]
            out.update({(a, b): chunk * elem_bytes for a in ranks for b in ranks if a != b})
    return out


def sharded_realloc_bytes(model: ModelSpec, src: Layout, dst: Layout, devices_per_node: int,
                          elem_bytes: int = BF16) -> dict[Pair, int]:
    """Bytes per pair moving ``model`` from ``src`` to ``dst`` when ``src`` may shard its
    parameters: the all-gather that makes them whole on ``src``'s devices
    (:func:`gather_bytes`), then — unless ``dst`` places them as the whole ``src`` does —
    :func:`realloc_bytes` from the whole ``src``; both phases summed per pair."""
    whole = dataclasses.replace(src, shard="none")
    out = defaultdict(int, gather_bytes(model, src, elem_bytes))
    if not whole.same_placement(dst):
        for pair, nbytes in realloc_bytes(model, whole, dst, devices_per_node, elem_bytes).items():
            out[pair] += nbytes
    return dict(out)


def row_bytes(data: str, call: Call) -> int:
    """Bytes per sequence of a call output: token ids (int64 per position) for sequences,
    fp32 per generated token for log-probabilities and values, one fp32 for a reward."""
    w = call.workload
    if data.startswith("seq"):
        return INT64 * w.seq_len
    if data.startswith("reward"):
        return FP32
    return FP32 * w.gen_len


def data_bytes(algorithm: str, producer: Call, src: Layout, consumer: Call, dst: Layout, data: Iterable[str],
               devices_per_node: int) -> dict[Pair, int]:
    """Bytes per (sender, receiver) pair that bring ``data`` written by ``producer`` under ``src``
    to every device of ``consumer`` under ``dst`` (who needs what: sharding.data_needs; who
    sends it: sharding.rows_plan)."""
    holders = output_holders(producer, src)
    out: dict[Pair, int] = defaultdict(int)
    for name in data:
        per_row = row_bytes(name, producer)
        for t in rows_plan(holders, data_needs(algorithm, consumer, dst, name), devices_per_node):
            out[(t.src, t.dst)] += (t.rows[1] - t.rows[0]) * per_row
    return dict(out)


def link_class(a: int, b: int, devices_per_node: int) -> str:
    return "intra" if a // devices_per_node == b // devices_per_node else "inter"


def pair_ports(src: int, dst: int, devices_per_node: int) -> tuple[int, int]:
    if src // devices_per_node == dst // devices_per_node:
        return 4 * src + NVL_OUT, 4 * dst + NVL_IN
    return 4 * src + NIC_OUT, 4 * dst + NIC_IN


def group_shape(devices: Iterable[int], devices_per_node: int) -> tuple[int, int, int]:
    """(most members on one node, nodes spanned, fewest members on one of them) of a
    communication group, the arguments of :meth:`Profile.group_collective_s` after the size.
    The two counts differ for a group of a mesh that is not whole nodes (the data-parallel
    group of ``0-11`` on nodes of 8 has 8 members on node 0 and 4 on node 1)."""
    per_node: dict[int, int] = defaultdict(int)
    for d in devices:
        per_node[d // devices_per_node] += 1
    return max(per_node.values()), len(per_node), min(per_node.values())


def group_ports(devices: Iterable[int], devices_per_node: int) -> list[int]:
    """Both NVLink ports of every member, and both NIC ports too when the group spans nodes."""
    devices = list(devices)
    spans = len({d // devices_per_node for d in devices}) > 1
    kinds = (NVL_OUT, NVL_IN, NIC_OUT, NIC_IN) if spans else (NVL_OUT, NVL_IN)
    return [4 * d + k for d in devices for k in kinds]


def port_name(port: int, devices_per_node: int) -> str:
    d = port // 4
    return f"{PORT_NAMES[port % 4]} dev{d} (node {d // devices_per_node})"


class LinkBook:
    """First-come, first-served reservations of device ports (see the module docstring).

    A port keeps the intervals booked on it; a request takes the earliest window, not before
    the time it is made, in which all its ports are free. A booking that had to wait for one
    port leaves its other ports free before it, and later requests may use those gaps: a port
    is never held idle for a transfer that cannot start yet. Requests never start before the
    simulation's present, so intervals that ended before the request time are dropped.

    A port's bookings are disjoint, so kept as two sorted lists, their starts and their ends:
    the first booking ending after ``t`` is ``bisect_right(ends, t)``."""

    def __init__(self, num_devices: int):
        self.num_devices = num_devices
        self.starts: list[list[float]] = [[] for _ in range(4 * num_devices)]  # per port, sorted
        self.ends: list[list[float]] = [[] for _ in range(4 * num_devices)]  # per port, sorted
        self.free_at = [0.0] * (4 * num_devices)  # seconds: end of each port's last booking

    def booked(self, port: int) -> list[tuple[float, float]]:
        """The (start, end) intervals booked on ``port``, in order."""
        return list(zip(self.starts[port], self.ends[port]))

    def reserve(self, ports: Iterable[int], now: float, duration_s: float) -> tuple[float, float]:
        """Hold ``ports`` together for ``duration_s`` from the earliest time all are free, not
        before ``now``; returns (start, end)."""
        ports = tuple(ports)
        free = self.free_at
        if all(free[p] <= now for p in ports):  # the common case: every port idle from now on
            end = now + duration_s
            for p in ports:
                self.starts[p] = [now]
                self.ends[p] = [end]
                free[p] = end
            return now, end
        books = [(self.starts[p], self.ends[p]) for p in ports]
        for starts, ends in books:
            gone = bisect_right(ends, now)
            if gone:
                del starts[:gone], ends[:gone]
        start, moved = now, True
        while moved:
            moved = False
            for starts, ends in books:
                i = bisect_right(ends, start)
                while i < len(ends) and starts[i] < start + duration_s:  # overlaps the window: start after it
                    start, moved = ends[i], True
                    i += 1
        end = start + duration_s
        for p, (starts, ends) in zip(ports, books):
            i = bisect_left(starts, start)
            while i < len(starts) and starts[i] == start and ends[i] <= end:  # (start, end) in tuple order
                i += 1
            starts.insert(i, start)
            ends.insert(i, end)
            free[p] = max(free[p], end)
        return start, end

    def send_all(self, pairs: dict[Pair, int], now: float, profile: Profile,
                 devices_per_node: int) -> tuple[float, float]:
        """Reserve one message per (sender, receiver) pair, all issued at ``now``; return (first
        start, last arrival). Messages go in the order of a linear-shift all-to-all — by
        ``(receiver − sender) mod N``, then sender — so each round pairs distinct senders with
        distinct receivers and no port idles while another is free. Local pairs (sender ==
        receiver) take no link."""
        n = self.num_devices
        first, end = None, now
        for (s, d), nbytes in sorted(pairs.items(), key=lambda kv: ((kv[0][1] - kv[0][0]) % n, kv[0][0])):
            if s == d or nbytes <= 0:
                continue
            cls = link_class(s, d, devices_per_node)
            start, stop = self.reserve(pair_ports(s, d, devices_per_node), now, profile.p2p_s(nbytes, cls))
            first = start if first is None else min(first, start)
            end = max(end, stop)
        return (now if first is None else first), end


def local_copy_s(pairs: dict[Pair, int], profile: Profile) -> float:
    """Slices a device copies from its own memory (read + write), the slowest device's time."""
    per_device: dict[int, int] = defaultdict(int)
    for (s, d), nbytes in pairs.items():
        if s == d:
            per_device[d] += nbytes
    return max((profile.memory_s(2 * b) for b in per_device.values()), default=0.0)


def isolated_transfer_s(pairs: dict[Pair, int], profile: Profile, num_devices: int, devices_per_node: int,
                        local_copies: bool = False) -> float:
    """Time to move ``pairs`` on otherwise idle links (and local copies, when they count)."""
    t = LinkBook(num_devices).send_all(pairs, 0.0, profile, devices_per_node)[1]
    return max(t, local_copy_s(pairs, profile)) if local_copies else t


def stage_send(profile: Profile, layout: Layout, k: int, nbytes: float, dpn: int) -> tuple[float, tuple, tuple, str]:
    """Stage k → k+1 messages, one per (dp, tp) pair in parallel: time, ports both ways, and
    the slowest link class among the pairs."""
    if k >= layout.pp - 1:
        return 0.0, (), (), "intra"
    pairs = [(layout.device(i, t, k), layout.device(i, t, k + 1)) for i in range(layout.dp) for t in range(layout.tp)]
    classes = {link_class(s, d, dpn) for s, d in pairs}
    cls = "inter" if "inter" in classes else "intra"
    fwd = tuple(p for s, d in pairs for p in pair_ports(s, d, dpn))
    bwd = tuple(p for s, d in pairs for p in pair_ports(d, s, dpn))
    return profile.stage_send_s(nbytes, cls), fwd, bwd, cls
