"""The GPU failure of tests/kernels/test_mlp.py::test_one_kernel_backward_matches_the_composed_one
(2026-12-03, 80 examples): the failing case's worst elements, fast against composed against float64.

    python3 bench/diag_mlp_da.py
"""
import sys

import torch

sys.path[:0] = ["tests/kernels", "."]
import test_mlp as T  # noqa: E402
from slothc import testing  # noqa: E402
from slothc.kernels import mlp as M  # noqa: E402

case = {"act": "gelu_tanh", "setup": "plain", "dtype": torch.bfloat16, "inter": 166, "hidden": 2, "adapters": [(1, 0.5), (1, 0.5)],
        "rows": 63, "bias": False, "form": "contiguous", "seed": 539643}
g, u, w, _, lora_a, lora_b, (base, lora, out) = T._mlp_args(case)
act, scaling = case["act"], [s for _, s in case["adapters"]]
a, b = [x.detach() for x in lora_a], [x.detach() for x in lora_b]
y, t = torch.ops.slothc.mlp(g, u, act, w, None, a, b, scaling, base, lora, out)
dy = testing.make_tensor(y.shape, y.dtype, case["seed"] + 20, device=T.DEVICE)
args = (dy, g, u, t, act, w, a, b, scaling, base, lora, out)
fast = M.mlp_down_bwd(*args[:5], [w], *args[6:])
slow = T._composed_backward(args)
h = M.mlp_act_fwd(g, u, act).reshape(-1, g.shape[-1]).double()
dy2 = dy.reshape(h.shape[0], -1)
for i in range(len(a)):
    da, da_slow = fast[2 + i], slow[2 + i]
    sb = (b[i] * scaling[i]).to(lora) if scaling[i] != 1.0 else b[i]
    G = dy2 @ sb
    ref = G.double().t() @ h
    mag = G.double().abs().t() @ h.abs()
    ulp = torch.finfo(da.dtype).eps * ref.abs().clamp_min(torch.finfo(da.dtype).tiny)
    err, err_slow = (da.double() - ref).abs(), (da_slow.double() - ref).abs()
    bound = err_slow + ulp * 2 + mag * torch.finfo(torch.float32).eps * 4
    bad = (err > bound).nonzero().tolist()
    print(f"dA_{i}: dtype {da.dtype}, G {G.dtype}, {len(bad)} elements over the bound")
    for r, c in bad[:6]:
        print(f"  [{r},{c}] fast {da[r, c].item():.6g} composed {da_slow[r, c].item():.6g} ref {ref[r, c].item():.6g} "
              f"|terms| {mag[r, c].item():.4g} bound {bound[r, c].item():.3g} err {err[r, c].item():.3g}")

# The suspect: the backward kernel recomputes h = act(g) * u in registers, and on the GPU its act(g)
# (with the compiler's fused multiply-adds) may round differently from the forward kernel's, so a
# few bf16 values of h differ by one ulp. Count them against torch's fp32 formula and the forward's h.
hf = M.mlp_act_fwd(g, u, act).reshape(-1, g.shape[-1])
x = g.reshape(hf.shape).float()
torch_h = (torch.nn.functional.gelu(x, approximate="tanh") * u.reshape(hf.shape).float()).to(hf.dtype)
print(f"forward kernel's h against torch's fp32 formula: {(hf != torch_h).sum().item()} of {hf.numel()} values differ")
