"""Fused linear + cross-entropy: reference, Triton row kernel, chunked launcher and the
``slothc::linear_cross_entropy`` custom op (lm_head -> loss without the full logits).

A causal LM's loss in Hugging Face models (``N`` tokens, hidden size ``H``, vocabulary ``V``)::

    raw = F.linear(hidden, weight, bias)            [N, V] in hidden's dtype (rounded once)
    z   = raw * logit_scale                         only if logit_scale != 1 (Cohere; Granite: 1 / c)
    z   = softcap * tanh(z / softcap)               only if softcap != 0 (Gemma 2 final_logit_softcapping)
    loss = F.cross_entropy(z.float(), labels, ignore_index, reduction, label_smoothing)

For a non-ignored row ``i`` with label ``y`` and label smoothing ``e``, in fp32::

    lse_i  = log(sum_v exp(z_iv))
    loss_i = (1 - e) * (lse_i - z_iy) + e * (lse_i - mean_v z_iv)
           = log(s_i) + (1 - e) * (m_i - z_iy) + e * (m_i - mean_v z_iv)

with ``m_i = max_v z_iv`` and ``s_i = sum_v exp(z_iv - m_i)``: the second form, like
``log_softmax``, never rounds ``lse_i = m_i + log(s_i)`` at the magnitude of ``m_i`` (which would
lose the low bits of a small loss). ``reduction="sum"`` adds the ``loss_i``; ``"mean"`` divides
that sum by ``n_valid``, the number of non-ignored rows (0 / 0 = NaN when every label is ignored,
as eager). Ignored rows add nothing.

Gradient (``grad_output = 1``). With ``p = softmax(z_i) = exp(z_i - m_i - log(s_i))``::

    g_iv = p_v - (1 - e) * [v == y] - e / V           (0 for ignored rows; times 1 / n_valid for mean)
    softcap:  g_iv *= 1 - tanh(u_iv)^2 = 1 - (z_iv / softcap)^2      (u = scaled raw / softcap)
    scale:    g_iv *= logit_scale                     (g is now d loss / d raw)
    dhidden = g @ weight      dweight = g^T @ hidden      dbias = sum over rows of g

``1 - t^2`` cancels where tanh saturates (t ~ 1). When the op computes the logits it has ``u`` and
uses ``4e / (1 + e)^2``, ``e = exp(-2|u|)`` (accurate everywhere); from given logits it only has
the capped ``z`` and uses ``(1 - t)(1 + t)``, ``t = z / softcap`` (no rounding of ``t * t``), which
still inherits the rounding of ``z`` near saturation: so with a softcap and gradients, the chunk
loop recomputes the logits instead of reading given ones (the row kernel keeps both forms).

The [N, V] logits of a real model are huge (16K tokens x 128K vocabulary = 4 GiB in bf16, 8 GiB
more for eager's fp32 copy, and as much again for their gradient). The op never holds them: it
walks the tokens in chunks of ``C`` rows (``chunk_rows``) and for each chunk

1. ``z_c = hidden_c @ weight^T (+ bias)`` in hidden's dtype (torch.mm / addmm: cuBLAS, rounded
   exactly as eager's ``F.linear``) into a [C, V] scratch buffer, or ``z_c = logits[c]`` when the
   model already materialised its final logits (they are an output of the model);
2. one Triton program per row reads the row twice (online max / log-sum-exp over ``V`` in blocks,
   then the gradient) and writes the row's loss and ``g`` over ``z_c`` in place (into a second
   scratch when ``z_c`` is the caller's ``logits``, which are never modified);
3. ``dx[c] = g_c @ weight`` (fp32) and, when the lm_head is trained, ``dw += g_c^T @ hidden_c``
   (fp32 accumulator) and ``db += sum over rows of g_c``.

So the forward computes the loss *and* the gradients (for ``grad_output = 1``); the backward only
scales them by ``grad_output``. The chunk's scale and softcap are applied when ``z`` is loaded
(they are never materialised) and rounded to hidden's dtype after each step, as eager rounds them,
so that the loss is eager's function of the same logits whether or not ``logits`` is given.

Mean's ``1 / n_valid`` is a device scalar (no host sync): the row kernel multiplies ``g`` by it
for bf16/fp32 (their exponent range holds ``g / n_valid``); for fp16, where ``g / n_valid`` of a
large batch underflows (eager then relies on a loss scale in ``grad_output``, which only arrives
in the backward), ``g`` stays unscaled and ``dx``, ``dw``, ``db`` are scaled at the end.

Off the Triton path (CPU without ``TRITON_INTERPRET=1``, float64) the same chunk loop runs with
the row math in plain torch (``linear_cross_entropy_rows_reference``), so it saves memory as well.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from slothc.kernels._launch import (
    KERNEL_DTYPES,
    cdiv,
    device_guard,
    next_power_of_2,
    num_warps_for,
    use_triton,
)

REDUCTIONS = ("mean", "sum")

# Chunk buffer budget. A [C, V] chunk in the input dtype is what the op holds instead of the
# [N, V] logits; 256 MiB (1K rows of a 128K vocabulary in bf16) keeps each of the chunk's GEMMs
# large enough to run cuBLAS at full rate while staying small next to a model's activations.
CHUNK_BYTES = 256 * 2**20
# With the lm_head trained every chunk also reads and writes the fp32 dW accumulator [V, H]
# (8 * V * H bytes) against 6 * C * V * H flops of GEMMs: on an H100 (~3.3 TB/s, ~700 dense bf16
# TFLOP/s) that traffic costs about 250 / C of the GEMM time, so chunks are made 4x larger
# (~4K rows at 128K vocabulary: ~6%) there.
CHUNK_BYTES_DW = 4 * CHUNK_BYTES
# Chunks are a multiple of this many rows (a tensor-core tile of the GEMMs, so no chunk ends in a
# ragged tile), and never fewer.
CHUNK_ROW_MULTIPLE = 128

# The row kernel's block over the vocabulary: 4096 elements (16 a thread with 8 warps) per load,
# looped V / 4096 times per pass. Under the interpreter a small block, so that the tests' small
# vocabularies still take several blocks with a ragged last one.
MAX_BLOCK_SIZE_V = 4096
_INTERPRETER_BLOCK_SIZE_V = 32


# --------------------------------------------------------------------------------------------
# Reference: the math spec, and the row math off the Triton path.
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 for fp32/bf16/fp16 (eager's logits.float()); float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def final_logits_reference(raw: torch.Tensor, logit_scale: float, softcap: float) -> torch.Tensor:
    """``raw * logit_scale`` then ``softcap * tanh(z / softcap)``, each step in ``raw``'s dtype, as eager."""
    z = raw
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap != 0.0:
        z = torch.tanh(z / softcap) * softcap
    return z


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """The eager loss, spelled out: full ``[N, V]`` logits, ``F.cross_entropy`` on their fp32 copy.

    ``z = softcap * tanh(raw * logit_scale / softcap)``, ``raw = hidden @ weight^T + bias``;
    ``loss_i = lse_i - (1 - e) z_iy - e mean_v z_iv`` over non-ignored rows, summed or averaged.
    Differentiable; float64 inputs stay float64.
    """
    z = final_logits_reference(F.linear(hidden, weight, bias), logit_scale, softcap)
    return F.cross_entropy(
        z.to(_compute_dtype(z.dtype)), labels,
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )


def _softcap_derivative_reference(
    z: torch.Tensor, final: torch.Tensor, logit_scale: float, softcap: float, z_is_final: bool
) -> torch.Tensor:
    """``1 - tanh(u)^2`` in the compute dtype: ``1 / cosh(u)^2`` from ``u = z * logit_scale / softcap``
    (rounded as eager) when the logits are computed here, ``(1 - t)(1 + t)``, ``t = final / softcap``,
    from given final logits (module docstring)."""
    cdt = _compute_dtype(z.dtype)
    if z_is_final:
        t = final.to(cdt) / softcap
        return (1.0 - t).mul_(1.0 + t)
    scaled = z * logit_scale if logit_scale != 1.0 else z
    return torch.cosh((scaled / softcap).to(cdt)).square_().reciprocal_()


def linear_cross_entropy_rows_reference(
    z: torch.Tensor,
    g: Optional[torch.Tensor],
    labels: torch.Tensor,
    loss: torch.Tensor,
    grad_scale: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    z_is_final: bool,
) -> None:
    """Plain-torch twin of ``_linear_cross_entropy_fwd_kernel`` for one chunk of rows.

    ``z`` [C, V]: raw logits (scale and softcap applied here) or, with ``z_is_final``, final ones.
    Writes ``loss`` [C] (loss_i, 0 for ignored rows) and, if ``g`` is given, ``g`` [C, V] =
    d loss_i / d raw (times ``grad_scale``, a one-element tensor, if given); ``g`` may be ``z``
    itself. In fp32 (float64 for float64 ``z``), like the kernel.
    """
    cdt = _compute_dtype(z.dtype)
    n_cols = z.shape[1]
    final = z if z_is_final else final_logits_reference(z, logit_scale, softcap)  # maybe z itself
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0).to(torch.int64)[:, None]
    logp = torch.log_softmax(final.to(cdt), dim=1)
    row_loss = -(1.0 - label_smoothing) * logp.gather(1, target)[:, 0]
    if label_smoothing != 0.0:
        row_loss = row_loss - label_smoothing * logp.mean(1)
    loss.copy_(torch.where(valid, row_loss, 0.0))
    if g is None:
        return
    dz = logp.exp_()  # softmax, over logp's storage
    if label_smoothing != 0.0:
        dz.sub_(label_smoothing / n_cols)
    dz.scatter_add_(1, target, torch.full_like(target, label_smoothing - 1.0, dtype=cdt))
    if softcap != 0.0:
        dz.mul_(_softcap_derivative_reference(z, final, logit_scale, softcap, z_is_final))
    if logit_scale != 1.0:
        dz.mul_(logit_scale)
    dz.masked_fill_(~valid[:, None], 0.0)
    if grad_scale is not None:
        dz.mul_(grad_scale)
    g.copy_(dz)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _tanh_and_sech2(u):
    """``(tanh(u), 1 - tanh(u)^2)`` in fp32 from ``exp`` (Triton has no tanh; libdevice's does not
    run in the interpreter).

    With ``e = exp(-2|u|)`` (never overflows): ``tanh = sign(u) (1 - e) / (1 + e)``, except below
    |u| = 1/4, where ``1 - e`` cancels, the odd Taylor series to u^9 (next term < 1e-8 relative
    there); ``1 - tanh^2 = 4e / (1 + e)^2``, accurate also where tanh saturates and ``1 - t*t``
    would be all cancellation.
    """
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    t_big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    t_small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, t_small, t_big)
    sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
    return tl.where(u < 0.0, -t, t), sech2


@triton.jit
def _final_logits(
    z,  # fp32 block of raw logits (values of the input dtype)
    logit_scale,  # fp32
    softcap,  # fp32
    DTYPE: tl.constexpr,  # the input dtype: eager rounds to it after every step
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """``(z, d)``: ``z * logit_scale``, then ``tanh(z / softcap) * softcap``, each step rounded to
    ``DTYPE`` as eager; ``d = 1 - tanh(z / softcap)^2``, the softcap's derivative (1 without softcap)."""
    d = 1.0
    if HAS_SCALE:
        z = (z * logit_scale).to(DTYPE).to(tl.float32)
    if HAS_SOFTCAP:
        u = (z / softcap).to(DTYPE).to(tl.float32)
        t, d = _tanh_and_sech2(u)
        t = t.to(DTYPE).to(tl.float32)
        z = (t * softcap).to(DTYPE).to(tl.float32)
    return z, d


@triton.jit
def _linear_cross_entropy_fwd_kernel(
    z_ptr,  # [n_rows, n_cols] logits of the chunk (raw, or final with Z_IS_FINAL), unit column stride
    stride_z_row,  # elements between rows of z
    g_ptr,  # [n_rows, n_cols] out: d loss_i / d raw, z's dtype or fp32 (may be z_ptr: in place); COMPUTE_GRAD
    stride_g_row,  # elements between rows of g
    labels_ptr,  # [n_rows] integer labels
    loss_ptr,  # [n_rows] fp32 out: loss_i, 0 for ignored rows
    grad_scale_ptr,  # fp32 [1]: multiplies g (mean's 1 / n_valid); only with HAS_GRAD_SCALE
    n_cols,  # vocabulary size V
    ignore_index,  # rows with this label add no loss and get a zero gradient
    label_smoothing,  # e
    logit_scale,  # used with HAS_SCALE
    softcap,  # used with HAS_SOFTCAP
    Z_IS_FINAL: tl.constexpr,  # z already scaled and capped (the model's logits)
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,  # False: loss only, g untouched
    BLOCK_SIZE_V: tl.constexpr,  # vocabulary block of one load
):
    """One program per row, in fp32: pass 1 reads ``z`` block by block for the online max ``m``
    and ``s = sum exp(z - m)`` (rescaled when ``m`` grows), ``sum z`` and ``z_y``;
    ``loss = log(s) + (1 - e)(m - z_y) + e (m - sum z / V)`` (= lse - (1 - e) z_y - e mean z).
    Pass 2 reads ``z`` again and writes ``g = (exp(z - m - log(s)) - (1 - e)[v == y] - e / V)
    * (1 - tanh(u)^2) * logit_scale * grad_scale`` (module docstring: how ``1 - tanh(u)^2`` is
    evaluated). Ignored rows skip pass 1 and write zeros in pass 2."""
    row = tl.program_id(0).to(tl.int64)
    # Scalars arrive as fp32 from eager Triton but as fp64 from Inductor code: pin them.
    label_smoothing = tl.cast(label_smoothing, tl.float32)
    logit_scale = tl.cast(logit_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    z_row = z_ptr + row * stride_z_row

    y = tl.load(labels_ptr + row).to(tl.int64)
    valid = y != ignore_index
    # Out-of-range labels are rejected before the launch (an async assert on CUDA): the mask
    # keeps one from reading out of bounds meanwhile.
    y_in_range = valid & (y >= 0) & (y < n_cols)

    # Pass 1: log-sum-exp. Ignored rows loop zero times.
    m = float("-inf")
    s = 0.0
    sum_z = 0.0
    n_cols_pass1 = tl.where(valid, n_cols, 0)
    for start in range(0, n_cols_pass1, BLOCK_SIZE_V):
        cols = start + tl.arange(0, BLOCK_SIZE_V)
        mask = cols < n_cols
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        if not Z_IS_FINAL:
            z, _ = _final_logits(z, logit_scale, softcap, z_ptr.dtype.element_ty, HAS_SCALE, HAS_SOFTCAP)
        if HAS_SMOOTHING:
            sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block has a column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    # lse = m + log_s is never formed: rounded at the magnitude of m it would lose the bits of a
    # small loss (lse - z_y) and of every log-probability. As log_softmax does, keep z - m apart.
    # Ignored rows: m = 0, log_s = 0 (never used, and no log(0)).
    m = tl.where(valid, m, 0.0)
    log_s = tl.log(tl.where(valid, s, 1.0))

    z_y = tl.load(z_row + y, mask=y_in_range, other=0.0).to(tl.float32)
    if not Z_IS_FINAL:
        z_y, _ = _final_logits(z_y, logit_scale, softcap, z_ptr.dtype.element_ty, HAS_SCALE, HAS_SOFTCAP)
    if HAS_SMOOTHING:
        loss = log_s + (1.0 - label_smoothing) * (m - z_y) + label_smoothing * (m - sum_z / n_cols)
    else:
        loss = log_s + (m - z_y)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

    if COMPUTE_GRAD:
        # Pass 2: the gradient. Ignored rows load nothing and store zeros.
        g_row = g_ptr + row * stride_g_row
        target_weight = 1.0 - label_smoothing  # subtracted at the label's column
        smooth = label_smoothing / n_cols  # subtracted everywhere
        factor = 1.0
        if HAS_SCALE:
            factor = factor * logit_scale
        if HAS_GRAD_SCALE:
            factor = factor * tl.load(grad_scale_ptr)
        factor = tl.where(valid, factor, 0.0)
        for start in range(0, n_cols, BLOCK_SIZE_V):
            cols = start + tl.arange(0, BLOCK_SIZE_V)
            mask = cols < n_cols
            z = tl.load(z_row + cols, mask=cols < n_cols_pass1, other=0.0).to(tl.float32)  # none if ignored
            if Z_IS_FINAL:
                # Only the capped z is known: 1 - t^2 = (1 - t)(1 + t), t = z / softcap, whose
                # 1 - t is exact (no rounding of t * t to cancel).
                d_softcap = 1.0
                if HAS_SOFTCAP:
                    t = z / softcap
                    d_softcap = (1.0 - t) * (1.0 + t)
            else:
                z, d_softcap = _final_logits(z, logit_scale, softcap, z_ptr.dtype.element_ty, HAS_SCALE, HAS_SOFTCAP)
            g = tl.exp((z - m) - log_s)  # softmax
            # One subtraction per element (p - (1 - e + e / V) at the label, p - e / V elsewhere):
            # near p ~ 1 - e every rounding of p - e / V would count at the label's gradient.
            if HAS_SMOOTHING:
                g = g - tl.where(cols == y, target_weight + smooth, smooth)
            else:
                g = tl.where(cols == y, g - target_weight, g)
            if HAS_SOFTCAP:
                g = g * d_softcap
            g = g * factor
            tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def block_size_v(n_cols: int, device: torch.device) -> int:
    """The row kernel's vocabulary block: ``min(4096, next_pow2(V))`` (32 under the interpreter)."""
    cap = _INTERPRETER_BLOCK_SIZE_V if device.type == "cpu" else MAX_BLOCK_SIZE_V
    return min(cap, next_power_of_2(n_cols))


def linear_cross_entropy_rows(
    z: torch.Tensor,
    g: Optional[torch.Tensor],
    labels: torch.Tensor,
    loss: torch.Tensor,
    grad_scale: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    z_is_final: bool,
) -> None:
    """Launch ``_linear_cross_entropy_fwd_kernel`` on one chunk (one program per row); same
    contract as ``linear_cross_entropy_rows_reference``."""
    n_rows, n_cols = z.shape
    assert z.stride(1) == 1 or n_cols == 1, "z rows must have unit column stride"
    assert labels.shape == (n_rows,) and labels.is_contiguous(), "labels: contiguous [n_rows]"
    assert loss.shape == (n_rows,) and loss.dtype == torch.float32 and loss.is_contiguous()
    if g is not None:
        # g in z's dtype, or fp32 (slothc::cross_entropy keeps fp16 logits' gradient in fp32)
        assert g.shape == z.shape and g.dtype in (z.dtype, torch.float32) and (g.stride(1) == 1 or n_cols == 1)
    if n_rows == 0:
        return
    block = block_size_v(n_cols, z.device)
    g_arg = g if g is not None else z  # never written without COMPUTE_GRAD
    with device_guard(z):
        _linear_cross_entropy_fwd_kernel[(n_rows,)](
            z, z.stride(0),
            g_arg, g_arg.stride(0),
            labels,
            loss,
            grad_scale if grad_scale is not None else loss,
            n_cols, int(ignore_index),
            float(label_smoothing), float(logit_scale), float(softcap),
            Z_IS_FINAL=bool(z_is_final),
            HAS_SCALE=logit_scale != 1.0,
            HAS_SOFTCAP=softcap != 0.0,
            HAS_SMOOTHING=label_smoothing != 0.0,
            HAS_GRAD_SCALE=grad_scale is not None,
            COMPUTE_GRAD=g is not None,
            BLOCK_SIZE_V=block,
            num_warps=num_warps_for(block),
        )


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, compute_dw: bool) -> int:
    """Rows per chunk: the [C, V] chunk buffer in ``dtype`` near ``CHUNK_BYTES`` (``CHUNK_BYTES_DW``
    with ``compute_dw``), a multiple of ``CHUNK_ROW_MULTIPLE`` rows (at least that many), balanced
    so that the last chunk is not much shorter than the others, and at most ``n_rows``.

    E.g. bf16, V = 128256: 1024 rows (4096 with dW); V = 256000: 512 (2048 with dW).
    """
    if n_rows <= 0:
        return 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = CHUNK_BYTES_DW if compute_dw else CHUNK_BYTES
    rows = max(CHUNK_ROW_MULTIPLE, budget // max(1, vocab * itemsize) // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE)
    n_chunks = cdiv(n_rows, rows)
    rows = cdiv(cdiv(n_rows, n_chunks), CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE
    return max(1, min(n_rows, rows))


def _chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, compute_dw: bool) -> int:
    # Looked up at call time, so a test may patch the module's chunk_rows.
    return chunk_rows(n_rows, vocab, dtype, compute_dw)


@functools.lru_cache(None)
def _has_fp32_out_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``aten::mm.dtype_out`` / ``addmm.dtype_out`` (16-bit inputs, fp32 result and
    accumulator) run on this device: CUDA in recent torch; not on the CPU. Probed once by calling
    them (an unsupported one raises at dispatch; nothing is compared, so no sync)."""
    if device_type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        a = torch.zeros((2, 2), dtype=dtype, device=device_type)
        acc = torch.zeros((2, 2), dtype=torch.float32, device=device_type)
        torch.ops.aten.mm.dtype_out(a, a, torch.float32, out=acc)
        torch.ops.aten.addmm.dtype_out(acc, a, a, torch.float32, out=acc)
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return False
    return True


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fp32_out: bool) -> None:
    """``out = a @ b`` with ``out`` in the accumulation dtype (fp32 for 16-bit ``a``, ``b``)."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    elif fp32_out:
        torch.ops.aten.mm.dtype_out(a, b, out.dtype, out=out)
    else:  # a 16-bit product, rounded once more than the fp32 paths
        out.copy_(torch.mm(a, b))


def _addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fp32_out: bool) -> None:
    """``acc += a @ b`` with ``acc`` in the accumulation dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif fp32_out:
        torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
    else:
        acc.add_(torch.mm(a, b))


def check_labels(labels: torch.Tensor, n_cols: int, ignore_index: int) -> None:
    """Eager raises on a label outside ``[0, V)`` that is not ``ignore_index``: so do we (CPU: a
    ValueError naming the label; CUDA: an async assert, no sync)."""
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_cols))
    if labels.is_cuda:
        torch._assert_async(
            ~bad.any(),
            f"slothc::linear_cross_entropy: a label is outside [0, {n_cols}) and not ignore_index={ignore_index}",
        )
    elif bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(
            f"slothc::linear_cross_entropy: label {first} is outside [0, {n_cols}) (vocabulary size {n_cols}) "
            f"and is not ignore_index={ignore_index}"
        )


def linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    logits: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    compute_grad: bool,
    compute_dw: bool,
    chunk_rows: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The chunked loop (module docstring): ``(loss, dx, dw, db)``, the gradients for
    ``grad_output = 1`` in fp32 (``None`` where not computed: ``dx`` without ``compute_grad``,
    ``dw`` and ``db`` without ``compute_dw`` or, for ``db``, without a bias).

    The row math is the Triton kernel when ``use_triton(hidden)`` and the dtype is a kernel dtype,
    the plain-torch twin otherwise. ``chunk_rows`` overrides the module's heuristic.
    """
    _check_inputs(hidden, weight, bias, labels, logits, reduction, label_smoothing)
    if logits is not None and softcap != 0.0 and compute_grad:
        # The softcap's derivative from the given (rounded) capped logits, 1 - (z / softcap)^2,
        # loses its relative precision where tanh saturates; CUDA's eager autograd does better
        # (measured on an H200, fp16, V = 1812, softcap 2: 5x eager's dx error). Recompute the raw
        # logits instead: one chunk GEMM more, the derivative from the raw value (module docstring).
        logits = None
    n_rows, _ = hidden.shape
    n_cols = weight.shape[0]
    dtype = hidden.dtype
    acc_dtype = _compute_dtype(dtype)
    device = hidden.device
    compute_dw = compute_grad and compute_dw
    check_labels(labels, n_cols, ignore_index)
    labels = labels.contiguous()

    rows_per_chunk = chunk_rows if chunk_rows is not None else _chunk_rows(n_rows, n_cols, dtype, compute_dw)
    rows_per_chunk = max(1, min(int(rows_per_chunk), max(n_rows, 1)))
    kernel = use_triton(hidden) and dtype in KERNEL_DTYPES
    rows_fn = linear_cross_entropy_rows if kernel else linear_cross_entropy_rows_reference
    # The gradient GEMMs take the 16-bit g and give fp32 dx / dW. CUDA: cuBLAS writes fp32 directly
    # (mm / addmm dtype_out). The CPU has no such GEMM: fp32 copies of the operands (weight once,
    # each chunk's g and hidden), so that dx and dW are rounded once there too (the CPU path is
    # for tests and small runs). CUDA without dtype_out (older torch): a 16-bit product.
    fp32_out = _has_fp32_out_mm(device.type, dtype)
    upcast = device.type == "cpu" and dtype != acc_dtype
    weight_mm = weight.to(acc_dtype) if upcast and compute_grad else weight

    # Mean's 1 / n_valid, a device scalar. 16-bit g / n_valid would underflow only in fp16.
    grad_scale = None
    if reduction == "mean":
        n_valid = (labels != ignore_index).sum(dtype=acc_dtype)
        if compute_grad:
            grad_scale = (1.0 / n_valid.clamp(min=1.0)).reshape(1)
    scale_in_rows = grad_scale is not None and dtype != torch.float16

    loss_rows = torch.empty(n_rows, dtype=acc_dtype, device=device)
    dx = torch.empty((n_rows, hidden.shape[1]), dtype=acc_dtype, device=device) if compute_grad else None
    dw = torch.zeros(weight.shape, dtype=acc_dtype, device=device) if compute_dw else None
    db = torch.zeros(n_cols, dtype=acc_dtype, device=device) if (compute_dw and bias is not None) else None
    # The [C, V] scratch: the chunk's logits, overwritten by their gradient; with the caller's
    # logits, only the gradient (none in inference).
    need_buffer = logits is None or compute_grad
    buffer = torch.empty((rows_per_chunk, n_cols), dtype=dtype, device=device) if need_buffer and n_rows else None
    weight_t = weight.t()

    for start in range(0, n_rows, rows_per_chunk):
        end = min(start + rows_per_chunk, n_rows)
        h = hidden[start:end]
        if logits is None:
            z = buffer[: end - start]
            if bias is None:
                torch.mm(h, weight_t, out=z)
            else:
                torch.addmm(bias, h, weight_t, out=z)
            g = z if compute_grad else None
        else:
            z = logits[start:end]
            if n_cols > 1 and z.stride(1) != 1:
                z = z.contiguous()
            g = buffer[: end - start] if compute_grad else None
        rows_fn(
            z, g, labels[start:end], loss_rows[start:end], grad_scale if scale_in_rows else None,
            ignore_index, label_smoothing, logit_scale, softcap, logits is not None,
        )
        if compute_grad:
            g_mm = g.to(acc_dtype) if upcast else g
            _mm_into(dx[start:end], g_mm, weight_mm, fp32_out)
            if compute_dw:
                _addmm_into(dw, g_mm.t(), h.to(acc_dtype) if upcast else h, fp32_out)
                if db is not None:
                    db.add_(g_mm.sum(0, dtype=acc_dtype))

    if grad_scale is not None and not scale_in_rows:
        for t in (dx, dw, db):
            if t is not None:
                t.mul_(grad_scale)
    loss = loss_rows.sum()
    if reduction == "mean":
        loss = loss / n_valid  # 0 / 0 = NaN when every label is ignored, as eager
    return loss, dx, dw, db


# --------------------------------------------------------------------------------------------
# Custom op
# --------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, bias, labels, logits, reduction, label_smoothing) -> None:
    name = "slothc::linear_cross_entropy"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction {reduction!r}: expected one of {REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing {label_smoothing} is not in [0, 1]")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{name}: hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"{name}: hidden must be floating point, got {hidden.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{name}: weight {tuple(weight.shape)} does not match hidden {tuple(hidden.shape)} (H)")
    n_rows, n_cols = hidden.shape[0], weight.shape[0]
    for what, t, shape in (("weight", weight, None), ("bias", bias, (n_cols,)), ("logits", logits, (n_rows, n_cols))):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise ValueError(f"{name}: {what} dtype {t.dtype} differs from hidden's {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name}: {what} on {t.device}, hidden on {hidden.device}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: {what} shape {tuple(t.shape)}, expected {shape}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be integer class indices, got {labels.dtype}")
    if tuple(labels.shape) != (n_rows,):
        raise ValueError(f"{name}: labels shape {tuple(labels.shape)}, expected ({n_rows},)")
    if labels.device != hidden.device:
        raise ValueError(f"{name}: labels on {labels.device}, hidden on {hidden.device}")


@torch.library.custom_op("slothc::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    logits: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    logit_scale: float,
    softcap: float,
    compute_grad: bool,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, dx, dw, db)``: the loss of ``linear_cross_entropy_reference`` (fp32, 0-dim) and its
    gradients for ``grad_output = 1`` in fp32, computed chunk by chunk (module docstring).

    ``hidden`` [N, H], ``weight`` [V, H] and ``bias`` [V] share a dtype; ``labels`` [N] integer;
    ``logits`` [N, V]: the final logits (after scale and softcap) if the graph has them, else None.
    ``dx`` [N, H] needs ``compute_grad``; ``dw`` [V, H] and ``db`` [V] (with a bias) need
    ``compute_grad`` and ``compute_dw``; those not computed are empty tensors.
    """
    loss, dx, dw, db = linear_cross_entropy_fwd(
        hidden, weight, bias, labels, logits, ignore_index, reduction, label_smoothing,
        logit_scale, softcap, compute_grad, compute_dw,
    )
    empty = hidden.new_empty(0, dtype=torch.float32)
    return loss, *(t if t is not None else empty.clone() for t in (dx, dw, db))


@linear_cross_entropy.register_fake
def _linear_cross_entropy_fake(
    hidden, weight, bias, labels, logits, ignore_index, reduction, label_smoothing,
    logit_scale, softcap, compute_grad, compute_dw,
):
    _check_inputs(hidden, weight, bias, labels, logits, reduction, label_smoothing)
    acc = _compute_dtype(hidden.dtype)
    compute_dw = compute_grad and compute_dw
    loss = hidden.new_empty((), dtype=acc)
    dx = hidden.new_empty(hidden.shape, dtype=acc) if compute_grad else hidden.new_empty(0, dtype=torch.float32)
    dw = hidden.new_empty(weight.shape, dtype=acc) if compute_dw else hidden.new_empty(0, dtype=torch.float32)
    has_db = compute_dw and bias is not None
    db = hidden.new_empty(bias.shape, dtype=acc) if has_db else hidden.new_empty(0, dtype=torch.float32)
    return loss, dx, dw, db


def _linear_cross_entropy_setup_context(ctx, inputs, output):
    hidden, weight, bias, *_, compute_grad, compute_dw = inputs
    _, dx, dw, db = output
    ctx.mark_non_differentiable(dx, dw, db)
    ctx.save_for_backward(dx, dw, db)
    ctx.compute_grad = compute_grad
    ctx.compute_dw = compute_grad and compute_dw
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)


def _linear_cross_entropy_autograd_backward(ctx, grad_loss, _grad_dx, _grad_dw, _grad_db):
    dx, dw, db = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    name = "slothc::linear_cross_entropy"
    if (need_hidden or need_weight or need_bias) and not ctx.compute_grad:
        raise RuntimeError(
            f"{name} ran with compute_grad=False (inference) but a gradient is asked for: "
            "call it with compute_grad=True"
        )
    if (need_weight or need_bias) and not ctx.compute_dw:
        raise RuntimeError(
            f"{name} ran with compute_dw=False but the gradient of the weight or bias is asked for: "
            "call it with compute_dw=True"
        )
    hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
    grad_hidden = (dx * grad_loss).to(hidden_dtype) if need_hidden else None
    grad_weight = (dw * grad_loss).to(weight_dtype) if need_weight else None
    grad_bias = (db * grad_loss).to(bias_dtype) if need_bias else None
    return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "slothc::linear_cross_entropy",
    _linear_cross_entropy_autograd_backward,
    setup_context=_linear_cross_entropy_setup_context,
)
