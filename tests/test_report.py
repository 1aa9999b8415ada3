"""slothc.report.module_path: a site is named by the model's module it came from."""

import types

from slothc.report import module_path

ATTN = "L['self'].__dict__['_modules']['base_model'].__dict__['_modules']['model'].model.layers.0.self_attn"


def _node(*paths):
    return types.SimpleNamespace(meta={"nn_module_stack": {f"k{i}": (p, object) for i, p in enumerate(paths)}})


def test_dynamo_paths_are_cleaned():
    assert module_path(_node("L['self'].__dict__['_modules']['base_model']", ATTN)) == "base_model.model.model.layers.0.self_attn"
    assert module_path(types.SimpleNamespace(meta={})) == ""


def test_a_module_held_in_a_global_names_its_caller():
    """transformers 5.25 calls apply_rotary_pos_emb through a module of the `kernels` package held in a
    global: the site is the attention module that called it, not the global."""
    rope = "G['__import_transformers_dot_models_dot_llama_dot_modeling_llama'].apply_rotary_pos_emb"
    assert module_path(_node(ATTN, rope)) == "base_model.model.model.layers.0.self_attn"
    assert module_path(_node(rope)) == "G.__import_transformers_dot_models_dot_llama_dot_modeling_llama.apply_rotary_pos_emb"
