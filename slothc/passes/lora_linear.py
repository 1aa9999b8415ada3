"""LoRA linear: PEFT's ``lora.Linear`` as Dynamo captures it, rewritten to ``slothc::lora_linear``.

PEFT's ``Linear.forward`` (any target module name, any rank) reads, after normalization::

    result = linear(x, W, bias)                                  # the frozen base layer
    result = result + linear(linear(xa, A), B) * scaling         # once per active adapter
    return result.to(torch_result_dtype)

where ``xa`` is ``x``, or ``x.to(A.dtype)`` (PEFT casts the input to the adapters' dtype, e.g. bf16
activations and fp32 adapters), or ``dropout(...)`` of either. A dropout that is live (``p > 0`` in
training) is kept in the graph, computed by torch as in eager (same random mask), and the op reads
its output as the adapters' input ``xa``; the gradient reaches x through it. ``scaling`` is ``lora_alpha / r`` or,
with rsLoRA, ``lora_alpha / sqrt(r)``: a constant in the graph. One or two active adapters are matched
(summed, each with its own scale).

Skipped, with the reason in the report:

- a dropout whose probability or mode is not a constant, and two active adapters that both have a
  live dropout (one dropped-out input per call);
- a trainable base weight or bias (full fine-tuning of that layer: the op computes no dW);
- the adapters' low-rank branch in another form: DoRA, other LoRA variants, more than two adapters,
  or a base layer that is not a linear (transformers' ``Conv1D``, GPT-2);
- LoRA on an embedding or a convolution;
- adapters whose base layer's output comes from another graph (the model split between them, as
  DDPOptimizer splits it at DDP's bucket boundaries).

After the rewrite, projections that read the same ``x`` (q/k/v, gate/up, and any others) are merged
into one ``slothc::lora_linear`` call (:func:`group_shared_inputs`): ``x`` is then read once for all
their adapters' down-projections, forward and backward (see ``slothc/kernels/lora_linear.py``).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

import slothc.kernels.lora_linear  # noqa: F401  (registers torch.ops.slothc.lora_linear)
from slothc.passes.matcher import NOT_A_CANDIDATE, Rule, RuleSet
from slothc.passes.meta import propagate, val
from slothc.report import module_path

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

DROPOUT_NOT_CONSTANT = "lora dropout probability or mode is not a constant"
DROPOUT_TWO_ADAPTERS = "two active adapters with lora dropout in training (one dropped-out input a call)"
TRAINABLE_BASE = "base weight or bias is trainable (the fused op computes no dW)"
SCALING_NOT_CONSTANT = "lora scaling is not a constant"
NOT_PEFT_FORM = "low-rank branch not in PEFT's plain LoRA form (DoRA, another variant, or more than two adapters)"
BASE_NOT_LINEAR = "the base layer is not a linear (e.g. transformers' Conv1D in GPT-2: addmm on a transposed weight)"
ON_EMBEDDING = "LoRA on an embedding"
ON_CONVOLUTION = "LoRA on a convolution"
INPUT_MISMATCH = "the adapters read another input than the base layer"
BASE_IN_ANOTHER_GRAPH = (
    "the base layer's output is an input of this graph: the model was split between the base linear and its "
    "adapters (DDPOptimizer at a DDP bucket boundary, or a graph break)"
)
BASE_4BIT = "the base layer is a bitsandbytes 4-bit linear (the qlora_linear fusion's; see its entry)"
UNSUPPORTED_DTYPE = "dtype is not fp32, bf16 or fp16"
UNSUPPORTED_DEVICE = "input is not on a CUDA or CPU device"
SHAPES = "weight shapes do not form a LoRA linear"

_LINEAR = torch._C._nn.linear
_DROPOUT = F.dropout
_CONVS = (torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d)


# -- patterns ----------------------------------------------------------------------------------------


def _lora_linear_one_adapter_pattern(x, xa, weight, bias, lora_a, lora_b, scaling, dtype):
    result = F.linear(x, weight, bias)
    result = result + F.linear(F.linear(xa, lora_a), lora_b) * scaling
    return result.to(dtype)


def _lora_linear_two_adapters_pattern(x, xa, xa2, weight, bias, lora_a, lora_b, scaling, lora_a2, lora_b2, scaling2, dtype):
    result = F.linear(x, weight, bias)
    result = result + F.linear(F.linear(xa, lora_a), lora_b) * scaling
    result = result + F.linear(F.linear(xa2, lora_a2), lora_b2) * scaling2
    return result.to(dtype)


def _lora_branch_pattern(xa, lora_a, lora_b, scaling):
    return F.linear(F.linear(xa, lora_a), lora_b) * scaling


def _lora_embedding_pattern(after_a, embedding_b, scaling):
    return (after_a @ embedding_b) * scaling


def _lora_embedding_linear_pattern(after_a, embedding_b, scaling):
    # PEFT's ``after_A @ lora_embedding_B.T``, which normalization reads as a linear
    return F.linear(after_a, embedding_b) * scaling


def _lora_conv_pattern(branch, scaling):
    return branch * scaling


# -- checks ------------------------------------------------------------------------------------------


def _adapter_input(xa, x) -> tuple[bool, bool, str | None]:
    """Peel PEFT's cast and dropout off ``xa``: (reaches ``x``, a live dropout is on the way, reason
    to skip or None). A dropout with ``p = 0`` or ``training=False`` is the identity."""
    node, dropped = xa, False
    while isinstance(node, Node) and node is not x:
        if node.op != "call_function":
            return False, False, None
        if node.target is torch.Tensor.to and len(node.args) == 2 and isinstance(node.args[1], torch.dtype) and not node.kwargs:
            node = node.args[0]
        elif node.target is _DROPOUT:
            args = dict(zip(("input", "p", "training", "inplace"), node.args), **node.kwargs)
            p, training, inplace = args.get("p", 0.5), args.get("training", True), args.get("inplace", False)
            if isinstance(p, Node) or isinstance(training, Node) or inplace is not False:
                return True, False, DROPOUT_NOT_CONSTANT
            dropped = dropped or (p > 0 and bool(training))
            node = args["input"]
        else:
            return False, False, None
    return node is x, dropped, None


def _adapters(m) -> list[tuple[str, str, str, str]]:
    """(xa, lora_a, lora_b, scaling) capture names of the matched adapters."""
    if "lora_a2" in m.captures:
        return [("xa", "lora_a", "lora_b", "scaling"), ("xa2", "lora_a2", "lora_b2", "scaling2")]
    return [("xa", "lora_a", "lora_b", "scaling")]


def _frozen(v) -> bool:
    return v is None or (isinstance(v, torch.Tensor) and not v.requires_grad)


def _lora_linear_check(m) -> str | None:
    x, w = m.val("x"), m.val("weight")
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        return NOT_A_CANDIDATE
    dropped = []
    for xa_name, a_name, b_name, s_name in _adapters(m):
        reaches, drop, reason = _adapter_input(m[xa_name], m["x"])
        if reason is not None:
            return _mark_reported(m, reason)
        if not reaches:
            return _mark_reported(m, INPUT_MISMATCH)
        dropped.append(drop)
    if any(dropped) and len(dropped) > 1:
        return _mark_reported(m, DROPOUT_TWO_ADAPTERS)
    m.state["dropout"] = dropped[0]
    for xa_name, a_name, b_name, s_name in _adapters(m):
        if isinstance(m[s_name], Node) or not isinstance(m[s_name], (int, float)) or isinstance(m[s_name], bool):
            return _mark_reported(m, SCALING_NOT_CONSTANT)
        a, b = m.val(a_name), m.val(b_name)
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2):
            return _mark_reported(m, SHAPES)
        if a.shape[1] != x.shape[-1] or b.shape[1] != a.shape[0] or b.shape[0] != w.shape[0]:
            return _mark_reported(m, SHAPES)
        if a.dtype not in SUPPORTED_DTYPES or b.dtype not in SUPPORTED_DTYPES:
            return _mark_reported(m, UNSUPPORTED_DTYPE)
    if not _frozen(w) or not _frozen(m.val("bias")):
        return _mark_reported(m, TRAINABLE_BASE)
    if w.dim() != 2 or w.shape[1] != x.shape[-1]:
        return _mark_reported(m, SHAPES)
    if x.device.type not in ("cuda", "cpu"):
        return _mark_reported(m, UNSUPPORTED_DEVICE)
    dtypes = _dtypes(m)
    if any(d not in SUPPORTED_DTYPES for d in (x.dtype, w.dtype, *dtypes)):
        return _mark_reported(m, UNSUPPORTED_DTYPE)
    if len({_dtype_of(m, a) for _, a, _, _ in _adapters(m)}) != 1:
        return _mark_reported(m, UNSUPPORTED_DTYPE)
    return None


def _mark_reported(m, reason: str) -> str:
    # The branch rule below must not report these adapters a second time.
    for node in m.nodes:
        node.meta["slothc_lora_reported"] = True
    return reason


def _base_node(m) -> Node:
    return next(n for n in m.nodes if n.target is _LINEAR and n.args[0] is m["x"] and n.args[1] is m["weight"])


def _branch_node(m, a_name: str) -> Node:
    """The ``linear(linear(xa, A), B)`` node of an adapter."""
    inner = next(n for n in m.nodes if n.target is _LINEAR and n.args[1] is m[a_name])
    return next(iter(inner.users))


def _dtype_of(m, a_name: str) -> torch.dtype:
    return val(_branch_node(m, a_name)).dtype


def _dtypes(m) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(base, lora, out) dtypes: what the base linear, the adapters' product and the final cast give."""
    base = val(_base_node(m)).dtype
    lora = _dtype_of(m, _adapters(m)[0][1])
    return base, lora, m.out.dtype


def _lora_branch_check(m) -> str | None:
    if m.root.meta.get("slothc_lora_reported"):
        return NOT_A_CANDIDATE
    a, b = m.val("lora_a"), m.val("lora_b")
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2):
        return NOT_A_CANDIDATE
    # An adapter: trainable, and of lower rank than the layer it adapts.
    if not (a.requires_grad or b.requires_grad) or not a.shape[0] < min(a.shape[1], b.shape[0]):
        return NOT_A_CANDIDATE
    # PEFT adds the branch to the base layer's output: name what that output was, if not a linear.
    root = m.root
    if len(root.users) == 1 and next(iter(root.users)).target is torch.Tensor.to:
        root = next(iter(root.users))  # PEFT's 4-bit layer casts the update first
    adds = [u for u in root.users if u.op == "call_function" and u.target is operator.add]
    if len(adds) == 1 and any(_is_4bit_base(a) for a in adds[0].args if a is not root):
        return BASE_4BIT
    if len(adds) == 1:
        other = [a for a in adds[0].args if a is not root]
        if other and isinstance(other[0], Node) and other[0].op == "placeholder":
            return BASE_IN_ANOTHER_GRAPH
        if other and isinstance(other[0], Node) and other[0].target is not _LINEAR and not _is_op(other[0]):
            base = other[0]
            while base.target in ("view", "reshape", torch.Tensor.view, torch.Tensor.reshape, torch.reshape) and isinstance(base.args[0], Node):
                base = base.args[0]
            if base.target in (torch.addmm, torch.matmul, operator.matmul, torch.mm, "addmm", "matmul"):
                return BASE_NOT_LINEAR
    return NOT_PEFT_FORM


def _is_4bit_base(node) -> bool:
    """Whether ``node`` is (a cast or clone of) a bitsandbytes 4-bit matmul or slothc's rewrite of one."""
    while isinstance(node, Node) and node.op == "call_function" and node.target in (
        torch.Tensor.to, torch.Tensor.clone, operator.getitem, _LINEAR
    ):
        if node.target is _LINEAR:
            w = node.args[1]
            return isinstance(w, Node) and w.target is getattr(torch.ops.slothc, "dequantize_4bit").default
        node = node.args[0]
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    if node.target is torch.ops.higher_order.autograd_function_apply:
        return True  # bitsandbytes' MatMul4Bit (qlora_linear reports what it is if not)
    return "bitsandbytes" in str(node.target)


def _lora_embedding_check(m) -> str | None:
    after_a = m["after_a"]
    if isinstance(after_a, Node) and after_a.op == "call_function" and after_a.target is F.embedding:
        return ON_EMBEDDING
    return NOT_A_CANDIDATE


def _lora_conv_check(m) -> str | None:
    branch = m["branch"]
    if (
        isinstance(branch, Node)
        and branch.target in _CONVS
        and isinstance(branch.args[0], Node)
        and branch.args[0].target in _CONVS
        and isinstance(m["scaling"], (int, float))
    ):
        return ON_CONVOLUTION
    return NOT_A_CANDIDATE


# -- replacement -------------------------------------------------------------------------------------


def _lora_linear_replacement(m, x, xa, weight, bias, dtype, xa2=None, **adapters):
    base, lora, out = _dtypes(m)
    names = _adapters(m)
    args = [
        x,
        [weight],
        [bias],
        [adapters[a] for _, a, _, _ in names],
        [adapters[b] for _, _, b, _ in names],
        [float(adapters[s]) for _, _, _, s in names],
        [0] * len(names),
        base,
        lora,
        out,
    ]
    # Without a live dropout the op reads x itself (PEFT's cast of it is not needed); with one, the
    # adapters read torch's own dropout output (its mask is eager's), which stays in the graph.
    if m.state.get("dropout"):
        args.append(xa)
    outs = torch.ops.slothc.lora_linear.default(*args)
    variant = "peft" if len(names) == 1 else f"peft ({len(names)} adapters)"
    m.state["variant"] = variant + (", dropout" if m.state.get("dropout") else "")
    return outs[0]


RULES = RuleSet(
    [
        Rule("lora_linear", "peft", _lora_linear_two_adapters_pattern, _lora_linear_replacement, _lora_linear_check),
        Rule("lora_linear", "peft", _lora_linear_one_adapter_pattern, _lora_linear_replacement, _lora_linear_check),
        Rule("lora_linear", "branch", _lora_branch_pattern, None, _lora_branch_check),
        Rule("lora_linear", "embedding", _lora_embedding_pattern, None, _lora_embedding_check),
        Rule("lora_linear", "embedding", _lora_embedding_linear_pattern, None, _lora_embedding_check),
        Rule("lora_linear", "conv", _lora_conv_pattern, None, _lora_conv_check),
    ]
)


# -- shared inputs -----------------------------------------------------------------------------------

_OP = torch.ops.slothc.lora_linear.default
_N_ARGS = 10


def _is_op(node: Node) -> bool:
    return node.op == "call_function" and node.target in (_OP, torch.ops.slothc.lora_linear)


def finish_graph(graph: Graph, report, graph_index: int = 0) -> None:
    """After the rules: merge the projections that share an input; note it in their report sites."""
    for modules in group_shared_inputs(graph):
        mark_shared(report, "lora_linear", graph_index, modules)


def mark_shared(report, fusion: str, graph_index: int, modules: list) -> None:
    sites = report.fused.get(fusion, [])
    remaining = list(modules)
    for i, site in enumerate(sites):
        if site.graph == graph_index and site.module in remaining:
            remaining.remove(site.module)
            sites[i] = dataclasses.replace(site, variant=f"{site.variant}, input shared by {len(modules)}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a multi-projection op (``slothc::lora_linear``, ``slothc::qlora_linear``) keeps its
    arguments: ``lists`` are concatenated over the merged calls, ``proj`` (adapter -> projection) is
    offset by the projections before, ``n_proj`` counts a call's projections (its outputs before
    ``T``); every other argument must be equal (with ``key``'s extra terms) for calls to merge."""

    op: object
    n_args: int
    lists: tuple
    proj: int
    n_proj: int
    key_extra: object = None  # node -> extra key terms, or None when the call may not merge


LORA_LAYOUT = Layout(_OP, _N_ARGS, lists=(1, 2, 3, 4, 5), proj=6, n_proj=1)


def group_shared_inputs(graph: Graph, layout: Layout = LORA_LAYOUT) -> list[list[str]]:
    """Merge calls of ``layout.op`` that read the same input with the same dtypes (and settings) into one.

    The merged call is placed where the first of them was; a view or cast of graph inputs that a
    later call reads is moved before it; a call whose other operands are only defined later in the graph (e.g.
    a weight cast computed just before it) is left on its own. Returns the
    module paths of each merged group.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    buckets: dict = {}
    skip = (*layout.lists, layout.proj)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in (layout.op, layout.op._overloadpacket) and len(node.args) == layout.n_args \
                and not node.kwargs:
            extra = layout.key_extra(node) if layout.key_extra is not None else ()
            if extra is None:
                continue
            key = (tuple(a for i, a in enumerate(node.args) if i not in skip), extra)
            buckets.setdefault(key, []).append(node)
    groups = []
    for nodes in buckets.values():
        if len(nodes) < 2:
            continue
        first = nodes[0]
        for n in nodes[1:]:
            for d in n.all_input_nodes:
                if order[d] > order[first] and _view_or_cast_of_inputs(d):
                    # a view or cast of graph inputs (bitsandbytes' packed.view(-1, 1), a bias cast) can be made earlier
                    first.prepend(d)
                    order[d] = order[first] - 0.5
        mergeable = [first] + [
            n for n in nodes[1:] if all(order[d] < order[first] for d in n.all_input_nodes)
        ]
        if len(mergeable) < 2:
            continue
        modules = [module_path(n) for n in mergeable]
        if _merge(graph, mergeable, layout):
            groups.append(modules)
    return groups


_VIEWS = (torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.to, "view", "reshape", "to")


def _view_or_cast_of_inputs(node: Node) -> bool:
    return (node.op == "call_function" or node.op == "call_method") and node.target in _VIEWS and all(
        d.op in ("placeholder", "get_attr") for d in node.all_input_nodes
    )


def _merge(graph: Graph, nodes: list, layout: Layout) -> bool:
    first = nodes[0]
    args = list(first.args)
    for i in (*layout.lists, layout.proj):
        args[i] = []
    n_proj = 0
    for n in nodes:
        for i in layout.lists:
            args[i] += list(n.args[i])
        args[layout.proj] += [n_proj + q for q in n.args[layout.proj]]
        n_proj += len(n.args[layout.n_proj])
    with graph.inserting_before(first):
        merged = graph.call_function(layout.op, tuple(args))
        getters = [graph.call_function(operator.getitem, (merged, i)) for i in range(n_proj)]
    if not propagate([merged, *getters], first):
        for node in reversed([merged, *getters]):
            graph.erase_node(node)
        return False
    offset = 0
    for n in nodes:
        count = len(n.args[layout.n_proj])
        for user in list(n.users):
            if user.target is operator.getitem and isinstance(user.args[1], int) and user.args[1] < count:
                user.replace_all_uses_with(getters[offset + user.args[1]])
        offset += count
    for n in nodes:
        for user in list(n.users):
            if not user.users:
                graph.erase_node(user)
        if not n.users:
            graph.erase_node(n)
    return True
