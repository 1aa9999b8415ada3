"""The dequant kernel's second sweep on the GPU: how the values are stored and looked up, and
several weights in one launch (bench only: the winner goes into slothc/kernels/qlora_linear.py).

The kernel on main before this sweep (2026-12-03) reached 50%, 71% and 84% of the 1 GiB copy bandwidth at 4096²,
14336x4096 and 128256x4096, where a copy of the same bytes reaches 64%, 88% and 99%
(bench/results/2026-12-01-h200-qlora-dequant-sweep.jsonl). Candidates, every one checked bit-exact
against bitsandbytes' ``dequantize_4bit`` before it is timed (NF4, blocksize 64, double quant, bf16):

- ``cast``: the GPU's own fp32 -> bf16 conversion (round to nearest even) in place of the
  bit arithmetic that the interpreter needs;
- ``pack``: the two values of a byte packed into one 32-bit word and stored as such (no
  join-and-reshape of the two halves);
- ``gather``: the 16-entry code book held in registers and read with ``tl.gather``, not from memory;
- ``rows``: a 2-d tile of whole quantisation blocks, the block scale computed once a row;
- tile bytes a program and warps;
- ``group``: the q/k/v weights (4096², 1024x4096 twice, Llama-3.1-8B) or gate/up (14336x4096
  twice) in one launch into one buffer, against one launch each.

    OUT=. python3 bench/sweep_qlora_dequant2.py     # rows to $OUT/sweep_dequant2.jsonl
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path[:0] = ["bench", "."]
import _harness as H  # noqa: E402
import bitsandbytes.functional as BF  # noqa: E402
from slothc.kernels import qlora_linear as Q  # noqa: E402


@triton.jit
def _bytes(packed_ptr, absmax_ptr, a8_ptr, code2_ptr, off_ptr, code_ptr, out_ptr, n_bytes, start,
           HALF: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, CAST: tl.constexpr, PACK: tl.constexpr,
           GATHER: tl.constexpr):
    """Bytes ``start .. start + BLOCK`` of one weight (n even) into out (bf16)."""
    byte = start + tl.arange(0, BLOCK)
    m = byte < n_bytes
    b = tl.load(packed_ptr + byte, mask=m, other=0).to(tl.int32)
    block = byte // HALF
    q = tl.load(a8_ptr + block, mask=m, other=0).to(tl.int32)
    scale = tl.load(code2_ptr + q) * tl.load(absmax_ptr + block // NB, mask=m, other=0.0)
    scale = scale + tl.load(off_ptr)
    if GATHER:
        code = tl.load(code_ptr + tl.arange(0, 16))
        hi = tl.gather(code, b >> 4, 0) * scale
        lo = tl.gather(code, b & 15, 0) * scale
    else:
        hi = tl.load(code_ptr + (b >> 4)) * scale
        lo = tl.load(code_ptr + (b & 15)) * scale
    if PACK:
        if CAST:
            hb = hi.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
            lb = lo.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        else:
            hb = hi.to(tl.uint32, bitcast=True)
            hb = (hb + 0x7FFF + ((hb >> 16) & 1)) >> 16
            lb = lo.to(tl.uint32, bitcast=True)
            lb = (lb + 0x7FFF + ((lb >> 16) & 1)) >> 16
        word = hb | (lb << 16)  # little-endian: element 2i (the high nibble) in the low half
        tl.store(out_ptr.to(tl.pointer_type(tl.uint32)) + byte, word, mask=m)
    else:
        v = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))
        if CAST:
            out = v.to(tl.bfloat16)
        else:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        e = 2 * start + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + e, out, mask=e < 2 * n_bytes)


@triton.jit
def k1(packed_ptr, absmax_ptr, a8_ptr, code2_ptr, off_ptr, code_ptr, out_ptr, n_bytes,
       HALF: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, CAST: tl.constexpr, PACK: tl.constexpr,
       GATHER: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    _bytes(packed_ptr, absmax_ptr, a8_ptr, code2_ptr, off_ptr, code_ptr, out_ptr, n_bytes, pid * BLOCK,
           HALF, NB, BLOCK, CAST, PACK, GATHER)


@triton.jit
def k_rows(packed_ptr, absmax_ptr, a8_ptr, code2_ptr, off_ptr, code_ptr, out_ptr, n_bytes,
           HALF: tl.constexpr, NB: tl.constexpr, ROWS: tl.constexpr, CAST: tl.constexpr):
    """ROWS whole blocks (HALF bytes each) a program; one scale a row; packed 32-bit stores."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid * ROWS + tl.arange(0, ROWS)
    byte = row[:, None] * HALF + tl.arange(0, HALF)[None, :]
    m = byte < n_bytes
    rm = row * HALF < n_bytes
    b = tl.load(packed_ptr + byte, mask=m, other=0).to(tl.int32)
    q = tl.load(a8_ptr + row, mask=rm, other=0).to(tl.int32)
    scale = tl.load(code2_ptr + q) * tl.load(absmax_ptr + row // NB, mask=rm, other=0.0)
    scale = (scale + tl.load(off_ptr))[:, None]
    hi = tl.load(code_ptr + (b >> 4)) * scale
    lo = tl.load(code_ptr + (b & 15)) * scale
    if CAST:
        hb = hi.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        lb = lo.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
    else:  # the interpreter's cast truncates
        hb = hi.to(tl.uint32, bitcast=True)
        hb = (hb + 0x7FFF + ((hb >> 16) & 1)) >> 16
        lb = lo.to(tl.uint32, bitcast=True)
        lb = (lb + 0x7FFF + ((lb >> 16) & 1)) >> 16
    tl.store(out_ptr.to(tl.pointer_type(tl.uint32)) + byte, hb | (lb << 16), mask=m)


@triton.jit
def k_group(p0, s0, a0, c0, o0, n0, p1, s1, a1, c1, o1, n1, p2, s2, a2, c2, o2, n2, code_ptr, out_ptr, g1, g2,
            HALF: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr, CAST: tl.constexpr,
            PACK: tl.constexpr, GATHER: tl.constexpr):
    """Up to three weights in one launch: programs [0, g1) the first, [g1, g2) the second, the rest
    the third; the outputs one after the other in ``out`` (n0 / 2 bytes' values, then n1 / 2, ...)."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < g1:
        _bytes(p0, s0, a0, c0, o0, code_ptr, out_ptr, n0, pid * BLOCK, HALF, NB, BLOCK, CAST, PACK, GATHER)
    elif PARTS == 2 or pid < g2:
        _bytes(p1, s1, a1, c1, o1, code_ptr, out_ptr + 2 * n0, n1, (pid - g1) * BLOCK, HALF, NB, BLOCK, CAST, PACK, GATHER)
    else:
        _bytes(p2, s2, a2, c2, o2, code_ptr, out_ptr + 2 * (n0 + n1), n2, (pid - g2) * BLOCK, HALF, NB, BLOCK, CAST, PACK,
               GATHER)


def run1(a, shape, block, warps, cast, pack, gather, out=None):
    packed, absmax, a8, code2, off = a
    n_bytes = shape[0] * shape[1] // 2
    out = torch.empty(shape, dtype=torch.bfloat16, device=packed.device) if out is None else out
    k1[(triton.cdiv(n_bytes, block),)](packed, absmax, a8, code2, off, Q.code_book("nf4", packed.device), out, n_bytes,
                                       HALF=32, NB=256, BLOCK=block, CAST=cast, PACK=pack, GATHER=gather, num_warps=warps,
                                       enable_fp_fusion=False)
    return out


def run_rows(a, shape, rows, warps, cast=1):
    packed, absmax, a8, code2, off = a
    n_bytes = shape[0] * shape[1] // 2
    out = torch.empty(shape, dtype=torch.bfloat16, device=packed.device)
    k_rows[(triton.cdiv(n_bytes, rows * 32),)](packed, absmax, a8, code2, off, Q.code_book("nf4", packed.device), out, n_bytes,
                                               HALF=32, NB=256, ROWS=rows, CAST=cast, num_warps=warps, enable_fp_fusion=False)
    return out


def run_group(parts, shapes, block, warps, cast, pack, gather):
    """parts: the weights' state tuples; one [sum out, in] buffer."""
    n_bytes = [s[0] * s[1] // 2 for s in shapes]
    out = torch.empty((sum(s[0] for s in shapes), shapes[0][1]), dtype=torch.bfloat16, device=parts[0][0].device)
    progs = [triton.cdiv(nb, block) for nb in n_bytes]
    args = []
    for i in range(3):
        j = min(i, len(parts) - 1)
        packed, absmax, a8, code2, off = parts[j]
        args += [packed, absmax, a8, code2, off, n_bytes[j]]
    g1, g2 = progs[0], progs[0] + (progs[1] if len(parts) > 1 else 0)
    k_group[(sum(progs),)](*args, Q.code_book("nf4", parts[0][0].device), out, g1, g2, HALF=32, NB=256, BLOCK=block,
                           PARTS=len(parts), CAST=cast, PACK=pack, GATHER=gather, num_warps=warps, enable_fp_fusion=False)
    return out


def quantised(shape, device="cuda"):
    p, qs = BF.quantize_4bit(torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02, blocksize=64, quant_type="nf4",
                             compress_statistics=True)
    return (p.reshape(-1), qs.state2.absmax, qs.absmax, qs.state2.code, qs.offset), BF.dequantize_4bit(p, qs)


def record(out_path, r):
    print(json.dumps(r), flush=True)
    with open(out_path, "a") as f:
        f.write(json.dumps(r) + "\n")


def main():
    out_path = os.path.join(os.environ.get("OUT", "."), "sweep_dequant2.jsonl")
    copy_gbps = H.copy_bandwidth("cuda")[0]
    record(out_path, dict(variant="1 GiB copy", gbps=copy_gbps, env=H.environment("cuda")))
    singles = {"main": None}
    for cast in (0, 1):
        for pack in (0, 1):
            for gather in (0, 1):
                for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8)):
                    singles[f"block{block} w{warps} cast{cast} pack{pack} gather{gather}"] = ("1", block, warps, cast, pack, gather)
    for rows, warps in ((32, 4), (64, 4), (64, 8), (128, 8)):
        singles[f"rows{rows} w{warps}"] = ("rows", rows, warps)
    best = {}
    for shape in [(1024, 4096), (4096, 4096), (14336, 4096), (128256, 4096)]:
        n = shape[0] * shape[1]
        moved = n // 2 + 2 * n + n // 64
        sets = [quantised(shape) for _ in range(H.rotation_count(3 * n, "cuda", limit=4))]
        src = [torch.empty(moved // 2, dtype=torch.uint8, device="cuda") for _ in sets]
        dst = [torch.empty(moved // 2, dtype=torch.uint8, device="cuda") for _ in sets]
        ss = [{"a": a, "i": i} for i, (a, _) in enumerate(sets)]
        for name, cfg in {"same-bytes copy": None, **singles}.items():
            try:
                if name == "same-bytes copy":
                    fn = lambda s: dst[s["i"]].copy_(src[s["i"]])  # noqa: E731
                elif cfg is None:
                    fn = lambda s: Q.dequantize_4bit_launch(*s["a"], shape, 64, "nf4", torch.bfloat16)  # noqa: E731
                elif cfg[0] == "rows":
                    fn = lambda s, cfg=cfg: run_rows(s["a"], shape, *cfg[1:])  # noqa: E731
                else:
                    fn = lambda s, cfg=cfg: run1(s["a"], shape, *cfg[1:])  # noqa: E731
                if cfg is not None or name == "main":
                    assert torch.equal(fn(ss[0]), sets[0][1]), "not bit-exact with bitsandbytes"
                t = H.time_graphs(fn, ss, "cuda", rep_ms=40)
                gbps = moved / (t.median_ms * 1e-3) / 1e9
                r = dict(shape=shape, variant=name, median_ms=t.median_ms, gbps=gbps, frac_copy=gbps / copy_gbps)
                if cfg is not None and cfg[0] == "1" and (shape not in best or t.median_ms < best[shape][0]):
                    best[shape] = (t.median_ms, cfg)
            except Exception as e:  # a variant that does not compile is a row, not the end of the sweep
                r = dict(shape=shape, variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
            record(out_path, r)
        del sets, src, dst
    # Several weights in one launch against one launch each, with the best 1-d variant at 4096².
    cfg = best.get((4096, 4096), (0, ("1", 2048, 4, 1, 1, 0)))[1]
    for label, shapes in (("qkv", [(4096, 4096), (1024, 4096), (1024, 4096)]), ("gate_up", [(14336, 4096), (14336, 4096)])):
        n = sum(s[0] * s[1] for s in shapes)
        moved = n // 2 + 2 * n + n // 64
        sets = []
        for _ in range(H.rotation_count(3 * n, "cuda", limit=4)):
            qs = [quantised(s) for s in shapes]
            sets.append({"a": [a for a, _ in qs], "ref": torch.cat([r for _, r in qs])})
        cands = {
            "main, a launch each": lambda s: [Q.dequantize_4bit_launch(*a, sh, 64, "nf4", torch.bfloat16)
                                             for a, sh in zip(s["a"], shapes)],
            f"best 1-d {cfg[1:]}, a launch each": lambda s: [run1(a, sh, *cfg[1:]) for a, sh in zip(s["a"], shapes)],
            f"best 1-d {cfg[1:]}, one launch": lambda s: run_group(s["a"], shapes, *cfg[1:]),
        }
        for name, fn in cands.items():
            try:
                got = fn(sets[0])
                got = torch.cat(got) if isinstance(got, list) else got
                assert torch.equal(got, sets[0]["ref"]), "not bit-exact with bitsandbytes"
                t = H.time_graphs(fn, sets, "cuda", rep_ms=40)
                gbps = moved / (t.median_ms * 1e-3) / 1e9
                r = dict(shape=label, variant=name, median_ms=t.median_ms, gbps=gbps, frac_copy=gbps / copy_gbps)
            except Exception as e:
                r = dict(shape=label, variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
            record(out_path, r)


if __name__ == "__main__":
    main()
