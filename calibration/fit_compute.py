"""Fit the compute side of a profile from raw kernel rows, and report it on held-out shapes.

Every raw row (:mod:`calibration.kernels`) carries the aten ops it dispatched, each with its
FLOPs and bytes. The profile prices one aten op by the contract the estimator evaluates
(:func:`op_times`, the one place it is written)::

    device = max(flops / (peak · eff_f(flops)), bytes / (bandwidth · eff_m(bytes)))
    time   = device + launches · overhead_s      (compose "serial": host waits, CPU)
           = max(device, launches · overhead_s)  (compose "overlap": asynchronous kernels, CUDA)

and a row is predicted as the sum over its ops (views and allocations are ops with no work:
they cost their dispatch only). :func:`fit_compute` fits

- ``compute.compose`` from the ``compose`` rows: the product-then-stream pair against each
  alone; serial when the pair costs more than half the stream beyond the product;
- ``compute.launch.overhead_s`` (host cost per aten op under ``no_grad``) by bounded scalar
  minimisation (``scipy.optimize``) of the squared log error over the training rows of the
  executor's no-grad pieces (every no-grad row when the raw rows hold no piece), each piece
  weighted alike, with the curves refitted at every candidate. Pieces, not isolated ops, set
  it: the estimator predicts pieces, and on a CPU the host time around each dispatch inside the
  model code (its Python) is part of each op's cost that an op timed alone in a loop does not
  show. Then, with the curves held, ``grad_overhead_s`` to the training forward (autograd
  records every op: it builds the graph node) and ``backward_overhead_s`` to the backward
  pieces (the autograd engine runs each op), the same way (:func:`row_modes` says which rows
  run how); eager PyTorch on a CPU pays several times the no-grad cost per op there;
- the curves: for every training row whose work is one aten op, that op's device time (the
  row's time less its dispatches) gives an achieved rate; rates are grouped in quarter-decades of
  size and each group's median becomes a point, ``peak`` (or ``bandwidth``) the best group and
  the efficiencies relative to it. FLOP-counted ops (``gemm``, ``attention``) give
  ``compute.efficiency`` by FLOPs (decoding's matrix-vector products included: their rate is
  what they reach); ops without FLOPs (``elementwise``, ``stream``, ``dispatch``,
  ``embedding``, ``softmax``) ``memory.efficiency`` by bytes. Rows whose device
  time is under a tenth of their time are dispatch-bound and say nothing about rates;
- then, on whole stage passes (``pass`` rows) where the grid has them (:func:`fit_in_model`):
  per dispatch mode, the host cost per op and ``compute.in_model``, how much longer an op's
  device time is inside the model's code than alone in a loop (a pass's many fresh tensors
  against one warm, reused set) — fitted to the passes of that mode, each kind of pass
  weighted alike, the curves rederived at each no-grad candidate; the optimizer's ops are
  not model code and keep scale 1. The estimator predicts whole passes as sums of pieces, and
  on a CPU the pieces and the ops timed alone both leave out what a real pass costs;
- activation checkpointing's own cost per block beyond the ops it runs (its saved-tensor
  hooks, the state it keeps for the recomputation), forward and backward
  (:func:`fit_checkpoint`): the median excess per checkpointed block of the recomputing
  passes, written as ``executor.checkpoint_forward_s`` / ``checkpoint_backward_s``;
- ``executor`` (when :mod:`calibration.overheads` rows are present): the per-micro-batch cost
  is the slope over micro-batches of the engine's time outside its marked computations, the
  per-call cost the intercept of the call's (``scipy.stats.linregress``).

Held-out shapes: in each family (and each piece: ``block_fwd/decode``, ``head/all``, …), rows
sorted by size; every ``holdout_every``-th is left out of the fit. The report gives, per family
and split (``fit``, ``held-out``), n, the median and max absolute error in %, the signed bias
and the host time per aten op the rows show; a piece's prediction is the sum of its aten ops'
predictions, against the piece timed as one.

Usage::

    from calibration.fit_compute import fit_compute
    sections, report = fit_compute(raw, command="python -m estimator.calibrate --quick")
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import optimize, stats

from calibration.aten import decode
from calibration.kernels import PIECES
from estimator.base.errors import ConfigError

COMPUTE_FAMILIES = ("gemm", "attention")
MEMORY_FAMILIES = ("elementwise", "stream", "dispatch", "embedding", "softmax")
NOT_OPS = ("compose", "executor")  # rows that are not kernel cases
MIN_DEVICE_FRACTION = 0.1
BIN_DECADES = 0.25
GOAL_PCT = 10.0
STATS = ("median_s", "p10_s", "p90_s")
DISPATCH_MODES = ("nograd", "grad", "backward")  # estimator.profile.profiles.DISPATCH_MODES
BACKWARD_PIECES = ("block_bwd", "head_bwd")
IN_MODEL = tuple(f for f in PIECES if f != "optimizer")  # pieces of the model's own code (compute.in_model)


RECOMPUTE_PASSES = ("train_recompute", "backward_recompute")  # pass ops that checkpoint every block


def checkpointed_blocks(raw: pd.DataFrame) -> np.ndarray:
    """(rows, 2): blocks each row runs under activation checkpointing, in its forward (column
    0) and in its backward (column 1) — the recomputing passes' layers, 0 elsewhere."""
    out = np.zeros((len(raw), 2))
    if len(raw) and "layers" in raw:
        layers = raw["layers"].fillna(0).to_numpy(dtype=float)
        for j, op in enumerate(RECOMPUTE_PASSES):
            sel = ((raw["family"] == "pass") & (raw["op"] == op)).to_numpy()
            out[sel, j] = layers[sel]
    return out


def row_modes(raw: pd.DataFrame) -> np.ndarray:
    """Per row, how its ops are dispatched (an index into :data:`DISPATCH_MODES`): a backward
    piece runs in the autograd engine, the training forward records the graph, and everything
    else — single ops, inference, decoding, the optimizer — runs under ``no_grad``."""
    grad = raw["family"].isin(("block_fwd", "pass")) & raw["op"].isin(("train", "train_recompute"))
    backward = raw["family"].isin(BACKWARD_PIECES) | (
        (raw["family"] == "pass") & raw["op"].isin(("backward", "backward_recompute")))
    return np.where(backward, 2, np.where(grad, 1, 0))


@dataclass(frozen=True)
class Params:
    """The numbers of the contract formula."""

    peak_flops: float
    compute_points: np.ndarray  # (k, 2): FLOPs, efficiency
    bandwidth: float
    memory_points: np.ndarray  # (k, 2): bytes, efficiency
    overhead_s: float  # host cost per aten op under no_grad
    mode: str  # serial | overlap
    grad_overhead_s: float | None = None  # per op autograd records (training forward); None: overhead_s
    backward_overhead_s: float | None = None  # per op of a backward pass; None: overhead_s
    # device time of an op inside the model's code against the same op timed alone, per dispatch mode
    device_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # activation checkpointing's own cost per block beyond the ops it runs: (forward, backward)
    checkpoint_s: tuple[float, float] = (0.0, 0.0)

    def dispatch(self, modes: np.ndarray) -> np.ndarray:
        """Host cost per op for each entry of ``modes`` (:data:`DISPATCH_MODES` indices), as
        :meth:`estimator.profile.profiles.Profile.dispatch_s` charges it."""
        per_mode = np.array([self.overhead_s,
                             self.overhead_s if self.grad_overhead_s is None else self.grad_overhead_s,
                             self.overhead_s if self.backward_overhead_s is None else self.backward_overhead_s])
        return per_mode[np.asarray(modes, dtype=int)]


def _eff(sizes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Log-linear interpolation held flat beyond the ends (``estimator.profile.profiles.Curve``)."""
    return np.interp(np.log(np.maximum(sizes, 1e-300)), np.log(points[:, 0]), points[:, 1])


def op_times(flops: np.ndarray, nbytes: np.ndarray, launches: np.ndarray | float, p: Params,
             modes: np.ndarray | int = 0, in_model: np.ndarray | bool = False) -> np.ndarray:
    """Seconds of ops of ``flops`` and ``nbytes`` issuing ``launches`` each in dispatch
    ``modes`` (indices into :data:`DISPATCH_MODES`), by the contract; ``in_model``: the op runs
    inside the executor's model code (a piece or a pass), its device time scaled by the mode's
    ``device_scale``."""
    flops, nbytes = np.asarray(flops, dtype=float), np.asarray(nbytes, dtype=float)
    compute = np.where(flops > 0, flops / (p.peak_flops * _eff(flops, p.compute_points)), 0.0)
    memory = np.where(nbytes > 0, nbytes / (p.bandwidth * _eff(nbytes, p.memory_points)), 0.0)
    scale = np.where(in_model, np.asarray(p.device_scale)[np.asarray(modes, dtype=int)], 1.0)
    device, host = np.maximum(compute, memory) * scale, np.asarray(launches, dtype=float) * p.dispatch(modes)
    return device + host if p.mode == "serial" else np.maximum(device, host)


class OpTable:
    """Every aten op of every row, flattened once so predictions are one vectorised pass."""

    def __init__(self, raw: pd.DataFrame):
        rows, flops, nbytes = [], [], []
        for i, text in enumerate(raw["ops"].fillna("")):
            f, b = decode(text)
            rows += [i] * len(f)
            flops += f
            nbytes += b
        self.n = len(raw)
        self.row, self.flops, self.bytes = np.asarray(rows, dtype=int), np.asarray(flops), np.asarray(nbytes)
        self.modes = row_modes(raw.reset_index(drop=True))[self.row] if len(raw) else np.zeros(0, dtype=int)
        self.in_model = raw["family"].isin(IN_MODEL).to_numpy()[self.row] if len(raw) else np.zeros(0, dtype=bool)
        self.checkpointed = checkpointed_blocks(raw.reset_index(drop=True))

    def predict(self, p: Params) -> np.ndarray:
        """Predicted seconds of every row: the sum of its ops, plus activation checkpointing's
        own cost per block on the passes that recompute."""
        times = op_times(self.flops, self.bytes, 1.0, p, self.modes, self.in_model)
        return np.bincount(self.row, weights=times, minlength=self.n) + self.checkpointed @ np.asarray(p.checkpoint_s)


def params_from_sections(sections: dict) -> Params:
    """The contract's numbers from fitted (or loaded) profile sections."""
    c, m = sections["compute"], sections["memory"]
    launch, scale, ex = c["launch"], c.get("in_model", {}), sections.get("executor", {})
    return Params(float(c["peak"]["flops_per_s"]), np.asarray(c["efficiency"]["points"], dtype=float),
                  float(m["bandwidth"]["bytes_per_s"]), np.asarray(m["efficiency"]["points"], dtype=float),
                  float(launch["overhead_s"]), str(c["compose"]["mode"]),
                  launch.get("grad_overhead_s"), launch.get("backward_overhead_s"),
                  tuple(float(scale.get(k, 1.0)) for k in DISPATCH_MODES),
                  tuple(float(ex.get(f"checkpoint_{k}_s", 0.0)) for k in ("forward", "backward")))


# ---- the fit ------------------------------------------------------------------------------------


def compose_mode(raw: pd.DataFrame) -> tuple[str, float]:
    """``serial`` or ``overlap`` and the measured ratio (pair − product) / stream."""
    t = raw[raw["family"] == "compose"].set_index("op")["median_s"]
    if not {"big", "stream", "both"} <= set(t.index):
        raise ConfigError("raw measurements hold no compose rows (big, stream, both): "
                          "measure them with calibration.timing.measure")
    ratio = float((t["both"] - t["big"]) / t["stream"])
    return ("serial" if ratio > 0.5 else "overlap"), ratio


def _curve(sizes: np.ndarray, rates: np.ndarray, what: str) -> tuple[float, np.ndarray]:
    """Peak rate and (size, efficiency) points: medians per quarter-decade of size."""
    if len(sizes) == 0:
        raise ConfigError(f"no usable measurements to fit the {what} curve: the grid needs single-op rows "
                          "whose device time exceeds their dispatch cost")
    bins = np.floor(np.log10(sizes) / BIN_DECADES)
    df = pd.DataFrame({"bin": bins, "logsize": np.log(sizes), "rate": rates})
    g = df.groupby("bin").agg(logsize=("logsize", "median"), rate=("rate", "median"))
    peak = float(g["rate"].max())
    return peak, np.column_stack([np.exp(g["logsize"].to_numpy()), g["rate"].to_numpy() / peak])


def _single_work(raw: pd.DataFrame) -> pd.DataFrame:
    """Rows whose work is one aten op, with that op's FLOPs and bytes."""
    out = []
    for i, text in raw["ops"].items():
        f, b = decode(text)
        work = [(x, y) for x, y in zip(f, b) if x > 0 or y > 0]
        if len(work) == 1:
            out.append((i, *work[0]))
    return pd.DataFrame(out, columns=["idx", "op_flops", "op_bytes"]).set_index("idx")


def fit_params(train: pd.DataFrame, work: pd.DataFrame, overhead_s: float, mode: str) -> Params:
    """The curves at a given dispatch cost, from the training rows."""
    rows = train.join(work, how="inner")
    dispatches = rows["launches"] - (0 if mode == "serial" else 1)
    device = rows["median_s"] - dispatches * overhead_s
    usable = device > MIN_DEVICE_FRACTION * rows["median_s"]
    comp = usable & rows["family"].isin(COMPUTE_FAMILIES) & (rows["op_flops"] > 0)
    mem = usable & rows["family"].isin(MEMORY_FAMILIES) & (rows["op_flops"] == 0) & (rows["op_bytes"] > 0)
    peak, cpts = _curve(rows.loc[comp, "op_flops"].to_numpy(), (rows["op_flops"] / device)[comp].to_numpy(),
                        "compute (FLOPs)")
    bw, mpts = _curve(rows.loc[mem, "op_bytes"].to_numpy(), (rows["op_bytes"] / device)[mem].to_numpy(),
                      "memory (bytes)")
    return Params(peak, cpts, bw, mpts, overhead_s, mode)


def holdout_mask(raw: pd.DataFrame, every: int = 2) -> pd.Series:
    """True for held-out rows: in each single-op family sorted by size, every ``every``-th."""
    if every < 2:
        raise ConfigError(f"holdout_every={every} must be at least 2 (every n-th shape is held out)")
    held = pd.Series(False, index=raw.index)
    for fam, g in raw.groupby(_group(raw)):
        key = g["flops"] if fam in COMPUTE_FAMILIES else g["bytes"]
        order = g.assign(key=key).sort_values(["key", "op", "model", "tp"], kind="stable").index
        held[order[every - 1::every]] = True
    return held


def _is_single(raw: pd.DataFrame) -> pd.Series:
    return ~raw["family"].isin(PIECES + NOT_OPS)


def _group(raw: pd.DataFrame) -> pd.Series:
    """The report's groups: a single-op family, or one piece of the executor (family/op)."""
    return raw["family"].where(_is_single(raw), raw["family"] + "/" + raw["op"])


def _error_pct(pred: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return 100.0 * np.abs(pred - measured) / measured


def fit_compute(raw: pd.DataFrame, holdout_every: int = 2, command: str = "python -m calibration.kernels",
                stat: str = "median_s", in_model: bool = True) -> tuple[dict, pd.DataFrame]:
    """Fitted ``compute``, ``memory`` (without capacity) and, when measured, ``executor``
    sections in the profile format, and the report (see the module docstring). ``stat`` is
    the column fitted and reported against: the median of the repeats, or ``p10_s`` where
    other work preempts the measurement (a loaded machine) and the fast samples are the clean
    ones."""
    if stat not in STATS:
        raise ConfigError(f"stat={stat!r} must be one of {STATS}")
    raw = raw.reset_index(drop=True).assign(median_s=raw[stat].to_numpy())
    mode, _ = compose_mode(raw)
    kernels = raw[~raw["family"].isin(NOT_OPS)].reset_index(drop=True)
    held = holdout_mask(kernels, holdout_every)
    train = kernels[~held]
    work = _single_work(train[_is_single(train)])
    table = OpTable(train)

    # The no-grad dispatch cost is fitted to the no-grad pieces the estimator predicts (every
    # no-grad row if there is none), the curves refitted at each candidate; then the costs per
    # op that autograd records and that a backward pass runs, each to its own pieces, the
    # curves held.
    modes, pieces = row_modes(train), ~_is_single(train).to_numpy()
    base = pieces & (modes == 0) if (pieces & (modes == 0)).any() else modes == 0

    def loss(make: Callable[[float], Params], target: np.ndarray) -> Callable[[float], float]:
        tt, groups = train["median_s"].to_numpy()[target], _group(train).to_numpy()[target]

        def f(o: float) -> float:
            try:
                pred = table.predict(make(o))[target]
            except ConfigError:
                return np.inf
            return float(pd.Series(np.log(pred / tt) ** 2).groupby(groups).mean().mean())
        return f

    def fit_one(make: Callable[[float], Params], target: np.ndarray) -> float:
        hi = float((train["median_s"] / train["launches"].clip(lower=1)).to_numpy()[target].max())
        best = optimize.minimize_scalar(loss(make, target), bounds=(0.0, hi), method="bounded",
                                        options={"xatol": hi * 1e-4})
        return float(best.x)

    p = fit_params(train, work, fit_one(lambda o: fit_params(train, work, o, mode), base), mode)
    for i, field in ((1, "grad_overhead_s"), (2, "backward_overhead_s")):
        if (modes == i).any():
            p = replace(p, **{field: fit_one(lambda o, f=field, q=p: replace(q, **{f: o}), modes == i)})
    if in_model:
        p = fit_in_model(train, table, p, lambda o: fit_params(train, work, o, mode))
    sections = to_sections(p, command)
    if (raw["family"] == "executor").any():
        sections["executor"] = executor_section(raw, command)
    if any(p.checkpoint_s):
        sections.setdefault("executor", {"call_overhead_s": 0.0, "micro_batch_overhead_s": 0.0, "command": command})
        sections["executor"].update(checkpoint_forward_s=p.checkpoint_s[0], checkpoint_backward_s=p.checkpoint_s[1])
    return sections, report(kernels, np.where(held, "held-out", "fit"), p)


SCALE_BOUNDS = (0.5, 4.0)  # device time inside the model's code against the same op alone
OVERHEAD_BOUNDS = (1e-8, 1e-3)  # host seconds per aten op


def fit_in_model(train: pd.DataFrame, table: OpTable, p: Params,
                 curves: Callable[[float], Params] | None = None) -> Params:
    """Per dispatch mode, the host cost per op and the in-model device scale that best predict
    the whole stage passes of that mode (``pass`` rows: the engine's own sequence of pieces),
    in squared log error, each kind of pass weighted alike: for each host cost the best scale
    (``scipy.optimize.least_squares``),
    the host cost searched on a log grid around the staged fit's and refined by bounded scalar
    minimisation (the curves, read off single ops less the no-grad cost, are rederived at each
    no-grad candidate by ``curves``, which makes that loss piecewise smooth only; the other
    modes hold them). Then activation checkpointing's own cost (:func:`fit_checkpoint`). ``p``
    unchanged where the rows hold no pass."""
    measured = train["median_s"].to_numpy()
    modes = row_modes(train)
    passes = ((train["family"] == "pass") & ~train["op"].isin(RECOMPUTE_PASSES)).to_numpy()
    fields = ("overhead_s", "grad_overhead_s", "backward_overhead_s")
    groups = _group(train).to_numpy()
    for i, name in enumerate(fields):
        rows = passes & (modes == i)
        if not rows.any():
            continue
        codes = pd.factorize(groups[rows])[0]
        weight = 1.0 / np.sqrt(np.bincount(codes)[codes])  # each kind of pass alike (decode has more shapes)

        def at(o: float, k: float, i: int = i, name: str = name, q: Params = p) -> Params:
            base = curves(o) if i == 0 and curves is not None else q
            kept = {f: getattr(q, f) for f in fields[1:]} | {name: o}
            return replace(base, **kept, device_scale=_with(q.device_scale, i, k))

        @functools.cache
        def best_scale(log_o: float, rows: np.ndarray = rows, at=at, i: int = i,
                       weight: np.ndarray = weight) -> tuple[float, float]:
            """(loss, scale) at host cost exp(log_o)."""
            o = float(np.exp(log_o))
            try:
                q = at(o, 1.0)
            except ConfigError:  # no single op left above this dispatch cost: no curves
                return np.inf, 1.0
            fit = optimize.least_squares(lambda x: weight * np.log(table.predict(replace(q, device_scale=_with(
                q.device_scale, i, float(np.exp(x[0])))))[rows] / measured[rows]), [0.0],
                bounds=(np.log([SCALE_BOUNDS[0]]), np.log([SCALE_BOUNDS[1]])), method="trf")
            return float(2 * fit.cost), float(np.exp(fit.x[0]))

        start = float(np.log(np.clip(p.dispatch(np.array([i]))[0], *OVERHEAD_BOUNDS)))
        grid = np.clip(start + np.log(10.0) * np.linspace(-1, 1, 21), *np.log(OVERHEAD_BOUNDS))
        losses = [best_scale(g)[0] for g in grid]
        j = int(np.argmin(losses))
        lo, hi = grid[max(j - 1, 0)], grid[min(j + 1, len(grid) - 1)]
        refined = optimize.minimize_scalar(lambda g: best_scale(g)[0], bounds=(lo, hi), method="bounded",
                                           options={"xatol": 1e-4})
        log_o = float(refined.x) if refined.fun <= losses[j] else float(grid[j])
        p = at(float(np.exp(log_o)), best_scale(log_o)[1])
    return fit_checkpoint(train, table, p)


def _with(values: tuple[float, ...], i: int, v: float) -> tuple[float, ...]:
    return tuple(v if k == i else x for k, x in enumerate(values))


def fit_checkpoint(train: pd.DataFrame, table: OpTable, p: Params) -> Params:
    """Activation checkpointing's own cost per block (its saved-tensor hooks, the RNG state it
    keeps, the recomputation it arranges), forward and backward: the median over the
    recomputing passes of what they take beyond their ops, per checkpointed block, at least
    0. ``p`` unchanged where the rows hold no recomputing pass."""
    measured = train["median_s"].to_numpy()
    base = replace(p, checkpoint_s=(0.0, 0.0))
    extra = measured - table.predict(base)
    out = []
    for j in range(2):
        blocks = table.checkpointed[:, j]
        sel = blocks > 0
        out.append(max(float(np.median(extra[sel] / blocks[sel])), 0.0) if sel.any() else 0.0)
    return replace(p, checkpoint_s=(out[0], out[1]))


def to_sections(p: Params, command: str) -> dict:
    def points(a: np.ndarray) -> list[list[float]]:
        return [[float(f"{s:.6g}"), float(f"{min(e, 1.0):.6g}")] for s, e in a]

    curve = {"interpolation": "log-linear", "command": command}
    return {
        "compute": {"peak": {"flops_per_s": p.peak_flops, "command": command},
                    "efficiency": {"by": "flops", "points": points(p.compute_points), **curve},
                    "launch": {"overhead_s": p.overhead_s, "command": command,
                               **{k: v for k, v in (("grad_overhead_s", p.grad_overhead_s),
                                                    ("backward_overhead_s", p.backward_overhead_s))
                                  if v is not None}},
                    "compose": {"mode": p.mode, "command": command},
                    **({"in_model": {**{k: float(f"{v:.6g}") for k, v in zip(DISPATCH_MODES, p.device_scale)},
                                     "command": command}} if any(v != 1.0 for v in p.device_scale) else {})},
        "memory": {"bandwidth": {"bytes_per_s": p.bandwidth, "command": command},
                   "efficiency": {"by": "bytes", "points": points(p.memory_points), **curve}},
    }


def executor_section(raw: pd.DataFrame, command: str) -> dict:
    """Fixed costs of the runtime (see :mod:`calibration.overheads`): the per-micro-batch
    slope of the engine's time outside its marked computations, and the intercept of the
    call's. Rows without the unmarked split fall back to totals less the stage's kernels."""
    rows = raw[raw["family"] == "executor"]

    def fit(op: str) -> tuple[float, float]:
        sel = rows[rows["op"] == op]
        if sel["batch"].nunique() < 2:
            raise ConfigError(f"executor rows need {op!r} at two or more micro-batch counts")
        r = stats.linregress(sel["batch"], sel["median_s"])
        return float(r.slope), float(r.intercept)

    if (rows["op"] == "engine_forward_unmarked").any():
        per_mb, _ = fit("engine_forward_unmarked")
        _, per_call = fit("call_unmarked")
    else:
        kernel = float(rows.loc[rows["op"] == "stage_kernels", "median_s"].median())
        if np.isnan(kernel):
            raise ConfigError("executor rows need stage_kernels to subtract from engine_forward")
        slope, _ = fit("engine_forward")
        per_mb, per_call = slope - kernel, fit("call")[1]
    return {"call_overhead_s": max(per_call, 0.0), "micro_batch_overhead_s": max(per_mb, 0.0), "command": command}


def report(kernels: pd.DataFrame, split: np.ndarray, p: Params) -> pd.DataFrame:
    """Per family (and per piece) and split: n, median and max absolute error in %, the bias
    (median predicted/measured − 1, in %: negative when the fit predicts too little), and the
    host time per aten op the rows show (their time less the fitted device time, per launch,
    in µs) against the fitted dispatch costs."""
    pred = OpTable(kernels).predict(p)
    df = kernels.assign(split=split, predicted_s=pred, error_pct=_error_pct(pred, kernels["median_s"].to_numpy()))
    df["group"] = _group(df)
    df["ratio"] = pred / kernels["median_s"].to_numpy()
    device = OpTable(kernels).predict(replace(p, overhead_s=0.0, grad_overhead_s=0.0, backward_overhead_s=0.0))
    df["host_us"] = 1e6 * (kernels["median_s"].to_numpy() - device) / kernels["launches"].clip(lower=1).to_numpy()
    g = df.groupby(["group", "split"], sort=True)
    out = (g["error_pct"].agg(n="size", median_pct="median", max_pct="max")
           .join(100.0 * (g["ratio"].median() - 1.0)).rename(columns={"ratio": "bias_pct"})
           .join(g["host_us"].median()).rename(columns={"host_us": "host_us_per_launch"})
           .reset_index().rename(columns={"group": "family"}))
    out["goal_met"] = out["median_pct"] <= GOAL_PCT
    return out
