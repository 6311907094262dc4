"""Memory per device: what each role keeps at home, what each call adds while it runs, the peak.

Assumptions (bytes per parameter ``P`` of a device's shard, see :func:`cost.stage_params`):

- **Home.** Every role keeps its weights (bf16, 2·P) on its home layout for the whole run: the
  layout of its train call, or else of its first call in topological order. A trained role
  also keeps bf16 gradients (2·P) and mixed-precision Adam state — fp32 master weights, first
  and second moments, 12·P — replicated over data-parallel ranks, 16·P in all, when the train
  call's layout has ``shard="none"`` (gradients all-reduced, a full optimizer on every
  replica). ``shard="optimizer"`` (ZeRO-1 / Megatron's distributed optimizer) splits the fp32
  state over the ``dp`` ranks: ``4 + 12/dp`` bytes per parameter (the gradients stay whole:
  backward accumulates into them before their reduce-scatter). ``shard="full"`` (ZeRO-3 /
  FSDP) splits weights, gradients and state alike: ``16/dp`` per parameter at home.
- **Offload** (``Layout.offload`` of a train call's home, :mod:`estimator.cost.offload` for
  its time). ``"optimizer"`` keeps the Adam state (the ``optimizer`` part above) in host memory
  while any call but the role's train call runs; ``"all"`` also the gradients and the bf16
  weights. During the train call every part is back on the devices. Under ``"all"`` another
  call of the role that reads the home on its own placement has the weights back while it
  runs, and one that reallocates has them back on the home's devices while it reallocates (a
  peak of its own: the uploaded weights beside the copy being received, before the call
  allocates its activations or KV pool).
- **Swapped frozen roles** (:func:`swapped_roles`). On a production stack whose generation
  engine shares devices with a trained role's home, a frozen role that only runs inference
  (the reference) keeps its weights in host memory and has them on its devices only while its
  call runs, as NeMo-RL keeps the reference's state dict on the CPU and swaps it into the
  policy for its log-probs (``use_reference_model``); :mod:`estimator.cost.engine` charges the
  copies. The policy's weights that the swap moves out meanwhile are still counted (an upper
  bound; under ``offload="all"`` none are resident then).
- **Reallocated copy.** A call on a layout other than its role's home holds its own bf16 copy
  of the shard (2·P) while it runs; the copy is dropped after it.
- **Activations** (Korthikanti et al. 2022, recounted for LLaMA blocks: RMSNorm, SwiGLU,
  grouped-query attention, FlashAttention so no ``a·s²`` term, no dropout, no sequence
  parallelism, bf16). Saved per token and layer: the inputs of both norms and of the q/k/v and
  gate/up projections, replicated over tensor-parallel ranks (8h bytes); Q, O (4h), K and V
  (4·kv) and the attention log-sum-exp (4a, fp32), split over ranks; gate and up outputs, their
  SiLU and product (8f), split. Per token per layer: ``8h + (4h + 4kv + 8f + 4a)/t`` bytes
  (LLaMA-2-7B, t=1: 37.5·h, against Korthikanti's 34·h for a GPT block). A GELU MLP saves
  fc1's output and its GELU (4f), a ReLU MLP only the ReLU's output (2f, which both its own
  backward and fc2's read); LayerNorm saves the same input as RMSNorm (its mean and inverse
  deviation are per token, negligible).
  Training under 1F1B keeps ``min(m, p − stage)`` micro-batches in flight on a stage (with
  activation recompute, ``recompute="full"``, only each block's input, ``2h`` bytes per token
  and layer, plus one block's full activations for one micro-batch during its backward:
  Korthikanti et al. 2022 §4.1, Megatron's ``--recompute-granularity full``); the last
  stage also holds fp32 log-probabilities over the gathered vocabulary, their gradient and the
  bf16 logits (10 bytes per token and vocabulary entry). Inference and prefill hold one layer's
  working set (the same per-layer count, one micro-batch) plus the head's logits.
- **KV cache** for generation: ``2·layers·(kv/t)·(prompt + gen)·2`` bytes per sequence for every
  sequence of the data-parallel rank (all micro-batches stay resident).
- **Gathered parameters** of a ``shard="full"`` train call (:func:`gathered_bytes`), while it
  runs: a stage's end parameters (embedding, final norm, head: gathered for the whole pass) and
  two blocks' (the one computing and the next, prefetched) as bf16 weights, and one block's —
  or the ends', whichever is larger — unsharded gradient before its reduce-scatter.

Calls on one device run one at a time, so a device's peak is its homes' resident bytes plus the
largest call (with what it brings back from host memory).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from estimator.cost.pieces import BF16, FP32, stage_params
from estimator.cost.rollout import check_pool, continuous, engine_tokens, kv_free_bytes
from estimator.spec.batching import PREFILL_TOKENS
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout, Plan, standing_copies
from estimator.spec.sharding import fullest_engine_rows, most_rows
from estimator.spec.stack import priced_stack
from estimator.spec.workflow import Call

GiB = float(1 << 30)
MLP_ACTIVATION_BYTES = {"swiglu": 8, "gelu": 4, "relu": 2}  # saved MLP bytes per token and unit of ffn


def fmt_bytes(n: float) -> str:
    """Bytes in GiB, or MiB / KiB when smaller."""
    for unit, size in (("GiB", GiB), ("MiB", float(1 << 20)), ("KiB", 1024.0)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
PARTS = ("weights", "grads", "optimizer", "realloc", "activations", "kv_cache")


def stage_param_counts(model: ModelSpec, layout: Layout) -> list[float]:
    """Parameters per device of each pipeline stage."""
    return list(_stage_param_counts(model, layout.tp, layout.pp))


@functools.lru_cache(maxsize=4096)
def _stage_param_counts(model: ModelSpec, tp: int, pp: int) -> tuple[float, ...]:
    """:func:`stage_param_counts` by what it depends on (the search asks for the same ones often)."""
    layout = Layout(DeviceMesh(0, tp * pp), 1, tp, pp)
    return tuple(stage_params(model, tp, pp, k, len(layout.stage_layers(model.layers, k))) for k in range(pp))


# Layout.offload → the parts of a trained home kept in host memory while other calls run
OFFLOADED = {"none": (), "optimizer": ("optimizer",), "all": ("optimizer", "grads", "weights")}


def state_bytes(model: ModelSpec, layout: Layout, trained: bool) -> list[dict[str, float]]:
    """Per stage: every byte of a role's state on each device of its home layout — weights,
    and for a trained role gradients and Adam state — split over the data-parallel ranks as
    the layout's ``shard`` says, wherever it is kept."""
    whole = 1 if layout.shard == "none" else layout.dp  # the optimizer state's split
    split = layout.dp if layout.shard == "full" else 1  # the weights' and gradients'
    out = []
    for p in stage_param_counts(model, layout):
        parts = {"weights": BF16 * p / split}
        if trained:
            parts["grads"] = BF16 * p / split
            parts["optimizer"] = 3 * FP32 * p / whole
        out.append(parts)
    return out


def offloaded_bytes(model: ModelSpec, layout: Layout, trained: bool) -> list[dict[str, float]]:
    """Per stage: the part of :func:`state_bytes` the home keeps in host memory while calls other
    than its train call run (``layout.offload``, :data:`OFFLOADED`); empty without offload."""
    keep = OFFLOADED[layout.offload] if trained else ()
    return [{k: v for k, v in parts.items() if k in keep} for parts in state_bytes(model, layout, trained)]


def home_bytes(model: ModelSpec, layout: Layout, trained: bool) -> list[dict[str, float]]:
    """Per stage: bytes a role keeps resident on each device of its home layout whatever call
    runs — its state (:func:`state_bytes`) less what it offloads (:func:`offloaded_bytes`)."""
    keep = OFFLOADED[layout.offload] if trained else ()
    return [{k: v for k, v in parts.items() if k not in keep} for parts in state_bytes(model, layout, trained)]


def restored_bytes(call: Call, model: ModelSpec, layout: Layout, home: Layout, trained: bool
                   ) -> list[dict[str, float]]:
    """Per stage of ``layout``: the offloaded bytes of ``call``'s role back on the devices while
    ``call`` runs — all of them for its train call (the home itself), the weights for another
    call of the role on the home's placement under ``offload="all"``, none otherwise."""
    if home.offload == "none" or not trained:
        return [{} for _ in range(layout.pp)]
    if call.kind == "train":
        return offloaded_bytes(model, home, trained)
    if home.offload == "all" and layout.same_placement(home):
        return [{"weights": parts["weights"]} for parts in offloaded_bytes(model, home, trained)]
    return [{} for _ in range(layout.pp)]


def source_bytes(model: ModelSpec, layout: Layout, home: Layout, trained: bool) -> dict[int, dict[str, float]]:
    """Device → bytes while a call on ``layout`` reallocates from a home that offloads its
    weights (``offload="all"``): the weights uploaded on the home's devices to be sent, and the
    copy arriving on the call's; empty when the home keeps its weights or the call does not
    reallocate."""
    if not trained or home.offload != "all" or layout.same_placement(home):
        return {}
    out: dict[int, dict[str, float]] = defaultdict(lambda: dict.fromkeys(PARTS, 0.0))
    for k, parts in enumerate(offloaded_bytes(model, home, trained)):
        for d in home.stage_devices(k):
            out[d]["weights"] += parts["weights"]
    for k, p in enumerate(stage_param_counts(model, layout)):
        for d in layout.stage_devices(k):
            out[d]["realloc"] += BF16 * p
    return dict(out)


def gathered_bytes(model: ModelSpec, layout: Layout, stage: int) -> dict[str, float]:
    """What a ``shard="full"`` train call gathers on a device of ``stage`` while it runs (see
    the module docstring): bf16 weights of the stage's ends and of two blocks, and one block's
    (or the ends') unsharded gradient; nothing for other layouts."""
    if not layout.sharded:
        return {}
    layers = len(layout.stage_layers(model.layers, stage))
    block = stage_params(model, layout.tp, layout.pp, stage, 1) - stage_params(model, layout.tp, layout.pp, stage, 0)
    ends = stage_params(model, layout.tp, layout.pp, stage, 0)
    return {"weights": BF16 * (ends + min(2, layers) * block), "grads": BF16 * max(block if layers else 0.0, ends)}


def activation_bytes_per_token_layer(model: ModelSpec, tp: int) -> float:
    """Saved activations of one block per token (see the module docstring; Q and O are a·d
    wide, and q/k norms save their inputs too)."""
    h, kv, f, a, q = model.hidden, model.kv_dim, model.ffn, model.heads, model.q_dim
    qk = 2 * (q + kv) if model.qk_norm else 0
    return 8 * h + (4 * q + 4 * kv + qk + MLP_ACTIVATION_BYTES[model.mlp] * f + 4 * a) / tp


def head_bytes(model: ModelSpec, tokens: float) -> float:
    """Logits of ``tokens`` positions on the last stage: bf16 gathered logits, fp32
    log-probabilities and their gradient (or a scalar per position for a value head)."""
    if model.head == "value":
        return 2 * FP32 * tokens
    return (BF16 + 2 * FP32) * tokens * model.vocab


def call_bytes(call: Call, model: ModelSpec, layout: Layout, at_home: bool,
               engine_bytes: float | None = None) -> list[dict[str, float]]:
    """Per stage: bytes ``call`` adds on each device while it runs.

    A generate call that runs as continuous-batching engines (:mod:`estimator.cost.rollout`)
    holds ``engine_bytes`` on each device (``kv_fraction`` of its memory): its weights, its
    activations and, in the rest, its KV pool — an unbounded amount when that pool cannot hold
    one request at the caps, so the layout never fits. Without ``engine_bytes`` the fixed-length
    rule stands: every sequence's KV resident."""
    w = call.workload
    rows = w.units_per_minibatch * (2 if w.paired else 1) // layout.dp  # sequences per dp rank and step
    if call.kind != "train":
        rows = most_rows(call, layout) if call.kind == "generate" else w.seqs // layout.dp
    mb = rows / layout.micro_batches  # sequences per micro-batch
    if call.kind == "generate":
        mb = fullest_engine_rows(call, layout)
    per_layer = activation_bytes_per_token_layer(model, layout.tp)
    out = []
    for k, p in enumerate(stage_param_counts(model, layout)):
        layers = len(layout.stage_layers(model.layers, k))
        last = k == layout.pp - 1
        parts = {"realloc": 0.0 if at_home else BF16 * p}
        if call.kind == "train":
            tokens = mb * w.seq_len
            in_flight = min(layout.micro_batches, layout.pp - k)
            saved = BF16 * model.hidden if layout.recompute == "full" else per_layer
            parts["activations"] = in_flight * tokens * (layers * saved + BF16 * model.hidden)
            # recompute: the block being back-propagated holds its full activations again
            parts["activations"] += tokens * per_layer if layout.recompute == "full" else 0.0
            parts["activations"] += head_bytes(model, tokens) if last else 0.0
        elif call.kind == "inference":
            tokens = mb * w.seq_len
            parts["activations"] = tokens * per_layer + (head_bytes(model, tokens) if last else 0.0)
        else:
            kv_per_seq = 2 * layers * (model.kv_dim / layout.tp) * w.seq_len * BF16
            parts["kv_cache"] = rows * kv_per_seq
            parts["activations"] = mb * w.prompt_len * per_layer + (head_bytes(model, mb) if last else 0.0)
        if layout.token_budget and call.kind != "generate":  # the largest micro-batch holds the budget
            tokens = layout.max_tokens_per_micro_batch
            if call.kind == "train":
                in_flight = min(max(1, rows * w.seq_len // tokens), layout.pp - k)
                saved = BF16 * model.hidden if layout.recompute == "full" else per_layer
                parts["activations"] = in_flight * tokens * (layers * saved + BF16 * model.hidden)
                parts["activations"] += tokens * per_layer if layout.recompute == "full" else 0.0
            else:
                parts["activations"] = tokens * per_layer
            parts["activations"] += head_bytes(model, tokens) if last else 0.0
        if call.kind == "train":
            parts.update(gathered_bytes(model, layout, k))
        out.append(parts)
    if engine_bytes is not None and math.isfinite(engine_bytes) and continuous(call, layout):
        # a prefill step batches at most PREFILL_TOKENS (one request of any length alone)
        prefill = min(mb * w.prompt_len, max(PREFILL_TOKENS, w.seq_len))
        for k, parts in enumerate(out):
            last = k == layout.pp - 1
            rows_in = min(mb, prefill / w.prompt_len)
            parts["activations"] = prefill * per_layer + (head_bytes(model, rows_in) if last else 0.0)
        acts = [parts["activations"] for parts in out]
        pool = engine_tokens(kv_free_bytes(model, layout, engine_bytes, acts), model, layout)
        fits = check_pool(w.prompt_len, w.gen_len, pool)
        for k, parts in enumerate(out):
            weights = BF16 * stage_param_counts(model, layout)[k]
            parts["kv_cache"] = max(engine_bytes - weights - parts["activations"], 0.0) if fits else math.inf
    return out


@dataclass(frozen=True)
class DeviceMemory:
    """The peak of one device and what makes it up."""

    device: int
    peak_bytes: float  # homes + the largest call
    call: str  # the call running at the peak ("" when none runs on the device)
    parts: dict[str, float] = field(default_factory=dict)  # PARTS → bytes at the peak
    phase: str = ""  # "reallocating": the peak is while the call receives its weights from an offloaded home

    @property
    def during(self) -> str:
        """The call at the peak, with its phase where the peak is not while it computes."""
        return f"{self.call} ({self.phase})" if self.phase else (self.call or "no call")


@dataclass(frozen=True)
class MemoryReport:
    capacity_bytes: float
    devices: tuple[DeviceMemory, ...]  # one per device of the cluster

    @property
    def peak(self) -> DeviceMemory:
        return max(self.devices, key=lambda d: (d.peak_bytes, -d.device))

    @property
    def over(self) -> list[DeviceMemory]:
        return [d for d in self.devices if d.peak_bytes > self.capacity_bytes]

    @property
    def feasible(self) -> bool:
        return not self.over

    def reasons(self) -> list[str]:
        """Why the plan does not fit: the worst device, with what fills it."""
        over = self.over
        if not over:
            return []
        worst = max(over, key=lambda d: (d.peak_bytes, -d.device))
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in worst.parts.items() if v > 0)
        msg = (f"predicted {fmt_bytes(worst.peak_bytes)} on device {worst.device} against "
               f"{fmt_bytes(self.capacity_bytes)} during {worst.during} ({parts})")
        if len(over) > 1:
            msg += f"; {len(over) - 1} more device(s) over capacity"
        return [msg]


def colocated(calls: dict[str, Call], layouts: dict[str, Layout], homes: dict[str, Layout],
              trained: Iterable[str]) -> bool:
    """Whether a generate call's devices overlap a trained role's home (the engine shares the
    training devices, NeMo-RL's ``colocated.enabled``)."""
    return any(c.kind == "generate" and layouts[n].mesh.overlaps(homes[r].mesh)
               for n, c in calls.items() for r in trained)


def swappable_roles(experiment: Experiment) -> frozenset[str]:
    """Frozen roles whose every call is an inference call (the reference, a reward model): the
    roles a production stack keeps in host memory when it shares devices with its engine."""
    wf = experiment.workflow
    trained = wf.trained_roles()
    return frozenset(r for r in wf.home_calls() if r not in trained
                     and all(c.kind == "inference" for c in wf.calls if c.role == r))


def swapped_roles(experiment: Experiment, plan: Plan, stack: str | None) -> frozenset[str]:
    """The :func:`swappable_roles` whose weights stay in host memory between their calls under
    ``plan`` priced for ``stack`` (None: this project's executor): all of them on a production
    stack whose engine shares devices with a trained role's home (:func:`colocated`), none
    elsewhere (:func:`estimator.cost.engine.inference_moves` charges the same swap)."""
    if not priced_stack(stack).production:
        return frozenset()
    wf = experiment.workflow
    homes = {r: plan[c] for r, c in wf.home_calls().items()}
    calls = {c.name: c for c in wf.calls}
    if not colocated(calls, {n: plan[n] for n in calls}, homes, wf.trained_roles()):
        return frozenset()
    return swappable_roles(experiment)


def swapped_in_bytes(model: ModelSpec, layout: Layout) -> list[dict[str, float]]:
    """Per stage: a swapped role's bf16 weights on its call's devices while the call runs."""
    return [{"weights": BF16 * p} for p in stage_param_counts(model, layout)]


def plan_memory(experiment: Experiment, plan: Plan, capacity_bytes: float, stack: str | None) -> MemoryReport:
    """Peak memory of every device under ``plan`` priced for ``stack`` (the profile's; None:
    this project's executor), a generation engine holding the experiment's ``kv_fraction`` of
    ``capacity_bytes``."""
    wf = experiment.workflow
    homes = wf.home_calls()
    trained = wf.trained_roles()
    static: dict[int, dict[str, float]] = defaultdict(lambda: dict.fromkeys(PARTS, 0.0))
    standing = standing_copies(wf, plan)  # rollout copies that stay between calls (asynchronous plans)
    swapped = swapped_roles(experiment, plan, stack)
    resident = [(role, call, role in trained) for role, call in homes.items() if role not in swapped]
    resident += [(wf[call].role, call, False) for call in sorted(standing)]
    for role, call, with_state in resident:
        layout = plan[call]
        for k, parts in enumerate(home_bytes(experiment.models[role], layout, with_state)):
            for d in layout.stage_devices(k):
                for key, v in parts.items():
                    static[d][key] += v
    best: dict[int, tuple[float, str, dict[str, float], str]] = {}

    def take(d: int, name: str, parts: dict[str, float], phase: str = "") -> None:
        total = sum(parts.values())
        if d not in best or total > best[d][0]:
            best[d] = (total, name, parts, phase)

    for name in wf.topological_order():
        call = wf[name]
        layout = plan[name]
        model = experiment.models[call.role]
        home = plan[homes[call.role]]
        at_home = name in standing or layout.same_placement(home)
        engine = experiment.kv_fraction * capacity_bytes
        back = restored_bytes(call, model, layout, home, call.role in trained)
        if call.role in swapped and at_home:
            back = swapped_in_bytes(model, layout)
        for k, parts in enumerate(call_bytes(call, model, layout, at_home, engine)):
            for key, v in back[k].items():
                parts[key] = parts.get(key, 0.0) + v
            for d in layout.stage_devices(k):
                take(d, name, parts)
        if name not in standing:  # a standing copy is fed by pushes, not reallocations
            for d, parts in source_bytes(model, layout, home, call.role in trained).items():
                take(d, name, parts, "reallocating")
    devices = []
    for d in range(experiment.cluster.num_devices):
        dyn, name, parts, phase = best.get(d, (0.0, "", {}, ""))
        merged = dict(static[d]) if d in static else dict.fromkeys(PARTS, 0.0)
        for key, v in parts.items():
            merged[key] += v
        devices.append(DeviceMemory(d, sum(merged.values()), name, merged, phase))
    return MemoryReport(capacity_bytes, tuple(devices))
