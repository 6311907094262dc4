"""Shard math: which slice of which parameter and which batch rows each device holds, and who
sends what when parameters or call outputs move between layouts.

Pure functions of (model, layout, device); no process group, no tensors. The executor moves
exactly these slices; the estimator charges exactly these bytes.

Parameters use Hugging Face LLaMA names for every family: a GELU / ReLU MLP's fc1 (GPT-2
``c_fc``, OPT ``fc1``, GPT-NeoX ``dense_h_to_4h``) is ``mlp.up_proj`` and its fc2 is
``mlp.down_proj``; LayerNorm biases are ``*layernorm.bias`` and ``norm.bias``; the learned
position table is ``embed_positions.weight``. Tensor-parallel splits (Megatron):

- column-parallel (split the output rows, dim 0): q/k/v projections, gate, up (fc1), and
  their biases;
- row-parallel (split the input columns, dim 1): o_proj, down_proj (fc2);
- vocab-parallel (split dim 0): embedding and LM head;
- replicated: norm weights and biases, the biases of o_proj and down_proj (added once, after
  the all-reduce), the learned position table, the scalar value head.

Pipeline stages own contiguous blocks of layers (:meth:`Layout.stage_layers`); the first
stage owns the embedding (and the position table), the last the final norm and the head (and,
with tied embeddings, a copy of the embedding that serves as the head).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.workflow import Call

Box = tuple[tuple[int, int], ...]  # per dimension [start, stop)
Range = tuple[int, int]  # [start, stop)

COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor of a model."""

    name: str  # Hugging Face-style name, e.g. "layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]  # full (unsharded) shape
    split: str  # column | row | vocab | replicated
    layer: int | None  # transformer block, or None for embedding / final norm / head
    where: str = "block"  # block | first (embedding) | last (norm, head)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def split_dim(self) -> int | None:
        return {COLUMN: 0, VOCAB: 0, ROW: 1}.get(self.split)


def param_inventory(model: ModelSpec) -> list[ParamInfo]:
    """Every parameter of ``model`` in a fixed order (embedding, blocks, final norm, head)."""
    h, f, kv, v = model.hidden, model.ffn, model.kv_dim, model.vocab
    out = [ParamInfo("embed_tokens.weight", (v, h), VOCAB, None, "first")]
    if model.positions == "learned":
        out.append(ParamInfo("embed_positions.weight", (model.max_positions, h), REPLICATED, None, "first"))
    mlp_in = ("gate_proj", "up_proj") if model.mlp == "swiglu" else ("up_proj",)
    for i in range(model.layers):
        p = f"layers.{i}."
        out += _norm(p + "input_layernorm", model, i)
        for proj, rows in (("q_proj", model.q_dim), ("k_proj", kv), ("v_proj", kv)):
            out.append(ParamInfo(p + f"self_attn.{proj}.weight", (rows, h), COLUMN, i))
            if model.qkv_bias or model.bias:
                out.append(ParamInfo(p + f"self_attn.{proj}.bias", (rows,), COLUMN, i))
        if model.qk_norm:  # Qwen3: one RMSNorm weight per head width, shared by every head
            out += [ParamInfo(p + f"self_attn.{n}.weight", (model.head_dim,), REPLICATED, i)
                    for n in ("q_norm", "k_norm")]
        out += _linear_out(p + "self_attn.o_proj", (h, model.q_dim), model.bias, i)
        out += _norm(p + "post_attention_layernorm", model, i)
        for proj in mlp_in:
            out.append(ParamInfo(p + f"mlp.{proj}.weight", (f, h), COLUMN, i))
            if model.bias:
                out.append(ParamInfo(p + f"mlp.{proj}.bias", (f,), COLUMN, i))
        out += _linear_out(p + "mlp.down_proj", (h, f), model.bias, i)
    out += _norm("norm", model, None, "last")
    if model.head == "value":
        out.append(ParamInfo("value_head.weight", (1, h), REPLICATED, None, "last"))
    elif not model.tied_embeddings:
        out.append(ParamInfo("lm_head.weight", (v, h), VOCAB, None, "last"))
    return out


def _norm(name: str, model: ModelSpec, layer: int | None, where: str = "block") -> list[ParamInfo]:
    """A norm's weight, and its bias for LayerNorm: replicated."""
    out = [ParamInfo(name + ".weight", (model.hidden,), REPLICATED, layer, where)]
    if model.norm == "layernorm":
        out.append(ParamInfo(name + ".bias", (model.hidden,), REPLICATED, layer, where))
    return out


def _linear_out(name: str, shape: tuple[int, int], bias: bool, layer: int) -> list[ParamInfo]:
    """A row-parallel projection; its bias is replicated (added once, after the all-reduce)."""
    out = [ParamInfo(name + ".weight", shape, ROW, layer)]
    if bias:
        out.append(ParamInfo(name + ".bias", (shape[0],), REPLICATED, layer))
    return out


def on_stage(info: ParamInfo, model: ModelSpec, layout: Layout, pp_rank: int) -> bool:
    """Whether pipeline stage ``pp_rank`` of ``layout`` holds ``info``."""
    if info.where == "block":
        return info.layer in layout.stage_layers(model.layers, pp_rank)
    last = pp_rank == layout.pp - 1
    if info.where == "first":
        return pp_rank == 0 or (last and model.tied_embeddings and info.name == "embed_tokens.weight")
    return last


def tp_box(info: ParamInfo, tp: int, tp_rank: int) -> Box:
    """The slice of ``info`` that tensor-parallel rank ``tp_rank`` of ``tp`` holds."""
    box = [(0, d) for d in info.shape]
    dim = info.split_dim
    if dim is not None and tp > 1:
        size = info.shape[dim] // tp
        box[dim] = (tp_rank * size, (tp_rank + 1) * size)
    return tuple(box)


def shard(model: ModelSpec, layout: Layout, device: int) -> dict[str, Box]:
    """name → global box of every parameter slice ``device`` holds under ``layout``."""
    _, tp_rank, pp_rank = layout.coords(device)
    return {p.name: tp_box(p, layout.tp, tp_rank)
            for p in param_inventory(model) if on_stage(p, model, layout, pp_rank)}


ENDS = "ends"  # the group of a stage's parameters outside its blocks


def shard_groups(model: ModelSpec, layout: Layout, device: int) -> dict[str, list[str]]:
    """The parameter groups a ``shard="full"`` layout gathers and reduce-scatters as one flat
    buffer each (FSDP's units), in forward order: the stage's ends (:data:`ENDS`: embedding,
    position table, final norm, head; gathered for the whole pass, absent on a stage with
    none), then each block (``"layers.<i>"``). Names in inventory order; together exactly
    :func:`shard`'s names."""
    names = list(shard(model, layout, device))
    ends = [n for n in names if not n.startswith("layers.")]
    out = {ENDS: ends} if ends else {}
    for n in names:
        if n.startswith("layers."):
            out.setdefault(".".join(n.split(".")[:2]), []).append(n)
    return out


def flat_chunk(numel: int, dp: int) -> int:
    """Elements each of ``dp`` ranks holds of a flat buffer of ``numel``: the buffer is padded
    with zeros to ``dp`` equal chunks (a collective moves equal parts), rank ``r`` holding
    elements ``[r·c, (r+1)·c)``."""
    return -(-numel // dp)


def full_boxes(model: ModelSpec) -> dict[str, Box]:
    """name → the whole of every parameter of ``model``."""
    return {p.name: tp_box(p, 1, 0) for p in param_inventory(model)}


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def box_numel(box: Box) -> int:
    n = 1
    for size in box_shape(box):
        n *= size
    return n


def intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(lo1, lo2), min(hi1, hi2)) for (lo1, hi1), (lo2, hi2) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


@dataclass(frozen=True)
class Transfer:
    """``box`` of parameter ``name`` (global coordinates) goes from ``src`` to ``dst``."""

    src: int  # global device id of the sender
    dst: int  # global device id of the receiver (== src: a local copy)
    name: str
    box: Box

    @property
    def numel(self) -> int:
        return box_numel(self.box)


def pick_sender(candidates: list[int], dst: int, devices_per_node: int) -> int:
    """The sender among replicas: the receiver itself, else one on its node, else spread
    receivers over replicas round-robin (deterministic)."""
    if dst in candidates:
        return dst
    same_node = [c for c in candidates if c // devices_per_node == dst // devices_per_node]
    pool = same_node or candidates
    return pool[dst % len(pool)]


def realloc_plan(model: ModelSpec, src: Layout, dst: Layout, devices_per_node: int) -> list[Transfer]:
    """Every slice each device of ``dst`` needs, and which device of ``src`` sends it.

    Each destination slice is covered exactly once (tiling); among the data-parallel
    replicas of ``src`` that hold a slice, the receiver itself or a device on its node is
    preferred, so intra-node links carry what they can.
    """
    inventory = param_inventory(model)
    out: list[Transfer] = []
    for d in dst.mesh.devices:
        _, dtp, dpp = dst.coords(d)
        for p in inventory:
            if not on_stage(p, model, dst, dpp):
                continue
            need = tp_box(p, dst.tp, dtp)
            # Every stage holding the parameter holds the same values (tied copies are kept
            # identical), and a replicated parameter is one slice held by every tp rank.
            stages = [s for s in range(src.pp) if on_stage(p, model, src, s)]
            slices = [[t] for t in range(src.tp)] if p.split_dim is not None else [list(range(src.tp))]
            for tps in slices:
                part = intersect(need, tp_box(p, src.tp, tps[0]))
                if part is None:
                    continue
                holders = [src.device(i, t, s) for s in stages for t in tps for i in range(src.dp)]
                out.append(Transfer(pick_sender(holders, d, devices_per_node), d, p.name, part))
    return out


def group_by_pair(transfers: list[Transfer]) -> dict[tuple[int, int], list[Transfer]]:
    """(src, dst) → transfers, in plan order: one batched message per pair."""
    out: dict[tuple[int, int], list[Transfer]] = defaultdict(list)
    for t in transfers:
        out[(t.src, t.dst)].append(t)
    return dict(out)


# ---- batch rows -------------------------------------------------------------------------


def split_range(lo: int, hi: int, parts: int) -> list[Range]:
    """``[lo, hi)`` in ``parts`` contiguous runs, the first ones one longer where they do not divide."""
    base, extra = divmod(hi - lo, parts)
    out, start = [], lo
    for j in range(parts):
        stop = start + base + (1 if j < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def dp_rows(call: Call, layout: Layout, dp_rank: int) -> list[Range]:
    """Global row ranges (sequences) data-parallel rank ``dp_rank`` processes, in order.

    Train calls split every PPO minibatch over the dp ranks, so every optimizer step sees
    the same global rows under any layout; other calls split the batch in dp blocks. Paired
    data keeps (chosen, rejected) rows together. A generate call's engine replicas take the
    requests as a rollout server deals them, unevenly where they do not divide (the first
    replicas one more: :func:`split_range`), so any number of engines can serve a batch; a
    streaming GRPO rollout deals whole groups (``Workload.group``).
    """
    w = call.workload
    if call.kind == "generate":
        lo, hi = split_range(0, w.seqs // w.group, layout.dp)[dp_rank]  # whole groups (1 row each by default)
        return [(lo * w.group, hi * w.group)]
    per_unit = 2 if w.paired else 1
    steps = w.minibatches if call.kind == "train" else 1
    step_units = w.units // steps
    share = step_units // layout.dp
    out = []
    for k in range(steps):
        start = (k * step_units + dp_rank * share) * per_unit
        out.append((start, start + share * per_unit))
    return out


def most_rows(call: Call, layout: Layout) -> int:
    """Sequences of the fullest data-parallel rank (every rank alike but for a generate call whose
    engines share the batch unevenly)."""
    return sum(hi - lo for lo, hi in dp_rows(call, layout, 0))


def fullest_engine_rows(call: Call, layout: Layout) -> int:
    """Sequences of a generate call's fullest virtual engine: the first of replica 0, where
    :func:`split_range` deals the extra requests first."""
    (lo, hi), *_ = micro_batch_rows(call, layout, 0)[0]
    return hi - lo


def micro_batch_rows(call: Call, layout: Layout, dp_rank: int) -> list[list[Range]]:
    """Per minibatch (one entry for non-train calls), the row range of each micro-batch (a
    generate call's split as :func:`split_range` splits, the first ones one longer)."""
    if call.kind == "generate":
        (lo, hi), = dp_rows(call, layout, dp_rank)
        return [split_range(lo, hi, layout.micro_batches)]
    per_unit = 2 if call.workload.paired else 1
    out = []
    for lo, hi in dp_rows(call, layout, dp_rank):
        units = (hi - lo) // per_unit
        size = units // layout.micro_batches * per_unit
        out.append([(lo + j * size, lo + (j + 1) * size) for j in range(layout.micro_batches)])
    return out


def budget_micro_batches(rows: Range, tokens: np.ndarray, budget: int, per_unit: int = 1,
                         packed: bool = False) -> list[Range]:
    """Rows ``[lo, hi)`` cut into micro-batches by a token budget: whole units (a pair is two
    rows) are packed in row order while the micro-batch, padded to its longest row, stays
    within ``budget`` tokens; ``tokens[r − lo]`` is row r's prompt plus response tokens. One
    rule for the executor, which batches so, and the estimator, which charges it. ``packed``:
    the micro-batch's rows are concatenated without padding (sequence packing, as Megatron and
    NeMo-RL pack), so their summed tokens stay within the budget."""
    lo, hi = rows
    if len(tokens) != hi - lo:
        raise ValueError(f"tokens for {len(tokens)} rows, range {rows} holds {hi - lo}")
    units = np.asarray(tokens).reshape(-1, per_unit).max(axis=1).tolist()
    out, start, longest = [], lo, 0
    for u, unit in zip(range(lo, hi, per_unit), units):
        if unit * per_unit > budget:
            raise ValueError(f"rows {u}..{u + per_unit - 1}: {unit * per_unit} tokens pass the budget {budget}")
        filled = longest + unit * per_unit if packed else max(longest, unit) * (u + per_unit - start)
        if u > start and filled > budget:
            out.append((start, u))
            start, longest = u, 0
        longest = longest + unit * per_unit if packed else max(longest, unit)
    if hi > start:
        out.append((start, hi))
    return out


@dataclass(frozen=True)
class RowTransfer:
    """Rows ``[start, stop)`` of a call output go from ``src`` to ``dst``."""

    src: int
    dst: int
    rows: Range


def output_holders(call: Call, layout: Layout) -> dict[int, list[Range]]:
    """Devices that hold a call's outputs (every tp rank of the last stage) and their rows."""
    last = layout.pp - 1
    return {layout.device(i, t, last): dp_rows(call, layout, i)
            for i in range(layout.dp) for t in range(layout.tp)}


def input_needs(call: Call, layout: Layout) -> dict[int, list[Range]]:
    """Rows every device of a consuming call needs (all its stages: the first embeds tokens,
    the last computes losses against them)."""
    return {d: dp_rows(call, layout, layout.coords(d)[0]) for d in layout.mesh.devices}


def data_needs(algorithm: str, call: Call, layout: Layout, name: str) -> dict[int, list[Range]]:
    """Rows of input ``name`` each device of ``call`` needs. GRPO's train call needs every
    reward on every device (group statistics); everything else follows the call's rows."""
    if algorithm == "grpo" and call.kind == "train" and name == "rewards":
        return {d: [(0, call.workload.seqs)] for d in layout.mesh.devices}
    return input_needs(call, layout)


def rows_plan(holders: dict[int, list[Range]], needs: dict[int, list[Range]],
              devices_per_node: int) -> list[RowTransfer]:
    """Cover every needed row range exactly once from the holders (receiver itself first,
    then its node, then round-robin)."""
    # The holders' range ends cut the rows into elementary segments; each segment's holders
    # (in the holders' order) are listed once, so a needed piece looks its senders up by bisection.
    bounds = sorted({b for rs in holders.values() for r in rs for b in r})
    index = {b: i for i, b in enumerate(bounds)}
    cover: list[list[int]] = [[] for _ in bounds]
    for s, rs in holders.items():
        for r0, r1 in rs:
            for i in range(index[r0], index[r1]):
                if not cover[i] or cover[i][-1] != s:
                    cover[i].append(s)
    out = []
    for dst, ranges in needs.items():
        for lo, hi in ranges:
            inner = bounds[bisect.bisect_right(bounds, lo):bisect.bisect_left(bounds, hi)]
            cuts = [lo, *inner, hi]
            for a, b in zip(cuts, cuts[1:]):
                i = bisect.bisect_right(bounds, a) - 1
                cands = cover[i] if 0 <= i < len(bounds) - 1 and b <= bounds[i + 1] else []
                if not cands:
                    raise ValueError(f"rows {a}-{b} needed by device {dst} are held by no device")
                out.append(RowTransfer(pick_sender(cands, dst, devices_per_node), dst, (a, b)))
    return _merge_rows(out)


def _merge_rows(transfers: list[RowTransfer]) -> list[RowTransfer]:
    """Join adjacent row ranges between the same pair into one message."""
    out: list[RowTransfer] = []
    for t in transfers:
        prev = out[-1] if out else None
        if prev and (prev.src, prev.dst) == (t.src, t.dst) and prev.rows[1] == t.rows[0]:
            out[-1] = RowTransfer(t.src, t.dst, (prev.rows[0], t.rows[1]))
        else:
            out.append(t)
    return out
