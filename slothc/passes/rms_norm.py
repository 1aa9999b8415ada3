"""RMSNorm: the spellings real models use, rewritten to ``slothc::rms_norm``.

    out = weight (*) (x / sqrt(mean(x^2, -1) + eps))

Spellings (all after normalization, so ``x.float()``, ``pow``/``x*x``, ``rsqrt``/``1/sqrt`` ...
are alike):

- ``llama`` (Llama, Mistral, Qwen2/3 incl. per-head q/k norms, Phi-3, Granite, ...): upcast, normalize,
  cast back to the input dtype, then ``weight *`` (result in ``promote(weight, x)``).
- ``weight_then_cast`` (OLMo2): ``(weight * normalized).to(x.dtype)``: weight applied in fp32.
- ``gemma`` (Gemma 1/2/3 incl. q/k norms): ``(normalized * (offset + weight.float())).type_as(x)``.
- ``no_weight``: upcast, normalize, cast back; no scale.
- ``scale_cast`` (DeepSeek-V4's and HY-V4's unweighted norm): ``x * rsqrt(mean(x.float()^2) + eps).to(x.dtype)``:
  the scale is cast to x's dtype and applied there. Eager rounds twice in x's dtype (the scale, then
  the product), the op once: the same values in fp32, within an ulp in bf16/fp16.
- ``fp32``: no casts at all: only fused when the input is fp32 (in half precision eager would
  compute in half precision, which the fused kernel does not reproduce).

Known near-misses are reported, never approximated: eps added after the rsqrt or after the sqrt, a
norm over a dim other than the last.
"""

from __future__ import annotations

import torch
from torch.fx import Node

import slothc.kernels.rms_norm  # noqa: F401  (registers torch.ops.slothc.rms_norm)
from slothc.passes.matcher import Rule, RuleSet, always

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

EPS_AFTER_RSQRT = "eps added after rsqrt"
EPS_AFTER_SQRT = "eps added after sqrt"
NOT_LAST_DIM = "normalized over a dim other than the last"
NOT_A_TENSOR = "input is not a tensor"
UNSUPPORTED_DTYPE = "input dtype is not fp32, bf16 or fp16"
HALF_WITHOUT_UPCAST = "computed in half precision without an upcast"
SYMBOLIC_HIDDEN = "normalized size is symbolic"
EPS_NOT_CONSTANT = "eps is not a constant"
OFFSET_NOT_CONSTANT = "weight offset is not a constant"
WEIGHT_SHAPE = "weight shape is not (hidden,)"
WEIGHT_DTYPE = "weight dtype is not fp32, bf16 or fp16"
UNSUPPORTED_DEVICE = "input is not on a CUDA or CPU device"
WEIGHT_OTHER_DTYPE = "torch.rms_norm with a weight of another dtype than the input (it casts the product back)"


# -- patterns ----------------------------------------------------------------------------------------


def _rms_norm_llama_pattern(x, weight, eps, dim):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(dim, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rms_norm_weight_then_cast_pattern(x, weight, eps, dim):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(dim, keepdim=True) + eps)
    return (weight * h).to(x.dtype)


def _rms_norm_gemma_pattern(x, weight, eps, dim, offset):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(dim, keepdim=True) + eps)
    h = h * (offset + weight.float())
    return h.type_as(x)


def _rms_norm_variance_upcast_pattern(x, weight, eps, dim):
    # CPM-Ant: the variance from an fp32 copy, the product from x itself (promoted to fp32 by the
    # fp32 rsqrt: the same values as llama's), cast back, then the weight
    variance = x.to(torch.float32).pow(2).mean(dim, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def _rms_norm_torch_pattern(x, normalized_shape, weight, eps):
    # nn.RMSNorm / F.rms_norm (DiffLlama's per-head group norm): aten computes in fp32, casts to
    # x's dtype, then multiplies by the weight
    return torch.rms_norm(x, normalized_shape, weight, eps)


def _rms_norm_no_weight_pattern(x, eps, dim):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(dim, keepdim=True) + eps)
    return h.to(x.dtype)


def _rms_norm_scale_cast_pattern(x, eps, dim):
    return x * torch.rsqrt(x.to(torch.float32).pow(2).mean(dim, keepdim=True) + eps).to(x.dtype)


def _rms_norm_fp32_pattern(x, eps, dim):
    return x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + eps)


def _rms_norm_eps_after_rsqrt_pattern(x, eps, dim):
    return x * (torch.rsqrt(x.pow(2).mean(dim, keepdim=True)) + eps)


def _rms_norm_eps_after_sqrt_pattern(x, eps, dim):
    return x / (torch.sqrt(x.pow(2).mean(dim, keepdim=True)) + eps)


# -- replacements ------------------------------------------------------------------------------------


def _rms_norm_llama_replacement(m, x, weight, eps, dim):
    return torch.ops.slothc.rms_norm(x, weight, float(eps), 0.0, True)


def _rms_norm_weight_then_cast_replacement(m, x, weight, eps, dim):
    return torch.ops.slothc.rms_norm(x, weight, float(eps), 0.0, False)


def _rms_norm_gemma_replacement(m, x, weight, eps, dim, offset):
    return torch.ops.slothc.rms_norm(x, weight, float(eps), float(offset), False)


def _rms_norm_torch_replacement(m, x, normalized_shape, weight, eps):
    if eps is None:  # aten's default: the epsilon of the dtype it computes in (fp32 for bf16/fp16)
        eps = torch.finfo(torch.promote_types(m.val("x").dtype, torch.float32)).eps
    return torch.ops.slothc.rms_norm(x, weight, float(eps), 0.0, True)


def _input_reason(x) -> str | None:
    if not isinstance(x, torch.Tensor):
        return NOT_A_TENSOR
    if x.dtype not in SUPPORTED_DTYPES:
        return UNSUPPORTED_DTYPE
    if x.device.type not in ("cuda", "cpu"):
        return UNSUPPORTED_DEVICE
    return None


def _rms_norm_torch_check(m) -> str | None:
    x = m.val("x")
    if (reason := _input_reason(x)) is not None:
        return reason
    shape = m["normalized_shape"]
    if isinstance(shape, Node) or not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return NOT_LAST_DIM
    if not isinstance(x.shape[-1], int):
        return SYMBOLIC_HIDDEN
    if m["eps"] is not None and (isinstance(m["eps"], Node) or not isinstance(m["eps"], (int, float))):
        return EPS_NOT_CONSTANT
    weight = m.val("weight")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (x.shape[-1],):
            return WEIGHT_SHAPE
        if weight.dtype != x.dtype:
            return WEIGHT_OTHER_DTYPE
    return None


def _rms_norm_no_weight_replacement(m, x, eps, dim):
    return torch.ops.slothc.rms_norm(x, None, float(eps), 0.0, True)


_rms_norm_fp32_replacement = _rms_norm_no_weight_replacement


# -- checks ------------------------------------------------------------------------------------------


def _rms_norm_check(m) -> str | None:
    x = m.val("x")
    if (reason := _input_reason(x)) is not None:
        return reason
    dim = m["dim"]
    if not isinstance(dim, int) or dim not in (-1, x.dim() - 1):
        return NOT_LAST_DIM
    if not isinstance(x.shape[-1], int):
        return SYMBOLIC_HIDDEN
    if isinstance(m["eps"], Node) or not isinstance(m["eps"], (int, float)):
        return EPS_NOT_CONSTANT
    if "offset" in m.captures and (isinstance(m["offset"], Node) or not isinstance(m["offset"], (int, float))):
        return OFFSET_NOT_CONSTANT
    if "weight" in m.captures:
        weight = m.val("weight")
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (x.shape[-1],):
            return WEIGHT_SHAPE
        if weight.dtype not in SUPPORTED_DTYPES:
            return WEIGHT_DTYPE
    return None


def _rms_norm_fp32_check(m) -> str | None:
    x = m.val("x")
    if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16):
        return HALF_WITHOUT_UPCAST
    return _rms_norm_check(m)


# Order matters: a more specific spelling before one it contains (gemma's ``offset + weight`` would
# also pass as the weight of ``weight_then_cast``; the fused result would be the same, the label not).
RULES = RuleSet(
    [
        Rule("rms_norm", "llama", _rms_norm_llama_pattern, _rms_norm_llama_replacement, _rms_norm_check),
        Rule("rms_norm", "variance_upcast", _rms_norm_variance_upcast_pattern, _rms_norm_llama_replacement, _rms_norm_check),
        Rule("rms_norm", "torch", _rms_norm_torch_pattern, _rms_norm_torch_replacement, _rms_norm_torch_check),
        Rule("rms_norm", "gemma", _rms_norm_gemma_pattern, _rms_norm_gemma_replacement, _rms_norm_check),
        Rule("rms_norm", "weight_then_cast", _rms_norm_weight_then_cast_pattern, _rms_norm_weight_then_cast_replacement, _rms_norm_check),
        Rule("rms_norm", "no_weight", _rms_norm_no_weight_pattern, _rms_norm_no_weight_replacement, _rms_norm_check),
        Rule("rms_norm", "scale_cast", _rms_norm_scale_cast_pattern, _rms_norm_no_weight_replacement, _rms_norm_check),
        Rule("rms_norm", "fp32", _rms_norm_fp32_pattern, _rms_norm_fp32_replacement, _rms_norm_fp32_check),
        Rule("rms_norm", "eps_after_rsqrt", _rms_norm_eps_after_rsqrt_pattern, None, always(EPS_AFTER_RSQRT)),
        Rule("rms_norm", "eps_after_sqrt", _rms_norm_eps_after_sqrt_pattern, None, always(EPS_AFTER_SQRT)),
    ]
)
