"""LayerNorm pattern: nn.LayerNorm / F.layer_norm fused, with and without affine params and autocast."""

import pytest
import torch
import torch.nn.functional as F

from slothc.passes import layer_norm as P
from tests.passes._capture import capture


def _inputs(dtype, hidden=20):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    b = (0.1 * torch.randn(hidden, generator=g)).to(dtype)
    return x, w, b


@pytest.mark.parametrize("affine", ["weight_bias", "weight", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_is_fused(affine, dtype):
    x, w, b = _inputs(dtype)
    w = w if affine != "none" else None
    b = b if affine == "weight_bias" else None

    def fn(x):
        return F.layer_norm(x, (x.shape[-1],), weight=w, bias=b, eps=1e-5)

    report, _, out = capture(fn, x)
    assert report.count("layer_norm") == 1, str(report)
    tol = {} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, fn(x), **tol)


def test_module_layer_norm_is_fused():
    ln = torch.nn.LayerNorm(16)
    x = torch.randn(3, 16)
    report, _, out = capture(ln, x)
    assert report.count("layer_norm") == 1
    torch.testing.assert_close(out, ln(x))


def test_layer_norm_under_autocast_matches_eager_dtype():
    ln = torch.nn.LayerNorm(16)
    x = torch.randn(3, 16)

    def fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ln(x @ torch.eye(16))  # the matmul runs in bf16 under autocast

    report, _, out = capture(fn, x)
    assert report.count("layer_norm") == 1
    expected = fn(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_multi_dim_layer_norm_is_skipped():
    x = torch.randn(2, 3, 4)
    report, _, out = capture(lambda x: F.layer_norm(x, (3, 4)), x)
    assert report.count("layer_norm") == 0
    assert [s.reason for s in report.skipped] == [P.NOT_LAST_DIM]
    torch.testing.assert_close(out, F.layer_norm(x, (3, 4)))


def cohere(x, w, eps=1e-5):  # CohereLayerNorm.forward: written out, no bias, fp32, cast back
    input_dtype = x.dtype
    h = x.to(torch.float32)
    mean = h.mean(-1, keepdim=True)
    variance = (h - mean).pow(2).mean(-1, keepdim=True)
    h = (h - mean) * torch.rsqrt(variance + eps)
    h = w.to(torch.float32) * h
    return h.to(input_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cohere_written_out_layer_norm_is_fused(dtype):
    x, w, _ = _inputs(dtype)
    x.requires_grad_()
    w = w.clone().requires_grad_()
    report, _, out = capture(cohere, x, w)
    assert [s.variant for s in report.fused["layer_norm"]] == ["cohere"], str(report)
    expected = cohere(x, w)
    assert out.dtype == expected.dtype
    tol = {} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, expected, **tol)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(expected, (x, w), g), **tol)


def test_cohere_form_over_two_dims_is_skipped():
    x, w, _ = _inputs(torch.float32)

    def two_dims(x, w):
        h = x.to(torch.float32)
        mean = h.mean(-2, keepdim=True)
        variance = (h - mean).pow(2).mean(-2, keepdim=True)
        h = (h - mean) * torch.rsqrt(variance + 1e-5)
        return (w[:3, None].to(torch.float32) * h).to(x.dtype)

    report, _, _ = capture(two_dims, x, w)
    assert report.count("layer_norm") == 0 and [s.reason for s in report.skipped] == [P.NOT_LAST_DIM], str(report)
