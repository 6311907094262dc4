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
from estimator.spec.sharding import Range, dp_rows, micro_batch_rows
from estimator.spec.workflow import Call
from executor import rlhf
from executor.data import Sampler
from executor.engine import Engine
from executor.optim import ShardAdam
from executor.realloc import gather_rows
from executor.verifier import Verifier

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
    losses: list[float] = field(default_factory=list)  # train: summed loss per minibatch (last stage)
    _derived: dict[str, Pieces] = field(default_factory=dict)

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.device)[0]

    @property
    def prompt_len(self) -> int:
        return self.experiment.params.prompt_len

    def micro_batches(self) -> list[list[Range]]:
        return micro_batch_rows(self.call, self.layout, self.dp_rank)

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


def generate(c: CallRun) -> dict[str, Pieces]:
    """Sample (or greedily decode) ``gen_len`` tokens for each prompt row."""
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
    names, dtype = c.call.outputs, c.engine.dtype
    out = {next(n for n in names if n in TOKENS): c.outputs([s for s, _ in res])}
    if "old_logp" in names:
        out["old_logp"] = c.outputs([lp.to(dtype) for _, lp in res])
    rewards = [n for n in names if n in PER_SEQUENCE]
    if rewards:  # a verifier: score the sequences here, on the last stage, as they come out
        verify = Verifier.of(exp)
        with c.span("reward"):
            out[rewards[0]] = c.outputs([verify(s, dtype) for s, _ in res])
    return out


# ---- inference --------------------------------------------------------------------------------


def inference(c: CallRun) -> dict[str, Pieces]:
    """Log-probs, values or rewards of each row."""
    mbs = c.micro_batches()[0]
    tokens = [c.rows(c.token_input(), r) for r in mbs]
    res = c.engine.forward(tokens)
    if res is None:
        return {}
    (name,) = c.call.outputs
    reduce = _inference_output(c, name)
    return {name: c.outputs([reduce(out, tok) for out, tok in zip(res, tokens)])}


def _inference_output(c: CallRun, name: str) -> Callable[[Tensor, Tensor], Tensor]:
    p, temp = c.prompt_len, policy_temperature(c.experiment)
    if name in ("ref_logp", "old_logp"):  # the reference's, or the actor's own recomputed
        return lambda logits, tok: rlhf.response_logp(logits, tok.to(logits.device), p, temp)
    if name == "values":
        return lambda values, _: rlhf.response_values(values, p)
    if name in PER_SEQUENCE:
        return lambda values, _: rlhf.sequence_reward(values)
    raise KeyError(f"call {c.call.name}: no inference produces {name!r}")


# ---- train ------------------------------------------------------------------------------------

# loss(rows of the micro-batch, its tokens, the model's output) → scalar
Objective = Callable[[Range, Tensor, Tensor], Tensor]


def train(c: CallRun, optimizer: ShardAdam) -> None:
    """One optimizer step per minibatch; appends each minibatch's summed local loss."""
    objective = OBJECTIVES[(c.experiment.algorithm, c.call.role)](c)
    name = c.token_input()
    for mbs in c.micro_batches():
        tokens = [c.rows(name, r) for r in mbs]

        def loss_fn(i: int, out: Tensor, mbs: list[Range] = mbs, tokens: list[Tensor] = tokens) -> Tensor:
            return objective(mbs[i], tokens[i].to(out.device), out)

        loss = c.engine.forward_backward(tokens, loss_fn)
        with c.span("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
        if loss is not None:
            c.losses.append(loss)


def token_norm(c: CallRun) -> int:
    """Response tokens per minibatch."""
    w = c.call.workload
    return w.seqs // w.minibatches * w.gen_len


def pair_norm(c: CallRun) -> int:
    """Pairs (or sequences) per minibatch."""
    return c.call.workload.units_per_minibatch


def _gae(c: CallRun, which: int) -> Callable[[list[Range]], Tensor]:
    """Advantages (0) or returns (1) of the given rows, from their own data only."""
    h = c.experiment.hyper

    def fn(ranges: list[Range]) -> Tensor:
        data = [c.all_rows(n, ranges) for n in ("old_logp", "ref_logp", "rewards", "values")]
        return rlhf.ppo_advantages(*data, h.kl_coef, h.gamma, h.lam)[which]

    return fn


def _ppo_actor(c: CallRun) -> Objective:
    h, p, temp, norm = c.experiment.hyper, c.prompt_len, policy_temperature(c.experiment), token_norm(c)
    advantages = _gae(c, 0)

    def loss(rows: Range, tokens: Tensor, logits: Tensor) -> Tensor:
        logp = rlhf.response_logp(logits, tokens, p, temp)
        adv = c.per_row("advantages", advantages, rows)
        return rlhf.ppo_actor_loss(logp, c.rows("old_logp", rows), adv, h.clip_eps, norm)

    return loss


def _ppo_critic(c: CallRun) -> Objective:
    h, p, norm = c.experiment.hyper, c.prompt_len, token_norm(c)
    returns = _gae(c, 1)

    def loss(rows: Range, tokens: Tensor, values: Tensor) -> Tensor:
        ret = c.per_row("returns", returns, rows)
        return rlhf.critic_loss(rlhf.response_values(values, p), c.rows("values", rows), ret, h.value_clip, norm)

    return loss


def _grpo_actor(c: CallRun) -> Objective:
    h, p, temp, norm = c.experiment.hyper, c.prompt_len, policy_temperature(c.experiment), token_norm(c)
    seqs = c.call.workload.seqs
    # Every device of the call holds all rewards: groups may straddle micro-batches and ranks.
    adv = rlhf.grpo_advantages(c.rows("rewards", (0, seqs)), c.experiment.params.group_size)

    def loss(rows: Range, tokens: Tensor, logits: Tensor) -> Tensor:
        logp = rlhf.response_logp(logits, tokens, p, temp)
        return rlhf.grpo_loss(logp, c.rows("old_logp", rows), c.rows("ref_logp", rows),
                              adv[rows[0]:rows[1]], h.clip_eps, h.kl_coef, norm)

    return loss


def _remax_actor(c: CallRun) -> Objective:
    h, p, temp, norm = c.experiment.hyper, c.prompt_len, policy_temperature(c.experiment), token_norm(c)

    def returns(ranges: list[Range]) -> Tensor:
        data = [c.all_rows(n, ranges) for n in ("old_logp", "ref_logp", "rewards", "rewards_greedy")]
        return rlhf.remax_returns(*data, h.kl_coef, h.gamma)

    def loss(rows: Range, tokens: Tensor, logits: Tensor) -> Tensor:
        ret = c.per_row("returns", returns, rows)
        return rlhf.reinforce_loss(rlhf.response_logp(logits, tokens, p, temp), ret, norm)

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


def run_call(c: CallRun, optimizer: ShardAdam | None) -> dict[str, Pieces]:
    """Run the call's compute on this device; outputs on the last stage, ``{}`` elsewhere."""
    if c.call.kind == "generate":
        return generate(c)
    if c.call.kind == "inference":
        return inference(c)
    if optimizer is None:
        raise ValueError(f"call {c.call.name}: train needs the optimizer of role {c.call.role}")
    train(c, optimizer)
    return {}
