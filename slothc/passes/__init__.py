"""Fusion passes: normalization, then one ordered rule set per fusion.

``fusion_passes()`` is the ordered list of (fusion name, RuleSet, prepare, finish). It is built once,
lazily (patterns are traced on first use, not at import time). Rule sets are applied in order; a
later fusion sees the graph that earlier ones produced. ``prepare(graph, report, graph_index)`` (or
None) runs on each graph before its fusion's rules (one marked ``whole_module`` runs once, on the
GraphModule, and gets the options too): bitsandbytes' 4-bit matmuls are spelled as a
dequantise-then-linear there. ``finish(graph, report, graph_index)`` (or None) runs on each graph
after its fusion's rules, for rewrites across sites: the rotations of q and k become one call; LoRA
and QLoRA projections that share an input become one call; an MLP's activation is merged with its down
projection (which the LoRA fusion rewrote first).
"""

from __future__ import annotations

import functools

import torch

from slothc.options import Options
from slothc.report import Report


@functools.lru_cache(None)
def fusion_passes() -> tuple:
    from slothc.passes import causal_mask, layer_norm, linear_cross_entropy, lora_linear, mlp, qlora_linear, rms_norm, rope

    return (
        ("rms_norm", rms_norm.RULES, None, None),
        ("layer_norm", layer_norm.RULES, None, None),
        ("rope", rope.RULES, None, rope.finish_graph),
        # before lora_linear: its branch rule would report QLoRA's adapters as another LoRA form
        ("qlora_linear", qlora_linear.RULES, qlora_linear.prepare, qlora_linear.finish_graph),
        ("lora_linear", lora_linear.RULES, None, lora_linear.finish_graph),
        ("mlp", mlp.RULES, None, mlp.finish_graph),
        ("linear_cross_entropy", linear_cross_entropy.RULES, None, None),
        # no patterns: an SDPA mask that is the causal one, evaluated at compile time
        ("causal_mask", causal_mask.RULES, causal_mask.prepare, None),
    )


def run(gm: torch.fx.GraphModule, opts: Options, report: Report, graph_index: int = 0) -> None:
    """Normalize ``gm`` (and its nested subgraphs) and apply every enabled fusion, in place."""
    from slothc.passes.matcher import apply
    from slothc.passes.meta import graphs
    from slothc.passes.normalize import normalize

    normalize(gm)
    for name, rules, prepare, finish in fusion_passes():
        if name in opts.enabled:
            if prepare is not None and getattr(prepare, "whole_module", False):
                prepare(gm, report, graph_index, opts)  # it walks the nested graphs itself
            elif prepare is not None:
                for graph in graphs(gm):  # lazily: the bodies a prepare step removed are not visited
                    prepare(graph, report, graph_index)
            apply(gm, rules, report, graph_index=graph_index, options=opts)
            if finish is not None:
                for graph in graphs(gm):
                    finish(graph, report, graph_index)
    if opts.recompute_norms:
        recompute_norm_outputs(gm, report, graph_index)
    gm.recompile()


def recompute_norm_outputs(gm: torch.fx.GraphModule, report: Report, graph_index: int = 0) -> int:
    """Tag each fused norm of the top-level graph ``MUST_RECOMPUTE`` for AOTAutograd's partitioner.

    A norm's backward reads its input ``x`` (slothc's norms save ``x`` and the weights, not the
    statistics), so ``x`` is kept for the backward anyway; its output ``y`` is kept too when the
    next op's backward reads it (a LoRA projection's ``dA = G^T y``). Recomputed from ``x`` in the
    backward instead, ``y`` is not kept: one activation of the hidden size less for each norm
    before a LoRA projection (two a decoder layer), for one more norm forward each in the backward.
    The recomputation runs the same kernel on the same input: the values are the same bits. A
    checkpointed layer's body is left alone (everything in it is recomputed already). Returns the
    number tagged."""
    from torch.utils.checkpoint import CheckpointPolicy

    ops = {torch.ops.slothc.rms_norm, torch.ops.slothc.rms_norm.default, torch.ops.slothc.layer_norm,
           torch.ops.slothc.layer_norm.default}
    tagged = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ops and "recompute" not in node.meta:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            tagged += 1
    if tagged:
        report.notes.append(f"graph {graph_index}: {tagged} norm outputs are recomputed in the backward, not kept "
                            f"(recompute_norms; their inputs are kept for the norms' backward anyway)")
    return tagged
