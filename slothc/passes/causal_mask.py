"""Causal mask: an SDPA call whose explicit mask is provably the plain causal mask gets ``is_causal=True``.

Under ``torch.compile`` Hugging Face's ``masking_utils`` (transformers <= 5.17 with any torch, and
later versions with torch < 2.14) cannot take its eager shortcut, which checks at run time that
nothing is padded and then calls SDPA with ``is_causal=True``: while tracing it builds the mask
instead, e.g.::

    q_idx = arange(Q)[None, None, :, None];  kv_idx = arange(KV)[None, None, None, :]
    mask = (kv_idx <= q_idx).expand(B, -1, Q, KV)
    scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)

With a mask, SDPA cannot use its flash kernel (the mask must be read, and the kernel that reads one
is slower: measured ~3x the attention time of a Llama-3.2-1B step on an H100).

The pass evaluates the mask at compile time when it is a function of constants only (no graph
input, static sizes): the nodes that compute it are run on the CPU. If every ``[.., Q, KV]`` slice
allows exactly what SDPA's ``is_causal`` allows, ``kv <= q`` aligned to the top left (a boolean
mask, or an additive float mask of 0 and -inf / the dtype's lowest value; with ``Q != KV`` a mask
aligned to the bottom right, as a cache gives it, is another mask), the call becomes ``scaled_dot_product_attention(q, k, v, is_causal=True)`` with its other arguments
kept, and the mask nodes that nothing else reads are removed. This is what eager ``transformers``
computes: the flash kernel, no mask.

Skipped with the reason: the mask reads a graph input (the ``attention_mask`` a training loop
passes: whether it pads cannot be known when compiling); the mask itself is a graph input (built in
another graph: a graph break, or a DDP bucket split); its sizes are dynamic; it is another
pattern than the plain causal one (a sliding window, packed sequences, bidirectional parts, soft
values); too large to evaluate; a node that could not be evaluated.

``padding="none"`` (a backend option): the user says no batch is padded, as with fixed-length
chunks of text (``run_clm``'s ``group_texts``) whose collator still passes an ``attention_mask`` of
ones. A 2-D graph input named ``attention_mask`` is then taken as all ones when the mask is
evaluated (any other input still makes it unprovable), and the graph checks the promise at run
time: ``torch._assert_async`` that the input has no zero, once a graph, with no host sync (CUDA
graphs keep it). A padded batch stops with an error that names the option; it never trains on a
mask that was dropped.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import Graph, Node

from slothc.passes.matcher import RuleSet
from slothc.passes.meta import graphs, val
from slothc.report import Site, Skip, module_path

READS_INPUT = ("the mask reads a graph input (an attention_mask: padding cannot be ruled out at compile time; "
               "with batches that are never padded, options={'padding': 'none'})")
MASK_IS_INPUT = ("the mask is an input of this graph, built in another (a graph break, or Dynamo's DDPOptimizer "
                 "splitting at a DDP bucket): it cannot be evaluated here")
DYNAMIC = ("the mask has dynamic sizes (it is not evaluated at compile time, and it is not the plain causal mask "
           "of symbolic sizes that slothc.passes.symbolic_mask proves)")
NOT_CAUSAL = "the mask is not the plain causal mask (sliding window, packed sequences or another pattern)"
TOO_LARGE = "the mask is too large to evaluate at compile time"
NOT_EVALUATED = "a node of the mask could not be evaluated at compile time"
PADDED = ("slothc: a batch is padded (its attention_mask has a zero), but the model was compiled with "
          "options={'padding': 'none'}, which made its attention causal without the mask; compile without "
          "that option (the default) to train on padded batches")

_SDPA = torch._C._nn.scaled_dot_product_attention
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# Elements of one intermediate the check evaluates at most (a 4096 x 4096 mask in fp32 is 2^24).
_MAX_ELEMENTS = 1 << 26

RULES = RuleSet()  # no patterns: the pass is prepare() below


def _bound(node: Node) -> dict:
    args = dict(zip(_SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return args


def _outer_inputs(gm) -> dict:
    """Placeholder of a nested body (gradient checkpointing's ``tag_activation_checkpoint``, ``wrap``)
    -> the node its caller passes there, for every body nested in ``gm``."""
    out: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.args and isinstance(node.args[0], Node) and node.args[0].op == "get_attr":
            body = getattr(gm, node.args[0].target, None)
            if isinstance(body, torch.fx.GraphModule):
                holders = [n for n in body.graph.nodes if n.op == "placeholder"]
                operands = node.args[1:]
                if len(holders) == len(operands):
                    out.update({h: o for h, o in zip(holders, operands) if isinstance(o, Node)})
                out.update(_outer_inputs(body))
    return out


def _ancestors(node: Node, outer: dict) -> list:
    """``node`` and every node it depends on (through a body's placeholder to its caller's operand)."""
    seen, work = {node}, [node]
    while work:
        n = work.pop()
        inputs = [outer[n]] if n in outer else n.all_input_nodes
        for d in inputs:
            if d not in seen:
                seen.add(d)
                work.append(d)
    return [n for n in seen if n not in outer]


def _static(v) -> bool:
    if isinstance(v, torch.Tensor):
        return all(isinstance(s, int) for s in v.shape)
    return not isinstance(v, torch.SymInt)


def _to_cpu(a):
    if isinstance(a, torch.device) or (isinstance(a, str) and a.startswith("cuda")):
        return torch.device("cpu")
    if isinstance(a, (list, tuple)):
        return type(a)(_to_cpu(x) for x in a)
    if isinstance(a, dict):
        return {k: _to_cpu(v) for k, v in a.items()}
    return a


def _evaluate(node: Node, outer: dict, given: dict | None = None):
    """``node``'s value, its inputs (constants, and the inputs in ``given``: node -> value) computed
    on the CPU, depth first."""
    env: dict = dict(given or {})

    def value(n):
        if n in env:
            return env[n]
        if n in outer:
            env[n] = value(outer[n])
            return env[n]
        args = _to_cpu(torch.fx.node.map_arg(n.args, value))
        kwargs = _to_cpu(torch.fx.node.map_arg(n.kwargs, value))
        if n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise TypeError(f"cannot evaluate {n.op}")
        return env[n]

    return value(node)


def _unpadded_input(n: Node) -> bool:
    """A graph input that ``padding="none"`` takes as all ones: named ``attention_mask``, 2-D, static."""
    v = val(n)
    return (n.op == "placeholder" and "attention_mask" in n.name and isinstance(v, torch.Tensor) and v.dim() == 2
            and _static(v))


def _reason(node: Node, mask: Node, outer: dict, unpadded: bool = False) -> tuple[str | None, list]:
    """(why the mask is not provably causal or None, the inputs taken as all ones for the proof)."""
    args = _bound(node)
    q, k = val(args["query"]), val(args["key"])
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
        return NOT_EVALUATED, []
    nodes = _ancestors(mask, outer)
    # Sizes first: with dynamic shapes the mask reads a size input (or a tensor's size), not values:
    # proved for every size by symbolic_mask where it is built from those sizes alone.
    if not all(_static(val(n)) for n in nodes) or not (_static(q) and _static(k)):
        from slothc.passes.symbolic_mask import proves_causal

        if not outer and proves_causal(mask, q.shape[-2], k.shape[-2]):
            return None, []
        return DYNAMIC, []
    ones = [n for n in nodes if unpadded and _unpadded_input(n)]
    inputs = [n for n in nodes if n.op in ("placeholder", "get_attr") and n not in ones]
    if any(n.op == "placeholder" and isinstance(val(n), torch.Tensor) and val(n).dim() >= 3 for n in inputs):
        return MASK_IS_INPUT, []  # a [B, H, Q, KV]-like mask, not a [B, S] attention_mask
    if inputs:
        return READS_INPUT, []
    if any(isinstance(val(n), torch.Tensor) and val(n).numel() > _MAX_ELEMENTS for n in nodes):
        return TOO_LARGE, []
    q_len, kv_len = q.shape[-2], k.shape[-2]
    try:
        with torch.no_grad():
            m = _evaluate(mask, outer, {n: torch.ones(val(n).shape, dtype=val(n).dtype) for n in ones})
    except Exception:  # noqa: BLE001  (an op the CPU evaluation does not take: reported, left alone)
        return NOT_EVALUATED, []
    if not isinstance(m, torch.Tensor) or m.dim() < 2 or tuple(m.shape[-2:]) != (q_len, kv_len):
        return NOT_CAUSAL, []
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
    if m.dtype == torch.bool:
        allowed = m
    elif m.is_floating_point():
        lowest = torch.finfo(m.dtype).min
        if not bool(((m == 0) | (m == -math.inf) | (m == lowest)).all()):
            return NOT_CAUSAL, []  # soft values: a bias, not a mask
        allowed = m == 0
    else:
        return NOT_CAUSAL, []
    if not bool((allowed == causal).all()):
        return NOT_CAUSAL, []
    return None, ones


def _check_unpadded(placeholder: Node) -> None:
    """``torch._assert_async(attention_mask has no zero)`` after the graph's inputs."""
    graph = placeholder.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        nonzero = graph.call_function(torch.ne, (placeholder, 0))
    with graph.inserting_after(nonzero):
        every = graph.call_function(torch.all, (nonzero,))
    with graph.inserting_after(every):
        graph.call_function(torch._assert_async, (every, PADDED))


def _erase_unused(node: Node) -> None:
    """Erase ``node`` if nothing reads it any more, then its inputs that lost their last reader."""
    work = [node]
    while work:
        n = work.pop()
        if n.users or n.op not in ("call_function", "call_method") or n.is_impure():
            continue
        inputs = list(n.all_input_nodes)
        n.graph.erase_node(n)
        work.extend(inputs)


def prepare(gm, report, graph_index: int = 0, options=None) -> None:
    """Give every SDPA call whose mask is the plain causal mask ``is_causal=True`` (module docstring).
    Runs once on the whole module: a checkpointed layer's body reads the mask its caller passes."""
    outer = _outer_inputs(gm)
    unpadded = getattr(options, "padding", "unknown") == "none"
    reasons: dict = {}  # one evaluation a mask (every layer reads the same one)
    checked: set = set()  # the inputs whose run-time check is in the graph
    for graph in graphs(gm):
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not _SDPA:
                continue
            args = _bound(node)
            mask = args.get("attn_mask")
            if not isinstance(mask, Node) or args.get("is_causal"):
                continue
            module = module_path(node)
            q, k = val(args["query"]), val(args["key"])
            key = (outer.get(mask, mask), str(getattr(q, "shape", None)), str(getattr(k, "shape", None)))
            if key not in reasons:
                reasons[key] = _reason(node, mask, outer, unpadded)
            reason, ones = reasons[key]
            if reason is not None:
                report.add_skip(Skip("causal_mask", module, reason, node=node.name, graph=graph_index))
                continue
            kwargs = {k: v for k, v in args.items() if k not in ("query", "key", "value")}
            kwargs.update(attn_mask=None, is_causal=True)
            node.args = (args["query"], args["key"], args["value"])
            node.kwargs = kwargs
            _erase_unused(mask)  # what only the mask read (a body's mask stays an operand of its call)
            for placeholder in ones:
                if placeholder not in checked:
                    checked.add(placeholder)
                    _check_unpadded(placeholder)
            variant = "sdpa is_causal: the mask was the causal one" + (
                " given no padding (padding='none', checked at run time)" if ones else "")
            report.add_site(Site("causal_mask", module, node.name, graph_index, variant=variant))


prepare.whole_module = True  # passes.run hands it the GraphModule, not each graph
