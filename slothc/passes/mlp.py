"""MLP: ``act(gate) * up`` rewritten to ``slothc::mlp_act``, then fused with the down projection.

Gated MLPs read ``down(act(gate(x)) * up(x))`` (Llama, Mistral, Qwen2/3, Gemma with GELU tanh, ...)
or, with a fused projection, ``gate, up = gate_up(x).chunk(2, -1); down(up * act(gate))`` (Phi-3).
The activation is matched in the spellings Hugging Face's ``ACT2FN`` produces:

| act | graph (after normalization) |
| --- | --- |
| ``silu`` | ``F.silu(g)`` (``silu``, ``swish``) |
| ``gelu`` | ``F.gelu(g)`` (exact, erf) |
| ``gelu_tanh`` | ``F.gelu(g, approximate="tanh")`` (``gelu_pytorch_tanh``), and ``gelu_new``'s explicit ``0.5 g (1 + tanh(...))`` |
| ``relu`` | ``F.relu(g)`` |
| ``relu2`` | ``F.relu(g) ** 2`` |
| ``quick_gelu`` | ``g * sigmoid(1.702 g)`` |

Each activation's derivative comes from its sympy expression (:mod:`slothc.derive`). After the
LoRA fusion ran, :func:`absorb_down_projections` merges each ``slothc::mlp_act`` whose only user is
the down projection (a ``slothc::lora_linear`` with one projection, or a plain frozen linear) into
one ``slothc::mlp`` (a ``slothc::qlora_linear`` one into ``slothc::qlora_mlp``): the intermediate
``h`` is then never kept for the backward.

Skipped with the reason: gate and up of different dtypes; unsupported dtypes. Sites where gate and
up differ in shape (a broadcast product, not an MLP) are not candidates.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

import slothc.kernels.mlp  # noqa: F401  (registers torch.ops.slothc.mlp, mlp_act)
from slothc.passes.matcher import NOT_A_CANDIDATE, Rule, RuleSet
from slothc.passes.meta import propagate, val
from slothc.report import Report, module_path

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

DTYPE_MISMATCH = "gate and up have different dtypes"
UNSUPPORTED_DTYPE = "dtype is not fp32, bf16 or fp16"
UNSUPPORTED_DEVICE = "input is not on a CUDA or CPU device"

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# -- patterns ----------------------------------------------------------------------------------------


def _mlp_silu_pattern(g, u):
    return F.silu(g) * u


def _mlp_gelu_pattern(g, u):
    return F.gelu(g) * u


def _mlp_gelu_tanh_pattern(g, u):
    return F.gelu(g, approximate="tanh") * u


def _mlp_gelu_new_pattern(g, u):
    return 0.5 * g * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * torch.pow(g, 3.0)))) * u


def _mlp_relu_pattern(g, u):
    return F.relu(g) * u


def _mlp_relu2_pattern(g, u):
    return torch.pow(F.relu(g), 2) * u


def _mlp_quick_gelu_pattern(g, u):
    return g * torch.sigmoid(1.702 * g) * u


# -- check and replacement ---------------------------------------------------------------------------


def _mlp_check(m) -> str | None:
    g, u = m.val("g"), m.val("u")
    if not isinstance(g, torch.Tensor) or not isinstance(u, torch.Tensor) or g.shape != u.shape or g.dim() < 1:
        return NOT_A_CANDIDATE
    if g.dtype != u.dtype:
        return DTYPE_MISMATCH
    if g.dtype not in SUPPORTED_DTYPES:
        return UNSUPPORTED_DTYPE
    if g.device.type not in ("cuda", "cpu"):
        return UNSUPPORTED_DEVICE
    return None


def _replacement(act: str):
    def replacement(m, g, u):
        return torch.ops.slothc.mlp_act.default(g, u, act)

    replacement.__name__ = f"_mlp_{act}_replacement"
    return replacement


RULES = RuleSet(
    [
        Rule("mlp", "silu", _mlp_silu_pattern, _replacement("silu"), _mlp_check),
        Rule("mlp", "gelu", _mlp_gelu_pattern, _replacement("gelu"), _mlp_check),
        Rule("mlp", "gelu_tanh", _mlp_gelu_tanh_pattern, _replacement("gelu_tanh"), _mlp_check),
        Rule("mlp", "gelu_tanh", _mlp_gelu_new_pattern, _replacement("gelu_tanh"), _mlp_check),
        Rule("mlp", "relu2", _mlp_relu2_pattern, _replacement("relu2"), _mlp_check),
        Rule("mlp", "relu", _mlp_relu_pattern, _replacement("relu"), _mlp_check),
        Rule("mlp", "quick_gelu", _mlp_quick_gelu_pattern, _replacement("quick_gelu"), _mlp_check),
    ]
)


# -- the down projection -----------------------------------------------------------------------------

_ACT_OPS = (torch.ops.slothc.mlp_act.default, torch.ops.slothc.mlp_act)
_LORA_OPS = (torch.ops.slothc.lora_linear.default, torch.ops.slothc.lora_linear)
_MLP_OP = torch.ops.slothc.mlp.default
_QLORA_OPS = (torch.ops.slothc.qlora_linear.default, torch.ops.slothc.qlora_linear)
_QLORA_MLP_OP = torch.ops.slothc.qlora_mlp.default
_LINEAR = torch._C._nn.linear


def _frozen(node) -> bool:
    v = val(node)
    return node is None or (isinstance(v, torch.Tensor) and not v.requires_grad)


def absorb_down_projections(graph: Graph, report: Report, graph_index: int = 0) -> int:
    """Merge each ``slothc::mlp_act`` whose only user is its down projection into ``slothc::mlp``.

    The down projection is a ``slothc::lora_linear`` with one projection, a ``slothc::qlora_linear``
    with one (a 4-bit down projection: ``slothc::qlora_mlp``), or a plain ``linear`` with a frozen
    weight and bias. The ``mlp`` sites of the report get ``+ down`` in their variant.
    Returns the number of merged sites.
    """
    merged = []
    for act_node in list(graph.nodes):
        if act_node.op != "call_function" or act_node.target not in _ACT_OPS or len(act_node.users) != 1:
            continue
        (down,) = act_node.users
        g, u, act = act_node.args
        op = _MLP_OP
        if (
            down.op == "call_function" and down.target in _QLORA_OPS and len(down.args) == 19 and down.args[17] is None  # no dropout
            and down.args[0] is act_node and len(down.args[1]) == 1
        ):
            (_, packed, absmax, a8, code, offset, shapes, blocksize, quant_type, (b,), lora_a, lora_b, scaling, _, base, lora, out, _,
             nested_blocksize) = down.args
            op = _QLORA_MLP_OP
            new_args = (g, u, act, list(packed), list(absmax), list(a8), list(code), list(offset), list(shapes), blocksize, quant_type,
                        b, list(lora_a), list(lora_b), list(scaling), base, lora, out, nested_blocksize)
            outputs = {user: user.args[1] for user in down.users if user.target is operator.getitem}
            if set(outputs.values()) - {0, 1} or len(outputs) != len(down.users):
                continue
        elif (
            down.op == "call_function" and down.target in _LORA_OPS and len(down.args) == 10  # no separate xa (dropout)
            and down.args[0] is act_node and len(down.args[1]) == 1
        ):
            _, (w,), (b,), lora_a, lora_b, scaling, _, base, lora, out = down.args
            new_args = (g, u, act, w, b, list(lora_a), list(lora_b), list(scaling), base, lora, out)
            outputs = {user: user.args[1] for user in down.users if user.target is operator.getitem}
            if set(outputs.values()) - {0, 1} or len(outputs) != len(down.users):
                continue
        elif down.op == "call_function" and down.target is _LINEAR and down.args[0] is act_node and _frozen(down.args[1]) and _frozen(down.args[2]):
            w, b = down.args[1], down.args[2]
            if not isinstance(val(down), torch.Tensor):
                continue
            dtype = val(down).dtype
            new_args = (g, u, act, w, b, [], [], [], dtype, dtype, dtype)
            outputs = None
        else:
            continue
        with graph.inserting_before(down):
            node = graph.call_function(op, new_args)
            y = graph.call_function(operator.getitem, (node, 0))
        if not propagate([node, y], down):
            graph.erase_node(y)
            graph.erase_node(node)
            continue
        if outputs is None:
            down.replace_all_uses_with(y)
        else:
            for user, index in outputs.items():
                if index == 0:
                    user.replace_all_uses_with(y)
            for user in list(down.users):
                if not user.users:
                    graph.erase_node(user)
        if not down.users:
            graph.erase_node(down)
        if not act_node.users:
            graph.erase_node(act_node)
        merged.append(module_path(act_node))
    if merged:
        _mark_sites(report, graph_index, merged)
    return len(merged)


def finish_graph(graph: Graph, report: Report, graph_index: int = 0) -> None:
    absorb_down_projections(graph, report, graph_index)


def _mark_sites(report: Report, graph_index: int, modules: list) -> None:
    remaining = list(modules)
    sites = report.fused.get("mlp", [])
    for i, site in enumerate(sites):
        if site.graph == graph_index and site.module in remaining and "+ down" not in site.variant:
            remaining.remove(site.module)
            sites[i] = dataclasses.replace(site, variant=f"{site.variant} + down")
