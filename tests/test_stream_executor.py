"""The executor runs streaming rollouts (executor.stream) as estimator.spec.stream rules them:
the emitted rows against a single-process float64 replay, the update against textbook loops,
keep mode, the timeline of the copy's device, and a worker that dies mid-stream."""

from __future__ import annotations

import dataclasses
import multiprocessing
import time

import numpy as np
import pytest
import torch

from estimator.cost.lowering import Costs
from estimator.profile.profiles import load_profile
from estimator.sim.simulate import simulate
from estimator.spec.cluster import Cluster
from estimator.spec.experiment import Experiment, load_experiment
from estimator.spec.plan import Plan, check
from estimator.spec.stream import EngineStream, streaming_calls
from executor.data import PAD_ID, eos_id, source_for
from executor.launch import WorkerFailed, launch
from executor.reference import replay_stream, run_grpo_stream, run_ppo, token_versions
from executor.runtime import RunOptions, RunResult, merge, run_rank
from executor.stream import engine_streams, row_sources
from tests.conftest import EXAMPLES
from tests.test_runtime import TOL, _layout, _run_many, _split

ITERATIONS = 4
GEN = "actor_gen"


def _grpo(eta: int, mode: str) -> Experiment:
    # seed 4: the verifier scores some rollouts of iterations 0 and 1, so the first updates
    # move the actor and versions 0, 1, 2 differ (under the example's seed 1 they are equal)
    exp = load_experiment(EXAMPLES / "grpo-longtail-tiny-2xcpu.yaml")
    return dataclasses.replace(exp, seed=4).with_staleness(eta, mode)


OPTIONS = RunOptions(iterations=ITERATIONS, dtype="float64", return_params=True, return_streams=True)


def _run_each(rank: int, world: int, status, runs: list[tuple[Experiment, Plan, RunOptions]]):
    return [run_rank(rank, world, status, exp, plan, options) for exp, plan, options in runs]


def _predicted(exp: Experiment, plan: Plan) -> RunOptions:
    """The run's options with the switch points (and KV pool) of the simulation of the same
    iterations on the CPU profile, as a validation runs the prediction's stream."""
    profile = load_profile("cpu")
    res = simulate(exp, plan, profile, 1)
    assert res.iterations == ITERATIONS
    points = tuple(tuple(p) for p in res.streams[GEN].switch_at)
    kv = Costs(exp, profile).kv_tokens(GEN, plan[GEN])
    return dataclasses.replace(OPTIONS, switch_at={GEN: points}, kv_tokens={GEN: kv})


@pytest.fixture(scope="module")
def stream_runs() -> dict[str, tuple[Experiment, Plan, RunResult, RunOptions]]:
    """GRPO long-tail tiny under η = 1: recompute and keep taking each version where the engine
    needs it (executor.stream.needed_switch), and recompute capped at 4 running requests at the
    simulation's switch points; PPO tiny under η = 1
    (recompute); each on the split plan (generation alone on device 0), in one set of
    processes, ``ITERATIONS`` iterations each."""
    ppo = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml").with_staleness(1, "recompute")
    exps = {"grpo-1": _grpo(1, "recompute"), "grpo-1-keep": _grpo(1, "keep"), "grpo-1-predicted": _grpo(1, "recompute"),
            "ppo-1": ppo}
    runs = {k: (e, check(_split(e.workflow.call_names), e)) for k, e in exps.items()}
    e, plan = runs["grpo-1-predicted"]  # a cap of 4: each push arrives while requests run
    runs["grpo-1-predicted"] = (e, Plan(plan.layouts | {GEN: dataclasses.replace(plan[GEN], max_concurrency=4)}))
    options = {k: _predicted(e, p) if k.endswith("predicted") else OPTIONS for k, (e, p) in runs.items()}
    for e, plan in runs.values():
        assert streaming_calls(e, plan) == {GEN}
    per_rank = launch(2, _run_each, ([(e, p, options[k]) for k, (e, p) in runs.items()],), timeout_s=180)
    return {k: (e, p, merge([r[i] for r in per_rank], e, p, options[k]), options[k])
            for i, (k, (e, p)) in enumerate(runs.items())}


def _stream(exp: Experiment, plan: Plan, options: RunOptions = OPTIONS) -> EngineStream:
    (s,) = engine_streams(exp, plan, GEN, options)
    return s


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend for the cores
    yield
    torch.set_num_threads(threads)


def _replay_all(exp: Experiment, s: EngineStream, versions: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {j: replay_stream(exp, s, versions, list(s.consumed[j])) for j in range(ITERATIONS)}


@pytest.mark.parametrize(("key", "reordered"), [("grpo-1", True), ("grpo-1-predicted", False)])
def test_emitted_rows_are_the_single_process_replay(stream_runs, key, reordered, one_thread):
    """Iteration j's rows are the requests consumed[j] of the stream, each token sampled under
    the weights version in force at its step: a forward of its prefix without a cache under
    that version (recompute: the engine's logits) gives the same tokens and log-probs."""
    exp, plan, res, options = stream_runs[key]
    s, em = _stream(exp, plan, options), res.streams[GEN]
    assert s.switch_at == options.switch_at.get(GEN, (s.switch_at,))[0]  # the points given, where given
    # the case exercises what it is about: a switch evicting requests mid-response, consumption
    # out of iteration order (with no cap; a cap of 4 keeps the order), and versions that differ
    evicted = [q for seg in s.run.segments if seg.switch >= 0 for q in seg.preempted]
    assert evicted and any(t > exp.lengths(0)[0][0] for seg in s.run.segments for t in seg.prefill_tokens)
    assert any(any(s.batch[q] != j for q in s.consumed[j]) for j in range(ITERATIONS)) == reordered
    last = max(s.admitted_version)
    assert sorted(em.versions) == list(range(last + 1)) and last >= 1
    assert all((em.versions[v]["lm_head.weight"] - em.versions[v - 1]["lm_head.weight"]).abs().max() > 1e-9
               for v in range(1, last + 1))
    replay = _replay_all(exp, s, em.versions)
    for j in range(ITERATIONS):
        rows, seq, logp = em.rows[j]
        want_seq, want_logp = replay[j]
        assert rows == (0, exp.workflow[GEN].workload.seqs)
        assert torch.equal(seq, want_seq), f"iteration {j}: sequences differ"
        assert (logp - want_logp).abs().max() < TOL, f"iteration {j}: log-probs differ"
    # a replay with the initial weights throughout is not the run: the versions matter
    j = ITERATIONS - 1
    stale = replay_stream(exp, s, {v: em.versions[0] for v in em.versions}, list(s.consumed[j]))
    assert (stale[1] - em.rows[j][2]).abs().max() > 1e-7


def test_streaming_grpo_trains_as_the_textbook_loop_on_the_consumed_rows(stream_runs, one_thread):
    """Downstream calls read iteration j's rows as the stream's consumed requests — lengths,
    verifier rewards, GRPO groups: the update and every minibatch's loss are those of the
    plain-torch loop training on the replayed rows (executor.reference.run_grpo_stream)."""
    exp, plan, res, options = stream_runs["grpo-1"]
    actor, losses = run_grpo_stream(exp, [_stream(exp, plan, options)], ITERATIONS)
    diff = max((res.params["actor"][n] - actor[n]).abs().max().item() for n in actor)
    assert diff < TOL, f"actor differs by {diff:.3g}"
    got = [res.losses[k] for k in sorted(res.losses)]
    assert len(got) == len(losses) and max(abs(a - b) for a, b in zip(got, losses)) < TOL
    assert any(abs(v) > 1e-6 for v in losses[:4]), "the first updates did not move the actor"


def test_row_sources_are_the_emitted_rows(stream_runs):
    """executor.stream.row_sources, computed alike on every rank, names the request each row
    of an iteration holds: its prompt, and a response ending with EOS at its drawn length."""
    exp, plan, res, options = stream_runs["grpo-1"]
    sources, source = row_sources(exp, plan, options), source_for(exp)
    eos, p = eos_id(exp.models["actor"].vocab), exp.params.prompt_len
    moved = False
    for j in range(ITERATIONS):
        _, seq, _ = res.streams[GEN].rows[j]
        src = sources[j]
        moved |= bool(np.any(src.batch != j))
        for k in range(len(seq)):
            b, r, n, g = int(src.batch[k]), int(src.row[k]), int(src.prompt[k]), int(src.gen[k])
            assert torch.equal(seq[k, :n], source.rows(b, r, r + 1)[0, p - n:])
            response = seq[k, n:n + g]
            assert response[-1] == eos and not (response[:-1] == eos).any()
            assert (seq[k, n + g:] == PAD_ID).all()
    assert moved


def test_keep_mode_streams_without_recomputing(stream_runs, one_thread):
    """Under keep the emitted rows follow the schedule (each iteration's consumed requests); a
    request generated under one version throughout is the replay's, and one running across a
    switch keeps its keys and values from the old weights, so its later log-probs are not."""
    exp, plan, res, options = stream_runs["grpo-1-keep"]
    s, em = _stream(exp, plan, options), res.streams[GEN]
    assert not any(seg.preempted for seg in s.run.segments)
    versions = token_versions(s, np.array([exp.lengths(exp.workflow.draw_iteration(int(b)))[1][r]
                                           for b, r in zip(s.batch, s.row)]))
    replay = _replay_all(exp, s, em.versions)
    across = 0
    for j in range(ITERATIONS):
        _, seq, logp = em.rows[j]
        for k, q in enumerate(s.consumed[j]):
            assert torch.equal(seq[k, :16], replay[j][0][k, :16])  # its request's prompt
            diff = (logp[k] - replay[j][1][k]).abs().max()
            if len(set(versions[q])) == 1:
                assert diff < TOL and torch.equal(seq[k], replay[j][0][k])
            else:
                across += diff > 1e-9
    assert across > 0, "no request kept old keys and values across a switch"


def test_streaming_ppo_with_fixed_lengths_is_the_textbook_asynchronous_loop(stream_runs, one_thread):
    """Fixed lengths and no cap: the stream consumes batch j in iteration j, each generated
    under the weights after update j − 2, so executor.reference.run_ppo at η = 1 is the oracle
    (and its η = 0 is not)."""
    exp, plan, res, options = stream_runs["ppo-1"]
    s = _stream(exp, plan, options)
    assert [list(s.batch[list(c)]) for c in s.consumed] == [[j] * 8 for j in range(ITERATIONS)]
    assert len(s.switch_at) == ITERATIONS - 2
    for eta, close in ((1, True), (0, False)):
        expect = run_ppo(exp.with_staleness(eta), ITERATIONS, dtype=torch.float64)
        diff = max((res.params[role][n] - expect[role][n].detach()).abs().max().item()
                   for role in ("actor", "critic") for n in expect[role])
        assert (diff < TOL) == close, f"reference with η={eta}: differs by {diff:.3g}"


def test_the_copy_device_records_the_stream(stream_runs):
    """Device 0 (the copy): a ``call`` span per iteration from the previous emission to this
    one, the decode steps between them under that iteration, each push taken inside the call
    that reaches its switch; the run's call statistics and steady state are computed."""
    exp, plan, res, options = stream_runs["grpo-1"]
    s = _stream(exp, plan, options)
    spans = [x for x in res.timeline.spans if x.device == 0]
    calls = sorted((x for x in spans if (x.call, x.op) == (GEN, "call")), key=lambda x: x.start_s)
    assert [x.iteration for x in calls] == list(range(ITERATIONS))
    assert all(a.end_s <= b.start_s for a, b in zip(calls, calls[1:]))
    # one forward an op: iteration j's are those after emission j − 1 up to emission j
    assert s.emit_op[-1] == s.run.decode_steps + sum(1 for seg in s.run.segments if seg.prefill)
    bounds = [0, *s.emit_op]
    for j in range(ITERATIONS):
        got = sum(1 for x in spans if x.call == GEN and x.op in ("prefill", "decode") and x.iteration == j)
        assert got == bounds[j + 1] - bounds[j]
    pushes = {x.iteration: x for x in spans if x.op == "push"}
    assert sorted(pushes) == list(range(len(s.switch_at)))
    for v, point in enumerate(s.switch_at, start=1):  # taken before op ``point``: in the call that runs it
        j = next(j for j in range(ITERATIONS) if s.emit_op[j] > point)
        assert calls[j].start_s <= pushes[v - 1].start_s <= pushes[v - 1].end_s <= calls[j].end_s
    stats = res.call_stats()
    assert stats[GEN]["duration_s"] > 0 and stats["push:actor_gen"]["duration_s"] > 0
    assert res.iteration_s > 0


def test_a_streaming_worker_that_dies_mid_stream_stops_the_run():
    """Rank 0 serves the stream and dies as it goes on to iteration 2, after a push; the run
    ends at once, naming it."""
    exp = _grpo(1, "recompute")
    plan = check(_split(exp.workflow.call_names), exp)
    options = RunOptions(iterations=ITERATIONS, fault=(0, GEN, 2))
    start = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        launch(2, run_rank, (exp, plan, options), timeout_s=120)
    assert time.monotonic() - start < 60
    assert info.value.rank == 0 and GEN in info.value.where and "iteration 2" in info.value.where
    assert "exited with code 13" in info.value.reason
    assert multiprocessing.active_children() == []


def test_a_copy_split_over_stages_or_replicas_streams_the_same(stream_runs, one_thread):
    """Three devices, the home on device 2: the copy on devices 0-1 as a two-stage pipeline
    (the stream settles its stages before each push) emits the rows and takes the steps of the
    one-device copy; as two replicas, each streams its own half (two GRPO groups an iteration)
    and takes each push at its own segment, and the run is the textbook loop of both streams."""
    three = dataclasses.replace(_grpo(1, "recompute"), cluster=Cluster(1, 3, "cpu"))
    calls = three.workflow.call_names
    piped = Plan({c: _layout("0-1", pp=2) if c == GEN else _layout("2") for c in calls})
    replicas = Plan({c: _layout("0-1", dp=2) if c == GEN else _layout("2") for c in calls})
    runs = [(three, check(piped, three)), (three, check(replicas, three))]
    options = RunOptions(iterations=ITERATIONS, dtype="float64", return_params=True, return_streams=True)
    per_rank = launch(3, _run_many, (runs, options), timeout_s=180)
    got = [merge([r[i] for r in per_rank], e, p, options) for i, (e, p) in enumerate(runs)]
    _, _, one, _ = stream_runs["grpo-1"]
    for j in range(ITERATIONS):
        assert torch.equal(got[0].streams[GEN].rows[j][1], one.streams[GEN].rows[j][1])
        assert (got[0].streams[GEN].rows[j][2] - one.streams[GEN].rows[j][2]).abs().max() < TOL
    assert max((got[0].params["actor"][n] - t).abs().max().item() for n, t in one.params["actor"].items()) < TOL
    streams = engine_streams(three, replicas, GEN, options)
    assert len(streams) == 2 and [len(c) for c in streams[0].consumed] == [16] * ITERATIONS
    assert streams[0].switch_at != streams[1].switch_at  # each takes the pushes at its own point
    actor, losses = run_grpo_stream(three, streams, ITERATIONS)
    assert max((got[1].params["actor"][n] - t).abs().max().item() for n, t in actor.items()) < TOL
    assert max(abs(got[1].losses[k] - v) for k, v in zip(sorted(got[1].losses), losses)) < TOL
