"""Host cost of one call (tiny shapes, un-synchronised launch loops): the dequant launcher, the
QLoRA op forward and backward, against bitsandbytes and PEFT's eager 4-bit LoRA layer.

    python3 bench/host_qlora.py      # CUDA only; numbers in bench/results/2026-12-01-h200-qlora.md
"""
import sys, time, torch, triton
sys.path[:0] = ["bench", "."]
import bench_qlora as B
from slothc.kernels import qlora_linear as Q
import bitsandbytes.functional as BF
torch.manual_seed(0)
dev = "cuda"
def host_us(fn, n=400):
    for _ in range(20): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    t1 = time.perf_counter(); torch.cuda.synchronize()
    return (t1 - t) / n * 1e6
w = torch.randn(64, 64, device=dev, dtype=torch.bfloat16)
p, qs = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
st = (p, qs.state2.absmax, qs.absmax, qs.state2.code, qs.offset)
print("triton launch (enable_fp_fusion=False)", host_us(lambda: Q.dequantize_4bit_launch(*st, (64, 64), 64, "nf4", torch.bfloat16)))
k = Q._dequantize_4bit_kernel
out = torch.empty(64, 64, device=dev, dtype=torch.bfloat16)
code = Q.code_book("nf4", p.device)
def raw(fuse):
    kw = dict(PARTS=1, HALF_BLOCKSIZE=32, NESTED=True, NESTED_BLOCKSIZE=256, BF16_BITS=False, BLOCK=2048, num_warps=4)
    if not fuse: kw["enable_fp_fusion"] = False
    one = (p, st[1], st[2], st[3], st[4], 4096, 2048)
    k[(1,)](*one, *one, *one, code, out, 1, 1, **kw)
print("raw launch with enable_fp_fusion=False", host_us(lambda: raw(False)))
print("raw launch default options", host_us(lambda: raw(True)))
print("bnb dequantize_4bit", host_us(lambda: BF.dequantize_4bit(p, qs)))
print("torch empty", host_us(lambda: torch.empty(64, 64, device=dev)))
x = torch.randn(8, 64, device=dev, dtype=torch.bfloat16)
A = torch.randn(16, 64, device=dev); Bm = torch.randn(64, 16, device=dev)
*state, nbs = Q.op_state([(p, qs)])
dt3 = (torch.bfloat16,) * 3
args = (x, *state, [None], [A], [Bm], [2.0], [0], *dt3, None, nbs)
# three projections of one x in one call (q/k/v after the pass merges them)
*state3, _ = Q.op_state([(p, qs)] * 3)
args3 = (x, *state3, [None] * 3, [A] * 3, [Bm] * 3, [2.0] * 3, [0, 1, 2], *dt3, None, nbs)
with torch.no_grad():
    print("qlora op fwd (no grad)", host_us(lambda: torch.ops.slothc.qlora_linear(*args)))
    print("qlora op fwd, 3 projections in one call", host_us(lambda: torch.ops.slothc.qlora_linear(*args3)))
    y, t = torch.ops.slothc.qlora_linear(*args)
    g = torch.randn_like(y)
    bargs = ([g], x, t, *state, [A], [Bm], [2.0], [0], *dt3, True, False, False, torch.bfloat16, nbs)
    print("qlora bwd op", host_us(lambda: torch.ops.slothc.qlora_linear_backward(*bargs)))
    y3 = torch.ops.slothc.qlora_linear(*args3)
    bargs3 = ([g] * 3, x, y3[-1], *state3, [A] * 3, [Bm] * 3, [2.0] * 3, [0, 1, 2], *dt3, True, False, False, torch.bfloat16, nbs)
    print("qlora bwd op, 3 projections in one call", host_us(lambda: torch.ops.slothc.qlora_linear_backward(*bargs3)))
    from slothc.kernels import lora_linear as L
    print("lora_linear_fwd python only", host_us(lambda: L.lora_linear_fwd(x, [w], [None], [A], [Bm], [2.0], [0], torch.bfloat16, torch.bfloat16, torch.bfloat16)))
layer = B.qlora_layer(64, 64, dev)
xg = torch.randn(8, 64, device=dev, dtype=torch.bfloat16)
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    print("eager peft+bnb layer fwd (no grad)", host_us(lambda: layer(xg)))

# Where the op's host time goes: Python's profile of the forward and the backward (tottime, top 20).
if "--profile" in sys.argv:
    import cProfile, pstats
    with torch.no_grad():
        for name, fn in (("qlora op fwd", lambda: torch.ops.slothc.qlora_linear(*args)),
                         ("qlora bwd op", lambda: torch.ops.slothc.qlora_linear_backward(*bargs))):
            for _ in range(20): fn()
            pr = cProfile.Profile(); pr.enable()
            for _ in range(200): fn()
            pr.disable(); torch.cuda.synchronize()
            print(f"--- {name}: 200 calls"); pstats.Stats(pr).sort_stats("tottime").print_stats(20)
