"""Every plotting function writes a non-empty PNG; traces and timelines read back alike."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from analysis import plot
from analysis.compare import compare_plan, join
from estimator.errors import EXIT_INVALID
from estimator.timeline import Span, Timeline
from tests.test_compare import KINDS, measured, predicted

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def with_links() -> Timeline:
    """The synthetic prediction plus a reallocation and a pipeline message on a link."""
    extra = [Span(0.0, 0.4, 1, 0, "train", "realloc", -1, 0, "realloc actor"),
             Span(1.0, 1.1, -1, 0, "train", "pp_send", 0, 0, "pp dev0")]
    return Timeline.of(list(predicted().spans) + extra, "predicted", profile="cpu")


def test_chrome_trace_reads_back_as_the_same_timeline(tmp_path: Path):
    tl = with_links()
    tl.write_chrome_trace(tmp_path / "t.json")
    back = plot.load_any(tmp_path / "t.json")
    assert len(back.spans) == len(tl.spans)
    for a, b in zip(back.spans, tl.spans):
        assert (a.device, a.iteration, a.call, a.op, a.micro_batch, a.stage, a.resource) == \
               (b.device, b.iteration, b.call, b.op, b.micro_batch, b.stage, b.resource)
        assert a.start_s == pytest.approx(b.start_s) and a.end_s == pytest.approx(b.end_s)
    assert back.source == "predicted"
    tl.save(tmp_path / "tl.json")
    assert plot.load_any(tmp_path / "tl.json").spans == tl.spans


def test_call_colours_are_stable_and_distinct_for_preset_calls():
    assert plot.call_color("actor_gen") == plot.call_color("actor_gen")
    names = ["actor_gen", "ref_inf", "reward_inf", "critic_inf", "actor_train", "critic_train"]
    assert len({plot.call_color(n) for n in names}) == len(names)
    assert plot.call_color("my_call") == plot.call_color("my_call")


def test_gantt_writes_a_png_for_predicted_and_measured(tmp_path: Path):
    assert _is_png(plot.write_gantt(with_links(), tmp_path / "p.png"))
    assert _is_png(plot.write_gantt(measured(11.0), tmp_path / "m.png", iterations=1))


def test_gantt_above_16_devices_draws_one_row_per_stage(tmp_path: Path):
    spans = [Span(0.0, 1.0, d, 0, "actor_train", "forward", 0, d // 8) for d in range(32)]
    tl = Timeline.of(spans)
    rows = plot._rows(tl, None)
    assert sorted(rows["device"]) == [0, 8, 16, 24]
    assert _is_png(plot.write_gantt(tl, tmp_path / "big.png"))


def test_validation_figures_write_pngs(tmp_path: Path):
    plans, calls, ops = join([compare_plan("a", predicted(), [measured(11.0), measured(13.0)], KINDS),
                              compare_plan("b", predicted(), [measured(9.5)], KINDS)])
    assert _is_png(plot.scatter(plans, tmp_path / "scatter.png"))
    assert _is_png(plot.error_bars(calls, ops, tmp_path / "errors.png"))
    assert _is_png(plot.stacked(predicted(), measured(11.0), tmp_path / "stacked.png", "plan a"))
    wide = pd.DataFrame({"plan": ["x", "y"], "predicted_s": [0.01, 5.0], "measured_s": [0.02, 4.0],
                         "measured_min_s": [0.015, 3.5], "measured_max_s": [0.025, 4.5]})
    assert _is_png(plot.scatter(wide, tmp_path / "log.png"))  # a wide range: log axes


def test_cli_draws_a_trace_and_rejects_a_bad_file(tmp_path: Path, capsys):
    with_links().write_chrome_trace(tmp_path / "t.json")
    assert plot.main([str(tmp_path / "t.json"), "--out", str(tmp_path / "g.png")]) == 0
    assert _is_png(tmp_path / "g.png")
    (tmp_path / "bad.json").write_text(json.dumps({"hello": 1}))
    assert plot.main([str(tmp_path / "bad.json")]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "traceEvents" in err


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(ts="0"), "traceEvents[3].ts='0' must be a number"),
    (lambda e: e.update(ts=-5.0), "traceEvents[3].ts=-5.0 must be at least 0"),
    (lambda e: e.update(dur=[]), "traceEvents[3].dur=[] must be a number"),
    (lambda e: e.pop("ts"), "traceEvents[3]: a complete event needs ts"),
    (lambda e: e.update(args="x"), "traceEvents[3].args='x' must be an object"),
    (lambda e: e["args"].update(device="x"), "traceEvents[3].device='x' must be an integer"),
    (lambda e: e["args"].update(iteration=1.5), "traceEvents[3].iteration=1.5 must be an integer"),
    (lambda e: e.update(name=None), "traceEvents[3].name=None must be a string"),
    (lambda e: e.update(tid=[1]), "traceEvents[3].tid=[1] must be an integer or a name"),
])
def test_a_trace_names_the_event_field_that_breaks_a_rule(tmp_path: Path, capsys, change, message):
    trace = with_links().chrome_trace()
    assert trace["traceEvents"][3]["ph"] == "X"
    change(trace["traceEvents"][3])
    (tmp_path / "t.json").write_text(json.dumps(trace))
    assert plot.main([str(tmp_path / "t.json"), "--out", str(tmp_path / "g.png")]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "g.png").exists()


def test_cli_reads_strictly_and_checks_the_figure_path_first(tmp_path: Path, capsys):
    with_links().save(tmp_path / "tl.json")
    text = (tmp_path / "tl.json").read_text()
    (tmp_path / "nan.json").write_text(text.replace('"end_s": 0.4', '"end_s": NaN', 1))
    (tmp_path / "bytes.json").write_bytes(text.encode()[:50] + b"\xff" + text.encode()[50:])
    (tmp_path / "file.txt").write_text("x")
    for argv, message in (([str(tmp_path / "nan.json")], "NaN is not a JSON number"),
                          ([str(tmp_path / "bytes.json")], "not UTF-8 text: byte 0xff at offset 50"),
                          ([str(tmp_path), "--out", str(tmp_path / "g.png")], "is a directory"),
                          ([str(tmp_path / "tl.json"), "--out", str(tmp_path)], "is a directory"),
                          ([str(tmp_path / "tl.json"), "--out", str(tmp_path / "file.txt" / "g.png")],
                           "is not a directory"),
                          ([str(tmp_path / "tl.json"), "--out", ""], "the path is empty"),
                          ([str(tmp_path / "tl.json"), "--iterations", "0"], "--iterations=0 must be at least 1")):
        assert plot.main(argv) == EXIT_INVALID, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    # a figure's missing directories are made, as before
    assert plot.main([str(tmp_path / "tl.json"), "--out", str(tmp_path / "new" / "dir" / "g.png")]) == 0
    assert _is_png(tmp_path / "new" / "dir" / "g.png")
