"""ModelSpec: parameter counts against published figures, validation, Hugging Face configs."""

from __future__ import annotations

import json

import pytest

from estimator.errors import ConfigError
from estimator.models import PRESETS, ModelSpec, from_hf_config, get_model

PUBLISHED = {  # billions, from the Hugging Face model cards' parameter counts
    "llama2-7b": 6.738, "llama2-13b": 13.016, "codellama-34b": 33.744, "llama2-70b": 68.977,
    "llama3-8b": 8.030, "llama3-70b": 70.554, "qwen2.5-0.5b": 0.494, "qwen2.5-1.5b": 1.544,
    "qwen2.5-7b": 7.616, "qwen2.5-14b": 14.770, "qwen2.5-32b": 32.764, "qwen2.5-72b": 72.706,
}


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
