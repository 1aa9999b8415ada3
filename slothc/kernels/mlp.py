"""MLP: ``act(g) * u`` fused with its down projection, the activation's derivative derived by sympy.

A gated MLP (Llama, Qwen, Mistral, Gemma, Phi-3, ...) computes ``Y = down(act(gate(x)) * up(x))``.
With ``g = gate(x)``, ``u = up(x)``, ``h = act(g) * u``::

    dh = dY W + sum_i s_i (dY B_i) A_i           (the down projection's backward, slothc::lora_linear)
    dg = dh * u * act'(g)                         (act' derived by sympy: slothc/derive.py)
    du = dh * act(g)

Eager keeps ``g``, ``act(g)``, ``u`` and ``h`` (four tensors of the intermediate size) from the forward
to the backward. Here:

- ``slothc::mlp_act(g, u, act)`` is ``h``, with a backward that recomputes ``act(g)`` from ``g``: it
  keeps ``g`` and ``u`` only;
- ``slothc::mlp(g, u, act, <down projection>)`` also does the down projection (frozen ``W``, optional
  LoRA adapters): it keeps ``g``, ``u`` and the small ``h A^T``, not ``h``. Its backward
  (:func:`mlp_down_bwd`) is ``dh`` by cuBLAS, then one kernel that reads ``dh, g, u`` once, writes
  ``dg, du`` and sums ``dA = s (dY B)^T h`` from the same tiles, ``h`` recomputed in registers and
  never written. Where that kernel does not apply (dtypes that differ, more than 128 ranks), ``h``
  is recomputed by the elementwise kernel for the GEMM ``dA``, and ``dg, du`` are written over the
  buffers of ``dh`` and of the recomputed ``h``.
- ``slothc::qlora_mlp`` is the same with a bitsandbytes 4-bit down projection (``slothc::qlora_linear``'s
  form): ``W`` is dequantised in the forward and again in the backward, and kept in neither.

The elementwise kernels are emitted by :mod:`slothc.derive` from the activation's expression; on CPU
the same formulas run as torch code. Both compute in fp32 and round once.
"""

from __future__ import annotations

from typing import Optional

import torch

from slothc.derive import activation as get_activation
from slothc.kernels._launch import KERNEL_DTYPES, as_rows, cdiv, device_guard, interpreting, next_power_of_2, num_sms, use_triton
from slothc.kernels.lora_linear import _check as check_lora
from slothc.kernels.lora_linear import (
    _mm_plus_low_rank, _no_autocast, _offsets, fake_outputs, lora_linear_bwd, lora_linear_fwd, low_rank_grads, stacked_a,
)
from slothc.kernels.qlora_linear import _Weights, _check_weights, weight_shapes

_BLOCK_SIZE_N = 1024
_NUM_WARPS = 4
# The backward kernel that also makes the down projection's dA (mlp_down_bwd): tiles of rows x
# columns, a few programs an SM; adapters of up to _MAX_DA_RANK ranks in all (G^T h in registers).
# The tiles: the best of bench/sweep_mlp_bwd.py's 54 at workload (a)'s shape on the H200 (0.176 ms,
# 90% of copy bandwidth, against 0.207 ms for 32, 128, 4, 4; bench/results/2026-12-02-h200-sweep_mlp_bwd.jsonl).
_DA_BLOCK_M, _DA_BLOCK_N, _DA_NUM_WARPS, _DA_PROGRAMS_PER_SM = 64, 64, 8, 2
_MAX_DA_RANK = 128


def _use_kernel(g: torch.Tensor, u: torch.Tensor) -> bool:
    return use_triton(g) and g.dtype in KERNEL_DTYPES and u.dtype in KERNEL_DTYPES and g.numel() > 0


def _check(g: torch.Tensor, u: torch.Tensor) -> None:
    if g.shape != u.shape:
        raise ValueError(f"slothc mlp: gate {tuple(g.shape)} and up {tuple(u.shape)} must have one shape")
    if g.dtype != u.dtype:
        raise ValueError(f"slothc mlp: gate ({g.dtype}) and up ({u.dtype}) must have one dtype")


# --------------------------------------------------------------------------------------------
# Elementwise: h = act(g) * u and its backward
# --------------------------------------------------------------------------------------------


def mlp_act_reference(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """Eager's ``act(g) * u``, as Hugging Face writes it (the spec the tests compare against)."""
    from slothc.derive import eager_activation

    return eager_activation(act)(g) * u


def mlp_act_fwd(g: torch.Tensor, u: torch.Tensor, act: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(g) * u`` (fp32 compute, one rounding to g's dtype); Triton where it runs, torch otherwise."""
    _check(g, u)
    a = get_activation(act)
    if not _use_kernel(g, u):
        return a.forward(g, u)
    g2, u2 = as_rows(g), as_rows(u)
    n_rows, n_cols = g2.shape
    # Allocated in g's shape, not a view of a 2-d buffer (autograd forbids in-place changes of views
    # that a custom op returns).
    h = out if out is not None else torch.empty(g.shape, dtype=g.dtype, device=g.device)
    grid = (n_rows, cdiv(n_cols, _BLOCK_SIZE_N))
    with device_guard(g):
        a.fwd_kernel[grid](g2, u2, h.view(n_rows, n_cols), g2.stride(0), u2.stride(0), n_cols,
                           BLOCK_SIZE_N=_BLOCK_SIZE_N, num_warps=_NUM_WARPS)
    return h


def mlp_act_bwd(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str, reuse: tuple = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh * u * act'(g), dh * act(g))``. ``reuse``: contiguous buffers of g's shape and dtype that
    may be overwritten with dg and du (dh itself may be one of them: each element is read before it
    is written)."""
    _check(g, u)
    a = get_activation(act)
    if not _use_kernel(g, u):
        return a.backward(dh, g, u)
    g2, u2, dh2 = as_rows(g), as_rows(u), as_rows(dh)
    n_rows, n_cols = g2.shape
    buffers = [b.view(n_rows, n_cols) for b in reuse if b.is_contiguous() and b.dtype == g.dtype and b.numel() == g.numel()]
    while len(buffers) < 2:
        buffers.append(torch.empty((n_rows, n_cols), dtype=g.dtype, device=g.device))
    dg, du = buffers[:2]
    grid = (n_rows, cdiv(n_cols, _BLOCK_SIZE_N))
    with device_guard(g):
        a.bwd_kernel[grid](
            dh2, g2, u2, dg, du, dh2.stride(0), g2.stride(0), u2.stride(0), n_cols,
            BLOCK_SIZE_N=_BLOCK_SIZE_N, num_warps=_NUM_WARPS,
        )
    return dg.view(g.shape), du.view(g.shape)


def mlp_down_bwd(dy, g, u, t, act, weights, lora_a, lora_b, scaling, base_dtype, lora_dtype, out_dtype):
    """``[dg, du, dA_0, ..., dB_0, ...]`` of the MLP tail without ``h``: ``dh = dY W + G A`` (cuBLAS,
    the update in its epilogue), then one kernel reads ``dh, g, u`` once and writes ``dg`` (over dh's
    buffer) and ``du``, and from the same tiles sums ``dA = G^T h`` with ``h`` recomputed in
    registers. Where the recompute-then-GEMM path would write ``h`` (the intermediate size, 128 MiB
    a layer at 8192 tokens x 8192 in bf16) and read it back, this writes nothing of it.

    ``weights``: the down projection's one weight, made when read (``weights[0]``: the QLoRA op
    dequantises there). None where this does not apply (no Triton, dtypes that differ, no adapters or
    more than ``_MAX_DA_RANK`` ranks, no gradient), the weight not made: the caller runs the composed path."""
    fused = base_dtype == lora_dtype == out_dtype == g.dtype
    offsets = _offsets(lora_a)
    r_total = offsets[-1]
    if not (fused and _use_kernel(g, u) and 0 < r_total <= _MAX_DA_RANK and dy is not None and dy.dtype == g.dtype):
        return None
    _check(g, u)
    a = get_activation(act)
    g2, u2 = as_rows(g), as_rows(u)
    n_rows, n_cols = g2.shape
    with _no_autocast(g):
        dy2 = dy.reshape(n_rows, -1)
        gl, db = low_rank_grads([dy2], t, lora_a, lora_b, scaling, [0] * len(lora_a), lora_dtype, n_rows)
        a_all = stacked_a(lora_a, lora_dtype)
        dh = _mm_plus_low_rank(dy2, weights[0].to(base_dtype), gl, a_all)  # [n_rows, n_cols], contiguous
        du = torch.empty_like(dh)
        col_blocks = cdiv(n_cols, _DA_BLOCK_N)
        splits = max(1, min(cdiv(n_rows, _DA_BLOCK_M), cdiv(num_sms(g.device) * _DA_PROGRAMS_PER_SM, col_blocks)))
        rows_per_program = cdiv(cdiv(n_rows, splits), _DA_BLOCK_M) * _DA_BLOCK_M
        splits = cdiv(n_rows, rows_per_program)
        part = torch.empty((splits, r_total, n_cols), dtype=torch.float32, device=g.device)
        with device_guard(g):
            a.bwd_da_kernel[(col_blocks, splits)](
                dh, g2, u2, gl, dh, du, part, dh.stride(0), g2.stride(0), u2.stride(0), gl.stride(0), n_rows, n_cols, r_total,
                rows_per_program, BLOCK_M=_DA_BLOCK_M, BLOCK_N=_DA_BLOCK_N, BLOCK_R=max(16, next_power_of_2(r_total)),
                DOT_FP32=g.dtype == torch.float32 or interpreting(), num_warps=_DA_NUM_WARPS,
            )
        # one rounding of the fp32 sum to the adapters' product dtype, as the BLAS rounds G^T h
        da_all = part.sum(0).to(lora_dtype)
        copy = len(lora_a) > 1  # outputs of a custom op may not alias each other
        da = [da_all[offsets[i] : offsets[i + 1]].to(lora_a[i].dtype, copy=copy) for i in range(len(lora_a))]
    return [dh.view(g.shape), du.view(g.shape), *da, *db]


def _tail_bwd(dy, g, u, t, act, weights, lora_a, lora_b, scaling, base_dtype, lora_dtype, out_dtype):
    """``[dg, du, dA_0, ..., dB_0, ...]`` of the MLP tail (``slothc::mlp`` and ``slothc::qlora_mlp``):
    :func:`mlp_down_bwd` where it applies; otherwise h is recomputed, the down projection's LoRA
    backward runs, and dg, du are written over the buffers of dh and of the recomputed h."""
    out = mlp_down_bwd(dy, g, u, t, act, weights, lora_a, lora_b, scaling, base_dtype, lora_dtype, out_dtype)
    if out is not None:
        return out
    h = mlp_act_fwd(g, u, act)
    dh, _, da, db = lora_linear_bwd([dy], h, t, weights, lora_a, lora_b, scaling, [0] * len(lora_a), base_dtype, lora_dtype, out_dtype,
                                    True)
    dg, du = mlp_act_bwd(dh, g, u, act, reuse=(dh, h))
    return [dg, du, *da, *db]


@torch.library.custom_op("slothc::mlp_act", mutates_args=())
def mlp_act(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    """``act(g) * u`` (``act`` one of :data:`slothc.derive.ACTIVATIONS`); its backward keeps g and u only."""
    return mlp_act_fwd(g, u, act).contiguous()


@mlp_act.register_fake
def _mlp_act_fake(g, u, act):
    _check(g, u)
    get_activation(act)
    return g.new_empty(g.shape)


@torch.library.custom_op("slothc::mlp_act_backward", mutates_args=())
def mlp_act_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)`` of ``slothc::mlp_act``."""
    dg, du = mlp_act_bwd(dh, g, u, act)
    return dg.contiguous(), du.contiguous()


@mlp_act_backward.register_fake
def _mlp_act_backward_fake(dh, g, u, act):
    return g.new_empty(g.shape), u.new_empty(u.shape)


def _mlp_act_setup_context(ctx, inputs, output):
    g, u, act = inputs
    ctx.save_for_backward(g, u)
    ctx.act = act


def _mlp_act_autograd_backward(ctx, dh):
    g, u = ctx.saved_tensors
    dg, du = torch.ops.slothc.mlp_act_backward(dh, g, u, ctx.act)
    return dg, du, None


torch.library.register_autograd("slothc::mlp_act", _mlp_act_autograd_backward, setup_context=_mlp_act_setup_context)


# --------------------------------------------------------------------------------------------
# The whole MLP tail: act(g) * u -> down projection (frozen W, optional LoRA)
# --------------------------------------------------------------------------------------------


def mlp_reference(g, u, act, weight, bias, lora_a, lora_b, scaling, base_dtype, lora_dtype, out_dtype):
    """Eager: ``h = act(g) * u`` then PEFT's LoRA linear on h (differentiable; plain torch)."""
    from slothc.kernels.lora_linear import lora_linear_reference

    h = mlp_act_reference(g, u, act)
    (y,) = lora_linear_reference(h, [weight], [bias], lora_a, lora_b, scaling, [0] * len(lora_a), base_dtype, lora_dtype, out_dtype)
    return y


@torch.library.custom_op("slothc::mlp", mutates_args=())
def mlp(
    g: torch.Tensor,
    u: torch.Tensor,
    act: str,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """``[Y, T]``: ``Y = down(act(g) * u)`` with the down projection as in ``slothc::lora_linear``, and
    its small saved product ``T = h [A_1; ...]^T`` (for the backward; the graph does not use it)."""
    h = mlp_act_fwd(g, u, act)
    (y,), t = lora_linear_fwd(h, [weight], [bias], lora_a, lora_b, scaling, [0] * len(lora_a), base_dtype, lora_dtype, out_dtype)
    return [y, t]


@mlp.register_fake
def _mlp_fake(g, u, act, weight, bias, lora_a, lora_b, scaling, base_dtype, lora_dtype, out_dtype):
    _check(g, u)
    get_activation(act)
    return fake_outputs(g, [weight], lora_a, lora_dtype, out_dtype)


@torch.library.custom_op("slothc::mlp_backward", mutates_args=())
def mlp_backward(
    dy: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    t: torch.Tensor,
    act: str,
    weight: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """``[dg, du, dA_0, ..., dB_0, ...]`` of ``slothc::mlp`` (:func:`_tail_bwd`)."""
    return _tail_bwd(dy, g, u, t, act, [weight], lora_a, lora_b, scaling, base_dtype, lora_dtype, out_dtype)


@mlp_backward.register_fake
def _mlp_backward_fake(dy, g, u, t, act, weight, lora_a, lora_b, scaling, base_dtype, lora_dtype, out_dtype):
    return [g.new_empty(g.shape), u.new_empty(u.shape), *[torch.empty_like(a) for a in lora_a], *[torch.empty_like(b) for b in lora_b]]


def _mlp_setup_context(ctx, inputs, output):
    g, u, act, weight, bias, lora_a, lora_b, scaling, base_dtype, lora_dtype, out_dtype = inputs
    ctx.n_adapters = len(lora_a)
    ctx.save_for_backward(g, u, output[1], weight, *lora_a, *lora_b)
    ctx.config = (act, list(scaling), base_dtype, lora_dtype, out_dtype)


def _mlp_autograd_backward(ctx, grads):
    g, u, t, weight, *adapters = ctx.saved_tensors
    lora_a, lora_b = adapters[: ctx.n_adapters], adapters[ctx.n_adapters :]
    act, scaling, base_dtype, lora_dtype, out_dtype = ctx.config
    dy = grads[0] if grads[0] is not None else torch.zeros((*g.shape[:-1], weight.shape[0]), dtype=out_dtype, device=g.device)
    out = torch.ops.slothc.mlp_backward(dy, g, u, t, act, weight, list(lora_a), list(lora_b), scaling, base_dtype, lora_dtype, out_dtype)
    dg, du = out[0], out[1]
    da, db = list(out[2 : 2 + ctx.n_adapters]), list(out[2 + ctx.n_adapters :])
    # torch.library matches the inputs' structure: an empty list input needs an empty list back.
    no_scaling = [] if not scaling else None
    return dg, du, None, None, None, da, db, no_scaling, None, None, None


torch.library.register_autograd("slothc::mlp", _mlp_autograd_backward, setup_context=_mlp_setup_context)


# --------------------------------------------------------------------------------------------
# The same with a bitsandbytes 4-bit down projection (QLoRA)
# --------------------------------------------------------------------------------------------


def _down_4bit(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, nested_blocksize, dtype,
               check=True):
    return _Weights(packed, absmax, absmax_8bit, absmax_code, absmax_offset, weight_shapes(shapes, 1), blocksize, quant_type,
                    nested_blocksize, dtype, check=check)


def _check_4bit_down(g, u, act, packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, bias, lora_a,
                     lora_b, scaling, nested_blocksize):
    _check(g, u)
    get_activation(act)
    ws = _check_weights(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, nested_blocksize)
    if len(ws) != 1:
        raise ValueError(f"slothc::qlora_mlp: one down projection, got {len(ws)} 4-bit weights")
    check_lora(g, ws, [bias], lora_a, lora_b, scaling, [0] * len(lora_a))
    return ws


@torch.library.custom_op("slothc::qlora_mlp", mutates_args=())
def qlora_mlp(
    g: torch.Tensor,
    u: torch.Tensor,
    act: str,
    packed: list[torch.Tensor],
    absmax: list[torch.Tensor],
    absmax_8bit: list[torch.Tensor],
    absmax_code: list[torch.Tensor],
    absmax_offset: list[torch.Tensor],
    shapes: list[int],
    blocksize: int,
    quant_type: str,
    bias: Optional[torch.Tensor],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    out_dtype: torch.dtype,
    nested_blocksize: int,
) -> list[torch.Tensor]:
    """``[Y, T]`` of ``slothc::mlp`` whose down projection is a 4-bit weight (one projection, in
    ``slothc::qlora_linear``'s form): neither ``h`` nor the dequantised ``W`` is kept."""
    _check_4bit_down(g, u, act, packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, bias, lora_a,
                     lora_b, scaling, nested_blocksize)
    h = mlp_act_fwd(g, u, act)
    weights = _down_4bit(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, nested_blocksize,
                         base_dtype, check=False)
    # PEFT's 4-bit layer adds base and update in the output dtype
    (y,), t = lora_linear_fwd(h, weights, [bias], lora_a, lora_b, scaling, [0] * len(lora_a), base_dtype, lora_dtype, out_dtype,
                              sum_dtype=out_dtype, check=False)
    return [y, t]


@qlora_mlp.register_fake
def _qlora_mlp_fake(g, u, act, packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, bias, lora_a,
                    lora_b, scaling, base_dtype, lora_dtype, out_dtype, nested_blocksize):
    ws = _check_4bit_down(g, u, act, packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, bias,
                          lora_a, lora_b, scaling, nested_blocksize)
    return fake_outputs(g, [g.new_empty(ws[0], device="meta")], lora_a, lora_dtype, out_dtype)


@torch.library.custom_op("slothc::qlora_mlp_backward", mutates_args=())
def qlora_mlp_backward(
    dy: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    t: torch.Tensor,
    act: str,
    packed: list[torch.Tensor],
    absmax: list[torch.Tensor],
    absmax_8bit: list[torch.Tensor],
    absmax_code: list[torch.Tensor],
    absmax_offset: list[torch.Tensor],
    shapes: list[int],
    blocksize: int,
    quant_type: str,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    out_dtype: torch.dtype,
    nested_blocksize: int,
) -> list[torch.Tensor]:
    """``[dg, du, dA_0, ..., dB_0, ...]`` of ``slothc::qlora_mlp``: W dequantised again, then
    :func:`_tail_bwd`."""
    weights = _down_4bit(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, nested_blocksize,
                         base_dtype)
    return _tail_bwd(dy, g, u, t, act, weights, lora_a, lora_b, scaling, base_dtype, lora_dtype, out_dtype)


@qlora_mlp_backward.register_fake
def _qlora_mlp_backward_fake(dy, g, u, t, act, packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type,
                             lora_a, lora_b, scaling, base_dtype, lora_dtype, out_dtype, nested_blocksize):
    return [g.new_empty(g.shape), u.new_empty(u.shape), *[torch.empty_like(a) for a in lora_a], *[torch.empty_like(b) for b in lora_b]]


def _qlora_mlp_setup_context(ctx, inputs, output):
    (g, u, act, packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, bias, lora_a, lora_b, scaling,
     base_dtype, lora_dtype, out_dtype, nested_blocksize) = inputs
    ctx.n_adapters, ctx.n_state = len(lora_a), len(absmax_8bit)
    ctx.save_for_backward(g, u, output[1], *packed, *absmax, *absmax_8bit, *absmax_code, *absmax_offset, *lora_a, *lora_b)
    ctx.config = (act, list(shapes), blocksize, quant_type, list(scaling), base_dtype, lora_dtype, out_dtype, nested_blocksize)


def _qlora_mlp_autograd_backward(ctx, grads):
    g, u, t, packed, absmax, *rest = ctx.saved_tensors
    n = ctx.n_state
    absmax_8bit, absmax_code, absmax_offset = list(rest[:n]), list(rest[n : 2 * n]), list(rest[2 * n : 3 * n])
    adapters = rest[3 * n :]
    lora_a, lora_b = list(adapters[: ctx.n_adapters]), list(adapters[ctx.n_adapters :])
    act, shapes, blocksize, quant_type, scaling, base_dtype, lora_dtype, out_dtype, nested_blocksize = ctx.config
    dy = grads[0] if grads[0] is not None else torch.zeros((*g.shape[:-1], shapes[0]), dtype=out_dtype, device=g.device)
    out = torch.ops.slothc.qlora_mlp_backward(dy, g, u, t, act, [packed], [absmax], absmax_8bit, absmax_code, absmax_offset, shapes,
                                              blocksize, quant_type, lora_a, lora_b, scaling, base_dtype, lora_dtype, out_dtype,
                                              nested_blocksize)
    dg, du = out[0], out[1]
    da, db = list(out[2 : 2 + ctx.n_adapters]), list(out[2 + ctx.n_adapters :])
    state = [None] * n if n else []
    no_adapters = [] if not ctx.n_adapters else None  # an empty list input needs an empty list back
    return (dg, du, None, [None], [None], state, list(state), list(state), None, None, None, None, da or no_adapters,
            db or no_adapters, no_adapters, None, None, None, None)


torch.library.register_autograd("slothc::qlora_mlp", _qlora_mlp_autograd_backward, setup_context=_qlora_mlp_setup_context)
