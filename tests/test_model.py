"""The plain-torch decoder: deterministic initialisation, an independent naive reference,
causality, KV-cache consistency, and Hugging Face checkpoint loading."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from estimator.base.errors import ConfigError
from estimator.spec.cluster import DeviceMesh
from estimator.spec.models import PRESETS, ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import param_inventory, shard
from executor import model as M
from executor.hf import hf_config, load_hf, save_hf

TINY = ModelSpec("t", 2, 32, 64, 4, 2, 64, qkv_bias=True, rope_theta=500.0, norm_eps=1e-6)
F64 = torch.float64


def _tokens(b: int, t: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- initialisation ---------------------------------------------------------------------------


def test_init_has_inventory_names_and_shapes():
    for model in (TINY, TINY.as_value_model(), ModelSpec("u", 1, 16, 32, 2, 1, 8, tied_embeddings=True)):
        params = M.init_params(model, 0, F64)
        assert {n: tuple(t.shape) for n, t in params.items()} == {p.name: p.shape for p in param_inventory(model)}


def test_init_depends_only_on_seed_and_name():
    a = M.init_params(TINY, 3, F64)
    deeper = ModelSpec("t4", 4, 32, 64, 4, 2, 64, qkv_bias=True)
    b = M.init_params(deeper, 3, F64)
    assert all(torch.equal(a[n], b[n]) for n in a)
    c = M.init_params(TINY, 4, F64)
    assert not torch.equal(a["layers.0.self_attn.q_proj.weight"], c["layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(a["layers.0.self_attn.q_proj.weight"], a["layers.1.self_attn.q_proj.weight"])
    assert torch.equal(a["norm.weight"], torch.ones(32, dtype=F64))
    assert 0.015 < float(a["layers.0.mlp.up_proj.weight"].std()) < 0.025


def test_init_shards_are_slices_of_the_full_init():
    layout = Layout(DeviceMesh(0, 4), 1, 2, 2)
    full = M.init_params(TINY, 1, F64)
    for device in layout.mesh.devices:
        local = M.init_shards(TINY, layout, device, 1, F64)
        boxes = shard(TINY, layout, device)
        assert set(local) == set(boxes)
        assert all(torch.equal(local[n], full[n][M.box_index(b)]) for n, b in boxes.items())


# ---- forward ----------------------------------------------------------------------------------


def _naive_forward(p: dict, model: ModelSpec, tokens: torch.Tensor) -> torch.Tensor:
    """Loops over heads, explicit softmax and angles: written independently of executor.model."""
    hs, eps = model.head_dim, model.norm_eps
    b, t = tokens.shape

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def rope(x):  # x: (B, T, hs); pairs (i, i + hs/2) rotate by pos / theta^(2i/hs)
        out = x.clone()
        for i in range(hs // 2):
            ang = torch.arange(t, dtype=F64) / model.rope_theta ** (2 * i / hs)
            a, c = x[..., i], x[..., i + hs // 2]
            out[..., i] = a * torch.cos(ang) - c * torch.sin(ang)
            out[..., i + hs // 2] = c * torch.cos(ang) + a * torch.sin(ang)
        return out

    x = p["embed_tokens.weight"][tokens]
    mask = torch.full((t, t), -math.inf, dtype=F64).triu(1)
    for layer in range(model.layers):
        pre = f"layers.{layer}."
        h = norm(x, p[pre + "input_layernorm.weight"])
        q, k, v = (h @ p[pre + f"self_attn.{n}.weight"].T + p[pre + f"self_attn.{n}.bias"]
                   for n in ("q_proj", "k_proj", "v_proj"))
        heads = []
        for j in range(model.heads):
            g = j // (model.heads // model.kv_heads)
            qj, kj = rope(q[..., j * hs:(j + 1) * hs]), rope(k[..., g * hs:(g + 1) * hs])
            att = torch.softmax(qj @ kj.transpose(1, 2) / math.sqrt(hs) + mask, dim=-1)
            heads.append(att @ v[..., g * hs:(g + 1) * hs])
        x = x + torch.cat(heads, -1) @ p[pre + "self_attn.o_proj.weight"].T
        h = norm(x, p[pre + "post_attention_layernorm.weight"])
        gate, up = h @ p[pre + "mlp.gate_proj.weight"].T, h @ p[pre + "mlp.up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ p[pre + "mlp.down_proj.weight"].T
    return norm(x, p["norm.weight"]) @ p["lm_head.weight"].T


def test_forward_matches_naive_reference():
    params = M.init_params(TINY, 0, F64)
    params = {n: t + 0.01 * torch.randn_like(t) if "norm" in n else t for n, t in params.items()}
    tokens = _tokens(2, 7, TINY.vocab)
    torch.testing.assert_close(M.forward(params, TINY, tokens), _naive_forward(params, TINY, tokens),
                               rtol=0, atol=1e-12)
    last = M.forward(params, TINY, tokens, last_position=True)  # what generation computes
    assert last.shape == (2, 1, TINY.vocab)
    torch.testing.assert_close(last, M.forward(params, TINY, tokens)[:, -1:], rtol=0, atol=1e-12)


def test_forward_is_causal_and_value_head_is_scalar():
    params = M.init_params(TINY, 0, F64)
    a, b = _tokens(1, 8, TINY.vocab, 1), _tokens(1, 8, TINY.vocab, 1)
    b[0, 5] = (a[0, 5] + 1) % TINY.vocab
    la, lb = M.forward(params, TINY, a), M.forward(params, TINY, b)
    assert torch.equal(la[:, :5], lb[:, :5]) and not torch.allclose(la[:, 5:], lb[:, 5:])
    critic = TINY.as_value_model()
    assert M.forward(M.init_params(critic, 0, F64), critic, a).shape == (1, 8)


def test_kv_cache_chunks_match_one_pass():
    params = M.init_params(TINY, 0, F64)
    tokens = _tokens(3, 9, TINY.vocab)
    cache = M.KVCache(9)
    chunks = [M.forward(params, TINY, tokens[:, lo:hi], cache, lo) for lo, hi in ((0, 4), (4, 7), (7, 8), (8, 9))]
    torch.testing.assert_close(torch.cat(chunks, 1), M.forward(params, TINY, tokens), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="cannot hold"):
        M.forward(params, TINY, tokens[:, :1], cache, 9)


def test_greedy_generate_extends_the_prompt_with_argmax_tokens():
    params = M.init_params(TINY, 0, F64)
    prompt = _tokens(2, 3, TINY.vocab)
    seq, logp = M.greedy_generate(params, TINY, prompt, 4)
    assert seq.shape == (2, 7) and logp.shape == (2, 4) and torch.equal(seq[:, :3], prompt)
    logits = M.forward(params, TINY, seq[:, :-1])[:, 2:]  # (B, gen, V): predictions of new tokens
    assert torch.equal(logits.argmax(-1), seq[:, 3:])
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, seq[:, 3:, None])[..., 0])


def test_bfloat16_runs():
    params = M.init_params(TINY, 0, torch.bfloat16)
    assert M.forward(params, TINY, _tokens(1, 4, TINY.vocab)).dtype == torch.bfloat16


# ---- Hugging Face checkpoints -----------------------------------------------------------------


def _write_raw(path, model: ModelSpec, params: dict, drop: str | None = None, reshape: str | None = None):
    """A checkpoint as Hugging Face writes it: ``model.`` prefix on the trunk."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in params.items():
        key = name if name in ("lm_head.weight", "score.weight") else "model." + name
        if name == drop:
            continue
        tensors[key] = t[:-1].contiguous() if name == reshape else t.contiguous()
    half = len(tensors) // 2  # two shard files, as large checkpoints come
    items = sorted(tensors.items())
    save_file(dict(items[:half]), str(path / "model-00001-of-00002.safetensors"))
    save_file(dict(items[half:]), str(path / "model-00002-of-00002.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_config(model)))


def test_load_hf_checkpoint(tmp_path):
    params = M.init_params(TINY, 5, torch.float32)
    _write_raw(tmp_path / "ckpt", TINY, params)
    spec, loaded = load_hf(tmp_path / "ckpt", F64)
    assert (spec.layers, spec.hidden, spec.ffn, spec.heads, spec.kv_heads, spec.vocab, spec.qkv_bias,
            spec.rope_theta, spec.norm_eps) == (2, 32, 64, 4, 2, 64, True, 500.0, 1e-6)
    assert set(loaded) == set(params)
    assert all(loaded[n].dtype == F64 and torch.equal(loaded[n], params[n].to(F64)) for n in params)


def test_save_load_round_trip_and_sliced_load(tmp_path):
    tied = ModelSpec("tied", 2, 32, 64, 4, 2, 64, tied_embeddings=True)
    params = M.init_params(tied, 5, F64)
    save_hf(tmp_path / "ckpt", tied, params)
    spec, loaded = load_hf(tmp_path / "ckpt", F64)
    assert spec.tied_embeddings and all(torch.equal(loaded[n], params[n]) for n in params)
    layout = Layout(DeviceMesh(0, 4), 1, 2, 2)
    boxes = shard(tied, layout, 3)
    _, part = load_hf(tmp_path / "ckpt", F64, boxes=boxes)
    assert all(torch.equal(part[n], params[n][M.box_index(b)]) for n, b in boxes.items())


def test_load_value_head_from_score(tmp_path):
    critic = TINY.as_value_model()
    params = M.init_params(critic, 5, F64)
    params["score.weight"] = params.pop("value_head.weight")
    _write_raw(tmp_path / "rm", critic, params)
    _, loaded = load_hf(tmp_path / "rm", F64, model=critic)
    assert torch.equal(loaded["value_head.weight"], params["score.weight"])


def test_load_names_missing_and_misshapen_tensors(tmp_path):
    params = M.init_params(TINY, 5, torch.float32)
    _write_raw(tmp_path / "a", TINY, params, drop="layers.1.mlp.up_proj.weight")
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_hf(tmp_path / "a")
    _write_raw(tmp_path / "b", TINY, params, reshape="layers.0.self_attn.k_proj.weight")
    misshapen = r"layers\.0\.self_attn\.k_proj\.weight.*shape \[15, 32\], expected \[16, 32\]"
    with pytest.raises(ConfigError, match=misshapen):
        load_hf(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps(hf_config(TINY)))
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        load_hf(tmp_path / "c")


# ---- GPT-style families -------------------------------------------------------------------------

GPT = PRESETS["tiny-gpt-2l-128h"]  # LayerNorm, GELU, learned positions, biases, tied head
NEOX = PRESETS["tiny-neox-2l-128h"]  # parallel residual, rotary on a quarter of each head
OPT = dataclasses.replace(GPT, name="tiny-opt", mlp="relu")


def _naive_gpt_forward(p: dict, model: ModelSpec, tokens: torch.Tensor) -> torch.Tensor:
    """GPT-2 / OPT / GPT-NeoX blocks written out: explicit LayerNorm statistics, GELU's tanh
    formula, per-head loops; independent of executor.model."""
    hs, rot, eps = model.head_dim, model.rotary_dim, model.norm_eps
    b, t = tokens.shape

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * p[name + ".weight"] + p[name + ".bias"]

    def act(x):
        if model.mlp == "relu":
            return torch.clamp(x, min=0)
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    def rope(x):  # rotate pairs (i, i + rot/2) of the first rot dimensions
        out = x.clone()
        for i in range(rot // 2):
            ang = torch.arange(t, dtype=F64) / model.rope_theta ** (2 * i / rot)
            a, c = x[..., i], x[..., i + rot // 2]
            out[..., i] = a * torch.cos(ang) - c * torch.sin(ang)
            out[..., i + rot // 2] = c * torch.cos(ang) + a * torch.sin(ang)
        return out

    def lin(x, name):
        return x @ p[name + ".weight"].T + p[name + ".bias"]

    x = p["embed_tokens.weight"][tokens]
    if model.positions == "learned":
        x = x + p["embed_positions.weight"][:t]
    mask = torch.full((t, t), -math.inf, dtype=F64).triu(1)
    for layer in range(model.layers):
        pre = f"layers.{layer}."
        h = ln(x, pre + "input_layernorm")
        q, k, v = (lin(h, pre + f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj"))
        heads = []
        for j in range(model.heads):
            qj, kj, vj = (z[..., j * hs:(j + 1) * hs] for z in (q, k, v))
            if model.positions == "rotary":
                qj, kj = rope(qj), rope(kj)
            heads.append(torch.softmax(qj @ kj.transpose(1, 2) / math.sqrt(hs) + mask, dim=-1) @ vj)
        attn = lin(torch.cat(heads, -1), pre + "self_attn.o_proj")
        mlp_in = x if model.parallel_residual else x + attn
        mlp = lin(act(lin(ln(mlp_in, pre + "post_attention_layernorm"), pre + "mlp.up_proj")), pre + "mlp.down_proj")
        x = mlp_in + mlp + (attn if model.parallel_residual else 0)
    head = p["embed_tokens.weight"] if model.tied_embeddings else p["lm_head.weight"]
    return ln(x, "norm") @ head.T


@pytest.mark.parametrize("model", [GPT, OPT, NEOX], ids=lambda m: m.name)
def test_gpt_style_forward_matches_naive_reference(model):
    params = M.init_params(model, 0, F64)
    assert ("embed_positions.weight" in params) == (model.positions == "learned")
    assert {"norm.bias", "layers.0.mlp.down_proj.bias"} <= set(params) and "layers.0.mlp.gate_proj.weight" not in params
    tokens = _tokens(2, 9, model.vocab)
    torch.testing.assert_close(M.forward(params, model, tokens), _naive_gpt_forward(params, model, tokens),
                               rtol=0, atol=1e-12)
    cache = M.KVCache(9)  # incremental decoding adds the positions it is at
    chunks = [M.forward(params, model, tokens[:, lo:hi], cache, lo) for lo, hi in ((0, 5), (5, 6), (6, 9))]
    torch.testing.assert_close(torch.cat(chunks, 1), M.forward(params, model, tokens), rtol=0, atol=1e-12)


def test_learned_positions_beyond_the_table_are_refused():
    params = M.init_params(GPT, 0, F64)
    with pytest.raises(ValueError, match="beyond the learned table of 64 positions"):
        M.forward(params, GPT, _tokens(1, 65, GPT.vocab))


def test_gpt_family_checkpoints_are_refused_not_loaded(tmp_path):
    spec = GPT
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": spec.hidden, "n_layer": 2,
                                                      "n_head": 4, "n_positions": 64, "vocab_size": spec.vocab,
                                                      "n_inner": spec.ffn}))
    save_file({"wte.weight": torch.zeros(spec.vocab, spec.hidden)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="loading gpt2 weights is not supported"):
        load_hf(tmp_path)
    with pytest.raises(ConfigError, match="writing a gpt2 checkpoint is not supported"):
        hf_config(spec)
