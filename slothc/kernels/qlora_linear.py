"""QLoRA linear: a bitsandbytes 4-bit (NF4/FP4) base weight, dequantised in Triton, plus LoRA.

The quantised weight (bitsandbytes' ``Params4bit`` and its ``QuantState``) is read as the tensors
bitsandbytes itself hands to its ops (``bitsandbytes::gemm_4bit`` / ``dequantize_4bit``):

- ``packed``: uint8, two 4-bit codes a byte, any shape with ``ceil(n / 2)`` elements (bitsandbytes
  keeps it as ``[n / 2, 1]``), for a weight of ``shape = (out, in)`` and ``n = out * in`` elements
  numbered row-major. Element ``2i`` is the high nibble of byte ``i``, element ``2i + 1`` the low.
- ``quant_type``: ``"nf4"`` or ``"fp4"``, which names the 16-entry code book (:data:`NF4_CODE`,
  :data:`FP4_CODE`).
- the block scales, one a ``blocksize`` elements (the last block may be partial):
  ``absmax`` (fp32) or, double-quantised (``bnb_4bit_use_double_quant``), ``absmax_8bit`` (uint8
  codes into ``absmax_code``, fp32 [256]) with ``absmax`` the fp32 scales of those codes, one a
  ``nested_blocksize`` (256) block scales, and ``absmax_offset`` (fp32 scalar) added after.

Dequantisation, exactly as bitsandbytes computes it (fp32 products, rounded once to the dtype)::

    scale[j] = absmax[j]                                                       (plain)
    scale[j] = absmax_code[absmax_8bit[j]] * absmax[j // nested_blocksize] + absmax_offset   (nested;
               the product rounded before the sum: no fused multiply-add)
    W[e]     = (code[nibble(e)] * scale[e // blocksize]).to(dtype)

The Triton kernel does it in one pass over the packed bytes: each program reads a run of bytes,
splits each into its two codes, looks both up (the 16-entry code book and the 256-entry absmax code
book stay in cache), computes the block scale (nested or not) and writes the two values side by
side. Bytes moved: ``n / 2`` read, ``n * itemsize`` written (the scales are ``1/blocksize`` of that).

``slothc::qlora_linear`` is the LoRA linear of ``slothc/kernels/lora_linear.py`` with such bases:
the forward dequantises ``W`` (to the base product's dtype), computes ``Y = X W^T + b + sum_i s_i
(X A_i^T) B_i^T`` with the same matmul order and dtype rules as ``slothc::lora_linear``, and drops
``W``; the backward dequantises ``W`` again for ``dX = dY W + ...`` (only when dX is needed). What
is saved between them is the 4-bit weight itself (already resident), ``X`` and the small ``T``: the
full-precision ``W`` never outlives one call. Like ``slothc::lora_linear``, one call may hold
several projections of one input (q/k/v, gate/up): their adapters' down-projections are one matmul,
their ``dX`` terms one accumulated buffer, and one call's fixed host cost is paid once for all of
them; on the GPU their weights are dequantised in one launch into one buffer, alive for the call's
matmuls (:func:`dequantize_weights`).

bitsandbytes' own backward (``MatMul4Bit``) dequantises to the ``QuantState``'s dtype and casts to
the gradient's dtype; the op dequantises straight to the base dtype. The two agree bit for bit when
the state's dtype is fp32 or the base dtype (a single rounding of the fp32 product either way); the
pass checks it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from slothc.kernels._launch import KERNEL_DTYPES, cdiv, device_guard, interpreting, use_triton
from slothc.kernels import lora_linear as lora
from slothc.kernels.lora_linear import lora_linear_bwd, lora_linear_fwd

# The 4-bit code books. NF4: the 16 quantiles of N(0, 1) normalised to [-1, 1] (Dettmers et al.,
# QLoRA, 2023), as fp32. FP4: bitsandbytes' e2m1 layout (sign bit 3), magnitudes
# {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12. Tests check both against bitsandbytes' ``get_4bit_type``.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # bitsandbytes' block of the double-quantised absmax

_CODES: dict = {}


def code_book(quant_type: str, device: torch.device) -> torch.Tensor:
    """The fp32 [16] code book of ``quant_type`` on ``device`` (cached)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"slothc: 4-bit quant_type {quant_type!r} is not one of {QUANT_TYPES}")
    key = (quant_type, str(device))
    if key not in _CODES:
        if quant_type == "nf4":
            code = torch.tensor(NF4_CODE, dtype=torch.float32)
        else:
            mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32) / 12.0
            code = torch.cat([mags, -mags])
            code[8] = 0.0  # bitsandbytes' code 8 is +0
        _CODES[key] = code.to(device)
    return _CODES[key]


def state_tensors(packed: torch.Tensor, quant_state) -> tuple:
    """``(packed, absmax, absmax_8bit, absmax_code, absmax_offset)`` of a bitsandbytes ``QuantState``,
    as its ``gemm_4bit`` reads them (double-quantised: ``absmax`` is ``state2.absmax``)."""
    qs = quant_state
    if qs.nested:
        return (packed, qs.state2.absmax, qs.absmax, qs.state2.code, qs.offset)
    return (packed, qs.absmax, None, None, None)


def op_state(weights) -> tuple:
    """``(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type,
    nested_blocksize)`` of ``slothc::qlora_linear`` for projections given as ``(packed, quant_state)``
    pairs (bitsandbytes' ``Params4bit.data`` and ``.quant_state``); all must share one blocksize,
    quant type and double quantisation."""
    lists = ([], [], [], [], [])
    shapes, configs = [], set()
    for packed, qs in weights:
        for items, value in zip(lists, state_tensors(packed, qs)):
            if value is not None:
                items.append(value)
        shapes += [int(s) for s in qs.shape]
        configs.add((int(qs.blocksize), qs.quant_type, bool(qs.nested), int(qs.state2.blocksize) if qs.nested else NESTED_BLOCKSIZE))
    if len(configs) != 1:
        raise ValueError(f"slothc::qlora_linear: one call's weights need one blocksize, quant type and double quantisation, got {sorted(configs)}")
    blocksize, quant_type, _, nested_blocksize = configs.pop()
    return (*lists, shapes, blocksize, quant_type, nested_blocksize)


def _check_4bit(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type, nested_blocksize):
    name = "slothc: 4-bit weight"
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{name}: quant_type {quant_type!r} is not one of {QUANT_TYPES}")
    if len(shape) != 2 or any(int(s) <= 0 for s in shape):
        raise ValueError(f"{name}: shape {tuple(shape)} is not a positive (out_features, in_features)")
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"{name}: blocksize {blocksize} must be a positive even number (bitsandbytes uses 32 to 4096)")
    n = int(shape[0]) * int(shape[1])
    if packed.dtype != torch.uint8 or packed.numel() != cdiv(n, 2):
        raise ValueError(
            f"{name}: packed codes must be uint8 with ceil({n} / 2) = {cdiv(n, 2)} elements for shape {tuple(shape)}, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    n_blocks = cdiv(n, blocksize)
    nested = absmax_8bit is not None
    if nested != (absmax_code is not None) or nested != (absmax_offset is not None):
        raise ValueError(f"{name}: absmax_8bit, absmax_code and absmax_offset are given together (double quantisation) or not at all")
    if nested:
        if absmax_8bit.dtype != torch.uint8 or absmax_8bit.numel() != n_blocks:
            raise ValueError(f"{name}: absmax_8bit must be uint8 with {n_blocks} elements (one a block), got {absmax_8bit.dtype} with {absmax_8bit.numel()}")
        if absmax_code.dtype != torch.float32 or absmax_code.numel() != 256:
            raise ValueError(f"{name}: absmax_code must be fp32 with 256 elements, got {absmax_code.dtype} with {absmax_code.numel()}")
        if absmax_offset.numel() != 1 or absmax_offset.dtype != torch.float32:
            raise ValueError(f"{name}: absmax_offset must be one fp32 value, got {absmax_offset.dtype} with {absmax_offset.numel()}")
        if nested_blocksize <= 0 or absmax.numel() != cdiv(n_blocks, nested_blocksize):
            raise ValueError(
                f"{name}: double-quantised absmax needs {cdiv(n_blocks, max(nested_blocksize, 1))} fp32 scales "
                f"(one a {nested_blocksize} blocks), got {absmax.numel()}"
            )
    elif absmax.numel() != n_blocks:
        raise ValueError(f"{name}: absmax must have {n_blocks} elements (one a {blocksize}-element block), got {absmax.numel()}")
    if absmax.dtype != torch.float32:
        raise ValueError(f"{name}: absmax must be fp32, got {absmax.dtype}")


# --------------------------------------------------------------------------------------------
# Reference (the spec, and the CPU implementation)
# --------------------------------------------------------------------------------------------


def block_scales_reference(absmax, absmax_8bit, absmax_code, absmax_offset, nested_blocksize=NESTED_BLOCKSIZE):
    """fp32 scale of every block: ``absmax``, or the double-quantised form decoded."""
    if absmax_8bit is None:
        return absmax.reshape(-1)
    q = absmax_8bit.reshape(-1).long()
    outer = absmax.reshape(-1).repeat_interleave(nested_blocksize)[: q.numel()]
    return absmax_code.reshape(-1)[q] * outer + absmax_offset.reshape(())


def dequantize_4bit_reference(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type, dtype,
                              nested_blocksize=NESTED_BLOCKSIZE):
    """The dequantised ``[out, in]`` weight in ``dtype`` (plain torch, bitsandbytes' arithmetic)."""
    n = int(shape[0]) * int(shape[1])
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()
    scales = block_scales_reference(absmax, absmax_8bit, absmax_code, absmax_offset, nested_blocksize)
    values = code_book(quant_type, packed.device)[codes] * scales.repeat_interleave(blocksize)[:n]
    return values.reshape(int(shape[0]), int(shape[1])).to(dtype)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

# Bytes a program: 2048 (4096 values), 4 warps; the scale is looked up per byte (repeated addresses
# in one block: cache hits). Measured on an H200 (bench/results/2026-12-01-h200-qlora.md, the first
# sweep; bench/results/2026-12-03-h200-dequant-sweep2.jsonl, the second): 1024-8192 bytes with 4 or 8
# warps are within 5% of each other; a variant reading whole blocks (one scale a block), one reading
# both codes in one 8-byte table load, 32-bit packed stores of a byte's two values and a code book
# read with ``tl.gather`` were no faster. The GPU's own fp32 -> bf16 conversion in place of the
# rounding done on the bits was: 71% -> 81% of copy bandwidth at 14336x4096, 85% -> 95% at
# 128256x4096.
_BLOCK_BYTES = 2048
_NUM_WARPS = 4
_MAX_PARTS = 3  # weights a launch (q/k/v; gate/up)


@triton.jit
def _dequantize_part(
    packed_ptr, absmax_ptr, absmax_8bit_ptr, absmax_code_ptr, absmax_offset_ptr, code_ptr, out_ptr, n, n_bytes, pid,
    HALF_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BF16_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Bytes ``pid * BLOCK ..`` of one weight of ``n`` values (``n_bytes = ceil(n / 2)``) into
    ``out_ptr`` (its first value). ``n_bytes`` is an argument, not computed here: Triton then knows
    when it is a multiple of 16 and loads the bytes 16 at a time (computed in the kernel, the loads
    went byte by byte: 60 us against 43 at 4096x14336 on the H200, diag_dequant_step.py)."""
    byte = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = byte < n_bytes
    b = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    block = byte // HALF_BLOCKSIZE  # both codes of a byte are in one block (blocksize is even)
    if NESTED:
        q = tl.load(absmax_8bit_ptr + block, mask=in_range, other=0).to(tl.int32)
        outer = tl.load(absmax_ptr + block // NESTED_BLOCKSIZE, mask=in_range, other=0.0)
        scale = tl.load(absmax_code_ptr + q) * outer
        scale = scale + tl.load(absmax_offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
    high = tl.load(code_ptr + (b >> 4)) * scale
    low = tl.load(code_ptr + (b & 15)) * scale
    values = tl.reshape(tl.join(high, low), (2 * BLOCK,))  # element 2i: high nibble, 2i + 1: low
    e = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    if BF16_BITS:
        # Round to nearest even on the bits: the Triton interpreter's fp32 -> bf16 cast truncates.
        # On the GPU the cast below rounds to nearest even itself, and is faster.
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = values.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + e, out, mask=e < n)


@triton.jit
def _dequantize_4bit_kernel(
    packed0, absmax0, absmax_8bit0, absmax_code0, absmax_offset0, n0, n_bytes0,
    packed1, absmax1, absmax_8bit1, absmax_code1, absmax_offset1, n1, n_bytes1,
    packed2, absmax2, absmax_8bit2, absmax_code2, absmax_offset2, n2, n_bytes2,
    code_ptr, out_ptr, start1, start2,
    PARTS: tl.constexpr, HALF_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
    BF16_BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Up to three weights in one launch, their values one after another in ``out``: programs
    ``[0, start1)`` the first, ``[start1, start2)`` the second, the rest the third."""
    pid = tl.program_id(0).to(tl.int64)
    if PARTS == 1 or pid < start1:
        _dequantize_part(packed0, absmax0, absmax_8bit0, absmax_code0, absmax_offset0, code_ptr, out_ptr, n0, n_bytes0, pid,
                         HALF_BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, BF16_BITS, BLOCK)
    elif PARTS == 2 or pid < start2:
        _dequantize_part(packed1, absmax1, absmax_8bit1, absmax_code1, absmax_offset1, code_ptr, out_ptr + n0, n1,
                         n_bytes1, pid - start1, HALF_BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, BF16_BITS, BLOCK)
    else:
        _dequantize_part(packed2, absmax2, absmax_8bit2, absmax_code2, absmax_offset2, code_ptr, out_ptr + n0 + n1, n2,
                         n_bytes2, pid - start2, HALF_BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, BF16_BITS, BLOCK)


def dequantize_4bit_group_launch(states, shapes, blocksize, quant_type, dtype, nested_blocksize=NESTED_BLOCKSIZE, out=None):
    """Run the Triton kernel on several weights of one in_features and one format, up to three a
    launch; ``states``: each weight's ``(packed, absmax, absmax_8bit, absmax_code, absmax_offset)``.
    Returns (or fills) one ``[sum out_p, in]`` buffer in ``dtype``, weight p its rows
    ``sum out_<p .. sum out_<=p``."""
    rows = [int(s[0]) for s in shapes]
    ks = {int(s[1]) for s in shapes}
    if len(ks) != 1:
        raise ValueError(f"slothc: weights dequantised into one buffer need one in_features, got shapes {list(shapes)}")
    k = ks.pop()
    device = states[0][0].device
    if out is None:
        out = torch.empty((sum(rows), k), dtype=dtype, device=device)
    code = code_book(quant_type, device)
    bf16_bits = dtype == torch.bfloat16 and interpreting()
    flat = out.view(-1)
    at = 0
    with device_guard(states[0][0]):
        for first in range(0, len(states), _MAX_PARTS):
            parts = list(range(first, min(first + _MAX_PARTS, len(states))))
            args = []
            for p in parts + [parts[-1]] * (_MAX_PARTS - len(parts)):  # unused slots repeat the last weight
                packed, absmax, a8, a_code, offset = states[p]
                nested = a8 is not None
                args += [packed.reshape(-1), absmax.reshape(-1), a8.reshape(-1) if nested else absmax,
                         a_code.reshape(-1) if nested else absmax, offset.reshape(-1) if nested else absmax,
                         rows[p] * k, cdiv(rows[p] * k, 2)]
            programs = [cdiv(cdiv(rows[p] * k, 2), _BLOCK_BYTES) for p in parts]
            start1 = programs[0]
            start2 = start1 + (programs[1] if len(parts) > 1 else 0)
            _dequantize_4bit_kernel[(sum(programs),)](
                *args, code, flat[at:], start1, start2,
                PARTS=len(parts), HALF_BLOCKSIZE=blocksize // 2, NESTED=states[first][2] is not None,
                NESTED_BLOCKSIZE=nested_blocksize, BF16_BITS=bf16_bits, BLOCK=_BLOCK_BYTES,
                num_warps=_NUM_WARPS,
                enable_fp_fusion=False,  # bitsandbytes rounds the product before adding the offset
            )
            at += sum(rows[p] for p in parts) * k
    return out


def dequantize_4bit_launch(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type, dtype,
                           nested_blocksize=NESTED_BLOCKSIZE, out=None):
    """Run the Triton kernel on one weight; returns the ``[out, in]`` weight in ``dtype`` (or fills ``out``)."""
    return dequantize_4bit_group_launch([(packed, absmax, absmax_8bit, absmax_code, absmax_offset)], [shape], blocksize,
                                        quant_type, dtype, nested_blocksize, out)


def dequantize(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type, dtype,
               nested_blocksize=NESTED_BLOCKSIZE, check=True):
    """Dequantise with the Triton kernel where it runs (CUDA, or the interpreter), else the reference.
    ``check=False``: the caller has checked the state already. One weight of :func:`dequantize_weights`."""
    return dequantize_weights([(packed, absmax, absmax_8bit, absmax_code, absmax_offset)], [shape], blocksize, quant_type, dtype,
                              nested_blocksize, check=check)[0]


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("slothc::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax_8bit: Optional[torch.Tensor],
    absmax_code: Optional[torch.Tensor],
    absmax_offset: Optional[torch.Tensor],
    shape: Sequence[int],
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
    nested_blocksize: int,
) -> torch.Tensor:
    """The ``[out, in]`` weight of a bitsandbytes 4-bit tensor in ``dtype`` (module docstring)."""
    return dequantize(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type, dtype,
                      nested_blocksize)


@dequantize_4bit.register_fake
def _dequantize_4bit_fake(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type, dtype,
                          nested_blocksize):
    _check_4bit(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type, nested_blocksize)
    return packed.new_empty((int(shape[0]), int(shape[1])), dtype=dtype)


class _Weights:
    """The projections' 4-bit weights as a sequence: ``weights[p]`` is W_p in ``dtype``, made when
    first read. The first read dequantises every projection of the call (:func:`dequantize_weights`:
    with the Triton kernel, in one launch into one buffer): one launch's fixed cost for q/k/v or
    gate/up, not one each (bench/results/2026-12-03-h200-dequant-sweep2.jsonl: q/k/v of
    Llama-3.1-8B 27.7 -> 22.2 us, gate/up 83.4 -> 79.6 us), for all of them alive during the call's
    matmuls (gate/up of Llama-3.1-8B in bf16: 235 MB, against 117 MB one at a time)."""

    def __init__(self, packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, nested_blocksize,
                 dtype, check=True):
        self.state = (packed, absmax, absmax_8bit, absmax_code, absmax_offset)
        self.shapes, self.blocksize, self.quant_type = shapes, blocksize, quant_type
        self.nested_blocksize, self.dtype = nested_blocksize, dtype
        self.check = check  # False: the caller has checked the state (the forward); the backward checks as it dequantises
        self._views = None

    def __len__(self):
        return len(self.state[0])

    def _one(self, p):
        packed, absmax, a8, code, offset = self.state
        nested = bool(a8)
        return (packed[p], absmax[p], a8[p] if nested else None, code[p] if nested else None, offset[p] if nested else None)

    def __getitem__(self, p):
        if self._views is None:
            self._views = dequantize_weights([self._one(q) for q in range(len(self))], self.shapes, self.blocksize,
                                             self.quant_type, self.dtype, self.nested_blocksize, check=self.check)
        return self._views[p]


def dequantize_weights(states, shapes, blocksize, quant_type, dtype, nested_blocksize=NESTED_BLOCKSIZE, check=True) -> list:
    """Every weight of one call in ``dtype`` (``states``: each one's ``(packed, absmax, absmax_8bit,
    absmax_code, absmax_offset)``, one in_features). With the Triton kernel: one launch (up to three
    weights a launch) into one buffer, the weights its row blocks; else the reference, one tensor
    each. ``check=False``: the caller has checked the states already."""
    if check:
        for one, shape in zip(states, shapes):
            _check_4bit(*one, shape, blocksize, quant_type, nested_blocksize)
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"slothc: 4-bit weights dequantise to fp32, bf16 or fp16, not {dtype}")
    if not use_triton(states[0][0]):
        return [dequantize_4bit_reference(*one, shape, blocksize, quant_type, dtype, nested_blocksize)
                for one, shape in zip(states, shapes)]
    buf = dequantize_4bit_group_launch(states, shapes, blocksize, quant_type, dtype, nested_blocksize)
    if len(shapes) == 1:
        return [buf]  # the buffer itself, not a view of it
    views, at = [], 0
    for m, _ in shapes:
        views.append(buf[at : at + int(m)])
        at += int(m)
    return views


def weight_shapes(shapes: Sequence[int], n_proj: int) -> list[tuple[int, int]]:
    """``[(out_p, in_p)]`` from the flat ``shapes`` argument (two ints a projection)."""
    if len(shapes) != 2 * n_proj:
        raise ValueError(f"slothc::qlora_linear: shapes has {len(shapes)} ints for {n_proj} projections (2 each: out, in)")
    return [(int(shapes[2 * p]), int(shapes[2 * p + 1])) for p in range(n_proj)]


def _check_weights(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, nested_blocksize):
    """Every projection's 4-bit state; returns the weight shapes."""
    n_proj = len(packed)
    if n_proj == 0:
        raise ValueError("slothc::qlora_linear needs at least one projection (one packed weight)")
    if not len(absmax_8bit) == len(absmax_code) == len(absmax_offset):
        raise ValueError(
            f"slothc::qlora_linear: absmax_8bit, absmax_code and absmax_offset are given together (one a projection, double "
            f"quantisation) or not at all (empty lists), got {len(absmax_8bit)}, {len(absmax_code)}, {len(absmax_offset)}"
        )
    nested = len(absmax_8bit) > 0
    for name, items in (("absmax", absmax), ("absmax_8bit", absmax_8bit), ("absmax_code", absmax_code), ("absmax_offset", absmax_offset)):
        expected = n_proj if name == "absmax" or nested else 0
        if len(items) != expected:
            raise ValueError(
                f"slothc::qlora_linear: {len(items)} {name} tensors for {n_proj} projections (absmax_8bit, absmax_code and "
                f"absmax_offset: one a projection with double quantisation, none without)"
            )
    ws = weight_shapes(shapes, n_proj)
    for p in range(n_proj):
        _check_4bit(packed[p], absmax[p], absmax_8bit[p] if nested else None, absmax_code[p] if nested else None,
                    absmax_offset[p] if nested else None, ws[p], blocksize, quant_type, nested_blocksize)
    return ws


@torch.library.custom_op("slothc::qlora_linear", mutates_args=())
def qlora_linear(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    absmax: list[torch.Tensor],
    absmax_8bit: list[torch.Tensor],
    absmax_code: list[torch.Tensor],
    absmax_offset: list[torch.Tensor],
    shapes: list[int],
    blocksize: int,
    quant_type: str,
    biases: list[Optional[torch.Tensor]],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    adapter_proj: list[int],
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    out_dtype: torch.dtype,
    xa: Optional[torch.Tensor],
    nested_blocksize: int,
) -> list[torch.Tensor]:
    """``[Y_0, ..., Y_{P-1}, T]``: the outputs of P projections of one input (q/k/v, gate/up; P = 1
    for a lone linear), each weight a 4-bit tensor (``packed[p]``, its scales, ``shapes[2p:2p+2]``;
    ``absmax_8bit``, ``absmax_code``, ``absmax_offset``: one a projection when double-quantised, empty
    lists otherwise; one blocksize and quant type for all), then the saved low-rank product. As
    ``slothc::lora_linear`` with the dequantised weights (module docstring)."""
    ws = _check_weights(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, nested_blocksize)
    lora._check(x, ws, biases, lora_a, lora_b, scaling, adapter_proj, xa)
    weights = _Weights(packed, absmax, absmax_8bit, absmax_code, absmax_offset, ws, blocksize, quant_type, nested_blocksize,
                       base_dtype, check=False)
    # PEFT's 4-bit layer adds base and update in the output dtype (the base cast to it first). Each
    # full-precision weight lives for its one matmul.
    outs, t = lora_linear_fwd(x, weights, biases, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, xa,
                              sum_dtype=out_dtype, check=False)
    return [*outs, t]


@qlora_linear.register_fake
def _qlora_linear_fake(x, packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, biases, lora_a,
                       lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, xa, nested_blocksize):
    ws = _check_weights(packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, nested_blocksize)
    lora._check(x, ws, biases, lora_a, lora_b, scaling, adapter_proj, xa)
    n = math.prod(x.shape[:-1])
    r_total = sum(a.shape[0] for a in lora_a)
    outs = [x.new_empty((*x.shape[:-1], m), dtype=out_dtype) for m, _ in ws]
    return [*outs, x.new_empty((n, r_total), dtype=lora_dtype)]


@torch.library.custom_op("slothc::qlora_linear_backward", mutates_args=())
def qlora_linear_backward(
    grads: list[Optional[torch.Tensor]],
    x: torch.Tensor,
    t: torch.Tensor,
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
    adapter_proj: list[int],
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    out_dtype: torch.dtype,
    need_dx: bool,
    split: bool,
    need_dxa: bool,
    x_dtype: Optional[torch.dtype],
    nested_blocksize: int,
) -> list[torch.Tensor]:
    """``[dX, dXa, dA_0, ..., dB_0, ...]`` of ``slothc::qlora_linear`` (``x``: the adapters' input;
    ``grads[p]``: None where projection p's output got no gradient). Each ``W_p`` is dequantised
    again here, only when ``dX`` is asked for (:class:`_Weights`)."""
    ws = weight_shapes(shapes, len(packed))
    if need_dx:
        weights = _Weights(packed, absmax, absmax_8bit, absmax_code, absmax_offset, ws, blocksize, quant_type, nested_blocksize,
                           base_dtype)
    else:  # dX is not computed: the backward reads no weight (their shapes only)
        weights = [packed[p].new_empty(ws[p], dtype=base_dtype, device="meta") for p in range(len(ws))]
    dx, dxa, da, db = lora_linear_bwd(list(grads), x, t, weights, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype,
                                      out_dtype, need_dx, split, need_dxa, x_dtype)
    return [dx if dx is not None else x.new_empty(0), dxa if dxa is not None else x.new_empty(0), *da, *db]


@qlora_linear_backward.register_fake
def _qlora_linear_backward_fake(grads, x, t, packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type,
                                lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, need_dx, split, need_dxa,
                                x_dtype, nested_blocksize):
    dx = x.new_empty(x.shape, dtype=(x_dtype or x.dtype) if split else x.dtype) if need_dx else x.new_empty(0)
    dxa = x.new_empty(x.shape) if split and need_dxa else x.new_empty(0)
    return [dx, dxa, *[torch.empty_like(a) for a in lora_a], *[torch.empty_like(b) for b in lora_b]]


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type, biases, lora_a, lora_b, scaling,
     adapter_proj, base_dtype, lora_dtype, out_dtype, xa, nested_blocksize) = inputs
    ctx.n_proj, ctx.n_adapters, ctx.n_state = len(packed), len(lora_a), len(absmax_8bit)
    ctx.split, ctx.x_dtype = xa is not None, x.dtype
    ctx.bias_has_none = any(b is None for b in biases)
    # The 4-bit weights and their scales (already resident), the adapters' input and T; never W.
    ctx.save_for_backward(xa if xa is not None else x, output[-1], *packed, *absmax, *absmax_8bit, *absmax_code, *absmax_offset,
                          *lora_a, *lora_b)
    ctx.config = (list(shapes), blocksize, quant_type, list(scaling), list(adapter_proj), base_dtype, lora_dtype, out_dtype,
                  nested_blocksize)


def _backward(ctx, grads):
    x, t, *rest = ctx.saved_tensors
    sizes = [ctx.n_proj, ctx.n_proj, ctx.n_state, ctx.n_state, ctx.n_state, ctx.n_adapters, ctx.n_adapters]
    parts, at = [], 0
    for size in sizes:
        parts.append(list(rest[at : at + size]))
        at += size
    packed, absmax, absmax_8bit, absmax_code, absmax_offset, lora_a, lora_b = parts
    shapes, blocksize, quant_type, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, nested_blocksize = ctx.config
    need_dx = ctx.needs_input_grad[0]
    need_dxa = ctx.split and ctx.needs_input_grad[17]
    out = torch.ops.slothc.qlora_linear_backward(
        list(grads[: ctx.n_proj]), x, t, packed, absmax, absmax_8bit, absmax_code, absmax_offset, shapes, blocksize, quant_type,
        lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, need_dx, ctx.split, need_dxa, ctx.x_dtype,
        nested_blocksize,
    )
    dx = out[0] if need_dx else None
    dxa = out[1] if need_dxa else None
    da = list(out[2 : 2 + ctx.n_adapters])
    db = list(out[2 + ctx.n_adapters :])
    # torch.library matches the structure of the inputs: a Tensor?[] holding a None is one leaf, an
    # empty list needs an empty list back.
    frozen = [None] * ctx.n_proj
    state = [None] * ctx.n_state if ctx.n_state else []
    no_bias = None if ctx.bias_has_none else list(frozen)
    no_adapters = [] if not ctx.n_adapters else None
    return (dx, frozen, list(frozen), state, list(state), list(state), None, None, None, no_bias, da or no_adapters,
            db or no_adapters, no_adapters, no_adapters, None, None, None, dxa, None)


torch.library.register_autograd("slothc::qlora_linear", _backward, setup_context=_setup_context)
