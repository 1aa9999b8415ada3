"""The mlp pattern: ``act(gate) * up`` in each ACT2FN spelling, merged with its down projection.

Models are small gated MLPs written as Hugging Face writes them (separate gate/up as in Llama, one
fused gate_up as in Phi-3), with transformers' own activation modules, optionally with PEFT LoRA on
every linear. Each case checks the report, the rewritten graph's targets, and that the rewritten
graph computes what eager does (output and every gradient).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.activations import ACT2FN

from slothc.passes import mlp as mlp_pass
from slothc.passes.matcher import REPLACEMENT_MISMATCH
from tests.passes._capture import capture, targets

MLP_OP = torch.ops.slothc.mlp.default
ACT_OP = torch.ops.slothc.mlp_act.default

# ACT2FN name -> the activation slothc reports
SPELLINGS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
    "relu2": "relu2",
    "quick_gelu": "quick_gelu",
}


class GatedMLP(torch.nn.Module):
    """``LlamaMLP``: down(act(gate(x)) * up(x))."""

    def __init__(self, act="silu", hidden=32, inter=48):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FusedGateUpMLP(torch.nn.Module):
    """``Phi3MLP``: one gate_up projection, chunked; ``up * act(gate)``."""

    def __init__(self, act="silu", hidden=32, inter=48):
        super().__init__()
        self.gate_up_proj = torch.nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.activation_fn = ACT2FN[act]

    def forward(self, x):
        up_states = self.gate_up_proj(x)
        gate, up_states = up_states.chunk(2, dim=-1)
        up_states = up_states * self.activation_fn(gate)
        return self.down_proj(up_states)


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _lora(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def _run(model, x):
    eager = copy.deepcopy(model)
    x_eager = x.detach().clone().requires_grad_(x.requires_grad)
    report, graphs, out = capture(model, x)
    expected = eager(x_eager)
    torch.testing.assert_close(out, expected)
    if out.requires_grad:
        out.sum().backward()
        expected.sum().backward()
        for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, msg=name)
        if x.requires_grad:
            torch.testing.assert_close(x.grad, x_eager.grad)
    return report, graphs[0]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_activation_spelling_with_lora(spelling):
    torch.manual_seed(0)
    report, gm = _run(_lora(GatedMLP(spelling)), torch.randn(2, 5, 32))
    (site,) = report.fused["mlp"]
    assert site.variant == f"{SPELLINGS[spelling]} + down", str(report)
    assert targets(gm).count(MLP_OP) == 1 and ACT_OP not in targets(gm)
    assert report.count("lora_linear") == 3  # gate, up (one call: shared input), down (inside the mlp op)


def test_fused_gate_up_projection():
    torch.manual_seed(0)
    report, gm = _run(_lora(FusedGateUpMLP("silu")), torch.randn(3, 32))
    (site,) = report.fused["mlp"]
    assert site.variant == "silu + down"
    assert MLP_OP in targets(gm)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_without_lora_the_frozen_down_linear_is_absorbed(act):
    torch.manual_seed(0)
    x = torch.randn(4, 32, requires_grad=True)
    report, gm = _run(_frozen(GatedMLP(act)), x)
    assert [s.variant for s in report.fused["mlp"]] == [f"{SPELLINGS[act]} + down"]
    call = next(n for n in gm.graph.nodes if n.target is MLP_OP)
    assert call.args[5] == []  # no adapters


def test_trainable_down_weight_keeps_the_activation_op_only():
    torch.manual_seed(0)
    model = GatedMLP("silu")  # full fine-tuning: every weight trains
    report, gm = _run(model, torch.randn(4, 32))
    assert [s.variant for s in report.fused["mlp"]] == ["silu"]
    assert ACT_OP in targets(gm) and MLP_OP not in targets(gm)


def test_escaping_activation_is_refused():
    class Leaky(GatedMLP):
        def forward(self, x):
            a = self.act_fn(self.gate_proj(x))
            return self.down_proj(a * self.up_proj(x)) + a.sum(-1, keepdim=True)

    torch.manual_seed(0)
    report, gm = _run(_frozen(Leaky()), torch.randn(4, 32))
    assert report.count("mlp") == 0
    assert [s.reason for s in report.skipped if s.fusion == "mlp"] == ["an intermediate value is used outside the pattern"]


def test_mismatched_dtypes_are_skipped():
    def f(g, u):
        return torch.nn.functional.silu(g) * u

    report, _, _ = capture(f, torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64))
    assert [s.reason for s in report.skipped if s.fusion == "mlp"] == [mlp_pass.DTYPE_MISMATCH]


def test_relu2_under_autocast_fuses_only_where_it_keeps_the_dtype():
    """CUDA autocast runs relu2's square (a pow) in fp32, so act(g) * u is fp32 from bf16 g and u;
    mlp_act keeps g's dtype, and the matcher must then leave the MLP unfused and say why. CPU
    autocast keeps pow in bf16: fused. Each device checks its own branch."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    act = ACT2FN["relu2"]

    def f(g, u):
        with torch.autocast(device, dtype=torch.bfloat16):
            return act(g) * u

    g, u = (torch.randn(4, 8, device=device, dtype=torch.bfloat16) for _ in range(2))
    with torch.autocast(device, dtype=torch.bfloat16):
        eager_dtype = act(g).dtype
    report, _, out = capture(f, g, u)
    assert out.dtype == eager_dtype
    if eager_dtype == torch.bfloat16:
        assert report.count("mlp") == 1, str(report)
    else:
        assert report.count("mlp") == 0
        assert [s.reason for s in report.skipped if s.fusion == "mlp"] == [REPLACEMENT_MISMATCH], str(report)


def test_broadcast_products_are_not_candidates():
    def f(g, u):
        return torch.nn.functional.silu(g) * u

    report, (gm,), _ = capture(f, torch.randn(4, 8), torch.randn(8))
    assert report.count("mlp") == 0 and not report.skipped


def test_disabled_by_option():
    torch.manual_seed(0)
    report, (gm,), _ = capture(_lora(GatedMLP()), torch.randn(2, 32), options={"mlp": False})
    assert report.count("mlp") == 0 and MLP_OP not in targets(gm) and ACT_OP not in targets(gm)
