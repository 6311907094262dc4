"""Process groups for layouts, Megatron's tensor-parallel operators, and point-to-point sends.

Every group a set of layouts needs is created once, up front, by every process in the same
order (``torch.distributed.new_group`` is collective over the default group). Ranks are the
global device ids of :meth:`estimator.spec.plan.Layout.device`. The operators take their group as
an argument; a ``None`` group (degree 1) makes each of them the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from estimator.base.errors import ConfigError
from estimator.spec.plan import Layout
from estimator.spec.sharding import flat_chunk

Ranks = tuple[int, ...]

# ---- which ranks form which group (pure) ------------------------------------------------------


def tp_ranks(layout: Layout, device: int) -> Ranks:
    """The tensor-parallel group of ``device``: same data-parallel rank and stage."""
    dp_rank, _, pp_rank = layout.coords(device)
    return tuple(layout.device(dp_rank, t, pp_rank) for t in range(layout.tp))


def dp_ranks(layout: Layout, device: int) -> Ranks:
    """The data-parallel group of ``device``: replicas of the same shard."""
    _, tp_rank, pp_rank = layout.coords(device)
    return tuple(layout.device(d, tp_rank, pp_rank) for d in range(layout.dp))


def embed_ranks(layout: Layout, device: int) -> Ranks:
    """The first and last stage copies of a shard (tied embeddings with pp > 1)."""
    dp_rank, tp_rank, _ = layout.coords(device)
    return tuple(dict.fromkeys(layout.device(dp_rank, tp_rank, s) for s in (0, layout.pp - 1)))


def stage_neighbour(layout: Layout, device: int, step: int) -> int | None:
    """Global rank of the same (dp, tp) position ``step`` stages away, or None past the ends."""
    dp_rank, tp_rank, pp_rank = layout.coords(device)
    other = pp_rank + step
    return layout.device(dp_rank, tp_rank, other) if 0 <= other < layout.pp else None


def layout_groups(layout: Layout) -> list[Ranks]:
    """Every tp, dp and embedding group of ``layout`` in a fixed order."""
    out: list[Ranks] = []
    for kind in (tp_ranks, dp_ranks, embed_ranks):
        out.extend(dict.fromkeys(kind(layout, d) for d in layout.mesh.devices))
    return out


# ---- the registry -----------------------------------------------------------------------------


@dataclass
class GroupRegistry:
    """Process groups by their ranks; ``None`` stands for a group of one."""

    world_size: int
    groups: dict[Ranks, dist.ProcessGroup] = field(default_factory=dict)

    def _get(self, ranks: Ranks) -> dist.ProcessGroup | None:
        if len(ranks) == 1:
            return None
        if ranks not in self.groups:
            raise KeyError(f"no process group for ranks {list(ranks)}; pass its layout to build_groups")
        return self.groups[ranks]

    def tp(self, layout: Layout, device: int) -> dist.ProcessGroup | None:
        return self._get(tp_ranks(layout, device))

    def dp(self, layout: Layout, device: int) -> dist.ProcessGroup | None:
        return self._get(dp_ranks(layout, device))

    def embed(self, layout: Layout, device: int) -> dist.ProcessGroup | None:
        return self._get(embed_ranks(layout, device))

    def prev_stage(self, layout: Layout, device: int) -> int | None:
        return stage_neighbour(layout, device, -1)

    def next_stage(self, layout: Layout, device: int) -> int | None:
        return stage_neighbour(layout, device, +1)


def build_groups(layouts: list[Layout], world_size: int, backend: str | None = None,
                 timeout: timedelta | None = None) -> GroupRegistry:
    """Create every group ``layouts`` need. Every process must call this with the same list in
    the same order; groups shared by several layouts are created once. ``timeout`` bounds every
    collective on them (torch's own default is 30 minutes whatever the default group has)."""
    outside = [str(lay.mesh) for lay in layouts if lay.mesh.last >= world_size]
    if outside:
        raise ConfigError(f"layout meshes {outside} exceed the world of {world_size} processes")
    wanted = dict.fromkeys(r for lay in layouts for r in layout_groups(lay) if len(r) > 1)
    registry = GroupRegistry(world_size)
    for ranks in wanted:
        registry.groups[ranks] = dist.new_group(list(ranks), backend=backend, timeout=timeout)
    return registry


# ---- tensor-parallel operators (Megatron-LM, Shoeybi et al. 2019, Fig. 3) ----------------------


class _CopyToRegion(torch.autograd.Function):
    """f: identity forward, all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # autograd may hand the same gradient buffer to other consumers: reduce a copy
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """g: all-reduce forward (in place: the input is a fresh projection output that no
    backward reads), identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        else:
            ctx.mark_dirty(x)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    """All-gather along the last dimension forward, keep this rank's slice backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        parts = grad.chunk(dist.get_world_size(ctx.group), dim=-1)
        return parts[dist.get_rank(ctx.group)].contiguous(), None


def copy_to_region(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    return x if group is None else _CopyToRegion.apply(x, group)


def reduce_from_region(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    return x if group is None else _ReduceFromRegion.apply(x, group)


def gather_from_region(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    return x if group is None else _GatherFromRegion.apply(x, group)


def vocab_parallel_embed(weight: Tensor, tokens: Tensor, vocab_start: int,
                         group: dist.ProcessGroup | None) -> Tensor:
    """Embedding with rows ``vocab_start ..`` of the table on this rank: tokens outside the
    slice look up zeros, and the all-reduce sums the one rank that holds each token."""
    local = tokens - vocab_start
    outside = (local < 0) | (local >= weight.shape[0])
    out = F.embedding(local.masked_fill(outside, 0), weight)  # (B, T, C)
    out = out.masked_fill(outside[..., None], 0.0)
    return reduce_from_region(out, group)


def flatten(tensors: list[Tensor], dp: int) -> Tensor:
    """One flat buffer of ``tensors``, padded with zeros to ``dp`` equal chunks
    (:func:`estimator.spec.sharding.flat_chunk`; the padding is concatenated even when empty,
    so every call dispatches the same ops): a sharded group's reduce-scatter input."""
    numel = sum(t.numel() for t in tensors)
    pad = tensors[0].new_zeros(dp * flat_chunk(numel, dp) - numel)
    return torch.cat([t.reshape(-1) for t in tensors] + [pad])


def all_reduce_sum(tensors: list[Tensor], group: dist.ProcessGroup | None) -> None:
    """Sum ``tensors`` in place over ``group`` with one flattened all-reduce."""
    if group is None or not tensors:
        return
    if len(tensors) == 1 and tensors[0].is_contiguous():
        dist.all_reduce(tensors[0], group=group)  # nothing to flatten
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


# ---- point to point ---------------------------------------------------------------------------


class StageLink:
    """Point-to-point traffic of one pipeline stage.

    Sends are queued and posted in one batch with the stage's next receive (Megatron's
    pairing of a send forward with a receive backward, which NCCL needs because its
    operations between two ranks run in order), or before a computation that needs no
    receive (:meth:`flush`). Only receives are waited on; sends complete in the background
    until :meth:`wait`. Every send is thus posted before its stage next blocks, so a schedule
    whose receives each match a send issued earlier in a common order (1F1B, micro-batched
    generation) cannot deadlock.
    """

    def __init__(self) -> None:
        self.queued: list[tuple[Tensor, int]] = []
        self.in_flight: list[tuple[dist.Work, Tensor]] = []

    def send(self, tensor: Tensor, dst: int) -> None:
        self.queued.append((tensor.detach().contiguous(), dst))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int) -> Tensor:
        """Receive a tensor of known shape from global rank ``src`` (posting queued sends)."""
        out = torch.empty(shape, dtype=dtype, device=device)
        self._post([(out, src)])
        return out

    def flush(self) -> None:
        """Post the queued sends without waiting for them."""
        if self.queued:
            self._post([])

    def wait(self) -> None:
        """Post the queued sends and wait until every send has completed."""
        self.flush()
        for work, _ in self.in_flight:
            work.wait()
        self.in_flight.clear()

    def _post(self, recvs: list[tuple[Tensor, int]]) -> None:
        sends, self.queued = self.queued, []
        self.in_flight = [(w, t) for w, t in self.in_flight if not w.is_completed()]  # free delivered buffers
        works = exchange(recvs, sends)
        if len(works) == len(recvs) + len(sends):  # one work per operation (gloo)
            self.in_flight += [(w, t) for w, (t, _) in zip(works[len(recvs):], sends)]
            works = works[:len(recvs)]
        for work in works:  # else one work for the whole batch (NCCL)
            work.wait()


def exchange(recvs: list[tuple[Tensor, int]], sends: list[tuple[Tensor, int]]) -> list[dist.Work]:
    """Post receives into ``(buffer, src)`` and sends of ``(tensor, dst)`` as one batch, so no
    order between peers can deadlock (NCCL groups them; gloo never blocks on a post). The
    caller keeps the tensors alive and waits on every returned work (NCCL may return one for
    the whole batch)."""
    ops = [dist.P2POp(dist.irecv, buf, src) for buf, src in recvs]
    ops += [dist.P2POp(dist.isend, t, dst) for t, dst in sends]
    return dist.batch_isend_irecv(ops) if ops else []
