"""Every plotting function writes a non-empty PNG; traces and timelines read back alike."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from analysis import plot
from analysis.compare import compare_plan, join
from estimator.base.errors import EXIT_INVALID
from estimator.spec.timeline import Span, Timeline
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


def test_gantt_above_16_devices_without_a_plan_draws_every_device_as_a_thin_row(tmp_path: Path):
    spans = [Span(0.0, 1.0, d, 0, "actor_train", "forward", 0, d // 8) for d in range(32)]
    tl = Timeline.of(spans)
    groups = plot.device_groups(tl, set(range(32)))
    assert groups == [range(d, d + 1) for d in range(32)]
    assert sorted(plot._place(tl, plot._rows(tl, None), groups)["row"]) == list(range(32))
    assert _is_png(plot.write_gantt(tl, tmp_path / "big.png"))


def _layout(mesh: str, dp: int, tp: int, pp: int) -> dict:
    return {"mesh": mesh, "dp": dp, "tp": tp, "pp": pp, "micro_batches": 1}


def test_gantt_above_16_devices_groups_rows_by_stages_and_shows_every_busy_device(tmp_path: Path):
    """Generation on 32 devices in one stage (recorded on device 0 only), training on 0-15 in
    two stages, a critic on 16-31: three groups, and generation is drawn on all three."""
    plan = {"gen": _layout("0-31", 4, 8, 1), "train": _layout("0-15", 2, 4, 2), "critic": _layout("16-31", 2, 8, 1)}
    spans = [Span(0.0, 2.0, 0, 0, "gen", "decode", 0, 0), Span(2.0, 3.0, 0, 0, "train", "forward", 0, 0),
             Span(3.0, 4.0, 8, 0, "train", "forward", 0, 1), Span(2.0, 5.0, 16, 0, "critic", "forward", 0, 0),
             Span(0.0, 0.1, 0, 0, "gen", "realloc", -1, 0, "realloc actor")]
    tl = Timeline(tuple(spans), "predicted", {"plan": plan, "spans": "one device per pipeline stage"})
    groups = plot.device_groups(tl, {0, 8, 16})
    assert groups == [range(0, 8), range(8, 16), range(16, 32)]
    placed = plot._place(tl, plot._rows(tl, None), groups)
    rows = {(c, op): sorted(g["row"]) for (c, op), g in placed.groupby(["call", "op"])}
    assert rows == {("gen", "decode"): [0, 1, 2], ("gen", "realloc"): [0, 1, 2], ("train", "forward"): [0, 1],
                    ("critic", "forward"): [2]}
    assert placed.loc[(placed["call"] == "train"), ["row", "stage"]].values.tolist() == [[0, 0], [1, 1]]
    fig, ax = plot.plt.subplots()
    plot.gantt(tl, ax)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["dev 0-7 (8)", "dev 8-15 (8)", "dev 16-31 (16)"]
    plot.plt.close(fig)


def test_a_simulated_big_cluster_draws_each_call_on_every_device_group_it_runs_on():
    """The simulator's timeline of a 32-device plan, one device per stage or every device,
    lands on the same rows: each call on exactly the groups its stages cover."""
    from analysis.whatif import apply
    from estimator.profile.profiles import load_profile
    from estimator.sim.simulate import simulate
    from estimator.spec.experiment import load_experiment
    from estimator.spec.plan import Plan, check
    from tests.conftest import EXAMPLES

    big = {"nodes": 4, "devices_per_node": 8, "batch_size": 64}
    exp = apply(load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml"), big)
    lay = {"actor_gen": _layout("0-31", 32, 1, 1), "ref_inf": _layout("0-31", 16, 1, 2),
           "reward_inf": _layout("0-15", 8, 2, 1), "critic_inf": _layout("16-31", 8, 2, 1),
           "actor_train": _layout("0-15", 8, 1, 2), "critic_train": _layout("16-31", 16, 1, 1)}
    plan = check(Plan.from_data({"calls": lay}), exp)
    result = simulate(exp, plan, load_profile("cpu"), iterations=1)
    placements = []
    for per_device in (False, True):
        tl = result.timeline(per_device)
        df = plot._rows(tl, None)
        groups = plot.device_groups(tl, set(df.loc[df["device"] >= 0, "device"]))
        assert groups == [range(0, 8), range(8, 16), range(16, 32)]
        placed = plot._place(tl, df, groups)
        assert {c: sorted(set(g["row"])) for c, g in placed.groupby("call")} == {
            "actor_gen": [0, 1, 2], "ref_inf": [0, 1, 2], "reward_inf": [0, 1], "critic_inf": [2],
            "actor_train": [0, 1], "critic_train": [2]}
        placements.append(sorted(zip(placed["row"], placed["call"], placed["op"], placed["start_s"])))
    assert placements[0] == placements[1]


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


def _kept_figure(monkeypatch) -> list:
    """Keep the figure a plotting function saves, to look at its axes."""
    figures = []
    save = plot._save

    def keep(fig, out):
        figures.append(fig)
        fig.canvas.draw()
        return save(fig, out)

    monkeypatch.setattr(plot, "_save", keep)
    return figures


def _labels(axis, lo: float, hi: float) -> list[str]:
    fmt = axis.get_major_formatter()
    return [fmt(v) for v in axis.get_majorticklocs() if lo <= v <= hi and fmt(v)]


def test_validation_scatter_puts_measured_on_x_predicted_on_y_with_readable_log_ticks(tmp_path, monkeypatch):
    figures = _kept_figure(monkeypatch)
    plans = pd.DataFrame({"plan": ["a", "b", "c"], "predicted_s": [0.03, 0.2, 1.3], "measured_s": [0.035, 0.25, 1.1],
                          "measured_min_s": [0.033, 0.24, 1.0], "measured_max_s": [0.04, 0.27, 1.2]})
    plot.scatter(plans, tmp_path / "s.png", "exp on profile cpu")
    ax = figures[0].axes[0]
    points = next(line for line in ax.lines if line.get_marker() == "o")
    assert list(points.get_xdata()) == [0.035, 0.25, 1.1] and list(points.get_ydata()) == [0.03, 0.2, 1.3]
    assert ax.get_xlabel().startswith("measured") and ax.get_ylabel().startswith("predicted")
    assert ax.get_xscale() == "log"
    lo, hi = ax.get_xlim()
    for axis in (ax.xaxis, ax.yaxis):
        assert _labels(axis, lo, hi) == ["0.05", "0.1", "0.2", "0.5", "1"]  # 1, 2 and 5 of each decade


def test_published_scatter_uses_the_same_convention_and_names_table_plan_and_profile(tmp_path, monkeypatch):
    from analysis.published import scatter, scatter_title
    from estimator.profile.profiles import load_profile

    figures = _kept_figure(monkeypatch)
    df = pd.DataFrame({"tp": [1, 2, 1], "pp": [1, 1, 2], "measured_s": [0.1, 0.3, 0.9],
                       "predicted_s": [0.08, 0.33, 1.0]})
    title = scatter_title("analysis/data/vtrain/ground_truth_single.csv", 3, load_profile("a100-vtrain"),
                          {"mape": 0.123, "spearman": 0.95})
    assert title.startswith("vTrain ground_truth_single.csv: 3 one-node A100 runs, each one SFT train call")
    assert "profile a100-vtrain (this project's eager executor; trainer Megatron-DeepSpeed (vTrain's runs))\n" \
           "MAPE 12.3 %" in title
    scatter(df, tmp_path / "s.png", title)
    ax = figures[0].axes[0]
    from matplotlib.collections import PathCollection

    xy = sorted(tuple(p) for c in ax.collections if isinstance(c, PathCollection) for p in c.get_offsets())
    assert [tuple(round(v, 6) for v in p) for p in xy] == [(100.0, 80.0), (300.0, 330.0), (900.0, 1000.0)]
    assert ax.get_xlabel().startswith("measured") and ax.get_ylabel().startswith("predicted")
    lo, hi = ax.get_xlim()
    assert len(_labels(ax.xaxis, lo, hi)) >= 4 and ax.get_title() == title


def test_validation_scatter_title_names_experiment_profile_and_plans():
    from analysis.validate import scatter_title
    from estimator.profile.profiles import load_profile

    title = scatter_title("ppo-tiny-2xcpu", ["baseline"] * 4 + ["search"] + ["sample"] * 15, load_profile("cpu"))
    assert title == ("ppo-tiny-2xcpu on profile cpu (this project's eager executor)\n20 plans (4 baselines, the "
                     "searched best, 15 sampled): measured (x) vs predicted (y) iteration time")


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
