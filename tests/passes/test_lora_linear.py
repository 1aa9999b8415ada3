"""The lora_linear pattern: PEFT's LoRA layers as Dynamo captures them, matched or skipped with the reason.

Each case wraps real PEFT modules in a small model, captures its graph with Dynamo, runs the slothc
passes and checks the report, the rewritten graph's targets, and that the rewritten graph computes
what eager does (forward and the adapters' gradients).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import slothc
from slothc.passes import lora_linear as lora_pass
from slothc.passes.matcher import INTERMEDIATE_ESCAPES
from tests.passes._capture import capture, targets

LORA_OP = torch.ops.slothc.lora_linear.default


class Block(torch.nn.Module):
    """q/k/v-like projections reading one input, then an output projection."""

    def __init__(self, hidden=32, bias=False):
        super().__init__()
        self.q = torch.nn.Linear(hidden, hidden, bias=bias)
        self.k = torch.nn.Linear(hidden, 16, bias=bias)
        self.v = torch.nn.Linear(hidden, 16, bias=bias)
        self.o = torch.nn.Linear(hidden + 32, hidden, bias=bias)

    def forward(self, x):
        return self.o(torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1))


def _peft(model=None, **lora):
    torch.manual_seed(0)
    model = model or Block()
    config = dict(r=4, lora_alpha=8, target_modules=["q", "k", "v", "o"], init_lora_weights=False)
    config.update(lora)
    return get_peft_model(model, LoraConfig(**config))


def _run(model, x, options=None, seed=None):
    """(report, rewritten graph); checks the output and the LoRA grads against eager's. ``seed``:
    reseed before each run (the same dropout masks)."""
    eager = copy.deepcopy(model)
    if seed is not None:
        torch.manual_seed(seed)
    report, graphs, out = capture(model, x, options=options)
    if seed is not None:
        torch.manual_seed(seed)
    expected = eager(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    return report, graphs[0]


def test_every_projection_fused_and_shared_input_merged():
    report, gm = _run(_peft(), torch.randn(2, 5, 32))
    assert sorted(m.rsplit(".", 1)[-1] for m in report.modules("lora_linear")) == ["k", "o", "q", "v"]
    variants = {s.module.rsplit(".", 1)[-1]: s.variant for s in report.fused["lora_linear"]}
    assert variants["q"] == variants["k"] == variants["v"] == "peft, input shared by 3" and variants["o"] == "peft"
    assert targets(gm).count(LORA_OP) == 2  # q/k/v in one call, o in another
    assert torch._C._nn.linear not in targets(gm)
    assert not report.skipped


def test_bias_and_rslora():
    model = _peft(Block(bias=True), use_rslora=True, r=8, lora_alpha=16)
    report, gm = _run(model, torch.randn(3, 32))
    assert report.count("lora_linear") == 4
    call = next(n for n in gm.graph.nodes if n.target is LORA_OP and len(n.args[1]) == 3)
    assert call.args[5] == [pytest.approx(16 / 8**0.5)] * 3  # rsLoRA: alpha / sqrt(r)


def test_two_active_adapters_are_summed():
    model = _peft()
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["q", "k", "v", "o"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    report, gm = _run(model, torch.randn(4, 32))
    assert report.count("lora_linear") == 4
    assert all("2 adapters" in s.variant for s in report.fused["lora_linear"])
    call = next(n for n in gm.graph.nodes if n.target is LORA_OP and len(n.args[1]) == 3)
    assert len(call.args[3]) == 6 and sorted(call.args[5]) == sorted([2.0, 3.0] * 3)


def test_three_adapters_are_reported_not_silently_left():
    model = _peft()
    for name in ("b", "c"):
        model.add_adapter(name, LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k", "v", "o"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "b", "c"])
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    report, _ = _run(model, torch.randn(4, 32))
    assert report.count("lora_linear") == 0
    assert {s.reason for s in report.skipped if s.fusion == "lora_linear"} == {lora_pass.NOT_PEFT_FORM}


def test_dropout_in_training_is_fused_with_torchs_own_dropout():
    model = _peft(lora_dropout=0.1).train()
    # reseeded: the same random masks, since the dropout in the graph is torch's own
    report, gm = _run(model, torch.randn(2, 5, 32), seed=123)
    assert report.count("lora_linear") == 4 and not report.skipped
    assert {s.variant for s in report.fused["lora_linear"]} == {"peft, dropout"}
    assert targets(gm).count(torch.nn.functional.dropout) == 4 and targets(gm).count(LORA_OP) == 4  # one mask each
    model.zero_grad(set_to_none=True)
    report, _ = _run(model.eval(), torch.randn(2, 32))  # eval: the identity, and q/k/v share a call again
    assert report.count("lora_linear") == 4 and {s.variant for s in report.fused["lora_linear"]} >= {"peft, input shared by 3"}


def test_two_adapters_with_dropout_are_skipped():
    model = _peft(lora_dropout=0.1)
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=6, target_modules=["q", "k", "v", "o"], lora_dropout=0.1))
    model.base_model.set_adapter(["default", "second"])
    report, _, _ = capture(model.train(), torch.randn(2, 32))
    assert {s.reason for s in report.skipped if s.fusion == "lora_linear"} == {lora_pass.DROPOUT_TWO_ADAPTERS}


def test_dora_is_skipped():
    # PEFT's DoRA breaks Dynamo's graph (dequantize_module_weight); each piece is compiled.
    report = slothc.Report()
    torch._dynamo.reset()
    torch.compile(_peft(use_dora=True), backend="slothc", options={"inner": "eager", "report": report})(torch.randn(2, 32))
    torch._dynamo.reset()
    assert report.count("lora_linear") == 0
    # Where Dynamo does not break the graph (CUDA), DoRA's base output feeds the magnitude term as
    # well, so the LoRA pattern also meets it with an escaping intermediate; either way, skipped.
    reasons = {s.reason for s in report.skipped if s.fusion == "lora_linear"}
    assert lora_pass.NOT_PEFT_FORM in reasons and reasons <= {lora_pass.NOT_PEFT_FORM, INTERMEDIATE_ESCAPES}, reasons


def test_trainable_base_weight_is_skipped():
    model = _peft()
    model.base_model.model.q.base_layer.weight.requires_grad_(True)
    report, _ = capture(model, torch.randn(2, 32))[:2]
    assert [s.module.rsplit(".", 1)[-1] for s in report.skipped if s.reason == lora_pass.TRAINABLE_BASE] == ["q"]
    assert report.count("lora_linear") == 3


class EmbedConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.conv = torch.nn.Conv1d(8, 8, 3)

    def forward(self, ids):
        return self.conv(self.emb(ids).transpose(1, 2))


def test_embedding_and_convolution_are_reported():
    model = _peft(EmbedConv(), target_modules=["emb", "conv"], r=2)
    report, _ = capture(model, torch.tensor([[1, 2, 3, 4]]))[:2]
    reasons = {s.module.rsplit(".", 1)[-1]: s.reason for s in report.skipped if s.fusion == "lora_linear"}
    assert reasons == {"emb": lora_pass.ON_EMBEDDING, "conv": lora_pass.ON_CONVOLUTION}


def test_bf16_model_with_fp32_adapters():
    model = _peft(Block().to(torch.bfloat16))
    assert model.base_model.model.q.lora_A["default"].weight.dtype == torch.float32  # PEFT's upcast
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    report, (gm,), _ = capture(model, x)
    assert report.count("lora_linear") == 4
    call = next(n for n in gm.graph.nodes if n.target is LORA_OP)
    assert call.args[7:] == (torch.bfloat16, torch.float32, torch.bfloat16)  # base, lora, out: eager's dtypes
    assert torch.Tensor.to not in targets(gm)  # PEFT's x.to(fp32) is gone


def test_autocast_dtypes_come_from_the_graph():
    model = _peft()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report, (gm,), _ = capture(model, torch.randn(3, 32))
    call = next(n for n in gm.graph.nodes if n.target is LORA_OP)
    assert call.args[7:] == (torch.bfloat16,) * 3
    assert report.count("lora_linear") == 4


def test_an_escaping_branch_is_refused():
    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 2, bias=False)
            self.b = torch.nn.Linear(2, 16, bias=False)
            self.w = torch.nn.Linear(16, 16, bias=False).requires_grad_(False)

        def forward(self, x):
            branch = self.b(self.a(x))
            out = (self.w(x) + branch * 2.0).to(x.dtype)
            return out + branch  # the update is used outside the LoRA pattern

    report, gm = _run(Leaky(), torch.randn(4, 16))
    assert report.count("lora_linear") == 0
    assert LORA_OP not in targets(gm)


def test_plain_two_layer_mlp_is_not_a_candidate():
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 16))
    report, gm = _run(model, torch.randn(4, 16))
    assert report.count("lora_linear") == 0 and not report.skipped


def test_disabled_by_option():
    report, (gm,), _ = capture(_peft(), torch.randn(2, 32), options={"lora_linear": False})
    assert report.count("lora_linear") == 0 and LORA_OP not in targets(gm)


def test_a_hand_written_base_linear_is_fused():
    class FalconLinear(torch.nn.Linear):
        def forward(self, x):
            return x @ self.weight.T

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = FalconLinear(32, 24, bias=False)

        def forward(self, x):
            return self.proj(x)

    report, gm = _run(_peft(Model(), target_modules=["proj"]), torch.randn(3, 32))
    assert report.count("lora_linear") == 1 and LORA_OP in targets(gm)


def test_conv1d_base_layer_is_reported():
    from transformers.pytorch_utils import Conv1D

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(48, 32)  # GPT-2's projection: addmm(bias, x, W) with W [in, out]

        def forward(self, x):
            return self.c_attn(x)

    report, _, _ = capture(_peft(Model(), target_modules=["c_attn"], fan_in_fan_out=True), torch.randn(2, 3, 32))
    assert [s.reason for s in report.skipped if s.fusion == "lora_linear"] == [lora_pass.BASE_NOT_LINEAR]
