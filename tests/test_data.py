"""Source data and sampling: pure functions of (seed, iteration, row), whatever the split."""

from __future__ import annotations

import json
import random

import pytest
import torch

from estimator.base.errors import ConfigError
from executor import data
from executor.data import Sampler, Source, load_jsonl


def test_mul32_matches_python_integers():
    rng = random.Random(0)
    a = [rng.getrandbits(32) for _ in range(500)] + [0, 1, 0xFFFFFFFF]
    for c in (0x85EBCA6B, 0xC2B2AE35, 0xFFFFFFFF, 1):
        got = data._mul32(torch.tensor(a), c).tolist()
        assert got == [(x * c) & 0xFFFFFFFF for x in a]


def test_hash_is_deterministic_and_broadcasts():
    h = data.hash_keys(1, 2, torch.arange(4)[:, None], torch.arange(3)[None, :])
    assert h.shape == (4, 3)
    assert torch.equal(h, data.hash_keys(1, 2, torch.arange(4)[:, None], torch.arange(3)[None, :]))
    assert h[1, 2] == data.hash_keys(1, 2, 1, 2)
    assert len(set(h.flatten().tolist())) == 12
    assert int(h.min()) >= 0 and int(h.max()) < 2**32


def test_scalar_keys_hash_alike_in_integers_and_tensors():
    keys = (7, 2**40 + 3, 5, torch.arange(4)[:, None], 9, torch.arange(3)[None, :])
    h = torch.zeros((), dtype=torch.int64)
    for k in keys:
        h = data._combine(h, k)
    assert torch.equal(data.hash_keys(*keys), h)


def test_uniform_is_strictly_inside_the_unit_interval():
    u = data.uniform(data.hash_keys(0, torch.arange(50_000)))
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01


def test_sampling_does_not_depend_on_how_rows_are_split():
    logits = torch.randn(8, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = Sampler(seed=3, iteration=1, call="actor_gen")
    whole = s(torch.arange(8), 5, logits)
    halves = torch.cat([s(torch.arange(0, 4), 5, logits[:4]), s(torch.arange(4, 8), 5, logits[4:])])
    assert torch.equal(whole, halves)
    # different step, call or iteration: different draws
    assert not torch.equal(whole, s(torch.arange(8), 6, logits))
    other = Sampler(seed=3, iteration=1, call="actor_gen_greedy")(torch.arange(8), 5, logits)
    assert not torch.equal(whole, other)


def test_greedy_is_argmax_and_sampling_follows_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]], dtype=torch.float64)
    assert Sampler(0, 0, "g", greedy=True)(torch.tensor([0]), 0, logits).item() == 2
    n = 20_000
    s = Sampler(0, 0, "g", temperature=1.0)
    toks = s(torch.arange(n), 0, logits.expand(n, 4))
    freq = torch.bincount(toks, minlength=4).double() / n
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)


def test_synthetic_prompts_depend_only_on_seed_iteration_and_row():
    src = Source("prompts", seed=1, prompt_len=6, gen_len=4, vocab=50, examples_per_iteration=4, group_size=2)
    full = src.rows(0, 0, 8)
    assert full.shape == (8, 6) and int(full.min()) >= 0 and int(full.max()) < 50
    assert torch.equal(src.rows(0, 3, 7), full[3:7])
    assert torch.equal(full[0], full[1]) and not torch.equal(full[1], full[2])  # groups share a prompt
    assert not torch.equal(src.rows(1, 0, 8), full)


def test_synthetic_pairs_share_the_prompt():
    src = Source("pairs", seed=1, prompt_len=3, gen_len=4, vocab=50, examples_per_iteration=2)
    rows = src.rows(0, 0, 4)
    assert rows.shape == (4, 7)
    assert torch.equal(rows[0, :3], rows[1, :3])
    assert not torch.equal(rows[0, 3:], rows[1, 3:])
    assert torch.equal(src.rows(0, 1, 3), rows[1:3])


def test_jsonl_prompts_are_fitted_and_cycled(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("[1, 2]\n\n[3, 4, 5, 6, 7]\n")
    table = load_jsonl(path, "prompts", prompt_len=3, gen_len=2, vocab=10)
    assert table.tolist() == [[0, 1, 2], [5, 6, 7]]
    src = Source("prompts", 0, 3, 2, 10, examples_per_iteration=1, table=table)
    assert src.rows(0, 0, 1).tolist() == [[0, 1, 2]]
    assert src.rows(1, 0, 1).tolist() == [[5, 6, 7]]
    assert src.rows(2, 0, 1).tolist() == [[0, 1, 2]]


def test_jsonl_pairs_and_sft(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": [1], "chosen": [2, 3, 4], "rejected": [5]}) + "\n")
    table = load_jsonl(path, "pairs", prompt_len=2, gen_len=2, vocab=10)
    src = Source("pairs", 0, 2, 2, 10, examples_per_iteration=1, table=table)
    assert src.rows(0, 0, 2).tolist() == [[0, 1, 2, 3], [0, 1, 5, 0]]
    sft = tmp_path / "sft.jsonl"
    sft.write_text("[1, 2, 3]\n" + json.dumps({"prompt": [4], "response": [5]}) + "\n")
    assert load_jsonl(sft, "sft", 2, 2, 10).tolist() == [[0, 1, 2, 3], [0, 4, 5, 0]]


@pytest.mark.parametrize("line, message", [
    ("[1, 2", "line 2: not valid JSON"),
    ('["a"]', "line 2: must be a JSON list of integer token ids"),
    ("[1, 99]", r"line 2: token id\(s\) \[99\] outside the vocabulary"),
    ('{"prompt": [1]}', "line 2: must be a JSON list"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"[1]\n{line}\n")
    with pytest.raises(ConfigError, match=message):
        load_jsonl(path, "prompts", 4, 4, vocab=10)


def test_jsonl_pair_needs_all_keys(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": [1], "chosen": [2]}) + "\n")
    with pytest.raises(ConfigError, match="line 1: a pair must be an object"):
        load_jsonl(path, "pairs", 4, 4, vocab=10)


def test_source_for_an_experiment_reads_its_file(tmp_path):
    from tests.conftest import tiny_experiment

    exp = tiny_experiment("ppo")
    assert data.source_for(exp).kind == "prompts" and data.source_for(exp).table is None
    assert data.source_for(tiny_experiment("dpo")).kind == "pairs"


@pytest.mark.parametrize("kind,examples,group,rows", [("prompts", 6, 1, 6), ("prompts", 3, 4, 12), ("pairs", 5, 1, 10),
                                                      ("sft", 4, 1, 4)])
def test_a_whole_iteration_sliced_equals_each_range_built_alone(kind, examples, group, rows):
    """The runtime builds an iteration's source rows once and slices them for every call."""
    src = Source(kind, 7, 5, 3, 50, examples, group)
    assert src.rows_per_iteration == rows
    whole = src.rows(2, 0, rows)
    for lo, hi in ((0, rows), (0, 2), (2, rows), (1, 3)):
        assert torch.equal(whole[lo:hi], src.rows(2, lo, hi))
