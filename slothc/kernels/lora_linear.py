"""LoRA linear: the frozen base matmul and the low-rank update in one op, with a derived backward.

One projection ``p`` with base weight ``W`` [M, K] (frozen), optional frozen bias ``b``, and adapters
``i`` with ``A_i`` [r_i, K], ``B_i`` [M, r_i] and scale ``s_i`` (PEFT's ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA)::

    Y = X W^T + b + sum_i s_i (X A_i^T) B_i^T

Backward (W and b frozen, so no dW, db). With ``T_i = X A_i^T`` [N, r_i] (saved by the forward) and
``G_i = s_i dY B_i`` [N, r_i]::

    dX   = dY W + sum_i G_i A_i          (dY W is the only big product; G_i A_i has rank r_i)
    dA_i = s_i (dY B_i)^T X = G_i^T X
    dB_i = s_i dY^T (X A_i^T) = s_i dY^T T_i

Several projections that read the same ``X`` (q/k/v, gate/up) are one call: the down-projections of
all their adapters are *one* matmul ``X [A_1; A_2; ...]^T`` (X read once for all of them), and in the
backward ``dX`` is accumulated over the projections into one buffer, with every ``G_i A_i`` in one
matmul ``[G_1, G_2, ...] [A_1; A_2; ...]``, and every ``dA_i`` in one ``[G_1, G_2, ...]^T X``.

Matmul order, so that each big operand is read as few times as possible:

- forward: ``T = X A^T`` (reads X), then per projection ``C = T (s B)^T (+ b)`` (small K = r) and
  ``Y = C + X W^T`` as one cuBLAS ``addmm`` (C read in its epilogue: the update costs one read of Y's
  size, no separate add pass). The scale is folded into the small ``B`` (``s B``: M x r values), not
  applied to Y.
- backward: ``G = dY (s B)`` and ``dB = s dY^T T`` from one read of dY (a Triton kernel where
  Triton runs, see ``_low_rank_grads_kernel``; two BLAS products elsewhere), ``dX = G A + dY W``
  (``addmm``, one more per projection), ``dA = G^T X`` (reads X).

Saved for the backward: X (needed for dA anyway) and the small T; the base output is not kept.

With PEFT's ``lora_dropout`` in training the adapters read ``Xa = dropout(X)``, computed by torch in
the graph (so its random mask is eager's) and passed as ``xa``: then ``T = Xa A^T``,
``dA = G^T Xa``, and the backward returns ``dX = dY W`` and ``dXa = G A`` apart (autograd takes
``dXa`` through the dropout and adds it to ``dX``); ``Xa`` is saved instead of ``X``.

Dtypes mirror what eager PEFT computes (``base_dtype``: the base linear's result, ``lora_dtype``: the
adapters' product, ``out_dtype``: PEFT's final ``result.to(torch_result_dtype)``). Under autocast
these are the autocast dtype while X, the adapters or W may be fp32: the op casts its operands to
them, as autocast would, and computes with fp32 accumulation (cuBLAS). Eager PEFT with fp32 adapters
under bf16 autocast casts X to fp32 and back around every LoRA branch (``x.to(lora_A.weight.dtype)``,
then autocast's cast to bf16): a lossless round trip that the op skips. Gradients come back in the
dtypes of X, A and B (fp32 for fp32 adapters), like autocast's cast backward gives them.

When the three dtypes are one (all bf16 under autocast, all fp32 without), the fused path above runs;
otherwise (e.g. a bf16 model with fp32 adapters and no autocast: eager computes the base product in
bf16 and the update in fp32 and adds in fp32) the base and the update are computed separately in their
dtypes and summed in the promoted dtype, like eager.

The op runs the same code on CPU and CUDA (the matmuls are the vendor BLAS, and G and dB the Triton
kernel on CUDA or under the interpreter); it is a custom op so that
Inductor treats it as one opaque call and AOTAutograd uses the backward above.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from slothc.kernels._launch import KERNEL_DTYPES, cdiv, device_guard, interpreting, next_power_of_2, num_sms, use_triton


def _mm_plus_low_rank(p, q, l, r, bias=None, shape=None):
    """``p @ q + l @ r (+ bias)`` for the fused path (one dtype): ``l @ r`` (small K) first, then the
    big product accumulated onto it in place: cuBLAS reads it as C in the epilogue, overlapped with
    the compute. In place, because ``torch.addmm(c, p, q)`` into a new tensor first copies c there
    (a device-to-device copy of the whole output: measured 17 us a call at 8192 x 4096 on an H200).

    Measured against one Triton GEMM with the update in its epilogue on an H200 (bf16, 8192 tokens,
    r=16; bench/results/2026-12-01-h200-lora-epilogue-trial.jsonl): the Triton kernel reached 76-88%
    of the matmul peak where this composition reached 81-97%, so it was dropped.

    ``shape``: the result's shape (leading dims of the input), allocated as such, so that it is not a
    view (autograd forbids in-place changes of a view returned by a multi-output function).
    """
    out = torch.empty((*shape[:-1], shape[-1]) if shape else (p.shape[0], q.shape[1]), dtype=l.dtype, device=l.device)
    c = out.view(p.shape[0], q.shape[1])
    if bias is not None:
        torch.addmm(bias, l, r, out=c)
    else:
        torch.mm(l, r, out=c)
    c.addmm_(p, q)
    return out


# --------------------------------------------------------------------------------------------
# Layout of one call: projections, and adapters assigned to them
# --------------------------------------------------------------------------------------------


def _groups(adapter_proj: Sequence[int], n_proj: int) -> list[list[int]]:
    """Adapter indices of each projection."""
    groups: list[list[int]] = [[] for _ in range(n_proj)]
    for i, p in enumerate(adapter_proj):
        if not 0 <= p < n_proj:
            raise ValueError(f"slothc::lora_linear: adapter {i} belongs to projection {p}, but there are {n_proj}")
        groups[p].append(i)
    return groups


def stacked_a(lora_a: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``[A_1; A_2; ...]`` [sum r, K] in ``dtype`` (one adapter: no copy beyond the cast)."""
    return torch.cat([a.to(dtype) for a in lora_a]) if len(lora_a) > 1 else lora_a[0].to(dtype)


def _offsets(lora_a: Sequence[torch.Tensor]) -> list[int]:
    offsets = [0]
    for a in lora_a:
        offsets.append(offsets[-1] + a.shape[0])
    return offsets


def _check(x, weight_shapes, biases, lora_a, lora_b, scaling, adapter_proj, xa=None) -> None:
    """``weight_shapes``: each projection's ``(out, in)`` (the weights themselves may not exist yet:
    the QLoRA op dequantises them when first read)."""
    if xa is not None and tuple(xa.shape) != tuple(x.shape):
        raise ValueError(f"slothc::lora_linear: xa has shape {tuple(xa.shape)}, expected x's {tuple(x.shape)}")
    if len(weight_shapes) == 0:
        raise ValueError("slothc::lora_linear needs at least one projection")
    if len(biases) != len(weight_shapes):
        raise ValueError(f"slothc::lora_linear: {len(biases)} biases for {len(weight_shapes)} projections (use None for none)")
    if not len(lora_a) == len(lora_b) == len(scaling) == len(adapter_proj):
        raise ValueError(
            f"slothc::lora_linear: lora_a, lora_b, scaling and adapter_proj must have one entry per adapter, "
            f"got {len(lora_a)}, {len(lora_b)}, {len(scaling)}, {len(adapter_proj)}"
        )
    k = x.shape[-1]
    for p, (w, b) in enumerate(zip(weight_shapes, biases)):
        if len(w) != 2 or w[1] != k:
            raise ValueError(f"slothc::lora_linear: weight {p} has shape {tuple(w)}, expected (out, {k})")
        if b is not None and tuple(b.shape) != (w[0],):
            raise ValueError(f"slothc::lora_linear: bias {p} has shape {tuple(b.shape)}, expected ({w[0]},)")
    groups = _groups(adapter_proj, len(weight_shapes))
    for p, members in enumerate(groups):
        for i in members:
            a, b = lora_a[i], lora_b[i]
            if a.dim() != 2 or a.shape[1] != k:
                raise ValueError(f"slothc::lora_linear: lora_a {i} has shape {tuple(a.shape)}, expected (r, {k})")
            if tuple(b.shape) != (weight_shapes[p][0], a.shape[0]):
                raise ValueError(
                    f"slothc::lora_linear: lora_b {i} has shape {tuple(b.shape)}, expected ({weight_shapes[p][0]}, {a.shape[0]})"
                )


@contextlib.contextmanager
def _no_autocast(x: torch.Tensor):
    # The op computes in the dtypes it is given; an ambient autocast (the caller's) must not recast
    # the matmuls inside it. No autograd either: the op's backward is its own (and out= matmuls
    # refuse inputs that require grad when the implementation is called directly).
    with torch.autocast(x.device.type, enabled=False), torch.no_grad():
        yield


# --------------------------------------------------------------------------------------------
# Reference: eager PEFT's math, term by term (the spec; tests compare the op against it)
# --------------------------------------------------------------------------------------------


def lora_linear_reference(x, weights, biases, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype):
    """What eager PEFT computes for each projection: ``(base + sum_i (x A_i^T B_i^T) * s_i).to(out_dtype)``
    with ``base`` in ``base_dtype`` and each update in ``lora_dtype`` (differentiable; plain torch)."""
    outs = []
    with torch.autocast(x.device.type, enabled=False):  # differentiable: no _no_autocast here
        for p, members in enumerate(_groups(adapter_proj, len(weights))):
            b = biases[p]
            result = torch.nn.functional.linear(
                x.to(base_dtype), weights[p].to(base_dtype), b.to(base_dtype) if b is not None else None
            )
            for i in members:
                xl = x.to(lora_dtype)
                update = torch.nn.functional.linear(torch.nn.functional.linear(xl, lora_a[i].to(lora_dtype)), lora_b[i].to(lora_dtype))
                result = result + update * scaling[i]
            outs.append(result.to(out_dtype))
    return outs


# --------------------------------------------------------------------------------------------
# The implementation (forward and backward)
# --------------------------------------------------------------------------------------------


def _scaled_b(lora_b, scaling, i, dtype):
    # s B in B's dtype (one rounding: the product is computed in fp32), then cast like autocast would.
    return (lora_b[i] * scaling[i]).to(dtype) if scaling[i] != 1.0 else lora_b[i].to(dtype)


def lora_linear_fwd(x, weights, biases, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, xa=None,
                    sum_dtype=None, check=True):
    """``([Y_p for each projection], T)``; ``T = Xa [A_1; A_2; ...]^T`` [N, sum r] in ``lora_dtype``,
    ``Xa`` the adapters' input: ``xa`` if given (PEFT's dropout of x in training), else x.
    ``sum_dtype``: the dtype base and update are added in when the dtypes differ (default: their
    promotion, as ``lora.Linear`` adds them; PEFT's 4-bit layer adds them in the output dtype).

    ``weights`` is read once per projection, in order (``weights[p]``): it may be a sequence that
    makes each weight when asked (the QLoRA op dequantises there, so that no full-precision weight
    outlives the call); such a caller checks the shapes itself (``check=False``)."""
    if check:
        _check(x, [tuple(w.shape) for w in weights], biases, lora_a, lora_b, scaling, adapter_proj, xa)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    xa2 = xa.reshape(-1, k) if xa is not None else x2
    n = x2.shape[0]
    groups = _groups(adapter_proj, len(weights))
    offsets = _offsets(lora_a)
    fused = base_dtype == lora_dtype == out_dtype
    with _no_autocast(x):
        if lora_a:
            a_all = stacked_a(lora_a, lora_dtype)
            xl = xa2.to(lora_dtype)
            t = xl @ a_all.t()
        else:
            t = x2.new_empty((n, 0), dtype=lora_dtype)
        xb = xl if lora_a and xa is None and base_dtype == lora_dtype else x2.to(base_dtype)
        outs = []
        for p, members in enumerate(groups):
            w, b = weights[p].to(base_dtype), biases[p]
            m = w.shape[0]
            if members:
                cols = [slice(offsets[i], offsets[i + 1]) for i in members]
                t_p = t[:, cols[0]] if len(members) == 1 else torch.cat([t[:, c] for c in cols], dim=1)
                scaled = [_scaled_b(lora_b, scaling, i, lora_dtype) for i in members]
                b_p = scaled[0] if len(scaled) == 1 else torch.cat(scaled, dim=1)  # no copy for one adapter
            # Each output is allocated in its final shape, never a view (see _mm_plus_low_rank).
            bias_b = b.to(base_dtype) if b is not None else None
            if fused and members:
                y = _mm_plus_low_rank(xb, w.t(), t_p, b_p.t(), bias_b, shape=(*lead, m))
            elif fused:
                y = torch.nn.functional.linear(xb.reshape(*lead, k), w, bias_b)
            else:
                y = torch.nn.functional.linear(xb.reshape(*lead, k), w, bias_b)
                if members:
                    promoted = sum_dtype or torch.promote_types(base_dtype, lora_dtype)
                    y = y.to(promoted) + (t_p @ b_p.t()).view(*lead, m).to(promoted)
                y = y.to(out_dtype)
            outs.append(y)
    return outs, t


def low_rank_grads(dys, t, lora_a, lora_b, scaling, adapter_proj, lora_dtype, n):
    """``(G, [dB_i])`` of the backward (module docstring): ``G = [s_i dY_p B_i for every adapter i]``
    [N, sum r] in ``lora_dtype`` (None without adapters), ``dB_i = s_i dY_p^T T_i``. ``dys``: each
    projection's [N, M_p] gradient, or None where it got none. Called with autocast off.

    Where Triton runs (:func:`low_rank_kernel_fits`), each projection's G and dB come from one
    kernel that reads dY once (:func:`low_rank_grads_triton`); otherwise from two BLAS products,
    each reading dY."""
    if t.shape[1] and low_rank_kernel_fits(dys, t, lora_a, adapter_proj, lora_dtype, n):
        return low_rank_grads_triton(dys, t, lora_a, lora_b, scaling, adapter_proj, lora_dtype, n)
    return _low_rank_grads_blas(dys, t, lora_a, lora_b, scaling, adapter_proj, lora_dtype, n)


def _low_rank_grads_blas(dys, t, lora_a, lora_b, scaling, adapter_proj, lora_dtype, n):
    offsets = _offsets(lora_a)
    dyls = [dy.to(lora_dtype) if dy is not None else None for dy in dys]
    gs, db = [], []
    for i, p in enumerate(adapter_proj):
        dyl = dyls[p]
        if dyl is None:  # the projection's output got no gradient
            gs.append(t.new_zeros((n, lora_a[i].shape[0]), dtype=lora_dtype))
            db.append(torch.zeros_like(lora_b[i]))
            continue
        gs.append(dyl @ _scaled_b(lora_b, scaling, i, lora_dtype))
        t_i = t[:, offsets[i] : offsets[i + 1]]
        if scaling[i] != 1.0:
            # s dY^T T rounded once: the BLAS scales its fp32 accumulator (alpha; beta = 0
            # ignores the uninitialised input), where the product rounded and then scaled would
            # round twice (a bf16 ulp off eager's on a small sum; found on the GPU)
            db_i = torch.empty((dyl.shape[1], t_i.shape[1]), dtype=lora_dtype, device=t.device)
            torch.addmm(db_i, dyl.t(), t_i, beta=0, alpha=scaling[i], out=db_i)
        else:
            db_i = dyl.t() @ t_i
        db.append(db_i.to(lora_b[i].dtype))
    g_all = (gs[0] if len(gs) == 1 else torch.cat(gs, dim=1)) if offsets[-1] else None
    return g_all, db


# --------------------------------------------------------------------------------------------
# G and dB in one pass over dY (Triton)
# --------------------------------------------------------------------------------------------
#
# For one projection, with its adapters' s B side by side ([M, R]) and their T columns ([N, R]):
#
#     G  = dY (s B)      [N, R]   a sum over dY's columns
#     dB = s dY^T T      [M, R]   a sum over dY's rows
#
# The BLAS path reads dY (the largest tensor of the backward after the weights) once for each. The
# kernel tiles dY into [BLOCK_N, BLOCK_M] tiles and computes both products from each tile it loads.
# Program (c, s) owns the columns of block c and the rows of split s: its dB rows stay in fp32
# registers over its rows, and each row block's G is complete over its columns. Neither sum is
# complete in one program (G over the column blocks, dB over the row splits), so each program
# writes fp32 partial sums, [C, N, BLOCK_R] for G and [S, M, BLOCK_R] for dB, which a second kernel
# adds up in a fixed order, scales and rounds once (no atomics: the same bits every run). Where
# one column block covers M (C = 1) G is written directly, and dB likewise where S = 1. The
# partials cost (32 / BLOCK_M + 32 S / N) of dY's bytes for R <= 16 and bf16 dY.
#
# Rounding is the BLAS path's: dY is cast to the adapters' dtype (as ``dy.to(lora_dtype)``), the
# products accumulate in fp32, dB is scaled in fp32 (cuBLAS's alpha) and each result is rounded
# once to ``lora_dtype``. fp32 adapters take IEEE fp32 products (torch's matmuls default to no TF32).

# ``SLOTHC_LOW_RANK_KERNEL=0`` takes the BLAS path everywhere (to measure one against the other).
LOW_RANK_KERNEL = os.environ.get("SLOTHC_LOW_RANK_KERNEL", "1") != "0"
# A projection's adapters' total rank up to which the kernel runs: its dB block is
# BLOCK_M x BLOCK_R fp32 values in registers, so BLOCK_M shrinks as R grows.
MAX_KERNEL_RANK = 128


@triton.jit
def _low_rank_grads_kernel(
    dy_ptr, stride_dy_n, stride_dy_m,  # dY [N, M], any dtype (cast to LORA_DTYPE on load)
    b_ptr, stride_b_m, stride_b_r,  # s B [M, R], LORA_DTYPE
    t_ptr, stride_t_n, stride_t_r,  # T [N, R], LORA_DTYPE
    g_ptr, stride_g_c, stride_g_n, stride_g_r,  # G: fp32 partials [C, N, BLOCK_R], or [N, R] if G_FINAL
    db_ptr, stride_db_s, stride_db_m, stride_db_r,  # dB: fp32 partials [S, M, BLOCK_R], or [M, R] if DB_FINAL
    N, M, R,
    rows_per_split,  # rows of one split (a multiple of BLOCK_N)
    db_scale,  # s, applied to dB when DB_FINAL
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    LORA_DTYPE: tl.constexpr,
    G_FINAL: tl.constexpr,
    DB_FINAL: tl.constexpr,
    DOT_FP32: tl.constexpr,  # products of fp32 values in fp32 (no TF32): fp32 adapters, and the interpreter,
    # whose 16-bit dot is not the GPU's (16-bit values are exact in fp32, and their products too)
    DB_T: tl.constexpr = False,  # dB^T = T^T dY (dY as the B operand, untransposed) instead of dY^T T
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    b = tl.load(b_ptr + offs_m[:, None] * stride_b_m + offs_r[None, :] * stride_b_r,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    if DB_T:
        acc_db = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    else:
        acc_db = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    for n0 in range(row_start, row_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < row_end
        rows = offs_n.to(tl.int64)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy_n + offs_m[None, :] * stride_dy_m,
                     mask=mask_n[:, None] & mask_m[None, :], other=0.0).to(LORA_DTYPE)
        t = tl.load(t_ptr + rows[:, None] * stride_t_n + offs_r[None, :] * stride_t_r,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if DOT_FP32:
            dy32 = dy.to(tl.float32)
            g = tl.dot(dy32, b.to(tl.float32), input_precision="ieee")
            if DB_T:
                acc_db = tl.dot(tl.trans(t.to(tl.float32)), dy32, acc_db, input_precision="ieee")
            else:
                acc_db = tl.dot(tl.trans(dy32), t.to(tl.float32), acc_db, input_precision="ieee")
        else:
            g = tl.dot(dy, b)
            if DB_T:
                acc_db = tl.dot(tl.trans(t), dy, acc_db)
            else:
                acc_db = tl.dot(tl.trans(dy), t, acc_db)
        if G_FINAL:
            tl.store(g_ptr + rows[:, None] * stride_g_n + offs_r[None, :] * stride_g_r, g.to(LORA_DTYPE),
                     mask=mask_n[:, None] & mask_r[None, :])
        else:
            tl.store(g_ptr + pid_c * stride_g_c + rows[:, None] * stride_g_n + offs_r[None, :] * stride_g_r, g,
                     mask=mask_n[:, None])
    if DB_T:
        db_offs = offs_r[:, None] * stride_db_r + offs_m[None, :] * stride_db_m
        db_mask = mask_r[:, None] & mask_m[None, :]
        part_mask = mask_m[None, :]
    else:
        db_offs = offs_m[:, None] * stride_db_m + offs_r[None, :] * stride_db_r
        db_mask = mask_m[:, None] & mask_r[None, :]
        part_mask = mask_m[:, None]
    if DB_FINAL:
        out = (acc_db * db_scale).to(LORA_DTYPE).to(db_ptr.dtype.element_ty)
        tl.store(db_ptr + db_offs, out, mask=db_mask)
    else:
        tl.store(db_ptr + pid_s * stride_db_s + db_offs, acc_db, mask=part_mask)


@triton.jit
def _sum_partials_kernel(
    p_ptr, stride_p_p, stride_p_l,  # fp32 partials [P, L, >= col0 + n_cols], unit column stride
    out_ptr, stride_o_l, stride_o_c,  # [L, n_cols]
    P, L, col0, n_cols,
    scale,  # applied in fp32 before the rounding
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROUND_DTYPE: tl.constexpr,  # rounded through this dtype, then stored in out's
):
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_l < L)[:, None] & (offs_c < n_cols)[None, :]
    ptrs = p_ptr + offs_l[:, None].to(tl.int64) * stride_p_l + (col0 + offs_c)[None, :]
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for p in range(0, P):  # in order: the same sum every run
        acc += tl.load(ptrs + p * stride_p_p, mask=mask, other=0.0)
    out = (acc * scale).to(ROUND_DTYPE).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_l[:, None].to(tl.int64) * stride_o_l + offs_c[None, :] * stride_o_c, out, mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def low_rank_config(n: int, m: int, r: int, device: torch.device) -> dict:
    """Tiles and grid of :func:`_low_rank_grads_kernel` for dY [n, m] and total rank r.

    BLOCK_M x BLOCK_R fp32 values of dB stay in registers (8192 a program: 32 a thread with 8
    warps); wide column blocks keep G's partials small (32 / BLOCK_M of dY's bytes at R = 16).
    The row splits S fill about two programs an SM, each with at least four row blocks. Under
    the interpreter the tiles are 16 wide so that the small test shapes take several column blocks
    and row splits (the partial sums and their masks are exercised)."""
    block_r = max(16, next_power_of_2(r))
    if interpreting() and device.type == "cpu":
        block_m, block_n, warps = 16, 16, 4
    else:
        block_m = max(16, min(next_power_of_2(m), 8192 // block_r))
        block_n = 32
        warps = 8 if block_m >= 256 else 4
    n_col_blocks = cdiv(m, block_m)
    target = 2 * num_sms(device)
    splits = max(1, min(cdiv(target, n_col_blocks), cdiv(n, 4 * block_n)))
    rows_per_split = cdiv(cdiv(n, splits), block_n) * block_n
    return dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_R=block_r, num_warps=warps,
                n_col_blocks=n_col_blocks, splits=cdiv(n, rows_per_split), rows_per_split=rows_per_split)


def low_rank_kernel_fits(dys, t, lora_a, adapter_proj, lora_dtype, n) -> bool:
    """Whether :func:`low_rank_grads` takes the Triton kernel: Triton runs for these tensors, the
    dtypes are the kernel's, and each projection's adapters have a total rank <= MAX_KERNEL_RANK."""
    if not LOW_RANK_KERNEL or n == 0 or not use_triton(t) or lora_dtype not in KERNEL_DTYPES:
        return False
    for p, members in enumerate(_groups(adapter_proj, len(dys))):
        if members and dys[p] is not None:
            if dys[p].dtype not in KERNEL_DTYPES or dys[p].shape[1] == 0:
                return False
            if sum(lora_a[i].shape[0] for i in members) > MAX_KERNEL_RANK:
                return False
    return True


def _sum_partials(partial, out, col0, scale, round_dtype):
    """``out = (scale * partial[:, :, col0 : col0 + out.shape[1]].sum(0))`` rounded through ``round_dtype``."""
    n_parts, length, _ = partial.shape
    n_cols = out.shape[1]
    block_c = max(16, next_power_of_2(n_cols))
    block_l = max(16, 4096 // block_c)
    _sum_partials_kernel[(cdiv(length, block_l),)](
        partial, partial.stride(0), partial.stride(1), out, out.stride(0), out.stride(1),
        n_parts, length, col0, n_cols, scale,
        BLOCK_L=block_l, BLOCK_C=block_c, ROUND_DTYPE=_TL_DTYPES[round_dtype], num_warps=4,
    )


def low_rank_grads_triton(dys, t, lora_a, lora_b, scaling, adapter_proj, lora_dtype, n):
    """:func:`low_rank_grads` with one :func:`_low_rank_grads_kernel` a projection (see above)."""
    offsets = _offsets(lora_a)
    g_all = t.new_empty((n, offsets[-1]), dtype=lora_dtype)
    db: list[Optional[torch.Tensor]] = [None] * len(lora_a)
    with device_guard(t):
        for p, members in enumerate(_groups(adapter_proj, len(dys))):
            if not members:
                continue
            dy = dys[p]
            if dy is None:  # the projection's output got no gradient
                for i in members:
                    g_all[:, offsets[i] : offsets[i + 1]].zero_()
                    db[i] = torch.zeros_like(lora_b[i])
                continue
            m = dy.shape[1]
            ranks = [lora_a[i].shape[0] for i in members]
            r = sum(ranks)
            side_by_side = members == list(range(members[0], members[-1] + 1))
            scaled = [_scaled_b(lora_b, scaling, i, lora_dtype) for i in members]
            b_p = scaled[0] if len(scaled) == 1 else torch.cat(scaled, dim=1)
            cols = [slice(offsets[i], offsets[i + 1]) for i in members]
            t_p = t[:, offsets[members[0]] : offsets[members[-1] + 1]] if side_by_side else torch.cat([t[:, c] for c in cols], 1)
            cfg = low_rank_config(n, m, r, t.device)
            n_c, n_s, block_r = cfg["n_col_blocks"], cfg["splits"], cfg["BLOCK_R"]
            g_final = n_c == 1 and side_by_side
            db_final = n_s == 1 and len(members) == 1
            g_out = g_all[:, offsets[members[0]] : offsets[members[-1] + 1]] if g_final else \
                torch.empty((n_c, n, block_r), dtype=torch.float32, device=t.device)
            if db_final:
                db_out = torch.empty(lora_b[members[0]].shape, dtype=lora_b[members[0]].dtype, device=t.device)
            else:
                db_out = torch.empty((n_s, m, block_r), dtype=torch.float32, device=t.device)
            g_strides = (0, *g_out.stride()) if g_final else g_out.stride()
            db_strides = (0, *db_out.stride()) if db_final else db_out.stride()
            _low_rank_grads_kernel[(n_c, n_s)](
                dy, dy.stride(0), dy.stride(1), b_p, b_p.stride(0), b_p.stride(1), t_p, t_p.stride(0), t_p.stride(1),
                g_out, *g_strides, db_out, *db_strides,
                n, m, r, cfg["rows_per_split"], float(scaling[members[0]]),
                BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_R=block_r, LORA_DTYPE=_TL_DTYPES[lora_dtype],
                G_FINAL=g_final, DB_FINAL=db_final, DOT_FP32=lora_dtype == torch.float32 or interpreting(), num_warps=cfg["num_warps"],
                **{k: cfg[k] for k in ("DB_T", "num_stages") if k in cfg},
            )
            col = 0
            for i, rank in zip(members, ranks):
                if not g_final:
                    _sum_partials(g_out, g_all[:, offsets[i] : offsets[i + 1]], col, 1.0, lora_dtype)
                if db_final:
                    db[i] = db_out
                else:
                    db[i] = torch.empty(lora_b[i].shape, dtype=lora_b[i].dtype, device=t.device)
                    _sum_partials(db_out, db[i], col, float(scaling[i]), lora_dtype)
                col += rank
    return g_all, db


def lora_linear_bwd(grads, x, t, weights, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, need_dx,
                    split=False, need_dxa=False, x_dtype=None):
    """``(dX or None, dXa or None, [dA_i], [dB_i])`` of :func:`lora_linear_fwd` (module docstring).

    ``x`` is the adapters' input (``Xa``). ``split``: the forward had a separate ``xa``; then
    ``dX = sum_p dY_p W_p`` (base path only, in ``x_dtype``) and ``dXa = G A`` are returned apart
    (autograd takes dXa through the dropout and adds it to dX). Otherwise ``dX`` is their sum.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    n = x2.shape[0]
    groups = _groups(adapter_proj, len(weights))
    offsets = _offsets(lora_a)
    r_total = offsets[-1]
    fused = base_dtype == lora_dtype == out_dtype
    with _no_autocast(x):
        dys = [g.reshape(n, -1) if g is not None else None for g in grads]
        g_all, db = low_rank_grads(dys, t, lora_a, lora_b, scaling, adapter_proj, lora_dtype, n)
        da = []
        if r_total:
            da_all = g_all.t() @ x2.to(lora_dtype)
            # Outputs of a custom op may not alias each other: slices of da_all are copied out.
            copy = len(lora_a) > 1
            da = [da_all[offsets[i] : offsets[i + 1]].to(lora_a[i].dtype, copy=copy) for i in range(len(lora_a))]
        dx = dxa = None
        wants_g_a = r_total and (need_dx and not split or split and need_dxa)
        a_all = stacked_a(lora_a, lora_dtype) if wants_g_a else None
        # Lazily: each weight is read (made, for the QLoRA op) once, in the one loop below that runs.
        projections = ((dys[p], weights[p]) for p in range(len(weights)) if dys[p] is not None)
        if split:
            if need_dxa:
                dxa = (g_all @ a_all if r_total else x2.new_zeros((n, k), dtype=lora_dtype)).to(x.dtype).view(*lead, k)
            if need_dx:
                acc = None
                for dy, w in projections:
                    wb = w.to(base_dtype)
                    acc = acc.addmm_(dy.to(base_dtype), wb) if acc is not None else dy.to(base_dtype) @ wb
                dx = (acc if acc is not None else x2.new_zeros((n, k), dtype=base_dtype)).to(x_dtype or x.dtype).view(*lead, k)
        elif need_dx:
            if fused:
                acc = None
                for j, (dy, w) in enumerate(projections):
                    wb = w.to(base_dtype)
                    if j == 0 and r_total:
                        acc = _mm_plus_low_rank(dy, wb, g_all, a_all)
                    else:
                        acc = acc.addmm_(dy, wb) if acc is not None else dy @ wb
                if acc is None and r_total:
                    acc = g_all @ a_all
                dx = acc if acc is not None else x2.new_zeros((n, k), dtype=base_dtype)
            else:
                promoted = torch.promote_types(base_dtype, lora_dtype)
                acc = (g_all @ a_all).to(promoted) if r_total else x2.new_zeros((n, k), dtype=promoted)
                for dy, w in projections:
                    acc = acc + (dy.to(base_dtype) @ w.to(base_dtype)).to(promoted)
                dx = acc
            dx = dx.to(x.dtype).view(*lead, k)
    return dx, dxa, da, db


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("slothc::lora_linear", mutates_args=())
def lora_linear(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[Optional[torch.Tensor]],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    adapter_proj: list[int],
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    out_dtype: torch.dtype,
    xa: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """``[Y_0, ..., Y_{P-1}, T]``: one output per projection (see the module docstring), then the
    saved low-rank product ``T`` (for the backward; the graph does not use it). ``xa``: the
    adapters' input when it is not ``x`` (PEFT's ``lora_dropout`` in training, computed by torch's
    own dropout in the graph, so that its random mask is eager's)."""
    outs, t = lora_linear_fwd(x, weights, biases, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, xa)
    return [*outs, t]


def fake_outputs(x, weights, lora_a, lora_dtype, out_dtype) -> list[torch.Tensor]:
    """Empty outputs of the forward (also slothc::mlp's, with h for x): one per projection, then T."""
    lead = x.shape[:-1]
    n = 1
    for s in lead:
        n = n * s
    outs = [x.new_empty((*lead, w.shape[0]), dtype=out_dtype) for w in weights]
    r_total = sum(a.shape[0] for a in lora_a)
    return [*outs, x.new_empty((n, r_total), dtype=lora_dtype)]


@lora_linear.register_fake
def _lora_linear_fake(x, weights, biases, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, xa=None):
    _check(x, [tuple(w.shape) for w in weights], biases, lora_a, lora_b, scaling, adapter_proj, xa)
    return fake_outputs(x, weights, lora_a, lora_dtype, out_dtype)


@torch.library.custom_op("slothc::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    grads: list[Optional[torch.Tensor]],
    x: torch.Tensor,
    t: torch.Tensor,
    weights: list[torch.Tensor],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    adapter_proj: list[int],
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    out_dtype: torch.dtype,
    need_dx: bool,
    split: bool = False,
    need_dxa: bool = False,
    x_dtype: Optional[torch.dtype] = None,
) -> list[torch.Tensor]:
    """``[dX, dXa, dA_0, ..., dB_0, ...]`` of ``slothc::lora_linear`` (``x``: the adapters' input;
    ``split``: the forward had a separate ``xa``, see :func:`lora_linear_bwd`); ``dX`` and ``dXa``
    are empty tensors where not asked for."""
    dx, dxa, da, db = lora_linear_bwd(grads, x, t, weights, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype,
                                      out_dtype, need_dx, split, need_dxa, x_dtype)
    empty = x.new_empty(0)
    return [dx if dx is not None else empty, dxa if dxa is not None else x.new_empty(0), *da, *db]


@lora_linear_backward.register_fake
def _lora_linear_backward_fake(grads, x, t, weights, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype,
                               need_dx, split=False, need_dxa=False, x_dtype=None):
    dx = x.new_empty(x.shape, dtype=(x_dtype or x.dtype) if split else x.dtype) if need_dx else x.new_empty(0)
    dxa = x.new_empty(x.shape) if split and need_dxa else x.new_empty(0)
    return [dx, dxa, *[torch.empty_like(a) for a in lora_a], *[torch.empty_like(b) for b in lora_b]]


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, xa = inputs
    t = output[-1]
    ctx.n_proj, ctx.n_adapters = len(weights), len(lora_a)
    ctx.bias_has_none = any(b is None for b in biases)
    ctx.split, ctx.x_dtype = xa is not None, x.dtype
    # The backward reads the adapters' input (for dA) and never the base input (W is frozen).
    ctx.save_for_backward(xa if xa is not None else x, t, *weights, *lora_a, *lora_b)
    ctx.config = (list(scaling), list(adapter_proj), base_dtype, lora_dtype, out_dtype)


def _backward(ctx, grads):
    x, t, *rest = ctx.saved_tensors
    weights = rest[: ctx.n_proj]
    lora_a = rest[ctx.n_proj : ctx.n_proj + ctx.n_adapters]
    lora_b = rest[ctx.n_proj + ctx.n_adapters :]
    scaling, adapter_proj, base_dtype, lora_dtype, out_dtype = ctx.config
    need_dx = ctx.needs_input_grad[0]
    need_dxa = ctx.split and ctx.needs_input_grad[10]
    out = torch.ops.slothc.lora_linear_backward(
        list(grads[: ctx.n_proj]), x, t, list(weights), list(lora_a), list(lora_b), scaling, adapter_proj,
        base_dtype, lora_dtype, out_dtype, need_dx, ctx.split, need_dxa, ctx.x_dtype,
    )
    dx = out[0] if need_dx else None
    dxa = out[1] if need_dxa else None
    da = list(out[2 : 2 + ctx.n_adapters])
    db = list(out[2 + ctx.n_adapters :])
    frozen = [None] * ctx.n_proj  # W and b: no gradient (the pass only fuses frozen ones)
    # torch.library matches the structure of the inputs: a Tensor?[] holding a None is one leaf.
    no_bias = None if ctx.bias_has_none else list(frozen)
    no_adapters = [] if not ctx.n_adapters else None  # an empty list input needs an empty list back
    grads_in = (dx, frozen, no_bias, da, db, no_adapters, no_adapters, None, None, None)
    # The structure follows the arguments as passed: xa is passed only when there is one.
    return (*grads_in, dxa) if ctx.split else grads_in


torch.library.register_autograd("slothc::lora_linear", _backward, setup_context=_setup_context)
