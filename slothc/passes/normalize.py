"""Normalization: one canonical form for what Dynamo emits in several spellings.

Dynamo records Python as written: ``x.float()``, ``x.to(torch.float32)`` and ``x.to(dtype=...)`` are
three nodes for one cast; ``x.pow(2)``, ``x ** 2``, ``x * x`` and ``torch.square(x)`` four for one
square. Fusion patterns are written once, against the canonical form below, and the pattern graphs
themselves are normalized by the same rules (so a pattern may be written in any spelling too).

Canonical form
--------------
- tensor methods become functions: ``call_method pow`` -> ``call_function torch.pow``;
- arithmetic is ``operator.{add,sub,mul,truediv,neg}`` (``torch.mul``, ``Tensor.mul`` ... map there);
- a dtype cast is ``torch.Tensor.to(x, dtype)`` with the dtype positional (``float()``, ``half()``,
  ``bfloat16()``, ``double()``, ``type(dtype)``, ``type_as(y)``, ``to(dtype=...)``);
- squares are ``torch.pow(x, 2)`` (integral float exponents become ints);
- ``1 / sqrt(v)``, ``reciprocal(sqrt(v))`` and ``pow(v, -0.5)`` are ``torch.rsqrt(v)``; ``a / sqrt(v)`` is
  ``a * rsqrt(v)``;
- ``F.linear``, ``torch.mean``, ``F.layer_norm``, ``F.cross_entropy``, ``F.silu``, ``F.relu`` take every
  argument positionally, defaults filled; ``F.gelu`` always has its keyword-only ``approximate``;
- ``x @ w.T`` (``w`` 2-d; ``w.t()``, ``w.transpose(0, 1)``) is ``F.linear(x, w, None)``;
  reduction dims are negative ints (``mean(x, 2)`` on a 3-d tensor is ``mean(x, -1)``; ``[-1]`` is ``-1``);
- ``torch.cat``/``torch.stack`` take ``(tensors, dim)``, ``chunk`` (method or function) is
  ``torch.chunk(x, chunks, dim)``, and ``flatten`` (method or function) is
  ``torch.Tensor.flatten(x, start_dim, end_dim)``, positionally, with negative dims;
- an index that spells every leading dim as ``:`` (``x[:, :, :, ::2]`` on a 4-d x) is ``x[..., ::2]``;
  slices have no 0 start or 1 step (``0::2`` is ``::2``);
- a reshape of a ``stack`` that merges its last two dims is ``flatten(-2, -1)``.

Each rule is a small function ``rule(node) -> bool`` (changed or not) keyed by the targets it can
fire on, so a node is only offered to the rules for its target (tinygrad's early reject). Rules
rewrite the node in place (its name, users and metadata stay), and run to a fixpoint.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from slothc.passes.meta import copy_meta, graphs, val

_CAST_METHODS = {
    "float": torch.float32,
    "double": torch.float64,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
_TENSOR_TO_OPERATOR = {
    "mul": operator.mul,
    "multiply": operator.mul,
    "__mul__": operator.mul,
    "add": operator.add,
    "__add__": operator.add,
    "sub": operator.sub,
    "subtract": operator.sub,
    "__sub__": operator.sub,
    "div": operator.truediv,
    "divide": operator.truediv,
    "true_divide": operator.truediv,
    "__truediv__": operator.truediv,
    "neg": operator.neg,
    "negative": operator.neg,
    "__neg__": operator.neg,
}
_TORCH_TO_OPERATOR = {
    torch.mul: operator.mul,
    torch.multiply: operator.mul,
    torch.add: operator.add,
    torch.sub: operator.sub,
    torch.subtract: operator.sub,
    torch.div: operator.truediv,
    torch.divide: operator.truediv,
    torch.true_divide: operator.truediv,
    torch.neg: operator.neg,
    torch.negative: operator.neg,
}
_TENSOR_TO_TORCH = {
    "pow": torch.pow,
    "mean": torch.mean,
    "rsqrt": torch.rsqrt,
    "sqrt": torch.sqrt,
    "reciprocal": torch.reciprocal,
    "square": torch.square,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "__pow__": torch.pow,
}

# Positional signatures: target -> (parameter names, defaults of the trailing ones).
_SIGNATURES = {
    F.linear: (("input", "weight", "bias"), {"bias": None}),
    torch.mean: (("input", "dim", "keepdim"), {"keepdim": False}),
    F.layer_norm: (("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}),
    torch.pow: (("input", "exponent"), {}),
    F.silu: (("input", "inplace"), {"inplace": False}),
    F.relu: (("input", "inplace"), {"inplace": False}),
    F.cross_entropy: (
        ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing"),
        {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None, "reduction": "mean", "label_smoothing": 0.0},
    ),
}


def normalize(gm: GraphModule) -> None:
    """Normalize ``gm`` and every nested subgraph (higher-order-op bodies) in place."""
    for graph in graphs(gm):
        normalize_graph(graph)
    gm.recompile()


def normalize_graph(graph: Graph) -> None:
    """Apply the canonical-form rules to every node until nothing changes."""
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op not in ("call_function", "call_method") or node.graph is not graph:
                continue
            for rule in _rules_for(node):
                if rule(node):
                    changed = True
                    break
    _erase_dead(graph)


def _rules_for(node: Node):
    if node.op == "call_method":
        return (_method_to_function,)
    return _RULES.get(node.target, ())


# -- rules -------------------------------------------------------------------------------------------


def _method_to_function(node: Node) -> bool:
    """``x.m(...)`` -> ``torch.Tensor.m(x, ...)`` (or the canonical function); x.float() -> x.to(f32)."""
    name = node.target
    self_val = val(node.args[0]) if node.args else None
    if self_val is not None and not isinstance(self_val, torch.Tensor):
        return False  # a method of a non-tensor (e.g. a SymInt): leave it alone
    if name in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        _set(node, torch.Tensor.to, (node.args[0], _CAST_METHODS[name]))  # x.float() -> x.to(f32)
    elif name in _TENSOR_TO_OPERATOR and not node.kwargs:
        _set(node, _TENSOR_TO_OPERATOR[name], node.args)  # x.mul(y) -> x * y
    elif name in _TENSOR_TO_TORCH:
        _set(node, _TENSOR_TO_TORCH[name], node.args, node.kwargs)  # x.pow(2) -> torch.pow(x, 2)
    elif hasattr(torch.Tensor, name):
        _set(node, getattr(torch.Tensor, name), node.args, node.kwargs)  # x.view(s) -> Tensor.view(x, s)
    else:
        return False
    return True


def _cast_rule(node: Node) -> bool:
    """Every dtype-only cast -> ``torch.Tensor.to(x, dtype)``."""
    target, args, kwargs = node.target, node.args, dict(node.kwargs)
    if target in (torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16):
        if len(args) == 1 and not kwargs:
            _set(node, torch.Tensor.to, (args[0], _CAST_METHODS[target.__name__]))  # x.half() -> x.to(f16)
            return True
        return False
    if target is torch.Tensor.type_as and len(args) == 2 and not kwargs:
        other = val(args[1])
        if isinstance(args[1], Node) and other is None:
            # pattern graphs carry no metadata: spell the dtype as getattr(other, "dtype")
            with node.graph.inserting_before(node):
                dtype = node.graph.call_function(getattr, (args[1], "dtype"))
            _set(node, torch.Tensor.to, (args[0], dtype))
            return True
        if isinstance(other, torch.Tensor):
            _set(node, torch.Tensor.to, (args[0], other.dtype))  # x.type_as(y) -> x.to(y.dtype)
            return True
        return False
    if target is torch.Tensor.type and len(args) == 2 and isinstance(args[1], torch.dtype) and not kwargs:
        _set(node, torch.Tensor.to, (args[0], args[1]))  # x.type(d) -> x.to(d)
        return True
    if target is torch.Tensor.to:
        if len(args) == 1 and set(kwargs) == {"dtype"}:
            _set(node, torch.Tensor.to, (args[0], kwargs["dtype"]))  # x.to(dtype=d) -> x.to(d)
            return True
        if len(args) == 1 and set(kwargs) == {"device", "dtype"} and _same_device(args[0], kwargs["device"]):
            _set(node, torch.Tensor.to, (args[0], kwargs["dtype"]))  # x.to(device=x.device, dtype=d) -> x.to(d)
            return True
        if len(args) == 3 and not kwargs and isinstance(args[2], torch.dtype) and _same_device(args[0], args[1]):
            _set(node, torch.Tensor.to, (args[0], args[2]))  # x.to(x.device, d) -> x.to(d)
            return True
    return False


def _operator_rule(node: Node) -> bool:
    """``torch.mul(a, b)`` -> ``a * b`` (only without alpha / rounding_mode / out)."""
    if node.kwargs or (node.target is not torch.neg and node.target is not torch.negative and len(node.args) != 2):
        return False
    _set(node, _TORCH_TO_OPERATOR[node.target], node.args)
    return True


def _positional_rule(node: Node) -> bool:
    """Fill every argument of a known signature positionally (kwargs and defaults)."""
    names, defaults = _SIGNATURES[node.target]
    if not node.kwargs and len(node.args) == len(names):
        return False
    if set(node.kwargs) - set(names):
        return False  # e.g. mean(dtype=...): not the canonical op, leave it alone
    args = list(node.args)
    for name in names[len(args) :]:
        if name in node.kwargs:
            args.append(node.kwargs[name])
        elif name in defaults:
            args.append(defaults[name])
        else:
            return False
    _set(node, node.target, tuple(args))
    return True


def _transposed_weight(node) -> Node | None:
    """``w`` if ``node`` is ``w.T``, ``w.t()`` or ``w.transpose(0, 1)`` of a 2-d ``w``, else None."""
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
        return None
    t, args = node.target, node.args
    if (t is getattr and len(args) == 2 and args[1] in ("T", "mT")) or (t in ("t", torch.t, torch.Tensor.t) and len(args) == 1):
        w = args[0]
    elif t in ("transpose", torch.transpose, torch.Tensor.transpose) and len(args) == 3 and sorted(args[1:]) in ([0, 1], [-2, -1], [-1, 0]):
        w = args[0]
    else:
        return None
    v = val(w)
    return w if isinstance(v, torch.Tensor) and v.dim() == 2 else None


def _matmul_rule(node: Node) -> bool:
    """``x @ w.T`` (``w`` 2-d; also ``w.t()``, ``w.transpose(0, 1)``) -> ``F.linear(x, w, None)``:
    models that write their own linear (Falcon's ``FalconLinear``) read like ``nn.Linear``."""
    if node.kwargs or len(node.args) != 2:
        return False
    x, wt = node.args
    w = _transposed_weight(wt)
    x_val = val(x)
    if w is None or not isinstance(x_val, torch.Tensor) or x_val.dim() < 1:
        return False
    _set(node, F.linear, (x, w, None))
    return True


def _gelu_rule(node: Node) -> bool:
    """``gelu(x)`` -> ``gelu(x, approximate="none")``: the keyword (keyword-only in torch) always given."""
    if len(node.args) != 1 or "approximate" in node.kwargs or set(node.kwargs):
        return False
    _set(node, node.target, node.args, {"approximate": "none"})
    return True


def _mean_dim_rule(node: Node) -> bool:
    """``mean(x, [d])`` -> ``mean(x, d)``; non-negative dims -> negative (needs the input's rank)."""
    if _positional_rule(node):
        return True
    if len(node.args) != 3:
        return False
    x, dim, keepdim = node.args
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    x_val = val(x)
    if isinstance(dim, int) and dim >= 0 and isinstance(x_val, torch.Tensor):
        dim = dim - x_val.dim()
    if (x, dim, keepdim) != tuple(node.args):
        _set(node, torch.mean, (x, dim, keepdim))
        return True
    return False


def _pow_rule(node: Node) -> bool:
    """``x ** 2``, ``square(x)``, ``x * x``: ``torch.pow(x, 2)``; integral float exponents -> int."""
    target, args = node.target, node.args
    if target in (torch.square, torch.Tensor.square) and len(args) == 1 and not node.kwargs:
        _set(node, torch.pow, (args[0], 2))
        return True
    if target is operator.mul and len(args) == 2 and isinstance(args[0], Node) and args[0] is args[1]:
        _set(node, torch.pow, (args[0], 2))  # x * x -> x ** 2
        return True
    if target is operator.pow and len(args) == 2 and isinstance(args[0], Node):
        _set(node, torch.pow, args)
        return True
    if target is torch.pow:
        if _positional_rule(node):
            return True
        exponent = args[1]
        if isinstance(exponent, float) and exponent.is_integer():
            _set(node, torch.pow, (args[0], int(exponent)))
            return True
        if isinstance(exponent, float) and exponent == -0.5 and isinstance(args[0], Node):
            _set(node, torch.rsqrt, (args[0],))  # Gemma 3n/4: pow(v, -0.5), "for JAX parity"
            return True
    return False


def _rsqrt_rule(node: Node) -> bool:
    """``1 / sqrt(v)`` and ``reciprocal(sqrt(v))`` -> ``rsqrt(v)``; ``a / sqrt(v)`` -> ``a * rsqrt(v)``."""
    target, args = node.target, node.args
    if target is torch.reciprocal and len(args) == 1 and _is_sqrt(args[0]):
        _set(node, torch.rsqrt, (args[0].args[0],))
        return True
    if target is operator.truediv and len(args) == 2 and _is_sqrt(args[1]) and not node.kwargs:
        numerator, sqrt = args
        if isinstance(numerator, (int, float)) and numerator == 1:
            _set(node, torch.rsqrt, (sqrt.args[0],))
            return True
        if isinstance(numerator, Node):
            with node.graph.inserting_before(node):
                rsqrt = node.graph.call_function(torch.rsqrt, (sqrt.args[0],))
            copy_meta(sqrt, rsqrt)
            _set(node, operator.mul, (numerator, rsqrt))
            return True
    return False


def _rank(node_or_seq):
    v = val(node_or_seq[0] if isinstance(node_or_seq, (list, tuple)) and node_or_seq else node_or_seq)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _negative(dim, rank):
    return dim - rank if isinstance(dim, int) and dim >= 0 and rank is not None else dim


def _filled(node: Node, names: tuple, defaults: tuple) -> list | None:
    """``node``'s arguments by position: kwargs placed, trailing defaults filled (None if it cannot)."""
    if set(node.kwargs) - set(names) or len(node.args) > len(names):
        return None
    args = list(node.args)
    for name, default in zip(names[len(args):], defaults[len(args):]):
        args.append(node.kwargs.get(name, default))
    return None if any(a is _REQUIRED for a in args) else args


_REQUIRED = object()


def _cat_rule(node: Node) -> bool:
    """``cat(ts, dim=d)``/``stack(ts, dim=d)`` -> ``cat(ts, d - rank)``: positional, negative dim."""
    args = _filled(node, ("tensors", "dim"), (_REQUIRED, 0))
    if args is None:
        return False
    rank = _rank(args[0])
    if rank is not None and node.target is torch.stack:
        rank += 1
    args[1] = _negative(args[1], rank)
    if tuple(args) == tuple(node.args) and not node.kwargs:
        return False
    _set(node, node.target, args)
    return True


def _chunk_rule(node: Node) -> bool:
    """``x.chunk(n, dim=d)``/``torch.chunk`` -> ``torch.chunk(x, n, d - rank)``: positional, negative dim."""
    args = _filled(node, ("input", "chunks", "dim"), (_REQUIRED, _REQUIRED, 0))
    if args is None:
        return False
    args[2] = _negative(args[2], _rank(args[0]))
    if node.target is torch.chunk and tuple(args) == tuple(node.args) and not node.kwargs:
        return False
    _set(node, torch.chunk, args)
    return True


def _flatten_rule(node: Node) -> bool:
    """``x.flatten(s, e)``/``torch.flatten`` -> ``torch.Tensor.flatten(x, s, e)``: positional, negative dims."""
    args = _filled(node, ("input", "start_dim", "end_dim"), (_REQUIRED, 0, -1))
    if args is None:
        return False
    rank = _rank(args[0])
    args = [args[0], _negative(args[1], rank), _negative(args[2], rank)]
    if node.target is torch.Tensor.flatten and tuple(args) == tuple(node.args) and not node.kwargs:
        return False
    _set(node, torch.Tensor.flatten, args)
    return True


def _stack_merge_rule(node: Node) -> bool:
    """``stack(ts, -1).reshape_as(x)`` (or ``reshape``/``view``) that only merges the stack's last two
    dims -> ``flatten(stack, -2, -1)`` (RoFormer's spelling of GPT-J's ``rotate_every_two``)."""
    if not node.args or not isinstance(node.args[0], Node) or node.args[0].target is not torch.stack:
        return False
    x, out = val(node.args[0]), val(node)
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or x.dim() < 2:
        return False
    if tuple(out.shape) != tuple(x.shape[:-2]) + (x.shape[-2] * x.shape[-1],):
        return False
    _set(node, torch.Tensor.flatten, (node.args[0], -2, -1))
    return True


def _canonical_slice(i):
    if not isinstance(i, slice):
        return i
    start = None if type(i.start) is int and i.start == 0 else i.start
    step = None if type(i.step) is int and i.step == 1 else i.step
    return slice(start, i.stop, step)


def _index_rule(node: Node) -> bool:
    """``x[:, :, :, 0::2]`` (every leading dim a full ``:``) -> ``x[..., ::2]``: slices without a
    0 start or a 1 step."""
    if len(node.args) != 2 or node.kwargs:
        return False
    x, index = node.args
    if not isinstance(index, tuple):
        return False
    new = tuple(_canonical_slice(i) for i in index)
    rank = _rank(x)
    if rank is not None and rank >= 2 and len(new) == rank and isinstance(new[-1], slice):
        if all(isinstance(i, slice) and i == slice(None) for i in new[:-1]):
            new = (Ellipsis, new[-1])
    if new == index and all(type(a) is type(b) for a, b in zip(new, index)):
        return False
    _set(node, operator.getitem, (x, new))
    return True


def _is_sqrt(arg) -> bool:
    return isinstance(arg, Node) and arg.op == "call_function" and arg.target is torch.sqrt and len(arg.args) == 1


_RULES = {
    torch.Tensor.float: (_cast_rule,),
    torch.Tensor.double: (_cast_rule,),
    torch.Tensor.half: (_cast_rule,),
    torch.Tensor.bfloat16: (_cast_rule,),
    torch.Tensor.type_as: (_cast_rule,),
    torch.Tensor.type: (_cast_rule,),
    torch.Tensor.to: (_cast_rule,),
    **{t: (_operator_rule,) for t in _TORCH_TO_OPERATOR},
    F.linear: (_positional_rule,),
    F.layer_norm: (_positional_rule,),
    F.cross_entropy: (_positional_rule,),
    F.silu: (_positional_rule,),
    F.relu: (_positional_rule,),
    F.gelu: (_gelu_rule,),
    operator.matmul: (_matmul_rule,),
    torch.matmul: (_matmul_rule,),
    torch.mean: (_mean_dim_rule,),
    torch.pow: (_pow_rule,),
    operator.pow: (_pow_rule,),
    torch.square: (_pow_rule,),
    torch.Tensor.square: (_pow_rule,),
    operator.mul: (_pow_rule,),
    torch.cat: (_cat_rule,),
    torch.stack: (_cat_rule,),
    torch.chunk: (_chunk_rule,),
    torch.Tensor.chunk: (_chunk_rule,),
    torch.Tensor.flatten: (_flatten_rule,),
    torch.flatten: (_flatten_rule,),
    operator.getitem: (_index_rule,),
    torch.Tensor.reshape_as: (_stack_merge_rule,),
    torch.Tensor.reshape: (_stack_merge_rule,),
    torch.Tensor.view: (_stack_merge_rule,),
    torch.reshape: (_stack_merge_rule,),
    torch.reciprocal: (_rsqrt_rule,),
    operator.truediv: (_rsqrt_rule,),
}


# -- helpers -----------------------------------------------------------------------------------------


def _set(node: Node, target, args, kwargs=None) -> None:
    node.op = "call_function"
    node.target = target
    node.args = tuple(args)
    node.kwargs = dict(kwargs or {})


def _same_device(x, device) -> bool:
    x_val = val(x)
    if not isinstance(device, (str, torch.device)):
        return False
    return isinstance(x_val, torch.Tensor) and torch.device(device) == x_val.device


# What a rule may orphan: the sqrt of a folded 1/sqrt, the transpose of a hand-written linear.
_ORPHANS = (torch.sqrt, getattr, torch.t, torch.Tensor.t, torch.transpose, torch.Tensor.transpose)


def _erase_dead(graph: Graph) -> None:
    """Erase the nodes a rule orphaned (an old ``sqrt``); only pure call_function nodes."""
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and not node.users and node.target in _ORPHANS:
            graph.erase_node(node)
