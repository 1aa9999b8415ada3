"""Launch settings shared by the slothc Triton kernels.

Every slothc op has two bodies: a Triton kernel and a plain-torch reference. ``use_triton(x)`` picks
between them: CUDA tensors take the kernel; CPU tensors take it only under the Triton interpreter
(``TRITON_INTERPRET=1``, read by Triton when it is first imported), which is how the kernel tests
run on machines without a GPU. Everything else takes the reference.

The row-wise kernels (norms) hold one whole row in registers: ``BLOCK_SIZE_N`` is the row length
rounded up to a power of two and ``num_warps_for`` spreads it over the threads of one program.
Their weight-gradient reductions use ``reduction_grid``: a few programs per SM, each looping over a
contiguous range of rows and keeping its partial sum in fp32 registers, so no atomics are needed.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

# Rows longer than this do not fit one program's registers: at 64K elements a row is already
# 64 fp32 values a thread with 32 warps (the most a program may have); beyond it the compiler
# spills the row to local memory and the kernel is slower than the reference. Such rows (rare in
# language models) take the reference instead.
MAX_FUSED_SIZE = 65536

# Element types the kernels compute for; others (float64, ...) take the reference, which keeps
# their precision.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Programs per SM in the weight-gradient reduction grid. Each program keeps its partial sum in
# registers and streams its rows, loading row i + 1 while it reduces row i; several programs per SM
# keep enough loads in flight. More programs make the fp32 partial buffer ([n_programs, n_cols],
# written and re-read once) larger: ``MIN_ROWS_PER_PROGRAM`` keeps it under ~4% of the bytes the
# backward moves (partial row: 4 bytes a column, written and read; rows: 3 x 2 bytes a column for
# bf16 dy, x, dx). Measured on an H100 (bf16, 16K rows, 2K-8K columns, with the prefetch): 2
# programs per SM beat 4 and 8 by 5-15% of copy bandwidth for LayerNorm's dW + dB and matched them
# for RMSNorm's dW.
PROGRAMS_PER_SM = 2
MIN_ROWS_PER_PROGRAM = 32

# The Triton interpreter runs programs one after another on the CPU; "SMs" there only sets how many
# programs the reduction grid has. Two keeps the test sizes (<= 16 rows) looping over several rows
# per program, with a shorter last range, so the row loop and its bounds are exercised.
_INTERPRETER_SMS = 2
_INTERPRETER_MIN_ROWS_PER_PROGRAM = 1


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Whether ``x``'s op should launch its Triton kernel: CUDA tensors, or CPU ones when interpreting."""
    return x.is_cuda or (x.device.type == "cpu" and interpreting())


def device_guard(x: torch.Tensor):
    """Make ``x``'s CUDA device current for a launch (Triton launches on the current device); a no-op
    when it already is (the usual case: switching costs host time on every launch)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-a // b)


def num_warps_for(block_size_n: int) -> int:
    """Warps for a program that holds ``block_size_n`` elements of one row.

    8 warps from 2K to 8K elements: measured on an H100 (bf16, 16K rows) the norm kernels reach
    the copy bandwidth there with 8 warps at 2048, 4096, 5120 and 8192 columns, while 16 or 32 warps
    lose up to half of it (fewer programs per SM, and at 5120 columns of an 8192 block whole warps
    of padding). Up to 32 elements a thread; longer rows get more warps so that a thread never
    holds more than 64 (the row and its gradient stay in registers).
    """
    if block_size_n <= 1024:
        return 4
    if block_size_n <= 8192:
        return 8
    return min(32, block_size_n // 1024)


@functools.lru_cache(None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in on the CPU interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRETER_SMS


def reduction_grid(n_rows: int, device: torch.device) -> tuple[int, int]:
    """``(n_programs, rows_per_program)`` for a kernel that reduces over rows without atomics.

    Program ``p`` handles rows ``[p * rows_per_program, min((p + 1) * rows_per_program, n_rows))``
    and writes one row of an fp32 ``[n_programs, n_cols]`` partial buffer, summed afterwards.
    Every program gets at least one row; ``n_rows == 0`` gives ``(0, 1)``.
    """
    if n_rows == 0:
        return 0, 1
    min_rows = _INTERPRETER_MIN_ROWS_PER_PROGRAM if device.type == "cpu" else MIN_ROWS_PER_PROGRAM
    n_programs = max(1, min(num_sms(device) * PROGRAMS_PER_SM, cdiv(n_rows, min_rows)))
    rows_per_program = cdiv(n_rows, n_programs)
    return cdiv(n_rows, rows_per_program), rows_per_program


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as ``[n_rows, n_cols]`` (``n_cols = x.shape[-1]``) with unit column stride.

    ``reshape`` copies only when the leading dims cannot be merged into one row stride; a last dim
    that is not unit stride (a transposed input) is made contiguous, since the kernels load a row
    as one vector.
    """
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def rows_fit(n_cols: int) -> bool:
    """Whether rows of ``n_cols`` elements take the one-program-per-row kernels."""
    return 0 < n_cols <= MAX_FUSED_SIZE
