"""Fit a profile's trainer-side numbers to some rows of vTrain's table, holding the others out.

A user fits their own cluster's runs the same way: the numbers fitted are physical costs of
the trainer on the device, each fitted where the rows isolate it, and every fitted number's
``cite`` names the rows it was fitted on.

1. **The per-iteration step** (:func:`step_costs`). Rows with one pipeline stage and one
   data-parallel rank that differ only in their global batch run ``m`` micro-batches and then
   one optimizer step, so their time is linear in ``m``: the intercept is the step. Across
   such groups the intercept is linear in the parameters a device holds (``numpy.polyfit``):
   the slope, in seconds per parameter at the profile's memory bandwidth and efficiency, is the
   fused optimizer's bytes per parameter (``trainer.optimizer.bytes_per_param``), and the
   constant is the trainer's bookkeeping per call (``executor.call_overhead_s``).
2. **Host costs** (:func:`fit_profile`): the host cost per op dispatched (autograd's and the
   backward's kept in the base's proportion) and the trainer's bookkeeping per micro-batch
   stage pass (``executor.micro_batch_overhead_s``), by bounded least squares of the log error
   over all fit rows (``scipy.optimize.least_squares``), the step's numbers held.

The peak FLOP rate stays the datasheet's and the links stay the base's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from analysis.vtrain import VTrainRow, row_experiment
from estimator.base.errors import ConfigError
from estimator.base.progress import progress_bar
from estimator.cost.pieces import stage_params
from estimator.profile.profiles import Profile, profile_from_dict

FIT_TERMS = ("dispatch_s", "micro_batch_overhead_s")  # least squares
FIT_BOUNDS = ((1e-7, 0.0), (1e-3, 5e-3))  # per op host cost; per micro-batch stage pass
STEP_TERMS = ("optimizer_bytes_per_param", "call_overhead_s")  # the per-iteration step, by regression
TERMS = STEP_TERMS + FIT_TERMS


def _step_groups(rows: list[VTrainRow]) -> list[tuple[float, float]]:
    """(parameters per device, intercept of time against micro-batches) of every group of rows
    with one stage and one data-parallel rank that share all but their global batch and have
    at least two micro-batch counts."""
    groups: dict[tuple, list[VTrainRow]] = {}
    for r in rows:
        if r.pp == 1 and r.dp == 1:
            groups.setdefault((r.hidden, r.heads, r.layers, r.seq_len, r.tp, r.micro_batch), []).append(r)
    out = []
    for members in groups.values():
        if len({r.micro_batches for r in members}) < 2:
            continue
        model = row_experiment(members[0])[0].models["actor"]
        params = stage_params(model, members[0].tp, 1, 0, model.layers)
        _, intercept = np.polyfit([r.micro_batches for r in members], [r.measured_s for r in members], 1)
        out.append((float(params), float(intercept)))
    return out


def step_costs(rows: list[VTrainRow], base: Profile) -> dict[str, Any]:
    """:data:`STEP_TERMS` from ``rows`` (see the module docstring), with the regression's
    ``groups`` and ``seconds_per_param``; empty where fewer than two groups of one stage and
    one data-parallel rank exist (the base's numbers are then kept)."""
    groups = _step_groups(rows)
    if len({p for p, _ in groups}) < 2:
        return {}
    params, intercepts = (np.array(v) for v in zip(*groups))
    slope, const = np.polyfit(params, intercepts, 1)
    if slope <= 0:
        raise ConfigError(f"the step's time falls with the parameters per device ({slope:.3g} s per parameter "
                          f"over {len(groups)} groups): these rows cannot give an optimizer's bytes per parameter")
    nbytes = slope * base.mem_bandwidth_Bps  # at full bandwidth; then at the efficiency of that traffic
    nbytes *= float(base.mem_efficiency(nbytes * float(np.median(params))))
    return {"optimizer_bytes_per_param": float(nbytes), "call_overhead_s": float(max(const, 0.0)),
            "seconds_per_param": float(slope), "groups": len(groups)}


def fitted_doc(base: Profile, name: str, terms: dict[str, float], cite: str) -> dict:
    """``base``'s document with the numbers of :data:`TERMS` that ``terms`` gives, each cited."""
    doc = copy.deepcopy(base.raw)
    doc["name"], doc["source"] = name, "measured"
    if "dispatch_s" in terms:
        dispatch_s = float(terms["dispatch_s"])
        launch = doc["compute"]["launch"]
        ratio = dispatch_s / base.launch_overhead_s if base.launch_overhead_s > 0 else None
        for key in ("grad_overhead_s", "backward_overhead_s"):
            if key in launch:
                launch[key] = launch[key] * ratio if ratio is not None else dispatch_s
        launch.update(overhead_s=dispatch_s, cite=cite)
        launch.pop("command", None)
    executor = doc.setdefault("executor", {"call_overhead_s": 0.0, "micro_batch_overhead_s": 0.0})
    for key in ("micro_batch_overhead_s", "call_overhead_s"):
        if key in terms:
            executor.update({key: float(terms[key]), "cite": cite})
            executor.pop("command", None)
    if "optimizer_bytes_per_param" in terms:
        optimizer = doc.get("trainer", {}).get("optimizer")
        if optimizer is None:
            raise ConfigError(f"--base {base.name}: its trainer has no fused optimizer whose bytes per parameter "
                              "could be fitted (make it with: python -m analysis.published make-profile)")
        optimizer.update(bytes_per_param=float(terms["optimizer_bytes_per_param"]), cite=cite)
    return doc


Predict = Callable[[list[VTrainRow], Profile], np.ndarray]  # rows, profile → predicted seconds


def fit_profile(rows: list[VTrainRow], base: Profile, name: str, cite: str, predict: Predict,
                progress: bool = True) -> tuple[dict, dict[str, Any]]:
    """The profile document fitted to ``rows`` (module docstring) and the fit's figures:
    every term of :data:`TERMS`, the regression's, evaluations, rows and MAPE on them."""
    from scipy import optimize

    step = step_costs(rows, base)
    held = {k: step[k] for k in STEP_TERMS if k in step}
    if not base.trainer.fused_optimizer:  # the census's Adam: its traffic is the executor's, not fitted
        held.pop("optimizer_bytes_per_param", None)
    measured = np.array([r.measured_s for r in rows])
    bar = progress_bar(desc="fit evaluations", unit="eval", disable=not progress)
    evaluations = 0

    def residuals(x: np.ndarray) -> np.ndarray:
        nonlocal evaluations
        doc = fitted_doc(base, name, {**held, **dict(zip(FIT_TERMS, x))}, cite)
        pred = predict(rows, profile_from_dict(doc, where=f"profile {name}"))
        evaluations += 1
        bar.update()
        return np.log(pred / measured)

    x0 = np.clip([base.launch_overhead_s, base.micro_batch_overhead_s or 1e-4], *FIT_BOUNDS)
    fit = optimize.least_squares(residuals, x0, bounds=FIT_BOUNDS, x_scale=[1e-5, 1e-4], diff_step=1e-2,
                                 method="trf", xtol=1e-4, ftol=1e-5)
    bar.close()
    terms = {**held, **dict(zip(FIT_TERMS, (float(v) for v in fit.x)))}
    result = {**terms, **{k: step[k] for k in ("seconds_per_param", "groups") if k in step},
              "evaluations": int(evaluations), "fit_rows": len(rows),
              "fit_mape": float(np.mean(np.abs(np.expm1(fit.fun))))}
    return fitted_doc(base, name, terms, cite), result
