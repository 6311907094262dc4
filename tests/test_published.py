"""analysis.vtrain and analysis.published: vTrain's table parsed, each row mapped to an SFT experiment, predicted."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis.published import main, predict_row
from analysis.vtrain import (
    COLUMNS,
    PARAMS_COLUMN,
    load_table,
    padded_vocab,
    parse_table,
    row_experiment,
    vtrain_profile,
)
from estimator.base.errors import ConfigError
from estimator.profile.profiles import PROFILE_DIR, load_profile, profile_from_dict
from tests.conftest import ROOT

HEADER = ",".join(COLUMNS)
ROWS = ["2,16,8,1024,16,24,1024,1,1,2,372.160408",
        "8,32,4,1024,16,24,1024,2,2,2,219.732754",
        "4,16,4,2048,16,24,1024,1,2,2,410.490577"]
SHIPPED = ROOT / "analysis" / "data" / "vtrain" / "ground_truth_single.csv"


def _table(rows: list[str], bom: bool = True, params: list[str] | None = None) -> str:
    header = HEADER if params is None else f"{PARAMS_COLUMN},{HEADER}"
    lines = rows if params is None else [f"{p},{r}" for p, r in zip(params, rows)]
    return ("\ufeff" if bom else "") + "\n".join([header, *lines]) + "\n"


@pytest.mark.parametrize("bom", [True, False])
def test_parser_reads_vtrain_format_with_or_without_bom(bom):
    rows = parse_table(_table(ROWS, bom=bom))
    assert [r.row for r in rows] == [1, 2, 3]
    r = rows[1]
    assert (r.gpus, r.global_batch, r.micro_batch, r.hidden, r.heads, r.layers, r.seq_len) == (8, 32, 4, 1024, 16,
                                                                                                 24, 1024)
    assert (r.tp, r.dp, r.pp) == (2, 2, 2)
    assert r.measured_s == pytest.approx(0.219732754)
    assert r.params_billion is None


def test_parser_accepts_the_leading_parameters_column():
    rows = parse_table(_table(ROWS, params=["0.35", "0.35", "1.3"]))
    assert [r.params_billion for r in rows] == [0.35, 0.35, 1.3]
    assert rows[2].hidden == 2048


def test_shipped_table_parses_whole():
    rows = load_table(SHIPPED)
    assert len(rows) == 1440
    assert all(r.dp * r.tp * r.pp == r.gpus for r in rows)


@pytest.mark.parametrize("bad, message", [
    ("8,32,0,1024,16,24,1024,2,2,2,219.7", "row 2: column 'micro batch'='0' must be a positive integer"),
    ("8,32,4,1024,16,24,1024,1.5,2,2,219.7", "row 2: column 'tensor parallelism'='1.5' must be a positive integer"),
    ("8,32,4,1024,16,24,1024,2,2,2,-3", "row 2: column 'iteration time (ms)'='-3' must be a positive number"),
    ("8,32,4,1024,16,24,1024,2,2,2,abc", "row 2: column 'iteration time (ms)'='abc'"),
    ("8,32,4,1024,16,24,1024,2,4,2,219.7", "row 2: column '# GPUs'=8 must equal data·tensor·pipeline parallelism"),
    ("8,30,4,1024,16,24,1024,2,2,2,219.7", "row 2: column 'global batch'=30 must be divisible by"),
])
def test_parser_rejects_bad_rows_naming_row_and_column(bad, message):
    with pytest.raises(ConfigError) as exc:
        parse_table(_table([ROWS[0], bad, ROWS[2]]), where="t.csv")
    assert message in str(exc.value) and str(exc.value).startswith("t.csv: ")


def test_parser_rejects_wrong_headers():
    with pytest.raises(ConfigError, match="missing \\['micro batch'\\]"):
        parse_table(HEADER.replace("micro batch,", "") + "\n1,2,3,4,5,6,7,8,9,10\n")
    with pytest.raises(ConfigError, match="has no rows"):
        parse_table(HEADER + "\n")


def test_vocabulary_is_padded_as_megatron_pads_it():
    # Megatron: ceil(50257 / (128·tp)) · 128·tp
    assert [padded_vocab(50257, tp) for tp in (1, 2, 4, 8)] == [50304, 50432, 50688, 51200]


def test_row_maps_to_an_sft_experiment_and_its_plan():
    row = parse_table(_table(ROWS))[1]  # 8 GPUs, global 32, micro 4, tp 2 dp 2 pp 2
    exp, plan, notes = row_experiment(row, "a100-vtrain")
    assert exp.algorithm == "sft" and exp.cluster.devices_per_node == 8 and exp.cluster.nodes == 1
    (call,) = exp.workflow.calls
    assert call.kind == "train" and call.workload.seqs == 32 and call.workload.seq_len == 1024
    assert call.workload.minibatches == 1
    lay = plan["actor_train"]
    assert (lay.mesh.first, lay.mesh.size, lay.dp, lay.tp, lay.pp) == (0, 8, 2, 2, 2)
    assert lay.micro_batches == 32 // (2 * 4)  # micro-batches per dp rank
    m = exp.models["actor"]
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.vocab) == (24, 1024, 16, 16, 50432)
    assert m.tied_embeddings and m.head == "lm"
    # GELU 4h, or a SwiGLU holding its parameters: 3·h·f ≈ 2·h·4h
    assert (m.ffn == 4 * 1024) or abs(3 * m.ffn - 8 * 1024) <= 12
    assert {"mlp", "norm", "positions", "bias", "recompute", "vocab"} <= set(notes)


def test_row_on_two_nodes_and_bad_layout_name_the_row():
    rows = parse_table(_table(["16,32,2,1024,16,24,1024,8,2,1,500.0", "12,12,2,1536,24,24,1024,6,2,1,300.0",
                               "6,12,2,1024,16,24,1024,1,6,1,300.0"]))
    exp, plan, _ = row_experiment(rows[0])
    assert exp.cluster.nodes == 2 and plan["actor_train"].mesh.size == 16
    with pytest.raises(ConfigError, match="^row 2: .*tp=6 spans nodes on mesh 0-11: its tensor-parallel group 6-11"):
        row_experiment(rows[1])
    assert str(row_experiment(rows[2])[1]["actor_train"].mesh) == "0-5"  # six GPUs of a node: a mesh


def test_evaluator_agrees_with_the_simulator_on_rows():
    prof = load_profile("a100-vtrain")
    for row in parse_table(_table(ROWS)):
        fast, sim = predict_row(row, prof, "evaluator"), predict_row(row, prof, "simulator")
        assert fast["predicted_s"] == pytest.approx(sim["predicted_s"], rel=1e-9)
        assert fast["predicted_s"] > 0 and fast["fits"]


def test_main_end_to_end_json(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text(_table(ROWS), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["vtrain", str(table), "--json", "--out", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n"] == 3 and got["engine"] == "evaluator" and got["profile"] == "a100-vtrain"
    apes = [abs(r["predicted_s"] - r["measured_s"]) / r["measured_s"] for r in got["rows"]]
    assert got["mape"] == pytest.approx(sum(apes) / 3) and got["max_ape"] == pytest.approx(max(apes))
    assert [r["measured_s"] for r in got["rows"]] == pytest.approx([0.372160408, 0.219732754, 0.410490577])
    assert -1 <= got["spearman"] <= 1 and "model_features" in got
    assert {b["tp"] for b in got["breakdown"]["tp"]} == {1, 2}
    csv = pd.read_csv(out / "predictions.csv")
    assert len(csv) == 3 and {"predicted_s", "measured_s", "ape", "tp", "pp", "dp", "hidden"} <= set(csv.columns)
    assert (out / "scatter.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["n"] == 3


def test_rows_that_cannot_be_expressed_are_skipped_with_the_reason_never_fatal(tmp_path, capsys):
    """A row that does not parse and a row the plan rules refuse are listed in the table output
    and in JSON skipped[] with their reasons; the others are predicted; exit 0."""
    table = tmp_path / "t.csv"
    table.write_text(_table([ROWS[0], "8,32,4,1024,16,24,1024,2,4,2,219.7", ROWS[1],
                             "8,32,4,1536,12,24,1024,8,1,1,219.7", ROWS[2]]), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["vtrain", str(table), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skipped (cannot be expressed): 2 rows" in text
    assert "  row 2: column '# GPUs'=8 must equal data·tensor·pipeline parallelism" in text
    assert "  row 4: invalid plan: call actor_train: tp=8 must divide heads=12" in text
    assert main(["vtrain", str(table), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n"] == 3 and [r["row"] for r in got["rows"]] == [1, 3, 5]
    assert [s["row"] for s in got["skipped"]] == [2, 4] and "tp=8 must divide heads=12" in got["skipped"][1]["reason"]
    assert json.loads((out / "summary.json").read_text())["skipped"] == got["skipped"]
    assert len(pd.read_csv(out / "predictions.csv")) == 3


def test_a_table_with_no_row_left_exits_2_in_one_line(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text(_table(["8,32,4,1024,16,24,1024,2,4,2,219.7", "8,32,4,1536,12,24,1024,8,1,1,219.7"]),
                     encoding="utf-8")
    assert main(["vtrain", str(table), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no row can be predicted; row 1: column '# GPUs'=8" in err[0]
    assert "row 2: invalid plan: call actor_train: tp=8 must divide heads=12" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_multi_node_table_maps_whole_including_tp_across_nodes():
    """vTrain's 109 multi-node runs (64–512 GPUs, tp up to 16): every row maps to a valid plan;
    tp 16 spans two 8-GPU nodes, as Megatron ran it."""
    rows = load_table(SHIPPED.with_name("ground_truth_multi.csv"))
    assert len(rows) == 109 and {r.gpus for r in rows} == {64, 256, 512}
    wide = [r for r in rows if r.tp == 16]
    assert len(wide) == 6
    for r in rows:
        exp, plan, _ = row_experiment(r)
        lay = plan["actor_train"]
        assert lay.tp_across_nodes == (r.tp > 8) and exp.cluster.nodes == r.gpus // 8
    assert row_experiment(wide[0])[1]["actor_train"].tp_span(8) == (8, 2)


def test_profile_takes_vtrain_link_figures_and_keeps_measured_curves():
    base = load_profile("a100-80g")
    data = vtrain_profile(base, "x", command="cmd")
    prof = profile_from_dict(data)
    assert prof.links["intra"]["all_gather"].busbw_Bps == pytest.approx(150 * 2**30)
    assert prof.links["inter"]["p2p"].busbw_Bps == pytest.approx(800 * 2**30 / 8 / 8)
    assert data["links"]["intra"]["all_reduce"] == base.raw["links"]["intra"]["all_reduce"]
    replaced = vtrain_profile(base, "x", replace_curves=True)
    assert "curves" not in replaced["links"]["intra"]["all_reduce"]
    assert profile_from_dict(replaced).links["intra"]["all_reduce"].busbw_Bps == pytest.approx(150 * 2**30)


def test_shipped_profile_is_what_its_recorded_command_makes(tmp_path):
    shipped = json.loads((PROFILE_DIR / "a100-vtrain.json").read_text())
    command = shipped["notes"].split("Made by: ")[1].split()
    out = tmp_path / "p.json"
    assert main([*command[3:], "--out", str(out)]) == 0
    made = json.loads(out.read_text())
    assert {**made, "date": None} == {**shipped, "date": None}


def test_missing_profiles_are_named(tmp_path, capsys):
    assert main(["make-profile", "--base", "a100-nope", "--out", str(tmp_path / "p.json")]) == 2
    assert "--base: unknown hardware profile 'a100-nope' (did you mean 'a100-vtrain'?); known profiles:" in \
        capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
    table = tmp_path / "t.csv"
    table.write_text(_table(ROWS), encoding="utf-8")
    assert main(["vtrain", str(table), "--profile", "no-such-profile"]) == 2
    assert "--profile: unknown hardware profile 'no-such-profile'" in capsys.readouterr().err
    assert main(["make-profile", "--base", "a100-80g", "--name", "x", "--out", ""]) == 2
    assert "--out: the path is empty" in capsys.readouterr().err


FIT_ROWS = ["2,8,1,1024,16,12,1024,2,1,1,1", "2,16,1,1024,16,12,1024,2,1,1,1", "4,8,2,2048,16,12,1024,4,1,1,1",
            "4,16,2,2048,16,12,1024,4,1,1,1", "2,16,4,1024,16,12,1024,1,2,1,1", "2,16,8,2048,16,12,1024,1,1,2,1",
            "4,8,1,1024,16,12,1024,2,1,2,1", "8,16,1,1024,16,16,1024,8,1,1,1"]


def test_fit_profile_recovers_known_numbers_from_rows_they_produced(tmp_path, capsys):
    """Rows timed by a profile with known optimizer bytes per parameter, per-call and
    per-micro-batch bookkeeping and host cost per op: the fit, started from the base, recovers
    the four numbers from the 12-layer rows (the step from the two one-stage, one-replica
    groups, the rest by least squares), and the 16-layer row it held out is then predicted as
    it was produced."""
    from analysis.vtrain_fit import fitted_doc, step_costs

    base = load_profile("a100-vtrain")
    known = {"optimizer_bytes_per_param": 44.0, "call_overhead_s": 3e-4, "dispatch_s": 2.5e-5,
             "micro_batch_overhead_s": 8e-4}
    truth = profile_from_dict(fitted_doc(base, "truth", known, "synthetic"))
    rows = parse_table(_table(FIT_ROWS))
    lines = [r.rsplit(",", 1)[0] + f",{1e3 * predict_row(row, truth)['predicted_s']:.9g}"
             for r, row in zip(FIT_ROWS, rows)]
    step = step_costs(parse_table(_table(lines)), base)
    assert step["groups"] == 2 and step["optimizer_bytes_per_param"] == pytest.approx(44.0, rel=0.01)
    table = tmp_path / "t.csv"
    table.write_text(_table(lines), encoding="utf-8")
    out = tmp_path / "fitted.json"
    assert main(["fit-profile", str(table), "--base", "a100-vtrain", "--name", "fitted", "--fit-layers", "12",
                 "--out", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["fit_rows"] == 7 and got["fit_mape"] < 0.01 and got["evaluations"] > 0
    assert got["optimizer_bytes_per_param"] == pytest.approx(44.0, rel=0.01)
    assert got["call_overhead_s"] == pytest.approx(3e-4, abs=5e-5)
    assert got["dispatch_s"] == pytest.approx(2.5e-5, rel=0.05)
    assert got["micro_batch_overhead_s"] == pytest.approx(8e-4, rel=0.1)
    fitted = load_profile(str(out))
    assert "held out" in fitted.raw["compute"]["launch"]["cite"] and fitted.source == "measured"
    assert "held out" in fitted.raw["trainer"]["optimizer"]["cite"] and fitted.trainer.attention == "unfused"
    assert main(["vtrain", str(table), "--profile", str(out), "--held-out-layers", "16", "--json"]) == 0
    parts = json.loads(capsys.readouterr().out)["parts"]
    assert parts["held_out"]["n"] == 1 and parts["held_out"]["mape"] < 0.02 and parts["fitted"]["n"] == 7
    assert [b["tp"] for b in parts["fitted"]["by_tp"]] == [1, 2, 4] and parts["held_out"]["by_pp"][0]["pp"] == 1
    # no row with the layer counts asked for: refused by name, nothing written
    assert main(["fit-profile", str(table), "--name", "x", "--fit-layers", "30",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "--fit-layers=30: no row" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
