"""The dequant kernel's tile sweep on the GPU: bytes a program, warps, and one 8-byte code-pair table
load a byte against two 4-byte code lookups (bench only: the winner is the kernel in slothc).

    OUT=. python3 bench/sweep_qlora_dequant.py     # rows to $OUT/sweep_dequant.jsonl

Run at git 4fb7c10: bench/results/2026-12-01-h200-qlora-dequant-sweep.jsonl ("current" was then
the whole-block variant of c99bef5; the kernel on main now is "1d block2048 w4 pairs0").
"""
import json, os, sys, torch, triton, triton.language as tl
sys.path[:0] = ["bench", "."]
import _harness as H
from bench_qlora import code_pairs
from slothc.kernels import qlora_linear as Q
import bitsandbytes.functional as BF

@triton.jit
def k1d(packed_ptr, absmax_ptr, a8_ptr, code2_ptr, off_ptr, code_ptr, pairs_ptr, out_ptr, n, n_bytes,
        HALF: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, PAIRS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK)
    m = byte < n_bytes
    b = tl.load(packed_ptr + byte, mask=m, other=0).to(tl.int32)
    block = byte // HALF
    q = tl.load(a8_ptr + block, mask=m, other=0).to(tl.int32)
    scale = tl.load(code2_ptr + q) * tl.load(absmax_ptr + block // NB, mask=m, other=0.0)
    scale = scale + tl.load(off_ptr)
    if PAIRS:
        pair = tl.load(pairs_ptr + b)
        hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True) * scale
        lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True) * scale
    else:
        hi = tl.load(code_ptr + (b >> 4)) * scale
        lo = tl.load(code_ptr + (b & 15)) * scale
    v = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    e = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + e, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=e < n)

def run1d(args, shape, block, warps, pairs):
    packed, absmax, a8, code2, off = args
    n = shape[0] * shape[1]; nbytes = (n + 1) // 2
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    k1d[(triton.cdiv(nbytes, block),)](packed, absmax, a8, code2, off, Q.code_book("nf4", packed.device), code_pairs("nf4", packed.device), out, n, nbytes,
        HALF=32, NB=256, BLOCK=block, PAIRS=pairs, num_warps=warps, enable_fp_fusion=False)
    return out

rows = []
out_path = os.path.join(os.environ.get("OUT", "."), "sweep_dequant.jsonl")
copy_gbps = H.copy_bandwidth("cuda")[0]
print("copy", copy_gbps)
for shape in [(4096, 4096), (14336, 4096), (128256, 4096)]:
    n = shape[0] * shape[1]
    moved = n // 2 + 2 * n + n // 64
    sets = []
    for i in range(H.rotation_count(3 * n, "cuda", limit=4)):
        p, qs = BF.quantize_4bit(torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02, blocksize=64, quant_type="nf4", compress_statistics=True)
        sets.append(((p.reshape(-1), qs.state2.absmax, qs.absmax, qs.state2.code, qs.offset), BF.dequantize_4bit(p, qs)))
    src = [torch.empty(moved // 2, dtype=torch.uint8, device="cuda") for _ in sets]
    dst = [torch.empty(moved // 2, dtype=torch.uint8, device="cuda") for _ in sets]
    cands = {"same-bytes copy": None, "current": None}  # current: slothc's launcher
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8):
            for pairs in (False, True):
                cands[f"1d block{block} w{warps} pairs{int(pairs)}"] = (block, warps, pairs)
    for name, cfg in cands.items():
        try:
            if name == "same-bytes copy":
                it = iter(range(10**9))
                fn = lambda s: dst[s["i"]].copy_(src[s["i"]])
                ss = [{"i": i} for i in range(len(sets))]
            elif name == "current":
                fn = lambda s: Q.dequantize_4bit_launch(*s["a"], shape, 64, "nf4", torch.bfloat16)
                ss = [{"a": a} for a, _ in sets]
            else:
                fn = lambda s, cfg=cfg: run1d(s["a"], shape, *cfg)
                ss = [{"a": a} for a, _ in sets]
                assert torch.equal(fn(ss[0]), sets[0][1]), "not bit-exact"
            t = H.time_graphs(fn, ss, "cuda", rep_ms=50)
            gbps = moved / (t.median_ms * 1e-3) / 1e9
            r = dict(shape=shape, variant=name, median_ms=t.median_ms, gbps=gbps, frac_copy=gbps / copy_gbps)
        except Exception as e:
            r = dict(shape=shape, variant=name, error=str(e)[:300])
        rows.append(r); print(json.dumps(r), flush=True)
        with open(out_path, "a") as f: f.write(json.dumps(r) + "\n")
