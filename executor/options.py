"""How to run a plan: the options of one executor run, importable without torch (so
``python -m executor.run`` checks its flags before importing it)::

    from executor.options import RunOptions
    RunOptions(iterations=4, warmup=1, dtype="float32", timeout_s=300.0)
    RunOptions(iterations=6, warmup=3, drain=1)  # max_staleness 1: 3 steady iterations
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunOptions:
    """How to run a plan (the experiment and the plan say what)."""

    iterations: int = 1  # iterations run: an asynchronous experiment's warm-up and drain included
    warmup: int = 0  # leading iterations left out of the steady-state time
    dtype: str = "float32"  # float32 | float64 | bfloat16
    return_params: bool = False  # send each device's final home shards back (tests)
    # Testing aid: (rank, call) — that rank exits abruptly (os._exit) when it starts the call's
    # compute, as a crashed worker would; (rank, call, iteration): when it starts that
    # iteration's (a streaming rollout's, mid-stream). Never set in normal runs.
    fault: tuple[int, str] | tuple[int, str, int] | None = None
    timeout_s: float | None = None  # per-collective timeout on every group the run creates
    progress: bool = False  # print a line to stderr as each iteration ends
    # generate call → KV tokens of each engine replica (data-parallel rank), split evenly over
    # its virtual engines (executor.serving); a call not named has an unlimited pool
    kv_tokens: dict[str, int] = field(default_factory=dict)
    # send back what each streaming generate call emitted and the weights it served with (tests;
    # executor.stream.Emitted)
    return_streams: bool = False
    # streaming generate call → per engine replica, the ops it has run when it takes each weights
    # version (estimator.spec.stream: the prediction's); a call not named takes each version as
    # early as the rule allows (executor.stream.switch_points)
    switch_at: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    # trailing iterations left out of the steady-state time (Workflow.drain: an asynchronous run's last η)
    drain: int = 0

    def __post_init__(self) -> None:
        if min(self.warmup, self.drain) < 0:
            raise ValueError(f"warmup={self.warmup}, drain={self.drain}: iterations left out of the steady state "
                             "cannot be negative")
        bad = [f"{call}={n!r}" for call, n in self.kv_tokens.items()
               if not isinstance(n, int) or isinstance(n, bool) or n < 0]
        if bad:
            raise ValueError(f"kv_tokens {', '.join(bad)}: KV tokens per engine replica must be whole numbers "
                             "(0: unlimited)")
        bad = [f"{call}={points!r}" for call, points in self.switch_at.items()
               if not all(list(p) == sorted(p) and all(isinstance(x, int) and x >= 0 for x in p) for p in points)]
        if bad:
            raise ValueError(f"switch_at {', '.join(bad)}: a replica's switch points must be ops run (whole numbers "
                             "≥ 0), in order")
