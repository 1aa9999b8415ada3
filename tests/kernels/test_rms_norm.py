"""slothc::rms_norm against the eager RMSNorm spellings of Hugging Face models, and float64.

The eager functions below are written as the Hugging Face code reads (``test_eager_matches_transformers``
pins them to the modules themselves). Properties draw shapes, dtypes, layouts, modes and seeds;
every case checks the output and every gradient with ``slothc.testing.check_against_eager``.
"""


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slothc import testing
from slothc.kernels import _launch
from slothc.kernels import rms_norm as rms_norm_module
from tests.helpers import count_calls, llama_rms_norm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OTHER_HALF = {torch.float32: torch.bfloat16, torch.bfloat16: torch.float16, torch.float16: torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Eager spellings
# --------------------------------------------------------------------------------------------


def gemma_rms_norm(x, weight, eps):
    """``GemmaRMSNorm.forward`` (Gemma, Gemma2, Gemma3, Qwen3-Next): ``(1 + w)`` after the product."""
    def _norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    output = _norm(x.float())
    output = output * (1.0 + weight.float())
    return output.type_as(x)


def gemma3n_rms_norm(hidden_states, weight, eps):
    """``Gemma3nRMSNorm.forward``: Gemma's cast placement, offset 0, weight optional (``with_scale``)."""
    mean_squared = hidden_states.float().pow(2).mean(-1, keepdim=True) + eps
    normed_output = hidden_states.float() * torch.pow(mean_squared, -0.5)
    if weight is not None:
        normed_output = normed_output * weight.float()
    return normed_output.type_as(hidden_states)


def unit_offset_llama_rms_norm(hidden_states, weight, eps):
    """Llama's cast placement with a ``(1 + w)`` weight (the op's ``offset=1, cast_before_weight``)."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + eps)
    return (1.0 + weight) * hidden_states.to(input_dtype)


def unweighted_rms_norm(hidden_states, weight, eps):
    """Llama's spelling without a weight (e.g. q/k norms without scale)."""
    assert weight is None
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + eps)
    return hidden_states.to(input_dtype)


# name: (eager function, has weight, offset, cast_before_weight)
MODES = {
    "llama": (llama_rms_norm, True, 0.0, True),
    "llama_unit_offset": (unit_offset_llama_rms_norm, True, 1.0, True),
    "gemma": (gemma_rms_norm, True, 1.0, False),
    "gemma3n": (gemma3n_rms_norm, True, 0.0, False),
    "gemma3n_no_scale": (gemma3n_rms_norm, False, 0.0, False),
    "no_weight": (unweighted_rms_norm, False, 0.0, True),
}


def fused_rms_norm(offset, cast_before_weight, eps):
    return lambda x, weight: torch.ops.slothc.rms_norm(x, weight, eps, offset, cast_before_weight)


def test_eager_matches_transformers():
    """The eager spellings above are the transformers modules' forwards, bit for bit."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = testing.make_tensor((3, 5, 40), torch.bfloat16, seed=1)
    w = testing.make_tensor((40,), torch.bfloat16, seed=2)
    cases = [
        (LlamaRMSNorm(40, eps=1e-5), llama_rms_norm, w),
        (GemmaRMSNorm(40, eps=1e-5), gemma_rms_norm, w),
        (Gemma3nRMSNorm(40, eps=1e-5), gemma3n_rms_norm, w),
        (Gemma3nRMSNorm(40, eps=1e-5, with_scale=False), gemma3n_rms_norm, None),
    ]
    for module, fn, weight in cases:
        params = {} if weight is None else {"weight": weight}
        expected = torch.func.functional_call(module, params, (x,))
        assert torch.equal(fn(x, weight, 1e-5), expected), type(module).__name__


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@st.composite
def rms_norm_cases(draw):
    mode = draw(st.sampled_from(sorted(MODES)))
    dtype = draw(testing.dtypes())
    _, has_weight, _, _ = MODES[mode]
    # Weights in x's dtype, in fp32 (autocast, or fp32 master weights), or in another half type.
    w_dtype = draw(st.sampled_from([dtype, torch.float32, OTHER_HALF[dtype]])) if has_weight else None
    return dict(
        mode=mode,
        # Rows of one element: the gradient is pure cancellation (test_single_column covers them).
        shape=draw(testing.row_shapes(min_cols=2)),
        dtype=dtype,
        w_dtype=w_dtype,
        layout=draw(testing.layouts()),
        eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        # Small inputs make eps matter; large ones stress the fp32 sum of squares.
        scale=draw(st.sampled_from([1.0, 1e-3, 30.0])),
        x_grad=draw(st.booleans()) if has_weight else True,
        w_grad=draw(st.booleans()) if has_weight else False,
        seed=draw(testing.seeds()),
    )


def _inputs(case):
    x = testing.make_tensor(
        case["shape"], case["dtype"], case["seed"], layout=case["layout"], device=DEVICE,
        scale=case["scale"], requires_grad=case["x_grad"],
    )
    w = None
    if case["w_dtype"] is not None:
        w = testing.make_tensor(
            case["shape"][-1:], case["w_dtype"], case["seed"] + 1, device=DEVICE, requires_grad=case["w_grad"]
        )
    return x, w


@given(rms_norm_cases())
def test_rms_norm_matches_eager(case):
    """Forward and every gradient within the ratio criterion of eager, over all spellings."""
    eager, _, offset, cast_before_weight = MODES[case["mode"]]
    eps = case["eps"]
    x, w = _inputs(case)
    testing.check_against_eager(
        fused_rms_norm(offset, cast_before_weight, eps), lambda x, w: eager(x, w, eps), x, w
    )


@given(rms_norm_cases())
def test_rms_norm_backward_op_matches_reference(case):
    """The backward op directly (both compute_dw values) against the reference backward in float64."""
    _, _, offset, cast = MODES[case["mode"]]
    x, w = _inputs(case)
    x, w = x.detach(), (w.detach() if w is not None else None)
    out_dtype = rms_norm_module.rms_norm_out_dtype(x.dtype, w.dtype if w is not None else None, cast)
    dy = testing.make_tensor(x.shape, out_dtype, case["seed"] + 2, device=DEVICE)
    compute_dw = w is not None and case["w_grad"]
    dx, dw = torch.ops.slothc.rms_norm_backward(dy, x, w, case["eps"], offset, cast, compute_dw)
    assert dx.dtype == x.dtype and dx.shape == x.shape and dx.is_contiguous()
    if compute_dw:
        assert dw.dtype == w.dtype and dw.shape == w.shape
    else:
        assert dw.numel() == 0

    def reference(dy, x, w):
        return rms_norm_module.rms_norm_backward_reference(dy, x, w, case["eps"], offset, cast, compute_dw)

    expected = reference(dy, x, w)
    expected64 = reference(dy.double(), x.double(), w.double() if w is not None else None)
    # As check_against_eager does for gradients: bf16 inputs widen the interpreter's floor, and no
    # elementwise fp32 tolerance (dx elements are differences of large terms).
    low = torch.bfloat16 if torch.bfloat16 in (x.dtype, out_dtype, case["w_dtype"]) else None
    testing.assert_matches_reference(dx, expected[0], expected64[0], k=3.0, name="dx", low_dtype=low, fp32_close=False)
    if compute_dw:
        testing.assert_matches_reference(
            dw, expected[1], expected64[1], k=3.0, name="dw", low_dtype=low, fp32_close=False
        )


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["llama", "gemma"])
@pytest.mark.parametrize("shape", [(1, 37), (37,), (1, 2)])
def test_single_row(mode, shape):
    eager, _, offset, cast = MODES[mode]
    x = testing.make_tensor(shape, torch.bfloat16, 3, device=DEVICE, requires_grad=True)
    w = testing.make_tensor(shape[-1:], torch.bfloat16, 4, device=DEVICE, requires_grad=True)
    testing.check_against_eager(fused_rms_norm(offset, cast, 1e-6), lambda x, w: eager(x, w, 1e-6), x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 1)])
def test_single_column(dtype, shape):
    """One-element rows normalise to sign(x) (x^2 >> eps): the forward is checked, and dx is the
    cancelling r * g * (1 - n^2) = r * g * eps / (x^2 + eps), i.e. ~zero, where eager and the
    kernel both return rounding noise."""
    x = testing.make_tensor(shape, dtype, 5, device=DEVICE)
    w = testing.make_tensor(shape[-1:], dtype, 6, device=DEVICE)
    testing.check_against_eager(fused_rms_norm(0.0, True, 1e-6), lambda x, w: llama_rms_norm(x, w, 1e-6), x, w)
    x.requires_grad_(True)
    torch.ops.slothc.rms_norm(x, w, 1e-6, 0.0, True).sum().backward()
    assert x.grad.abs().max() < 1e-2 * w.abs().max()  # vs r * g ~ |w| / |x| for an ordinary row


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)])
def test_zero_rows(shape):
    x = torch.zeros(shape, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    w = torch.ones(64, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    y = torch.ops.slothc.rms_norm(x, w, 1e-6, 0.0, True)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_rows_too_long_take_the_reference(monkeypatch):
    """Rows over MAX_FUSED_SIZE elements do not fit one program: the reference computes them."""
    def fail(*args, **kwargs):
        raise AssertionError("launcher called for an over-long row")

    monkeypatch.setattr(rms_norm_module, "rms_norm_fwd", fail)
    monkeypatch.setattr(rms_norm_module, "rms_norm_bwd", fail)
    n = _launch.MAX_FUSED_SIZE + 1
    x = testing.make_tensor((2, n), torch.bfloat16, 5, device=DEVICE, requires_grad=True)
    w = testing.make_tensor((n,), torch.bfloat16, 6, device=DEVICE, requires_grad=True)
    testing.check_against_eager(fused_rms_norm(0.0, True, 1e-6), lambda x, w: llama_rms_norm(x, w, 1e-6), x, w)


def test_float64_input_takes_the_reference():
    x = testing.make_tensor((4, 33), torch.float64, 7, device=DEVICE)
    w = testing.make_tensor((33,), torch.float64, 8, device=DEVICE)
    y = torch.ops.slothc.rms_norm(x, w, 1e-6, 0.0, True)
    expected = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_compute_dw_without_weight_is_an_error():
    x = testing.make_tensor((2, 8), torch.float32, 9, device=DEVICE)
    with pytest.raises(ValueError, match="compute_dw"):
        torch.ops.slothc.rms_norm_backward(x, x, None, 1e-6, 0.0, True, True)


def test_frozen_weight_skips_dw(monkeypatch):
    """A weight that does not require grad (LoRA) reaches the backward as compute_dw=False."""
    seen = []
    for name in ("rms_norm_bwd", "rms_norm_backward_reference"):
        original = getattr(rms_norm_module, name)

        def spy(*args, _original=original):
            seen.append(args[-1])  # compute_dw
            return _original(*args)

        monkeypatch.setattr(rms_norm_module, name, spy)
    x = testing.make_tensor((3, 16), torch.bfloat16, 10, device=DEVICE, requires_grad=True)
    w = testing.make_tensor((16,), torch.bfloat16, 11, device=DEVICE)
    torch.ops.slothc.rms_norm(x, w, 1e-6, 0.0, True).sum().backward()
    assert seen == [False] and w.grad is None and x.grad is not None


def test_triton_path_runs(monkeypatch):
    """Where Triton is used (CUDA, or TRITON_INTERPRET=1 on CPU) the op launches the kernels,
    so the properties above test the kernels and not only the reference."""
    if not _launch.use_triton(torch.empty(0, device=DEVICE)):
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the reference path is the one under test")
    calls = count_calls(monkeypatch, rms_norm_module, ("rms_norm_fwd", "rms_norm_bwd"))
    x = testing.make_tensor((4, 48), torch.bfloat16, 12, device=DEVICE, requires_grad=True)
    w = testing.make_tensor((48,), torch.bfloat16, 13, device=DEVICE, requires_grad=True)
    torch.ops.slothc.rms_norm(x, w, 1e-6, 0.0, True).sum().backward()
    assert calls == {"rms_norm_fwd": 1, "rms_norm_bwd": 1}


# --------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "permuted", "padded"])
@pytest.mark.parametrize("mode", ["llama", "gemma", "no_weight"])
def test_opcheck(layout, mode):
    _, has_weight, offset, cast = MODES[mode]
    x = testing.make_tensor((2, 3, 40), torch.bfloat16, 14, layout=layout, device=DEVICE, requires_grad=True)
    w = testing.make_tensor((40,), torch.float32, 15, device=DEVICE, requires_grad=True) if has_weight else None
    torch.library.opcheck(torch.ops.slothc.rms_norm.default, (x, w, 1e-6, offset, cast))

    out_dtype = rms_norm_module.rms_norm_out_dtype(x.dtype, w.dtype if has_weight else None, cast)
    dy = testing.make_tensor((2, 3, 40), out_dtype, 16, layout=layout, device=DEVICE)
    w_bwd = w.detach() if has_weight else None
    for compute_dw in ([True, False] if has_weight else [False]):
        torch.library.opcheck(
            torch.ops.slothc.rms_norm_backward.default, (dy, x.detach(), w_bwd, 1e-6, offset, cast, compute_dw)
        )


# --------------------------------------------------------------------------------------------
# The residual add before the norm: slothc::add_rms_norm and its backward
# --------------------------------------------------------------------------------------------


@st.composite
def add_rms_norm_cases(draw):
    case = draw(rms_norm_cases())
    # The residual stream in x's dtype, or in fp32 (an fp32 model under autocast: the block's bf16
    # output added to the fp32 stream)
    case["r_dtype"] = draw(st.sampled_from([case["dtype"], torch.float32]))
    case["r_layout"] = draw(testing.layouts())
    return case


def _add_inputs(case):
    x, w = _inputs(case)
    r = testing.make_tensor(
        case["shape"], case["r_dtype"], case["seed"] + 3, layout=case["r_layout"], device=DEVICE,
        requires_grad=case["x_grad"],
    )
    return x, r, w


@given(add_rms_norm_cases())
def test_add_rms_norm_matches_eager(case):
    """``s = x + r`` and the norm of s, forward and every gradient (of x, r and w, with cotangents
    for both s and y) within the ratio criterion of eager's add followed by its norm."""
    eager, _, offset, cast = MODES[case["mode"]]
    eps = case["eps"]
    x, r, w = _add_inputs(case)

    def eager_fn(x, r, w):
        s = x + r
        return s, eager(s, w, eps)

    testing.check_against_eager(lambda x, r, w: torch.ops.slothc.add_rms_norm(x, r, w, eps, offset, cast), eager_fn, x, r, w)


@given(add_rms_norm_cases())
def test_add_rms_norm_is_the_add_then_the_norm(case):
    """Bit for bit the unfused ops: ``s`` is torch's ``x + r`` and ``y`` is ``slothc::rms_norm(s)``;
    the backward's ``ds`` is ``slothc::rms_norm_backward``'s dx plus ``grad_s`` as autograd sums
    them (in s's dtype), and ``dw`` is the norm's. So the fusion changes no value of a training step."""
    _, _, offset, cast = MODES[case["mode"]]
    eps = case["eps"]
    x, r, w = (t.detach() if t is not None else None for t in _add_inputs(case))
    s, y = torch.ops.slothc.add_rms_norm(x, r, w, eps, offset, cast)
    assert s.is_contiguous() and y.is_contiguous()
    assert torch.equal(s, x + r)
    assert torch.equal(y, torch.ops.slothc.rms_norm(x + r, w, eps, offset, cast))

    compute_dw = w is not None and case["w_grad"]
    dy = testing.make_tensor(s.shape, y.dtype, case["seed"] + 4, device=DEVICE)
    grad_s = testing.make_tensor(s.shape, s.dtype, case["seed"] + 5, device=DEVICE)
    for g in (grad_s, None):
        ds, dw = torch.ops.slothc.add_rms_norm_backward(dy, g, s, w, eps, offset, cast, compute_dw)
        dx, dw_norm = torch.ops.slothc.rms_norm_backward(dy, s, w, eps, offset, cast, compute_dw)
        assert ds.dtype == s.dtype and ds.is_contiguous()
        assert torch.equal(ds, dx + g if g is not None else dx)
        assert torch.equal(dw, dw_norm)


@given(add_rms_norm_cases())
def test_add_rms_norm_backward_matches_reference(case):
    """The backward op against the float64 reference: ``ds = dx + grad_s`` and ``dw``."""
    _, _, offset, cast = MODES[case["mode"]]
    x, r, w = (t.detach() if t is not None else None for t in _add_inputs(case))
    s = x + r
    out_dtype = rms_norm_module.rms_norm_out_dtype(s.dtype, w.dtype if w is not None else None, cast)
    dy = testing.make_tensor(s.shape, out_dtype, case["seed"] + 2, device=DEVICE)
    grad_s = testing.make_tensor(s.shape, s.dtype, case["seed"] + 6, device=DEVICE)
    compute_dw = w is not None and case["w_grad"]
    ds, dw = torch.ops.slothc.add_rms_norm_backward(dy, grad_s, s, w, case["eps"], offset, cast, compute_dw)

    def reference(dy, s, w, g):
        return rms_norm_module.rms_norm_backward_reference(dy, s, w, case["eps"], offset, cast, compute_dw, grad_x=g)

    expected = reference(dy, s, w, grad_s)
    expected64 = reference(dy.double(), s.double(), w.double() if w is not None else None, grad_s.double())
    low = torch.bfloat16 if torch.bfloat16 in (s.dtype, out_dtype, case["w_dtype"]) else None
    testing.assert_matches_reference(ds, expected[0], expected64[0], k=3.0, name="ds", low_dtype=low, fp32_close=False)
    if compute_dw:
        testing.assert_matches_reference(dw, expected[1], expected64[1], k=3.0, name="dw", low_dtype=low, fp32_close=False)


def test_add_rms_norm_bad_input_names_the_fix():
    x = testing.make_tensor((2, 8), torch.float32, 19, device=DEVICE)
    with pytest.raises(ValueError, match="residual .* must have one shape"):
        torch.ops.slothc.add_rms_norm(x, x[:1], None, 1e-6, 0.0, True)
    with pytest.raises(ValueError, match="grad_s .* must have s's shape and dtype"):
        torch.ops.slothc.add_rms_norm_backward(x, x.bfloat16(), x, None, 1e-6, 0.0, True, False)
    with pytest.raises(ValueError, match="compute_dw"):
        torch.ops.slothc.add_rms_norm_backward(x, None, x, None, 1e-6, 0.0, True, True)


def test_add_rms_norm_triton_path_runs(monkeypatch):
    """Where Triton is used the fused op and its backward launch the kernels with the residual."""
    if not _launch.use_triton(torch.empty(0, device=DEVICE)):
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the reference path is the one under test")
    seen = []
    for name in ("rms_norm_fwd", "rms_norm_bwd"):
        original = getattr(rms_norm_module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, sorted(k for k, v in kwargs.items() if v is not None)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(rms_norm_module, name, spy)
    x = testing.make_tensor((4, 48), torch.bfloat16, 20, device=DEVICE, requires_grad=True)
    r = testing.make_tensor((4, 48), torch.bfloat16, 21, device=DEVICE, requires_grad=True)
    w = testing.make_tensor((48,), torch.bfloat16, 22, device=DEVICE)
    s, y = torch.ops.slothc.add_rms_norm(x, r, w, 1e-6, 0.0, True)
    (s.float().sum() + y.float().pow(2).sum()).backward()
    assert seen == [("rms_norm_fwd", ["residual"]), ("rms_norm_bwd", ["grad_x"])]


@pytest.mark.parametrize("layout", ["contiguous", "permuted", "padded"])
@pytest.mark.parametrize("mode", ["llama", "gemma", "no_weight"])
def test_add_rms_norm_opcheck(layout, mode):
    _, has_weight, offset, cast = MODES[mode]
    x = testing.make_tensor((2, 3, 40), torch.bfloat16, 23, layout=layout, device=DEVICE, requires_grad=True)
    r = testing.make_tensor((2, 3, 40), torch.float32, 24, device=DEVICE, requires_grad=True)
    w = testing.make_tensor((40,), torch.float32, 25, device=DEVICE, requires_grad=True) if has_weight else None
    torch.library.opcheck(torch.ops.slothc.add_rms_norm.default, (x, r, w, 1e-6, offset, cast))

    s = (x + r).detach()
    out_dtype = rms_norm_module.rms_norm_out_dtype(s.dtype, w.dtype if has_weight else None, cast)
    dy = testing.make_tensor((2, 3, 40), out_dtype, 26, layout=layout, device=DEVICE)
    grad_s = testing.make_tensor((2, 3, 40), s.dtype, 27, device=DEVICE)
    w_bwd = w.detach() if has_weight else None
    for compute_dw in ([True, False] if has_weight else [False]):
        for g in (grad_s, None):
            torch.library.opcheck(
                torch.ops.slothc.add_rms_norm_backward.default, (dy, g, s, w_bwd, 1e-6, offset, cast, compute_dw)
            )


# --------------------------------------------------------------------------------------------
# Real sizes (GPU only)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n_cols", [2048, 4096, 5120, 8192])
@pytest.mark.parametrize("mode", ["llama", "gemma"])
def test_real_sizes(n_cols, mode):
    eager, _, offset, cast = MODES[mode]
    x = testing.make_tensor((16384, n_cols), torch.bfloat16, 17, device=DEVICE, requires_grad=True)
    w = testing.make_tensor((n_cols,), torch.bfloat16, 18, device=DEVICE, requires_grad=True)
    testing.check_against_eager(fused_rms_norm(offset, cast, 1e-6), lambda x, w: eager(x, w, 1e-6), x, w)
