"""The causal-LM loss pass: spellings that are fused (and into which op), and near-misses reported.

Graphs are captured from small functions written as transformers writes its loss (the ``eager``
functions call ``transformers.loss.loss_utils.ForCausalLMLoss`` itself), run through the slothc
passes and executed; the result must equal eager's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from slothc.passes import linear_cross_entropy as lce
from tests.passes._capture import capture, targets

V, H = 40, 16


def _inputs(seed=0, batch=2, seq=5, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (batch, seq), generator=g)
    labels[0, :2] = -100
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    return h, w, labels, b


def _fused(report):
    return report.fused.get("linear_cross_entropy", [])


def _run(fn, *args, options=None):
    report, graphs, out = capture(fn, *args, options=options)
    return report, graphs, out


def _ops(graphs):
    return [t for gm in graphs for t in targets(gm)]


def _assert_same_loss_and_grad(fn, h, *rest, options=None):
    """Compiled (slothc passes) vs eager: loss and dL/dh."""
    eager_out = fn(h, *rest)
    eager_loss = eager_out[0] if isinstance(eager_out, tuple) else eager_out
    (eager_dh,) = torch.autograd.grad(eager_loss, h)
    report, graphs, out = _run(fn, h, *rest, options=options)
    loss = out[0] if isinstance(out, tuple) else out
    (dh,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(dh, eager_dh)
    return report, graphs, out


# -- the transformers spellings ----------------------------------------------------------------------


def hf_loss(h, w, labels, b=None):
    logits = F.linear(h, w, b)
    return ForCausalLMLoss(logits, labels, vocab_size=V)


def hf_loss_and_logits(h, w, labels, b=None):
    logits = F.linear(h, w, b)
    return ForCausalLMLoss(logits, labels, vocab_size=V), logits


def test_loss_only_is_fused_from_the_hidden_states():
    h, w, labels, _ = _inputs()
    report, graphs, _ = _assert_same_loss_and_grad(hf_loss, h, w, labels)
    (site,) = _fused(report)
    assert site.variant == "hidden states"
    ops = _ops(graphs)
    assert torch.ops.slothc.linear_cross_entropy in ops
    assert F.linear not in ops and F.cross_entropy not in ops  # no logits left in the graph


def test_returned_logits_are_kept_and_the_loss_reads_them():
    h, w, labels, _ = _inputs()
    report, graphs, out = _assert_same_loss_and_grad(hf_loss_and_logits, h, w, labels)
    (site,) = _fused(report)
    assert site.variant == "logits"
    ops = _ops(graphs)
    assert torch.ops.slothc.cross_entropy in ops and F.cross_entropy not in ops
    torch.testing.assert_close(out[1], F.linear(h, w))


def test_drop_option_returns_empty_logits_and_never_builds_them():
    h, w, labels, _ = _inputs()
    report, graphs, out = _assert_same_loss_and_grad(hf_loss_and_logits, h, w, labels, options={"logits": "drop"})
    (site,) = _fused(report)
    assert site.variant == "hidden states, logits dropped"
    assert out[1].shape == (2, 5, 0)
    assert F.linear not in _ops(graphs)


def test_drop_keeps_logits_that_the_graph_itself_uses():
    def fn(h, w, labels):
        logits = F.linear(h, w)
        return ForCausalLMLoss(logits, labels, vocab_size=V) + logits.mean(), logits

    h, w, labels, _ = _inputs()
    report, _, out = _assert_same_loss_and_grad(fn, h, w, labels, options={"logits": "drop"})
    assert _fused(report)[0].variant == "logits"
    assert out[1].shape == (2, 5, V)


def test_bias_and_trainable_weight():
    h, w, labels, b = _inputs(bias=True)
    w.requires_grad_()
    b.requires_grad_()
    eager = hf_loss(h, w, labels, b)
    grads = torch.autograd.grad(eager, (h, w, b))
    report, _, out = _run(hf_loss, h, w, labels, b)
    assert _fused(report)[0].variant == "hidden states"
    torch.testing.assert_close(out, eager)
    for got, want in zip(torch.autograd.grad(out, (h, w, b)), grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "chain, variant",
    [
        (lambda x: x * 0.0625, "hidden states, scale 0.0625"),  # Cohere
        (lambda x: x / 8.0, "hidden states, scale 0.125"),  # Granite
        (lambda x: torch.tanh(x / 2.0) * 2.0, "hidden states, softcap 2"),  # Gemma 2
        (lambda x: 2.0 * torch.tanh(x * 0.5), "hidden states, softcap 2"),
        (lambda x: torch.tanh(x * 3.0 / 2.0) * 2.0, "hidden states, scale 3, softcap 2"),
    ],
    ids=["cohere_scale", "granite_divide", "gemma2_softcap", "softcap_reciprocal", "scale_then_softcap"],
)
def test_scale_and_soft_capping(chain, variant):
    def fn(h, w, labels):
        return ForCausalLMLoss(chain(F.linear(h, w)), labels, vocab_size=V)

    h, w, labels, _ = _inputs()
    report, _, _ = _assert_same_loss_and_grad(fn, h, w, labels)
    assert _fused(report)[0].variant == variant


def test_capping_with_mismatched_constants_reads_the_logits():
    def fn(h, w, labels):
        return ForCausalLMLoss(torch.tanh(F.linear(h, w) / 2.0) * 3.0, labels, vocab_size=V)

    h, w, labels, _ = _inputs()
    report, _, _ = _assert_same_loss_and_grad(fn, h, w, labels)
    assert _fused(report)[0].variant == "logits"  # not a soft-cap: fused as CE on the logits


def test_num_items_in_batch_division_is_folded():
    def fn(h, w, labels, n):
        return ForCausalLMLoss(F.linear(h, w), labels, vocab_size=V, num_items_in_batch=n)

    h, w, labels, _ = _inputs()
    report, graphs, _ = _assert_same_loss_and_grad(fn, h, w, labels, torch.tensor(13))
    assert _fused(report)[0].variant == "hidden states"
    report, graphs, _ = _assert_same_loss_and_grad(fn, h, w, labels, 13)  # an int: the division stays
    assert len(_fused(report)) == 1


def test_num_items_folded_into_the_kept_logits_op():
    def fn(h, w, labels, n):
        logits = F.linear(h, w)
        return ForCausalLMLoss(logits, labels, vocab_size=V, num_items_in_batch=n), logits

    h, w, labels, _ = _inputs()
    report, graphs, _ = _assert_same_loss_and_grad(fn, h, w, labels, torch.tensor(13))
    assert _fused(report)[0].variant == "logits"
    (gm,) = graphs
    (node,) = [n for n in gm.graph.nodes if n.target is torch.ops.slothc.cross_entropy]
    assert node.args[2] is not None  # the divisor is inside the op


def test_label_smoothing_and_other_ignore_index():
    def fn(h, w, labels):
        logits = F.linear(h, w).float()
        return F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=3, label_smoothing=0.1)

    h, w, labels, _ = _inputs()
    labels = labels.clamp(min=0)
    labels[1, 1:3] = 3
    report, _, _ = _assert_same_loss_and_grad(fn, h, w, labels)
    assert _fused(report)[0].variant == "hidden states"


def test_logits_to_keep_slice_of_the_hidden_states():
    def fn(h, w, labels):
        logits = F.linear(h[:, -3:, :], w)
        return ForCausalLMLoss(logits, labels[:, -3:], vocab_size=V)

    h, w, labels, _ = _inputs()
    report, _, _ = _assert_same_loss_and_grad(fn, h, w, labels)
    assert _fused(report)[0].variant == "hidden states"


def test_autocast_casts_inputs_to_the_lm_head_dtype():
    h, w, labels, _ = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = hf_loss(h, w, labels)
        report, graphs, out = _run(hf_loss, h, w, labels)
    assert _fused(report)[0].variant == "hidden states"
    (gm,) = graphs
    (node,) = [n for n in gm.graph.nodes if n.target is torch.ops.slothc.linear_cross_entropy]
    assert node.args[0].meta["example_value"].dtype == torch.bfloat16
    assert node.args[1].meta["example_value"].dtype == torch.bfloat16
    # eager rounds the logits to bf16 and soft-caps in bf16; the op is at least as close to fp32
    ref = F.cross_entropy(F.linear(h.double(), w.double()).view(-1, V), F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1))
    assert abs(out.item() - ref.item()) <= 2 * abs(eager.item() - ref.item()) + 1e-3


def test_logits_not_from_a_linear_use_the_logits_op():
    def fn(h, w, labels):
        logits = torch.einsum("btd,vd->btv", h, w)  # not a linear
        return ForCausalLMLoss(logits, labels, vocab_size=V)

    h, w, labels, _ = _inputs()
    report, _, _ = _assert_same_loss_and_grad(fn, h, w, labels)
    assert _fused(report)[0].variant == "logits"


def test_a_hand_written_linear_is_a_linear():
    def fn(h, w, labels):
        logits = h @ w.t()  # normalized to F.linear(h, w)
        return ForCausalLMLoss(logits, labels, vocab_size=V)

    h, w, labels, _ = _inputs()
    report, _, _ = _assert_same_loss_and_grad(fn, h, w, labels)
    assert _fused(report)[0].variant == "hidden states"


def test_lora_on_the_lm_head_reads_the_logits():
    def fn(h, w, labels, a, b):
        logits = F.linear(h, w) + F.linear(F.linear(h, a), b) * 2.0
        return ForCausalLMLoss(logits, labels, vocab_size=V)

    h, w, labels, _ = _inputs()
    a, b = torch.randn(4, H) * 0.1, torch.randn(V, 4) * 0.1
    report, _, _ = _assert_same_loss_and_grad(fn, h, w, labels, a, b)
    assert _fused(report)[0].variant == "logits"


# -- near-misses -------------------------------------------------------------------------------------


def _skips(report):
    return [s.reason for s in report.skipped if s.fusion == "linear_cross_entropy"]


@pytest.mark.parametrize(
    "loss, reason",
    [
        (lambda z, y: F.cross_entropy(z, y, weight=torch.ones(V)), lce.CLASS_WEIGHTS),
        (lambda z, y: F.cross_entropy(z, y, reduction="none").sum(), lce.REDUCTION_NONE),
        (lambda z, y: F.cross_entropy(z, F.one_hot(y.clamp(min=0), V).float()), lce.PROBABILITY_TARGETS),
    ],
    ids=["class_weights", "reduction_none", "probability_targets"],
)
def test_near_misses_are_reported_and_left_alone(loss, reason):
    def fn(h, w, labels):
        return loss(F.linear(h, w).float().view(-1, V), labels.view(-1))

    h, w, labels, _ = _inputs()
    labels = labels.clamp(min=0)
    report, graphs, out = _run(fn, h, w, labels)
    assert not _fused(report)
    assert _skips(report) == [reason]
    torch.testing.assert_close(out, fn(h, w, labels))


def test_class_dim_not_last_is_reported():
    def fn(h, w, labels):
        return F.cross_entropy(F.linear(h, w).float().transpose(1, 2), labels)

    h, w, labels, _ = _inputs()
    report, _, _ = _run(fn, h, w, labels)
    assert _skips(report) == [lce.NOT_2D]


def test_custom_loss_function_is_reported():
    def focal(logits, labels, vocab_size, **kwargs):  # a model.loss_function of one's own
        logp = F.log_softmax(logits.float().view(-1, vocab_size), -1)
        y = labels.view(-1).clamp(min=0)
        p = logp.gather(1, y[:, None]).squeeze(1)
        return -((1 - p.exp()) ** 2 * p).mean()

    def fn(h, w, labels):
        return focal(F.linear(h, w), labels, V)

    h, w, labels, _ = _inputs()
    report, _, out = _run(fn, h, w, labels)
    assert not _fused(report)
    (reason,) = _skips(report)
    assert reason.startswith(lce.CUSTOM_LOSS) and "log_softmax" in reason
    torch.testing.assert_close(out, fn(h, w, labels))


def test_other_upcasts_of_linears_are_not_reported():
    def fn(x, w):
        return torch.softmax(F.linear(x, w).float(), -1)  # e.g. a MoE router

    h, w, _, _ = _inputs()
    report, _, _ = _run(fn, h, w)
    assert not report.skipped


def test_fusion_can_be_disabled():
    h, w, labels, _ = _inputs()
    report, graphs, _ = _run(hf_loss, h, w, labels, options={"linear_cross_entropy": False})
    assert not _fused(report) and F.cross_entropy in _ops(graphs)
