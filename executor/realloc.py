"""Moving parameters and call outputs between layouts.

The slices come from the pure shard math (:func:`estimator.sharding.realloc_plan`,
:func:`estimator.sharding.rows_plan`); this module only moves them. Everything one device sends
another in one reallocation travels as one flat message, and slices a device keeps are
copied locally while the messages are in flight. Each device posts all its sends and receives
as one batch (:func:`executor.comm.exchange`), so the order in which devices enter cannot
deadlock.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimator.models import ModelSpec
from estimator.plan import Layout
from estimator.sharding import Box, Range, RowTransfer, Transfer, group_by_pair, realloc_plan, shard
from executor.comm import exchange
from executor.model import Params, local_index

CPU = torch.device("cpu")


def _in(layout: Layout, device: int) -> bool:
    return device in layout.mesh.devices


def reallocate(model: ModelSpec, src: Layout, src_params: Params | None, dst: Layout, device: int,
               devices_per_node: int, dtype: torch.dtype,
               torch_device: torch.device = CPU) -> Params | None:
    """This device's shards under ``dst`` (None if it is not in ``dst``), built from every
    device's shards under ``src`` (``src_params``: this device's, None if not in ``src``).
    Every device of src ∪ dst must call it with the same layouts."""
    if not (_in(src, device) or _in(dst, device)):
        return None
    plan = realloc_plan(model, src, dst, devices_per_node)
    pairs = group_by_pair(plan)
    src_boxes = shard(model, src, device) if _in(src, device) else {}
    dst_boxes = shard(model, dst, device) if _in(dst, device) else {}
    inbox = [(ts, torch.empty(sum(t.numel for t in ts), dtype=dtype, device=torch_device), s)
             for (s, d), ts in pairs.items() if d == device and s != device]
    outbox = [(_pack(src_params, src_boxes, ts, dtype, torch_device), d)
              for (s, d), ts in pairs.items() if s == device and d != device]
    works = exchange([(buf, s) for _, buf, s in inbox], outbox)
    out = _allocate(dst_boxes, plan, inbox, device, dtype, torch_device)
    for t in pairs.get((device, device), []):  # overlaps the transfers in flight
        out[t.name][local_index(t.box, dst_boxes[t.name])] = _take(src_params, src_boxes, t)
    for work in works:
        work.wait()
    for ts, buf, _ in inbox:
        _unpack(buf, ts, out, dst_boxes)
    return out if _in(dst, device) else None


def _allocate(boxes: dict[str, Box], plan: list[Transfer], inbox: list, device: int, dtype: torch.dtype,
              torch_device: torch.device) -> Params:
    """Destination shards: a shard that arrives whole in one message is a view of its receive
    buffer (no copy, no second allocation); the others are assembled in fresh tensors."""
    whole = {t.name: t for t in plan if t.dst == device and t.src != device and t.box == boxes[t.name]}
    views = {}
    for ts, buf, _ in inbox:
        offset = 0
        for t in ts:
            if whole.get(t.name) is t:
                views[t.name] = buf[offset:offset + t.numel].view(_shape(t.box))
            offset += t.numel
    return {n: views[n] if n in views else torch.empty(_shape(b), dtype=dtype, device=torch_device)
            for n, b in boxes.items()}


def _shape(box: Box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def _take(params: Params | None, boxes: dict[str, Box], t: Transfer) -> Tensor:
    """The slice ``t`` moves, as a view of this device's source shard."""
    if params is None:
        raise ValueError(f"device {t.src} must send {t.name} but was given no source params")
    return params[t.name].detach()[local_index(t.box, boxes[t.name])]


def _pack(params: Params | None, boxes: dict[str, Box], transfers: list[Transfer], dtype: torch.dtype,
          torch_device: torch.device) -> Tensor:
    """One flat message of the slices; a lone contiguous slice of the right dtype goes as is."""
    if len(transfers) == 1:
        part = _take(params, boxes, transfers[0])
        if part.is_contiguous() and part.dtype == dtype:
            return part.reshape(-1)
    flat = torch.empty(sum(t.numel for t in transfers), dtype=dtype, device=torch_device)
    offset = 0
    for t in transfers:
        # Each slice is copied once, straight into its place (strided slices included).
        flat[offset:offset + t.numel].view(_shape(t.box)).copy_(_take(params, boxes, t))
        offset += t.numel
    return flat


def _unpack(buf: Tensor, transfers: list[Transfer], out: Params, boxes: dict[str, Box]) -> None:
    offset = 0
    for t in transfers:
        piece = buf[offset:offset + t.numel]
        if out[t.name].data_ptr() != piece.data_ptr():  # not already in place
            out[t.name][local_index(t.box, boxes[t.name])] = piece.view(_shape(t.box))
        offset += t.numel


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
