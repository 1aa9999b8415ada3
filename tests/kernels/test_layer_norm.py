"""slothc::layer_norm against ``F.layer_norm`` (``nn.LayerNorm``, as Hugging Face models call it) and float64."""


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from slothc import testing
from slothc.kernels import _launch
from slothc.kernels import layer_norm as layer_norm_module
from tests.helpers import count_calls

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eager_layer_norm(eps):
    """``nn.LayerNorm.forward`` over the last dim; with fp32 parameters and 16-bit ``x``, the
    mixed-precision spelling (autocast runs layer_norm in fp32; the result is cast back).

    ``F.layer_norm`` itself takes mixed dtypes on the CPU but not on CUDA (torch 2.11: "expected
    scalar type BFloat16 but found Float"), and its CPU backward fails for an fp32 bias without a
    weight; the upcast spelling computes the same function on both.
    """
    def layer_norm(x, weight, bias):
        params = [p for p in (weight, bias) if p is not None]
        if all(p.dtype == x.dtype for p in params):
            return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        up = [p.float() if p is not None else None for p in (weight, bias)]
        return F.layer_norm(x.float(), (x.shape[-1],), *up, eps).to(x.dtype)

    return layer_norm


def fused_layer_norm(eps):
    return lambda x, weight, bias: torch.ops.slothc.layer_norm(x, weight, bias, eps)


@st.composite
def layer_norm_cases(draw):
    dtype = draw(testing.dtypes())
    has_weight = draw(st.booleans())
    has_bias = draw(st.booleans())
    # Parameters in x's dtype, or in fp32 (mixed precision).
    p_dtype = draw(st.sampled_from([dtype, torch.float32]))
    return dict(
        # Rows of 1 or 2 elements normalise to constants: the gradient is pure cancellation.
        shape=draw(testing.row_shapes(min_cols=3)),
        dtype=dtype,
        p_dtype=p_dtype,
        has_weight=has_weight,
        has_bias=has_bias,
        layout=draw(testing.layouts()),
        eps=draw(st.sampled_from([1e-5, 1e-12, 0.1])),
        scale=draw(st.sampled_from([1.0, 1e-3, 30.0])),
        # A large mean relative to the spread stresses the centring (x - mean) in fp32.
        shift=draw(st.sampled_from([0.0, 3.0])),
        x_grad=draw(st.booleans()),
        w_grad=draw(st.booleans()),
        b_grad=draw(st.booleans()),
        seed=draw(testing.seeds()),
    )


def _inputs(case):
    n = case["shape"][-1]
    x = testing.make_tensor(
        case["shape"], case["dtype"], case["seed"], layout=case["layout"], device=DEVICE,
        scale=case["scale"], shift=case["shift"] * case["scale"], requires_grad=case["x_grad"],
    )
    w = b = None
    if case["has_weight"]:
        w = testing.make_tensor((n,), case["p_dtype"], case["seed"] + 1, device=DEVICE, shift=1.0,
                                requires_grad=case["w_grad"])
    if case["has_bias"]:
        b = testing.make_tensor((n,), case["p_dtype"], case["seed"] + 2, device=DEVICE, requires_grad=case["b_grad"])
    return x, w, b


@given(layer_norm_cases())
def test_layer_norm_matches_eager(case):
    """Forward and every gradient (x, weight, bias) within the ratio criterion of eager."""
    x, w, b = _inputs(case)
    testing.check_against_eager(fused_layer_norm(case["eps"]), eager_layer_norm(case["eps"]), x, w, b)


@given(layer_norm_cases())
def test_layer_norm_backward_op_matches_reference(case):
    """The backward op directly, for every compute_dw/compute_db, against the reference in float64."""
    x, w, b = (t.detach() if t is not None else None for t in _inputs(case))
    dy = testing.make_tensor(x.shape, x.dtype, case["seed"] + 3, device=DEVICE)
    compute_dw = w is not None and case["w_grad"]
    compute_db = b is not None and case["b_grad"]
    dx, dw, db = torch.ops.slothc.layer_norm_backward(dy, x, w, b, case["eps"], compute_dw, compute_db)
    assert dx.dtype == x.dtype and dx.shape == x.shape and dx.is_contiguous()

    def reference(*tensors):
        return layer_norm_module.layer_norm_backward_reference(*tensors, case["eps"], compute_dw, compute_db)

    def up(t):
        return t.double() if t is not None else None

    expected = reference(dy, x, w, b)
    expected64 = reference(up(dy), up(x), up(w), up(b))
    # As check_against_eager does for gradients: bf16 inputs widen the interpreter's floor, and no
    # elementwise fp32 tolerance (dx elements are differences of large terms).
    low = torch.bfloat16 if torch.bfloat16 in (x.dtype, case["p_dtype"]) else None
    testing.assert_matches_reference(dx, expected[0], expected64[0], k=3.0, name="dx", low_dtype=low, fp32_close=False)
    for name, got, flag, param, e, r in (
        ("dw", dw, compute_dw, w, expected[1], expected64[1]),
        ("db", db, compute_db, b, expected[2], expected64[2]),
    ):
        if flag:
            assert got.dtype == param.dtype and got.shape == param.shape
            testing.assert_matches_reference(got, e, r, k=3.0, name=name, low_dtype=low, fp32_close=False)
        else:
            assert got.numel() == 0


@pytest.mark.parametrize("shape", [(1, 37), (37,), (1, 3)])
def test_single_row(shape):
    x = testing.make_tensor(shape, torch.bfloat16, 3, device=DEVICE, requires_grad=True)
    w = testing.make_tensor(shape[-1:], torch.float32, 4, device=DEVICE, requires_grad=True)
    b = testing.make_tensor(shape[-1:], torch.float32, 5, device=DEVICE, requires_grad=True)
    testing.check_against_eager(fused_layer_norm(1e-5), eager_layer_norm(1e-5), x, w, b)


@pytest.mark.parametrize("n_cols", [1, 2])
def test_rows_of_one_or_two(n_cols):
    """Such rows normalise to 0 (one element) or +-1 (two): the forward is checked; dx is ~zero."""
    x = testing.make_tensor((5, n_cols), torch.float32, 6, device=DEVICE)
    w = testing.make_tensor((n_cols,), torch.float32, 7, device=DEVICE)
    b = testing.make_tensor((n_cols,), torch.float32, 8, device=DEVICE)
    testing.check_against_eager(fused_layer_norm(1e-5), eager_layer_norm(1e-5), x, w, b)
    x.requires_grad_(True)
    torch.ops.slothc.layer_norm(x, w, b, 1e-5).sum().backward()
    assert x.grad.abs().max() < 1e-2


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)])
def test_zero_rows(shape):
    x = torch.zeros(shape, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    w = torch.ones(64, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    b = torch.zeros(64, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    y = torch.ops.slothc.layer_norm(x, w, b, 1e-5)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_rows_too_long_take_the_reference(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("launcher called for an over-long row")

    monkeypatch.setattr(layer_norm_module, "layer_norm_fwd", fail)
    monkeypatch.setattr(layer_norm_module, "layer_norm_bwd", fail)
    n = _launch.MAX_FUSED_SIZE + 1
    x = testing.make_tensor((2, n), torch.bfloat16, 9, device=DEVICE, requires_grad=True)
    w = testing.make_tensor((n,), torch.bfloat16, 10, device=DEVICE, requires_grad=True)
    b = testing.make_tensor((n,), torch.bfloat16, 11, device=DEVICE, requires_grad=True)
    testing.check_against_eager(fused_layer_norm(1e-5), eager_layer_norm(1e-5), x, w, b)


def test_float64_input_takes_the_reference():
    x = testing.make_tensor((4, 33), torch.float64, 12, device=DEVICE)
    w = testing.make_tensor((33,), torch.float64, 13, device=DEVICE)
    y = torch.ops.slothc.layer_norm(x, w, None, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x, (33,), w, None, 1e-5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("flags", [(True, False), (False, True)])
def test_backward_flags_need_their_parameter(flags):
    x = testing.make_tensor((2, 8), torch.float32, 14, device=DEVICE)
    with pytest.raises(ValueError, match="compute_d"):
        torch.ops.slothc.layer_norm_backward(x, x, None, None, 1e-5, *flags)


def test_frozen_parameters_skip_reductions(monkeypatch):
    """Parameters that do not require grad reach the backward as compute_dw/compute_db=False."""
    seen = []
    for name in ("layer_norm_bwd", "layer_norm_backward_reference"):
        original = getattr(layer_norm_module, name)

        def spy(*args, _original=original):
            seen.append(args[-2:])  # compute_dw, compute_db
            return _original(*args)

        monkeypatch.setattr(layer_norm_module, name, spy)
    x = testing.make_tensor((3, 16), torch.bfloat16, 15, device=DEVICE, requires_grad=True)
    w = testing.make_tensor((16,), torch.bfloat16, 16, device=DEVICE)
    b = testing.make_tensor((16,), torch.bfloat16, 17, device=DEVICE, requires_grad=True)
    torch.ops.slothc.layer_norm(x, w, b, 1e-5).sum().backward()
    assert seen == [(False, True)] and w.grad is None and b.grad is not None


def test_triton_path_runs(monkeypatch):
    """Where Triton is used (CUDA, or TRITON_INTERPRET=1 on CPU) the op launches the kernels."""
    if not _launch.use_triton(torch.empty(0, device=DEVICE)):
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the reference path is the one under test")
    calls = count_calls(monkeypatch, layer_norm_module, ("layer_norm_fwd", "layer_norm_bwd"))
    x = testing.make_tensor((4, 48), torch.bfloat16, 18, device=DEVICE, requires_grad=True)
    w = testing.make_tensor((48,), torch.bfloat16, 19, device=DEVICE, requires_grad=True)
    b = testing.make_tensor((48,), torch.bfloat16, 20, device=DEVICE, requires_grad=True)
    torch.ops.slothc.layer_norm(x, w, b, 1e-5).sum().backward()
    assert calls == {"layer_norm_fwd": 1, "layer_norm_bwd": 1}


@pytest.mark.parametrize("layout", ["contiguous", "permuted", "padded"])
@pytest.mark.parametrize("params", ["weight_bias", "weight", "none"])
def test_opcheck(layout, params):
    x = testing.make_tensor((2, 3, 40), torch.bfloat16, 21, layout=layout, device=DEVICE, requires_grad=True)
    w = testing.make_tensor((40,), torch.float32, 22, device=DEVICE, requires_grad=True) if "weight" in params else None
    b = testing.make_tensor((40,), torch.float32, 23, device=DEVICE, requires_grad=True) if "bias" in params else None
    torch.library.opcheck(torch.ops.slothc.layer_norm.default, (x, w, b, 1e-5))

    dy = testing.make_tensor((2, 3, 40), torch.bfloat16, 24, layout=layout, device=DEVICE)
    wd = w.detach() if w is not None else None
    bd = b.detach() if b is not None else None
    for compute_dw, compute_db in {(w is not None, b is not None), (False, False)}:
        torch.library.opcheck(
            torch.ops.slothc.layer_norm_backward.default, (dy, x.detach(), wd, bd, 1e-5, compute_dw, compute_db)
        )


@pytest.mark.gpu
@pytest.mark.parametrize("n_cols", [2048, 4096, 5120, 8192])
def test_real_sizes(n_cols):
    x = testing.make_tensor((16384, n_cols), torch.bfloat16, 25, device=DEVICE, requires_grad=True)
    w = testing.make_tensor((n_cols,), torch.bfloat16, 26, device=DEVICE, shift=1.0, requires_grad=True)
    b = testing.make_tensor((n_cols,), torch.bfloat16, 27, device=DEVICE, requires_grad=True)
    testing.check_against_eager(fused_layer_norm(1e-5), eager_layer_norm(1e-5), x, w, b)
