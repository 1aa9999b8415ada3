"""LayerNorm: reference, Triton kernels, launchers and the ``slothc::layer_norm`` custom op.

``F.layer_norm(x, (n_cols,), w, b, eps)`` over the last dim of ``x`` (every other dim is a row),
computed in fp32 and rounded once to ``x.dtype`` (``w`` and ``b`` may be fp32 with bf16/fp16 ``x``)::

    mu = mean(x)        r = 1 / sqrt(mean((x - mu)^2) + eps)        n = (x - mu) * r
    y  = (n * w + b).to(x.dtype)                 (w = 1, b = 0 where absent)

Backward, with ``g = dy * w``, all in fp32::

    dx = r * (g - mean(g) - n * mean(g * n))
    dw = sum over rows of dy * n          db = sum over rows of dy

The backward kernel recomputes ``mu`` and ``r`` from the row of ``x`` it loads anyway (nothing saved
but the inputs). ``mu`` is corrected once by the mean of ``x - mu`` (see ``_centre``). ``dw`` and ``db`` are reduced without atomics, as in ``rms_norm``: each program of
``reduction_grid`` loops over a range of rows and writes one row of fp32 partials.
"""

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from slothc.kernels._launch import (
    KERNEL_DTYPES,
    as_rows,
    device_guard,
    next_power_of_2,
    num_warps_for,
    reduction_grid,
    rows_fit,
    use_triton,
)

# --------------------------------------------------------------------------------------------
# Reference: the math spec, and the implementation off the Triton path.
# --------------------------------------------------------------------------------------------


def _compute_dtype(x_dtype: torch.dtype) -> torch.dtype:
    # fp32 for fp32/bf16/fp16; float64 stays float64.
    return torch.promote_types(x_dtype, torch.float32)


def layer_norm_reference(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """``F.layer_norm`` over the last dim, computed in fp32 (with fp32 ``w``, ``b``), rounded once to ``x.dtype``."""
    cdt = _compute_dtype(x.dtype)
    w = weight.to(cdt) if weight is not None else None
    b = bias.to(cdt) if bias is not None else None
    return F.layer_norm(x.to(cdt), (x.shape[-1],), w, b, eps).to(x.dtype)


def layer_norm_backward_reference(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Plain-torch VJP of ``layer_norm_reference``: ``(dx, dw, db)``, ``dw``/``db`` None unless asked.

    ``g = dy * w``; ``dx = r * (g - mean(g) - n * mean(g * n))``; ``dw = sum_rows dy * n``;
    ``db = sum_rows dy``.
    """
    cdt = _compute_dtype(x.dtype)
    n_cols = x.shape[-1]
    xf = x.to(cdt)
    dy = grad_out.to(cdt)
    xc = xf - xf.mean(-1, keepdim=True)
    r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    n = xc * r
    g = dy * weight.to(cdt) if weight is not None else dy
    dx = r * (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True))
    dw = (dy * n).reshape(-1, n_cols).sum(0).to(weight.dtype) if compute_dw else None
    db = dy.reshape(-1, n_cols).sum(0).to(bias.dtype) if compute_db else None
    return dx.to(x.dtype), dw, db


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _centre(x, mask, n_cols):
    """``x - mean(x)`` over the row, 0 in the padding lanes, with the mean corrected once.

    ``sum(x) / n`` in fp32 is off by up to an ulp of the mean; where the mean is large next to the
    spread (a row of values around 32 with std 1.5) that error is a large part of ``x - mean``. The
    mean of the centred row recovers it (a second pass over registers, not memory), which makes the
    result as accurate as eager's Welford-style mean.
    """
    xc = tl.where(mask, x - tl.sum(x, axis=0) / n_cols, 0.0)  # padding lanes must not enter sums
    return tl.where(mask, xc - tl.sum(xc, axis=0) / n_cols, 0.0)


@triton.jit
def _layer_norm_fwd_kernel(
    y_ptr,  # output [n_rows, n_cols], x's dtype
    stride_y_row,  # elements between rows of y
    x_ptr,  # input [n_rows, n_cols], unit column stride
    stride_x_row,  # elements between rows of x
    w_ptr,  # weight [n_cols], contiguous (unused without HAS_WEIGHT)
    b_ptr,  # bias [n_cols], contiguous (unused without HAS_BIAS)
    n_cols,  # row length, <= BLOCK_SIZE_N
    eps,  # added to the variance
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,  # next power of two >= n_cols
):
    """One program per row: ``y = ((x - mu) * r * w + b).to(x.dtype)``, ``r = 1 / sqrt(var + eps)``,
    mean and (biased) variance of the row in fp32."""
    row = tl.program_id(0).to(tl.int64)
    # Scalars arrive as fp32 from eager Triton but as fp64 when the launch comes from Inductor
    # code: pin them so the result does not depend on the caller. (tl.cast rather than eps.to:
    # the interpreter passes Python floats through unwrapped, and they have no .to.)
    eps = tl.cast(eps, tl.float32)
    cols = tl.arange(0, BLOCK_SIZE_N)
    mask = cols < n_cols

    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    xc = _centre(x, mask, n_cols)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    dx_ptr,  # output [n_rows, n_cols], x's dtype
    stride_dx_row,  # elements between rows of dx
    dy_ptr,  # upstream gradient [n_rows, n_cols], unit column stride
    stride_dy_row,  # elements between rows of dy
    x_ptr,  # forward input [n_rows, n_cols], unit column stride
    stride_x_row,  # elements between rows of x
    w_ptr,  # weight [n_cols], contiguous (unused without HAS_WEIGHT)
    dw_partial_ptr,  # fp32 [n_programs, n_cols]: program p's sum of dy * n (only with COMPUTE_DW)
    db_partial_ptr,  # fp32 [n_programs, n_cols]: program p's sum of dy (only with COMPUTE_DB)
    n_rows,  # rows of x
    n_cols,  # row length, <= BLOCK_SIZE_N
    rows_per_program,  # program p handles rows [p * rows_per_program, (p + 1) * rows_per_program)
    eps,  # added to the variance
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,  # accumulate dw partials (the weight requires grad)
    COMPUTE_DB: tl.constexpr,  # accumulate db partials (the bias requires grad)
    BLOCK_SIZE_N: tl.constexpr,
):
    """For each row: ``g = dy * w``, ``dx = r * (g - mean(g) - n * mean(g * n))``; and per program
    ``dw_partial[p] = sum dy * n``, ``db_partial[p] = sum dy`` over its rows, with ``mu`` and ``r``
    recomputed from ``x``."""
    pid = tl.program_id(0).to(tl.int64)
    eps = tl.cast(eps, tl.float32)
    cols = tl.arange(0, BLOCK_SIZE_N)
    mask = cols < n_cols

    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_SIZE_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_SIZE_N], dtype=tl.float32)

    # Rows [row_start, row_end); every program has at least one. The loads of row i + 1 are issued
    # before row i is reduced (software pipelining by hand; see _rms_norm_bwd_kernel).
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    x_next = tl.load(x_ptr + row_start * stride_x_row + cols, mask=mask, other=0.0)
    dy_next = tl.load(dy_ptr + row_start * stride_dy_row + cols, mask=mask, other=0.0)
    for row in range(row_start, row_end):
        x = x_next.to(tl.float32)
        dy = dy_next.to(tl.float32)
        next_mask = cols < tl.where(row + 1 < row_end, n_cols, 0)  # all False after the last row
        x_next = tl.load(x_ptr + (row + 1) * stride_x_row + cols, mask=next_mask, other=0.0)
        dy_next = tl.load(dy_ptr + (row + 1) * stride_dy_row + cols, mask=next_mask, other=0.0)
        xc = _centre(x, mask, n_cols)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
        n = xc * rstd
        if HAS_WEIGHT:
            g = dy * w
        else:
            g = dy
        if COMPUTE_DW:
            dw_acc += dy * n
        if COMPUTE_DB:
            db_acc += dy
        c1 = tl.sum(g, axis=0) / n_cols
        c2 = tl.sum(g * n, axis=0) / n_cols
        dx = (g - c1 - n * c2) * rstd
        tl.store(dx_ptr + row * stride_dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)
    if COMPUTE_DB:
        tl.store(db_partial_ptr + pid * n_cols + cols, db_acc, mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_param(p: Optional[torch.Tensor], x: torch.Tensor, what: str) -> None:
    if p is not None:
        assert p.shape == (x.shape[-1],), f"{what} shape {tuple(p.shape)} != ({x.shape[-1]},)"
        assert p.device == x.device, f"{what} on {p.device}, x on {x.device}"


def layer_norm_fwd(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """Launch ``_layer_norm_fwd_kernel`` (one program per row); returns a contiguous ``y`` shaped like ``x``."""
    _check_param(weight, x, "weight")
    _check_param(bias, x, "bias")
    x2 = as_rows(x)  # [n_rows, n_cols]
    n_rows, n_cols = x2.shape
    assert rows_fit(n_cols), f"rows of {n_cols} elements take the reference"
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows > 0:
        block_size_n = next_power_of_2(n_cols)
        with device_guard(x):
            _layer_norm_fwd_kernel[(n_rows,)](
                y, y.stride(0),
                x2, x2.stride(0),
                weight.contiguous() if weight is not None else x2,
                bias.contiguous() if bias is not None else x2,
                n_cols, float(eps),
                HAS_WEIGHT=weight is not None,
                HAS_BIAS=bias is not None,
                BLOCK_SIZE_N=block_size_n,
                num_warps=num_warps_for(block_size_n),
            )
    return y.view(x.shape)


def layer_norm_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch ``_layer_norm_bwd_kernel``; returns ``(dx, dw, db)``, ``dw``/``db`` None unless asked.

    Without a reduction every program takes one row; with one the grid is ``reduction_grid``'s
    and the fp32 partials are summed here and cast to the parameters' dtypes.
    """
    _check_param(weight, x, "weight")
    _check_param(bias, x, "bias")
    assert grad_out.shape == x.shape, f"grad_out shape {tuple(grad_out.shape)} != x shape {tuple(x.shape)}"
    assert not compute_dw or weight is not None, "compute_dw needs a weight"
    assert not compute_db or bias is not None, "compute_db needs a bias"
    x2 = as_rows(x)  # [n_rows, n_cols]
    dy2 = as_rows(grad_out)  # [n_rows, n_cols]
    n_rows, n_cols = x2.shape
    assert rows_fit(n_cols), f"rows of {n_cols} elements take the reference"
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if compute_dw or compute_db:
        n_programs, rows_per_program = reduction_grid(n_rows, x.device)
    else:
        n_programs, rows_per_program = n_rows, 1
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else dx
    db_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device) if compute_db else dx
    if n_programs > 0:
        block_size_n = next_power_of_2(n_cols)
        with device_guard(x):
            _layer_norm_bwd_kernel[(n_programs,)](
                dx, dx.stride(0),
                dy2, dy2.stride(0),
                x2, x2.stride(0),
                weight.contiguous() if weight is not None else x2,
                dw_partial, db_partial,
                n_rows, n_cols, rows_per_program,
                float(eps),
                HAS_WEIGHT=weight is not None,
                COMPUTE_DW=bool(compute_dw),
                COMPUTE_DB=bool(compute_db),
                BLOCK_SIZE_N=block_size_n,
                num_warps=num_warps_for(block_size_n),
            )
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
    db = db_partial.sum(0).to(bias.dtype) if compute_db else None
    return dx.view(x.shape), dw, db


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


def _use_kernel(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> bool:
    return (
        use_triton(x)
        and x.dim() >= 1
        and x.dtype in KERNEL_DTYPES
        and (weight is None or weight.dtype in KERNEL_DTYPES)
        and (bias is None or bias.dtype in KERNEL_DTYPES)
        and rows_fit(x.shape[-1])
    )


@torch.library.custom_op("slothc::layer_norm", mutates_args=())
def layer_norm(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)`` in fp32, rounded once to ``x.dtype``; contiguous."""
    if _use_kernel(x, weight, bias):
        return layer_norm_fwd(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps).contiguous()


@layer_norm.register_fake
def _layer_norm_fake(x, weight, bias, eps):
    _check_param(weight, x, "weight")
    _check_param(bias, x, "bias")
    return x.new_empty(x.shape)


def _check_backward_flags(weight, bias, compute_dw, compute_db):
    if compute_dw and weight is None:
        raise ValueError("slothc::layer_norm_backward: compute_dw=True needs a weight")
    if compute_db and bias is None:
        raise ValueError("slothc::layer_norm_backward: compute_db=True needs a bias")


@torch.library.custom_op("slothc::layer_norm_backward", mutates_args=())
def layer_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw, db)`` of ``slothc::layer_norm``; ``dw``/``db`` are empty tensors unless asked for."""
    _check_backward_flags(weight, bias, compute_dw, compute_db)
    if _use_kernel(x, weight, bias):
        dx, dw, db = layer_norm_bwd(grad_out, x, weight, bias, eps, compute_dw, compute_db)
    else:
        dx, dw, db = layer_norm_backward_reference(grad_out, x, weight, bias, eps, compute_dw, compute_db)
        dx = dx.contiguous()
    return dx, (dw if dw is not None else x.new_empty(0)), (db if db is not None else x.new_empty(0))


@layer_norm_backward.register_fake
def _layer_norm_backward_fake(grad_out, x, weight, bias, eps, compute_dw, compute_db):
    _check_backward_flags(weight, bias, compute_dw, compute_db)
    dw = weight.new_empty(weight.shape) if compute_dw else x.new_empty(0)
    db = bias.new_empty(bias.shape) if compute_db else x.new_empty(0)
    return x.new_empty(x.shape), dw, db


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    # bias's values are not needed, but its dtype and shape are (db is returned in them); saving a
    # parameter keeps nothing alive that the model does not already hold.
    ctx.save_for_backward(x, weight, bias)
    ctx.eps = eps


def _layer_norm_autograd_backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[1]
    compute_db = bias is not None and ctx.needs_input_grad[2]
    dx, dw, db = torch.ops.slothc.layer_norm_backward(grad_out, x, weight, bias, ctx.eps, compute_dw, compute_db)
    return (
        dx if ctx.needs_input_grad[0] else None,
        dw if compute_dw else None,
        db if compute_db else None,
        None,
    )


torch.library.register_autograd(
    "slothc::layer_norm", _layer_norm_autograd_backward, setup_context=_layer_norm_setup_context
)
