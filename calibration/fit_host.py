"""Fit how much faster a simulated device computes with its host's other devices idle.

The CPU profile's compute figures are timed with every simulated device of the host busy
(:mod:`calibration.together`), because that is how a plan over all of them runs. A plan that
leaves some idle — one device generating while the other waits, a single-device plan — runs its
ops faster. The calibration therefore times the same grid a second time with one process
alone, and :func:`fit_host` fits the profile's ``host`` section
(:class:`estimator.profile.profiles.HostSharing`): one factor per term of the cost contract
(:func:`calibration.fit_compute.op_times`) — device FLOPs, memory traffic, host dispatch —
by bounded least squares (``scipy.optimize.least_squares``) of the log error of the alone rows
predicted with the shared figures so scaled, each family weighted alike, on the same training
rows as the compute fit; and the executor's fixed costs as the ratio of the alone and shared
per-call and per-micro-batch costs (:func:`calibration.fit_compute.executor_section`). The
report gives, per family on the held-out rows, the error of the alone rows predicted with the
fitted factors and without them (all 1: the shared figures as they are).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
from scipy import optimize

from calibration.fit_compute import (
    NOT_OPS,
    OpTable,
    Params,
    _error_pct,
    _group,
    executor_section,
    holdout_mask,
    params_from_sections,
)
from estimator.base.errors import ConfigError
from estimator.profile.profiles import ALONE_TERMS

FACTOR_BOUNDS = (0.05, 1.0)  # alone never slower than shared; never 20× faster


def scaled(p: Params, flops: float, nbytes: float, dispatch: float) -> Params:
    """``p`` with device FLOP time, memory time and every dispatch cost scaled by the factors."""
    return replace(p, peak_flops=p.peak_flops / flops, bandwidth=p.bandwidth / nbytes,
                   overhead_s=p.overhead_s * dispatch,
                   grad_overhead_s=None if p.grad_overhead_s is None else p.grad_overhead_s * dispatch,
                   backward_overhead_s=None if p.backward_overhead_s is None else p.backward_overhead_s * dispatch)


def _executor_factor(shared: pd.DataFrame, alone: pd.DataFrame, command: str) -> float:
    if not ((shared["family"] == "executor").any() and (alone["family"] == "executor").any()):
        return 1.0
    s, a = executor_section(shared, command), executor_section(alone, command)
    total_s = s["call_overhead_s"] + s["micro_batch_overhead_s"]
    if total_s <= 0:
        return 1.0
    # one call of one micro-batch: what the two fixed costs add up to per call in the plans here
    ratio = (a["call_overhead_s"] + a["micro_batch_overhead_s"]) / total_s
    return float(min(max(ratio, FACTOR_BOUNDS[0]), FACTOR_BOUNDS[1]))


def fit_host(shared: pd.DataFrame, alone: pd.DataFrame, sections: dict, devices: int, holdout_every: int = 2,
             command: str = "python -m estimator.calibrate") -> tuple[dict, pd.DataFrame]:
    """The profile's ``host`` section and its report (see the module docstring). ``shared``
    and ``alone`` are raw rows of the same grid (:mod:`calibration.kernels`,
    :mod:`calibration.overheads`) timed with ``devices`` processes busy and with one;
    ``sections`` the compute and memory fitted to ``shared`` (:func:`fit_compute`)."""
    if devices < 2:
        raise ConfigError(f"devices={devices} must be at least 2 to fit how a host's devices share it")
    p = params_from_sections(sections)
    kernels = alone[~alone["family"].isin(NOT_OPS)].reset_index(drop=True)
    if kernels.empty:
        raise ConfigError("the alone rows hold no kernel cases")
    held = holdout_mask(kernels, holdout_every).to_numpy()
    measured = kernels["median_s"].to_numpy()
    groups = _group(kernels).to_numpy()
    table = OpTable(kernels)
    train = ~held
    codes, uniq = pd.factorize(groups[train])
    weight = 1.0 / np.sqrt(np.bincount(codes)[codes])  # each family alike in the squared loss

    def residuals(x: np.ndarray) -> np.ndarray:
        pred = table.predict(scaled(p, *x))[train]
        return weight * np.log(pred / measured[train])

    fit = optimize.least_squares(residuals, x0=np.full(3, 0.8), bounds=FACTOR_BOUNDS, method="trf")
    factors = dict(zip(ALONE_TERMS[:3], (float(f"{v:.4g}") for v in fit.x)))
    factors["executor"] = float(f"{_executor_factor(shared, alone, command):.4g}")
    pred_alone = table.predict(scaled(p, *fit.x))
    pred_shared = table.predict(p)
    df = kernels.assign(split=np.where(held, "held-out", "fit"), group=groups,
                        err_alone=_error_pct(pred_alone, measured), err_shared=_error_pct(pred_shared, measured))
    report = (df.groupby(["group", "split"], sort=True)
              .agg(n=("err_alone", "size"), median_pct=("err_alone", "median"), max_pct=("err_alone", "max"),
                   median_pct_unscaled=("err_shared", "median"))
              .reset_index().rename(columns={"group": "family"}))
    section = {"devices": int(devices), "alone": {**factors, "command": command}, "command": command}
    return section, report
