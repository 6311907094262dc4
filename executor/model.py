"""The decoder as plain torch functions over an explicit parameter dict.

LLaMA architecture (RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query causal attention)
with an LM head or a scalar value head, and the GPT-style variants :class:`ModelSpec` names:
LayerNorm (weight and bias), a two-matrix GELU or ReLU MLP (GELU in its tanh approximation,
GPT-2's ``gelu_new``, for every GELU model — GPT-NeoX's exact GELU differs from it by less
than 1e-3), biases on every linear layer, a learned position table added to the token
embedding, GPT-NeoX's parallel residual and rotary embeddings on a fraction of each head.

Parameters are a ``dict[str, Tensor]`` keyed by the names of
:func:`estimator.spec.sharding.param_inventory`, so one set of functions runs both the full model
and a tensor-parallel shard: head counts and widths are read from the tensors' shapes (a
shard of ``tp`` has ``heads/tp`` query heads, ``kv_heads/tp`` key/value heads and ``ffn/tp``
MLP width). There is no parallel code here: the engine passes :class:`TPHooks` that
wrap the column-parallel inputs and row-parallel outputs of each sub-layer, and handles the
vocab-parallel embedding and head itself. A row-parallel projection's bias is added after the
``exit`` hook (once, not once per shard).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import Box, param_inventory, shard

INIT_STD = 0.02  # GPT-2 / LLaMA initializer range
# scaled_dot_product_attention takes grouped K/V heads itself from torch 2.5 on; older torch
# (the project accepts 2.1) gets explicit copies of K and V per query head.
SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)

Params = dict[str, Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True)
class TPHooks:
    """Where tensor parallelism enters a sub-layer (Megatron's f and g operators).

    ``enter`` wraps the input of the column-parallel projections (q/k/v, gate/up), ``exit``
    the output of the row-parallel projections (o_proj, down_proj). Identity when unsharded.
    """

    enter: Callable[[Tensor], Tensor] = _identity
    exit: Callable[[Tensor], Tensor] = _identity


NO_TP = TPHooks()


# ---- initialisation -------------------------------------------------------------------------


def _param_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one parameter (``hash()`` is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_param(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> Tensor:
    """The full initial value of one parameter; depends only on (seed, name, shape)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(_param_seed(seed, name))
    # Drawn in float32 so every dtype sees the same values up to its rounding.
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * INIT_STD).to(dtype)


def init_params(model: ModelSpec, seed: int, dtype: torch.dtype = torch.float32) -> Params:
    """Full (unsharded) initial parameters of ``model``."""
    return {p.name: init_param(p.name, p.shape, seed, dtype) for p in param_inventory(model)}


def box_index(box: Box) -> tuple[slice, ...]:
    """A global box as an index into a full tensor."""
    return tuple(slice(lo, hi) for lo, hi in box)


def local_index(box: Box, held: Box) -> tuple[slice, ...]:
    """``box`` (global coordinates) as an index into a shard that holds global box ``held``."""
    return tuple(slice(lo - h0, hi - h0) for (lo, hi), (h0, _) in zip(box, held))


def init_boxes(model: ModelSpec, boxes: dict[str, Box], seed: int, dtype: torch.dtype = torch.float32) -> Params:
    """The slices ``boxes`` (name → global box) of :func:`init_params` (one full tensor at a time)."""
    shapes = {p.name: p.shape for p in param_inventory(model)}
    return {name: init_param(name, shapes[name], seed, dtype)[box_index(box)].clone() for name, box in boxes.items()}


def init_shards(model: ModelSpec, layout: Layout, device: int, seed: int,
                dtype: torch.dtype = torch.float32) -> Params:
    """This device's shards of :func:`init_params` under ``layout``."""
    return init_boxes(model, shard(model, layout, device), seed, dtype)


# ---- building blocks ------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and rotary angles in at least float32, as Hugging Face LLaMA does."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.to(_compute_dtype(x.dtype))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def norm(params: Params, name: str, x: Tensor, model: ModelSpec) -> Tensor:
    """The norm ``name`` (``layers.0.input_layernorm``, ``norm``) of ``model``'s kind."""
    if model.norm == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), params[name + ".weight"], params[name + ".bias"], model.norm_eps)
    return rms_norm(x, params[name + ".weight"], model.norm_eps)


def rotary(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin for ``positions`` (T,), each (T, head_dim) in the rotate-half layout of
    Hugging Face LLaMA checkpoints."""
    ct = _compute_dtype(dtype)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=ct, device=positions.device) / head_dim)
    angles = positions.to(ct)[:, None] * inv_freq[None, :]  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, nh, T, hs); cos, sin: (T, hs)."""
    return x * cos + _rotate_half(x) * sin


def apply_partial_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary on the first ``rot = cos.shape[-1]`` dimensions of each head, the rest passed
    through (GPT-NeoX's ``rotary_pct``); x: (B, nh, T, hs); cos, sin: (T, rot)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    # A copy whose first rot dimensions are overwritten, rather than a concatenation with the
    # pass-through slice: every tensor is rot or hs wide, so the op census stays a monomial.
    out = x.clone()  # (B, nh, T, hs)
    out[..., :rot] = apply_rotary(x[..., :rot], cos, sin)
    return out


class KVCache:
    """Keys and values of past positions, per transformer block, for incremental decoding.

    Buffers are allocated on first use with the shapes the block produces, so a tensor-parallel
    shard caches only its own key/value heads.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len  # positions the cache can hold
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, g, T, hs) at positions ``start..start+T``; return all keys and values
        up to ``start+T``."""
        b, g, t, hs = k.shape
        if start + t > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold {start + t}")
        if layer not in self.keys:
            self.keys[layer] = k.new_empty((b, g, self.max_len, hs))
            self.values[layer] = v.new_empty((b, g, self.max_len, hs))
        self.keys[layer][:, :, start:start + t] = k
        self.values[layer][:, :, start:start + t] = v
        return self.keys[layer][:, :, :start + t], self.values[layer][:, :, :start + t]


class KVPool:
    """Keys and values of one generation engine's request slots: per block one preallocated
    tensor ``(slots, g, max_len, hs)`` (allocated on first use with the block's K/V heads, so a
    tensor-parallel shard holds only its own), not a list of growing tensors.

    The engine keeps its running requests in slots ``0 .. B−1`` (a request that leaves hands its
    slot to the one in the highest slot, :meth:`move`), so a decode step reads the view
    ``[:B, :, :kv_max]``; a prefill writes its admitted requests into the slots after them. Each
    forward goes through a pass (:meth:`prefill`, :meth:`decode`) with the cache's ``update``."""

    def __init__(self, slots: int, max_len: int):
        self.slots, self.max_len = slots, max_len  # requests at once; positions per request
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def _buffers(self, layer: int, k: Tensor) -> tuple[Tensor, Tensor]:
        if layer not in self.keys:
            _, g, _, hs = k.shape
            # zeros, not uninitialised memory: a decode step reads padded positions under a mask,
            # and a masked weight of 0 times a NaN left in memory would still be NaN
            self.keys[layer] = k.new_zeros((self.slots, g, self.max_len, hs))
            self.values[layer] = k.new_zeros((self.slots, g, self.max_len, hs))
        return self.keys[layer], self.values[layer]

    def prefill(self, first: int) -> PoolPrefill:
        """A prefill whose rows go to slots ``first, first + 1, …``."""
        return PoolPrefill(self, first)

    def decode(self, lengths: Tensor, width: int) -> PoolDecode:
        """One decode step of slots ``0 .. B−1``: row b writes position ``lengths[b] − 1`` and
        attends to its ``lengths[b]`` keys, the rows padded to ``width`` = max(lengths)."""
        return PoolDecode(self, lengths, width)

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot ``src``'s first ``length`` positions to slot ``dst`` (a request changes slot)."""
        for layer in self.keys:
            self.keys[layer][dst, :, :length] = self.keys[layer][src, :, :length]
            self.values[layer][dst, :, :length] = self.values[layer][src, :, :length]


@dataclass
class PoolPrefill:
    """A prefill into a :class:`KVPool`: right-padded rows attend causally among their own
    positions (pads sit after every real token, so no real position sees one); all ``T``
    positions are written to the rows' slots — those past a row's length are never read (a
    decode step masks them, and overwrites them as the request grows)."""

    pool: KVPool
    first: int
    mask: Tensor | None = None

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b, _, t, _ = k.shape
        if t > self.pool.max_len or self.first + b > self.pool.slots:
            raise ValueError(f"KV pool of {self.pool.slots} slots × {self.pool.max_len} positions cannot hold "
                             f"{b} rows from slot {self.first} × {t} positions")
        keys, values = self.pool._buffers(layer, k)
        keys[self.first:self.first + b, :, start:start + t] = k
        values[self.first:self.first + b, :, start:start + t] = v
        return keys[self.first:self.first + b, :, :start + t], values[self.first:self.first + b, :, :start + t]


@dataclass
class PoolDecode:
    """One decode step over a :class:`KVPool`'s slots ``0 .. B−1`` (see :meth:`KVPool.decode`)."""

    pool: KVPool
    lengths: Tensor  # (B,) keys each row attends after this step's write
    width: int  # the longest of them: the padded KV length
    mask: Tensor = field(init=False)  # (B, 1, 1, width): key j is row b's when j < lengths[b]
    rows: Tensor = field(init=False)  # (B,) 0 .. B−1
    written: Tensor = field(init=False)  # (B,) the position each row writes

    def __post_init__(self) -> None:
        # once per step, not once per block
        keys = torch.arange(self.width, device=self.lengths.device)
        self.mask = (keys[None, :] < self.lengths[:, None])[:, None, None, :]
        self.rows = torch.arange(self.lengths.shape[0], device=self.lengths.device)
        self.written = self.lengths - 1

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b = k.shape[0]
        if self.width > self.pool.max_len or b > self.pool.slots:
            raise ValueError(f"KV pool of {self.pool.slots} slots × {self.pool.max_len} positions cannot hold "
                             f"{b} rows × {self.width} positions")
        keys, values = self.pool._buffers(layer, k)
        # the running rows' padded view first: the scatter then touches only it, not the pool
        keys, values = keys[:b, :, :self.width], values[:b, :, :self.width]  # (B, g, width, hs)
        keys[self.rows, :, self.written] = k[:, :, 0]  # (B, g, hs) at each row's own position
        values[self.rows, :, self.written] = v[:, :, 0]
        return keys, values


@dataclass
class Context:
    """What every block of one forward pass shares: rotary tables, cache, hooks."""

    model: ModelSpec
    start: int  # position of the first token of this pass
    cos: Tensor | None  # (T, rotary_dim), or (B, 1, 1, rotary_dim) per row; None for learned positions
    sin: Tensor | None  # (T, rotary_dim), or (B, 1, 1, rotary_dim)
    cache: KVCache | PoolPrefill | PoolDecode | None = None
    hooks: TPHooks = field(default_factory=TPHooks)
    mask: Tensor | None = None  # attention mask instead of the causal one (a pool's decode step)


def context(model: ModelSpec, start: int, length: int, dtype: torch.dtype, device: torch.device,
            cache: KVCache | PoolPrefill | PoolDecode | None = None, hooks: TPHooks = NO_TP,
            positions: Tensor | None = None) -> Context:
    """``positions`` (B,): one new token per row, each at its own position (a pool's decode
    step); else the pass covers positions ``start .. start + length − 1`` of every row."""
    mask = getattr(cache, "mask", None)
    if model.positions == "learned":  # added to the embedding instead (see embed)
        return Context(model, start, None, None, cache, hooks, mask)
    if positions is not None:
        cos, sin = rotary(positions, model.rotary_dim, model.rope_theta, dtype)  # (B, rot)
        b = positions.shape[0]
        return Context(model, start, cos.view(b, 1, 1, -1), sin.view(b, 1, 1, -1), cache, hooks, mask)
    positions = torch.arange(start, start + length, device=device)
    cos, sin = rotary(positions, model.rotary_dim, model.rope_theta, dtype)
    return Context(model, start, cos, sin, cache, hooks, mask)


def _linear(params: Params, name: str, x: Tensor) -> Tensor:
    return F.linear(x, params[name + ".weight"], params.get(name + ".bias"))


def _row_linear(params: Params, name: str, x: Tensor, hooks: TPHooks) -> Tensor:
    """A row-parallel projection: partial products summed by ``hooks.exit``, then the
    (replicated) bias once."""
    out = hooks.exit(F.linear(x, params[name + ".weight"]))
    bias = params.get(name + ".bias")
    return out if bias is None else out + bias


def attention(params: Params, layer: int, x: Tensor, ctx: Context) -> Tensor:
    """Grouped-query causal self-attention of block ``layer``; x: (B, T, C) normed input."""
    p = f"layers.{layer}.self_attn."
    hs = ctx.model.head_dim
    b, t, _ = x.shape
    x = ctx.hooks.enter(x)
    q = _linear(params, p + "q_proj", x).view(b, t, -1, hs).transpose(1, 2)  # (B, nh, T, hs)
    k = _linear(params, p + "k_proj", x).view(b, t, -1, hs).transpose(1, 2)  # (B, g, T, hs)
    v = _linear(params, p + "v_proj", x).view(b, t, -1, hs).transpose(1, 2)  # (B, g, T, hs)
    if ctx.cos is not None:
        q, k = apply_partial_rotary(q, ctx.cos, ctx.sin), apply_partial_rotary(k, ctx.cos, ctx.sin)
    if ctx.cache is not None:
        k, v = ctx.cache.update(layer, ctx.start, k, v)  # (B, g, S, hs), S = start + T
    if ctx.mask is not None:
        mask, causal = ctx.mask, False
    else:
        mask, causal = _causal_mask(ctx.start, t, x.device), ctx.start == 0 and t > 1
    if SDPA_GQA:  # the kernel reads each K/V head for its whole group of query heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    else:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)  # (B, nh, S, hs)
        v = v.repeat_interleave(groups, dim=1)  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    y = y.transpose(1, 2).reshape(b, t, -1)  # (B, T, nh·hs)
    return _row_linear(params, p + "o_proj", y, ctx.hooks)


def _causal_mask(start: int, t: int, device: torch.device) -> Tensor | None:
    """Query i (position start+i) sees keys 0..start+i; None where is_causal or no mask does."""
    if start == 0 or t == 1:
        return None
    keys = torch.arange(start + t, device=device)
    queries = torch.arange(start, start + t, device=device)
    return keys[None, :] <= queries[:, None]  # (T, S)


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")  # GPT-2's gelu_new


ACTIVATIONS = {"gelu": _gelu, "relu": F.relu}


def mlp(params: Params, layer: int, x: Tensor, ctx: Context) -> Tensor:
    """SwiGLU: down(silu(gate(x)) · up(x)); GELU / ReLU: down(act(up(x))); x: (B, T, C) normed input."""
    p = f"layers.{layer}.mlp."
    x = ctx.hooks.enter(x)
    if ctx.model.mlp == "swiglu":
        inner = F.silu(_linear(params, p + "gate_proj", x)) * _linear(params, p + "up_proj", x)
    else:
        inner = ACTIVATIONS[ctx.model.mlp](_linear(params, p + "up_proj", x))  # (B, T, f)
    return _row_linear(params, p + "down_proj", inner, ctx.hooks)


def block(params: Params, layer: int, x: Tensor, ctx: Context) -> Tensor:
    """One pre-norm transformer block; x: (B, T, C) residual stream. With a parallel residual
    (GPT-NeoX) attention and MLP both read the block input: ``x + attn(ln1(x)) + mlp(ln2(x))``."""
    p = f"layers.{layer}."
    m = ctx.model
    attn = attention(params, layer, norm(params, p + "input_layernorm", x, m), ctx)
    if m.parallel_residual:
        return x + attn + mlp(params, layer, norm(params, p + "post_attention_layernorm", x, m), ctx)
    x = x + attn
    return x + mlp(params, layer, norm(params, p + "post_attention_layernorm", x, m), ctx)


def add_positions(params: Params, x: Tensor, start: int, positions: Tensor | None = None) -> Tensor:
    """x (B, T, C) plus rows ``start..start+T`` of the learned position table (or, for one token
    per row, rows ``positions`` (B,)), when the model has one (its first pipeline stage holds
    it whole); x unchanged otherwise."""
    table = params.get("embed_positions.weight")
    if table is None:
        return x
    if positions is not None:
        if int(positions.max()) >= table.shape[0]:
            raise ValueError(f"position {int(positions.max())} is beyond the learned table of {table.shape[0]} "
                             "positions")
        return x + table[positions][:, None]  # (B, 1, C) + (B, 1, C)
    t = x.shape[1]
    if start + t > table.shape[0]:
        raise ValueError(f"position {start + t - 1} is beyond the learned table of {table.shape[0]} positions")
    return x + table[start:start + t]  # (B, T, C) + (T, C)


def embed(params: Params, tokens: Tensor, start: int = 0, positions: Tensor | None = None) -> Tensor:
    """tokens (B, T) at positions ``start..start+T`` (or one token per row at ``positions``) → (B, T, C)."""
    return add_positions(params, F.embedding(tokens, params["embed_tokens.weight"]), start, positions)


def head_weight_name(model: ModelSpec) -> str:
    if model.head == "value":
        return "value_head.weight"
    return "embed_tokens.weight" if model.tied_embeddings else "lm_head.weight"


def final_norm(params: Params, x: Tensor, model: ModelSpec) -> Tensor:
    return norm(params, "norm", x, model)


def head(params: Params, x: Tensor, model: ModelSpec) -> Tensor:
    """Normed hidden (B, T, C) → logits (B, T, V) (the local vocab slice for a shard) or
    values (B, T)."""
    out = F.linear(x, params[head_weight_name(model)])
    return out.squeeze(-1) if model.head == "value" else out


def final(params: Params, x: Tensor, model: ModelSpec) -> Tensor:
    """Final norm and head."""
    return head(params, final_norm(params, x, model), model)


def blocks(params: Params, layers: Iterable[int], x: Tensor, ctx: Context, recompute: bool = False) -> Tensor:
    """The blocks ``layers`` in order; with ``recompute`` each runs under activation
    checkpointing (Megatron's full recompute): autograd keeps only the block's input and runs
    its forward again during its backward."""
    for i in layers:
        x = checkpoint(block, params, i, x, ctx, use_reentrant=False) if recompute else block(params, i, x, ctx)
    return x


def forward(params: Params, model: ModelSpec, tokens: Tensor, cache: KVCache | None = None,
            start: int = 0, last_position: bool = False) -> Tensor:
    """The full, unsharded model: tokens (B, T) → logits (B, T, V) or values (B, T); with
    ``last_position``, those of the last position only (B, 1, V) or (B, 1)."""
    x = embed(params, tokens, start)
    ctx = context(model, start, tokens.shape[1], x.dtype, x.device, cache)
    x = blocks(params, range(model.layers), x, ctx)
    return final(params, x[:, -1:] if last_position else x, model)


@torch.no_grad()
def greedy_generate(params: Params, model: ModelSpec, prompt: Tensor, gen_len: int) -> tuple[Tensor, Tensor]:
    """Reference KV-cached greedy decoding: (sequences (B, P+gen_len), logp (B, gen_len))."""
    cache = KVCache(prompt.shape[1] + gen_len)
    seq, logps = prompt, []
    inp, start = prompt, 0
    for _ in range(gen_len):
        logits = forward(params, model, inp, cache, start, last_position=True)[:, -1]  # (B, V)
        tok = logits.argmax(-1)
        logps.append(torch.log_softmax(logits.to(_compute_dtype(logits.dtype)), -1).gather(-1, tok[:, None]))
        start += inp.shape[1]
        inp = tok[:, None]
        seq = torch.cat((seq, inp), dim=1)
    return seq, torch.cat(logps, dim=1)
