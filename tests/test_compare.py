"""Joins and error metrics on synthetic timelines whose errors are known exactly."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.compare import (
    compare_plan,
    join,
    op_durations,
    plan_table,
    plans_wide,
    ranking,
    summary,
    summary_table,
)
from estimator.spec.timeline import Span, Timeline

KINDS = {"gen": "generate", "train": "train"}


def predicted() -> Timeline:
    """Two iterations, 10 s apart: gen prefills 1 s and decodes one 2 s chunk; train's input
    arrives over a link in 0.5 s, then forward 1 s (0.1 s of it a TP collective), backward 2 s,
    optimizer 0.5 s."""
    spans = []
    for it in range(2):
        o = 10.0 * it
        spans += [Span(o, o + 1, 0, it, "gen", "prefill", 0, 0), Span(o + 1, o + 3, 0, it, "gen", "decode", -1, 0),
                  Span(o + 3, o + 3.5, -1, it, "train", "data", resource="data gen->train"),
                  Span(o + 3.5, o + 4.4, 0, it, "train", "forward", 0, 0),
                  Span(o + 4.4, o + 4.5, 0, it, "train", "tp_allreduce", 0, 0, "nvlink dev0-1"),
                  Span(o + 4.5, o + 6.5, 0, it, "train", "backward", 0, 0),
                  Span(o + 6.5, o + 7, 0, it, "train", "optimizer", -1, 0)]
    return Timeline.of(spans, "predicted")


def measured(period: float) -> Timeline:
    """The executor's view: compute wrappers, decode per step (1.0 + 1.2 s), data on two devices
    (0.5 and 0.7 s), train's compute window 3.8..7.8 (4 s); iterations ``period`` apart."""
    spans = []
    for it in range(2):
        o = period * it
        spans += [Span(o, o + 3.3, 0, it, "gen", "compute", -1, 0), Span(o, o + 1.1, 0, it, "gen", "prefill", 0, 0),
                  Span(o + 1.1, o + 2.1, 0, it, "gen", "decode", 0, 0),
                  Span(o + 2.1, o + 3.3, 0, it, "gen", "decode", 0, 0),
                  Span(o + 3.3, o + 3.8, 0, it, "train", "data"), Span(o + 3.1, o + 3.8, 1, it, "train", "data"),
                  Span(o + 3.8, o + 7.8, 0, it, "train", "compute", -1, 0),
                  Span(o + 3.8, o + 4.8, 0, it, "train", "forward", 0, 0),
                  Span(o + 4.8, o + 7.0, 0, it, "train", "backward", 0, 0),
                  Span(o + 7.0, o + 7.6, 0, it, "train", "optimizer", -1, 0)]
    return Timeline.of(spans, "measured")


@pytest.fixture
def joined():
    frames = compare_plan("a", predicted(), [measured(11.0), measured(13.0), measured(12.0)], KINDS)
    return join([frames])


def test_iteration_error_uses_the_median_run_and_counts_only_what_exceeds_the_spread(joined):
    plans, _, _ = joined
    row = plans.iloc[0]
    assert row["predicted_s"] == pytest.approx(10.0)
    assert (row["measured_s"], row["measured_min_s"], row["measured_max_s"]) == pytest.approx((12.0, 11.0, 13.0))
    assert row["ape"] == pytest.approx(2 / 12)
    assert row["ape_beyond_spread"] == pytest.approx(1 / 12)
    assert row["runs"] == 3


def test_call_windows_compare_compute_spans_with_predicted_ops(joined):
    _, calls, _ = joined
    c = calls.set_index("call")
    assert c.loc["gen", "predicted_s"] == pytest.approx(3.0)
    assert c.loc["gen", "measured_s"] == pytest.approx(3.3)
    assert c.loc["train", "predicted_s"] == pytest.approx(3.5)  # data on the link is outside the window
    assert c.loc["train", "measured_s"] == pytest.approx(4.0)
    assert c.loc["train", "ape"] == pytest.approx(0.5 / 4.0)
    assert list(c["call_kind"]) == ["generate", "train"]


def test_decode_is_summed_per_call_and_stage_and_data_is_per_call(joined):
    _, _, ops = joined
    o = ops.set_index(["call", "stage", "kind"])
    assert o.loc[("gen", 0, "decode"), "predicted_s"] == pytest.approx(2.0)
    assert o.loc[("gen", 0, "decode"), "measured_s"] == pytest.approx(2.2)
    assert o.loc[("gen", 0, "decode"), "ape"] == pytest.approx(0.2 / 2.2)
    # data: the busiest device (0.7 s) against the predicted link span (0.5 s)
    assert o.loc[("train", -1, "data"), "measured_s"] == pytest.approx(0.7)
    assert o.loc[("train", -1, "data"), "ape"] == pytest.approx(0.2 / 0.7)
    # the executor does not time tensor-parallel collectives apart: the predicted 0.1 s one is
    # counted in the forward it follows (0.9 + 0.1 s against the measured 1.0 s)
    assert o.loc[("train", 0, "forward"), "predicted_s"] == pytest.approx(1.0)
    assert o.loc[("train", 0, "forward"), "ape"] == pytest.approx(0.0)
    assert ("train", 0, "tp_comm") not in o.index


def test_summary_per_iteration_call_kind_and_op_kind(joined):
    s = summary(*joined)
    assert s["iteration"]["median_ape"] == pytest.approx(2 / 12)
    assert s["call_kind"]["train"]["max_ape"] == pytest.approx(0.125)
    assert s["op_kind"]["decode"]["median_ape"] == pytest.approx(0.2 / 2.2)
    assert s["op_kind"]["optimizer"]["median_ape"] == pytest.approx(0.1 / 0.6)
    assert "tp_comm" not in s["op_kind"]  # folded into the forward it follows
    text = summary_table(s)
    assert "16.7%" in text and "decode" in text
    plans = plan_table(joined[0])
    assert "11.0000–13.0000" in plans and "8.3%" in plans  # the runs' spread and the error beyond it


def test_steady_state_leaves_out_the_warm_up_iteration():
    slow_first = [Span(0, 5, 0, 0, "gen", "decode", -1, 0)] + list(predicted().spans[7:])
    tl = Timeline.of(slow_first)
    o = op_durations(tl, warmup=1).set_index(["call", "stage", "kind"])
    assert o.loc[("gen", 0, "decode"), "duration_s"] == pytest.approx(2.0)


def test_ranking_spearman_kendall_and_the_predicted_best():
    plans = pd.DataFrame({"plan": list("abcd"), "predicted_s": [1.0, 2.0, 3.0, 4.0],
                          "measured_s": [1.1, 1.9, 3.5, 3.0], "measured_min_s": [1.0, 1.8, 3.4, 2.9],
                          "measured_max_s": [1.2, 2.0, 3.6, 3.1]})
    r = ranking(plans)
    assert r["spearman"] == pytest.approx(0.8)
    assert r["kendall"] == pytest.approx(4 / 6)
    assert r["predicted_best_is_measured_best"] and r["predicted_best_behind"] == pytest.approx(0.0)
    swapped = plans.assign(measured_s=[1.2, 1.0, 3.5, 3.0], measured_min_s=[1.15, 0.9, 3.4, 2.9],
                           measured_max_s=[1.3, 1.1, 3.6, 3.1])
    r = ranking(swapped)
    assert (r["predicted_best"], r["measured_best"]) == ("a", "b")
    assert r["predicted_best_behind"] == pytest.approx(0.2)
    assert not r["predicted_best_within_spread"]


def test_plans_wide_has_a_predicted_and_measured_column_per_call(joined):
    plans, calls, _ = joined
    wide = plans_wide(plans, calls)
    assert wide.loc[0, "gen_predicted_s"] == pytest.approx(3.0)
    assert wide.loc[0, "train_measured_s"] == pytest.approx(4.0)
    assert list(wide.columns[-4:]) == ["gen_predicted_s", "gen_measured_s", "train_predicted_s", "train_measured_s"]


def test_reallocation_and_data_count_the_transfer_not_the_wait():
    """The executor's realloc and data spans also hold waiting for the other side: a device
    that enters a reallocation early waits for its peer, a consumer waits for its producer.
    Only the transfer proper is compared; the producer's own sending span is not a data wait."""
    spans = []
    for it in range(2):
        o = 10.0 * it
        spans += [Span(o + 0.0, o + 5.5, 1, it, "gen", "realloc"),  # waits 4 s for device 0
                  Span(o + 4.0, o + 5.4, 0, it, "gen", "realloc"),
                  Span(o + 5.5, o + 7.0, 1, it, "gen", "compute", -1, 0),
                  Span(o + 5.5, o + 7.0, 1, it, "gen", "prefill", 0, 0),
                  Span(o + 7.0, o + 7.1, 1, it, "gen", "data"),  # gen posting its outputs
                  Span(o + 5.6, o + 7.4, 0, it, "train", "data"),  # waits for gen, then 0.4 s
                  Span(o + 7.4, o + 9.0, 0, it, "train", "compute", -1, 0),
                  Span(o + 7.4, o + 9.0, 0, it, "train", "forward", 0, 0)]
    ops = op_durations(Timeline.of(spans, "measured"), 1, {"train": ["gen"]}).set_index(["call", "kind"])
    assert ops.loc[("gen", "realloc"), "duration_s"] == pytest.approx(1.5)
    assert ops.loc[("train", "data"), "duration_s"] == pytest.approx(0.4)
    assert ("gen", "data") not in ops.index
    # without the producers a data wait counts from its own start
    plain = op_durations(Timeline.of(spans, "measured"), 1).set_index(["call", "kind"])
    assert plain.loc[("train", "data"), "duration_s"] == pytest.approx(1.8)


def test_untimed_tensor_parallel_collectives_count_in_the_op_they_follow():
    """The executor's forward span encloses its TP all-reduces; the simulator draws them apart.
    With no measured tp spans, the prediction's are folded into the op before them."""
    pred = Timeline.of([Span(0, 1, 0, 0, "train", "forward", 0, 0),
                        Span(1, 1.5, 0, 0, "train", "tp_allreduce", 0, 0, "nvlink"),
                        Span(1.5, 3.5, 0, 0, "train", "backward", 0, 0),
                        Span(3.5, 3.75, 0, 0, "train", "tp_allreduce", 0, 0, "nvlink")], "predicted")
    meas = Timeline.of([Span(0, 3.8, 0, 0, "train", "compute", -1, 0), Span(0, 1.6, 0, 0, "train", "forward", 0, 0),
                        Span(1.6, 3.8, 0, 0, "train", "backward", 0, 0)], "measured")
    ops = compare_plan("p", pred, [meas], {"train": "train"}, warmup=0).ops.set_index("kind")
    assert ops.loc["forward", "predicted_s"] == pytest.approx(1.5)
    assert ops.loc["backward", "predicted_s"] == pytest.approx(2.25)
    assert "tp_comm" not in ops.index
    # a measurement that does time them keeps them apart
    timed = Timeline.of(list(meas.spans) + [Span(1.4, 1.6, 0, 0, "train", "tp_allreduce", 0, 0)], "measured")
    ops = compare_plan("p", pred, [timed], {"train": "train"}, warmup=0).ops.set_index("kind")
    assert ops.loc["forward", "predicted_s"] == pytest.approx(1.0) and "tp_comm" in ops.index


def test_a_stage_op_counts_from_when_its_last_device_began_it():
    """Two tensor-parallel ranks run each micro-batch's forward together; rank 1 enters its
    first forward 5 s early and waits inside it for rank 0. Each op counts from the later
    start; a rank's own slower step still counts in full (the stage takes the busiest)."""
    spans = [Span(0.0, 6.0, 1, 0, "inf", "forward", 0, 0), Span(5.0, 6.0, 0, 0, "inf", "forward", 0, 0),
             Span(6.0, 7.0, 1, 0, "inf", "forward", 1, 0), Span(6.0, 7.5, 0, 0, "inf", "forward", 1, 0),
             # decode steps share a micro-batch: matched by their order on each device
             Span(8.0, 8.5, 0, 0, "inf", "decode", 0, 0), Span(8.2, 8.6, 1, 0, "inf", "decode", 0, 0),
             Span(8.6, 9.0, 0, 0, "inf", "decode", 0, 0), Span(8.6, 9.1, 1, 0, "inf", "decode", 0, 0)]
    ops = op_durations(Timeline.of(spans, "measured"), 0).set_index(["call", "kind"])
    assert ops.loc[("inf", "forward"), "duration_s"] == pytest.approx(1.0 + 1.5)
    assert ops.loc[("inf", "decode"), "duration_s"] == pytest.approx(0.4 + 0.5)


def test_a_call_window_opens_when_its_last_device_has_entered():
    """The simulator starts a call once all its devices are free; the executor's early device
    waits inside its compute span. The window runs from the later entry to the last end."""
    from analysis.compare import call_durations

    spans = [Span(0.0, 7.0, 1, 0, "inf", "compute", -1, 0), Span(5.0, 7.5, 0, 0, "inf", "compute", -1, 0)]
    assert call_durations(Timeline.of(spans, "measured"), 0)["inf"] == pytest.approx(2.5)


def test_an_asynchronous_run_joins_pushes_as_calls_and_leaves_out_the_drain():
    """Five iterations, 3 of warm-up and 1 of drain (η = 1): only iteration 3 counts. A weight
    push is a call of kind push on both sides, measured as the transfer proper: device 0 enters
    it straight after generating and waits there for the update on device 1."""
    pred, meas = [], []
    for it in range(5):
        o, m = 10.0 * it, 12.0 * it
        pred += [Span(o, o + 3, 0, it, "gen", "decode", -1, 0), Span(o + 3, o + 7, 1, it, "train", "forward", 0, 0)]
        meas += [Span(m, m + 3.5, 0, it, "gen", "compute", -1, 0), Span(m, m + 3.5, 0, it, "gen", "decode", 0, 0),
                 Span(m + 3.5, m + 8, 1, it, "train", "compute", -1, 0),
                 Span(m + 3.5, m + 8, 1, it, "train", "forward", 0, 0)]
        if it < 4:  # the last update feeds no rollout: no push
            pred += [Span(o + 7, o + 8, d, it, "push:gen", "push", -1, 0) for d in (0, 1)]
            meas += [Span(m + 3.5, m + 9.5, 0, it, "push:gen", "push", -1, 0),
                     Span(m + 3.5, m + 9.5, 0, it, "push:gen", "call", -1, 0),
                     Span(m + 8, m + 9.5, 1, it, "push:gen", "push", -1, 0),
                     Span(m + 8, m + 9.5, 1, it, "push:gen", "call", -1, 0)]
    frames = compare_plan("a", Timeline.of(pred), [Timeline.of(meas, "measured")], KINDS, warmup=3, drain=1)
    # iteration 3 ends with its push; the drain iteration 4 (shorter, no push) is left out
    assert frames.plan.loc[0, "predicted_s"] == pytest.approx(10.0)
    assert frames.plan.loc[0, "measured_s"] == pytest.approx(12.0)
    calls = frames.calls.set_index("call")
    assert calls.loc["push:gen", "call_kind"] == "push"
    assert calls.loc["push:gen", ["predicted_s", "measured_s"]].tolist() == pytest.approx([1.0, 1.5])
    assert calls.loc["gen", ["predicted_s", "measured_s"]].tolist() == pytest.approx([3.0, 3.5])
    ops = frames.ops.set_index(["call", "stage", "kind"])
    assert ops.loc[("push:gen", -1, "push"), ["predicted_s", "measured_s"]].tolist() == pytest.approx([1.0, 1.5])
    assert not frames.ops["measured_s"].isna().any() and not frames.ops["predicted_s"].isna().any()
    _, _, joined_ops = join([frames])
    assert "push" in set(joined_ops["kind"])
