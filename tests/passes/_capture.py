"""Run the slothc passes on the graph Dynamo captures from a function, and keep the result."""

from __future__ import annotations

import torch

from slothc.options import Options
from slothc.passes.matcher import apply
from slothc.passes.normalize import normalize
from slothc.report import Report


def capture(fn, *args, rules=None, options=None):
    """Compile ``fn`` with a backend that runs normalize + ``rules`` (default: all slothc passes).

    Returns (report, graph modules, compiled fn output). The rewritten graph runs eagerly.
    """
    report, graphs = Report(), []

    def backend(gm, example_inputs):
        if rules is None:
            from slothc import passes

            passes.run(gm, Options.from_dict({"inner": "eager", **(options or {})}), report)
        else:
            normalize(gm)
            apply(gm, rules, report)
            gm.recompile()
        report.graphs += 1
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return report, graphs, out


def targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
