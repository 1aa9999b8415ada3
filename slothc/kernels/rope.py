"""RoPE: the rotary position embedding of q and k in one kernel; its backward is the transposed rotation.

Models rotate the first ``rotary_dim`` channels of every head of q and k (all of them, or a part:
Phi, GPT-NeoX, StableLM) and pass the rest through. The rotated channels pair up as ``(x1_i, x2_i)``,
``i < rotary_dim / 2``:

- ``rotate_half`` (Llama, Mistral, Qwen, Gemma, ...): ``x1 = x[:r/2]``, ``x2 = x[r/2:r]``;
- ``interleaved`` (GPT-J, Cohere, GLM): ``x1 = x[0:r:2]``, ``x2 = x[1:r:2]``.

The result is laid out in the same pairing, except with ``deinterleave`` (DeepSeek-V3 and the other
MLA models: ``cat([x1 c - x2 s, x2 c + x1 s], -1)`` of the interleaved pairs): interleaved pairs in,
``[y1, y2]`` halves out, cos and sin paired as halves (``c1 = cos[:r/2]``, ``c2 = cos[r/2:]``); its
backward reads halves and writes interleaved pairs.

The model computes ``y = x * cos + rot(x) * sin`` with ``rot(x) = (-x2, x1)`` in the same pairing, so
for each pair, with ``c1, c2, s1, s2`` the cos and sin values at its two channels::

    y1 = x1 c1 - x2 s1
    y2 = x2 c2 + x1 s2

The vector-Jacobian product is the transpose of that (cos and sin are constants)::

    dx1 = dy1 c1 + dy2 s2
    dx2 = dy2 c2 - dy1 s1

which is the forward with ``(s1, s2)`` replaced by ``(-s2, -s1)``: one kernel does both
(``BACKWARD``). Every model's cos and sin repeat over a pair (``c1 == c2``, ``s1 == s2``), where this
is the rotation by ``-theta``; the formulas do not assume it, so any cos and sin of the right shape
(Qwen2-VL's multimodal sections, YaRN's scaled tables) give exactly what the model computes.

Layout. q and k have rank 3 or 4, the head channels last. cos and sin broadcast to them with size 1
over the head dim: ``[B, 1, S, D]`` for heads-first q ``[B, H, S, D]`` (``unsqueeze_dim=1``),
``[B, S, 1, D]`` for seq-first q ``[B, S, H, D]`` (``unsqueeze_dim=2``), a batch of 1 broadcast too.
:func:`rope_layout` views every tensor as ``[B, S, H, D]`` by strides (no copies: q and k usually are
transposed views of a projection's output), and one program handles one position: it loads that
position's cos and sin once and rotates all heads of q and of k (grouped-query k has fewer).
Each result has the strides of its input (``empty_like``), like eager's elementwise result.

The rotation is computed in fp32 and rounded once to the result dtype: ``out_dtype`` where the model
casts its result (Cohere computes in fp32 and casts back to q's dtype), else what eager's
``x * cos + rot(x) * sin`` promotes to (under autocast q is bf16 and cos fp32: the result is fp32).
The pass-through channels are copied (converted to the result dtype). Gradients are in q's and k's
dtypes; cos and sin get none (the op refuses inputs that would need one).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from slothc.kernels._launch import KERNEL_DTYPES, device_guard, next_power_of_2, use_triton

# Elements of one (head block x half rotary width) tile, and warps a program. Measured on an H200
# (bf16, seq 8192, 32 q / 8 kv heads, head dim 128, CUDA-graph replays, % of copy bandwidth; tiles
# 256..4096 x warps 1..16): rotate_half 91% at 512 elements and 4 warps (84% at 2048), interleaved
# 93-95% from 1024 up, partial (64 of 128) 84-86% at any tile. Small tiles keep more programs per SM
# (more loads in flight); the interleaved tile is split in registers and wants it wider.
_TILE = 512
_TILE_INTERLEAVED = 1024
_NUM_WARPS = 4
_PASS_BLOCK = 64  # pass-through channels copied per step


class RopeLayout(NamedTuple):
    """How a [.., D] tensor and its cos/sin are read as ``[B, S, H, D]`` and ``[B, S, rotary_dim]``."""

    dims: tuple  # (batch dim, seq dim, head dim) of the rank-4 view
    batch: int
    seq: int


def _padded(shape) -> tuple:
    return (1,) * (4 - len(shape)) + tuple(shape)


def _is_one(size) -> bool:
    # Symbolic sizes count as not 1 (no guard is taken); any consistent choice of head dim is
    # correct, it only orders the work.
    return type(size) is int and size == 1


# Why q/k and cos/sin cannot be read as [B, S, H, D] and [B, S, rotary_dim] (stable: the rope pass
# reports them as skip reasons).
RANK = "q/k are not 3-d or 4-d"
RANKS_DIFFER = "q and k have different ranks"
COS_RANK = "cos/sin have more dims than q/k"
COS_WIDTH = "cos/sin last dim is not the rotary dim"
BROADCAST_BEYOND = "cos/sin broadcast beyond q/k's shape"
NO_HEAD_DIM = "cos/sin vary over every dim of q/k (no head dim to broadcast over)"
QK_POSITIONS = "q and k differ in batch or sequence size"


def rope_layout(x_shapes, cos_shape, rotary_dim: int) -> RopeLayout | str:
    """The ``[B, S, H, D]`` reading of q (and k) for cos/sin of ``cos_shape``, or why there is none.

    The head dim is a dim over which cos/sin broadcast (size 1): the last one where q or k has more
    than one element, else the last one. q and k must then agree in batch and sequence sizes.
    """
    for x_shape in x_shapes:
        if len(x_shape) not in (3, 4):
            return RANK
        if len(x_shape) != len(x_shapes[0]):
            return RANKS_DIFFER
    if len(cos_shape) > len(x_shapes[0]) or len(cos_shape) < 1:
        return COS_RANK
    if cos_shape[-1] != rotary_dim:
        return COS_WIDTH
    x4s, c4 = [_padded(x) for x in x_shapes], _padded(cos_shape)
    for x4 in x4s:
        for i in range(3):
            if not _is_one(c4[i]) and c4[i] != x4[i]:
                return BROADCAST_BEYOND
    ones = [i for i in range(3) if _is_one(c4[i])]
    if not ones:
        return NO_HEAD_DIM
    multi = [i for i in ones if any(not _is_one(x4[i]) for x4 in x4s)]
    head = (multi or ones)[-1]
    batch, seq = (i for i in range(3) if i != head)
    for x4 in x4s[1:]:
        if x4[batch] != x4s[0][batch] or x4[seq] != x4s[0][seq]:
            return QK_POSITIONS
    return RopeLayout((batch, seq, head), x4s[0][batch], x4s[0][seq])


def _sizes_strides4(t: torch.Tensor, dims: tuple) -> tuple[tuple, tuple]:
    """Sizes and strides of ``t`` read as ``[batch, seq, head, channel]`` (``dims`` order), in plain
    ints, no view made (the launch is on every call's host path). A size-1 dim gets stride 0."""
    pad = 4 - t.dim()
    sizes, strides = (1,) * pad + tuple(t.shape), (0,) * pad + tuple(t.stride())
    strides = tuple(0 if n == 1 else st for n, st in zip(sizes, strides))
    order = (*dims, 3)
    return tuple(sizes[i] for i in order), tuple(strides[i] for i in order)


def _out_dtype(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


def _check(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool,
           deinterleave: bool = False):
    """Validate the operands; returns q's layout (k's is the same when given)."""
    if deinterleave and not interleaved:
        raise ValueError("slothc rope: deinterleave=True turns interleaved pairs into halves; it needs interleaved=True")
    if cos.shape != sin.shape:
        raise ValueError(f"slothc rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"slothc rope: rotary_dim must be a positive even int, got {rotary_dim!r}")
    xs = [("q", q)] + ([("k", k)] if k is not None else [])
    for name, x in xs:
        if x.shape[-1] < rotary_dim:
            raise ValueError(f"slothc rope: {name} head dim {x.shape[-1]} is smaller than rotary_dim {rotary_dim}")
    layout = rope_layout([tuple(x.shape) for _, x in xs], tuple(cos.shape), rotary_dim)
    if isinstance(layout, str):
        shapes = " and ".join(f"{name} {tuple(x.shape)}" for name, x in xs)
        raise ValueError(f"slothc rope: {shapes} with cos/sin {tuple(cos.shape)}: {layout}")
    return layout


# --------------------------------------------------------------------------------------------
# Reference (the math spec, and the CPU implementation)
# --------------------------------------------------------------------------------------------


def pairings(interleaved: bool, deinterleave: bool, backward: bool) -> tuple[bool, bool, bool]:
    """Whether the input, the result and cos/sin are paired interleaved (else as halves)."""
    forward_in, forward_out = interleaved, interleaved and not deinterleave
    table = forward_out
    return (forward_out, forward_in, table) if backward else (forward_in, forward_out, table)


def _pairs(t: torch.Tensor, interleaved: bool):
    """The two channels of each pair: even/odd (interleaved) or the two halves."""
    if interleaved:
        return t[..., 0::2], t[..., 1::2]
    half = t.shape[-1] // 2
    return t[..., :half], t[..., half:]


def rope_reference(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    interleaved: bool,
    backward: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    deinterleave: bool = False,
) -> torch.Tensor:
    """``y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2`` (``backward``: ``s1, s2 -> -s2, -s1``), channels
    past ``rotary_dim`` copied; computed in at least fp32, rounded once to ``out_dtype``."""
    out_dtype = out_dtype or _out_dtype(x, cos, sin)
    compute = torch.promote_types(out_dtype, torch.float32)
    x_pairs, y_pairs, table_pairs = pairings(interleaved, deinterleave, backward)
    x1, x2 = _pairs(x[..., :rotary_dim].to(compute), x_pairs)
    c1, c2 = _pairs(cos.to(compute), table_pairs)
    s1, s2 = _pairs(sin.to(compute), table_pairs)
    if backward:
        s1, s2 = -s2, -s1
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
    y = torch.stack((y1, y2), -1).flatten(-2) if y_pairs else torch.cat((y1, y2), -1)
    return torch.cat((y, x[..., rotary_dim:].to(compute)), -1).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _rope_heads(
    x_ptr,  # [B, S, H, D] input at this position's (b, s): pointer already offset
    out_ptr,  # [B, S, H, D] result, same position
    stride_x_h, stride_x_d,
    stride_out_h, stride_out_d,
    n_heads,
    head_dim,
    rotary_dim,
    c1, c2, s1, s2,  # [BLOCK_HALF] fp32 cos/sin at each pair's two channels (sin transposed for BACKWARD)
    IN_INTERLEAVED: tl.constexpr,  # how x's channels pair up (else as halves)
    OUT_INTERLEAVED: tl.constexpr,  # how the result's do
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    """Rotate the first ``rotary_dim`` channels of every head at one position, copy the rest.

    Both pairings load and store whole rows: rotate_half as its two halves, interleaved as one
    ``[BLOCK_H, 2 * BLOCK_HALF]`` tile split into its even and odd channels in registers (a stride-2
    access per member would halve the width of every memory transaction).
    """
    half = rotary_dim // 2
    offs = tl.arange(0, BLOCK_HALF)
    offs_pass = tl.arange(0, BLOCK_PASS)
    out_ty = out_ptr.dtype.element_ty
    for h0 in range(0, n_heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < n_heads
        x_row = x_ptr + offs_h[:, None] * stride_x_h
        out_row = out_ptr + offs_h[:, None] * stride_out_h
        offs_r = tl.arange(0, 2 * BLOCK_HALF)
        mask_r = mask_h[:, None] & (offs_r < rotary_dim)[None, :]
        mask = mask_h[:, None] & (offs < half)[None, :]
        if IN_INTERLEAVED:
            x = tl.load(x_row + offs_r[None, :] * stride_x_d, mask=mask_r, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
        else:
            x1 = tl.load(x_row + offs[None, :] * stride_x_d, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + (offs + half)[None, :] * stride_x_d, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
        if OUT_INTERLEAVED:
            y = tl.reshape(tl.join(y1, y2), (BLOCK_H, 2 * BLOCK_HALF))
            tl.store(out_row + offs_r[None, :] * stride_out_d, y.to(out_ty), mask=mask_r)
        else:
            tl.store(out_row + offs[None, :] * stride_out_d, y1.to(out_ty), mask=mask)
            tl.store(out_row + (offs + half)[None, :] * stride_out_d, y2.to(out_ty), mask=mask)
        for d0 in range(rotary_dim, head_dim, BLOCK_PASS):
            offs_d = d0 + offs_pass
            pmask = mask_h[:, None] & (offs_d < head_dim)[None, :]
            v = tl.load(x_row + offs_d[None, :] * stride_x_d, mask=pmask, other=0.0)
            tl.store(out_row + offs_d[None, :] * stride_out_d, v.to(out_ty), mask=pmask)


@triton.jit
def _load_pairs(row_ptr, stride_d, rotary_dim, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The fp32 values of one cos/sin row at each pair's first and second channel."""
    if INTERLEAVED:
        offs_r = tl.arange(0, 2 * BLOCK_HALF)
        v = tl.load(row_ptr + offs_r * stride_d, mask=offs_r < rotary_dim, other=0.0).to(tl.float32)
        v1, v2 = tl.split(tl.reshape(v, (BLOCK_HALF, 2)))
    else:
        half = rotary_dim // 2
        offs = tl.arange(0, BLOCK_HALF)
        v1 = tl.load(row_ptr + offs * stride_d, mask=offs < half, other=0.0).to(tl.float32)
        v2 = tl.load(row_ptr + (offs + half) * stride_d, mask=offs < half, other=0.0).to(tl.float32)
    return v1, v2


@triton.jit
def _rope_kernel(
    q_ptr, q_out_ptr,  # [B, S, Hq, D] q (or dq) and its result, by strides
    k_ptr, k_out_ptr,  # [B, S, Hk, D] k (or dk) and its result; unused without HAS_K
    cos_ptr, sin_ptr,  # [B or 1, S, rotary_dim] by strides (0 over a broadcast dim)
    n_seq,  # S
    n_q_heads, n_k_heads,
    head_dim, rotary_dim,
    stride_q_b, stride_q_s, stride_q_h, stride_q_d,
    stride_qo_b, stride_qo_s, stride_qo_h, stride_qo_d,
    stride_k_b, stride_k_s, stride_k_h, stride_k_d,
    stride_ko_b, stride_ko_s, stride_ko_h, stride_ko_d,
    stride_cos_b, stride_cos_s, stride_cos_d,
    stride_sin_b, stride_sin_s, stride_sin_d,
    HAS_K: tl.constexpr,
    IN_INTERLEAVED: tl.constexpr,  # x's channels pair as (2i, 2i+1); else (i, i + rotary_dim/2)
    OUT_INTERLEAVED: tl.constexpr,  # the result's
    TABLE_INTERLEAVED: tl.constexpr,  # cos's and sin's
    BACKWARD: tl.constexpr,  # the transposed rotation: sin (s1, s2) -> (-s2, -s1)
    BLOCK_HALF: tl.constexpr,  # >= rotary_dim / 2, a power of two
    BLOCK_HQ: tl.constexpr,  # heads of q rotated at once
    BLOCK_HK: tl.constexpr,  # heads of k rotated at once
    BLOCK_PASS: tl.constexpr,
):
    """One program per position (b, s): cos/sin loaded once, then every head of q and of k.

    ``y1 = x1 c1 - x2 s1``, ``y2 = x2 c2 + x1 s2`` per channel pair (module docstring).
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_seq
    s = pid % n_seq
    c1, c2 = _load_pairs(cos_ptr + b * stride_cos_b + s * stride_cos_s, stride_cos_d, rotary_dim, TABLE_INTERLEAVED, BLOCK_HALF)
    s1, s2 = _load_pairs(sin_ptr + b * stride_sin_b + s * stride_sin_s, stride_sin_d, rotary_dim, TABLE_INTERLEAVED, BLOCK_HALF)
    if BACKWARD:
        s1, s2 = -s2, -s1
    _rope_heads(
        q_ptr + b * stride_q_b + s * stride_q_s, q_out_ptr + b * stride_qo_b + s * stride_qo_s,
        stride_q_h, stride_q_d, stride_qo_h, stride_qo_d,
        n_q_heads, head_dim, rotary_dim, c1, c2, s1, s2,
        IN_INTERLEAVED, OUT_INTERLEAVED, BLOCK_HALF, BLOCK_HQ, BLOCK_PASS,
    )
    if HAS_K:
        _rope_heads(
            k_ptr + b * stride_k_b + s * stride_k_s, k_out_ptr + b * stride_ko_b + s * stride_ko_s,
            stride_k_h, stride_k_d, stride_ko_h, stride_ko_d,
            n_k_heads, head_dim, rotary_dim, c1, c2, s1, s2,
            IN_INTERLEAVED, OUT_INTERLEAVED, BLOCK_HALF, BLOCK_HK, BLOCK_PASS,
        )


def rope_launch(
    xs: list,
    outs: list,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    interleaved: bool,
    backward: bool,
    layout: RopeLayout,
    deinterleave: bool = False,
) -> None:
    """Launch ``_rope_kernel`` once for one or two tensors ``xs`` (q, k), writing ``outs``."""
    q, q_out = xs[0], outs[0]
    has_k = len(xs) == 2
    k, k_out = (xs[1], outs[1]) if has_k else (q, q_out)
    n_positions = layout.batch * layout.seq
    if n_positions == 0 or q.numel() == 0 and (not has_k or k.numel() == 0):
        return
    dims = layout.dims
    (_, _, n_q_heads, _), q_strides = _sizes_strides4(q, dims)
    (_, _, n_k_heads, _), k_strides = _sizes_strides4(k, dims)
    n_k_heads = n_k_heads if has_k else 0
    # cos/sin [b or 1, s or 1, 1, r]: the batch and seq strides are 0 where they broadcast
    cos_strides, sin_strides = (_sizes_strides4(t, dims)[1] for t in (cos, sin))
    block_half = next_power_of_2(rotary_dim // 2)
    x_pairs, y_pairs, table_pairs = (bool(p) for p in pairings(interleaved, deinterleave, backward))
    tile = _TILE_INTERLEAVED if interleaved else _TILE

    def block_h(n_heads):
        return max(1, min(next_power_of_2(n_heads), tile // block_half))

    with device_guard(q):
        _rope_kernel[(n_positions,)](
            q, q_out, k, k_out, cos, sin,
            layout.seq, n_q_heads, n_k_heads, q.shape[-1], rotary_dim,
            *q_strides, *_sizes_strides4(q_out, dims)[1],
            *k_strides, *_sizes_strides4(k_out, dims)[1],
            cos_strides[0], cos_strides[1], cos_strides[3],
            sin_strides[0], sin_strides[1], sin_strides[3],
            HAS_K=has_k, IN_INTERLEAVED=x_pairs, OUT_INTERLEAVED=y_pairs, TABLE_INTERLEAVED=table_pairs, BACKWARD=bool(backward),
            BLOCK_HALF=block_half, BLOCK_HQ=block_h(n_q_heads), BLOCK_HK=block_h(max(n_k_heads, 1)),
            BLOCK_PASS=_PASS_BLOCK,
            num_warps=_NUM_WARPS,
        )


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


def _use_kernel(xs: list, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return use_triton(xs[0]) and all(t.dtype in KERNEL_DTYPES for t in (*xs, cos, sin))


def _empty(xs: list, out_dtypes: list, out_strides: Optional[list]) -> list:
    """Results like ``xs`` (``empty_like``), or with the given strides."""
    if out_strides is None:
        return [torch.empty_like(x, dtype=d) for x, d in zip(xs, out_dtypes)]
    for x, st in zip(xs, out_strides):
        if len(st) != x.dim():
            raise ValueError(f"slothc rope: strides {tuple(st)} do not fit a {x.dim()}-d gradient")
    return [torch.empty_strided(x.shape, st, dtype=d, device=x.device) for x, d, st in zip(xs, out_dtypes, out_strides)]


def _rotate(xs: list, out_dtypes: list, cos, sin, rotary_dim: int, interleaved: bool, backward: bool, out_strides=None,
            deinterleave: bool = False) -> list:
    layout = _check(xs[0], xs[1] if len(xs) > 1 else None, cos, sin, rotary_dim, interleaved, deinterleave)
    outs = _empty(xs, out_dtypes, out_strides)
    if _use_kernel(xs, cos, sin):
        rope_launch(xs, outs, cos, sin, rotary_dim, interleaved, backward, layout, deinterleave)
    else:
        for x, out in zip(xs, outs):
            out.copy_(rope_reference(x, cos, sin, rotary_dim, interleaved, backward, out.dtype, deinterleave))
    return outs


@torch.library.custom_op("slothc::rope", mutates_args=())
def rope(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    interleaved: bool,
    out_dtype: Optional[torch.dtype],
    deinterleave: bool,
) -> list[torch.Tensor]:
    """``[x * cos + rot(x) * sin for x in (q, k)]`` on the first ``rotary_dim`` channels (module docstring).

    Results in ``out_dtype``, or (None) in the dtype eager's expression promotes to; ``deinterleave``:
    interleaved pairs in, halves out (DeepSeek-V3).
    """
    xs = [q] if k is None else [q, k]
    return _rotate(xs, _out_dtypes(xs, cos, sin, out_dtype), cos, sin, rotary_dim, interleaved, False, None, deinterleave)


def _out_dtypes(xs, cos, sin, out_dtype):
    return [out_dtype or _out_dtype(x, cos, sin) for x in xs]


@rope.register_fake
def _rope_fake(q, k, cos, sin, rotary_dim, interleaved, out_dtype, deinterleave):
    _check(q, k, cos, sin, rotary_dim, interleaved, deinterleave)
    xs = [q] if k is None else [q, k]
    return [torch.empty_like(x, dtype=d) for x, d in zip(xs, _out_dtypes(xs, cos, sin, out_dtype))]


@torch.library.custom_op("slothc::rope_backward", mutates_args=())
def rope_backward(
    dq: torch.Tensor,
    dk: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int,
    interleaved: bool,
    q_dtype: torch.dtype,
    k_dtype: Optional[torch.dtype],
    q_strides: list[int],
    k_strides: Optional[list[int]],
    deinterleave: bool,
) -> list[torch.Tensor]:
    """The input gradients of ``slothc::rope``: the transposed rotation of ``dq`` (and ``dk``).

    They are written with the strides of the forward's results (``q_strides``, ``k_strides``), which
    are q's and k's own layout: whatever layout the upstream gradients come in (SDPA's backward keeps
    its inputs', a matmul-based attention gives contiguous ones), the gradient reaches the view that
    made q (``proj(x).view(B, S, H, D).transpose(1, 2)``) in the layout that view reads without a copy.
    """
    xs = [dq] if dk is None else [dq, dk]
    strides = [q_strides] if dk is None else [q_strides, k_strides]
    return _rotate(xs, [q_dtype, k_dtype][: len(xs)], cos, sin, rotary_dim, interleaved, True, strides, deinterleave)


@rope_backward.register_fake
def _rope_backward_fake(dq, dk, cos, sin, rotary_dim, interleaved, q_dtype, k_dtype, q_strides, k_strides, deinterleave):
    _check(dq, dk, cos, sin, rotary_dim, interleaved, deinterleave)
    xs = [dq] if dk is None else [dq, dk]
    strides = [q_strides] if dk is None else [q_strides, k_strides]
    return _empty(xs, [q_dtype, k_dtype][: len(xs)], strides)


def _rope_setup_context(ctx, inputs, output):
    q, k, cos, sin, rotary_dim, interleaved, out_dtype, deinterleave = inputs
    if cos.requires_grad or sin.requires_grad:
        raise NotImplementedError(
            "slothc::rope computes no gradient for cos/sin; pass detached cos and sin "
            "(the rope pass leaves such graphs unfused)"
        )
    ctx.save_for_backward(cos, sin)
    ctx.rotary_dim, ctx.interleaved, ctx.deinterleave = rotary_dim, interleaved, deinterleave
    ctx.q_dtype = q.dtype
    ctx.k_dtype = k.dtype if k is not None else None
    # The results' strides are q's and k's layout (empty_like): the gradients are written in it.
    ctx.strides = [list(t.stride()) for t in output]


def _rope_autograd_backward(ctx, grads):
    cos, sin = ctx.saved_tensors
    dq, dk = (list(grads) + [None])[:2]
    strides = ctx.strides + [None]
    pairs = [(g, d, st) for g, d, st in ((dq, ctx.q_dtype, strides[0]), (dk, ctx.k_dtype, strides[1])) if g is not None]
    results = []
    if pairs:
        second = pairs[1] if len(pairs) > 1 else (None, None, None)
        results = torch.ops.slothc.rope_backward(
            pairs[0][0], second[0], cos, sin, ctx.rotary_dim, ctx.interleaved, pairs[0][1], second[1], pairs[0][2], second[2],
            ctx.deinterleave,
        )
    results = iter(results)
    dq_out = next(results) if dq is not None else None
    dk_out = next(results) if dk is not None else None
    return dq_out, dk_out, None, None, None, None, None, None


torch.library.register_autograd("slothc::rope", _rope_autograd_backward, setup_context=_rope_setup_context)
