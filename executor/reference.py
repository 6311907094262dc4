"""PPO in one process with plain torch: no engine, no layouts, no process groups.

The same math as the executor's single-device plan, written as the textbook loop: the oracle
the executor is tested against and the baseline ``benchmarks/bench_executor.py`` times it
against. Initial weights, prompts and sampling are those of the executor
(:func:`executor.runtime.initial_params`, :mod:`executor.data`).

Under ``async: {max_staleness: η}`` it is the textbook asynchronous loop instead: a rollout
queue η iterations deep, the rollouts of iteration j sampled with the actor's weights after
update j − η − 1 (the first η + 1 with the initial weights); reference, reward and critic score
them when they are trained on.

A streaming rollout (``async.streaming``, :mod:`estimator.spec.stream`) has its own oracle:
:func:`replay_stream` generates an engine's stream again request by request, each token from a
forward of its prefix without a cache under the weights of the version in force at its step,
and :func:`run_grpo_stream` trains GRPO on the rows each iteration consumes, so replayed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from estimator.spec.experiment import Experiment
from estimator.spec.sharding import full_boxes
from estimator.spec.stream import EngineStream
from executor import model as M
from executor import rlhf
from executor.data import PAD_ID, Sampler, source_for
from executor.runtime import initial_params
from executor.verifier import Verifier

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


# ---- streaming rollouts (estimator.spec.stream) ---------------------------------------------------


def token_versions(stream: EngineStream, gen: np.ndarray) -> list[list[int]]:
    """Per request of an engine's stream, the weights version in force when each of its
    response tokens was sampled: the version of the segment whose prefill or decode step
    sampled it (a request of ``gen[q]`` tokens samples one at its prefill, one per decode step
    it runs)."""
    out: list[list[int]] = [[] for _ in range(len(gen))]
    running: set[int] = set()
    version = 0
    for seg in stream.run.segments:
        version = seg.switch if seg.switch >= 0 else version
        for q in seg.prefill:
            out[q].append(version)
            if len(out[q]) < gen[q]:
                running.add(q)
        running -= set(seg.preempted)
        for q in running:
            out[q] += [version] * seg.steps
        running -= set(seg.finished)
    wrong = [q for q, v in enumerate(out) if len(v) != gen[q]]
    if wrong:
        raise ValueError(f"requests {wrong[:5]} sample {len(out[wrong[0]])} tokens in the schedule, not "
                         f"{gen[wrong[0]]}")
    return out


@torch.no_grad()
def replay_stream(experiment: Experiment, stream: EngineStream, versions: dict[int, Params],
                  requests: list[int], call: str = "actor_gen") -> tuple[Tensor, Tensor]:
    """Requests ``requests`` of an engine's stream generated again token by token: (sequences
    (n, prompt_len + gen_len), each prompt's last tokens then the response then pads, as the
    executor lays them out; log-probs (n, gen_len) in float64, 0 past each response).

    Each token is sampled from a forward of its request's prefix without a KV cache, under the
    weights ``versions[v]`` of the version in force at its step (:func:`token_versions`). Under
    ``streaming: recompute`` that is exactly what the engine computes: a switch evicts every
    running request and prefills it again under the new weights, so every key and value a
    token attends to comes from the weights that sample it."""
    exp, p = experiment, experiment.params
    spec, temp, width = exp.models["actor"], exp.hyper.temperature, p.prompt_len + p.gen_len
    greedy = exp.workflow[call].workload.greedy
    batch, row = stream.batch[requests], stream.row[requests]
    prompt, gen = _drawn(exp, batch, row)
    every = token_versions(stream, _drawn(exp, stream.batch, stream.row)[1])
    vers = [every[q] for q in requests]
    source = source_for(exp)
    seq = torch.full((len(requests), width), PAD_ID, dtype=torch.int64)
    for i, (b, r) in enumerate(zip(batch, row)):
        seq[i, :prompt[i]] = source.rows(int(b), int(r), int(r) + 1)[0, p.prompt_len - prompt[i]:]
    logp = torch.zeros(len(requests), p.gen_len, dtype=torch.float64)
    for t in range(int(gen.max(initial=0))):
        active = [i for i in range(len(requests)) if t < gen[i]]
        for v, length in sorted({(vers[i][t], prompt[i] + t) for i in active}):  # one prefix length a forward
            idx = [i for i in active if vers[i][t] == v and prompt[i] + t == length]
            last = M.forward(versions[v], spec, seq[idx, :length], last_position=True)[:, -1]  # (b, V)
            tok = torch.empty(len(idx), dtype=torch.int64)
            for b in np.unique(batch[idx]):
                sub = torch.as_tensor(np.flatnonzero(batch[idx] == b))
                sampler = Sampler(exp.seed, int(b), call, temp, greedy)
                rows, pos = torch.as_tensor(row[idx])[sub], torch.full((len(sub),), t)
                tok[sub] = (sampler.ending(rows, pos, torch.as_tensor(gen[idx])[sub], last[sub]) if p.variable
                            else sampler(rows, pos, last[sub]))
            seq[idx, length] = tok
            logp[idx, t] = rlhf.token_logp(last, tok, temp).to(torch.float64)
    return seq, logp


def run_grpo_stream(experiment: Experiment, streams: list[EngineStream], iterations: int,
                    dtype: torch.dtype = torch.float64) -> tuple[Params, list[float]]:
    """GRPO with a streaming rollout, as the textbook loop: iteration ``j`` trains on the
    requests ``consumed[j]`` of each replica's stream (``streams``, in replica order),
    generated again by :func:`replay_stream` with the loop's own weights of each version (the
    actor after ``v`` updates); reference log-probs, old log-probs (recomputed with the current
    actor, or the sampler's) and the verifier's rewards of those rows, one Adam step per
    minibatch. Returns the actor's final weights and every minibatch's loss."""
    exp, h, p = experiment, experiment.hyper, experiment.params
    if exp.algorithm != "grpo" or not exp.verifier:
        raise ValueError(f"the streaming reference runs grpo with a verifier reward, not {exp.algorithm}")
    params = init_roles(exp, dtype)
    actor, ref, spec, temp = params["actor"], params["ref"], exp.models["actor"], h.temperature
    for t in actor.values():
        t.requires_grad_(True)
    optimizer = torch.optim.Adam(list(actor.values()), lr=h.lr)
    versions = {0: {n: t.detach().clone() for n, t in actor.items()}}
    verify, losses = Verifier.of(exp), []
    for j in range(iterations):
        parts = [replay_stream(exp, s, versions, list(s.consumed[j])) for s in streams]
        seq, sampled = torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts])
        picks = [(s.batch[list(s.consumed[j])], s.row[list(s.consumed[j])]) for s in streams]
        prompt = torch.as_tensor(np.concatenate([_drawn(exp, b, r)[0] for b, r in picks]))
        gen = torch.as_tensor(np.concatenate([_drawn(exp, b, r)[1] for b, r in picks]))
        with torch.no_grad():
            ref_logp = rlhf.response_logp_rows(M.forward(ref, spec, seq), seq, prompt, p.gen_len, temp)
            old_logp = (rlhf.response_logp_rows(M.forward(actor, spec, seq), seq, prompt, p.gen_len, temp)
                        if p.recompute_logprobs else sampled.to(dtype))
            adv = rlhf.grpo_advantages(verify.rows(seq, prompt, gen, dtype), p.group_size)
        mask = rlhf.response_mask(gen, p.gen_len)
        size = len(seq) // p.ppo_minibatches
        for k in range(p.ppo_minibatches):
            r = slice(k * size, (k + 1) * size)
            logp = rlhf.response_logp_rows(M.forward(actor, spec, seq[r]), seq[r], prompt[r], p.gen_len, temp)
            loss = rlhf.grpo_loss(logp, old_logp[r], ref_logp[r], adv[r], h.clip_eps, h.kl_coef,
                                  int(gen[r].sum()), mask[r])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        versions[j + 1] = {n: t.detach().clone() for n, t in actor.items()}
    return {n: t.detach() for n, t in actor.items()}, losses


def _drawn(experiment: Experiment, batch: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, response) tokens of row ``row[i]`` of iteration ``batch[i]``."""
    wf = experiment.workflow
    drawn = [experiment.lengths(wf.draw_iteration(int(b))) for b in batch]
    return (np.array([d[0][r] for d, r in zip(drawn, row)]), np.array([d[1][r] for d, r in zip(drawn, row)]))
