"""Offload of a trained role's state to host memory (``Layout.offload``): when it moves, how
many bytes and copies, and how long that takes on the profile's host link.

What stays off the device while other calls run is :func:`estimator.cost.memory.offloaded_bytes`:
under ``"optimizer"`` the Adam state (fp32 master weights, first and second moments), under
``"all"`` also the gradients and the bf16 weights. Per call instance, on every device of a
stage (the slowest stage sets the pace; the devices of a stage move the same bytes in
parallel, each on its own host link — a GPU's PCIe link; contention for the host's memory
bandwidth between the devices of one node is not modelled):

- **the role's train call**: before it, the *upload* of the offloaded Adam state (and, under
  ``"all"``, the weights); after its last optimizer step, the *download* of the same, updated.
  Gradients are never moved: they are dead between train calls (the executor, like DeepSpeed
  and FSDP with ``zero_grad(set_to_none=True)``, frees them after each step and allocates them
  again in the next backward), so ``"all"`` frees them instead of copying them. verl and
  DeepSpeed's ``offload_states`` also copy the gradient buffer, 2 of the 14–16 bytes per
  parameter that move: what this model leaves out of those frameworks' transfer time.
- **another call of the role, under ``"all"``**: the weights it reads are uploaded first — on
  the call's own devices, before it computes, when it runs on the home's placement; on the
  home's devices, before they send, when it reallocates — and dropped after it: the host copy
  is still current, so nothing comes back.
- **calls of other roles**: nothing.

What overlaps: nothing. The frameworks load the state before the train step and offload it
after, waiting for the copies (verl's ``load_fsdp_optimizer`` / ``offload_fsdp_optimizer`` around
``update_actor``, DeepSpeed's ``reload_states`` / ``offload_states``, NeMo-RL's
``offload_before_refit``), so the transfers sit on the critical path of the call's devices: the
upload between the inputs' arrival and the first computation (every stage starts once the
slowest stage has its state), the download after every stage's last step (the call ends when the
slowest stage has sent its state back). The evaluator adds them to the call's duration, the
simulator books them as ``offload`` spans (:mod:`estimator.sim.simulator`).

One copy per tensor, as the frameworks and the executor move them: per parameter tensor of a
stage (per flat group under ``shard="full"``, :func:`estimator.spec.sharding.shard_groups`; one
flat chunk under ``shard="optimizer"``) one copy of the weights and three of the Adam state
(master weights, two moments), each at :meth:`~estimator.profile.profiles.Profile.host_copy_s`
(an upload at the host link's host → device rate, a download at its device → host rate).

On a production stack this is the trainer's offload, the only one: NeMo-RL's colocated
``offload_before_refit`` / ``offload_after_refit`` are ``offload="all"`` here, and
:mod:`estimator.cost.engine` charges the serving engine's own sleep and wake beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from estimator.cost.memory import offloaded_bytes
from estimator.profile.profiles import Profile
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import shard, shard_groups
from estimator.spec.workflow import Call

ADAM_TENSORS = 3  # per parameter tensor: fp32 master weights, first and second moments


@dataclass(frozen=True)
class OffloadCost:
    """Host transfers of one call instance (seconds; 0 where nothing moves)."""

    upload_s: float = 0.0  # on the call's devices, after its inputs arrive and before it computes
    download_s: float = 0.0  # on the call's devices, after its last stage is done
    source_s: float = 0.0  # on the home's devices, before they send the weights of a reallocation

    @property
    def any(self) -> bool:
        return self.upload_s > 0 or self.download_s > 0 or self.source_s > 0


NONE = OffloadCost()


def stage_tensors(model: ModelSpec, layout: Layout, stage: int) -> int:
    """Tensors one device of ``stage`` holds of the role's parameters: one per parameter, or
    one flat chunk per group where the layout shards them (``shard="full"``)."""
    device = layout.device(0, 0, stage)
    return len(shard_groups(model, layout, device)) if layout.sharded else len(shard(model, layout, device))


def _adam_tensors(model: ModelSpec, layout: Layout, stage: int) -> int:
    """Adam state tensors of one device: per parameter tensor, or per flat chunk (``shard="optimizer"``
    steps one chunk of every parameter, ``"full"`` one per group)."""
    chunks = 1 if layout.shard == "optimizer" and layout.dp > 1 else stage_tensors(model, layout, stage)
    return ADAM_TENSORS * chunks


def moved(model: ModelSpec, home: Layout, trained: bool, weights_only: bool) -> list[tuple[float, int]]:
    """Per stage of ``home``: (bytes, copies) one device moves in one direction — the offloaded
    Adam state and, under ``"all"``, weights (``weights_only``: the weights alone, for a call that
    reads them); gradients never move (see the module docstring)."""
    out = []
    for k, parts in enumerate(offloaded_bytes(model, home, trained)):
        nbytes, copies = 0.0, 0
        if "weights" in parts:
            nbytes, copies = parts["weights"], stage_tensors(model, home, k)
        if "optimizer" in parts and not weights_only:
            nbytes, copies = nbytes + parts["optimizer"], copies + _adam_tensors(model, home, k)
        out.append((nbytes, copies))
    return out


def offload_cost(call: Call, model: ModelSpec, layout: Layout, home: Layout, trained: bool,
                 profile: Profile) -> OffloadCost:
    """The host transfers of ``call`` on ``layout`` whose role's home is ``home`` (see the module
    docstring)."""
    if home.offload == "none" or not trained:
        return NONE
    if call.kind == "train":
        state = moved(model, home, trained, weights_only=False)
        return OffloadCost(upload_s=max(profile.host_copy_s(b, n, "upload") for b, n in state),
                           download_s=max(profile.host_copy_s(b, n, "download") for b, n in state))
    if home.offload != "all":
        return NONE
    slowest = max(profile.host_copy_s(b, n, "upload") for b, n in moved(model, home, trained, weights_only=True))
    if layout.same_placement(home):
        return OffloadCost(upload_s=slowest)
    return OffloadCost(source_s=slowest)
