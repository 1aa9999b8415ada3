"""RoPE of q and k, forward and backward: eager (HF), Inductor, slothc, Liger-Kernel.

    python3 bench/bench_rope.py --out results.jsonl                 # GPU: seq 8192, 32 q / 8 kv heads, head dim 128
    TRITON_INTERPRET=1 python3 bench/bench_rope.py --quick          # CPU smoke run, tiny sizes

The input set is what attention hands the rotation: q and k projections ``[B, S, H*D]`` (the two
leaves), viewed per head and transposed to heads-first ``[B, H, S, D]`` (strided views, as in every
HF model), cos/sin ``[1, S, r]`` in the model dtype (what the rotary module returns). The upstream
gradients come in the layout SDPA's backward gives them (that of its inputs: ``[B, S, H, D]`` in
memory, ``sdpa``), or contiguous (a matmul-based attention's backward gives those; ``--grad-layouts``).
Forms (``--forms``):

- ``rotate_half``: Llama's ``apply_rotary_pos_emb``;
- ``partial``: Phi-3's, the first ``r = D/2`` channels rotated, the rest passed through;
- ``interleaved``: GPT-J's ``rotate_every_two`` with Llama's broadcasting.

Providers:

- ``eager``: the HF function (the reference every other provider is checked against);
- ``inductor``: ``torch.compile`` of it (default options);
- ``slothc``: ``torch.compile(..., backend="slothc")`` of it: the rope pass rewrites q's and k's
  rotations into one ``slothc::rope`` call (rows carry ``fused``: the report's count, ``{"rope": 2}``
  = q and k);
  Compiled providers return q and k from their graph, so AOTAutograd makes their gradients
  contiguous on the way in (a copy of dq and dk) when they come in SDPA's layout; in a model the
  attention is in the same graph and no such copy happens. The ``contiguous`` rows have none.
- ``slothc_op``: ``torch.ops.slothc.rope`` called directly on the same views (no compile), as
  Liger's function is: the kernel pair without a graph boundary in the way;
- ``liger``: ``LigerRopeFunction`` (rotate_half and partial; it has no interleaved form). It
  rotates q and k in place, so it runs last: the inputs it overwrites are no one else's reference.

Bytes model (the fewest bytes the op moves, each tensor once; N = B*S positions, Hq/Hk heads, D head
dim, r rotary dim, e element size)::

    fwd:  read q, k and write their results: 2 * N * (Hq + Hk) * D * e, + read cos, sin: 2 * N * r * e
    bwd:  the same for dq, dk -> dx_q, dx_k
    full: fwd + bwd
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _harness, and this checkout's slothc over any installed one

OP = "rope"
PROVIDERS = ("eager", "inductor", "slothc", "slothc_op", "liger")  # liger last: it writes over its inputs
FORMS = ("rotate_half", "partial", "interleaved")


def _rotate_every_two(x):
    """GPT-J's ``rotate_every_two``."""
    import torch

    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def eager_fn(form: str, heads: tuple, head_dim: int):
    """``fn((xq, xk), cos, sin) -> (q_embed, k_embed)`` as the model's attention computes it."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply

    def split(xs):
        xq, xk = xs
        b, s, _ = xq.shape
        q = xq.view(b, s, heads[0], head_dim).transpose(1, 2)
        k = xk.view(b, s, heads[1], head_dim).transpose(1, 2)
        return q, k

    if form == "rotate_half":
        def fn(xs, cos, sin):
            return llama_apply(*split(xs), cos, sin)
    elif form == "partial":
        def fn(xs, cos, sin):
            return phi3_apply(*split(xs), cos, sin)
    else:
        def fn(xs, cos, sin):
            q, k = split(xs)
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            return (q * c) + (_rotate_every_two(q) * s), (k * c) + (_rotate_every_two(k) * s)
    return fn, split


def bytes_moved(n: int, heads: tuple, head_dim: int, rotary_dim: int, elem: int) -> dict:
    one = 2 * n * (heads[0] + heads[1]) * head_dim * elem + 2 * n * rotary_dim * elem
    return {"fwd": one, "bwd": one, "full": 2 * one}


def providers(names, form, heads, head_dim, fused_flag):
    import torch

    from _harness import Skip

    fn, split = eager_fn(form, heads, head_dim)

    def eager():
        return fn

    def inductor():
        torch._dynamo.reset()
        return torch.compile(fn)

    from bench_lora_linear import slothc_builder

    slothc = slothc_builder(fn, fused_flag, "rope")

    def slothc_op():
        try:
            import slothc.kernels.rope  # noqa: F401  registers torch.ops.slothc.rope
        except Exception as e:  # noqa: BLE001
            raise Skip(f"slothc rope op not available: {type(e).__name__}: {e}") from None
        rotary_dim = head_dim // 2 if form == "partial" else head_dim

        def call(xs, cos, sin):
            q, k = split(xs)
            return tuple(torch.ops.slothc.rope(q, k, cos.unsqueeze(1), sin.unsqueeze(1), rotary_dim, form == "interleaved", None, False))

        return call

    def liger():
        if form == "interleaved":
            raise Skip("Liger-Kernel's RoPE has no interleaved form")
        try:
            from liger_kernel.ops.rope import LigerRopeFunction
        except Exception as e:  # noqa: BLE001
            raise Skip(f"liger_kernel not importable: {type(e).__name__}: {e}") from None
        return lambda xs, cos, sin: LigerRopeFunction.apply(*split(xs), cos, sin)

    table = {"eager": eager, "inductor": inductor, "slothc": slothc, "slothc_op": slothc_op, "liger": liger}
    order = ["eager"] + [n for n in PROVIDERS if n in names and n != "eager"]
    return {n: table[n] for n in order}


def main(argv=None):
    import _harness as H

    parser = H.bench_parser(__doc__.splitlines()[0], PROVIDERS)
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 8192; quick 16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", default="32:8", help="query heads:key/value heads (default 32:8)")
    parser.add_argument("--head-dim", type=int, default=None, help="default 128; quick 64")
    parser.add_argument("--grad-layouts", nargs="+", default=["sdpa", "contiguous"], choices=["sdpa", "contiguous"],
                        help="layout of the upstream gradients dq, dk")
    args = H.resolve_args(parser.parse_args(argv))
    import torch

    device, dtype = args.device, args.torch_dtype
    seq = args.seq or (16 if args.quick else 8192)
    head_dim = args.head_dim or (64 if args.quick else 128)
    heads = tuple(int(h) for h in args.heads.split(":"))
    if args.quick and args.heads == "32:8":
        heads = (4, 2)
    b, n = args.batch, args.batch * seq
    torch.manual_seed(0)
    from bench_lora_linear import _write

    # Rows are written per case, once the slothc rows carry what was fused (not as they come).
    rec = H.Recorder(None, device)
    H.measure_ceilings(rec, device, matmul=False, quick=args.quick)
    _write(args.out, rec.rows)
    print(f"copy bandwidth {rec.copy_gbps:.0f} GB/s (read + written) on {rec.env['device']}", flush=True)
    for form, grad_layout in [(f, g) for g in args.grad_layouts for f in args.forms]:
        rotary_dim = head_dim // 2 if form == "partial" else head_dim
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))
        freqs = torch.arange(seq, device=device, dtype=torch.float32)[None, :, None] * inv_freq
        emb = freqs.repeat_interleave(2, -1) if form == "interleaved" else torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)  # [1, S, r], as the rotary module returns them
        cos._bench_name, sin._bench_name = "cos", "sin"

        def make_set():
            xq = torch.randn(b, seq, heads[0] * head_dim, device=device, dtype=dtype, requires_grad=True)
            xk = torch.randn(b, seq, heads[1] * head_dim, device=device, dtype=dtype, requires_grad=True)
            # SDPA's backward returns dq, dk in its inputs' layout: [B, S, H, D] in memory
            dq = torch.randn(b, seq, heads[0], head_dim, device=device, dtype=dtype).transpose(1, 2)
            dk = torch.randn(b, seq, heads[1], head_dim, device=device, dtype=dtype).transpose(1, 2)
            if grad_layout == "contiguous":
                dq, dk = dq.contiguous(), dk.contiguous()
            return {"x": (xq, xk), "dy": (dq, dk)}

        fused_flag: dict = {}
        case = H.FwdBwdCase(
            op=OP, variant=form if grad_layout == "sdpa" else f"{form}, dy contiguous", shape=(b, seq, heads[0], heads[1], head_dim), dtype=dtype, make_set=make_set,
            params=[cos, sin], bytes_moved=bytes_moved(n, heads, head_dim, rotary_dim, dtype.itemsize),
            extra={"grad_layout": grad_layout, "rotary_dim": rotary_dim, "q_heads": heads[0], "kv_heads": heads[1], "head_dim": head_dim, "seq": seq},
        )
        rows = H.run_fwd_bwd(rec, case, providers(args.providers, form, heads, head_dim, fused_flag), device,
                             modes=args.modes, rep_ms=args.rep_ms)
        for r in rows:
            if r["provider"] == "slothc":
                r["fused"] = fused_flag.get("fused")
                if r["status"] == "ok" and (fused_flag.get("fused") or {}).get("rope") != 2:
                    print(f"WARNING: slothc fused {fused_flag.get('fused')} of {form}, expected rope: 2 (q and k)")
        _write(args.out, rows)
    H.finish(rec, f"{OP} ({args.dtype})", args.table)
    return rec.rows


if __name__ == "__main__":
    main()
