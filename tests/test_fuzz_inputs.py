"""Seeded mutation fuzz of every input class the commands read, through each CLI's ``main(argv)``
in-process: experiment YAML (values and raw text), Hugging Face model configs, plan JSON,
profile JSON, timelines and Chrome traces (``analysis.plot``), and the command-line flags of
every command.

Every case is one mutation of a valid input, and says whether it is *known invalid* (it breaks
a documented rule: a count of 0, a character YAML refuses, a mesh beyond the cluster, an
unknown preset) or *may be valid*. The rules every case must keep:

- no traceback: the command returns 0, 1 or 2, or argparse exits 2;
- exit 0 (or 1) only when the input may be valid;
- exit 2 prints ``error:`` naming the offending key, flag or file;
- no hang (:data:`HANG_S`).

Where a command would start long work (executor workers, a search, a measurement, a what-if
sweep, drawing a figure) the input has passed every check: a sentinel stops it there and the
case counts as exit 0. The cases come from :class:`random.Random` with fixed seeds, so a
failure names a case that repeats. ``pytest -s`` prints the figures per class.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from estimator.base import rules
from estimator.base.errors import cli_guard
from estimator.profile.profiles import known_profiles
from estimator.spec.models import PRESETS
from estimator.spec.timeline import TIMELINE_FORMAT, Timeline
from tests.conftest import EXAMPLES, ROOT
from tests.test_fuzz import _paths  # every key path of a parsed document, lists cut at 3 items

SEED = 20250611
HANG_S = 10.0  # a case that takes longer is a hang (the slowest valid case takes well under 1 s)
EXPERIMENTS = sorted(EXAMPLES.glob("*.yaml"))
TINY = [p for p in EXPERIMENTS if "tiny" in p.name]
PLANS = sorted((EXAMPLES / "plans").glob("*/*.json"))
PROFILES = [ROOT / "calibration" / "profiles" / f"{n}.json" for n in ("cpu", "h100-sxm", "a100-vidur", "h200")]
VIDUR_NET = ROOT / "calibration" / "vidur" / "network" / "h100_dgx"
# (case class, cases): the figures the fuzz promises; at least 2,000 in all
COUNTS = {"experiment values": 560, "experiment text": 320, "model config": 160, "plan": 420, "profile": 400,
          "timeline": 300, "flags": 560}


class Accepted(Exception):
    """Raised where a command would start its long work: the input passed every check."""


@dataclass
class Case:
    label: str  # what was mutated, printed on failure
    main: str  # key of the command in the ``mains`` fixture
    argv: list[str]  # "{tmp}" stands for the case's directory
    files: dict[str, bytes] = field(default_factory=dict)  # written into the case's directory first
    bad: bool = True  # known invalid: only exit 2 is right
    names: tuple[str, ...] = ()  # an exit-2 message must contain one of these


# ---- mutation helpers ---------------------------------------------------------------------------

HOSTILE_CHARS = ["\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\x0e", "\x1b", "\x1f", "\x7f", "\ufffe", "\uffff"]
BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _set(doc: Any, path: tuple, value: Any = None, delete: bool = False, rename: str | None = None) -> Any:
    doc = json.loads(json.dumps(doc))  # a deep copy
    node = _get(doc, path[:-1])
    if delete:
        del node[path[-1]]
    elif rename is not None:
        node[rename] = node.pop(path[-1])
    else:
        node[path[-1]] = value
    return doc


def _typo(rng: random.Random, word: str) -> str:
    """``word`` with one letter dropped, doubled, swapped or changed."""
    i = rng.randrange(len(word))
    how = rng.randrange(4)
    if how == 0 and len(word) > 1:
        return word[:i] + word[i + 1:]
    if how == 1:
        return word[:i] + word[i] + word[i:]
    if how == 2 and i + 1 < len(word) and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + ("x" if word[i] != "x" else "y") + word[i + 1:]


def _keys(path: tuple) -> tuple[str, ...]:
    return tuple(str(k) for k in path if isinstance(k, str))


def _json_text_mutation(rng: random.Random, doc: Any) -> tuple[str, bytes]:
    """A raw-text mutation of ``doc`` written as JSON that makes it invalid JSON."""
    how = rng.choice(["control", "utf8", "truncate", "nan", "comma", "duplicate"])
    text = json.dumps(doc, indent=1)
    data = text.encode()
    if how == "control":  # JSON allows no raw control character, in a string or out of it
        at = rng.randrange(1, len(text) - 1)
        return how, (text[:at] + rng.choice(HOSTILE_CHARS[:9]) + text[at:]).encode()
    if how == "utf8":
        at = rng.randrange(len(data) + 1)
        return how, data[:at] + rng.choice(BAD_UTF8) + data[at:]
    if how == "truncate":
        return how, text.rstrip()[:rng.randrange(1, len(text.rstrip()))].encode()
    numbers = [p for p in _paths(doc) if isinstance(_get(doc, p), (int, float)) and not isinstance(_get(doc, p), bool)]
    if how == "nan" and numbers:  # a literal that is not a finite JSON number, in place of one
        marked = json.dumps(_set(doc, rng.choice(numbers), "__number__"), indent=1)
        literal = rng.choice(["NaN", "Infinity", "-Infinity", "1e999"])
        return how, marked.replace('"__number__"', literal).encode()
    if how == "duplicate" and isinstance(doc, dict) and doc:
        first = next(iter(doc))
        return how, (text.rstrip()[:-1].rstrip() + f', "{first}": 0}}').encode()
    end = text.rstrip().rfind(text.rstrip()[-1])  # a trailing comma before the last bracket
    return "comma", (text[:end].rstrip() + ",\n" + text[end:]).encode()


# ---- experiments --------------------------------------------------------------------------------

ROLES = {"actor", "critic", "ref", "reward"}
COUNT_LIMITS = {"batch_size": rules.MAX_BATCH, "prompt_len": rules.MAX_SEQ_TOKENS, "gen_len": rules.MAX_SEQ_TOKENS,
                "ppo_minibatches": rules.MAX_BATCH, "group_size": rules.MAX_GROUP, "nodes": rules.MAX_DEVICES,
                "devices_per_node": rules.MAX_DEVICES_PER_NODE}
HYPER = {"lr": (1.0, True), "kl_coef": (1e3, False), "clip_eps": (1e3, False), "value_clip": (1e3, False),
         "gamma": (1.0, False), "lam": (1.0, False), "dpo_beta": (1e3, False), "temperature": (1e3, True)}
NOT_A_NUMBER = ["8", True, None, [], {}, math.nan, math.inf, -math.inf]
REQUIRED = {"algorithm", "models", "batch_size", "prompt_len", "gen_len", "cluster", "nodes", "devices_per_node",
            "device"}


def _experiment_value(rng: random.Random, key: str, value: Any, parent: str) -> tuple[Any, bool]:
    """(a new value for ``key``, whether it is known invalid)."""
    if key in COUNT_LIMITS:
        bad = [0, -1, 1.5, 2**70, COUNT_LIMITS[key] + 1, *NOT_A_NUMBER]
        return (rng.choice(bad), True) if rng.random() < 0.75 else (rng.choice([1, 2, 3, 4, 16]), False)
    if key == "seed":
        bad = [-1, 1.5, 2**63, *NOT_A_NUMBER]
        return (rng.choice(bad), True) if rng.random() < 0.75 else (rng.choice([0, 7, 2**63 - 1]), False)
    if key in HYPER:
        hi, positive = HYPER[key]
        bad = [-1.0, -1e-9, hi * 10, *NOT_A_NUMBER] + ([0] if positive else [])
        return (rng.choice(bad), True) if rng.random() < 0.75 else (rng.choice([hi / 2, 1e-4]), False)
    if key == "algorithm":
        bad = ["PPO", "", "ppo ", _typo(rng, str(value)), 1, None, [str(value)]]
        return (rng.choice(bad), True) if rng.random() < 0.8 else (rng.choice(["ppo", "grpo", "dpo", "sft"]), False)
    if parent == "models" and key in ROLES:
        typo = _typo(rng, str(value))
        bad = ["", 1, None, [], True] + ([typo] * 4 if typo not in PRESETS and "/" not in typo
                                          and not typo.endswith(".json") else [])
        return (rng.choice(bad), True) if rng.random() < 0.8 else (rng.choice(["tiny-4l-256h", "tiny-gpt-2l-128h",
                                                                                "llama2-7b"]), False)
    if key == "device":
        typo = _typo(rng, str(value))
        bad = ["", "  ", 1, None, [], "nope.json", "no/such/profile"] + ([typo] if typo not in known_profiles() else [])
        return (rng.choice(bad), True) if rng.random() < 0.8 else (rng.choice(["cpu", "h100-sxm", "h200"]), False)
    if key == "name":
        return (rng.choice(["x" * 201, [], {}, True]), True) if rng.random() < 0.6 else ("renamed", False)
    if key == "prompts":
        return rng.choice(["missing.jsonl", "", 5, [], True]), True
    return rng.choice([None, [], "x", -1]), False  # a key this table does not know: no promise


def experiment_value_case(rng: random.Random) -> Case:
    source = rng.choice(EXPERIMENTS)
    doc = yaml.safe_load(source.read_text())
    how = rng.choice(["value"] * 6 + ["delete", "rename", "unknown", "container", "top", "nest", "duplicate",
                                      "alias"])
    paths = _paths(doc)
    path = rng.choice(paths)
    key, parent = str(path[-1]), str(path[-2]) if len(path) > 1 else ""
    names = _keys(path)
    if how == "value":
        value, bad = _experiment_value(rng, key, _get(doc, path), parent)
        doc = _set(doc, path, value)
    elif how == "delete":
        doc, bad = _set(doc, path, delete=True), key in REQUIRED or (parent == "models" and key in ROLES)
    elif how == "rename":  # a typo of a key: unknown keys are refused
        new = _typo(rng, key)
        bad = new not in _get(doc, path[:-1])
        doc = _set(doc, path, rename=new) if bad else doc
        names = (*names, new)
    elif how == "unknown":
        container = rng.choice([(), ("cluster",), ("models",)] + ([("hyperparams",)] if "hyperparams" in doc else []))
        doc, bad, names = _set(doc, (*container, "zz_unknown"), 1), True, ("zz_unknown",)
    elif how == "container":
        key = rng.choice(["models", "cluster"] + (["hyperparams"] if "hyperparams" in doc else []))
        doc, bad, names = _set(doc, (key,), rng.choice([[1], "x", 3, None])), True, (key,)
    elif how == "top":
        doc, bad, names = rng.choice([[doc], "text", 42]), True, ("top level", "mapping")
    elif how == "nest":
        deep: Any = 1
        for _ in range(rng.randrange(70, 300)):
            deep = [deep]
        doc, bad, names = _set(doc, path, deep), True, ("nested",)
    else:
        bad, names = True, ("duplicate key", "aliases")
    text = yaml.safe_dump(doc, default_flow_style=None, allow_unicode=True) if not isinstance(doc, str) else doc
    if how == "duplicate":
        first = next(iter(doc))
        text += f"{first}: 0\n"
    if how == "alias":
        text += "zz: [&a0 [a, a, a, a, a, a, a, a, a, a]" + "".join(
            f", &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)) + "]\n"
    return _experiment_case(rng, source, text.encode(), f"{source.name} {how} {'.'.join(map(str, path))}", bad,
                            names)


def _experiment_case(rng: random.Random, source: Path, data: bytes, label: str, bad: bool,
                     names: tuple[str, ...]) -> Case:
    plan = next((p for p in PLANS if p.parent.name == source.stem and p.name == "dp2.json"), None)
    main = rng.choice(["describe", "predict", "run"]) if source in TINY else "describe"
    argv = ["{tmp}/exp.yaml"] + (["--plan", str(plan)] if main == "run" else []) + (
        ["--json"] if main == "predict" else [])
    return Case(f"{main} {label}", main, argv, {"exp.yaml": data}, bad, names or ("exp.yaml",))


def experiment_text_case(rng: random.Random) -> Case:
    source = rng.choice(EXPERIMENTS)
    text = source.read_text()
    how = rng.choice(["char", "char", "utf8", "truncate", "flip", "dropline", "dupline", "indent", "tab"])
    at = rng.randrange(len(text) + 1)
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    bad = how in ("char", "utf8")
    if how == "char":  # YAML's reader refuses these anywhere, comments included
        data = (text[:at] + rng.choice(HOSTILE_CHARS) + text[at:]).encode()
    elif how == "utf8":
        raw = text.encode()
        data = raw[:at] + rng.choice(BAD_UTF8) + raw[at:]
    elif how == "truncate":
        data = text[:at].encode()
    elif how == "flip":
        data = (text[:at] + chr(rng.randrange(32, 127)) + text[at + 1:]).encode()
    else:
        if how == "dropline":
            del lines[i]
        elif how == "dupline":
            lines.insert(i, lines[i])
        else:
            lines[i] = (" " if how == "indent" else "\t") + lines[i]
        data = "\n".join(lines).encode()
    return _experiment_case(rng, source, data, f"{source.name} {how} at {at}", bad, ("exp.yaml",))


HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2,
             "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 256, "tie_word_embeddings": False, "attention_bias": False, "rope_theta": 10000.0,
             "rms_norm_eps": 1e-05, "hidden_act": "silu"}
HF_COUNTS = {"num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"}
HF_OPTIONAL = {"num_key_value_heads", "tie_word_embeddings", "attention_bias", "rope_theta", "rms_norm_eps",
               "hidden_act", "architectures", "model_type"}


def model_config_case(rng: random.Random) -> Case:
    key = rng.choice(sorted(HF_CONFIG))
    how = rng.choice(["value", "value", "delete", "text"])
    doc, bad, label = dict(HF_CONFIG), True, f"{how} {key}"
    if how == "delete":
        del doc[key]
        bad = key not in HF_OPTIONAL
    elif how == "value":
        if key in HF_COUNTS or key == "num_key_value_heads":
            doc[key] = rng.choice([0, -1, 1.5, "8", True, [], 2**70, 3])
            # 3 heads do not divide hidden 128, nor 3 KV heads 4 heads; 3 layers or a vocabulary of 3 may be
            bad = doc[key] != 3 or doc[key] is True or key in ("hidden_size", "num_attention_heads",
                                                                "num_key_value_heads")
        elif key in ("rope_theta", "rms_norm_eps"):
            doc[key], bad = rng.choice([-1.0, 0, "1", [], True]), True
        else:
            doc[key], bad = rng.choice([1, [], {}, None, "x"]), False  # may name the model, or mean the default
        label += f"={doc[key]!r}"
    text = json.dumps(doc, indent=1)
    if how == "text":
        key, data = _json_text_mutation(rng, doc)
        label = f"text {key}"
    else:
        data = text.encode()
    exp = (EXAMPLES / "ppo-tiny-2xcpu.yaml").read_text().replace("actor: tiny-2l-128h", "actor: m/config.json")
    return Case(f"model config {label}", "describe", ["{tmp}/exp.yaml"],
                {"exp.yaml": exp.encode(), "m/config.json": data}, bad, (key, "config.json", "models.actor"))


# ---- plans --------------------------------------------------------------------------------------

DEGREES = ("dp", "tp", "pp")


def plan_case(rng: random.Random) -> Case:
    source = rng.choice(PLANS)
    doc = json.loads(source.read_text())
    calls = list(doc["calls"])
    call = rng.choice(calls)
    how = rng.choice(["degree", "degree", "micro", "mesh", "mesh", "recompute", "format", "call", "key", "text"])
    key, bad, value = how, True, None
    if how == "degree":
        key = rng.choice(DEGREES)
        value = rng.choice([0, -1, 1.5, "2", True, None, [], 2**70, 3, 5]) if rng.random() < 0.8 else rng.choice(
            [1, 2])
        bad = value not in (1, 2) or value is True
        doc = _set(doc, ("calls", call, key), value)
    elif how == "micro":
        key = "micro_batches"
        value = rng.choice([0, -1, 1.5, "1", True, None, [], 2**70, 1, 2, 3, 4])
        bad = value not in (1, 2, 3, 4) or value is True
        doc = _set(doc, ("calls", call, key), value)
    elif how == "mesh":  # the tiny examples have one node of 2 devices
        key = "mesh"
        value = rng.choice(["0-2", "1-2", "2-3", "1-0", "", "0:1", "0-1-2", "a-b", 5, None, [], "-1-0",
                            "0-99999999999", "0-0", "1-1", "0-1"])
        bad = value not in ("0-0", "1-1", "0-1")
        doc = _set(doc, ("calls", call, key), value)
    elif how == "recompute":
        key = "recompute"
        value = rng.choice(["FULL", "", "yes", 1, True, None, "full", "none"])
        bad = value not in ("full", "none") or (value == "full" and not call.endswith("train"))
        doc = _set(doc, ("calls", call, key), value)
    elif how == "format":
        key = "format"
        value = rng.choice(["rlhf-plan/plan-v2", "", 1, None, "rlhf-plan/plan-v1"])
        bad = value != "rlhf-plan/plan-v1"
        doc = _set(doc, ("format",), value)
    elif how == "call":
        what = rng.choice(["delete", "rename", "add", "type"])
        if what == "delete":
            doc = _set(doc, ("calls", call), delete=True)
        elif what == "rename":
            doc = _set(doc, ("calls", call), rename=_typo(rng, call))
        elif what == "add":
            doc = _set(doc, ("calls", "zz_call"), dict(doc["calls"][call]))
        else:
            doc = _set(doc, ("calls",), rng.choice([[], None, "x", 1]))
        key = f"call {what}"
    else:  # key: an unknown key in a layout, or a required one deleted
        key = rng.choice(["mesh", "dp", "tp", "pp", "micro_batches", "zz_key"])
        if key == "zz_key":
            doc = _set(doc, ("calls", call, key), 1)
        else:
            doc, bad = _set(doc, ("calls", call, key), delete=True), key != "micro_batches"
    data = json.dumps(doc, indent=1).encode()
    if how == "text":
        key, data = _json_text_mutation(rng, doc)
    main = rng.choice(["describe", "predict", "run"])
    experiment = str(EXAMPLES / f"{source.parent.name}.yaml")
    names = (call, key, "plan.json", "calls", "format", "zz_call", "zz_key")
    label = f"{main} {source.parent.name}/{source.name} {how} {call}.{key}={value!r}"
    return Case(label, main, [experiment, "--plan", "{tmp}/plan.json"], {"plan.json": data}, bad, names)


# ---- profiles -----------------------------------------------------------------------------------

PROFILE_FREE = {"software", "notes", "cite", "command", "name", "device", "date", "raw"}
PROFILE_ENUMS = {"format", "source", "by", "interpolation", "mode", "dtype", "ops"}
PROFILE_REQUIRED = {"format", "name", "source", "device", "date", "software", "compute", "memory", "links", "peak",
                    "efficiency", "launch", "capacity", "bandwidth", "flops_per_s", "overhead_s", "bytes",
                    "bytes_per_s", "by", "interpolation", "points", "intra", "inter", "alone", "devices",
                    "floor_s", "by_kernel", "bandwidth_efficiency", "call_overhead_s", "micro_batch_overhead_s",
                    "all_reduce", "all_gather", "reduce_scatter", "broadcast", "p2p", "mode"}
_PROFILE_DOCS = {p: json.loads(p.read_text()) for p in PROFILES}


def profile_case(rng: random.Random) -> Case:
    source = rng.choice(PROFILES)
    doc = _PROFILE_DOCS[source]
    path = rng.choice(_paths(doc))
    node = _get(doc, path)
    free = any(str(k) in PROFILE_FREE for k in path)
    how = rng.choice(["value", "value", "value", "delete", "unknown", "text"])
    key = next((str(k) for k in reversed(path) if isinstance(k, str)), "")
    value: Any = None
    if how == "value" and isinstance(node, (int, float)) and not isinstance(node, bool):
        value = rng.choice([-1, -1e-12, "1", True, None, [], {}, 0, 2**70])
        bad = not free and value not in (0, 2**70) or (value is True and not free)
        doc = _set(doc, path, value)
    elif how == "value" and isinstance(node, str):
        value = rng.choice(["x", "", 1, None, []])
        bad = key in PROFILE_ENUMS and not free
        doc = _set(doc, path, value)
    elif how == "value":  # a container: replaced by a scalar or the wrong container
        value = rng.choice(["x", 1, None] + ([{}] if isinstance(node, list) else [[]]))
        bad = not free and not (value == {} and key in ("curves",))
        doc = _set(doc, path, value)
    elif how == "delete" and isinstance(path[-1], str):
        bad = key in PROFILE_REQUIRED and not free and key not in ("cite", "command")
        doc = _set(doc, path, delete=True)
    elif how == "unknown" and isinstance(node, dict) and not free and key not in ("by_kernel",):
        doc, bad, key = _set(doc, (*path, "zz_unknown"), 1), True, "zz_unknown"
    else:
        how, bad = "text", True
    data = json.dumps(doc, indent=1).encode()
    if how == "text":
        key, data = _json_text_mutation(rng, doc)
        path = (key,)
    via = rng.choice(["--profile", "cluster.device"])
    exp = (EXAMPLES / "ppo-tiny-2xcpu.yaml").read_text().replace("device: cpu", "device: prof.json")
    if via == "--profile":
        case = Case("", "predict", [str(EXAMPLES / "ppo-tiny-2xcpu.yaml"), "--profile", "{tmp}/prof.json", "--json"])
    else:
        case = Case("", "describe", ["{tmp}/exp.yaml"], {"exp.yaml": exp.encode()})
    case.files["prof.json"] = data
    case.label = f"{via} {source.name} {how} {'.'.join(map(str, path))}={value!r}"
    case.bad, case.names = bad, (*_keys(path), key, "prof.json")
    return case


# ---- timelines ----------------------------------------------------------------------------------


def timeline_doc() -> dict[str, Any]:
    """A small measured-looking timeline: two iterations of three spans, one of them on a link."""
    spans = []
    for it in range(2):
        t = float(it)
        spans += [dict(start_s=t, end_s=t + 0.4, device=0, iteration=it, call="actor_gen", op="decode",
                       micro_batch=0, stage=0, resource=""),
                  dict(start_s=t + 0.4, end_s=t + 0.9, device=1, iteration=it, call="actor_train", op="forward",
                       micro_batch=0, stage=-1, resource=""),
                  dict(start_s=t + 0.5, end_s=t + 0.6, device=-1, iteration=it, call="actor_train",
                       op="dp_allreduce", micro_batch=-1, stage=-1, resource="intra 0-1")]
    return {"format": TIMELINE_FORMAT, "source": "measured", "meta": {"plan": "dp2.json"}, "spans": spans}


SPAN_BAD = {"start_s": [-1.0, "0", None, [], True], "end_s": ["1", None, [], True, -0.5],
            "device": [-2, 1.5, "0", None, True], "iteration": [-1, 1.5, "0", None, True],
            "call": ["", 1, None, []], "op": ["", 1, None, []], "micro_batch": [-2, 1.5, "0", None, True],
            "stage": [-2, 1.5, "0", None, True], "resource": [1, None, []]}
SPAN_MAYBE = {"start_s": [0.0, 0.05], "end_s": [5.0], "device": [0, 1, -1], "iteration": [0, 1, 7],
              "call": ["other_call"], "op": ["other_op"], "micro_batch": [-1, 3], "stage": [-1, 1],
              "resource": ["", "inter 0-1"]}
EVENT_BAD = {"ts": ["0", None, [], True, -5.0], "dur": ["1", None, [], True, -1.0], "args": ["x", [], 1],
             "name": [1, None, []], "device": ["x", 1.5, None, -2], "iteration": ["x", 1.5, -1],
             "micro_batch": ["x", 1.5, -2], "stage": ["x", -2]}


def timeline_case(rng: random.Random) -> Case:
    doc = timeline_doc()
    chrome = rng.random() < 0.4
    if chrome:
        doc = Timeline.from_dict(doc).chrome_trace()
    how = rng.choice(["field", "field", "field", "order", "delete", "unknown", "top", "text"])
    bad, key, value = True, how, None
    if chrome and how in ("field", "order", "delete"):
        events = [i for i, e in enumerate(doc["traceEvents"]) if e["ph"] == "X"]
        i = rng.choice(events)
        key = rng.choice(sorted(EVENT_BAD))
        value = rng.choice(EVENT_BAD[key])
        path = ("traceEvents", i, "args", key) if key in ("device", "iteration", "micro_batch", "stage") else (
            "traceEvents", i, key)
        if how == "delete" and key == "ts":
            doc = _set(doc, path, delete=True)
        else:
            doc = _set(doc, path, value)
    elif chrome and how == "unknown":
        doc, key = _set(doc, ("traceEvents",), rng.choice([None, "x", {}, 1])), "traceEvents"
    elif how in ("field", "delete"):
        i = rng.randrange(len(doc["spans"]))
        key = rng.choice(sorted(SPAN_BAD))
        if how == "delete":
            doc, bad = _set(doc, ("spans", i, key), delete=True), key not in ("micro_batch", "stage", "resource")
        elif rng.random() < 0.7:
            value = rng.choice(SPAN_BAD[key])
            doc = _set(doc, ("spans", i, key), value)
        else:
            value, bad = rng.choice(SPAN_MAYBE[key]), False
            doc = _set(doc, ("spans", i, key), value)
    elif how == "order":  # a span that ends before it starts
        i = rng.randrange(len(doc["spans"]))
        span = doc["spans"][i]
        doc, key = _set(doc, ("spans", i, "end_s"), span["start_s"] - 0.25), "end_s"
    elif how == "unknown":
        what = rng.choice(["span key", "spans", "source", "meta", "format"])
        if what == "span key":
            doc, key = _set(doc, ("spans", 0, "zz_unknown"), 1), "zz_unknown"
        elif what == "spans":
            doc, key = _set(doc, ("spans",), rng.choice([None, "x", {}, [1], []])), "spans"
        elif what == "source":
            doc, key = _set(doc, ("source",), rng.choice(["guessed", 1, None, []])), "source"
        elif what == "meta":
            doc, key = _set(doc, ("meta",), rng.choice(["x", [1], 1])), "meta"
        else:
            doc, key = _set(doc, ("format",), "rlhf-plan/timeline-v9"), "traceEvents"
    elif how == "top":
        doc, key = rng.choice([[doc], "text", 1, None]), "top"
    data = json.dumps(doc, indent=1).encode()
    if how == "text":
        key, data = _json_text_mutation(rng, doc)
    render = not bad and rng.random() < 0.2  # most accepted cases stop before drawing: it takes 0.2 s
    main = "plot" if render else "plot-check"
    names = (key, "tl.json", "span", "event")
    label = f"{main} {'trace' if chrome else 'timeline'} {how} {key}={value!r}"
    return Case(label, main, ["{tmp}/tl.json", "--out", "{tmp}/tl.png"], {"tl.json": data}, bad, names)


# ---- flags --------------------------------------------------------------------------------------

TINY_EXP = str(EXAMPLES / "ppo-tiny-2xcpu.yaml")
TINY_PLAN = str(EXAMPLES / "plans" / "ppo-tiny-2xcpu" / "dp2.json")
# a directory, a missing directory, empty, under a file
BAD_PATHS = ["{tmp}", "{tmp}/no/such/dir/x.json", "", "{tmp}/file.txt/x.json"]
BAD_INPUTS = ["{tmp}/none.json", "{tmp}", "", "{tmp}/file.txt/x"]
EXPERIMENT = "EXPERIMENT"  # the positional experiment file: the base argv's first item
# command → (base argv, [(flag, values known invalid, values that may be valid)])
FLAGS: dict[str, tuple[list[str], list[tuple[str, list, list]]]] = {
    "describe": ([TINY_EXP], [("--plan", BAD_INPUTS, [TINY_PLAN]), ("--json", [], [None]),
                              (EXPERIMENT, [*BAD_INPUTS, "{tmp}/file.txt"], [TINY_EXP])]),
    "baselines": ([TINY_EXP, "--name", "megatron"], [
        ("--name", ["deepspeed", "", "Megatron"], ["colocate", "split", "real-heuristic"]),
        ("--profile", ["cpux", "", "{tmp}/none.json"], ["h100-sxm"]), ("--recompute", ["some", ""], ["full", "none"]),
        ("--out", BAD_PATHS, ["{tmp}/p.json"]), ("--json", [], [None]), (EXPERIMENT, BAD_INPUTS, [TINY_EXP])]),
    "predict": ([TINY_EXP, "--plan", TINY_PLAN], [
        (EXPERIMENT, BAD_INPUTS, [TINY_EXP]),
        ("--iterations", ["0", "-1", "1001", "x", "1.5", ""], ["1", "2", "5"]),
        ("--profile", ["cpux", "", "  ", "{tmp}/none.json", "{tmp}", "h100_sxm"], ["h100-sxm", "cpu"]),
        ("--plan", BAD_INPUTS, [TINY_PLAN]), ("--trace", BAD_PATHS, ["{tmp}/t.json"]), ("--json", [], [None])]),
    "run": ([TINY_EXP, "--plan", TINY_PLAN], [
        (EXPERIMENT, BAD_INPUTS, [TINY_EXP]),
        ("--iterations", ["0", "-1", "1000001", "x"], ["1", "2", "4"]),
        ("--warmup", ["-1", "3", "5", "x"], ["0", "1"]),
        ("--timeout-s", ["0", "-1", "nan", "inf", "86401", "x"], ["10", "0.5"]),
        ("--dtype", ["float16", "x", ""], ["float64", "float32"]),
        ("--inject-fault", ["x", "9:actor_gen", "0:nocall", "0:", ":actor_gen", "-1:actor_gen"],
         ["1:actor_train", "0:actor_gen"]),
        ("--trace", BAD_PATHS, ["{tmp}/t.json"]), ("--timeline", BAD_PATHS, ["{tmp}/tl.json"])]),
    "search": ([TINY_EXP], [
        ("--time-budget", ["0", "-1", "nan", "inf", "-inf", "x"], ["1", "0.5", "30"]),
        ("--max-evals", ["0", "-1", "x", "1.5"], ["10", "1000"]),
        ("--chains", ["0", "-1", "x", "100000"], ["1", "2"]),
        ("--seed", ["-1", "x", "1.5"], ["0", "5"]),
        ("--profile", ["cpux", "", "{tmp}/none.json"], ["h100-sxm"]),
        ("--out", BAD_PATHS, ["{tmp}/p.json"]), ("--trace", BAD_PATHS, ["{tmp}/t.json"]),
        ("--no-recompute", [], [None]), ("--json", [], [None])]),
    "whatif": ([TINY_EXP, "--out", "{tmp}/w"], [
        ("--vary", ["nodes=0", "nodes=x", "nodes=", "=1", "bogus=1", "batch_size=2000000", "gen_len=2000000",
                    "prompt_len=1048576", "group_size=2", "actor=tiny-2l-128", "device=cpux", "nodes=1,,2",
                    "nodes", "nodes=1,1", "nodes=-1", "nodes=1.5", "devices_per_node=129", "nodes=70000"],
         ["nodes=1,2", "gen_len=8,16", "actor=tiny-4l-256h", "device=cpu,h100-sxm", "batch_size=16"]),
        ("--search-budget-s", ["0", "-1", "nan", "inf", "x"], ["5", "0.5"]),
        ("--search-evals", ["0", "-1", "x"], ["10"]),
        ("--seed", ["-1", "x"], ["3"]),
        ("--out", ["{tmp}/file.txt", "{tmp}/file.txt/sub", ""], ["{tmp}/new/dir"]),
        ("--profile", ["cpux", ""], ["cpu"]), ("--json", [], [None])]),
    "plot-check": (["{tmp}/tl.json"], [
        ("--iterations", ["0", "-1", "x"], ["1", "2"]),
        ("--out", ["{tmp}", "{tmp}/file.txt/x.png", ""], ["{tmp}/o.png", "{tmp}/new/dir/o.png"]),
        ("--title", [], ["a title", ""])]),
    "fit-links": (["--vidur", str(VIDUR_NET), "--profile", "h100-sxm", "--out", "{tmp}/fit"], [
        ("--holdout", ["-0.1", "1", "1.5", "nan", "x", "inf"], ["0", "0.5"]),
        ("--classes", ["bogus", "", "intra,bogus", "intra,"], ["intra", "inter", "intra,inter"]),
        ("--vidur", ["{tmp}/none", "{tmp}/file.txt", "{tmp}/empty", ""], []),
        ("--profile", ["cpux", ""], []),
        ("--out", ["{tmp}/file.txt", "{tmp}/file.txt/sub", ""], ["{tmp}/new/dir"]),
        ("--json", [], [None])]),
    "calibrate": (["--out", "{tmp}/cal"], [
        ("--world-size", ["0", "-1", "1025", "x"], ["1", "2"]),
        ("--name", ["", "bad name", "-x", "a" * 65, "a/b", "."], ["x1", "cpu-2"]),
        ("--out", ["{tmp}/file.txt", "{tmp}/file.txt/sub", ""], ["{tmp}/new/dir"]),
        ("--base", ["", "cpux", "{tmp}/none.json"], ["cpu", "h100-sxm"]),
        ("--grid", ["huge", ""], ["tiny", "quick"]),
        ("--experiment", ["{tmp}/none.yaml", "{tmp}", ""], [TINY_EXP]),
        ("--import-vidur", ["{tmp}/none", "{tmp}/file.txt"], []),
        ("--check-vidur", ["{tmp}/none"], []),
        ("--import-nccl-tests", ["{tmp}/none.txt"], [])]),
}


def flags_case(rng: random.Random) -> Case:
    main = rng.choice(sorted(FLAGS))
    base, flags = FLAGS[main]
    argv = list(base)
    bad: set[str] = set()  # the flags given a value known invalid
    names: list[str] = []
    for flag, bad_values, maybe in rng.sample(flags, k=min(len(flags), rng.choice([1, 1, 2]))):
        if bad_values and (not maybe or rng.random() < 0.7):
            value = rng.choice(bad_values)
            bad.add(flag)
            names += [flag, value or "empty"]  # the message names the flag or its value
        else:
            value = rng.choice(maybe)
        if flag == EXPERIMENT:
            argv[0] = value
        elif flag in argv:  # the base gives it: replace its value
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag] if value is None else [flag, value]
    if main == "run" and "--warmup" in argv:  # a warm-up is an integer below the iterations
        iterations = argv[argv.index("--iterations") + 1] if "--iterations" in argv else "3"
        warmup = argv[argv.index("--warmup") + 1]
        if iterations.isdigit() and int(iterations) >= 1:
            valid = warmup.isdigit() and int(warmup) < int(iterations)
            bad = bad - {"--warmup"} if valid else bad | {"--warmup"}
            names.append("--warmup")
    if main == "whatif" and "--vary" not in argv:
        argv += ["--vary", "nodes=1"]
    if main == "whatif" and "--profile" in argv and any(a.startswith("device=") for a in argv):
        bad.add("--profile")  # each device brings its own profile
        names.append("--profile")
    files = {"tl.json": json.dumps(timeline_doc()).encode(), "file.txt": b"a file\n"}
    return Case(f"{main} {' '.join(argv)}", main, argv, files, bool(bad), tuple(names))


GENERATORS: dict[str, Callable[[random.Random], Case]] = {
    "experiment values": experiment_value_case, "experiment text": experiment_text_case,
    "model config": model_config_case, "plan": plan_case, "profile": profile_case, "timeline": timeline_case,
    "flags": flags_case}


# ---- running ------------------------------------------------------------------------------------


@pytest.fixture
def mains(monkeypatch) -> dict[str, Callable[[list[str]], int]]:
    """Every command's ``main``, stopped by :class:`Accepted` where its long work would start."""
    import analysis.plot as plot
    import analysis.whatif as whatif
    import calibration.fit_links as fit_links
    import calibration.pipeline as calibrate
    import executor.launch as launch
    import search.__main__ as search_main
    from estimator.describe import main as describe
    from estimator.predict import main as predict
    from executor.run import main as run
    from search.baselines import main as baselines

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise Accepted

    monkeypatch.setattr(launch, "launch", stop)
    monkeypatch.setattr(search_main, "run_search", stop)
    monkeypatch.setattr(calibrate, "measure_profile", stop)
    draw = plot.write_gantt
    rendering = {"on": False}
    monkeypatch.setattr(plot, "write_gantt", lambda *a, **k: draw(*a, **k) if rendering["on"] else stop())

    def plot_main(render: bool) -> Callable[[list[str]], int]:
        def main(argv: list[str]) -> int:
            rendering["on"] = render
            return plot.main(argv)
        return main

    return {"describe": describe, "predict": predict, "run": run, "search": search_main.main, "baselines": baselines,
            "whatif": lambda argv: whatif.main(argv, functions=(stop, stop)),
            "plot": plot_main(True), "plot-check": plot_main(False),
            "fit-links": lambda argv: cli_guard(fit_links.main, argv),
            "calibrate": lambda argv: cli_guard(calibrate.main, argv)}


@contextlib.contextmanager
def _case_dir() -> Iterator[Path]:
    """A fresh directory, also the working directory: a command that falls back to a default
    output path writes there, never into the project."""
    before = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "empty").mkdir()
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(before)


def run_case(main: Callable[[list[str]], int], case: Case) -> tuple[Any, str, float]:
    """(exit code or "traceback", stderr, seconds); ``case.names`` get the case's directory."""
    with _case_dir() as tmp:
        case.names = tuple(n.replace("{tmp}", str(tmp)) for n in case.names)
        for name, data in case.files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
        err = io.StringIO()
        start = time.monotonic()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code: Any = main(argv)
            except Accepted:
                code = 0
            except SystemExit as exc:  # argparse: a bad flag or value
                code = exc.code
            except Exception:  # what a user would see as a traceback
                code = "traceback"
                err.write(traceback.format_exc())
        return code, err.getvalue(), time.monotonic() - start


def problem(case: Case, code: Any, err: str, elapsed: float) -> str | None:
    """What is wrong with one case's outcome, or None."""
    if code == "traceback" or "Traceback" in err:
        return f"traceback: {err[-800:]}"
    if code not in (0, 1, 2):
        return f"exit {code!r}: {err[-300:]}"
    if code in (0, 1) and case.bad:
        return f"exit {code} for input known to be invalid: {err[-300:]}"
    if code == 2:
        if "error:" not in err:
            return f"exit 2 without an 'error:' line: {err[-300:]}"
        message = err[err.index("error:"):]
        if case.bad and case.names and not any(n and n in message for n in case.names):
            return f"the message names none of {case.names}: {message[-300:]}"
    if elapsed > HANG_S:
        return f"took {elapsed:.1f} s"
    return None


def test_the_fuzz_covers_at_least_2000_inputs_in_every_class():
    assert sum(COUNTS.values()) >= 2000 and set(COUNTS) == set(GENERATORS)


@pytest.mark.parametrize("kind", list(COUNTS))
def test_fuzzed_inputs(kind, mains):
    rng = random.Random(f"{SEED}:{kind}")
    exits: Counter = Counter()
    known_bad = 0
    failures = []
    for i in range(COUNTS[kind]):
        case = GENERATORS[kind](rng)
        code, err, elapsed = run_case(mains[case.main], case)
        exits[code] += 1
        known_bad += case.bad
        found = problem(case, code, err, elapsed)
        if found:
            failures.append(f"#{i} {case.label}: {found}")
    print(f"\n{kind}: {COUNTS[kind]} inputs, {known_bad} known invalid; exits {dict(sorted(exits.items(), key=str))}")
    assert not failures, f"{len(failures)} of {COUNTS[kind]} cases failed:\n" + "\n".join(failures[:15])
    # the harness proves something only if both outcomes occur
    assert exits[0] > 0 and exits[2] > 0 and sum(exits.values()) == COUNTS[kind]
