"""RMSNorm pattern: every spelling real models use is fused; every near-miss is skipped with its reason."""

import pytest
import torch
import torch.utils.checkpoint
from hypothesis import given, settings, strategies as st

from slothc.passes import rms_norm as P
from slothc.passes.matcher import INTERMEDIATE_ESCAPES
from tests.passes._capture import capture

EPS = 1e-6


def llama(x, w):  # LlamaRMSNorm.forward (also Mistral, Qwen2/3, Phi-3, Granite)
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + EPS)
    return w * h.to(input_dtype)


def llama_respelled(x, w):  # the same math in other spellings
    h = x.float()
    h = h / torch.sqrt(torch.mean(h * h, dim=[x.dim() - 1], keepdim=True) + EPS)
    return h.to(dtype=x.dtype) * w


def gemma(x, w):  # Gemma/Gemma2/Gemma3 RMSNorm: (1 + w) in fp32, cast at the end
    def _norm(h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)

    output = _norm(x.float())
    output = output * (1.0 + w.float())
    return output.type_as(x)


def olmo2(x, w):  # Olmo2RMSNorm: weight applied in fp32, then cast back
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return (w * h).to(input_dtype)


def no_weight(x, w):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return h.to(x.dtype)


def fp32_only(x, w):  # no casts at all
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def cpmant(x, w):  # CpmAntLayerNorm: the variance from an fp32 copy, the product from x itself
    old_dtype = x.dtype
    variance = x.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
    return (x * torch.rsqrt(variance + EPS)).to(old_dtype) * w


def scale_cast(x, w):  # DeepseekV4UnweightedRMSNorm / HYV4's: the scale cast to x's dtype, applied there; no weight
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + EPS).to(x.dtype)


def gemma4(x, w):  # Gemma4RMSNorm / Gemma3n: pow(v, -0.5) for rsqrt, the weight in fp32, type_as at the end
    h = x.float()
    normed = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + EPS, -0.5)
    return (normed * w.float()).type_as(x)


def qk_norm(x, w):  # Qwen3 / OLMo2 per-head norm on a (batch, seq, heads, head_dim) view
    return llama(x.view(*x.shape[:-1], -1, w.shape[0]), w).transpose(1, 2)


SPELLINGS = {
    "llama": (llama, "llama", 1),
    "llama_respelled": (llama_respelled, "llama", 1),
    "gemma": (gemma, "gemma", 1),
    "olmo2": (olmo2, "weight_then_cast", 1),
    "cpmant": (cpmant, "variance_upcast", 1),
    "gemma4": (gemma4, "weight_then_cast", 1),
    "no_weight": (no_weight, "no_weight", 1),
    "scale_cast": (scale_cast, "scale_cast", 1),
    "fp32_only": (fp32_only, "fp32", 1),
}


def _inputs(dtype, hidden=24, weight_dtype=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(weight_dtype or dtype)
    return x, w


@pytest.mark.parametrize(
    "name, dtype",
    [(name, dtype) for name in SPELLINGS for dtype in (torch.float32, torch.bfloat16) if name != "fp32_only" or dtype == torch.float32],
)
def test_spelling_is_fused(name, dtype):  # fp32_only in bf16 is the half_without_upcast near-miss
    fn, variant, count = SPELLINGS[name]
    x, w = _inputs(dtype)
    report, _, out = capture(fn, x, w)
    assert report.count("rms_norm") == count, str(report)
    assert [s.variant for s in report.fused["rms_norm"]] == [variant]
    assert not report.skipped, str(report)
    expected = fn(x, w)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2 if dtype != torch.float32 else 1.3e-6)


def test_per_head_qk_norm_is_fused():
    x, _ = _inputs(torch.bfloat16, hidden=32)
    w = torch.ones(8, dtype=torch.bfloat16)
    report, _, out = capture(qk_norm, x, w)
    assert report.count("rms_norm") == 1
    torch.testing.assert_close(out, qk_norm(x, w), atol=1e-2, rtol=1e-2)


def test_fp32_weight_with_bf16_input_keeps_eager_dtype():
    x, w = _inputs(torch.bfloat16, weight_dtype=torch.float32)
    report, _, out = capture(llama, x, w)
    assert report.count("rms_norm") == 1
    assert out.dtype == torch.float32 == llama(x, w).dtype


def test_fused_inside_activation_checkpoint():
    def fn(x, w):
        return torch.utils.checkpoint.checkpoint(llama, x, w, use_reentrant=False) + 1

    x, w = _inputs(torch.float32)
    report, (gm,), out = capture(fn, x, w)
    assert report.count("rms_norm") == 1, str(report)
    assert any(n.target is torch.ops.higher_order.tag_activation_checkpoint for n in gm.graph.nodes)
    torch.testing.assert_close(out, fn(x, w))


# -- near-misses -------------------------------------------------------------------------------------


def eps_after_rsqrt(x, w):
    h = x.to(torch.float32)
    h = h * (torch.rsqrt(h.pow(2).mean(-1, keepdim=True)) + EPS)
    return w * h.to(x.dtype)


def eps_after_sqrt(x, w):
    h = x.to(torch.float32)
    h = h / (torch.sqrt(h.pow(2).mean(-1, keepdim=True)) + EPS)
    return w * h.to(x.dtype)


def other_dim(x, w):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def intermediate_escapes(x, w):
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + EPS)
    return w * h.to(x.dtype), variance


def scalar_weight(x, w):
    return 2.0 * no_weight(x, w)


def half_without_upcast(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def wrong_weight_shape(x, w):
    return llama(x, w[:1])


NEAR_MISSES = {
    "eps_after_rsqrt": (eps_after_rsqrt, P.EPS_AFTER_RSQRT),
    "eps_after_sqrt": (eps_after_sqrt, P.EPS_AFTER_SQRT),
    "other_dim": (other_dim, P.NOT_LAST_DIM),
    "intermediate_escapes": (intermediate_escapes, INTERMEDIATE_ESCAPES),
    "half_without_upcast": (half_without_upcast, P.HALF_WITHOUT_UPCAST),
    "wrong_weight_shape": (wrong_weight_shape, P.WEIGHT_SHAPE),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_miss_is_skipped_with_reason(name):
    fn, reason = NEAR_MISSES[name]
    dtype = torch.bfloat16 if name == "half_without_upcast" else torch.float32
    x, w = _inputs(dtype)
    report, _, out = capture(fn, x, w)
    reasons = [s.reason for s in report.skipped if s.fusion == "rms_norm"]
    assert reason in reasons, str(report)
    expected = fn(x, w)
    for got, want in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(got, want)


def test_scalar_weight_still_fuses_the_norm_under_it():
    x, w = _inputs(torch.float32)
    report, _, out = capture(scalar_weight, x, w)
    assert report.count("rms_norm") == 1 and report.fused["rms_norm"][0].variant == "no_weight"
    torch.testing.assert_close(out, scalar_weight(x, w))


def test_disabled_fusion_is_not_applied():
    x, w = _inputs(torch.float32)
    report, _, _ = capture(llama, x, w, options={"rms_norm": False})
    assert report.count("rms_norm") == 0 and not report.skipped


# -- the property: fused iff the check passes --------------------------------------------------------


@st.composite
def rms_configs(draw):
    return dict(
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        upcast=draw(st.booleans()),
        eps_place=draw(st.sampled_from(["inside", "after_rsqrt"])),
        last_dim=draw(st.booleans()),
        weight=draw(st.sampled_from(["none", "vector", "scalar_shape"])),
        hidden=draw(st.integers(1, 40)),
    )


def _expected(cfg):
    if cfg["eps_place"] == "after_rsqrt":
        return P.EPS_AFTER_RSQRT
    if not cfg["upcast"] and cfg["dtype"] != torch.float32:
        return P.HALF_WITHOUT_UPCAST
    if not cfg["last_dim"]:
        return P.NOT_LAST_DIM
    if cfg["weight"] == "scalar_shape" and cfg["upcast"] and cfg["hidden"] != 1:
        return P.WEIGHT_SHAPE
    return None


def _build(cfg):
    dim = -1 if cfg["last_dim"] else 1

    def fn(x, w):
        h = x.to(torch.float32) if cfg["upcast"] else x
        ms = h.pow(2).mean(dim, keepdim=True)
        h = h * torch.rsqrt(ms + EPS) if cfg["eps_place"] == "inside" else h * (torch.rsqrt(ms) + EPS)
        if cfg["upcast"]:
            h = h.to(x.dtype)
        return h if cfg["weight"] == "none" else w * h

    return fn


@settings(deadline=None)
@given(rms_configs())
def test_fused_iff_check_passes(cfg):
    fn = _build(cfg)
    hidden = cfg["hidden"]
    x = torch.randn(2, 3, hidden).to(cfg["dtype"])
    w = torch.randn(1 if cfg["weight"] == "scalar_shape" else hidden).to(cfg["dtype"])
    report, _, out = capture(fn, x, w)
    expected = _expected(cfg)
    if expected is None:
        assert report.count("rms_norm") == 1 and not report.skipped, (cfg, str(report))
    else:
        assert report.count("rms_norm") == 0 or cfg["weight"] == "scalar_shape", (cfg, str(report))
        assert expected in [s.reason for s in report.skipped], (cfg, str(report))
    tol = dict(atol=2e-2, rtol=2e-2) if cfg["dtype"] != torch.float32 else {}
    torch.testing.assert_close(out, fn(x, w), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine, eps", [(True, 1e-5), (False, 1e-5), (True, None)], ids=["weight", "no_weight", "default_eps"])
def test_torch_rms_norm_module_is_fused(dtype, affine, eps):
    """nn.RMSNorm / F.rms_norm (DiffLlama's per-head group norm): torch.rms_norm in the graph."""
    norm = torch.nn.RMSNorm(24, eps=eps, elementwise_affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(24))
    x, _ = _inputs(dtype)
    x.requires_grad_()
    report, _, out = capture(norm, x)
    assert [s.variant for s in report.fused["rms_norm"]] == ["torch"], str(report)
    expected = norm(x)
    assert out.dtype == expected.dtype
    tol = {} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, expected, **tol)
    params = [x] + ([norm.weight] if affine else [])
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, params, g), torch.autograd.grad(expected, params, g), **tol)


def test_torch_rms_norm_with_a_weight_of_another_dtype_is_skipped():
    norm = torch.nn.RMSNorm(24)  # fp32 weight
    x, _ = _inputs(torch.bfloat16)
    report, _, out = capture(norm, x)
    assert report.count("rms_norm") == 0 and [s.reason for s in report.skipped] == [P.WEIGHT_OTHER_DTYPE], str(report)
    torch.testing.assert_close(out, norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 3, 24), (3, 129)])
def test_scale_cast_spelling_matches_eager_by_the_float64_criterion(shape, dtype):
    """DeepSeek-V4 rounds the scale to x's dtype, then the product; the op rounds once: its result
    and gradient against float64 are within the bound of eager's own (exact in fp32)."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4UnweightedRMSNorm

    from slothc import testing

    eager = DeepseekV4UnweightedRMSNorm(eps=EPS)
    x = testing.make_tensor(shape, dtype, seed=sum(shape)).requires_grad_()
    testing.check_against_eager(lambda t: capture(eager, t)[2], eager, x, seed=1)
