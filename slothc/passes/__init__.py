"""Fusion passes: normalization, then one ordered rule set per fusion.

``PASSES`` is the ordered list of (fusion name, RuleSet). It is built once, lazily (patterns are
traced on first use, not at import time). Rule sets of one bucket are applied in order; a later
fusion sees the graph that earlier ones produced.
"""

from __future__ import annotations

import functools

import torch

from slothc.options import Options
from slothc.report import Report


@functools.lru_cache(None)
def fusion_passes() -> tuple:
    from slothc.passes import layer_norm, linear_cross_entropy, rms_norm

    return (
        ("rms_norm", rms_norm.RULES),
        ("layer_norm", layer_norm.RULES),
        ("linear_cross_entropy", linear_cross_entropy.RULES),
    )


def run(gm: torch.fx.GraphModule, opts: Options, report: Report, graph_index: int = 0) -> None:
    """Normalize ``gm`` (and its nested subgraphs) and apply every enabled fusion, in place."""
    from slothc.passes.matcher import apply
    from slothc.passes.normalize import normalize

    normalize(gm)
    for name, rules in fusion_passes():
        if name in opts.enabled:
            apply(gm, rules, report, graph_index=graph_index, options=opts)
    gm.recompile()
