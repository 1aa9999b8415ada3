"""Public functional wrappers over the ``torch.ops.slothc.*`` custom ops.

The graph passes insert these ops; they can also be called directly. Each has a registered fake
(shape propagation), a derived backward (itself a custom op) and runs the Triton kernels on CUDA,
the plain-torch reference elsewhere (or the kernels in the Triton interpreter with
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Optional

import torch

import slothc.kernels.cross_entropy  # noqa: F401  (registers slothc::cross_entropy)
import slothc.kernels.layer_norm  # noqa: F401  (registers slothc::layer_norm)
import slothc.kernels.linear_cross_entropy  # noqa: F401  (registers slothc::linear_cross_entropy)
import slothc.kernels.lora_linear  # noqa: F401  (registers slothc::lora_linear)
import slothc.kernels.mlp  # noqa: F401  (registers slothc::mlp, slothc::mlp_act)
import slothc.kernels.qlora_linear  # noqa: F401  (registers slothc::dequantize_4bit, slothc::qlora_linear)
import slothc.kernels.rms_norm  # noqa: F401  (registers slothc::rms_norm)
import slothc.kernels.rope  # noqa: F401  (registers slothc::rope)

__all__ = ["rms_norm", "layer_norm", "rope", "linear_cross_entropy", "lora_linear", "qlora_linear", "dequantize_4bit", "mlp"]


def rms_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    offset: float = 0.0,
    cast_before_weight: bool = True,
) -> torch.Tensor:
    """RMSNorm over the last dim. ``cast_before_weight=True``: Llama's ``(offset + w) * n.to(x.dtype)``;
    False: Gemma's ``(n * (offset + w.float())).to(x.dtype)`` (Gemma uses ``offset=1``)."""
    return torch.ops.slothc.rms_norm(x, weight, eps, offset, cast_before_weight)


def layer_norm(
    x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 1e-5
) -> torch.Tensor:
    """``F.layer_norm(x, (x.shape[-1],), weight, bias, eps)``, computed in fp32, rounded once to x.dtype."""
    return torch.ops.slothc.layer_norm(x, weight, bias, eps)


def rope(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    rotary_dim: Optional[int] = None,
    interleaved: bool = False,
    out_dtype: Optional[torch.dtype] = None,
):
    """Rotary embedding of q (and k): ``x * cos + rotate(x) * sin`` on the first ``rotary_dim``
    channels (default: all), the rest passed through; ``rotate`` is ``rotate_half`` (Llama) or, with
    ``interleaved``, GPT-J's ``rotate_every_two``. cos/sin broadcast as Hugging Face's
    ``apply_rotary_pos_emb`` makes them (``[B, 1, S, r]`` heads-first, ``[B, S, 1, r]`` seq-first).
    Returns ``q_rot`` or ``(q_rot, k_rot)``, in ``out_dtype`` or eager's promoted dtype."""
    rotary_dim = int(cos.shape[-1] if rotary_dim is None else rotary_dim)
    outs = torch.ops.slothc.rope(q, k, cos, sin, rotary_dim, bool(interleaved), out_dtype)
    return outs[0] if k is None else (outs[0], outs[1])


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.cross_entropy(z.float(), labels, ...)`` of the logits ``z = F.linear(hidden, weight, bias)``
    (times ``logit_scale``, then ``softcap * tanh(z / softcap)`` if ``softcap``), without
    materialising them: the loss is computed chunk by chunk over tokens, with its gradients.

    Leading dims of ``hidden`` [..., H], ``labels`` [...] and ``logits`` [..., V] are flattened.
    ``logits``: the model's final logits if it computed them anyway (read instead of recomputed;
    they get no gradient: it flows to ``hidden`` and ``weight``). Returns the fp32 loss.
    """
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    logits2 = logits.reshape(-1, logits.shape[-1]) if logits is not None else None
    grad_enabled = torch.is_grad_enabled()
    lm_head_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    compute_grad = grad_enabled and (hidden.requires_grad or lm_head_grad)
    compute_dw = compute_grad and lm_head_grad
    loss, _, _, _ = torch.ops.slothc.linear_cross_entropy(
        hidden2, weight, bias, labels.reshape(-1), logits2, int(ignore_index), reduction,
        float(label_smoothing), float(logit_scale), float(softcap), compute_grad, compute_dw,
    )
    return loss


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    bias: Optional[torch.Tensor] = None,
    *,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + sum_i scaling[i] * F.linear(F.linear(x, A_i), B_i)`` with a frozen
    ``weight`` (and bias): PEFT's LoRA ``Linear`` with its adapters ``(A_i, B_i)``. Computed in
    ``dtype`` (default: x's; under autocast pass the autocast dtype), gradients for x, A_i and B_i.
    ``torch.ops.slothc.lora_linear`` takes several projections of one input at once."""
    dtype = dtype or x.dtype
    outs = torch.ops.slothc.lora_linear(x, [weight], [bias], list(lora_a), list(lora_b), [float(s) for s in scaling],
                                        [0] * len(lora_a), dtype, dtype, dtype)
    return outs[0]


def _quant_state(weight):
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError("slothc: expected a bitsandbytes 4-bit weight (Params4bit with a quant_state); quantise the layer first")
    return qs


def dequantize_4bit(weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The ``[out, in]`` weight of a bitsandbytes 4-bit ``Params4bit`` in ``dtype``, bit-exact with
    bitsandbytes' ``dequantize_4bit`` (the Triton kernel on CUDA)."""
    qs = _quant_state(weight)
    nested_blocksize = int(qs.state2.blocksize) if qs.nested else 256
    return torch.ops.slothc.dequantize_4bit(*slothc.kernels.qlora_linear.state_tensors(weight.data, qs), [int(s) for s in qs.shape],
                                            int(qs.blocksize), qs.quant_type, dtype, nested_blocksize)


def qlora_linear(
    x: torch.Tensor,
    weight,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    bias: Optional[torch.Tensor] = None,
    *,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """:func:`lora_linear` with a bitsandbytes 4-bit base weight (``Params4bit``): W is dequantised in
    the forward and again in the backward for dX, never kept. Computed in ``dtype`` (default x's)."""
    dtype = dtype or x.dtype
    (*state, nested_blocksize) = slothc.kernels.qlora_linear.op_state([(weight.data, _quant_state(weight))])
    return torch.ops.slothc.qlora_linear(x, *state, [bias], list(lora_a), list(lora_b), [float(s) for s in scaling],
                                         [0] * len(lora_a), dtype, dtype, dtype, None, nested_blocksize)[0]


def mlp(
    gate: torch.Tensor,
    up: torch.Tensor,
    act: str,
    weight: torch.Tensor,
    lora_a: Optional[list[torch.Tensor]] = None,
    lora_b: Optional[list[torch.Tensor]] = None,
    scaling: Optional[list[float]] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``down(act(gate) * up)``: ``act`` one of ``slothc.derive.ACTIVATIONS`` ("silu", "gelu",
    "gelu_tanh", "relu", "relu2", "quick_gelu"), ``down`` a frozen linear (``weight``, ``bias``) with
    optional LoRA adapters. The product ``act(gate) * up`` is not kept for the backward."""
    lora_a, lora_b, scaling = list(lora_a or []), list(lora_b or []), [float(s) for s in (scaling or [])]
    dtype = gate.dtype
    return torch.ops.slothc.mlp(gate, up, act, weight, bias, lora_a, lora_b, scaling, dtype, dtype, dtype)[0]
