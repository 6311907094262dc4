"""Collective costs of a profile's links: measured time curves per group size, or α + busbw.

One entry ``links.<intra|inter>.<kind>`` of a profile (kinds: ``all_reduce``, ``all_gather``,
``reduce_scatter``, ``p2p``, ``broadcast``) holds either or both of

- ``"alpha_s"`` + ``"busbw_bytes_per_s"``: a latency and an nccl-tests *bus* bandwidth, so one
  collective of ``S`` bytes over ``n`` ranks takes ``alpha_s + factor(n)·S/busbw``
  (:func:`bus_factor`; nccl-tests doc/PERFORMANCE.md);
- ``"curves"``: measured time of one collective against its size, per group size::

      "curves": {"2": [[size_bytes, time_s], ...], "8": [...], "2x8": [...]}

  ``size_bytes`` is nccl-tests' ``size`` column: the buffer of an all-reduce, broadcast or
  point-to-point message, the gathered output of an all-gather, the input of a reduce-scatter.
  Times may not decrease with size. A key ``"<n>"`` is ``n`` ranks on this link class (on
  ``inter``, one rank on each of ``n`` nodes; ``"<n>x1"`` means the same); a key
  ``"<nodes>x<per_node>"`` on ``inter`` is a whole multi-node collective over ``nodes`` nodes
  with ``per_node`` ranks each, as nccl-tests measures it across nodes.

A curve is interpolated linearly in log(size)–log(time), so it passes through every point and
is monotone between them; below its smallest size it is held at that size's time (latency
bound), beyond its largest it grows at its last segment's bandwidth. A group size that was not
measured is served from the nearest measured one (in log ranks, the larger on a tie) at the
size that puts as many bytes on the busiest link: ``t_n(S) = t_m(S·factor(n)/factor(m))``.
When an entry holds curves they are used and ``alpha_s``/``busbw_bytes_per_s`` (optional
beside them) only document the summary; without curves the α + busbw formula applies.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from estimator.base.errors import ConfigError
from estimator.base.rules import MAX_LATENCY_S

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "p2p", "broadcast")
LINK_CLASSES = ("intra", "inter")  # inside a node (NVLink) / between nodes (NIC)
ENTRY_KEYS = ("alpha_s", "busbw_bytes_per_s", "curves", "raw", "cite", "command")
_GROUP_KEY = re.compile(r"^([1-9][0-9]*)(?:x([1-9][0-9]*))?$")


def bus_factor(kind: str, n: int) -> float:
    """Bytes on the busiest link per byte of message, for ``n`` ranks (nccl-tests busbw)."""
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n
    if kind in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    return 1.0


@dataclass(frozen=True)
class TimeCurve:
    """Time of one collective against its size, for one group size (see the module docstring)."""

    points: tuple[tuple[float, float], ...]  # (size_bytes, time_s), sizes strictly ascending
    _logs: np.ndarray = field(init=False, repr=False, compare=False)
    _logt: np.ndarray = field(init=False, repr=False, compare=False)
    _tail_Bps: float = field(init=False, repr=False, compare=False)
    _lists: tuple[list[float], list[float]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = [p[0] for p in self.points]
        times = [p[1] for p in self.points]
        problems = []
        if not self.points:
            problems.append("needs at least one [size_bytes, time_s] point")
        if not all(math.isfinite(s) and s > 0 for s in sizes) or sizes != sorted(set(sizes)):
            problems.append(f"sizes {sizes} must be positive and strictly ascending")
        if not all(math.isfinite(t) and t > 0 for t in times):
            problems.append(f"times {times} must be positive seconds")
        elif any(b < a for a, b in zip(times, times[1:])):
            problems.append(f"times {times} must not decrease with size")
        if problems:
            raise ConfigError("; ".join(problems))
        object.__setattr__(self, "_logs", np.log(np.asarray(sizes, dtype=float)))
        object.__setattr__(self, "_logt", np.log(np.asarray(times, dtype=float)))
        object.__setattr__(self, "_lists", (self._logs.tolist(), self._logt.tolist()))
        (s1, t1) = self.points[-1]
        s0, t0 = self.points[-2] if len(self.points) > 1 else (0.0, 0.0)
        # Incremental bandwidth of the last segment; a flat last segment (latency-bound or a
        # single point) extrapolates at the last point's algorithmic bandwidth instead.
        tail = (s1 - s0) / (t1 - t0) if t1 > t0 else s1 / t1
        object.__setattr__(self, "_tail_Bps", float(tail))

    def __call__(self, size_bytes: float) -> float:
        """Seconds for one collective of ``size_bytes`` (scalar path: the cost model's hot loop)."""
        (s0, t0), (s1, t1) = self.points[0], self.points[-1]
        if size_bytes >= s1:
            return t1 + (size_bytes - s1) / self._tail_Bps
        if size_bytes <= s0:
            return t0
        xs, ys = self._lists
        x = math.log(size_bytes)
        i = bisect.bisect_right(xs, x)
        w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return math.exp(ys[i - 1] + w * (ys[i] - ys[i - 1]))

    def many(self, sizes: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`__call__`."""
        s = np.asarray(sizes, dtype=float)
        inside = np.exp(np.interp(np.log(np.maximum(s, 1e-300)), self._logs, self._logt))
        s1, t1 = self.points[-1]
        return np.where(s > s1, t1 + (s - s1) / self._tail_Bps, inside)


def parse_group_key(key: str, where: str) -> tuple[int, int]:
    """A curve key: ``(nodes, per_node)`` for ``"<nodes>x<per_node>"``, ``(0, n)`` for ``"<n>"``."""
    m = _GROUP_KEY.match(str(key))
    if not m:
        raise ConfigError(f"{where}: curve key {key!r} must be a group size \"<n>\" or \"<nodes>x<per_node>\"")
    if m.group(2) is None:
        n = int(m.group(1))
        if n < 2:
            raise ConfigError(f"{where}: curve key {key!r}: a collective needs at least 2 ranks")
        return 0, n
    nodes, per_node = int(m.group(1)), int(m.group(2))
    if nodes < 2:
        raise ConfigError(f"{where}: curve key {key!r}: a multi-node curve needs at least 2 nodes")
    return nodes, per_node


@dataclass(frozen=True)
class LinkCost:
    """One collective kind on one link class: measured curves, else ``alpha_s + factor(n)·S/busbw``."""

    alpha_s: float  # latency of one collective call, seconds (summary when curves are given)
    busbw_Bps: float  # nccl-tests bus bandwidth, bytes/s (summary when curves are given)
    kind: str = "all_reduce"
    curves: dict[int, TimeCurve] = field(default_factory=dict)  # ranks on this link class → curve
    multi: dict[tuple[int, int], TimeCurve] = field(default_factory=dict)  # (nodes, per_node) → curve

    def time_s(self, size_bytes: float, n: int) -> float:
        """One collective of ``size_bytes`` over ``n`` ranks of this link class."""
        if not self.curves:
            return self.alpha_s + bus_factor(self.kind, n) * size_bytes / self.busbw_Bps
        m = self.nearest(n)
        scale = bus_factor(self.kind, n) / bus_factor(self.kind, m) if m != n else 1.0
        return self.curves[m](size_bytes * scale)

    def nearest(self, n: int) -> int:
        """The measured group size that serves ``n`` ranks."""
        return min(self.curves, key=lambda m: (abs(math.log(m / n)), -m))

    def multi_node_s(self, size_bytes: float, nodes: int, per_node: int) -> float | None:
        """A measured whole multi-node collective, or None when none was measured for that shape."""
        curve = self.multi.get((nodes, per_node))
        return None if curve is None else curve(size_bytes)


MultiCurves = dict[tuple[int, int], TimeCurve]  # (nodes, per_node) → curve


def number(node: dict, key: str, where: str, zero_ok: bool, limit: float | None = None) -> float:
    """``node[key]`` as a finite positive (or, with ``zero_ok``, non-negative) number at most
    ``limit``, or :class:`ConfigError` naming it and the rule."""
    v = node[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < 0 or (v == 0 and not zero_ok):
        rule = "a non-negative" if zero_ok else "a positive"
        raise ConfigError(f"{where}.{key}={v!r} must be {rule} number")
    if limit is not None and v > limit:
        raise ConfigError(f"{where}.{key}={v!r} exceeds the limit {limit:g}")
    return float(v)


def _curves(node: Any, kind: str, cls: str, where: str) -> tuple[dict[int, TimeCurve], MultiCurves]:
    if not isinstance(node, dict) or not node:
        raise ConfigError(f"{where}.curves must be a non-empty object of group size → [[size_bytes, time_s], ...]")
    flat: dict[int, TimeCurve] = {}
    multi: dict[tuple[int, int], TimeCurve] = {}
    for key, pts in node.items():
        nodes, n = parse_group_key(key, f"{where}.curves")
        w = f"{where}.curves[{key!r}]"
        if not isinstance(pts, list) or not all(isinstance(p, list) and len(p) == 2 for p in pts):
            raise ConfigError(f"{w} must be a list of [size_bytes, time_s] pairs")
        wrong = [v for p in pts for v in p if not isinstance(v, (int, float)) or isinstance(v, bool)]
        if wrong:  # float() would take "1" and True
            raise ConfigError(f"{w}: {wrong[:3]!r} must be numbers")
        try:
            curve = TimeCurve(tuple((float(s), float(t)) for s, t in pts))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{w}: {exc}") from None
        if nodes and cls != "inter":
            raise ConfigError(f"{w}: a \"<nodes>x<per_node>\" curve belongs under links.inter")
        if nodes and n > 1:
            multi[(nodes, n)] = curve
        else:
            target = nodes or n
            if kind == "p2p" and target != 2:
                raise ConfigError(f"{w}: a point-to-point curve is between 2 ranks, not {target}")
            if target in flat:
                raise ConfigError(f"{w}: group size {target} is given twice")
            flat[target] = curve
    return flat, multi


def parse_entry(node: Any, kind: str, cls: str, where: str, curves_allowed: bool) -> LinkCost:
    """Check one ``links.<cls>.<kind>`` object and build its cost."""
    if not isinstance(node, dict):
        raise ConfigError(f"{where} must be an object with alpha_s + busbw_bytes_per_s and/or curves")
    unknown = sorted(set(node) - set(ENTRY_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(ENTRY_KEYS)}")
    if not (str(node.get("cite", "")).strip() or str(node.get("command", "")).strip()):
        raise ConfigError(f"{where} needs a 'cite' (source of the figures) or a 'command' "
                          "(the measurement that produced them)")
    raw = node.get("raw")
    if "raw" in node and not (isinstance(raw, str) and raw.strip() and "\x00" not in raw and len(raw.encode()) <= 255):
        raise ConfigError(f"{where}.raw={node['raw']!r:.60}: must name the file of raw rows beside the profile")
    pair = [k for k in ("alpha_s", "busbw_bytes_per_s") if k in node]
    if len(pair) == 1:
        raise ConfigError(f"{where}: alpha_s and busbw_bytes_per_s go together; only {pair[0]} given")
    if "curves" in node and not curves_allowed:
        raise ConfigError(f"{where}: curves need format rlhf-plan/profile-v2 (set \"format\" to it; "
                          "a v1 file holds alpha_s + busbw_bytes_per_s only)")
    flat, multi = _curves(node["curves"], kind, cls, where) if "curves" in node else ({}, {})
    if not pair and not flat:
        raise ConfigError(f"{where}: needs alpha_s + busbw_bytes_per_s, or curves with at least one "
                          "group size \"<n>\" (multi-node \"<nodes>x<per_node>\" curves alone cannot "
                          "serve other groups)")
    if pair:
        alpha = number(node, "alpha_s", where, zero_ok=True, limit=MAX_LATENCY_S)
        busbw = number(node, "busbw_bytes_per_s", where, zero_ok=False)
    else:  # summary figures of the curves: the smallest message's time, the largest's bus bandwidth
        m = max(flat)
        s, t = flat[m].points[-1]
        alpha, busbw = flat[min(flat)].points[0][1], bus_factor(kind, m) * s / t
    return LinkCost(alpha, busbw, kind, flat, multi)


def parse_links(links: Any, where: str, curves_allowed: bool) -> tuple[dict[str, dict[str, LinkCost]], dict[str, str]]:
    """The ``links`` section: per link class a ``name`` and one entry per collective kind."""
    costs: dict[str, dict[str, LinkCost]] = {}
    names: dict[str, str] = {}
    _exact(links, LINK_CLASSES, f"{where}: links")
    for cls in LINK_CLASSES:
        node = links[cls]
        _exact(node, COLLECTIVES + ("name",), f"{where}: links: {cls}", optional=("name",))
        names[cls] = str(node.get("name", cls))
        costs[cls] = {kind: parse_entry(node[kind], kind, cls, f"{where}: links.{cls}.{kind}", curves_allowed)
                      for kind in COLLECTIVES}
    return costs, names


def _exact(node: Any, keys: tuple[str, ...], where: str, optional: tuple[str, ...] = ()) -> None:
    if not isinstance(node, dict):
        raise ConfigError(f"{where} must be an object with keys {list(keys)}")
    unknown = sorted(set(node) - set(keys))
    missing = sorted(set(keys) - set(optional) - set(node))
    if unknown or missing:
        raise ConfigError(f"{where}: " + "; ".join(
            ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing key(s) {missing}"] if missing else []))
            + f"; allowed: {sorted(keys)}")


def fit_time_curve(sizes: np.ndarray, times: np.ndarray, max_points: int = 40) -> list[list[float]]:
    """Curve points ``[[size_bytes, time_s], ...]`` fitted to measured collective times.

    Times of one size are pooled by their median; the medians' log times are fitted by
    isotonic least squares weighted by rows per size (``scipy.optimize.isotonic_regression``),
    so the curve never says a larger message is faster, whatever the noise of small messages;
    of more than ``max_points`` sizes, the knots kept are the measured sizes nearest to
    ``max_points`` log-spaced ones, always including the smallest and the largest.
    """
    from scipy.optimize import isotonic_regression

    df = pd.DataFrame({"s": np.asarray(sizes, dtype=float), "t": np.asarray(times, dtype=float)})
    if df.empty or (df.s <= 0).any() or (df.t <= 0).any() or not np.isfinite(df.to_numpy()).all():
        raise ConfigError(f"collective curve: sizes and times must be positive and finite, got {len(df)} rows")
    g = df.groupby("s").t
    logs, logt, w = np.log(g.median().index.to_numpy()), np.log(g.median().to_numpy()), g.size().to_numpy()
    fitted = isotonic_regression(logt, weights=w.astype(float)).x
    keep = np.arange(len(logs))
    if len(logs) > max_points:
        targets = np.linspace(logs[0], logs[-1], max_points)
        keep = np.unique(np.abs(logs[None, :] - targets[:, None]).argmin(axis=1))
    points: dict[float, float] = {}  # rounding may merge neighbouring knots: keep the later time
    for i in keep:
        points[float(max(1, round(math.exp(logs[i]))))] = float(f"{math.exp(fitted[i]):.4g}")
    return [[s, t] for s, t in points.items()]


def merge_entry(base: dict, curves: dict[str, list], source: dict[str, str]) -> dict:
    """A ``links`` entry: ``base`` with ``curves`` measured anew (group key → points) and
    ``source`` (``{"cite": ...}`` or ``{"command": ...}``) naming where they came from.

    Curves of groups not measured anew stay; the α + busbw pair stays (with its citation
    appended) only while no single-node curve exists, since multi-node curves alone cannot
    serve a collective inside a node or across one rank per node.
    """
    merged = {**base.get("curves", {}), **curves}
    out: dict[str, Any] = {"curves": merged, **source}
    if all("x" in g for g in merged):
        out.update({k: base[k] for k in ("alpha_s", "busbw_bytes_per_s") if k in base})
        key = next(iter(source))
        out[key] = f"{source[key]}; alpha_s/busbw_bytes_per_s kept: {base.get('cite') or base.get('command')}"
    return out
