"""ReaLHF: a plan as the ``allocation_mode=manual`` Hydra overrides of ReaLHF's PPO experiment.

Key names and rules are taken from openpsi-project/ReaLHF at commit
be75fce9931acb9298270fdda08fdca46b6ee8ba (2025-04-24), copied into ``tests/fixtures/realhf/``
(every key written here is checked against their dataclasses):

- ``realhf/experiments/common/ppo_exp.py``: ``PPOConfig`` with one ``MFCConfig`` per model
  function call (``actor_gen``, ``actor_train``, ``critic_inf``, ``critic_train``, ``rew_inf``,
  ``ref_inf``), each a ``device_mesh``, a ``parallel`` (``data_parallel_size``,
  ``model_parallel_size``, ``pipeline_parallel_size``) and ``n_mbs`` micro-batches;
- ``realhf/api/quickstart/device_mesh.py``: a mesh is ``NODE01:0,1,2,3`` (an aligned slice of 1,
  2, 4 or 8 GPUs of one node) or ``NODE[01-02]`` (whole nodes), hosts ``NODE01``… when no cluster
  spec names them; ``realhf/experiments/common/common.py``: ``allocation_mode``, ``n_nodes``,
  ``n_gpus_per_node``, ``nodelist``;
- ``realhf/api/quickstart/model.py`` and ``realhf/experiments/common/utils.py``: per model
  ``gradient_checkpointing`` (on by default) and ``zero_stage`` — on the Megatron backend 0
  (replicated) or 1 (distributed optimizer); stage 3 is refused there.

ReaLHF takes a full per-call plan, so the meshes and degrees are written as planned where its
``DeviceMesh`` can name the mesh: a power-of-two count of one node's GPUs, or whole nodes
(``_is_valid_mapping``). A run it cannot name (``0-5``, or ``4-11`` on nodes of 8) is widened
to the least it can that holds it, keeping tp and pp where they divide the new size and giving
the extra devices to data parallelism. What its PPO experiment at that commit does not take: a
token budget per micro-batch (a count of micro-batches instead, as many as keep each within the
budget), a cap on running requests in generation (its generation runs the whole batch),
``shard: full`` (ZeRO-3, not on the Megatron backend: ``zero_stage=1``) and offload (``offload``
and ``optimizer.offload`` are "only valid for the deepspeed backend", ``__run_model_sanity_check``
in ``realhf/experiments/common/common.py``: the state stays on the devices). GRPO's grouped
sampling, a verifier reward and recomputed old log-probs (``actor_inf``) are not in this
experiment: such an experiment is refused with the reason.

The importer (:func:`import_overrides`) reads such overrides back: the experiment (the four
models from their ``path``, ``dataset.train_bs_n_seqs`` prompts of at most
``dataset.max_prompt_len`` tokens, ``ppo.gen.max_new_tokens`` generated, ``ppo.ppo_n_minibatches``,
the cluster from ``n_nodes`` and ``n_gpus_per_node``) and the plan: with
``allocation_mode=manual`` each call's ``device_mesh`` (named within ``nodelist``; the whole
cluster where it is not given, as ReaLHF's ``_get_rpc_allocations`` does), its ``parallel``
degrees and ``n_mbs``; with ``pipe_data``, ``pipe_model`` or ``d{dp}p{pp}m{tp}`` (in any order of
the three letters, ``extract_symmetric_allocation``) every call on all devices with those degrees.
Where a key is not given it takes ReaLHF's default at the commit above: ``n_nodes`` 1,
``n_gpus_per_node`` 8, ``nodelist`` ``NODE01`` (``NODE[01-NN]`` for several nodes,
``DeviceMesh.__post_init__``), ``parallel`` degrees 1, ``n_mbs`` 1 without pipeline stages and
otherwise ``2·pp`` for a train call and ``pp`` for the others (``MFCDef.n_mbs``),
``gradient_checkpointing`` True and ``zero_stage`` 2, which the Megatron backend runs as stage 1
(the distributed optimizer: ``shard: optimizer`` over more than one data-parallel rank;
``make_train_backend_config``), ``dataset.max_prompt_len`` 256, ``dataset.train_bs_n_seqs`` 256,
``ppo.gen.max_new_tokens`` 256, ``ppo.ppo_n_minibatches`` 4, ``optimizer.lr`` 1e-5, ``ppo.kl_ctl``
0.1, ``ppo.eps_clip`` and ``ppo.value_eps_clip`` 0.2, ``ppo.discount`` and ``ppo.gae_lambda`` 1.0,
``ppo.gen.temperature`` 1.0. Lengths are taken at their caps (a config keeps only those); the
ReaLHF allocation modes that run a planner of their own (``heuristic``, ``search``) are refused.
"""

from __future__ import annotations

import itertools
import re
from math import gcd

from estimator.base.errors import ConfigError
from estimator.interop.common import (
    Export,
    Projection,
    Settings,
    micro_batches_for,
    micro_rows,
    model_path,
    override_settings,
    preset_of,
    token_caps,
)
from estimator.spec.cluster import Cluster, DeviceMesh
from estimator.spec.experiment import Experiment, experiment_from_dict
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Plan

FRAMEWORK = "realhf"
REPO = "openpsi-project/ReaLHF"
COMMIT = "be75fce9931acb9298270fdda08fdca46b6ee8ba"
ENTRY = "python3 -m realhf.apps.quickstart ppo"
NODE_PREFIX = "NODE"  # ReaLHF's host names without a cluster spec (cluster_spec.node_name_prefix)
# this project's call → ReaLHF's MFCConfig field
MFC = {"actor_gen": "actor_gen", "actor_train": "actor_train", "critic_inf": "critic_inf",
       "critic_train": "critic_train", "reward_inf": "rew_inf", "ref_inf": "ref_inf"}
ROLE_KEY = {"actor": "actor", "critic": "critic", "ref": "ref", "reward": "rew"}
ZERO_STAGE = {"none": 0, "optimizer": 1}


def family(model: ModelSpec) -> str:
    """ReaLHF's model family (``realhf/api/from_hf/``) of a model's architecture."""
    if model.mlp == "swiglu" and model.positions == "rotary" and not model.bias:
        return "qwen2" if model.qkv_bias else "llama"
    if model.mlp == "gelu" and model.positions == "learned" and model.norm == "layernorm" \
            and not model.parallel_residual:
        return "gpt2"
    raise ConfigError(f"realhf: model {model.name!r} is of no architecture ReaLHF reads (llama, qwen2, gpt2, "
                      "mistral, mixtral, gemma)")


def _refuse(experiment: Experiment) -> None:
    p, missing = experiment.params, []
    if experiment.algorithm != "ppo":
        missing.append(f"the {experiment.algorithm} algorithm (its experiment is ppo)")
    if p.group_size > 1:
        missing.append(f"grouped sampling (group_size={p.group_size})")
    if experiment.verifier:
        missing.append("a verifier reward (reward: rule)")
    if p.old_logprobs == "recompute":
        missing.append("recomputed old log-probs (the actor_inf call)")
    if missing:
        raise ConfigError(f"realhf: the PPO experiment of {REPO} at commit {COMMIT[:8]} does not take "
                          f"{'; '.join(missing)}; export this experiment to another framework")


def realhf_mesh(mesh: DeviceMesh, cluster: Cluster) -> DeviceMesh:
    """The least mesh ReaLHF's ``DeviceMesh`` takes that holds ``mesh``: a power-of-two count of
    contiguous GPUs of its node (from its first device where the node has room, else ending
    at the node's last), or the whole nodes it spans."""
    per = cluster.devices_per_node
    nodes = cluster.mesh_nodes(mesh)
    size = 1 << (mesh.size - 1).bit_length()
    if len(nodes) == 1 and size < per:
        return DeviceMesh(min(mesh.first, (nodes[0] + 1) * per - size), size)
    return DeviceMesh(nodes[0] * per, len(nodes) * per)


def _widen(pr: Projection, experiment: Experiment, c: str) -> None:
    """Move call ``c`` onto :func:`realhf_mesh` of its mesh (tp and pp cut to what divides the
    new size, the rest data-parallel, micro-batches keeping their rows)."""
    lay, call = pr[c], experiment.workflow[c]
    mesh = realhf_mesh(lay.mesh, experiment.cluster)
    tp = gcd(lay.tp, mesh.size)
    pp = gcd(lay.pp, mesh.size // tp)
    dp = mesh.size // (tp * pp)
    mb = lay.micro_batches if lay.token_budget else micro_batches_for(call, dp, micro_rows(call, lay), FRAMEWORK)
    pr.set(c, f"ReaLHF's device meshes are a power-of-two count of one node's GPUs or whole nodes; {lay.mesh} "
              f"becomes the least such mesh that holds it", mesh=mesh, dp=dp, tp=tp, pp=pp, micro_batches=mb)


def project(experiment: Experiment, plan: Plan) -> Projection:
    """The plan as ReaLHF's PPO experiment runs it (the module docstring's rules)."""
    _refuse(experiment)
    pr = Projection(experiment, plan)
    wf = experiment.workflow
    for c in wf.call_names:
        if realhf_mesh(pr[c].mesh, experiment.cluster) != pr[c].mesh:
            _widen(pr, experiment, c)
        lay, call = pr[c], wf[c]
        if lay.token_budget:
            rows = max(1, lay.max_tokens_per_micro_batch // call.workload.seq_len)
            pr.set(c, "ReaLHF's MFCConfig counts micro-batches (n_mbs), it takes no token budget: as many as keep "
                      "each micro-batch within it", max_tokens_per_micro_batch=0,
                   micro_batches=micro_batches_for(call, lay.dp, rows, FRAMEWORK))
        if lay.max_concurrency:
            pr.set(c, "ReaLHF's generation runs its whole batch at once; it takes no cap on running requests",
                   max_concurrency=0)
        if call.kind == "train" and lay.shard == "full":
            pr.set(c, "ReaLHF's Megatron backend refuses zero_stage 3; stage 1 shards the optimizer state",
                   shard="optimizer")
        if call.kind == "train" and lay.offload != "none":
            pr.set(c, "ReaLHF offloads only on its DeepSpeed backend (offload and optimizer.offload); on the "
                      "Megatron backend the state stays on the devices", offload="none")
    return pr


def mesh_name(mesh: DeviceMesh, cluster: Cluster) -> str:
    """ReaLHF's name of a mesh, quoted for Hydra (its commas and brackets are Hydra's list
    syntax, so ReaLHF's own example script quotes it too): ``'NODE01:0,1'`` for a slice of one
    node, ``'NODE[01-02]'`` for whole nodes."""
    per = cluster.devices_per_node
    first, last = mesh.first // per + 1, mesh.last // per + 1
    if mesh.size < per:
        name = f"{NODE_PREFIX}{first:02d}:" + ",".join(str(d % per) for d in mesh.devices)
    else:
        name = f"{NODE_PREFIX}{first:02d}" if first == last else f"{NODE_PREFIX}[{first:02d}-{last:02d}]"
    return f"'{name}'"


def overrides(experiment: Experiment, plan: Plan) -> tuple[list[str], list[str]]:
    """Hydra overrides for a plan ReaLHF runs as given, and notes."""
    wf, p, h, cl = experiment.workflow, experiment.params, experiment.hyper, experiment.cluster
    prompt_cap, gen_cap = token_caps(experiment)
    out = ["allocation_mode=manual", f"n_nodes={cl.nodes}", f"n_gpus_per_node={cl.devices_per_node}",
           f"nodelist={mesh_name(DeviceMesh(0, cl.num_devices), cl)}"]
    notes: list[str] = []
    homes = wf.trained_roles()
    for role, key in ROLE_KEY.items():
        path, note = model_path(experiment, role)
        notes += [note] if note else []
        out += [f"{key}.type._class={family(experiment.models[role])}", f"{key}.path={path}",
                f"{key}.enable_bf16=True", f"{key}.enable_fp16=False"]
        out += [f"{key}.type.is_critic=True"] if role in ("critic", "reward") else []
        if role in homes:
            lay = plan[homes[role]]
            out += [f"{key}.gradient_checkpointing={lay.recompute == 'full'}",
                    f"{key}.zero_stage={ZERO_STAGE[lay.shard]}", f"{key}.optimizer.lr={h.lr:g}"]
    out += [f"dataset.max_prompt_len={prompt_cap}", f"dataset.train_bs_n_seqs={p.batch_size}",
            f"ppo.gen.max_new_tokens={gen_cap}",
            f"ppo.gen.min_new_tokens={gen_cap if p.gen_lengths.fixed else 0}",
            f"ppo.gen.temperature={h.temperature:g}", f"ppo.ppo_n_minibatches={p.ppo_minibatches}",
            f"ppo.kl_ctl={h.kl_coef:g}", f"ppo.eps_clip={h.clip_eps:g}", f"ppo.value_eps_clip={h.value_clip:g}",
            f"ppo.discount={h.gamma:g}", f"ppo.gae_lambda={h.lam:g}"]
    for c in wf.call_names:
        lay, key = plan[c], MFC[c]
        out += [f"{key}.device_mesh={mesh_name(lay.mesh, cl)}", f"{key}.parallel.data_parallel_size={lay.dp}",
                f"{key}.parallel.model_parallel_size={lay.tp}", f"{key}.parallel.pipeline_parallel_size={lay.pp}",
                f"{key}.n_mbs={lay.micro_batches}"]
    if not p.gen_lengths.fixed:
        notes.append("ReaLHF's generation stops each response at its end-of-sequence token; the plan's length "
                     "distribution is the experiment's assumption of where that is")
    return out, notes


def describe(plan: Plan, experiment: Experiment) -> str:
    return f"its own per-call plan on {experiment.cluster.num_devices} devices"


def export(experiment: Experiment, plan: Plan) -> Export:
    """The plan as ReaLHF overrides, ``overrides.txt``, one per line, for
    ``python3 -m realhf.apps.quickstart ppo``."""
    pr = project(experiment, plan)
    projected = pr.plan(FRAMEWORK)
    lines, notes = overrides(experiment, projected)
    return Export(FRAMEWORK, REPO, COMMIT, plan, projected, tuple(pr.changes),
                  {"overrides.txt": "\n".join(lines) + "\n"}, describe(projected, experiment), tuple(notes))


# ---- import: the overrides back into an experiment and a plan ---------------------------------

WHERE = "realhf overrides"
DEFAULT_ZERO_STAGE = 2  # ModelTrainEvalConfig.zero_stage; the Megatron backend runs 2 as 1
ZERO_READ = {0: "none", 1: "optimizer", 2: "optimizer"}


def _unquote(text: str) -> str:
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text


def parse_nodelist(text: str) -> list[str]:
    """Host names of a SLURM-style node list as ReaLHF reads it (``realhf/base/slurm_utils.py``,
    ``parse_nodelist``): ``NODE01``, or ``NODE[01-02,04]`` with the numbers two digits wide."""
    m = re.fullmatch(r"([A-Za-z_-]*[A-Za-z_])(?:(\d+)|\[([\d,\s-]+)\])", text.strip())
    if m is None:
        raise ConfigError(f"{WHERE}: {text!r} is not a node list (NODE01 or NODE[01-02])")
    prefix, single, ranges = m.groups()
    if single is not None:
        return [prefix + single]
    ids: list[int] = []
    for part in ranges.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ConfigError(f"{WHERE}: {text!r}: {part!r} is not a node number or a range a-b")
        ids += list(range(int(first), int(last or first) + 1))
    if not ids:
        raise ConfigError(f"{WHERE}: {text!r} names no node (a range a-b needs a <= b)")
    return [f"{prefix}{i:02d}" for i in ids]


def read_mesh(text: str, nodes: list[str], per_node: int) -> DeviceMesh:
    """A device mesh name (``NODE01:0,1``, ``NODE[01-02]``; ``make_device_mesh_from_name``) as the
    planner's mesh over the cluster's ``nodes``, in their order; contiguous devices only."""
    name = _unquote(text.strip())
    hosts, _, gpus = name.partition(":")
    names = parse_nodelist(hosts)
    missing = [h for h in names if h not in nodes]
    if missing:
        raise ConfigError(f"{WHERE}: device mesh {name!r} names node(s) {missing} outside nodelist {nodes}")
    index = [nodes.index(h) for h in names]
    if gpus:
        if len(index) != 1:
            raise ConfigError(f"{WHERE}: device mesh {name!r}: GPU ids go with one node")
        try:
            ids = sorted(int(g) for g in gpus.split(","))
        except ValueError:
            raise ConfigError(f"{WHERE}: device mesh {name!r}: {gpus!r} is not a list of GPU ids") from None
        if ids != list(range(ids[0], ids[0] + len(ids))) or ids[-1] >= per_node:
            raise ConfigError(f"{WHERE}: device mesh {name!r}: GPUs {ids} are not contiguous GPUs of a node of "
                              f"{per_node}")
        return DeviceMesh(index[0] * per_node + ids[0], len(ids))
    index.sort()
    if index != list(range(index[0], index[0] + len(index))):
        raise ConfigError(f"{WHERE}: device mesh {name!r}: nodes {names} are not consecutive nodes of {nodes}")
    return DeviceMesh(index[0] * per_node, len(index) * per_node)


def _symmetric(mode: str, nodes: int, per_node: int) -> tuple[int, int, int] | None:
    """(dp, pp, tp) of an allocation mode that gives every call the same degrees, else None."""
    if mode == "pipe_data":
        return per_node, nodes, 1
    if mode == "pipe_model":
        return 1, nodes, per_node
    for x, y, z in itertools.permutations("dmp"):
        m = re.match(rf"{x}(\d+){y}(\d+){z}(\d+)", mode)
        if m:
            degrees = dict(zip((x, y, z), map(int, m.groups())))
            return degrees["d"], degrees["p"], degrees["m"]
    return None


def _read_models(r: Settings) -> tuple[dict[str, str], dict[str, dict]]:
    """Model per role (a preset where the path is one's repository) and per trained role its
    recompute and shard setting."""
    models, train = {}, {}
    for role, key in ROLE_KEY.items():
        models[role] = preset_of(r.text(f"{key}.path"))
        backend = r.text(f"{key}.backend", "megatron")
        if backend != "megatron":
            raise ConfigError(f"{WHERE}: {key}.backend={backend}: the importer reads the Megatron backend, the one "
                              "ReaLHF reallocates parameters on")
        r.consume(f"{key}.type._class", f"{key}.type.is_critic", f"{key}.enable_bf16", f"{key}.enable_fp16")
        stage = r.number(f"{key}.zero_stage", int, DEFAULT_ZERO_STAGE)
        if role in ("actor", "critic"):
            if stage not in ZERO_READ:
                raise ConfigError(f"{WHERE}: {key}.zero_stage={stage}: ReaLHF's Megatron backend runs stages 0, 1 "
                                  "and 2 (as 1), not 3")
            train[role] = {"recompute": "full" if r.flag(f"{key}.gradient_checkpointing", True) else "none",
                           "shard": ZERO_READ[stage]}
        else:
            r.consume(f"{key}.gradient_checkpointing")
    return models, train


def read_experiment(r: Settings, device: str) -> tuple[dict, dict[str, dict], list[str]]:
    """The experiment the overrides describe (lengths at their caps), as the experiment file's
    mapping, the trained roles' recompute and shard settings, and notes."""
    models, train = _read_models(r)
    hyper = {"lr": r.number("actor.optimizer.lr", float, 1e-5), "kl_coef": r.number("ppo.kl_ctl", float, 0.1),
             "clip_eps": r.number("ppo.eps_clip", float, 0.2), "value_clip": r.number("ppo.value_eps_clip", float, 0.2),
             "gamma": r.number("ppo.discount", float, 1.0), "lam": r.number("ppo.gae_lambda", float, 1.0),
             "temperature": r.number("ppo.gen.temperature", float, 1.0)}
    r.consume("critic.optimizer.lr")
    raw = {"algorithm": "ppo", "models": models, "batch_size": r.number("dataset.train_bs_n_seqs", int, 256),
           "prompt_len": r.number("dataset.max_prompt_len", int, 256),
           "gen_len": r.number("ppo.gen.max_new_tokens", int, 256),
           "ppo_minibatches": r.number("ppo.ppo_n_minibatches", int, 4), "hyperparams": hyper,
           "cluster": {"nodes": r.number("n_nodes", int, 1), "devices_per_node": r.number("n_gpus_per_node", int, 8),
                       "device": device}}
    notes = []
    if r.number("ppo.gen.min_new_tokens", int, 256) < raw["gen_len"]:
        notes.append("ReaLHF stops each response at its end-of-sequence token (ppo.gen.min_new_tokens below "
                     "max_new_tokens); the config keeps only the cap, at which the prediction takes every response "
                     "unless given their mean")
    return raw, train, notes


def read_plan(r: Settings, experiment: Experiment, train: dict[str, dict]) -> Plan:
    """The plan: each call's mesh, degrees and micro-batches (module docstring)."""
    cl, wf = experiment.cluster, experiment.workflow
    default_nodes = f"{NODE_PREFIX}01" if cl.nodes == 1 else f"{NODE_PREFIX}[01-{cl.nodes:02d}]"
    nodes = parse_nodelist(_unquote(r.text("nodelist", default_nodes)))
    if len(nodes) != cl.nodes:
        raise ConfigError(f"{WHERE}: nodelist names {len(nodes)} node(s), n_nodes={cl.nodes}")
    mode = r.text("allocation_mode", "pipe_model")
    symmetric = _symmetric(mode, cl.nodes, cl.devices_per_node)
    if mode != "manual" and symmetric is None:
        raise ConfigError(f"{WHERE}: allocation_mode={mode}: the importer reads manual, pipe_data, pipe_model and "
                          "d{dp}p{pp}m{tp} allocations; heuristic and search leave the layouts to ReaLHF")
    calls = {}
    for c in wf.call_names:
        key = MFC[c]
        if symmetric is None:
            given = r.text(f"{key}.device_mesh", "")
            mesh = read_mesh(given, nodes, cl.devices_per_node) if given else DeviceMesh(0, cl.num_devices)
            dp, tp, pp = (r.number(f"{key}.parallel.{k}", int, 1) for k in
                          ("data_parallel_size", "model_parallel_size", "pipeline_parallel_size"))
        else:
            mesh, (dp, pp, tp) = DeviceMesh(0, cl.num_devices), symmetric
        kind = wf[c].kind
        default = 1 if pp == 1 else (2 * pp if kind == "train" else pp)
        lay = {"mesh": str(mesh), "dp": dp, "tp": tp, "pp": pp, "micro_batches": r.number(f"{key}.n_mbs", int, default)}
        if kind == "train":
            settings = train[wf[c].role]
            lay |= {"recompute": "full"} if settings["recompute"] == "full" else {}
            lay |= {"shard": settings["shard"]} if settings["shard"] != "none" and dp > 1 else {}
        calls[c] = lay
    return Plan.from_data({"calls": calls}, where=WHERE)


def import_overrides(text: str, device: str) -> tuple[dict, Plan, list[str]]:
    """The experiment (as an experiment file's mapping, on ``device``), the plan that ReaLHF's
    PPO overrides describe, and notes; a key the importer does not read is refused by name."""
    r = override_settings(text, WHERE, FRAMEWORK)
    raw, train, notes = read_experiment(r, device)
    experiment = experiment_from_dict(raw, where=WHERE)
    plan = read_plan(r, experiment, train)
    r.finish()
    return raw, plan, notes
