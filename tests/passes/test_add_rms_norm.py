"""add_rms_norm: the residual add before a fused RMSNorm, and the gradient sum after its backward,
rewritten on Inductor's post-grad graphs into slothc::add_rms_norm / slothc::add_rms_norm_backward.

The fusion must change no value: a training step compiled with it gives the same loss and gradients,
bit for bit, as the step compiled without it. The report's sites (found before AOTAutograd) must be
what the post-grad pass rewrote, and what it cannot fuse it reports."""

import pytest
import torch

import slothc
from slothc import tiny
from slothc.passes import add_rms_norm as fusion
from tests.helpers import llama_rms_norm, reference_ops_on_cpu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _reference_ops_on_cpu(monkeypatch):
    # On the CPU the ops' torch references (the kernels' bits are tests/kernels/test_rms_norm.py's;
    # the Triton interpreter would take minutes a step here)
    with reference_ops_on_cpu(monkeypatch):
        yield


@pytest.fixture
def rewrites(monkeypatch):
    """The post-grad pass's (forward, backward) rewrite counts, per graph it ran on; Inductor's FX
    graph cache off, so that every compile runs the pass."""
    seen = []
    original = fusion.PostGradPass.__call__

    def spy(self, graph):
        original(self, graph)
        seen.append(self.counts[-1])

    monkeypatch.setattr(fusion.PostGradPass, "__call__", spy)
    with torch._inductor.config.patch(fx_graph_cache=False):
        yield seen


def _step(options, dtype=torch.float32, train_norms=False, layers=2, checkpointing=False):
    torch.manual_seed(0)
    model = tiny.add_lora(tiny.tiny_model("llama", layers=layers, hidden=64), init_lora_weights=False).to(dtype)
    model.train().to(DEVICE)
    if checkpointing:
        tiny.enable_checkpointing(model.base_model.model)
    if train_norms:  # the norm weights' gradients too (dw in the fused backward)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.requires_grad_(True)
    batch = tiny.sample_batch(model.config, batch=2, seq=16, device=DEVICE)
    del batch["attention_mask"]
    report = slothc.Report()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="slothc", options={"report": report, **options})
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = compiled(**batch).loss
    loss.backward()
    torch._dynamo.reset()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, report


@pytest.mark.parametrize("dtype, train_norms", [(torch.float32, False), (torch.bfloat16, True)])
def test_same_bits_as_without_the_fusion(rewrites, dtype, train_norms):
    """An fp32 model under bf16 autocast (the residual stream fp32, the blocks' outputs bf16: the add
    promotes) and a bf16 model with trained norm weights: same loss and gradients, bit for bit, with
    and without the fusion; every residual add before a norm fused in the forward, and every gradient
    sum in the backward."""
    loss_on, grads_on, report = _step({}, dtype, train_norms)
    assert rewrites == [(4, 0), (0, 3)], rewrites  # forward graph, then backward graph
    loss_off, grads_off, report_off = _step({"add_rms_norm": False}, dtype, train_norms)
    assert rewrites[2:] == []  # off: no pass
    assert report_off.count("add_rms_norm") == 0 and report.count("rms_norm") == report_off.count("rms_norm") == 5
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 0
    if train_norms:
        assert any("norm" in name for name in grads_on)
    for name in grads_off:
        assert torch.equal(grads_on[name], grads_off[name]), name

    # The sites: every norm after a residual add (all but the first layer's input norm); the final
    # norm's sum has no other use, so its backward has no gradient sum to fuse
    assert report.modules("add_rms_norm") == [
        m for m in report.modules("rms_norm") if not m.endswith("layers.0.input_layernorm")
    ]
    variants = [s.variant for s in report.fused["add_rms_norm"]]
    assert variants == [fusion.BOTH] * 3 + [fusion.FORWARD_ONLY]
    assert not [n for n in report.notes if "add_rms_norm" in n], report.notes
    assert "fused add_rms_norm: 4 sites" in str(report)


def test_a_mismatch_is_reported(rewrites, monkeypatch):
    """If the backward graph does not hold the expected form, the report says how many were fused."""
    monkeypatch.setattr(fusion, "fuse_backward", lambda graph: 0)
    _, _, report = _step({})
    assert rewrites == [(4, 0), (0, 0)]
    assert any("add_rms_norm: 0 of the 3 gradient sums fused in the backward graph" in n for n in report.notes), report.notes


def test_other_inner_compilers_say_why():
    _, _, report = _step({"inner": "aot_eager"})
    assert report.count("add_rms_norm") == 0 and not [s for s in report.skipped if s.fusion == "add_rms_norm"]
    assert ("graph 0: add_rms_norm not applied with inner='aot_eager': it rewrites Inductor's post-grad graphs; "
            "4 residual adds before a fused norm are left to aot_eager") in report.notes, report.notes


class _BroadcastResidual(torch.nn.Module):
    """A norm of ``x + bias``: the add broadcasts, so it is not a residual add of one shape."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(32))
        self.bias = torch.nn.Parameter(torch.zeros(32))

    def forward(self, x, r):
        return llama_rms_norm(x + r, self.weight, 1e-6) + llama_rms_norm(x + self.bias, self.weight, 1e-6)


def test_broadcasting_add_is_skipped(rewrites):
    report = slothc.Report()
    torch._dynamo.reset()
    module = _BroadcastResidual().to(DEVICE)
    compiled = torch.compile(module, backend="slothc", options={"report": report})
    x, r = (torch.randn(3, 5, 32, device=DEVICE, requires_grad=True) for _ in range(2))
    out = compiled(x, r)
    out.sum().backward()
    expected = module(x.detach(), r.detach())
    torch.testing.assert_close(out, expected)
    torch._dynamo.reset()
    assert report.count("rms_norm") == 2 and report.count("add_rms_norm") == 1
    assert [s.reason for s in report.skipped if s.fusion == "add_rms_norm"] == [fusion.BROADCAST]
    # x + r's sum has no other use (forward only); the broadcast add is left to Inductor
    assert rewrites == [(1, 0), (0, 0)]


def test_slothc_ops_are_inductor_fallbacks_before_inductor_meets_them(rewrites):
    """Every slothc op has its fallback lowering once a graph is compiled with Inductor (torch 2.11's
    implicit fallback would print the IR of an op's arguments first: minutes for add_rms_norm)."""
    from torch._inductor import lowering

    _step({})
    ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("slothc::")]
    assert "slothc::add_rms_norm" in ops and "slothc::add_rms_norm_backward" in ops
    for name in ops:
        packet = getattr(torch.ops.slothc, name.split("::", 1)[1])
        assert all(getattr(packet, o) in lowering.lowerings for o in packet.overloads()), name


def test_checkpointed_layers(rewrites):
    """Inside checkpointed layers: the same bits as without the fusion, and the adds whose norm is in
    the next layer's graph (found only once AOTAutograd inlines the layers) said in a note."""
    loss_on, grads_on, report = _step({}, checkpointing=True)
    loss_off, grads_off, _ = _step({"add_rms_norm": False}, checkpointing=True)
    assert torch.equal(loss_on, loss_off) and grads_on.keys() == grads_off.keys()
    assert all(torch.equal(grads_on[n], grads_off[n]) for n in grads_off)
    sites = report.count("add_rms_norm")
    assert sites >= 1 and sum(f for f, _ in rewrites) > sites, (sites, rewrites, str(report))
    assert any("reported as sites: the others crossed the boundary of a nested graph" in n for n in report.notes), report.notes
