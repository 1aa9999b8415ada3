"""Why the step's dequant time rose with the grouped launch (bench/NOTES.md, 2026-12-03 third
session): slothc's own ``dequantize_weights`` at Llama-3.1-8B's four call shapes against the
sweep's kernels, timed the same way (CUDA graphs, L2 flushed), then inside ``slothc::qlora_linear``
forward and backward under the profiler (each dequant kernel's duration).

    OUT=. python3 bench/diag_dequant_step.py
"""
import sys

import torch

sys.path[:0] = ["bench", "."]
import _harness as H  # noqa: E402
import sweep_qlora_dequant2 as S  # noqa: E402
from slothc.kernels import qlora_linear as Q  # noqa: E402

CALLS = {"qkv": [(4096, 4096), (1024, 4096), (1024, 4096)], "o": [(4096, 4096)], "gate_up": [(14336, 4096)] * 2,
         "down": [(4096, 14336)]}
bf16 = torch.bfloat16
copy = H.copy_bandwidth("cuda")[0]
for name, shapes in CALLS.items():
    n = sum(a * b for a, b in shapes)
    moved = n // 2 + 2 * n + n // 64
    sets = []
    for _ in range(H.rotation_count(3 * n, "cuda", limit=4)):
        qs = [S.quantised(s) for s in shapes]
        sets.append({"a": [a for a, _ in qs]})
    cands = {
        "slothc dequantize_weights": lambda s: Q.dequantize_weights(s["a"], shapes, 64, "nf4", bf16, check=False),
        "slothc launch each": lambda s: [Q.dequantize_4bit_launch(*a, sh, 64, "nf4", bf16) for a, sh in zip(s["a"], shapes)],
        "sweep cast1 one launch": lambda s: S.run_group(s["a"], shapes, 2048, 4, 1, 0, 0) if len(shapes) > 1
        else S.run1(s["a"][0], shapes[0], 2048, 4, 1, 0, 0),
        "sweep cast0 each (old)": lambda s: [S.run1(a, sh, 2048, 4, 0, 0, 0) for a, sh in zip(s["a"], shapes)],
    }
    for label, fn in cands.items():
        t = H.time_graphs(fn, sets, "cuda", rep_ms=40)
        print(f"{name:8s} {label:28s} {t.median_ms * 1e3:8.1f} us {moved / (t.median_ms * 1e-3) / 1e9 / copy * 100:5.1f}% of copy",
              flush=True)

# Inside the op, under the profiler: qkv and gate/up at 4096 tokens, forward and backward.
from torch.profiler import ProfilerActivity, profile  # noqa: E402

for name in ("qkv", "gate_up"):
    shapes = CALLS[name]
    qs = [S.quantised(s) for s in shapes]
    import bitsandbytes.functional as BF  # noqa: F401,E402

    state = [[a[i] for a, _ in qs] for i in range(5)]
    flat = [x for s in shapes for x in s]
    x = torch.randn(4096, 4096, device="cuda", dtype=bf16, requires_grad=True)
    la = [torch.randn(16, 4096, device="cuda", dtype=bf16, requires_grad=True) for _ in shapes]
    lb = [torch.randn(s[0], 16, device="cuda", dtype=bf16, requires_grad=True) for s in shapes]

    def call():
        outs = torch.ops.slothc.qlora_linear(x, *state, flat, 64, "nf4", [None] * len(shapes), la, lb, [2.0] * len(shapes),
                                             list(range(len(shapes))), bf16, bf16, bf16, None, 256)
        sum(o.float().sum() for o in outs[:-1]).backward()

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    ds = [e for e in prof.events() if "dequantize" in e.name and e.device_type.name == "CUDA"]
    print(name, "in the op:", len(ds), "dequant kernels, us:", [round(e.device_time, 1) for e in ds][:12], flush=True)
