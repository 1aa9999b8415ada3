"""LayerNorm forward and backward: eager (F.layer_norm), Inductor, Liger-Kernel, slothc.

    python3 bench/bench_layer_norm.py --out results.jsonl          # GPU: hidden 2048/4096/8192, 16384 rows
    TRITON_INTERPRET=1 python3 bench/bench_layer_norm.py --quick   # CPU smoke run, tiny sizes

Providers, all computing ``F.layer_norm(x, (H,), w, b, eps)`` over the last dim:

- ``eager``: ``torch.nn.functional.layer_norm`` (ATen's fused kernels on CUDA); the reference every
  other provider is checked against.
- ``inductor``: ``torch.compile`` (default options) of that same call.
- ``liger``: ``LigerLayerNormFunction`` (Liger's Triton kernels; its dw/db are skipped when frozen).
- ``slothc``: ``torch.ops.slothc.layer_norm(x, w, b, eps)``.

Variants: ``frozen`` (weight and bias do not require grad: LoRA) and ``trainable`` (backward also
gives dw and db). x always requires grad.

Bytes model: the fewest bytes the op must move through device memory, each tensor read or written
once; H = hidden, N = rows, e = element size of the dtype:

    fwd:  read x (N*H*e) + read w, b (2*H*e) + write y (N*H*e)
    bwd:  read dy (N*H*e) + read x (N*H*e) + read w (H*e) + write dx (N*H*e)
          [+ write dw, db (2*H*e) if trainable]
    full: fwd + bwd

Not counted: the per-row mean and 1/std a kernel may save in the forward and read in the backward
(2*N*4 bytes each way, under 0.2% at H >= 2048) and the fp32 dw/db partial sums a kernel may write
and read back (about 2% of the bwd at 16384 rows on 132 SMs): implementation choices, not the op's
needs. The bias is not needed by the backward. The full mode reads x twice, as any split forward
and backward must.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _harness, and this checkout's slothc over any installed one

OP = "layer_norm"
EPS = 1e-5
PROVIDERS = ("eager", "inductor", "liger", "slothc")


def torch_layer_norm(x, weight, bias, eps: float = EPS):
    import torch.nn.functional as F

    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def bytes_moved(rows: int, hidden: int, elem: int, trainable: bool) -> dict:
    act, par = rows * hidden * elem, hidden * elem
    fwd = act + 2 * par + act  # x, w, b, y
    bwd = act + act + par + act + (2 * par if trainable else 0)  # dy, x, w, dx, [dw, db]
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def providers(names):
    """name -> builder; a builder returns ``fn(x, w, b) -> y`` for one case or raises ``Skip``."""
    import torch

    from _harness import Skip

    def eager():
        return torch_layer_norm

    def inductor():
        torch._dynamo.reset()  # a fresh compile for this shape and variant
        return torch.compile(torch_layer_norm)

    def liger():
        try:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        except Exception as e:  # noqa: BLE001
            raise Skip(f"liger_kernel not importable: {type(e).__name__}: {e}") from None
        return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)

    def slothc():
        try:
            import slothc.kernels.layer_norm  # noqa: F401  registers torch.ops.slothc.layer_norm
            op = torch.ops.slothc.layer_norm
        except Exception as e:  # noqa: BLE001
            raise Skip(f"slothc layer_norm op not available: {type(e).__name__}: {e}") from None
        return lambda x, w, b: op(x, w, b, EPS)

    table = {"eager": eager, "inductor": inductor, "liger": liger, "slothc": slothc}
    return {n: table[n] for n in ["eager"] + [n for n in names if n != "eager"]}


def main(argv=None):
    import _harness as H

    args = H.resolve_args(H.bench_parser(__doc__.splitlines()[0], PROVIDERS).parse_args(argv))
    import torch

    device, dtype, rows = args.device, args.torch_dtype, args.rows
    torch.manual_seed(0)
    rec = H.Recorder(args.out, device)
    H.measure_ceilings(rec, device, matmul=not args.no_matmul_peak, quick=args.quick)
    print(f"copy bandwidth {rec.copy_gbps:.0f} GB/s (read + written) on {rec.env['device']}", flush=True)
    provs = providers(args.providers)
    for h in args.hidden:
        for variant in args.variants:
            trainable = variant == "trainable"
            w = (1 + 0.1 * torch.randn(h, device=device, dtype=dtype)).requires_grad_(trainable)
            b = (0.1 * torch.randn(h, device=device, dtype=dtype)).requires_grad_(trainable)
            w._bench_name, b._bench_name = "w", "b"

            def make_set(h=h):
                return {
                    "x": torch.randn(rows, h, device=device, dtype=dtype, requires_grad=True),
                    "dy": torch.randn(rows, h, device=device, dtype=dtype),
                }

            case = H.FwdBwdCase(
                op=OP, variant=variant, shape=(rows, h), dtype=dtype, make_set=make_set, params=[w, b],
                bytes_moved=bytes_moved(rows, h, dtype.itemsize, trainable), extra={"eps": EPS},
            )
            H.run_fwd_bwd(rec, case, provs, device, modes=args.modes, rep_ms=args.rep_ms)
    H.finish(rec, f"{OP} ({args.dtype})", args.table)
    return rec.rows


if __name__ == "__main__":
    main()
