"""Which profile prices an experiment, for which software stack.

An experiment names its device (``cluster.device``, a profile) and, optionally, the stack it
will run on (``cluster.stack``: ``executor``, ``megatron-vllm`` or ``fsdp-vllm``,
:mod:`estimator.spec.stack`). Without one, a GPU experiment is priced on the production stack
``megatron-vllm`` and a CPU one (a profile whose run dtype is float32: this project's executor
on the host) on ``executor``; a command's ``--stack`` overrides both.

A profile *prices* a stack when its figures are for that stack's kernels and it holds the
stack's own numbers: the ``executor`` stack needs a profile of the executor's op census
(``compute.ops: executor``); a production stack a profile with ``stacks.<name>`` terms. When
the named profile does not, the shipped profile of the same device (the same ``device``
string; the shortest name first) that does is taken, and every output says so — ``h100-sxm`` (the eager executor's
census on the H100 datasheet) gives way to ``h100-rl`` (vidur's measured fused kernels with
the production stacks' terms) for ``megatron-vllm``. Where no profile of the device prices a
production stack, the named one is used with the fused census and without engine, refit or
trainer terms (a datasheet device such as ``h20``: kernels, links and host copies only), and
the output says that too. The executor stack on a device no executor profile describes is an
error naming the profiles that exist.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from estimator.base.errors import ConfigError
from estimator.profile.profiles import PROFILE_DIR, Profile, load_profile
from estimator.spec.experiment import Experiment
from estimator.spec.stack import DEFAULT_GPU_STACK, EXECUTOR, STACK_NAMES, get_stack, priced_stack

__all__ = ["STACK_NAMES", "default_stack", "experiment_profile", "for_stack", "prices", "resolve"]


def default_stack(profile: Profile) -> str:
    """The stack a profile's experiments are priced on when they name none: the executor on a
    CPU profile (float32: this project's executor runs there), a production stack on a GPU."""
    return EXECUTOR if profile.dtype == "float32" else DEFAULT_GPU_STACK


def prices(profile: Profile, stack: str) -> bool:
    """Whether ``profile``'s figures and numbers are for ``stack`` (see the module docstring)."""
    if stack == EXECUTOR:
        return profile.ops == "executor"
    return stack in profile.stacks


def _has_fused_kernels(doc: dict) -> bool:
    compute = doc.get("compute") if isinstance(doc.get("compute"), dict) else {}
    return compute.get("ops", "executor") == "fused"


def _same_device(profile: Profile, wanted) -> Profile | None:  # noqa: ANN001 (a predicate on the document)
    """The shipped profile of ``profile``'s device whose document ``wanted`` accepts, the
    shortest name first (a derived profile's name extends its base's: ``a100-vidur`` before
    ``a100-vidur-vtrain``), then by name."""
    for path in sorted(PROFILE_DIR.glob("*.json"), key=lambda p: (len(p.stem), p.stem)):
        if path.stem == profile.name:
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("device") == profile.device and wanted(doc):
            return load_profile(path)
    return None


def _choose(profile: Profile, name: str, key: str) -> tuple[Profile, str]:
    """The profile that prices ``name`` and why it is not ``profile`` (see the module docstring):
    for a production stack, one with its numbers, else one with measured fused kernels."""
    if prices(profile, name):
        return profile, ""
    if name == EXECUTOR:
        other = _same_device(profile, lambda doc: not _has_fused_kernels(doc))
        if other is None:
            raise ConfigError(f"{key}={name!r}: profile {profile.name}'s figures are for fused kernels "
                              f"(compute.ops={profile.ops}) and no shipped profile of its device "
                              f"({profile.device}) has the executor's; give one with --profile")
        return other, (f"profile {profile.name} has figures for fused kernels, not for the executor's aten ops, "
                       f"so {other.name}, of the same device, prices it")
    other = _same_device(profile, lambda doc: name in (doc.get("stacks") or {}))
    if other is not None:
        return other, (f"profile {profile.name} has no numbers for the stack's engine, refit and trainer, "
                       f"so {other.name}, of the same device, prices it")
    if profile.ops == "fused":
        return profile, ""
    other = _same_device(profile, _has_fused_kernels)
    if other is not None:
        return other, (f"profile {profile.name} has figures for the executor's aten ops, so {other.name}, "
                       "of the same device, prices the fused kernels")
    return profile, ""


def for_stack(profile: Profile, stack: str | None = None, key: str = "cluster.stack") -> Profile:
    """``profile`` priced for ``stack`` (None: :func:`default_stack`): the profile itself or the
    shipped profile of its device that prices the stack, with the stack's op census and its
    numbers; ``Profile.stack_note`` says why another profile was taken."""
    name = stack if stack is not None else default_stack(profile)
    info = get_stack(name, key)
    chosen, note = _choose(profile, name, key)
    return dataclasses.replace(chosen, ops=info.ops, stack=name, stack_note=note)


def resolve(device: str | Path, stack: str | None = None, profile: str | Path | None = None,
            stack_flag: str | None = None) -> Profile:
    """The profile an experiment is priced on: ``profile`` (a ``--profile`` argument) or the
    experiment's ``device``, for ``stack_flag`` (a ``--stack`` argument) or the experiment's
    ``stack`` (``cluster.stack``; None: the default for the device)."""
    base = load_profile(profile, key="--profile") if profile is not None else load_profile(device, key="cluster.device")
    key = "--stack" if stack_flag is not None else "cluster.stack"
    return for_stack(base, stack_flag if stack_flag is not None else stack, key)


def experiment_profile(experiment, profile: str | Path | None = None, stack: str | None = None) -> Profile:  # noqa: ANN001
    """:func:`resolve` for an :class:`~estimator.spec.experiment.Experiment` and a command's
    ``--profile`` and ``--stack`` (None: the experiment's)."""
    return resolve(experiment.cluster.device, experiment.stack, profile, stack)


def micro_batching(experiment: Experiment, profile: Profile) -> str:
    """How the trainer of ``experiment`` cuts micro-batches on ``profile``'s stack: the
    experiment's ``cluster.micro_batching``, else the stack's. The executor pads rows in order
    and nothing else, so a plan priced for it cannot say otherwise."""
    stack = priced_stack(profile.stack)
    if experiment.micro_batching is None:
        return stack.micro_batching
    if not stack.production and experiment.micro_batching != "padded":
        raise ConfigError(f"cluster.micro_batching={experiment.micro_batching}: this project's executor pads "
                          "micro-batches in row order (padded); packed and dynamic are a production stack's "
                          "(cluster.stack: megatron-vllm or fsdp-vllm)")
    return experiment.micro_batching
