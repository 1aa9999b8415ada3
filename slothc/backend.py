"""The ``slothc`` torch.compile backend.

``torch.compile(model, backend="slothc", options={...})`` finds this function through the
``torch_dynamo_backends`` entry point. For each FX graph Dynamo captures it runs

    normalize -> fusion passes -> report -> inner compiler (Inductor by default)

The passes rewrite the torch-level graph *before* autograd, so AOTAutograd builds the backward from
the slothc ops' registered backward formulas.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from slothc.options import Options
from slothc.report import Report, emit

def slothc(gm: torch.fx.GraphModule, example_inputs: list, options: Mapping[str, Any] | None = None):
    """Dynamo backend entry point: rewrite ``gm`` and hand it to the inner compiler."""
    opts = Options.from_dict(options)
    report = opts.collect if opts.collect is not None else Report()
    compiled = compile_graph(gm, example_inputs, opts, report)
    if opts.report:
        emit(report)
    return compiled


def compile_graph(gm: torch.fx.GraphModule, example_inputs: list, opts: Options, report: Report):
    """Rewrite one graph in place, record what was done in ``report``, return the compiled callable."""
    from slothc import passes

    passes.run(gm, opts, report, graph_index=report.graphs)
    report.graphs += 1
    return _inner(opts.inner)(gm, example_inputs)


@functools.lru_cache(None)
def _inner(name: str):
    from torch._dynamo import lookup_backend

    return lookup_backend(name)


def explain(model, *args, options: Mapping[str, Any] | None = None, **kwargs) -> Report:
    """Compile ``model`` with slothc, run it once on ``(*args, **kwargs)`` and return the fusion report.

    When the output carries a loss (``output.loss`` or a scalar tensor that requires grad) the
    backward runs too, so the backward ops are exercised; the model's ``.grad`` fields are restored
    afterwards. ``options`` are the backend options; the inner compiler defaults to ``"eager"``
    here because only the report is wanted. Dynamo's caches are reset before and after.
    """
    opts = dict(options or {})
    opts.setdefault("inner", "eager")
    parsed = Options.from_dict(opts)
    report = Report()

    def backend(gm, example_inputs):
        return compile_graph(gm, example_inputs, parsed, report)

    saved = {p: p.grad for p in model.parameters() if p.requires_grad} if isinstance(model, torch.nn.Module) else {}
    torch._dynamo.reset()
    try:
        out = torch.compile(model, backend=backend)(*args, **kwargs)
        loss = _find_loss(out)
        if loss is not None:
            loss.backward()
    finally:
        for p, g in saved.items():
            p.grad = g
        torch._dynamo.reset()
    return report


def _find_loss(out):
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, (tuple, list)) and out:
        loss = out[0]
    if loss is None and isinstance(out, torch.Tensor):
        loss = out
    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad:
        return loss
    return None
