"""Layouts and plans: which devices and which parallel degrees each call runs with.

Rank order inside a mesh (Megatron's): tensor-parallel ranks are innermost and contiguous,
then data-parallel, then pipeline stages outermost::

    device = mesh.first + (pp_rank · dp + dp_rank) · tp + tp_rank

so a tensor-parallel group is ``tp`` neighbouring devices, inside a node exactly when tp
divides the mesh's devices on every node it spans (:meth:`Cluster.tp_problem`: on an aligned
mesh, when tp divides the devices per node; on ``0-11`` of nodes of 8, for tp 1, 2 or 4), and a
pipeline stage is ``dp·tp`` neighbouring devices, which may cross a node boundary anywhere.
Executor and estimator both use :meth:`Layout.device`.

Tensor parallelism across nodes is legal in Megatron (``--tensor-model-parallel-size`` larger
than the GPUs of a node; slow, but run, e.g. in vTrain's multi-node measurements) and a layout
may say so explicitly: ``tp_across_nodes`` lets ``tp`` be a multiple of the devices per node on
a mesh that starts at a node's first device, each tensor-parallel group then whole neighbouring
nodes, and the estimator prices its collectives on the inter-node links (:meth:`Layout.tp_span`).
Without the key such a layout is refused, and the planner's own space never proposes one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from estimator.base import rules
from estimator.base.errors import ConfigError, PlanInvalidError
from estimator.base.loading import load_json, parse_json
from estimator.base.tables import format_table
from estimator.spec.cluster import Cluster, DeviceMesh
from estimator.spec.models import ModelSpec
from estimator.spec.workflow import SYNC_LAG, Call, Workflow

if TYPE_CHECKING:
    from estimator.spec.experiment import Experiment

PLAN_FORMAT = "rlhf-plan/plan-v1"
MICRO_BATCH_CHOICES = (1, 2, 4, 8, 16, 32)
# Activation recompute of a train call (Megatron's --recompute-granularity full, method uniform):
# "none" keeps every block's activations for backward; "full" keeps only each block's input and
# re-runs the block's forward during its backward.
RECOMPUTE_CHOICES = ("none", "full")
# Data-parallel sharding of a train call's model state over its dp ranks: "none" replicates
# parameters, gradients and Adam state on every rank (gradients all-reduced); "optimizer" is
# ZeRO-1 / Megatron's distributed optimizer (Adam state and master weights split, gradients
# reduce-scattered, parameters all-gathered after the step); "full" is ZeRO-3 / FSDP
# (parameters, gradients and state split; each block's parameters all-gathered in forward and
# again in backward, its gradients reduce-scattered).
SHARD_CHOICES = ("none", "optimizer", "full")
# What a train call's home keeps in host memory while calls other than this train call run on
# its devices, named after what moves: "none" keeps everything on the device; "optimizer" the
# Adam state (fp32 master weights, first and second moments: verl's optimizer_offload,
# NeMo-RL's optimizer offload before a colocated refit); "all" the Adam state, the gradients and
# the bf16 parameters (verl's param_offload + optimizer_offload, DeepSpeed's offload_states
# under OpenRLHF's --ds.enable_sleep). Uploaded before the train call, downloaded after it;
# under "all" the parameters are also uploaded for each other call of the role that reads them.
OFFLOAD_CHOICES = ("none", "optimizer", "all")
# optional layout limits (0: unset) → the largest value a plan file may give
OPTIONAL_LIMITS = {"max_concurrency": rules.MAX_BATCH,
                   "max_tokens_per_micro_batch": rules.MAX_BATCH * rules.MAX_SEQ_TOKENS}


@dataclass(frozen=True, order=True)
class Layout:
    """A mesh and the (dp, tp, pp) degrees plus micro-batches a call runs with."""

    mesh: DeviceMesh
    dp: int  # data-parallel degree
    tp: int  # tensor-parallel degree
    pp: int  # pipeline stages
    micro_batches: int = 1  # per data-parallel rank and minibatch
    recompute: str = "none"  # activation recompute in a train call's backward (RECOMPUTE_CHOICES)
    # generate: requests each engine replica (data-parallel rank) runs at once, vLLM's
    # max_num_seqs, split evenly over its micro_batches virtual engines (max_concurrency //
    # micro_batches each, so at least micro_batches); 0: as many as the KV pool holds
    max_concurrency: int = 0
    # train/inference: tokens (prompt + response, padding included) per micro-batch and
    # data-parallel rank, rows packed in order until the next would pass it (verl's
    # ppo_max_token_len_per_gpu, AReaL's max_tokens_per_mb); 0: ``micro_batches`` equal splits
    max_tokens_per_micro_batch: int = 0
    shard: str = "none"  # train: data-parallel sharding of parameters, gradients, state (SHARD_CHOICES)
    offload: str = "none"  # train: the home state kept in host memory between train calls (OFFLOAD_CHOICES)
    # train/inference: tensor-parallel groups may span whole nodes (tp a multiple of the devices
    # per node, Megatron allows it); the default keeps every group inside one node
    tp_across_nodes: bool = False

    def __post_init__(self) -> None:
        bad = [
            f"{k}={getattr(self, k)!r}"
            for k in ("dp", "tp", "pp", "micro_batches")
            if not isinstance(getattr(self, k), int) or isinstance(getattr(self, k), bool)
            or getattr(self, k) < 1
        ]
        if bad:
            raise ConfigError(f"layout {', '.join(bad)}: degrees must be positive integers")
        if self.recompute not in RECOMPUTE_CHOICES:
            raise ConfigError(f"layout recompute={self.recompute!r}: must be one of {list(RECOMPUTE_CHOICES)}")
        if self.shard not in SHARD_CHOICES:
            raise ConfigError(f"layout shard={self.shard!r}: must be one of {list(SHARD_CHOICES)}")
        if self.offload not in OFFLOAD_CHOICES:
            raise ConfigError(f"layout offload={self.offload!r}: must be one of {list(OFFLOAD_CHOICES)}")
        if not isinstance(self.tp_across_nodes, bool):
            raise ConfigError(f"layout tp_across_nodes={self.tp_across_nodes!r}: must be true or false")
        bad = [f"{k}={getattr(self, k)!r}" for k in OPTIONAL_LIMITS
               if not isinstance(getattr(self, k), int) or isinstance(getattr(self, k), bool) or getattr(self, k) < 0]
        if bad:
            raise ConfigError(f"layout {', '.join(bad)}: must be a whole number, 0 for unset")

    @property
    def size(self) -> int:
        return self.dp * self.tp * self.pp

    def device(self, dp_rank: int, tp_rank: int, pp_rank: int) -> int:
        """Global device id of the rank with these coordinates."""
        return self.mesh.first + (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def coords(self, device: int) -> tuple[int, int, int]:
        """``(dp_rank, tp_rank, pp_rank)`` of a global device id in this layout."""
        local = device - self.mesh.first
        if not 0 <= local < self.size:
            raise ValueError(f"device {device} is not in layout mesh {self.mesh}")
        tp_rank = local % self.tp
        dp_rank = (local // self.tp) % self.dp
        return dp_rank, tp_rank, local // (self.tp * self.dp)

    @property
    def sharded(self) -> bool:
        """Whether each data-parallel rank holds only its ``1/dp`` of the parameters between
        passes (``shard="full"`` over more than one rank)."""
        return self.shard == "full" and self.dp > 1

    @property
    def placement(self) -> tuple[DeviceMesh, int, int, int, bool]:
        """Where the layout puts parameter shards and batch rows: the layout less micro-batches,
        recompute and the other options, which change how a call runs but not what each
        device holds — except full sharding. A ``shard="full"`` home keeps only ``1/dp`` of
        each stage's parameters on a device, so a call on the very same mesh and degrees that
        reads it (an inference or generate call, which never shards) must first gather the
        parameters: it reallocates, and the all-gather is that reallocation (every rank a
        destination). ``shard="optimizer"`` holds whole parameters on every rank after each
        step, so it places them as ``"none"`` does.

        ``offload`` is not part of the placement either: it changes whether a shard is in
        device memory while other calls run, not which device holds it. An offloaded shard
        comes back to the very device it left (host memory is the device's own, behind its
        host link), so a call on the same placement reads it there after the upload
        (:mod:`estimator.cost.offload`) and a call elsewhere reallocates from those devices, as
        from a home that never offloaded, once ``"all"`` has uploaded the parameters there."""
        return self.mesh, self.dp, self.tp, self.pp, self.sharded

    def same_placement(self, other: Layout) -> bool:
        """Whether ``other`` holds every shard and row where this layout does (no reallocation)."""
        return self.placement == other.placement

    def tp_span(self, devices_per_node: int) -> tuple[int, int]:
        """(ranks of one tensor-parallel group on each node, nodes the group spans): ``(tp, 1)``
        inside a node, ``(devices_per_node, tp / devices_per_node)`` for a group of whole nodes
        (``tp_across_nodes``, which validation allows only with ``tp`` a multiple of the node)."""
        if self.tp_across_nodes and self.tp > devices_per_node:
            return devices_per_node, -(-self.tp // devices_per_node)
        return self.tp, 1

    def stage_devices(self, pp_rank: int) -> range:
        """The ``dp·tp`` devices of pipeline stage ``pp_rank``, contiguous by the rank order."""
        block = self.dp * self.tp
        first = self.mesh.first + pp_rank * block
        return range(first, first + block)

    def stage_layers(self, layers: int, pp_rank: int) -> range:
        """Transformer blocks held by pipeline stage ``pp_rank`` (as even as possible, earlier
        stages take the remainder)."""
        base, extra = divmod(layers, self.pp)
        start = pp_rank * base + min(pp_rank, extra)
        return range(start, start + base + (1 if pp_rank < extra else 0))

    @property
    def token_budget(self) -> bool:
        """Whether micro-batches are cut by a token budget rather than counted."""
        return self.max_tokens_per_micro_batch > 0

    def to_dict(self) -> dict[str, Any]:
        out = {"mesh": str(self.mesh), "dp": self.dp, "tp": self.tp, "pp": self.pp,
               "micro_batches": self.micro_batches}
        out |= {"recompute": self.recompute} if self.recompute != "none" else {}
        out |= {"shard": self.shard} if self.shard != "none" else {}
        out |= {"offload": self.offload} if self.offload != "none" else {}
        out |= {"tp_across_nodes": True} if self.tp_across_nodes else {}
        return out | {k: getattr(self, k) for k in OPTIONAL_LIMITS if getattr(self, k)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "layout") -> Layout:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: must be an object with mesh, dp, tp, pp, micro_batches")
        allowed = {"mesh", "dp", "tp", "pp", "micro_batches", "recompute", "shard", "offload", "tp_across_nodes",
                   *OPTIONAL_LIMITS}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        missing = sorted({"mesh", "dp", "tp", "pp"} - set(data))
        if missing:
            raise ConfigError(f"{where}: missing key(s) {missing}")
        for k in ("dp", "tp", "pp", "micro_batches"):
            rules.integer(f"{where}.{k}", data.get(k, 1), lo=1, hi=rules.MAX_DEVICES if k != "micro_batches"
                          else rules.MAX_BATCH)
        recompute = data.get("recompute", "none")
        if recompute not in RECOMPUTE_CHOICES:
            raise ConfigError(f"{where}.recompute: {recompute!r} is not one of {list(RECOMPUTE_CHOICES)}")
        shard_mode = data.get("shard", "none")
        if shard_mode not in SHARD_CHOICES:
            raise ConfigError(f"{where}.shard: {shard_mode!r} is not one of {list(SHARD_CHOICES)}")
        offload = data.get("offload", "none")
        if offload not in OFFLOAD_CHOICES:
            raise ConfigError(f"{where}.offload: {offload!r} is not one of {list(OFFLOAD_CHOICES)}")
        try:
            mesh = DeviceMesh.parse(data["mesh"])
        except ConfigError as exc:
            raise ConfigError(f"{where}.mesh: {exc}") from None
        for k, hi in OPTIONAL_LIMITS.items():
            if k in data:
                rules.integer(f"{where}.{k}", data[k], lo=1, hi=hi)
        across = data.get("tp_across_nodes", False)
        if not isinstance(across, bool):
            raise ConfigError(f"{where}.tp_across_nodes: {across!r} must be true or false")
        return cls(mesh, data["dp"], data["tp"], data["pp"], data.get("micro_batches", 1), recompute,
                   shard=shard_mode, offload=offload, tp_across_nodes=across,
                   **{k: data[k] for k in OPTIONAL_LIMITS if k in data})


@dataclass(frozen=True)
class Plan:
    """call name → Layout."""

    layouts: dict[str, Layout]

    def __getitem__(self, call: str) -> Layout:
        return self.layouts[call]

    def __contains__(self, call: object) -> bool:
        return call in self.layouts

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT,
                           "calls": {c: lay.to_dict() for c, lay in self.layouts.items()}},
                          indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> Plan:
        return cls.from_data(parse_json(text, where, expect=None), where)

    @classmethod
    def from_data(cls, data: Any, where: str = "plan") -> Plan:
        if not isinstance(data, dict) or not isinstance(data.get("calls"), dict):
            raise ConfigError(f"{where}: must be a JSON object with a 'calls' object")
        unknown = sorted(set(data) - {"format", "calls"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: ['calls', 'format']")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise ConfigError(f"{where}: format={data['format']!r}, expected {PLAN_FORMAT!r}")
        return cls({c: Layout.from_dict(v, f"{where}: calls.{c}") for c, v in data["calls"].items()})

    @classmethod
    def load(cls, path: str) -> Plan:
        return cls.from_data(load_json(path, "plan file", expect=None), where=f"plan {path}")

    def table(self) -> str:
        """A readable table of the plan (a recompute, shard or offload column when any layout sets one)."""
        extra = any(lay.recompute != "none" for lay in self.layouts.values())
        sharding = any(lay.shard != "none" for lay in self.layouts.values())
        offloading = any(lay.offload != "none" for lay in self.layouts.values())
        across = any(lay.tp_across_nodes for lay in self.layouts.values())
        limits = [k for k in OPTIONAL_LIMITS if any(getattr(lay, k) for lay in self.layouts.values())]
        rows = [("call", "mesh", "devices", "dp", "tp", "pp", "micro_batches") + (("recompute",) if extra else ())
                + (("shard",) if sharding else ()) + (("offload",) if offloading else ())
                + (("tp_across_nodes",) if across else ()) + tuple(limits)]
        rows += [(c, str(lay.mesh), str(lay.mesh.size), str(lay.dp), str(lay.tp), str(lay.pp),
                  str(lay.micro_batches)) + ((lay.recompute,) if extra else ()) + ((lay.shard,) if sharding else ())
                 + ((lay.offload,) if offloading else ())
                 + (("yes" if lay.tp_across_nodes else "-",) if across else ())
                 + tuple(str(getattr(lay, k) or "-") for k in limits) for c, lay in self.layouts.items()]
        return format_table(rows)


def standing_copies(workflow: Workflow, plan: Plan) -> frozenset[str]:
    """Generate calls that keep a standing rollout copy of the actor: asynchronous ones (their
    version edge lags more than one iteration) on a mesh that shares no device with the actor's
    home. Such a call never reallocates: after each update the trainer pushes the new weights
    to its copy (a weight-push instance, :mod:`estimator.sim.instances`), and the copy stays on
    its devices between calls. Synchronous plans have none, so they run exactly as before."""
    if not workflow.asynchronous:
        return frozenset()
    homes = workflow.home_calls()
    return frozenset(c.name for c in workflow.calls
                     if workflow.lag(c.name) > SYNC_LAG and not plan[c.name].mesh.overlaps(plan[homes[c.role]].mesh))


def layout_problems(call: Call, model: ModelSpec, cluster: Cluster, layout: Layout) -> list[str]:
    """Every rule ``layout`` breaks for ``call`` (empty: valid). Memory is the estimator's."""
    problem = _batch_problem(call, layout)
    return _shape_problems(call, model, cluster, layout) + ([problem] if problem else [])


def _shape_problems(call: Call, model: ModelSpec, cluster: Cluster, layout: Layout) -> list[str]:
    """The rules on mesh and degrees (all but the batch split, the only one micro-batches change)."""
    return _mesh_problems(call, cluster, layout) + _degree_problems(call, model, layout)


def _mesh_problems(call: Call, cluster: Cluster, layout: Layout) -> list[str]:
    """The rules that depend on where the mesh lies: in the cluster, its size the degrees'
    product, tensor-parallel groups inside nodes (:meth:`Cluster.tp_problem`)."""
    name = call.name
    out = [f"call {name}: {p}" for p in cluster.mesh_problems(layout.mesh)]
    if layout.size != layout.mesh.size:
        out.append(f"call {name}: dp·tp·pp = {layout.dp}·{layout.tp}·{layout.pp} = {layout.size} "
                   f"must equal mesh {layout.mesh} size {layout.mesh.size}")
    return out + _span_problems(call, cluster, layout)


def _span_problems(call: Call, cluster: Cluster, layout: Layout) -> list[str]:
    """Where tensor-parallel groups may lie: inside nodes (:meth:`Cluster.tp_problem`), or —
    ``tp_across_nodes`` — over whole neighbouring nodes (tp a multiple of the devices per node,
    the mesh starting at a node's first device) for a train or inference call."""
    name, tp, dpn = call.name, layout.tp, cluster.devices_per_node
    span = cluster.tp_problem(layout.mesh, tp)
    whole = tp % dpn == 0 and layout.mesh.first % dpn == 0
    if not layout.tp_across_nodes:
        hint = ("; or the layout may say tp_across_nodes: true (Megatron allows it; its collectives then "
                "cross the inter-node links)") if span and whole else ""
        return [f"call {name}: {span}{hint}"] if span else []
    if call.kind == "generate":
        return [f"call {name}: tp_across_nodes applies to train and inference calls only, not to this generate "
                "call (the rollout model prices tensor-parallel collectives inside a node)"]
    if span is None:
        return [f"call {name}: tp_across_nodes with tp={tp}, whose groups stay inside nodes of {dpn} devices on "
                f"mesh {layout.mesh}: leave tp_across_nodes unset"]
    if not whole:
        return [f"call {name}: tp={tp} with tp_across_nodes must be a multiple of the {dpn} devices per node on a "
                f"mesh starting at a node's first device (mesh {layout.mesh}), so that each tensor-parallel group "
                "is whole nodes"]
    return []


def _degree_problems(call: Call, model: ModelSpec, layout: Layout) -> list[str]:
    """The rules on degrees and options that hold wherever the mesh lies."""
    name = call.name
    out = []
    for dim in ("heads", "kv_heads", "ffn", "vocab"):
        value = getattr(model, dim)
        if value % layout.tp:
            out.append(f"call {name}: tp={layout.tp} must divide {dim}={value} of model {model.name}")
    if layout.pp > model.layers:
        out.append(f"call {name}: pp={layout.pp} exceeds layers={model.layers} of model {model.name}")
    if layout.max_concurrency and call.kind != "generate":
        out.append(f"call {name}: max_concurrency={layout.max_concurrency} applies to generate calls only, "
                   f"not to this {call.kind} call")
    if call.kind == "generate" and 0 < layout.max_concurrency < layout.micro_batches:
        out.append(f"call {name}: max_concurrency={layout.max_concurrency} is below micro_batches="
                   f"{layout.micro_batches}: the cap is split evenly over a replica's virtual engines "
                   f"(max_concurrency // micro_batches each), so each needs at least one request")
    if layout.token_budget and call.kind == "generate":
        out.append(f"call {name}: max_tokens_per_micro_batch={layout.max_tokens_per_micro_batch} applies to "
                   "train and inference calls only, not to this generate call (use max_concurrency)")
    if layout.recompute != "none" and call.kind != "train":
        out.append(f"call {name}: recompute={layout.recompute!r} applies to train calls only, "
                   f"not to this {call.kind} call (use recompute='none')")
    if layout.shard != "none" and call.kind != "train":
        out.append(f"call {name}: shard={layout.shard!r} applies to train calls only, "
                   f"not to this {call.kind} call (use shard='none')")
    if layout.offload != "none" and call.kind != "train":
        out.append(f"call {name}: offload={layout.offload!r} applies to train calls only (it moves the trained "
                   f"role's state between its train calls), not to this {call.kind} call (use offload='none')")
    if layout.sharded and model.tied_embeddings and layout.pp > 1:
        out.append(f"call {name}: shard='full' with pp={layout.pp} and the tied embeddings of model {model.name}: "
                   "the two copies of a tied embedding sum their gradients once per step, which a "
                   "per-micro-batch reduce-scatter cannot; use pp=1 or shard='optimizer'")
    return out


def _batch_splits(call: Call, dp: int, micro_batches: int) -> bool:
    """Whether each optimizer step's batch splits evenly into dp·micro_batches pieces."""
    return call.workload.units_per_minibatch % (dp * micro_batches) == 0


def _budget_problem(call: Call, layout: Layout) -> str | None:
    """A token budget needs the batch split over dp alone and room for the longest row (a pair
    for paired data)."""
    w, budget = call.workload, layout.max_tokens_per_micro_batch
    unit = "pairs" if w.paired else "sequences"
    if layout.micro_batches != 1:
        return (f"call {call.name}: micro_batches={layout.micro_batches} with max_tokens_per_micro_batch="
                f"{budget}: the budget cuts the micro-batches; leave micro_batches at 1")
    if w.units_per_minibatch % layout.dp:
        return (f"call {call.name}: batch of {w.units_per_minibatch} {unit} per minibatch is not divisible by "
                f"dp = {layout.dp}")
    longest = w.seq_len * (2 if w.paired else 1)
    if budget < longest:
        return (f"call {call.name}: max_tokens_per_micro_batch={budget} is below the longest "
                f"{'pair' if w.paired else 'row'}, {longest} tokens (prompt_len + gen_len at their caps)")
    return None


def _batch_problem(call: Call, layout: Layout) -> str | None:
    if layout.token_budget:
        return _budget_problem(call, layout)
    if call.kind == "generate":  # engines share the requests unevenly; each needs one
        engines = layout.dp * layout.micro_batches
        if call.workload.seqs < engines:
            return (f"call {call.name}: {call.workload.seqs} sequences cannot give each of dp·micro_batches = "
                    f"{layout.dp}·{layout.micro_batches} = {engines} engines a request")
        return None
    if _batch_splits(call, layout.dp, layout.micro_batches):
        return None
    w = call.workload
    unit = "pairs" if w.paired else "sequences"
    step = f"per minibatch ({w.minibatches} minibatches)" if w.minibatches > 1 else ""
    split = layout.dp * layout.micro_batches
    return (f"call {call.name}: batch of {w.units_per_minibatch} {unit} {step} is not divisible by "
            f"dp·micro_batches = {layout.dp}·{layout.micro_batches} = {split}".replace("  ", " "))


def validate(plan: Plan, experiment: Experiment) -> list[str]:
    """Every violated rule of ``plan`` for ``experiment``, each naming call, value and rule."""
    wf = experiment.workflow
    out = [f"call {c}: unknown call; the {wf.algorithm} workflow has {list(wf.call_names)}"
           for c in plan.layouts if c not in wf]
    out += [f"call {c}: missing from the plan" for c in wf.call_names if c not in plan]
    for c in wf.call_names:
        if c in plan:
            call = wf[c]
            out += layout_problems(call, experiment.models[call.role], experiment.cluster, plan[c])
    return out


def check(plan: Plan, experiment: Experiment) -> Plan:
    """``plan`` if valid; otherwise raise :class:`PlanInvalidError` with every message."""
    problems = validate(plan, experiment)
    if problems:
        raise PlanInvalidError(problems)
    return plan


def divisors(n: int) -> list[int]:
    """Divisors of ``n`` in increasing order (trial division up to √n)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _degrees(size: int, model: ModelSpec, cluster: Cluster) -> list[tuple[int, int, int]]:
    """(dp, tp, pp) with dp·tp·pp = size, by tp then pp, skipping degrees that can never be valid
    (tp above a node, pp above the layer count) so large clusters stay cheap."""
    out = []
    for tp in divisors(size):
        if tp > cluster.devices_per_node:
            break
        rest = size // tp
        out += [(rest // pp, tp, pp) for pp in range(1, min(rest, model.layers) + 1) if rest % pp == 0]
    return out


def recompute_choices(call: Call) -> tuple[str, ...]:
    """The recompute settings a layout of ``call`` may have: all for a train call, else none."""
    return RECOMPUTE_CHOICES if call.kind == "train" else ("none",)


def offload_choices(call: Call) -> tuple[str, ...]:
    """The offload settings a layout of ``call`` may have: all for a train call, else none."""
    return OFFLOAD_CHOICES if call.kind == "train" else ("none",)


def shard_choices(call: Call, model: ModelSpec, dp: int, pp: int) -> tuple[str, ...]:
    """The data-parallel sharding a layout of ``call`` with ``dp`` and ``pp`` may have and the
    planner offers: every choice for a train call over more than one replica (less full
    sharding where tied embeddings span a pipeline, see :func:`layout_problems`), else none
    (with one replica sharding changes nothing)."""
    if call.kind != "train" or dp <= 1:
        return ("none",)
    if model.tied_embeddings and pp > 1:
        return tuple(c for c in SHARD_CHOICES if c != "full")
    return SHARD_CHOICES


def enumerate_layouts(call: Call, model: ModelSpec, cluster: Cluster, uneven: bool = False) -> list[Layout]:
    """Every valid layout of ``call``: each mesh (:meth:`Cluster.meshes`, every contiguous run
    with ``uneven``) × (dp, tp, pp) × micro-batch choice (× recompute setting × data-parallel
    sharding × offload for a train call, :func:`shard_choices`, :func:`offload_choices`)."""
    out = []
    for mesh in cluster.meshes(uneven):
        for dp, tp, pp in _degrees(mesh.size, model, cluster):
            for mb in MICRO_BATCH_CHOICES:
                lay = Layout(mesh, dp, tp, pp, mb)
                if not layout_problems(call, model, cluster, lay):
                    out += [Layout(mesh, dp, tp, pp, mb, rc, shard=sh, offload=off)
                            for sh in shard_choices(call, model, dp, pp) for rc in recompute_choices(call)
                            for off in offload_choices(call)]
    return out


def count_layouts(call: Call, model: ModelSpec, cluster: Cluster, uneven: bool = False) -> int:
    """``len(enumerate_layouts(...))``, computed without listing them.

    Where the mesh lies matters only to whether tensor-parallel groups stay inside nodes, so
    per tp the meshes of each size on which they do are counted (:meth:`Cluster.tp_mesh_counts`),
    each (tp, pp) is checked once against the rules that hold wherever the mesh lies, and the
    batch rule is arithmetic over all sizes at once."""
    per_step = call.workload.units_per_minibatch
    total = 0
    for tp in range(1, cluster.devices_per_node + 1):
        counts = {size: n for size, n in cluster.tp_mesh_counts(tp, uneven).items() if n and size % tp == 0}
        if not counts:
            continue
        sizes = np.fromiter(counts, dtype=np.int64, count=len(counts))
        meshes = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
        for pp in range(1, model.layers + 1):
            where = np.flatnonzero(sizes % (tp * pp) == 0)
            if where.size == 0 or _degree_problems(call, model, Layout(DeviceMesh(0, tp * pp), 1, tp, pp)):
                continue
            dp = sizes[where] // (tp * pp)
            if call.kind == "generate":  # engines share requests unevenly: one each is the rule
                splits = sum((call.workload.seqs >= dp * mb).astype(np.int64) for mb in MICRO_BATCH_CHOICES)
            else:
                splits = sum((per_step % (dp * mb) == 0).astype(np.int64) for mb in MICRO_BATCH_CHOICES)
            sharding = np.where(dp > 1, len(shard_choices(call, model, 2, pp)), 1)  # only over replicas
            total += int((splits * meshes[where] * sharding).sum())
    # recompute and offload are valid wherever their layout is
    return total * len(recompute_choices(call)) * len(offload_choices(call))
