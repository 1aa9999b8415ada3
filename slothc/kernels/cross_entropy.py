"""Cross-entropy on logits the graph already materialised: the ``slothc::cross_entropy`` custom op.

Hugging Face causal LMs return their logits, so the ``[tokens, vocab]`` logits exist whatever the
loss does. What eager adds on top of them for the loss is the waste: ``logits.float()`` (an fp32
copy), ``log_softmax`` (another fp32 tensor, kept for the backward), and in the backward two more
fp32 tensors and a cast back. This op computes, from the logits as they are (bf16/fp16/fp32)::

    loss = cross_entropy(logits.float(), labels, ignore_index, reduction, label_smoothing) [/ divisor]

row by row in fp32, and in the same pass the gradient w.r.t. the logits (assuming the loss's own
gradient is 1), written once in the logits' dtype (fp32 for fp16 logits: see ``grad_dtype``) and
kept for the backward, which only scales it.
Per row with label ``y`` (not ignored), ``lse = logsumexp(z)``, smoothing ``eps`` over ``V`` classes::

    loss_i = lse - (1 - eps) z_y - eps mean(z)
    g_i    = softmax(z) - (1 - eps) onehot(y) - eps / V            (ignored rows: loss 0, g 0)

``mean`` divides by the number of non-ignored rows (NaN loss and zero gradient when there are none,
as eager); ``sum`` by ``divisor`` when given (the ``loss / num_items_in_batch`` of gradient
accumulation, folded in so that the gradient is rounded to the logits' dtype once, as eager rounds
it). Memory: the gradient buffer (the logits' size, in their dtype) instead of eager's three fp32
copies; the fp32 work is one chunk of rows at a time.

The row math is ``slothc.kernels.linear_cross_entropy``'s (with the logits taken as final: no
scale, no soft-cap here, those stay in the graph): its Triton row kernel on CUDA (and under the
Triton interpreter), in one launch; its torch twin elsewhere, chunked over rows so that its fp32
temporaries stay small.
"""

from __future__ import annotations

from typing import Optional

import torch

from slothc.kernels import linear_cross_entropy as lce
from slothc.kernels._launch import KERNEL_DTYPES, use_triton

REDUCTIONS = ("mean", "sum")


def cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    divisor: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> torch.Tensor:
    """The eager spelling: ``F.cross_entropy(logits.float(), ...)``, ``/ divisor`` for ``sum``."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = torch.nn.functional.cross_entropy(
        z, labels, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    return loss / divisor if divisor is not None else loss


def _check(logits, labels, divisor, reduction) -> None:
    if logits.dim() != 2:
        raise ValueError(f"slothc::cross_entropy: logits must be [tokens, vocab], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"slothc::cross_entropy: labels shape {tuple(labels.shape)} != ({logits.shape[0]},) (one label per row)"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"slothc::cross_entropy: labels must be integer class indices, got {labels.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"slothc::cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if divisor is not None and (reduction != "sum" or divisor.numel() != 1):
        raise ValueError("slothc::cross_entropy: a divisor needs reduction='sum' and one element")


# Rows per chunk of the torch path: its fp32 temporaries are a few [rows, V] tensors.
REFERENCE_CHUNK_BYTES = 64 * 2**20


def _grad_scale(labels, divisor, ignore_index, reduction) -> Optional[torch.Tensor]:
    """The gradient's ``1 / n_valid`` (mean) or ``1 / divisor`` as a one-element fp32 device tensor."""
    if reduction == "mean":
        return (1.0 / (labels != ignore_index).sum().clamp(min=1).to(torch.float32)).reshape(1)
    if divisor is not None:
        return (1.0 / divisor.reshape(1).to(torch.float32)).reshape(1)
    return None


def grad_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """The kept gradient's dtype: the logits' own, except fp32 for fp16 logits.

    fp16 cannot hold ``g / n_valid`` of a real batch (softmax values of 1e-5 over 8K tokens are
    below its subnormals) and the loss scale that keeps eager's fp16 gradient representable only
    arrives with the backward's ``grad_output``; an unscaled fp16 ``g`` would be rounded twice. So
    fp16 logits keep an fp32 gradient (4 bytes a logit: still a third of what eager keeps and makes).
    """
    return torch.float32 if logits_dtype == torch.float16 else logits_dtype


@torch.library.custom_op("slothc::cross_entropy", mutates_args=())
def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    divisor: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, grad)``: the fp32 0-dim loss and d loss / d logits in ``grad_dtype(logits.dtype)``
    (empty without ``compute_grad``)."""
    _check(logits, labels, divisor, reduction)
    lce.check_labels(labels, logits.shape[1], ignore_index)
    n_rows, n_cols = logits.shape
    z = logits if logits.stride(-1) == 1 or n_cols == 1 else logits.contiguous()
    labels = labels.contiguous()
    scale = _grad_scale(labels, divisor, ignore_index, reduction) if compute_grad else None
    grad = torch.empty((n_rows, n_cols), dtype=grad_dtype(logits.dtype), device=logits.device) if compute_grad else None
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    row_loss = torch.empty(n_rows, dtype=compute_dtype, device=logits.device)
    if use_triton(z) and z.dtype in KERNEL_DTYPES:
        step = max(n_rows, 1)  # one launch: the kernel's temporaries are registers
        rows_fn = lce.linear_cross_entropy_rows
    else:
        step = max(1, REFERENCE_CHUNK_BYTES // max(1, 4 * n_cols))
        rows_fn = lce.linear_cross_entropy_rows_reference
    for start in range(0, n_rows, step):
        end = min(start + step, n_rows)
        rows_fn(
            z[start:end], grad[start:end] if grad is not None else None, labels[start:end], row_loss[start:end],
            scale, ignore_index, label_smoothing, 1.0, 0.0, True,
        )
    total = row_loss.sum()
    if reduction == "mean":
        loss = total / (labels != ignore_index).sum()
    elif divisor is not None:
        loss = total / divisor.reshape(())
    else:
        loss = total
    return loss.to(compute_dtype), grad if grad is not None else logits.new_empty(0)


@cross_entropy.register_fake
def _cross_entropy_fake(logits, labels, divisor, ignore_index, reduction, label_smoothing, compute_grad):
    _check(logits, labels, divisor, reduction)
    loss = logits.new_empty((), dtype=torch.promote_types(logits.dtype, torch.float32))
    grad = logits.new_empty(logits.shape, dtype=grad_dtype(logits.dtype)) if compute_grad else logits.new_empty(0)
    return loss, grad


def _setup_context(ctx, inputs, output):
    logits, labels, divisor, ignore_index, reduction, label_smoothing, compute_grad = inputs
    _, grad = output
    ctx.compute_grad = compute_grad
    ctx.logits_dtype = logits.dtype
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)


def _backward(ctx, grad_loss, _grad_grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None
    if not ctx.compute_grad:
        raise RuntimeError(
            "slothc::cross_entropy was called with compute_grad=False, so it kept no gradient; "
            "call it with compute_grad=True to backpropagate through it"
        )
    (grad,) = ctx.saved_tensors
    # The kept gradient times the fp32 scalar grad_output, rounded once to the logits' dtype
    # (bf16 / fp32: exact when grad_output is 1, the usual case).
    return torch.mul(grad, grad_loss).to(ctx.logits_dtype), None, None, None, None, None, None


torch.library.register_autograd("slothc::cross_entropy", _backward, setup_context=_setup_context)
