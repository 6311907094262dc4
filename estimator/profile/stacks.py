"""A profile's numbers for the production stacks' own costs, and the host link they move over.

A production stack (:mod:`estimator.spec.stack`) costs more than its kernels: the serving
engine's scheduler, sampler and launches at every step, the weight refit from trainer to
engine, the engine's sleep and wake and the trainer's offload around it. The profile file
holds their numbers per stack, each group with its ``cite`` (a public measurement, a
framework's default at a stated commit, or the rows a term was fitted on)::

    "host_link": {"h2d_bytes_per_s": 35.2e9, "d2h_bytes_per_s": 52.8e9, "alpha_s": 1e-5, "cite": "..."},
    "stacks": {"megatron-vllm": {
        "generation": {
            "step": {"fixed_s": ..., "per_request_s": ..., "cite": ...},      # per engine step, host
            "launch": {"cuda_graphs": true, "graph_s": ..., "eager_kernel_s": ..., "cite": ...},
            "scheduler": {"max_num_seqs": 1024, "prefill_chunk_tokens": 16384, "cite": ...},
            "allreduce": {"curves": {"4": [[bytes, seconds], ...]}, "cite": ...}},  # optional
        "refit": {"per_tensor_s": ..., "cite": ...},                            # per parameter tensor
        "trainer": {"micro_batch_s": ..., "cite": ...}}}                        # per micro-batch pass

What each term is charged on (:mod:`estimator.cost.engine` and :mod:`estimator.cost.rollout`):

- ``generation.step``: every engine step (a decode step or a prefill) pays ``fixed_s +
  per_request_s × running requests`` of host time on top of its kernels — scheduling, input
  preparation, sampling bookkeeping and output processing, which vLLM 0.9 does between steps,
  not overlapped with them.
- ``generation.launch``: with ``cuda_graphs`` a decode step is one graph replay (``graph_s``),
  its kernels' launches free; eager, every kernel costs ``eager_kernel_s`` of host time on top
  of its device time (eager vLLM decoding is launch-bound at small batches).
- ``generation.scheduler``: vLLM's ``max_num_seqs`` (the running cap where the layout sets
  none) and ``max_num_batched_tokens`` (the prefill budget of one step).
- ``generation.allreduce`` (optional): the engine's own tensor-parallel all-reduce inside a
  step (vLLM's custom all-reduce kernel, one-shot over NVLink) per group size and message
  size, used instead of the profile's NCCL curves up to its largest size measured.
- ``refit.per_tensor_s``: the refit's fixed cost per parameter tensor of the model (gathered,
  converted to Hugging Face names, packed and handed over by CUDA IPC, loaded by vLLM),
  beside its bytes on the links and the host link.
- ``trainer.micro_batch_s``: the trainer's own cost per micro-batch pass of a train or
  inference call (its Python, packing, loss bookkeeping), beside the kernels.
- ``host_link``: the device ↔ host copy bandwidth of one device (PCIe), each direction, which
  the layout's offload (:mod:`estimator.cost.offload`), the engine's sleep and wake and the
  reference swap use; or ``{"copy": "memory"}`` where host memory is the device's own (the CPU
  executor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from estimator.base.errors import ConfigError
from estimator.base.rules import MAX_LATENCY_S
from estimator.profile.collectives import number
from estimator.spec.stack import STACK_NAMES, STACKS

MAX_RUNNING = 1 << 20  # requests an engine may run at once: above any vLLM setting
MAX_CHUNK_TOKENS = 1 << 24  # tokens one engine step may prefill


@dataclass(frozen=True)
class EngineTerms:
    """A serving engine's own costs (``stacks.<name>.generation``)."""

    step_s: float  # host time of every engine step, fixed, seconds
    step_per_request_s: float  # host time of every engine step per running request, seconds
    cuda_graphs: bool  # decode steps replay CUDA graphs (vLLM's default; enforce_eager=False)
    graph_s: float  # one graph replay per decode step, seconds
    eager_kernel_s: float  # host time per kernel launched eagerly, seconds
    max_num_seqs: int  # running requests per engine where the layout sets no cap (vLLM max_num_seqs)
    prefill_chunk_tokens: int  # tokens one step may prefill (vLLM max_num_batched_tokens)
    # the engine's own tensor-parallel all-reduce inside a step (vLLM's custom all-reduce): group
    # size → ((bytes, seconds), ...) ascending; empty: the profile's collectives
    allreduce: tuple[tuple[int, tuple[tuple[float, float], ...]], ...] = ()

    def __post_init__(self) -> None:
        problems = [f"{k}={getattr(self, k)!r} must be a number of seconds in [0, {MAX_LATENCY_S:g}]"
                    for k in ("step_s", "step_per_request_s", "graph_s", "eager_kernel_s")
                    if not 0.0 <= getattr(self, k) <= MAX_LATENCY_S]
        problems += [f"{k}={getattr(self, k)!r} must be a whole number from 1 to {hi:,}"
                     for k, hi in (("max_num_seqs", MAX_RUNNING), ("prefill_chunk_tokens", MAX_CHUNK_TOKENS))
                     if isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), int)
                     or not 1 <= getattr(self, k) <= hi]
        if not isinstance(self.cuda_graphs, bool):
            problems.append(f"cuda_graphs={self.cuda_graphs!r} must be true or false")
        if problems:
            raise ConfigError("generation: " + "; ".join(problems))

    def step_host_s(self, running: float) -> float:
        """Host time of one engine step with ``running`` requests (an array gives an array)."""
        return self.step_s + self.step_per_request_s * running

    def allreduce_s(self, group: int, nbytes: float) -> float | None:
        """The engine's all-reduce of ``nbytes`` over ``group`` ranks, interpolated log-log in
        its measured curve (the nearest group size measured; held at the smallest size below
        it), or None beyond the largest size measured (the engine falls back to NCCL there)."""
        if not self.allreduce or group < 2:
            return None
        _, points = min(self.allreduce, key=lambda kv: (abs(kv[0] - group), kv[0]))
        sizes = [b for b, _ in points]
        if nbytes > sizes[-1]:
            return None
        if nbytes <= sizes[0]:
            return points[0][1]
        i = next(k for k in range(1, len(sizes)) if sizes[k] >= nbytes)
        (b0, t0), (b1, t1) = points[i - 1], points[i]
        w = math.log(nbytes / b0) / math.log(b1 / b0)
        return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))


@dataclass(frozen=True)
class StackTerms:
    """One stack's numbers on one device: the engine's, the refit's and the trainer's."""

    generation: EngineTerms
    refit_per_tensor_s: float  # fixed refit cost per parameter tensor of the model, seconds
    trainer_micro_batch_s: float  # trainer's own cost per micro-batch pass, seconds
    cites: dict[str, str]  # term group (generation.step, refit, ...) → its source

    def __post_init__(self) -> None:
        for key in ("refit_per_tensor_s", "trainer_micro_batch_s"):
            v = getattr(self, key)
            if not 0.0 <= v <= MAX_LATENCY_S:
                raise ConfigError(f"{key}={v!r} must be a number of seconds in [0, {MAX_LATENCY_S:g}]")


HOST_COPY_KINDS = ("memory",)  # host_link.copy: what a copy to host memory is, where it is not a link
DIRECTIONS = ("upload", "download")  # host → device (h2d), device → host (d2h)


@dataclass(frozen=True)
class HostLink:
    """Copies between one device's memory and host memory (``host_link``): a link with a rate
    per direction, or (``copy``) no link at all — host memory is the device's own, as for the
    CPU executor, and a copy is a copy in device memory
    (:meth:`estimator.profile.profiles.Profile.host_copy_s` prices both)."""

    h2d_Bps: float = 0.0  # host → device, bytes/s; 0 where ``copy`` says what a copy is
    d2h_Bps: float = 0.0  # device → host, bytes/s; 0 where ``copy`` says what a copy is
    alpha_s: float = 0.0  # per copy, seconds
    copy: str = ""  # "memory": host memory is the device's own; "": a link of h2d/d2h bytes/s

    def __post_init__(self) -> None:
        if self.copy:
            if self.copy not in HOST_COPY_KINDS:
                raise ConfigError(f"host_link.copy={self.copy!r} must be one of {list(HOST_COPY_KINDS)}")
            return
        if not (self.h2d_Bps > 0 and self.d2h_Bps > 0 and 0 <= self.alpha_s <= MAX_LATENCY_S):
            raise ConfigError(f"host_link: h2d_bytes_per_s={self.h2d_Bps!r} and d2h_bytes_per_s={self.d2h_Bps!r} "
                              f"must be positive and alpha_s={self.alpha_s!r} in [0, {MAX_LATENCY_S:g}]")

    def bytes_per_s(self, direction: str) -> float:
        """The link's rate ``direction`` (``"upload"``: h2d, ``"download"``: d2h)."""
        if direction not in DIRECTIONS:
            raise ConfigError(f"host copy direction={direction!r} must be one of {list(DIRECTIONS)}")
        return self.h2d_Bps if direction == "upload" else self.d2h_Bps


def _group(node: object, key: str, where: str, keys: tuple[str, ...]) -> dict:
    """``node[key]``: an object with exactly ``keys`` and a ``cite`` or ``command``."""
    sub = node.get(key) if isinstance(node, dict) else None
    if not isinstance(sub, dict):
        raise ConfigError(f"{where}.{key} must be an object with keys {list(keys)} and a 'cite'")
    allowed = set(keys) | {"cite", "command"}
    unknown, missing = sorted(set(sub) - allowed), sorted(set(keys) - set(sub))
    if unknown or missing:
        raise ConfigError(f"{where}.{key}: " + "; ".join(
            ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing key(s) {missing}"] if missing else []))
            + f"; allowed: {sorted(allowed)}")
    if not (str(sub.get("cite", "")).strip() or str(sub.get("command", "")).strip()):
        raise ConfigError(f"{where}.{key} needs a 'cite' (the source of its figures) or a 'command'")
    return sub


def _seconds(node: dict, key: str, where: str) -> float:
    return number(node, key, where, True, MAX_LATENCY_S)


def _count(node: dict, key: str, where: str, hi: int) -> int:
    v = node[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
        raise ConfigError(f"{where}.{key}={v!r} must be a whole number from 1 to {hi:,}")
    return v


def _cite(node: dict) -> str:
    return str(node.get("cite") or node.get("command"))


def parse_stack(node: object, where: str) -> StackTerms:
    """One ``stacks.<name>`` object."""
    if not isinstance(node, dict) or set(node) != {"generation", "refit", "trainer"}:
        shown = sorted(node) if isinstance(node, dict) else type(node).__name__
        raise ConfigError(f"{where} must be an object with keys ['generation', 'refit', 'trainer'], got {shown}")
    gen = node["generation"]
    if not isinstance(gen, dict) or not {"step", "launch", "scheduler"} <= set(gen) <= {"step", "launch", "scheduler",
                                                                                        "allreduce"}:
        raise ConfigError(f"{where}.generation must be an object with keys ['launch', 'scheduler', 'step'] "
                          "(optional 'allreduce')")
    w = f"{where}.generation"
    step = _group(gen, "step", w, ("fixed_s", "per_request_s"))
    launch = _group(gen, "launch", w, ("cuda_graphs", "graph_s", "eager_kernel_s"))
    sched = _group(gen, "scheduler", w, ("max_num_seqs", "prefill_chunk_tokens"))
    if not isinstance(launch["cuda_graphs"], bool):
        raise ConfigError(f"{w}.launch.cuda_graphs={launch['cuda_graphs']!r} must be true or false")
    refit = _group(node, "refit", where, ("per_tensor_s",))
    trainer = _group(node, "trainer", where, ("micro_batch_s",))
    try:
        engine = EngineTerms(
            _seconds(step, "fixed_s", f"{w}.step"), _seconds(step, "per_request_s", f"{w}.step"),
            launch["cuda_graphs"], _seconds(launch, "graph_s", f"{w}.launch"),
            _seconds(launch, "eager_kernel_s", f"{w}.launch"),
            _count(sched, "max_num_seqs", f"{w}.scheduler", MAX_RUNNING),
            _count(sched, "prefill_chunk_tokens", f"{w}.scheduler", MAX_CHUNK_TOKENS),
            _allreduce(gen, w))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    cites = {"generation.step": _cite(step), "generation.launch": _cite(launch),
             "generation.scheduler": _cite(sched), "refit": _cite(refit), "trainer": _cite(trainer)}
    if "allreduce" in gen:
        cites["generation.allreduce"] = _cite(gen["allreduce"])
    return StackTerms(engine, _seconds(refit, "per_tensor_s", f"{where}.refit"),
                      _seconds(trainer, "micro_batch_s", f"{where}.trainer"), cites)


def _allreduce(gen: dict, where: str) -> tuple[tuple[int, tuple[tuple[float, float], ...]], ...]:
    """The optional ``generation.allreduce``: ``{"curves": {group: [[bytes, seconds], ...]}, cite}``."""
    if "allreduce" not in gen:
        return ()
    node = _group(gen, "allreduce", where, ("curves",))
    curves = node["curves"]
    w = f"{where}.allreduce.curves"
    if not isinstance(curves, dict) or not curves:
        raise ConfigError(f"{w} must be an object of group size → [[bytes, seconds], ...]")
    out = []
    for key, pts in curves.items():
        if not str(key).isdigit() or int(key) < 2:
            raise ConfigError(f"{w}: group size {key!r} must be a whole number of at least 2")
        ok = isinstance(pts, list) and pts and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        and 0 < v < math.inf for v in p) for p in pts)
        sizes = [p[0] for p in pts] if ok else []
        if not ok or sizes != sorted(set(sizes)) or any(p[1] > MAX_LATENCY_S for p in pts):
            raise ConfigError(f"{w}[{key!r}] must be [[bytes, seconds], ...] with positive, strictly ascending "
                              f"sizes and times of at most {MAX_LATENCY_S:g} s")
        out.append((int(key), tuple((float(b), float(t)) for b, t in pts)))
    return tuple(sorted(out))


def parse_stacks(data: dict, where: str) -> dict[str, StackTerms]:
    """The optional ``stacks`` section: production stack name → its terms."""
    node = data.get("stacks")
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: stacks must be an object of stack name → terms")
    out = {}
    for name, terms in node.items():
        if name not in STACKS or not STACKS[name].production:
            production = [s for s in STACK_NAMES if STACKS[s].production]
            raise ConfigError(f"{where}: stacks.{name}: not a production stack; known: {', '.join(production)}")
        out[name] = parse_stack(terms, f"{where}: stacks.{name}")
    return out


def parse_host_link(data: dict, where: str) -> HostLink | None:
    """The optional ``host_link`` section: ``{h2d_bytes_per_s, d2h_bytes_per_s, alpha_s, cite}``,
    or ``{"copy": "memory", cite | command}`` where host memory is the device's own."""
    if "host_link" not in data:
        return None
    if isinstance(data["host_link"], dict) and "copy" in data["host_link"]:
        node = _group(data, "host_link", where, ("copy",))
        if node["copy"] not in HOST_COPY_KINDS:
            raise ConfigError(f"{where}: host_link.copy={node['copy']!r} must be one of {list(HOST_COPY_KINDS)}")
        return HostLink(copy=node["copy"])
    node = _group(data, "host_link", where, ("h2d_bytes_per_s", "d2h_bytes_per_s", "alpha_s"))
    w = f"{where}: host_link"
    return HostLink(number(node, "h2d_bytes_per_s", w, False, None), number(node, "d2h_bytes_per_s", w, False, None),
                    _seconds(node, "alpha_s", w))
