"""Streaming rollouts in the executor: a standing rollout copy serves consecutive iterations'
requests as one stream, as :mod:`estimator.spec.stream` rules it.

Where a plan streams its generate call (:func:`estimator.spec.stream.streaming_calls`), each
data-parallel replica of the copy runs the schedule of its :class:`~estimator.spec.stream.EngineStream`
(:func:`engine_streams`: the cap and KV pool of one engine, as a call's continuous batching
has them, and the replica's switch points) forward by forward — one forward an op — across
iterations, in one KV pool (:class:`StreamServer`). The switch points (the ops a replica has
run when it takes each version) are the run's (``RunOptions.switch_at``: the prediction's,
which :mod:`estimator.sim.simulator` finds where each push arrives), else the earliest the rule
allows (:func:`switch_points`):

- its requests are the replica's rows of iteration 0, 1, …, K − 1; the request of iteration
  ``b``, row ``r`` continues row ``r`` of iteration ``b``'s prompts, its tokens sampled by
  :class:`executor.data.Sampler` of iteration ``b`` keyed by (``r``, position) and ending at
  the length iteration ``b`` draws for row ``r`` — as a synchronous run samples it, so its
  tokens depend only on (``b``, ``r``) and the weights that generated them;
- at the switch point of version ``v`` the copy takes the push of update ``v − 1``
  (every device of the home and the copy, as a push in program order does; the copy's devices
  leave that push out of their program loop) and computes with the new weights from the next
  forward on; under ``recompute`` the schedule has evicted the running requests there, and
  they are prefilled again with the new weights;
- after op ``emit_op[j]`` iteration ``j``'s outputs of the replica are its
  requests ``consumed[j]`` in that order — sequences, old log-probs where the call writes
  them, verifier rewards scored with each request's own lengths — posted as a generate call's
  outputs of iteration ``j`` are (:mod:`executor.dataflow`).

The program loop of a copy device advances the stream to iteration ``j``'s emission when it
reaches instance (``j``, call). Every call downstream reads, as row ``lo + k`` of iteration
``j``, the stream request ``consumed[j][k]`` of the replica whose rows start at ``lo``:
:func:`row_sources` says which (iteration, row) that is, on every rank alike, and the runtime
gives those rows' lengths to every call of iteration ``j`` (``CallRun.row_lengths``).

Timeline of a copy device: per iteration ``j`` spans ``call`` and ``compute`` of (``j``, call)
from the previous emission (or the stream's start) to emission ``j``; the ``prefill`` and
``decode`` forwards between them under iteration ``j``; a push taken at a switch as
``push:<call>`` (spans ``call`` and ``push``) of its update's iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from estimator.base.errors import ConfigError
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Plan
from estimator.spec.sharding import Range, dp_rows, param_inventory, shard
from estimator.spec.stream import (
    EngineStream,
    call_streams,
    needed_version,
    replica_stream,
    request_lengths,
    streaming_calls,
)
from executor import model as M
from executor.calls import CallRun, Pieces, generated, right_aligned
from executor.data import Sampler, Source
from executor.engine import Engine, EngineWork
from executor.options import RunOptions
from executor.recorder import Recorder
from executor.serving import engine_limits, run_steps


def engine_streams(experiment: Experiment, plan: Plan, call: str, options: RunOptions) -> list[EngineStream]:
    """Per data-parallel replica of streaming call ``call``, its stream over the run's
    iterations, under the limits of one engine — the layout's cap and the run's KV pool
    (:func:`executor.serving.engine_limits`) and the default prefill budget, as
    :func:`executor.calls.generate_batched` serves a call — and its switch points
    (:func:`switch_points`). Raises :class:`~estimator.base.errors.ConfigError` where points
    given for the run are refused by the rule or leave the stream short of its end."""
    layout = plan[call]
    cap, pool = engine_limits(layout.max_concurrency, options.kv_tokens.get(call, 0), layout.micro_batches)
    streams = call_streams(experiment, plan, call, options.iterations, cap, pool,
                           switch_at=switch_points(experiment, plan, call, options))
    short = [r for r, st in enumerate(streams) if not st.complete]
    if short:
        raise ConfigError(f"switch points of {call} replica {short[0]}: it waits for version "
                          f"{streams[short[0]].run.waiting}, for which none is given")
    return streams


def switch_points(experiment: Experiment, plan: Plan, call: str, options: RunOptions) -> list[tuple[int, ...]]:
    """Per replica of streaming call ``call``, the ops it has run when it takes each version:
    the run's (``RunOptions.switch_at``: the prediction's), else those of
    :func:`needed_switch`, version by version."""
    given = options.switch_at.get(call)
    if given is not None:
        return [tuple(p) for p in given]
    layout = plan[call]
    cap, pool = engine_limits(layout.max_concurrency, options.kv_tokens.get(call, 0), layout.micro_batches)
    out = []
    for r in range(layout.dp):
        points: tuple[int, ...] = ()
        while True:
            st = replica_stream(experiment, layout, call, options.iterations, r, cap, pool, switch_at=points)
            if st.complete:
                break
            points += (needed_switch(st, experiment.workflow.staleness),)
        out.append(points)
    return out


def needed_switch(stream: EngineStream, eta: int) -> int:
    """Where a stream that stopped for version ``v`` (``run.waiting``) takes it when no
    prediction says: at the first segment boundary (an admission or a completion) by which the
    next request to admit needs ``v`` and the engine has done its share of iteration ``v − 1``,
    so the engine's own progress decides and the run is deterministic; the copy then waits for
    the push of update ``v − 1`` if it has not come. With fixed lengths and no cap, batch j is
    thus served whole under version j − η."""
    v = stream.run.waiting
    first = int(np.searchsorted([needed_version(int(b), eta) for b in stream.batch], v))  # the first to need v
    ends, admitted, ops = [], 0, 0
    for seg in stream.run.segments:
        ops += 1 if seg.prefill else 0
        if not admitted and first > 0 and first - 1 in seg.prefill:  # the last one before it is in
            admitted = ops
        ops += seg.steps
        ends.append(ops)
    wanted = max(admitted, stream.emit_op[v - 1])
    return next(e for e in ends if e >= wanted)


@dataclass(frozen=True)
class RowSources:
    """Where each global row of an iteration's rollouts comes from, and its lengths."""

    batch: np.ndarray  # per row: the iteration whose prompt it continues
    row: np.ndarray  # per row: its row in that iteration
    prompt: np.ndarray  # per row: prompt tokens (drawn for (batch, row))
    gen: np.ndarray  # per row: response tokens

    def __post_init__(self) -> None:
        sizes = {len(self.batch), len(self.row), len(self.prompt), len(self.gen)}
        if len(sizes) != 1:
            raise ValueError(f"row sources of unequal lengths {sorted(sizes)}: batch, row, prompt and gen must "
                             "describe the same rows")

    def lengths(self) -> tuple[Tensor, Tensor]:
        """(prompt, response) tokens by row, as :meth:`executor.calls.CallRun.lengths` gives them."""
        return torch.as_tensor(self.prompt), torch.as_tensor(self.gen)


def row_sources(experiment: Experiment, plan: Plan, options: RunOptions) -> dict[int, RowSources]:
    """Iteration ``j`` → the source of each global row of its rollouts, where the plan streams
    them (empty where it does not): replica by replica, the requests ``consumed[j]`` of its
    stream. A pure function of the run, computed alike on every rank."""
    calls = streaming_calls(experiment, plan)
    if not calls:
        return {}
    (call,) = calls  # a streaming workflow has one generate call (Workflow's check)
    streams = engine_streams(experiment, plan, call, options)
    out = {}
    for j in range(options.iterations):
        picks = [list(s.consumed[j]) for s in streams]
        batch = np.concatenate([s.batch[q] for s, q in zip(streams, picks)])
        row = np.concatenate([s.row[q] for s, q in zip(streams, picks)])
        out[j] = RowSources(batch, row, *request_lengths(experiment, batch, row))
    return out


def source_rows(source: Source, batch: np.ndarray, row: np.ndarray) -> Tensor:
    """Row ``row[i]`` of iteration ``batch[i]``'s source data, for every ``i`` (n, width)."""
    parts, order = [], []
    for b in np.unique(batch):
        at = np.flatnonzero(batch == b)
        lo, hi = int(row[at].min()), int(row[at].max()) + 1
        parts.append(source.rows(int(b), lo, hi)[torch.as_tensor(row[at] - lo)])
        order.append(at)
    rows = torch.cat(parts)
    return rows[torch.as_tensor(np.argsort(np.concatenate(order), kind="stable"))]


@dataclass
class Emitted:
    """What a streaming call emitted on one device, and the weights it served with
    (``RunOptions.return_streams``, for tests)."""

    # iteration → (global rows, sequences, log-probs in float64) of this device's replica (last stage)
    rows: dict[int, tuple[Range, Tensor, Tensor]] = field(default_factory=dict)
    versions: dict[int, M.Params] = field(default_factory=dict)  # weights version → this device's shards


# the push of version v: (v) → this device's shards of the copy under the new weights
TakePush = Callable[[int], M.Params]
# iteration j's outputs (last stage; {} elsewhere) → posted to their consumers
Emit = Callable[[int, dict[str, Pieces]], None]


class StreamServer:
    """One device's part of a streaming generate call (the module docstring)."""

    def __init__(self, experiment: Experiment, plan: Plan, call: str, device: int, options: RunOptions,
                 engine: Engine, source: Source, rec: Recorder, count: Callable[[int, float], None] | None = None):
        self.exp, self.call, self.rec, self.count = experiment, experiment.workflow[call], rec, count
        self.layout, self.device, self.engine = plan[call], device, engine
        dp_rank, _, self.stage = self.layout.coords(device)
        self.stream = engine_streams(experiment, plan, call, options)[dp_rank]
        (self.range,) = dp_rows(self.call, self.layout, dp_rank)
        s = self.stream
        self.prompt, self.gen = request_lengths(experiment, s.batch, s.row)
        w = self.call.workload
        plan_steps = run_steps(s.run, self.prompt, self.gen)
        seqs = right_aligned(source_rows(source, s.batch, s.row), torch.as_tensor(self.prompt),
                             w.prompt_len + w.gen_len)
        self.served = engine.open(EngineWork(seqs, torch.as_tensor(self.prompt).to(engine.torch_device), w.gen_len,
                                             plan_steps))
        self.switches: dict[int, list[int]] = {}  # ops run → the versions taken there, in order
        for v, k in enumerate(s.switch_at, start=1):
            self.switches.setdefault(k, []).append(v)
        hyper, dev = experiment.hyper, engine.torch_device
        self.samplers = {b: Sampler(experiment.seed, b, call, hyper.temperature, w.greedy)
                         for b in range(options.iterations)}
        self.batch_t, self.row_t = torch.as_tensor(s.batch, device=dev), torch.as_tensor(s.row, device=dev)
        self.gen_t = torch.as_tensor(self.gen, device=dev)
        self.iterations = options.iterations
        self.op = 0  # ops (forwards) run: a prefill or a decode step each
        self.since: float | None = None  # when the current iteration's share began
        self.emitted = Emitted() if options.return_streams else None
        if self.emitted is not None:
            self.emitted.versions[0] = _kept(engine.params)

    def advance(self, j: int, take_push: TakePush, emit: Emit) -> None:
        """Serve until iteration ``j`` is emitted (taking the pushes of the switch points on the
        way), then emit it; after the last iteration, run out the schedule and take the pushes
        of switch points past it."""
        if self.since is None:
            self.since = self.rec.now()
        rec, name, stage = self.rec, self.call.name, self.stage
        self.engine.mark = lambda op, mb: rec.fine(j, name, op, mb, stage)  # forwards until emission j: iteration j's
        self._run_to(self.stream.emit_op[j], j, take_push)
        outputs = self._outputs(j)
        self.rec.close(self.since, j, self.call.name, "compute", self.stage)
        emit(j, outputs)
        self.rec.close(self.since, j, self.call.name, "call", self.stage)
        self.since = self.rec.now()
        if j == self.iterations - 1:
            self._run_to(len(self.served.work.plan.steps), j, take_push)
            for k in sorted(self.switches):  # points at or past the schedule's end: not yet taken
                self._switch(k, take_push)
            self.engine.settle(self.served)
            if self.count is not None:
                self.count(j, 0.0)

    def _run_to(self, ops: int, j: int, take_push: TakePush) -> None:
        """Run forwards until ``ops`` have run, labelled iteration ``j`` (the next emission),
        each after the weights of the switch points reached; the switch at ``ops`` itself
        comes with the next forward."""
        steps = self.served.work.plan.steps
        while self.op < ops:
            self._switch(self.op, take_push)
            if steps[self.op].running >= 0 and self.count is not None:
                self.count(j, float(steps[self.op].running))
            self.engine.serve_step(self.served, 0, self.op, self._choose, self.exp.hyper.temperature)
            self.op += 1

    def _switch(self, k: int, take_push: TakePush) -> None:
        """Take the versions of switch point ``k`` (ops run), once."""
        for v in self.switches.pop(k, ()):
            self.engine.settle(self.served)  # no stage traffic in flight while the weights move
            self.engine.load(take_push(v))
            if self.emitted is not None:
                self.emitted.versions[v] = _kept(self.engine.params)

    def _choose(self, e: int, requests: Tensor, positions: Tensor, logits: Tensor) -> Tensor:
        """Each request's next token, by the sampler of the iteration it serves."""
        req = requests.to(self.batch_t.device)
        batch, rows, gen = self.batch_t[req], self.row_t[req], self.gen_t[req]
        positions = positions.to(batch.device)
        tok = torch.empty(len(req), dtype=torch.long, device=logits.device)
        for b in torch.unique(batch).tolist():
            at = batch == b
            sampler = self.samplers[b]
            if self.exp.params.variable:
                tok[at] = sampler.ending(rows[at], positions[at], gen[at], logits[at])
            else:
                tok[at] = sampler(rows[at], positions[at], logits[at])
        return tok

    def _outputs(self, j: int) -> dict[str, Pieces]:
        """Iteration ``j``'s outputs of this replica on the last stage: its requests ``consumed[j]``."""
        if not self.engine.last:
            return {}
        q = list(self.stream.consumed[j])
        prompt, gen = torch.as_tensor(self.prompt[q]), torch.as_tensor(self.gen[q])
        seq, logp = self.served.seq[q], self.served.logp[q]
        if self.emitted is not None:
            self.emitted.rows[j] = (self.range, seq.cpu(), logp.cpu())
        run = CallRun(self.exp, self.call, self.layout, self.device, j, self.engine, {},
                      span=lambda op: self.rec.span(j, self.call.name, op, self.stage), row_lengths=(prompt, gen))
        dtype = self.engine.dtype
        return generated(run, [(seq, logp)], lambda verify, s, _: verify.rows(s, prompt, gen, dtype))


def _kept(params: M.Params) -> M.Params:
    return {n: t.detach().cpu().clone() for n, t in params.items()}


def merge_emitted(results: dict[int, Emitted], experiment: Experiment, plan: Plan, call: str) -> Emitted:
    """One :class:`Emitted` of a whole run from every device's (device → its own): each
    iteration's rows in global order, each version's weights as full tensors."""
    rows: dict[int, dict[Range, tuple[Tensor, Tensor]]] = {}
    for em in results.values():
        for j, (rng, seq, logp) in em.rows.items():
            rows.setdefault(j, {})[rng] = (seq, logp)  # tensor-parallel ranks hold the same rows
    whole = {j: ((min(p)[0], max(p)[1]), torch.cat([p[r][0] for r in sorted(p)]),
                 torch.cat([p[r][1] for r in sorted(p)])) for j, p in rows.items()}
    model = experiment.models[experiment.workflow[call].role]
    shapes = {p.name: p.shape for p in param_inventory(model)}
    versions: dict[int, M.Params] = {}
    for device, em in results.items():
        boxes = shard(model, plan[call], device)
        for v, params in em.versions.items():
            out = versions.setdefault(v, {})
            for name, t in params.items():
                if name not in out:
                    out[name] = torch.empty(shapes[name], dtype=t.dtype)
                out[name][M.box_index(boxes[name])] = t
    return Emitted(whole, versions)
