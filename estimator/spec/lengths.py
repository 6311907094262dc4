"""Token lengths of prompts and responses: a fixed count, a parametric family, or observed lengths.

An experiment's ``gen_len`` (and ``prompt_len``) is an integer — every sequence exactly that
long — or a mapping::

    gen_len: {max: 4096, mean: 795}                 # log-normal body, capped at max
    gen_len: {max: 4096, mean: 795, p99: 3500}      # ... its spread set by the 99th percentile
    gen_len: {max: 4096, mean: 795, sigma: 1.2}     # ... or by the body's log-space sigma
    gen_len: {max: 4096, lengths: lengths.csv}      # the observed lengths of an earlier run
    gen_len: {max: 4096, mean: 795, group_corr: 0.5}  # GRPO: samples of a prompt alike in length

**Parametric** (:data:`LOGNORMAL`): a length is ``min(X, max)`` rounded to a whole token (at least
1), ``X ~ LogNormal(mu, sigma)``. Responses that would pass the cap stop *at* it, so the cap
holds a point mass ``P(X ≥ max)``, as real runs show. ``mean`` is the mean of the capped length:
``E[min(X, c)] = e^{mu + sigma²/2} Φ((ln c − mu − sigma²)/sigma) + c (1 − Φ((ln c − mu)/sigma))``,
increasing in ``mu``, solved for ``mu`` (``scipy.optimize.brentq``). The spread is ``sigma``
(default :data:`DEFAULT_SIGMA`), or it follows from ``p99``: ``mu = ln p99 − sigma·z₀.₉₉`` and
the mean equation solved for ``sigma``. The default 1.0 makes the longest of a few thousand
responses 25–35× the median, the ratio reported for reasoning RL (RollPacker, NSDI'26:
25–32×, Qwen2.5-14B at a 16k cap): the max of n draws sits near ``z = Φ⁻¹(1 − 1/n) ≈ 3.5``
standard deviations, ``e^{3.5·1.0} ≈ 33``.

**Empirical** (:data:`EMPIRICAL`): lengths read from a file — one number per line (text), a CSV
with a ``length`` column, or JSON lines with a ``length`` field — drawn with replacement.

**Drawing.** Lengths are a pure function of (seed, iteration, stream, global row), so the
estimator and the executor see the very same length for every row and any plan computes the
same update. Each row's uniform ``u = Φ(√ρ·Z_group + √(1 − ρ)·Z_row)`` (a Gaussian copula with
``ρ`` = ``group_corr``: the share of the normal score's variance a prompt's samples have in
common; ``group_size`` consecutive rows form a group) is mapped through the distribution's
quantile function, so the marginal is the distribution whatever ``ρ``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtr, ndtri

from estimator.base import rules
from estimator.base.errors import ConfigError
from estimator.base.loading import check_input_path, read_text

FIXED, LOGNORMAL, EMPIRICAL = "fixed", "lognormal", "empirical"
DEFAULT_SIGMA = 1.0  # log-space spread of the parametric body (see the module docstring)
MAX_SIGMA = 5.0
STREAMS = {"gen": 1, "prompt": 2}  # independent draws of response and prompt lengths
KEYS = ("max", "mean", "p99", "sigma", "lengths", "group_corr")
Z99 = float(ndtri(0.99))
MAX_LENGTH_ROWS = 10_000_000  # observed lengths a file may hold


@dataclass(frozen=True)
class Lengths:
    """A distribution of token counts per sequence, capped at ``max``."""

    max: int  # the cap, tokens: no sequence is longer
    kind: str = FIXED  # fixed | lognormal | empirical
    mu: float = 0.0  # lognormal: log-space mean of the body
    sigma: float = 0.0  # lognormal: log-space standard deviation of the body
    values: tuple[int, ...] = ()  # empirical: observed lengths, sorted
    group_corr: float = 0.0  # share of the normal score's variance a group has in common
    source: str = ""  # empirical: the file the lengths came from

    @property
    def fixed(self) -> bool:
        """Whether every sequence is exactly ``max`` tokens long."""
        return self.kind == FIXED

    def quantile(self, u: np.ndarray) -> np.ndarray:
        """Lengths at probabilities ``u`` ∈ (0, 1): whole tokens in ``[1, max]``."""
        u = np.asarray(u, dtype=float)
        if self.kind == FIXED:
            return np.full(u.shape, self.max, dtype=np.int64)
        if self.kind == LOGNORMAL:
            x = np.exp(np.minimum(self.mu + self.sigma * ndtri(u), math.log(self.max) + 1.0))
            return np.clip(np.rint(x), 1, self.max).astype(np.int64)
        idx = np.minimum((u * len(self.values)).astype(np.int64), len(self.values) - 1)
        return np.asarray(self.values, dtype=np.int64)[idx]

    def draw(self, seed: int, iteration: int, rows: int, stream: str = "gen", group_size: int = 1) -> np.ndarray:
        """Lengths of global rows ``0 .. rows−1`` of ``iteration`` (int64, shape (rows,))."""
        if self.kind == FIXED:
            return np.full(rows, self.max, dtype=np.int64)
        rng = np.random.default_rng([int(seed), int(iteration), STREAMS[stream]])
        groups = -(-rows // group_size)
        shared = rng.standard_normal(groups)
        own = rng.standard_normal(rows)
        rho = self.group_corr if group_size > 1 else 0.0
        z = math.sqrt(rho) * np.repeat(shared, group_size)[:rows] + math.sqrt(1.0 - rho) * own
        return self.quantile(ndtr(z))

    def mean(self) -> float:
        """Expected length (of the capped, rounded-before-capping body: the continuous mean)."""
        if self.kind == FIXED:
            return float(self.max)
        if self.kind == LOGNORMAL:
            return _capped_mean(self.mu, self.sigma, self.max)
        return float(np.mean(self.values))

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0–100) of the length."""
        if self.kind == EMPIRICAL:
            return float(np.percentile(self.values, q, method="inverted_cdf"))
        return float(self.quantile(np.array([q / 100.0]))[0]) if 0 < q < 100 else float(self.max)

    def cap_mass(self) -> float:
        """Share of sequences that stop at the cap."""
        if self.kind == FIXED:
            return 1.0
        if self.kind == LOGNORMAL:
            return float(1.0 - ndtr((math.log(self.max - 0.5) - self.mu) / self.sigma))
        return float(np.mean(np.asarray(self.values) == self.max))

    def summary(self) -> dict[str, float]:
        """``mean``, ``p50``, ``p90``, ``p99``, ``max`` (``describe --json``: ``lengths.gen``)."""
        return {"mean": round(self.mean(), 3), "p50": self.percentile(50), "p90": self.percentile(90),
                "p99": self.percentile(99), "max": float(self.max)}

    def to_data(self) -> int | dict:
        """The experiment-file form (an integer when fixed)."""
        if self.kind == FIXED:
            return self.max
        out: dict = {"max": self.max}
        if self.kind == LOGNORMAL:
            out |= {"mean": round(self.mean(), 6), "sigma": round(self.sigma, 6)}
        else:
            out["lengths"] = self.source
        return out | ({"group_corr": self.group_corr} if self.group_corr else {})


def _capped_mean(mu: float, sigma: float, cap: float) -> float:
    """``E[min(X, cap)]`` for ``X ~ LogNormal(mu, sigma)``."""
    lc = math.log(cap)
    body = math.exp(mu + sigma * sigma / 2) * ndtr((lc - mu - sigma * sigma) / sigma)
    return float(body + cap * (1.0 - ndtr((lc - mu) / sigma)))


def _solve_mu(mean: float, sigma: float, cap: int) -> float:
    """``mu`` whose capped mean is ``mean`` (0 < mean < cap): the capped mean rises with mu."""
    lo, hi = math.log(mean) - 10.0 * sigma - 10.0, math.log(cap) + 10.0 * sigma + 10.0
    return float(brentq(lambda m: _capped_mean(m, sigma, cap) - mean, lo, hi, xtol=1e-12))


def _solve_sigma(mean: float, p99: float, cap: int, where: str) -> float:
    """``sigma`` whose body has 99th percentile ``p99`` and capped mean ``mean``."""
    def gap(s: float) -> float:
        return _capped_mean(math.log(p99) - s * Z99, s, cap) - mean

    lo, hi = 1e-4, MAX_SIGMA
    if gap(lo) * gap(hi) > 0:
        raise ConfigError(f"{where}: no log-normal has mean {mean:g} and p99 {p99:g} under max {cap} "
                          f"(sigma would leave (0, {MAX_SIGMA:g}]); give sigma instead, or a p99 further "
                          "above the mean")
    return float(brentq(gap, lo, hi, xtol=1e-12))


def _number(where: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key}={value!r} must be a finite number")
    return float(value)


def read_lengths(path: str | Path, where: str, cap: int) -> tuple[int, ...]:
    """Observed lengths from a text (one number per line), CSV (a ``length`` column) or JSONL
    (``{"length": n}`` per line) file; every one a whole number in ``[1, cap]``."""
    path = check_input_path(str(path), where)
    text = read_text(path, where)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(f"{where}: lengths file {str(path)!r} holds no lengths")
    if lines[0].startswith("{"):
        raw = []
        for i, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: {path} line {i}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or "length" not in obj:
                raise ConfigError(f"{where}: {path} line {i}: a JSON line must be an object with a 'length'")
            raw.append((i, obj["length"]))
    elif "," in lines[0] or not _is_number(lines[0]):
        reader = csv.DictReader(io.StringIO("\n".join(lines)))
        if "length" not in (reader.fieldnames or []):
            raise ConfigError(f"{where}: {path}: a CSV needs a 'length' column; its header is {reader.fieldnames}")
        raw = [(i, row["length"]) for i, row in enumerate(reader, 2)]
    else:
        raw = list(enumerate(lines, 1))
    if len(raw) > MAX_LENGTH_ROWS:
        raise ConfigError(f"{where}: {path} holds {len(raw):,} lengths; at most {MAX_LENGTH_ROWS:,}")
    out = []
    for line, v in raw:
        n = _as_length(v)
        if n is None:
            raise ConfigError(f"{where}: {path} line {line}: length {v!r} is not a whole number")
        if not 1 <= n <= cap:
            raise ConfigError(f"{where}: {path} line {line}: length {n} must be in [1, max={cap}]")
        out.append(n)
    if not out:
        raise ConfigError(f"{where}: lengths file {str(path)!r} holds no lengths")
    return tuple(sorted(out))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _as_length(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            return None
    if isinstance(v, (int, float)) and math.isfinite(v) and float(v).is_integer():
        return int(v)
    return None


def parse_lengths(value: object, where: str, limit: int, base_dir: Path | None = None) -> Lengths:
    """An experiment's ``gen_len`` or ``prompt_len``: an integer in ``[1, limit]`` or a mapping
    (see the module docstring); every rule broken is named with its key."""
    if not isinstance(value, dict):
        return Lengths(rules.integer(where, value, lo=1, hi=limit))
    unknown = sorted(str(k) for k in value if k not in KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
    if "max" not in value:
        raise ConfigError(f"{where}: a length distribution needs 'max' (the cap, tokens)")
    cap = rules.integer(f"{where}.max", value["max"], lo=1, hi=limit)
    corr = _number(where, "group_corr", value.get("group_corr", 0.0))
    if not 0.0 <= corr <= 1.0:
        raise ConfigError(f"{where}.group_corr={corr:g} must be in [0, 1]")
    if "lengths" in value:
        extra = sorted(k for k in ("mean", "p99", "sigma") if k in value)
        if extra:
            raise ConfigError(f"{where}: {extra} apply to the parametric family, not to observed 'lengths'")
        f = value["lengths"]
        if not isinstance(f, str) or not f:
            raise ConfigError(f"{where}.lengths={f!r} must be a file path")
        path = Path(f) if base_dir is None or Path(f).is_absolute() else base_dir / f
        return Lengths(cap, EMPIRICAL, values=read_lengths(path, f"{where}.lengths", cap), group_corr=corr,
                       source=f)
    if "mean" not in value:
        raise ConfigError(f"{where}: a length distribution needs 'mean' (with 'max') or 'lengths' (a file)")
    mean = _number(where, "mean", value["mean"])
    if not 0.0 < mean < cap:
        raise ConfigError(f"{where}.mean={mean:g} must be above 0 and below max={cap}"
                          + (" (a mean at the cap is a fixed length: write the integer)" if mean == cap else ""))
    if cap == 1:
        raise ConfigError(f"{where}.max=1 leaves no room for a distribution; write gen_len: 1")
    if "p99" in value and "sigma" in value:
        raise ConfigError(f"{where}: give one of 'p99' and 'sigma', not both")
    if "p99" in value:
        p99 = _number(where, "p99", value["p99"])
        if not mean < p99 < cap:
            raise ConfigError(f"{where}.p99={p99:g} must be above mean={mean:g} and below max={cap}")
        sigma = _solve_sigma(mean, p99, cap, where)
        return Lengths(cap, LOGNORMAL, mu=math.log(p99) - sigma * Z99, sigma=sigma, group_corr=corr)
    sigma = _number(where, "sigma", value.get("sigma", DEFAULT_SIGMA))
    if not 0.0 < sigma <= MAX_SIGMA:
        raise ConfigError(f"{where}.sigma={sigma:g} must be in (0, {MAX_SIGMA:g}]")
    return Lengths(cap, LOGNORMAL, mu=_solve_mu(mean, sigma, cap), sigma=sigma, group_corr=corr)
