"""The op census of the executor: every aten op each piece of a call dispatches, with its FLOPs
and bytes as functions of shape symbols, written as data the estimator reads.

Each piece (:data:`PIECES`) runs the executor's own code — :mod:`executor.model` blocks with
the engine's tensor-parallel hooks, :class:`executor.engine.TensorParallel`'s ends, the
engine's token choice with the sampler, the losses of :mod:`executor.rlhf`, ``ShardAdam``, the
data-parallel gradient sum, the flatten before a sharded group's reduce-scatter — on inputs
whose every dimension is a product of shape symbols set to distinct primes, under
:func:`calibration.aten.record`. Tensor parallelism runs over
an in-process ``fake`` process group of ``tp`` ranks (collectives are no-ops there; the links
charge them), so the local copies around collectives are recorded as the executor issues them.
Each piece is recorded once per run dtype (bfloat16: GPU runs; float32: the CPU default) and
checked against a second recording at other primes (:func:`calibration.opcount.check_against`).

Symbols: ``rows`` sequences of the micro-batch, ``tokens`` new positions per sequence (the
whole sequence for a training forward), ``kv_len`` keys a decode step attends (padded to the
longest row in a continuous-batching step), ``hidden``,
``kv_heads`` and ``group`` (query heads per K/V head) on this rank, ``half_head_dim``,
``half_rot_dim`` (half the rotated part of a head, GPT-NeoX's partial rotary), ``ffn`` and
``vocab_local`` on this rank, ``positions`` (rows of a learned position table), ``tp``,
``vocab`` (full), ``response`` tokens of a loss (pair losses see ``2·rows`` rows), ``numel`` of a parameter tensor.

    python -m calibration.census            # rewrite calibration/census/executor.json
    python -m calibration.census --check    # exit 1, naming the pieces that changed, if stale
    python -m calibration.census --check --json

Generation with fixed lengths runs ``block_prefill`` and ``block_decode`` (one KV cache per
micro-batch, every row at the same position); continuous batching (:mod:`executor.serving`)
prefills right-padded rows into a KV pool with ``block_prefill_batched`` at ``rows`` × the
longest row (``block_prefill``'s FLOPs and bytes, plus the views that pick the rows' slots; a
test holds them so), and decodes with
``block_decode_batched`` (``rows`` = the running batch, ``kv_len`` = the padded KV length: each
row writes its own position and attends under a padding mask), its per-step tables and mask
``rotary_decode_batched`` and its token choice ``sample_ending`` / ``greedy_ending`` (each row at
its own position; EOS at its length).

It prints, per piece and dtype, the aten ops dispatched at the first prime assignment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.distributed as dist

from calibration.opcount import check_against, record, symbolic, totals
from estimator.base.errors import cli_guard
from estimator.base.io import atomic_write_json
from estimator.base.tables import format_table
from estimator.cost.census import BLOCK_VARIANTS, CENSUS_FORMAT, CENSUS_PATH
from estimator.spec.models import ModelSpec
from executor import comm, rlhf
from executor import model as M
from executor.data import Sampler
from executor.engine import Engine, TensorParallel, tensor_parallel_hooks
from executor.optim import ShardAdam

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# two assignments of distinct primes ≥ 11; the second checks the symbolic record of the first
PRIMES_A = dict(group=11, kv_heads=13, half_head_dim=17, rows=19, tokens=29, response=23, kv_len=31,
                hidden=37, ffn=41, vocab_local=43, tp=47, vocab=53, numel=59, positions=73)
PRIMES_B = dict(group=13, kv_heads=11, half_head_dim=19, rows=17, tokens=31, response=29, kv_len=23,
                hidden=41, ffn=37, vocab_local=47, tp=43, vocab=59, numel=53, positions=79)
# partial rotary needs half_rot_dim < half_head_dim: both above the other primes
PARTIAL_PRIMES_A = dict(half_head_dim=67, half_rot_dim=61)
PARTIAL_PRIMES_B = dict(half_head_dim=71, half_rot_dim=67)
MAX_TP = 64  # ranks of the fake world; groups of tp ranks are cut from it
Thunk = Callable[[], None]


def _spec(v: dict, variant: str = "", head: str = "lm") -> ModelSpec:
    """A one-block model of architecture ``variant`` (a :data:`BLOCK_VARIANTS` tag) whose
    head_dim is 2·half_head_dim; the residual width comes from the parameters (``hidden``), so it
    is a symbol of its own."""
    nh, d = v["kv_heads"] * v["group"], 2 * v["half_head_dim"]
    fields = dict(BLOCK_VARIANTS[variant])
    if fields.get("positions") == "learned":
        fields["max_positions"] = v["positions"]
    if "rotary_fraction" in fields:
        fields["rotary_fraction"] = v["half_rot_dim"] / v["half_head_dim"]
    return ModelSpec("census", 1, nh * d, v["ffn"], nh, v["kv_heads"], v["vocab_local"], head=head, **fields)


def _rand(*shape: int, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return (torch.randn(shape) * 0.02).to(dtype).requires_grad_(grad)


def _block_params(v: dict, dt: torch.dtype, spec: ModelSpec, grad: bool = False) -> M.Params:
    h, f, d = v["hidden"], v["ffn"], 2 * v["half_head_dim"]
    q, kv = v["kv_heads"] * v["group"] * d, v["kv_heads"] * d
    shapes = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
              "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
              "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
              "mlp.down_proj.weight": (h, f)}
    if spec.qkv_bias or spec.bias:
        shapes |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    if spec.bias:
        shapes |= {"self_attn.o_proj.bias": (h,), "mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,),
                   "mlp.down_proj.bias": (h,)}
    if spec.norm == "layernorm":
        shapes |= {"input_layernorm.bias": (h,), "post_attention_layernorm.bias": (h,)}
    if spec.mlp != "swiglu":
        shapes = {n: s for n, s in shapes.items() if not n.startswith("mlp.gate_proj")}
    return {f"layers.0.{n}": _rand(*s, dtype=dt, grad=grad) for n, s in shapes.items()}


def _group(v: dict, tp: bool) -> dist.ProcessGroup | None:
    return dist.new_group(list(range(v["tp"]))) if tp else None


# ---- the pieces: (values, dtype, tensor-parallel?, variant tag) → the thunk to record ------------


def block_forward(v, dt, tp, variant, cache=False, decode=False, backward=False, recompute=False,
                  pool=False) -> Thunk:
    spec, b = _spec(v, variant), v["rows"]
    params = _block_params(v, dt, spec, grad=backward)
    hooks = tensor_parallel_hooks(_group(v, tp))
    if pool:
        return _pool_decode(v, dt, spec, params, hooks) if decode else _pool_prefill(v, dt, spec, params, hooks)
    t, start = (1, v["kv_len"] - 1) if decode else (v["tokens"], 0)
    kv = M.KVCache(start + t) if cache else None
    if decode:  # the cache holds kv_len − 1 positions before the step
        past = M.context(spec, 0, start, dt, torch.device("cpu"), kv, hooks)
        with torch.no_grad():
            M.block(params, 0, _rand(b, start, v["hidden"], dtype=dt), past)
    ctx = M.context(spec, start, t, dt, torch.device("cpu"), kv, hooks)
    x = _rand(b, t, v["hidden"], dtype=dt, grad=backward)
    if backward:  # recompute: the block's forward runs again inside its backward (M.blocks)
        out = M.blocks(params, [0], x, ctx, recompute=recompute)
        grad = torch.randn_like(out)
        return lambda: torch.autograd.backward(out, grad)
    return torch.no_grad()(lambda: M.block(params, 0, x, ctx))


def _pool_lengths(v) -> torch.Tensor:
    """KV lengths of a continuous-batching decode step's rows: the longest ``kv_len`` (the
    padded length), the others shorter."""
    return torch.arange(v["kv_len"] - v["rows"] + 1, v["kv_len"] + 1).clamp(min=1)


def _pool_prefill(v, dt, spec, params, hooks) -> Thunk:
    """A continuous-batching prefill: ``rows`` right-padded to ``tokens`` (the longest) into the
    slots after two running requests of a KV pool longer than the rows
    (:class:`executor.model.PoolPrefill`)."""
    b, t = v["rows"], v["tokens"]
    pool = M.KVPool(b + 2, 2 * t)
    cpu = torch.device("cpu")
    with torch.no_grad():  # two running requests hold the first slots (and the pool is allocated, as in a run)
        M.block(params, 0, _rand(2, t, v["hidden"], dtype=dt), M.context(spec, 0, t, dt, cpu, pool.prefill(0), hooks))
    ctx = M.context(spec, 0, t, dt, cpu, pool.prefill(2), hooks)
    x = _rand(b, t, v["hidden"], dtype=dt)
    return torch.no_grad()(lambda: M.block(params, 0, x, ctx))


def _pool_decode(v, dt, spec, params, hooks) -> Thunk:
    """One continuous-batching decode step of ``rows`` running requests over a KV pool, keys
    padded to ``kv_len`` and masked per row (:class:`executor.model.PoolDecode`), in the slots
    of a pool with room to spare."""
    b, width = v["rows"], v["kv_len"]
    pool = M.KVPool(b + 2, 2 * width)  # more slots and positions than the step uses, as in general
    cpu = torch.device("cpu")
    with torch.no_grad():  # the pool holds the rows' earlier positions
        M.block(params, 0, _rand(b, width - 1, v["hidden"], dtype=dt),
                M.context(spec, 0, width - 1, dt, cpu, pool.prefill(0), hooks))
    lengths = _pool_lengths(v)
    ctx = M.context(spec, 1, 1, dt, cpu, pool.decode(lengths, width), hooks, positions=lengths - 1)
    x = _rand(b, 1, v["hidden"], dtype=dt)
    return torch.no_grad()(lambda: M.block(params, 0, x, ctx))


def rotary(v, dt, tp, variant, decode=False, pool=False) -> Thunk:
    """The rotary tables of a pass; ``pool``: a continuous-batching decode step's, one position
    per row, with the pass's padding mask (built once per step, outside the blocks)."""
    spec = _spec(v)
    if pool:
        lengths = _pool_lengths(v)
        kv = M.KVPool(v["rows"], v["kv_len"])
        return lambda: M.context(spec, 1, 1, dt, torch.device("cpu"), kv.decode(lengths, v["kv_len"]),
                                 positions=lengths - 1)
    start, t = (v["kv_len"] - 1, 1) if decode else (0, v["tokens"])
    return lambda: M.context(spec, start, t, dt, torch.device("cpu"))


def embed(v, dt, tp, variant, backward=False) -> Thunk:
    """The (vocab-parallel) embedding; ``+learned`` adds the position table's rows (a view)."""
    params = {"embed_tokens.weight": _rand(v["vocab_local"], v["hidden"], dtype=dt, grad=backward)}
    if variant == "+learned":
        params["embed_positions.weight"] = _rand(v["positions"], v["hidden"], dtype=dt, grad=backward)
    tokens = torch.randint(0, v["vocab_local"] * (v["tp"] if tp else 1), (v["rows"], v["tokens"]))
    ends = TensorParallel(_spec(v), _group(v, tp), 0)
    if backward:
        out = ends.embed(params, tokens)
        grad = torch.randn_like(out)
        return lambda: torch.autograd.backward(out, grad)
    return torch.no_grad()(lambda: ends.embed(params, tokens))


def head(v, dt, tp, variant, kind="lm", backward=False) -> Thunk:
    """Final norm and head; ``+layernorm`` is a LayerNorm with its bias."""
    rows = v["vocab_local"] if kind == "lm" else 1
    params = {"norm.weight": _rand(v["hidden"], dtype=dt, grad=backward),
              ("lm_head.weight" if kind == "lm" else "value_head.weight"): _rand(rows, v["hidden"], dtype=dt,
                                                                                  grad=backward)}
    if variant == "+layernorm":
        params["norm.bias"] = _rand(v["hidden"], dtype=dt, grad=backward)
    spec = dataclasses.replace(_spec(v, head=kind), norm="layernorm" if variant else "rmsnorm")
    ends = TensorParallel(spec, _group(v, tp), 0)
    x = _rand(v["rows"], v["tokens"], v["hidden"], dtype=dt, grad=backward)
    if backward:
        out = ends.final(params, x)
        grad = torch.randn_like(out)
        return lambda: torch.autograd.backward(out, grad)
    return torch.no_grad()(lambda: ends.final(params, x))


def choose(v, dt, tp, variant, greedy=False, ending=False) -> Thunk:
    """One generated token per row: the engine's promote, sample, broadcast and log-prob;
    ``ending``: continuous batching's, each row at its own position and ending at its length
    (:meth:`executor.data.Sampler.ending`)."""
    logits = _rand(v["rows"], v["vocab"], dtype=dt)
    sampler = Sampler(0, 0, "actor_gen", 1.0, greedy)
    rows = torch.arange(v["rows"])
    engine = SimpleNamespace(torch_device=torch.device("cpu"), tp_group=_group(v, tp), tp_root=0)
    if ending:
        lengths, positions = torch.full((v["rows"],), 5), rows % 5
        return torch.no_grad()(lambda: Engine._choose(engine, 0, positions, logits,
                                                      lambda mb, s, lg: sampler.ending(rows, s, lengths, lg), 1.0))
    return torch.no_grad()(lambda: Engine._choose(engine, 0, 1, logits, lambda mb, s, lg: sampler(rows, s, lg), 1.0))


PAIRED = ("dpo_actor", "rw_reward")  # rows 2i and 2i+1 are a (chosen, rejected) pair


def _loss_inputs(v, dt, paired):
    b, s, g, vocab = v["rows"] * (2 if paired else 1), v["tokens"], v["response"], v["vocab"]
    logits = _rand(b, s, vocab, dtype=dt, grad=True)
    values = _rand(b, s, dtype=dt, grad=True)
    seq = torch.randint(0, vocab, (b, s))
    per_token = [_rand(b, g, dtype=dt) for _ in range(3)]
    return logits, values, seq, s - g, per_token


LOSSES = {  # as executor.calls composes them, on the model output of one micro-batch
    "ppo_actor": lambda lg, val, seq, p, t: rlhf.ppo_actor_loss(rlhf.response_logp(lg, seq, p), t[0], t[1], 0.2, 7),
    "ppo_critic": lambda lg, val, seq, p, t: rlhf.critic_loss(rlhf.response_values(val, p), t[0], t[1], 0.2, 7),
    "grpo_actor": lambda lg, val, seq, p, t: rlhf.grpo_loss(rlhf.response_logp(lg, seq, p), t[0], t[1],
                                                            t[2][:, 0], 0.2, 0.05, 7),
    "remax_actor": lambda lg, val, seq, p, t: rlhf.reinforce_loss(rlhf.response_logp(lg, seq, p), t[0], 7),
    "dpo_actor": lambda lg, val, seq, p, t: rlhf.dpo_loss(rlhf.response_logp(lg, seq, p), t[0], 0.1, 7),
    "sft_actor": lambda lg, val, seq, p, t: rlhf.sft_loss(rlhf.response_logp(lg, seq, p), 7),
    "rw_reward": lambda lg, val, seq, p, t: rlhf.reward_model_loss(rlhf.sequence_reward(val), 7),
    "ref_logp": lambda lg, val, seq, p, t: rlhf.response_logp(lg, seq, p),
}


def loss(v, dt, tp, variant, name="ppo_actor", backward=False) -> Thunk:
    logits, values, seq, p, t = _loss_inputs(v, dt, name in PAIRED)
    fn = LOSSES[name]
    if backward:
        out = fn(logits, values, seq, p, t)
        return lambda: out.backward()
    return torch.no_grad()(lambda: fn(logits, values, seq, p, t))


def optimizer(v, dt, tp, variant, tensors=2) -> Thunk:
    """One Adam step and zero_grad over ``tensors`` parameters of ``numel`` elements each
    (after a first step made the state)."""
    ws = {f"w{i}": _rand(v["numel"], dtype=dt, grad=True) for i in range(tensors)}
    opt = ShardAdam(ws, 1e-4)
    for _ in range(2):
        for w in ws.values():
            w.grad = torch.randn_like(w)
        if _ == 0:
            opt.step()
    return lambda: (opt.step(), opt.zero_grad())


def dp_allreduce(v, dt, tp, variant, tensors=2) -> Thunk:
    """The flatten copies around the data-parallel gradient sum of ``tensors`` gradients."""
    grads = [_rand(v["numel"], dtype=dt) for _ in range(tensors)]
    group = dist.new_group([0, 1])
    return lambda: comm.all_reduce_sum(grads, group)


def shard_flatten(v, dt, tp, variant, tensors=2) -> Thunk:
    """The flatten of ``tensors`` gradients into one buffer before a sharded group's
    reduce-scatter (:func:`executor.comm.flatten`): recorded for one rank, whose padding is
    empty — the fewer than ``dp`` zeros more ranks pad with are no product of shape symbols,
    and left out."""
    grads = [_rand(v["numel"], dtype=dt) for _ in range(tensors)]
    return lambda: comm.flatten(grads, 1)


def _pieces() -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    for tp in (False, True):
        for variant in BLOCK_VARIANTS:
            tag = ("@tp" if tp else "") + variant
            for name, kw in (("block_forward", {}), ("block_prefill", {"cache": True}),
                             ("block_decode", {"cache": True, "decode": True}),
                             ("block_prefill_batched", {"pool": True}),
                             ("block_decode_batched", {"pool": True, "decode": True}),
                             ("block_backward", {"backward": True}),
                             ("block_backward_recompute", {"backward": True, "recompute": True})):
                out[name + tag] = (block_forward, tp, variant, kw)
        tag = "@tp" if tp else ""
        for variant in ("", "+learned"):
            out["embed" + tag + variant] = (embed, tp, variant, {})
            out["embed_backward" + tag + variant] = (embed, tp, variant, {"backward": True})
        for kind in ("lm", "value"):
            for variant in ("", "+layernorm"):
                out[f"head_{kind}{tag}{variant}"] = (head, tp, variant, {"kind": kind})
                out[f"head_{kind}_backward{tag}{variant}"] = (head, tp, variant, {"kind": kind, "backward": True})
    out["rotary"] = (rotary, False, "", {})
    out["rotary_decode"] = (rotary, False, "", {"decode": True})
    out["rotary_decode_batched"] = (rotary, False, "", {"pool": True})
    out["sample"] = (choose, False, "", {})
    out["greedy"] = (choose, False, "", {"greedy": True})
    out["sample_ending"] = (choose, False, "", {"ending": True})
    out["greedy_ending"] = (choose, False, "", {"greedy": True, "ending": True})
    for name in LOSSES:
        out[f"loss_{name}"] = (loss, False, "", {"name": name})
        if name != "ref_logp":
            out[f"loss_{name}_backward"] = (loss, False, "", {"name": name, "backward": True})
    for k in (2, 3):  # linear in the number of tensors: two counts fix it
        out[f"optimizer_{k}"] = (optimizer, False, "", {"tensors": k})
        out[f"dp_allreduce_{k}"] = (dp_allreduce, False, "", {"tensors": k})
        out[f"shard_flatten_{k}"] = (shard_flatten, False, "", {"tensors": k})
    return out


PIECES = _pieces()


def _init_fake_world() -> bool:
    """An in-process world of MAX_TP fake ranks; True if this call created it."""
    if dist.is_initialized():
        return False
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=MAX_TP)
    return True


def build(names: list[str] | None = None, dtypes: list[str] | None = None, progress: bool = False) -> dict:
    """The census document (every piece and dtype unless ``names`` / ``dtypes`` select some)."""
    created = _init_fake_world()
    try:
        return _build(names, dtypes, progress)
    finally:
        if created:
            dist.destroy_process_group()


def _build(names: list[str] | None, dtypes: list[str] | None, progress: bool) -> dict:
    torch.manual_seed(0)
    selected = {n: PIECES[n] for n in (names or PIECES)}
    work = [(d, n) for d in (dtypes or DTYPES) for n in selected]
    if progress:
        from estimator.base.progress import progress_bar

        work = progress_bar(work, desc="census", unit="piece")
    pieces: dict[str, dict[str, list]] = {d: {} for d in (dtypes or DTYPES)}
    for dname, name in work:
        fn, tp, variant, kw = selected[name]
        dt = DTYPES[dname]
        run = lambda v, fn=fn, tp=tp, variant=variant, kw=kw, dt=dt: fn(v, dt, tp, variant, **kw)  # noqa: E731
        primes_a, primes_b = PRIMES_A, PRIMES_B
        if "+partial" in variant:
            primes_a, primes_b = PRIMES_A | PARTIAL_PRIMES_A, PRIMES_B | PARTIAL_PRIMES_B
        ops_a, ops_b = record(run, primes_a), record(run, primes_b)
        entries = symbolic(ops_a, primes_a, ops_b, primes_b)
        check_against(entries, ops_b, primes_b, f"{name} ({dname})")
        pieces[dname][name] = entries
    return {"format": CENSUS_FORMAT, "torch": torch.__version__.split("+")[0],
            "command": "python -m calibration.census", "dtypes": pieces}


def stale(current: dict, committed: dict) -> list[str]:
    """Pieces whose ops differ between two census documents (added, removed or changed)."""
    out = []
    for d in sorted(set(current["dtypes"]) | set(committed.get("dtypes", {}))):
        a, b = current["dtypes"].get(d, {}), committed.get("dtypes", {}).get(d, {})
        out += [f"{n} ({d})" for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
    return out


def _table(doc: dict) -> str:
    """Per piece, the aten ops it dispatches at the census's first prime assignment."""
    rows = [("piece",) + tuple(f"ops ({d})" for d in doc["dtypes"])]
    names = sorted({n for pieces in doc["dtypes"].values() for n in pieces})
    for n in names:
        primes = PRIMES_A | PARTIAL_PRIMES_A if "+partial" in n else PRIMES_A
        counts = [totals(doc["dtypes"][d].get(n, []), primes)[0] for d in doc["dtypes"]]
        rows.append((n,) + tuple(f"{c:.0f}" for c in counts))
    return format_table(rows)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calibration.census", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed census is stale")
    ap.add_argument("--out", default=str(CENSUS_PATH), help=f"census file (default {CENSUS_PATH})")
    ap.add_argument("--json", action="store_true", help="print one JSON object: path, pieces, stale pieces")
    args = ap.parse_args(argv)
    doc = build(progress=True)
    changed: list[str] = []
    if args.check:
        try:
            committed = json.loads(open(args.out).read())
        except (OSError, json.JSONDecodeError):
            committed = {}
        changed = stale(doc, committed)
    else:
        atomic_write_json(args.out, doc)
    if args.json:
        print(json.dumps({"path": args.out, "pieces": sorted(PIECES), "dtypes": sorted(DTYPES),
                          "written": not args.check, "stale": changed}))
    else:
        print(_table(doc))
        if not args.check:
            print(f"wrote {args.out}: {len(PIECES)} pieces × {len(DTYPES)} dtypes")
        elif changed:
            print(f"census {args.out} is stale; changed: {', '.join(changed)}; "
                  "regenerate with: python -m calibration.census")
        else:
            print(f"census {args.out} is current ({len(PIECES)} pieces × {len(DTYPES)} dtypes)")
    return 1 if changed else 0


def main(argv: list[str] | None = None) -> int:
    return cli_guard(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
