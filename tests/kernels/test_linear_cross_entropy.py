"""slothc::linear_cross_entropy against the causal-LM loss as Hugging Face models compute it, and float64.

``hf_causal_lm_loss`` below is the eager code: the lm_head, Cohere's logit scale or Gemma 2's final
softcap, then ``ForCausalLMLoss``'s fp32 cross entropy (``test_eager_matches_transformers`` pins it
to transformers' own loss and to tiny Gemma 2 / Cohere / Granite models). Properties draw shapes,
dtypes, reductions, ignore patterns, label smoothing, scale, softcap, bias, given logits, which
parameters train, and small forced chunks; every case checks the loss and every gradient with
``slothc.testing.check_against_eager``.
"""

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import slothc.ops
from slothc import testing
from slothc.kernels import _launch
from slothc.kernels import linear_cross_entropy as lce_module
from tests.helpers import count_calls

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (max tokens, max hidden size, max vocabulary) drawn by the properties: small under the
# interpreter (the ci profile), real-ish on a GPU.
SIZES = {"ci": (24, 40, 200), "gpu": (2048, 512, 8192)}[testing.profile_name()]


# --------------------------------------------------------------------------------------------
# Eager spelling
# --------------------------------------------------------------------------------------------


def hf_final_logits(hidden, weight, bias, logit_scale=1.0, softcap=0.0):
    """``lm_head`` then Cohere's ``logits * logit_scale`` (Granite: ``/ logits_scaling``) and Gemma 2's
    ``final_logit_softcapping``, each step in the model's dtype."""
    logits = F.linear(hidden, weight, bias)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap != 0.0:
        logits = logits / softcap
        logits = torch.tanh(logits)
        logits = logits * softcap
    return logits


def hf_causal_lm_loss(
    hidden, weight, bias, labels, ignore_index=-100, reduction="mean", label_smoothing=0.0, logit_scale=1.0, softcap=0.0
):
    """The loss of a Hugging Face causal LM on already-shifted labels (``ForCausalLMLoss``)."""
    logits = hf_final_logits(hidden, weight, bias, logit_scale, softcap)
    logits = logits.float()
    vocab_size = logits.shape[-1]
    return F.cross_entropy(
        logits.view(-1, vocab_size), labels.view(-1),
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )


@contextlib.contextmanager
def forced_chunk_rows(rows):
    """Make the op split its tokens into chunks of ``rows`` (None: the heuristic)."""
    if rows is None:
        yield
        return
    with mock.patch.object(lce_module, "chunk_rows", lambda n_rows, vocab, dtype, compute_dw: rows):
        yield


def fused_loss(give_logits=False, chunk=None, **kw):
    """``slothc.ops.linear_cross_entropy`` with the same arguments as ``hf_causal_lm_loss``; with
    ``give_logits`` it is passed eager's final logits of the same inputs (as the graph pass does
    when the model returns them; they stay in the autograd graph)."""
    def loss(hidden, weight, bias, labels):
        logits = None
        if give_logits:
            logits = hf_final_logits(hidden, weight, bias, kw.get("logit_scale", 1.0), kw.get("softcap", 0.0))
        with forced_chunk_rows(chunk):
            return slothc.ops.linear_cross_entropy(hidden, weight, labels, bias, logits=logits, **kw)

    return loss


def eager_loss(**kw):
    return lambda hidden, weight, bias, labels: hf_causal_lm_loss(hidden, weight, bias, labels, **kw)


def test_eager_matches_transformers():
    """``hf_causal_lm_loss`` is transformers' ``ForCausalLMLoss`` (mean, and sum over
    ``num_items_in_batch``), and with scale / softcap the loss of tiny Cohere, Granite and Gemma 2
    models from their final hidden states."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from slothc.tiny import sample_batch, tiny_model

    hidden = testing.make_tensor((2, 5, 16), torch.float32, 1)
    weight = testing.make_tensor((50, 16), torch.float32, 2)
    labels = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(3))
    labels[0, :2] = -100
    logits = F.linear(hidden, weight)
    expected = ForCausalLMLoss(logits, None, 50, shift_labels=labels)
    assert torch.equal(hf_causal_lm_loss(hidden, weight, None, labels), expected)
    n_items = (labels != -100).sum()
    expected = ForCausalLMLoss(logits, None, 50, num_items_in_batch=n_items, shift_labels=labels)
    assert torch.equal(hf_causal_lm_loss(hidden, weight, None, labels, reduction="sum") / n_items, expected)

    # arch: the (logit_scale, softcap) its config gives
    cases = {
        "cohere": lambda c: (c.logit_scale, 0.0),
        "granite": lambda c: (1.0 / c.logits_scaling, 0.0),
        "gemma2": lambda c: (1.0, c.final_logit_softcapping),
    }
    for arch, params in cases.items():
        model = tiny_model(arch, layers=1, **({"logits_scaling": 4.0} if arch == "granite" else {})).eval()
        batch = sample_batch(model.config, batch=2, seq=8)
        logit_scale, softcap = params(model.config)
        assert (logit_scale, softcap) != (1.0, 0.0), arch
        with torch.no_grad():
            out = model(**batch)
            shifted = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            loss = hf_causal_lm_loss(hidden, model.lm_head.weight, None, shifted,
                                     logit_scale=logit_scale, softcap=softcap)
            fused = slothc.ops.linear_cross_entropy(hidden, model.lm_head.weight, shifted,
                                                    logit_scale=logit_scale, softcap=softcap)
        # Granite divides where the spelling multiplies by the reciprocal: equal up to fp32 rounding.
        torch.testing.assert_close(loss, out.loss, msg=arch)
        torch.testing.assert_close(fused, out.loss, msg=arch)


def test_reference_is_the_eager_spelling():
    """``linear_cross_entropy_reference`` (the module's spec) computes exactly ``hf_causal_lm_loss``."""
    for dtype in (torch.float32, torch.bfloat16):
        hidden = testing.make_tensor((6, 12), dtype, 4)
        weight = testing.make_tensor((30, 12), dtype, 5)
        bias = testing.make_tensor((30,), dtype, 6)
        labels = torch.tensor([3, 7, 29, 0, 7, 12])
        kw = dict(ignore_index=7, reduction="mean", label_smoothing=0.1, logit_scale=0.25, softcap=2.0)
        expected = hf_causal_lm_loss(hidden, weight, bias, labels, **kw)
        assert torch.equal(lce_module.linear_cross_entropy_reference(hidden, weight, bias, labels, **kw), expected)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

IGNORE_PATTERNS = ("none", "some", "all")


def _labels(n_rows, vocab, ignore_index, pattern, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n_rows,), generator=g)
    if pattern == "some":
        labels[torch.rand(n_rows, generator=g) < 0.4] = ignore_index
    elif pattern == "all":
        labels[:] = ignore_index
    return labels.to(device)


@st.composite
def lce_cases(draw):
    max_rows, max_hidden, max_vocab = SIZES
    n_rows = draw(st.integers(1, max_rows))
    # Which parameters train: LoRA (hidden only), full fine-tuning of the lm_head, lm_head only.
    hidden_grad, weight_grad = draw(st.sampled_from([(True, False), (True, True), (False, True)]))
    return dict(
        n_rows=n_rows,
        batch=draw(st.sampled_from([None] + [b for b in (1, 2, 3) if n_rows % b == 0])),  # None: [N, H]
        # Tiny H or V leave too few independent roundings for the ratio criterion: dx_h sums
        # g_v w_vh with sum_v g_v = 0, so with V = 2 every dx element carries the one rounding
        # error of g_0, and the op rounds g where eager does not (unscaled by grad_output; in
        # fp32 through the softcap): whichever is luckier on that one rounding wins, by any
        # ratio. test_tiny_shapes covers them where the roundings are placed alike.
        hidden_size=draw(st.integers(2, max_hidden)),
        vocab=draw(st.integers(8, max_vocab)),
        dtype=draw(testing.dtypes()),
        reduction=draw(st.sampled_from(["mean", "sum"])),
        ignore=draw(st.sampled_from(IGNORE_PATTERNS)),
        ignore_index=draw(st.sampled_from([-100, 0, 7])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        logit_scale=draw(st.sampled_from([1.0, 0.25])),
        softcap=draw(st.sampled_from([0.0, 2.0])),  # |z| ~ 4 at spread 4: tanh saturates often
        spread=draw(st.sampled_from([1.0, 4.0])),  # std of the logits
        bias=draw(st.booleans()),
        give_logits=draw(st.booleans()),
        hidden_grad=hidden_grad,
        weight_grad=weight_grad,
        layout=draw(st.sampled_from(["contiguous", "transposed"])),
        chunk=draw(st.one_of(st.none(), st.integers(1, 5))),
        seed=draw(testing.seeds()),
    )


def _inputs(case):
    n, h, v, dtype, seed = case["n_rows"], case["hidden_size"], case["vocab"], case["dtype"], case["seed"]
    hidden = testing.make_tensor(
        (n, h), dtype, seed, layout=case["layout"], device=DEVICE, requires_grad=case["hidden_grad"]
    )
    # Logits hidden @ W^T with standard deviation ~ spread.
    weight = testing.make_tensor(
        (v, h), dtype, seed + 1, device=DEVICE, scale=case["spread"] / h**0.5, requires_grad=case["weight_grad"]
    )
    bias = None
    if case["bias"]:
        bias = testing.make_tensor((v,), dtype, seed + 2, device=DEVICE, requires_grad=case["weight_grad"])
    labels = _labels(n, v, case["ignore_index"], case["ignore"], seed + 3)
    if case["batch"]:  # [B, T, H] hidden and [B, T] labels, as a model passes them (the wrapper flattens)
        b = case["batch"]
        hidden = hidden.detach().reshape(b, n // b, h).requires_grad_(case["hidden_grad"])
        labels = labels.reshape(b, n // b)
    return hidden, weight, bias, labels


def _options(case):
    return {k: case[k] for k in ("ignore_index", "reduction", "label_smoothing", "logit_scale", "softcap")}


@given(lce_cases())
def test_linear_cross_entropy_matches_eager(case):
    """The loss and the gradient of every input that requires grad within the ratio criterion of
    eager (grad_output drawn at random, so not 1)."""
    hidden, weight, bias, labels = _inputs(case)
    opts = _options(case)
    testing.check_against_eager(
        fused_loss(case["give_logits"], case["chunk"], **opts), eager_loss(**opts), hidden, weight, bias, labels,
        seed=case["seed"],
    )


@given(lce_cases())
def test_rows_match_reference(case):
    """One chunk's row math (the Triton kernel where it runs) against its plain-torch twin in the
    same precision and in float64: the per-row loss and the whole [C, V] gradient, which the
    loss-level property sees only through the matmuls."""
    n, v, dtype = case["n_rows"], case["vocab"], case["dtype"]
    z = testing.make_tensor((n, v), dtype, case["seed"], device=DEVICE, scale=case["spread"])
    if case["give_logits"]:  # final logits: scaled and capped (|z| < softcap) as a model's are
        z = lce_module.final_logits_reference(z, case["logit_scale"], case["softcap"])
    labels = _labels(n, v, case["ignore_index"], case["ignore"], case["seed"] + 3)
    grad_scale = torch.tensor([0.3], device=DEVICE) if case["reduction"] == "mean" else None
    args = (case["ignore_index"], case["label_smoothing"], case["logit_scale"], case["softcap"], case["give_logits"])

    def run(fn, z):
        loss = torch.empty(n, dtype=torch.promote_types(z.dtype, torch.float32), device=DEVICE)
        g = torch.empty_like(z)
        fn(z.clone(), g, labels, loss, grad_scale, *args)
        return loss, g

    use_kernel = _launch.use_triton(z)
    rows = lce_module.linear_cross_entropy_rows if use_kernel else lce_module.linear_cross_entropy_rows_reference
    loss, g = run(rows, z)
    expected_loss, expected_g = run(lce_module.linear_cross_entropy_rows_reference, z)
    loss64, g64 = run(lce_module.linear_cross_entropy_rows_reference, z.double())
    low = torch.bfloat16 if dtype == torch.bfloat16 else None
    testing.assert_matches_reference(loss, expected_loss, loss64, name="row loss", low_dtype=low, fp32_close=False)
    testing.assert_matches_reference(g, expected_g, g64, k=3.0, name="g", low_dtype=low, fp32_close=False)


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_all_ignored(reduction, label_smoothing):
    """Every label ignored: mean is 0 / 0 = NaN, sum is 0, and the gradients are zero, as eager."""
    hidden = testing.make_tensor((5, 8), torch.bfloat16, 7, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((20, 8), torch.bfloat16, 8, device=DEVICE, requires_grad=True)
    labels = torch.full((5,), -100, device=DEVICE)
    opts = dict(reduction=reduction, label_smoothing=label_smoothing)
    testing.check_against_eager(fused_loss(chunk=2, **opts), eager_loss(**opts), hidden, weight, None, labels)
    loss = slothc.ops.linear_cross_entropy(hidden, weight, labels, **opts)
    assert torch.isnan(loss) if reduction == "mean" else loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden_size, vocab", [(1, 2), (1, 5), (3, 2), (2, 7)])
def test_tiny_shapes(hidden_size, vocab, dtype):
    """H = 1 or V < 8 (left out of the properties): the loss with every option against eager, and
    the gradients where the op rounds g where eager does (a sum, grad_output = 1, no scale or
    softcap: eager's fp32 gradient of the logits rounded once to their dtype, like the op's g)."""
    hidden = testing.make_tensor((6, hidden_size), dtype, 55, device=DEVICE)
    weight = testing.make_tensor((vocab, hidden_size), dtype, 56, device=DEVICE, scale=2.0)
    bias = testing.make_tensor((vocab,), dtype, 57, device=DEVICE)
    labels = _labels(6, vocab, -100, "some", 58)
    opts = dict(label_smoothing=0.1, softcap=2.0, logit_scale=0.25)
    for give_logits in (False, True):
        testing.check_against_eager(fused_loss(give_logits, 4, **opts), eager_loss(**opts), hidden, weight, bias, labels)
    opts = dict(reduction="sum", label_smoothing=0.1)
    args = (hidden.requires_grad_(True), weight.requires_grad_(True), bias.requires_grad_(True), labels)
    if dtype != torch.float32:
        testing.check_against_eager(fused_loss(chunk=4, **opts), eager_loss(**opts), *args, grad_outputs=torch.tensor(1.0))
        return
    # fp32: with V = 2, dx = g_0 (w_0 - w_1) cancels, and its error is the one rounding of g_0 that
    # either side happens to get (seen: the kernel's g_0 0.64 ulp off, eager's 0.37 ulp): a ratio
    # of two single roundings measures luck. Both must be within fp32's own tolerance instead.
    fused = fused_loss(chunk=4, **opts)(*args)
    fused_grads = torch.autograd.grad(fused, args[:3])
    eager = eager_loss(**opts)(*args)
    eager_grads = torch.autograd.grad(eager, args[:3])
    torch.testing.assert_close(fused, eager)
    for got, want in zip(fused_grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_one_token():
    hidden = testing.make_tensor((1, 9), torch.float16, 9, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((33, 9), torch.float16, 10, device=DEVICE, requires_grad=True)
    labels = torch.tensor([32], device=DEVICE)
    testing.check_against_eager(fused_loss(), eager_loss(), hidden, weight, None, labels)


def test_no_tokens():
    hidden = torch.zeros((0, 8), device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((20, 8), torch.float32, 11, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    for reduction in ("mean", "sum"):
        fused = slothc.ops.linear_cross_entropy(hidden, weight, labels, reduction=reduction)
        eager = hf_causal_lm_loss(hidden, weight, None, labels, reduction=reduction)
        torch.testing.assert_close(fused, eager, equal_nan=True)
    fused.backward()
    assert hidden.grad.shape == (0, 8) and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("give_logits", [False, True])
@pytest.mark.parametrize("bad", [20, -1, 1000])
def test_label_out_of_range(bad, give_logits):
    """Eager raises on a label outside [0, V) that is not ignore_index; so does the op (on the CPU,
    a ValueError naming the label and V; on CUDA an async device assert)."""
    if DEVICE.type == "cuda":
        pytest.skip("a device-side assert (eager's and the op's) would poison the CUDA context of the session")
    hidden = testing.make_tensor((4, 8), torch.float32, 12, device=DEVICE)
    weight = testing.make_tensor((20, 8), torch.float32, 13, device=DEVICE)
    labels = torch.tensor([1, -100, bad, 3], device=DEVICE)
    logits = F.linear(hidden, weight) if give_logits else None
    with pytest.raises(IndexError):
        hf_causal_lm_loss(hidden, weight, None, labels)
    with pytest.raises(ValueError, match=rf"label {bad} is outside \[0, 20\).*ignore_index=-100"):
        slothc.ops.linear_cross_entropy(hidden, weight, labels, logits=logits)


def test_invalid_inputs():
    f32 = dict(dtype=torch.float32, device=DEVICE)
    hidden, weight = torch.zeros(4, 8, **f32), torch.zeros(20, 8, **f32)
    labels = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    op = torch.ops.slothc.linear_cross_entropy

    def call(hidden=hidden, weight=weight, bias=None, labels=labels, logits=None, reduction="mean", smoothing=0.0):
        return op(hidden, weight, bias, labels, logits, -100, reduction, smoothing, 1.0, 0.0, True, True)

    cases = [
        (dict(weight=weight.bfloat16()), "weight dtype"),
        (dict(bias=torch.zeros(20, dtype=torch.float16, device=DEVICE)), "bias dtype"),
        (dict(bias=torch.zeros(21, **f32)), "bias shape"),
        (dict(logits=torch.zeros(4, 20, dtype=torch.bfloat16, device=DEVICE)), "logits dtype"),
        (dict(logits=torch.zeros(4, 21, **f32)), "logits shape"),
        (dict(weight=torch.zeros(20, 7, **f32)), "does not match hidden"),
        (dict(hidden=torch.zeros(2, 2, 8, **f32)), r"hidden must be \[N, H\]"),
        (dict(labels=labels.float()), "integer"),
        (dict(labels=labels[:3]), "labels shape"),
        (dict(reduction="none"), "reduction 'none'"),
        (dict(smoothing=1.5), "label_smoothing"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**kwargs)


def test_logits_are_not_modified():
    hidden = testing.make_tensor((7, 8), torch.bfloat16, 14, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((40, 8), torch.bfloat16, 15, device=DEVICE, requires_grad=True)
    labels = _labels(7, 40, -100, "some", 16)
    logits = F.linear(hidden, weight).detach()
    before = logits.clone()
    with forced_chunk_rows(3):
        slothc.ops.linear_cross_entropy(hidden, weight, labels, logits=logits, softcap=2.0).backward()
    assert torch.equal(logits, before)


@pytest.mark.parametrize("give_logits", [False, True])
def test_non_unit_grad_output(give_logits):
    """``(loss * 0.37).backward()``: the saved gradients are scaled by grad_output."""
    hidden = testing.make_tensor((9, 16), torch.float32, 17, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((50, 16), torch.float32, 18, device=DEVICE, scale=0.5, requires_grad=True)
    bias = testing.make_tensor((50,), torch.float32, 19, device=DEVICE, requires_grad=True)
    labels = _labels(9, 50, -100, "some", 20)
    opts = dict(label_smoothing=0.1, softcap=2.0, logit_scale=0.25)
    fused, eager = fused_loss(give_logits, 4, **opts), eager_loss(**opts)
    testing.check_against_eager(
        lambda *a: fused(*a) * 0.37, lambda *a: eager(*a) * 0.37, hidden, weight, bias, labels,
        grad_outputs=torch.tensor(1.0),
    )
    testing.check_against_eager(fused, eager, hidden, weight, bias, labels, grad_outputs=torch.tensor(-2.5))


def test_inference_computes_no_gradients(monkeypatch):
    """Under no_grad / inference_mode, or with nothing requiring grad, the op runs with
    compute_grad=False: loss only, no [C, V] gradient, empty dx/dw/db."""
    seen = []
    original = lce_module.linear_cross_entropy_fwd

    def spy(*args, **kwargs):
        seen.append(args[10:12])  # compute_grad, compute_dw
        return original(*args, **kwargs)

    monkeypatch.setattr(lce_module, "linear_cross_entropy_fwd", spy)
    hidden = testing.make_tensor((6, 8), torch.bfloat16, 21, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((30, 8), torch.bfloat16, 22, device=DEVICE, requires_grad=True)
    labels = _labels(6, 30, -100, "some", 23)
    expected = hf_causal_lm_loss(hidden, weight, None, labels)
    with torch.no_grad():
        a = slothc.ops.linear_cross_entropy(hidden, weight, labels)
    with torch.inference_mode():
        b = slothc.ops.linear_cross_entropy(hidden, weight, labels)
    c = slothc.ops.linear_cross_entropy(hidden.detach(), weight.detach(), labels, logits=F.linear(hidden, weight).detach())
    assert seen == [(False, False)] * 3
    for loss in (a, b, c):
        assert not loss.requires_grad
        torch.testing.assert_close(loss, expected.detach(), rtol=2e-2, atol=1e-5)
    out = torch.ops.slothc.linear_cross_entropy(hidden.detach(), weight.detach(), None, labels, None,
                                                -100, "mean", 0.0, 1.0, 0.0, False, True)
    assert [t.numel() for t in out[1:]] == [0, 0, 0]


def test_backward_without_computed_gradients_is_an_error():
    hidden = testing.make_tensor((6, 8), torch.float32, 24, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((30, 8), torch.float32, 25, device=DEVICE, requires_grad=True)
    labels = _labels(6, 30, -100, "none", 26)
    op = torch.ops.slothc.linear_cross_entropy
    loss = op(hidden, weight, None, labels, None, -100, "mean", 0.0, 1.0, 0.0, False, False)[0]
    with pytest.raises(RuntimeError, match="compute_grad=True"):
        loss.backward()
    loss = op(hidden, weight, None, labels, None, -100, "mean", 0.0, 1.0, 0.0, True, False)[0]
    with pytest.raises(RuntimeError, match="compute_dw=True"):
        loss.backward()
    # Only hidden requires grad: compute_dw=False is enough.
    loss = op(hidden, weight.detach(), None, labels, None, -100, "mean", 0.0, 1.0, 0.0, True, False)[0]
    loss.backward()
    assert hidden.grad is not None


def test_frozen_lm_head_skips_dw(monkeypatch):
    """A frozen lm_head (LoRA) reaches the op as compute_dw=False: no dW GEMMs."""
    calls = count_calls(monkeypatch, lce_module, ("_addmm_into", "_mm_into"))
    hidden = testing.make_tensor((7, 8), torch.bfloat16, 27, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((30, 8), torch.bfloat16, 28, device=DEVICE)
    labels = _labels(7, 30, -100, "some", 29)
    with forced_chunk_rows(3):
        slothc.ops.linear_cross_entropy(hidden, weight, labels).backward()
    assert calls == {"_mm_into": 3} and weight.grad is None and hidden.grad is not None


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("give_logits", [False, True])
def test_chunks_bound_memory(path, give_logits, monkeypatch):
    """With chunks of C rows no intermediate has more than C x V elements (nor N x H, V x H):
    the [N, V] logits, their fp32 copy and their gradient are never allocated, on either path."""
    if path == "kernel" and not _launch.use_triton(torch.empty(0, device=DEVICE)):
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")
    if path == "reference":
        monkeypatch.setattr(lce_module, "use_triton", lambda x: False)
    else:
        # A Triton kernel allocates nothing, but the interpreter copies each argument's whole
        # storage to "the device" (the caller's [N, V] logits included): keep that out of the count.
        launch = lce_module.linear_cross_entropy_rows

        def unrecorded(*args):
            with _disable_current_modes():
                return launch(*args)

        monkeypatch.setattr(lce_module, "linear_cross_entropy_rows", unrecorded)
    rows_calls = count_calls(monkeypatch, lce_module, ("linear_cross_entropy_rows", "linear_cross_entropy_rows_reference"))
    n, h, v, c = 20, 8, 40, 3
    hidden = testing.make_tensor((n, h), torch.bfloat16, 30, device=DEVICE)
    weight = testing.make_tensor((v, h), torch.bfloat16, 31, device=DEVICE)
    bias = testing.make_tensor((v,), torch.bfloat16, 32, device=DEVICE)
    labels = _labels(n, v, -100, "some", 33)
    logits = hf_final_logits(hidden, weight, bias, softcap=2.0) if give_logits else None
    mode = _LargestTensor()
    with mode:
        loss, dx, dw, db = lce_module.linear_cross_entropy_fwd(
            hidden, weight, bias, labels, logits, -100, "mean", 0.1, 1.0, 2.0, True, True, chunk_rows=c
        )
    assert mode.largest <= max(c * v, n * h, v * h) < n * v
    assert sum(rows_calls.values()) == -(-n // c)  # 7 chunks, the last of 2 rows
    expected = hf_causal_lm_loss(hidden, weight, bias, labels, label_smoothing=0.1, softcap=2.0)
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=1e-5)


def test_chunk_rows_heuristic():
    # 256 MiB of bf16 [C, V]: 1024 rows at Llama 3's vocabulary, 4x with dW.
    assert lce_module.chunk_rows(16384, 128256, torch.bfloat16, False) == 1024
    assert lce_module.chunk_rows(16384, 128256, torch.bfloat16, True) == 4096
    assert lce_module.chunk_rows(16384, 256000, torch.bfloat16, False) == 512
    assert lce_module.chunk_rows(16384, 128256, torch.float32, False) == 512
    # Never more than the rows; small problems take one chunk.
    assert lce_module.chunk_rows(100, 32000, torch.bfloat16, False) == 100
    assert lce_module.chunk_rows(0, 32000, torch.bfloat16, False) == 1
    # Balanced: as few chunks as the budget allows, of nearly equal size (1025 rows: 2 x 640, not
    # 1024 + 1), each a multiple of 128 rows.
    for n in (1025, 5000, 9999):
        rows = lce_module.chunk_rows(n, 128256, torch.bfloat16, False)
        assert rows % lce_module.CHUNK_ROW_MULTIPLE == 0 and rows < 1024 + lce_module.CHUNK_ROW_MULTIPLE
        assert -(-n // rows) == -(-n // 1024)
    assert lce_module.chunk_rows(1025, 128256, torch.bfloat16, False) == 640


def test_float64_takes_the_reference_rows(monkeypatch):
    calls = count_calls(monkeypatch, lce_module, ("linear_cross_entropy_rows", "linear_cross_entropy_rows_reference"))
    hidden = testing.make_tensor((5, 8), torch.float64, 34, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((30, 8), torch.float64, 35, device=DEVICE, requires_grad=True)
    labels = _labels(5, 30, -100, "some", 36)
    opts = dict(label_smoothing=0.1, softcap=2.0, logit_scale=0.25)
    fused = slothc.ops.linear_cross_entropy(hidden, weight, labels, **opts)
    # (hf_causal_lm_loss's .float() would make this fp32; the reference keeps float64.)
    expected = lce_module.linear_cross_entropy_reference(hidden, weight, None, labels, **opts)
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(fused, (hidden, weight))
    for got, want in zip(grads, torch.autograd.grad(expected, (hidden, weight))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert dict(calls) == {"linear_cross_entropy_rows_reference": 1}


def test_triton_path_runs(monkeypatch):
    """Where Triton is used (CUDA, or TRITON_INTERPRET=1 on CPU) the row math is the kernel, so
    the properties above test the kernel and not only the reference."""
    if not _launch.use_triton(torch.empty(0, device=DEVICE)):
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the reference path is the one under test")
    calls = count_calls(monkeypatch, lce_module, ("linear_cross_entropy_rows", "linear_cross_entropy_rows_reference"))
    hidden = testing.make_tensor((5, 8), torch.bfloat16, 37, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((30, 8), torch.bfloat16, 38, device=DEVICE, requires_grad=True)
    with forced_chunk_rows(2):
        slothc.ops.linear_cross_entropy(hidden, weight, _labels(5, 30, -100, "none", 39)).backward()
    assert dict(calls) == {"linear_cross_entropy_rows": 3}


# --------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "give_logits, compute_dw, has_bias, layout",
    [
        (False, False, False, "contiguous"),  # LoRA: frozen lm_head
        (False, True, True, "contiguous"),  # trained lm_head with a bias
        (True, False, False, "transposed"),  # the model's logits given
        (True, True, False, "padded"),
    ],
)
def test_opcheck(give_logits, compute_dw, has_bias, layout):
    n, h, v = 5, 6, 40
    hidden = testing.make_tensor((n, h), torch.bfloat16, 40, layout=layout, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((v, h), torch.bfloat16, 41, device=DEVICE, requires_grad=compute_dw)
    bias = testing.make_tensor((v,), torch.bfloat16, 42, device=DEVICE, requires_grad=compute_dw) if has_bias else None
    labels = _labels(n, v, -100, "some", 43)
    logits = F.linear(hidden, weight, bias).detach() if give_logits else None
    args = (hidden, weight, bias, labels, logits, -100, "mean", 0.1, 1.0, 2.0, True, compute_dw)
    torch.library.opcheck(torch.ops.slothc.linear_cross_entropy.default, args)
    # Inference: nothing requires grad, loss only.
    labels = _labels(n, v, 7, "some", 44)
    bias = bias.detach() if has_bias else None
    args = (hidden.detach(), weight.detach(), bias, labels, None, 7, "sum", 0.0, 0.25, 0.0, False, False)
    torch.library.opcheck(torch.ops.slothc.linear_cross_entropy.default, args)


def test_compiles_with_fullgraph():
    """The wrapper traces into one graph (fake registered, no graph breaks) and trains through it."""
    hidden = testing.make_tensor((2, 3, 8), torch.float32, 44, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((30, 8), torch.float32, 45, device=DEVICE, requires_grad=True)
    labels = _labels(6, 30, -100, "some", 46).reshape(2, 3)
    compiled = torch.compile(
        lambda hidden, weight, labels: slothc.ops.linear_cross_entropy(hidden, weight, labels, softcap=3.0),
        backend="aot_eager", fullgraph=True,
    )
    testing.check_against_eager(
        lambda h, w, b, y: compiled(h, w, y), eager_loss(softcap=3.0), hidden, weight, None, labels
    )


# --------------------------------------------------------------------------------------------
# Real sizes (GPU only)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("vocab, softcap", [(32000, 0.0), (128256, 0.0), (256000, 30.0)])
def test_real_sizes(vocab, softcap):
    # (The float64 reference holds several [2048, V] float64 tensors: ~20 GB at V = 256000.)
    hidden = testing.make_tensor((2048, 1024), torch.bfloat16, 47, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((vocab, 1024), torch.bfloat16, 48, device=DEVICE, scale=1024**-0.5,
                                 requires_grad=True)
    labels = _labels(2048, vocab, -100, "some", 49)
    opts = dict(softcap=softcap)
    # 768-row chunks: 2048 rows make two full chunks and a short one.
    testing.check_against_eager(fused_loss(chunk=768, **opts), eager_loss(**opts), hidden, weight, None, labels)


@pytest.mark.gpu
def test_peak_memory_below_eager():
    """The point of the op: far less memory than eager's [N, V] logits + fp32 copy + gradients."""
    n, h, v = 8192, 2048, 128256
    hidden = testing.make_tensor((n, h), torch.bfloat16, 50, device=DEVICE, requires_grad=True)
    weight = testing.make_tensor((v, h), torch.bfloat16, 51, device=DEVICE, scale=h**-0.5)
    labels = _labels(n, v, -100, "some", 52)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(hidden, weight, None, labels).backward()
        torch.cuda.synchronize()
        hidden.grad = None
        return torch.cuda.max_memory_allocated() - base

    fused, eager = peak(fused_loss()), peak(eager_loss())
    assert fused < eager / 4, (fused, eager)
