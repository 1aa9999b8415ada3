"""``slothc.tiny``: configs shrunk generically from their own fields, models that build and train."""

import pytest
import torch

from slothc.tiny import add_lora, causal_lm_archs, sample_batch, tiny_config, tiny_model

# One model per family of config spellings: llama-style fields, GQA, explicit head_dim, layer_types,
# gpt2's attribute_map (n_embd, n_head), MLA + MoE, Mamba-2 (heads * head_dim = expand * hidden).
SHRINK_ARCHS = ["llama", "mistral", "gemma3_text", "gpt_neox", "gpt2", "deepseek_v3", "qwen3_next", "mamba2"]

# The architectures the fusions are written against; each must build and train in eager.
TRAIN_ARCHS = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
    "olmo2", "cohere", "gpt_neox", "stablelm", "granite",
]


def _heads(text):
    return getattr(text, "num_attention_heads", None) or getattr(text, "num_heads", None)


@pytest.mark.parametrize("arch", SHRINK_ARCHS)
def test_tiny_config_shrinks_every_size(arch):
    config = tiny_config(arch, layers=2, hidden=64, vocab=256)
    text = config.get_text_config()
    assert text.hidden_size == 64
    assert text.num_hidden_layers == 2
    assert text.vocab_size == 256
    heads = _heads(text)
    assert heads and 64 % heads == 0 or getattr(text, "head_dim", None)
    kv = getattr(text, "num_key_value_heads", None)
    if kv:
        assert heads % kv == 0
    for name in ("intermediate_size", "moe_intermediate_size", "max_position_embeddings"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            assert value <= 1024, f"{name}={value} was not shrunk"
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(text, name, None)
        assert value is None or isinstance(value, list) or value < 256
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None:
        assert len(layer_types) == 2


def test_grouped_query_attention_stays_grouped():
    text = tiny_config("mistral")  # 32 query heads, 8 key/value heads
    assert text.num_key_value_heads < text.num_attention_heads
    assert text.num_attention_heads % text.num_key_value_heads == 0
    assert text.head_dim * text.num_attention_heads == text.hidden_size


def test_layers_kept_cover_every_kind():
    assert tiny_config("gemma3_text").layer_types == ["sliding_attention", "full_attention"]
    assert sorted(tiny_config("qwen3_next").layer_types) == ["full_attention", "linear_attention"]
    assert tiny_config("gemma3_text", layers=1).layer_types == ["sliding_attention"]


def test_mamba2_heads_times_head_dim_matches_inner_width():
    config = tiny_config("mamba2")
    assert config.num_heads * config.head_dim == config.expand * config.hidden_size


def test_nested_config_and_special_ids():
    config = tiny_config("gemma3")
    assert config.text_config.hidden_size == 64 and config.vision_config.hidden_size == 64
    assert config.image_token_id < 256
    batch = sample_batch(config, batch=4, seq=32)
    assert not (batch["input_ids"] == config.image_token_id).any()


def test_overrides_reach_the_text_config():
    assert tiny_config("llama", rms_norm_eps=1e-3).rms_norm_eps == 1e-3
    assert tiny_config("gemma3", sliding_window=8).text_config.sliding_window == 8


def test_unknown_arch_names_close_matches():
    with pytest.raises(ValueError, match="did you mean llama"):
        tiny_config("lama")
    assert "llama" in causal_lm_archs()


@pytest.mark.parametrize("arch", TRAIN_ARCHS)
def test_tiny_model_trains_in_eager(arch):
    model = add_lora(tiny_model(arch, layers=2))
    model.train()
    batch = sample_batch(model.config, batch=2, seq=16)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is not None for p in lora)


def test_tiny_model_is_deterministic_by_seed():
    state = torch.random.get_rng_state()
    a, b, c = (tiny_model("llama", layers=1, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_tiny_model_dtype_and_lora_kwargs():
    model = add_lora(tiny_model("qwen3", layers=1, dtype=torch.bfloat16), r=4, alpha=8, init_lora_weights=False)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in base)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.dtype == torch.float32 and p.abs().sum() > 0 for p in lora_b)


def test_sample_batch_is_deterministic():
    config = tiny_config("llama")
    a, b = sample_batch(config, seed=3), sample_batch(config, seed=3)
    assert set(a) == {"input_ids", "attention_mask", "labels"}
    assert a["input_ids"].shape == (2, 16)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], a["input_ids"])


def test_checkpoint_left_fields_are_filled_by_rule():
    # Mixture-of-experts configs with their expert counts left to the checkpoint (None): filled,
    # while Gemma 4 text (enable_moe_block=False, num_experts=None) stays dense.
    dots1 = tiny_config("dots1")
    assert (dots1.n_routed_experts, dots1.num_experts_per_tok, dots1.n_shared_experts) == (4, 2, 1)
    assert tiny_config("deepseek_v2").num_experts_per_tok == 2
    assert tiny_config("gemma4_text").num_experts is None
    # default_language None, languages listed: the first one
    xmod = tiny_config("xmod")
    assert xmod.default_language == xmod.languages[0]
    # a layer_types that the config neither gets nor derives: full attention, the transformers default
    assert tiny_config("lfm2_moe").layer_types == ["full_attention", "full_attention"]


def test_run_length_layer_kinds_are_shrunk():
    config = tiny_config("gpt_neo")  # attention_types=[[["global", "local"], 12]] over 24 layers
    assert config.attention_types == [[["global", "local"], 1]] and config.attention_layers == ["global", "local"]


@pytest.mark.parametrize("arch", ["zamba", "cohere_compass_text"])
def test_later_variants_build_what_the_first_config_cannot(arch):
    # zamba: its shared transformer is tied across hybrid layers, so it needs two of them (4 layers);
    # cohere_compass_text: RoPE parameters per layer type, from the config class's default_theta
    model = tiny_model(arch, layers=2)
    if arch == "zamba":
        assert model.config.layers_block_type.count("hybrid") == 2
    else:
        assert set(model.config.rope_parameters) == set(model.config.layer_types)
