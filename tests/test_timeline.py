"""Timeline: intervals, steady state, Chrome trace, pandas, JSON round trip."""

from __future__ import annotations

import json

import pytest

from estimator.base.errors import ConfigError
from estimator.spec.timeline import Span, Timeline


def _timeline():
    # iteration 0 ends at 4, iteration 1 at 7, iteration 2 at 10 -> steady period 3 after one warm-up
    spans = [
        Span(0.0, 2.0, 0, 0, "gen", "decode"), Span(2.0, 4.0, 1, 0, "train", "forward", 0, 0),
        Span(3.0, 5.0, 0, 1, "gen", "decode"), Span(5.0, 7.0, 1, 1, "train", "backward", 1, 0),
        Span(6.0, 8.0, 0, 2, "gen", "decode"), Span(8.0, 10.0, -1, 2, "train", "realloc", resource="nvlink:0-1"),
    ]
    return Timeline.of(reversed(spans), source="predicted", plan="p.json")


def test_spans_are_sorted_and_intervals_cover_calls():
    tl = _timeline()
    assert [s.start_s for s in tl.spans] == sorted(s.start_s for s in tl.spans)
    assert tl.call_intervals()[(1, "train")] == (5.0, 7.0)
    assert tl.per_call()["train"] == {"start_s": 8.0, "end_s": 10.0, "duration_s": 2.0}
    assert tl.makespan_s == 10.0 and tl.iterations == [0, 1, 2]


def test_steady_state_excludes_warmup():
    tl = _timeline()
    assert tl.iteration_ends() == [4.0, 7.0, 10.0]
    assert tl.iteration_times() == [4.0, 3.0, 3.0]
    assert tl.steady_state_s(warmup=1) == pytest.approx(3.0)
    assert tl.steady_state_s(warmup=0) == pytest.approx(10.0 / 3)
    assert tl.steady_state_s(warmup=5) == pytest.approx(10.0 / 3)
    assert Timeline(()).steady_state_s() == 0.0


def test_chrome_trace_has_one_track_per_device_and_link(tmp_path):
    path = _timeline().write_chrome_trace(tmp_path / "t.json")
    trace = json.loads(path.read_text())
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert names == {"device 0", "device 1", "nvlink:0-1"}
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == 6 and xs[0]["ts"] == 0.0 and xs[0]["dur"] == pytest.approx(2e6)
    assert trace["otherData"]["plan"] == "p.json"


def test_dataframe_and_json_round_trip(tmp_path):
    tl = _timeline()
    df = tl.to_dataframe()
    assert list(df.columns[:4]) == ["start_s", "end_s", "device", "iteration"]
    assert df["duration_s"].sum() == pytest.approx(12.0)
    again = Timeline.load(tl.save(tmp_path / "tl.json"))
    assert again == tl
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ConfigError, match="not a rlhf-plan/timeline-v1 document"):
        Timeline.load(tmp_path / "bad.json")


@pytest.mark.parametrize("field, value, message", [
    ("start_s", "0", "spans[1].start_s='0' must be a number"),
    ("start_s", -1.0, "spans[1].start_s=-1.0 must be at least 0"),
    ("end_s", 1.0, "spans[1]: end_s=1.0 is before start_s=2.0"),
    ("end_s", True, "spans[1].end_s=True must be a number"),
    ("device", -2, "spans[1].device=-2 must be at least -1"),
    ("device", 1.5, "spans[1].device=1.5 must be an integer"),
    ("iteration", -1, "spans[1].iteration=-1 must be a non-negative integer"),
    ("micro_batch", None, "spans[1].micro_batch=None must be an integer"),
    ("stage", "0", "spans[1].stage='0' must be an integer"),
    ("call", "", "spans[1].call='' must be a non-empty name"),
    ("op", [], "spans[1].op=[] must be a non-empty name"),
    ("resource", 1, "spans[1].resource=1 must be a link name"),
    ("colour", "red", "spans[1]: unknown key(s) ['colour']"),
])
def test_a_timeline_file_names_the_span_field_that_breaks_a_rule(tmp_path, field, value, message):
    doc = _timeline().to_dict()
    doc["spans"][1][field] = value
    (tmp_path / "tl.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        Timeline.load(tmp_path / "tl.json")
    assert message in str(err.value) and "tl.json" in str(err.value), str(err.value)


def test_a_timeline_document_checks_its_spans_source_and_meta():
    doc = _timeline().to_dict()
    del doc["spans"][0]["end_s"]
    with pytest.raises(ConfigError, match=r"spans\[0\]: missing key\(s\) \['end_s'\]"):
        Timeline.from_dict(doc)
    for key, value, message in (("spans", {}, "spans must be a list"), ("source", "guessed", "source='guessed'"),
                                ("meta", [1], "meta=[1] must be an object"), ("colour", 1, "unknown key(s)")):
        with pytest.raises(ConfigError) as err:
            Timeline.from_dict({**_timeline().to_dict(), key: value})
        assert message in str(err.value)
    optional = _timeline().to_dict()
    for span in optional["spans"]:
        del span["micro_batch"], span["stage"], span["resource"]
    assert [s.micro_batch for s in Timeline.from_dict(optional).spans] == [-1] * 6
