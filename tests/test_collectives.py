"""Collective curves: the format's lookup rules, the fit and its held-out report, the shipped
refits, and a tiny real calibration over gloo that reproduces its own measurements."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from calibration.collectives import GRIDS, KINDS, Grid, cases, run_local, size_grid
from calibration.fit_links import apply_links, fit_links, load_vidur_network, split_holdout
from estimator.base.errors import ConfigError
from estimator.profile.collectives import TimeCurve, bus_factor, fit_time_curve
from estimator.profile.profiles import PROFILE_DIR, load_profile, profile_from_dict
from tests.synthetic import linear_profile_dict

CURVE = ((1e3, 10e-6), (1e5, 40e-6), (1e7, 1e-3))


def test_time_curve_is_exact_at_points_log_log_between_and_extends_at_the_end():
    c = TimeCurve(CURVE)
    assert [c(s) for s, _ in CURVE] == pytest.approx([t for _, t in CURVE])
    assert c(1e4) == pytest.approx(math.sqrt(10e-6 * 40e-6))  # halfway in log size → geometric mean time
    assert c(1.0) == pytest.approx(10e-6)  # latency-bound below the smallest size
    tail_Bps = (1e7 - 1e5) / (1e-3 - 40e-6)
    assert c(3e7) == pytest.approx(1e-3 + 2e7 / tail_Bps)
    xs = np.array([1.0, 1e4, 5e6, 3e7])
    assert np.allclose(c.many(xs), [c(x) for x in xs])
    assert TimeCurve(((1e6, 1e-3),))(2e6) == pytest.approx(2e-3)  # one point: its own bandwidth


@pytest.mark.parametrize("points,match", [
    (((1e3, 2e-5), (1e4, 1e-5)), "must not decrease with size"),
    (((1e4, 1e-5), (1e3, 2e-5)), "strictly ascending"),
    (((1e3, 0.0),), "positive seconds"),
])
def test_time_curve_rejects_what_cannot_be_a_measurement(points, match):
    with pytest.raises(ConfigError, match=match):
        TimeCurve(points)


def _v2(edit=None) -> dict:
    data = linear_profile_dict(alpha=1e-5)
    data["format"] = "rlhf-plan/profile-v2"
    data["links"]["intra"]["all_reduce"] = {"curves": {"2": [list(p) for p in CURVE],
                                                       "8": [[s, 2 * t] for s, t in CURVE]},
                                            "command": "calibration.collectives"}
    if edit:
        edit(data)
    return data


def test_unmeasured_group_sizes_come_from_the_nearest_scaled_by_bus_factors():
    p = profile_from_dict(_v2())
    c8 = TimeCurve(tuple((s, 2 * t) for s, t in CURVE))
    assert p.collective_s("all_reduce", 1e5, 8) == pytest.approx(c8(1e5))
    assert p.collective_s("all_reduce", 1e5, 2) == pytest.approx(40e-6)
    # 4 is as near to 2 as to 8 in log ranks: the larger serves, at the size with equal busy-link bytes
    scale = bus_factor("all_reduce", 4) / bus_factor("all_reduce", 8)
    assert p.collective_s("all_reduce", 1e6, 4) == pytest.approx(c8(1e6 * scale))
    assert p.collective_s("all_reduce", 1e6, 16) > p.collective_s("all_reduce", 1e6, 8)
    assert p.link("intra", "all_reduce").busbw_Bps == pytest.approx(bus_factor("all_reduce", 8) * 1e7 / 2e-3)


def test_multi_node_curve_replaces_the_composition_only_for_its_shape():
    def add(d):
        d["links"]["inter"]["all_reduce"]["curves"] = {"2x8": [[1e3, 50e-6], [1e7, 2e-3]]}
    p = profile_from_dict(_v2(add))
    assert p.group_collective_s("all_reduce", 1e7, 8, 2) == pytest.approx(2e-3)
    composed = p.collective_s("all_reduce", 1e7, 4) + p.collective_s("all_reduce", 1e7 / 4, 2, "inter")
    assert p.group_collective_s("all_reduce", 1e7, 4, 2) == pytest.approx(composed)


def test_v1_files_load_unchanged_and_curves_need_v2():
    v1 = linear_profile_dict(alpha=1e-5)
    assert profile_from_dict(v1).collective_s("all_reduce", 8e9, 8) == pytest.approx(1e-5 + 14.0)
    data = _v2()
    data["format"] = "rlhf-plan/profile-v1"
    with pytest.raises(ConfigError, match=r"links\.intra\.all_reduce: curves need format rlhf-plan/profile-v2"):
        profile_from_dict(data)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["links"]["intra"]["all_reduce"]["curves"].update({"2x8": [[1, 1e-5]]}), r"belongs under links\.inter"),
    (lambda d: d["links"]["intra"]["p2p"].update(curves={"4": [[1, 1e-5]]}), r"between 2 ranks, not 4"),
    (lambda d: d["links"]["intra"]["all_reduce"]["curves"].update({"two": [[1, 1e-5]]}), r"curve key 'two'"),
    (lambda d: d["links"]["intra"]["all_reduce"]["curves"].update({"1": [[1, 1e-5]]}), r"at least 2 ranks"),
    (lambda d: d["links"]["inter"]["all_gather"].pop("busbw_bytes_per_s"), r"go together; only alpha_s"),
    (lambda d: d["links"]["inter"].update(all_gather={"curves": {"2x8": [[1, 1e-5]]}, "cite": "x"}),
     r"multi-node .* curves alone cannot"),
    (lambda d: d["links"]["intra"]["all_reduce"].pop("command"), r"needs a 'cite'"),
    (lambda d: d["links"]["intra"]["all_reduce"].update(extra=1), r"unknown key\(s\) \['extra'\]"),
    (lambda d: d["links"]["intra"]["all_reduce"]["curves"].update({"4": [[1e3, 2e-5], [1e4, 1e-5]]}),
     r"curves\['4'\]: times .* must not decrease"),
])
def test_invalid_link_entries_name_the_rule(edit, match):
    with pytest.raises(ConfigError, match=match):
        profile_from_dict(_v2(edit))


def test_fit_time_curve_is_monotone_and_exact_on_clean_data():
    rng = np.random.default_rng(0)
    sizes = np.repeat(np.geomspace(8, 1e8, 60), 3)
    clean = 20e-6 + sizes / 5e9
    noisy = clean * rng.lognormal(0, 0.3, sizes.size)
    pts = fit_time_curve(sizes, noisy, max_points=20)
    assert len(pts) <= 20 and pts[0][0] == 8 and pts[-1][0] == 1e8
    assert all(b[1] >= a[1] for a, b in zip(pts, pts[1:]))
    exact = fit_time_curve(sizes, clean, max_points=100)
    assert [t for _, t in exact] == pytest.approx(list(20e-6 + np.geomspace(8, 1e8, 60) / 5e9), rel=1e-3)


def _synthetic_raw(kind: str = "all_reduce", group: str = "2") -> pd.DataFrame:
    sizes = np.array(size_grid(1 << 24), dtype=float)
    return pd.DataFrame({"kind": kind, "link_class": "intra", "group": group, "group_size": int(group),
                         "size_bytes": sizes, "median_s": 100e-6 + sizes / 1e9})


def test_holdout_keeps_the_ends_and_the_report_measures_only_held_out_sizes():
    raw = _synthetic_raw()
    held = split_holdout(raw, 0.5)
    assert not held.iloc[0] and not held.iloc[-1] and held.sum() == (len(raw) - 2) // 2
    links, report = fit_links(raw, 0.5, command="test")
    pts = links["intra"]["all_reduce"]["curves"]["2"]
    assert {s for s, _ in pts}.isdisjoint(set(raw.size_bytes[held]))
    row = report.iloc[0]
    assert row.n_holdout == held.sum() and row.n_fit == len(raw) - held.sum()
    assert row.median_ape_pct < 2.0  # α + S/B is smooth in log-log between fit sizes
    fixed = fit_links(raw, [int(raw.size_bytes.iloc[5])], command="test")[1]
    assert fixed.n_holdout.iloc[0] == 1


def test_fitted_links_apply_to_a_profile_and_round_trip(tmp_path):
    raw = pd.concat([_synthetic_raw(), _synthetic_raw("p2p")])
    links, _ = fit_links(raw, 0.0, command="python -m estimator.calibrate --device cpu", max_points=100)
    doc = apply_links(linear_profile_dict(), links, raw_csv="cpu.links.csv")
    prof = profile_from_dict(doc)
    path = prof.save(tmp_path / "p.json")
    again = load_profile(str(path))
    assert again.raw == json.loads(json.dumps(doc))
    for s, t in zip(raw.size_bytes[:24], raw.median_s[:24]):
        assert again.collective_s("all_reduce", s, 2) == pytest.approx(t, rel=1e-3)
        assert again.p2p_s(s, "intra") == pytest.approx(t, rel=1e-3)
    assert "cpu.links.csv" == doc["links"]["intra"]["p2p"]["raw"]


def test_vidur_sizes_are_bytes_and_times_seconds(tmp_path):
    src = pd.read_csv(PROFILE_DIR / "h100-sxm.links.csv")
    assert set(src.group[src.kind == "all_reduce"].astype(str)) == {"2", "4", "8"}
    last = src[(src.kind == "all_reduce") & (src.group.astype(str) == "8")].sort_values("size_bytes").iloc[-1]
    # the data README: at 8 workers on h100_dgx the largest size, 67108864, takes 0.322 ms
    assert last.size_bytes == 67108864 and last.median_s == pytest.approx(0.322e-3)
    raw = pd.DataFrame({"time_stats.all_reduce.median": [0.5, 1.0], "num_workers": [16, 8], "size": [2048, 4096],
                        "devices_per_node": [8, 8]})
    raw.to_csv(tmp_path / "all_reduce.csv")
    rows = load_vidur_network(tmp_path)
    assert rows.link_class.tolist() == ["inter", "intra"] and rows.group.tolist() == ["2x8", "8"]
    assert rows.median_s.tolist() == pytest.approx([0.5e-3, 1e-3])


@pytest.mark.parametrize("name", ["h100-sxm", "a100-80g"])
def test_shipped_refits_are_the_fit_of_their_raw_csv_and_meet_the_goal(name):
    prof = load_profile(name)
    raw = pd.read_csv(PROFILE_DIR / f"{name}.links.csv")
    links, report = fit_links(raw, 0.25, cite="x")
    for kind in ("all_reduce", "p2p"):
        assert prof.raw["links"]["intra"][kind]["curves"] == links["intra"][kind]["curves"]
    shipped = pd.read_csv(PROFILE_DIR / f"{name}.links.report.csv")
    assert np.allclose(shipped.median_ape_pct, report.median_ape_pct)
    assert (report.median_ape_pct <= 10.0).all()


def test_grids_and_case_count():
    assert size_grid(64) == [4, 8, 12, 16, 24, 32, 48, 64]
    assert GRIDS["quick"].sizes[-1] == 64 << 20 and GRIDS["full"].sizes[-1] == 256 << 20
    assert cases(GRIDS["tiny"], 2) == len(KINDS) * len(GRIDS["tiny"].sizes)
    assert cases(GRIDS["tiny"], 4) == (2 * len(KINDS) - 1) * len(GRIDS["tiny"].sizes)  # p2p only in pairs
    with pytest.raises(ConfigError, match=r"unknown kind\(s\) \['all_to_all'\]"):
        Grid((4,), kinds=("all_to_all",))
    with pytest.raises(ConfigError, match=r"world size of at least 2, got 1"):
        run_local(GRIDS["tiny"], 1)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this host can run NCCL collectives")
def test_nccl_needs_a_gpu_per_process():
    with pytest.raises(ConfigError, match=r"one GPU per process: world size 2"):
        run_local(GRIDS["tiny"], 2, device="cuda")


class _Bar:
    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n


def test_tiny_calibration_over_gloo_reproduces_its_own_measurements(tmp_path):
    grid = Grid(tuple(size_grid(4096, 64)), warmup=1, repeats=3, min_repeat_s=1e-4, max_calls=2)
    bar = _Bar()
    raw = run_local(grid, world_size=2, progress=bar)
    assert bar.n == cases(grid, 2) == len(raw)
    assert set(raw.kind) == set(KINDS) and set(raw.backend) == {"gloo"}
    assert (raw.p10_s <= raw.median_s).all() and (raw.median_s <= raw.p90_s).all()
    assert (raw.median_s > 1e-7).all() and (raw.median_s < 1.0).all()
    links, _ = fit_links(raw, 0.0, command="pytest tiny grid")
    doc = apply_links(copy.deepcopy(load_profile("cpu").raw), links)
    prof = load_profile(str(profile_from_dict(doc).save(tmp_path / "cpu-tiny.json")))
    for kind, part in raw.groupby("kind"):
        part = part.sort_values("size_bytes")
        got = np.array([prof.collective_s(kind, s, 2) if kind != "p2p" else prof.p2p_s(s, "intra")
                        for s in part.size_bytes])
        want = part.groupby("size_bytes").median_s.median().reindex(part.size_bytes).to_numpy()
        assert (np.diff(got) >= -1e-12 * got[1:]).all()  # monotone up to exp∘log rounding
        assert want.min() * 0.999 <= got.min() and got.max() <= want.max() * 1.001
        # the isotonic least-squares fit is at least as close as the best constant (in log time)
        resid = np.sum(np.log(got / want) ** 2)
        assert resid <= np.sum((np.log(want) - np.log(want).mean()) ** 2) * 1.0001 + 1e-6


def test_multi_node_fit_keeps_the_pair_that_serves_other_shapes():
    raw = _synthetic_raw(group="8").assign(link_class="inter", group="2x8", group_size=16)
    links, _ = fit_links(raw, 0.0, cite="vidur a100_dgx, 2 nodes", max_points=100)
    doc = apply_links(linear_profile_dict(alpha=1e-5), links)
    entry = doc["links"]["inter"]["all_reduce"]
    assert entry["alpha_s"] == 1e-5 and "alpha_s/busbw_bytes_per_s kept: synthetic" in entry["cite"]
    prof = profile_from_dict(doc)
    s, t = raw.size_bytes.iloc[20], raw.median_s.iloc[20]
    assert prof.group_collective_s("all_reduce", s, 8, 2) == pytest.approx(t, rel=1e-3)
    assert prof.collective_s("all_reduce", s, 2, "inter") == pytest.approx(1e-5 + s / 1e9)


VIDUR_H100 = PROFILE_DIR.parent / "vidur" / "network" / "h100_dgx"


def test_fit_links_cli_creates_a_missing_out_directory(tmp_path, capsys):
    from calibration.fit_links import main

    out = tmp_path / "new" / "profiles"
    assert main(["--vidur", str(VIDUR_H100), "--profile", "h100-sxm", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["h100-sxm.json", "h100-sxm.links.csv",
                                                     "h100-sxm.links.report.csv"]
    assert load_profile(out / "h100-sxm.json").raw["links"]["intra"]["all_reduce"]["curves"]
    assert "all_reduce" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--holdout", "nan"], "--holdout=nan must be a fraction in [0, 1)"),
    (["--holdout", "1"], "--holdout=1.0 must be a fraction in [0, 1)"),
    (["--classes", "intra,nvlink"], "--classes='intra,nvlink': unknown link class(es) ['nvlink']"),
    (["--vidur", "no/such/dir"], "--vidur='no/such/dir' is not a directory"),
    (["--profile", "h100"], "--profile: unknown hardware profile 'h100'"),
    (["--out", ""], "--out: the path is empty"),
])
def test_fit_links_cli_names_a_bad_flag_before_any_work(flags, message, tmp_path, capsys):
    from calibration.fit_links import main
    from estimator.base.errors import cli_guard

    argv = ["--vidur", str(VIDUR_H100), "--profile", "h100-sxm", "--out", str(tmp_path / "out")] + flags
    assert cli_guard(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_fit_links_cli_says_when_the_tables_lack_a_class(tmp_path, capsys):
    from calibration.fit_links import main
    from estimator.base.errors import cli_guard

    raw = pd.DataFrame({"time_stats.all_reduce.median": [0.5, 1.0], "num_workers": [2, 8], "size": [2048, 4096],
                        "devices_per_node": [8, 8]})
    raw.to_csv(tmp_path / "all_reduce.csv", index=False)
    argv = ["--vidur", str(tmp_path), "--profile", "h100-sxm", "--classes", "inter", "--out", str(tmp_path / "o")]
    assert cli_guard(main, argv) == 2
    err = capsys.readouterr().err
    assert "--classes='inter': the tables under --vidur" in err and err.strip().endswith("they have intra"), err
    assert not (tmp_path / "o").exists()
