"""Profiles from vidur's per-op tables: the import writes a loadable fused-kernel profile with
its sources, the shipped profiles are what the import produces, and their error on held-out
models' ops stays small."""

from __future__ import annotations

import json

import pytest

from calibration import pipeline as calibrate
from calibration import vidur
from estimator.base.errors import cli_guard
from estimator.profile.profiles import PROFILE_DIR, load_profile
from tests.conftest import ROOT

TABLES = ROOT / "calibration" / "vidur"


@pytest.fixture(scope="module")
def h100_rows():
    return vidur.load_compute(TABLES / "compute" / "h100")


def test_vidur_ops_map_to_fused_kernels_with_the_layer_shapes(h100_rows):
    r = h100_rows[(h100_rows.model == "meta-llama/Llama-2-7b-hf") & (h100_rows.tokens == 4096) & (h100_rows.tp == 2)]
    up = r[r.op == "mlp_up_proj"].iloc[0]
    assert up.flops == pytest.approx(2 * 4096 * 4096 * 2 * 11008 / 2, rel=1e-12)  # gate and up, this rank's half
    assert up.bytes == pytest.approx(2 * (4096 * 4096 + 4096 * 11008 + 4096 * 11008), rel=1e-12)
    norm = r[r.op == "input_layernorm"].iloc[0]
    assert norm.kernel == "rms_norm"
    assert norm.bytes == pytest.approx(2 * 2 * 4096 * 4096 + 2 * 4096, rel=1e-12)  # full width on every rank
    assert set(h100_rows.op) == set(vidur.VIDUR_OPS)


def test_shipped_profiles_are_what_the_import_writes(tmp_path):
    for base, name in (("h100-sxm", "h100-vidur"), ("a100-80g", "a100-vidur")):
        shipped = load_profile(name).raw
        assert f"--import-vidur calibration/vidur --base {base} --name {name}" in shipped["notes"]
        doc, _, _, _ = vidur.build_profile(load_profile(base).raw, TABLES, name, "cmd")
        for section in ("compute", "memory", "links"):
            assert doc[section] == shipped[section], f"{name}.{section} is stale: rerun the command in its notes"
        assert shipped["source"] == "measured" and shipped["compute"]["ops"] == "fused"
        assert "7d475133" in shipped["compute"]["efficiency"]["cite"]


def test_held_out_models_ops_are_predicted_within_ten_percent(h100_rows):
    prof = load_profile("h100-vidur")
    fitted = vidur.fitted_models(prof, list(h100_rows.model.unique()))
    assert set(fitted) == set(vidur.FIT_MODELS)
    held = h100_rows[~h100_rows.model.isin(fitted)]
    assert len(held) > 5000
    result = vidur.check(prof, held, fitted)
    assert result["median_ape"] <= 10.0, result["median_ape"]
    worst = max(v["median_ape"] for v in result["ops"].values())
    assert worst <= 15.0, result["ops"]  # norms are the worst: 11-13 %


def test_check_vidur_cli_prints_per_op_errors_as_json(capsys):
    argv = ["--check-vidur", str(TABLES / "compute" / "a100" / "internlm"), "--profile", "a100-vidur", "--json"]
    assert cli_guard(calibrate.main, argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["ops"]) == set(vidur.VIDUR_OPS)
    assert all({"median_ape", "max_ape"} <= set(v) for v in out["ops"].values())
    assert out["median_ape"] <= 10.0 and out["models"]["internlm/internlm-20b"]["fitted"] is False


def test_import_vidur_writes_a_profile_and_its_reports(tmp_path, capsys):
    argv = ["--import-vidur", str(TABLES), "--base", "a100-80g", "--name", "a100-x", "--out", str(tmp_path)]
    assert cli_guard(calibrate.main, argv) == 0
    assert "held out" in capsys.readouterr().out
    prof = load_profile(tmp_path / "a100-x.json")
    assert prof.ops == "fused" and prof.kernels["add"][0] > 0.5
    assert (tmp_path / "a100-x.links.csv").is_file() and (tmp_path / "a100-x.kernels.report.csv").is_file()
    assert not (PROFILE_DIR / "a100-x.json").exists()


@pytest.mark.parametrize("argv,match", [
    (["--import-vidur", "calibration/vidur", "--name", "x"], "--import-vidur needs --base PROFILE and --name NAME"),
    (["--import-vidur", "no/such/dir", "--base", "h100-sxm", "--name", "x"], "is not a directory of vidur tables"),
    (["--check-vidur", "calibration/vidur"], "--check-vidur needs --profile NAME"),
    (["--import-vidur", "calibration/vidur", "--base", "h200", "--name", "x"], "vidur has tables for the bases"),
    # one profile is one GPU: a directory with both GPUs' tables would judge H100 on A100 rows
    (["--check-vidur", "calibration/vidur", "--profile", "h100-vidur"], "holds the tables of 2 GPUs (a100, h100)"),
])
def test_bad_vidur_arguments_exit_2_naming_them(argv, match, tmp_path, capsys):
    assert cli_guard(calibrate.main, argv + ["--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("name", ["h100-vidur", "a100-vidur"])
def test_vidur_profiles_say_which_numbers_are_measured_and_which_are_datasheet(name):
    prov = load_profile(name).provenance()
    for key in ("compute.efficiency", "compute.kernels", "memory.efficiency", "links.intra.all_reduce",
                "links.intra.p2p"):
        assert "vidur" in prov[key] and "7d475133" in prov[key], key
    for key in ("compute.peak", "memory.bandwidth", "memory.capacity"):
        assert "datasheet" in prov[key], key  # kept from the base profile
    assert "FlashAttention-2" in prov["compute.kernels.by_kernel.flash_attention"]
    assert "vidur" not in prov["links.inter.all_reduce"]
