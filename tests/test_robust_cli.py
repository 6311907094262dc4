"""Hostile input through describe and predict: every case once a hang, a traceback or a silent
exit 0 now exits 2 with one ``error:`` line naming the key or file (or, where the input is
valid, answers)."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from estimator.describe import main as describe_main
from estimator.predict import main as predict_main
from estimator.spec.cluster import Cluster
from estimator.spec.models import PRESETS
from estimator.spec.plan import count_layouts, enumerate_layouts
from estimator.spec.workflow import WorkflowParams, build
from tests.conftest import EXAMPLES

TINY = {
    "algorithm": "ppo",
    "models": {"actor": "tiny-2l-128h", "critic": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "tiny-2l-128h"},
    "batch_size": 8, "prompt_len": 16, "gen_len": 16, "ppo_minibatches": 2,
    "cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu"},
}
PLAN = str(EXAMPLES / "plans" / "ppo-tiny-2xcpu" / "tp2.json")
HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 128,
      "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}


def _exp(tmp_path, change: dict | None = None, text: str | None = None, cluster: dict | None = None) -> str:
    data = {**TINY, **(change or {})}
    if cluster:
        data["cluster"] = {**TINY["cluster"], **cluster}
    path = tmp_path / "exp.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return str(path)


def _fails(capsys, main, argv, *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines and all(ln.startswith("error: ") for ln in lines), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


# ---- once hangs ----------------------------------------------------------------------------


@pytest.mark.parametrize("cluster, key", [
    ({"nodes": 10**12}, "cluster.nodes"),
    ({"nodes": 2**70}, "cluster.nodes"),
    ({"devices_per_node": 10**12}, "cluster.devices_per_node"),
    ({"nodes": 4096, "devices_per_node": 64}, "262,144 devices exceeds the limit 65,536"),
])
def test_huge_clusters_are_refused_at_once(tmp_path, capsys, cluster, key):
    _fails(capsys, describe_main, [_exp(tmp_path, cluster=cluster)], key, "exceeds the limit")


def test_alias_bomb_under_name_is_refused(tmp_path, capsys):
    # name: a list of 10 lists of ... 10^9 strings once expanded, in 9 anchors
    bomb = "[&a0 [a, a, a, a, a, a, a, a, a, a]" + "".join(
        f", &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)) + "]"
    text = "".join(f"{k}: {json.dumps(v)}\n" for k, v in TINY.items()) + f"name: {bomb}\n"
    _fails(capsys, describe_main, [_exp(tmp_path, text=text)], "once YAML aliases are expanded")


def test_predict_iterations_are_bounded(tmp_path, capsys):
    _fails(capsys, predict_main, [_exp(tmp_path), "--iterations", "100000"], "--iterations=100000", "limit 1,000")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(nodes=st.integers(1, 5), dpn=st.sampled_from([1, 2, 3, 4, 6, 8]), batch=st.sampled_from([4, 6, 8, 12]),
       minibatches=st.sampled_from([1, 2]))
def test_layouts_are_counted_exactly_without_listing(nodes, dpn, batch, minibatches):
    cluster = Cluster(nodes, dpn, "cpu")
    assert cluster.num_meshes() == len(cluster.meshes())
    wf = build("ppo", WorkflowParams(batch_size=batch, prompt_len=8, gen_len=8, ppo_minibatches=minibatches))
    model = PRESETS["tiny-2l-128h"]
    for call in wf.calls:
        for uneven in (False, True):
            listed = enumerate_layouts(call, model, cluster, uneven)
            assert count_layouts(call, model, cluster, uneven) == len(listed)


def test_describe_counts_layouts_of_a_4096_gpu_cluster(tmp_path, capsys):
    text = (EXAMPLES / "ppo-llama2-70b-128xh100.yaml").read_text().replace("nodes: 16", "nodes: 512")
    path = tmp_path / "big.yaml"
    path.write_text(text)
    assert describe_main([str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cluster"]["devices"] == 4096
    assert info["cluster"]["meshes"] == 4096 + 2048 + 1024 + 512 * 513 // 2  # slices of 1, 2, 4 + node runs
    assert info["cluster"]["runs"] == 4096 * 4097 // 2  # every contiguous run


# ---- once tracebacks -----------------------------------------------------------------------


def test_non_utf8_files_are_named(tmp_path, capsys):
    bad = b"\xff\xfe\x00garbage"
    (tmp_path / "bin.yaml").write_bytes(bad)
    _fails(capsys, describe_main, [str(tmp_path / "bin.yaml")], "bin.yaml", "not UTF-8", "offset 0")
    (tmp_path / "plan.json").write_bytes(bad)
    _fails(capsys, describe_main, [_exp(tmp_path), "--plan", str(tmp_path / "plan.json")], "plan.json", "not UTF-8")
    (tmp_path / "prof.json").write_bytes(bad)
    _fails(capsys, predict_main, [_exp(tmp_path), "--profile", str(tmp_path / "prof.json")], "prof.json", "not UTF-8")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_bytes(bad)
    _fails(capsys, describe_main, [_exp(tmp_path, {"models": {**TINY["models"], "actor": "m/config.json"}})],
           "models.actor", "config.json", "not UTF-8")


def test_deep_nesting_and_a_5000_digit_mesh(tmp_path, capsys):
    _fails(capsys, describe_main, [_exp(tmp_path, text="name: " + "[" * 3000 + "]" * 3000)], "nested deeper")
    plan = json.loads(open(PLAN).read())
    plan["calls"]["actor_gen"]["mesh"] = "0-" + "9" * 5000
    (tmp_path / "p.json").write_text(json.dumps(plan))
    _fails(capsys, describe_main, [_exp(tmp_path), "--plan", str(tmp_path / "p.json")], "calls.actor_gen.mesh")


def test_huge_generation_length_is_refused(tmp_path, capsys):
    _fails(capsys, predict_main, [_exp(tmp_path, {"gen_len": 10**12})], "gen_len=1000000000000", "exceeds the limit")
    _fails(capsys, predict_main, [_exp(tmp_path, {"gen_len": 2**20})], "prompt_len + gen_len")


@pytest.mark.parametrize("change, needle", [
    ({"rope_theta": "abc"}, "rope_theta='abc' must be a number"),
    ({"rope_theta": None}, "rope_theta=None must be a number"),
    ({"rms_norm_eps": []}, "rms_norm_eps=[] must be a number"),
    ({"architectures": 5}, "architectures=5 must be a list"),
    ({"architectures": [[]]}, "architectures=[[]] must be a list of class names"),
    ({"model_type": [], "architectures": []}, "model_type=[] must be a string"),
    ({"hidden_size": 10**9}, "hidden=1000000000 exceeds the limit"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes' must be true or false"),
])
def test_bad_hf_config_values_are_named(tmp_path, capsys, change, needle):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**HF, **change}))
    _fails(capsys, describe_main, [_exp(tmp_path, {"models": {**TINY["models"], "actor": "m/config.json"}})],
           "models.actor", needle)


def test_a_directory_named_config_json_and_a_nul_byte(tmp_path, capsys):
    (tmp_path / "m" / "config.json").mkdir(parents=True)
    _fails(capsys, describe_main, [_exp(tmp_path, {"models": {**TINY["models"], "actor": "m/config.json"}})],
           "models.actor", "is a directory")
    _fails(capsys, describe_main, [str(tmp_path / "a\0b.yaml")], "NUL byte")
    _fails(capsys, describe_main, [_exp(tmp_path, {"models": {**TINY["models"], "actor": "m\0/config.json"}})],
           "NUL byte")


def test_predict_without_plan_when_no_symmetric_plan_exists(tmp_path, capsys):
    exp = _exp(tmp_path, cluster={"devices_per_node": 16})
    assert describe_main([exp]) == 0
    capsys.readouterr()
    _fails(capsys, predict_main, [exp], "no whole-cluster layout is valid", "--plan")


# ---- once a silent exit 0 ------------------------------------------------------------------


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", ["lr", "temperature", "kl_coef"])
def test_non_finite_hyperparams(tmp_path, capsys, key, value):
    text = yaml.safe_dump(TINY) + f"hyperparams: {{{key}: {value}}}\n"
    _fails(capsys, describe_main, [_exp(tmp_path, text=text)], f"hyperparams.{key}=")


@pytest.mark.parametrize("content, needle", [
    ("this is not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2, 3]", "the top level must be a mapping"),
    ('{"format": "rlhf-plan/profile-v1"}', "missing key(s)"),
])
def test_cluster_device_file_is_loaded_and_checked(tmp_path, capsys, content, needle):
    (tmp_path / "dev.json").write_text(content)
    exp = _exp(tmp_path, cluster={"device": "dev.json"})
    _fails(capsys, describe_main, [exp], "cluster.device", "dev.json", needle)
    _fails(capsys, predict_main, [exp], "cluster.device", needle)


def test_unknown_or_empty_cluster_device(tmp_path, capsys):
    _fails(capsys, describe_main, [_exp(tmp_path, cluster={"device": "h100"})], "cluster.device", "unknown hardware")
    _fails(capsys, describe_main, [_exp(tmp_path, cluster={"device": ""})], "cluster.device=''")
    _fails(capsys, describe_main, [_exp(tmp_path, cluster={"device": "nowhere.json"})], "cluster.device",
           "does not exist")


def test_duplicate_yaml_key(tmp_path, capsys):
    text = yaml.safe_dump(TINY) + "batch_size: 16\n"
    _fails(capsys, describe_main, [_exp(tmp_path, text=text)], "duplicate key 'batch_size'")


def test_empty_plan_and_profile_are_errors(tmp_path, capsys):
    exp = _exp(tmp_path)
    _fails(capsys, describe_main, [exp, "--plan", ""], "plan file: the path is empty")
    _fails(capsys, predict_main, [exp, "--plan", ""], "plan file: the path is empty")
    _fails(capsys, predict_main, [exp, "--profile", ""], "--profile", "name is empty")


# ---- output paths --------------------------------------------------------------------------


def test_predict_trace_targets_are_checked_before_simulating(tmp_path, capsys):
    exp = _exp(tmp_path)
    _fails(capsys, predict_main, [exp, "--trace", str(tmp_path)], "--trace", "is a directory")
    _fails(capsys, predict_main, [exp, "--trace", str(tmp_path / "none" / "t.json")], "does not exist")
    os.mkfifo(tmp_path / "fifo")
    _fails(capsys, predict_main, [exp, "--trace", str(tmp_path / "fifo")], "FIFO")
    assert (tmp_path / "fifo").is_fifo()
    real = tmp_path / "real.json"
    real.write_text("{}")
    (tmp_path / "link.json").symlink_to(real)
    assert predict_main([exp, "--plan", PLAN, "--trace", str(tmp_path / "link.json"), "--json"]) == 0
    assert (tmp_path / "link.json").is_symlink() and "traceEvents" in json.loads(real.read_text())


# ---- found by fuzzing ----------------------------------------------------------------------


def test_an_over_long_profile_name_is_named_not_a_traceback(tmp_path, capsys):
    _fails(capsys, describe_main, [_exp(tmp_path, cluster={"device": "x" * 5000})], "cluster.device",
           "unknown hardware profile")
    _fails(capsys, describe_main, [_exp(tmp_path, {"models": {**TINY["models"], "actor": "x" * 5000 + ".json"}})],
           "models.actor", "File name too long")


def test_profile_numbers_have_upper_bounds(tmp_path, capsys):
    from estimator.profile.profiles import PROFILE_DIR

    prof = json.loads((PROFILE_DIR / "cpu.json").read_text())
    prof["compute"]["launch"]["overhead_s"] = 2**70
    (tmp_path / "p.json").write_text(json.dumps(prof))
    _fails(capsys, predict_main, [_exp(tmp_path), "--profile", str(tmp_path / "p.json")], "--profile",
           "compute.launch.overhead_s=1180591620717411303424 exceeds the limit 1")
    prof = json.loads((PROFILE_DIR / "cpu.json").read_text())
    prof["compute"]["efficiency"]["points"][0][1] = True
    (tmp_path / "p.json").write_text(json.dumps(prof))
    _fails(capsys, predict_main, [_exp(tmp_path), "--profile", str(tmp_path / "p.json")], "points", "must be numbers")


def test_a_non_integer_kv_head_count_is_not_read_as_the_default(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**HF, "num_key_value_heads": ""}))
    _fails(capsys, describe_main, [_exp(tmp_path, {"models": {**TINY["models"], "actor": "m/config.json"}})],
           "kv_heads=''")
