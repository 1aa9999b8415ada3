"""The LoRA backward's G = dY (s B) and dB = s dY^T T: one Triton pass over dY against two BLAS products.

    python3 bench/bench_low_rank_grads.py --out results.jsonl            # GPU: (a)'s and (b)'s shapes
    python3 bench/bench_low_rank_grads.py --sweep --out sweep.jsonl      # and the kernel's tile/grid choices

What ``lora_linear.low_rank_grads`` computes for each LoRA projection in the backward, at the
projections' shapes in workloads (a) (Llama-3.2-1B, 8192 tokens) and (b) (Llama-3.1-8B, 4096
tokens), r = 16, bf16 dY and adapters' products (fp32 B, as under autocast):

- ``blas``: ``_low_rank_grads_blas``, two cuBLAS products each reading dY;
- ``kernel``: ``low_rank_grads_triton`` with ``low_rank_config``'s choice (the kernel, then the
  partial sums' kernels where there are several column blocks or row splits).

GPU time per call from replays of a CUDA graph of 20 calls (as a training step replays them). Bytes
model: dY read once (``N * M * 2``); T, s B, G and dB are under 1% of it at r = 16. ``frac_copy_bw``
is that against the copy bandwidth of the same run (a clone of 256 MiB, read and write), the
kernel's roofline. ``--sweep`` times the kernel also with other tiles, warps and grid sizes (each
checked against the default's result first) to choose ``low_rank_config`` from data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch

# (workload, projection, tokens N, output features M)
SHAPES = (
    ("a", "q/o/down", 8192, 2048), ("a", "k/v", 8192, 512), ("a", "gate/up", 8192, 8192),
    ("b", "q/o/down", 4096, 4096), ("b", "k/v", 4096, 1024), ("b", "gate/up", 4096, 14336),
)
RANK = 16


def graph_ms(fn, calls: int = 20, replays: int = 12) -> float:
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


def _configs(n, m, sms):
    """The sweep: BLOCK_M x BLOCK_N x warps x programs an SM (the row splits follow)."""
    from slothc.kernels._launch import cdiv

    for block_m, block_n, warps, per_sm, db_t, stages in itertools.product((256, 512), (32, 64), (4, 8), (1,), (False, True), (2, 4)):
        if block_m > max(16, 1 << (m - 1).bit_length()):
            continue
        n_c = cdiv(m, block_m)
        splits = max(1, min(cdiv(per_sm * sms, n_c), cdiv(n, 4 * block_n)))
        rows = cdiv(cdiv(n, splits), block_n) * block_n
        yield dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_R=RANK, num_warps=warps, n_col_blocks=n_c,
                   splits=cdiv(n, rows), rows_per_split=rows, per_sm=per_sm, DB_T=db_t, num_stages=stages)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSONL file to append the rows to")
    ap.add_argument("--sweep", action="store_true", help="also time the kernel's other tile and grid choices")
    ap.add_argument("--only-sweep-shapes", action="store_true", help="only (a)'s q/o/down and gate/up and (b)'s gate/up")
    args = ap.parse_args()
    import triton
    from triton.testing import do_bench

    from slothc.kernels import _launch
    from slothc.kernels import lora_linear as lora_module

    dev = torch.device("cuda")
    big = torch.empty(64 << 20, dtype=torch.float32, device=dev)
    copy_ms = do_bench(lambda: big.clone())
    copy_gbps = 2 * big.numel() * 4 / copy_ms / 1e6
    del big
    sms = _launch.num_sms(dev)
    base = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "copy_gbps": copy_gbps, "rank": RANK, "dtype": "bfloat16"}
    default_config = lora_module.low_rank_config
    rows_out = []

    def record(row):
        rows_out.append(row)
        if args.out:  # as it goes: a run stopped at its time limit keeps what it measured
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"{row['workload']} {row['projection']:<9} {row['shape'][0]}x{row['shape'][1]} {row['provider']:<7}"
              f"{row.get('config', '')!s:<40} {row['median_ms'] * 1e3:7.1f} us {row['frac_copy_bw']:5.0%} of copy",
              flush=True)

    for workload, proj, n, m in SHAPES if not args.only_sweep_shapes else [s for s in SHAPES if s[1] != "k/v" and (s[0] == "a" or s[1] == "gate/up")]:
        g = torch.Generator(device=dev).manual_seed(0)
        dy = torch.randn(n, m, device=dev, dtype=torch.bfloat16, generator=g)
        t = torch.randn(n, RANK, device=dev, dtype=torch.bfloat16, generator=g)
        lora_a = [torch.empty(RANK, 16, device=dev)]
        lora_b = [torch.randn(m, RANK, device=dev, generator=g) * 0.01]
        call = ([dy], t, lora_a, lora_b, [2.0], [0], torch.bfloat16, n)
        nbytes = n * m * 2
        row0 = {**base, "workload": workload, "projection": proj, "shape": [n, m], "bytes": nbytes}

        def timed(provider, fn, **extra):
            ms = graph_ms(fn)
            record({**row0, **extra, "provider": provider, "median_ms": ms, "gbps": nbytes / ms / 1e6,
                    "frac_copy_bw": nbytes / ms / 1e6 / copy_gbps})

        timed("blas", lambda: lora_module._low_rank_grads_blas(*call))
        want = lora_module.low_rank_grads_triton(*call)
        cfg = default_config(n, m, RANK, dev)
        timed("kernel", lambda: lora_module.low_rank_grads_triton(*call),
              config={k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "n_col_blocks", "splits")})
        if not args.sweep:
            continue
        for c in _configs(n, m, sms):
            lora_module.low_rank_config = lambda *_, _c=c: _c
            try:
                got = lora_module.low_rank_grads_triton(*call)
                close = torch.allclose(got[0].float(), want[0].float(), rtol=2e-2, atol=1e-2) and \
                    torch.allclose(got[1][0], want[1][0], rtol=2e-2, atol=1e-2)
                if not close:
                    print(f"  {c}: result differs from the default's; not timed", flush=True)
                    continue
                timed("sweep", lambda: lora_module.low_rank_grads_triton(*call),
                      config={k: c[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "per_sm", "n_col_blocks", "splits", "DB_T",
                                            "num_stages")})
            finally:
                lora_module.low_rank_config = default_config
    return 0


if __name__ == "__main__":
    sys.exit(main())
