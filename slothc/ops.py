"""Public functional wrappers over the ``torch.ops.slothc.*`` custom ops.

The graph passes insert these ops; they can also be called directly. Each has a registered fake
(shape propagation), a derived backward (itself a custom op) and runs the Triton kernels on CUDA,
the plain-torch reference elsewhere (or the kernels in the Triton interpreter with
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Optional

import torch

import slothc.kernels.layer_norm  # noqa: F401  (registers slothc::layer_norm)
import slothc.kernels.rms_norm  # noqa: F401  (registers slothc::rms_norm)

__all__ = ["rms_norm", "layer_norm"]


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
