"""Small pieces several test files share: eager code as Hugging Face writes it, and launch counting."""

from __future__ import annotations

import collections

import torch


def llama_rms_norm(hidden_states, weight, eps):
    """``LlamaRMSNorm.forward`` (also Mistral, Qwen2/3, Phi3, ...)."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def count_calls(monkeypatch, module, names) -> collections.Counter:
    """Wrap ``module.<name>`` for each name (e.g. the launchers) so that every call is counted."""
    calls = collections.Counter()
    for name in names:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls
