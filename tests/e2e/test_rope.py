"""End to end: the rotary embedding of tiny Llama, Phi-3 and StableLM (partial rotary), Cohere and GLM
(interleaved) with LoRA on every linear, compiled with slothc.

One training step gives eager's loss and every LoRA gradient (judged against float64, see
test_tiny_models.py), fp32 and under bf16 autocast, and the report shows q and k rotated by one fused
call in every layer, with no RoPE site skipped.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CohereConfig, GlmConfig, LlamaConfig, Phi3Config, StableLmConfig

from slothc.kernels import _launch
from slothc.kernels import rope as rope_kernels
from tests.e2e.test_tiny_models import COMMON, LAYERS, _check_training_step
from tests.helpers import count_calls

# arch -> (config, the variant every site reports)
ARCHS = {
    "llama": (LlamaConfig(**COMMON, num_key_value_heads=2), "rotate_half"),  # GQA
    "phi3": (Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0, partial_rotary_factor=0.5), "rotate_half, partial 8/16"),
    "stablelm": (StableLmConfig(**COMMON, num_key_value_heads=4), "rotate_half, partial 4/16"),  # its default 0.25
    "cohere": (CohereConfig(**COMMON, num_key_value_heads=2), "interleaved, fp32 then cast back"),
    "glm": (GlmConfig(**COMMON, num_key_value_heads=2, head_dim=16, pad_token_id=0), "interleaved, partial 8/16"),
}


@pytest.fixture
def reference_ops_on_cpu(monkeypatch):
    monkeypatch.setattr(_launch, "interpreting", lambda: False)


def _assert_rope_fused_in_every_layer(report, variant):
    sites = report.fused["rope"]
    assert len(sites) == 2 * LAYERS, str(report)  # q and k of every layer
    layers = sorted(s.module for s in sites)
    assert layers == sorted(f"base_model.model.model.layers.{i}.self_attn" for i in range(LAYERS) for _ in range(2)), str(report)
    assert all(s.variant == f"{variant}, q and k in one launch" for s in sites), str(report)
    assert not [s for s in report.skipped if s.fusion == "rope"], str(report)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("arch", ARCHS)
def test_rope_fused_in_every_layer_and_step_matches_eager(arch, autocast, reference_ops_on_cpu):
    config, variant = ARCHS[arch]
    report = _check_training_step(config, autocast, {"inner": "aot_eager"})
    _assert_rope_fused_in_every_layer(report, variant)


def test_rope_inside_gradient_checkpointing(reference_ops_on_cpu):
    config, variant = ARCHS["llama"]
    report = _check_training_step(config, True, {"inner": "aot_eager"}, gradient_checkpointing=True)
    sites = report.fused["rope"]
    assert len(sites) == 2 * LAYERS and all("q and k in one launch" in s.variant for s in sites), str(report)


def test_rope_kernel_in_a_training_step(monkeypatch):
    """The Triton kernel (interpreter on CPU) in a partial-rotary model: one launch a layer forward,
    one backward. Only the rope op runs its kernel here (the other ops' kernels have their own
    end-to-end test in test_tiny_models.py)."""
    if not (torch.cuda.is_available() or _launch.interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    if not torch.cuda.is_available():
        monkeypatch.setattr(_launch, "interpreting", lambda: False)
        monkeypatch.setattr(rope_kernels, "use_triton", lambda x: True)
    calls = count_calls(monkeypatch, rope_kernels, ["rope_launch"])
    config, variant = ARCHS["stablelm"]
    report = _check_training_step(config, False, {"inner": "aot_eager"})
    _assert_rope_fused_in_every_layer(report, variant)
    assert calls["rope_launch"] == 2 * LAYERS


def test_rope_under_inductor(reference_ops_on_cpu):
    config, variant = ARCHS["cohere"]
    report = _check_training_step(config, True, {"inner": "inductor"})
    _assert_rope_fused_in_every_layer(report, variant)
