"""A matmul with a low-rank update in its epilogue: ``out = P Q + L R (+ bias)`` in one kernel.

``P`` [M, K] and ``Q`` [K, N] are the big operands, ``L`` [M, R] and ``R`` [R, N] the low-rank pair
(R = the sum of the adapters' ranks, small). Both products accumulate into one fp32 tile, rounded
once, so the update costs no pass over the output: no ``C = L R`` written and re-read as the
cuBLAS composition does (``addmm(L @ R, P, Q)``).

slothc::lora_linear uses it twice (``slothc/kernels/lora_linear.py``):

- forward: ``Y = X W^T + T (s B)^T + b``: P = X, Q = W^T (a transposed view), L = T, R = (s B)^T;
- backward: ``dX = dY W + G A``: P = dY, Q = W, L = G, R = [A_1; A_2; ...].

Which implementation runs is chosen by measurement (``bench/bench_lora_linear.py`` times both on
the GPU): see ``LORA_MM`` in ``slothc/kernels/lora_linear.py``. Tiles follow the Triton matmul
tutorial (grouped program order for L2 reuse); the autotuned configurations are ones that reach
the wgmma path on Hopper (64-wide K steps, 4 or 8 warps, 3-4 stages).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from slothc.kernels._launch import device_guard, interpreting


def _configs():
    if interpreting():  # the interpreter runs one program after another: one small config
        return [triton.Config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2}, num_warps=4, num_stages=1)]
    shapes = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
    return [
        triton.Config({"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "R"])
@triton.jit
def _lora_mm_kernel(
    p_ptr, q_ptr, l_ptr, r_ptr, bias_ptr, out_ptr,  # P [M, K], Q [K, N], L [M, R], R [R, N], bias [N], out [M, N]
    M, N, K, R,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # the Triton interpreter's bf16 tl.dot is wrong: upcast there (exact fp32)
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    BLOCK_SIZE_R: tl.constexpr,
):
    """out = P Q + L R (+ bias), fp32 accumulation, one rounding to out's dtype."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    p_ptrs = p_ptr + offs_m[:, None] * stride_pm + offs_k[None, :] * stride_pk
    q_ptrs = q_ptr + offs_k[:, None] * stride_qk + offs_n[None, :] * stride_qn
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        k_left = K - k * BLOCK_SIZE_K
        p = tl.load(p_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        q = tl.load(q_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(p.to(tl.float32), q.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p, q, acc)
        p_ptrs += BLOCK_SIZE_K * stride_pk
        q_ptrs += BLOCK_SIZE_K * stride_qk
    # The low-rank update, in the same accumulator.
    offs_r = tl.arange(0, BLOCK_SIZE_R)
    l_ptrs = l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr
    r_ptrs = r_ptr + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn
    for j in range(0, tl.cdiv(R, BLOCK_SIZE_R)):
        r_left = R - j * BLOCK_SIZE_R
        lo = tl.load(l_ptrs, mask=mask_m[:, None] & (offs_r[None, :] < r_left), other=0.0)
        ro = tl.load(r_ptrs, mask=(offs_r[:, None] < r_left) & mask_n[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(lo.to(tl.float32), ro.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(lo, ro, acc)
        l_ptrs += BLOCK_SIZE_R * stride_lr
        r_ptrs += BLOCK_SIZE_R * stride_rr
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def lora_mm(p: torch.Tensor, q: torch.Tensor, l: torch.Tensor, r: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``p @ q + l @ r (+ bias)`` in ``p``'s dtype; all four of one 16-bit dtype (bias too)."""
    m, k = p.shape
    n = q.shape[1]
    rank = l.shape[1]
    assert q.shape[0] == k and l.shape[0] == m and tuple(r.shape) == (rank, n), (p.shape, q.shape, l.shape, r.shape)
    assert p.dtype == q.dtype == l.dtype == r.dtype, (p.dtype, q.dtype, l.dtype, r.dtype)
    out = torch.empty((m, n), dtype=p.dtype, device=p.device)
    if m == 0 or n == 0:
        return out
    block_r = max(16, min(64, triton.next_power_of_2(max(rank, 1))))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_SIZE_M"]) * triton.cdiv(n, meta["BLOCK_SIZE_N"]),)  # noqa: E731
    with device_guard(p):
        _lora_mm_kernel[grid](
            p, q, l, r, bias if bias is not None else out, out,
            m, n, k, rank,
            p.stride(0), p.stride(1), q.stride(0), q.stride(1), l.stride(0), l.stride(1), r.stride(0), r.stride(1),
            out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, DOT_FP32=interpreting(), BLOCK_SIZE_R=block_r,
        )
    return out
