"""Sharded data parallelism of a train call (``Layout.shard``): its collectives, copies and
optimizer step on one pipeline stage, as the executor runs them (:mod:`executor.zero`).

- ``none``: one all-reduce of the stage's gradients per optimizer step (:mod:`estimator.cost.lowering`).
- ``optimizer`` (ZeRO-1, Megatron's distributed optimizer): per optimizer step the stage's
  gradients are flattened into one buffer padded to ``dp`` equal chunks
  (:func:`estimator.spec.sharding.flat_chunk`) and reduce-scattered; Adam steps this rank's
  chunk (one flat tensor of ``⌈P/dp⌉`` elements); the updated chunks are all-gathered into the
  buffer and copied back into the parameters. The flatten and the copies back are the very ops
  of the census's ``dp_allreduce`` piece (a concatenation, a copy per tensor).
- ``full`` (ZeRO-3, FSDP2): each group of :func:`estimator.spec.sharding.shard_groups` (the
  stage's ends, then every block) is one flat buffer of which a rank keeps its chunk. Per
  micro-batch, forward all-gathers the ends, then each block's buffer one block ahead: block
  ``i+1``'s all-gather runs while block ``i`` computes (the embedding's compute covers block
  0's), so a block costs ``max(compute, gather)`` and only the first gather is exposed.
  Backward gathers again in backward order (the head's ends on the last stage first, then the
  blocks from the last), again one group ahead, and reduce-scatters each group's gradient
  (flattened: the census's ``shard_flatten`` piece) as soon as it is complete, overlapping the
  next group's backward; gathers and reduce-scatters share the data-parallel links, so while
  group ``i`` computes the link carries the gather of ``i+1`` and the reduce-scatter of
  ``i−1`` (:func:`backward_exposed_s`); the last reduce-scatter is exposed. Adam steps every
  group's chunk.

Collectives take the profile's curves over the data-parallel group (sizes as nccl-tests
counts them: the gathered output, the reduce-scatter's input) plus
``executor.collective_overhead_s`` each, as every collective issued between computations.
Where lengths vary the overlap is taken at the mean micro-batch's compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.cost.census import load_op_set, tensors_work
from estimator.cost.pieces import dp_flatten_s, optimizer_s
from estimator.cost.transfers import group_shape
from estimator.profile.profiles import Profile
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import ENDS, box_numel, flat_chunk, shard, shard_groups


def dp_collective_s(profile: Profile, kind: str, size_bytes: float, layout: Layout, stage: int, dpn: int) -> float:
    """One ``kind`` collective of ``size_bytes`` over a data-parallel group of ``stage``,
    issued between computations; 0 for a group of one."""
    if layout.dp <= 1 or size_bytes <= 0:
        return 0.0
    group = [layout.device(i, 0, stage) for i in range(layout.dp)]
    return profile.group_collective_s(kind, size_bytes, *group_shape(group, dpn)) + profile.collective_overhead_s


def group_numels(model: ModelSpec, layout: Layout, stage: int) -> dict[str, list[int]]:
    """Per group of :func:`shard_groups` on a device of ``stage``, its tensors' elements."""
    boxes = shard(model, layout, layout.device(0, 0, stage))
    return {g: [box_numel(boxes[n]) for n in names]
            for g, names in shard_groups(model, layout, layout.device(0, 0, stage)).items()}


def padded_bytes(numel: int, dp: int, elem_bytes: int) -> float:
    """Bytes of a flat buffer of ``numel`` elements padded to ``dp`` equal chunks."""
    return float(dp * flat_chunk(numel, dp) * elem_bytes)


@dataclass(frozen=True)
class OptimizerShardStep:
    """Per optimizer step under ``shard="optimizer"``: the reduce-scatter with its flatten, the
    optimizer on the chunk, the all-gather with its copies back."""

    reduce_s: float
    optimizer_s: float
    gather_s: float


def optimizer_shard_step(profile: Profile, model: ModelSpec, layout: Layout, stage: int,
                         dpn: int) -> OptimizerShardStep:
    """The reduce-scatter, step and all-gather of ``stage`` under ``shard="optimizer"``; the
    census's flatten-and-copy-back work (``dp_allreduce``) is split half to each collective."""
    numels = [n for ns in group_numels(model, layout, stage).values() for n in ns]
    size = padded_bytes(sum(numels), layout.dp, profile.elem_bytes)
    copies = dp_flatten_s(profile, numels) / 2  # the census piece is the flatten and the copies back
    reduce = dp_collective_s(profile, "reduce_scatter", size, layout, stage, dpn) + copies
    gather = dp_collective_s(profile, "all_gather", size, layout, stage, dpn) + copies
    return OptimizerShardStep(reduce, optimizer_s(profile, [flat_chunk(sum(numels), layout.dp)]), gather)


def full_optimizer_s(profile: Profile, model: ModelSpec, layout: Layout, stage: int) -> float:
    """Adam over every group's chunk (one flat tensor per group) under ``shard="full"``."""
    return optimizer_s(profile, [flat_chunk(sum(ns), layout.dp) for ns in group_numels(model, layout, stage).values()])


def shard_flatten_s(profile: Profile, numels: list[int]) -> float:
    """The concatenation of one group's gradients before its reduce-scatter (none for one tensor)."""
    if len(numels) <= 1:
        return 0.0
    census = load_op_set(profile.ops)
    _, nbytes, launches = tensors_work(census, profile.dtype, "shard_flatten", len(numels), float(sum(numels)))
    return profile.op_s(0.0, nbytes, launches, in_model=False)


def forward_exposed_s(gathers: list[float], computes: list[float]) -> float:
    """Communication a forward exposes when gather ``i+1`` runs during compute ``i``: the first
    gather whole, each later one beyond the compute it overlaps."""
    if not gathers:
        return 0.0
    return gathers[0] + sum(max(0.0, g - c) for g, c in zip(gathers[1:], computes))


def backward_exposed_s(gathers: list[float], computes: list[float], reduces: list[float]) -> float:
    """Communication a backward exposes over groups in backward order: group ``i``'s gather
    before its compute (prefetched during compute ``i−1``), its reduce-scatter after it
    (during compute ``i+1``); while group ``i`` computes the link carries gather ``i+1`` and
    reduce-scatter ``i−1``. The first gather and the last reduce-scatter are exposed."""
    n = len(computes)
    if not n:
        return 0.0
    out = gathers[0] + reduces[-1]
    for i in range(n):
        busy = (gathers[i + 1] if i + 1 < n else 0.0) + (reduces[i - 1] if i > 0 else 0.0)
        out += max(0.0, busy - computes[i])
    return out


@dataclass(frozen=True)
class FullShardPass:
    """Per micro-batch pass under ``shard="full"``: exposed communication of forward and
    backward, and the flatten copies of the reduce-scatters (device work)."""

    forward_s: float
    backward_s: float
    copies_s: float


def full_shard_pass(profile: Profile, model: ModelSpec, layout: Layout, stage: int, dpn: int,
                    block_f: float, block_b: float, embed_f: float, embed_b: float, head_b: float,
                    reduce_bytes: int = 0) -> FullShardPass:
    """Exposed communication of one micro-batch through ``stage`` (see the module docstring);
    ``block_f``/``block_b``: one block's forward/backward time, ``embed_*``: the embedding's
    (first stage), ``head_b``: the head and loss backward (last stage); ``reduce_bytes``: bytes
    per gradient element the reduce-scatters carry (0: the profile's element, as the gathers)."""
    groups = group_numels(model, layout, stage)
    first, last = stage == 0, stage == layout.pp - 1

    def coll(kind: str, g: str) -> float:
        elem = reduce_bytes if kind == "reduce_scatter" and reduce_bytes else profile.elem_bytes
        return dp_collective_s(profile, kind, padded_bytes(sum(groups[g]), layout.dp, elem), layout, stage, dpn)

    blocks = [g for g in groups if g != ENDS]
    ends = ENDS in groups
    gathers_f = ([coll("all_gather", ENDS)] if ends else []) + [coll("all_gather", g) for g in blocks]
    computes_f = ([embed_f] if ends else []) + [block_f] * len(blocks)
    fwd = forward_exposed_s(gathers_f, computes_f)
    # backward order: the head (last stage: its weights gathered again), the blocks from the
    # last, the embedding (first stage: no weights needed); the ends reduce-scatter once both
    # of their ends are done
    gathers_b, computes_b, reduces_b = [], [], []
    if last and ends:
        gathers_b.append(coll("all_gather", ENDS))
        computes_b.append(head_b)
        reduces_b.append(0.0 if first else coll("reduce_scatter", ENDS))
    for g in reversed(blocks):
        gathers_b.append(coll("all_gather", g))
        computes_b.append(block_b)
        reduces_b.append(coll("reduce_scatter", g))
    if first and ends:
        gathers_b.append(0.0)
        computes_b.append(embed_b)
        reduces_b.append(coll("reduce_scatter", ENDS))
    bwd = backward_exposed_s(gathers_b, computes_b, reduces_b)
    copies = sum(shard_flatten_s(profile, ns) for ns in groups.values())
    return FullShardPass(fwd, bwd, copies)
