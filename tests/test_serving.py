"""Continuous batching in the executor: the forwards follow ``estimator.spec.batching.schedule``,
responses of drawn length end with EOS there, and neither a concurrency cap nor a small KV pool
(preemption by recompute) changes a token or a log-probability."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from estimator.spec.batching import schedule
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import Experiment
from estimator.spec.lengths import LOGNORMAL, Lengths
from estimator.spec.plan import Layout
from estimator.spec.schedule import DECODE, PREFILL
from estimator.spec.sharding import dp_rows
from executor.serving import engine_limits, engine_steps
from tests.conftest import run_gloo, tiny_experiment


def long_tail(experiment: Experiment, cap: int = 16, mu: float = 1.6, sigma: float = 1.0,
              prompt: Lengths | None = None) -> Experiment:
    """``experiment`` with log-normal response lengths capped at ``cap`` (and ``prompt`` lengths)."""
    p = dataclasses.replace(experiment.params, gen_lengths=Lengths(cap, LOGNORMAL, mu=mu, sigma=sigma),
                            prompt_lengths=prompt or experiment.params.prompt_lengths)
    return Experiment(experiment.algorithm, experiment.models, p, experiment.cluster, seed=experiment.seed)


def test_engine_steps_follow_the_schedule_through_preemption():
    prompt = np.array([5, 3, 7, 4, 6, 2])
    gen = np.array([6, 2, 5, 7, 1, 4])
    plan = engine_steps(prompt, gen, max_running=3, kv_tokens=24)
    run = schedule(prompt, gen, 3, 24)
    assert run.preemptions > 0
    decode = [s for s in plan.steps if s.op == DECODE]
    assert len(decode) == run.decode_steps
    # every segment's first decode step runs its batch at its KV lengths
    firsts = [s for s in decode if s.running >= 0]
    segs = [s for s in run.segments if s.steps]
    assert [(len(s.requests), sum(s.lengths), max(s.lengths)) for s in firsts] == \
        [(s.batch, s.kv_sum, s.kv_max) for s in segs]
    assert [s.requests for s in plan.steps if s.op == PREFILL] == [s.prefill for s in run.segments if s.prefill]
    # slots stay packed: a decode step runs slots 0 .. B−1 and never more than the pool's slots
    assert all(s.first_slot == 0 and len(s.requests) <= plan.slots for s in decode)
    assert plan.max_len == int(np.max(prompt + gen - 1))
    # each request samples exactly its length in tokens: prefills plus decode steps, recomputes included
    sampled = np.zeros(len(prompt), dtype=int)
    for s in plan.steps:
        for r, n in zip(s.requests, s.lengths):
            assert n == prompt[r] + sampled[r]  # the new token goes right after the tokens so far
            sampled[r] += 1
    assert sampled.tolist() == gen.tolist()


def test_engine_limits_split_the_replica_evenly():
    assert engine_limits(8, 1000, 2) == (4, 500)
    assert engine_limits(0, 0, 4) == (0, 0)


def _generate(rank: int, world: int, exp: Experiment, cases: list[tuple[Layout, int]]) -> list[dict]:
    from executor.calls import CallRun, generate
    from executor.comm import build_groups
    from executor.data import source_for
    from executor.engine import Engine
    from executor.model import init_shards
    from executor.runtime import role_seed

    call = exp.workflow["actor_gen"]
    src = source_for(exp)
    out = []
    for layout, kv in cases:
        groups = build_groups([layout], world)
        params = init_shards(exp.models["actor"], layout, rank, role_seed(exp.seed, "actor"), torch.float64)
        spans: list[tuple[str, int, int]] = []

        def mark(op: str, mb: int, spans=spans):
            spans.append((op, mb))
            return torch.no_grad()

        engine = Engine(exp.models["actor"], layout, rank, params, groups, mark=mark)
        inputs = {"prompts": [(r, src.rows(0, *r)) for r in dp_rows(call, layout, 0)]}
        counts: list[float] = []
        res = generate(CallRun(exp, call, layout, rank, 0, engine, inputs, kv_tokens=kv, count=counts.append))
        (seq_r, seq), = res["seq"]
        (_, logp), = res["old_logp"]
        # numpy arrays: tensors would travel as shared memory that ends with the worker
        out.append({"seq": seq.numpy(), "logp": logp.numpy(), "counts": counts, "spans": spans})
    return out


def _tensors(res: dict) -> dict:
    return res | {"seq": torch.from_numpy(res["seq"]), "logp": torch.from_numpy(res["logp"])}


def _layout(micro_batches: int = 1, cap: int = 0) -> Layout:
    return Layout(DeviceMesh.parse("0"), 1, 1, 1, micro_batches, max_concurrency=cap)


@pytest.fixture(scope="module")
def served():
    exp = long_tail(tiny_experiment("grpo", devices_per_node=1, batch_size=4, minibatches=1, group_size=2),
                    prompt=Lengths(16, LOGNORMAL, mu=2.0, sigma=0.5))
    cases = [(_layout(), 0), (_layout(cap=3), 0), (_layout(), 40), (_layout(2, cap=2), 50), (_layout(2), 0)]
    (results,) = run_gloo(1, _generate, exp, cases)
    return exp, cases, [_tensors(r) for r in results]


def test_responses_end_with_eos_at_their_drawn_lengths(served):
    exp, _, results = served
    prompt, gen = exp.lengths(0)
    seq, vocab = results[0]["seq"], exp.models["actor"].vocab
    eos = vocab - 1
    for r in range(len(gen)):
        p, n = int(prompt[r]), int(gen[r])
        response = seq[r, p:p + n]
        assert int(response[-1]) == eos, f"row {r} does not end with EOS"
        assert (response[:-1] != eos).all(), f"row {r} has an EOS before its end"
        assert (seq[r, p + n:] == 0).all(), f"row {r} is not padded after its response"
    assert len(set(gen.tolist())) > 2 and len(set(prompt.tolist())) > 1  # lengths really vary


def test_cap_and_small_pool_generate_the_same_tokens_and_log_probs(served):
    exp, cases, results = served
    _, gen = exp.lengths(0)
    mask = torch.arange(exp.params.gen_len)[None, :] < torch.as_tensor(gen)[:, None]
    base = results[0]
    for (layout, kv), res in zip(cases[1:], results[1:]):
        assert torch.equal(res["seq"], base["seq"]), (layout, kv)
        diff = (torch.where(mask, res["logp"] - base["logp"], 0.0)).abs().max().item()
        assert diff < 1e-10, f"{layout} kv={kv}: log-probs differ by {diff:.3g}"
        assert (res["logp"][~mask] == 0).all()


def test_small_pool_preempts_and_counters_follow_the_schedule(served):
    exp, cases, results = served
    prompt, gen = exp.lengths(0)
    for (layout, kv), res in zip(cases, results):
        cap, pool = engine_limits(layout.max_concurrency, kv, layout.micro_batches)
        if layout.micro_batches == 1:
            run = schedule(prompt, gen, cap, pool)
            assert res["counts"] == [float(s.batch) for s in run.segments if s.steps] + [0.0]
            decodes = [op for op, _ in res["spans"] if op == DECODE]
            prefills = [op for op, _ in res["spans"] if op == PREFILL]
            assert len(decodes) == run.decode_steps
            assert len(prefills) == sum(1 for s in run.segments if s.prefill)
            if kv:
                assert run.preemptions > 0, "the small pool must force preemptions"
    # two virtual engines interleave: each one's spans carry its index
    assert {mb for _, mb in results[-1]["spans"]} == {0, 1}


def test_fixed_lengths_under_a_cap_match_the_plain_generation():
    exp = tiny_experiment("grpo", devices_per_node=1, batch_size=2, minibatches=1, group_size=2)
    (results,) = run_gloo(1, _generate, exp, [(_layout(), 0), (_layout(cap=2), 45)])
    results = [_tensors(r) for r in results]
    assert torch.equal(results[0]["seq"], results[1]["seq"])
    assert (results[0]["logp"] - results[1]["logp"]).abs().max().item() < 1e-10
    assert results[0]["counts"] == []  # the plain path records no running batch


def test_run_options_refuse_a_negative_kv_pool():
    from executor.options import RunOptions

    with pytest.raises(ValueError, match="actor_gen=-5"):
        RunOptions(kv_tokens={"actor_gen": -5})


def test_plan_refuses_a_cap_below_the_virtual_engines():
    from estimator.spec.plan import layout_problems

    exp = tiny_experiment("grpo", devices_per_node=2, batch_size=4, minibatches=1, group_size=2)
    call = exp.workflow["actor_gen"]
    lay = Layout(DeviceMesh.parse("0-1"), 1, 1, 2, 2, max_concurrency=1)
    problems = layout_problems(call, exp.models["actor"], exp.cluster, lay)
    assert any("max_concurrency=1 is below micro_batches=2" in p for p in problems)
    ok = dataclasses.replace(lay, max_concurrency=2)
    assert not layout_problems(call, exp.models["actor"], exp.cluster, ok)


def test_a_pool_too_small_for_the_longest_request_is_refused(served):
    exp, _, _ = served
    prompt, gen = exp.lengths(0)
    with pytest.raises(ValueError, match="cannot hold the longest request"):
        engine_steps(prompt, gen, 0, int(np.max(prompt + gen - 1)) - 1)
