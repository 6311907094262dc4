"""Sharded data parallelism (``Layout.shard``) over a layout's data-parallel group, with
explicit collectives.

- ``optimizer`` (ZeRO-1, Megatron's distributed optimizer) — :class:`ZeroAdam`: backward
  leaves each replica's own gradient sum; per optimizer step the gradients are flattened into
  one buffer padded to ``dp`` equal chunks (:func:`estimator.spec.sharding.flat_chunk`) and
  reduce-scattered, Adam steps this rank's chunk of a flat copy of the parameters (its master
  weights), and the updated chunks are all-gathered and copied back into the parameters.
- ``full`` (ZeRO-3, FSDP) — :class:`FullShard`: a device keeps, of each group of
  :func:`estimator.spec.sharding.shard_groups` (the stage's ends, then each block), only its
  chunk of the group's flat buffer; those chunks are the role's home parameters and what
  :class:`executor.optim.ShardAdam` steps. A pass gathers a group's buffer into whole tensors
  when it needs them: forward gathers the ends, then every block one block ahead (block
  ``i+1``'s all-gather runs, asynchronously, while block ``i`` computes); backward gathers again
  — a block's weights are not kept between its forward and its backward: autograd's saved
  tensors that are views of a gathered buffer are packed as their place in it
  (``torch.autograd.graph.saved_tensors_hooks``) and unpacked from a fresh gather, one group
  ahead in backward order (the head's ends first, then the blocks from the last); under
  activation recompute the re-run forward gathers instead. As soon as a group's gradient is
  complete it is flattened and reduce-scattered asynchronously; the pass waits for the last
  one at its end and adds each chunk's gradient (summed over the replicas) to the chunk.

Why not torch's own FSDP2 (``torch.distributed.fsdp.fully_shard``)? It does run over gloo on
CPU (torch 2.13: an ``nn.Sequential`` sharded over a two-process CPU device mesh trains), but
it shards the parameters of ``nn.Module`` objects into DTensors and gathers them in the
modules' forward hooks, while the executor's model is functional over a dict of parameter
tensors (:mod:`executor.model`) that the pipeline, tensor-parallel and reallocation code
address by name and box. Using it would mean a second, module-based model, parameters the
shard math (:mod:`estimator.spec.sharding`) does not describe, and collectives and copies the
op census cannot record. So sharding is explicit here: one all-gather and one reduce-scatter
per group, the work :mod:`estimator.cost.dpshard` charges.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import ENDS, box_shape, shard, shard_groups
from executor.comm import flatten
from executor.model import Params
from executor.optim import FULL_PRECISION, ShardAdam

# torch 2.13 names the tensor reduce-scatter reduce_scatter_single; older releases reduce_scatter_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_flat(chunk: Tensor, dp: int, group: dist.ProcessGroup | None,
                    async_op: bool = False) -> tuple[Tensor, dist.Work | None]:
    """The whole flat buffer of which every rank of ``group`` holds ``chunk`` (rank order),
    gathered straight into its place; with ``async_op`` the work to wait on."""
    flat = torch.empty(dp * chunk.numel(), dtype=chunk.dtype, device=chunk.device)
    if group is None:
        flat.copy_(chunk)
        return flat, None
    work = dist.all_gather(list(flat.chunk(dp)), chunk.contiguous(), group=group, async_op=async_op)
    return flat, work


def views(flat: Tensor, names: list[str], shapes: dict[str, tuple[int, ...]]) -> Params:
    """name → the tensor of ``shapes[name]`` at its place in ``flat`` (inventory order)."""
    out, at = {}, 0
    for n in names:
        size = 1
        for d in shapes[n]:
            size *= d
        out[n] = flat[at:at + size].view(shapes[n])
        at += size
    return out


# ---- shard="optimizer" -------------------------------------------------------------------------


class ZeroAdam:
    """Adam over this rank's chunk of a device's parameters (``shard="optimizer"``).

    :meth:`reduce` reduce-scatters the gradients backward left, :meth:`step` steps the chunk,
    :meth:`gather` all-gathers the updated chunks into the parameters."""

    sharded = True

    def __init__(self, params: Params, lr: float, group: dist.ProcessGroup | None, dp: int, rank: int):
        self.params = list(params.values())
        self.group, self.dp, self.rank = group, dp, rank
        mixed = any(p.dtype not in FULL_PRECISION for p in self.params)
        flat = flatten([p.detach() for p in self.params], dp)
        # this rank's master weights: float32 for a 16-bit model (as ShardAdam keeps them)
        self.chunk = flat.chunk(dp)[rank].clone().to(torch.float32 if mixed else flat.dtype)
        self.adam = ShardAdam({"chunk": self.chunk}, lr)

    def reduce(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = flatten(grads, self.dp)
        out = torch.empty(flat.numel() // self.dp, dtype=flat.dtype, device=flat.device)
        if self.group is None:
            out.copy_(flat)
        else:
            REDUCE_SCATTER(out, flat, group=self.group)
        self.chunk.grad = out.to(self.chunk.dtype)

    def step(self) -> None:
        self.adam.step()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self.adam.zero_grad()

    def gather(self) -> None:
        flat, _ = all_gather_flat(self.chunk.detach().to(self.params[0].dtype), self.dp, self.group)
        at = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(flat[at:at + p.numel()].view_as(p))
                at += p.numel()


# ---- shard="full" ------------------------------------------------------------------------------


def shard_chunks(model: ModelSpec, layout: Layout, device: int, whole: Params) -> dict[str, Tensor]:
    """group → this device's chunk of the group's flat buffer, from its whole tensors
    ``whole`` (names of :func:`estimator.spec.sharding.shard`)."""
    dp_rank = layout.coords(device)[0]
    return {g: flatten([whole[n] for n in names], layout.dp).chunk(layout.dp)[dp_rank].clone()
            for g, names in shard_groups(model, layout, device).items()}


class _Gathered(torch.autograd.Function):
    """A gathered group's tensors (views of ``flat``) as a function of this rank's chunk: the
    backward reduce-scatters their gradients (asynchronously, :meth:`FullShard.reduce`) and
    returns none — the chunk's gradient is added when the reduce-scatter is done."""

    @staticmethod
    def forward(ctx, chunk: Tensor, flat: Tensor, owner: FullShard, group: str) -> tuple[Tensor, ...]:  # noqa: ARG004
        ctx.owner, ctx.group = owner, group
        return tuple(views(flat, owner.groups[group], owner.shapes).values())

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[None, None, None, None]:
        ctx.owner.reduce(ctx.group, list(grads))
        return None, None, None, None


class FullShard:
    """One device's ``shard="full"`` parameters of one stage: chunks, gathered group by group
    (see the module docstring). :meth:`begin` starts a pass, :meth:`open` gives a group's
    tensors, :meth:`saving` packs what autograd saves of them, :meth:`end` closes a backward."""

    def __init__(self, model: ModelSpec, layout: Layout, device: int, chunks: dict[str, Tensor],
                 group: dist.ProcessGroup | None):
        self.chunks, self.group, self.dp = chunks, group, layout.dp
        self.groups = shard_groups(model, layout, device)
        self.shapes = {n: box_shape(b) for n, b in shard(model, layout, device).items()}
        blocks = [g for g in self.groups if g != ENDS]
        last = layout.coords(device)[2] == layout.pp - 1
        self.order = {"forward": ([ENDS] if ENDS in self.groups else []) + blocks,
                      "backward": ([ENDS] if last and ENDS in self.groups else []) + blocks[::-1]}
        self.phase = "forward"
        self.flats: dict[str, Tensor] = {}  # this pass's gathered buffers
        self.pending: dict[str, tuple[Tensor, dist.Work | None]] = {}  # prefetched gathers
        self.reducing: list[tuple[str, Tensor, Tensor, dist.Work | None]] = []

    def begin(self, phase: str) -> None:
        self.phase, self.flats = phase, {}

    def _flat(self, g: str) -> Tensor:
        """Group ``g``'s gathered buffer in this pass: prefetched, gathered now or held; the
        next group of the pass's order is prefetched as it is taken."""
        if g not in self.flats:
            if g in self.pending:
                flat, work = self.pending.pop(g)
                if work is not None:
                    work.wait()
            else:
                flat, _ = all_gather_flat(self.chunks[g].detach(), self.dp, self.group)
            self.flats[g] = flat
            order = self.order[self.phase]
            nxt = order[order.index(g) + 1] if g in order and order.index(g) + 1 < len(order) else None
            if nxt is not None and nxt not in self.flats and nxt not in self.pending:
                self.pending[nxt] = all_gather_flat(self.chunks[nxt].detach(), self.dp, self.group, async_op=True)
        return self.flats[g]

    def open(self, g: str) -> Params:
        """Group ``g``'s whole tensors, differentiable with respect to this rank's chunk."""
        out = _Gathered.apply(self.chunks[g], self._flat(g), self, g)
        return dict(zip(self.groups[g], out))

    @contextmanager
    def saving(self, g: str) -> Iterator[None]:
        """Inside: tensors autograd saves that are views of ``g``'s gathered buffer are kept
        as their place in it and gathered again when backward needs them."""
        storage = self._flat(g).untyped_storage().data_ptr()

        def pack(t: Tensor) -> object:
            if t.untyped_storage().data_ptr() == storage:
                return (g, tuple(t.size()), tuple(t.stride()), t.storage_offset())
            return t

        def unpack(saved: object) -> Tensor:
            if isinstance(saved, Tensor):
                return saved
            group, size, stride, offset = saved
            return torch.as_strided(self._flat(group), size, stride, offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def release(self, g: str) -> None:
        """Drop this pass's gathered buffer of ``g`` (what autograd saved of it is packed)."""
        self.flats.pop(g, None)

    def reduce(self, g: str, grads: list[Tensor]) -> None:
        """Start the reduce-scatter of group ``g``'s gradients (its gathered buffer goes)."""
        self.release(g)
        flat = flatten(grads, self.dp)
        out = torch.empty(flat.numel() // self.dp, dtype=flat.dtype, device=flat.device)
        if self.group is None:
            out.copy_(flat)
            self.reducing.append((g, out, flat, None))
            return
        work = REDUCE_SCATTER(out, flat, group=self.group, async_op=True)
        self.reducing.append((g, out, flat, work))

    def end(self) -> None:
        """Close a backward: wait for its reduce-scatters and add each to its chunk's gradient."""
        for g, out, _, work in self.reducing:
            if work is not None:
                work.wait()
            chunk = self.chunks[g]
            chunk.grad = out if chunk.grad is None else chunk.grad.add_(out)
        self.reducing.clear()
        self.flats = {}
        for _, work in self.pending.values():  # a prefetch no unpack needed (kept in step)
            if work is not None:
                work.wait()
        self.pending.clear()

    def whole(self) -> Params:
        """Every tensor of the stage whole (gathered group by group, outside any pass)."""
        out: Params = {}
        for g, names in self.groups.items():
            flat, _ = all_gather_flat(self.chunks[g].detach(), self.dp, self.group)
            out.update(views(flat, names, self.shapes))
        return out
