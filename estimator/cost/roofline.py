"""Lower bounds no plan can beat, and model FLOP utilisation.

Each call needs at least ``max(F/(N·peak), B/(N·bw))`` seconds of the whole cluster of ``N``
devices: its FLOPs ``F`` (:func:`estimator.cost.ops.call_flops`) at peak, and the bytes ``B`` it
must read from device memory at full bandwidth — for generation, every decode step reads all
weights once and every sequence's KV cache; otherwise the weights once. Calls of one iteration
share the cluster, so the sum over calls bounds the steady-state iteration time from below.
"""

from __future__ import annotations

import numpy as np

from estimator.cost.ops import call_flops
from estimator.cost.pieces import BF16
from estimator.profile.profiles import Profile
from estimator.spec.experiment import Experiment
from estimator.spec.models import ModelSpec
from estimator.spec.workflow import Call


def decode_bytes(call: Call, model: ModelSpec, lengths: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Bytes every decode step of a generate call must read, summed over its steps: the weights
    once a step (as many steps as the longest response needs) and each sequence's KV cache."""
    w = call.workload
    kv_token = 2 * model.layers * model.kv_dim * BF16  # K and V of one cached token
    if lengths is not None and w.lengths_vary:
        p, g = (np.asarray(x, dtype=float) for x in lengths)
        steps = g - 1
        return float(steps.max()) * model.bytes() + kv_token * float(np.sum(steps * p + steps * (steps + 1) / 2))
    steps = w.decode_steps
    # step t (1-based) attends prompt + t positions of each sequence
    kv = w.seqs * kv_token * (steps * w.prompt_len + steps * (steps + 1) / 2)
    return steps * model.bytes() + kv


def call_floor_s(call: Call, model: ModelSpec, profile: Profile, devices: int,
                 lengths: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    flops = call_flops(call, model, lengths) / (devices * profile.peak_flops)
    nbytes = decode_bytes(call, model, lengths) if call.kind == "generate" else float(model.bytes())
    return max(flops, nbytes / (devices * profile.mem_bandwidth_Bps))


def _lengths(experiment: Experiment) -> tuple[np.ndarray, np.ndarray] | None:
    """Iteration 0's drawn lengths where they vary (every iteration draws alike)."""
    return experiment.lengths(0) if experiment.params.variable else None


def roofline_s(experiment: Experiment, profile: Profile) -> float:
    """Lower bound on the iteration time of any plan for ``experiment`` on its cluster (with
    iteration 0's lengths where they are drawn)."""
    n, lengths = experiment.cluster.num_devices, _lengths(experiment)
    return sum(call_floor_s(c, experiment.models[c.role], profile, n, lengths) for c in experiment.workflow.calls)


def model_flops(experiment: Experiment) -> float:
    """FLOPs of one iteration's calls (no recompute; iteration 0's lengths where they are drawn)."""
    lengths = _lengths(experiment)
    return sum(call_flops(c, experiment.models[c.role], lengths) for c in experiment.workflow.calls)


def mfu(experiment: Experiment, profile: Profile, iteration_s: float) -> float:
    """Model FLOP utilisation of the whole cluster at ``iteration_s`` per iteration."""
    return model_flops(experiment) / (iteration_s * experiment.cluster.num_devices * profile.peak_flops)
