"""Moving parameters and call outputs between layouts.

The slices come from the pure shard math (:func:`estimator.spec.sharding.realloc_plan`,
:func:`estimator.spec.sharding.rows_plan`); this module only moves them, copying as little as it
can, since a local copy costs about as much as sending the bytes (on CPU both are memory
copies, and they compete for the same cores):

- a slice that is one contiguous run of the sender's shard is sent straight from it, and
  received straight into its place when that is contiguous too (no packing, no unpacking);
- the other slices of a (sender, receiver) pair, and slices too small to be worth a message of
  their own, travel packed in one flat message; a shard that arrives whole in it is a view of
  the receive buffer;
- a shard a device keeps whole, as a slice of a shard it already holds, is a view of that shard
  (no copy; strided when the slice is not one run of memory); other slices it keeps are copied
  while the messages are in flight.

Each device posts its sends and receives in two batches (:func:`executor.comm.exchange`): the
direct slices first, then the packed messages once packed, so packing overlaps the transfers.
Every device splits every pair's traffic the same way, and posting never blocks, so the order
in which devices enter cannot deadlock. A device's work in a reallocation is a pure function of
(model, layouts, device), computed once and cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import Box, Range, RowTransfer, Transfer, box_shape, group_by_pair, realloc_plan, shard
from executor.comm import exchange
from executor.model import Params, local_index

CPU = torch.device("cpu")
# Smaller slices share their pair's packed message: copying them costs less than a message.
DIRECT_MIN_BYTES = 256 * 1024
ROUTE_CACHE = 256  # routes kept: a run needs one per (role, call layout, device)


@dataclass(frozen=True)
class Segment:
    """One message between a pair of devices: one contiguous slice of the sender's shard sent
    as is (``direct``), or the pair's other slices packed in plan order."""

    transfers: tuple[Transfer, ...]
    direct: bool

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.transfers)


@dataclass(frozen=True)
class Route:
    """What one device does in one reallocation (pure in model, layouts and device; shared by
    the cache, so read-only)."""

    src_boxes: dict[str, Box]  # this device's shards under src (empty if not in src)
    dst_boxes: dict[str, Box]  # ... under dst
    keep: tuple[Transfer, ...]  # slices this device sends itself
    sends: tuple[tuple[Segment, int], ...]  # (segment, receiver): direct ones first
    recvs: tuple[tuple[Segment, int], ...]  # (segment, sender): same order as the sender's


def _in(layout: Layout, device: int) -> bool:
    return device in layout.mesh.devices


def contiguous_in(box: Box, held: Box) -> bool:
    """Whether slice ``box`` of a row-major tensor holding ``held`` is one run of memory: every
    dimension after the first one the slice spans more than one index of is whole."""
    spans = [hi - lo > 1 for lo, hi in box]
    first = spans.index(True) if True in spans else len(box)
    return all(b == h for b, h in zip(box[first + 1:], held[first + 1:]))


def _segments(transfers: list[Transfer], sender_boxes: dict[str, Box], itemsize: int) -> list[Segment]:
    """A pair's messages: big contiguous slices each on their own, then the rest packed."""
    direct = [t.numel * itemsize >= DIRECT_MIN_BYTES and contiguous_in(t.box, sender_boxes[t.name])
              for t in transfers]
    packed = tuple(t for t, d in zip(transfers, direct) if not d)
    return [Segment((t,), True) for t, d in zip(transfers, direct) if d] + ([Segment(packed, False)] if packed else [])


@functools.lru_cache(maxsize=ROUTE_CACHE)
def route(model: ModelSpec, src: Layout, dst: Layout, devices_per_node: int, device: int, itemsize: int) -> Route:
    """``device``'s part of the reallocation ``src`` → ``dst`` of ``itemsize``-byte elements."""
    pairs = group_by_pair(realloc_plan(model, src, dst, devices_per_node))
    boxes = {d: shard(model, src, d) for d in src.mesh.devices}
    sends = [(seg, d) for (s, d), ts in pairs.items() if s == device and d != device
             for seg in _segments(ts, boxes[s], itemsize)]
    recvs = [(seg, s) for (s, d), ts in pairs.items() if d == device and s != device
             for seg in _segments(ts, boxes[s], itemsize)]
    return Route(boxes.get(device, {}), shard(model, dst, device) if _in(dst, device) else {},
                 tuple(pairs.get((device, device), [])), tuple(sorted(sends, key=_packed_last)),
                 tuple(sorted(recvs, key=_packed_last)))


def _packed_last(item: tuple[Segment, int]) -> bool:
    return not item[0].direct  # sorted() is stable: plan order otherwise


def reallocate(model: ModelSpec, src: Layout, src_params: Params | None, dst: Layout, device: int,
               devices_per_node: int, dtype: torch.dtype,
               torch_device: torch.device = CPU) -> Params | None:
    """This device's shards under ``dst`` (None if it is not in ``dst``), built from every
    device's shards under ``src`` (``src_params``: this device's, None if not in ``src``).
    Every device of src ∪ dst must call it with the same layouts.

    A returned shard may be a view of a shard of ``src_params`` (one this device keeps whole):
    the result is for reading, and ``src_params`` must not change while it is in use, since
    writing into either in place would change the other.
    """
    if not (_in(src, device) or _in(dst, device)):
        return None
    r = route(model, src, dst, devices_per_node, device, torch.empty((), dtype=dtype).element_size())
    aliased = _aliases(src_params, r, dtype, torch_device)
    packed_in = [(seg, torch.empty(seg.numel, dtype=dtype, device=torch_device), s)
                 for seg, s in r.recvs if not seg.direct]
    out = {**aliased, **_whole_views(packed_in, r.dst_boxes)}
    out.update({n: torch.empty(box_shape(b), dtype=dtype, device=torch_device)
                for n, b in r.dst_boxes.items() if n not in out})
    direct_in, unpack = _direct_targets(r, out, dtype, torch_device)
    works, sent = _post(r, src_params, direct_in, packed_in, dtype, torch_device)
    for t in r.keep:  # copied while the messages travel
        if t.name not in aliased:
            out[t.name][local_index(t.box, r.dst_boxes[t.name])] = _take(src_params, r.src_boxes, t)
    for work in works:
        work.wait()
    del sent  # delivered: the packed and cast copies can go
    for seg, buf, _ in packed_in:
        unpack += zip(seg.transfers, _split(buf, seg.transfers))
    for t, piece in unpack:
        _place(out, r.dst_boxes, t, piece)
    return out if _in(dst, device) else None


def _post(r: Route, params: Params | None, direct_in: list[tuple[Tensor, int]],
          packed_in: list[tuple[Segment, Tensor, int]], dtype: torch.dtype,
          torch_device: torch.device) -> tuple[list[dist.Work], list[tuple[Tensor, int]]]:
    """Post the direct slices both ways, then pack the other messages while those travel and
    post them. Returns the works and the sent tensors, which must live until they complete."""
    direct_out = [(_send_view(params, r.src_boxes, seg.transfers[0], dtype, torch_device), d)
                  for seg, d in r.sends if seg.direct]
    works = exchange(direct_in, direct_out)
    packed_out = [(_pack(params, r.src_boxes, seg.transfers, dtype, torch_device), d)
                  for seg, d in r.sends if not seg.direct]
    works += exchange([(buf, s) for _, buf, s in packed_in], packed_out)
    return works, direct_out + packed_out


def _aliases(params: Params | None, r: Route, dtype: torch.dtype, torch_device: torch.device) -> Params:
    """Shards this device keeps whole, as a slice of a shard it holds: views of it. A slice
    across the last dimension (a row-parallel weight's half) is a strided view whose rows are
    contiguous: matrix products read it in place, with the full row length as leading dimension."""
    out = {}
    for t in r.keep:
        if t.box == r.dst_boxes[t.name]:
            part = _take(params, r.src_boxes, t)
            if part.dtype == dtype and _on(part, torch_device):
                out[t.name] = part
    return out


def _on(t: Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def _whole_views(packed_in: list[tuple[Segment, Tensor, int]], boxes: dict[str, Box]) -> Params:
    """Shards that arrive whole in a packed message: views of its receive buffer."""
    out = {}
    for seg, buf, _ in packed_in:
        for t, piece in zip(seg.transfers, _split(buf, seg.transfers)):
            if t.box == boxes[t.name]:
                out[t.name] = piece.view(box_shape(t.box))
    return out


def _direct_targets(r: Route, out: Params, dtype: torch.dtype,
                    torch_device: torch.device) -> tuple[list[tuple[Tensor, int]], list[tuple[Transfer, Tensor]]]:
    """Receive buffers of the direct slices: their place in the shard where that is contiguous,
    else a buffer to unpack from; and the (slice, buffer) pairs to unpack."""
    recvs, unpack = [], []
    for seg, s in r.recvs:
        if not seg.direct:
            continue
        t = seg.transfers[0]
        if contiguous_in(t.box, r.dst_boxes[t.name]):
            recvs.append((out[t.name][local_index(t.box, r.dst_boxes[t.name])], s))
        else:
            buf = torch.empty(t.numel, dtype=dtype, device=torch_device)
            recvs.append((buf, s))
            unpack.append((t, buf))
    return recvs, unpack


def _split(buf: Tensor, transfers: tuple[Transfer, ...]) -> list[Tensor]:
    return list(buf.split([t.numel for t in transfers]))


def _take(params: Params | None, boxes: dict[str, Box], t: Transfer) -> Tensor:
    """The slice ``t`` moves, as a view of this device's source shard."""
    if params is None:
        raise ValueError(f"device {t.src} must send {t.name} but was given no source params")
    return params[t.name].detach()[local_index(t.box, boxes[t.name])]


def _send_view(params: Params | None, boxes: dict[str, Box], t: Transfer, dtype: torch.dtype,
               torch_device: torch.device) -> Tensor:
    """A direct slice as one flat tensor: a view of the shard unless it must be cast."""
    return _take(params, boxes, t).to(device=torch_device, dtype=dtype).contiguous().view(-1)


def _pack(params: Params | None, boxes: dict[str, Box], transfers: tuple[Transfer, ...], dtype: torch.dtype,
          torch_device: torch.device) -> Tensor:
    """One flat message of the slices, each copied once, straight into its place."""
    flat = torch.empty(sum(t.numel for t in transfers), dtype=dtype, device=torch_device)
    for t, piece in zip(transfers, _split(flat, transfers)):
        piece.view(box_shape(t.box)).copy_(_take(params, boxes, t))
    return flat


def _place(out: Params, boxes: dict[str, Box], t: Transfer, piece: Tensor) -> None:
    """Copy a received slice into its shard, unless it is the shard already (a view)."""
    if out[t.name].data_ptr() != piece.data_ptr():
        out[t.name][local_index(t.box, boxes[t.name])] = piece.view(box_shape(t.box))


# ---- call outputs -----------------------------------------------------------------------------


def gather_rows(data: list[tuple[Range, Tensor]], ranges: list[Range]) -> Tensor:
    """Rows covering ``ranges`` in order, from pieces ``(row range, tensor of those rows)``; a
    range may span several pieces."""
    pieces = sorted(data, key=lambda item: item[0][0])
    out = []
    for lo, hi in ranges:
        at = lo
        for (p0, p1), t in pieces:
            if p0 <= at < p1:
                stop = min(hi, p1)
                out.append(t[at - p0:stop - p0])
                at = stop
            if at == hi:
                break
        if at != hi:
            raise ValueError(f"rows {at}-{hi} are not held (held: {[r for r, _ in pieces]})")
    if not out:
        raise ValueError("no rows requested")
    return torch.cat(out) if len(out) > 1 else out[0]


def move_rows(plan: list[RowTransfer], device: int, held: list[tuple[Range, Tensor]],
              row_shape: tuple[int, ...], dtype: torch.dtype,
              torch_device: torch.device = CPU) -> list[tuple[Range, Tensor]]:
    """Send the rows ``plan`` asks of this device and return, for the transfers it receives in
    plan order, ``(row range, rows)``. One message per (src, dst) pair; every device in the
    plan must call it."""
    pairs: dict[tuple[int, int], list[RowTransfer]] = {}
    for t in plan:
        pairs.setdefault((t.src, t.dst), []).append(t)
    inbox = [(s, torch.empty((sum(t.rows[1] - t.rows[0] for t in ts), *row_shape), dtype=dtype, device=torch_device))
             for (s, d), ts in pairs.items() if d == device and s != device]
    outbox = [(gather_rows(held, [t.rows for t in ts]).to(device=torch_device, dtype=dtype).contiguous(), d)
              for (s, d), ts in pairs.items() if s == device and d != device]
    for work in exchange([(buf, s) for s, buf in inbox], outbox):
        work.wait()
    got = {s: list(buf.split([t.rows[1] - t.rows[0] for t in pairs[(s, device)]])) for s, buf in inbox}
    out = []
    for t in (t for t in plan if t.dst == device):
        rows = gather_rows(held, [t.rows]).clone() if t.src == device else got[t.src].pop(0)
        out.append((t.rows, rows))
    return out
