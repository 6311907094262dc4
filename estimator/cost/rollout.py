"""The rollout model: a generate call as continuous-batching engines, priced event by event.

A generate call whose response lengths vary (``gen_len`` a distribution) or whose layout caps
the requests in flight (``max_concurrency``) runs as an inference engine would
(DESIGN §4.13): one engine replica per data-parallel rank, ``micro_batches`` virtual engines
per replica (vLLM's, one per micro-batch in flight through the pipeline stages), each serving
its requests by :func:`estimator.spec.batching.schedule` — admission under the running cap and
the KV pool, prefill alone, decode steps with the running set, preemption by recompute. A
generate call with fixed lengths and no cap keeps the fixed-length model of
:mod:`estimator.cost.decode` (every request admitted at once, its KV resident throughout).

**Costs.** An engine's schedule is a list of ops: a prefill of the admitted requests (the
census's ``block_prefill_batched`` at their count and the longest of their prefill lengths, the
executor padding them; a fused stack packs them, so there at their mean length), then decode
steps at the running batch and KV length (``block_decode_batched``: the longest running
request's for the executor, whose attention pads to it; the mean for a fused stack's paged
attention), each ending with the token choice (``sample_ending`` where responses end at a drawn
length). Decode costs are
evaluated for all steps at once as arrays (never a Python loop per token); prefill costs once
per distinct (requests, tokens).

**Rounds.** Virtual engines interleave through the stages as the executor runs them: a round
is one op of every engine that still has work. A round of ops ``c[j, k]`` (engine j, stage k)
and stage-to-stage messages ``s_k`` takes the max-plus cycle time of
:mod:`estimator.cost.decode`, ``R = max(max_k Σ_j c[j, k], max_j Σ_k (c[j, k] + s_k))``: the
busiest stage, or one engine's round trip. With one stage the engines simply take turns. A
replica's rollout is the sum of its rounds; the call ends with the slowest replica.

**KV pool.** The engine may hold ``kv_fraction`` of each device's memory (vLLM's
``gpu_memory_utilization``): its weights and activations, and the rest as KV cache. The pool of
an engine, in tokens, is the smallest over its stages of that rest divided by a token's keys
and values on the stage, shared evenly by the replica's virtual engines. A layout whose pool
cannot hold one request at the cap (:func:`estimator.spec.batching.kv_need`) cannot run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from estimator.cost.pieces import (
    BF16,
    INT64,
    block_piece,
    each_distinct,
    end_piece,
    forward_stage,
    head_comm_s,
    model_symbols,
    piece_launches,
    piece_s,
    rotary_piece,
    stage_params,
    tp_allreduce_s,
)
from estimator.cost.transfers import link_class, stage_send
from estimator.profile.profiles import Profile
from estimator.spec.batching import PREFILL_TOKENS, EngineRun, kv_need, schedule
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import micro_batch_rows
from estimator.spec.workflow import Call

GRID_BATCH, GRID_KV = 24, 6  # the decode-cost grid of calls with many segments (_Segments.step_costs)


def continuous(call: Call, layout: Layout) -> bool:
    """Whether ``call`` on ``layout`` runs as continuous-batching engines (see the module
    docstring) rather than the fixed-length model."""
    return call.kind == "generate" and (call.workload.lengths_vary or layout.max_concurrency > 0)


def kv_bytes_per_token(model: ModelSpec, layout: Layout, stage: int) -> float:
    """Keys and values of one token on one device of ``stage`` (bf16, the engine's dtype)."""
    layers = len(layout.stage_layers(model.layers, stage))
    return 2.0 * layers * (model.kv_dim / layout.tp) * BF16


def engine_tokens(free_bytes: list[float], model: ModelSpec, layout: Layout) -> int:
    """KV pool of one virtual engine, in tokens, from each stage's bytes left for KV on a device."""
    per_replica = min(int(max(f, 0.0) // kv_bytes_per_token(model, layout, k)) for k, f in enumerate(free_bytes))
    return per_replica // layout.micro_batches


def engine_cap(layout: Layout) -> int:
    """Running requests one virtual engine may hold: the replica's ``max_concurrency`` split
    evenly over its virtual engines (0: no cap)."""
    return layout.max_concurrency // layout.micro_batches if layout.max_concurrency else 0


def serving_limits(profile: Profile | None, layout: Layout) -> tuple[int, int]:
    """(running cap, prefill tokens per step) of one virtual engine: the layout's cap, else a
    serving engine's own (vLLM's ``max_num_seqs``, split over the virtual engines), and the
    engine's prefill budget per step (``max_num_batched_tokens``), else :data:`PREFILL_TOKENS`."""
    engine = profile.engine if profile is not None else None
    cap = engine_cap(layout) or (max(engine.max_num_seqs // layout.micro_batches, 1) if engine else 0)
    return cap, (engine.prefill_chunk_tokens if engine else PREFILL_TOKENS)


def generation_stages(profile: Profile, call: Call, model: ModelSpec, layout: Layout, devices_per_node: int
                      ) -> list[_StageCosts]:
    """What prices each stage's ops of generate call ``call`` on ``layout``; the token choice
    ends responses of drawn lengths with EOS at their length (the executor's ``Sampler.ending``)."""
    choose = ("greedy" if call.workload.greedy else "sample") + ("_ending" if call.workload.lengths_vary else "")
    return [_StageCosts(profile, model, layout, k, choose, devices_per_node) for k in range(layout.pp)]


def engine_op_costs(engines: list[_EngineOps], stages: list[_StageCosts], ends: list[tuple[np.ndarray, ...]],
                    steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(compute, comm) of every op of a replica's virtual engines on every stage, arrays
    ``(engines, stages, rounds)`` padded with zeros past an engine's last op; ``ends``: per
    stage, the segments' step costs (:meth:`_Segments.step_costs`)."""
    rounds = max((len(e.kind) for e in engines), default=0)
    comp = np.zeros((len(engines), len(stages), rounds))
    comm = np.zeros_like(comp)
    for j, e in enumerate(engines):
        for k, st in enumerate(stages):
            c, a = _op_costs(e, st, ends[k], steps)
            comp[j, k, :len(c)], comm[j, k, :len(a)] = c, a
    return comp, comm


def engine_rows(call: Call, layout: Layout, dp_rank: int) -> list[tuple[int, int]]:
    """Global rows of each virtual engine of replica ``dp_rank``: its data-parallel rows split
    into ``micro_batches`` contiguous runs (the first ones one longer where they do not divide)."""
    return micro_batch_rows(call, layout, dp_rank)[0]


@dataclass(frozen=True)
class RolloutCost:
    """A generate call's rollout on a layout for one iteration's lengths."""

    replicas: int  # engine replicas (data-parallel ranks)
    engines: int  # virtual engines per replica
    max_concurrency: int  # per virtual engine (0: no cap)
    kv_tokens: int  # KV pool per virtual engine, tokens (0: unlimited)
    duration_s: float  # the slowest replica's rollout
    compute_s: float  # of which kernels (the slowest replica)
    comm_s: float  # of which tensor-parallel collectives and stage messages
    replica_s: tuple[float, ...]  # each replica's rollout
    peak_running: int  # most requests one replica ran at once
    preemptions: int  # over every engine
    tokens: int  # response tokens generated
    recomputed_tokens: int  # tokens prefilled again after a preemption
    tail_s: float  # from 90 % of the call's requests finished to the last
    # the slowest replica over time: (offset s, requests running) where the count changes
    running: tuple[tuple[float, int], ...]
    slowest: int  # the data-parallel rank of the slowest replica
    # the slowest replica's busy time per stage and kind as spans (start s, end s, op, stage),
    # :func:`_busy_windows`
    windows: tuple[tuple[float, float, str, int], ...]

    def summary(self) -> dict:
        """``estimator.predict --json``: the call's ``generation`` object."""
        return {"replicas": self.replicas, "engines_per_replica": self.engines,
                "max_concurrency": self.max_concurrency * self.engines if self.max_concurrency else None,
                "kv_tokens_per_engine": self.kv_tokens or None, "peak_running": self.peak_running,
                "preemptions": self.preemptions, "tokens": self.tokens,
                "recomputed_tokens": self.recomputed_tokens, "tail_s": self.tail_s}


class _StageCosts:
    """Per-op seconds of one stage of a generate call, cached by shape.

    On a production stack with engine numbers (``Profile.engine``) every op is one engine step:
    its kernels at their device time, plus the step's host time — the scheduler's
    (:meth:`EngineTerms.step_host_s` at the running requests, on the first stage, once per
    step) and the launches' (one graph replay for a decode step under CUDA graphs, else each
    kernel's eager launch)."""

    def __init__(self, profile: Profile, model: ModelSpec, layout: Layout, k: int, choose: str, dpn: int):
        self.profile, self.model, self.layout, self.k = profile, model, layout, k
        self.layers = len(layout.stage_layers(model.layers, k))
        self.first, self.last = k == 0, k == layout.pp - 1
        self.choose, self.dpn = choose, dpn
        self.fused = profile.ops == "fused"
        self.engine = profile.engine
        # an engine's kernels at their device time; its launches are the step's host time
        self.kernels = dataclasses.replace(profile, launch_overhead_s=0.0) if self.engine else profile
        self._prefill: dict[tuple[int, int], tuple[float, float]] = {}
        self._comm: dict[int, tuple[float, float]] = {}
        self._launches: dict[str, float] = {}

    def _kernel_count(self, phase: str) -> float:
        """Kernels one step of ``phase`` (decode | prefill) launches on this stage."""
        if phase not in self._launches:
            m, tp = self.model, self.layout.tp
            sym = model_symbols(m, tp) | {"rows": 1.0, "tokens": 1.0, "kv_len": 1.0}
            n = self.layers * piece_launches(self.profile, block_piece(f"{phase}_batched", m, tp), sym)
            n += piece_launches(self.profile, end_piece("embed", tp, m), sym) if self.first else 0.0
            if self.last:
                n += piece_launches(self.profile, end_piece(f"head_{m.head}", tp, m), sym)
                n += piece_launches(self.profile, self.choose, sym)
            self._launches[phase] = float(n)
        return self._launches[phase]

    def host_s(self, phase: str, running: np.ndarray | float) -> np.ndarray | float:
        """The engine's host time of one step of ``phase`` with ``running`` requests (0 without
        engine numbers)."""
        e = self.engine
        if e is None:
            return 0.0
        launch = e.graph_s if phase == "decode" and e.cuda_graphs else self._kernel_count(phase) * e.eager_kernel_s
        return (e.step_host_s(running) if self.first else 0.0) + launch

    def prefill_many(self, rows: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(compute, comm + message) of prefills of ``rows`` requests over ``tokens`` each,
        evaluated once per distinct shape, all at once."""
        pairs = np.stack((rows, tokens), axis=1)
        uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        missing = [tuple(u) for u in uniq.tolist() if tuple(u) not in self._prefill]
        if missing:
            p, m = self.profile, self.model
            r, n = (np.array(x, dtype=float) for x in zip(*missing))
            st = forward_stage(self.kernels, m, self.layout.tp, self.layers, self.first, self.last, r, n, r,
                               "prefill_batched", ((self.choose, {}),))
            compute = np.broadcast_to(np.asarray(st.compute_s, dtype=float) + self.host_s("prefill", r), r.shape)
            comm = np.broadcast_to(np.asarray(st.comm_s, dtype=float), r.shape)
            if self.engine is not None and self.engine.allreduce and self.layout.tp > 1:
                # the engine's all-reduces instead of the profile's (the logits' gather stays)
                ars = 2 * self.layers + (1 if self.first else 0)
                own = np.array([ars * self.allreduce_s(float(a * b)) for a, b in zip(r, n)])
                comm = comm - ars * np.array([tp_allreduce_s(p, self.layout.tp, float(a * b), m.hidden)
                                              for a, b in zip(r, n)]) + own
            for i, key in enumerate(missing):
                send = stage_send(p, self.layout, self.k, key[0] * key[1] * m.hidden * p.elem_bytes, self.dpn)[0]
                self._prefill[key] = (float(compute[i]), float(comm[i]) + send)
        table = np.array([self._prefill[tuple(u)] for u in uniq.tolist()])
        return table[inv, 0], table[inv, 1]

    def allreduce_s(self, tokens: float) -> float:
        """One tensor-parallel all-reduce of ``tokens`` activations inside an engine step: the
        engine's own (``EngineTerms.allreduce_s``) where it has one for the size, else the
        profile's collective."""
        p, tp = self.profile, self.layout.tp
        if tp == 1:
            return 0.0
        own = self.engine.allreduce_s(tp, tokens * self.model.hidden * p.elem_bytes) if self.engine else None
        return own if own is not None else tp_allreduce_s(p, tp, tokens, self.model.hidden)

    def _step_comm(self, batch: int) -> tuple[float, float]:
        """(collectives, message to the next stage) of one decode step at ``batch``."""
        if batch not in self._comm:
            p, m, tp = self.profile, self.model, self.layout.tp
            comm = 2 * self.layers * self.allreduce_s(batch)
            if self.first and tp > 1:
                comm += self.allreduce_s(batch)
            if self.last:
                comm += head_comm_s(p, m, tp, batch) + p.in_call_s("broadcast", batch * INT64, tp, "intra")
            if self.last and self.layout.pp > 1:  # the chosen tokens go back to the first stage
                cls = link_class(self.layout.device(0, 0, self.k), self.layout.device(0, 0, 0), self.dpn)
                send = p.stage_send_s(batch * INT64, cls)
            else:
                send = stage_send(p, self.layout, self.k, batch * m.hidden * p.elem_bytes, self.dpn)[0]
            self._comm[batch] = (comm, send)
        return self._comm[batch]

    def decode(self, batch: np.ndarray, kv_max: np.ndarray, kv_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(compute, comm + message) per decode step, arrays over steps."""
        p, m, tp = self.kernels, self.model, self.layout.tp
        kv = kv_mean if self.fused else kv_max
        sym = model_symbols(m, tp) | {"rows": batch.astype(float), "tokens": 1.0, "kv_len": kv.astype(float)}
        compute = self.layers * piece_s(p, block_piece("decode_batched", m, tp), sym)
        rot = rotary_piece(m, True)
        if rot is not None:  # per-row tables and the step's padding mask
            compute = compute + piece_s(p, "rotary_decode_batched", sym | rot[1])
        if self.first:
            compute = compute + piece_s(p, end_piece("embed", tp, m), sym)
        if self.last:
            compute = compute + piece_s(p, end_piece(f"head_{m.head}", tp, m), sym) + piece_s(p, self.choose, sym)
        compute = compute + self.host_s("decode", batch.astype(float))
        compute = np.broadcast_to(np.asarray(compute, dtype=float) + p.micro_batch_overhead_s, batch.shape)
        # a step's communication by its batch, at most EACH_POINTS evaluations (pieces.each_distinct)
        return compute, each_distinct(lambda b: sum(self._step_comm(int(round(b)))), batch)


@dataclass
class _EngineOps:
    """One engine's ops in order — kind 0 prefill, 1 decode — with their shapes; decode steps
    carry the index of their segment among the call's decode segments and their step in it."""

    run: EngineRun
    kind: np.ndarray
    batch: np.ndarray  # prefill: requests prefilled; decode: running requests
    tokens: np.ndarray  # prefill: longest prefill; decode: unused
    mean: np.ndarray  # prefill: mean prefill tokens; decode: unused
    seg: np.ndarray  # decode: its segment's index in the call's decode segments
    step: np.ndarray  # decode: its step in the segment
    running: np.ndarray  # requests in the engine during the op
    seg_end: np.ndarray  # per schedule segment: index of its last op (−1: none)


class _Segments:
    """Every decode segment of a call's engines: batch, longest and mean KV at its first step, steps."""

    def __init__(self) -> None:
        self.batch: list[int] = []
        self.kv_max: list[int] = []
        self.kv_mean: list[float] = []
        self.steps: list[int] = []

    def add(self, batch: int, kv_max: int, kv_sum: int, steps: int) -> int:
        self.batch.append(batch)
        self.kv_max.append(kv_max)
        self.kv_mean.append(kv_sum / batch)
        self.steps.append(steps)
        return len(self.batch) - 1

    def step_costs(self, stage: _StageCosts) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(compute, comm) at the first and at the last step of every segment, interpolated
        linearly over the steps between (KV grows one token a step, and a step's cost is close
        to linear in it). With many segments the step cost is evaluated on a grid instead —
        :data:`GRID_BATCH` batches (log-spaced) × :data:`GRID_KV` KV lengths — and read off it
        bilinearly (log batch, KV)."""
        b = np.array(self.batch, dtype=np.int64)
        last = np.array(self.steps, dtype=np.int64) - 1
        kv = np.array(self.kv_mean if stage.fused else self.kv_max, dtype=float)
        bb, kk = np.concatenate((b, b)), np.concatenate((kv, kv + last))
        if len(bb) <= GRID_BATCH * GRID_KV:
            comp, comm = stage.decode(bb, kk, kk)
        else:
            comp, comm = _on_grid(stage, bb, kk)
        n = len(b)
        return comp[:n], comp[n:], comm[:n], comm[n:]


def _on_grid(stage: _StageCosts, batch: np.ndarray, kv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode step costs at (batch, kv) read bilinearly off a grid of evaluated steps."""
    gb = np.unique(np.geomspace(batch.min(), batch.max(), GRID_BATCH).round())
    gk = np.unique(np.linspace(kv.min(), kv.max(), GRID_KV).round())
    mb, mk = np.meshgrid(gb, gk, indexing="ij")
    comp, comm = stage.decode(mb.ravel().astype(np.int64), mk.ravel(), mk.ravel())
    out = []
    for table in (comp.reshape(mb.shape), comm.reshape(mb.shape)):
        lb = np.log(gb)
        i = np.clip(np.searchsorted(lb, np.log(batch)) - 1, 0, max(len(gb) - 2, 0))
        j = np.clip(np.searchsorted(gk, kv) - 1, 0, max(len(gk) - 2, 0))
        i1, j1 = np.minimum(i + 1, len(gb) - 1), np.minimum(j + 1, len(gk) - 1)
        wb = np.where(i1 > i, (np.log(batch) - lb[i]) / (lb[i1] - lb[i] + (i1 == i)), 0.0)
        wk = np.where(j1 > j, (kv - gk[j]) / (gk[j1] - gk[j] + (j1 == j)), 0.0)
        out.append((1 - wb) * ((1 - wk) * table[i, j] + wk * table[i, j1])
                   + wb * ((1 - wk) * table[i1, j] + wk * table[i1, j1]))
    return out[0], out[1]


def _engine_ops(run: EngineRun, segments: _Segments) -> _EngineOps:
    # one block per prefill and per run of decode steps: (kind, ops, batch, tokens, mean, segment, running)
    blocks: list[tuple[int, int, int, int, float, int, int]] = []
    ends, n = [], 0
    for s in run.segments:
        if s.prefill:
            blocks.append((0, 1, len(s.prefill), max(s.prefill_tokens), sum(s.prefill_tokens) / len(s.prefill), -1,
                           max(s.batch, len(s.prefill))))
            n += 1
        if s.steps:
            blocks.append((1, s.steps, s.batch, 0, 0.0, segments.add(s.batch, s.kv_max, s.kv_sum, s.steps), s.batch))
            n += s.steps
        ends.append(n - 1)
    if not blocks:
        z = np.zeros(0, dtype=np.int64)
        return _EngineOps(run, z.astype(np.int8), z, z, z.astype(float), z, z, z, np.array(ends, dtype=np.int64))
    kind, count, batch, tokens, mean, seg, running = (np.array(c) for c in zip(*blocks))
    first = np.cumsum(count) - count
    step = np.arange(int(count.sum())) - np.repeat(first, count)
    return _EngineOps(run, np.repeat(kind, count).astype(np.int8), np.repeat(batch, count),
                      np.repeat(tokens, count), np.repeat(mean, count).astype(float), np.repeat(seg, count), step,
                      np.repeat(running, count), np.array(ends, dtype=np.int64))


def _op_costs(ops: _EngineOps, stage: _StageCosts, ends: tuple[np.ndarray, ...],
              steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(compute, comm) per op of one engine on one stage; ``ends``: the segments' step costs
    at their first and last steps (:meth:`_Segments.step_costs`)."""
    comp = np.zeros(len(ops.kind))
    comm = np.zeros(len(ops.kind))
    dec = ops.kind == 1
    if dec.any():
        c0, c1, a0, a1 = ends
        seg, k = ops.seg[dec], ops.step[dec]
        frac = k / np.maximum(steps[seg] - 1, 1)
        comp[dec] = c0[seg] + (c1[seg] - c0[seg]) * frac
        comm[dec] = a0[seg] + (a1[seg] - a0[seg]) * frac
    pre = np.flatnonzero(~dec)
    if len(pre):
        tokens = np.rint(ops.mean[pre]).astype(np.int64) if stage.fused else ops.tokens[pre]
        comp[pre], comm[pre] = stage.prefill_many(ops.batch[pre], tokens)
    return comp, comm


def _rounds(comp: np.ndarray, comm: np.ndarray) -> np.ndarray:
    """Round periods from per-op costs ``(engines, stages, rounds)`` (max-plus cycle time)."""
    total = comp + comm
    busiest = total.sum(axis=0).max(axis=0)  # per stage, all engines' ops of the round
    trip = total.sum(axis=1).max(axis=0)  # per engine, its op through every stage
    return np.maximum(busiest, trip)


def _busy_windows(engines: list[_EngineOps], cost: np.ndarray, starts: np.ndarray, t_end: np.ndarray
                  ) -> tuple[tuple[float, float, str, int], ...]:
    """A replica's prefill and decode time per stage as spans that do not overlap, from its ops'
    seconds ``cost`` (engines, stages, rounds) and the rounds' ``starts`` and ``t_end``: a round
    with prefills has them from its start; its decode steps and those of the rounds up to the
    next round with prefills are one span that ends where that round begins (the last one where
    the rollout ends). A span's length is the stage's busy time in that kind (exactly the sum of
    its ops'), so the op-level comparison sums like the executor's per-step spans; a stage's
    idle time within a run (waiting on other stages) lies before the run's decode span."""
    rounds = cost.shape[2]
    kind = np.full((len(engines), rounds), -1, dtype=np.int8)
    for j, e in enumerate(engines):
        kind[j, :len(e.kind)] = e.kind
    out = []
    for k in range(cost.shape[1]):
        pre = np.where(kind == 0, cost[:, k], 0.0).sum(axis=0)
        dec = np.where(kind == 1, cost[:, k], 0.0).sum(axis=0)
        cuts = np.flatnonzero(pre > 0)  # rounds with prefills; each starts a run of rounds
        out += [(float(t), float(t + p), "prefill", k) for t, p in zip(starts[cuts], pre[cuts])]
        lo = np.unique(np.concatenate(([0], cuts)))
        total = np.add.reduceat(dec, lo)
        end = np.append(starts[lo[1:]], t_end[-1])  # each run ends where the next begins
        out += [(float(t - d), float(t), "decode", k) for t, d in zip(end, total) if d > 0]
    return tuple(sorted(out))


def rollout_cost(profile: Profile, call: Call, model: ModelSpec, layout: Layout, prompt: np.ndarray,
                 gen: np.ndarray, kv_tokens: int, devices_per_node: int,
                 schedules: dict | None = None, stage_costs: list | None = None) -> RolloutCost:
    """The rollout of ``call`` on ``layout`` with these lengths (by global row) and a KV pool of
    ``kv_tokens`` per virtual engine (0: unlimited). ``schedules``: a cache of engine schedules
    by (rows, cap, pool) for calls with the same lengths (layouts that deal rows alike share them).
    ``stage_costs``: per stage, what prices its ops (default: the census on ``profile``)."""
    cap, prefill_tokens = serving_limits(profile, layout)
    stages = stage_costs or generation_stages(profile, call, model, layout, devices_per_node)
    segments = _Segments()
    replicas, preempt, recomputed = [], 0, 0
    for r in range(layout.dp):
        engines = []
        for lo, hi in engine_rows(call, layout, r):
            # a cap or a pool that can never bind schedules as none (and shares the schedule)
            c = 0 if cap >= hi - lo else cap
            kv = 0 if kv_tokens >= int(np.sum(prompt[lo:hi]) + np.sum(gen[lo:hi])) else kv_tokens
            key = (lo, hi, c, kv)
            run = schedules.get(key) if schedules is not None else None
            if run is None:
                run = schedule(prompt[lo:hi], gen[lo:hi], c, kv, prefill_tokens)
                if schedules is not None:
                    schedules[key] = run
            engines.append(_engine_ops(run, segments))
            preempt += run.preemptions
            recomputed += sum(t - int(prompt[lo + q]) for s in run.segments
                              for q, t in zip(s.prefill, s.prefill_tokens))
        replicas.append(engines)
    steps = np.array(segments.steps, dtype=np.int64)
    ends = [segments.step_costs(st) if len(steps) else () for st in stages]
    replica_s, finishes, peak = [], [], 0
    worst = None
    for r, engines in enumerate(replicas):
        comp, comm = engine_op_costs(engines, stages, ends, steps)
        rounds = comp.shape[2]
        running = np.zeros(rounds, dtype=np.int64)
        for e in engines:
            running[:len(e.kind)] += e.running
        period = _rounds(comp, comm)
        t_end = np.cumsum(period)
        dur = float(t_end[-1]) if rounds else 0.0
        replica_s.append(dur)
        for e in engines:
            for s, last in zip(e.run.segments, e.seg_end):
                if s.finished and last >= 0:
                    finishes += [t_end[last]] * len(s.finished)
        peak = max(peak, int(running.max(initial=0)))
        busy, talk = comp.sum(), comm.sum()
        share = busy / (busy + talk) if busy + talk > 0 else 1.0
        if worst is None or dur > worst[0]:
            worst = (dur, dur * share, dur * (1 - share), engines, t_end, running, r, comp + comm)
    dur, compute_s, comm_s, engines, t_end, running, slowest, cost = worst
    finishes = np.sort(np.asarray(finishes, dtype=float))
    t90 = finishes[int(np.ceil(0.9 * len(finishes))) - 1] if len(finishes) else 0.0
    starts = np.concatenate(([0.0], t_end[:-1])) if len(t_end) else np.zeros(0)
    change = np.flatnonzero(np.diff(running, prepend=-1)) if len(running) else np.zeros(0, dtype=np.int64)
    series = tuple((float(starts[i]), int(running[i])) for i in change) + ((dur, 0),)
    windows = _busy_windows(engines, cost, starts, t_end)
    return RolloutCost(layout.dp, layout.micro_batches, cap, kv_tokens, dur, compute_s, comm_s, tuple(replica_s),
                       peak, preempt, int(np.sum(gen)), recomputed, float(finishes[-1] - t90) if len(finishes) else 0.0,
                       series, slowest, tuple(sorted(windows)))


def kv_free_bytes(model: ModelSpec, layout: Layout, engine_bytes: float, activations: list[float]) -> list[float]:
    """Per stage: bytes left for KV on a device when the engine holds ``engine_bytes`` in all
    (kv_fraction × capacity): less its weights (bf16) and its activations."""
    out = []
    for k, act in enumerate(activations):
        layers = len(layout.stage_layers(model.layers, k))
        weights = BF16 * stage_params(model, layout.tp, layout.pp, k, layers)
        out.append(engine_bytes - weights - act)
    return out


def check_pool(prompt_cap: int, gen_cap: int, kv_tokens: int) -> bool:
    """Whether a pool of ``kv_tokens`` per engine holds one request at the caps."""
    return kv_tokens >= kv_need(np.array([prompt_cap]), np.array([gen_cap]))
