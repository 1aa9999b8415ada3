"""What a compiled step's graph inputs cost the host, outside the kernels: workload (b)'s 4-bit state.

A QLoRA model hands its compiled graph five tensors a 4-bit linear (the packed codes, absmax, the
8-bit absmax, its code book and offset): 1120 of the ~1637 inputs of a Llama-3.1-8B-shaped model,
and all of them saved for the backward. This measures, on (b)'s structure at tiny widths
(``--layers`` Llama layers with LoRA on the seven linears, bitsandbytes NF4 with double quant),
the host time of one training step's forward and backward calls when the compiled forward and
backward graphs do no work: each returns the outputs it computed on its first call. What is left
is Dynamo's call, AOTAutograd's runtime wrappers, the saved tensors and the autograd engine.

Two graphs are compared:
- ``inputs``: slothc's passes, the 4-bit state as graph inputs (what slothc compiles today);
- ``no state inputs``: the same, with every input read only as 4-bit state by a QLoRA op replaced
  inside the graph by a new tensor of its shape (so AOTAutograd never sees it as an input) and
  dropped from each call's arguments. That is the input count a slothc whose ops took the 4-bit
  state by a handle would compile (not built: bench/NOTES.md, 2026-12-03 third session); its
  values are wrong, which does not matter here, as the graphs do no work after their first call.

    python3 bench/input_cost.py              # CPU; the host work is the same Python on a GPU host
    python3 bench/input_cost.py --device cuda

Without CUDA graphs: their tree's own per-input work (static-input checks, the copies of inputs that
are not parameters) comes on top on the GPU. Bench only (not a test).
"""

from __future__ import annotations

import argparse
import operator
import statistics
import sys
import time

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

sys.path[:0] = ["bench"]
from guard_cost import constant  # noqa: E402
from host_step import build  # noqa: E402

import slothc  # noqa: E402
from slothc import passes  # noqa: E402
from slothc.options import Options  # noqa: E402

STATE_ARGS = {"qlora_linear": (1, 2, 3, 4, 5), "qlora_mlp": (3, 4, 5, 6, 7)}


def _state_only(node) -> bool:
    """Whether every use of ``node`` is in a 4-bit state list of a slothc QLoRA op."""
    if not node.users:
        return False
    for user in node.users:
        if user.op != "call_function" or getattr(user.target, "namespace", None) != "slothc":
            return False
        positions = STATE_ARGS.get(user.target._opname)
        if positions is None:
            return False
        if not any(node in user.args[i] for i in positions):
            return False
        if any(node is a or (isinstance(a, (list, tuple)) and node in a) for i, a in enumerate(user.args) if i not in positions):
            return False
    return True


def _constant(gm, example_inputs):
    return make_boxed_func(constant(gm, example_inputs))


def _backend(drop_state: bool, counts: dict):
    constant_aot = aot_autograd(fw_compiler=_constant, bw_compiler=_constant)
    opts = Options.from_dict({"logits": "drop"})

    def backend(gm, example_inputs):
        passes.run(gm, opts, slothc.Report())
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        dropped = []
        if drop_state:
            for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
                if isinstance(value, torch.Tensor) and not value.requires_grad and _state_only(node):
                    with gm.graph.inserting_before(node):
                        fresh = gm.graph.call_function(torch.empty, (tuple(value.shape),),
                                                       {"dtype": value.dtype, "device": value.device})
                    fresh.meta.update(node.meta)
                    node.replace_all_uses_with(fresh)
                    gm.graph.erase_node(node)
                    dropped.append(i)
            gm.recompile()
        kept = [i for i in range(len(example_inputs)) if i not in set(dropped)]
        counts.update(inputs=len(kept), dropped=len(dropped))
        compiled = constant_aot(gm, [example_inputs[i] for i in kept])
        if not dropped:
            return compiled
        pick = operator.itemgetter(*kept)

        def call(*args):
            # Dynamo builds each call's arguments from the graph's placeholders as they are after the
            # backend ran (torch 2.13): the dropped ones are already gone then. Otherwise drop them here.
            return compiled(*(pick(args) if len(args) == len(example_inputs) else args))

        return call

    return backend


def step_ms(layers: int, device: str, drop_state: bool, steps: int, guard_filter: bool = False) -> tuple[float, float, dict]:
    """Median host ms of the forward call and of the backward call, and the input counts."""
    model, config = build(layers, True, device)
    model.train()
    counts: dict = {}
    torch._dynamo.reset()
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe} if guard_filter else None
    run = torch.compile(model, backend=_backend(drop_state, counts), options=options)
    ids = torch.randint(0, config.vocab_size, (1, 16), device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(times=None):
        t0 = time.perf_counter()
        with autocast:
            loss = run(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        for p in params:
            p.grad = None
        if times is not None:
            times.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3))

    for _ in range(3):
        step()
    times: list = []
    for _ in range(steps):
        step(times)
    return statistics.median(f for f, _ in times), statistics.median(b for _, b in times), counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guard-filter", action="store_true", help="also with skip_guard_on_all_nn_modules_unsafe")
    args = ap.parse_args()
    for drop, guard_filter in [(False, False), (True, False)] + ([(False, True), (True, True)] if args.guard_filter else []):
        fwd, bwd, counts = step_ms(args.layers, args.device, drop, args.steps, guard_filter)
        label = ("no state inputs" if drop else "inputs") + (", unsafe guard filter" if guard_filter else "")
        print(f"{args.layers} layers, 4-bit with LoRA, {args.device}, 4-bit state as {label}: forward {fwd:.2f} ms, backward "
              f"{bwd:.2f} ms of graphs that do no work (medians of {args.steps}); {counts['inputs']} graph inputs"
              f"{', ' + str(counts['dropped']) + ' dropped' if drop else ''}; torch {torch.__version__}", flush=True)


if __name__ == "__main__":
    main()
