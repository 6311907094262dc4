"""PPO in one process with plain torch: no engine, no layouts, no process groups.

The same math as the executor's single-device plan, written as the textbook loop: the oracle
the executor is tested against and the baseline ``benchmarks/bench_executor.py`` times it
against. Initial weights, prompts and sampling are those of the executor
(:func:`executor.runtime.initial_params`, :mod:`executor.data`).

Under ``async: {max_staleness: η}`` it is the textbook asynchronous loop instead: a rollout
queue η iterations deep, the rollouts of iteration j sampled with the actor's weights after
update j − η − 1 (the first η + 1 with the initial weights); reference, reward and critic score
them when they are trained on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimator.spec.experiment import Experiment
from estimator.spec.sharding import full_boxes
from executor import model as M
from executor import rlhf
from executor.data import Sampler, source_for
from executor.runtime import initial_params

Params = dict[str, Tensor]


def init_roles(experiment: Experiment, dtype: torch.dtype) -> dict[str, Params]:
    return {role: initial_params(experiment, role, full_boxes(spec), dtype) for role, spec in experiment.models.items()}


@torch.no_grad()
def generate(params: Params, experiment: Experiment, prompts: Tensor, sampler: Sampler) -> tuple[Tensor, Tensor]:
    """KV-cached sampling of gen_len tokens: (sequences (B, P+G), logp (B, G))."""
    spec, gen_len, temp = experiment.models["actor"], experiment.params.gen_len, experiment.hyper.temperature
    cache = M.KVCache(prompts.shape[1] + gen_len)
    rows = torch.arange(prompts.shape[0])
    seq, inp, start, logps = prompts, prompts, 0, []
    for step in range(gen_len):
        logits = M.forward(params, spec, inp, cache, start, last_position=True)[:, -1]  # (B, V)
        tok = sampler(rows, step, logits)
        logps.append(rlhf.token_logp(logits, tok, temp))
        start += inp.shape[1]
        inp = tok[:, None]
        seq = torch.cat((seq, inp), dim=1)
    return seq, torch.stack(logps, dim=1)


def rollout(experiment: Experiment, actor: Params, iteration: int) -> tuple[Tensor, Tensor]:
    """Iteration ``iteration``'s sequences and their log-probs, sampled with ``actor``."""
    exp, temp = experiment, experiment.hyper.temperature
    prompts = source_for(exp).rows(iteration, 0, exp.params.batch_size)
    return generate(actor, exp, prompts, Sampler(exp.seed, iteration, "actor_gen", temp))


def ppo_iteration(experiment: Experiment, params: dict[str, Params], optimizers: dict[str, torch.optim.Optimizer],
                  iteration: int, rolled: tuple[Tensor, Tensor] | None = None) -> list[float]:
    """One PPO iteration on ``rolled`` (sequences, log-probs; sampled now with the actor when
    None); returns the loss of every minibatch (actor's, then critic's)."""
    exp, h, p = experiment, experiment.hyper, experiment.params
    models, temp = exp.models, h.temperature
    seq, old_logp = rolled if rolled is not None else rollout(exp, params["actor"], iteration)
    with torch.no_grad():
        ref_logp = rlhf.response_logp(M.forward(params["ref"], models["ref"], seq), seq, p.prompt_len, temp)
        rewards = rlhf.sequence_reward(M.forward(params["reward"], models["reward"], seq))
        values = rlhf.response_values(M.forward(params["critic"], models["critic"], seq), p.prompt_len)
    adv, returns = rlhf.ppo_advantages(old_logp, ref_logp, rewards, values, h.kl_coef, h.gamma, h.lam)
    size = p.batch_size // p.ppo_minibatches
    norm = size * p.gen_len
    losses = []
    for role in ("actor", "critic"):
        for k in range(p.ppo_minibatches):
            r = slice(k * size, (k + 1) * size)
            out = M.forward(params[role], models[role], seq[r])
            if role == "actor":
                logp = rlhf.response_logp(out, seq[r], p.prompt_len, temp)
                loss = rlhf.ppo_actor_loss(logp, old_logp[r], adv[r], h.clip_eps, norm)
            else:
                loss = rlhf.critic_loss(rlhf.response_values(out, p.prompt_len), values[r], returns[r],
                                        h.value_clip, norm)
            loss.backward()
            optimizers[role].step()
            optimizers[role].zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return losses


def run_ppo(experiment: Experiment, iterations: int, dtype: torch.dtype = torch.float32) -> dict[str, Params]:
    """Train for ``iterations``; the final parameters of every role."""
    if experiment.algorithm != "ppo":
        raise ValueError(f"the reference loop runs ppo, not {experiment.algorithm}")
    params = init_roles(experiment, dtype)
    optimizers = {}
    for role in ("actor", "critic"):
        for t in params[role].values():
            t.requires_grad_(True)
        optimizers[role] = torch.optim.Adam(list(params[role].values()), lr=experiment.hyper.lr)
    eta = experiment.workflow.staleness
    queue: dict[int, tuple[Tensor, Tensor]] = {}  # iteration → its rollouts, sampled ahead
    for it in range(iterations):
        for j in range(it, min(it + eta, iterations - 1) + 1):  # iteration it + η's, with today's weights
            if j not in queue:
                queue[j] = rollout(experiment, params["actor"], j)
        ppo_iteration(experiment, params, optimizers, it, queue.pop(it))
    return params
