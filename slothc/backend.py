"""The ``slothc`` torch.compile backend.

``torch.compile(model, backend="slothc", options={...}, mode=...)`` finds this function through
the ``torch_dynamo_backends`` entry point (``mode``: Inductor's, e.g. ``"reduce-overhead"`` for
CUDA graphs; see :mod:`slothc.options`). For each FX graph Dynamo captures it runs

    normalize -> fusion passes -> report -> inner compiler (Inductor by default)

The passes rewrite the torch-level graph *before* autograd, so AOTAutograd builds the backward from
the slothc ops' registered backward formulas.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from slothc.options import Options
from slothc.report import Report, emit

def slothc(gm: torch.fx.GraphModule, example_inputs: list, options: Mapping[str, Any] | None = None, mode: str | None = None):
    """Dynamo backend entry point: rewrite ``gm`` and hand it to the inner compiler. ``mode`` is
    what ``torch.compile(..., mode=...)`` passes (the same as the ``"mode"`` option)."""
    opts = Options.from_dict(_with_mode(options, mode))
    report = opts.collect if opts.collect is not None else Report()
    compiled = compile_graph(gm, example_inputs, opts, report)
    if opts.report:
        emit(report)
    return compiled


def compile_graph(gm: torch.fx.GraphModule, example_inputs: list, opts: Options, report: Report):
    """Rewrite one graph in place, record what was done in ``report``, return the compiled callable."""
    from slothc import passes

    passes.run(gm, opts, report, graph_index=report.graphs)
    patches = {}
    if "add_rms_norm" in opts.enabled and "rms_norm" in opts.enabled:
        from slothc.passes.add_rms_norm import post_grad_patches

        patches = post_grad_patches(gm, report, report.graphs, opts)
    report.graphs += 1
    report.compiles.append(_compile_id())
    if _inside_ddp():
        if DDP_PIECES not in report.notes:
            report.notes.append(DDP_PIECES)
    elif report.graphs > 1:
        _note_graph_breaks(report)
    if opts.mode != "default":
        import torch._inductor

        mode_patches = torch._inductor.list_mode_options(opts.mode)
        note = f"mode {opts.mode}: Inductor options {mode_patches}"
        if mode_patches.get("triton.cudagraphs"):
            note += " (CUDA graphs: Inductor skips them for a graph that cannot be recorded and says why in the perf_hints log)"
        if note not in report.notes:
            report.notes.append(note)
        patches = {**mode_patches, **patches}
    if opts.inner == "inductor":
        register_inductor_fallbacks()
    if patches:
        return _inner(opts.inner)(gm, example_inputs, config_patches=patches)
    return _inner(opts.inner)(gm, example_inputs)


def register_inductor_fallbacks() -> int:
    """Register every ``slothc::`` op with Inductor as a fallback kernel (a call of the op), as
    Inductor does on first meeting an op it has no lowering for, with the same layout constraint;
    returns how many were new. Done ahead because torch 2.11's implicit fallback formats its info
    log eagerly: it prints the IR of the op's arguments, and for an op first met deep in a graph
    (``slothc::add_rms_norm`` after layer 0's attention) that string took minutes on the H200
    (torch 2.13 formats it lazily)."""
    try:
        from torch._inductor import lowering
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:  # another torch: Inductor's own implicit fallback
        return 0
    new = 0
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("slothc::"):
            continue
        packet = getattr(torch.ops.slothc, name.split("::", 1)[1].split(".", 1)[0])
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if op in lowering.lowerings:
                continue
            constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
            lowering.make_fallback(op, layout_constraint=constraint, warn=False)
            new += 1
    return new


DDP_PIECES = (
    "compiled inside DistributedDataParallel: Dynamo's DDPOptimizer hands slothc the model in pieces, split at "
    "DDP's gradient buckets (bucket_cap_mb), so that each bucket's all-reduce overlaps the backward of the next; "
    "a pattern cut by a split is not fused (fewer, larger buckets cut fewer)"
)


GRAPH_BREAKS = "graphs: Dynamo split the model at graph breaks"
RECOMPILES = "Dynamo compiled a piece again"


def _compile_id():
    """Dynamo's (frame id, compile of that frame) of the graph being compiled, or None outside Dynamo."""
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:  # noqa: BLE001  (an older torch: no ids, every graph counts as a piece)
        return None
    if cid is None or getattr(cid, "frame_id", None) is None:
        return None
    return (cid.frame_id, cid.frame_compile_id)


def _note_graph_breaks(report: Report) -> None:
    """The report says that code between the graphs runs eagerly (neither fused nor reported), and
    why Dynamo broke there, as far as its counters tell (they count for the whole process); graphs
    that are a second compile of one frame (new input shapes, e.g. the dynamic-size graph after a
    second sequence length) are recompiles, not breaks, and the note says so."""
    known = [c for c in report.compiles if c is not None]
    unknown = len(report.compiles) - len(known)
    pieces = len({frame for frame, _ in known}) + unknown
    recompiles = report.graphs - pieces
    notes = [n for n in report.notes if GRAPH_BREAKS not in n and RECOMPILES not in n]
    if pieces > 1:
        reasons = torch._dynamo.utils.counters.get("graph_break", {})
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        why = "; ".join(f"{' '.join(str(r).split())[:160]} (x{n})" for r, n in top)
        notes.append(f"{pieces} {GRAPH_BREAKS}: the code between the graphs runs eagerly, neither fused nor reported here"
                     + (f". Breaks Dynamo recorded in this process: {why}" if why else "") + " (TORCH_LOGS=graph_breaks shows where)")
    if recompiles > 0:
        notes.append(f"{recompiles} of the {report.graphs} graphs: {RECOMPILES} (new input sizes, e.g. the dynamic-size graph "
                     "after a second sequence length, or another failed guard; TORCH_LOGS=recompiles shows why); each graph is "
                     "fused and reported on its own")
    report.notes[:] = notes


def _inside_ddp() -> bool:
    """Whether the graph being compiled is one of DDPOptimizer's pieces (a DDP forward is being traced)."""
    if not torch.distributed.is_available() or torch._dynamo.utils.get_optimize_ddp_mode() != "ddp_optimizer":
        return False
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module() is not None


def _with_mode(options, mode):
    if mode is None:
        return options
    if isinstance(options, Options):
        raise ValueError("slothc: an Options instance carries its own mode; give mode to torch.compile only with a dict of options")
    merged = dict(options or {})
    if merged.get("mode", mode) != mode:
        raise ValueError(f"slothc: mode {mode!r} given to torch.compile and mode {merged['mode']!r} in the options; give one")
    merged["mode"] = mode
    return merged


@functools.lru_cache(None)
def _inner(name: str):
    from torch._dynamo import lookup_backend

    return lookup_backend(name)


def explain(model, *args, options: Mapping[str, Any] | None = None, **kwargs) -> Report:
    """Compile ``model`` with slothc, run it once on ``(*args, **kwargs)`` and return the fusion report.

    When the output carries a loss (``output.loss`` or a scalar tensor that requires grad) the
    backward runs too, so the backward ops are exercised; the model's ``.grad`` fields are restored
    afterwards. ``options`` are the backend options; the inner compiler defaults to ``"eager"``
    here because only the report is wanted. Dynamo's caches are reset before and after.
    """
    opts = dict(options or {})
    opts.setdefault("inner", "eager")
    parsed = Options.from_dict(opts)
    report = Report()

    def backend(gm, example_inputs):
        return compile_graph(gm, example_inputs, parsed, report)

    saved = {p: p.grad for p in model.parameters() if p.requires_grad} if isinstance(model, torch.nn.Module) else {}
    torch._dynamo.reset()
    try:
        out = torch.compile(model, backend=backend)(*args, **kwargs)
        loss = _find_loss(out)
        if loss is not None:
            loss.backward()
    finally:
        for p, g in saved.items():
            p.grad = g
        torch._dynamo.reset()
    return report


def _find_loss(out):
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, (tuple, list)) and out:
        loss = out[0]
    if loss is None and isinstance(out, torch.Tensor):
        loss = out
    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad:
        return loss
    return None
