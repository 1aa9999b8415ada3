"""The gated MLP block with LoRA, forward and backward: base matmuls (floor), eager PEFT, Inductor, slothc.

    python3 bench/bench_mlp.py --out results.jsonl          # GPU: hidden 4096, intermediate 14336, 8192 tokens
    TRITON_INTERPRET=1 python3 bench/bench_mlp.py --quick   # CPU smoke run, tiny sizes

The block is transformers' ``LlamaMLP`` (``down(silu(gate(x)) * up(x))``) with PEFT LoRA (r=16,
lora_alpha=32) on gate, up and down; base weights frozen, bf16; x requires grad. As in
``bench_lora_linear.py`` every provider is a function of ``(x, *weights)`` through
``torch.func.functional_call``; set-ups ``bf16`` and ``autocast`` (fp32 adapters under bf16
autocast).

Providers:

- ``base_mlp``: the same block without LoRA, compiled by Inductor (``down(silu(gate(x)) * up(x))``
  with frozen weights): the floor (three base matmuls forward and their dX, plus the activation).
  ``overhead`` = a provider's time / the floor's. Not checked (it computes something else).
- ``eager``: the PEFT block, un-compiled.
- ``inductor``: ``torch.compile`` of it.
- ``slothc``: ``torch.compile(fn, backend="slothc")``: gate and up become one ``slothc::lora_linear``
  call (shared input), the activation and the down projection one ``slothc::mlp``.

The rate columns are TFLOP/s of the base matmuls (3 x 2 x tokens x hidden x intermediate a pass: 1
pass in ``fwd``, 2 in ``full``) against the measured bf16 matmul rate. Peak memory of one forward +
backward (``peak_mem_bytes``) shows what keeping g and u instead of h (and act(g)) saves.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import bench_lora_linear as L  # noqa: E402

OP = "mlp"
PROVIDERS = ("base_mlp", "eager", "inductor", "slothc")
HIDDEN, INTER, TOKENS = 4096, 14336, 8192
NAMES = ("gate_proj", "up_proj", "down_proj")


def lora_mlp(hidden: int, inter: int, setup: str, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu")).to(device, torch.bfloat16)
    model = get_peft_model(torch.nn.ModuleDict({"mlp": mlp}), LoraConfig(
        r=L.RANK, lora_alpha=L.ALPHA, target_modules=list(NAMES), lora_dropout=0.0, init_lora_weights=False))
    block = model.base_model.model["mlp"]
    if setup == "bf16":
        block.to(torch.bfloat16)
    with torch.no_grad():
        for name in NAMES:
            layer = getattr(block, name)
            layer.lora_A["default"].weight.normal_(0, layer.in_features**-0.5)
            layer.lora_B["default"].weight.normal_(0, L.RANK**-0.5)
    return block


def weight_names():
    out = []
    for name in NAMES:
        out += [f"{name}.base_layer.weight", f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"]
    return out


def functional(block, autocast: bool):
    import contextlib

    import torch

    names = weight_names()

    def fn(x, *weights):
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast and x.dtype != torch.float64 else contextlib.nullcontext()
        with ctx:
            return torch.func.functional_call(block, dict(zip(names, weights)), (x,))

    return fn


def base_mlp(x, wg, wu, wd):
    import torch.nn.functional as F

    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def providers(names, block, autocast, fused_flag):
    return L.compiled_providers(functional(block, autocast), names, fused_flag, ("lora_linear", "mlp"), floor="base_mlp")


def time_floor(rec, case, base_weights, device, modes, rep_ms) -> dict:
    import torch

    import _harness as H

    torch._dynamo.reset()
    fn = torch.compile(base_mlp)
    timed = H.time_provider(fn, [case.make_set()], base_weights, device, modes=modes, rep_ms=rep_ms)
    mem = L.measure_memory(fn, case.make_set, base_weights, device) if H.is_cuda(device) else {"mem_skipped": "not CUDA"}
    out = {}
    for mode, (timing, fields) in timed.items():
        out[mode] = rec.add(op=case.op, provider="base_mlp", mode=mode, shape=case.shape, dtype=case.dtype, timing=timing,
                            flops=case.flops[mode], status="ok" if timing else "error", variant=case.variant,
                            **(case.extra or {}), **fields, **mem)
        print(f"[{case.op} {case.variant} {case.shape} {mode} base_mlp] {H._fmt(out[mode].get('median_ms'), '.4f')} ms", flush=True)
    return out


def main(argv=None):
    import _harness as H

    parser = H.bench_parser(__doc__.splitlines()[0], PROVIDERS)
    parser.add_argument("--setups", nargs="+", default=list(L.SETUPS), choices=list(L.SETUPS))
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--inter", type=int, default=None)
    parser.add_argument("--hidden-size", type=int, default=None, help=f"hidden size (default {HIDDEN})")
    args = H.resolve_args(parser.parse_args(argv))
    import torch

    device = args.device
    hidden = 128 if args.quick else (args.hidden_size or HIDDEN)
    inter = args.inter or (192 if args.quick else INTER)
    tokens = args.tokens or (64 if args.quick else TOKENS)
    torch.manual_seed(0)
    rec = H.Recorder(None, device)
    H.measure_ceilings(rec, device, matmul=True, quick=args.quick)
    L._write(args.out, rec.rows)
    modes = [m for m in ("fwd", "bwd", "full") if m in args.modes]
    for setup in args.setups:
        autocast = setup == "autocast"
        block = lora_mlp(hidden, inter, setup, device)
        named = dict(block.named_parameters())
        weights = []
        for name in weight_names():
            t = named[name].detach().clone().requires_grad_("lora_" in name)
            t._bench_name = name.replace(".default.weight", "").replace(".base_layer.weight", ".W")
            weights.append(t)

        def make_set():
            return {
                "x": torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True),
                "dy": torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16),
            }

        mm = 3 * 2 * tokens * hidden * inter
        case = H.FwdBwdCase(
            op=OP, variant=setup, shape=(tokens, hidden, inter), dtype=torch.bfloat16, make_set=make_set, params=weights,
            bytes_moved={mode: None for mode in modes}, flops={"fwd": mm, "bwd": mm, "full": 2 * mm},
            extra={"rank": L.RANK, "lora_alpha": L.ALPHA, "tokens": tokens, "hidden": hidden, "intermediate": inter, "act": "silu"},
        )
        base_weights = [weights[0].to(torch.bfloat16), weights[3].to(torch.bfloat16), weights[6].to(torch.bfloat16)]
        floor = time_floor(rec, case, base_weights, device, modes, args.rep_ms) if "base_mlp" in args.providers else {}
        fused_flag: dict = {}
        rows = H.run_fwd_bwd(rec, case, providers(args.providers, block, autocast, fused_flag), device, modes=modes, rep_ms=args.rep_ms)
        L.finish_case(args.out, rows, floor, lambda name: providers([name], block, autocast, fused_flag)[name](),
                      make_set, weights, device, fused_flag)
        del block
        torch.cuda.empty_cache() if H.is_cuda(device) else None
    H.finish(rec, f"{OP} (LlamaMLP + LoRA r={L.RANK}, bf16 base)", args.table)
    return rec.rows


if __name__ == "__main__":
    main()
