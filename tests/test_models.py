"""ModelSpec: parameter counts against published figures, validation, Hugging Face configs."""

from __future__ import annotations

import dataclasses
import json

import pytest

from estimator.base.errors import ConfigError
from estimator.spec.models import PRESETS, ModelSpec, from_hf_config, get_model
from tests.conftest import ROOT

PUBLISHED = {  # billions, from the Hugging Face model cards' parameter counts
    "llama2-7b": 6.738, "llama2-13b": 13.016, "codellama-34b": 33.744, "llama2-70b": 68.977,
    "llama3-8b": 8.030, "llama3-70b": 70.554, "qwen2.5-0.5b": 0.494, "qwen2.5-1.5b": 1.544,
    "qwen2.5-7b": 7.616, "qwen2.5-14b": 14.770, "qwen2.5-32b": 32.764, "qwen2.5-72b": 72.706,
    "qwen2.5-3b": 3.086, "llama3.1-8b": 8.030, "llama3.1-70b": 70.554, "llama3.3-70b": 70.554,
    # Qwen3 model cards give one decimal (0.6B, 1.7B, 4.0B, 8.2B, 14.8B, 32.8B) and the
    # non-embedding count (0.44, 1.4, 3.6, 6.95, 13.2, 31.2 B): both are checked below
    "qwen3-0.6b": 0.596, "qwen3-1.7b": 1.721, "qwen3-4b": 4.022, "qwen3-8b": 8.191, "qwen3-14b": 14.768,
    "qwen3-32b": 32.762,
    "r1-distill-qwen-1.5b": 1.777, "r1-distill-qwen-7b": 7.616, "r1-distill-qwen-14b": 14.770,
    "r1-distill-qwen-32b": 32.764,
}
QWEN3_CARDS = {  # model card: (parameters, non-embedding parameters), billions, as printed
    "qwen3-0.6b": (0.6, 0.44), "qwen3-1.7b": (1.7, 1.4), "qwen3-4b": (4.0, 3.6), "qwen3-8b": (8.2, 6.95),
    "qwen3-14b": (14.8, 13.2), "qwen3-32b": (32.8, 31.2)}


@pytest.mark.parametrize("name,card", sorted(QWEN3_CARDS.items()))
def test_qwen3_presets_round_to_their_model_cards(name, card):
    m = PRESETS[name]
    non_embedding = m.params - m.embedding_params - m.head_params
    for count, printed in zip((m.params, non_embedding), card):
        digits = len(str(printed).split(".")[1])  # as many decimals as the card prints
        assert round(count / 1e9, digits) == printed


def test_qwen3_32b_wide_heads_and_qk_norms_by_hand():
    m = PRESETS["qwen3-32b"]
    h, q, kv, f, d = 5120, 64 * 128, 8 * 128, 25600, 128
    assert (m.head_dim, m.q_dim, m.kv_dim) == (d, q, kv)
    # q and o are h × a·d, k and v h × g·d, three SwiGLU matrices, two block norms, the q and k norms
    assert m.params_per_layer == 2 * h * q + 2 * h * kv + 3 * h * f + 2 * h + 2 * d
    assert m.replicated_params_per_layer == 2 * h + 2 * d
    assert m.family == "qwen3" and dataclasses.replace(m, qk_norm=False).params == m.params - 64 * 2 * d
    from estimator.spec.sharding import param_inventory

    names = {p.name: p.shape for p in param_inventory(m)}  # what sharding and reallocation move
    assert names["layers.0.self_attn.q_proj.weight"] == (q, h) and names["layers.0.self_attn.o_proj.weight"] == (h, q)
    assert names["layers.0.self_attn.k_norm.weight"] == (d,)
    assert sum(p.numel for p in param_inventory(m)) == m.params


@pytest.mark.parametrize("hf,preset", [("meta-llama/Llama-3.1-8B-Instruct", "llama3.1-8b"),
                                       ("meta-llama/Llama-3.1-70B (base)", "llama3.1-70b"),
                                       ("meta-llama/Llama-3.3-70B-Instruct", "llama3.3-70b"),
                                       ("Qwen/Qwen3-32B", "qwen3-32b"), ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
                                       ("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "r1-distill-qwen-14b"),
                                       ("Qwen3-30B-A3B (MoE)", None), ("mistralai/Mixtral-8x7B-v0.1", None)])
def test_hugging_face_names_map_to_presets(hf, preset):
    from estimator.spec.models import hf_preset

    assert hf_preset(hf) == preset


@pytest.mark.parametrize("name,billions", sorted(PUBLISHED.items()))
def test_preset_params_within_half_percent(name, billions):
    assert PRESETS[name].params / 1e9 == pytest.approx(billions, rel=5e-3)


def test_parameter_formula_by_hand():
    m = ModelSpec("t", layers=2, hidden=8, ffn=16, heads=2, kv_heads=1, vocab=10)
    # per layer: q 64 + k 32 + v 32 + o 64 + mlp 3·8·16=384 + norms 16 = 592
    assert m.params_per_layer == 592
    assert m.params == 2 * 592 + 8 + 10 * 8 + 10 * 8
    assert m.bytes() == 2 * m.params
    tied = ModelSpec("t", 2, 8, 16, 2, 1, 10, tied_embeddings=True)
    assert tied.params == m.params - 80
    value = m.as_value_model()
    assert value.head == "value" and value.params == m.params - 80 + 8


def test_modelspec_names_every_bad_field():
    with pytest.raises(ConfigError) as err:
        ModelSpec("bad", layers=0, hidden=10, ffn=4, heads=3, kv_heads=1, vocab=5)
    assert "layers=0" in str(err.value)
    with pytest.raises(ConfigError, match="hidden=10 must be divisible by heads=3"):
        ModelSpec("bad", layers=1, hidden=10, ffn=4, heads=3, kv_heads=1, vocab=5)
    with pytest.raises(ConfigError, match="heads=4 must be divisible by kv_heads=3"):
        ModelSpec("bad", layers=1, hidden=16, ffn=4, heads=4, kv_heads=3, vocab=5)
    with pytest.raises(ConfigError, match="head='policy'"):
        ModelSpec("bad", 1, 8, 4, 2, 2, 5, head="policy")


def _write(tmp_path, cfg):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_from_hf_config_llama_and_qwen(tmp_path):
    llama = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    spec = from_hf_config(_write(tmp_path, llama))
    assert spec.params == PRESETS["llama2-7b"].params
    qwen = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 28, "hidden_size": 3584,
            "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
            "vocab_size": 152064, "rope_theta": 1000000.0, "tie_word_embeddings": False}
    (tmp_path / "q").mkdir()
    q = from_hf_config(_write(tmp_path / "q", qwen))
    assert q.qkv_bias and q.params == PRESETS["qwen2.5-7b"].params


def test_from_hf_config_qwen3_reads_head_dim_and_sets_qk_norm(tmp_path):
    """Qwen/Qwen3-32B's config.json (transformers 4.51): head_dim 128 on hidden 5120 / 64 heads."""
    cfg = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_size": 5120,
           "intermediate_size": 25600, "model_type": "qwen3", "num_attention_heads": 64, "num_hidden_layers": 64,
           "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 1000000, "tie_word_embeddings": False,
           "vocab_size": 151936}
    m = from_hf_config(_write(tmp_path, cfg))
    assert (m.qk_norm, m.head_dim, m.qkv_bias) == (True, 128, False)
    assert m.params == PRESETS["qwen3-32b"].params
    # Qwen3-8B's heads are hidden/heads wide: no override recorded
    cfg8 = {**cfg, "hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": 12288, "num_hidden_layers": 36}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg8))
    m8 = from_hf_config(tmp_path / "m")
    assert m8.attention_head_dim == 0 and m8.params == PRESETS["qwen3-8b"].params


def test_from_hf_config_mistral_without_kv_key(tmp_path):
    cfg = {"model_type": "mistral", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "vocab_size": 100}
    spec = from_hf_config(_write(tmp_path, cfg) / "config.json")
    assert spec.kv_heads == 4 and not spec.qkv_bias


def test_from_hf_config_rejects_unknown_architecture(tmp_path):
    cfg = {"architectures": ["BloomForCausalLM"], "model_type": "bloom"}
    with pytest.raises(ConfigError, match="unsupported architecture.*BloomForCausalLM.*model_type='bloom'"):
        from_hf_config(_write(tmp_path, cfg))
    (tmp_path / "t").mkdir()
    with pytest.raises(ConfigError, match="model_type='falcon'"):
        from_hf_config(_write(tmp_path / "t", {"model_type": "falcon"}))


def test_from_hf_config_missing_keys_and_files(tmp_path):
    with pytest.raises(ConfigError, match="lacks keys"):
        from_hf_config(_write(tmp_path, {"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="does not exist"):
        from_hf_config(tmp_path / "nope" / "config.json")


def test_get_model_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="unknown model preset 'llama9-1b'.*llama2-7b"):
        get_model("llama9-1b")


@pytest.mark.parametrize("typo, preset", [("llama2-7bb", "llama2-7b"), ("tiny-2l-128", "tiny-2l-128h"),
                                          ("qwen2.5-7", "qwen2.5-7b"), ("opt-1.3", "opt-1.3b")])
def test_a_preset_typo_gets_the_hint_a_key_typo_gets(typo, preset):
    with pytest.raises(ConfigError) as err:
        get_model(typo)
    assert f"unknown model preset {typo!r} (did you mean {preset!r}?); known presets:" in str(err.value)
    with pytest.raises(ConfigError) as err:
        get_model("zzzzzzzz")
    assert "did you mean" not in str(err.value)  # no hint when nothing is close


# ---- GPT-style families -------------------------------------------------------------------------

FIXTURES = ROOT / "tests" / "fixtures" / "hf-configs"
# Exact counts: sum of p.numel() over Hugging Face transformers' OPTForCausalLM / GPT2LMHeadModel
# built on the meta device at each published config (the tied head counted once); OPT's nominal
# sizes are the paper's rounded figures (Zhang et al. 2022, arXiv 2205.01068, Table 1).
HF_COUNTS = {
    "opt-125m": (125_239_296, 0.125), "opt-1.3b": (1_315_758_080, 1.3), "opt-2.7b": (2_651_596_800, 2.7),
    "opt-6.7b": (6_658_473_984, 6.7), "opt-13b": (12_853_473_280, 13.0), "opt-30b": (29_974_540_288, 30.0),
    "opt-66b": (65_719_701_504, 66.0), "gpt2": (124_439_808, 0.124), "gpt2-medium": (354_823_168, 0.355),
    "gpt2-large": (774_030_080, 0.774), "gpt2-xl": (1_557_611_200, 1.5),
}


@pytest.mark.parametrize("name", sorted(HF_COUNTS))
def test_gpt_style_presets_count_what_hugging_face_counts(name):
    exact, nominal = HF_COUNTS[name]
    assert PRESETS[name].params == exact
    # the paper's sizes are rounded to two digits: 1.3B is 1.316B (1.2 % above), 13B 12.85B
    assert PRESETS[name].params / 1e9 == pytest.approx(nominal, rel=0.04)


def test_gpt_style_parameter_formula_by_hand():
    m = ModelSpec("g", layers=2, hidden=8, ffn=32, heads=2, kv_heads=2, vocab=10, norm="layernorm", mlp="gelu",
                  positions="learned", max_positions=6, bias=True, tied_embeddings=True)
    # per layer: q/k/v/o 4·64 + their biases 4·8 + fc1 256 + 32 + fc2 256 + 8 + two LayerNorms 2·16 = 872
    assert m.params_per_layer == 872
    assert m.replicated_params_per_layer == 2 * 16 + 2 * 8  # norms, o_proj and fc2 biases
    assert m.embedding_params == 10 * 8 + 6 * 8
    assert m.params == 2 * 872 + 16 + 10 * 8 + 6 * 8  # + final LayerNorm, tied head
    swiglu = dataclasses.replace(m, mlp="swiglu")  # gate and up biases of width ffn, down's of width h
    assert swiglu.params_per_layer == 872 + 256 + 32
    assert dataclasses.replace(m, bias=False, norm="rmsnorm").params_per_layer == 256 + 512 + 16
    neox = dataclasses.replace(m, positions="rotary", max_positions=0, parallel_residual=True, rotary_fraction=0.5)
    assert neox.params == m.params - 6 * 8 and neox.rotary_dim == 2


def test_gpt_style_fields_name_every_bad_value():
    base = dict(name="bad", layers=1, hidden=8, ffn=4, heads=2, kv_heads=2, vocab=5)
    cases = [({"norm": "batchnorm"}, "norm='batchnorm' must be one of"),
             ({"mlp": "geglu"}, "mlp='geglu' must be one of"),
             ({"positions": "alibi"}, "positions='alibi' must be one of"),
             ({"positions": "learned"}, "max_positions=0 must be at least 1 with positions='learned'"),
             ({"max_positions": -1}, "max_positions=-1"),
             ({"rotary_fraction": 0.0}, "rotary_fraction=0.0 must be positive"),
             ({"rotary_fraction": 1.5}, "rotary_fraction=1.5 exceeds"),
             ({"rotary_fraction": 0.25}, r"rotary_dim=1 \(head_dim=4 × rotary_fraction=0.25\) must be even"),
             ({"positions": "learned", "max_positions": 8, "rotary_fraction": 0.5}, "needs positions='rotary'"),
             ({"bias": 1}, "bias=1 must be true or false"),
             ({"parallel_residual": "yes"}, "parallel_residual='yes' must be true or false")]
    for fields, match in cases:
        with pytest.raises(ConfigError, match=match):
            ModelSpec(**(base | fields))
    odd = ModelSpec("ok", 1, 6, 4, 2, 2, 5, positions="learned", max_positions=4)  # no rotary: odd heads fine
    assert odd.head_dim == 3


def test_from_hf_config_reads_published_gpt2_opt_and_pythia_configs():
    """Configs of https://huggingface.co/openai-community/gpt2, https://huggingface.co/facebook/opt-125m
    and https://huggingface.co/EleutherAI/pythia-160m (162,322,944 parameters in Pythia's table)."""
    gpt2 = from_hf_config(FIXTURES / "gpt2")
    assert gpt2 == dataclasses.replace(PRESETS["gpt2"], name="gpt2")
    opt = from_hf_config(FIXTURES / "opt-125m" / "config.json")
    assert opt == dataclasses.replace(PRESETS["opt-125m"], name="opt-125m")
    assert opt.max_positions == 2050 and opt.mlp == "relu" and opt.tied_embeddings
    pythia = from_hf_config(FIXTURES / "pythia-160m")
    assert pythia.params == 162_322_944
    assert (pythia.parallel_residual, pythia.rotary_dim, pythia.tied_embeddings, pythia.bias) == (True, 16, False, True)


def test_from_hf_config_gpt_style_keys(tmp_path):
    gpt2 = json.loads((FIXTURES / "gpt2" / "config.json").read_text())
    assert from_hf_config(_write(tmp_path, gpt2 | {"n_inner": 1000})).ffn == 1000
    for i, (cfg, match) in enumerate([
        ({k: v for k, v in gpt2.items() if k != "n_positions"}, r"lacks keys \['n_positions'\]"),
        (gpt2 | {"activation_function": "swish"}, "activation_function='swish' is not supported"),
        (json.loads((FIXTURES / "opt-350m" / "config.json").read_text()), "word_embed_proj_dim=512 differs"),
        (json.loads((FIXTURES / "opt-125m" / "config.json").read_text()) | {"do_layer_norm_before": False},
         "do_layer_norm_before=false"),
        ({k: v for k, v in json.loads((FIXTURES / "pythia-160m" / "config.json").read_text()).items()
          if k != "rotary_pct"}, r"lacks keys \['rotary_pct'\]"),
    ]):
        (tmp_path / str(i)).mkdir()
        with pytest.raises(ConfigError, match=match):
            from_hf_config(_write(tmp_path / str(i), cfg))
    neox = json.loads((FIXTURES / "pythia-160m" / "config.json").read_text()) | {"use_parallel_residual": False,
                                                                               "rotary_pct": 1.0}
    (tmp_path / "n").mkdir()
    spec = from_hf_config(_write(tmp_path / "n", neox))
    assert not spec.parallel_residual and spec.rotary_dim == spec.head_dim
