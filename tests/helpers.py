"""Small pieces several test files share: eager code as Hugging Face writes it, and launch counting."""

from __future__ import annotations

import collections
import contextlib
import warnings

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


@contextlib.contextmanager
def reference_ops_on_cpu(monkeypatch):
    """Training-loop tests on the CPU: slothc's ops take their torch reference path (not the Triton
    interpreter: seconds a call), transformers' and peft's warnings are silenced, and Dynamo starts
    and ends with empty caches."""
    from slothc.kernels import _launch

    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()
