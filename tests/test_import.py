"""Importers of ReaLHF, AReaL and NeMo-RL configs (estimator.interop), ``python -m
estimator.predict --from`` for them, and ``python -m search --from``.

The round trips export a searched plan of the 7B PPO and 8B GRPO examples (the golden plans of
``tests/test_export.py``, fixed inputs) where the framework takes the experiment: ReaLHF the PPO one, NeMo-RL
the GRPO one, AReaL the GRPO one and the PPO one with a verifier reward (AReaL has no
reward-model engine).
"""

from __future__ import annotations

import json

import pytest
import yaml

from estimator.base.errors import ConfigError
from estimator.export import make_export
from estimator.interop import importer
from estimator.interop.areal import parse_backend
from estimator.interop.realhf import parse_nodelist, read_mesh
from estimator.predict import main as predict_main
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import experiment_from_dict, load_experiment
from estimator.spec.plan import Plan
from tests.conftest import EXAMPLES
from tests.test_export import CASES, PPO, _case, _plan

GRPO = CASES["grpo-llama3-8b-8xh100"][0]
FILES = {"realhf": "overrides.txt", "areal": "config.yaml", "nemo-rl": "config.yaml"}


def _rule_reward(path, **over):
    """An example experiment with a verifier reward instead of a reward model."""
    raw = yaml.safe_load(path.read_text())
    raw["models"] = raw["models"] | {"reward": "rule"}
    return experiment_from_dict(raw | over, where=str(path))


def _without(plan: Plan, *calls: str) -> Plan:
    return Plan({c: lay for c, lay in plan.layouts.items() if c not in calls})


def _round_trip(framework: str, exp, plan: Plan):
    export = make_export(framework, exp, plan)
    raw, back, notes = importer(framework)(export.files[FILES[framework]], exp.cluster.device)
    return export, raw, back, notes


def _same_experiment(raw: dict, exp) -> None:
    """What a config carries of the experiment comes back: algorithm, models, batch, steps, caps,
    samples per prompt, the cluster, the hyperparameters that are written."""
    p = exp.params
    assert (raw["algorithm"], raw["batch_size"], raw["ppo_minibatches"]) == (exp.algorithm, p.batch_size,
                                                                             p.ppo_minibatches)
    assert raw["models"] == {r: m.name for r, m in exp.models.items()} | ({"reward": "rule"} if exp.verifier else {})
    assert (raw["prompt_len"], raw["gen_len"]) == (p.prompt_len, p.gen_len)  # the caps
    assert raw.get("group_size", 1) == p.group_size
    assert (raw["cluster"]["nodes"], raw["cluster"]["devices_per_node"]) == (exp.cluster.nodes,
                                                                             exp.cluster.devices_per_node)
    h = exp.hyper
    for key in ("lr", "kl_coef", "clip_eps", "temperature"):
        assert raw["hyperparams"][key] == pytest.approx(getattr(h, key)), key


# ---- round trips on the examples --------------------------------------------------------------

@pytest.mark.parametrize("framework, case", [("realhf", "ppo-llama2-7b-8xh100"), ("areal", "grpo-llama3-8b-8xh100"),
                                             ("nemo-rl", "grpo-llama3-8b-8xh100")])
def test_importing_an_export_gives_back_the_projected_plan(framework, case):
    exp, plan = _case(case)
    export, raw, back, _ = _round_trip(framework, exp, plan)
    assert back == export.plan
    _same_experiment(raw, exp)
    assert raw.get("old_logprobs", "from_generation") == exp.params.old_logprobs


def test_areal_round_trips_the_7b_ppo_example_with_a_verifier_reward():
    exp = _rule_reward(PPO)
    plan = _without(_case("ppo-llama2-7b-8xh100")[1], "reward_inf")
    export, raw, back, _ = _round_trip("areal", exp, plan)
    assert export.projected  # the critic and the reference join the actor's devices
    assert back == export.plan
    _same_experiment(raw, exp)
    assert raw["hyperparams"]["value_clip"] == pytest.approx(exp.hyper.value_clip)


def test_nemo_rl_recomputes_old_logprobs_where_the_experiment_takes_them_from_generation():
    exp = _rule_reward(GRPO, old_logprobs="from_generation")
    plan = _without(_case("grpo-llama3-8b-8xh100")[1], "actor_inf")
    export, raw, back, _ = _round_trip("nemo-rl", exp, plan)
    assert raw["old_logprobs"] == "recompute"
    assert {c: back[c] for c in export.plan.layouts} == export.plan.layouts
    home, inf = back["actor_train"], back["actor_inf"]
    assert (inf.mesh, inf.dp, inf.tp, inf.pp) == (home.mesh, home.dp, home.tp, home.pp)


# ---- what each importer reads beyond the golden plans --------------------------------------------

def test_realhf_round_trips_meshes_of_whole_nodes_shards_recompute_and_pipelines():
    exp = load_experiment(EXAMPLES / "ppo-llama2-70b-128xh100.yaml")
    node = {"dp": 1, "tp": 8, "pp": 1, "micro_batches": 4}
    plan = _plan({"actor_gen": {"mesh": "0-63", "dp": 8, "tp": 8, "pp": 1, "micro_batches": 1},
                  "actor_train": {"mesh": "0-63", "dp": 2, "tp": 8, "pp": 4, "micro_batches": 8, "recompute": "full",
                                  "shard": "optimizer"},
                  "critic_train": {"mesh": "64-127", "dp": 8, "tp": 8, "pp": 1, "micro_batches": 8},
                  "critic_inf": {"mesh": "64-71", **node}, "ref_inf": {"mesh": "72-79", **node},
                  "reward_inf": {"mesh": "80-95", "dp": 2, "tp": 8, "pp": 1, "micro_batches": 4}})
    export, raw, back, _ = _round_trip("realhf", exp, plan)
    assert not export.projected and back == plan
    lines = set(export.files["overrides.txt"].splitlines())
    assert {"nodelist='NODE[01-16]'", "critic_train.device_mesh='NODE[09-16]'", "rew_inf.device_mesh='NODE[11-12]'",
            "actor.zero_stage=1", "actor.gradient_checkpointing=True"} <= lines


def test_realhf_fills_in_its_own_defaults():
    """ReaLHF's defaults: every call on the whole cluster, gradient checkpointing on, ZeRO stage 2
    run as 1 on Megatron (a sharded optimizer over dp > 1), n_mbs 2·pp for a train call and pp
    for the others, the dataset's 256 prompts of 256 tokens and 256 new ones."""
    text = "\n".join(["allocation_mode=manual", "n_gpus_per_node=8"]
                     + [f"{r}.path=meta-llama/Llama-2-7b-hf" for r in ("actor", "critic", "ref", "rew")]
                     + ["actor_train.parallel.pipeline_parallel_size=2", "actor_train.parallel.data_parallel_size=4",
                        "actor_gen.parallel.pipeline_parallel_size=2", "actor_gen.parallel.data_parallel_size=4",
                        "ref_inf.parallel.data_parallel_size=8", "rew_inf.parallel.data_parallel_size=8",
                        "critic_inf.parallel.data_parallel_size=8", "critic_train.parallel.data_parallel_size=8"])
    raw, plan, _ = importer("realhf")(text, "h100-sxm")
    assert (raw["batch_size"], raw["prompt_len"], raw["gen_len"], raw["ppo_minibatches"]) == (256, 256, 256, 4)
    assert raw["hyperparams"]["kl_coef"] == pytest.approx(0.1) and raw["hyperparams"]["lr"] == pytest.approx(1e-5)
    train, gen, ref = plan["actor_train"], plan["actor_gen"], plan["ref_inf"]
    assert all(lay.mesh == DeviceMesh(0, 8) for lay in plan.layouts.values())
    assert (train.micro_batches, train.recompute, train.shard) == (4, "full", "optimizer")
    assert (gen.micro_batches, ref.micro_batches) == (2, 1)
    assert plan["critic_train"].shard == "optimizer"


def test_realhf_reads_symmetric_allocations_and_refuses_its_own_planners():
    base = [f"{r}.path=meta-llama/Llama-2-7b-hf" for r in ("actor", "critic", "ref", "rew")]
    raw, plan, _ = importer("realhf")("\n".join(base + ["allocation_mode=m2d2p2"]), "h100-sxm")
    assert {(lay.dp, lay.tp, lay.pp) for lay in plan.layouts.values()} == {(2, 2, 2)}
    raw, plan, _ = importer("realhf")("\n".join(base + ["allocation_mode=pipe_data", "n_nodes=2"]), "h100-sxm")
    assert {(str(lay.mesh), lay.dp, lay.tp, lay.pp) for lay in plan.layouts.values()} == {("0-15", 8, 1, 2)}
    with pytest.raises(ConfigError, match=r"allocation_mode=heuristic: the importer reads manual"):
        importer("realhf")("\n".join(base + ["allocation_mode=heuristic"]), "h100-sxm")


def test_realhf_mesh_names_read_as_reallocated_meshes():
    nodes = parse_nodelist("NODE[01-02,04]")
    assert nodes == ["NODE01", "NODE02", "NODE04"]
    assert read_mesh("'NODE02:4,5,6,7'", nodes, 8) == DeviceMesh(12, 4)
    assert read_mesh("NODE[02,04]", nodes, 8) == DeviceMesh(8, 16)  # consecutive in the nodelist
    for name, why in (("NODE01:0,2", "not contiguous"), ("NODE03", r"outside nodelist"),
                      ("NODE[01,04]", "not consecutive"), ("NODE[02-01]", "names no node")):
        with pytest.raises(ConfigError, match=why):
            read_mesh(name, nodes, 8)


def test_areal_backend_strings_by_its_grammar():
    assert parse_backend("sglang:d4t2", "k", True) == ("sglang", {"d": 4, "t": 2, "p": 1})
    assert parse_backend("megatron:d2p2t4", "k", False) == ("megatron", {"d": 2, "t": 4, "p": 2})
    assert parse_backend("fsdp[actor]:t2d4c1", "k", False) == ("fsdp", {"d": 4, "t": 2, "p": 1})
    for text, inference, why in (("fsdp:d2p2", False, "no pipeline stages"), ("megatron:d2c2", False, "context"),
                                 ("sglang:d2c2", True, "not one of d, t, p"), ("d4t2", False, "not a backend string"),
                                 ("archon:d8", False, "not a backend string"), ("vllm:d2d2", True, "given twice"),
                                 ("megatron:d4", True, "not a backend string")):
        with pytest.raises(ConfigError, match=why):
            parse_backend(text, "rollout.backend", inference)


def _areal_config(**sections) -> str:
    base = {"cluster": {"n_nodes": 1, "n_gpus_per_node": 8},
            "train_dataset": {"batch_size": 64, "max_length": 256},
            "rollout": {"backend": "sglang:d2t2", "consumer_batch_size": 64},
            "gconfig": {"n_samples": 8, "max_new_tokens": 1024},
            "actor": {"backend": "fsdp:d4", "path": "meta-llama/Meta-Llama-3-8B"},
            "ref": {"path": "meta-llama/Meta-Llama-3-8B"}}
    for key, value in sections.items():
        base[key] = base.get(key, {}) | value if isinstance(value, dict) else value
    return yaml.safe_dump(base)


def test_areal_places_engines_as_its_scheduler_does():
    """Apart (the default strategy), the actor's workers, then the reference's, then the servers
    take the next devices; a colocated engine takes its target's; the legacy allocation_mode
    starts the servers first."""
    raw, plan, notes = importer("areal")(_areal_config(ref={"backend": "fsdp:d2"}, rollout={"backend": "sglang:d2"}),
                                         "h100-sxm")
    assert [str(plan[c].mesh) for c in ("actor_train", "ref_inf", "actor_gen")] == ["0-3", "4-5", "6-7"]
    assert plan["actor_train"].shard == "full" and plan["actor_gen"].dp == 2 and raw["group_size"] == 8
    assert any("local scheduler" in n for n in notes)
    raw, plan, _ = importer("areal")(_areal_config(ref={"scheduling_strategy": {"type": "colocation",
                                                                                "target": "actor"}}), "h100-sxm")
    assert str(plan["ref_inf"].mesh) == "0-3" and str(plan["actor_gen"].mesh) == "4-7"
    legacy = _areal_config(allocation_mode="sglang:d2t2+megatron:d2p2")
    legacy = legacy.replace("  backend: sglang:d2t2\n", "").replace("  backend: fsdp:d4\n", "")
    raw, plan, _ = importer("areal")(legacy, "h100-sxm")
    assert str(plan["actor_gen"].mesh) == "0-3" and str(plan["actor_train"].mesh) == "4-7"
    assert plan["actor_train"].shard == "optimizer"  # Megatron's distributed optimizer, on by default
    with pytest.raises(ConfigError, match=r"need 12 devices \(actor 4, ref 4, rollout 4\), the cluster has 8"):
        importer("areal")(_areal_config(ref={"backend": "fsdp:d4"}), "h100-sxm")


def test_areal_reads_a_rollout_apart_from_the_actor_back_to_front():
    """A plan with the servers on the first devices comes back with the actor there: the devices
    are relabelled as AReaL's scheduler places them, every degree kept."""
    exp = _rule_reward(GRPO)
    four = {"mesh": "4-7", "dp": 4, "tp": 1, "pp": 1, "micro_batches": 4}
    plan = _plan({"actor_gen": {"mesh": "0-3", "dp": 2, "tp": 2, "pp": 1, "micro_batches": 1},
                  "actor_inf": four, "ref_inf": four, "actor_train": four})
    export, _, back, _ = _round_trip("areal", exp, plan)
    assert not export.projected and any("AReaL's scheduler places the engines" in n for n in export.notes)
    swap = {"0-3": "4-7", "4-7": "0-3"}
    assert back == Plan.from_data({"calls": {c: lay.to_dict() | {"mesh": swap[str(lay.mesh)]}
                                             for c, lay in plan.layouts.items()}})


@pytest.mark.parametrize("framework", ["areal", "nemo-rl"])
def test_generation_runs_one_micro_batch_per_pipeline_stage(framework):
    exp, plan = _case("grpo-llama3-8b-8xh100")
    plan = Plan(plan.layouts | {"actor_gen": Plan.from_data({"calls": {"g": {
        "mesh": "0-7", "dp": 2, "tp": 2, "pp": 2, "micro_batches": 1}}})["g"]})
    export, _, back, _ = _round_trip(framework, exp, plan)
    assert [(c.call, c.field, c.given, c.exported) for c in export.changes if c.call == "actor_gen"] == \
        [("actor_gen", "micro_batches", "1", "2")]
    assert back == export.plan


def test_areal_reads_its_off_policyness_as_the_experiments_staleness():
    ref = {"scheduling_strategy": {"type": "colocation", "target": "actor"}}
    raw, plan, _ = importer("areal")(_areal_config(rollout={"max_head_offpolicyness": 2}, ref=ref), "h100-sxm")
    assert raw["async"] == {"max_staleness": 2}
    assert experiment_from_dict(raw).max_staleness == 2
    raw, _, _ = importer("areal")(_areal_config(rollout={"max_head_offpolicyness": 0}, ref=ref), "h100-sxm")
    assert "async" not in raw


def test_areal_refuses_what_plans_cannot_express():
    cases = {"consumer_batch_size=1 differs": _areal_config(rollout={"consumer_batch_size": 1}),
             "no ref section": _areal_config().replace("ref:\n  path: meta-llama/Meta-Llama-3-8B\n", ""),
             "max_length is not given": _areal_config(train_dataset={"max_length": None})}
    for why, text in cases.items():
        with pytest.raises(ConfigError, match=why):
            importer("areal")(text, "h100-sxm")


def test_nemo_rl_places_generation_apart_and_reads_its_defaults():
    """grpo_math_1B.yaml's defaults: DTensor (FSDP2), sequence packing with max_total_sequence_length
    × train_micro_batch_size tokens, colocated vLLM tp 1, 32 prompts × 16; apart, the policy's
    cluster first."""
    text = yaml.safe_dump({"cluster": {"gpus_per_node": 8, "num_nodes": 1}, "data": {"max_input_seq_length": 256},
                           "policy": {"model_name": "meta-llama/Meta-Llama-3-8B", "max_total_sequence_length": 1024,
                                      "generation": {"colocated": {"enabled": False,
                                                                   "resources": {"gpus_per_node": 2}}}}})
    raw, plan, notes = importer("nemo-rl")(text, "h100-sxm")
    assert (raw["batch_size"], raw["group_size"], raw["ppo_minibatches"]) == (32, 16, 1)
    assert raw["kv_fraction"] == pytest.approx(0.6) and raw["old_logprobs"] == "recompute"
    train, gen = plan["actor_train"], plan["actor_gen"]
    assert (str(train.mesh), train.dp, train.shard, train.max_tokens_per_micro_batch) == ("0-5", 6, "full", 4096)
    assert (str(gen.mesh), gen.dp, gen.tp) == ("6-7", 2, 1)
    assert any("sequence packing" in n for n in notes) and any("policy is placed on the first" in n for n in notes)


def test_nemo_rl_cuts_the_response_to_the_engines_length():
    config = {"cluster": {"gpus_per_node": 8, "num_nodes": 1}, "data": {"max_input_seq_length": 256},
              "policy": {"model_name": "meta-llama/Meta-Llama-3-8B", "max_total_sequence_length": 1024}}
    raw, _, notes = importer("nemo-rl")(yaml.safe_dump(config), "h100-sxm")
    assert (raw["prompt_len"], raw["gen_len"]) == (256, 768)
    assert any("responses end at 768 tokens" in n for n in notes)
    del config["data"]  # the prompts' cap defaults to the whole sequence: no room for a response
    with pytest.raises(ConfigError, match=r"data.max_input_seq_length is not given"):
        importer("nemo-rl")(yaml.safe_dump(config), "h100-sxm")


def test_nemo_rl_exports_generation_on_whole_nodes_as_grpo_setup_asserts():
    exp = _rule_reward(EXAMPLES / "grpo-qwen2.5-7b-16xh100.yaml", old_logprobs="recompute")
    node = {"mesh": "8-15", "dp": 8, "tp": 1, "pp": 1, "micro_batches": 8}
    plan = _plan({"actor_gen": {"mesh": "0-7", "dp": 4, "tp": 2, "pp": 1, "micro_batches": 1},
                  "actor_inf": node, "ref_inf": node, "actor_train": node})
    export = make_export("nemo-rl", exp, plan)
    colocated = yaml.safe_load(export.files["config.yaml"])["policy"]["generation"]["colocated"]
    assert colocated == {"enabled": False, "resources": {"gpus_per_node": 8, "num_nodes": 1}}
    back = importer("nemo-rl")(export.files["config.yaml"], "h100-sxm")[1]
    assert str(back["actor_gen"].mesh) == "8-15" and str(back["actor_train"].mesh) == "0-7"  # policy first


# ---- python -m estimator.predict --from ----------------------------------------------------------

TINY_PPO = EXAMPLES / "ppo-tiny-2xcpu.yaml"
TINY_GRPO = EXAMPLES / "grpo-tiny-2xcpu.yaml"


def _tiny(framework: str):
    """A tiny experiment the framework takes and a plan for it on 2 CPU devices."""
    exp = load_experiment(TINY_PPO) if framework == "realhf" else _rule_reward(TINY_GRPO, old_logprobs="recompute")
    calls = {c: {"mesh": "0-1", "dp": 2, "tp": 1, "pp": 1, "micro_batches": 1} for c in exp.workflow.call_names}
    return exp, _plan(calls)


@pytest.mark.parametrize("framework", ["realhf", "areal", "nemo-rl"])
def test_predict_from_a_config_and_an_unknown_key_exits_2_naming_it(framework, capsys, tmp_path):
    exp, plan = _tiny(framework)
    export = make_export(framework, exp, plan)
    config = tmp_path / FILES[framework]
    config.write_text(export.files[FILES[framework]])
    assert predict_main(["--from", framework, str(config), "--profile", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["imported"]["plan"] == json.loads(export.plan.to_json()) and out["iteration_s"] > 0
    assert out["imported"]["framework"] == framework
    extra, key = {"realhf": ("ppo.gen.top_p=0.9\n", "ppo.gen.top_p"),
                  "areal": ("saver:\n  freq_epochs: 1\n", "saver.freq_epochs"),
                  "nemo-rl": ("logger:\n  wandb_enabled: true\n", "logger.wandb_enabled")}[framework]
    config.write_text(export.files[FILES[framework]] + extra)
    assert predict_main(["--from", framework, str(config), "--profile", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"['{key}'] are not ones the importer reads" in err and err.count("\n") == 1


def test_predict_from_with_search_names_the_search_command(capsys, tmp_path):
    config = tmp_path / "overrides.txt"
    config.write_text("")
    assert predict_main(["--from", "realhf", str(config), "--search", "--profile", "cpu"]) == 2
    assert f"python -m search --from realhf {config} --profile cpu" in capsys.readouterr().err
    assert predict_main(["--from", "real-hf", str(config), "--search"]) == 2
    assert "did you mean 'realhf'" in capsys.readouterr().err


# ---- python -m search --from ---------------------------------------------------------------------

def test_search_from_a_config_compares_it_with_the_best_plans(capsys, tmp_path):
    import search.__main__ as cli

    exp, plan = _tiny("realhf")
    # a slow config: every call on both devices, two micro-batches where one would do
    slow = _plan({c: lay.to_dict() | {"micro_batches": 2} for c, lay in plan.layouts.items()})
    config = tmp_path / "overrides.txt"
    config.write_text(make_export("realhf", exp, slow).files["overrides.txt"])
    args = ["--from", "realhf", str(config), "--profile", "cpu", "--max-evals", "60", "--chains", "1"]
    assert cli.main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    imported, best = out["imported"], out["framework"]
    assert imported["framework"] == best["framework"] == "realhf" and imported["fits"]
    # the config is a start and a candidate: neither best plan is predicted slower than it
    assert out["iteration_s"] <= imported["iteration_s"] and best["iteration_s"] <= imported["iteration_s"]
    assert out["speedups"]["overall"] == pytest.approx(imported["iteration_s"] / out["iteration_s"])
    assert out["speedups"]["framework"] == pytest.approx(imported["iteration_s"] / best["iteration_s"])
    (config_candidate,) = [c for c in out["candidates"] if c["source"] == "imported realhf config"]
    assert config_candidate["simulator_s"] == pytest.approx(imported["iteration_s"])
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"imported realhf config {config}: predicted {imported['iteration_s']:.3f} s")
    assert "best plan overall" in text and "best plan realhf runs" in text


def test_search_from_checks_its_input_before_searching(capsys, monkeypatch):
    import search.__main__ as cli

    def refuse(*args, **kwargs):
        raise AssertionError("the search started before the input was checked")

    monkeypatch.setattr(cli, "run_search", refuse)
    assert cli.main(["--from", "nemo_rl", "x.yaml"]) == 2
    assert "did you mean 'nemo-rl'" in capsys.readouterr().err
    assert cli.main(["--from", "areal"]) == 2
    assert "--from areal needs the config file" in capsys.readouterr().err


@pytest.mark.parametrize("framework", ["areal", "nemo-rl"])
def test_gen_mean_gives_back_the_exports_prediction_of_a_length_distribution(framework, capsys, tmp_path):
    """A config keeps only the response cap; with --gen-mean the imported experiment draws the
    lengths the exported one did ({max, mean}, same seed), so the prediction is the export's."""
    from estimator.export import predict_export
    from estimator.profile.profiles import load_profile

    raw = yaml.safe_load(TINY_GRPO.read_text())
    raw = {k: v for k, v in raw.items() if k != "seed"} | {"old_logprobs": "recompute",
                                                           "gen_len": {"max": 32, "mean": 8}}
    raw["models"] = raw["models"] | {"reward": "rule"}
    exp = experiment_from_dict(raw)
    plan = _tiny(framework)[1]
    export = make_export(framework, exp, plan)
    record = predict_export(export, exp, load_profile("cpu"))
    config = tmp_path / "config.yaml"
    config.write_text(export.files["config.yaml"])
    assert predict_main(["--from", framework, str(config), "--profile", "cpu", "--gen-mean", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["imported"]["experiment"]["gen_len"] == {"max": 32, "mean": 8.0}
    assert out["iteration_s"] == pytest.approx(record["projected_predicted_s"], rel=1e-9)
    assert predict_main(["--from", framework, str(config), "--profile", "cpu", "--json"]) == 0
    at_cap = json.loads(capsys.readouterr().out)["iteration_s"]
    assert at_cap > out["iteration_s"]  # every response at 32 tokens takes longer than a mean of 8
    assert predict_main([str(TINY_PPO), "--gen-mean", "8"]) == 2
    assert "--gen-mean goes with --from" in capsys.readouterr().err


@pytest.mark.parametrize("framework", ["areal", "nemo-rl"])
def test_a_fully_sharded_trainer_is_priced_as_fsdp_both_ways(framework, capsys, tmp_path):
    """NeMo-RL and AReaL train a fully sharded layout with DTensor/FSDP: the export prices its
    projection for fsdp-vllm where the experiment is on megatron-vllm, and the config read back
    predicts the same (its trainer names the stack; --stack overrides it)."""
    import dataclasses

    from estimator.export import predict_export
    from estimator.predict import predict
    from estimator.profile.pricing import experiment_profile

    exp = load_experiment(GRPO)
    plan = Plan.load(str(CASES["grpo-llama3-8b-8xh100"][1]))
    plan = Plan({c: dataclasses.replace(lay, shard="full", pp=1, dp=lay.dp * lay.pp) if c == "actor_train" else lay
                 for c, lay in plan.layouts.items()})
    export = make_export(framework, exp, plan)
    assert export.stack == "fsdp-vllm"
    profile = experiment_profile(exp)
    record = predict_export(export, exp, profile)
    assert (record["stack"], record["projected_stack"], record["framework_stack"]) == ("megatron-vllm", "fsdp-vllm",
                                                                                     "fsdp-vllm")
    on_megatron = predict(exp, export.plan, profile)[2]["iteration_s"]
    assert record["projected_predicted_s"] != pytest.approx(on_megatron, rel=1e-6)
    config = tmp_path / "config.yaml"
    config.write_text(export.files["config.yaml"])
    assert predict_main(["--from", framework, str(config), "--gen-mean", "795", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stack"] == "fsdp-vllm" and out["imported"]["experiment"]["cluster"]["stack"] == "fsdp-vllm"
    assert out["iteration_s"] == pytest.approx(record["projected_predicted_s"], rel=1e-9)
    predict_main(["--from", framework, str(config), "--gen-mean", "795", "--stack", "megatron-vllm", "--json"])
    assert json.loads(capsys.readouterr().out)["iteration_s"] == pytest.approx(on_megatron, rel=1e-9)
