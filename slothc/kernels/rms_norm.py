"""RMSNorm: reference, Triton kernels, launchers and the ``slothc::rms_norm`` custom op.

Over the last dim of ``x`` (``n_cols`` elements; every other dim is a row), computed in fp32::

    r = 1 / sqrt(mean(x^2) + eps)            n = x * r

and then one of three spellings found in Hugging Face models:

==================  ===============================================  ===========================
mode                y                                                 dtype of y
==================  ===============================================  ===========================
no weight           n.to(x.dtype)                                     x.dtype
cast_before_weight  (offset + w) * n.to(x.dtype)   (Llama, Mistral,   promote(w.dtype, x.dtype)
                    Qwen: offset = 0)
cast after weight   (n * (offset + w.float())).to(x.dtype)  (Gemma:   x.dtype
                    offset = 1; Gemma3n: offset = 0)
==================  ===============================================  ===========================

In the Llama spelling eager rounds ``n`` to ``x.dtype`` before the product and ``offset + w`` is
added in ``w``'s dtype; the kernel rounds at the same places, so it computes eager's function.
The dtype of ``y`` follows from torch's promotion: an fp32 weight with bf16 ``x`` (autocast) gives
an fp32 ``y`` in the Llama spelling.

Backward. With ``g = dy * (offset + w)`` (``g = dy`` without weight), all in fp32::

    dx = r * (g - n * mean(g * n))
    dw = sum over rows of dy * n            (n rounded to x.dtype in the Llama spelling, as eager)

The backward kernel recomputes ``r`` from the row of ``x`` it loads anyway (no saved rstd: one
fewer tensor kept alive between forward and backward, no extra read). ``dw`` is reduced without
atomics: ``reduction_grid`` programs each loop over a range of rows, keep their partial ``dw`` in
fp32 registers and write one row of a ``[n_programs, n_cols]`` buffer that is summed afterwards.
In LoRA training the norm weights are frozen; then ``compute_dw`` is False and the backward is a
pure row-parallel kernel.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from slothc.kernels._launch import (
    KERNEL_DTYPES,
    as_rows,
    device_guard,
    interpreting,
    next_power_of_2,
    num_warps_for,
    reduction_grid,
    rows_fit,
    use_triton,
)

# --------------------------------------------------------------------------------------------
# Reference: the math spec, and the implementation off the Triton path.
# --------------------------------------------------------------------------------------------


def rms_norm_out_dtype(x_dtype: torch.dtype, w_dtype: Optional[torch.dtype], cast_before_weight: bool) -> torch.dtype:
    """dtype of ``rms_norm``'s result: ``promote(w, x)`` in the Llama spelling, else ``x.dtype``."""
    if w_dtype is not None and cast_before_weight:
        return torch.promote_types(w_dtype, x_dtype)
    return x_dtype


def _compute_dtype(x_dtype: torch.dtype) -> torch.dtype:
    # fp32 for fp32/bf16/fp16 (the spec's x.float()); float64 stays float64.
    return torch.promote_types(x_dtype, torch.float32)


def rms_norm_reference(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float, cast_before_weight: bool
) -> torch.Tensor:
    """Plain-torch RMSNorm over the last dim; see the module docstring for the three spellings.

    ``n = x * rsqrt(mean(x^2) + eps)`` in fp32, then ``n.to(x.dtype)`` (no weight),
    ``(offset + w) * n.to(x.dtype)`` (``cast_before_weight``) or ``(n * (offset + w.float())).to(x.dtype)``.
    """
    xf = x.to(_compute_dtype(x.dtype))
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return n.to(x.dtype)
    if cast_before_weight:
        return (offset + weight) * n.to(x.dtype)
    return (n * (offset + weight.to(xf.dtype))).to(x.dtype)


def rms_norm_backward_reference(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    offset: float,
    cast_before_weight: bool,
    compute_dw: bool,
    grad_x: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Plain-torch VJP of ``rms_norm_reference``: ``(dx, dw)``, ``dw`` None unless ``compute_dw``.

    ``g = dy * (offset + w)``; ``dx = r * (g - n * mean(g * n))``; ``dw = sum_rows dy * n``.
    ``grad_x``: the gradient of x's other uses, added to dx (rounded to x's dtype first, as
    autograd sums them).
    """
    cdt = _compute_dtype(x.dtype)
    xf = x.to(cdt)
    dy = grad_out.to(cdt)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * r
    dw = None
    if weight is None:
        g = dy
    elif cast_before_weight:
        g = dy * (offset + weight).to(cdt)
        if compute_dw:
            dw = (dy * n.to(x.dtype).to(cdt)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    else:
        g = dy * (offset + weight.to(cdt))
        if compute_dw:
            dw = (dy * n).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    dx = r * (g - n * (g * n).mean(-1, keepdim=True))
    dx = dx.to(x.dtype)
    if grad_x is not None:  # autograd's sum of x's gradients, in x's dtype
        dx = dx + grad_x
    return dx, dw


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
    cast_before_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, rms_norm_reference(s))`` with ``s = x + residual``: a residual add and the norm after it."""
    s = x + residual
    return s, rms_norm_reference(s, weight, eps, offset, cast_before_weight)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    y_ptr,  # output [n_rows, n_cols], dtype rms_norm_out_dtype(...)
    stride_y_row,  # elements between rows of y
    x_ptr,  # input [n_rows, n_cols], unit column stride
    stride_x_row,  # elements between rows of x
    r_ptr,  # with HAS_RESIDUAL: the residual [n_rows, n_cols] added to x, unit column stride
    stride_r_row,  # elements between rows of r
    s_ptr,  # with HAS_RESIDUAL: out, s = x + r [n_rows, n_cols] (the norm's input); else x itself
    stride_s_row,  # elements between rows of s
    w_ptr,  # weight [n_cols], contiguous (unused without HAS_WEIGHT)
    n_cols,  # row length, <= BLOCK_SIZE_N
    eps,  # added to the mean square
    offset,  # added to the weight: 0 (Llama), 1 (Gemma)
    HAS_RESIDUAL: tl.constexpr,  # True: normalise s = x + r (rounded to s's dtype) and store s
    HAS_WEIGHT: tl.constexpr,  # False: y = n.to(x.dtype)
    CAST_BEFORE_WEIGHT: tl.constexpr,  # True: Llama spelling; False: Gemma spelling
    BLOCK_SIZE_N: tl.constexpr,  # next power of two >= n_cols
):
    """One program per row: ``y = (offset + w) * round_x(n)`` or ``round_x(n * (offset + w))``,
    ``n = x / sqrt(mean(x^2) + eps)`` in fp32. With ``HAS_RESIDUAL`` the normalised row is
    ``s = round_s(x + r)`` (eager's add: an fp32 sum rounded once), written out as well, and
    ``round_x`` rounds to s's dtype."""
    row = tl.program_id(0).to(tl.int64)
    # Scalars arrive as fp32 from eager Triton but as fp64 when the launch comes from Inductor
    # code: pin them so the result does not depend on the caller. (tl.cast rather than eps.to:
    # the interpreter passes Python floats through unwrapped, and they have no .to.)
    eps = tl.cast(eps, tl.float32)
    offset = tl.cast(offset, tl.float32)
    cols = tl.arange(0, BLOCK_SIZE_N)
    mask = cols < n_cols

    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * stride_s_row + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    n = x * rstd
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if CAST_BEFORE_WEIGHT:
            # Eager: (offset + w) in w's dtype times n rounded to the input's dtype (s's: x's
            # without a residual); the product's single rounding to y's dtype happens at the store.
            w = (offset + w).to(w_ptr.dtype.element_ty).to(tl.float32)
            y = w * n.to(s_ptr.dtype.element_ty).to(tl.float32)
        else:
            y = n * (offset + w)
    else:
        y = n
    tl.store(y_ptr + row * stride_y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dx_ptr,  # output [n_rows, n_cols], x's dtype
    stride_dx_row,  # elements between rows of dx
    dy_ptr,  # upstream gradient [n_rows, n_cols], unit column stride
    stride_dy_row,  # elements between rows of dy
    x_ptr,  # forward input [n_rows, n_cols], unit column stride
    stride_x_row,  # elements between rows of x
    w_ptr,  # weight [n_cols], contiguous (unused without HAS_WEIGHT)
    dw_partial_ptr,  # fp32 [n_programs, n_cols]: program p's sum of dy * n (only with COMPUTE_DW)
    gx_ptr,  # with HAS_GRAD_X: the gradient that reaches x by its other uses, [n_rows, n_cols], x's dtype
    stride_gx_row,  # elements between rows of gx
    n_rows,  # rows of x
    n_cols,  # row length, <= BLOCK_SIZE_N
    rows_per_program,  # program p handles rows [p * rows_per_program, (p + 1) * rows_per_program)
    eps,  # added to the mean square
    offset,  # added to the weight
    HAS_WEIGHT: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,  # accumulate dw partials (the weight requires grad)
    HAS_GRAD_X: tl.constexpr,  # True: dx = round_x(round_x(dx) + gx), eager's sum of x's two gradients
    ADD_RN: tl.constexpr,  # that add by PTX add.rn.f32 (CUDA; the interpreter and ROCm: a plain add)
    BLOCK_SIZE_N: tl.constexpr,
):
    """For each row: ``g = dy * (offset + w)``, ``dx = r * (g - n * mean(g * n))``; and
    ``dw_partial[p] = sum over the program's rows of dy * n`` (``n`` rounded to x's dtype in the
    Llama spelling), with ``r = 1 / sqrt(mean(x^2) + eps)`` recomputed from ``x``. With
    ``HAS_GRAD_X`` the stored dx is the norm's dx, rounded to x's dtype, plus ``gx`` (autograd's
    sum of the gradients of x's uses, in x's dtype: the same two roundings as eager)."""
    pid = tl.program_id(0).to(tl.int64)
    eps = tl.cast(eps, tl.float32)
    offset = tl.cast(offset, tl.float32)
    cols = tl.arange(0, BLOCK_SIZE_N)
    mask = cols < n_cols

    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if CAST_BEFORE_WEIGHT:
            w = (offset + w).to(w_ptr.dtype.element_ty).to(tl.float32)
        else:
            w = offset + w
    dw_acc = tl.zeros([BLOCK_SIZE_N], dtype=tl.float32)

    # Rows [row_start, row_end); every program has at least one. The loads of row i + 1 are issued
    # before row i is reduced (software pipelining by hand): a program that streams many rows
    # otherwise waits for each load in turn (measured on an H100: ~70% of copy bandwidth with dW,
    # ~85% with the prefetch).
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
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        n = x * rstd
        if HAS_WEIGHT:
            g = dy * w
            if COMPUTE_DW:
                if CAST_BEFORE_WEIGHT:
                    dw_acc += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
                else:
                    dw_acc += dy * n
        else:
            g = dy
        c = tl.sum(g * n, axis=0) / n_cols
        dx = (g - n * c) * rstd
        if HAS_GRAD_X:
            gx = tl.load(gx_ptr + row * stride_gx_row + cols, mask=mask, other=0.0).to(tl.float32)
            dx = dx.to(x_ptr.dtype.element_ty).to(tl.float32)
            if ADD_RN:
                # An add that is never contracted with the product before it into an FMA (which
                # skips the product's rounding: an fp32 dx would then differ from eager's in the
                # last bit; with a 16-bit x the cast above already separates them)
                dx = tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [dx, gx], dtype=tl.float32,
                                               is_pure=True, pack=1)
            else:
                dx = dx + gx
        tl.store(dx_ptr + row * stride_dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_weight(weight: Optional[torch.Tensor], x: torch.Tensor) -> None:
    if weight is not None:
        assert weight.shape == (x.shape[-1],), f"weight shape {tuple(weight.shape)} != ({x.shape[-1]},)"
        assert weight.device == x.device, f"weight on {weight.device}, x on {x.device}"


def rms_norm_fwd(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float, cast_before_weight: bool,
    residual: Optional[torch.Tensor] = None,
):
    """Launch ``_rms_norm_fwd_kernel`` (one program per row); returns a contiguous ``y`` shaped like ``x``.
    With ``residual`` (x's shape): the norm of ``s = x + residual`` (dtype ``promote(x, residual)``),
    and returns ``(s, y)``, both contiguous."""
    _check_weight(weight, x)
    x2 = as_rows(x)  # [n_rows, n_cols]
    n_rows, n_cols = x2.shape
    assert rows_fit(n_cols), f"rows of {n_cols} elements take the reference"
    if residual is not None:
        assert residual.shape == x.shape, f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
        r2 = as_rows(residual)
        s2 = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    else:
        r2 = s2 = x2  # neither read nor written; s_ptr's dtype is the input's
    y = torch.empty((n_rows, n_cols), dtype=rms_norm_out_dtype(s2.dtype, weight.dtype if weight is not None else None,
                                                               cast_before_weight), device=x.device)
    if n_rows > 0:
        w = weight.contiguous() if weight is not None else x2
        block_size_n = next_power_of_2(n_cols)
        with device_guard(x):
            _rms_norm_fwd_kernel[(n_rows,)](
                y, y.stride(0),
                x2, x2.stride(0),
                r2, r2.stride(0),
                s2, s2.stride(0),
                w,
                n_cols, float(eps), float(offset),
                HAS_RESIDUAL=residual is not None,
                HAS_WEIGHT=weight is not None,
                CAST_BEFORE_WEIGHT=bool(cast_before_weight),
                BLOCK_SIZE_N=block_size_n,
                num_warps=num_warps_for(block_size_n),
            )
    if residual is not None:
        return s2.view(x.shape), y.view(x.shape)
    return y.view(x.shape)


def rms_norm_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    offset: float,
    cast_before_weight: bool,
    compute_dw: bool,
    grad_x: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch ``_rms_norm_bwd_kernel``; returns ``(dx, dw)``, ``dw`` None unless ``compute_dw``.

    Without ``compute_dw`` every program takes one row (the most parallelism); with it the grid is
    ``reduction_grid``'s and the fp32 partials are summed here and cast to the weight's dtype.
    ``grad_x`` (x's shape and dtype): the gradient of x's other uses, added to dx in the kernel.
    """
    _check_weight(weight, x)
    assert grad_out.shape == x.shape, f"grad_out shape {tuple(grad_out.shape)} != x shape {tuple(x.shape)}"
    assert not compute_dw or weight is not None, "compute_dw needs a weight"
    x2 = as_rows(x)  # [n_rows, n_cols]
    dy2 = as_rows(grad_out)  # [n_rows, n_cols]
    if grad_x is not None:
        assert grad_x.shape == x.shape and grad_x.dtype == x.dtype, (
            f"grad_x {tuple(grad_x.shape)} {grad_x.dtype} != x {tuple(x.shape)} {x.dtype}")
        gx2 = as_rows(grad_x)
    else:
        gx2 = x2  # never read
    n_rows, n_cols = x2.shape
    assert rows_fit(n_cols), f"rows of {n_cols} elements take the reference"
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if compute_dw:
        n_programs, rows_per_program = reduction_grid(n_rows, x.device)
        dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device)
    else:
        n_programs, rows_per_program = n_rows, 1
        dw_partial = dx  # never written
    if n_programs > 0:
        w = weight.contiguous() if weight is not None else x2
        block_size_n = next_power_of_2(n_cols)
        with device_guard(x):
            _rms_norm_bwd_kernel[(n_programs,)](
                dx, dx.stride(0),
                dy2, dy2.stride(0),
                x2, x2.stride(0),
                w,
                dw_partial,
                gx2, gx2.stride(0),
                n_rows, n_cols, rows_per_program,
                float(eps), float(offset),
                HAS_WEIGHT=weight is not None,
                CAST_BEFORE_WEIGHT=bool(cast_before_weight),
                COMPUTE_DW=bool(compute_dw),
                HAS_GRAD_X=grad_x is not None,
                ADD_RN=grad_x is not None and x.device.type == "cuda" and torch.version.hip is None and not interpreting(),
                BLOCK_SIZE_N=block_size_n,
                num_warps=num_warps_for(block_size_n),
            )
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx.view(x.shape), dw


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


def _use_kernel(x: torch.Tensor, weight: Optional[torch.Tensor]) -> bool:
    return (
        use_triton(x)
        and x.dim() >= 1
        and x.dtype in KERNEL_DTYPES
        and (weight is None or weight.dtype in KERNEL_DTYPES)
        and rows_fit(x.shape[-1])
    )


@torch.library.custom_op("slothc::rms_norm", mutates_args=())
def rms_norm(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float, cast_before_weight: bool
) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (see the module docstring); result contiguous."""
    if _use_kernel(x, weight):
        return rms_norm_fwd(x, weight, eps, offset, cast_before_weight)
    return rms_norm_reference(x, weight, eps, offset, cast_before_weight).contiguous()


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps, offset, cast_before_weight):
    _check_weight(weight, x)
    dtype = rms_norm_out_dtype(x.dtype, weight.dtype if weight is not None else None, cast_before_weight)
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("slothc::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    offset: float,
    cast_before_weight: bool,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dw)`` of ``slothc::rms_norm``; ``dw`` is an empty tensor unless ``compute_dw``."""
    return _backward("slothc::rms_norm_backward", grad_out, x, weight, eps, offset, cast_before_weight, compute_dw)


def _backward(op: str, grad_out, x, weight, eps, offset, cast_before_weight, compute_dw, grad_x=None):
    """Both backward ops: the kernel where it runs, else the reference; ``dw`` empty unless ``compute_dw``."""
    if compute_dw and weight is None:
        raise ValueError(f"{op}: compute_dw=True needs a weight")
    extra = {"grad_x": grad_x} if grad_x is not None else {}
    if _use_kernel(x, weight):
        dx, dw = rms_norm_bwd(grad_out, x, weight, eps, offset, cast_before_weight, compute_dw, **extra)
    else:
        dx, dw = rms_norm_backward_reference(grad_out, x, weight, eps, offset, cast_before_weight, compute_dw, **extra)
        dx = dx.contiguous()
    return dx, dw if dw is not None else x.new_empty(0)


@rms_norm_backward.register_fake
def _rms_norm_backward_fake(grad_out, x, weight, eps, offset, cast_before_weight, compute_dw):
    if compute_dw and weight is None:
        raise ValueError("slothc::rms_norm_backward: compute_dw=True needs a weight")
    dx = x.new_empty(x.shape)
    dw = weight.new_empty(weight.shape) if compute_dw else x.new_empty(0)
    return dx, dw


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, eps, offset, cast_before_weight = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.offset, ctx.cast_before_weight = eps, offset, cast_before_weight


def _rms_norm_autograd_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[1]
    dx, dw = torch.ops.slothc.rms_norm_backward(
        grad_out, x, weight, ctx.eps, ctx.offset, ctx.cast_before_weight, compute_dw
    )
    return (dx if ctx.needs_input_grad[0] else None), (dw if compute_dw else None), None, None, None


torch.library.register_autograd(
    "slothc::rms_norm", _rms_norm_autograd_backward, setup_context=_rms_norm_setup_context
)


# --------------------------------------------------------------------------------------------
# The residual add before the norm: slothc::add_rms_norm
# --------------------------------------------------------------------------------------------
#
# A decoder layer adds each block's output to the residual stream and normalises the sum:
# ``s = x + residual; y = norm(s)``, with ``s`` used again by the next residual add. One kernel
# reads x and residual and writes s and y (the separate add wrote s and the norm read it back).
# In the backward, autograd sums the gradient of s's other uses with the norm's dx; the backward
# kernel adds it before its store (the separate add read dx back and wrote the sum). Both ops are
# put in by ``slothc.passes.add_rms_norm`` on AOTAutograd's forward and backward graphs.


def _check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    if residual.shape != x.shape:
        raise ValueError(f"slothc::add_rms_norm: residual {tuple(residual.shape)} and x {tuple(x.shape)} must have one shape")
    if residual.device != x.device:
        raise ValueError(f"slothc::add_rms_norm: residual on {residual.device}, x on {x.device}")


def _sum_dtype(x: torch.Tensor, residual: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, residual.dtype)


@torch.library.custom_op("slothc::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
    cast_before_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, y)``: ``s = x + residual`` (torch's promotion) and ``y = rms_norm(s)``; both contiguous."""
    _check_residual(x, residual)
    s_dtype = _sum_dtype(x, residual)
    if _use_kernel(x, weight) and residual.dtype in KERNEL_DTYPES:
        return rms_norm_fwd(x, weight, eps, offset, cast_before_weight, residual=residual)
    s, y = add_rms_norm_reference(x, residual, weight, eps, offset, cast_before_weight)
    return s.to(s_dtype).contiguous(), y.contiguous()


@add_rms_norm.register_fake
def _add_rms_norm_fake(x, residual, weight, eps, offset, cast_before_weight):
    _check_residual(x, residual)
    _check_weight(weight, x)
    s_dtype = _sum_dtype(x, residual)
    y_dtype = rms_norm_out_dtype(s_dtype, weight.dtype if weight is not None else None, cast_before_weight)
    return x.new_empty(x.shape, dtype=s_dtype), x.new_empty(x.shape, dtype=y_dtype)


@torch.library.custom_op("slothc::add_rms_norm_backward", mutates_args=())
def add_rms_norm_backward(
    grad_out: torch.Tensor,
    grad_s: Optional[torch.Tensor],
    s: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float,
    offset: float,
    cast_before_weight: bool,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ds, dw)``: the norm's ``ds`` plus ``grad_s``, the gradient of s's other uses (None: none),
    in s's dtype; ``dw`` is an empty tensor unless ``compute_dw``. The backward of ``add_rms_norm``
    (its x and residual both get ``ds``), and of a norm whose input has other uses."""
    if grad_s is not None and (grad_s.shape != s.shape or grad_s.dtype != s.dtype):
        raise ValueError(f"slothc::add_rms_norm_backward: grad_s {tuple(grad_s.shape)} {grad_s.dtype} must have s's "
                         f"shape and dtype {tuple(s.shape)} {s.dtype}")
    return _backward("slothc::add_rms_norm_backward", grad_out, s, weight, eps, offset, cast_before_weight, compute_dw,
                     grad_x=grad_s)


@add_rms_norm_backward.register_fake
def _add_rms_norm_backward_fake(grad_out, grad_s, s, weight, eps, offset, cast_before_weight, compute_dw):
    if compute_dw and weight is None:
        raise ValueError("slothc::add_rms_norm_backward: compute_dw=True needs a weight")
    dw = weight.new_empty(weight.shape) if compute_dw else s.new_empty(0)
    return s.new_empty(s.shape), dw


def _add_rms_norm_setup_context(ctx, inputs, output):
    x, residual, weight, eps, offset, cast_before_weight = inputs
    s, _ = output
    ctx.save_for_backward(s, weight)
    ctx.eps, ctx.offset, ctx.cast_before_weight = eps, offset, cast_before_weight
    ctx.dtypes = (x.dtype, residual.dtype)


def _add_rms_norm_autograd_backward(ctx, grad_s, grad_y):
    s, weight = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[2]
    if grad_y is None:
        out_dtype = rms_norm_out_dtype(s.dtype, weight.dtype if weight is not None else None, ctx.cast_before_weight)
        grad_y = s.new_zeros(s.shape, dtype=out_dtype)
    ds, dw = torch.ops.slothc.add_rms_norm_backward(
        grad_y, grad_s, s, weight, ctx.eps, ctx.offset, ctx.cast_before_weight, compute_dw
    )
    dx = ds.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    dr = ds.to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return dx, dr, (dw if compute_dw else None), None, None, None


torch.library.register_autograd(
    "slothc::add_rms_norm", _add_rms_norm_autograd_backward, setup_context=_add_rms_norm_setup_context
)
