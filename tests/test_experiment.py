"""Experiment YAML files: the examples load; every kind of mistake names its key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from estimator.base.errors import ConfigError
from estimator.describe import main as describe_main
from estimator.spec.experiment import load_experiment
from tests.conftest import EXAMPLES, ROOT

GOOD = {
    "algorithm": "ppo",
    "models": {"actor": "tiny-2l-128h", "critic": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "tiny-2l-128h"},
    "batch_size": 8, "prompt_len": 16, "gen_len": 16, "ppo_minibatches": 2,
    "cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu"},
}


def _write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_load(path):
    exp = load_experiment(path)
    assert exp.workflow.call_names
    assert set(exp.models) == set(exp.workflow.roles)


def test_required_examples_exist():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"ppo-llama2-7b-8xh100.yaml", "ppo-llama2-70b-128xh100.yaml", "grpo-qwen2.5-7b-16xh100.yaml",
            "dpo-llama3-8b-8xa100.yaml", "ppo-tiny-2xcpu.yaml", "grpo-tiny-2xcpu.yaml"} <= names
    assert load_experiment(EXAMPLES / "ppo-llama2-70b-128xh100.yaml").cluster.num_devices == 128


def test_value_roles_get_value_heads(tmp_path):
    exp = load_experiment(_write(tmp_path, GOOD))
    assert exp.models["critic"].head == "value" and exp.models["reward"].head == "value"
    assert exp.models["actor"].head == "lm"


@pytest.mark.parametrize("change,message", [
    ({"batchsize": 8}, "unknown key 'batchsize' (did you mean 'batch_size'?)"),
    ({"algorithm": "ppo3"}, "algorithm='ppo3' must be one of"),
    ({"models": {**GOOD["models"], "actor": "llama9-7b"}}, "models.actor: unknown model preset 'llama9-7b'"),
    ({"models": {**GOOD["models"], "ref": "tiny-2l-128"}},
     "models.ref: unknown model preset 'tiny-2l-128' (did you mean 'tiny-2l-128h'?)"),
    ({"models": {**GOOD["models"], "critc": "tiny-2l-128h"}}, "unknown key 'critc' (did you mean 'critic'?)"),
    ({"models": {"actor": "tiny-2l-128h"}}, "missing ['critic', 'ref', 'reward']"),
    ({"batch_size": "eight"}, "batch_size='eight' must be an integer"),
    ({"batch_size": 0}, "batch_size=0 must be at least 1"),
    ({"gen_len": 2.5}, "gen_len=2.5 must be an integer"),
    ({"ppo_minibatches": 3}, "ppo_minibatches=3 must divide batch_size=8"),
    ({"group_size": 4}, "group_size=4 applies to grpo only"),
    ({"cluster": {"nodes": 1, "devices_per_node": 2}}, "cluster is missing key(s) device"),
    ({"cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu", "gpus": 2}}, "cluster: unknown key 'gpus'"),
    ({"cluster": {"nodes": -1, "devices_per_node": 2, "device": "cpu"}}, "cluster.nodes=-1 must be at least 1"),
    ({"hyperparams": {"lr": -1.0}}, "hyperparams.lr=-1.0 must be positive"),
    ({"hyperparams": {"kl": 0.1}}, "unknown key 'kl'"),
    ({"seed": -3}, "seed=-3 must be a non-negative integer"),
    ({"prompts": "nowhere.jsonl"}, "prompts='nowhere.jsonl'"),
])
def test_loader_errors_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(tmp_path, {**GOOD, **change}))
    assert message in str(err.value)
    assert str(tmp_path / "exp.yaml") in str(err.value)


def test_loader_missing_keys_and_bad_yaml(tmp_path):
    data = {k: v for k, v in GOOD.items() if k != "gen_len"}
    with pytest.raises(ConfigError, match="missing required key\\(s\\) gen_len"):
        load_experiment(_write(tmp_path, data))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(_write(tmp_path, "algorithm: [ppo\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="does-not-exist.yaml"):
        load_experiment(tmp_path / "does-not-exist.yaml")


def test_model_from_hf_config_path_relative_to_experiment(tmp_path):
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}))
    data = {**GOOD, "algorithm": "sft", "models": {"actor": "mymodel/config.json"}}
    exp = load_experiment(_write(tmp_path, data))
    assert exp.models["actor"].hidden == 64 and exp.models["actor"].kv_heads == 2


def test_describe_json_reports_actor_params_and_topological_calls(capsys):
    assert describe_main([str(EXAMPLES / "ppo-llama2-7b-8xh100.yaml"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["models"]["actor"]["params"] == pytest.approx(6.74e9, rel=5e-3)
    names = [c["name"] for c in info["calls"]]
    assert len(names) == 6 and names[0] == "actor_gen" and set(names[-2:]) == {"actor_train", "critic_train"}
    seen = set()
    for c in info["calls"]:
        assert set(c["after"]) <= seen
        seen.add(c["name"])
        assert c["flops"] > 0 and c["layouts"] > 0 and c["kind"] and c["role"]
    assert info["cluster"]["devices"] == 8


def test_describe_table(capsys):
    assert describe_main([str(EXAMPLES / "grpo-qwen2.5-7b-16xh100.yaml")]) == 0
    out = capsys.readouterr().out
    assert "actor_gen" in out and "qwen2.5-7b" in out and "version edges" in out


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "estimator.describe", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_misspelled_key_is_one_line_exit_2(tmp_path):
    r = _cli(str(_write(tmp_path, {**GOOD, "gen_lenght": 4})))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "gen_lenght" in r.stderr


def test_cli_unknown_preset_exit_2(tmp_path):
    r = _cli(str(_write(tmp_path, {**GOOD, "models": {**GOOD["models"], "ref": "gpt5"}})))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "'gpt5'" in r.stderr


def test_cli_plan_tp_not_dividing_heads_exit_2(tmp_path):
    exp = _write(tmp_path, GOOD)
    layouts = {c: {"mesh": "0", "dp": 1, "tp": 1, "pp": 1} for c in load_experiment(exp).workflow.call_names}
    layouts["ref_inf"] = {"mesh": "0-1", "dp": 1, "tp": 2, "pp": 1}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"calls": layouts}))
    assert _cli(str(exp), "--plan", str(plan)).returncode == 0
    tiny3 = {**GOOD, "models": {r: "tiny-4l-256h" for r in GOOD["models"]},
             "cluster": {"nodes": 1, "devices_per_node": 4, "device": "cpu"}}
    layouts["ref_inf"] = {"mesh": "0-2", "dp": 1, "tp": 3, "pp": 1}
    plan.write_text(json.dumps({"calls": layouts}))
    r = _cli(str(_write(tmp_path, tiny3, "tiny3.yaml")), "--plan", str(plan))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "call ref_inf: tp=3 must divide heads=8" in r.stderr


def test_learned_positions_bound_prompt_and_generation(tmp_path):
    data = GOOD | {"models": {r: "tiny-gpt-2l-128h" for r in ("actor", "critic", "ref", "reward")},
                   "prompt_len": 40, "gen_len": 24}
    assert load_experiment(_write(tmp_path, data)).models["actor"].max_positions == 64
    with pytest.raises(ConfigError, match=r"models.actor: prompt_len \+ gen_len = 65 tokens exceeds model "
                                          r"'tiny-gpt-2l-128h''s max_positions=64"):
        load_experiment(_write(tmp_path, data | {"gen_len": 25}, "long.yaml"))


RULE = {**GOOD, "algorithm": "grpo", "group_size": 2,
        "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "rule"}}


def test_a_verifier_reward_holds_no_model_and_recompute_adds_actor_inf(tmp_path):
    exp = load_experiment(_write(tmp_path, {**RULE, "reward_s_per_sample": 0.5, "old_logprobs": "recompute"}))
    assert exp.verifier and exp.reward_s_per_sample == 0.5 and set(exp.models) == {"actor", "ref"}
    assert set(exp.models) == set(exp.workflow.roles)
    assert exp.workflow.call_names == ("actor_gen", "actor_inf", "ref_inf", "actor_train")
    plain = load_experiment(_write(tmp_path, RULE))
    assert plain.reward_s_per_sample == 0.0 and plain.params.old_logprobs == "from_generation"
    assert "actor_inf" not in plain.workflow and plain.workflow.producer("old_logp") == "actor_gen"


@pytest.mark.parametrize("change,message", [
    ({"reward_s_per_sample": -0.1}, "reward_s_per_sample=-0.1 must be at least 0"),
    ({"reward_s_per_sample": ".5"}, "reward_s_per_sample='.5' must be a number"),
    ({"reward_s_per_sample": 1e9}, "reward_s_per_sample=1000000000.0 exceeds the limit 3600"),
    ({"old_logprobs": "bogus"}, "old_logprobs='bogus' must be one of from_generation, recompute"),
    ({"models": {**RULE["models"], "actor": "rule"}}, "models.actor='rule': only the reward role may be a rule"),
    ({"models": {**RULE["models"], "reward": "tiny-2l-128h"}, "reward_s_per_sample": 0.1},
     "reward_s_per_sample applies to a verifier reward only: give models.reward: rule"),
    ({"algorithm": "dpo", "group_size": 1, "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h"},
      "old_logprobs": "recompute"}, "old_logprobs='recompute' applies to algorithms that generate (ppo, grpo, remax), "
                                    "not to dpo"),
    ({"algorithm": "sft", "group_size": 1, "models": {"actor": "tiny-2l-128h"}, "old_logprobs": "from_generation"},
     "old_logprobs='from_generation' applies to algorithms that generate"),
    ({"algorithm": "rw", "group_size": 1, "models": {"reward": "rule"}},
     "models.reward='rule': a verifier scores generated responses, so it applies to ppo, grpo, remax, not to rw"),
])
def test_verifier_and_old_logprobs_errors_name_the_key_and_rule(tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(tmp_path, {**RULE, **change}))
    assert message in str(err.value)


def test_an_experiment_refuses_verifier_seconds_without_a_verifier():
    import dataclasses

    exp = load_experiment(EXAMPLES / "grpo-tiny-2xcpu.yaml")
    with pytest.raises(ConfigError, match="reward_s_per_sample=0.5 applies to a verifier reward only"):
        dataclasses.replace(exp, reward_s_per_sample=0.5)
    with pytest.raises(ConfigError, match=r"missing \['reward'\]"):  # a model reward needs its model
        dataclasses.replace(exp, models={r: m for r, m in exp.models.items() if r != "reward"})


def test_describe_names_the_verifier_and_the_old_logprobs(tmp_path, capsys):
    path = _write(tmp_path, {**RULE, "reward_s_per_sample": 0.25, "old_logprobs": "recompute"})
    assert describe_main([str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verifier"] == {"reward_s_per_sample": 0.25} and info["old_logprobs"] == "recompute"
    assert "reward" not in info["models"] and [c["name"] for c in info["calls"]][1] == "actor_inf"
    assert describe_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "rule (verifier, 0.25 s per sample)" in out and "old log-probs: recompute" in out


def test_cli_bad_old_logprobs_is_one_line_exit_2(tmp_path):
    r = _cli(str(_write(tmp_path, {**RULE, "old_logprobs": "bogus"})))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "old_logprobs='bogus'" in r.stderr
