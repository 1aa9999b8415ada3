"""LayerNorm: ``F.layer_norm`` over the last dim, rewritten to ``slothc::layer_norm``.

    out = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias        (weight, bias optional)

``nn.LayerNorm`` and ``F.layer_norm`` both reach the graph as ``F.layer_norm``; Cohere's
LayerNorm (no bias, computed in fp32 and cast back) is written out with ``mean``/``rsqrt``
(variant ``cohere``). Under autocast, aten
runs layer_norm in fp32 (its inputs are cast up and the output is fp32): the graph's fake value says
which dtype eager produced, and the replacement casts the inputs to it explicitly, so the fused op
computes what eager computes with or without autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import Node

import slothc.kernels.layer_norm  # noqa: F401  (registers torch.ops.slothc.layer_norm)
from slothc.passes.matcher import Rule, RuleSet
from slothc.passes.rms_norm import SUPPORTED_DTYPES, UNSUPPORTED_DEVICE, UNSUPPORTED_DTYPE

NOT_LAST_DIM = "normalized over more than the last dim"
SYMBOLIC_HIDDEN = "normalized size is symbolic"
EPS_NOT_CONSTANT = "eps is not a constant"
PARAM_SHAPE = "weight or bias shape is not (hidden,)"
PARAM_DTYPE = "weight or bias dtype is not fp32, bf16 or fp16"


def _layer_norm_pattern(x, normalized_shape, weight, bias, eps):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def _layer_norm_cohere_pattern(x, weight, eps, dim):
    # Cohere's LayerNorm written out (also its per-head q/k norms): fp32, no bias, rounded once
    h = x.to(torch.float32)
    mean = h.mean(dim, keepdim=True)
    variance = (h - mean).pow(2).mean(dim, keepdim=True)
    h = (h - mean) * torch.rsqrt(variance + eps)
    h = weight.to(torch.float32) * h
    return h.to(x.dtype)


def _layer_norm_cohere_replacement(m, x, weight, eps, dim):
    return torch.ops.slothc.layer_norm(x, weight, None, float(eps))  # fp32 inside, one rounding to x's dtype


def _layer_norm_cohere_check(m) -> str | None:
    x = m.val("x")
    if not isinstance(x, torch.Tensor) or x.dtype not in SUPPORTED_DTYPES:
        return UNSUPPORTED_DTYPE
    if x.device.type not in ("cuda", "cpu"):
        return UNSUPPORTED_DEVICE
    if not isinstance(m["dim"], int) or m["dim"] not in (-1, x.dim() - 1):
        return NOT_LAST_DIM
    if not isinstance(x.shape[-1], int):
        return SYMBOLIC_HIDDEN
    if isinstance(m["eps"], Node) or not isinstance(m["eps"], (int, float)):
        return EPS_NOT_CONSTANT
    weight = m.val("weight")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (x.shape[-1],):
        return PARAM_SHAPE
    if weight.dtype not in SUPPORTED_DTYPES:
        return PARAM_DTYPE
    return None


def _layer_norm_replacement(m, x, normalized_shape, weight, bias, eps):
    out_dtype = m.out.dtype
    if m.val("x").dtype != out_dtype:  # autocast: aten's layer_norm ran in fp32
        x = x.to(out_dtype)
        weight = weight.to(out_dtype) if weight is not None else None
        bias = bias.to(out_dtype) if bias is not None else None
    return torch.ops.slothc.layer_norm(x, weight, bias, float(eps))


def _layer_norm_check(m) -> str | None:
    x = m.val("x")
    if not isinstance(x, torch.Tensor) or x.dtype not in SUPPORTED_DTYPES:
        return UNSUPPORTED_DTYPE
    if x.device.type not in ("cuda", "cpu"):
        return UNSUPPORTED_DEVICE
    shape = m["normalized_shape"]
    if isinstance(shape, Node) or not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return NOT_LAST_DIM
    if not isinstance(x.shape[-1], int):
        return SYMBOLIC_HIDDEN
    if isinstance(m["eps"], Node) or not isinstance(m["eps"], (int, float)):
        return EPS_NOT_CONSTANT
    for name in ("weight", "bias"):
        param = m.val(name)
        if param is None:
            continue
        if not isinstance(param, torch.Tensor) or tuple(param.shape) != (x.shape[-1],):
            return PARAM_SHAPE
        if param.dtype not in SUPPORTED_DTYPES:
            return PARAM_DTYPE
    return None


RULES = RuleSet([
    Rule("layer_norm", "layer_norm", _layer_norm_pattern, _layer_norm_replacement, _layer_norm_check),
    Rule("layer_norm", "cohere", _layer_norm_cohere_pattern, _layer_norm_cohere_replacement, _layer_norm_cohere_check),
])
