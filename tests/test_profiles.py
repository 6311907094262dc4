"""Hardware profiles: shipped files load, every number is sourced, lookups match their points."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from estimator.base.errors import ConfigError
from estimator.profile.profiles import (
    COLLECTIVES,
    PROFILE_DIR,
    Curve,
    bus_factor,
    known_profiles,
    load_profile,
    profile_from_dict,
)
from tests.synthetic import linear_profile, linear_profile_dict

SHIPPED = ("a100-80g", "h100-sxm", "h800", "h200", "cpu")


def test_shipped_profiles_load_and_cite_every_number():
    assert set(SHIPPED) <= set(known_profiles())
    for name in SHIPPED:
        p = load_profile(name)
        assert p.name == name and p.source == ("measured" if name == "cpu" else "datasheet")
        prov = p.provenance()
        # peak, efficiency, launch, capacity, bandwidth, mem efficiency + 2 × 5 collectives (+ compose, executor)
        assert len(prov) >= 6 + 2 * len(COLLECTIVES), prov.keys()
        assert all(len(v) > 10 for v in prov.values())


def test_the_shipped_cpu_profile_is_measured_by_the_calibration_command():
    p = load_profile("cpu")
    command = "python -m estimator.calibrate --device cpu --world-size 2 --name cpu"
    measured = [k for k, v in p.provenance().items() if v.startswith(command)]
    assert {"compute.peak", "compute.launch", "memory.bandwidth", "executor"} <= set(measured)
    assert p.raw["compute"]["compose"]["command"].startswith(command)
    assert all(k in measured for k in p.provenance() if k.startswith("links.intra"))
    assert p.compose == "serial" and p.dtype == "float32"
    # what autograd records and what a backward pass runs cost more host time than no-grad ops
    assert p.dispatch_s("nograd") < p.dispatch_s("grad") and p.dispatch_s("nograd") < p.dispatch_s("backward")
    for f in ("cpu.kernels.csv", "cpu.kernels.report.csv", "cpu.links.csv", "cpu.links.report.csv"):
        assert (PROFILE_DIR / f).stat().st_size > 100


def test_datasheet_figures():
    h100 = load_profile("h100-sxm")
    assert h100.peak_flops == pytest.approx(989.4e12)
    assert h100.mem_bandwidth_Bps == pytest.approx(3.35e12)
    assert load_profile("a100-80g").peak_flops == pytest.approx(312e12)
    assert load_profile("h200").mem_bandwidth_Bps == pytest.approx(4.8e12)
    assert load_profile("h200").capacity_bytes > h100.capacity_bytes
    assert load_profile("h800").link("intra", "p2p").busbw_Bps < h100.link("intra", "p2p").busbw_Bps


@pytest.mark.parametrize("n,achieved", [(1024, 177e12), (2048, 677e12), (4096, 789e12), (8192, 798e12)])
def test_h100_compute_curve_reproduces_measured_matmuls(n, achieved):
    p = load_profile("h100-sxm")
    flops = 2.0 * n**3
    assert flops / p.compute_s(flops) == pytest.approx(achieved, rel=1e-3)


def test_cpu_profile_is_an_honest_placeholder():
    p = load_profile("cpu")
    text = json.dumps(p.raw).lower()
    assert "placeholder" in text and "python -m estimator.calibrate" in text


def test_load_by_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(linear_profile_dict()))
    assert load_profile(str(path)).name == "linear"
    assert load_profile(PROFILE_DIR / "h100-sxm.json").name == "h100-sxm"


def test_unknown_name_lists_known_profiles():
    with pytest.raises(ConfigError, match="unknown hardware profile 'b200'.*h100-sxm"):
        load_profile("b200")
    with pytest.raises(ConfigError, match=r"unknown hardware profile 'h100_sxm' \(did you mean 'h100-sxm'\?\)"):
        load_profile("h100_sxm")


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["compute"]["peak"].pop("cite"), r"compute: peak needs a 'cite'"),
    (lambda d: d["compute"]["peak"].update(flops_per_s=-1), r"flops_per_s=-1 must be a positive number"),
    (lambda d: d["links"]["intra"].pop("p2p"), r"links: intra: missing key\(s\) \[.p2p.\]"),
    (lambda d: d.update(source="guessed"), r"source='guessed' must be one of"),
    (lambda d: d.update(extra=1), r"unknown key\(s\) \['extra'\]"),
    (lambda d: d["memory"]["efficiency"].update(points=[[1e6, 1.5]]), r"efficiencies \[1.5\] must lie in"),
    (lambda d: d["memory"]["efficiency"].update(points=[[1e7, 0.5], [1e6, 0.6]]), r"strictly ascending"),
    # a fixed cost in seconds is a latency: 2^70 s is a unit error, not a slow host
    (lambda d: d.setdefault("executor", {"command": "x"}).update(call_overhead_s=2.0 ** 70, micro_batch_overhead_s=0),
     r"call_overhead_s"),
    (lambda d: d["compute"]["launch"].update(grad_overhead_s=2.0 ** 70), r"grad_overhead_s"),
    # the raw rows behind a collective curve are named by a file beside the profile
    (lambda d: d["links"]["intra"]["p2p"].update(raw=[[1]]), r"links.*p2p\.raw=\[\[1\]\]: must name the file"),
    (lambda d: d["links"]["intra"]["p2p"].update(raw="x" * 300), r"p2p\.raw=.*must name the file"),
])
def test_invalid_profiles_name_the_rule(edit, match):
    data = copy.deepcopy(linear_profile_dict())
    edit(data)
    with pytest.raises(ConfigError, match=match):
        profile_from_dict(data)


@pytest.mark.parametrize("value", ["1", True, None])
def test_a_collective_curve_point_must_be_a_number(value):
    data = json.loads((PROFILE_DIR / "h100-sxm.json").read_text())
    curve = data["links"]["intra"]["all_reduce"]["curves"]["2"]
    curve[0][0] = value  # float() would take "1" and True as 1.0
    with pytest.raises(ConfigError, match=r"links\.intra\.all_reduce\.curves\['2'\]: \[.*\] must be numbers"):
        profile_from_dict(data)


def test_measured_profile_may_carry_commands():
    data = linear_profile_dict()
    data["source"] = "measured"
    data["compute"]["peak"] = {"flops_per_s": 1e12, "command": "python -m estimator.calibrate --only gemm"}
    assert profile_from_dict(data).peak_flops == 1e12


def test_curve_interpolates_in_log_size_and_is_flat_outside():
    c = Curve(((1e6, 0.2), (1e8, 0.6)))
    assert c(1e3) == 0.2 and c(1e9) == 0.6
    assert c(1e7) == pytest.approx(0.4)  # halfway in log size
    xs = np.array([1e3, 1e7, 1e9])
    assert np.allclose(c.many(xs), [c(x) for x in xs])
    step = Curve(((1.0, 0.1), (1e9, 0.6), (16e9, 0.9)), "step")
    assert step(5e8) == 0.1 and step(2e9) == 0.6 and step(1e12) == 0.9
    assert np.allclose(step.many(np.array([5e8, 2e9, 1e12])), [0.1, 0.6, 0.9])


def test_roofline_and_collective_formulas_on_a_linear_profile():
    p = linear_profile(peak=1e12, bw=1e11, link_bw=1e9, alpha=1e-5)
    assert p.op_s(2e12, 1e9) == pytest.approx(2.0)  # compute-bound
    assert p.op_s(1e9, 1e11) == pytest.approx(1.0)  # memory-bound
    assert p.collective_s("all_reduce", 8e9, 8) == pytest.approx(1e-5 + 2 * 7 / 8 * 8.0)
    assert p.collective_s("all_gather", 8e9, 8) == pytest.approx(1e-5 + 7 / 8 * 8.0)
    assert p.collective_s("all_reduce", 8e9, 1) == 0.0
    assert p.p2p_s(1e9, "inter") == pytest.approx(1.0 + 1e-5)
    # hierarchical: NVLink phase over 4 ranks, then a quarter of the data over 2 nodes
    assert p.group_collective_s("all_reduce", 8e9, 4, 2) == pytest.approx(
        p.collective_s("all_reduce", 8e9, 4) + p.collective_s("all_reduce", 2e9, 2, "inter"))
    assert bus_factor("p2p", 8) == 1.0 and bus_factor("reduce_scatter", 4) == 0.75


def test_launch_overhead_is_an_issue_floor():
    p = linear_profile(launch=5e-6)
    assert p.op_s(1.0, 1.0, launches=3) == pytest.approx(15e-6)
    assert p.op_s(1e12, 0.0) == pytest.approx(1.0)  # large ops hide the launch


def test_save_round_trips(tmp_path):
    p = load_profile("a100-80g")
    out = p.save(tmp_path / "copy.json")
    assert load_profile(str(out)).raw == p.raw
