"""Kernel-equivalence testing: is a fused kernel as accurate as the eager code it replaces?

A fused kernel never matches eager bit for bit (it sums in another order, rounds in other places),
and fixed tolerances either let real bugs through or fail on rounding. slothc judges a kernel the
way flash-attention does: against a float64 reference, relative to eager's own error::

    max|fused - ref64|  <=  k * max|eager - ref64|  +  floor

* ``fused``: the kernel's result; ``eager``: the eager code's result in the same low precision;
  ``ref64``: the eager code run in float64 on upcast copies of the inputs.
* ``floor = max|ref64.to(dtype) - ref64|``: the rounding that no implementation storing ``dtype``
  can avoid. It keeps the bound meaningful where eager is exact (a kernel one rounding away from
  the exact value passes). Five adjustments:

  - it is at least one ulp of ``dtype`` at ``max|ref64|``: a result rounded twice in ``dtype``
    (an intermediate, then the sum: ``round(round(x W) + round(t B))`` as PEFT's layer computes it,
    or the fused op's ``round(x W + round(t B))``) can be up to an ulp from the exact value, where
    the realized rounding of a small tensor can by luck be near zero (eager, rounding in its own
    order, happens to land on the nearest value). Measured on the GPU: a one-element fp16 LoRA
    output 0.86 ulp off, with eager 0.14 ulp off;
  - it is at least ``4 * eps(fp32) * max|ref64|``, a few fp32 roundings, which any kernel
    computing in fp32 makes however it is written. This matters only for fp32 results (a 16-bit
    result's own rounding is far larger): on a small tensor eager's largest error can by luck be
    far under an ulp;
  - for a sum of parts each rounded to ``dtype`` first (``parts_fn``), it is at least one ulp at
    the largest part: where the parts cancel, their roundings, not the result's size, set the error;
  - for a sum whose terms cancel (``magnitude_fn``: the sum of the terms' absolute values, ``|h| @
    |W|^T`` for a GEMM), the few fp32 roundings above are taken at the largest magnitude instead of
    at ``max|ref64|``: an fp32 accumulation's error, and that of an input one ulp off, scales with
    the terms, not with what is left of them (measured: an fp32 dot product of 475 terms, 12.2 in
    magnitude, 0.21 in value, 14 ulps of the result from ``ref64`` in the op and 2.6 in eager);
  - under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors), when bf16 is involved (the
    result's dtype, or ``low_dtype``: bf16 inputs of an fp32 result), it is at least two bf16 ulps
    of the largest element and twice the realized rounding. The interpreter converts fp32 to bf16
    by truncating the mantissa instead of rounding to nearest (up to one ulp where a GPU makes
    half), and a kernel may convert twice on the way (Llama's RMSNorm rounds ``n``, then the
    product). bf16 checks on the interpreter are coarser than on a GPU; fp16 and fp32 are not
    affected.
* ``k``: 2 for outputs, 3 for gradients (a gradient is often reduced over many rows, where the
  summation order alone changes the error).
* NaN and +-Inf must appear in the same places, with the same kind, in ``fused`` as in ``eager``;
  the errors are measured over the finite rest.
* fp32 outputs computed from fp32 inputs must also pass ``torch.testing.assert_close(fused,
  eager)`` at fp32's default tolerances (rtol 1.3e-6, atol 1e-5), wherever eager itself is that
  close to ``ref64`` (where it is not, the problem is ill-conditioned in fp32 and only the ratio
  applies). Gradients are judged by the ratio alone: an element of a gradient is often a small
  difference of large terms (a norm's dx, ``r * (g - n * mean(g * n))``), whose fp32 error scales
  with the terms and not with the element, so an elementwise relative tolerance fails correct
  kernels at random.

``check_against_eager(fused_fn, eager_fn, *inputs)`` applies this to every output and to the
gradient of every input that requires grad; it is what you call on your own kernel::

    from slothc.testing import check_against_eager, make_tensor

    x = make_tensor((8, 4096), torch.bfloat16, seed=0, requires_grad=True)
    w = make_tensor((4096,), torch.bfloat16, seed=1, requires_grad=True)
    check_against_eager(my_rms_norm, hf_rms_norm, x, w, 1e-6)

The float64 run uses ``float64_mode()``: eager code from Hugging Face hard-codes its upcasts
(``hidden_states.to(torch.float32)``, ``x.float()``), which would silently turn a float64
reference back into an fp32 one. Inside the mode a cast of a float64 tensor to a lower floating
dtype keeps float64, and ``dtype=`` arguments naming a lower floating dtype become float64.
Everything the eager function computes with must therefore be among ``inputs`` (pass parameters as
arguments, e.g. through ``torch.func.functional_call``), not captured from outside at low precision.

Property tests draw their cases with hypothesis. The strategies here draw shapes, dtypes, layouts
and a seed, never element arrays: tensors come from ``torch.randn(..., generator=g)`` in
``make_tensor``, which is fast and needs no shrinking of values. ``register_profiles()`` defines
two hypothesis profiles, chosen by the environment variable ``SLOTHC_HYPOTHESIS_PROFILE``:

* ``ci`` (default): 10 examples a property, small sizes (``size_scale()``: <= 16 rows, <= 300
  columns), for CPU runs under the Triton interpreter; derandomized (the same examples every run);
* ``gpu``: 200 examples a property at real sizes (<= 4096 rows, <= 10240 columns).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "Comparison",
    "assert_matches_reference",
    "check_against_eager",
    "float64_mode",
    "make_tensor",
    "LAYOUTS",
    "dtypes",
    "seeds",
    "layouts",
    "row_shapes",
    "SizeScale",
    "size_scale",
    "profile_name",
    "register_profiles",
    "PROFILE_ENV",
]

_LOW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_GRAD_SEED_OFFSET = 0x51077C  # arbitrary; see check_against_eager
# fp32 roundings allowed for in the floor: a kernel computing in fp32 (a centring, an rsqrt, a
# product, a sum) is a few fp32 ulps off however it is written. Negligible next to a 16-bit result's
# own rounding; for fp32 results it keeps small tensors, where eager's largest error may by luck
# be far under an ulp, from failing a kernel that is as accurate as eager.
_COMPUTE_ROUNDINGS = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------
# The criterion
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One checked tensor: the errors against the float64 reference and the bound they met."""

    name: str
    dtype: torch.dtype
    fused_error: float  # max|fused - ref64|
    eager_error: float  # max|eager - ref64|
    floor: float  # max|ref64.to(dtype) - ref64| (raised for bf16 under the interpreter)
    k: float

    @property
    def bound(self) -> float:
        return self.k * self.eager_error + self.floor


def _fmt_index(flat: int, shape: torch.Size) -> tuple:
    idx = []
    for size in reversed(shape):
        idx.append(flat % size)
        flat //= size
    return tuple(reversed(idx))


def _check_nonfinite(f: torch.Tensor, e: torch.Tensor, label: str) -> None:
    for kind, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        fm, em = test(f), test(e)
        if not torch.equal(fm, em):
            flat = int((fm != em).reshape(-1).nonzero()[0])
            at = _fmt_index(flat, f.shape)
            raise AssertionError(
                f"{label}: {kind} positions differ from eager's; first at index {at}: "
                f"fused={f.reshape(-1)[flat].item()!r}, eager={e.reshape(-1)[flat].item()!r} "
                f"({int(fm.sum())} {kind} in fused, {int(em.sum())} in eager)"
            )


def assert_matches_reference(
    fused: torch.Tensor,
    eager: torch.Tensor,
    ref64: torch.Tensor,
    *,
    k: float = 2.0,
    name: str = "",
    low_dtype: Optional[torch.dtype] = None,
    fp32_close: bool = True,
    parts_max: Optional[float] = None,
    magnitude_max: Optional[float] = None,
) -> Comparison:
    """Assert ``max|fused - ref64| <= k * max|eager - ref64| + floor`` (see the module docstring).

    ``fused`` and ``eager`` must have the same shape and dtype; ``ref64`` is the float64 result
    of the same computation. Also checks that NaN/Inf positions agree with eager's, and for fp32
    (unless ``fp32_close`` is False) ``torch.testing.assert_close(fused, eager)``. The error
    message names the worst element, its three values and both errors. Returns the ``Comparison``.

    ``low_dtype`` is the lowest precision the computation rounds through when that is below the
    result's (bf16 inputs with an fp32 result); it matters only under the Triton interpreter, whose
    bf16 rounding is coarser (module docstring). ``check_against_eager`` sets it from the inputs.
    ``parts_max``: the largest magnitude among the parts of a sum that are each rounded to ``dtype``
    before the sum (``check_against_eager``'s ``parts_fn``); the floor is at least an ulp there.
    ``magnitude_max``: the largest sum of absolute terms of an element (``magnitude_fn``); the fp32
    compute floor is taken there when it is larger than ``max|ref64|``.
    """
    label = name or "tensor"
    if fused.shape != eager.shape or fused.shape != ref64.shape:
        raise AssertionError(
            f"{label}: shapes differ: fused {tuple(fused.shape)}, eager {tuple(eager.shape)}, "
            f"float64 reference {tuple(ref64.shape)}"
        )
    if fused.dtype != eager.dtype:
        raise AssertionError(f"{label}: dtype {fused.dtype} differs from eager's {eager.dtype}")
    dtype = fused.dtype
    if not dtype.is_floating_point:
        torch.testing.assert_close(fused, eager, rtol=0, atol=0, msg=lambda m: f"{label}: {m}")
        return Comparison(label, dtype, 0.0, 0.0, 0.0, k)

    device = eager.device
    f = fused.detach().to(device=device, dtype=torch.float64)
    e = eager.detach().to(dtype=torch.float64)
    r = ref64.detach().to(device=device, dtype=torch.float64)
    _check_nonfinite(f, e, label)
    if f.numel() == 0:
        return Comparison(label, dtype, 0.0, 0.0, 0.0, k)

    rounded = r.to(dtype).to(torch.float64)
    finite = torch.isfinite(f) & torch.isfinite(r) & torch.isfinite(rounded)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    err_f = torch.where(finite, (f - r).abs(), zero)
    err_e = torch.where(finite, (e - r).abs(), zero)
    fused_error = err_f.max().item()
    eager_error = err_e.max().item()
    floor = torch.where(finite, (rounded - r).abs(), zero).max().item()
    max_ref = torch.where(finite, r.abs(), zero).max().item()
    compute_scale = max(max_ref, magnitude_max or 0.0)  # the terms' size where they cancel
    floor = max(floor, _ulp(max_ref, dtype), _COMPUTE_ROUNDINGS * torch.finfo(torch.float32).eps * compute_scale)
    if parts_max is not None:  # a sum of parts, each rounded to dtype before the sum: an ulp of the largest
        floor = max(floor, _ulp(parts_max, dtype))
    if torch.bfloat16 in (dtype, low_dtype) and fused.device.type == "cpu" and _interpreting():
        # The interpreter truncates fp32 -> bf16 (up to 1 ulp, not 0.5), and a kernel may convert
        # twice on the way (Llama's RMSNorm rounds n, then the product): allow a bf16 ulp for each.
        floor = max(2 * floor, 2 * _ulp(max_ref, torch.bfloat16))
    result = Comparison(label, dtype, fused_error, eager_error, floor, k)

    if not fused_error <= result.bound:
        worst = int(err_f.reshape(-1).argmax())
        worst_e = int(err_e.reshape(-1).argmax())
        fv, ev, rv = (t.reshape(-1)[worst].item() for t in (f, e, r))
        raise AssertionError(
            f"{label}: fused error {fused_error:.4g} > {k:g} x eager error {eager_error:.4g} + floor "
            f"{floor:.4g} = {result.bound:.4g} ({dtype}, shape {tuple(fused.shape)}); "
            f"ratio fused/eager = {fused_error / eager_error if eager_error else float('inf'):.3g}\n"
            f"  worst fused element at index {_fmt_index(worst, f.shape)}: fused={fv!r}, "
            f"eager={ev!r}, float64={rv!r}\n"
            f"  worst eager element at index {_fmt_index(worst_e, f.shape)}: "
            f"eager={e.reshape(-1)[worst_e].item()!r}, float64={r.reshape(-1)[worst_e].item()!r}"
        )
    rounds_coarser = low_dtype is not None and low_dtype.is_floating_point and low_dtype.itemsize < 4
    if fp32_close and dtype == torch.float32 and not rounds_coarser and _close(eager, ref64):
        # Only where eager itself is within fp32's tolerances of float64: in an ill-conditioned
        # case (heavy cancellation) both miss the truth by more, in different ways, and the ratio
        # criterion above is the one that means something. Likewise when the computation rounds
        # through a 16-bit type (bf16 inputs, fp32 result): one intermediate rounded the other way
        # moves an element by a 16-bit ulp.
        torch.testing.assert_close(
            fused.detach().to(device), eager.detach(), equal_nan=True, msg=lambda m: f"{label} (fp32 vs eager): {m}"
        )
    return result


def _ulp(value: float, dtype: torch.dtype) -> float:
    """Spacing of ``dtype``'s numbers at ``value`` (normal range)."""
    if value == 0:
        return 0.0
    _, exponent = math.frexp(value)  # value = m * 2**exponent, 0.5 <= m < 1
    return torch.finfo(dtype).eps * 2.0 ** (exponent - 1)


def _close(eager: torch.Tensor, ref64: torch.Tensor) -> bool:
    try:
        torch.testing.assert_close(eager.detach(), ref64.detach().to(eager.device, eager.dtype), equal_nan=True)
    except AssertionError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Running eager in float64
# --------------------------------------------------------------------------------------------

_CAST_METHODS = {
    torch.Tensor.to,
    torch.Tensor.float,
    torch.Tensor.half,
    torch.Tensor.bfloat16,
    torch.Tensor.type,
    torch.Tensor.type_as,
}


class _Float64Mode(TorchFunctionMode):
    """Keeps float64 tensors float64 through casts to fp32/fp16/bf16 (see ``float64_mode``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CAST_METHODS:
            out = func(*args, **kwargs)
            src = args[0] if args else None
            if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and out.dtype in _LOW_FLOATS:
                if src.dtype == torch.float64:
                    # The cast made a new tensor; so does this (later in-place ops must not reach src).
                    return src.to(device=out.device, copy=True)
                if not src.is_floating_point() and not src.is_complex():
                    # Integers made float (``position_ids.float()`` before a matmul with the float64
                    # inv_freq in transformers 5.17's rotary embedding): float64 too.
                    return src.to(device=out.device, dtype=torch.float64)
            return out
        if kwargs.get("dtype") in _LOW_FLOATS:
            kwargs = {**kwargs, "dtype": torch.float64}
        return func(*args, **kwargs)


def float64_mode() -> TorchFunctionMode:
    """Context manager under which eager code with hard-coded low-precision casts stays in float64.

    Casts of a float64 tensor to fp32/fp16/bf16 (``.to``, ``.float()``, ``.half()``,
    ``.bfloat16()``, ``.type``, ``.type_as``) return float64 copies, casts of an integer or bool
    tensor to those dtypes give float64, and ``dtype=`` keyword arguments naming those dtypes become
    float64. Other casts are untouched (an fp32 tensor stays fp32).
    """
    return _Float64Mode()


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` and back to its own dtype, inside ``float64_mode`` too: for a
    float64 reference of a computation whose every implementation stores an intermediate in
    ``dtype`` (an MLP's ``act(g) * u`` read by the down projection's GEMM). Without it a reduction
    over that intermediate with heavy cancellation (a one-element output) charges the
    intermediate's unavoidable rounding to whichever implementation rounded it less luckily."""
    with torch._C.DisableTorchFunction():
        return t.to(dtype).to(t.dtype)


# --------------------------------------------------------------------------------------------
# Comparing a fused function with its eager twin
# --------------------------------------------------------------------------------------------


def _copy(t: Any, dtype: Optional[torch.dtype] = None) -> Any:
    """A leaf copy of ``t`` with the same sizes and strides (so non-contiguous inputs stay so)."""
    if not isinstance(t, torch.Tensor):
        return t
    dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    with torch.no_grad():
        if torch._debug_has_internal_overlap(t) != 1:  # 1: elements share memory (expanded)
            # Zeroed storage, not empty_strided's garbage: the gaps of a padded layout are never
            # part of the tensor, but torch 2.13's CPU bf16 F.linear reads them (a NaN there
            # turns into NaN outputs) and eager must not fail on memory that is not its input.
            extent = 1 + sum((n - 1) * st for n, st in zip(t.size(), t.stride()) if n > 0) if t.numel() else 0
            out = torch.zeros(extent, dtype=dtype, device=t.device).as_strided(t.size(), t.stride()).copy_(t)
        else:  # expanded (stride 0) tensors cannot be written with their strides: copy densely
            out = t.to(dtype=dtype, copy=True).contiguous()
    return out.requires_grad_(t.requires_grad)


def _flatten(out: Any) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    raise TypeError(f"outputs must be tensors or (nested) tuples/lists of tensors, got {type(out).__name__}")


def _largest_per_output(fn, ref_in, n_out, name, lists=False) -> list[Optional[float]]:
    """For each output, ``max |t|`` over its entry of ``fn(*ref_in)`` (run in float64_mode): one
    tensor an output, or with ``lists`` a list of tensors an output (``parts_fn``). ``None`` for
    each output when ``fn`` is ``None``."""
    if fn is None:
        return [None] * n_out
    with float64_mode():
        out = fn(*ref_in)
    entries = list(out) if lists else [[t] for t in _flatten(out)]
    if len(entries) != n_out:
        raise ValueError(f"{name} returned {len(entries)} {'lists' if lists else 'tensors'} for {n_out} outputs")
    return [max((t.detach().abs().max().item() for t in ts if t.numel()), default=0.0) for ts in entries]


def check_against_eager(
    fused_fn: Callable,
    eager_fn: Callable,
    *inputs: Any,
    grad_outputs: Optional[Sequence[torch.Tensor] | torch.Tensor] = None,
    k_fwd: float = 2.0,
    k_grad: float = 3.0,
    ref_fn: Optional[Callable] = None,
    seed: int = 0,
    parts_fn: Optional[Callable] = None,
    magnitude_fn: Optional[Callable] = None,
) -> list[Comparison]:
    """Check ``fused_fn`` against ``eager_fn`` with ``assert_matches_reference``, outputs and gradients.

    Each function runs on its own copies of ``inputs`` (same strides; tensors that require grad
    stay leaves that require grad; non-tensors pass through). ``ref64`` is ``ref_fn`` (default
    ``eager_fn``) run under ``float64_mode()`` on float64 copies of the floating inputs. Every
    output is compared with ``k=k_fwd``; then, if any input requires grad, both functions are
    differentiated with the same ``grad_outputs`` (default: ``torch.randn`` like each output that
    requires grad, from a generator seeded from ``seed``), rounded to each output's dtype (the
    float64 run gets those rounded values, upcast), and the
    gradient of every input that requires grad is compared with ``k=k_grad``. Returns the
    comparisons, outputs first.

    ``parts_fn``, for an output that is a sum of parts each rounded to the output's dtype before
    they are added (PEFT's ``round(x W) + round(t B)``): run like ``ref_fn``, it returns for each
    output a list of its parts in float64, and that output's floor is at least an ulp at the largest
    part. Where the parts cancel (a one-element output: 0.49 - 0.56) the result's error is set by
    the parts' roundings, which no implementation of that contract avoids, not by its own size.

    ``magnitude_fn``, for an output that is a sum whose terms can cancel (a GEMM): run like
    ``ref_fn``, it returns for each output the float64 sum of the terms' absolute values (``|h| @
    |W|^T``), and the fp32 compute floor is taken at its largest element (module docstring).
    """
    fused_in = [_copy(t) for t in inputs]
    eager_in = [_copy(t) for t in inputs]
    ref_in = [_copy(t, torch.float64) for t in inputs]

    fused_out = _flatten(fused_fn(*fused_in))
    eager_out = _flatten(eager_fn(*eager_in))
    with float64_mode():
        ref_out = _flatten((ref_fn or eager_fn)(*ref_in))
    if not len(fused_out) == len(eager_out) == len(ref_out):
        raise AssertionError(
            f"fused returned {len(fused_out)} tensors, eager {len(eager_out)}, float64 reference {len(ref_out)}"
        )
    floats = [t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
    low = min(floats, key=lambda d: torch.finfo(d).bits, default=None)
    low = torch.bfloat16 if torch.bfloat16 in floats else low  # bf16 is the coarsest of the 16-bit types
    parts_max = _largest_per_output(parts_fn, ref_in, len(ref_out), "parts_fn", lists=True)
    magnitude_max = _largest_per_output(magnitude_fn, ref_in, len(ref_out), "magnitude_fn")
    results = [
        assert_matches_reference(f, e, r, k=k_fwd, name=f"output {i}", low_dtype=low, parts_max=p, magnitude_max=m)
        for i, (f, e, r, p, m) in enumerate(zip(fused_out, eager_out, ref_out, parts_max, magnitude_max))
    ]

    wrt = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not wrt:
        return results
    diff_out = [j for j, e in enumerate(eager_out) if e.requires_grad]
    for j in diff_out:
        if not fused_out[j].requires_grad:
            raise AssertionError(f"output {j}: eager's requires grad, fused's does not (no autograd registered?)")
    if grad_outputs is None:
        # Offset so that seed=0 does not reproduce an input made by make_tensor(..., seed=0): a
        # grad_output equal to the input is a degenerate, cancelling case for many VJPs.
        g = torch.Generator().manual_seed(seed + _GRAD_SEED_OFFSET)
        grad_outputs = [torch.randn(eager_out[j].shape, generator=g).to(eager_out[j].device) for j in diff_out]
    elif isinstance(grad_outputs, torch.Tensor):
        grad_outputs = [grad_outputs]
    if len(grad_outputs) != len(diff_out):
        raise ValueError(f"{len(grad_outputs)} grad_outputs for {len(diff_out)} outputs that require grad")

    # The grad_outputs in each output's dtype; the float64 run gets exactly those values, upcast.
    low_gos = [go.to(device=eager_out[j].device, dtype=eager_out[j].dtype) for go, j in zip(grad_outputs, diff_out)]

    def grads(outs, ins, gos):
        return torch.autograd.grad([outs[j] for j in diff_out], [ins[i] for i in wrt], gos, allow_unused=True)

    fused_grads = grads(fused_out, fused_in, low_gos)
    eager_grads = grads(eager_out, eager_in, low_gos)
    ref_grads = grads(ref_out, ref_in, [go.to(ref_out[j].dtype) for go, j in zip(low_gos, diff_out)])
    for i, fg, eg, rg in zip(wrt, fused_grads, eager_grads, ref_grads):
        if (fg is None) != (eg is None):
            raise AssertionError(
                f"grad of input {i}: fused gives {'none' if fg is None else 'one'}, eager {'none' if eg is None else 'one'}"
            )
        if fg is not None:
            results.append(
                assert_matches_reference(
                    fg, eg, rg, k=k_grad, name=f"grad of input {i}", low_dtype=low, fp32_close=False
                )
            )
    return results


# --------------------------------------------------------------------------------------------
# Tensors and hypothesis strategies
# --------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "padded", "permuted", "transposed")


def make_tensor(
    shape: Sequence[int],
    dtype: torch.dtype,
    seed: int,
    *,
    layout: str = "contiguous",
    device: torch.device | str = "cpu",
    scale: float = 1.0,
    shift: float = 0.0,
    requires_grad: bool = False,
) -> torch.Tensor:
    """A leaf tensor of ``shift + scale * randn(shape)`` from a generator seeded with ``seed``.

    Values are drawn in fp32 on the CPU (the same on every device) and then cast. ``layout``:

    * ``"contiguous"``;
    * ``"padded"``: a slice of rows 3 elements wider, so the row stride is not ``shape[-1]`` and the
      rows are not adjacent (last dim still unit stride);
    * ``"permuted"``: dense, leading dims stored in reverse order (the transpose of a transpose);
    * ``"transposed"``: the last dim is not unit stride (stored first).

    Layouts that a shape cannot have (e.g. ``"permuted"`` with one leading dim) fall back to the
    nearest that it can.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    shape = tuple(int(s) for s in shape)
    g = torch.Generator().manual_seed(int(seed))

    def randn(storage_shape):
        return (torch.randn(storage_shape, generator=g) * scale + shift).to(device=device, dtype=dtype)

    if layout == "padded" and len(shape) >= 1:
        x = randn(shape[:-1] + (shape[-1] + 3,))[..., : shape[-1]]
    elif layout == "permuted" and len(shape) >= 3:
        lead = len(shape) - 1
        x = randn(tuple(reversed(shape[:-1])) + shape[-1:]).permute(*reversed(range(lead)), lead)
    elif layout == "transposed" and len(shape) >= 2:
        x = randn(shape[-1:] + shape[:-1]).movedim(0, -1)
    else:
        x = randn(shape)
    return x.detach().requires_grad_(requires_grad)


def _st():
    from hypothesis import strategies as st

    return st


def dtypes(allowed: Sequence[torch.dtype] = (torch.float32, torch.bfloat16, torch.float16)):
    """Strategy: one of ``allowed`` (fp32, bf16, fp16 by default)."""
    return _st().sampled_from(tuple(allowed))


def seeds():
    """Strategy: a seed for ``make_tensor``."""
    return _st().integers(0, 2**31 - 1)


def layouts(allowed: Sequence[str] = LAYOUTS):
    """Strategy: a ``make_tensor`` layout."""
    return _st().sampled_from(tuple(allowed))


# Hidden sizes of real models, drawn as often as arbitrary ones: they take the vectorised paths.
_COMMON_COLS = (64, 128, 256, 512, 768, 896, 1024, 1536, 2048, 2304, 2560, 3072, 3584, 4096, 5120, 8192)


def row_shapes(
    max_rows: Optional[int] = None,
    max_cols: Optional[int] = None,
    *,
    min_rows: int = 1,
    min_cols: int = 1,
    max_lead_dims: int = 2,
):
    """Strategy: a shape ``(*lead, n_cols)``, ``min_rows <= prod(lead) <= max_rows``, ``min_cols <= n_cols <= max_cols``.

    ``lead`` has 0 to ``max_lead_dims`` dims (0 only when a single row is drawn). Defaults come
    from ``size_scale()``. ``n_cols`` is arbitrary half the time and a common hidden size otherwise.
    (Norm gradients are pure cancellation for rows of 1 element (RMSNorm) or 2 (LayerNorm):
    there both eager and a kernel return rounding noise, and no error ratio is meaningful; draw
    such rows only for forward checks.)
    """
    st = _st()
    scale = size_scale()
    max_rows = scale.max_rows if max_rows is None else max_rows
    max_cols = scale.max_cols if max_cols is None else max_cols
    common = [c for c in _COMMON_COLS if min_cols <= c <= max_cols]
    cols = st.integers(min_cols, max_cols)
    if common:
        cols = st.one_of(cols, st.sampled_from(common))

    @st.composite
    def shapes(draw):
        n_cols = draw(cols)
        n_rows = draw(st.integers(min_rows, max_rows))
        n_lead = draw(st.integers(0 if n_rows == 1 else 1, max_lead_dims))
        if n_lead == 0:
            return (n_cols,)
        if n_lead == 1 or n_rows == 0:
            return (n_rows,) + (1,) * (n_lead - 1) + (n_cols,)
        first = draw(st.integers(1, n_rows))
        lead = [first, n_rows // first] + [1] * (n_lead - 2)
        return tuple(lead) + (n_cols,)

    return shapes()


# --------------------------------------------------------------------------------------------
# Hypothesis profiles
# --------------------------------------------------------------------------------------------


class SizeScale(NamedTuple):
    """Largest sizes the active profile's properties draw."""

    max_rows: int
    max_cols: int


_PROFILES = {
    # name: (max_examples, sizes)
    "ci": (10, SizeScale(max_rows=16, max_cols=300)),
    "gpu": (200, SizeScale(max_rows=4096, max_cols=10240)),
}
PROFILE_ENV = "SLOTHC_HYPOTHESIS_PROFILE"


def profile_name() -> str:
    """The selected profile: ``$SLOTHC_HYPOTHESIS_PROFILE``, ``ci`` by default."""
    name = os.environ.get(PROFILE_ENV, "ci")
    if name not in _PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r}: expected one of {sorted(_PROFILES)}")
    return name


def size_scale() -> SizeScale:
    """Sizes for the selected profile: small under ``ci`` (Triton interpreter), real under ``gpu``."""
    return _PROFILES[profile_name()][1]


def register_profiles(load: bool = True) -> str:
    """Register the ``ci`` and ``gpu`` hypothesis profiles; load the selected one if ``load``. Returns its name."""
    from hypothesis import HealthCheck, settings

    override = os.environ.get("SLOTHC_HYPOTHESIS_MAX_EXAMPLES")  # e.g. to fit a bounded GPU session
    for name, (max_examples, _) in _PROFILES.items():
        settings.register_profile(
            name,
            max_examples=int(override) if override else max_examples,
            deadline=None,
            print_blob=True,
            # Kernels under the interpreter, and float64 references at GPU sizes, are slow by design.
            suppress_health_check=[HealthCheck.too_slow],
            # CI draws the same examples on every run (a red CI must mean a change broke something);
            # the gpu profile explores new ones each run
            derandomize=name == "ci",
        )
    name = profile_name()
    if load:
        settings.load_profile(name)
    return name
