"""python -m estimator.calibrate: a tiny calibration end to end, what it writes, that the
estimator prices work exactly as the fit does, that an interrupted run leaves the previous
profile untouched, and that bad arguments are refused before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibration import pipeline as calibrate
from calibration.collectives import IN_SITU_SHAPES
from calibration.fit_compute import OpTable, params_from_sections, row_modes
from estimator.profile.profiles import load_profile
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "nccl-tests"


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("profiles")
    assert calibrate.main(["--grid", "tiny", "--name", "tiny-cpu", "--out", str(out)]) == 0
    return out


def test_writes_a_measured_profile_with_its_raw_data_and_reports(tiny_profile: Path):
    names = sorted(p.name for p in tiny_profile.iterdir())
    assert names == ["tiny-cpu.host.report.csv", "tiny-cpu.json", "tiny-cpu.kernels-alone.csv",
                     "tiny-cpu.kernels.csv", "tiny-cpu.kernels.report.csv", "tiny-cpu.links.csv",
                     "tiny-cpu.links.report.csv"]
    prof = load_profile(tiny_profile / "tiny-cpu.json")
    # the grid timed again by one process alone: the host section, every factor in (0, 1]
    assert prof.host is not None and prof.host.devices == 2
    assert all(0 < f <= 1 for f in prof.host.alone.values())
    alone = pd.read_csv(tiny_profile / "tiny-cpu.kernels-alone.csv")
    kernels = pd.read_csv(tiny_profile / "tiny-cpu.kernels.csv")
    assert sorted(alone["family"].unique()) == sorted(kernels["family"].unique())
    # each case timed alone right after it was timed with both processes busy: the same cases, in order
    key = ["family", "op", "model", "tp", "batch", "seq", "kv", "phase"]
    assert alone[key].astype(str).values.tolist() == kernels[key].astype(str).values.tolist()
    assert set(pd.read_csv(tiny_profile / "tiny-cpu.host.report.csv")["split"]) == {"fit", "held-out"}
    # what a collective costs between computations, beside the back-to-back curves
    raw_links = pd.read_csv(tiny_profile / "tiny-cpu.links.csv")
    in_situ = raw_links[raw_links["kind"] == "in_situ"]
    assert len(in_situ) == len(IN_SITU_SHAPES) and prof.collective_overhead_s == max(0.0, in_situ["median_s"].median())
    p2p = raw_links[raw_links["kind"] == "in_situ_p2p"]
    assert len(p2p) == 1 and prof.p2p_overhead_s == max(0.0, float(p2p["median_s"].iloc[0]))
    assert not {"in_situ", "in_situ_p2p"} & set(pd.read_csv(tiny_profile / "tiny-cpu.links.report.csv")["kind"])
    assert prof.source == "measured" and prof.compose == "serial" and prof.dtype == "float32"
    assert "python -m estimator.calibrate --grid tiny --name tiny-cpu" in prof.raw["compute"]["launch"]["command"]
    assert prof.micro_batch_overhead_s > 0 and prof.call_overhead_s >= 0
    assert set(prof.software) >= {"torch", "python"}
    report = pd.read_csv(tiny_profile / "tiny-cpu.kernels.report.csv")
    assert set(report["split"]) == {"fit", "held-out"}
    links = pd.read_csv(tiny_profile / "tiny-cpu.links.report.csv")
    assert {"all_reduce", "all_gather", "broadcast", "p2p"} <= set(links["kind"])


def test_the_estimator_prices_every_raw_row_as_the_fit_does(tiny_profile: Path):
    """The profile file carries the fit exactly: the estimator's op pricing of each measured
    row's aten ops equals the fit's prediction, in every dispatch mode."""
    prof = load_profile(tiny_profile / "tiny-cpu.json")
    raw = pd.read_csv(tiny_profile / "tiny-cpu.kernels.csv")
    raw = raw[~raw["family"].isin(("compose", "executor"))].reset_index(drop=True)
    table = OpTable(raw)
    fit = table.predict(params_from_sections(prof.raw))
    modes = np.array(["nograd", "grad", "backward"])[row_modes(raw)]
    assert prof.device_scale != (1.0, 1.0, 1.0)  # the tiny grid's passes set the in-model scales
    for mode in ("nograd", "grad", "backward"):
        est = np.zeros(len(raw))
        for inside in (True, False):  # a piece's ops run inside the model's code, a single op alone
            sel = (table.modes == ["nograd", "grad", "backward"].index(mode)) & (table.in_model == inside)
            est += np.bincount(table.row[sel], prof.ops_s_many(table.flops[sel], table.bytes[sel], 1.0, mode,
                                                                in_model=inside), minlength=len(raw))
        est += table.checkpointed @ np.asarray(prof.checkpoint_s)  # checkpointing's own cost per block
        rows = modes == mode
        assert np.allclose(est[rows], fit[rows], rtol=1e-9), mode


def test_collective_curves_reproduce_the_measured_medians_at_fitted_sizes(tiny_profile: Path):
    prof = load_profile(tiny_profile / "tiny-cpu.json")
    raw = pd.read_csv(tiny_profile / "tiny-cpu.links.csv")
    ratios = []
    curves = raw[(raw["size_bytes"] > 0) & ~raw["kind"].isin(("in_situ", "in_situ_p2p"))]
    for (kind, group), part in curves.groupby(["kind", "group_size"]):
        points = prof.raw["links"]["intra"][kind]["curves"][str(group)]
        for size, time_s in points:
            assert prof.collective_s(kind, size, group) == pytest.approx(time_s, rel=1e-9)
        med = part.groupby("size_bytes")["median_s"].median()
        ratios += [prof.collective_s(kind, s, group) / m for s, m in med.items()]
    # over every kind and size, the curves sit on what was measured (a monotone fit of noisy medians)
    assert np.median(np.abs(np.log(ratios))) < np.log(2.0)


def test_killing_a_calibration_leaves_the_previous_profile_byte_identical(tmp_path: Path):
    previous = (ROOT / "calibration" / "profiles" / "cpu.json").read_bytes()
    target = tmp_path / "victim.json"
    target.write_bytes(previous)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "estimator.calibrate", "--grid", "tiny", "--name", "victim",
                             "--out", str(tmp_path)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env=env, cwd=ROOT)
    seen = b""
    deadline = time.monotonic() + 120
    while b"kernels" not in seen and time.monotonic() < deadline:  # the measurement has started
        seen += os.read(proc.stderr.fileno(), 4096) or b""
        if proc.poll() is not None:
            break
    assert b"kernels" in seen, seen.decode(errors="replace")
    children: list[int] = []
    while len(children) < 2 and time.monotonic() < deadline:  # the kernels are timed in worker processes
        time.sleep(0.05)
        children = _children(proc.pid)
    assert children, "no worker process started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    assert target.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.json"]
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{c}").exists() for c in children), "workers outlived the killed calibration"


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.parametrize("argv, match", [
    (["--world-size", "0"], "--world-size=0 must be between 1 and 1024"),
    (["--name", "../x"], "--name='../x' must be"),
    (["--base", ""], "--base must name a profile"),
    (["--base", "no-such-profile", "--grid", "tiny"], "unknown hardware profile 'no-such-profile'"),
    (["--import-nccl-tests", "missing.txt", "--base", "h100-sxm", "--name", "x"], "'missing.txt' is not a readable"),
    (["--import-nccl-tests", str(FIXTURES / "all_reduce_perf.h100x8.txt")], "needs --base PROFILE and --name"),
    (["--ranks", "8", "--grid", "tiny"], "--ranks applies to --import-nccl-tests only"),
    (["--import-nccl-tests", str(FIXTURES / "all_reduce_perf.excerpt.txt"), "--ranks", "1", "--base", "a100-80g",
      "--name", "x"], "--ranks=1 must be a group size between 2 and 65536"),
    (["--experiment", "no-such.yaml", "--grid", "tiny"], "experiment file 'no-such.yaml' does not exist"),
    (["--experiment", str(FIXTURES), "--grid", "tiny"], "is a directory"),
])
def test_bad_arguments_exit_2_naming_them_before_any_work(argv, match, tmp_path, capsys, monkeypatch):
    from estimator.base.errors import cli_guard

    def measure(*args):
        raise AssertionError("the measurement started before the arguments were checked")

    monkeypatch.setattr(calibrate, "measure_profile", measure)
    assert cli_guard(calibrate.main, argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_missing_out_directory_is_created_when_the_profile_is_written(tmp_path, monkeypatch):
    from estimator.base.errors import cli_guard

    measured = []

    def measure(args, base, name, command):  # stands in for the measurement (minutes)
        measured.append(name)
        return {"profile": base, "kernels": None, "kernels_report": None, "links": None, "links_report": None,
                "alone": None, "host_report": None}

    monkeypatch.setattr(calibrate, "measure_profile", measure)
    monkeypatch.setattr(calibrate, "_table", lambda *a: "")
    out = tmp_path / "a" / "b"
    assert cli_guard(calibrate.main, ["--grid", "tiny", "--name", "x", "--out", str(out), "--json"]) == 0
    assert measured == ["x"] and (out / "x.json").is_file()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    from estimator.base.errors import cli_guard

    f = tmp_path / "file"
    f.write_text("x")
    assert cli_guard(calibrate.main, ["--grid", "tiny", "--out", str(f)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_nccl_tests_import_builds_a_loadable_profile_with_the_measured_curves(tmp_path):
    src = FIXTURES / "all_reduce_perf.h100x8.txt"
    assert calibrate.main(["--import-nccl-tests", str(src), "--base", "h100-sxm", "--name", "my-h100",
                           "--out", str(tmp_path), "--json"]) == 0
    prof = load_profile(tmp_path / "my-h100.json")
    assert prof.name == "my-h100"
    entry = prof.raw["links"]["intra"]["all_reduce"]
    assert "8" in entry["curves"] and src.name in entry["cite"]
    base = load_profile("h100-sxm")
    assert prof.peak_flops == base.peak_flops  # the rest of the base is kept
    doc = json.loads((tmp_path / "my-h100.json").read_text())
    assert doc["format"] == "rlhf-plan/profile-v2"


def test_an_nccl_tests_excerpt_imports_saying_where_its_group_size_came_from(tmp_path, capsys):
    src = FIXTURES / "all_reduce_perf.excerpt.txt"  # nThread 1 nGpus 1, no Rank lines
    assert calibrate.main(["--import-nccl-tests", str(src), "--base", "a100-80g", "--name", "pasted",
                           "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "all_reduce_perf.excerpt.txt: all_reduce over 8 ranks on 1 node(s), inferred from busbw/algbw" in out
    assert "8 ranks inferred from busbw/algbw" in load_profile(tmp_path / "pasted.json").raw["links"]["intra"][
        "all_reduce"]["cite"]
    assert calibrate.main(["--import-nccl-tests", str(src), "--ranks", "8", "--base", "a100-80g", "--name", "given",
                           "--out", str(tmp_path), "--json"]) == 0
    run, = json.loads(capsys.readouterr().out)["runs"]
    assert run["ranks"] == 8 and run["ranks_from"].startswith("given by --ranks 8")


def _reports() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Synthetic held-out reports: gemm well sampled, dispatch and adam not; one thin curve."""
    kernels = pd.DataFrame([("gemm", "fit", 150, 30.0, 400.0), ("gemm", "held-out", 150, 33.0, 411.0),
                            ("dispatch", "fit", 1, 60.0, 60.0), ("dispatch", "held-out", 1, 70.0, 70.0),
                            ("adam", "fit", 9, 7.0, 30.0), ("adam", "held-out", 3, 14.0, 34.0)],
                           columns=["family", "split", "n", "median_pct", "max_pct"])
    links = pd.DataFrame([("intra", "all_reduce", "2", 6, 2, 74.0, 90.0), ("intra", "p2p", "2", 40, 12, 8.0, 27.0)],
                         columns=["link_class", "kind", "group", "n_fit", "n_holdout", "median_ape_pct",
                                  "max_ape_pct"])
    return kernels, links


def test_caveats_call_quick_a_smoke_test_and_name_the_under_sampled_families():
    kernels, links = _reports()
    notes = calibrate.caveats("quick", kernels, links)
    assert len(notes) == 2 and notes[0].startswith("--quick is a smoke test")
    assert "dispatch (1 fitted, 1 held out)" in notes[1] and "adam (9 fitted, 3 held out)" in notes[1]
    assert "intra all_reduce group 2 (6 sizes fitted)" in notes[1]
    assert "gemm" not in notes[1] and "p2p" not in notes[1]  # well sampled: no caveat
    # the full grid is no smoke test; a well-sampled report has nothing to say
    assert calibrate.caveats("full", kernels, links) == notes[1:]
    assert calibrate.caveats("full", kernels[kernels.family == "gemm"], links[links.kind == "p2p"]) == []
    assert calibrate.caveats("tiny", kernels.iloc[:0], None)[0].startswith("--grid tiny is a smoke test")


def test_a_quick_calibration_prints_its_caveats(tmp_path, monkeypatch, capsys):
    kernels, links = _reports()

    def measure(args, base, name, command):  # stands in for the measurement (minutes)
        return {"profile": base, "kernels": None, "kernels_report": kernels, "links": None, "links_report": links,
                "alone": None, "host_report": None}

    monkeypatch.setattr(calibrate, "measure_profile", measure)
    assert calibrate.main(["--quick", "--name", "q", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note: --quick is a smoke test" in out and "dispatch (1 fitted, 1 held out)" in out
    assert out.index("note: --quick") < out.index("median |err| %")  # read before the errors
    assert calibrate.main(["--quick", "--name", "q", "--out", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["caveats"] == calibrate.caveats("quick", kernels, links)
