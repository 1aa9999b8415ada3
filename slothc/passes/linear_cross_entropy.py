"""The causal-LM loss: ``lm_head`` linear -> [scale] -> [soft-capping] -> upcast -> cross-entropy.

What transformers' ``ForCausalLMLoss`` leaves in the graph (after normalization)::

    logits = linear(hidden, weight, bias)            # lm_head, tied to the embedding or not
    logits = logits * scale   (or / scale)           # Cohere, Granite ... (optional)
    logits = tanh(logits / cap) * cap                # Gemma 2 final soft-capping (optional)
    loss   = cross_entropy(logits.to(f32).view(-1, V), shift_labels, ignore_index=-100,
                           reduction="mean" | "sum")  [/ num_items_in_batch]

The label shift (pad, slice, view) only builds ``shift_labels``: any integer labels are taken as
they come. The rule is anchored at the ``cross_entropy`` (or at the division that follows a ``sum``
for gradient accumulation) and walks back through the flatten and the upcast to the logits, then
through the optional scale and soft-capping to the ``linear``. What it rewrites to depends on who
else reads the logits:

- ``hidden`` variant: nothing else does (or ``options={"logits": "drop"}`` and only the graph's
  output does): ``slothc::linear_cross_entropy`` computes the loss chunk by chunk from the hidden
  states; the ``[tokens, vocab]`` logits are never built. With ``"drop"`` the returned logits become
  an empty ``(..., 0)`` tensor.
- ``logits`` variant: the model returns its logits (every HF causal LM does) and they are kept:
  ``slothc::cross_entropy`` reads them instead of upcasting them: no fp32 copy, no fp32
  log-softmax, one gradient buffer in the logits' dtype (see ``slothc.kernels.cross_entropy``).
  Also taken when the logits do not come from a recognisable ``linear`` chain.

Near-misses are reported: class weights, legacy ``size_average``/``reduce``, ``reduction="none"``,
probability targets, a class dim that is not the last, and logits of an lm_head that feed a loss
other than cross-entropy (a custom ``loss_function``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

import slothc.kernels.cross_entropy  # noqa: F401  (registers torch.ops.slothc.cross_entropy)
import slothc.kernels.linear_cross_entropy  # noqa: F401  (registers torch.ops.slothc.linear_cross_entropy)
from slothc.passes.matcher import NOT_A_CANDIDATE, Rule, RuleSet
from slothc.passes.meta import propagate, val
from slothc.passes.rms_norm import SUPPORTED_DTYPES, UNSUPPORTED_DEVICE, UNSUPPORTED_DTYPE
from slothc.report import module_path

CLASS_WEIGHTS = "cross_entropy with class weights"
LEGACY_REDUCTION = "cross_entropy with the legacy size_average/reduce arguments"
REDUCTION_NONE = "reduction='none' (a per-token loss)"
PROBABILITY_TARGETS = "targets are not integer class indices"
NOT_2D = "cross_entropy input is not [tokens, classes]"
CONSTANTS = "ignore_index or label_smoothing is not a constant"
SYMBOLIC_VOCAB = "vocab size is symbolic"
CUSTOM_LOSS = "the lm_head logits feed a loss other than cross_entropy"

_TANH = (torch.tanh, torch.Tensor.tanh, F.tanh)
_FLATTEN = (torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.contiguous)
_LOSS_WORDS = ("loss", "log_softmax", "logsumexp", "kl_div", "binary_cross_entropy")


# -- patterns ----------------------------------------------------------------------------------------


def _ce_pattern(x, labels, weight, size_average, ignore_index, reduce, reduction, label_smoothing):
    return F.cross_entropy(x, labels, weight, size_average, ignore_index, reduce, reduction, label_smoothing)


def _ce_divided_pattern(x, labels, weight, size_average, ignore_index, reduce, reduction, label_smoothing, divisor):
    loss = F.cross_entropy(x, labels, weight, size_average, ignore_index, reduce, reduction, label_smoothing)
    return loss / divisor


def _upcast_pattern(x):
    return x.to(torch.float32)


# -- walking the graph -------------------------------------------------------------------------------


@dataclasses.dataclass
class LmHead:
    """``logits = softcap(scale * linear(hidden, weight, bias))``, read off the graph."""

    linear: Node
    hidden: Node
    weight: Node
    bias: Optional[Node]
    scale: float
    softcap: float
    nodes: list  # linear .. logits


def _is_call(node, targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _number(arg) -> bool:
    return isinstance(arg, (int, float)) and not isinstance(arg, bool)


def _split_const(node: Node):
    """``(tensor operand, constant)`` of a binary op with one numeric constant, else None."""
    a, b = node.args if len(node.args) == 2 else (None, None)
    if isinstance(a, Node) and _number(b):
        return a, float(b)
    if node.target is operator.mul and isinstance(b, Node) and _number(a):
        return b, float(a)
    return None


def _softcap(node) -> Optional[tuple[Node, float, list]]:
    """``tanh(x / c) * c`` (or ``c * tanh(x * (1/c))``): ``(x, c, nodes)``."""
    if not _is_call(node, (operator.mul,)):
        return None
    split = _split_const(node)
    if split is None or not _is_call(split[0], _TANH) or split[1] == 0:
        return None
    (tanh, cap) = split
    inner = tanh.args[0]
    if _is_call(inner, (operator.truediv,)) and (s := _split_const(inner)) and math.isclose(s[1], cap, rel_tol=1e-6):
        return s[0], cap, [node, tanh, inner]
    if _is_call(inner, (operator.mul,)) and (s := _split_const(inner)) and math.isclose(s[1] * cap, 1.0, rel_tol=1e-6):
        return s[0], cap, [node, tanh, inner]
    return None


def lm_head(logits: Node) -> Optional[LmHead]:
    """The lm_head chain that ends at ``logits``, or None."""
    nodes, node, softcap, scale = [], logits, 0.0, 1.0
    capped = _softcap(node)
    if capped is not None:
        node, softcap, chain = capped
        nodes += chain
    if _is_call(node, (operator.mul, operator.truediv)) and (s := _split_const(node)) and s[1] != 0:
        scale = s[1] if node.target is operator.mul else 1.0 / s[1]
        nodes.append(node)
        node = s[0]
    if not _is_call(node, (F.linear,)) or len(node.args) != 3:
        return None
    hidden, weight, bias = node.args
    if not isinstance(hidden, Node) or not isinstance(weight, Node) or not (bias is None or isinstance(bias, Node)):
        return None
    nodes.append(node)
    return LmHead(node, hidden, weight, bias, scale, softcap, nodes[::-1])


def _strip(x: Node) -> tuple[Node, list]:
    """Peel the flatten (view/reshape/contiguous) and the fp32 upcast off the CE input: (logits, peeled)."""
    peeled = []
    node = x
    for _ in range(4):
        if _is_call(node, _FLATTEN) and isinstance(node.args[0], Node):
            peeled.append(node)
            node = node.args[0]
        elif _is_call(node, (torch.Tensor.to,)) and len(node.args) == 2 and node.args[1] == torch.float32 and not node.kwargs:
            peeled.append(node)
            node = node.args[0]
        else:
            break
    return node, peeled


def _outside_users(nodes: list, inside: set) -> dict:
    """node -> its users outside ``inside``."""
    return {n: [u for u in n.users if u not in inside] for n in nodes if any(u not in inside for u in n.users)}


# -- checks ------------------------------------------------------------------------------------------


def _ce_check(m) -> str | None:
    if m["weight"] is not None:
        return CLASS_WEIGHTS
    if m["size_average"] is not None or m["reduce"] is not None:
        return LEGACY_REDUCTION
    if "divisor" in m.captures:
        divisor = m.val("divisor")
        if m["reduction"] != "sum" or not isinstance(divisor, torch.Tensor) or divisor.numel() != 1:
            return NOT_A_CANDIDATE  # the plain rule takes the cross_entropy; the division stays
    if m["reduction"] not in ("mean", "sum"):
        return REDUCTION_NONE
    if isinstance(m["ignore_index"], Node) or not isinstance(m["ignore_index"], int):
        return CONSTANTS
    if isinstance(m["label_smoothing"], Node) or not _number(m["label_smoothing"]):
        return CONSTANTS
    x, labels = m.val("x"), m.val("labels")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        return NOT_2D
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dim() != 1:
        return PROBABILITY_TARGETS
    if not isinstance(x.shape[1], int):
        return SYMBOLIC_VOCAB
    logits, peeled = _strip(m["x"])
    logits_val = val(logits)
    if not isinstance(logits_val, torch.Tensor) or logits_val.dtype not in SUPPORTED_DTYPES:
        return UNSUPPORTED_DTYPE
    if logits_val.device.type not in ("cuda", "cpu") or labels.device != logits_val.device:
        return UNSUPPORTED_DEVICE
    if logits_val.shape[-1] != x.shape[1]:
        return NOT_2D
    m.state.update(_plan(m, logits, peeled))
    return None


def _plan(m, logits: Node, peeled: list) -> dict:
    """Which op to use: from the hidden states (logits never built) or from the kept logits."""
    head = lm_head(logits)
    plan = dict(logits=logits, head=None, variant="logits")
    if head is None or not _fusable_head(head, val(logits)):
        return plan
    inside = set(head.nodes) | set(peeled) | set(m.nodes)
    escapes = _outside_users(head.nodes + peeled, inside)
    drop = (
        m.options.logits == "drop"
        and set(escapes) == {logits}
        and all(u.op == "output" for u in escapes[logits])
    )
    if escapes and not drop:
        plan["module"] = module_path(head.linear)
        return plan
    parts = ["hidden states"] + (["logits dropped"] if drop else [])
    parts += [f"scale {head.scale:g}"] if head.scale != 1.0 else []
    parts += [f"softcap {head.softcap:g}"] if head.softcap else []
    return dict(logits=logits, head=head, drop=drop, variant=", ".join(parts), module=module_path(head.linear),
                reads=[head.hidden, head.weight, head.bias])


def _fusable_head(head: LmHead, logits_val) -> bool:
    h, w = val(head.hidden), val(head.weight)
    b = val(head.bias) if head.bias is not None else None
    if not all(isinstance(t, torch.Tensor) for t in (h, w, logits_val)) or (head.bias is not None and not isinstance(b, torch.Tensor)):
        return False
    if w.dim() != 2 or h.shape[-1] != w.shape[1] or (b is not None and tuple(b.shape) != (w.shape[0],)):
        return False
    if not isinstance(h.shape[-1], int) or not isinstance(w.shape[0], int):
        return False
    return all(t.dtype in SUPPORTED_DTYPES for t in (h, w, *( [b] if b is not None else [])))


def _upcast_check(m) -> str | None:
    """Report an lm_head whose upcast logits feed some other loss (a custom ``loss_function``)."""
    if lm_head(m["x"]) is None:
        return NOT_A_CANDIDATE
    consumers, work = [], list(m.root.users)
    while work:
        user = work.pop()
        if _is_call(user, _FLATTEN):
            work.extend(user.users)
        elif user.op == "call_function":
            consumers.append(getattr(user.target, "__name__", str(user.target)))
    losses = sorted({c for c in consumers if any(w in c for w in _LOSS_WORDS)})
    if not losses or "cross_entropy" in losses:
        return NOT_A_CANDIDATE  # not a loss, or a cross_entropy that has its own verdict
    m.state["module"] = module_path(lm_head(m["x"]).linear)
    return f"{CUSTOM_LOSS} ({', '.join(losses)})"


# -- replacements ------------------------------------------------------------------------------------


def _requires_grad(*nodes) -> bool:
    return any(isinstance(v := val(n), torch.Tensor) and v.requires_grad for n in nodes if n is not None)


def _ce_replacement(m, x, labels, weight, size_average, ignore_index, reduce, reduction, label_smoothing, divisor=None):
    plan = m.state
    tracer = labels.tracer
    proxy = lambda node: torch.fx.Proxy(node, tracer) if node is not None else None  # noqa: E731
    head: LmHead | None = plan["head"]
    if head is None:
        logits_node = plan["logits"]
        vocab = val(logits_node).shape[-1]
        logits = proxy(logits_node).reshape(-1, vocab)
        out = torch.ops.slothc.cross_entropy(
            logits, labels, divisor, ignore_index, reduction, float(label_smoothing), _requires_grad(logits_node)
        )
        return out[0]
    dtype = val(head.linear).dtype  # the lm_head's compute dtype: autocast's, or the inputs'
    h_val, w_val = val(head.hidden), val(head.weight)
    hidden = proxy(head.hidden).reshape(-1, h_val.shape[-1])
    w, b = proxy(head.weight), proxy(head.bias)
    if h_val.dtype != dtype:
        hidden = hidden.to(dtype)
    if w_val.dtype != dtype:
        w = w.to(dtype)
    if b is not None and val(head.bias).dtype != dtype:
        b = b.to(dtype)
    compute_dw = _requires_grad(head.weight, head.bias)
    out = torch.ops.slothc.linear_cross_entropy(
        hidden, w, b, labels, None, ignore_index, reduction, float(label_smoothing),
        head.scale, head.softcap, compute_dw or _requires_grad(head.hidden), compute_dw,
    )
    loss = out[0]
    # The op keeps its gradients in fp32, so dividing outside it rounds them once.
    return loss / divisor if divisor is not None else loss


def _ce_finish(m, out_node) -> None:
    """``logits="drop"``: the graph returns an empty ``(..., 0)`` tensor where the logits were."""
    if not m.state.get("drop"):
        return
    logits, head = m.state["logits"], m.state["head"]
    graph = out_node.graph
    output = next(n for n in graph.nodes if n.op == "output")
    before = set(graph.nodes)
    with graph.inserting_before(output):
        none = graph.call_function(operator.getitem, (head.hidden, (Ellipsis, slice(0, 0))))
        empty = graph.call_function(torch.empty_like, (none,), {"dtype": val(logits).dtype})
    propagate([n for n in graph.nodes if n not in before], logits)
    output.replace_input_with(logits, empty)


RULES = RuleSet(
    [
        Rule("linear_cross_entropy", "logits", _ce_divided_pattern, _ce_replacement, _ce_check, _ce_finish),
        Rule("linear_cross_entropy", "logits", _ce_pattern, _ce_replacement, _ce_check, _ce_finish),
        Rule("linear_cross_entropy", "custom loss", _upcast_pattern, None, _upcast_check),
    ]
)
