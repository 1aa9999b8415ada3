"""End to end: the causal-LM loss of tiny models, fused by slothc, against eager and float64.

Llama with untied and tied embeddings, Gemma 2 (final logit soft-capping), Cohere (logit scale)
and Granite (logits divided by a scaling): LoRA on every linear, one training step with and
without bf16 autocast, with the logits kept (the default: the model returns them) and dropped
(``options={"logits": "drop"}``); gradient accumulation through ``num_items_in_batch``; a trainable
lm_head. The loss and every trainable gradient must be as close to the float64 run as eager's are
(see ``tests/e2e/test_tiny_models.py``), and the report must show the loss fused.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

import slothc
from slothc.testing import float64_mode
from tests.e2e.test_tiny_models import COMMON, DEVICE, SCALAR_AUTOCAST_FLOOR, _assert_close_to_reference, _assert_grads_close, _batch, _lora_model

ARCHS = {
    "llama": LlamaConfig(**COMMON, num_key_value_heads=2),
    "llama_tied": LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    # A cap small enough that tanh bends the random model's logits.
    "gemma2": Gemma2Config(**COMMON, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5),
    "cohere": CohereConfig(**COMMON, num_key_value_heads=2, logit_scale=0.25),
    "granite": GraniteConfig(**COMMON, num_key_value_heads=2, logits_scaling=4.0),
}
VARIANT = {  # the report's variant for each arch when the logits are dropped
    "llama": "hidden states, logits dropped",
    "llama_tied": "hidden states, logits dropped",
    "gemma2": "hidden states, logits dropped, softcap 0.5",
    "cohere": "hidden states, logits dropped, scale 0.25",
    "granite": "hidden states, logits dropped, scale 0.25",
}


@pytest.fixture(autouse=True)
def _reference_ops_on_cpu(monkeypatch):
    from slothc.kernels import _launch

    monkeypatch.setattr(_launch, "interpreting", lambda: False)


def _steps(model, batches, autocast: bool, fp64: bool = False, num_items=None):
    """Forward + backward over micro-batches (gradients accumulate); returns (losses, grads, last logits)."""
    ctx = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    losses, logits = [], None
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items, device=DEVICE)}
    with ctx, (float64_mode() if fp64 else contextlib.nullcontext()):
        for batch in batches:
            out = model(**batch, **kwargs)
            out.loss.backward()
            losses.append(out.loss.detach())
            logits = out.logits
    grads = {n.replace("_orig_mod.", ""): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return torch.stack(losses), grads, logits


def _check(config, autocast, options, batches=None, num_items=None, prepare=None):
    base = _lora_model(config, attn="eager" if config.model_type == "gemma2" else "sdpa")  # no sdpa for Gemma 2
    if prepare is not None:
        prepare(base)
    batches = batches or [_batch(config)]
    ref_model, eager_model, fused_model = copy.deepcopy(base).double(), copy.deepcopy(base), copy.deepcopy(base)
    ref_loss, ref_grads, ref_logits = _steps(ref_model, batches, autocast=False, fp64=True, num_items=num_items)
    eager_loss, eager_grads, eager_logits = _steps(eager_model, batches, autocast, num_items=num_items)
    report = slothc.Report()
    torch._dynamo.reset()
    compiled = torch.compile(fused_model, backend="slothc", options={"inner": "aot_eager", "report": report, **options})
    fused_loss, fused_grads, fused_logits = _steps(compiled, batches, autocast, num_items=num_items)
    torch._dynamo.reset()

    k = 2.0 if not autocast else 3.0
    _assert_close_to_reference("loss", fused_loss, eager_loss, ref_loss, k, SCALAR_AUTOCAST_FLOOR if autocast else 0.0)
    _assert_grads_close(fused_grads, eager_grads, ref_grads, k + 1, half=autocast)
    if fused_logits.numel():
        # The returned logits are the model's: as close to float64 as eager's (the LoRA fusion rounds
        # differently from eager under autocast, so they are not bitwise eager's there).
        _assert_close_to_reference("logits", fused_logits, eager_logits, ref_logits, k)
        if not autocast:
            torch.testing.assert_close(fused_logits, eager_logits)
    return report, eager_logits, fused_logits


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_fused_with_logits_kept(arch, autocast):
    report, eager_logits, fused_logits = _check(ARCHS[arch], autocast, {})
    (site,) = report.fused["linear_cross_entropy"]
    assert site.variant == "logits" and site.module.endswith("lm_head"), str(report)
    assert not [s for s in report.skipped if s.fusion == "linear_cross_entropy"], str(report)
    assert fused_logits.shape == eager_logits.shape  # the returned logits are the model's (compared in _check)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_fused_from_hidden_states_with_logits_dropped(arch):
    report, _, fused_logits = _check(ARCHS[arch], True, {"logits": "drop"})
    (site,) = report.fused["linear_cross_entropy"]
    assert site.variant == VARIANT[arch], str(report)
    assert fused_logits.shape == (2, 12, 0)


@pytest.mark.parametrize("logits", ["keep", "drop"])
def test_gradient_accumulation_with_num_items_in_batch(logits):
    config = ARCHS["llama"]
    batches = [_batch(config, seed=1), _batch(config, seed=2)]
    batches[1]["labels"][1, 4:] = -100
    num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    report, _, _ = _check(config, True, {"logits": logits}, batches=batches, num_items=num_items)
    assert report.count("linear_cross_entropy") == 1, str(report)


def _train_lm_head(model):
    model.base_model.model.lm_head.weight.requires_grad_(True)


@pytest.mark.parametrize("logits", ["keep", "drop"])
def test_trainable_lm_head(logits):
    report, _, _ = _check(ARCHS["llama"], False, {"logits": logits}, prepare=_train_lm_head)
    assert report.count("linear_cross_entropy") == 1, str(report)


def test_every_label_ignored_gives_eager_nan_and_zero_gradients():
    config = ARCHS["llama"]
    batch = _batch(config)
    batch["labels"][:] = -100
    model = _lora_model(config)
    out = torch.compile(model, backend="slothc", options={"inner": "aot_eager", "logits": "drop"})(**batch)
    assert torch.isnan(out.loss)  # eager's mean over no tokens is NaN too
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.all(g == 0) for g in grads)
    torch._dynamo.reset()
