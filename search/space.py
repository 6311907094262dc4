"""The plan space: per call, every valid mesh × (dp, tp, pp) × micro-batch count (× activation
recompute, data-parallel sharding and offload for a train call) that can fit.

The meshes are ReaL's aligned shapes by default (an aligned power-of-two slice of one node or a
run of whole nodes, :meth:`Cluster.meshes`), and with ``uneven`` every contiguous run of devices
(``0-5`` and ``6-7`` of a node, ``0-11`` of two): the splits a disaggregated plan needs, at
N(N+1)/2 meshes on N devices. Whether a layout is valid depends on its mesh only through the
mesh's size and whether its tensor-parallel groups stay inside nodes (always so on an aligned
mesh whose size admits the tp; on a run, a matter of where it starts, :meth:`CallSpace.fits`),
so a call's candidates are kept as *shapes* ``(dp, tp, pp, micro_batches, recompute, shard,
offload)`` per mesh size plus the first devices of the meshes of that size, a shape standing on
those meshes of its size where its tp fits. The space is counted from these, never listed: on
128 nodes × 8 devices a call has about 10,000 meshes and a million layouts, and the joint space
is their product (``log10`` reported).

Pruning, before any search: a shape is dropped when :func:`estimator.spec.plan.layout_problems`
rejects it (tp must divide heads, kv heads, ffn and vocabulary and stay inside a node, pp at
most the layers, the batch divisible by dp·micro-batches), or when the call alone cannot fit
on a device whatever the rest of the plan is: the bytes the call adds while it runs (at home,
so without a reallocated copy) plus, for the call that is its role's home, the role's resident
weights, gradients and optimizer state (:mod:`estimator.cost.memory`) exceed the capacity. Every
plan that fits uses only kept shapes, so the pruning loses nothing.

Recompute: a train call's shape is also kept with ``recompute="full"`` where that can matter.
Recompute only trades time (a longer backward) for memory, so it is dropped where it cannot
win: where it does not fit alone, where it saves no bytes on any stage (one block per stage
and one micro-batch in flight keep the block's activations either way), and where the shape
without it fits next to the most every other role can keep resident on one device (any plan
using it would then fit, faster, without). Among the rest the search picks by predicted time
and memory, so a recomputing layout wins only where a plan would not fit without it.

Sharding (a train call over more than one data-parallel replica, :func:`shard_choices`):
``shard="optimizer"`` and ``shard="full"`` are kept wherever they fit alone — each can be the
fastest as well as the only fit (a step over a chunk of the optimizer; collectives that
overlap the passes' compute against one exposed all-reduce) —, and recompute with either under
the rule above, against the same sharding without it. A model too big to train replicated thus
has its sharded layouts in the space, and the space of a train call grows at most threefold.

Offload (a train call, ``optimizer`` and ``all``) only trades time (host transfers around the
train call, and under ``all`` around the role's other calls) for memory while other calls run;
during the train call itself everything is back on the devices, so an offloading variant fits
alone exactly where its twin without offload does. It is kept beside that twin only where
offloading can matter: where the twin's resident bytes, next to the most every other role can
keep resident and the most any other call adds on one device (over that call's kept shapes,
plus a reallocated copy of its stage), can overflow a device. Otherwise every plan using it
fits, faster, without it. A profile without a host link (``host_link``) prices no offload, so
its spaces have none.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from estimator.base.errors import ConfigError
from estimator.base.tables import format_table
from estimator.cost.memory import PARTS, call_bytes, fmt_bytes, home_bytes, stage_param_counts, state_bytes
from estimator.cost.pieces import BF16
from estimator.profile.profiles import Profile
from estimator.spec.cluster import DeviceMesh, fitting_count, straddling_group
from estimator.spec.experiment import Experiment
from estimator.spec.plan import (
    MICRO_BATCH_CHOICES,
    Layout,
    Plan,
    divisors,
    layout_problems,
    offload_choices,
    recompute_choices,
    shard_choices,
)

# (dp, tp, pp, micro-batching, recompute, shard, offload); micro-batching is a count of equal
# micro-batches, or minus a token budget per micro-batch (Layout.max_tokens_per_micro_batch)
# where lengths vary
Shape = tuple[int, int, int, int, str, str, str]
BUDGET_FACTORS = (1, 2, 4, 8, 16, 32)  # token budgets searched: these multiples of the longest row
Key = tuple[Layout, ...]  # a plan as the search holds it: one layout per call, the space's call order


def shape_of(layout: Layout) -> Shape:
    batching = -layout.max_tokens_per_micro_batch if layout.token_budget else layout.micro_batches
    return (layout.dp, layout.tp, layout.pp, batching, layout.recompute, layout.shard, layout.offload)


def make_layout(first: int, size: int, shape: Shape) -> Layout:
    dp, tp, pp, mb, recompute, shard, offload = shape
    if mb < 0:
        return Layout(DeviceMesh(first, size), dp, tp, pp, 1, recompute, max_tokens_per_micro_batch=-mb, shard=shard,
                      offload=offload)
    return Layout(DeviceMesh(first, size), dp, tp, pp, mb, recompute, shard=shard, offload=offload)


def batching_choices(experiment: Experiment, name: str) -> tuple[int, ...]:
    """Micro-batchings a call's layouts may have (:data:`Shape`): every count of
    :data:`MICRO_BATCH_CHOICES`, and where lengths vary and the call is not a generation, token
    budgets of :data:`BUDGET_FACTORS` times its longest row (a pair for paired data) — what
    sequence packing and dynamic batching give the frameworks that have them."""
    call = experiment.workflow[name]
    w = call.workload
    if not w.lengths_vary or call.kind == "generate":
        return MICRO_BATCH_CHOICES
    longest = w.seq_len * (2 if w.paired else 1)
    return MICRO_BATCH_CHOICES + tuple(-f * longest for f in BUDGET_FACTORS)


@dataclass(frozen=True)
class CallSpace:
    """The candidate layouts of one call: shapes per mesh size, and where meshes of each size
    start; a shape stands on the meshes of its size where its tp fits (:meth:`fits`)."""

    name: str
    role: str
    shapes: dict[int, tuple[Shape, ...]]  # mesh size → shapes that are valid on some mesh of it and can fit
    firsts: dict[int, range]  # mesh size → first device of every mesh of that size
    valid: int  # layouts that pass validation (before memory pruning)
    per_node: int  # devices per node of the cluster
    _on: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # (size, phase) → shapes

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s for s in self.shapes if self.shapes[s])

    def fits(self, first: int, size: int, tp: int) -> bool:
        """Whether tensor parallelism ``tp`` keeps its groups inside nodes on the mesh."""
        return straddling_group(first, size, tp, self.per_node) is None

    def shapes_on(self, mesh: DeviceMesh) -> tuple[Shape, ...]:
        """The shapes of ``mesh``'s size whose tp fits on it (all of them on an aligned mesh);
        depends on the mesh's first device modulo the node only, so kept per that."""
        key = (mesh.size, mesh.first % self.per_node)
        if key not in self._on:
            shapes = self.shapes.get(mesh.size, ())
            fit = {tp: self.fits(mesh.first, mesh.size, tp) for tp in {sh[1] for sh in shapes}}
            self._on[key] = tuple(sh for sh in shapes if fit[sh[1]])
        return self._on[key]

    def _count(self, keep) -> int:
        """Kept layouts whose shape passes ``keep``: per size, per tp, the meshes it fits."""
        total = 0
        for size, shapes in self.shapes.items():
            per_tp: dict[int, int] = {}
            for sh in shapes:
                if keep(sh):
                    per_tp[sh[1]] = per_tp.get(sh[1], 0) + 1
            total += sum(n * fitting_count(self.firsts[size], size, tp, self.per_node) for tp, n in per_tp.items())
        return total

    @property
    def count(self) -> int:
        """Layouts kept (valid and able to fit)."""
        return self._count(lambda sh: True)

    @property
    def recompute_count(self) -> int:
        """Of the kept layouts, those that recompute activations."""
        return self._count(lambda sh: sh[4] != "none")

    @property
    def shard_count(self) -> int:
        """Of the kept layouts, those that shard their data parallelism."""
        return self._count(lambda sh: sh[5] != "none")

    @property
    def offload_count(self) -> int:
        """Of the kept layouts, those that offload their home's state to host memory."""
        return self._count(lambda sh: sh[6] != "none")

    def contains(self, layout: Layout) -> bool:
        s = layout.mesh.size
        return layout.mesh.first in self.firsts.get(s, ()) and shape_of(layout) in self.shapes_on(layout.mesh)

    def layouts_on(self, mesh: DeviceMesh) -> list[Layout]:
        """The kept layouts on ``mesh``."""
        if mesh.first not in self.firsts.get(mesh.size, ()):
            return []
        return [make_layout(mesh.first, mesh.size, sh) for sh in self.shapes_on(mesh)]

    def layouts(self) -> list[Layout]:
        """Every kept layout (only for small spaces: the exact search lists them)."""
        return [lay for s in self.sizes for f in self.firsts[s] for lay in self.layouts_on(DeviceMesh(f, s))]


@dataclass(frozen=True)
class Space:
    """Per call (topological order) its :class:`CallSpace`; roles and their calls."""

    calls: tuple[CallSpace, ...]
    roles: dict[str, tuple[str, ...]]  # role → its calls, topological order
    homes: dict[str, str]  # role → the call whose layout is the role's home

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.calls)

    def __getitem__(self, name: str) -> CallSpace:
        return self.calls[self.names.index(name)]

    def plan(self, key: Key) -> Plan:
        """The plan a search key stands for."""
        return Plan(dict(zip(self.names, key)))

    def key(self, plan: Plan) -> Key:
        """The search key of ``plan``: its layouts in this space's call order."""
        return tuple(plan[n] for n in self.names)

    @property
    def log10_size(self) -> float:
        """log10 of the number of joint plans (the product of the calls' kept layouts)."""
        return sum(math.log10(c.count) for c in self.calls)

    @property
    def size(self) -> int:
        return math.prod(c.count for c in self.calls)

    def contains(self, plan: Plan) -> bool:
        return all(c.contains(plan[c.name]) for c in self.calls)

    def table(self) -> str:
        rows = [("call", "role", "valid layouts", "kept (can fit)", "of which recompute", "mesh sizes")]
        rows += [(c.name, c.role, f"{c.valid:,}", f"{c.count:,}", f"{c.recompute_count:,}", _sizes_text(c.sizes))
                 for c in self.calls]
        return format_table(rows, right={2, 3, 4})

    def summary(self) -> dict:
        return {"log10_size": self.log10_size,
                "calls": {c.name: {"valid": c.valid, "kept": c.count, "recompute": c.recompute_count,
                                   "shard": c.shard_count, "offload": c.offload_count}
                          for c in self.calls}}


def _sizes_text(sizes: tuple[int, ...]) -> str:
    return ",".join(map(str, sizes)) if len(sizes) <= 6 else f"{len(sizes)} sizes, {sizes[0]}-{sizes[-1]}"


def _degrees(size: int, per_node: int, layers: int) -> list[tuple[int, int, int]]:
    """Every (dp, tp, pp) with dp·tp·pp = size, tp at most a node and pp at most the layers
    (a cheap first cut; :func:`layout_problems` still decides)."""
    return [(size // (tp * pp), tp, pp) for tp in divisors(size) if tp <= per_node
            for pp in divisors(size // tp) if pp <= layers]


def _fitting_first(starts: range, size: int, tp: int, per_node: int) -> int | None:
    """A first device of ``starts`` whose mesh keeps tp's groups inside nodes, None if none
    does (one period of first devices modulo the node tells, :func:`fitting_count`)."""
    period = per_node // math.gcd(starts.step, per_node)
    return next((f for f in starts[:period] if straddling_group(f, size, tp, per_node) is None), None)


def _stage_parts(experiment: Experiment, name: str, layout: Layout, home: bool,
                 capacity: float | None = None) -> list[dict[str, float]]:
    """Per stage, the bytes ``name`` adds at home plus, for its role's home call, the role's
    weights, gradients and optimizer state — all of them, the offloaded ones back for the call
    —, by part (:data:`estimator.cost.memory.PARTS`)."""
    call = experiment.workflow[name]
    model = experiment.models[call.role]
    engine = None if capacity is None else experiment.kv_fraction * capacity
    parts = [dict(p) for p in call_bytes(call, model, layout, at_home=True, engine_bytes=engine)]
    if home:
        trained = call.role in experiment.workflow.trained_roles()
        for stage, static in zip(parts, state_bytes(model, layout, trained)):
            for key, v in static.items():
                stage[key] = stage.get(key, 0.0) + v
    return parts


def _stage_bytes(experiment: Experiment, name: str, layout: Layout, home: bool,
                 capacity: float | None = None) -> list[float]:
    """Per stage, the total of :func:`_stage_parts`."""
    return [sum(p.values()) for p in _stage_parts(experiment, name, layout, home, capacity)]


def parts_text(parts: dict[str, float]) -> str:
    """``weights 12.6 GiB, grads 12.6 GiB, …`` (parts above zero, in :data:`PARTS` order)."""
    return ", ".join(f"{k} {fmt_bytes(parts[k])}" for k in PARTS if parts.get(k, 0.0) > 0)


def layout_text(layout: Layout) -> str:
    text = f"mesh {layout.mesh} dp{layout.dp} tp{layout.tp} pp{layout.pp} mb{layout.micro_batches}"
    text += f" recompute {layout.recompute}" if layout.recompute != "none" else ""
    text += f" shard {layout.shard}" if layout.shard != "none" else ""
    return text + (f" offload {layout.offload}" if layout.offload != "none" else "")


def least_call_bytes(experiment: Experiment, name: str, layouts: list[Layout], home: bool,
                     capacity: float | None = None) -> tuple[float, Layout, dict[str, float]]:
    """Of ``layouts``, the one whose fullest stage needs the fewest bytes for ``name`` alone
    (as :func:`_stage_parts` counts them): (those bytes, the layout, that stage's parts)."""
    best: tuple[float, Layout, dict[str, float]] | None = None
    for lay in layouts:
        stages = _stage_parts(experiment, name, lay, home, capacity)
        worst = max(stages, key=lambda p: sum(p.values()))
        if best is None or sum(worst.values()) < best[0]:
            best = (sum(worst.values()), lay, worst)
    if best is None:
        raise ValueError(f"least_call_bytes: no layout given for {name}")
    return best


def _fits_alone(experiment: Experiment, name: str, layout: Layout, home: bool, capacity: float) -> bool:
    return max(_stage_bytes(experiment, name, layout, home, capacity)) <= capacity


Degrees = tuple[int, int, int, int]  # (dp, tp, pp, micro-batching as in Shape)


@dataclass
class _Candidates:
    """One call's shapes before recompute: valid ones and, of those, the ones kept."""

    valid: dict[int, list[Degrees]]  # mesh size → every valid (dp, tp, pp, micro_batches)
    kept: dict[int, list[Degrees]]  # mesh size → those that can fit without recompute
    count: int  # valid layouts without recompute (shapes × meshes)
    # the most the call adds on one device over the kept shapes, a reallocated copy of the
    # stage included (the role's resident state aside): a bound for what it can add next to
    # another role's home
    most: float = 0.0


def _candidates(experiment: Experiment, name: str, firsts: dict[int, range], home: bool,
                capacity: float) -> _Candidates:
    cl = experiment.cluster
    call = experiment.workflow[name]
    model = experiment.models[call.role]
    out = _Candidates({}, {}, 0)
    trained = call.role in experiment.workflow.trained_roles()
    choices = batching_choices(experiment, name)
    engines = call.kind == "generate" and call.workload.lengths_vary
    dpn = cl.devices_per_node
    for size, starts in firsts.items():
        valid, kept = [], []
        for dp, tp, pp in _degrees(size, dpn, model.layers):
            first = _fitting_first(starts, size, tp, dpn)
            if first is None:
                continue
            mesh = DeviceMesh(first, size)  # the rules and memory of any other mesh where tp fits are the same
            # a rule mb=1 breaks, every micro-batch count breaks (dp·mb is a multiple of dp);
            # continuous-batching engines run one virtual engine per stage (mb = pp)
            least = pp if engines else 1
            if layout_problems(call, model, cl, Layout(mesh, dp, tp, pp, least)):
                continue
            fits = False
            for mb in ((pp,) if engines else choices):
                lay = make_layout(first, size, (dp, tp, pp, mb, "none", "none", "none"))
                if mb != least and layout_problems(call, model, cl, lay):
                    continue
                valid.append((dp, tp, pp, mb))
                # a call's bytes never grow with more micro-batches, so once one count fits
                # every larger one does (nor adds more); each token budget is judged on its own
                fits_here = True
                if mb < 0 or not fits:
                    adds = _stage_bytes(experiment, name, lay, False, capacity)
                    resident = ([sum(p.values()) for p in state_bytes(model, lay, trained)] if home
                                else [0.0] * len(adds))
                    fits_here = max(a + r for a, r in zip(adds, resident)) <= capacity
                    if fits_here:
                        copies = stage_param_counts(model, lay)
                        out.most = max(out.most, max(a + BF16 * p for a, p in zip(adds, copies)))
                fits = fits or (fits_here and mb > 0)
                if fits_here:
                    kept.append((dp, tp, pp, mb))
        out.valid[size], out.kept[size] = valid, kept
        out.count += sum(fitting_count(starts, size, d[1], dpn) for d in valid)
    return out


def _resident_max(experiment: Experiment, role: str, home: _Candidates, capacity: float) -> float:
    """The most bytes ``role`` can keep resident on one device: over its home call's valid
    placements whose resident bytes fit at all (with or without recompute, the call itself
    aside)."""
    model = experiment.models[role]
    trained = role in experiment.workflow.trained_roles()
    placements = {(size, dp, tp, pp) for size, shapes in home.valid.items() for dp, tp, pp, _ in shapes}
    most = (max(sum(parts.values()) for parts in home_bytes(model, Layout(DeviceMesh(0, s), dp, tp, pp), trained))
            for s, dp, tp, pp in placements)
    return max((b for b in most if b <= capacity), default=0.0)


def _saving_useful(experiment: Experiment, name: str, lay: Layout, variant: Layout, home: bool, others: float,
                   capacity: float) -> bool:
    """Whether ``variant`` of ``lay`` (a train call's layout with activation recompute, which
    only trades time for memory) can be in a fastest plan that fits: it must fit alone,
    save bytes on some stage, and ``lay`` must be able to overflow a device next to the most
    that other roles can keep resident there (``others``). Otherwise ``lay`` keeps any plan
    fitting and makes it faster."""
    saving = _stage_bytes(experiment, name, variant, home, capacity)
    if max(saving) > capacity:
        return False
    plain = _stage_bytes(experiment, name, lay, home, capacity)
    return any(f < p for f, p in zip(saving, plain)) and max(plain) + others > capacity


def _offload_useful(experiment: Experiment, name: str, lay: Layout, others: float, adds: float,
                    capacity: float) -> bool:
    """Whether offloading the home of ``lay`` (a train call's layout without offload) can matter:
    its resident bytes, next to the most other roles keep resident (``others``) and the most
    another call adds on a device (``adds``), can overflow a device (see the module docstring)."""
    call = experiment.workflow[name]
    trained = call.role in experiment.workflow.trained_roles()
    resident = max(sum(p.values()) for p in home_bytes(experiment.models[call.role], lay, trained))
    return resident + others + adds > capacity


def _variants(experiment: Experiment, name: str, lay: Layout, kept: bool, home: bool, others: float,
              capacity: float, recompute: bool, adds: float | None = None) -> list[tuple[str, str, str]]:
    """The (recompute, shard, offload) settings of a train call's shape (``lay``: its degrees
    and micro-batching, neither recomputing nor sharding nor offloading) the space keeps (see
    the module docstring); ``kept``: whether ``lay`` itself fits alone; ``adds``: the most
    another call adds on one device (None: no offload, the profile cannot price it)."""
    call = experiment.workflow[name]
    out = [("none", "none")] if kept else []
    rcs = recompute_choices(call) if recompute else ("none",)
    for shard in shard_choices(call, experiment.models[call.role], lay.dp, lay.pp):
        for rc in rcs:
            if (rc, shard) == ("none", "none"):
                continue
            variant = dataclasses.replace(lay, recompute=rc, shard=shard)
            if rc == "none":  # sharding only lowers a device's bytes: it fits wherever the plain shape does
                useful = kept or _fits_alone(experiment, name, variant, home, capacity)
            else:
                base = dataclasses.replace(lay, shard=shard)
                useful = _saving_useful(experiment, name, base, variant, home, others, capacity)
            if useful:
                out.append((rc, shard))
    offloads = [o for o in offload_choices(call) if o != "none"] if adds is not None else []
    return [(rc, sh, off) for rc, sh in out
            for off in ["none"] + (offloads if offloads and _offload_useful(
                experiment, name, dataclasses.replace(lay, recompute=rc, shard=sh), others, adds, capacity) else [])]


def build_space(experiment: Experiment, profile: Profile, recompute: bool = True, uneven: bool = False) -> Space:
    """The pruned plan space of ``experiment`` on ``profile`` (see the module docstring);
    ``recompute=False`` leaves activation recompute out; ``uneven`` puts every contiguous run of
    devices in it beside the aligned meshes (:meth:`Cluster.meshes`), for disaggregated plans.

    Raises :class:`ConfigError` naming the call when a call has no layout that can fit."""
    cl, wf = experiment.cluster, experiment.workflow
    cap, dpn = profile.capacity_bytes, cl.devices_per_node
    firsts = cl.mesh_starts(uneven)

    def placed(size: int, shape: Shape) -> Layout:  # on a mesh of ``size`` where the shape's tp fits
        return make_layout(_fitting_first(firsts[size], size, shape[1], dpn), size, shape)

    homes = wf.home_calls()
    order = wf.topological_order()
    found = {n: _candidates(experiment, n, firsts, homes[wf[n].role] == n, cap) for n in order}
    resident = {r: _resident_max(experiment, r, found[c], cap) for r, c in homes.items()}
    # the most another call adds on a device, beside each call (None: no offload without a host link)
    adds = {n: max((found[c].most for c in order if c != n), default=0.0) if profile.host_link else None
            for n in order}
    calls = []
    for name in order:
        call, cand = wf[name], found[name]
        choices = recompute_choices(call)
        shapes: dict[int, tuple[Shape, ...]] = {}
        home = homes[call.role] == name
        others = sum(v for r, v in resident.items() if r != call.role or not home)
        valid = 0
        for size in firsts:
            # the plain shapes first, then their recomputing and sharding variants
            kept: list[Shape] = [(*d, "none", "none", "none") for d in cand.kept[size]]
            plain = set(cand.kept[size])
            for d in cand.valid[size]:
                valid += (len(shard_choices(call, experiment.models[call.role], d[0], d[2]))
                          * fitting_count(firsts[size], size, d[1], dpn))
                if call.kind == "train":
                    lay = placed(size, (*d, "none", "none", "none"))
                    kept += [(*d, *v) for v in _variants(experiment, name, lay, d in plain, home, others,
                                                         cap, recompute, adds[name])[1 if d in plain else 0:]]
            shapes[size] = tuple(kept)
        space = CallSpace(name, call.role, shapes, firsts, valid * len(choices) * len(offload_choices(call)), dpn)
        if not space.count:
            model = experiment.models[call.role]
            why = "no valid layout" if not cand.count else f"no valid layout fits in {fmt_bytes(cap)} per device"
            msg = f"call {name}: {why} on the cluster's {cl.num_devices} devices (model {model.name}); no plan exists"
            if cand.count:
                model = experiment.models[call.role]
                valid = [placed(size, (*d, rc, sh, "none")) for size, shapes in cand.valid.items()
                         for d in shapes for rc in (choices if recompute else ("none",))
                         for sh in shard_choices(call, model, d[0], d[2])]
                need, lay, parts = least_call_bytes(experiment, name, valid, home, cap)
                msg += (f"; the least it needs is {fmt_bytes(need)} on a device ({layout_text(lay)}: "
                        f"{parts_text(parts)}) against {fmt_bytes(cap)}")
            raise ConfigError(msg)
        calls.append(space)
    roles: dict[str, list[str]] = {}
    for c in calls:
        roles.setdefault(c.role, []).append(c.name)
    return Space(tuple(calls), {r: tuple(v) for r, v in roles.items()}, homes)


def least_memory_plan(experiment: Experiment, space: Space, capacity: float | None = None) -> Plan:
    """A plan that needs little memory per device, to explain why none fits: each role's home
    call on its largest mesh (from device 0) with the shape whose fullest stage needs the fewest
    bytes (offloading the most the space keeps of it), and each other call on its role's home
    placement where its space has it (no reallocated copy), else likewise on its largest mesh."""
    layouts: dict[str, Layout] = {}

    def on_largest(cs: CallSpace) -> list[Layout]:
        size = max(cs.sizes)
        return cs.layouts_on(DeviceMesh(cs.firsts[size][0], size))

    for home in space.homes.values():
        chosen = least_call_bytes(experiment, home, on_largest(space[home]), True, capacity)[1]
        # the most the space lets it offload: less resident while the other calls run
        offloaded = [dataclasses.replace(chosen, offload=o) for o in ("all", "optimizer")]
        layouts[home] = next((lay for lay in offloaded if space[home].contains(lay)), chosen)
    for cs in space.calls:
        if cs.name in layouts:
            continue
        home = layouts[space.homes[cs.role]]
        placed = [lay for lay in cs.layouts_on(home.mesh)
                  if (lay.dp, lay.tp, lay.pp) == (home.dp, home.tp, home.pp)]
        layouts[cs.name] = least_call_bytes(experiment, cs.name, placed or on_largest(cs), False, capacity)[1]
    return Plan({n: layouts[n] for n in space.names})
