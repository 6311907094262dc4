"""The one pipeline schedule the simulator and the executor both follow."""

from __future__ import annotations

import pytest

import estimator.sim.simulator
import executor.engine
from estimator.spec.schedule import BACKWARD, DECODE, FORWARD, PREFILL, generation_rounds, schedule_1f1b

SHAPES = [(p, m) for p in (1, 2, 3, 4, 8) for m in (1, 2, 3, 5, 8, 16)]


@pytest.mark.parametrize("stages,micro_batches", SHAPES)
def test_1f1b_runs_every_micro_batch_once_forward_before_backward(stages: int, micro_batches: int):
    for stage in range(stages):
        order = schedule_1f1b(stages, stage, micro_batches)
        assert sorted(order) == sorted((op, i) for op in (FORWARD, BACKWARD) for i in range(micro_batches))
        assert all(order.index((FORWARD, i)) < order.index((BACKWARD, i)) for i in range(micro_batches))
        # forwards and backwards each run in micro-batch order
        assert [i for op, i in order if op == FORWARD] == list(range(micro_batches))
        assert [i for op, i in order if op == BACKWARD] == list(range(micro_batches))


@pytest.mark.parametrize("stages,micro_batches", SHAPES)
def test_1f1b_warms_up_p_minus_k_minus_1_then_alternates(stages: int, micro_batches: int):
    for stage in range(stages):
        order = schedule_1f1b(stages, stage, micro_batches)
        warmup = min(stages - stage - 1, micro_batches)
        ops = "".join(op for op, _ in order)
        # warm-up forwards, then strictly alternating F B (steady state), then the cool-down backwards
        steady = micro_batches - warmup
        assert ops == FORWARD * warmup + (FORWARD + BACKWARD) * steady + BACKWARD * warmup
        alive = max(ops[:k].count(FORWARD) - ops[:k].count(BACKWARD) for k in range(len(ops) + 1))
        assert alive == min(stages - stage, micro_batches)


def test_1f1b_known_orders():
    assert schedule_1f1b(4, 0, 6) == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0), ("F", 4), ("B", 1),
                                       ("F", 5), ("B", 2), ("B", 3), ("B", 4), ("B", 5)]
    assert schedule_1f1b(4, 3, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert schedule_1f1b(2, 0, 3) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]


def test_1f1b_rejects_a_stage_outside_the_pipeline():
    with pytest.raises(ValueError, match="stage=2"):
        schedule_1f1b(2, 2, 4)
    with pytest.raises(ValueError, match="micro_batches=0"):
        schedule_1f1b(2, 0, 0)


def test_generation_rounds_prefill_then_one_decode_round_per_token():
    rounds = generation_rounds(3, 4)
    assert len(rounds) == 4
    assert rounds[0] == [(PREFILL, 0), (PREFILL, 1), (PREFILL, 2)]
    assert all(r == [(DECODE, 0), (DECODE, 1), (DECODE, 2)] for r in rounds[1:])
    with pytest.raises(ValueError, match="tokens=0"):
        generation_rounds(2, 0)


def test_simulator_and_executor_call_the_same_schedule():
    assert estimator.sim.simulator.schedule_1f1b is executor.engine.schedule_1f1b is schedule_1f1b
    assert estimator.sim.simulator.generation_rounds is executor.engine.generation_rounds is generation_rounds
