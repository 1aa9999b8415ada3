"""End to end: LoRA on every linear layer and the gated MLPs of tiny Llama, Qwen2, Phi-3 and Gemma.

Each model (random weights, PEFT LoRA on all linear layers) is compiled with slothc; one training
step gives eager's loss and every LoRA gradient (judged against float64, see test_tiny_models.py),
and the report shows every LoRA linear and every MLP fused, with nothing of either skipped. Phi-3
has its checkpoint layout (fused ``qkv_proj`` and ``gate_up_proj``); Gemma's MLP is GELU tanh.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Phi3Config, Qwen2Config

import slothc
from slothc.kernels import _launch
from tests.e2e.test_tiny_models import COMMON, DEVICE, LAYERS, _assert_close_to_reference, _assert_grads_close, _batch, _check_training_step, _lora_model, _step
from tests.helpers import count_calls

ARCHS = {
    "llama": LlamaConfig(**COMMON, num_key_value_heads=2),
    "qwen2": Qwen2Config(**COMMON, num_key_value_heads=2),  # q/k/v with bias
    "phi3": Phi3Config(**COMMON, num_key_value_heads=4, pad_token_id=0),  # fused qkv_proj, gate_up_proj
    "gemma": GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=16),  # GELU tanh
}
ACT = {"llama": "silu", "qwen2": "silu", "phi3": "silu", "gemma": "gelu_tanh"}


@pytest.fixture
def reference_ops_on_cpu(monkeypatch):
    monkeypatch.setattr(_launch, "interpreting", lambda: False)


def _lora_modules(config) -> list[str]:
    model = _lora_model(config)
    return sorted(name for name, m in model.named_modules() if isinstance(m, LoraLinear))


def _layer_path(module: str) -> str:
    # Inside gradient checkpointing Dynamo names modules relative to the checkpointed layer stack.
    return module[module.index("layers.") :] if "layers." in module else module


def _assert_every_lora_linear_and_mlp_fused(report, config, arch):
    expected = [_layer_path(m) for m in _lora_modules(config)]
    fused = sorted(_layer_path(m) for m in report.modules("lora_linear"))
    assert fused == sorted(expected), str(report)
    mlp_sites = report.fused["mlp"]
    assert len(mlp_sites) == LAYERS and all(s.variant == f"{ACT[arch]} + down" for s in mlp_sites), str(report)
    assert not [s for s in report.skipped if s.fusion in ("lora_linear", "mlp")], str(report)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_lora_linear_and_mlp_fused_and_step_matches_eager(arch, autocast, reference_ops_on_cpu):
    config = ARCHS[arch]
    report = _check_training_step(config, autocast, {"inner": "aot_eager"})
    _assert_every_lora_linear_and_mlp_fused(report, config, arch)
    if arch != "phi3":  # q/k/v and gate/up: one call each, per layer
        shared = [s for s in report.fused["lora_linear"] if "input shared" in s.variant]
        assert len(shared) == 5 * LAYERS, str(report)


def test_half_precision_model_with_fp32_adapters(reference_ops_on_cpu):
    """A bf16 model with PEFT's fp32 adapters (its default autocast_adapter_dtype), no autocast: eager
    casts x to fp32 for every LoRA branch and adds in fp32; the fused op computes the same."""
    config = ARCHS["llama"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config)).to(DEVICE, torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    batch = _batch(config)
    ref_model, eager_model, fused_model = copy.deepcopy(model).double(), copy.deepcopy(model), copy.deepcopy(model)
    from slothc.testing import float64_mode  # noqa: F401  (the float64 run below)

    ref_loss, ref_grads = _step(ref_model, batch, autocast=False, fp64=True)
    eager_loss, eager_grads = _step(eager_model, batch, autocast=False)
    report = slothc.Report()
    torch._dynamo.reset()
    fused_loss, fused_grads = _step(torch.compile(fused_model, backend="slothc", options={"inner": "aot_eager", "report": report}), batch, False)
    torch._dynamo.reset()
    _assert_close_to_reference("loss", fused_loss, eager_loss, ref_loss, 3.0, 2.0**-11)
    assert all(g.dtype == torch.float32 for g in fused_grads.values())
    _assert_grads_close(fused_grads, eager_grads, ref_grads, 4.0, half=True)
    _assert_every_lora_linear_and_mlp_fused(report, config, "llama")


def test_gradient_checkpointing(reference_ops_on_cpu):
    config = ARCHS["qwen2"]
    report = _check_training_step(config, False, {"inner": "aot_eager"}, gradient_checkpointing=True)
    _assert_every_lora_linear_and_mlp_fused(report, config, "qwen2")


def test_inductor_inner_compiler(reference_ops_on_cpu):
    config = ARCHS["llama"]
    report = _check_training_step(config, False, {"inner": "inductor"})
    _assert_every_lora_linear_and_mlp_fused(report, config, "llama")


def test_triton_mlp_kernels_in_a_training_step(monkeypatch):
    if not torch.cuda.is_available() and not _launch.interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from slothc.kernels import mlp as mlp_kernels

    launches = count_calls(monkeypatch, mlp_kernels, ("mlp_act_fwd", "mlp_act_bwd", "mlp_down_bwd"))
    config = ARCHS["gemma"]
    report = _check_training_step(config, True, {"inner": "aot_eager"})
    _assert_every_lora_linear_and_mlp_fused(report, config, "gemma")
    # h made once a layer, in the forward: the backward's one kernel (dg, du and the down projection's
    # dA) recomputes it in registers; a fallback to the composed path would recompute it (2 a layer)
    assert launches["mlp_down_bwd"] == LAYERS and launches["mlp_act_fwd"] == LAYERS and launches["mlp_act_bwd"] == 0, launches


def test_explain_shows_lora_and_mlp(reference_ops_on_cpu):
    config = ARCHS["phi3"]
    text = str(slothc.explain(_lora_model(config), **_batch(config)))
    assert "fused lora_linear: 8 sites" in text and "fused mlp: 2 sites" in text, text
    assert "self_attn.qkv_proj  [peft]" in text and "mlp  [silu + down]" in text


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_lora_dropout_in_training(inner, reference_ops_on_cpu):
    """lora_dropout > 0 in training: the dropout stays torch's own, every LoRA linear is fused around it."""
    config = ARCHS["llama"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config)).to(DEVICE)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.2, init_lora_weights=False))
    model.train()
    batch = _batch(config)
    eager_model, fused_model = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(7)
    eager_loss, eager_grads = _step(eager_model, batch, autocast=False)
    report = slothc.Report()
    torch._dynamo.reset()
    compiled = torch.compile(fused_model, backend="slothc", options={"inner": inner, "report": report})
    torch.manual_seed(7)
    fused_loss, fused_grads = _step(compiled, batch, autocast=False)
    torch._dynamo.reset()
    assert report.count("lora_linear") == len(_lora_modules(config)), str(report)
    assert all("dropout" in s.variant for s in report.fused["lora_linear"]), str(report)
    assert not [s for s in report.skipped if s.fusion == "lora_linear"], str(report)
    # The graph's dropout calls run in eager's order on the global generator: the same masks (Inductor
    # would draw its own random numbers, as it does for any model with dropout).
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name in eager_grads:
        torch.testing.assert_close(fused_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
