"""Node metadata: the fake tensor Dynamo records on each node, and keeping it right for new nodes.

Dynamo stores the fake value of a node under ``meta["example_value"]``; AOTAutograd and Inductor use
``meta["val"]``. Pattern graphs (traced from plain functions) carry none: :func:`val` is then None.
"""

from __future__ import annotations

import contextlib

import torch
from torch._dispatch.python import enable_python_dispatcher
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

_META_KEYS = ("val", "example_value")
_INHERITED = ("nn_module_stack", "stack_trace", "source_fn_stack", "seq_nr")


def val(arg):
    """The fake value recorded for ``arg`` if it is a node, else ``arg`` itself (a literal)."""
    if isinstance(arg, Node):
        for key in _META_KEYS:
            if key in arg.meta:
                return arg.meta[key]
        return None
    return arg


def copy_meta(src: Node, dst: Node) -> None:
    for key in (*_META_KEYS, *_INHERITED):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def fake_mode_of(values):
    for v in values:
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def propagate(nodes: list, like: Node) -> bool:
    """Compute fake values for freshly inserted ``nodes`` (in order) by running their targets on the
    fake values of their inputs; copy module-stack metadata from ``like``. False if it could not."""
    key = next((k for k in _META_KEYS if k in like.meta), "example_value")
    for node in nodes:
        for k in _INHERITED:
            if k in like.meta:
                node.meta[k] = like.meta[k]
        args = map_arg(node.args, val)
        kwargs = map_arg(node.kwargs, val)
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        mode = fake_mode_of(tensors)
        if mode is None and tensors:
            return False
        # No tensor argument: a Python op on fake values (``getitem`` of a custom op's tuple result).
        # The Python dispatcher, as Dynamo runs ops on fake values: composite ops (``linear`` ->
        # ``matmul``) then take their Python decompositions, which take symbolic sizes; their C++
        # bodies may not (torch 2.11's matmul calls ``numel()``, which raises on a symbolic size).
        with (mode if mode is not None else contextlib.nullcontext()), enable_python_dispatcher():
            if node.op == "call_method":
                result = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                result = node.target(*args, **kwargs)
        node.meta[key] = result
    return True


def graphs(gm: GraphModule):
    """``gm``'s graph, then the graphs nested in it: bodies of higher-order ops (the
    ``tag_activation_checkpoint`` of gradient checkpointing, ``wrap``, ...) are submodules that
    ``get_attr`` nodes name."""
    yield gm.graph
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            sub = getattr(gm, node.target, None)
            if isinstance(sub, GraphModule):
                yield from graphs(sub)
