"""slothc::cross_entropy (the loss on logits the model returns anyway) against eager and float64.

Eager is ``ForCausalLMLoss``'s tail: ``F.cross_entropy(logits.float(), labels, ...)``, divided by
``num_items_in_batch`` for gradient accumulation. Properties draw rows, vocabularies that are not a
multiple of the kernel's block, dtypes, layouts, reductions, ignore patterns and label smoothing;
the loss and the logits' gradient (with a random ``grad_output``, as a loss scale gives) are checked
with ``slothc.testing.check_against_eager``.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import slothc.kernels.cross_entropy as ce_module
from slothc import testing
from tests.helpers import count_calls

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = {"ci": (24, 160), "gpu": (4096, 50000)}[testing.profile_name()]


def eager_loss(logits, labels, divisor, ignore_index, reduction, label_smoothing):
    loss = F.cross_entropy(
        logits.float(), labels, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    return loss / divisor if divisor is not None else loss


def fused_loss(logits, labels, divisor, ignore_index, reduction, label_smoothing):
    grad = torch.is_grad_enabled() and logits.requires_grad
    return torch.ops.slothc.cross_entropy(logits, labels, divisor, ignore_index, reduction, label_smoothing, grad)[0]


def _labels(n_rows, vocab, ignore, ignore_index, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n_rows,), generator=g)
    if ignore == "all":
        labels[:] = ignore_index
    elif ignore == "some":
        labels[torch.rand(n_rows, generator=g) < 0.3] = ignore_index
    return labels.to(DEVICE)


@st.composite
def cases(draw):
    max_rows, max_vocab = SIZES
    return dict(
        n_rows=draw(st.integers(1, max_rows)),
        vocab=draw(st.integers(2, max_vocab)),
        dtype=draw(testing.dtypes()),
        layout=draw(st.sampled_from(["contiguous", "padded", "transposed"])),
        reduction=draw(st.sampled_from(["mean", "sum", "sum_divided"])),
        ignore=draw(st.sampled_from(["none", "some", "all"])),
        ignore_index=draw(st.sampled_from([-100, 0])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        scale=draw(st.sampled_from([1.0, 8.0])),
        seed=draw(testing.seeds()),
    )


@given(cases())
def test_matches_eager_and_float64(case):
    logits = testing.make_tensor(
        (case["n_rows"], case["vocab"]), case["dtype"], case["seed"], layout=case["layout"], device=DEVICE,
        scale=case["scale"], requires_grad=True,
    )
    labels = _labels(case["n_rows"], case["vocab"], case["ignore"], case["ignore_index"], case["seed"])
    reduction = "sum" if case["reduction"] == "sum_divided" else case["reduction"]
    divisor = torch.tensor(float(case["n_rows"] + 3), device=DEVICE) if case["reduction"] == "sum_divided" else None
    args = (labels, divisor, case["ignore_index"], reduction, case["label_smoothing"])
    if case["ignore"] == "all" and reduction == "mean":
        loss = fused_loss(logits, *args)
        assert torch.isnan(loss) and torch.isnan(eager_loss(logits, *args))  # 0 / 0, as eager
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.all(grad == 0)  # eager's gradient is zero there too
        return
    testing.check_against_eager(fused_loss, eager_loss, logits, *args, seed=case["seed"])


def test_fp16_gradient_survives_a_loss_scale():
    """fp16 with a large loss scale: g / n_valid would underflow fp16 in the forward; eager multiplies
    by the loss scale (grad_output) first. The kept gradient is fp32 (``grad_dtype``), so it matches."""
    n_rows, vocab = 64, 50
    logits = testing.make_tensor((n_rows, vocab), torch.float16, 3, device=DEVICE, scale=12.0, requires_grad=True)
    labels = _labels(n_rows, vocab, "none", -100, 3)
    args = (labels, None, -100, "mean", 0.0)
    loss_scale = torch.tensor(2.0**16, device=DEVICE)
    testing.check_against_eager(fused_loss, eager_loss, logits, *args, grad_outputs=loss_scale)


def test_label_out_of_range_is_a_clear_error():
    if DEVICE.type == "cuda":
        pytest.skip("CUDA checks labels asynchronously (device assert)")
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="outside"):
        fused_loss(logits, torch.tensor([1, 2, 10, -100]), None, -100, "mean", 0.0)


def test_bad_arguments_name_what_to_change():
    logits = torch.randn(4, 10, device=DEVICE)
    labels = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="reduction"):
        fused_loss(logits, labels, None, -100, "none", 0.0)
    with pytest.raises(ValueError, match="integer"):
        fused_loss(logits, labels.float(), None, -100, "mean", 0.0)
    with pytest.raises(ValueError, match="divisor"):
        fused_loss(logits, labels, torch.tensor(3.0), -100, "mean", 0.0)
    with pytest.raises(ValueError, match=r"\[tokens, vocab\]"):
        fused_loss(logits[None], labels, None, -100, "mean", 0.0)


def test_backward_without_kept_gradient_says_which_flag():
    logits = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    labels = torch.zeros(4, dtype=torch.long, device=DEVICE)
    loss = torch.ops.slothc.cross_entropy(logits, labels, None, -100, "mean", 0.0, False)[0]
    with pytest.raises(RuntimeError, match="compute_grad=True"):
        loss.backward()


def test_torch_path_is_chunked(monkeypatch):
    """Off the Triton path the fp32 work is done a few rows at a time."""
    monkeypatch.setattr(ce_module, "use_triton", lambda x: False)
    monkeypatch.setattr(ce_module, "REFERENCE_CHUNK_BYTES", 4 * 10 * 3)  # 3 rows of 10
    calls = count_calls(monkeypatch, ce_module.lce, ("linear_cross_entropy_rows_reference",))
    logits = torch.randn(8, 10, requires_grad=True)
    labels = torch.randint(0, 10, (8,))
    testing.check_against_eager(fused_loss, eager_loss, logits, labels, None, -100, "mean", 0.0)
    assert calls["linear_cross_entropy_rows_reference"] == 3  # rows 0-2, 3-5, 6-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divided", [False, True])
def test_opcheck(dtype, divided):
    logits = testing.make_tensor((6, 37), dtype, 5, device=DEVICE, requires_grad=True)
    labels = _labels(6, 37, "some", -100, 5)
    divisor = torch.tensor(4.0, device=DEVICE) if divided else None
    reduction = "sum" if divided else "mean"
    torch.library.opcheck(torch.ops.slothc.cross_entropy.default, (logits, labels, divisor, -100, reduction, 0.1, True))
    # Inference (compute_grad=False keeps no gradient): nothing requires grad, loss only.
    args = (logits.detach(), labels, divisor, -100, reduction, 0.1, False)
    torch.library.opcheck(torch.ops.slothc.cross_entropy.default, args)
