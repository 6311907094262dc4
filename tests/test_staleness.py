"""analysis.staleness: validations at several η side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from analysis.staleness import load, main, report


def _validation(root: Path, eta: int, rows: list[tuple[str, float, float, float, float]],
                streaming: str | None = None) -> str:
    d = root / f"eta{eta}{streaming or ''}"
    d.mkdir()
    df = pd.DataFrame(rows, columns=["plan", "predicted_iteration_s", "measured_iteration_s", "measured_min_s",
                                     "measured_max_s"])
    df["ape"] = (df["predicted_iteration_s"] / df["measured_iteration_s"] - 1).abs()
    df.to_csv(d / "plans.csv", index=False)
    settings = {"max_staleness": eta} | ({"streaming": streaming} if streaming else {})
    (d / "summary.json").write_text(json.dumps({"settings": settings}))
    return str(d)


def test_the_predicted_best_plan_and_eta_against_the_measured_best(tmp_path, capsys):
    a = _validation(tmp_path, 0, [("colocate", 1.0, 1.1, 1.05, 1.15), ("split", 1.4, 1.5, 1.45, 1.55)])
    b = _validation(tmp_path, 1, [("colocate", 0.98, 1.12, 1.08, 1.2), ("split", 0.9, 1.0, 0.96, 1.04)])
    r = report(load([a, b]))
    assert r["predicted_best"] == {"plan": "split", "eta": 1, "streaming": "off", "predicted_s": 0.9,
                                   "measured_s": 1.0}
    assert r["measured_best"]["plan"] == "split" and r["measured_best"]["eta"] == 1
    assert r["predicted_best_behind"] == 0.0
    assert [e["eta"] for e in r["per_eta"]] == [0, 1]
    # throughput error is |measured/predicted - 1|: 0.1/0.9 for the split at eta 1
    assert r["per_eta"][1]["throughput_median_ape"] == pytest.approx((0.14 / 0.98 + 0.1 / 0.9) / 2)
    assert main([a, b]) == 0
    assert "the predicted best is the measured best" in capsys.readouterr().out


def test_a_directory_without_a_validation_exits_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "not a validation output" in capsys.readouterr().err


def test_streaming_validations_are_told_apart_from_those_of_the_same_eta(tmp_path, capsys):
    a = _validation(tmp_path, 1, [("split", 0.9, 1.0, 0.96, 1.04)])
    b = _validation(tmp_path, 1, [("split", 0.7, 0.8, 0.78, 0.82)], streaming="recompute")
    r = report(load([a, b]))
    assert [(e["eta"], e["streaming"]) for e in r["per_eta"]] == [(1, "off"), (1, "recompute")]
    assert r["predicted_best"]["streaming"] == "recompute" and r["measured_best"]["streaming"] == "recompute"
    assert main([a, b]) == 0
    assert "η=1, streaming recompute" in capsys.readouterr().out
