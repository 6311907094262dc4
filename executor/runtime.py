"""Run K iterations of a workflow as a plan places it: one process per device.

Every process walks the same global order — the program of
:meth:`estimator.spec.workflow.Workflow.program`: iteration by iteration in topological order,
except that under staleness η an actor's generate call runs η slots ahead of the iteration that
trains on its rollouts (the estimator's one schedule) — and takes part in whatever involves its
device:

1. **realloc** — a model's weights live at its HOME layout (its train call's layout, else its
   first call's); a call on a differently sharded layout first receives its shards from home
   (:func:`executor.realloc.reallocate`; every device of home ∪ call takes part; shards a
   device already holds whole arrive as read-only views of its home shards) and drops them
   after the call. Only home shards are ever trained, so those views never change under a call.
   A home that shards its parameters over its data-parallel ranks (``shard="full"``) keeps
   chunks (:mod:`executor.zero`); a call reading it first all-gathers them on the home's
   devices, then moves the whole shards as from an unsharded home;
2. **data** — each input comes from the devices that hold the producer's output (its last
   stage), which pushed it the moment the producer finished (:mod:`executor.dataflow`); the
   call receives it when it starts. Source data (prompts, pairs) is built in place from
   (seed, iteration, row);
3. **compute** — the call itself (:mod:`executor.calls`); outputs stay on their holders until
   the iteration ends (kept per iteration: under staleness two iterations' are alive at once);
4. **push** — a generate call with a standing rollout copy (asynchronous, on devices apart from
   the actor's home: :func:`estimator.spec.plan.standing_copies`) keeps its weights between
   calls and never reallocates: the program's push instance ``push:<call>`` after each actor
   update moves the new weights home → copy (the reallocation above, every device of both
   taking part) and replaces the copy. The copy starts as the initial weights, built in place.
   So the rollouts of iteration j are generated with the weights after update j − η − 1
   whatever the plan, as a single process running the same program computes them;
5. **stream** — a standing copy that streams (``async.streaming``,
   :func:`estimator.spec.stream.streaming_calls`) instead serves every iteration's requests as
   one continuous-batching stream (:mod:`executor.stream`): at instance (j, call) its devices
   serve until iteration j's rows are emitted, taking the pushes inside the stream where the
   shared rule switches versions (they leave the push instances of the program to the home),
   and every call of iteration j reads its rows' lengths and prompts from the requests they
   hold (:func:`executor.stream.row_sources`).

A home that offloads (``Layout.offload`` of its train call, :mod:`executor.offload`) keeps its
optimizer state — and under ``all`` its parameters — in a host buffer between calls: the
devices of the home upload it before the train call and download it after (``offload`` spans
around the compute), and under ``all`` upload the parameters before another call of the role
reads them (at home; before the reallocation, on the home's devices) and free them after.

Steps that do not involve a device cost it nothing, so calls on disjoint meshes run
concurrently; a device waits only where data or weights must reach it. Each process records
spans ``(call, op, micro_batch, start, end)`` on a clock zeroed by a barrier at the start;
:func:`merge` joins them into one measured :class:`estimator.spec.timeline.Timeline`.

Initial weights depend only on (experiment seed, role) — see :func:`role_seed` — or come from
the role's Hugging Face checkpoint (:func:`initial_params`), so a run's numbers do not depend on
the plan.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from estimator.base.host import cpu_model
from estimator.spec.experiment import Experiment
from estimator.spec.plan import Layout, Plan, standing_copies
from estimator.spec.sharding import Box, dp_rows, param_inventory, shard
from estimator.spec.stream import streaming_calls
from estimator.spec.timeline import Sample, Span, Timeline
from estimator.spec.workflow import PUSH, SOURCES, Call, push_target
from executor import model as M
from executor.calls import CallRun, Pieces, row_spec, run_call
from executor.comm import GroupRegistry, build_groups
from executor.data import Source, name_key, source_for
from executor.dataflow import Mailbox, Outbox, gather_input, input_plan, message_schedule, send_order
from executor.engine import Engine
from executor.hf import load_hf
from executor.offload import Offloader
from executor.optim import ShardAdam
from executor.options import RunOptions
from executor.realloc import reallocate
from executor.recorder import Recorder
from executor.stream import Emitted, StreamServer, merge_emitted, row_sources, source_rows
from executor.zero import FullShard, ZeroAdam, shard_chunks

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
FAULT_EXIT_CODE = 13  # exit status of a process stopped by fault injection
# The reference starts as the actor and the critic as the reward model (InstructGPT's recipe),
# so their initial weights share a seed.
INIT_FROM = {"ref": "actor", "critic": "reward"}


def role_seed(experiment_seed: int, role: str) -> int:
    """Seed of a role's initial weights (ref shares the actor's, critic the reward model's)."""
    return experiment_seed * 1_000_003 + name_key(INIT_FROM.get(role, role)) % 1_000_003


def initial_params(experiment: Experiment, role: str, boxes: dict[str, Box], dtype: torch.dtype) -> M.Params:
    """The slices ``boxes`` (name → global box) of a role's initial weights.

    They come from the role's Hugging Face checkpoint when the experiment names one (only those
    slices are read), else from :func:`role_seed`. A value model whose checkpoint has no value
    head (a critic started from a language model) gets a seeded head."""
    model, seed = experiment.models[role], role_seed(experiment.seed, role)
    ckpt = experiment.checkpoints.get(role)
    if ckpt is None:
        return M.init_boxes(model, boxes, seed, dtype)
    _, loaded = load_hf(ckpt, dtype, model, boxes, fresh_head=True)
    loaded.update(M.init_boxes(model, {n: b for n, b in boxes.items() if n not in loaded}, seed, dtype))
    return {n: loaded[n] for n in boxes}


def home_layouts(experiment: Experiment, plan: Plan) -> dict[str, Layout]:
    """role → home layout: the layout of its home call (:meth:`Workflow.home_calls`)."""
    return {role: plan[call] for role, call in experiment.workflow.home_calls().items()}


def group_layouts(experiment: Experiment, plan: Plan) -> list[Layout]:
    """Every layout whose process groups the run needs, in a fixed order."""
    order = experiment.workflow.topological_order()
    return list(dict.fromkeys([plan[c] for c in order] + list(home_layouts(experiment, plan).values())))


@dataclass
class RankResult:
    """What one process brings back."""

    device: int
    spans: list[Span]
    losses: dict[tuple[int, str, int], float]  # (iteration, call, minibatch) → loss summed here
    params: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # role → home shards
    counters: list[Sample] = field(default_factory=list)  # e.g. generate calls' running batches
    streams: dict[str, Emitted] = field(default_factory=dict)  # streaming call → what it emitted here (tests)


class RankRuntime:
    """The part of a run one device plays."""

    def __init__(self, experiment: Experiment, plan: Plan, device: int, world_size: int, options: RunOptions,
                 torch_device: torch.device, status: Callable[[str], None]):
        self.exp, self.plan, self.device, self.options = experiment, plan, device, options
        self.torch_device, self.status = torch_device, status
        self.dtype = DTYPES[options.dtype]
        self.dpn = experiment.cluster.devices_per_node
        self.homes = home_layouts(experiment, plan)
        self.source: Source = source_for(experiment)
        self._source_it, self._source_all = -1, torch.empty(0)
        timeout = timedelta(seconds=options.timeout_s) if options.timeout_s else None
        self.groups: GroupRegistry = build_groups(group_layouts(experiment, plan), world_size, timeout=timeout)
        wf = experiment.workflow
        self.params = {role: self._init(role) for role, home in self.homes.items() if self._in(home)}
        trained = wf.trained_roles()
        self.optimizers = {role: self._optimizer(role, p) for role, p in self.params.items() if role in trained}
        # a home that offloads starts with its state in the host buffer, where it stays between calls
        self.offloaders = {role: Offloader(self.homes[role].offload, p, self.optimizers[role])
                           for role, p in self.params.items() if role in trained and self.homes[role].offload != "none"}
        for off in self.offloaders.values():
            off.download(off.state())
        self.standing = standing_copies(wf, plan)
        self.program = wf.program(options.iterations, self.standing)
        # generate call → this device's part of its standing copy
        self.copies = {c: self._init_copy(c) for c in sorted(self.standing) if self._in(plan[c])}
        # streaming rollouts (executor.stream): the calls that stream, the server of each one this
        # device serves (made when the stream starts), and where each iteration's rollout rows come from
        self.streaming = streaming_calls(experiment, plan)
        self.servers: dict[str, StreamServer] = {}
        self.row_sources = row_sources(experiment, plan, options)
        self.store: dict[int, dict[str, Pieces]] = {}  # iteration → outputs held here
        self.schedule = message_schedule(experiment, plan)
        self.input_plans = {(c.name, d): input_plan(experiment, plan, c.name, d)
                            for c in experiment.workflow.calls for d in c.inputs if d not in SOURCES}
        # Call outputs travel on a group of their own (see executor.dataflow).
        data_group = dist.new_group(list(range(world_size)), timeout=timeout) if world_size > 1 else None
        specs = {d: row_spec(d, experiment, self.dtype) for c in experiment.workflow.calls for d in c.inputs}
        self.outbox = Outbox(device, data_group)
        ahead = data_group is not None and dist.get_backend(data_group) == "gloo"
        self.mailbox = Mailbox(device, self.schedule, send_order(wf, self.program), specs, data_group, torch_device,
                               ahead)
        self.losses: dict[tuple[int, str, int], float] = {}
        self.rec: Recorder | None = None

    def _in(self, layout: Layout) -> bool:
        return self.device in layout.mesh.devices

    def _init(self, role: str) -> M.Params:
        """This device's home parameters of ``role``: its shards, or their chunks where the home
        shards them over its data-parallel ranks (:func:`executor.zero.shard_chunks`)."""
        model, home = self.exp.models[role], self.homes[role]
        boxes = shard(model, home, self.device)
        params = {n: t.to(self.torch_device) for n, t in initial_params(self.exp, role, boxes, self.dtype).items()}
        return shard_chunks(model, home, self.device, params) if home.sharded else params

    def _init_copy(self, call: str) -> M.Params:
        """This device's shards of ``call``'s standing copy before the first push: the initial
        weights (a pure function of seed and role, or the checkpoint), built in place."""
        role = self.exp.workflow[call].role
        boxes = shard(self.exp.models[role], self.plan[call], self.device)
        return {n: t.to(self.torch_device) for n, t in initial_params(self.exp, role, boxes, self.dtype).items()}

    def _optimizer(self, role: str, params: M.Params) -> ShardAdam | ZeroAdam:
        """Adam over the home parameters; over this rank's chunk of them under ``shard="optimizer"``."""
        home = self.homes[role]
        if home.shard == "optimizer" and home.dp > 1:
            return ZeroAdam(params, self.exp.hyper.lr, self.groups.dp(home, self.device), home.dp,
                            home.coords(self.device)[0])
        return ShardAdam(params, self.exp.hyper.lr)

    def _whole(self, role: str) -> M.Params:
        """This device's home shards of ``role``, whole: gathered over the home's data-parallel
        group where the home shards them (every device of the home takes part)."""
        home, params = self.homes[role], self.params[role]
        if not home.sharded:
            return params
        return FullShard(self.exp.models[role], home, self.device, params, self.groups.dp(home, self.device)).whole()

    def run(self) -> RankResult:
        dist.barrier()
        self.rec = Recorder(self.device, self.torch_device)
        wf, nodes = self.exp.workflow, self.program
        # The last stage of the last call in topological order ends (close to) every iteration.
        final = self.plan[wf.topological_order()[-1]]
        reporter = self.options.progress and self.device == final.device(0, 0, final.pp - 1)
        last = {node.iteration: i for i, node in enumerate(nodes)}  # iterations end in order
        for i, node in enumerate(nodes):
            if i == 0 or wf.slot(nodes[i - 1]) != wf.slot(node):
                self.mailbox.post_slot(wf.slot(node))
            target = push_target(node.call)
            if node.call in self.streaming and self._in(self.plan[node.call]):
                self.run_stream(node.iteration, node.call)
            elif target is None:
                self.run_call(node.iteration, wf[node.call])
            elif not (target in self.streaming and self._in(self.plan[target])):  # a stream takes its own
                self.run_push(node.iteration, target)
            if last[node.iteration] == i:
                self.store.pop(node.iteration, None)  # every consumer of this iteration's data here is done
                self.outbox.wait(before=node.iteration)  # bound the send buffers alive
                if reporter:
                    print(f"iteration {node.iteration + 1}/{self.options.iterations} done "
                          f"after {time.perf_counter() - self.rec.t0:.2f} s", file=sys.stderr, flush=True)
        self.outbox.wait()
        self.status("finished")
        params = {}
        if self.options.return_params:
            for off in self.offloaders.values():  # the final weights, from the host buffer where offloaded
                off.upload(off.weights())
            params = {r: {n: t.detach().cpu() for n, t in self._whole(r).items()} for r in self.params}
        streams = {c: srv.emitted for c, srv in self.servers.items() if srv.emitted is not None}
        return RankResult(self.device, self.rec.finish(), self.losses, params, self.rec.counters, streams)

    # -- one call

    def run_call(self, it: int, call: Call) -> None:
        layout, home = self.plan[call.name], self.homes[call.role]
        standing = call.name in self.standing
        realloc = not standing and not layout.same_placement(home)
        if not (self._in(layout) or (realloc and self._in(home))):
            return
        self.status(f"call {call.name} (iteration {it})")
        stage = layout.coords(self.device)[2] if self._in(layout) else -1
        off = self.offloaders.get(call.role) if self._in(home) else None
        with self.rec.span(it, call.name, "call", stage):
            if standing:
                params = self.copies[call.name]
            elif realloc:
                self._host(it, call.name, stage, off, "upload", off.weights() if off else [])
                with self.rec.span(it, call.name, "realloc"):
                    params = self._move(call.role, layout)
                if off:  # sent: the host copy is current
                    off.drop(off.weights())
            else:
                params = self.params.get(call.role)
            if self._in(layout):
                inputs = self._inputs(it, call, layout)
                train = call.kind == "train"
                reads = off is not None and not realloc and not standing  # the home, here
                if reads:  # the train call has all its state back; another call the weights
                    self._host(it, call.name, stage, off, "upload", off.state() if train else off.weights())
                self._compute(it, call, layout, params, inputs, stage)
                if reads:
                    if train:
                        self._host(it, call.name, stage, off, "download", off.state())
                    else:
                        off.drop(off.weights())

    def _host(self, it: int, name: str, stage: int, off: Offloader | None, what: str, tensors: list[Tensor]) -> None:
        """Move ``tensors`` of an offloading home between the host buffer and the device
        (``what``: upload or download), as an ``offload`` span of call ``name`` when anything moves."""
        if off is None or not tensors:
            return
        with self.rec.span(it, name, "offload", stage):
            (off.upload if what == "upload" else off.download)(tensors)

    def run_push(self, it: int, target: str) -> M.Params | None:
        """The push of update ``it`` to ``target``'s standing copy: every device of the home and
        the copy takes part; spans ``call`` and ``push`` under call ``push:<target>``. Returns
        this device's shards of the new copy (None off the copy)."""
        role = self.exp.workflow[target].role
        layout, home = self.plan[target], self.homes[role]
        if not (self._in(layout) or self._in(home)):
            return None
        name = PUSH + target
        self.status(f"call {name} (iteration {it})")
        stage = (layout if self._in(layout) else home).coords(self.device)[2]
        off = self.offloaders.get(role) if self._in(home) else None
        with self.rec.span(it, name, "call", stage):
            self.copies.pop(target, None)  # generation pauses for the push: the old copy is done with
            self._host(it, name, stage, off, "upload", off.weights() if off else [])  # offload="all": sent from here
            with self.rec.span(it, name, "push", stage):
                copy = self._move(role, layout)
            if off:  # sent: the host copy is current
                off.drop(off.weights())
            if copy is not None:
                self.copies[target] = copy
        return copy

    def run_stream(self, it: int, name: str) -> None:
        """Instance (``it``, ``name``) of a streaming generate call on a device of its copy: the
        stream served until iteration ``it`` is emitted (:class:`executor.stream.StreamServer`),
        its outputs posted as a call's are."""
        self.status(f"call {name} (iteration {it}, streaming)")
        if self._faulted(name, it):
            os._exit(FAULT_EXIT_CODE)
        server = self.servers.get(name)
        if server is None:
            layout = self.plan[name]
            engine = Engine(self.exp.models[self.exp.workflow[name].role], layout, self.device, self.copies[name],
                            self.groups, self.torch_device)
            dp_rank = layout.coords(self.device)[0]
            count = None
            if self.device == layout.device(dp_rank, 0, 0):  # the replica's first device
                count = lambda i, value: self.rec.sample(i, name, "running", value)  # noqa: E731
            server = self.servers[name] = StreamServer(self.exp, self.plan, name, self.device, self.options, engine,
                                                       self.source, self.rec, count)
        server.advance(it, lambda v: self.run_push(v - 1, name), lambda j, out: self._post(j, name, out))

    def _faulted(self, call: str, it: int) -> bool:
        """Whether fault injection (``RunOptions.fault``) stops this rank at this call's compute."""
        fault = self.options.fault
        return fault is not None and tuple(fault[:2]) == (self.device, call) and (len(fault) < 3 or fault[2] == it)

    def _post(self, it: int, name: str, outputs: dict[str, Pieces]) -> None:
        """Keep a call's outputs of iteration ``it`` here and push them to their consumers."""
        if not outputs:
            return
        held = self.store.setdefault(it, {})
        held.update(outputs)
        with self.rec.span(it, name, "data"):
            self.outbox.push(it, [m for m in self.schedule if m.producer == name], held)

    def _move(self, role: str, layout: Layout) -> M.Params | None:
        """``role``'s weights from its home to ``layout`` (:func:`executor.realloc.reallocate`;
        every device of both calls it): this device's shards under ``layout``, or None."""
        home = self.homes[role]
        params = self._whole(role) if self._in(home) else None
        whole = dataclasses.replace(home, shard="none")
        if home.sharded and whole.same_placement(layout):  # the all-gather was the whole move
            return params if self._in(layout) else None
        return reallocate(self.exp.models[role], whole, params, layout, self.device, self.dpn, self.dtype,
                          self.torch_device)

    def _inputs(self, it: int, call: Call, layout: Layout) -> dict[str, Pieces]:
        """Source rows built here; produced rows copied or received (waiting for producers)."""
        rows = dp_rows(call, layout, layout.coords(self.device)[0])
        inputs = {name: [(r, self._source_rows(it, *r)) for r in rows]
                  for name in call.inputs if name in SOURCES}
        produced = [name for name in call.inputs if name not in SOURCES]
        if produced:
            with self.rec.span(it, call.name, "data"):
                for name in produced:
                    inputs[name] = gather_input(self.input_plans[(call.name, name)], self.device, it, call.name,
                                                name, self.store.get(it, {}), self.mailbox)
        return inputs

    def _source_rows(self, it: int, lo: int, hi: int) -> Tensor:
        """Rows ``[lo, hi)`` of iteration ``it``'s source data, built once per iteration on this
        device and sliced for every call that reads them (not rebuilt call by call)."""
        if self._source_it != it:
            self._source_it = it
            src = self.row_sources.get(it)  # a streaming rollout's rows: each that of its request
            rows = (source_rows(self.source, src.batch, src.row) if src is not None
                    else self.source.rows(it, 0, self.source.rows_per_iteration))
            self._source_all = rows.to(self.torch_device)
        return self._source_all[lo:hi]

    def _compute(self, it: int, call: Call, layout: Layout, params: M.Params, inputs: dict, stage: int) -> None:
        if self._faulted(call.name, it):
            os._exit(FAULT_EXIT_CODE)
        engine = Engine(self.exp.models[call.role], layout, self.device, params, self.groups, self.torch_device,
                        mark=lambda op, mb: self.rec.fine(it, call.name, op, mb, stage))
        dp_rank, tp_rank, _ = layout.coords(self.device)
        count = None
        if call.kind == "generate" and self.device == layout.device(dp_rank, 0, 0):  # the replica's first device
            count = lambda value: self.rec.sample(it, call.name, "running", value)  # noqa: E731
        src = self.row_sources.get(it)
        run = CallRun(self.exp, call, layout, self.device, it, engine, inputs,
                      span=lambda op: self.rec.span(it, call.name, op, stage),
                      kv_tokens=self.options.kv_tokens.get(call.name, 0), count=count,
                      row_lengths=src.lengths() if src is not None else None)
        with self.rec.span(it, call.name, "compute", stage):
            outputs = run_call(run, self.optimizers.get(call.role))
        self._post(it, call.name, outputs)
        if tp_rank == 0:  # tensor-parallel ranks share one loss; count it once
            for k, loss in enumerate(run.losses):
                self.losses[(it, call.name, k)] = loss


# ---- merging what the processes bring back -----------------------------------------------------


@dataclass
class RunResult:
    """A whole run: the measured timeline, the train losses and (on request) the final weights."""

    timeline: Timeline
    warmup: int  # iterations left out of the steady-state time
    losses: dict[tuple[int, str, int], float]  # (iteration, call, minibatch) → minibatch loss
    params: dict[str, dict[str, Tensor]]  # role → full tensors (empty unless requested)
    drain: int = 0  # trailing iterations left out of the steady-state time
    streams: dict[str, Emitted] = field(default_factory=dict)  # streaming call → its emitted rows (on request)

    def _calls(self) -> Timeline:
        """The timeline without weight pushes: an iteration ends with its last call, as the
        simulator's iteration time counts it (:attr:`estimator.sim.simulator.SimResult.iteration_s`)."""
        return Timeline.of(s for s in self.timeline.spans if push_target(s.call) is None)

    @property
    def iteration_s(self) -> float:
        """Steady-state time per iteration (after the warm-up iterations, before the drain)."""
        return self._calls().steady_state_s(self.warmup, self.drain)

    @property
    def iterations_s(self) -> list[float]:
        return self._calls().iteration_times()

    def call_stats(self) -> dict[str, dict[str, float]]:
        """call → seconds, averaged over the steady iterations (after the warm-up, before the
        drain); a weight push ``push:<call>`` is one too:

        - ``duration_s``: first compute start to last compute end over the call's devices; of a
          push, the transfer itself: from when its last device joins to when its last is done
          (a device that joins early waits in it for the other side);
        - ``span_s``: first entry to last exit, including waiting for inputs and weights;
        - ``realloc_s``, ``data_s``: the longest time any device spent receiving weights or
          moving inputs (waiting for a busy producer included).
        """
        its = self.timeline.iterations
        end = len(its) - self.drain if len(its) > self.warmup + self.drain else len(its)
        steady = set(its[self.warmup:end] or its)
        per: dict[tuple[int, str], dict[str, Any]] = {}
        for s in self.timeline.spans:
            if s.iteration not in steady:
                continue
            d = per.setdefault((s.iteration, s.call),
                               {"compute": [], "call": [], "push": [], "realloc": {}, "data": {}})
            if s.op in ("compute", "call", "push"):
                d[s.op].append((s.start_s, s.end_s))
            elif s.op in ("realloc", "data"):
                d[s.op][s.device] = d[s.op].get(s.device, 0.0) + s.duration_s
        out: dict[str, dict[str, list[float]]] = {}
        for (_, call), d in per.items():
            acc = out.setdefault(call, {"duration_s": [], "span_s": [], "realloc_s": [], "data_s": []})
            acc["duration_s"].append(_joined(d["push"]) if d["push"] else _extent(d["compute"]))
            acc["span_s"].append(_extent(d["call"]))
            acc["realloc_s"].append(max(d["realloc"].values(), default=0.0))
            acc["data_s"].append(max(d["data"].values(), default=0.0))
        return {c: {k: sum(v) / len(v) for k, v in acc.items()} for c, acc in out.items()}


def _extent(intervals: list[tuple[float, float]]) -> float:
    return max(e for _, e in intervals) - min(s for s, _ in intervals) if intervals else 0.0


def _joined(intervals: list[tuple[float, float]]) -> float:
    """From the last start to the last end: the time a transfer takes once all its devices are in."""
    return max(0.0, max(e for _, e in intervals) - max(s for s, _ in intervals))


def host_info(gpu: bool = False) -> dict[str, str]:
    """What the run measured on (a timeline's ``meta.host``): the CPU model and torch version,
    and with ``gpu`` the GPU model in use, so a comparison can tell whether the profile it
    predicts with was measured on the same kind of machine."""
    info = {"cpu": cpu_model(), "torch": torch.__version__}
    if gpu and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.cuda.current_device())
    return info


def merge(results: list[RankResult], experiment: Experiment, plan: Plan, options: RunOptions,
          **meta: Any) -> RunResult:
    """One timeline, summed losses and full parameters from every process's result."""
    spans = [s for r in results for s in r.spans]
    counters = sorted((c for r in results for c in r.counters), key=lambda c: (c.t_s, c.device))
    timeline = Timeline.of(spans, source="measured", counters=counters, experiment=experiment.name, dtype=options.dtype,
                           warmup_iterations=options.warmup, drain_iterations=options.drain,
                           max_staleness=experiment.workflow.staleness, host=host_info(meta.get("backend") == "nccl"),
                           plan={c: lay.to_dict() for c, lay in plan.layouts.items()}, **meta)
    losses: dict[tuple[int, str, int], float] = {}
    for r in results:
        for key, value in r.losses.items():
            losses[key] = losses.get(key, 0.0) + value
    streams = {c: merge_emitted({r.device: r.streams[c] for r in results if c in r.streams}, experiment, plan, c)
               for c in sorted({c for r in results for c in r.streams})}
    return RunResult(timeline, options.warmup, losses, assemble_params(results, experiment, plan), options.drain,
                     streams)


def assemble_params(results: list[RankResult], experiment: Experiment, plan: Plan) -> dict[str, dict[str, Tensor]]:
    """Full tensors of each role from the home shards the processes sent back."""
    homes = home_layouts(experiment, plan)
    full: dict[str, dict[str, Tensor]] = {}
    for r in results:
        for role, shards in r.params.items():
            model = experiment.models[role]
            boxes = shard(model, homes[role], r.device)
            shapes = {p.name: p.shape for p in param_inventory(model)}
            out = full.setdefault(role, {})
            for name, t in shards.items():
                if name not in out:
                    out[name] = torch.empty(shapes[name], dtype=t.dtype)
                out[name][M.box_index(boxes[name])] = t
    return full


def run_rank(rank: int, world_size: int, status: Callable[[str], None], experiment: Experiment, plan: Plan,
             options: RunOptions, torch_device: torch.device | None = None) -> RankResult:
    """This process's part of the run; the default process group must be initialised."""
    torch_device = torch_device or torch.device("cpu")
    return RankRuntime(experiment, plan, rank, world_size, options, torch_device, status).run()
