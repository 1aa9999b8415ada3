"""QLoRA linear: bitsandbytes' 4-bit ``Linear4bit`` (with PEFT's LoRA on top) rewritten to ``slothc::qlora_linear``.

Two steps.

**1. Canonical 4-bit linears** (:func:`prepare`). bitsandbytes' ``Linear4bit.forward`` casts x to its
compute dtype and calls ``bnb.matmul_4bit``, which Dynamo records in one of these forms (all read
the quantisation state, ``weight.quant_state``, as graph inputs: the packed codes, absmax or its
double-quantised parts, and the blocksize, shape and quant type as constants):

- ``bitsandbytes::gemm_4bit(x, packed, shape, absmax, blocksize, quant_type, bias=, absmax_8bit=,
  absmax_code=, absmax_offset=)``: bitsandbytes >= 0.47 when x needs no gradient (the first layer
  of a model whose embeddings are frozen);
- ``autograd_function_apply(fwd, bwd, ...)`` of bitsandbytes' ``MatMul4Bit`` when x needs a gradient:
  its forward body is that ``gemm_4bit`` (torch 2.11 also returns the packed weight's view from it,
  torch 2.13 does not), its backward dequantises W again (``dequantize_4bit``) and multiplies
  (``dX = dY W``), returning a gradient for x alone;
- ``bitsandbytes::dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)`` (after a
  ``dequantize_blockwise`` of the double-quantised absmax plus its offset) read by a ``linear``:
  bitsandbytes' own fallback spelled out.

(In eval mode with no gradient, bitsandbytes' CPU backend instead repacks the weight for its
``gemv_4bit`` kernel inside the graph: that inference path is reported, not fused.)

Each becomes ``linear(x, slothc::dequantize_4bit(...), bias)``: the same function (bitsandbytes'
``gemm_4bit`` is defined as dequantise-then-``linear``), in a form the patterns below read. The
backward dtype of ``MatMul4Bit`` (what its ``dequantize_4bit`` produces before the cast to the
gradient's dtype) is kept on the node for the check. A form that is not exactly this (another
autograd function around a ``gemm_4bit``, a state computed in the graph) is left alone and reported.

**2. Rules.** PEFT's ``lora.bnb.Linear4bit.forward`` reads, after normalization::

    result = linear(x.to(compute_dtype), dequantize_4bit(...), bias).to(x.dtype)   # the base layer
    result = result.clone()
    result = result + (linear(linear(xa, A), B) * scaling).to(result.dtype)      # per adapter; no cast under autocast

with ``xa`` as in the LoRA pass (x, PEFT's cast of it, a dropout). It becomes one
``slothc::qlora_linear`` call. A 4-bit linear without adapters (a module PEFT does not target, or a
4-bit model without LoRA) becomes a ``slothc::qlora_linear`` without adapters: the dequantisation is
still fused and the backward still does not keep W.

Skipped, with the reason in the report: a trainable bias; the dequantised dtype or
``MatMul4Bit``'s backward dtype not fp32 or the base dtype (a double rounding the op does not
reproduce; the backward dtype is checked before the rewrite, so such a layer keeps bitsandbytes'
autograd function); x cast to the compute dtype and then by autocast to another (the adapters are
reported, the base linear is still fused, its input the cast); the adapter checks of the LoRA pass
(dropout, scaling, shapes, dtypes: the base is still fused alone); and ``gemm_4bit`` called
directly on an input that needs a gradient (bitsandbytes' op has no backward: eager cannot train
through it either).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

import slothc.kernels.qlora_linear as qlora_kernels  # registers torch.ops.slothc.qlora_linear
from slothc.kernels.qlora_linear import NESTED_BLOCKSIZE, QUANT_TYPES
from slothc.passes import lora_linear as lora
from slothc.passes.matcher import NOT_A_CANDIDATE, Rule, RuleSet, erase_dead_inputs
from slothc.passes.meta import propagate, val
from slothc.report import Skip, module_path

DIRECT_GEMM_NEEDS_GRAD = "bitsandbytes gemm_4bit on an input that needs a gradient (the op has no backward)"
NOT_MATMUL_4BIT = "an autograd function around gemm_4bit that is not bitsandbytes' MatMul4Bit"
STATE_NOT_INPUT = "the 4-bit quantisation state is computed in the graph, not read from its inputs"
UNSUPPORTED_QUANT = "4-bit quant type, blocksize or shape not supported (nf4/fp4, even blocksize, 2-d weight)"
AUTOCAST_DTYPE = (
    "under autocast a linear computes in the autocast dtype, where bitsandbytes (which autocast does not reach) computes "
    "in its compute dtype; set bnb_4bit_compute_dtype to the autocast dtype (e.g. torch.bfloat16) to fuse"
)
DEQUANT_DTYPE = "4-bit weight dequantised to a dtype that is neither fp32 nor the base dtype (double rounding)"
BACKWARD_DTYPE = "bitsandbytes' backward dequantises to a dtype that is neither fp32 nor the base dtype (double rounding)"
COMPUTE_CAST = "input cast to the compute dtype and then by autocast to another"
TRAINABLE_BIAS = "the 4-bit layer's bias is trainable (the fused op computes no db)"
CPU_INFERENCE = "bitsandbytes' CPU inference path (gemv_4bit on weights repacked in eval mode): not a training step"

_LINEAR = torch._C._nn.linear
_DEQUANT = torch.ops.slothc.dequantize_4bit.default
_OP = torch.ops.slothc.qlora_linear.default
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _bnb_op(name: str):
    """``torch.ops.bitsandbytes.<name>.default``, or None if bitsandbytes is not loaded."""
    try:
        return getattr(torch.ops.bitsandbytes, name).default
    except (AttributeError, RuntimeError):
        return None


# -- step 1: canonical 4-bit linears -------------------------------------------------------------


def _bound(node: Node, op) -> dict:
    """The arguments of a call to ``op`` by name (defaults filled)."""
    names = [a.name for a in op._schema.arguments]
    defaults = {a.name: a.default_value for a in op._schema.arguments if a.has_default_value()}
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    for name in names:
        args.setdefault(name, defaults.get(name))
    return args


def _peel_views(node):
    """The tensor under ``view``/``reshape`` calls (the packed codes are read as flat bytes)."""
    while isinstance(node, Node) and node.target in (torch.Tensor.view, torch.Tensor.reshape, "view", "reshape") and node.args:
        node = node.args[0]
    return node


_SIZE_METHODS = ("numel", "size", "dim")
_SIZE_FUNCTIONS = tuple(getattr(torch.Tensor, m) for m in _SIZE_METHODS)  # the same, as slothc's normalize pass spells them
_SIZE_OPS = (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.mul, operator.add,
             operator.sub, operator.floordiv, operator.getitem)


def _size_expr(node, placeholders) -> bool:
    """``node`` computes a size (an int or a comparison of sizes) from the body's inputs only:
    ``numel()``/``size()``/``dim()`` of an input, arithmetic and comparisons of those and of constants."""
    if not isinstance(node, Node):
        return isinstance(node, (int, bool))
    if (node.op == "call_method" and node.target in _SIZE_METHODS) or (node.op == "call_function" and node.target in _SIZE_FUNCTIONS):
        return node.args[0] in placeholders and all(isinstance(a, int) for a in node.args[1:]) and not node.kwargs
    if node.op == "call_function" and node.target in _SIZE_OPS and not node.kwargs:
        return all(_size_expr(a, placeholders) for a in node.args)
    return node in placeholders and isinstance(val(node), (torch.SymInt, int))


def _state_from_gemm(args: dict, inputs=None) -> tuple | None:
    """(x, packed, absmax, absmax_8bit, absmax_code, absmax_offset, shape, blocksize, quant_type, bias) of a
    ``gemm_4bit`` call; ``inputs`` maps a body's placeholders to the outer graph's nodes."""

    def outer(a):
        if a is None or not isinstance(a, Node):
            return a
        if inputs is None:
            return a
        return inputs.get(a)

    packed = outer(_peel_views(args["B"]))
    names = ("A", "absmax", "absmax_8bit", "absmax_code", "absmax_offset", "bias")
    mapped = {k: outer(args[k]) for k in names}
    if packed is None or any(args[k] is not None and mapped[k] is None for k in names):
        return None  # something the body computes itself
    return (mapped["A"], packed, mapped["absmax"], mapped["absmax_8bit"], mapped["absmax_code"], mapped["absmax_offset"],
            args["shapeB"], args["blocksize"], args["quant_type"], mapped["bias"])


def _quant_ok(shape, blocksize, quant_type) -> bool:
    return (
        isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)
        and isinstance(blocksize, int) and blocksize > 0 and blocksize % 2 == 0 and quant_type in QUANT_TYPES
    )


def _insert(graph: Graph, before: Node, like: Node, state: tuple, dequant_dtype: torch.dtype, bwd_dtype, form: str):
    """Insert ``linear(x, slothc::dequantize_4bit(...), bias)`` before ``before``; where it would not
    compute what ``like`` does, nothing is inserted and the reason is returned (``AUTOCAST_DTYPE``
    where only the dtype differs: the graph runs under autocast, which changes the linear's dtype and
    not bitsandbytes')."""
    x, packed, absmax, a8, code, offset, shape, blocksize, quant_type, bias = state
    with graph.inserting_before(before):
        dq = graph.call_function(_DEQUANT, (packed, absmax, a8, code, offset, [int(s) for s in shape], int(blocksize), quant_type,
                                            dequant_dtype, NESTED_BLOCKSIZE))
        lin = graph.call_function(_LINEAR, (x, dq, bias))
    ok = propagate([dq, lin], like)
    new, old = val(lin), val(like)
    if not ok or not isinstance(old, torch.Tensor) or tuple(new.shape) != tuple(old.shape) or new.dtype != old.dtype:
        graph.erase_node(lin)
        graph.erase_node(dq)
        return AUTOCAST_DTYPE if ok and isinstance(old, torch.Tensor) and tuple(new.shape) == tuple(old.shape) else UNSUPPORTED_QUANT
    dq.meta["slothc_4bit"] = {"form": form, "bwd_dtype": bwd_dtype}
    return lin


def _skip(report, graph_index, node, reason):
    report.add_skip(Skip(fusion="qlora_linear", module=module_path(node), reason=reason, node=node.name, graph=graph_index))


def prepare(graph: Graph, report, graph_index: int = 0) -> None:
    """Rewrite bitsandbytes' 4-bit matmuls into ``linear(x, slothc::dequantize_4bit(...), bias)``."""
    gemm, dequant, blockwise = _bnb_op("gemm_4bit"), _bnb_op("dequantize_4bit"), _bnb_op("dequantize_blockwise")
    gemv = _bnb_op("gemv_4bit")
    if gemm is None:
        return
    apply_hop = torch.ops.higher_order.autograd_function_apply
    if getattr(graph.owning_module, "_slothc_autograd_body", False):
        return  # the inside of an autograd function is its own business (graphs() visits parents first)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is apply_hop:
            for body in (_body(graph, a) for a in node.args[:2]):
                if body is not None:
                    body._slothc_autograd_body = True
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is gemm:
            _rewrite_gemm(graph, node, gemm, report, graph_index)
        elif node.target is gemv and gemv is not None:
            _skip(report, graph_index, node, CPU_INFERENCE)  # model.eval() on the CPU: the layer repacks its weight
        elif node.target is apply_hop:
            _rewrite_autograd_apply(graph, node, gemm, dequant, report, graph_index)
        elif node.target is dequant and dequant is not None:
            _rewrite_dequant(graph, node, dequant, blockwise, report, graph_index)


def _rewrite_gemm(graph, node, gemm, report, graph_index):
    state = _state_from_gemm(_bound(node, gemm))
    x = val(state[0])
    if not _quant_ok(*state[6:9]):
        return _skip(report, graph_index, node, UNSUPPORTED_QUANT)
    out = val(node)
    if isinstance(out, torch.Tensor) and out.requires_grad:  # x needs grad and the call is not under no_grad
        return _skip(report, graph_index, node, DIRECT_GEMM_NEEDS_GRAD)
    lin = _insert(graph, node, node, state, x.dtype, None, "gemm_4bit")
    if isinstance(lin, str):
        return _skip(report, graph_index, node, lin)
    node.replace_all_uses_with(lin)
    graph.erase_node(node)


def _body(graph: Graph, node) -> torch.fx.GraphModule | None:
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    body = getattr(graph.owning_module, node.target, None)
    return body if isinstance(body, torch.fx.GraphModule) else None


def _rewrite_autograd_apply(graph, node, gemm, dequant, report, graph_index):
    fwd, bwd = _body(graph, node.args[0]), _body(graph, node.args[1])
    if fwd is None or bwd is None:
        return
    calls = [n for n in fwd.graph.nodes if n.op == "call_function" and n.target is gemm]
    if not calls:
        return  # another autograd function: not 4-bit
    placeholders = [n for n in fwd.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, node.args[2:]))
    (output,) = [n for n in fwd.graph.nodes if n.op == "output"]
    outs = output.args[0][0] if isinstance(output.args[0], (tuple, list)) and output.args[0] else None
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    reason = None
    # Its first output is the gemm's; torch 2.11 also returns what MatMul4Bit keeps on its ctx: the
    # packed weight's view (an input, not a result) and, with symbolic sizes, ``A.numel()`` and
    # ``A.numel() == 0`` (size arithmetic). The outer graph reads output 0 only (checked below).
    extra_ok = all(isinstance(o, Node) and (_peel_views(o) in placeholders or _size_expr(o, placeholders)) for o in outs[1:])
    if len(calls) != 1 or not outs or outs[0] is not calls[0] or not extra_ok:
        reason = NOT_MATMUL_4BIT
    state = _state_from_gemm(_bound(calls[0], gemm), inputs) if reason is None else None
    if reason is None and state is None:
        reason = STATE_NOT_INPUT
    if reason is None and not _quant_ok(*state[6:9]):
        reason = UNSUPPORTED_QUANT
    bwd_dtype = None
    if reason is None:
        bwd_dtype, reason = _matmul_4bit_backward(bwd, dequant, placeholders, calls[0])
    users = list(node.users)
    getters = [u for u in users if u.target is operator.getitem and u.args[1] == 0]
    # torch 2.11 inside gradient checkpointing also reads output 1 (the packed weight's view), unused
    dead = [u for u in users if u.target is operator.getitem and u.args[1] != 0 and not u.users]
    if reason is None and len(getters) + len(dead) != len(users):
        reason = NOT_MATMUL_4BIT
    if reason is not None:
        return _skip(report, graph_index, node, reason)
    x = val(state[0])
    lin = _insert(graph, node, getters[0] if getters else node, state, x.dtype, bwd_dtype, "MatMul4Bit")
    if isinstance(lin, str):
        return _skip(report, graph_index, node, lin)
    if bwd_dtype not in (torch.float32, val(lin).dtype):
        # decided here, not by the rules: a rewritten-but-unfused linear would back-propagate through
        # a saved W in the base dtype, not through bitsandbytes' backward
        dq = lin.args[1]
        graph.erase_node(lin)
        graph.erase_node(dq)
        return _skip(report, graph_index, node, BACKWARD_DTYPE)
    for g in getters:
        g.replace_all_uses_with(lin)
        graph.erase_node(g)
    for g in dead:
        graph.erase_node(g)
    bodies = [a for a in node.args[:2]]
    graph.erase_node(node)
    for b in bodies:
        if not b.users:
            graph.erase_node(b)


def _matmul_4bit_backward(bwd, dequant, placeholders, gemm_call):
    """(the dtype MatMul4Bit's backward dequantises to, reason or None): its body must dequantise the
    4-bit weight and return a gradient for x alone."""
    if dequant is None:
        return None, NOT_MATMUL_4BIT
    dqs = [n for n in bwd.graph.nodes if n.op == "call_function" and n.target is dequant]
    mms = [n for n in bwd.graph.nodes if n.op == "call_function" and n.target in (torch.matmul, operator.matmul, torch.mm)]
    if len(dqs) != 1 or len(mms) != 1:
        return None, NOT_MATMUL_4BIT
    dtype = _bound(dqs[0], dequant)["dtype"]
    (output,) = [n for n in bwd.graph.nodes if n.op == "output"]
    grads = output.args[0]
    x_index = placeholders.index(gemm_call.args[0]) if gemm_call.args[0] in placeholders else None
    if x_index is None or not isinstance(grads, (tuple, list)) or len(grads) <= x_index:
        return None, NOT_MATMUL_4BIT
    bias = gemm_call.kwargs.get("bias", gemm_call.args[6] if len(gemm_call.args) > 6 else None)
    bias_index = placeholders.index(bias) if bias in placeholders else None
    if bias_index is not None and grads[bias_index] is not None:
        return None, TRAINABLE_BIAS
    if any(g is not None for i, g in enumerate(grads) if i != x_index) or grads[x_index] is not mms[0]:
        return None, NOT_MATMUL_4BIT
    return dtype, None


def _feeds_linear_weight(node: Node) -> bool:
    """Every use of ``node`` is as a ``linear``'s weight, directly or through a dtype cast."""
    for user in node.users:
        if user.target is _LINEAR and len(user.args) >= 2 and user.args[1] is node and user.args[0] is not node:
            continue
        if user.target is torch.Tensor.to and len(user.args) == 2 and isinstance(user.args[1], torch.dtype) and _feeds_linear_weight(user):
            continue
        return False
    return bool(node.users)


def _rewrite_dequant(graph, node, dequant, blockwise, report, graph_index):
    if not _feeds_linear_weight(node):
        return  # e.g. MatMul4Bit's backward body: not a 4-bit linear of the forward
    args = _bound(node, dequant)
    if not _quant_ok(args["shape"], args["blocksize"], args["quant_type"]):
        return _skip(report, graph_index, node, UNSUPPORTED_QUANT)
    absmax, a8, code, offset = args["absmax"], None, None, None
    if isinstance(absmax, Node) and absmax.target in (operator.add, operator.iadd, torch.add):
        inner, offset = absmax.args[0], absmax.args[1]
        if not (isinstance(inner, Node) and inner.target is blockwise and len(inner.users) == 1):
            return _skip(report, graph_index, node, STATE_NOT_INPUT)
        bw = _bound(inner, blockwise)
        code = bw["code"]
        if isinstance(code, Node) and code.target in (torch.Tensor.to, "to") and len(code.args) == 2 and not isinstance(code.args[1], torch.dtype):
            code = code.args[0]  # .to(device): the same values
        if bw["blocksize"] != NESTED_BLOCKSIZE or bw["dtype"] != torch.float32:
            return _skip(report, graph_index, node, UNSUPPORTED_QUANT)
        a8, absmax = bw["A"], bw["absmax"]
    elif isinstance(absmax, Node) and absmax.target is blockwise:
        return _skip(report, graph_index, node, STATE_NOT_INPUT)  # nested absmax without its offset
    with graph.inserting_before(node):
        dq = graph.call_function(_DEQUANT, (_peel_views(args["A"]), absmax, a8, code, offset, list(args["shape"]),
                                            args["blocksize"], args["quant_type"], args["dtype"], NESTED_BLOCKSIZE))
    ok = propagate([dq], node)
    if not ok or tuple(val(dq).shape) != tuple(val(node).shape) or val(dq).dtype != val(node).dtype:
        graph.erase_node(dq)
        return _skip(report, graph_index, node, UNSUPPORTED_QUANT)
    dq.meta["slothc_4bit"] = {"form": "dequantize_4bit", "bwd_dtype": None}
    node.replace_all_uses_with(dq)
    graph.erase_node(node)
    erase_dead_inputs([n for n in (args["absmax"],) if isinstance(n, Node)], graph, set())


# -- step 2: patterns ------------------------------------------------------------------------------


def _base_pattern(x, compute_dtype, weight, bias, result_dtype):
    return F.linear(x.to(compute_dtype), weight, bias).to(result_dtype)


def _plain_pattern(x, weight, bias):
    return F.linear(x, weight, bias)


def _update(xa, lora_a, lora_b, scaling, dtype):
    update = F.linear(F.linear(xa, lora_a), lora_b) * scaling
    return update if dtype is None else update.to(dtype)


def _make_peft_pattern(n_adapters: int, cast_update: bool):
    """PEFT's ``lora.bnb.Linear4bit`` with ``n_adapters`` adapters; ``cast_update``: the update is cast
    to the result's dtype before the add (PEFT does it unless autocast is on)."""
    if n_adapters == 1 and cast_update:
        def fn(x, compute_dtype, weight, bias, result_dtype, xa, lora_a, lora_b, scaling, dtype):
            result = F.linear(x.to(compute_dtype), weight, bias).to(result_dtype).clone()
            return result + _update(xa, lora_a, lora_b, scaling, dtype)
    elif n_adapters == 1:
        def fn(x, compute_dtype, weight, bias, result_dtype, xa, lora_a, lora_b, scaling):
            result = F.linear(x.to(compute_dtype), weight, bias).to(result_dtype).clone()
            return result + _update(xa, lora_a, lora_b, scaling, None)
    elif cast_update:
        def fn(x, compute_dtype, weight, bias, result_dtype, xa, lora_a, lora_b, scaling, dtype, xa2, lora_a2, lora_b2, scaling2):
            result = F.linear(x.to(compute_dtype), weight, bias).to(result_dtype).clone()
            result = result + _update(xa, lora_a, lora_b, scaling, dtype)
            return result + _update(xa2, lora_a2, lora_b2, scaling2, dtype)
    else:
        def fn(x, compute_dtype, weight, bias, result_dtype, xa, lora_a, lora_b, scaling, xa2, lora_a2, lora_b2, scaling2):
            result = F.linear(x.to(compute_dtype), weight, bias).to(result_dtype).clone()
            result = result + _update(xa, lora_a, lora_b, scaling, None)
            return result + _update(xa2, lora_a2, lora_b2, scaling2, None)
    fn.__name__ = f"_qlora_peft_{n_adapters}_adapter{'s' if n_adapters > 1 else ''}{'_cast' if cast_update else ''}_pattern"
    return fn


# -- checks ----------------------------------------------------------------------------------------


def _dequant_node(m):
    w = m["weight"]
    return w if isinstance(w, Node) and w.op == "call_function" and w.target is _DEQUANT else None


def _base_linear(m) -> Node:
    return next(n for n in m.nodes if n.target is _LINEAR and n.args[1] is m["weight"])


def _check_base(m) -> str | None:
    """The checks of the 4-bit base linear, each site reported once: a reason recorded at the outer
    ``.to()`` is not recorded again for the ``linear`` inside it."""
    dq = _dequant_node(m)
    if dq is None or _base_linear(m).meta.get("slothc_qlora_reported"):
        return NOT_A_CANDIDATE
    reason = _base_reason(m, dq)
    if reason is not None and reason is not NOT_A_CANDIDATE:
        _base_linear(m).meta["slothc_qlora_reported"] = True
    return reason


def _base_reason(m, dq) -> str | None:
    base = val(_base_linear(m)).dtype
    dq_dtype = dq.args[8]
    if dq_dtype not in (torch.float32, base):
        return DEQUANT_DTYPE
    if base not in _FLOATS or m.out.dtype not in _FLOATS:
        return lora.UNSUPPORTED_DTYPE
    x = m.val("x")
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cuda", "cpu"):
        return lora.UNSUPPORTED_DEVICE
    if "compute_dtype" in m.captures and m["compute_dtype"] not in (base, x.dtype):
        # x cast to one dtype, then by autocast to another: the linear alone (its x the cast) is
        # what the op computes exactly; PEFT's rule reports the adapters it cannot take then
        return COMPUTE_CAST if "lora_a" in m.captures else NOT_A_CANDIDATE
    bias = m.val("bias")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.requires_grad):
        return TRAINABLE_BIAS
    return None


def _check_peft(m) -> str | None:
    reason = _check_base(m)
    if reason is not None:
        # The LoRA pass's branch rule must not report these adapters a second time.
        return reason if reason is NOT_A_CANDIDATE else lora._mark_reported(m, reason)
    x, out = m.val("x"), m.out
    if m["result_dtype"] != out.dtype or ("dtype" in m.captures and m["dtype"] != out.dtype):
        return lora._mark_reported(m, lora.UNSUPPORTED_DTYPE)
    dropped = []
    for xa_name, a_name, b_name, s_name in lora._adapters(m):
        reaches, drop, reason = lora._adapter_input(m[xa_name], m["x"])
        if reason is not None:
            return lora._mark_reported(m, reason)
        if not reaches:
            return lora._mark_reported(m, lora.INPUT_MISMATCH)
        dropped.append(drop)
    if any(dropped) and len(dropped) > 1:
        return lora._mark_reported(m, lora.DROPOUT_TWO_ADAPTERS)
    m.state["dropout"] = dropped[0]
    shape = _dequant_node(m).args[5]
    lora_dtypes = set()
    for xa_name, a_name, b_name, s_name in lora._adapters(m):
        s = m[s_name]
        if isinstance(s, Node) or not isinstance(s, (int, float)) or isinstance(s, bool):
            return lora._mark_reported(m, lora.SCALING_NOT_CONSTANT)
        a, b = m.val(a_name), m.val(b_name)
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2):
            return lora._mark_reported(m, lora.SHAPES)
        if a.shape[1] != x.shape[-1] or b.shape[1] != a.shape[0] or b.shape[0] != shape[0]:
            return lora._mark_reported(m, lora.SHAPES)
        if a.dtype not in _FLOATS or b.dtype not in _FLOATS:
            return lora._mark_reported(m, lora.UNSUPPORTED_DTYPE)
        lora_dtypes.add(val(lora._branch_node(m, a_name)).dtype)
    if len(lora_dtypes) != 1:
        return lora._mark_reported(m, lora.UNSUPPORTED_DTYPE)
    return None


# -- replacements ----------------------------------------------------------------------------------


def _variant(dq: Node, adapters: int, dropout: bool) -> str:
    nested = ", double-quant" if dq.args[2] is not None else ""
    lora_part = "no LoRA" if not adapters else "peft" if adapters == 1 else f"peft ({adapters} adapters)"
    return f"{dq.args[7]}{nested}, blocksize {dq.args[6]}, {lora_part}{', dropout' if dropout else ''}"


def _call(x, weight_node, bias, lora_a, lora_b, scaling, base, lora_dtype, out, xa):
    packed, absmax, a8, code, offset, shape, blocksize, quant_type, _, nested = weight_node.args
    tracer = x.tracer  # one tracer for every operand of the call

    def proxy(n):
        return torch.fx.Proxy(n, tracer) if isinstance(n, Node) else n

    state = [[proxy(a8)], [proxy(code)], [proxy(offset)]] if a8 is not None else [[], [], []]
    # The op's code book is cached per device on first use: made here, at compile time, and not in
    # the op's first run, which under mode="reduce-overhead" is inside a CUDA graph's memory pool
    # (a cached tensor there is a live allocation the graph does not own: CUDA graph trees refuse it).
    qlora_kernels.code_book(quant_type, val(packed).device)
    return _OP(x, [proxy(packed)], [proxy(absmax)], *state, list(shape), blocksize, quant_type, [bias], lora_a, lora_b, scaling,
               [0] * len(lora_a), base, lora_dtype, out, xa, nested)


def _peft_replacement(m, x, weight, bias, xa, xa2=None, **captures):
    dq = _dequant_node(m)
    names = lora._adapters(m)
    base = val(_base_linear(m)).dtype
    lora_dtype = val(lora._branch_node(m, names[0][1])).dtype
    outs = _call(x, dq, bias, [captures[a] for _, a, _, _ in names], [captures[b] for _, _, b, _ in names],
                 [float(captures[s]) for _, _, _, s in names], base, lora_dtype, m.out.dtype, xa if m.state.get("dropout") else None)
    m.state["variant"] = _variant(dq, len(names), m.state.get("dropout", False))
    return outs[0]


def _bare_replacement(m, x, weight, bias, **captures):
    dq = _dequant_node(m)
    base = val(_base_linear(m)).dtype
    outs = _call(x, dq, bias, [], [], [], base, base, m.out.dtype, None)
    m.state["variant"] = _variant(dq, 0, False)
    return outs[0]


# -- shared inputs -----------------------------------------------------------------------------------


def _merge_key(node: Node):
    # One call's weights share the blocksize, quant type (in the key already) and double
    # quantisation; a call with a dropout input (xa) stays on its own, as in the LoRA pass.
    return None if node.args[17] is not None else (len(node.args[3]) > 0,)


LAYOUT = lora.Layout(_OP, 19, lists=(1, 2, 3, 4, 5, 6, 9, 10, 11, 12), proj=13, n_proj=1, key_extra=_merge_key)


def finish_graph(graph: Graph, report, graph_index: int = 0) -> None:
    """After the rules: the 4-bit projections of one input (q/k/v, gate/up) become one call."""
    for modules in lora.group_shared_inputs(graph, LAYOUT):
        lora.mark_shared(report, "qlora_linear", graph_index, modules)


_PEFT_RULES = [
    Rule("qlora_linear", "peft", _make_peft_pattern(n, cast), _peft_replacement, _check_peft)
    for n in (2, 1)
    for cast in (True, False)
]

RULES = RuleSet(
    _PEFT_RULES
    + [
        # the dequantised weight the op replaces is erased by the matcher (a capture left unused)
        Rule("qlora_linear", "no LoRA", _base_pattern, _bare_replacement, _check_base),
        Rule("qlora_linear", "no LoRA", _plain_pattern, _bare_replacement, _check_base),
    ]
)
