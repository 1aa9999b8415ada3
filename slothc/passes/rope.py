"""RoPE: the rotary embedding of q and k as models write it, rewritten to ``slothc::rope``.

Every Hugging Face model with rotary positions computes, per tensor (after normalization)::

    x * cos + rot(x) * sin

with ``rot`` one of

- ``rotate_half`` (Llama, Mistral, Qwen, Gemma, Phi-3, ...): ``cat((-x[..., h:], x[..., :h]), -1)``;
- ``rotate_half`` with flipped signs (NanoChat): ``cat((x[..., h:], -x[..., :h]), -1)``, which is
  ``rotate_half`` with ``-sin``;
- ``interleaved`` (GPT-J's ``rotate_every_two``, Cohere, GLM, ERNIE, RoFormer):
  ``stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)``.

DeepSeek-V3 and the MLA models that share its code (GLM-4-MoE-Lite, Youtu, ...) rotate interleaved
pairs with one angle a pair and lay the result out in halves::

    x1, x2 = x[..., ::2], x[..., 1::2]
    cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)      # cos, sin: [..., rotary_dim / 2]

which is the op's ``deinterleave`` form with cos and sin repeated over the halves
(``cat((cos, cos), -1)``: the same values at both channels of a pair). GPT-OSS writes the same with
halves in (``x1, x2 = chunk(x, 2, -1)``): rotate_half with the tables repeated.

Around it, in any combination:

- ``partial`` (Phi, GPT-NeoX, StableLM, Phi-3, GLM): ``cat((rope(x[..., :d]), x[..., d:]), -1)``,
  the first ``d`` channels rotated, the rest passed through (the op copies them: no ``cat``);
- ``upcast`` (Cohere, ModernBERT): ``rope(x.float()).to(x.dtype)``; ERNIE 4.5 and DeepSeek-V4 upcast
  ``rot(x)`` after rotating it (the same values): computed in fp32, cast back.

cos and sin are captured as they reach the expression (unsqueezed, any dtype, any values: Qwen2-VL's
multimodal sections and YaRN's scaled tables are computed before it and left to Inductor); they must
broadcast over a head dim (``unsqueeze_dim`` 1 or 2, see ``slothc/kernels/rope.py``).

Each rotation is one site. After the rules, the rotations of one attention module that read the same
cos and sin (q and k) are merged into one ``slothc::rope`` call, one kernel launch
(:func:`pair_q_and_k`).

Llama 4 and DeepSeek-V2 rotate as a complex product::

    view_as_real(view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs_cis).flatten(-2)   # then .type_as(x)

which is the interleaved rotation computed in fp32 with ``cos = freqs_cis.real`` and ``sin =
freqs_cis.imag`` repeated over each pair (``(a + bi)(c + di) = (ac - bd) + (ad + bc)i``); the op reads
x itself, not its fp32 copy, and writes the cast's dtype.

Skipped, with the reason: cos/sin that need a gradient, halves of unequal width (an odd rotary
dim), cos/sin that do not broadcast over a head dim, a rotation whose result is used in any other
expression (e.g. a scaling applied inside the rotation), and a complex product in another form (not
of x's pairs, or not flattened back).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Graph, Node

import slothc.kernels.rope as rope_kernels  # registers torch.ops.slothc.rope
from slothc.passes.matcher import NOT_A_CANDIDATE, Rule, RuleSet, erase_dead_inputs, always, match
from slothc.passes.meta import propagate, val
from slothc.report import module_path

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

NOT_A_TENSOR = "q/k or cos/sin is not a tensor"
UNSUPPORTED_DTYPE = "dtype is not fp32, bf16 or fp16"
UNSUPPORTED_DEVICE = "input is not on a CUDA or CPU device"
COS_SIN_NEED_GRAD = "cos/sin require grad (the fused op computes no gradient for them)"
COS_SIN_SHAPES = "cos and sin differ in shape"
UNEQUAL_HALVES = "the halves of rotate_half differ in width (odd rotary dim)"
ODD_ROTARY_DIM = "odd rotary dim"
SLICE_NOT_CONSTANT = "the rotary dim is not a constant"
NOT_ROPE_FORM = "rotation not in the form x * cos + rotate(x) * sin (e.g. scaled inside the rotation)"
COMPLEX_ROTATION = "rotation as a complex product (view_as_complex(x) * freqs_cis) in another form than x's pairs flattened back"
COMPLEX_TABLE = "the complex rotary table is not complex64 of one angle a pair, or needs a gradient"
NOT_HALF_TABLES = "cos/sin are not half the rotated width (one angle a pair)"

_OP = torch.ops.slothc.rope.default


# -- patterns ----------------------------------------------------------------------------------------
#
# One pattern per (rotation, partial or not, precision). The rotations take the half width ``h`` as
# a capture where they slice by it.


def _rotate_half(x, h):  # Llama: (-x2, x1)
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def _rotate_half_flipped(x, h):  # NanoChat: (x2, -x1), i.e. rotate_half with sin negated
    return torch.cat((x[..., h:], -x[..., :h]), -1)


def _rotate_pairs(x):  # GPT-J's rotate_every_two: (-x[2i+1], x[2i]) per pair
    return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)


def _rotation(x, cos, sin, rotate, precision):
    if precision == "upcast":  # Cohere, ModernBERT: rope(x.float()).to(x.dtype); x.float() once or twice
        return (x.to(torch.float32) * cos + rotate(x.to(torch.float32)) * sin).to(x.dtype)
    if precision == "upcast_after":  # ERNIE 4.5: rotate first, then upcast
        return (x.to(torch.float32) * cos + rotate(x).to(torch.float32) * sin).to(x.dtype)
    return x * cos + rotate(x) * sin


def _pattern(rotation: str, partial: bool, precision: str):
    rotate = {"rotate_half": _rotate_half, "rotate_half_flipped": _rotate_half_flipped, "interleaved": _rotate_pairs}[rotation]
    if rotation == "interleaved":
        if partial:
            def fn(x, cos, sin, d):
                xr = x[..., :d]
                return torch.cat((_rotation(xr, cos, sin, rotate, precision), x[..., d:]), -1)
        else:
            def fn(x, cos, sin):
                return _rotation(x, cos, sin, rotate, precision)
    elif partial:
        def fn(x, cos, sin, d, h):
            xr = x[..., :d]
            return torch.cat((_rotation(xr, cos, sin, lambda t: rotate(t, h), precision), x[..., d:]), -1)
    else:
        def fn(x, cos, sin, h):
            return _rotation(x, cos, sin, lambda t: rotate(t, h), precision)
    fn.__name__ = f"_rope_{rotation}{'_partial' if partial else ''}{'' if precision == 'plain' else '_' + precision}_pattern"
    return fn


def _rope_rotate_half_alone_pattern(x, h):
    return _rotate_half(x, h)


def _rope_rotate_half_flipped_alone_pattern(x, h):
    return _rotate_half_flipped(x, h)


def _rope_interleaved_alone_pattern(x):
    return _rotate_pairs(x)


def _pairs_rotated(x1, x2, cos, sin):  # one angle a pair, the result in halves
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def _rope_deinterleave_pattern(x, cos, sin):  # DeepSeek-V3: interleaved pairs in, halves out
    return _pairs_rotated(x[..., ::2], x[..., 1::2], cos, sin)


def _rope_half_tables_chunk_pattern(x, cos, sin):  # GPT-OSS: halves in and out
    halves = torch.chunk(x, 2, -1)
    return _pairs_rotated(halves[0], halves[1], cos, sin)


def _rope_half_tables_slice_pattern(x, cos, sin, h):
    return _pairs_rotated(x[..., :h], x[..., h:], cos, sin)


def _rope_complex_pattern(x, freqs):  # Llama 4: view_as_real(view_as_complex(x) * freqs_cis)
    return torch.view_as_real(torch.view_as_complex(x) * freqs)


def _rope_complex_flat_pattern(x, freqs):  # the product flattened back to the head dim (fp32)
    return torch.view_as_real(torch.view_as_complex(x) * freqs).flatten(-2)


def _rope_complex_cast_pattern(x, freqs, dtype):  # ... and cast back: .type_as(x)
    return torch.view_as_real(torch.view_as_complex(x) * freqs).flatten(-2).to(dtype)


# -- checks ------------------------------------------------------------------------------------------


def _rotary_dim(m) -> int | str:
    """The rotated width: the captured slice ``d`` (partial) or x's last dim."""
    if "d" in m.captures:
        d = m["d"]
        return d if type(d) is int and 0 < d <= m.val("x").shape[-1] else SLICE_NOT_CONSTANT
    width = m.val("x").shape[-1]
    return width if type(width) is int else SLICE_NOT_CONSTANT


def _operands_check(m) -> str | None:
    x, cos, sin = m.val("x"), m.val("cos"), m.val("sin")
    if not all(isinstance(t, torch.Tensor) for t in (x, cos, sin)):
        return NOT_A_TENSOR
    if any(t.dtype not in SUPPORTED_DTYPES for t in (x, cos, sin)):
        return UNSUPPORTED_DTYPE
    if x.device.type not in ("cuda", "cpu"):
        return UNSUPPORTED_DEVICE
    if cos.requires_grad or sin.requires_grad:
        return COS_SIN_NEED_GRAD
    if cos.shape != sin.shape:
        return COS_SIN_SHAPES
    return None


def _width_check(m) -> int | str:
    """The rotated width (a constant, even, split into equal halves where the pattern slices by
    ``h``), or why the site is skipped."""
    reason = _operands_check(m)
    if reason:
        return reason
    width = _rotary_dim(m)
    if isinstance(width, str):
        return width
    if "h" in m.captures:
        if type(m["h"]) is not int or 2 * m["h"] != width:
            return UNEQUAL_HALVES
    elif width % 2:
        return ODD_ROTARY_DIM
    return width


def _rope_check(m) -> str | None:
    rotary_dim = _width_check(m)
    if isinstance(rotary_dim, str):
        return rotary_dim
    layout = rope_kernels.rope_layout([tuple(m.val("x").shape)], tuple(m.val("cos").shape), rotary_dim)
    return layout if isinstance(layout, str) else None


def _half_tables_check(m) -> str | None:
    """The one-angle-a-pair forms: cos and sin half the rotated width (the op gets them repeated)."""
    width = _width_check(m)
    if isinstance(width, str):
        return width
    cos = m.val("cos")
    if cos.dim() == 0 or cos.shape[-1] != width // 2:
        return NOT_HALF_TABLES
    layout = rope_kernels.rope_layout([tuple(m.val("x").shape)], tuple(cos.shape[:-1]) + (width,), width)
    return layout if isinstance(layout, str) else None


def _pairs_of(node) -> Node | None:
    """``x`` where ``node`` is ``x.float().reshape(*x.shape[:-1], -1, 2)`` (or without the cast for
    an fp32 x): x's channels as pairs, viewed for ``view_as_complex``."""
    if not isinstance(node, Node) or node.target not in (torch.Tensor.reshape, torch.Tensor.view, torch.reshape):
        return None
    source = node.args[0]
    if isinstance(source, Node) and source.target is torch.Tensor.to and source.args[1:] == (torch.float32,) and not source.kwargs:
        source = source.args[0]
    x, pairs = val(source), val(node)
    if not isinstance(x, torch.Tensor) or not isinstance(pairs, torch.Tensor) or x.dim() == 0:
        return None
    width = x.shape[-1]
    if type(width) is not int or width % 2 or tuple(pairs.shape) != (*x.shape[:-1], width // 2, 2):
        return None
    return source


def _complex_check(m) -> str | None:
    source = _pairs_of(m["x"])
    if source is None:
        return COMPLEX_ROTATION
    x, freqs = val(source), m.val("freqs")
    if x.dtype not in SUPPORTED_DTYPES or ("dtype" in m.captures and m["dtype"] not in SUPPORTED_DTYPES):
        return UNSUPPORTED_DTYPE
    if x.device.type not in ("cuda", "cpu"):
        return UNSUPPORTED_DEVICE
    width = x.shape[-1]
    if not isinstance(freqs, torch.Tensor) or freqs.dtype != torch.complex64 or freqs.requires_grad or freqs.dim() == 0 \
            or freqs.shape[-1] != width // 2:
        return COMPLEX_TABLE
    layout = rope_kernels.rope_layout([tuple(x.shape)], tuple(freqs.shape[:-1]) + (width,), width)
    if isinstance(layout, str):
        return layout
    m.state["source"] = source
    return None


def _replace_complex(m, x, freqs, dtype=None, **_):
    """The interleaved rotation of x itself, cos and sin the real and imaginary parts of ``freqs``."""
    source = torch.fx.Proxy(m.state["source"], x.tracer)
    width = val(m.state["source"]).shape[-1]
    table = torch.view_as_real(freqs)  # [..., width / 2, 2]: cos and sin of each pair's angle
    cos = torch.repeat_interleave(table[..., 0], 2, -1)
    sin = torch.repeat_interleave(table[..., 1], 2, -1)
    out_dtype = dtype if dtype is not None else torch.float32
    m.state["variant"] = "complex product, interleaved, fp32" + (" then cast back" if dtype is not None else "")
    return _OP(source, None, cos, sin, width, True, out_dtype, False)[0]


def _alone_check(m) -> str:
    """A rotate_half / rotate_every_two left over after the rules: report it, unless it belongs to a
    full expression that a rule already reported (skipped for another reason)."""
    for user in m.root.users:
        for outer in list(user.users):
            for rule in RULES.rules:
                if rule.replacement is not None and outer.target is rule.traced.output.target and match(rule.traced, outer):
                    return NOT_A_CANDIDATE
    return NOT_ROPE_FORM


# -- replacements ------------------------------------------------------------------------------------


def _replacement(rotation: str, precision: str):
    interleaved = rotation == "interleaved"

    def replace(m, x, cos, sin, **_):
        rotary_dim = _rotary_dim(m)
        width = m.val("x").shape[-1]
        variant = {"rotate_half": "rotate_half", "rotate_half_flipped": "rotate_half (sin negated)", "interleaved": "interleaved"}[rotation]
        if rotary_dim != width:
            variant += f", partial {rotary_dim}/{width}"
        if precision != "plain":
            variant += ", fp32 then cast back"
        m.state["variant"] = variant
        out_dtype = m.val("x").dtype if precision != "plain" else None
        if rotation == "rotate_half_flipped":
            sin = -sin  # x*c + (x2, -x1)*s is x*c + (-x2, x1)*(-s)
        return _OP(x, None, cos, sin, rotary_dim, interleaved, out_dtype, False)[0]

    return replace


def _half_tables_replacement(interleaved: bool):
    def replace(m, x, cos, sin, **_):
        m.state["variant"] = "interleaved pairs to halves" if interleaved else "rotate_half, one angle a pair"
        width = m.val("x").shape[-1]
        return _OP(x, None, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1), width, interleaved, None, interleaved)[0]

    return replace


# Partial spellings first (the rotation inside them is itself a match of a full one), then the
# upcast ones (their inner expression is one too).
RULES = RuleSet(
    [
        Rule("rope", f"{rotation}", _pattern(rotation, partial, precision), _replacement(rotation, precision), _rope_check)
        for partial in (True, False)
        for precision in ("upcast", "upcast_after", "plain")
        for rotation in ("rotate_half", "rotate_half_flipped", "interleaved")
    ]
    + [
        Rule("rope", "interleaved pairs to halves", _rope_deinterleave_pattern, _half_tables_replacement(True), _half_tables_check),
        Rule("rope", "rotate_half, one angle a pair", _rope_half_tables_chunk_pattern, _half_tables_replacement(False),
             _half_tables_check),
        Rule("rope", "rotate_half, one angle a pair", _rope_half_tables_slice_pattern, _half_tables_replacement(False),
             _half_tables_check),
        Rule("rope", "complex product", _rope_complex_cast_pattern, _replace_complex, _complex_check),
        Rule("rope", "complex product", _rope_complex_flat_pattern, _replace_complex, _complex_check),
    ]
)
REPORT_ONLY = RuleSet(
    [
        Rule("rope", "rotate_half", _rope_rotate_half_alone_pattern, None, _alone_check),
        Rule("rope", "rotate_half (sin negated)", _rope_rotate_half_flipped_alone_pattern, None, _alone_check),
        Rule("rope", "interleaved", _rope_interleaved_alone_pattern, None, _alone_check),
        Rule("rope", "complex", _rope_complex_pattern, None, always(COMPLEX_ROTATION)),
    ]
)


# -- q and k in one call -----------------------------------------------------------------------------

_SAME_VALUE_TARGETS = frozenset(
    {operator.getitem, torch.repeat_interleave, torch.Tensor.repeat_interleave, torch.Tensor.unsqueeze,
     torch.unsqueeze, torch.Tensor.to, torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.expand, operator.neg,
     torch.cat, torch.view_as_real}
)


def _same_value(a, b, depth: int = 6) -> bool:
    """``a`` and ``b`` are one value: the same node, or the same deterministic view/cast of one value
    (GPT-J computes cos for q and for k separately from one table)."""
    if isinstance(a, Node) and isinstance(b, Node):
        if a is b:
            return True
        if depth == 0 or a.op != "call_function" or b.op != "call_function" or a.target is not b.target:
            return False
        if a.target not in _SAME_VALUE_TARGETS or set(a.kwargs) != set(b.kwargs) or len(a.args) != len(b.args):
            return False
        return all(_same_value(x, y, depth - 1) for x, y in zip(a.args, b.args)) and all(
            _same_value(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y, depth) for x, y in zip(a, b))
    if isinstance(a, Node) or isinstance(b, Node):
        return False
    return type(a) is type(b) and a == b


def _single_calls(graph: Graph) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is _OP and n.args[1] is None]


def pair_q_and_k(graph: Graph) -> list[str]:
    """Merge two single-tensor ``slothc::rope`` calls of one module that read one cos and sin.

    The merged call goes where the later of the two was, if every user of the earlier one's result
    comes after that point (else where the earlier one was, if the later one's operands are all
    defined before it); otherwise both stay. Returns the module path of each merged pair.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    calls = _single_calls(graph)
    used, merged = set(), []
    for i, first in enumerate(calls):
        if first in used:
            continue
        for second in calls[i + 1 :]:
            if second in used or not _pairable(first, second):
                continue
            if _merge(graph, first, second, order):
                used.update((first, second))
                merged.append(module_path(first))
                order = {n: j for j, n in enumerate(graph.nodes)}
                break
    return merged


def _pairable(a: Node, b: Node) -> bool:
    _, _, cos_a, sin_a, *rest_a = a.args
    _, _, cos_b, sin_b, *rest_b = b.args
    if rest_a != rest_b or module_path(a) != module_path(b):
        return False
    if not (_same_value(cos_a, cos_b) and _same_value(sin_a, sin_b)):
        return False
    xa, xb, cos = val(a.args[0]), val(b.args[0]), val(cos_a)
    layout = rope_kernels.rope_layout([tuple(xa.shape), tuple(xb.shape)], tuple(cos.shape), rest_a[0])
    return not isinstance(layout, str)


def _merge(graph: Graph, a: Node, b: Node, order: dict) -> bool:
    """Replace single calls ``a`` and ``b`` (``a`` first in the graph) by one call for both."""
    users_of_a = [u for g in a.users for u in g.users]
    if all(order[u] > order[b] for u in users_of_a):
        anchor = b  # every operand is defined by then; a's result is first needed after it
    elif order[b.args[0]] < order[a]:
        anchor = a  # b's tensor exists already (a's cos/sin are the ones the call reads)
    else:
        return False
    _, _, cos, sin, *rest = a.args
    with graph.inserting_before(anchor):
        call = graph.call_function(_OP, (a.args[0], b.args[0], cos, sin, *rest))
        getters = [graph.call_function(operator.getitem, (call, i)) for i in range(2)]
    if not propagate([call, *getters], anchor):
        for node in reversed([call, *getters]):
            graph.erase_node(node)
        return False
    b_tables = [b.args[2], b.args[3]]
    for node, getter in ((a, getters[0]), (b, getters[1])):
        for user in list(node.users):  # getitem(node, 0): a single call has one result
            user.replace_all_uses_with(getter)
            graph.erase_node(user)
        graph.erase_node(node)
    erase_dead_inputs(b_tables, graph, set())
    return True


def finish_graph(graph: Graph, report, graph_index: int = 0) -> None:
    """After the rules: report leftover rotations, then put q and k of each module in one call."""
    from slothc.passes.matcher import apply_graph

    apply_graph(graph, REPORT_ONLY, report, graph_index)
    merged = pair_q_and_k(graph)
    sites = report.fused.get("rope", [])
    for module in merged:
        marked = 0
        for i, site in enumerate(sites):
            if marked < 2 and site.graph == graph_index and site.module == module and "q and k" not in site.variant:
                sites[i] = dataclasses.replace(site, variant=f"{site.variant}, q and k in one launch")
                marked += 1
