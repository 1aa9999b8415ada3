"""The residual add and the RMSNorm after it, fused (slothc::add_rms_norm) against the two ops apart.

    python3 bench/bench_add_rms_norm.py --out results.jsonl      # GPU: (a)'s and (b)'s shapes, bf16

What the ``add_rms_norm`` fusion replaces in a decoder layer, timed per call (by default from replays
of a CUDA graph of 20 calls, as a training step runs them: at 32 MiB tensors one call's host time
exceeds its GPU time, so ``--timer do_bench`` measures the host), on ``[rows, hidden]`` bf16 tensors with Llama's norm and a frozen
weight (LoRA):

- ``fwd``: ``s = x + r; y = slothc::rms_norm(s)`` (torch's add, then the norm kernel) against
  ``s, y = slothc::add_rms_norm(x, r)``;
- ``bwd``: ``ds = slothc::rms_norm_backward(dy, s)[0] + g`` against
  ``slothc::add_rms_norm_backward(dy, g, s)``.

Bytes model (the fused op's own traffic, each tensor once): fwd reads x, r and writes s, y; bwd
reads dy, s, g and writes ds: 4 tensors of ``rows * hidden * 2`` bytes each way. ``frac_copy_bw``
is that against the copy bandwidth measured in the same run (a ``clone`` of an fp32 tensor of
256 MiB: read and write). The unfused rows carry the same bytes model, so their GB/s is what they
deliver of the fused op's work. Bench only: the values are checked bitwise in the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

SHAPES = ((8192, 2048), (4096, 4096), (16384, 4096))


def graph_ms(fn, calls: int = 20, replays: int = 10) -> float:
    """Median GPU time (ms) of one call, from replays of a CUDA graph of ``calls`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSONL file to append the rows to")
    ap.add_argument("--timer", default="cuda_graph", choices=("cuda_graph", "do_bench"),
                    help="cuda_graph (default): replays of a graph of 20 calls, the GPU time without the host's "
                         "launch cost (a training step replays its graphs so); do_bench: one call at a time")
    args = ap.parse_args()
    import triton
    from triton.testing import do_bench

    import slothc.kernels.rms_norm  # noqa: F401

    dev = torch.device("cuda")
    big = torch.empty(64 << 20, dtype=torch.float32, device=dev)
    copy_ms = do_bench(lambda: big.clone())
    copy_gbps = 2 * big.numel() * 4 / copy_ms / 1e6
    del big
    ops = torch.ops.slothc
    base = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "copy_gbps": copy_gbps, "dtype": "bfloat16"}
    rows_out = []
    for rows, hidden in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        x, r, dy, gs = (torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        w = torch.randn(hidden, device=dev, dtype=torch.bfloat16, generator=g)
        s = x + r
        cases = {
            ("fwd", "unfused"): lambda: ops.rms_norm(x + r, w, 1e-6, 0.0, True),
            ("fwd", "fused"): lambda: ops.add_rms_norm(x, r, w, 1e-6, 0.0, True),
            ("bwd", "unfused"): lambda: ops.rms_norm_backward(dy, s, w, 1e-6, 0.0, True, False)[0] + gs,
            ("bwd", "fused"): lambda: ops.add_rms_norm_backward(dy, gs, s, w, 1e-6, 0.0, True, False),
        }
        nbytes = 4 * rows * hidden * 2
        for (mode, provider), fn in cases.items():
            fn()
            ms = graph_ms(fn) if args.timer == "cuda_graph" else do_bench(fn)
            row = {**base, "op": "add_rms_norm", "timer": args.timer, "mode": mode, "provider": provider, "shape": [rows, hidden],
                   "median_ms": ms, "bytes": nbytes, "gbps": nbytes / ms / 1e6, "frac_copy_bw": nbytes / ms / 1e6 / copy_gbps}
            rows_out.append(row)
            print(f"{mode} {provider:<8} {rows}x{hidden}: {ms * 1e3:7.1f} us, {row['gbps']:6.0f} GB/s "
                  f"({row['frac_copy_bw']:.0%} of copy {copy_gbps:.0f})", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows_out:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
