"""The model function calls of every workflow preset, on top of :class:`executor.engine.Engine`.

A call runs on each device of its layout with the rows that device holds (its data-parallel
rows, :func:`estimator.spec.sharding.dp_rows`), split into the micro-batches of
:func:`estimator.spec.sharding.micro_batch_rows`; outputs come out on the last pipeline stage.

- **generate** — KV-cached decoding of exactly ``gen_len`` tokens; tokens come from
  :class:`executor.data.Sampler` (Gumbel-max keyed by global row, or argmax for greedy calls);
  writes the sequences and, for sampling calls whose old log-probs are not recomputed, their
  log-probabilities (at the sampling temperature); under a verifier (``models.reward: rule``)
  the last stage then scores its sequences (:class:`executor.verifier.Verifier`, a ``reward``
  span) and writes the rewards too.
- **inference** — one forward: response log-probs (LM heads: the reference's ``ref_logp``, or
  the actor's ``old_logp`` when recomputed, both at the policy temperature), per-token values
  (critic) or one score per sequence (reward model).
- **train** — one Adam step per minibatch. The loss of each micro-batch is divided by the
  count of the *whole minibatch* (tokens, or pairs for DPO and reward models) and the engine
  sums gradients over data-parallel replicas, so every plan takes the same step. Advantages
  are computed on the train call's last stage from each sequence's own data
  (:mod:`executor.rlhf`); GRPO normalises over groups from the full rewards vector, which the
  runtime delivers whole to every device of the call.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from estimator.spec.experiment import Experiment
from estimator.spec.plan import Layout
from estimator.spec.sharding import Range, budget_micro_batches, dp_rows, micro_batch_rows
from estimator.spec.workflow import Call
from executor import rlhf
from executor.data import PAD_ID, Sampler
from executor.engine import Engine, EngineWork
from executor.optim import ShardAdam
from executor.realloc import gather_rows
from executor.serving import engine_limits, engine_steps
from executor.verifier import Verifier
from executor.zero import ZeroAdam

Pieces = list[tuple[Range, Tensor]]  # (global row range, those rows)
TOKENS = frozenset({"prompts", "pairs", "seq", "seq_greedy"})
PER_TOKEN = frozenset({"old_logp", "ref_logp", "values"})
PER_SEQUENCE = frozenset({"rewards", "rewards_greedy"})
# Policy log-probs are taken at the sampling temperature in the algorithms that sample.
SAMPLING_ALGORITHMS = frozenset({"ppo", "grpo", "remax"})


def row_spec(name: str, experiment: Experiment, dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape of one row of data ``name`` and its dtype."""
    p = experiment.params
    if name in TOKENS:
        width = p.prompt_len if name == "prompts" and experiment.algorithm != "sft" else p.prompt_len + p.gen_len
        return (width,), torch.int64
    if name in PER_TOKEN:
        return (p.gen_len,), dtype
    if name in PER_SEQUENCE:
        return (), dtype
    raise KeyError(f"unknown data {name!r}")


def policy_temperature(experiment: Experiment) -> float:
    return experiment.hyper.temperature if experiment.algorithm in SAMPLING_ALGORITHMS else 1.0


@dataclass
class CallRun:
    """One device's share of one call in one iteration."""

    experiment: Experiment
    call: Call
    layout: Layout
    device: int
    iteration: int
    engine: Engine
    inputs: dict[str, Pieces]  # data name → rows this device holds for the call
    span: Callable[[str], AbstractContextManager] = lambda op: nullcontext()  # times a named op
    kv_tokens: int = 0  # generate: KV tokens of each engine replica (0: unlimited)
    count: Callable[[float], None] | None = None  # generate: records the replica's running batch
    # (prompt, response) tokens by global row where the rows are not the iteration's own draw: a
    # streaming rollout's consumed rows (executor.stream.row_sources); None: the iteration's
    row_lengths: tuple[Tensor, Tensor] | None = None
    losses: list[float] = field(default_factory=list)  # train: summed loss per minibatch (last stage)
    _derived: dict[str, Pieces] = field(default_factory=dict)
    _lengths: tuple[Tensor, Tensor] | None = None

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.device)[0]

    @property
    def prompt_len(self) -> int:
        return self.experiment.params.prompt_len

    @property
    def varied(self) -> bool:
        """Whether rows differ in length (a length distribution): right-padded, with an EOS."""
        return self.experiment.params.variable

    def lengths(self) -> tuple[Tensor, Tensor]:
        """(prompt, response) tokens of every row of the iteration, by global row (int64):
        :meth:`Experiment.lengths` for rollouts, the caps for other data. An asynchronous run's
        extra warm-up iterations draw iteration 0's, as the estimator charges them
        (:meth:`~estimator.spec.workflow.Workflow.draw_iteration`). Under a streaming rollout
        each row has the lengths of the request it holds (``row_lengths``)."""
        if self._lengths is None:
            p, w = self.experiment.params, self.call.workload
            if self.row_lengths is not None:
                self._lengths = self.row_lengths
            elif self.experiment.rollout_rows:
                prompt, gen = self.experiment.lengths(self.experiment.workflow.draw_iteration(self.iteration))
                self._lengths = torch.as_tensor(prompt), torch.as_tensor(gen)
            else:
                self._lengths = torch.full((w.seqs,), p.prompt_len), torch.full((w.seqs,), p.gen_len)
        return self._lengths

    def micro_batches(self) -> list[list[Range]]:
        """Per minibatch the micro-batches' rows: equal splits, or cut by the layout's token
        budget (:func:`budget_micro_batches`, a row's tokens its prompt plus its response)."""
        if not self.layout.token_budget:
            return micro_batch_rows(self.call, self.layout, self.dp_rank)
        prompt, gen = self.lengths()
        tokens = (prompt + gen).numpy()
        per_unit = 2 if self.call.workload.paired else 1
        return [budget_micro_batches(r, tokens[r[0]:r[1]], self.layout.max_tokens_per_micro_batch, per_unit)
                for r in dp_rows(self.call, self.layout, self.dp_rank)]

    def trim(self, tokens: Tensor, rows: Range) -> Tensor:
        """Right-padded rows cut to the longest of them (a micro-batch runs padded to its
        longest row); unchanged when every row is full."""
        prompt, gen = self.lengths()
        longest = int((prompt[rows[0]:rows[1]] + gen[rows[0]:rows[1]]).max())
        return tokens if longest >= tokens.shape[1] else tokens[:, :longest]

    def rows(self, name: str, rows: Range) -> Tensor:
        return gather_rows(self.inputs[name], [rows])

    def per_row(self, key: str, fn: Callable[[list[Range]], Tensor], rows: Range) -> Tensor:
        """Rows ``rows`` of ``fn(every row this device holds)``, computed once per call. ``fn``
        must treat rows independently, so one batched evaluation equals per-row ones."""
        if key not in self._derived:
            ranges = dp_rows(self.call, self.layout, self.dp_rank)
            values = fn(ranges).split([hi - lo for lo, hi in ranges])
            self._derived[key] = list(zip(ranges, values))
        return gather_rows(self._derived[key], [rows])

    def all_rows(self, name: str, ranges: list[Range]) -> Tensor:
        return gather_rows(self.inputs[name], ranges)

    def token_input(self) -> str:
        """The data a call feeds the model: the first token input it reads."""
        return next(n for n in self.call.inputs if n in TOKENS)

    def outputs(self, per_mb: list[Tensor]) -> Pieces:
        """Per-micro-batch output rows as one piece per data-parallel range."""
        ranges = [r for mbs in self.micro_batches() for r in mbs]
        out = []
        for lo, hi in dp_rows(self.call, self.layout, self.dp_rank):
            parts = [t for (a, _), t in zip(ranges, per_mb) if lo <= a < hi]
            out.append(((lo, hi), torch.cat(parts) if len(parts) > 1 else parts[0]))
        return out


# ---- generate ---------------------------------------------------------------------------------


def batched(c: CallRun) -> bool:
    """Whether a generate call runs continuous batching (:mod:`executor.serving`): lengths vary,
    or the plan caps the running requests, or the run bounds the KV pool."""
    return c.varied or c.layout.max_concurrency > 0 or c.kv_tokens > 0


def right_aligned(prompts: Tensor, prompt: Tensor, width: int) -> Tensor:
    """Rows ``width`` wide holding each prompt's last ``prompt[b]`` tokens (the ones the
    generation continues from) at positions ``0 .. prompt[b] − 1``, :data:`PAD_ID` after."""
    cap = prompts.shape[1]
    pos = torch.arange(width)[None, :]
    src = (cap - prompt[:, None] + pos).clamp(max=cap - 1)
    return torch.where(pos < prompt[:, None], prompts.gather(1, src), torch.full((), PAD_ID))


def generate(c: CallRun) -> dict[str, Pieces]:
    """Sample (or greedily decode) ``gen_len`` tokens for each prompt row."""
    if batched(c):
        return generate_batched(c)
    mbs = c.micro_batches()[0]
    w, exp = c.call.workload, c.experiment
    sampler = Sampler(exp.seed, c.iteration, c.call.name, exp.hyper.temperature, w.greedy)

    def choose(mb: int, step: int, logits: Tensor) -> Tensor:
        lo, hi = mbs[mb]
        return sampler(torch.arange(lo, hi, device=logits.device), step, logits)

    prompts = [c.rows(c.token_input(), r) for r in mbs]
    res = c.engine.generate(prompts, w.gen_len, choose, exp.hyper.temperature)
    if res is None:
        return {}
    return generated(c, res, lambda verify, s, _: verify(s, c.engine.dtype))


def generated(c: CallRun, res: list[tuple[Tensor, Tensor]],
              score: Callable[[Verifier, Tensor, int], Tensor]) -> dict[str, Pieces]:
    """A generate call's outputs from its micro-batches' (sequences, log-probs): the sequences,
    the old log-probs where the call writes them, and under a verifier the rewards, scored here
    on the last stage as they come out (``score(verifier, sequences, micro-batch)``)."""
    names, dtype = c.call.outputs, c.engine.dtype
    out = {next(n for n in names if n in TOKENS): c.outputs([s for s, _ in res])}
    if "old_logp" in names:
        out["old_logp"] = c.outputs([lp.to(dtype) for _, lp in res])
    rewards = [n for n in names if n in PER_SEQUENCE]
    if rewards:
        verify = Verifier.of(c.experiment)
        with c.span("reward"):
            out[rewards[0]] = c.outputs([score(verify, s, i) for i, (s, _) in enumerate(res)])
    return out


def generate_batched(c: CallRun) -> dict[str, Pieces]:
    """Continuous batching: each virtual engine (micro-batch) follows its schedule under its
    share of the cap and the KV pool (:func:`executor.serving.engine_limits`). Responses of
    drawn length end with EOS there (:meth:`Sampler.ending`); rows come out right-padded."""
    mbs = c.micro_batches()[0]
    w, exp = c.call.workload, c.experiment
    sampler = Sampler(exp.seed, c.iteration, c.call.name, exp.hyper.temperature, w.greedy)
    prompt, gen = c.lengths()
    cap, pool = engine_limits(c.layout.max_concurrency, c.kv_tokens, c.layout.micro_batches)
    work = []
    for lo, hi in mbs:
        try:
            plan = engine_steps(prompt[lo:hi].numpy(), gen[lo:hi].numpy(), cap, pool)
        except ValueError as exc:
            raise ValueError(f"call {c.call.name}: engine of rows {lo}..{hi - 1} (kv_tokens {pool} per engine, "
                             f"max_running {cap}): {exc}") from None
        seqs = right_aligned(c.rows(c.token_input(), (lo, hi)).cpu(), prompt[lo:hi], w.prompt_len + w.gen_len)
        work.append(EngineWork(seqs, prompt[lo:hi].to(c.engine.torch_device), w.gen_len, plan))

    def choose(e: int, requests: Tensor, positions: Tensor, logits: Tensor) -> Tensor:
        rows = (mbs[e][0] + requests).to(logits.device)
        if c.varied:
            return sampler.ending(rows, positions, gen.to(logits.device)[rows], logits)
        return sampler(rows, positions, logits)

    res = c.engine.serve(work, choose, exp.hyper.temperature, c.count)
    if res is None:
        return {}
    # a verifier scores each response's real tokens only
    return generated(c, res, lambda verify, s, e: verify.rows(s, prompt[mbs[e][0]:mbs[e][1]],
                                                             gen[mbs[e][0]:mbs[e][1]], c.engine.dtype))


# ---- inference --------------------------------------------------------------------------------


def inference(c: CallRun) -> dict[str, Pieces]:
    """Log-probs, values or rewards of each row."""
    mbs = c.micro_batches()[0]
    tokens = [c.trim(c.rows(c.token_input(), r), r) for r in mbs]
    res = c.engine.forward(tokens)
    if res is None:
        return {}
    (name,) = c.call.outputs
    reduce = _inference_output_rows(c, name) if c.varied else _inference_output(c, name)
    return {name: c.outputs([reduce(out, tok, r) for out, tok, r in zip(res, tokens, mbs)])}


def _inference_output_rows(c: CallRun, name: str) -> Callable[[Tensor, Tensor, Range], Tensor]:
    """Outputs of right-padded rows of drawn lengths: only each row's real positions."""
    g, temp = c.call.workload.gen_len, policy_temperature(c.experiment)
    prompt, gen = c.lengths()
    if name in ("ref_logp", "old_logp"):  # the reference's, or the actor's own recomputed
        return lambda logits, tok, r: rlhf.response_logp_rows(logits, tok.to(logits.device), prompt[r[0]:r[1]], g,
                                                              temp)
    if name == "values":
        return lambda values, _, r: rlhf.response_values_rows(values, prompt[r[0]:r[1]], g)
    if name in PER_SEQUENCE:
        return lambda values, _, r: rlhf.sequence_reward_at(values, prompt[r[0]:r[1]] + gen[r[0]:r[1]] - 1)
    raise KeyError(f"call {c.call.name}: no inference produces {name!r}")


def _inference_output(c: CallRun, name: str) -> Callable[[Tensor, Tensor, Range], Tensor]:
    p, temp = c.prompt_len, policy_temperature(c.experiment)
    if name in ("ref_logp", "old_logp"):  # the reference's, or the actor's own recomputed
        return lambda logits, tok, _: rlhf.response_logp(logits, tok.to(logits.device), p, temp)
    if name == "values":
        return lambda values, _, __: rlhf.response_values(values, p)
    if name in PER_SEQUENCE:
        return lambda values, _, __: rlhf.sequence_reward(values)
    raise KeyError(f"call {c.call.name}: no inference produces {name!r}")


# ---- train ------------------------------------------------------------------------------------

# loss(rows of the micro-batch, its tokens, the model's output) → scalar
Objective = Callable[[Range, Tensor, Tensor], Tensor]


def train(c: CallRun, optimizer: ShardAdam | ZeroAdam) -> None:
    """One optimizer step per minibatch; appends each minibatch's summed local loss."""
    objective = OBJECTIVES[(c.experiment.algorithm, c.call.role)](c)
    name = c.token_input()
    for mbs in c.micro_batches():
        tokens = [c.trim(c.rows(name, r), r) for r in mbs]

        def loss_fn(i: int, out: Tensor, mbs: list[Range] = mbs, tokens: list[Tensor] = tokens) -> Tensor:
            return objective(mbs[i], tokens[i].to(out.device), out)

        loss = c.engine.forward_backward(tokens, loss_fn)
        if optimizer.sharded:  # shard="optimizer": reduce-scatter, step the chunk, all-gather
            with c.span("dp_reduce_scatter"):
                optimizer.reduce()
        with c.span("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
        if optimizer.sharded:
            with c.span("dp_allgather"):
                optimizer.gather()
        if loss is not None:
            c.losses.append(loss)


def token_norm(c: CallRun, rows: Range | None = None) -> int:
    """Response tokens of the minibatch ``rows`` belong to: real tokens when lengths vary."""
    w = c.call.workload
    per = w.seqs // w.minibatches
    if not c.varied or rows is None:
        return per * w.gen_len
    k = rows[0] // per
    return int(c.lengths()[1][k * per:(k + 1) * per].sum())


def pair_norm(c: CallRun) -> int:
    """Pairs (or sequences) per minibatch."""
    return c.call.workload.units_per_minibatch


def _response_logp(c: CallRun, logits: Tensor, tokens: Tensor, rows: Range) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the rows' response tokens and which of them are real (None: all)."""
    temp = policy_temperature(c.experiment)
    if not c.varied:
        return rlhf.response_logp(logits, tokens, c.prompt_len, temp), None
    prompt, gen = c.lengths()
    g = c.call.workload.gen_len
    logp = rlhf.response_logp_rows(logits, tokens, prompt[rows[0]:rows[1]], g, temp)
    return logp, rlhf.response_mask(gen[rows[0]:rows[1]].to(logits.device), g)


def _row_lengths(c: CallRun, ranges: list[Range]) -> Tensor | None:
    """Response tokens of the rows of ``ranges`` (None with fixed lengths)."""
    return torch.cat([c.lengths()[1][lo:hi] for lo, hi in ranges]) if c.varied else None


def _gae(c: CallRun, which: int) -> Callable[[list[Range]], Tensor]:
    """Advantages (0) or returns (1) of the given rows, from their own data only."""
    h = c.experiment.hyper

    def fn(ranges: list[Range]) -> Tensor:
        data = [c.all_rows(n, ranges) for n in ("old_logp", "ref_logp", "rewards", "values")]
        return rlhf.ppo_advantages(*data, h.kl_coef, h.gamma, h.lam, _row_lengths(c, ranges))[which]

    return fn


def _ppo_actor(c: CallRun) -> Objective:
    h = c.experiment.hyper
    advantages = _gae(c, 0)

    def loss(rows: Range, tokens: Tensor, logits: Tensor) -> Tensor:
        logp, mask = _response_logp(c, logits, tokens, rows)
        adv = c.per_row("advantages", advantages, rows)
        return rlhf.ppo_actor_loss(logp, c.rows("old_logp", rows), adv, h.clip_eps, token_norm(c, rows), mask)

    return loss


def _ppo_critic(c: CallRun) -> Objective:
    h, p, g = c.experiment.hyper, c.prompt_len, c.call.workload.gen_len
    returns = _gae(c, 1)

    def loss(rows: Range, tokens: Tensor, values: Tensor) -> Tensor:
        ret = c.per_row("returns", returns, rows)
        if c.varied:
            prompt, gen = c.lengths()
            v = rlhf.response_values_rows(values, prompt[rows[0]:rows[1]], g)
            mask = rlhf.response_mask(gen[rows[0]:rows[1]].to(values.device), g)
        else:
            v, mask = rlhf.response_values(values, p), None
        return rlhf.critic_loss(v, c.rows("values", rows), ret, h.value_clip, token_norm(c, rows), mask)

    return loss


def _grpo_actor(c: CallRun) -> Objective:
    h = c.experiment.hyper
    seqs = c.call.workload.seqs
    # Every device of the call holds all rewards: groups may straddle micro-batches and ranks.
    adv = rlhf.grpo_advantages(c.rows("rewards", (0, seqs)), c.experiment.params.group_size)

    def loss(rows: Range, tokens: Tensor, logits: Tensor) -> Tensor:
        logp, mask = _response_logp(c, logits, tokens, rows)
        return rlhf.grpo_loss(logp, c.rows("old_logp", rows), c.rows("ref_logp", rows),
                              adv[rows[0]:rows[1]], h.clip_eps, h.kl_coef, token_norm(c, rows), mask)

    return loss


def _remax_actor(c: CallRun) -> Objective:
    h = c.experiment.hyper

    def returns(ranges: list[Range]) -> Tensor:
        data = [c.all_rows(n, ranges) for n in ("old_logp", "ref_logp", "rewards", "rewards_greedy")]
        return rlhf.remax_returns(*data, h.kl_coef, h.gamma, _row_lengths(c, ranges))

    def loss(rows: Range, tokens: Tensor, logits: Tensor) -> Tensor:
        ret = c.per_row("returns", returns, rows)
        logp, mask = _response_logp(c, logits, tokens, rows)
        return rlhf.reinforce_loss(logp, ret, token_norm(c, rows), mask)

    return loss


def _dpo_actor(c: CallRun) -> Objective:
    beta, p, norm = c.experiment.hyper.dpo_beta, c.prompt_len, pair_norm(c)

    def loss(rows: Range, tokens: Tensor, logits: Tensor) -> Tensor:
        return rlhf.dpo_loss(rlhf.response_logp(logits, tokens, p), c.rows("ref_logp", rows), beta, norm)

    return loss


def _sft_actor(c: CallRun) -> Objective:
    p, norm = c.prompt_len, token_norm(c)
    return lambda rows, tokens, logits: rlhf.sft_loss(rlhf.response_logp(logits, tokens, p), norm)


def _rw_reward(c: CallRun) -> Objective:
    norm = pair_norm(c)
    return lambda rows, tokens, values: rlhf.reward_model_loss(rlhf.sequence_reward(values), norm)


OBJECTIVES: dict[tuple[str, str], Callable[[CallRun], Objective]] = {
    ("ppo", "actor"): _ppo_actor,
    ("ppo", "critic"): _ppo_critic,
    ("grpo", "actor"): _grpo_actor,
    ("remax", "actor"): _remax_actor,
    ("dpo", "actor"): _dpo_actor,
    ("sft", "actor"): _sft_actor,
    ("rw", "reward"): _rw_reward,
}


def run_call(c: CallRun, optimizer: ShardAdam | ZeroAdam | None) -> dict[str, Pieces]:
    """Run the call's compute on this device; outputs on the last stage, ``{}`` elsewhere."""
    if c.call.kind == "generate":
        return generate(c)
    if c.call.kind == "inference":
        return inference(c)
    if optimizer is None:
        raise ValueError(f"call {c.call.name}: train needs the optimizer of role {c.call.role}")
    train(c, optimizer)
    return {}
