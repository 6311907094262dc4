"""Calls and workflows: the dataflow graph of one RLHF iteration.

A :class:`Workflow` is a set of :class:`Call` s. Data edges come from what calls read and
write (``seq`` written by ``actor_gen`` and read by ``ref_inf`` makes an edge). Version edges
tie iterations together: the train call of role R in iteration i precedes every call of R in
iteration i + lag, because those calls need the updated weights (:class:`VersionEdge`). The lag
is :data:`SYNC_LAG`, one iteration, for every edge of synchronous training. Asynchronous training
with staleness η (:attr:`Workflow.staleness`) gives the edge from the actor's train call to its
generate calls lag η + 1: the rollouts trained on in iteration i may come from a policy up to η
versions older than the one being updated (AReaL's η; verl's, NeMo-RL's and OpenRLHF's settings
translate as :data:`STALENESS_EQUIVALENTS` says). Every other edge keeps lag
1: recomputed old log-probs (``actor_inf``) and the critic read the latest weights. Unrolling K
iterations gives the graph the simulator and the runtime both execute; its instances run in
*slot* order (:meth:`Workflow.slot`): a generate call with lag η + 1 runs η slots ahead of its
iteration, so with η = 0 the order is (iteration, topological) as before.
:meth:`Workflow.program` adds the weight pushes to standing rollout copies
(:func:`estimator.spec.plan.standing_copies`): the one order in which every device — simulated
or real — runs its instances.

Two experiment options reshape the generating workflows (ppo, grpo, remax):

- a verifier reward (``models.reward: rule``, :attr:`WorkflowParams.verifier`): no reward
  model and no ``reward_inf`` (nor ``reward_inf_greedy``) call; each generate call scores its
  own sequences on the host once they are complete, so ``rewards`` (``rewards_greedy``)
  becomes one of its outputs;
- recomputed old log-probs (``old_logprobs: recompute``, :attr:`WorkflowParams.old_logprobs`):
  an ``actor_inf`` call — the actor's forward over ``seq`` with the weights that generated it —
  writes ``old_logp``, and the generate call writes only ``seq`` (verl's ``compute_log_prob``,
  OpenRLHF's and NeMo-RL's policy log-probs, AReaL's ``recompute_logprob``). It is a call of
  the actor, so the actor's version edge reaches it and its home stays ``actor_train``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from estimator.base.errors import ConfigError
from estimator.spec.lengths import Lengths

CALL_KINDS = ("generate", "inference", "train")
ALGORITHMS = ("ppo", "grpo", "dpo", "remax", "sft", "rw")
GENERATING = ("ppo", "grpo", "remax")  # algorithms whose iteration generates responses
# Data every iteration starts from; produced by no call.
SOURCES = frozenset({"prompts", "pairs"})
SYNC_LAG = 1  # iterations from a role's update to the first call that reads it: synchronous RL
MAX_STALENESS = 64  # policy versions a rollout may lag behind: far above any published setting (AReaL: 1–8)
# How each framework's setting translates to η (the largest number of policy updates between
# the weights that generated a sample and the update that trains on it):
STALENESS_EQUIVALENTS = {
    "AReaL": "max_head_offpolicyness = η (the paper's η; 0 is synchronous)",
    "verl fully_async_policy": "trigger_parameter_sync_step = k pushes weights every k updates, so a sample "
                               "lags up to about k updates (η ≈ k; a staleness_threshold above 0 lets that share "
                               "of a batch come from one version earlier); one_step_off_policy is η = 1",
    "NeMo-RL async GRPO": "max_trajectory_age_steps = η (updates between the generating weights and the step "
                          "that trains on the trajectory)",
    "OpenRLHF --async_train": "one rollout batch queued ahead of the trainer: η = 1",
}
# where the old log-probs the policy loss compares against come from
OLD_LOGPROBS = ("from_generation", "recompute")
STREAMING = ("off", "recompute", "keep")  # Workflow.streaming (estimator.spec.stream)
PUSH = "push:"  # call-name prefix of a weight push to a standing rollout copy (Workflow.program)
REWARD_RULE = "rule"  # models.reward: a verifier scores the rollouts, no reward model


@dataclass(frozen=True)
class Workload:
    """What one execution of a call processes."""

    seqs: int  # sequences per execution (all minibatches together)
    prompt_len: int  # tokens of prompt per sequence
    gen_len: int  # tokens generated (generate) or of response (inference/train) per sequence
    minibatches: int = 1  # optimizer steps per execution (train); 1 otherwise
    paired: bool = False  # sequences come as (chosen, rejected) pairs kept together
    greedy: bool = False  # generate: argmax decoding instead of sampling
    lengths_vary: bool = False  # prompt or response lengths are drawn from a distribution (caps above)
    # generate: rows dealt to engine replicas in whole groups of this many (a streaming GRPO
    # rollout's prompts with their samples, estimator.spec.stream); 1: row by row
    group: int = 1

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)!r} must be a positive integer"
            for name in ("seqs", "prompt_len", "gen_len", "minibatches")
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        if not problems and self.paired and self.seqs % 2:
            problems.append(f"seqs={self.seqs} must be even for paired data")
        if not problems and (not isinstance(self.group, int) or self.group < 1 or self.seqs % self.group):
            problems.append(f"group={self.group!r} must be a positive integer dividing seqs={self.seqs}")
        if problems:
            raise ConfigError("workload: " + "; ".join(problems))

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.gen_len

    @property
    def decode_steps(self) -> int:
        """Decode steps of a generate call: the prefill chooses the first token, each step one more."""
        return self.gen_len - 1

    @property
    def units(self) -> int:
        """Indivisible samples: pairs for paired data, sequences otherwise."""
        return self.seqs // 2 if self.paired else self.seqs

    @property
    def units_per_minibatch(self) -> int:
        return self.units // self.minibatches


@dataclass(frozen=True)
class Call:
    """One model function call of the workflow."""

    name: str  # unique in the workflow, e.g. "actor_gen"
    role: str  # the model it runs, e.g. "actor"
    kind: str  # generate | inference | train
    inputs: tuple[str, ...]  # data names it reads
    outputs: tuple[str, ...]  # data names it writes
    workload: Workload

    def __post_init__(self) -> None:
        if self.kind not in CALL_KINDS:
            raise ConfigError(f"call {self.name!r}: kind={self.kind!r} must be one of {CALL_KINDS}")


@dataclass(frozen=True)
class CallInstance:
    """A call in a given iteration of an unrolled workflow."""

    iteration: int
    call: str


class VersionEdge(NamedTuple):
    """Role R's ``train`` call in iteration i precedes R's ``call`` in iteration i + ``lag``."""

    train: str
    call: str
    lag: int  # iterations


@dataclass(frozen=True)
class Workflow:
    """The dataflow graph of one iteration plus version edges across iterations."""

    algorithm: str
    calls: tuple[Call, ...]
    staleness: int = 0  # η: policy versions the actor's rollouts may lag the update that trains on them
    # how a standing rollout copy serves (estimator.spec.stream.STREAMING): "off", or a stream
    # of consecutive iterations' requests consumed as they finish, switching weights with a
    # re-prefill ("recompute") or keeping the KV ("keep")
    streaming: str = "off"
    _index: Mapping[str, Call] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [c.name for c in self.calls]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"workflow {self.algorithm}: duplicate call names {dupes}")
        producers: dict[str, str] = {}
        for c in self.calls:
            for out in c.outputs:
                if out in producers:
                    raise ConfigError(
                        f"workflow {self.algorithm}: data {out!r} written by both "
                        f"{producers[out]!r} and {c.name!r}")
                producers[out] = c.name
        for c in self.calls:
            unknown = [i for i in c.inputs if i not in producers and i not in SOURCES]
            if unknown:
                raise ConfigError(f"call {c.name!r} reads {unknown}, which no call writes")
        trains = [c.role for c in self.calls if c.kind == "train"]
        twice = sorted({r for r in trains if trains.count(r) > 1})
        if twice:
            # A role's weights live at its train call's layout; two train calls would need two homes.
            raise ConfigError(f"workflow {self.algorithm}: roles {twice} have more than one train call")
        if not isinstance(self.staleness, int) or isinstance(self.staleness, bool) \
                or not 0 <= self.staleness <= MAX_STALENESS:
            raise ConfigError(f"workflow {self.algorithm}: max_staleness={self.staleness!r} must be a whole number "
                              f"of policy versions in [0, {MAX_STALENESS}]")
        if self.staleness and not any(c.kind == "generate" and c.role == "actor" for c in self.calls):
            raise ConfigError(f"workflow {self.algorithm}: max_staleness={self.staleness} applies to workflows "
                              f"whose actor generates ({', '.join(GENERATING)})")
        if self.streaming not in STREAMING:
            raise ConfigError(f"workflow {self.algorithm}: streaming={self.streaming!r} must be one of "
                              f"{', '.join(STREAMING)}")
        if self.streaming != "off" and self.staleness < 1:
            raise ConfigError(f"workflow {self.algorithm}: streaming={self.streaming} needs max_staleness ≥ 1 "
                              "(with 0 no rollout of the next iteration may start before the update)")
        if self.streaming != "off" and sum(c.kind == "generate" for c in self.calls) != 1:
            raise ConfigError(f"workflow {self.algorithm}: streaming applies to workflows with one generate "
                              "call (ppo, grpo), not to one whose rollouts pair with a greedy baseline's")
        object.__setattr__(self, "_index", {c.name: c for c in self.calls})
        self.topological_order()  # raises on cycles

    def __getitem__(self, name: str) -> Call:
        return self._index[name]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    @property
    def call_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.calls)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.role for c in self.calls))

    def producer(self, data: str) -> str | None:
        return next((c.name for c in self.calls if data in c.outputs), None)

    def edges(self) -> list[tuple[str, str, str]]:
        """Data edges ``(producer, consumer, data)`` within one iteration, in call order."""
        out = []
        for consumer in self.calls:
            for data in consumer.inputs:
                prod = self.producer(data)
                if prod is not None:
                    out.append((prod, consumer.name, data))
        return out

    def predecessors(self, name: str) -> list[str]:
        return list(dict.fromkeys(p for p, c, _ in self.edges() if c == name))

    def version_edges(self) -> list[VersionEdge]:
        """Every role's train call to each call of that role, ``lag`` iterations later: η + 1 to
        the actor's generate calls, :data:`SYNC_LAG` to every other."""
        out = []
        for train in self.calls:
            if train.kind != "train":
                continue
            out.extend(VersionEdge(train.name, c.name, self.lag(c.name)) for c in self.calls if c.role == train.role)
        return out

    def lag(self, name: str) -> int:
        """Iterations between an update of ``name``'s role and the first instance of ``name`` that
        reads it."""
        c = self[name]
        return SYNC_LAG + (self.staleness if c.kind == "generate" and c.role == "actor" else 0)

    def slot(self, instance: CallInstance) -> int:
        """Where an instance falls in every device's program: its iteration, less the lead of an
        asynchronous generate call (η), which runs ahead of the iteration that trains on it. A
        weight push falls in its update's slot."""
        if push_target(instance.call) is not None:
            return instance.iteration
        return instance.iteration - (self.lag(instance.call) - SYNC_LAG)

    @property
    def asynchronous(self) -> bool:
        return self.staleness > 0

    @property
    def warmup(self) -> int:
        """Iterations before the steady state: the first (its calls start on idle devices), and
        under staleness η the 2η more it takes the rollouts to run η iterations ahead."""
        return 1 + 2 * self.staleness

    @property
    def drain(self) -> int:
        """Iterations after the steady state: under staleness η the last η iterations find their
        rollouts already generated, so they run faster than the steady state and are left out."""
        return self.staleness

    def draw_iteration(self, iteration: int) -> int:
        """The iteration whose drawn lengths an unrolled ``iteration`` charges: itself, less the
        2η extra warm-up iterations of an asynchronous unroll, which repeat iteration 0's. So
        the steady-state iterations of any η draw the lengths a synchronous run's do, and a
        comparison across η is not one of different draws."""
        return max(0, iteration - 2 * self.staleness)

    def trained_roles(self) -> dict[str, str]:
        """role → its train call."""
        return {c.role: c.name for c in self.calls if c.kind == "train"}

    def home_calls(self) -> dict[str, str]:
        """role → the call whose layout is the role's home, where its weights live between
        calls: its train call, else its first call in topological order."""
        first: dict[str, str] = {}
        for name in self.topological_order():
            first.setdefault(self[name].role, name)
        return first | self.trained_roles()

    def topological_order(self) -> list[str]:
        """Calls ordered so every producer precedes its consumers; ties keep declaration order."""
        preds = {c.name: set(self.predecessors(c.name)) for c in self.calls}
        order: list[str] = []
        while len(order) < len(self.calls):
            ready = [c.name for c in self.calls if c.name not in order and preds[c.name] <= set(order)]
            if not ready:
                cycle = sorted(n for n in preds if n not in order)
                raise ConfigError(f"workflow {self.algorithm}: dependency cycle among {cycle}")
            order.append(ready[0])
        return order

    def unroll(self, iterations: int) -> tuple[list[CallInstance], list[tuple[CallInstance, CallInstance]]]:
        """Instances of every call in ``iterations`` iterations and all edges between them.

        Nodes come in (slot, topological) order (:meth:`slot`; with η = 0 the slot is the
        iteration), which is itself a valid topological order of the unrolled graph: a call
        that runs ahead is a generate call, which reads no other call's data, and its version
        edge reaches back at least one slot.
        """
        if iterations < 1:
            raise ConfigError(f"iterations={iterations} must be at least 1")
        order = self.topological_order()
        rank = {n: k for k, n in enumerate(order)}
        nodes = sorted((CallInstance(i, n) for i in range(iterations) for n in order),
                       key=lambda x: (self.slot(x), rank[x.call]))
        edges: list[tuple[CallInstance, CallInstance]] = []
        data_edges = list(dict.fromkeys((p, c) for p, c, _ in self.edges()))
        for i in range(iterations):
            edges.extend((CallInstance(i, p), CallInstance(i, c)) for p, c in data_edges)
            edges.extend((CallInstance(i, e.train), CallInstance(i + e.lag, e.call))
                         for e in self.version_edges() if i + e.lag < iterations)
        return nodes, edges

    def program(self, iterations: int, standing: Iterable[str] = ()) -> list[CallInstance]:
        """Every instance the devices run, in the order each runs those placed on it: the
        (slot, topological) order of :meth:`unroll`, and right after each update ``i`` of the
        actor a weight push ``push:<g>`` (iteration ``i``) to every generate call ``g`` in
        ``standing`` (those with a standing copy, :func:`estimator.spec.plan.standing_copies`),
        in name order, for ``i < iterations − lag(g)`` — later updates feed no rollout of the
        run. The push of update ``i`` carries the weights ``g`` generates with in iteration
        ``i + lag(g)``. Without standing copies the program is the unroll."""
        nodes, _ = self.unroll(iterations)
        trains = self.trained_roles()
        after: dict[CallInstance, list[CallInstance]] = {}
        for g in sorted(standing):
            train = trains[self[g].role]
            for i in range(iterations - self.lag(g)):
                after.setdefault(CallInstance(i, train), []).append(CallInstance(i, PUSH + g))
        out = []
        for n in nodes:
            out.append(n)
            out.extend(after.get(n, ()))
        return out

    def pushed_update(self, push: CallInstance) -> CallInstance:
        """The update whose weights a push instance carries: its role's train call, same iteration."""
        return CallInstance(push.iteration, self.trained_roles()[self[push_target(push.call)].role])


def push_target(call: str) -> str | None:
    """The generate call a weight-push instance (:meth:`Workflow.program`) feeds, or None for an
    ordinary call."""
    return call[len(PUSH):] if call.startswith(PUSH) else None


def steady_iterations(workflow: Workflow, iterations: int) -> int:
    """Iterations to unroll for the steady state ``iterations`` give a synchronous workflow:
    an asynchronous one's rollouts run η iterations ahead, so 2η more are warm-up and η more
    drain (:attr:`Workflow.warmup`, :attr:`Workflow.drain`). The simulator and the executor
    both run this many."""
    return iterations + workflow.warmup - 1 + workflow.drain


@dataclass(frozen=True)
class WorkflowParams:
    """The workload knobs of an experiment that shape its workflow."""

    batch_size: int  # prompts (or pairs) per iteration
    prompt_len: int  # tokens of prompt: the cap when prompt lengths are a distribution
    gen_len: int  # tokens of response: the cap when response lengths are a distribution
    ppo_minibatches: int = 1
    group_size: int = 1  # grpo: samples per prompt
    # the distributions of prompt and response lengths (estimator.spec.lengths); None: every
    # sequence exactly prompt_len and gen_len tokens
    prompt_lengths: Lengths | None = None
    gen_lengths: Lengths | None = None
    verifier: bool = False  # rewards from a rule on the host after generation, not a reward model
    old_logprobs: str = "from_generation"  # from_generation | recompute (an actor_inf call)
    max_staleness: int = 0  # η: asynchronous training (experiment key async.max_staleness); 0: synchronous
    streaming: str = "off"  # async.streaming: Workflow.streaming

    def __post_init__(self) -> None:
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ConfigError(f"old_logprobs={self.old_logprobs!r} must be one of {', '.join(OLD_LOGPROBS)}")
        for name, cap in (("prompt_lengths", self.prompt_len), ("gen_lengths", self.gen_len)):
            dist = getattr(self, name)
            if dist is None:
                object.__setattr__(self, name, Lengths(cap))
            elif dist.max != cap:
                raise ConfigError(f"{name}: its cap {dist.max} must equal {name.split('_')[0]}_len={cap}")

    @property
    def recompute_logprobs(self) -> bool:
        return self.old_logprobs == "recompute"

    @property
    def variable(self) -> bool:
        """Whether any length is drawn from a distribution (not every sequence alike)."""
        return not (self.prompt_lengths.fixed and self.gen_lengths.fixed)


CallSpec = tuple[str, str, str, tuple[str, ...], tuple[str, ...], Workload]


def _calls(specs: Iterable[CallSpec]) -> tuple[Call, ...]:
    return tuple(Call(*spec) for spec in specs)


def _gen_outputs(p: WorkflowParams, seq: str = "seq", rewards: str = "rewards", logp: bool = True
                 ) -> tuple[str, ...]:
    """A generate call's outputs: its sequences, their log-probs (unless the policy is a sampling
    call whose old log-probs ``actor_inf`` recomputes) and, under a verifier, their rewards."""
    return ((seq,) + (("old_logp",) if logp and not p.recompute_logprobs else ())
            + ((rewards,) if p.verifier else ()))


def _old_logp(p: WorkflowParams, inf: Workload) -> list[CallSpec]:
    """``actor_inf`` when old log-probs are recomputed: the actor's forward over the rollout."""
    return [("actor_inf", "actor", "inference", ("seq",), ("old_logp",), inf)] if p.recompute_logprobs else []


def _reward_model(p: WorkflowParams, inf: Workload, greedy: bool = False) -> list[CallSpec]:
    """The reward model's calls (none under a verifier: the generate calls write the rewards)."""
    if p.verifier:
        return []
    calls: list[CallSpec] = [("reward_inf", "reward", "inference", ("seq",), ("rewards",), inf)]
    if greedy:
        calls.append(("reward_inf_greedy", "reward", "inference", ("seq_greedy",), ("rewards_greedy",), inf))
    return calls


def ppo(p: WorkflowParams) -> Workflow:
    gen = Workload(p.batch_size, p.prompt_len, p.gen_len, lengths_vary=p.variable)
    inf = Workload(p.batch_size, p.prompt_len, p.gen_len, lengths_vary=p.variable)
    train = Workload(p.batch_size, p.prompt_len, p.gen_len, minibatches=p.ppo_minibatches, lengths_vary=p.variable)
    rl_data = ("seq", "old_logp", "ref_logp", "rewards", "values")
    return Workflow("ppo", _calls([
        ("actor_gen", "actor", "generate", ("prompts",), _gen_outputs(p), gen),
        *_old_logp(p, inf),
        ("ref_inf", "ref", "inference", ("seq",), ("ref_logp",), inf),
        *_reward_model(p, inf),
        ("critic_inf", "critic", "inference", ("seq",), ("values",), inf),
        ("actor_train", "actor", "train", rl_data, (), train),
        ("critic_train", "critic", "train", rl_data, (), train),
    ]))


def grpo(p: WorkflowParams) -> Workflow:
    n = p.batch_size * p.group_size
    # a stream consumes whole groups, so its engines take whole groups
    gen = Workload(n, p.prompt_len, p.gen_len, lengths_vary=p.variable,
                   group=p.group_size if p.streaming != "off" else 1)
    inf = Workload(n, p.prompt_len, p.gen_len, lengths_vary=p.variable)
    train = Workload(n, p.prompt_len, p.gen_len, minibatches=p.ppo_minibatches, lengths_vary=p.variable)
    return Workflow("grpo", _calls([
        ("actor_gen", "actor", "generate", ("prompts",), _gen_outputs(p), gen),
        *_old_logp(p, inf),
        ("ref_inf", "ref", "inference", ("seq",), ("ref_logp",), inf),
        *_reward_model(p, inf),
        ("actor_train", "actor", "train", ("seq", "old_logp", "ref_logp", "rewards"), (), train),
    ]))


def dpo(p: WorkflowParams) -> Workflow:
    inf = Workload(2 * p.batch_size, p.prompt_len, p.gen_len, paired=True)
    train = Workload(2 * p.batch_size, p.prompt_len, p.gen_len, minibatches=p.ppo_minibatches,
                     paired=True)
    return Workflow("dpo", _calls([
        ("ref_inf", "ref", "inference", ("pairs",), ("ref_logp",), inf),
        ("actor_train", "actor", "train", ("pairs", "ref_logp"), (), train),
    ]))


def remax(p: WorkflowParams) -> Workflow:
    sampled = Workload(p.batch_size, p.prompt_len, p.gen_len, lengths_vary=p.variable)
    greedy = Workload(p.batch_size, p.prompt_len, p.gen_len, greedy=True, lengths_vary=p.variable)
    inf = Workload(p.batch_size, p.prompt_len, p.gen_len, lengths_vary=p.variable)
    train = Workload(p.batch_size, p.prompt_len, p.gen_len, minibatches=p.ppo_minibatches, lengths_vary=p.variable)
    return Workflow("remax", _calls([
        ("actor_gen", "actor", "generate", ("prompts",), _gen_outputs(p), sampled),
        ("actor_gen_greedy", "actor", "generate", ("prompts",),
         _gen_outputs(p, "seq_greedy", "rewards_greedy", logp=False), greedy),
        *_old_logp(p, inf),
        *_reward_model(p, inf, greedy=True),
        ("ref_inf", "ref", "inference", ("seq",), ("ref_logp",), inf),
        ("actor_train", "actor", "train",
         ("seq", "old_logp", "ref_logp", "rewards", "rewards_greedy"), (), train),
    ]))


def sft(p: WorkflowParams) -> Workflow:
    train = Workload(p.batch_size, p.prompt_len, p.gen_len, minibatches=p.ppo_minibatches)
    return Workflow("sft", _calls([("actor_train", "actor", "train", ("prompts",), (), train)]))


def rw(p: WorkflowParams) -> Workflow:
    train = Workload(2 * p.batch_size, p.prompt_len, p.gen_len, minibatches=p.ppo_minibatches,
                     paired=True)
    return Workflow("rw", _calls([("reward_train", "reward", "train", ("pairs",), (), train)]))


PRESETS = {"ppo": ppo, "grpo": grpo, "dpo": dpo, "remax": remax, "sft": sft, "rw": rw}

# The model roles each algorithm needs.
ROLES = {
    "ppo": ("actor", "critic", "ref", "reward"),
    "grpo": ("actor", "ref", "reward"),
    "dpo": ("actor", "ref"),
    "remax": ("actor", "ref", "reward"),
    "sft": ("actor",),
    "rw": ("reward",),
}
# Roles whose model carries a scalar value head.
VALUE_ROLES = frozenset({"critic", "reward"})


def model_roles(algorithm: str, verifier: bool = False) -> tuple[str, ...]:
    """The roles of ``algorithm`` that hold a model: :data:`ROLES`, less ``reward`` when a
    verifier (``models.reward: rule``) scores the rollouts."""
    return tuple(r for r in ROLES[algorithm] if not (verifier and r == "reward"))


def build(algorithm: str, params: WorkflowParams) -> Workflow:
    if algorithm not in PRESETS:
        raise ConfigError(f"algorithm={algorithm!r} must be one of {', '.join(ALGORITHMS)}")
    wf = PRESETS[algorithm](params)
    if not params.max_staleness and params.streaming == "off":
        return wf
    return replace(wf, staleness=params.max_staleness, streaming=params.streaming)
