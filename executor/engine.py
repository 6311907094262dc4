"""One model on one device under one layout: forward, 1F1B training step, KV-cached generation.

The parallelisms compose in a fixed order (torchtitan's ``parallelize_llama``):

1. pipeline — the stage owns blocks ``Layout.stage_layers``; the first stage embeds tokens,
   others receive activations from the previous stage; the last applies the final norm and
   head, others send activations on (:func:`estimator.spec.schedule.schedule_1f1b` orders training,
   :func:`estimator.spec.schedule.generation_rounds` generation);
2. tensor — inside the stage, Megatron's f/g operators around column- and row-parallel
   projections (:func:`tensor_parallel_hooks`), a vocab-parallel embedding and an LM head
   gathered over the vocabulary (:class:`TensorParallel`);
3. data — after the backward passes, gradients are summed over replicas
   (:func:`reduce_gradients`, which first joins the two copies of tied embeddings); under
   ``shard="optimizer"`` the optimizer reduce-scatters them instead, and under ``shard="full"``
   every group of parameters is gathered when a pass needs it and its gradients
   reduce-scattered as soon as they are complete (:class:`executor.zero.FullShard`).

Generation runs as micro-batched rounds of one KV cache each (:meth:`Engine.generate`) or, with
continuous batching, as virtual engines over KV pools that follow
:func:`estimator.spec.batching.schedule` forward by forward (:meth:`Engine.serve`, planned by
:mod:`executor.serving`). The model code (:mod:`executor.model`) stays free of all three. The engine times each
micro-batch's compute on its stage through ``mark`` (``forward``, ``backward``, ``prefill``,
``decode`` and the gradient ``dp_allreduce``), leaving out the waits for a neighbour's data.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.schedule import FORWARD, PREFILL, generation_rounds, schedule_1f1b
from estimator.spec.sharding import ENDS, box_shape, flat_chunk, shard, shard_groups
from executor import model as M
from executor.comm import (
    GroupRegistry,
    StageLink,
    all_reduce_sum,
    copy_to_region,
    gather_from_region,
    reduce_from_region,
    vocab_parallel_embed,
)
from executor.serving import EnginePlan, Step
from executor.zero import FullShard

LossFn = Callable[[int, Tensor], Tensor]
# (engine, requests (B,), response positions (B,), logits (B, V)) → tokens (B,)
ServeChooseFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]
CountFn = Callable[[float], None]
ChooseFn = Callable[[int, int, Tensor], Tensor]
MarkFn = Callable[[str, int], AbstractContextManager]  # (op, micro-batch) → a timed block
CPU = torch.device("cpu")


def _no_mark(op: str, micro_batch: int) -> AbstractContextManager:
    return nullcontext()


# ---- 1. pipeline ------------------------------------------------------------------------------


# ---- 2. tensor ---------------------------------------------------------------------------------


def tensor_parallel_hooks(group: dist.ProcessGroup | None) -> M.TPHooks:
    """f before column-parallel projections, g after row-parallel ones."""
    if group is None:
        return M.NO_TP
    return M.TPHooks(enter=lambda x: copy_to_region(x, group), exit=lambda y: reduce_from_region(y, group))


@dataclass(frozen=True)
class TensorParallel:
    """The ends of the model under tensor parallelism: vocab-parallel embedding and LM head."""

    model: ModelSpec
    group: dist.ProcessGroup | None
    vocab_start: int  # first vocabulary row of this rank's embedding / head slice

    def embed(self, params: M.Params, tokens: Tensor, start: int = 0, positions: Tensor | None = None) -> Tensor:
        """Token embedding (summed over the vocabulary split), plus learned positions from
        ``start`` or at ``positions`` (replicated: every rank adds the same rows after the all-reduce)."""
        if self.group is None:
            return M.embed(params, tokens, start, positions)
        x = vocab_parallel_embed(params["embed_tokens.weight"], tokens, self.vocab_start, self.group)
        return M.add_positions(params, x, start, positions)

    def final(self, params: M.Params, x: Tensor) -> Tensor:
        """Logits over the full vocabulary (B, T, V), or values (B, T)."""
        x = M.final_norm(params, x, self.model)
        if self.model.head == "value":
            return M.head(params, x, self.model)  # replicated: every rank computes the same values
        local = M.head(params, copy_to_region(x, self.group), self.model)  # (B, T, V/tp)
        return gather_from_region(local, self.group)  # (B, T, V)

    @property
    def hooks(self) -> M.TPHooks:
        return tensor_parallel_hooks(self.group)


# ---- 3. data -----------------------------------------------------------------------------------


def reduce_gradients(params: M.Params, model: ModelSpec, embed_group: dist.ProcessGroup | None,
                     dp_group: dist.ProcessGroup | None) -> None:
    """Sum gradients: the tied embedding's first- and last-stage copies (one parameter in two
    places), then over data-parallel replicas (callers normalise losses by the global count)."""
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if model.tied_embeddings and "embed_tokens.weight" in params:
        all_reduce_sum([params["embed_tokens.weight"].grad], embed_group)
    all_reduce_sum([p.grad for p in params.values()], dp_group)


@dataclass(frozen=True)
class EngineWork:
    """One virtual engine's requests under continuous batching."""

    seqs: Tensor  # (n, prompt_cap + gen_cap): each prompt at 0 .. P−1, pads after
    prompt: Tensor  # (n,) prompt tokens of each request
    gen_cap: int  # response tokens at most
    plan: EnginePlan  # the forwards that run its schedule (executor.serving.engine_steps)


@dataclass
class Served:
    """A virtual engine while it serves (:meth:`Engine.open`, :meth:`Engine.serve_step`)."""

    work: EngineWork
    pool: M.KVPool
    seq: Tensor  # (n, width) its rows: prompts, then the tokens sampled so far
    logp: Tensor  # (n, gen_cap) float64: each sampled token's log-probability (last stage)
    owed: int = -1  # first stage of a pipeline: the step whose tokens the last stage still has to send


# ---- the engine --------------------------------------------------------------------------------


class Engine:
    """Runs one call's compute for ``model`` on global rank ``device`` under ``layout``.

    ``params`` are this device's shards (names and shapes of :func:`estimator.spec.sharding.shard`);
    the engine computes with these very tensors, so an optimizer over them sees the gradients.
    A train call whose layout shards its parameters (``layout.sharded``) is given instead its
    chunks of the groups of :func:`estimator.spec.sharding.shard_groups`, which it gathers as
    its passes need them (:class:`executor.zero.FullShard`).
    """

    def __init__(self, model: ModelSpec, layout: Layout, device: int, params: M.Params,
                 groups: GroupRegistry, torch_device: torch.device = CPU, mark: MarkFn = _no_mark):
        self.model, self.layout, self.device = model, layout, device
        self.mark = mark  # times one op of one micro-batch on this stage (see executor.recorder.Recorder)
        self.params = params
        self.torch_device = torch_device
        self.boxes = shard(model, layout, device)
        self.full = FullShard(model, layout, device, params, groups.dp(layout, device)) if layout.sharded else None
        if self.full is None:
            _check_params(params, self.boxes)
        else:
            _check_chunks(params, model, layout, device)
        self.dtype = next(iter(params.values())).dtype
        dp_rank, tp_rank, pp_rank = layout.coords(device)
        self.stage = pp_rank
        self.first, self.last = pp_rank == 0, pp_rank == layout.pp - 1
        self.layers = layout.stage_layers(model.layers, pp_rank)
        self.prev, self.next = groups.prev_stage(layout, device), groups.next_stage(layout, device)
        self.first_rank = layout.device(dp_rank, tp_rank, 0)
        self.last_rank = layout.device(dp_rank, tp_rank, layout.pp - 1)
        self.tp_root = layout.device(dp_rank, 0, pp_rank)
        self.tp_group = groups.tp(layout, device)
        self.dp_group = groups.dp(layout, device)
        tied_copies = model.tied_embeddings and layout.pp > 1 and (self.first or self.last)
        self.embed_group = groups.embed(layout, device) if tied_copies else None
        # The embedding and the LM head split the vocabulary alike.
        vocab_box = self.boxes.get("embed_tokens.weight") or self.boxes.get("lm_head.weight")
        self.tensor = TensorParallel(model, self.tp_group, vocab_box[0][0] if vocab_box else 0)
        self.link = StageLink()

    def load(self, params: M.Params) -> None:
        """Compute with ``params`` from now on: a standing rollout copy's new weights, the same
        shards (:mod:`executor.stream` swaps them between two forwards of a stream)."""
        if self.full is not None:
            raise ValueError("a layout that shards its parameters over data-parallel ranks cannot swap them")
        _check_params(params, self.boxes)
        self.params = params

    # -- one stage's computation: pipeline ends around tensor-parallel blocks

    def _stage(self, inp: Tensor, start: int, cache: M.KVCache | M.PoolPrefill | M.PoolDecode | None,
               last_position: bool = False, recompute: bool = False, positions: Tensor | None = None,
               last: Tensor | None = None) -> Tensor:
        """This stage's blocks; on the last stage also the head, on the last position only when
        ``last_position`` (generation needs no logits for the prompt's other positions), or on
        each row's own last position ``last`` (B,) (right-padded rows). ``positions`` (B,):
        one token per row at its own position (a decode step over a KV pool).
        ``recompute``: each block under activation checkpointing (a training forward whose
        layout recomputes); the tensor-parallel hooks run again with the block's forward."""
        ends = self._open(ENDS)
        if self.first:
            with self._saving(ENDS):
                x = self.tensor.embed(ends, inp, start, positions)
        else:
            x = inp
        ctx = M.context(self.model, start, x.shape[1], x.dtype, x.device, cache, self.tensor.hooks, positions)
        x = self._blocks(x, ctx, recompute)
        if not self.last:
            return x
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last][:, None]  # (B, 1, C)
        with self._saving(ENDS):
            return self.tensor.final(ends, x[:, -1:] if last_position else x)

    def _open(self, group: str) -> M.Params:
        """The parameters a pass uses: this device's shards, or under full sharding the whole
        tensors of a gathered group (:meth:`FullShard.open`)."""
        if self.full is None:
            return self.params
        return self.full.open(group) if group in self.full.groups else {}

    def _saving(self, group: str) -> AbstractContextManager:
        """Under full sharding, autograd keeps group ``group``'s tensors packed (gathered again in backward)."""
        if self.full is None or group not in self.full.groups:
            return nullcontext()
        return self.full.saving(group)

    def _blocks(self, x: Tensor, ctx: M.Context, recompute: bool) -> Tensor:
        """The stage's blocks, each gathered just before it runs under full sharding; under
        recompute the checkpointed block gathers its weights again when it re-runs."""
        if self.full is None:
            return M.blocks(self.params, self.layers, x, ctx, recompute)
        for i in self.layers:
            group = f"layers.{i}"
            if recompute:
                x = checkpoint(self._gathered_block, i, x, ctx, use_reentrant=False)
            else:
                with self._saving(group):
                    x = M.block(self.full.open(group), i, x, ctx)
            self.full.release(group)
        return x

    def _gathered_block(self, i: int, x: Tensor, ctx: M.Context) -> Tensor:
        return M.block(self.full.open(f"layers.{i}"), i, x, ctx)

    def _input(self, tokens: Tensor) -> Tensor:
        """Tokens on the first stage; the previous stage's activations (B, T, C) elsewhere."""
        if self.first:
            self.link.flush()
            return tokens.to(self.torch_device)
        b, t = tokens.shape
        return self.link.recv((b, t, self.model.hidden), self.dtype, self.torch_device, self.prev)

    # -- inference

    @torch.no_grad()
    def forward(self, micro_batches: list[Tensor]) -> list[Tensor] | None:
        """Logits (B, T, V) or values (B, T) per micro-batch on the last stage; None elsewhere."""
        outs = []
        for mb, tokens in enumerate(micro_batches):
            inp = self._input(tokens)
            with self.mark("forward", mb):
                y = self._stage(inp, 0, None)
            if self.last:
                outs.append(y)
            else:
                self.link.send(y, self.next)
        self.link.wait()
        return outs if self.last else None

    # -- training

    def forward_backward(self, micro_batches: list[Tensor], loss_fn: LossFn) -> float | None:
        """One 1F1B pass; this pass's gradients, summed over micro-batches and replicas, are
        added to each parameter's ``.grad``. Returns the summed loss on the last stage, None
        elsewhere."""
        earlier = {n: p.grad for n, p in self.params.items()}
        for p in self.params.values():
            p.requires_grad_(True)
            p.grad = None  # reduce only this pass's contribution over replicas
        saved: dict[int, tuple[Tensor, Tensor]] = {}
        losses = []
        for op, mb in schedule_1f1b(self.layout.pp, self.stage, len(micro_batches)):
            if op == FORWARD:
                saved[mb] = self._train_forward(mb, micro_batches[mb], loss_fn)
                if self.last:
                    losses.append(saved[mb][1].detach())
            else:
                self._train_backward(mb, *saved.pop(mb))
        self.link.wait()
        # under sharding the optimizer (ZeroAdam) or the passes (FullShard) reduce over replicas
        dp_group = self.dp_group if self.layout.shard == "none" else None
        if dp_group is not None or self.embed_group is not None:
            with self.mark("dp_allreduce", -1):
                reduce_gradients(self.params, self.model, self.embed_group, dp_group)
        for n, p in self.params.items():
            if self.full is not None and p.grad is None:  # a chunk no pass used
                p.grad = torch.zeros_like(p)
            if earlier[n] is not None:  # keep the caller's gradient tensors
                p.grad = earlier[n].add_(p.grad)
        return float(torch.stack(losses).sum()) if self.last else None

    def _train_forward(self, mb: int, tokens: Tensor, loss_fn: LossFn) -> tuple[Tensor, Tensor]:
        inp = self._input(tokens)
        if not self.first:
            inp.requires_grad_(True)
        if self.full is not None:
            self.full.begin("forward")
        with self.mark("forward", mb):
            out = self._stage(inp, 0, None, recompute=self.layout.recompute == "full")
            if self.last:
                return inp, loss_fn(mb, out)
        self.link.send(out, self.next)
        return inp, out

    def _train_backward(self, mb: int, inp: Tensor, out: Tensor) -> None:
        if self.last:
            self.link.flush()
            grad = None
        else:
            grad = self.link.recv(tuple(out.shape), out.dtype, self.torch_device, self.next)
        if self.full is not None:
            self.full.begin("backward")
        with self.mark("backward", mb):
            torch.autograd.backward(out, grad)
            if self.full is not None:
                self.full.end()
        if not self.first:
            self.link.send(inp.grad, self.prev)

    # -- generation

    @torch.no_grad()
    def generate(self, prompts: list[Tensor], gen_len: int, choose: ChooseFn,
                 temperature: float = 1.0) -> list[tuple[Tensor, Tensor]] | None:
        """KV-cached generation of ``gen_len`` tokens per sequence, micro-batches interleaved
        through the stages. Returns (sequences (B, P+gen_len), logp (B, gen_len)) per
        micro-batch on the last stage, None elsewhere; ``logp`` is each chosen token's
        log-probability under ``logits / temperature``."""
        caches = [M.KVCache(p.shape[1] + gen_len) for p in prompts]
        seqs = [p.to(self.torch_device) for p in prompts]
        logps: list[list[Tensor]] = [[] for _ in prompts]
        for step, rnd in enumerate(generation_rounds(len(prompts), gen_len)):
            for op, mb in rnd:
                prompt = prompts[mb]
                start = 0 if step == 0 else prompt.shape[1] + step - 1
                inp = self._gen_input(prompt, seqs[mb], step)
                with self.mark(op, mb):
                    y = self._stage(inp, start, caches[mb], last_position=True)
                    if self.last:
                        tok, logp = self._choose(mb, step, y[:, -1], choose, temperature)
                if not self.last:
                    self.link.send(y, self.next)
                    continue
                seqs[mb] = torch.cat((seqs[mb], tok[:, None]), dim=1)
                logps[mb].append(logp)
                if step + 1 < gen_len and not self.first:
                    self.link.send(tok[:, None], self.first_rank)
        self.link.wait()
        if not self.last:
            return None
        return [(s, torch.stack(lp, dim=1)) for s, lp in zip(seqs, logps)]

    @torch.no_grad()
    def serve(self, work: list[EngineWork], choose: ServeChooseFn, temperature: float = 1.0,
              count: CountFn | None = None) -> list[tuple[Tensor, Tensor]] | None:
        """Continuous batching (:mod:`executor.serving`): virtual engine ``e`` runs the forwards
        ``work[e].plan.steps`` over its own KV pool; round ``k`` runs step ``k`` of every engine
        that has one, so the engines interleave through the stages as micro-batches do. Returns
        (sequences (n, width), logp (n, gen_cap), 0 past each response) per engine on the last
        stage, None elsewhere; ``count(value)`` records the replica's running batch at the first
        decode step of every segment, and 0 once every engine is done."""
        served = [self.open(w) for w in work]
        running = [0] * len(work)  # each engine's decode batch, for the counter
        for k in range(max((len(w.plan.steps) for w in work), default=0)):
            for e, (w, s) in enumerate(zip(work, served)):
                if k >= len(w.plan.steps):
                    continue
                st = w.plan.steps[k]
                if st.running >= 0 and count is not None:
                    running[e] = st.running
                    count(float(sum(running)))
                self.serve_step(s, e, k, choose, temperature)
                if k + 1 == len(w.plan.steps) and count is not None:
                    running[e] = 0
                    count(float(sum(running)))
        self.link.wait()
        if not self.last:
            return None
        return [(s.seq, s.logp) for s in served]

    def open(self, work: EngineWork) -> Served:
        """A virtual engine about to run ``work.plan.steps``: its KV pool and its rows."""
        return Served(work, M.KVPool(work.plan.slots, work.plan.max_len), work.seqs.clone().to(self.torch_device),
                      torch.zeros(work.seqs.shape[0], work.gen_cap, dtype=torch.float64, device=self.torch_device))

    @torch.no_grad()
    def serve_step(self, s: Served, e: int, k: int, choose: ServeChooseFn, temperature: float = 1.0) -> None:
        """Forward ``k`` of virtual engine ``e`` (:meth:`serve`); on the last stage the tokens it
        samples go into ``s.seq`` and their log-probabilities into ``s.logp``."""
        w = s.work
        st = w.plan.steps[k]
        for src, dst, length in st.moves:
            s.pool.move(src, dst, length)
        inp = self._serve_input(s, st)
        req = torch.tensor(st.requests, dtype=torch.long, device=self.torch_device)
        # the KV length after the step, which is also where its new token goes
        at = torch.tensor(st.lengths, dtype=torch.long, device=self.torch_device)
        with self.mark(st.op, e):
            if st.op == PREFILL:
                y = self._stage(inp, 0, s.pool.prefill(st.first_slot), last=at - 1)
            else:
                y = self._stage(inp, 1, s.pool.decode(at, st.width), positions=at - 1)
            if self.last:
                pos = at - w.prompt[req]  # response position of each row's new token
                tok, logp = self._choose(e, pos, y[:, -1], lambda mb, p, lg: choose(mb, req, p, lg), temperature)
        more = k + 1 < len(w.plan.steps)
        if not self.last:
            self.link.send(y, self.next)
            s.owed = k if more and self.first else -1  # the last stage sends this step's tokens back
            return
        s.seq[req, at] = tok
        s.logp[req, pos] = logp.to(torch.float64)
        if more and not self.first:
            self.link.send(tok, self.first_rank)

    def settle(self, s: Served) -> None:
        """Bring a virtual engine to rest between two of its steps, so that other traffic
        between the stages (a weight push) cannot meet its messages: the first stage takes in
        the tokens the last step sampled, and every send completes."""
        self._take_tokens(s)
        self.link.wait()

    def _take_tokens(self, s: Served) -> None:
        """On the first stage, the tokens the engine's previous step sampled, from the last stage."""
        if s.owed < 0:
            self.link.flush()
            return
        prev, s.owed = s.work.plan.steps[s.owed], -1
        got = self.link.recv((len(prev.requests),), torch.long, self.torch_device, self.last_rank)
        s.seq[torch.tensor(prev.requests, device=self.torch_device),
              torch.tensor(prev.lengths, device=self.torch_device)] = got

    def _serve_input(self, s: Served, st: Step) -> Tensor:
        """A step's input: on the first stage its tokens (after taking in those the engine's
        previous step sampled, from the last stage), activations (B, T, C) elsewhere."""
        b = len(st.requests)
        if not self.first:
            t = st.width if st.op == PREFILL else 1
            return self.link.recv((b, t, self.model.hidden), self.dtype, self.torch_device, self.prev)
        self._take_tokens(s)
        req = torch.tensor(st.requests, dtype=torch.long, device=self.torch_device)
        if st.op == PREFILL:
            return s.seq[req, :st.width]  # (B, T): prompt and generated tokens, then the pads past each
        lengths = torch.tensor(st.lengths, dtype=torch.long, device=self.torch_device)
        return s.seq[req, lengths - 1][:, None]  # (B, 1): each row's last token

    def _gen_input(self, prompt: Tensor, seq: Tensor, step: int) -> Tensor:
        """The prompt first, then the token chosen last step (from the last stage, or held
        here when this stage is also the last); activations on later stages."""
        b, p = prompt.shape
        if not self.first:
            return self.link.recv((b, p if step == 0 else 1, self.model.hidden), self.dtype, self.torch_device,
                                  self.prev)
        if step > 0 and not self.last:
            return self.link.recv((b, 1), torch.long, self.torch_device, self.last_rank)
        self.link.flush()
        return prompt.to(self.torch_device) if step == 0 else seq[:, -1:]

    def _choose(self, mb: int, step: int, logits: Tensor, choose: ChooseFn,
                temperature: float) -> tuple[Tensor, Tensor]:
        """Next tokens (B,) and their log-probabilities (B,) from logits (B, V), one
        log-softmax per step. Tensor-parallel ranks adopt the choice of their first rank, so
        sampling cannot diverge between them."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        tok = choose(mb, step, logits).to(device=self.torch_device, dtype=torch.long).contiguous()
        if self.tp_group is not None:
            dist.broadcast(tok, self.tp_root, group=self.tp_group)
        scaled = logits if temperature == 1.0 else logits / temperature
        logp = torch.log_softmax(scaled, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
        return tok, logp


def _check_chunks(chunks: M.Params, model: ModelSpec, layout: Layout, device: int) -> None:
    """Fully sharded parameters must be the chunks of :func:`estimator.spec.sharding.shard_groups`."""
    boxes = shard(model, layout, device)
    want = {g: flat_chunk(sum(int(torch.Size(box_shape(boxes[n])).numel()) for n in names), layout.dp)
            for g, names in shard_groups(model, layout, device).items()}
    got = {g: int(t.numel()) for g, t in chunks.items()}
    if got != want:
        raise ValueError(f"engine chunks do not match the layout's shard groups: {got} != {want}")


def _check_params(params: M.Params, boxes: dict) -> None:
    """The shards must be exactly those :func:`estimator.spec.sharding.shard` names, box shapes."""
    problems = [f"missing {n!r}" for n in boxes if n not in params]
    problems += [f"unexpected {n!r}" for n in params if n not in boxes]
    for n, box in boxes.items():
        want = box_shape(box)
        if n in params and tuple(params[n].shape) != want:
            problems.append(f"{n!r} has shape {list(params[n].shape)}, expected {list(want)}")
    if problems:
        raise ValueError("engine params do not match the layout's shards: " + "; ".join(problems))
