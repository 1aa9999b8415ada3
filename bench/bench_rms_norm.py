"""RMSNorm forward and backward: eager (HF Llama), Inductor, Liger-Kernel, slothc.

    python3 bench/bench_rms_norm.py --out results.jsonl            # GPU: hidden 2048/4096/8192, 16384 rows
    TRITON_INTERPRET=1 python3 bench/bench_rms_norm.py --quick     # CPU smoke run, tiny sizes

Providers, all computing Llama's RMSNorm ``w * (xf * rsqrt(mean(xf**2) + eps)).to(x.dtype)``,
``xf = x.float()``:

- ``eager``: the forward of ``transformers``' ``LlamaRMSNorm`` as plain torch (checked bitwise against
  the HF module when transformers imports); the reference every other provider is checked against.
- ``inductor``: ``torch.compile`` (default options) of that same function.
- ``liger``: ``LigerRMSNormFunction`` in casting mode "llama", ``in_place=False`` (in place, its
  backward writes dx over dy, and dy is shared by all providers; the bytes are the same either way).
- ``slothc``: ``torch.ops.slothc.rms_norm(x, w, eps, offset=0.0, cast_before_weight=True)``.

Variants: ``frozen`` (weight does not require grad: LoRA) and ``trainable`` (backward also gives dw).
x always requires grad.

Bytes model: the fewest bytes the op must move through device memory, each tensor read or written
once; H = hidden, N = rows, e = element size of the dtype:

    fwd:  read x (N*H*e) + read w (H*e) + write y (N*H*e)
    bwd:  read dy (N*H*e) + read x (N*H*e) + read w (H*e) + write dx (N*H*e) [+ write dw (H*e) if trainable]
    full: fwd + bwd

Not counted: the per-row 1/rms a kernel may save in the forward and read in the backward (N*4
bytes each way, 1/H of the traffic: under 0.1% at H >= 2048) and the fp32 dw partial sums a kernel
may write and read back (2*SMs*H*4 bytes, about 1% of the bwd at 16384 rows on 132 SMs): they are
implementation choices, not the op's needs. The full mode reads x twice, as any split forward and
backward must.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _harness, and this checkout's slothc over any installed one

OP = "rms_norm"
EPS = 1e-6
PROVIDERS = ("eager", "inductor", "liger", "slothc")


def llama_rms_norm(x, weight, eps: float = EPS):
    """``transformers.models.llama.modeling_llama.LlamaRMSNorm.forward``, with the weight passed in."""
    import torch

    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def bytes_moved(rows: int, hidden: int, elem: int, trainable: bool) -> dict:
    act, par = rows * hidden * elem, hidden * elem
    fwd = act + par + act  # x, w, y
    bwd = act + act + par + act + (par if trainable else 0)  # dy, x, w, dx, [dw]
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def eager_matches_hf(device, dtype, hidden: int):
    """Whether ``llama_rms_norm`` equals HF's LlamaRMSNorm bitwise; None if transformers won't import."""
    import torch

    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except Exception:  # noqa: BLE001
        return None
    m = LlamaRMSNorm(hidden, eps=EPS).to(device=device, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype))
        x = torch.randn(64, hidden, device=device, dtype=dtype)
        return bool(torch.equal(m(x), llama_rms_norm(x, m.weight, EPS)))


def providers(names):
    """name -> builder; a builder returns ``fn(x, w) -> y`` for one case or raises ``Skip``."""
    import torch

    from _harness import Skip

    def eager():
        return llama_rms_norm

    def inductor():
        torch._dynamo.reset()  # a fresh compile for this shape and variant
        return torch.compile(llama_rms_norm)

    def liger():
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        except Exception as e:  # noqa: BLE001
            raise Skip(f"liger_kernel not importable: {type(e).__name__}: {e}") from None
        return lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)

    def slothc():
        try:
            import slothc.kernels.rms_norm  # noqa: F401  registers torch.ops.slothc.rms_norm
            op = torch.ops.slothc.rms_norm
        except Exception as e:  # noqa: BLE001
            raise Skip(f"slothc rms_norm op not available: {type(e).__name__}: {e}") from None
        return lambda x, w: op(x, w, EPS, 0.0, True)

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
        hf = eager_matches_hf(device, dtype, h)
        if hf is False:
            print(f"WARNING: llama_rms_norm differs from transformers' LlamaRMSNorm at hidden {h}")
        for variant in args.variants:
            trainable = variant == "trainable"
            w = (1 + 0.1 * torch.randn(h, device=device, dtype=dtype)).requires_grad_(trainable)
            w._bench_name = "w"

            def make_set(h=h):
                return {
                    "x": torch.randn(rows, h, device=device, dtype=dtype, requires_grad=True),
                    "dy": torch.randn(rows, h, device=device, dtype=dtype),
                }

            case = H.FwdBwdCase(
                op=OP, variant=variant, shape=(rows, h), dtype=dtype, make_set=make_set, params=[w],
                bytes_moved=bytes_moved(rows, h, dtype.itemsize, trainable),
                extra={"eps": EPS, "eager_matches_hf": hf},
            )
            H.run_fwd_bwd(rec, case, provs, device, modes=args.modes, rep_ms=args.rep_ms)
    H.finish(rec, f"{OP} ({args.dtype})", args.table)
    return rec.rows


if __name__ == "__main__":
    main()
