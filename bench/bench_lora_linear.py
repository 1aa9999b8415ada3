"""One LoRA linear, forward and backward: the bare base matmul (floor), eager PEFT, Inductor, slothc.

    python3 bench/bench_lora_linear.py --out results.jsonl          # GPU: the shapes below
    TRITON_INTERPRET=1 python3 bench/bench_lora_linear.py --quick   # CPU smoke run, tiny sizes

The layer is PEFT's own ``lora.Linear`` (``peft.get_peft_model`` on an ``nn.Linear``, r=16,
lora_alpha=32, dropout 0) with the base weight W [out, in] frozen; x [tokens, in] requires grad (a
LoRA layer inside a model passes dX on), and so do A and B. Every provider is a function of
``(x, W, A, B)`` calling the layer through ``torch.func.functional_call``, so that the correctness
check can run eager on float64 copies.

Providers:

- ``base_matmul``: ``F.linear(x, W)`` alone: forward and dX, the floor the LoRA overhead is measured
  against (``overhead`` = a provider's time / the floor's, per mode). Not checked (it computes
  something else).
- ``eager``: the PEFT layer, un-compiled.
- ``inductor``: ``torch.compile`` of the same function (default options).
- ``slothc``: ``torch.compile(fn, backend="slothc")``: the pass rewrites the layer to
  ``slothc::lora_linear`` (the rows record that it did, ``fused``), Inductor compiles the rest.
  (A Triton GEMM with the low-rank update in its epilogue was measured too, as ``slothc_triton``,
  and lost to the op's cuBLAS composition at every shape:
  bench/results/2026-12-01-h200-lora-epilogue-trial.jsonl.)

Set-ups (``--setups``): ``bf16`` (W, A, B and x in bf16, no autocast) and ``autocast`` (W and x bf16,
A and B fp32: PEFT's default ``autocast_adapter_dtype``, under ``torch.autocast(bf16)`` as
``Trainer(bf16=True)`` runs it: eager casts x to fp32 and back around the LoRA branch).

Cases: (in, out) = (4096, 4096), (4096, 14336), (14336, 4096); 8192 tokens; r=16. Modes ``fwd``,
``full`` (forward + backward) and ``bwd`` (= full - fwd on the graph timer). The rate columns are
TFLOP/s of the base matmuls alone (2 x tokens x in x out per matmul: 1 in ``fwd``, 2 in ``full``)
against the bf16 matmul rate measured in the same run, so a provider's share of the peak shows how
far from the floor it is. Peak memory of one forward + backward (``peak_mem_bytes``, CUDA only) as in
the loss bench.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _harness, and this checkout's slothc over any installed one

OP = "lora_linear"
PROVIDERS = ("base_matmul", "eager", "inductor", "slothc")
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
TOKENS = 8192
RANK, ALPHA = 16, 32
SETUPS = ("bf16", "autocast")


def lora_layer(k: int, m: int, setup: str, device):
    """PEFT's LoRA Linear on a frozen nn.Linear(k, m) (no bias), B initialised non-zero."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(k, m, bias=False, device=device, dtype=torch.bfloat16))
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"], lora_dropout=0.0, init_lora_weights=False))
    layer = model.base_model.model[0]
    if setup == "bf16":
        layer.to(torch.bfloat16)
    with torch.no_grad():  # PEFT's init_lora_weights=False is kaiming for both: keep the update O(1)
        layer.lora_A["default"].weight.normal_(0, k**-0.5)
        layer.lora_B["default"].weight.normal_(0, RANK**-0.5)
    return layer


def functional(layer, autocast: bool):
    """``fn(x, W, A, B)``: the layer with those tensors as its weights."""
    import contextlib

    import torch

    def fn(x, w, a, b):
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast and x.dtype != torch.float64 else contextlib.nullcontext()
        with ctx:
            return torch.func.functional_call(
                layer, {"base_layer.weight": w, "lora_A.default.weight": a, "lora_B.default.weight": b}, (x,)
            )

    return fn


def providers(names, layer, autocast, fused_flag):
    return compiled_providers(functional(layer, autocast), names, fused_flag, (OP,), floor="base_matmul")


def compiled_providers(fn, names, fused_flag, fusions, floor):
    """name -> builder for ``fn``: eager, Inductor, slothc (the floor provider is timed apart)."""
    import torch

    def eager():
        return fn

    def inductor():
        torch._dynamo.reset()
        return torch.compile(fn)

    table = {"eager": eager, "inductor": inductor, "slothc": slothc_builder(fn, fused_flag, fusions)}
    return {n: table[n] for n in ["eager"] + [n for n in names if n not in ("eager", floor)]}


def slothc_builder(fn, fused_flag: dict, fusions):
    """A builder of ``torch.compile(fn, backend="slothc")``; the call records the report's counts."""

    def build():
        import torch

        from _harness import Skip

        try:
            import slothc
        except Exception as e:  # noqa: BLE001
            raise Skip(f"slothc not importable: {type(e).__name__}: {e}") from None
        torch._dynamo.reset()
        report = slothc.Report()
        compiled = torch.compile(fn, backend="slothc", options={"report": report})
        names = (fusions,) if isinstance(fusions, str) else tuple(fusions)

        def call(*args):
            y = compiled(*args)
            fused_flag["fused"] = {k: report.count(k) for k in names}
            return y

        return call

    return build


def measure_memory(fn, make_set, params, device) -> dict:
    """Peak CUDA memory of one forward + backward of ``fn`` (see the module docstring)."""
    import torch

    import _harness as H

    s = make_set()
    trainable = [p for p in params if p.requires_grad]

    def fwd(_):
        return fn(s["x"], *params)

    def bwd(y):
        torch.autograd.backward(y, s["dy"])
        return None

    try:
        marks = H.peak_memory([fwd, bwd], device)
    finally:
        for t in [s["x"], *trainable]:
            t.grad = None
    return {"peak_mem_bytes": marks[1]["peak"], "mem_fwd_retained_bytes": marks[0]["retained"]}


def time_floor(rec, case, device, modes, rep_ms) -> dict:
    """The bare base matmul's rows (no correctness check: it computes the base product only)."""
    import torch
    import torch.nn.functional as F

    import _harness as H

    w = case.params[0]
    fn = lambda x, w: F.linear(x, w)  # noqa: E731
    sets = [case.make_set()]
    timed = H.time_provider(fn, sets, [w], device, modes=modes, rep_ms=rep_ms)
    extra = dict(case.extra or {}, variant=case.variant)
    mem = measure_memory(fn, case.make_set, [w], device) if H.is_cuda(device) else {"mem_skipped": "not CUDA"}
    out = {}
    for mode, (timing, fields) in timed.items():
        row = rec.add(op=case.op, provider="base_matmul", mode=mode, shape=case.shape, dtype=case.dtype, timing=timing,
                      flops=case.flops[mode], status="ok" if timing else "error", **extra, **fields, **mem)
        out[mode] = row
        print(f"[{case.op} {case.variant} {case.shape} {mode} base_matmul] {H._fmt(row.get('median_ms'), '.4f')} ms", flush=True)
    torch.cuda.empty_cache() if H.is_cuda(device) else None
    return out


def finish_case(out, rows, floor, build, make_set, params, device, fused_flag) -> None:
    """Complete a case's rows (peak memory per provider, what slothc fused, the overhead over the
    floor) and append them, the floor's first, to ``out``."""
    import _harness as H

    if H.is_cuda(device):
        for name in {r["provider"] for r in rows if r["status"] == "ok"}:
            mem = measure_memory(build(name), make_set, params, device)
            for r in rows:
                if r["provider"] == name:
                    r.update(mem)
    for r in rows:
        if r["provider"].startswith("slothc"):
            r["fused"] = fused_flag.get("fused")
    add_overheads(rows, floor)
    _write(out, [*floor.values(), *rows])


def add_overheads(rows, floor_rows):
    for r in rows:
        f = floor_rows.get(r["mode"])
        if f and f.get("median_ms") and r.get("median_ms"):
            r["overhead_vs_base_matmul"] = r["median_ms"] / f["median_ms"]


def main(argv=None):
    import _harness as H

    parser = H.bench_parser(__doc__.splitlines()[0], PROVIDERS)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--shapes", nargs="+", default=None, help="IN:OUT pairs (default 4096:4096 4096:14336 14336:4096)")
    parser.add_argument("--tokens", type=int, default=None)
    args = H.resolve_args(parser.parse_args(argv))
    import torch

    device = args.device
    shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes] if args.shapes else ([(128, 256), (256, 128)] if args.quick else SHAPES)
    tokens = args.tokens or (64 if args.quick else TOKENS)
    torch.manual_seed(0)
    # Rows are written per case, once its memory and overhead fields are in (not as they come).
    rec = H.Recorder(None, device)
    H.measure_ceilings(rec, device, matmul=True, quick=args.quick)
    _write(args.out, rec.rows)
    print(f"bf16 matmul {rec.matmul_tflops:.0f} TFLOP/s, copy {rec.copy_gbps:.0f} GB/s on {rec.env['device']}", flush=True)
    modes = [m for m in ("fwd", "bwd", "full") if m in args.modes]
    for setup in args.setups:
        autocast = setup == "autocast"
        for k, m in shapes:
            layer = lora_layer(k, m, setup, device)
            w = layer.base_layer.weight.detach().requires_grad_(False)
            a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
            b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
            a._bench_name, b._bench_name = "A", "B"

            def make_set(k=k, m=m):
                return {
                    "x": torch.randn(tokens, k, device=device, dtype=torch.bfloat16, requires_grad=True),
                    "dy": torch.randn(tokens, m, device=device, dtype=torch.bfloat16),
                }

            mm = 2 * tokens * k * m
            case = H.FwdBwdCase(
                op=OP, variant=setup, shape=(tokens, k, m), dtype=torch.bfloat16, make_set=make_set, params=[w, a, b],
                bytes_moved={mode: None for mode in modes}, flops={"fwd": mm, "bwd": mm, "full": 2 * mm},
                extra={"rank": RANK, "lora_alpha": ALPHA, "tokens": tokens, "in_features": k, "out_features": m},
            )
            floor = time_floor(rec, H.FwdBwdCase(**{**case.__dict__, "params": [w]}), device, modes, args.rep_ms) if "base_matmul" in args.providers else {}
            fused_flag: dict = {}
            rows = H.run_fwd_bwd(rec, case, providers(args.providers, layer, autocast, fused_flag), device, modes=modes, rep_ms=args.rep_ms)
            finish_case(args.out, rows, floor, lambda name: providers([name], layer, autocast, fused_flag)[name](),
                        make_set, case.params, device, fused_flag)
            del layer
            torch.cuda.empty_cache() if H.is_cuda(device) else None
    H.finish(rec, f"{OP} (bf16 base, r={RANK})", args.table)
    return rec.rows


def _write(path, rows):
    import json

    if path:
        with open(path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
