"""What Dynamo's guard check costs a PEFT model before each compiled step, and which guards it is.

The profiles of workloads (a) and (b) (bench/NOTES.md, 2026-12-03) show the GPU idle 4.7 ms and
12.0 ms a step while the host is in ``TorchDynamo Cache Lookup``: the guards of the compiled
frame, evaluated after the step's loss is read. (Without the profiler the H200's host takes 1.0
and 2.0 ms: bench/results/2026-12-03-h200-guard-cost.log.) This measures that lookup on a Llama of
``--layers`` layers with LoRA on its seven linears (tiny widths: the guards depend on the module
tree, not on the sizes), compiled with the ``eager`` backend (the lookup is the same for any
backend), and counts the guards by type:

    python3 bench/guard_cost.py                                  # every guard kept, and the counts
    python3 bench/guard_cost.py --drop TYPE_MATCH CONSTANT_MATCH # a guard_filter_fn dropping types
    python3 bench/guard_cost.py --unsafe                         # skip_guard_on_all_nn_modules_unsafe
    python3 bench/guard_cost.py --dict-tags on                   # Dynamo's recursive dict-tag fast path
    python3 bench/guard_cost.py --qlora --device cuda            # 4-bit linears (bitsandbytes) on the GPU
    python3 bench/guard_cost.py --between step                   # an eager training step between calls

The timing is the wall time, without the profiler, of a call whose compiled graph is replaced by
its first outputs (the ``constant`` backend below): what is left is Dynamo's own work a call (the
guards, the bytecode around the graph, the outputs' rebuilding). ``--profile`` adds the profiler's
``TorchDynamo Cache Lookup`` events, as the step profiles show them; the profiler slows the lookup
(on this CPU 1.48 ms against 0.67 without it, 16 layers).

Calls back to back understate the check in a training loop (bench/NOTES.md, 2026-12-04): what runs
between two steps evicts the guard tree from the CPU's caches, and the check becomes bound by memory
latency. ``--between`` reproduces that: ``nothing`` (back to back), ``sweep`` (an in-place add over a
256 MiB tensor, which touches no Python object the guards read) or ``step`` (an eager forward,
backward and AdamW step of the same model, as a training loop runs between compiled calls).

Bench only (not a test): dropping guards is unsafe in general; this says where the time goes.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import peft
import torch
from torch.profiler import profile
from transformers import LlamaConfig, LlamaForCausalLM

from slothc.tiny import load_in_4bit

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (default 16, workload (a)'s)")
    ap.add_argument("--drop", nargs="*", default=[], help="guard types that a guard_filter_fn drops")
    ap.add_argument("--unsafe", action="store_true", help="torch.compiler.skip_guard_on_all_nn_modules_unsafe")
    ap.add_argument("--dict-tags", default="default", choices=("default", "on", "off"),
                    help="torch._dynamo.config.use_recursive_dict_tags_for_guards (default: the installed torch's)")
    ap.add_argument("--qlora", action="store_true", help="the linears 4-bit (bitsandbytes NF4, double quant), as in workload (b)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true", help="also the profiler's cache-lookup events (a second compile)")
    ap.add_argument("--calls", type=int, default=10, help="profiled calls after 3 warm-up calls")
    ap.add_argument("--timed-calls", type=int, default=200, help="calls timed without the profiler (median)")
    ap.add_argument("--between", default="nothing", choices=("nothing", "sweep", "step"),
                    help="what runs, untimed, between two timed calls (default nothing: back to back)")
    args = ap.parse_args()
    if args.dict_tags != "default":
        torch._dynamo.config.use_recursive_dict_tags_for_guards = args.dict_tags == "on"
        torch._dynamo.config.max_saved_pointers_for_recursive_dict_tags_check = 1 << 20

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    if args.qlora:  # quantised as from_pretrained quantises (bitsandbytes)
        base = load_in_4bit(LlamaForCausalLM(config).to(torch.bfloat16), compute_dtype=torch.bfloat16, device=args.device)
    else:
        base = LlamaForCausalLM(config).to(args.device)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=LINEARS))
    counts: collections.Counter = collections.Counter()
    drop = set(args.drop)

    def keep(entries):
        counts.update(e.guard_type for e in entries)
        return [e.guard_type not in drop for e in entries]

    guard_filter = torch.compiler.skip_guard_on_all_nn_modules_unsafe if args.unsafe else keep
    ids = torch.randint(0, config.vocab_size, (1, 16), device=args.device)
    label = "unsafe nn-module filter" if args.unsafe else (f"dropping {sorted(drop)}" if drop else "every guard")
    kind = "4-bit linears with LoRA" if args.qlora else "LoRA"
    between = between_calls(args.between, model, ids)
    ms, n_entries = constant_call_ms(model, ids, guard_filter, args.timed_calls, between)
    print(f"{args.layers} layers, {kind} on {len(LINEARS)} linears, {args.device}, {label}, {args.between} between calls: "
          f"{ms:.3f} ms a call of the constant graph, no profiler (median of {args.timed_calls}; {n_entries} cache entries); "
          f"torch {torch.__version__}, "
          f"recursive dict tags {torch._dynamo.config.use_recursive_dict_tags_for_guards}")
    if counts:
        print(f"{sum(counts.values())} guards (over every cache entry):", ", ".join(f"{t} {n}" for t, n in counts.most_common()))
    if args.profile:  # the profiler's view, as the step profiles show it (it is slower under the profiler)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", options={"guard_filter_fn": guard_filter})
        for _ in range(3):
            compiled(input_ids=ids)
        with profile() as prof:
            for _ in range(args.calls):
                compiled(input_ids=ids)
        lookups = [e.cpu_time_total for e in prof.events() if "Cache Lookup" in e.name]
        print(f"under the profiler: Dynamo cache lookup {sum(lookups) / max(len(lookups), 1) / 1000:.2f} ms a call "
              f"({len(lookups)} calls)")


def constant(gm, example_inputs):
    """A compiled graph that runs once and then returns those first outputs (a backend, or an
    AOTAutograd compiler once boxed)."""
    outs = []

    def run(*inputs):
        if not outs:
            outs.append(gm(*inputs))
        return outs[0]

    return run


def between_calls(kind: str, model, ids):
    """What runs, untimed, between two timed calls: None for nothing, else a function of no arguments."""
    if kind == "nothing":
        return None
    if kind == "sweep":  # evicts the CPU's caches without touching a Python object the guards read
        big = torch.zeros(64 << 20, device=ids.device)  # 256 MiB of fp32

        def sweep():
            big.add_(1)

        return sweep
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    def step():  # an eager training step of the same model (outside the compiled frame)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def constant_call_ms(model, ids, guard_filter, calls: int, between=None) -> tuple[float, int]:
    """Median wall time (ms) of a compiled call whose graph returns its first outputs (Dynamo's own
    cost), and the number of cache entries of the model's forward (more than one: a recompile).
    ``between``, if given, runs untimed before each timed call."""
    compiled = torch.compile(model, backend=constant, options={"guard_filter_fn": guard_filter})
    for _ in range(3):
        compiled(input_ids=ids)
    times = []
    for _ in range(calls):
        if between is not None:
            between()
        t0 = time.perf_counter()
        compiled(input_ids=ids)
        times.append(time.perf_counter() - t0)
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    entries = _debug_get_cache_entry_list(type(model).forward.__code__)
    return statistics.median(times) * 1e3, len(entries)


if __name__ == "__main__":
    main()
