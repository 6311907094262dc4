"""Published RL steps: a long table's runs mapped to experiments and plans, predicted phase by
phase, runs the vocabulary cannot express skipped with the reason, and the shipped profile's
stack terms consistent with their sources and the rows they were fitted on."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from analysis.published import main
from analysis.published_rl import (
    STEP_AT,
    STEP_AT_256_S,
    _decode_kernels,
    fitted_runs,
    load_table,
    map_run,
    repeat_spread,
)
from estimator.base.errors import ConfigError
from estimator.cost.memory import plan_memory
from estimator.profile.pricing import for_stack
from estimator.profile.profiles import load_profile
from estimator.spec.plan import Plan
from tests.conftest import ROOT

TABLE = ROOT / "analysis" / "data" / "published" / "nemo_rl_v03_blog.csv"


@pytest.fixture(scope="module")
def runs():
    return {r.experiment_id: r for r in load_table(TABLE)}


def _fixture(tmp_path, ids: list[str], edit=None) -> str:
    df = pd.read_csv(TABLE)
    df = df[df.experiment_id.isin(ids)].copy()
    if edit is not None:
        df = edit(df)
    path = tmp_path / "table.csv"
    df.to_csv(path, index=False)
    return str(path)


def _variants(df: pd.DataFrame) -> pd.DataFrame:
    """The 8B Megatron run three times: as published, on a GPU without a profile, and with the
    other names a table may give its training and refit phases."""
    base = df[df.experiment_id == "nrl03-llama8b-megatron"]
    unknown = base.assign(experiment_id="x-b200", gpu="B200")
    names = {"train_time": "update_actor_time", "refit_time": "weight_sync_time"}
    renamed = base.assign(experiment_id="x-renamed", metric=base.metric.replace(names))
    return pd.concat([df, unknown, renamed])


def test_a_small_table_predicts_what_it_can_and_skips_the_rest_with_reasons(tmp_path, capsys):
    table = _fixture(tmp_path, ["nrl03-llama8b-megatron", "nrl03-qwen3-30b-a3b-megatron", "nrl03-llama3.3-70b-16k"],
                     _variants)
    out = tmp_path / "out"
    assert main(["rl", table, "--out", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert [r["experiment_id"] for r in s["runs"]] == ["nrl03-llama8b-megatron", "x-renamed"]
    skipped = {k["experiment_id"]: k["reason"] for k in s["skipped"]}
    assert "mixture-of-experts model 'Qwen3-30B-A3B (MoE)'" in skipped["nrl03-qwen3-30b-a3b-megatron"]
    assert "context parallelism" in skipped["nrl03-llama3.3-70b-16k"]
    assert skipped["x-b200"].startswith("GPU 'B200' has no profile")
    first, renamed = s["runs"]
    assert set(first["phases"]) == {"step_time", "gen_time", "logprob_time", "train_time", "refit_time"}
    assert first["phases"]["gen_time"]["measured_s"] == 58 and first["phases"]["gen_time"]["predicted_s"] > 0
    assert first["role"] == "fitted" and renamed["role"] == "held_out"  # the profile's cites name the first
    # the other metric names read the same calls: the same configuration predicts the same seconds
    assert renamed["phases"]["update_actor_time"]["predicted_s"] == first["phases"]["train_time"]["predicted_s"]
    assert renamed["phases"]["weight_sync_time"]["predicted_s"] == first["phases"]["refit_time"]["predicted_s"]
    assert set(s["mape"]) >= {"step_time", "gen_time"} and s["mape_by_role"]["fitted"]["step_time"] >= 0
    assert first["stack"] == "megatron-vllm" and first["profile"] == "h100-rl"
    assert {p.name for p in out.iterdir()} == {"predictions.csv", "phases.png", "summary.json"}
    assert len(pd.read_csv(out / "predictions.csv")) == 10  # 5 phases of each of the two runs


def test_a_table_where_nothing_can_be_predicted_exits_2_with_every_reason(tmp_path, capsys):
    table = _fixture(tmp_path, ["nrl03-qwen3-30b-a3b-megatron"])
    assert main(["rl", table]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run of" in err[0] and "mixture-of-experts" in err[0]


def test_a_missing_column_or_unit_is_named(tmp_path, capsys):
    table = _fixture(tmp_path, ["nrl03-llama8b-megatron"], lambda df: df.drop(columns=["mean_len"]))
    assert main(["rl", table]) == 2
    assert "lacks column(s) ['mean_len']" in capsys.readouterr().err
    table = _fixture(tmp_path, ["nrl03-llama8b-megatron"], lambda df: df.assign(unit="min"))
    assert main(["rl", table]) == 2
    assert "unit='min' must be one of ['s', 'ms']" in capsys.readouterr().err


def test_a_run_maps_to_the_experiment_and_plan_its_source_states(runs):
    m = map_run(runs["nrl03-llama70b-megatron"])
    exp, plan = m.experiment, m.plan
    p = exp.params
    assert (p.batch_size, p.group_size, p.ppo_minibatches, p.prompt_len, p.gen_len) == (64, 32, 4, 256, 3840)
    assert p.gen_lengths.mean() == pytest.approx(398) and exp.kv_fraction == 0.6 and exp.verifier
    assert (exp.cluster.nodes, exp.cluster.devices_per_node, exp.stack) == (8, 8, "megatron-vllm")
    gen, train, inf = plan["actor_gen"], plan["actor_train"], plan["actor_inf"]
    assert (gen.dp, gen.tp, gen.pp) == (16, 4, 1)  # vLLM TP4 on 64 GPUs
    assert (train.dp, train.tp, train.pp, train.shard, train.max_tokens_per_micro_batch) == (4, 4, 4, "optimizer", 4096)
    assert train.offload == "all"  # NeMo-RL's colocated loop offloads the policy while vLLM generates
    assert (inf.tp, inf.pp, inf.max_tokens_per_micro_batch) == (4, 4, 16384)
    assert m.profile.name == "h100-rl" and m.profile.stack == "megatron-vllm"
    fsdp = map_run(runs["nrl03-llama70b-dtensor"])
    t = fsdp.plan["actor_train"]
    assert (t.dp, t.tp, t.pp, t.shard, t.offload, fsdp.profile.stack) == (8, 8, 1, "full", "all", "fsdp-vllm")
    # the 8B Megatron run fits as it ran: the policy offloaded while the engine generates, the
    # reference in host memory between its log-probs; with either resident, it would not
    small = map_run(runs["nrl03-llama8b-megatron"])
    cap, stack = small.profile.capacity_bytes, small.profile.stack
    assert plan_memory(small.experiment, small.plan, cap, stack).feasible
    kept = Plan({c: dataclasses.replace(lay, offload="none") for c, lay in small.plan.layouts.items()})
    assert not plan_memory(small.experiment, kept, cap, stack).feasible
    assert not plan_memory(small.experiment, small.plan, cap, None).feasible
    qwen = map_run(runs["nrl03-qwen3-32b-megatron"])  # vLLM TP not printed: NeMo-RL's later Qwen3-32B recipe
    assert qwen.plan["actor_gen"].tp == 4 and qwen.experiment.models["actor"].qk_norm
    assert any("not published" in n or "assumed" in n for n in qwen.notes)


def test_the_shipped_profiles_stack_terms_match_their_sources_and_name_their_rows():
    prof = for_stack(load_profile("h100-rl"), "megatron-vllm")
    assert fitted_runs(prof) == {"nrl03-llama8b-megatron", "nrl03-llama8b-dtensor"}
    e = prof.engine
    assert (e.max_num_seqs, e.prefill_chunk_tokens, e.cuda_graphs) == (1024, 16384, True)
    assert e.step_host_s(STEP_AT) == pytest.approx(STEP_AT_256_S)  # vllm#10634's step at batch 256
    assert e.eager_kernel_s == pytest.approx((8.4e-3 - 5.1e-3) / _decode_kernels(load_profile("h100-vidur")))
    fsdp = for_stack(load_profile("h100-rl"), "fsdp-vllm").terms
    assert fsdp.generation == e  # one engine for both trainers
    for terms in (prof.terms, fsdp):
        for key in ("refit", "trainer", "generation.step"):
            assert "fitted by `python -m analysis.published rl-fit" in terms.cites[key]
    with pytest.raises(ConfigError):
        map_run(load_table(TABLE)[0], "no-such-profile")


def test_two_measurements_of_one_configuration_pair_by_their_settings(runs):
    """A rerun pairs with the source's own report of the same settings (not with a run that
    differs in any printed setting, nor with itself), and the spread per phase is by hand."""
    table = list(runs.values())
    out = repeat_spread(table)
    pairs = {p["repeat"]: p for p in out["pairs"]}
    assert {k: p["reported"] for k, p in pairs.items()} == {
        "i959-llama8b-megatron": "nrl03-llama8b-megatron", "i959-llama8b-dtensor": "nrl03-llama8b-dtensor",
        "i959-llama70b-megatron": "nrl03-llama70b-megatron", "i959-llama70b-dtensor": "nrl03-llama70b-dtensor"}
    assert pairs["i959-llama70b-megatron"]["difference"]["refit_time"] == pytest.approx(26 / 14 - 1)
    refit = sorted(abs(runs[k].measured["refit_time"] / runs[p["reported"]].measured["refit_time"] - 1)
                   for k, p in pairs.items())
    assert out["spread"]["refit_time"] == {"pairs": 4, "median": pytest.approx((refit[1] + refit[2]) / 2),
                                           "max": pytest.approx(refit[-1])}
    # a rerun whose printed layout differs is another configuration: no pair
    moved = dataclasses.replace(runs["i959-llama70b-megatron"], plan="Megatron TP8 PP2; vLLM TP4")
    assert [p["repeat"] for p in repeat_spread([runs["nrl03-llama70b-megatron"], moved])["pairs"]] == []
    assert repeat_spread([runs["nrl03-llama8b-megatron"]]) == {"pairs": [], "spread": {}}
