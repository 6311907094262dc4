"""The verifier reward and the recomputed old log-probs, in one process: the generate call
scores its own sequences by the rule (checked by hand here), and ``actor_inf`` computes the
very log-probs the generate call wrote."""

from __future__ import annotations

import torch

from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment, experiment_from_dict
from estimator.spec.plan import Layout
from estimator.spec.sharding import full_boxes
from executor.calls import CallRun, run_call
from executor.comm import GroupRegistry
from executor.data import hash_keys, source_for
from executor.engine import Engine
from executor.runtime import initial_params
from executor.verifier import STREAM_ANSWER, Verifier, answer_token

RAW = {"algorithm": "grpo", "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "rule"},
       "batch_size": 8, "group_size": 4, "prompt_len": 8, "gen_len": 24, "seed": 3,
       "hyperparams": {"temperature": 0.7}, "cluster": {"nodes": 1, "devices_per_node": 1, "device": "cpu"}}
ONE = Layout(DeviceMesh(0, 1), 1, 1, 1, 2)


def _run(exp: Experiment, name: str, inputs: dict) -> dict:
    """``name`` of iteration 0 on one device with the actor's initial weights (float64)."""
    model = exp.models["actor"]
    params = initial_params(exp, "actor", full_boxes(model), torch.float64)
    engine = Engine(model, ONE, 0, params, GroupRegistry(1))
    return run_call(CallRun(exp, exp.workflow[name], ONE, 0, 0, engine, inputs), None)


def _prompts(exp: Experiment) -> dict:
    rows = exp.workflow["actor_gen"].workload.seqs
    return {"prompts": [((0, rows), source_for(exp).rows(0, 0, rows))]}


def test_the_answer_token_is_the_seeds_hash_and_a_response_holding_it_scores_one():
    assert answer_token(3, 256) == int(hash_keys(3, STREAM_ANSWER)) % 256
    assert len({answer_token(s, 256) for s in range(20)}) > 1  # the seed picks it
    verify = Verifier(answer=7, prompt_len=2)
    seq = torch.tensor([[7, 7, 1, 2, 3], [1, 2, 3, 7, 4], [7, 1, 2, 2, 7], [0, 0, 0, 0, 0]])
    # the answer in the prompt does not count; anywhere in the response does
    assert verify(seq, torch.float64).tolist() == [0.0, 1.0, 1.0, 0.0]


def test_the_generate_call_writes_the_rules_rewards_of_its_own_sequences():
    exp = experiment_from_dict(RAW)
    assert exp.workflow["actor_gen"].outputs == ("seq", "old_logp", "rewards")
    out = _run(exp, "actor_gen", _prompts(exp))
    ((rows, seq),), ((rows2, rewards),) = out["seq"], out["rewards"]
    assert rows == rows2 == (0, 32) and rewards.dtype == torch.float64
    answer = answer_token(exp.seed, exp.models["actor"].vocab)
    by_hand = [1.0 if answer in row[exp.params.prompt_len:].tolist() else 0.0 for row in seq]
    assert rewards.tolist() == by_hand
    assert 0.0 < sum(by_hand) < len(by_hand)  # this seed gives both outcomes


def test_actor_inf_recomputes_exactly_the_log_probs_the_generate_call_wrote():
    """The same quantity two ways: each token's log-probability at the sampling temperature,
    one decode step at a time (KV cache) and in one forward over the whole rollout."""
    written = experiment_from_dict(RAW)
    recomputed = experiment_from_dict({**RAW, "old_logprobs": "recompute"})
    gen = _run(written, "actor_gen", _prompts(written))
    again = _run(recomputed, "actor_gen", _prompts(recomputed))
    assert set(again) == {"seq", "rewards"}
    assert torch.equal(gen["seq"][0][1], again["seq"][0][1])  # the same rollout
    logp = _run(recomputed, "actor_inf", {"seq": again["seq"]})["old_logp"]
    ((rows, got),), ((_, want),) = logp, gen["old_logp"]
    assert rows == (0, 32) and got.shape == want.shape == (32, 24)
    assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()
    assert (want < -1e-3).all()  # real log-probs, not a degenerate zero
