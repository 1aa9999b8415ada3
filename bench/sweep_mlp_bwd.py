"""The tile sweep of the one-kernel MLP backward (``slothc.kernels.mlp.mlp_down_bwd``; its
``_DA_*`` constants: rows and columns a tile, warps, programs an SM) at workload (a)'s shape: 8192
tokens, 2048 -> 8192 -> 2048, r=16, bf16. Bench only: the winner goes into slothc by hand.

    OUT=. python3 bench/sweep_mlp_bwd.py                        # GPU: rows to $OUT/sweep_mlp_bwd.jsonl
    TRITON_INTERPRET=1 python3 bench/sweep_mlp_bwd.py --quick   # CPU: every config checked, not timed

Each row: the GPU time of the whole call (CUDA graphs, input sets rotated past the L2), and of the
kernel alone, taken as the call less its cuBLAS part (``dh = dY W + G A`` and the low-rank
gradients, timed once: they do not depend on the tiles). The kernel reads dh, g and u and writes dg
and du (10 bytes an element in bf16) and the fp32 partial sums of ``G^T h``; ``frac_copy`` is its
rate over the copy bandwidth measured in the same run. Every config's dg, du and dB must equal the
default config's bit for bit (no tile changes what each element computes); dA, an fp32 sum over row
splits whose number the tiles set, rounded once, within half a bf16 epsilon of its largest value.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "..")]
import _harness as H  # noqa: E402

from slothc.kernels import lora_linear as L  # noqa: E402
from slothc.kernels import mlp as M  # noqa: E402

CONSTANTS = ("_DA_BLOCK_M", "_DA_BLOCK_N", "_DA_NUM_WARPS", "_DA_PROGRAMS_PER_SM")


def inputs(tokens, hidden, inter, rank, device, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    return dict(dy=rand(tokens, hidden), g=rand(tokens, inter), u=rand(tokens, inter), t=rand(tokens, rank),
                weights=[rand(hidden, inter, scale=inter**-0.5)], lora_a=[rand(rank, inter, scale=inter**-0.5)],
                lora_b=[rand(hidden, rank, scale=0.1)])


def call(s, dtype):
    out = M.mlp_down_bwd(s["dy"], s["g"], s["u"], s["t"], "silu", s["weights"], s["lora_a"], s["lora_b"], [2.0],
                         dtype, dtype, dtype)
    if out is None:
        raise RuntimeError("mlp_down_bwd declined these inputs (the composed path would run)")
    return out


def cublas_part(s, dtype):
    """What the call runs besides the kernel: the low-rank gradients and dh = dY W + G A."""
    with L._no_autocast(s["g"]):
        gl, db = L.low_rank_grads([s["dy"]], s["t"], s["lora_a"], s["lora_b"], [2.0], [0], dtype, s["dy"].shape[0])
        return L._mm_plus_low_rank(s["dy"], s["weights"][0], gl, L.stacked_a(s["lora_a"], dtype)), db


def configure(cfg):
    for name, value in zip(CONSTANTS, cfg):
        setattr(M, name, value)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and a few configs (a CPU check of the script)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    tokens, hidden, inter, rank = (64, 32, 96, 4) if args.quick else (8192, 2048, 8192, 16)
    default = tuple(getattr(M, n) for n in CONSTANTS)
    grid = (((16, 32), (64, 128), (4,), (2, 4)) if args.quick
            else ((16, 32, 64), (64, 128, 256), (4, 8), (2, 4, 8)))
    configs = [default] + [c for c in itertools.product(*grid) if c != default]
    timed = device == "cuda"
    out_path = os.path.join(os.environ.get("OUT", "."), "sweep_mlp_bwd.jsonl")
    n_sets = H.rotation_count(tokens * inter * 2 * 5, device, limit=4) if timed else 1
    sets = [inputs(tokens, hidden, inter, rank, device, dtype, seed) for seed in range(n_sets)]
    env = {"shape": [tokens, hidden, inter, rank], "device": H.device_name(device), "git": H.git_sha()}
    if timed:
        env["copy_gbps"] = H.copy_bandwidth(device)[0]
        env["cublas_part_ms"] = H.time_graphs(lambda s: cublas_part(s, dtype), sets, device, rep_ms=50).median_ms
    print(json.dumps(env), flush=True)
    ref = None
    for cfg in configs:
        configure(cfg)
        row = {**env, "config": dict(zip(CONSTANTS, cfg)), "default": cfg == default}
        try:
            out = [o.float() for o in call(sets[0], dtype)]
            ref = ref or out
            dg, du, da, db = out
            assert torch.equal(dg, ref[0]) and torch.equal(du, ref[1]) and torch.equal(db, ref[3]), "dg, du or dB differ"
            row["da_err"] = (da - ref[2]).abs().max().item() / ref[2].abs().max().item()
            assert row["da_err"] <= 2.0**-8, f"dA off by {row['da_err']:.3g} of its largest value"
            if timed:
                row["call_ms"] = H.time_graphs(lambda s: call(s, dtype), sets, device, rep_ms=50).median_ms
                row["kernel_ms"] = row["call_ms"] - env["cublas_part_ms"]
                row["frac_copy"] = tokens * inter * 10 / (row["kernel_ms"] * 1e-3) / 1e9 / env["copy_gbps"]
        except Exception as e:  # noqa: BLE001  (a config that does not compile or fit: recorded, the sweep goes on)
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps(row), flush=True)
        if timed:
            with open(out_path, "a") as f:
                f.write(json.dumps(row) + "\n")
    configure(default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
