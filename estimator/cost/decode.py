"""Decoding on a pipeline: a generate call's decode steps on each stage, grouped into chunks.

Decoding interleaves micro-batches through the stages (the executor's order): a step of
micro-batch j enters stage 0 once its previous token came back from the last stage. With
per-micro-batch stage times ``d_k`` and sends ``s_k`` (``s_{p−1}`` the token fed back), one
step of all ``m`` micro-batches — a round — takes the max-plus cycle time
``R = max(m·max_k d_k, Σ_k (d_k + s_k))``: either the busiest stage or one token's round trip
limits it. A chunk of steps occupies each stage for the sum of its rounds (the final round
ends after ``m·d_k``); the next stage starts a chunk one micro-batch (``d_k + s_k``) after the
previous one. This is exact for equal stages and constant step times; KV growth enters
exactly, step by step. Every sequence decodes :attr:`~estimator.spec.workflow.Workload.decode_steps`
steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estimator.cost.pieces import INT64, decode_stage
from estimator.cost.transfers import link_class, stage_send
from estimator.profile.profiles import Profile
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.workflow import Call

MAX_DECODE_CHUNKS = 8  # decode steps are simulated in at most this many chunks per stage


@dataclass(frozen=True)
class DecodeChunk:
    """A run of decode steps on one stage, all micro-batches interleaved."""

    steps: int  # decode steps in the chunk
    duration_s: float  # the stage's busy window: sum of round periods
    compute_s: float  # of which kernels (all micro-batches)
    comm_s: float  # of which tensor-parallel collectives
    lag_s: float  # first micro-batch through this stage and its send: when the next stage may start
    send_bytes: float  # activations (or fed-back tokens) this stage sends over the chunk, per pair



def _chunks(total: int) -> list[tuple[int, int]]:
    """Split steps ``0 .. total-1`` into at most MAX_DECODE_CHUNKS contiguous runs."""
    n = min(total, MAX_DECODE_CHUNKS)
    bounds = [round(i * total / n) for i in range(n + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def decode_chunks(profile: Profile, call: Call, model: ModelSpec, layout: Layout, b: float,
            dpn: int) -> tuple[list[tuple[DecodeChunk, ...]], float]:
    """Decode chunks per stage and the fed-back token's message time."""
    w, p, m = call.workload, layout.pp, layout.micro_batches
    steps = w.decode_steps
    if steps <= 0:
        return [() for _ in range(p)], 0.0
    cached = w.prompt_len + np.arange(steps, dtype=float)  # tokens in the cache before each step
    d, comp, comm, sends = [], [], [], []
    choose = "greedy" if w.greedy else "sample"
    for k in range(p):
        c, a = decode_stage(profile, model, layout.tp, len(layout.stage_layers(model.layers, k)),
                            k == 0, k == p - 1, b, cached, choose)
        comp.append(c)
        comm.append(a)
        d.append(c + a)
        sends.append(stage_send(profile, layout, k, b * model.hidden * profile.elem_bytes, dpn)[0])
    feedback = 0.0
    if p > 1:
        feedback = profile.stage_send_s(b * INT64, link_class(layout.device(0, 0, p - 1), layout.device(0, 0, 0), dpn))
        sends[-1] = feedback
    d_arr = np.array(d)  # (stages, steps)
    rounds = np.maximum(m * d_arr.max(axis=0), d_arr.sum(axis=0) + sum(sends))
    out = []
    for k in range(p):
        busy = rounds.copy()
        busy[-1] = m * d_arr[k, -1]  # the final round ends when this stage's last micro-batch does
        per_send = b * model.hidden * profile.elem_bytes if k < p - 1 else b * INT64
        out.append(tuple(
            DecodeChunk(b1 - a1, float(busy[a1:b1].sum()), float(m * comp[k][a1:b1].sum()),
                        float(m * comm[k][a1:b1].sum()), float(d_arr[k, a1] + sends[k]),
                        per_send * m * (b1 - a1) if p > 1 else 0.0)
            for a1, b1 in _chunks(steps)))
    return out, feedback
