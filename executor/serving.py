"""What a generation engine runs, forward by forward: :func:`estimator.spec.batching.schedule`'s
segments turned into the prefills and decode steps the engine executes, with the KV slot of
every running request. Pure Python, the same on every pipeline stage (no communication).

A generate call with a length distribution, a concurrency cap (``Layout.max_concurrency``) or a
KV pool (``RunOptions.kv_tokens``) runs continuous batching. Its rows are dealt as the plan
places them: data-parallel replica ``i`` takes :func:`estimator.spec.sharding.dp_rows`, each of
its ``micro_batches`` *virtual engines* its contiguous micro-batch of them, and each virtual
engine gets an even share of the replica's limits — the cap ``max_concurrency // micro_batches``
requests (plan validation refuses a cap below ``micro_batches``) and the pool
``kv_tokens // micro_batches`` tokens. The engine follows its schedule exactly:

- a segment's **prefill** runs the admitted requests in one forward, each padded on the right to
  the longest (its prompt, plus the tokens it had generated if it was preempted), into the slots
  after the running ones; it samples each one's next token at its last real position;
- **preempted** requests give up their slots (their KV is dropped; on readmission they are
  prefilled again, and since tokens are keyed by (row, position) they continue as before);
- then ``steps`` **decode steps** of the running set, slots ``0 .. B−1``, the keys padded to the
  longest running request (``kv_max``, one more each step) and masked for shorter ones;
- a request that leaves (finished or preempted) hands its slot to the one in the highest slot,
  so the running requests always fill slots ``0 .. B−1``.

:func:`engine_steps` checks every decode step's batch and KV length against the segment it
came from, so the executor cannot drift from the schedule the estimator prices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estimator.spec.batching import EngineRun, kv_need, schedule
from estimator.spec.schedule import DECODE, PREFILL


@dataclass(frozen=True)
class Step:
    """One forward of a virtual engine."""

    op: str  # PREFILL | DECODE
    requests: tuple[int, ...]  # engine-local request per batch row
    first_slot: int  # slot of the first row (rows take consecutive slots)
    lengths: tuple[int, ...]  # per row: tokens prefilled, or KV tokens attended after the decode write
    moves: tuple[tuple[int, int, int], ...] = ()  # (src slot, dst slot, KV tokens) applied before the forward
    running: int = -1  # decode: the segment's running batch at its first step; -1 otherwise

    @property
    def width(self) -> int:
        """Prefill: the longest row (the padded length); decode: the padded KV length."""
        return max(self.lengths)


@dataclass(frozen=True)
class EnginePlan:
    """A virtual engine's schedule and the forwards that run it."""

    run: EngineRun
    steps: tuple[Step, ...]
    slots: int  # requests running at once at most: the KV pool's slots
    max_len: int  # KV positions the longest request needs: the pool's positions per slot


def engine_limits(max_concurrency: int, kv_tokens: int, micro_batches: int) -> tuple[int, int]:
    """A virtual engine's (cap, pool tokens) from its replica's (0: none)."""
    return max_concurrency // micro_batches, kv_tokens // micro_batches


def engine_steps(prompt: np.ndarray, gen: np.ndarray, max_running: int = 0, kv_tokens: int = 0) -> EnginePlan:
    """The forwards of one engine serving requests ``0 .. n−1`` (prompt and response tokens of
    each) under :func:`estimator.spec.batching.schedule`."""
    return run_steps(schedule(np.asarray(prompt), np.asarray(gen), max_running, kv_tokens), prompt, gen)


def run_steps(run: EngineRun, prompt: np.ndarray, gen: np.ndarray) -> EnginePlan:
    """The forwards that run schedule ``run`` of requests ``0 .. n−1`` (prompt and response
    tokens of each), checked against it segment by segment, one a prefill or decode op of the
    schedule; a streaming rollout's (:mod:`estimator.spec.stream`, whose switch points count
    these ops) as well as a call's."""
    prompt = np.asarray(prompt, dtype=np.int64)
    gen = np.asarray(gen, dtype=np.int64)
    done = [0] * len(prompt)  # tokens each request has generated
    order: list[int] = []  # order[s]: the request in slot s
    moves: list[tuple[int, int, int]] = []
    steps: list[Step] = []

    def leave(r: int) -> None:
        s, last = order.index(r), order.pop()
        if last != r:
            order[s] = last
            moves.append((len(order), s, int(prompt[last]) + done[last]))

    def take_moves() -> tuple[tuple[int, int, int], ...]:
        out = tuple(moves)
        moves.clear()
        return out

    for k, seg in enumerate(run.segments):
        if seg.prefill:
            first = len(order)
            for r, tokens in zip(seg.prefill, seg.prefill_tokens):
                if tokens != prompt[r] + done[r]:
                    raise AssertionError(f"segment {k}: request {r} prefills {tokens} tokens, "
                                         f"expected {prompt[r] + done[r]}")
                order.append(r)
            steps.append(Step(PREFILL, seg.prefill, first, seg.prefill_tokens, take_moves()))
            for r in seg.prefill:
                done[r] += 1
            for r in seg.prefill:
                if done[r] >= gen[r]:
                    leave(r)
        for r in seg.preempted:
            leave(r)
        if seg.steps:
            lengths = [int(prompt[r]) + done[r] for r in order]
            if (len(order), sum(lengths), max(lengths)) != (seg.batch, seg.kv_sum, seg.kv_max):
                raise AssertionError(f"segment {k}: running {len(order)} requests, KV {sum(lengths)} (longest "
                                     f"{max(lengths)}); the schedule has {seg.batch}, {seg.kv_sum} ({seg.kv_max})")
        for i in range(seg.steps):
            lengths = tuple(int(prompt[r]) + done[r] for r in order)
            steps.append(Step(DECODE, tuple(order), 0, lengths, take_moves(), seg.batch if i == 0 else -1))
            for r in order:
                done[r] += 1
        for r in seg.finished:
            if r in order:
                leave(r)
            if done[r] != gen[r]:
                raise AssertionError(f"segment {k}: request {r} leaves after {done[r]} of {gen[r]} tokens")
    slots = max([len(s.requests) + s.first_slot for s in steps], default=0)
    return EnginePlan(run, tuple(steps), slots, kv_need(prompt, gen))
