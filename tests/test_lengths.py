"""Length distributions: parsing, the rules they refuse, and what a draw of 10⁵ looks like."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import ndtr

from estimator.base.errors import ConfigError
from estimator.spec.experiment import experiment_from_dict
from estimator.spec.lengths import EMPIRICAL, LOGNORMAL, parse_lengths

N = 100_000


def _draw(spec: dict, seed: int = 0) -> tuple[np.ndarray, object]:
    dist = parse_lengths(spec, "gen_len", 1 << 20)
    return dist.draw(seed, 0, N), dist


def test_an_integer_is_a_fixed_length() -> None:
    dist = parse_lengths(96, "gen_len", 1 << 20)
    assert dist.fixed and dist.max == 96
    assert (dist.draw(3, 1, 7) == 96).all()


@pytest.mark.parametrize("spec", [{"max": 4096, "mean": 795}, {"max": 96, "mean": 16},
                                  {"max": 4096, "mean": 795, "sigma": 0.5}])
def test_a_draw_has_the_spec_mean_and_its_cap_mass(spec: dict) -> None:
    x, dist = _draw(spec)
    assert dist.kind == LOGNORMAL and x.max() <= spec["max"] and x.min() >= 1
    # the sample mean of 10⁵ draws is within 4 standard errors (plus half a token of rounding)
    assert abs(x.mean() - spec["mean"]) < 4 * x.std() / math.sqrt(N) + 0.5
    # the point mass at the cap: P(X ≥ max − ½) of the body, within sampling error
    p = 1.0 - ndtr((math.log(spec["max"] - 0.5) - dist.mu) / dist.sigma)
    assert abs((x == spec["max"]).mean() - p) < 4 * math.sqrt(p * (1 - p) / N) + 1e-4
    assert abs(dist.cap_mass() - p) < 1e-12


def test_p99_sets_the_spread() -> None:
    x, dist = _draw({"max": 4096, "mean": 795, "p99": 3000})
    assert abs(np.percentile(x, 99) - 3000) / 3000 < 0.03
    assert abs(x.mean() - 795) < 4 * x.std() / math.sqrt(N) + 0.5
    wider = parse_lengths({"max": 4096, "mean": 795, "p99": 3800}, "gen_len", 1 << 20)
    assert wider.sigma > dist.sigma


def test_the_longest_of_a_few_thousand_is_tens_of_times_the_median() -> None:
    """The default spread: uncapped, the max of 2,048 draws is 25–35× their median (the
    long tail the module docstring cites)."""
    dist = parse_lengths({"max": 1 << 20, "mean": 800}, "gen_len", 1 << 20)
    ratios = [np.max(x) / np.median(x) for x in (dist.draw(s, 0, 2048) for s in range(20))]
    assert 15 < np.median(ratios) < 45


def test_group_correlation_keeps_the_marginal_and_makes_groups_alike() -> None:
    dist = parse_lengths({"max": 4096, "mean": 795, "group_corr": 0.8}, "gen_len", 1 << 20)
    alone = parse_lengths({"max": 4096, "mean": 795}, "gen_len", 1 << 20)
    x = dist.draw(0, 0, N, group_size=8)
    y = alone.draw(0, 0, N, group_size=8)
    assert abs(x.mean() - y.mean()) < 4 * y.std() / math.sqrt(N / 8) + 1
    spread_within = lambda a: np.log(a.reshape(-1, 8)).std(axis=1).mean()  # noqa: E731
    assert spread_within(x) < 0.6 * spread_within(y)


def test_draws_depend_only_on_seed_iteration_and_row() -> None:
    dist = parse_lengths({"max": 512, "mean": 64}, "gen_len", 1 << 20)
    a = dist.draw(7, 3, 64)
    assert (a == dist.draw(7, 3, 64)).all()
    assert not (a == dist.draw(7, 4, 64)).all() and not (a == dist.draw(8, 3, 64)).all()
    assert (dist.draw(7, 3, 64, stream="prompt") != a).any()


@pytest.mark.parametrize("text", ["12\n30\n7\n", "length,other\n12,a\n30,b\n7,c\n",
                                  '{"length": 12}\n{"length": 30}\n{"length": 7}\n'])
def test_observed_lengths_from_text_csv_or_jsonl(tmp_path, text: str) -> None:
    f = tmp_path / "lengths.txt"
    f.write_text(text)
    dist = parse_lengths({"max": 30, "lengths": str(f)}, "gen_len", 1 << 20)
    assert dist.kind == EMPIRICAL and dist.values == (7, 12, 30)
    x = dist.draw(0, 0, 30_000)
    assert set(np.unique(x)) == {7, 12, 30}
    assert abs((x == 30).mean() - 1 / 3) < 0.02 and dist.cap_mass() == pytest.approx(1 / 3)


@pytest.mark.parametrize(("spec", "needle"), [
    ({"max": 100, "mean": 100}, "mean=100 must be above 0 and below max=100"),
    ({"max": 100, "mean": 150}, "mean=150"),
    ({"max": 100, "mean": -3}, "mean=-3"),
    ({"max": 100}, "needs 'mean'"),
    ({"mean": 10}, "needs 'max'"),
    ({"max": -5, "mean": 1}, "max"),
    ({"max": 100, "mean": 10, "p99": 5}, "p99=5 must be above mean=10"),
    ({"max": 100, "mean": 10, "p99": 50, "sigma": 1}, "one of 'p99' and 'sigma'"),
    ({"max": 100, "mean": 10, "sigma": 0}, "sigma=0"),
    ({"max": 100, "mean": 10, "group_corr": 1.5}, "group_corr=1.5 must be in [0, 1]"),
    ({"max": 100, "mean": 10, "spread": 2}, "unknown key(s) ['spread']"),
    ({"max": 100, "mean": "ten"}, "mean='ten' must be a finite number"),
])
def test_bad_specs_are_refused_by_name(spec: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match="gen_len") as err:
        parse_lengths(spec, "gen_len", 1 << 20)
    assert needle in str(err.value)


@pytest.mark.parametrize(("text", "needle"), [("", "holds no lengths"), ("12\nabc\n", "line 2: length 'abc'"),
                                              ("12\n300\n", "length 300 must be in [1, max=100]"),
                                              ("12\n0\n", "length 0"), ("a,b\n1,2\n", "needs a 'length' column")])
def test_bad_lengths_files_are_refused_by_line(tmp_path, text: str, needle: str) -> None:
    f = tmp_path / "l.csv"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse_lengths({"max": 100, "lengths": str(f)}, "gen_len", 1 << 20)
    assert needle in str(err.value)


def _exp(**over) -> dict:
    base = {"algorithm": "grpo", "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h", "reward": "tiny-2l-128h"},
            "batch_size": 4, "group_size": 4, "prompt_len": 8, "gen_len": {"max": 64, "mean": 12},
            "cluster": {"nodes": 1, "devices_per_node": 2, "device": "cpu"}}
    return base | over


def test_an_experiment_draws_the_same_lengths_every_time() -> None:
    exp = experiment_from_dict(_exp())
    assert exp.params.gen_len == 64 and exp.params.variable
    p, g = exp.lengths(1)
    assert len(p) == len(g) == 16 and (p == 8).all() and g.max() <= 64
    assert (g == experiment_from_dict(_exp()).lengths(1)[1]).all()
    assert all(c.workload.lengths_vary for c in exp.workflow.calls)


@pytest.mark.parametrize(("over", "needle"), [
    ({"algorithm": "dpo", "models": {"actor": "tiny-2l-128h", "ref": "tiny-2l-128h"}, "group_size": 1},
     "applies to algorithms that generate"),
    ({"group_size": 1, "gen_len": {"max": 64, "mean": 12, "group_corr": 0.5}}, "group_corr=0.5 applies to grpo"),
    ({"kv_fraction": 0}, "kv_fraction"),
    ({"kv_fraction": 1.5}, "kv_fraction"),
])
def test_experiment_rules_on_lengths(over: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(_exp(**over))
    assert needle in str(err.value)
