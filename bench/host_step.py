"""The host's share of a compiled training step, phase by phase, at tiny widths.

Workload (b)'s profiles leave ~5 ms a step of host time between steps in ``Torch-Compiled Region``
(bench/NOTES.md, 2026-12-03, second session): what runs around the compiled graphs once the guard
check is done. Host cost depends on the module tree and the number of graph inputs, not on the
widths, so this builds workload (a)'s or (b)'s structure (``--layers`` Llama layers, LoRA on the
seven linears; ``--qlora``: bitsandbytes NF4 with double quantisation) at tiny widths, runs the
training step of ``slothc.train_bench`` (bf16 autocast, fused AdamW, the loss read at the end) and
times each phase, the device synchronised before it: ``host`` is the time until the call returns
(its own host work, plus any sync inside it), ``to sync`` until the device is done too. With CUDA
graphs it also times ``before replay``: from the call to the first graph replay, the host work that
the GPU waits for after the previous step's loss is read (the guards, AOTAutograd's and the graph
tree's input handling):

    python3 bench/host_step.py --qlora                         # CPU, the slothc backend
    python3 bench/host_step.py --qlora --device cuda --cudagraphs
    python3 bench/host_step.py --qlora --device cuda --cudagraphs --cprofile 30
    python3 bench/host_step.py --device cuda --cudagraphs --syncs
    python3 bench/host_step.py --qlora --device cuda --cudagraphs --cprofile-forward 20

``--cprofile-forward N`` (with ``--cudagraphs``) profiles only the forward call up to its first
graph replay: the host work the GPU waits for between steps. ``--syncs`` then profiles one step
(torch.profiler) and prints where the host waits on the device inside the step (``aten::item`` and
the other ops that synchronise, with the ops and Python frames around them) and which host ops
launch kernels outside the CUDA graphs' replays.

``--cprofile N`` adds Python's profiler over the forward and backward calls, its top functions by
own time (the profiler slows Python code about twofold; its shares are the point, not its times).
Bench only (not a test).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import time

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slothc.tiny import load_in_4bit
from slothc.train_bench import replay_times

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHASES = ("forward", "backward", "optimizer", "zero_grad", "loss_read")


def build(layers: int, qlora: bool, device: str):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    if qlora:
        base = load_in_4bit(LlamaForCausalLM(config).to(torch.bfloat16), compute_dtype=torch.bfloat16, device=device)
    else:
        base = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=LINEARS, task_type="CAUSAL_LM"))
    for p in model.parameters():  # fp32 adapters, as the HF Trainer keeps them
        if p.requires_grad:
            p.data = p.data.float()
    return model, config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (default 32, workload (b)'s)")
    ap.add_argument("--qlora", action="store_true", help="4-bit linears (bitsandbytes NF4, double quant), as in (b)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cudagraphs", action="store_true", help="slothc with mode='reduce-overhead' (CUDA only)")
    ap.add_argument("--guard-filter", action="store_true", help="skip_guard_on_all_nn_modules_unsafe")
    ap.add_argument("--steps", type=int, default=20, help="timed steps after 3 warm-up steps")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N", help="then N steps under cProfile")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cprofile-forward", type=int, default=0, metavar="N",
                    help="then N steps with cProfile over the forward call up to its first graph replay (with --cudagraphs)")
    ap.add_argument("--syncs", action="store_true", help="then one profiled step: its syncs and its launches outside the graphs")
    args = ap.parse_args()
    from slothc.backend import slothc as backend

    model, config = build(args.layers, args.qlora, args.device)
    model.train()
    options = {"logits": "drop"}
    if args.cudagraphs:
        options["mode"] = "reduce-overhead"
    if args.guard_filter:
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    run = torch.compile(model, backend=backend, options=options)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = torch.device(args.device).type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {}))
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (1, 64), device=args.device)
    sync = torch.cuda.synchronize if fused else (lambda: None)
    n_inputs = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())

    stop_at_replay: list = []

    def stop_profiles():  # --cprofile-forward: the host work before the first replay only
        while stop_at_replay:
            stop_at_replay.pop().disable()

    hooks = contextlib.ExitStack()  # kept to the end of main: the replays stay timed for the whole run
    replays = hooks.enter_context(replay_times(args.cudagraphs, on_replay=stop_profiles))

    def phase(name, fn, times, prof=None):
        sync()
        replays.clear()
        t0 = time.perf_counter()
        prof and prof.enable()
        out = fn()
        prof and prof.disable()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        if times is not None:
            times.setdefault((name, "host"), []).append((t1 - t0) * 1e3)
            times.setdefault((name, "to sync"), []).append((t2 - t0) * 1e3)
            if replays:
                times.setdefault((name, "before replay"), []).append((replays[0] - t0) * 1e3)
        return out

    def step(times=None, prof=None, forward_prof=None):
        if args.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

        def forward():
            if forward_prof is not None:
                stop_at_replay.append(forward_prof)
                forward_prof.enable()
            with autocast:
                out = run(input_ids=ids, labels=ids).loss
            stop_profiles()
            return out

        loss = phase("forward", forward, times, prof)
        phase("backward", loss.backward, times, prof)
        phase("optimizer", opt.step, times)
        phase("zero_grad", lambda: opt.zero_grad(set_to_none=True), times)
        phase("loss_read", lambda: float(loss.detach()), times)

    for _ in range(3):
        step()
    times: dict = {}
    for _ in range(args.steps):
        step(times)
    kind = "4-bit linears with LoRA" if args.qlora else "bf16 linears with LoRA"
    print(f"{args.layers} layers, {kind}, {args.device}, slothc{' with CUDA graphs' if args.cudagraphs else ''}"
          f"{', unsafe guard filter' if args.guard_filter else ''}; torch {torch.__version__}; "
          f"{n_inputs} parameters and buffers, {len(params)} trainable")
    print(f"  ms, median of {args.steps} steps (min)")
    for key in ("host", "to sync", "before replay"):
        cells = []
        for name in PHASES:
            v = times.get((name, key))
            cells.append(f"{name} {statistics.median(v):.3f} ({min(v):.3f})" if v else f"{name} -")
        print(f"  {key:13s} " + ", ".join(cells))
    for n, what, kw in ((args.cprofile, "forward + backward", "prof"),
                        (args.cprofile_forward, "the forward call up to its first graph replay", "forward_prof")):
        if n:
            prof = cProfile.Profile()
            for _ in range(n):
                step(**{kw: prof})
            print_profile(prof, f"cProfile of {what} over {n} steps", args.top)
    if args.syncs:
        syncs_and_launches(step)


def print_profile(prof, title: str, top: int) -> None:
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(top)
        print(f"{title}, by {key}:")
        print(s.getvalue().split("\n", 4)[-1] if key == "tottime" else s.getvalue())


SYNCS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaMemcpyAsync", "cudaMemsetAsync")


def _chain(event, limit: int = 12) -> list:
    names, e = [], event.cpu_parent
    while e is not None:
        names.append(e.name[:110])
        e = e.cpu_parent
    return names[:limit]


def syncs_and_launches(step) -> None:
    """One step under torch.profiler: each kind of sync with the ops around it (innermost first) and
    the Python frames where it was called, then the host ops that launch work outside a graph replay."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        step()
    events = list(prof.events())
    syncs = Counter()
    frames = {}
    for e in events:
        if e.name in SYNCS and not (e.cpu_parent is not None and e.cpu_parent.name in SYNCS):
            key = (e.name, tuple(_chain(e)))
            syncs[key] += 1
            frames.setdefault(key, [f for f in e.stack if "torch/profiler" not in f][:8])
    print(f"syncs in one step: {sum(syncs.values())}")
    for (name, chain), n in syncs.most_common():
        print(f"  {n} x {name} < " + " < ".join(chain))
        for f in frames[(name, chain)]:
            print(f"        {f}")
    launches = Counter()
    for e in events:
        if e.name in LAUNCHES:
            chain = _chain(e, 40)
            if any("cudaGraphLaunch" in c for c in chain):
                continue
            ops = [c for c in chain if c.startswith("aten::") or "::" in c and not c.startswith("##")]
            launches[(e.name, ops[-1] if ops else (chain[0] if chain else "-"))] += 1
    graph_launches = sum(1 for e in events if e.name == "cudaGraphLaunch")
    print(f"graph replays in one step: {graph_launches}; launches outside them: {sum(launches.values())}, by outermost op:")
    for (name, op), n in launches.most_common(30):
        print(f"  {n} x {name} under {op}")


if __name__ == "__main__":
    main()
