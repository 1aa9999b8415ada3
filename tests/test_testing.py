"""slothc.testing: the criterion passes right kernels and fails wrong ones; its helpers do what they say."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slothc import testing
from tests.helpers import llama_rms_norm


# Candidate "kernels", in plain torch so the test needs no Triton. Each takes (x, weight, eps).


def right_rms_norm(x, weight, eps):
    """A different but correct spelling: sum of squares / n, sqrt then divide."""
    xf = x.float()
    n = xf / torch.sqrt(xf.square().sum(-1, keepdim=True) / x.shape[-1] + eps)
    return weight * n.to(x.dtype)


def rms_norm_without_eps(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True))).to(x.dtype)


def rms_norm_slightly_scaled(x, weight, eps):
    """Correct math, then a relative error of 2^-5 (4 to 8 bf16 ulps): a small scaled error."""
    return (llama_rms_norm(x, weight, eps).float() * (1 + 2**-5)).to(x.dtype)


class _WrongBackward(torch.autograd.Function):
    """Right forward; the backward forgets the projection term of dx (dx = r * g only)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return llama_rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
        n = (xf * r).to(x.dtype)
        dx = (dy.float() * weight.float() * r).to(x.dtype)
        dw = (dy * n).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm_wrong_backward(x, weight, eps):
    return _WrongBackward.apply(x, weight, eps)


def _inputs(dtype, shape=(8, 96), scale=1.0):
    x = testing.make_tensor(shape, dtype, seed=1, scale=scale, requires_grad=True)
    w = testing.make_tensor(shape[-1:], dtype, seed=2, shift=1.0, requires_grad=True)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_right_kernel_passes(dtype):
    x, w = _inputs(dtype)
    results = testing.check_against_eager(
        lambda x, w: right_rms_norm(x, w, 1e-6), lambda x, w: llama_rms_norm(x, w, 1e-6), x, w
    )
    assert [r.name for r in results] == ["output 0", "grad of input 0", "grad of input 1"]
    assert all(r.fused_error <= r.bound for r in results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forgotten_eps_fails(dtype):
    # Inputs of rms ~1e-3 make eps=1e-6 a third of the mean square.
    x, w = _inputs(dtype, scale=1e-3)
    with pytest.raises(AssertionError, match=r"output 0: fused error .* > 2 x eager error"):
        testing.check_against_eager(
            lambda x, w: rms_norm_without_eps(x, w, 1e-6), lambda x, w: llama_rms_norm(x, w, 1e-6), x, w
        )


def test_scaled_error_fails():
    x, w = _inputs(torch.bfloat16, shape=(64, 256))
    with pytest.raises(AssertionError, match="output 0"):
        testing.check_against_eager(
            lambda x, w: rms_norm_slightly_scaled(x, w, 1e-6), lambda x, w: llama_rms_norm(x, w, 1e-6), x, w
        )


def test_wrong_gradient_fails():
    x, w = _inputs(torch.bfloat16)
    with pytest.raises(AssertionError, match="grad of input 0"):
        testing.check_against_eager(
            lambda x, w: rms_norm_wrong_backward(x, w, 1e-6), lambda x, w: llama_rms_norm(x, w, 1e-6), x, w
        )
    # Without grad the forward alone passes: the gradient is what is wrong.
    testing.check_against_eager(
        lambda x, w: rms_norm_wrong_backward(x, w, 1e-6),
        lambda x, w: llama_rms_norm(x, w, 1e-6),
        x.detach(), w.detach(),
    )


def test_error_message_names_the_worst_element():
    ref = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    eager = ref.to(torch.bfloat16)
    fused = eager.clone()
    fused[2, 1] += 0.25
    with pytest.raises(AssertionError) as info:
        testing.assert_matches_reference(fused, eager, ref, name="y")
    message = str(info.value)
    assert "y: fused error" in message and "index (2, 1)" in message
    assert "eager=" in message and "float64=" in message


def test_nonfinite_positions_must_agree():
    ref = torch.randn(4, 5, dtype=torch.float64)
    eager = ref.to(torch.float16)
    fused = eager.clone()
    fused[1, 3] = float("nan")
    with pytest.raises(AssertionError, match=r"NaN positions differ.*index \(1, 3\)"):
        testing.assert_matches_reference(fused, eager, ref)
    eager[1, 3] = float("nan")  # the same NaN in both: accepted, the rest compared
    testing.assert_matches_reference(fused, eager, ref)
    fused[0, 0] = float("inf")
    eager[0, 0] = float("-inf")
    with pytest.raises(AssertionError, match=r"\+Inf positions differ"):
        testing.assert_matches_reference(fused, eager, ref)


def test_dtype_and_shape_must_agree():
    ref = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(AssertionError, match="dtype"):
        testing.assert_matches_reference(ref.float(), ref.to(torch.bfloat16), ref)
    with pytest.raises(AssertionError, match="shapes"):
        testing.assert_matches_reference(ref.float()[:2], ref.float(), ref)


def test_exact_eager_leaves_the_rounding_floor():
    """Where eager is exact (error 0), a kernel one rounding away from float64 still passes."""
    ref = torch.randn(100, dtype=torch.float64)
    result = testing.assert_matches_reference(ref.to(torch.bfloat16), ref.to(torch.bfloat16), ref)
    assert result.eager_error == result.fused_error > 0 and result.floor >= result.fused_error


def test_fp32_also_needs_assert_close():
    """fp32 results also meet torch.testing.assert_close against eager: small elements are held to
    fp32's tolerances even where the max-based criterion is dominated by large ones."""
    ref = torch.cat([torch.full((1,), 1000.0), torch.linspace(-1e-3, 1e-3, 99)]).double()
    eager = ref.float()
    fused = eager.clone()
    fused[1:] += 5e-5  # far under the floor of 4 fp32 ulps of 1000, far over atol=1e-5 at 1e-3
    with pytest.raises(AssertionError, match="fp32 vs eager"):
        testing.assert_matches_reference(fused, eager, ref)


def test_float64_mode_keeps_hard_coded_upcasts_in_float64():
    x = torch.randn(4, 8, dtype=torch.float64)
    with testing.float64_mode():
        assert x.to(torch.float32).dtype == torch.float64
        assert x.float().dtype == torch.float64
        assert x.to("cpu", torch.bfloat16).dtype == torch.float64
        assert x.type_as(torch.zeros(1, dtype=torch.float16)).dtype == torch.float64
        assert torch.zeros(3, dtype=torch.float32).dtype == torch.float64
        assert torch.arange(3).dtype == torch.int64  # non-floating dtypes are left alone
        positions = torch.arange(3)
        assert positions.float().dtype == torch.float64  # integers made float: float64
        assert torch.equal(positions.float(), torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
        y = x.float()
        y.add_(1)  # a cast made a copy: in-place ops on it leave x alone
    assert not torch.equal(x, y)
    # Llama's code under the mode computes in float64 throughout.
    w = torch.randn(8, dtype=torch.float64)
    with testing.float64_mode():
        out = llama_rms_norm(x, w, 1e-6)
    exact = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, exact, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounded_rounds_inside_float64_mode(dtype):
    x = torch.tensor([1 / 3, 1e-3, -7.0], dtype=torch.float64)
    with testing.float64_mode():
        assert torch.equal(x.to(dtype), x)  # the mode keeps a plain cast in float64
        r = testing.rounded(x, dtype)
    assert r.dtype == torch.float64 and torch.equal(r, x.to(dtype).double()) and not torch.equal(r, x)


def test_parts_fn_floors_at_the_largest_part():
    """0.49 - 0.56 with each part rounded to bf16 first: the result is 4 of its ulps from the
    exact value however it is computed; with the parts named that passes, and an error of many
    parts' ulps still fails."""
    exact = torch.tensor([0.4902, -0.5623], dtype=torch.float64)
    eager = (exact.to(torch.bfloat16).double().sum()).to(torch.bfloat16).reshape(1)  # lands close by luck
    ref = exact.sum().reshape(1)
    off = ref.to(torch.bfloat16) + 2 * 2.0**-9  # one ulp of 0.5 in bf16 twice over: 4 ulps of 0.07
    with pytest.raises(AssertionError):
        testing.assert_matches_reference(off, eager, ref)
    testing.assert_matches_reference(off, eager, ref, parts_max=0.5623)
    with pytest.raises(AssertionError):
        testing.assert_matches_reference(ref.to(torch.bfloat16) + 40 * 2.0**-9, eager, ref, parts_max=0.5623)


def test_magnitude_fn_floors_an_fp32_sum_at_its_terms():
    """A dot product whose terms cancel (1 - 1 + 2**-10): an fp32 result a few ulps of the terms
    off is what any fp32 accumulation may give, and passes with the magnitude named; without it, and
    with an error of many terms' ulps, it fails."""
    x = torch.tensor([1.0, -1.0, 2.0**-10], dtype=torch.float32)
    w = torch.ones(3, dtype=torch.float32)
    off = float(torch.finfo(torch.float32).eps) * 2 * 2  # two fp32 roundings at the terms' size (2)

    def eager(x, w):
        return (x * w).sum().reshape(1)

    def fused(x, w, bump=off):
        return eager(x, w) + bump

    def magnitude(x, w):
        return (x.abs() * w.abs()).sum().reshape(1)

    with pytest.raises(AssertionError):
        testing.check_against_eager(fused, eager, x, w)
    testing.check_against_eager(fused, eager, x, w, magnitude_fn=magnitude)
    with pytest.raises(AssertionError):
        testing.check_against_eager(lambda x, w: fused(x, w, 40 * off), eager, x, w, magnitude_fn=magnitude)
    with pytest.raises(ValueError, match="magnitude_fn returned 2 tensors for 1 outputs"):
        testing.check_against_eager(eager, eager, x, w, magnitude_fn=lambda x, w: (magnitude(x, w),) * 2)


def test_inputs_keep_their_layout():
    x = testing.make_tensor((4, 6, 10), torch.float32, seed=3, layout="padded", requires_grad=True)
    seen = []

    def fused(x):
        seen.append((x.stride(), x.is_leaf, x.requires_grad))
        return x * 2

    testing.check_against_eager(fused, lambda x: x * 2, x)
    assert seen == [(x.stride(), True, True)]


def test_grad_outputs_can_be_given():
    x = testing.make_tensor((3, 5), torch.float32, seed=4, requires_grad=True)
    go = torch.full((3, 5), 2.0)
    captured = []

    def fused(x):
        y = x * 3
        y.register_hook(lambda g: captured.append(g))
        return y

    testing.check_against_eager(fused, lambda x: x * 3, x, grad_outputs=go)
    assert torch.equal(captured[0], go)


@pytest.mark.parametrize("layout", testing.LAYOUTS)
def test_make_tensor_layouts(layout):
    shape = (3, 4, 10)
    x = testing.make_tensor(shape, torch.bfloat16, seed=5, layout=layout, requires_grad=True)
    assert x.shape == shape and x.dtype == torch.bfloat16 and x.is_leaf and x.requires_grad
    assert torch.equal(x, testing.make_tensor(shape, torch.bfloat16, seed=5, layout=layout))  # deterministic
    if layout == "contiguous":
        assert x.is_contiguous()
    elif layout == "padded":
        assert x.stride() == (4 * 13, 13, 1)
    elif layout == "permuted":
        assert not x.is_contiguous() and x.stride(-1) == 1 and x.stride(0) < x.stride(1)
    else:
        assert x.stride(-1) == 12


@given(shape=testing.row_shapes(max_rows=16, max_cols=300, min_cols=2), dtype=testing.dtypes(), seed=testing.seeds())
def test_row_shapes_are_within_bounds(shape, dtype, seed):
    assert 1 <= math.prod(shape[:-1]) <= 16 and 2 <= shape[-1] <= 300 and len(shape) <= 3
    x = testing.make_tensor(shape, dtype, seed)
    assert x.shape == shape and torch.isfinite(x).all()


def test_profiles(monkeypatch):
    monkeypatch.delenv(testing.PROFILE_ENV, raising=False)
    assert testing.profile_name() == "ci"
    assert testing.size_scale() == testing.SizeScale(max_rows=16, max_cols=300)
    monkeypatch.setenv(testing.PROFILE_ENV, "gpu")
    assert testing.size_scale().max_cols >= 8192
    monkeypatch.setenv(testing.PROFILE_ENV, "nightly")
    with pytest.raises(ValueError, match="SLOTHC_HYPOTHESIS_PROFILE"):
        testing.profile_name()


@given(st.data())
def test_strategies_draw_only_metadata(data):
    """Strategies yield shapes, dtypes, layouts and seeds (never tensors)."""
    assert data.draw(testing.dtypes()) in (torch.float32, torch.bfloat16, torch.float16)
    assert data.draw(testing.layouts()) in testing.LAYOUTS
    assert isinstance(data.draw(testing.seeds()), int)
