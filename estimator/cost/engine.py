"""The production stacks' own costs beyond their kernels: refit, the engine's sleep and wake, the
reference swap.

A production stack (:mod:`estimator.spec.stack`) moves weights around its calls, as NeMo-RL
v0.3.0 does when vLLM generation shares the training devices (``colocated.enabled``; the calls
of ``nemo_rl/algorithms/grpo.py`` are named below). Per device, with ``E`` the engine's bf16
weights (its shard of the generate layout), ``R`` the reference's and ``P`` the policy's bf16
weights resident on its home (:func:`estimator.cost.memory.home_bytes`):

=================  =====================================================  ================
when               what moves (host link: to host ↓, to device ↑)          charged as
=================  =====================================================  ================
before generating  the refit: the engine's weights wake E↑, every engine   the generate
                   device receives the whole model (links) and loads its   call's
                   shard (a local copy), ``refit.per_tensor_s`` per         reallocation
                   parameter tensor
end of generating  the engine sleeps (level 1): E↓                           the generate call
reference          ``use_reference_model``: P↓ where resident, the          the reference
log-probs          reference's weights R↑, then P↑ again                    inference call
=================  =====================================================  ================

The trainer's own state is not moved here: what it keeps in host memory, and when that moves,
is the layout's ``offload`` (:mod:`estimator.cost.offload`, which charges the time and
:mod:`estimator.cost.memory` the memory by one rule). NeMo-RL's ``offload_before_refit`` /
``offload_after_refit`` / ``prepare_for_lp_inference`` / ``prepare_for_training`` are a layout
with ``offload="all"`` there, not a second charge on the stack; a trainer whose layout offloads
nothing keeps its state on the devices beside the engine, in time and in memory alike.

Only where an engine shares devices with a trained role's home
(:func:`estimator.cost.memory.colocated`); a stack with its engine on devices of its own keeps
everything in place and pays the refit's links and per-tensor cost alone. The memory model
keeps the same books (:func:`estimator.cost.memory.swapped_roles`): a swapped-in reference
holds device memory only while its call runs. Host copies take :meth:`estimator.profile.profiles.Profile.host_copy_s`
on each device's own link (every device at once, so a stage's time is one device's).
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.cost.memory import home_bytes
from estimator.cost.pieces import BF16, stage_params
from estimator.cost.transfers import Pair, sharded_realloc_bytes
from estimator.profile.profiles import Profile
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import param_inventory
from estimator.spec.stack import priced_stack


@dataclass(frozen=True)
class Moves:
    """Host-side time a call pays around its kernels on a production stack, seconds."""

    before_s: float = 0.0  # before it computes, beside its reallocation (not part of its own time)
    inside_s: float = 0.0  # at the start of its compute window (part of its own time)
    after_s: float = 0.0  # at the end of its compute window (part of its own time)
    parts: tuple[tuple[str, float], ...] = ()  # (what, seconds) in order, for the timeline

    @property
    def own_s(self) -> float:
        return self.inside_s + self.after_s


NONE = Moves()


def production(profile: Profile) -> bool:
    """Whether ``profile`` prices a production stack (a serving engine, a production trainer)."""
    return priced_stack(profile.stack).production


def engine_bytes(model: ModelSpec, layout: Layout) -> float:
    """The engine's bf16 weights on its fullest device under ``layout``."""
    return max(BF16 * stage_params(model, layout.tp, layout.pp, k, len(layout.stage_layers(model.layers, k)))
               for k in range(layout.pp))


def resident_weights(model: ModelSpec, home: Layout) -> float:
    """The trainer's bf16 weights resident on its fullest stage's device between its calls (0
    where its layout offloads them, ``offload="all"``)."""
    return max(parts.get("weights", 0.0) for parts in home_bytes(model, home, trained=True))


def tensor_count(model: ModelSpec) -> int:
    """Parameter tensors of the model: what the refit gathers, converts and loads one by one."""
    return len(param_inventory(model))


def refit_pairs(model: ModelSpec, home: Layout, layout: Layout, devices_per_node: int,
                elem_bytes: int = BF16, gather_bytes: int = 0) -> dict[Pair, int]:
    """Bytes per (sender, receiver) pair of a production stack's refit: every device of the
    engine receives the whole model, gathered from the trainer's shards (NeMo-RL's
    ``get_weights_ipc_handles``: tensor-parallel all-gather, pipeline broadcast, DTensor
    ``full_tensor``) at ``gather_bytes`` per element (0: ``elem_bytes``; the stack's
    ``refit_bytes``), then loads its own shard into the engine's buffers at ``elem_bytes`` (a
    local copy, the ``(d, d)`` pairs)."""
    whole = Layout(layout.mesh, layout.mesh.size, 1, 1)
    out = dict(sharded_realloc_bytes(model, home, whole, devices_per_node, gather_bytes or elem_bytes))
    for k in range(layout.pp):
        shard = elem_bytes * stage_params(model, layout.tp, layout.pp, k, len(layout.stage_layers(model.layers, k)))
        for d in layout.stage_devices(k):
            out[(d, d)] = out.get((d, d), 0) + int(shard)
    return out


def refit_fixed_s(profile: Profile, model: ModelSpec) -> float:
    """The refit's fixed cost: ``refit.per_tensor_s`` per parameter tensor (0 without terms)."""
    terms = profile.terms
    return terms.refit_per_tensor_s * tensor_count(model) if terms is not None else 0.0


def _host(profile: Profile, parts: list[tuple[str, float, float]]) -> tuple[float, tuple[tuple[str, float], ...]]:
    """(seconds, (what, seconds) each) of host copies ``(what, to_host bytes, to_device bytes)``,
    one copy each way."""
    if profile.host_link is None:
        return 0.0, ()
    timed = tuple((what, profile.host_copy_s(down, 1, "download") + profile.host_copy_s(up, 1, "upload"))
                  for what, down, up in parts if down > 0 or up > 0)
    return sum(t for _, t in timed), timed


def generate_moves(profile: Profile, model: ModelSpec, layout: Layout, shares: bool) -> Moves:
    """The host copies of a generate call of a trained role whose engine shares its devices
    (``shares``): the engine's weights wake before it (with its reallocation), and it sleeps
    after it. The refit's links and per-tensor cost are :func:`refit_pairs` and
    :func:`refit_fixed_s`; the trainer's offload is its layout's (:mod:`estimator.cost.offload`)."""
    if not production(profile) or not shares:
        return NONE
    e = engine_bytes(model, layout)
    before, wake = _host(profile, [("wake engine weights", 0.0, e)])
    after, sleep = _host(profile, [("engine sleeps", e, 0.0)])
    return Moves(before, 0.0, after, wake + sleep)


def inference_moves(profile: Profile, model: ModelSpec, layout: Layout, trained: bool, shares: bool,
                    policy: tuple[ModelSpec, Layout] | None) -> Moves:
    """Host copies of an inference call on a colocated production stack: a frozen reference
    kept in host memory is swapped in for its call, the policy's weights (``policy``: the
    trained model and its home) out and back around it where they are resident (inside it).
    A trained role's own call moves nothing here (its layout's offload does)."""
    if not production(profile) or not shares or trained:
        return NONE
    ref = engine_bytes(model, layout)
    p = resident_weights(*policy) if policy is not None else 0.0
    t, parts = _host(profile, [("policy weights out", p, 0.0), ("reference weights in", 0.0, ref),
                               ("policy weights back", 0.0, p)])
    return Moves(inside_s=t, parts=parts)
