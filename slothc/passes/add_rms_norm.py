"""The residual add before an RMSNorm, fused on AOTAutograd's forward and backward graphs.

A decoder layer ends each block with ``s = residual + block(...)`` and normalises ``s`` for the next
block, keeping ``s`` for the next residual add. After the ``rms_norm`` fusion the graph holds
``add -> slothc::rms_norm``; in the backward, autograd sums the gradient of ``s``'s other uses with
the norm's dx (``slothc::rms_norm_backward -> add``). Each pair is one memory pass too many: the add
writes ``s`` for the norm to read back, and the backward's add reads the norm's dx back.

This fusion rewrites the pairs into ``slothc::add_rms_norm`` (reads x and the residual, writes s and
y) and ``slothc::add_rms_norm_backward`` (adds the other gradient before its store). Both compute
eager's values bit for bit (the same roundings; ``tests/kernels/test_rms_norm.py``).

Why after AOTAutograd, on Inductor's post-grad graphs, and not with the other fusions: the norm's
output is recomputed in the backward (``recompute_norms``) from its saved input ``s``. A fused op
with two outputs, tagged for recomputation, would be recomputed from its own inputs, x and the
residual, which is the previous fused op's ``s``: the partitioner would recompute the whole
residual stream and keep every block's output instead. After partitioning, the forward and backward
graphs are fixed and the rewrite changes no saved tensor. So it runs only with ``inner="inductor"``
(``post_grad_custom_post_pass``).

The report's sites are found on the Dynamo graph, before AOTAutograd (an ``add`` of two tensors of
one shape feeding a fused ``rms_norm``); the post-grad pass counts what it rewrites and says so in
a note where that differs. Inductor's FX graph cache keys on this file's hash: a cached graph was
rewritten by this same pass when it was first compiled.
"""

from __future__ import annotations

import operator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph, Node

import slothc.kernels.rms_norm  # noqa: F401  (registers the ops)
from slothc.passes.meta import val
from slothc.report import Site, Skip, module_path

NAME = "add_rms_norm"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

NOT_INDUCTOR = "rewrites Inductor's post-grad graphs"
BROADCAST = "the residual add broadcasts (its inputs differ in shape)"
NOT_TENSORS = "the residual add has a non-tensor operand"
OTHER_DTYPE = "the residual add's operands are not fp32, bf16 or fp16"

BOTH = "forward and backward"
FORWARD_ONLY = "forward (the sum has no other use, so no gradient sum to fuse)"


def _calls(node: Node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


_RMS_NORM = (torch.ops.slothc.rms_norm.default, torch.ops.slothc.rms_norm)
_RMS_NORM_BACKWARD = (torch.ops.slothc.rms_norm_backward.default,)
_ATEN_ADD = (torch.ops.aten.add.Tensor,)


# --------------------------------------------------------------------------------------------
# Before AOTAutograd: the sites, for the report
# --------------------------------------------------------------------------------------------


def _operand_reason(add: Node) -> str | None:
    if len(add.args) != 2 or add.kwargs:
        return NOT_TENSORS
    a, b = (val(arg) if isinstance(arg, Node) else arg for arg in add.args)
    out = val(add)
    if not all(isinstance(t, torch.Tensor) for t in (a, b, out)):
        return NOT_TENSORS
    if a.shape != b.shape or a.shape != out.shape:
        return BROADCAST
    if a.dtype not in SUPPORTED_DTYPES or b.dtype not in SUPPORTED_DTYPES:
        return OTHER_DTYPE
    return None


def find_sites(graph: Graph, report, graph_index: int, inner: str) -> int:
    """Record each ``add -> slothc.rms_norm`` of the (normalized, fused) Dynamo graph as a site, or
    as a skip with why; returns the number of sites. With another inner compiler than Inductor,
    one note for the graph instead (the fusion does not run there)."""
    sites = 0
    left = 0
    for norm in graph.nodes:
        if not _calls(norm, _RMS_NORM):
            continue
        add = norm.args[0]
        if not (isinstance(add, Node) and add.op == "call_function" and add.target in (operator.add, torch.add)):
            continue
        reason = _operand_reason(add)
        if reason is not None:
            report.add_skip(Skip(NAME, module_path(norm), reason, node=add.name, graph=graph_index))
            continue
        if inner != "inductor":
            left += 1
            continue
        other_uses = [u for u in add.users if u is not norm and u.op != "output"]
        report.add_site(Site(NAME, module_path(norm), add.name, graph_index, BOTH if other_uses else FORWARD_ONLY))
        sites += 1
    if left:
        report.notes.append(f"graph {graph_index}: {NAME} not applied with inner={inner!r}: it {NOT_INDUCTOR}; "
                            f"{left} residual adds before a fused norm are left to {inner}")
    return sites


# --------------------------------------------------------------------------------------------
# After AOTAutograd: the rewrites
# --------------------------------------------------------------------------------------------


def _meta(node: Node) -> dict:
    """A node's metadata without what describes its own call (its value, and the eager input
    values Inductor constrains a custom op's layouts to, which the new op does not share)."""
    return {k: v for k, v in node.meta.items() if k not in ("val", "eager_input_vals")}


def _same_layout(node: Node, like: torch.Tensor) -> bool:
    t = val(node) if isinstance(node, Node) else None
    return isinstance(t, torch.Tensor) and t.shape == like.shape and t.dtype == like.dtype


def fuse_forward(graph: Graph) -> int:
    """``s = aten.add(x, r); y = slothc.rms_norm(s, ...)`` -> ``s, y = slothc.add_rms_norm(x, r, ...)``."""
    fused = 0
    for norm in list(graph.nodes):
        if not _calls(norm, _RMS_NORM):
            continue
        add = norm.args[0]
        if not (isinstance(add, Node) and _calls(add, _ATEN_ADD)) or len(add.args) != 2 or add.kwargs:
            continue
        x, r = add.args
        s_val, y_val = val(add), val(norm)
        if not (isinstance(x, Node) and isinstance(r, Node) and isinstance(s_val, torch.Tensor)):
            continue
        xv, rv = val(x), val(r)
        if not (isinstance(xv, torch.Tensor) and isinstance(rv, torch.Tensor)) or xv.shape != s_val.shape \
                or rv.shape != s_val.shape or not s_val.is_contiguous():
            continue
        if xv.dtype not in SUPPORTED_DTYPES or rv.dtype not in SUPPORTED_DTYPES:
            continue
        with graph.inserting_before(add):
            op = graph.call_function(torch.ops.slothc.add_rms_norm.default, (x, r, *norm.args[1:]))
            s = graph.call_function(operator.getitem, (op, 0))
            y = graph.call_function(operator.getitem, (op, 1))
        op.meta.update(_meta(norm))
        op.meta["val"] = (s_val, y_val)
        s.meta.update(_meta(add))
        s.meta["val"] = s_val
        y.meta.update(_meta(norm))
        y.meta["val"] = y_val
        norm.replace_all_uses_with(y)
        graph.erase_node(norm)
        add.replace_all_uses_with(s)
        graph.erase_node(add)
        fused += 1
    return fused


def fuse_backward(graph: Graph) -> int:
    """``dx = slothc.rms_norm_backward(dy, s, ...)[0]; ds = aten.add(dx, g)`` (dx used only there)
    -> ``ds, dw = slothc.add_rms_norm_backward(dy, g, s, ...)``."""
    fused = 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    for bwd in list(graph.nodes):
        if not _calls(bwd, _RMS_NORM_BACKWARD):
            continue
        items = {u.args[1]: u for u in bwd.users if u.op == "call_function" and u.target is operator.getitem}
        dx = items.get(0)
        if dx is None or len(bwd.users) != len(items) or len(dx.users) != 1:
            continue
        (add,) = dx.users
        if not _calls(add, _ATEN_ADD) or len(add.args) != 2 or add.kwargs:
            continue
        other = add.args[1] if add.args[0] is dx else add.args[0]
        dx_val = val(dx)
        if other is dx or not isinstance(dx_val, torch.Tensor) or not _same_layout(other, dx_val) \
                or not _same_layout(add, dx_val) or not val(add).is_contiguous():
            continue
        dw = items.get(1)
        if dw is not None and any(order[u] < order[add] for u in dw.users):
            continue  # the norm weight's gradient is read before the sum: the fused op cannot come first
        grad_out, s_in, weight, *rest = bwd.args
        with graph.inserting_before(add):
            op = graph.call_function(torch.ops.slothc.add_rms_norm_backward.default, (grad_out, other, s_in, weight, *rest))
            ds = graph.call_function(operator.getitem, (op, 0))
            dw_new = graph.call_function(operator.getitem, (op, 1))
        op.meta.update(_meta(bwd))
        op.meta["val"] = (val(add), val(dw) if dw is not None else val(bwd)[1])
        ds.meta.update(_meta(add))
        ds.meta["val"] = val(add)
        if dw is not None:
            dw_new.meta.update(dw.meta)
        add.replace_all_uses_with(ds)
        graph.erase_node(add)
        graph.erase_node(dx)
        if dw is not None:
            dw.replace_all_uses_with(dw_new)
            graph.erase_node(dw)
        else:
            graph.erase_node(dw_new)
        graph.erase_node(bwd)
        fused += 1
    return fused


class PostGradPass(CustomGraphPass):
    """Inductor's ``post_grad_custom_post_pass`` for one compiled graph: rewrites its forward and
    backward, and checks the counts against the sites found before AOTAutograd. ``then``: a pass
    the user had configured, run after this one."""

    def __init__(self, report, graph_index: int, sites: int, backward_sites: int, then=None):
        self.report, self.graph_index = report, graph_index
        self.sites, self.backward_sites = sites, backward_sites
        self.then = then
        self.counts = []  # (forward rewrites, backward rewrites) of each graph this pass ran on

    def __call__(self, graph: Graph) -> None:
        # The backward graph is the one with norm backwards (its recomputed norms read saved inputs,
        # never an add); any other is the forward (or an inference graph).
        backward_graph = any(_calls(n, _RMS_NORM_BACKWARD) for n in graph.nodes)
        forward, backward = fuse_forward(graph), fuse_backward(graph)
        if forward or backward:
            graph.lint()
        self.counts.append((forward, backward))
        if backward_graph and backward != self.backward_sites:
            self._note(self._count_text(backward, self.backward_sites, "gradient sums", "backward"))
        if not backward_graph and forward != self.sites:
            self._note(self._count_text(forward, self.sites, "residual adds", "forward"))
        if self.then is not None:
            self.then(graph)

    @staticmethod
    def _count_text(done: int, sites: int, what: str, graph: str) -> str:
        if done > sites:  # an add in one checkpointed layer, its norm in the next: one graph once inlined
            return (f"{done} {what} fused in the {graph} graph, {sites} of them reported as sites: the others "
                    f"crossed the boundary of a nested graph (a checkpointed layer) until AOTAutograd inlined it")
        return f"{done} of the {sites} {what} fused in the {graph} graph"

    def _note(self, text: str) -> None:
        note = f"graph {self.graph_index}: {NAME}: {text} (the report's sites were found before AOTAutograd)"
        if note not in self.report.notes:
            self.report.notes.append(note)

    def uuid(self):
        import slothc.kernels.rms_norm as kernels

        own = get_hash_for_files((__file__, kernels.__file__))
        then = self.then.uuid() if self.then is not None and hasattr(self.then, "uuid") else None
        return own if self.then is None else (own, then)


def post_grad_patches(gm: torch.fx.GraphModule, report, graph_index: int, opts) -> dict:
    """The Inductor config patch that runs :class:`PostGradPass` on this graph's forward and
    backward, after recording the sites in ``report``; ``{}`` when there is nothing to fuse."""
    before = report.count(NAME)
    from slothc.passes.meta import graphs

    # nested graphs too (checkpointed layers): AOTAutograd inlines them, so the rewrite sees them
    sites = sum(find_sites(graph, report, graph_index, opts.inner) for graph in graphs(gm))
    if not sites:
        return {}
    backward_sites = sum(1 for s in report.fused[NAME][before:] if s.variant == BOTH)
    import torch._inductor.config

    then = torch._inductor.config.post_grad_custom_post_pass
    return {"post_grad_custom_post_pass": PostGradPass(report, graph_index, sites, backward_sites, then=then)}
