"""Host sharing: the profile's ``host`` section, blended call costs, busy weights, their fixed
point in the evaluator and the simulator, and the calibration's fit of the factors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest

from calibration.fit_compute import OpTable, fit_compute, params_from_sections
from calibration.fit_host import fit_host, scaled
from estimator.base.errors import ConfigError
from estimator.profile.profiles import load_profile, profile_from_dict
from estimator.sim.evaluator import Evaluator
from estimator.sim.hostshare import blend, busy_weights
from estimator.sim.simulate import simulate
from estimator.spec.experiment import load_experiment
from estimator.spec.plan import Plan
from tests.conftest import EXAMPLES, ROOT
from tests.synthetic import call_cost, lay
from tests.test_fit_compute import TRUE, synthetic_raw

ALONE = {"flops": 0.5, "bytes": 0.8, "dispatch": 0.25, "executor": 0.4, "command": "synthetic"}


def _cpu_without_host() -> dict:
    """The shipped CPU profile less what this module tests: host sharing and the extra cost of
    a collective or a pipeline message between computations."""
    doc = copy.deepcopy(json.loads((ROOT / "calibration" / "profiles" / "cpu.json").read_text()))
    doc.pop("host", None)
    doc["executor"].pop("collective_overhead_s", None)
    doc["executor"].pop("p2p_overhead_s", None)
    return doc


def _cpu_with_host(alone: dict = ALONE, devices: int = 2) -> dict:
    doc = _cpu_without_host()
    doc["host"] = {"devices": devices, "alone": dict(alone), "command": "synthetic"}
    return doc


def _plain():
    return profile_from_dict(_cpu_without_host())


def test_host_section_parses_and_alone_scales_each_term():
    p = profile_from_dict(_cpu_with_host())
    a = p.alone()
    assert p.host.devices == 2 and a.host is None
    assert a.peak_flops == pytest.approx(p.peak_flops / 0.5)
    assert a.mem_bandwidth_Bps == pytest.approx(p.mem_bandwidth_Bps / 0.8)
    assert a.launch_overhead_s == pytest.approx(p.launch_overhead_s * 0.25)
    assert a.grad_overhead_s == pytest.approx(p.grad_overhead_s * 0.25)
    assert a.call_overhead_s == pytest.approx(p.call_overhead_s * 0.4)
    # weights: one busy device is alone, every device busy is the profile as measured
    assert p.host.weight(1) == 0.0 and p.host.weight(2) == 1.0 and p.host.weight(1.25) == 0.25
    # a profile without the section is its own alone profile
    plain = _plain()
    assert plain.host is None and plain.alone() is plain


@pytest.mark.parametrize("mutate,needle", [
    (lambda h: h["alone"].update(flops=1.5), "host.alone.flops=1.5 must be at most 1"),
    (lambda h: h["alone"].update(bytes=0), "bytes"),
    (lambda h: h.update(devices=0), "host.devices=0"),
    (lambda h: h.update(devices=True), "host.devices=True"),
    (lambda h: h["alone"].pop("dispatch"), "missing key(s) ['dispatch']"),
    (lambda h: h.update(cores=2), "unknown key(s) ['cores']"),
])
def test_bad_host_sections_name_the_key(mutate, needle):
    doc = _cpu_with_host()
    mutate(doc["host"])
    with pytest.raises(ConfigError, match="host") as err:
        profile_from_dict(doc)
    assert needle in str(err.value)


def test_blend_interpolates_every_stage_time_and_keeps_sends():
    layout = lay(0, 2, pp=2, mb=4)
    alone = call_cost("t", "train", layout, 1.0, 2.0, send=0.5, optimizer=0.2, dp_allreduce=0.1)
    shared = call_cost("t", "train", layout, 3.0, 6.0, send=0.5, optimizer=0.6, dp_allreduce=0.1)
    assert blend(alone, shared, 1.0) is shared
    half = blend(alone, shared, 0.5)
    for st, ref in zip(half.stages, shared.stages):
        assert st.fwd.compute_s == pytest.approx(2.0) and st.bwd.compute_s == pytest.approx(4.0)
        assert st.optimizer_s == pytest.approx(0.4) and st.dp_allreduce_s == 0.1
        assert st.send_s == ref.send_s and st.send_ports == ref.send_ports
    assert half.stages[0].send_s == 0.5
    zero = blend(alone, shared, 0.0)
    assert [s.fwd.compute_s for s in zero.stages] == [1.0, 1.0]


def test_busy_weights_count_the_other_devices_time_inside_each_window():
    # three calls on a host of two devices: A on device 0 over [0, 4], B on device 1 over
    # [2, 4] (half of A's window), C on both devices over [4, 6]
    spans = [(0, 1), (1, 2), (0, 2)]
    windows = [[(0.0, 4.0), (2.0, 4.0), (4.0, 6.0)]]
    w = busy_weights(spans, windows, 2, 2, lambda k: min(max(k - 1.0, 0.0), 1.0), [0])
    assert w == pytest.approx([0.5, 1.0, 1.0])
    # on hosts of one device each nobody shares: every call is alone
    assert busy_weights(spans[:2], [windows[0][:2]], 1, 2, lambda k: min(max(k - 1.0, 0.0), 1.0), [0]) == [0, 0]


PPO = EXAMPLES / "ppo-tiny-2xcpu.yaml"
ONE_DEVICE = {c: {"mesh": "1", "dp": 1, "tp": 1, "pp": 1, "micro_batches": 1}
              for c in ("actor_gen", "ref_inf", "reward_inf", "critic_inf", "actor_train", "critic_train")}
BOTH = {c: {"mesh": "0-1", "dp": 2, "tp": 1, "pp": 1, "micro_batches": 1} for c in ONE_DEVICE}


def _plan(calls: dict) -> Plan:
    return Plan.from_data({"format": "rlhf-plan/plan-v1", "calls": calls})


def test_a_plan_on_one_device_of_two_runs_alone_and_one_on_both_as_measured():
    exp = load_experiment(PPO)
    shared, host = _plain(), profile_from_dict(_cpu_with_host())
    alone = host.alone()
    one, both = _plan(ONE_DEVICE), _plan(BOTH)
    ev = Evaluator(exp, host)
    assert set(ev.call_weights(one).values()) == {0.0}
    assert set(ev.call_weights(both).values()) == {1.0}
    # the single-device plan costs what it costs on the alone profile, the other as measured
    assert ev.evaluate(one).iteration_s == pytest.approx(Evaluator(exp, alone).evaluate(one).iteration_s)
    assert ev.evaluate(both).iteration_s == pytest.approx(Evaluator(exp, shared).evaluate(both).iteration_s)
    assert ev.evaluate(one).iteration_s < 0.8 * Evaluator(exp, shared).evaluate(one).iteration_s
    # the simulator charges the evaluator's weights: the two agree as they do without sharing
    for plan in (one, both):
        sim = simulate(exp, plan, host).iteration_s
        assert sim == pytest.approx(ev.evaluate(plan).iteration_s, rel=0.03)
    assert ev.evaluate_many([one, both]).iteration_s == pytest.approx(
        [ev.evaluate(one).iteration_s, ev.evaluate(both).iteration_s])


def test_fit_host_recovers_known_factors_on_held_out_rows():
    shared = synthetic_raw(TRUE)
    sections, _ = fit_compute(shared)
    p = params_from_sections(sections)
    alone = shared.copy()
    kern = ~alone["family"].isin(["compose", "executor"])
    true_alone = scaled(p, 0.6, 0.9, 0.3)
    alone.loc[kern, "median_s"] = OpTable(alone[kern]).predict(true_alone)
    section, report = fit_host(shared, alone, sections, devices=2)
    got = section["alone"]
    assert got["flops"] == pytest.approx(0.6, rel=0.02)
    assert got["bytes"] == pytest.approx(0.9, rel=0.02)
    assert got["dispatch"] == pytest.approx(0.3, rel=0.02)
    held = report[report["split"] == "held-out"]
    assert (held["median_pct"] < 1.0).all() and (held["median_pct_unscaled"] > 5.0).any()
    doc = _cpu_with_host({**section["alone"]})
    assert profile_from_dict(doc).host.alone["flops"] == got["flops"]
    with pytest.raises(ConfigError, match="devices=1"):
        fit_host(shared, alone, sections, devices=1)
    assert np.isfinite(report["max_pct"]).all()


def test_collectives_between_computations_cost_their_measured_extra():
    from calibration.collectives import IN_SITU, in_situ_overhead_s
    from estimator.cost.pieces import tp_allreduce_s

    doc = _cpu_with_host()
    doc["executor"]["collective_overhead_s"] = 2e-4
    p, plain = profile_from_dict(doc), _plain()
    assert p.in_call_s("all_reduce", 4096, 2) == pytest.approx(plain.collective_s("all_reduce", 4096, 2) + 2e-4)
    assert p.in_call_s("all_reduce", 4096, 1) == 0.0  # a group of one issues nothing
    assert tp_allreduce_s(p, 2, 8, 128) == pytest.approx(tp_allreduce_s(plain, 2, 8, 128) + 2e-4)
    doc["executor"]["collective_overhead_s"] = -1.0
    with pytest.raises(ConfigError, match="collective_overhead_s"):
        profile_from_dict(doc)
    rows = pd.DataFrame({"kind": [IN_SITU, IN_SITU, IN_SITU, "all_reduce"], "median_s": [1e-4, 3e-4, -5e-5, 9.0]})
    assert in_situ_overhead_s(rows) == pytest.approx(1e-4)
    assert in_situ_overhead_s(rows.assign(median_s=-1e-4)) == 0.0  # never below zero
    assert in_situ_overhead_s(rows[rows["kind"] == "all_reduce"]) is None


def test_the_shipped_cpu_profile_says_how_its_host_is_shared():
    cpu = load_profile("cpu")
    assert cpu.host is not None and cpu.host.devices == 2
    assert all(0 < f <= 1 for f in cpu.host.alone.values())
    assert cpu.collective_overhead_s >= 0 and "estimator.calibrate" in cpu.raw["host"]["command"]


def test_pipeline_messages_between_computations_cost_their_measured_extra():
    """Every stage-to-stage message of a pipelined call — training and inference activations,
    decoding's per-step sends and the token fed back — costs the profile's in-situ extra."""
    from calibration.collectives import IN_SITU_P2P, in_situ_overhead_s
    from estimator.cost.lowering import Costs
    from estimator.spec.cluster import DeviceMesh
    from estimator.spec.plan import Layout

    doc = _cpu_with_host()
    doc["executor"]["p2p_overhead_s"] = 3e-4
    p, plain = profile_from_dict(doc), _plain()
    assert p.stage_send_s(4096, "intra") == pytest.approx(plain.p2p_s(4096, "intra") + 3e-4)
    assert p.stage_send_s(0, "intra") == 0.0
    exp = load_experiment(str(ROOT / "examples/ppo-tiny-2xcpu.yaml"))
    pp = Layout(DeviceMesh(0, 2), 1, 1, 2, micro_batches=2)
    with_, without = Costs(exp, p).call("actor_gen", pp), Costs(exp, plain).call("actor_gen", pp)
    assert with_.stages[0].send_s == pytest.approx(without.stages[0].send_s + 3e-4)
    assert with_.feedback_s == pytest.approx(without.feedback_s + 3e-4)
    assert Costs(exp, p).call("actor_train", pp).stages[0].send_s == pytest.approx(
        Costs(exp, plain).call("actor_train", pp).stages[0].send_s + 3e-4)
    doc["executor"]["p2p_overhead_s"] = -1.0
    with pytest.raises(ConfigError, match="p2p_overhead_s"):
        profile_from_dict(doc)
    rows = pd.DataFrame({"kind": [IN_SITU_P2P, "in_situ", IN_SITU_P2P], "median_s": [2e-4, 9.0, 4e-4]})
    assert in_situ_overhead_s(rows, IN_SITU_P2P) == pytest.approx(3e-4)
