"""Seeded fuzzing of the front door: mutated example experiments, plans, profiles and model
configs, and hostile output paths, through each CLI's ``main(argv)`` in-process.

Every case must exit 0, 1 or 2 — 0 (or, for ``executor.run``, reaching the point where it
would start its workers) only for input that may be valid, 2 with ``error:`` lines naming the
offending key or file otherwise — print no traceback and answer within a few seconds.
Mutations: a deleted key, a value replaced by a wrong type or an extreme or non-finite number,
binary bytes, deep nesting, an alias bomb, a duplicate key, a wrong top-level type.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from estimator.describe import main as describe_main
from estimator.predict import main as predict_main
from tests.conftest import EXAMPLES, ROOT

EXPERIMENTS = sorted(EXAMPLES.glob("*.yaml"))
TINY = [p for p in EXPERIMENTS if "tiny" in p.name]
PLANS = sorted((EXAMPLES / "plans").glob("*/*.json"))
PROFILES = sorted((ROOT / "calibration" / "profiles").glob("*.json"))
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2,
             "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 256, "tie_word_embeddings": False, "attention_bias": False, "rope_theta": 10000.0,
             "rms_norm_eps": 1e-05, "hidden_act": "silu"}
# Values no key of any of these documents accepts (in JSON the non-finite ones fail to parse).
BAD_VALUES = [math.nan, math.inf, -math.inf, -1, 2**70, -1e308, "", [], {}, True, "\x00", "x" * 5000, [[1]]]
# Keys whose value is free text, or optional so that null means absent: any value may be valid.
FREE = {"experiment": {"name"}, "profile": {"name", "device", "date", "notes", "cite", "command", "software"},
        "plan": set(), "model config": {"hidden_act", "architectures", "model_type",  # either names the model
                                        "tie_word_embeddings", "attention_bias"}}  # True is valid too
NULLABLE = {"experiment": {"prompts"}, "profile": set(), "plan": set(), "model config": {"num_key_value_heads"}}
OPTIONAL = {"experiment": {"ppo_minibatches", "group_size", "seed", "prompts", "hyperparams", "name", "lr",
                           "kl_coef", "clip_eps", "value_clip", "gamma", "lam", "dpo_beta", "temperature",
                           "old_logprobs", "reward_s_per_sample", "kv_fraction", "group_corr", "p99", "sigma"},
            "profile": {"notes", "cite", "command", "name", "compose", "dtype", "executor", "grad_overhead_s",
                        "backward_overhead_s", "raw"},
            "plan": {"format", "micro_batches", "recompute", "max_concurrency", "max_tokens_per_micro_batch"},
            "model config": {"num_key_value_heads", "tie_word_embeddings", "attention_bias", "rope_theta",
                             "rms_norm_eps", "hidden_act", "architectures", "model_type"}}


class WouldStart(Exception):
    """Raised instead of starting executor workers: the input passed every check."""


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path (tuples of keys and list indices) of a parsed document."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    doc = json.loads(json.dumps(doc))  # a deep copy
    node = doc
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


RATES = ("flops_per_s", "bytes_per_s", "busbw_bytes_per_s")


def _optional_link_part(doc: Any, path: tuple) -> bool:
    """A collective entry's curve of one group size may go while another remains, and its curves
    while it keeps a latency and bandwidth (estimator/profile/collectives.py)."""
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if len(path) > 1 and path[-2] == "curves":
        return len(parent) > 1
    return path[-1] == "curves" and "alpha_s" in parent


@st.composite
def mutations(draw, doc: Any, kind: str) -> tuple[str, Any, bool, str]:
    """(how, mutated document or raw text, whether it may still be valid, a word the error must name)."""
    paths = _paths(doc)
    hows = ["none", "delete", "replace", "replace", "nest", "top", "binary", "duplicate"]
    how = draw(st.sampled_from(hows + ["alias"] if kind == "experiment" else hows))
    if how == "none":  # the example itself: it must pass, or the harness proves nothing
        return how, doc, True, ""
    path = draw(st.sampled_from(paths))
    key = next((str(k) for k in reversed(path) if isinstance(k, str)), "")
    under_free = any(str(k) in FREE[kind] for k in path)
    if how == "delete" and isinstance(path[-1], str):
        valid = path[-1] in OPTIONAL[kind] or under_free or _optional_link_part(doc, path) if kind == "profile" \
            else path[-1] in OPTIONAL[kind] or under_free
        return how, _set(doc, path, None, delete=True), valid, key
    if how in ("replace", "delete"):
        value = draw(st.sampled_from(BAD_VALUES + [None]))
        valid = under_free or (value is None and key in NULLABLE[kind])
        # an efficiency curve may have a point at any positive size (it is flat beyond)
        valid = valid or (kind == "profile" and "points" in path and path[-1] == 0 and value == 2**70)
        # rates have no upper bound: a huge rate is how a synthetic profile makes a resource free
        valid = valid or (kind == "profile" and key in RATES and value == 2**70)
        return how, _set(doc, path, value), valid, key
    if how == "nest":
        deep: Any = 1
        for _ in range(draw(st.integers(70, 400))):
            deep = [deep]
        return how, _set(doc, path, deep), False, ""
    if how == "top":
        return how, draw(st.sampled_from([[doc], "text", 42, None if kind != "experiment" else [1]])), False, ""
    return how, doc, False, ""  # binary, duplicate and alias are applied to the text


def _text(doc: Any, how: str, yaml_doc: bool, draw_offset: int) -> bytes:
    if yaml_doc:
        text = yaml.safe_dump(doc, default_flow_style=None, allow_unicode=True) if not isinstance(doc, str) else doc
    else:
        text = json.dumps(doc, indent=1)
    if how == "duplicate" and isinstance(doc, dict) and doc:
        first = next(iter(doc))
        text = (text + f"{first}: 0\n") if yaml_doc else json.dumps({first: 0})[:-1] + ", " + text.lstrip()[1:]
    if how == "alias" and yaml_doc and isinstance(doc, dict):
        bomb = "[&a0 [a, a, a, a, a, a, a, a, a, a]" + "".join(
            f", &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)) + "]"
        text = text + f"zz_bomb: {bomb}\n"
    data = text.encode()
    if how == "binary":
        at = draw_offset % (len(data) + 1)
        data = data[:at] + b"\xff\x00\xfe" + data[at:]
    return data


@contextlib.contextmanager
def _captured() -> Iterator[io.StringIO]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        yield err


def _run(main, argv: list[str]) -> tuple[int, str, float]:
    start = time.monotonic()
    with _captured() as err:
        try:
            code = main(argv)
        except WouldStart:
            code = 0
    return code, err.getvalue(), time.monotonic() - start


def _check(code: int, err: str, elapsed: float, may_be_valid: bool, names: list[str], case: str) -> None:
    event(f"exit {code}")  # pytest --hypothesis-show-statistics prints the distribution
    assert "Traceback" not in err, f"{case}: {err}"
    if case.split()[1] == "none":
        assert code in (0, 1), f"{case}: an unmutated example failed: {err}"
    assert code in (0, 1, 2), f"{case}: exit {code}: {err}"
    if code == 0:
        assert may_be_valid, f"{case}: exit 0 for invalid input"
    if code == 2:
        assert err.startswith("error: "), f"{case}: {err}"
        assert any(n and n in err for n in names), f"{case}: the message names none of {names}: {err}"
    assert elapsed < 10.0, f"{case}: took {elapsed:.1f} s"


@pytest.fixture(autouse=True)
def _no_workers(monkeypatch):
    import executor.launch as launch_mod

    def refuse(*args, **kwargs):
        raise WouldStart

    monkeypatch.setattr(launch_mod, "launch", refuse)


FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(data=st.data(), source=st.sampled_from(EXPERIMENTS), offset=st.integers(0, 10**6),
       cli=st.sampled_from(["describe", "predict", "run"]))
def test_fuzzed_experiments(data, source, offset, cli):
    from executor.run import main as run_main

    doc = yaml.safe_load(source.read_text())
    how, mutated, valid, key = data.draw(mutations(doc, "experiment"))
    tiny = source in TINY
    if not tiny:
        cli = "describe"  # predicting or running the large examples takes longer than a case may
    plan = next((p for p in PLANS if p.parent.name == source.stem), None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exp.yaml"
        path.write_bytes(_text(mutated, how, True, offset))
        main, argv = {"describe": (describe_main, [str(path)]), "predict": (predict_main, [str(path), "--json"]),
                      "run": (run_main, [str(path), "--plan", str(plan)])}[cli]
        code, err, elapsed = _run(main, argv)
    _check(code, err, elapsed, valid, [key, "exp.yaml", "cluster", "models", "call"], f"{cli} {how} {source.name}")


@FUZZ
@given(data=st.data(), source=st.sampled_from(PLANS), offset=st.integers(0, 10**6),
       cli=st.sampled_from(["describe", "predict", "run"]))
def test_fuzzed_plans(data, source, offset, cli):
    from executor.run import main as run_main

    doc = json.loads(source.read_text())
    how, mutated, valid, key = data.draw(mutations(doc, "plan"))
    experiment = str(EXAMPLES / f"{source.parent.name}.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.json"
        path.write_bytes(_text(mutated, how, False, offset))
        main = {"describe": describe_main, "predict": predict_main, "run": run_main}[cli]
        code, err, elapsed = _run(main, [experiment, "--plan", str(path)])
    _check(code, err, elapsed, valid, [key, "plan.json", "call"], f"{cli} {how} {source}")


@FUZZ
@given(data=st.data(), source=st.sampled_from(PROFILES), offset=st.integers(0, 10**6),
       via=st.sampled_from(["--profile", "cluster.device"]))
def test_fuzzed_profiles(data, source, offset, via):
    doc = json.loads(source.read_text())
    how, mutated, valid, key = data.draw(mutations(doc, "profile"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prof.json"
        path.write_bytes(_text(mutated, how, False, offset))
        exp = Path(tmp) / "exp.yaml"
        exp.write_text((EXAMPLES / "ppo-tiny-2xcpu.yaml").read_text().replace("device: cpu", f"device: {path}"))
        if via == "--profile":
            code, err, elapsed = _run(predict_main, [str(EXAMPLES / "ppo-tiny-2xcpu.yaml"), "--profile", str(path)])
        else:
            code, err, elapsed = _run(describe_main, [str(exp)])
    _check(code, err, elapsed, valid, [key, "prof.json"], f"{via} {how} {source.name}")


@FUZZ
@given(data=st.data(), offset=st.integers(0, 10**6))
def test_fuzzed_model_configs(data, offset):
    how, mutated, valid, key = data.draw(mutations(HF_CONFIG, "model config"))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m").mkdir()
        (Path(tmp) / "m" / "config.json").write_bytes(_text(mutated, how, False, offset))
        exp = Path(tmp) / "exp.yaml"
        exp.write_text((EXAMPLES / "ppo-tiny-2xcpu.yaml").read_text().replace("actor: tiny-2l-128h",
                                                                                "actor: m/config.json"))
        code, err, elapsed = _run(describe_main, [str(exp)])
    _check(code, err, elapsed, valid, [key, "config.json", "models.actor"], f"model-config {how}")


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(target=st.sampled_from(["dir", "fifo", "missing", "empty", "nul", "link-to-dir", "link-to-fifo"]),
       flag=st.sampled_from(["--trace", "--timeline"]), cli=st.sampled_from(["predict", "run"]))
def test_hostile_output_paths(target, flag, cli):
    from executor.run import main as run_main

    if cli == "predict":
        flag = "--trace"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        os.mkfifo(t / "fifo")
        (t / "d").mkdir()
        (t / "link-to-dir").symlink_to(t / "d")
        (t / "link-to-fifo").symlink_to(t / "fifo")
        out = {"dir": str(t / "d"), "fifo": str(t / "fifo"), "missing": str(t / "no" / "x.json"), "empty": "",
               "nul": str(t / "a\0b"), "link-to-dir": str(t / "link-to-dir"),
               "link-to-fifo": str(t / "link-to-fifo")}[target]
        exp = str(EXAMPLES / "ppo-tiny-2xcpu.yaml")
        plan = str(EXAMPLES / "plans" / "ppo-tiny-2xcpu" / "dp2.json")
        main = predict_main if cli == "predict" else run_main
        code, err, elapsed = _run(main, [exp, "--plan", plan, flag, out])
        assert (t / "fifo").is_fifo() and (t / "d").is_dir() and (t / "link-to-fifo").is_symlink()
    _check(code, err, elapsed, False, [flag], f"{cli} {flag} {target}")
    assert code == 2
