"""Continuous batching: which requests a generation engine runs at each step, as vLLM and SGLang
schedule them — one pure function the estimator prices and the executor follows.

A generate call runs one engine replica per data-parallel rank; with ``micro_batches`` m each
replica runs m *virtual engines* (vLLM's, one per micro-batch in flight through the pipeline
stages). Requests are dealt as the rest of the plan places rows: a replica takes its
data-parallel rows (:func:`estimator.spec.sharding.dp_rows`), each virtual engine its
contiguous micro-batch of them, so a GRPO group stays on one engine whenever the group size
divides the engine's share. Each engine serves its requests first come, first served, in row
order, by :func:`schedule`:

1. **Admission**, at a step boundary: the next waiting request is admitted while fewer than
   ``max_running`` requests run (vLLM's ``max_num_seqs``; 0: no cap), the KV pool
   (``kv_tokens`` per engine; 0: unlimited) holds every running request's next step plus the
   new one's prompt (and the tokens it had generated, if it was preempted) and its first step,
   and the step's prefill stays within ``prefill_tokens`` (vLLM's ``max_num_batched_tokens``;
   the first request of a step is admitted whatever its length). No request jumps the queue.
   Admitted requests are **prefilled alone** — one forward of the step's admitted requests, not
   chunked into decode steps (vLLM V0's scheduling; V1 chunks) — which samples each one's first
   token; while the prefill budget alone holds the queue back, prefill steps follow one another
   before decoding resumes (prefills first, as V0 schedules them).
2. **Decode steps**: every running request writes one token's keys and values and samples its
   next token. A request of response length L leaves after its L-th token (L − 1 decode steps
   after a fresh prefill), freeing its slot and KV at the end of that step.
3. **Preemption** (recompute, as vLLM V1): when the running requests' KV at the coming step
   outgrows the pool, the youngest running request (the last admitted) is evicted to the front
   of the queue, keeping the tokens it generated; on readmission its prompt and those tokens are
   prefilled again, which samples its next token.

KV in use by a running request that has generated G tokens is its prompt plus G tokens at the
step that samples token G + 1 (the last token's keys and values are never written). Between
two events — an admission, a completion or a preemption — the running set is fixed and every
request's KV grows by one token a step, so the schedule is a list of :class:`Segment` s, each
a prefill of the admitted requests, a preemption, then ``steps`` identical-batch decode steps:
O(requests) segments, computed with heaps, never a loop per token.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PREFILL_TOKENS = 8192  # tokens one prefill step may batch, per engine (vLLM's max_num_batched_tokens)


@dataclass(frozen=True)
class Segment:
    """What an engine runs between two events: a prefill of the admitted requests, a
    preemption, then ``steps`` decode steps of a fixed running set."""

    prefill: tuple[int, ...]  # requests admitted (prefilled) at the start, by index
    prefill_tokens: tuple[int, ...]  # tokens each of them prefills: its prompt (+ the tokens it had generated)
    preempted: tuple[int, ...]  # requests evicted at the start (youngest first)
    steps: int  # decode steps with the running set fixed (0: nothing runs after the prefill)
    batch: int  # requests that decode in these steps
    kv_sum: int  # their KV tokens together at the first of these steps (+ batch a step after)
    kv_max: int  # the longest one's KV tokens at the first of these steps (+ 1 a step after)
    finished: tuple[int, ...]  # requests that leave at the end (after the prefill or the last step)
    switch: int = -1  # weights version the engine takes at the start of this segment (-1: none)
    leaving: int = 0  # how many of ``finished`` (the first ones) left right after the prefill


@dataclass(frozen=True)
class EngineRun:
    """An engine's schedule and what it adds up to."""

    segments: tuple[Segment, ...]
    requests: int
    preemptions: int
    peak_running: int
    waiting: int = -1  # a streaming engine stopped, idle, for this version (-1: it served every request)

    @property
    def decode_steps(self) -> int:
        return sum(s.steps for s in self.segments)


def kv_need(prompt: np.ndarray, gen: np.ndarray) -> int:
    """The KV tokens the longest request needs at its last step: the smallest pool that can run
    every request (one at a time)."""
    if len(prompt) == 0:
        return 0
    return int(np.max(np.asarray(prompt) + np.maximum(np.asarray(gen) - 1, 0)))


class _Running:
    """The running requests: each one's KV is ``base[r] + step`` at the coming step."""

    def __init__(self) -> None:
        self.base: dict[int, int] = {}  # insertion order = admission order
        self.epoch: dict[int, int] = {}
        self.base_sum = 0
        self.finish: list[tuple[int, int, int]] = []  # heap (finishing step, request, epoch)
        self.longest: list[tuple[int, int, int]] = []  # heap (−base, request, epoch)

    def __len__(self) -> int:
        return len(self.base)

    def add(self, r: int, base: int, finish_step: int) -> None:
        e = self.epoch[r] = self.epoch.get(r, 0) + 1
        self.base[r] = base
        self.base_sum += base
        heapq.heappush(self.finish, (finish_step, r, e))
        heapq.heappush(self.longest, (-base, r, e))

    def remove(self, r: int) -> int:
        self.base_sum -= self.base[r]
        return self.base.pop(r)

    def youngest(self) -> int:
        return next(reversed(self.base))

    def _live(self, heap: list[tuple[int, int, int]]) -> tuple[int, int, int]:
        while heap[0][1] not in self.base or heap[0][2] != self.epoch[heap[0][1]]:
            heapq.heappop(heap)
        return heap[0]

    def next_finish(self) -> int:
        return self._live(self.finish)[0]

    def max_base(self) -> int:
        return -self._live(self.longest)[0]

    def pop_finished(self, step: int) -> list[int]:
        out = []
        while self.base and self._live(self.finish)[0] <= step:
            _, r, _ = heapq.heappop(self.finish)
            self.remove(r)
            out.append(r)
        return out


def schedule(prompt: np.ndarray, gen: np.ndarray, max_running: int = 0, kv_tokens: int = 0,
             prefill_tokens: int = PREFILL_TOKENS, needs: Sequence[int] | None = None,
             switch_at: Sequence[int] = (), recompute: bool = True) -> EngineRun:
    """The continuous-batching schedule of one engine serving requests ``0 .. n−1`` in order:
    prompt and response tokens of each (every one ≥ 1). ``kv_tokens`` (0: unlimited) must hold
    :func:`kv_need`; ``max_running`` and ``prefill_tokens`` 0 mean no cap.

    **Versions** (a streaming rollout, :mod:`estimator.spec.stream`): ``needs[r]`` is the
    weights version request ``r`` must be admitted under (non-decreasing in ``r``; the engine
    starts at version 0), and ``switch_at[v − 1]`` the number of ops — prefills and decode
    steps — the engine has run when it takes version ``v`` (a run of decode steps is cut there).
    A request that needs a version the engine has not taken waits, and the engine decodes what
    runs; with nothing running it takes the version at once where its switch point is known,
    and otherwise stops: the run ends ``waiting`` for that version (the simulator learns when
    its push arrives and schedules again). With ``recompute`` (AReaL's interruptible generation)
    a switch evicts every running request — a segment of preemptions only, marked ``switch`` —
    and they are prefilled again under the new weights, keeping their tokens; otherwise
    (PipelineRL's) they go on with the keys and values they have and ``switch`` marks the next
    segment."""
    prompt = [int(x) for x in prompt]
    gen = [int(x) for x in gen]
    n = len(prompt)
    if len(gen) != n:
        raise ValueError(f"prompt and gen lengths differ: {n} and {len(gen)} requests")
    if any(g < 1 for g in gen) or any(p < 1 for p in prompt):
        raise ValueError("every request needs at least one prompt token and one response token")
    cap = max_running if max_running > 0 else max(n, 1)
    pool = kv_tokens if kv_tokens > 0 else None
    if pool is not None and pool < kv_need(np.array(prompt), np.array(gen)):
        raise ValueError(f"kv_tokens={pool} cannot hold the longest request "
                         f"({kv_need(np.array(prompt), np.array(gen))} tokens at its last step)")
    queue = list(range(n - 1, -1, -1))  # a stack: the next request on top
    done = [0] * n  # tokens each request has generated (kept across preemption)
    run = _Running()
    step = 0  # decode steps so far
    segments: list[Segment] = []
    preemptions = peak = 0
    need = [int(v) for v in needs] if needs is not None else [0] * n
    points = [int(x) for x in switch_at]
    version = ops = 0  # weights version taken; ops run (prefills and decode steps)
    waiting = -1
    while queue or len(run):
        # 0. a switch whose point has come, or that an idle engine waits for and knows
        reached = sum(1 for x in points if x <= ops)
        if not len(run) and queue and need[queue[-1]] > max(version, reached) and need[queue[-1]] <= len(points):
            reached = need[queue[-1]]
        switch = -1
        if reached > version:
            version = switch = reached
            if recompute and len(run):  # the running requests start over under the new weights
                evicted = []
                while len(run):
                    q = run.youngest()
                    done[q] = run.remove(q) + step - prompt[q]
                    evicted.append(q)
                    queue.append(q)
                segments.append(Segment((), (), tuple(evicted), 0, 0, 0, 0, (), switch))
                switch = -1
        if queue and not len(run) and need[queue[-1]] > version:
            waiting = need[queue[-1]]  # idle, and the version's switch point is not known yet
            break
        admitted, tokens, leaving, preempted = [], [], [], []
        budget_held = False  # the prefill budget, not the cap or the pool, stopped admission
        # 1. admission, first come first served, while the cap and the pool allow the coming step
        while queue and len(run) < cap and need[queue[-1]] <= version:
            r = queue[-1]
            # the running requests' next step plus this one's prompt, tokens so far and first step;
            # an idle engine always admits (the pool holds any one request: kv_need)
            if pool is not None and len(run) and run.base_sum + len(run) * step + prompt[r] + done[r] + 1 > pool:
                break
            if prefill_tokens and tokens and sum(tokens) + prompt[r] + done[r] > prefill_tokens:
                budget_held = True
                break
            queue.pop()
            admitted.append(r)
            tokens.append(prompt[r] + done[r])
            done[r] += 1  # the prefill samples a token
            if done[r] >= gen[r]:
                leaving.append(r)
            else:
                run.add(r, prompt[r] + done[r] - step, step + gen[r] - done[r])
        ops += 1 if admitted else 0
        # 2. preemption (recompute): the youngest leaves while the coming step outgrows the pool
        while pool is not None and len(run) and run.base_sum + len(run) * step > pool:
            r = run.youngest()
            done[r] = run.remove(r) + step - prompt[r]
            preempted.append(r)
            queue.append(r)
            preemptions += 1
        # decode steps until the next completion, the last step the pool holds, or a switch point
        steps = run.next_finish() - step if len(run) else 0
        if pool is not None and len(run):
            steps = min(steps, (pool - run.base_sum - len(run) * step) // len(run) + 1)
        if version < len(points) and len(run):
            steps = min(steps, max(points[version] - ops, 0))
        if not steps or budget_held:  # nothing to decode, more prefill first, or a switch now
            kv_sum = run.base_sum + len(run) * step
            segments.append(Segment(tuple(admitted), tuple(tokens), tuple(preempted), 0, len(run), kv_sum,
                                    run.max_base() + step if len(run) else 0, tuple(leaving), switch, len(leaving)))
            continue
        peak = max(peak, len(run))
        batch, kv_sum, kv_max = len(run), run.base_sum + len(run) * step, run.max_base() + step
        step += steps
        ops += steps
        finished = run.pop_finished(step)
        for r in finished:
            done[r] = gen[r]
        segments.append(Segment(tuple(admitted), tuple(tokens), tuple(preempted), steps, batch, kv_sum, kv_max,
                                tuple(leaving + finished), switch, len(leaving)))
    return EngineRun(tuple(segments), n, preemptions, peak, waiting)
