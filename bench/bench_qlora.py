"""QLoRA: the 4-bit dequantisation kernel, a QLoRA linear forward + backward, and a full training step.

    python3 bench/bench_qlora.py --out results.jsonl                      # GPU: every part below
    python3 bench/bench_qlora.py --parts step --out results.jsonl         # one part
    TRITON_INTERPRET=1 python3 bench/bench_qlora.py --quick               # CPU smoke run, tiny sizes

Parts (``--parts``):

- ``dequant``: NF4 with double-quantised absmax (bitsandbytes' QLoRA default, blocksize 64) to bf16,
  weights of 4096 x 4096, 14336 x 4096 and 128256 x 4096. Providers: ``slothc``
  (``slothc::dequantize_4bit``, the Triton kernel) and ``bitsandbytes`` (its CUDA
  ``dequantize_4bit``, with the absmax decoded by its ``dequantize_blockwise`` as its own matmul
  path does). Bytes moved: n/2 codes read, 2n bytes written, the 8-bit absmax and its scales read;
  GB/s and the fraction of the copy bandwidth measured in the same run. CUDA-graph timed, input sets
  rotated past the L2.
- ``gemm``: where to dequantise, measured: the forward base product ``x W^T`` at 8192 tokens as
  ``bf16_matmul`` (cuBLAS on a resident bf16 W: the floor), ``dequant+cublas`` (the kernel above,
  then cuBLAS: what slothc::qlora_linear does) and ``fused_gemm_trial`` (a Triton GEMM that
  dequantises each W tile as it loads it, never writing W: the kernel's code-pair table, one scale a
  tile row; plain fp32 absmax, which favours it; autotuned over four tile shapes).
- ``linear``: one QLoRA linear, forward and backward: PEFT's ``lora.bnb.Linear4bit`` on a
  bitsandbytes ``Linear4bit`` (NF4, double quant, compute bf16), r=16, 8192 tokens, (in, out) =
  (4096, 4096), (4096, 14336); x bf16 requiring grad, fp32 adapters under bf16 autocast (PEFT's
  default adapter dtype, HF Trainer's bf16=True). Providers ``eager``, ``inductor``
  (``torch.compile``), ``slothc`` (``backend="slothc"``: the layer becomes ``slothc::qlora_linear``),
  and ``base_matmul`` (``F.linear`` with a resident bf16 W, forward and dX: the floor).
- ``step``: a Llama-3.1-8B-shaped model (hidden 4096, 32 layers, 32/8 heads, MLP 14336, vocab
  128256), random weights in bf16 quantised to NF4 + double quant by bitsandbytes, PEFT LoRA r=16 on
  every linear but lm_head, AdamW on the adapters, batch 2 x 2048 tokens, bf16 autocast. One step =
  forward, backward, optimizer step. tokens/s over timed steps after warm-up, and the peak memory
  allocated during a step (``torch.cuda.max_memory_allocated``, model included), also over every
  step with the first (``peak_all_steps_bytes``) and the most the allocator reserved
  (``peak_reserved_bytes``): CUDA graphs keep their memory pool reserved, and a replay allocates
  nothing, so for ``slothc_cudagraphs`` the timed steps' allocated peak leaves the pool out. Providers
  ``eager`` (bitsandbytes + PEFT as they are), ``inductor`` (``torch.compile`` default),
  ``slothc`` and ``slothc_cudagraphs`` (``backend="slothc"`` with ``mode="reduce-overhead"``:
  Inductor records CUDA graphs of the forward and the backward); ``--step-providers`` picks
  (default eager, slothc, slothc_cudagraphs). ``--checkpointing on`` (or ``both``): with gradient
  checkpointing (non-reentrant), as QLoRA recipes run it. ``--slothc-logits drop``: the slothc
  variants compute the loss without the logits (``logits="drop"``, for training loops that read
  ``outputs.loss`` only, as HF's Trainer does).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _harness, and this checkout's slothc over any installed one

OP = "qlora_linear"
DEQUANT_SHAPES = ((4096, 4096), (14336, 4096), (128256, 4096))
LINEAR_SHAPES = ((4096, 4096), (4096, 14336))
TOKENS, RANK, ALPHA = 8192, 16, 32
PARTS = ("dequant", "gemm", "linear", "step")
STEP_PROVIDERS = ("eager", "inductor", "slothc", "slothc_cudagraphs")


def _quantize(w, blocksize=64, quant_type="nf4", nested=True):
    import bitsandbytes.functional as BF

    return BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def _state(packed, qs):
    from slothc.kernels.qlora_linear import state_tensors

    return state_tensors(packed, qs)


# -- dequant -----------------------------------------------------------------------------------------


def bench_dequant(rec, device, quick, rep_ms):
    import torch
    import bitsandbytes.functional as BF

    import _harness as H
    import slothc.ops  # noqa: F401

    shapes = ((256, 512), (64, 1024)) if quick else DEQUANT_SHAPES
    for m, k in shapes:
        n = m * k
        n_blocks = n // 64
        moved = n // 2 + 2 * n + n_blocks + 4 * (n_blocks // 256 + 1)
        one = 4 * n // 2 + 2 * n
        sets = []
        for i in range(H.rotation_count(one, device, limit=4)):
            packed, qs = _quantize(torch.randn(m, k, device=device, dtype=torch.bfloat16) * 0.02)
            sets.append((packed, qs))
        providers = {
            "slothc": lambda s: torch.ops.slothc.dequantize_4bit(*_state(*s), [m, k], 64, "nf4", torch.bfloat16, 256),
            "bitsandbytes": lambda s: BF.dequantize_4bit(s[0], s[1]),
        }
        ref = providers["bitsandbytes"](sets[0])
        for name, fn in providers.items():
            out = fn(sets[0])
            exact = bool(torch.equal(out.to(torch.bfloat16), ref.to(torch.bfloat16)))
            try:
                t = H.time_graphs(lambda s, fn=fn: fn(s), sets, device, rep_ms=rep_ms) if H.is_cuda(device) else \
                    H.time_fn(lambda fn=fn: fn(sets[0]), device, rep_ms=rep_ms)
                row = rec.add(op="dequantize_4bit", provider=name, mode="fwd", shape=(m, k), dtype=torch.bfloat16, timing=t,
                              bytes_moved=moved, variant="nf4, double-quant, blocksize 64", bit_exact_vs_bitsandbytes=exact)
                print(f"[dequant {m}x{k} {name}] {row['median_ms']:.4f} ms {H._fmt(row['gbps'], '.0f')} GB/s "
                      f"{H._fmt(H._pct(row['frac_copy_bw']), '.0f')}% copy  bit-exact {exact}", flush=True)
            except Exception as e:  # noqa: BLE001
                rec.add(op="dequantize_4bit", provider=name, mode="fwd", shape=(m, k), dtype=torch.bfloat16, status="error",
                        reason=f"{type(e).__name__}: {e}"[:500])
        del sets
        torch.cuda.empty_cache() if H.is_cuda(device) else None


# -- gemm: fused-dequant GEMM trial -------------------------------------------------------------------


def _fused_gemm_kernel():
    import triton
    import triton.language as tl

    configs = [
        triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BM": 128, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]

    @triton.autotune(configs=configs, key=["M", "N", "K"])
    @triton.jit
    def kernel(x_ptr, p_ptr, absmax_ptr, pairs_ptr, y_ptr, M, N, K, BLOCKSIZE: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        # BK == BLOCKSIZE: one absmax a tile row and k step
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rb = tl.arange(0, BK // 2)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            x = tl.load(x_ptr + rm[:, None] * K + (k0 + tl.arange(0, BK))[None, :])
            b = tl.load(p_ptr + rn[:, None].to(tl.int64) * (K // 2) + (k0 // 2 + rb)[None, :]).to(tl.int32)
            scale = tl.load(absmax_ptr + (rn.to(tl.int64) * K + k0) // BLOCKSIZE)
            pair = tl.load(pairs_ptr + b)
            hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True) * scale[:, None]
            lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True) * scale[:, None]
            w = tl.reshape(tl.join(hi, lo), (BN, BK)).to(tl.bfloat16)
            acc += tl.dot(x, tl.trans(w))
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))

    return kernel


def code_pairs(quant_type, device):
    """int64 [256]: for each byte value the fp32 bits of its high nibble's code (low 32 bits) and its
    low nibble's (high 32 bits): one table load a byte in the trial's inner loop."""
    import torch

    from slothc.kernels import qlora_linear as qmod

    bits = qmod.code_book(quant_type, torch.device("cpu")).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    v = torch.arange(256)
    return (bits[v >> 4] | (bits[v & 15] << 32)).to(device)


def fused_gemm(x, packed, absmax, pairs, n, blocksize, kernel):
    import torch
    import triton

    m, k = x.shape
    y = torch.empty((m, n), device=x.device, dtype=torch.bfloat16)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    kernel[grid](x, packed, absmax, pairs, y, m, n, k, BLOCKSIZE=blocksize)
    return y


def bench_gemm(rec, device, quick, rep_ms):
    import torch
    import torch.nn.functional as F

    import _harness as H
    from slothc.kernels import qlora_linear as qmod

    if not H.is_cuda(device):
        print("[gemm] skipped: the fused GEMM trial needs CUDA", flush=True)
        return
    kernel = _fused_gemm_kernel()
    tokens = TOKENS
    for k, n in LINEAR_SHAPES + ((14336, 4096),):
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * k**-0.5
        packed, qs = _quantize(w, nested=False)
        w_dq = qmod.dequantize(*_state(packed, qs), [n, k], 64, "nf4", torch.bfloat16)
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        pairs = code_pairs("nf4", x.device)
        providers = {
            "bf16_matmul": lambda: F.linear(x, w_dq),
            "dequant+cublas": lambda: F.linear(x, qmod.dequantize(*_state(packed, qs), [n, k], 64, "nf4", torch.bfloat16)),
            "fused_gemm_trial": lambda: fused_gemm(x, packed, qs.absmax, pairs, n, 64, kernel),
        }
        ref = providers["bf16_matmul"]()
        flops = 2 * tokens * k * n
        for name, fn in providers.items():
            try:
                out = fn()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                t = H.time_graphs(lambda s, fn=fn: fn(), [{}], device, rep_ms=rep_ms)
                row = rec.add(op="qlora_base_gemm", provider=name, mode="fwd", shape=(tokens, k, n), dtype=torch.bfloat16, timing=t,
                              flops=flops, rel_err_vs_dequantised=err, variant="nf4, blocksize 64")
                print(f"[gemm {tokens}x{k}->{n} {name}] {row['median_ms']:.4f} ms {row['tflops']:.0f} TFLOP/s "
                      f"({H._fmt(H._pct(row.get('frac_matmul_peak')), '.0f')}% of matmul peak) err {err:.2g}", flush=True)
            except Exception as e:  # noqa: BLE001
                rec.add(op="qlora_base_gemm", provider=name, mode="fwd", shape=(tokens, k, n), dtype=torch.bfloat16, status="error",
                        reason=f"{type(e).__name__}: {e}"[:500])
                print(f"[gemm {name}] error: {e}"[:300], flush=True)
        del w, w_dq, x, packed
        torch.cuda.empty_cache()


# -- linear ------------------------------------------------------------------------------------------


class _Holder:
    pass


def qlora_layer(k, m, device):
    """PEFT's 4-bit LoRA layer on a bitsandbytes Linear4bit (NF4, double quant, compute bf16)."""
    import torch
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    base = bnb.nn.Linear4bit(k, m, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(m, k, dtype=torch.bfloat16) * k**-0.5, requires_grad=False, blocksize=64,
                                    compress_statistics=True, quant_type="nf4")
    holder = torch.nn.Sequential(base.to(device))
    holder.is_loaded_in_4bit = True  # PEFT picks its bnb layer by transformers' flag
    model = get_peft_model(holder, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"], lora_dropout=0.0, init_lora_weights=False))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.normal_(0, k**-0.5)
        layer.lora_B["default"].weight.normal_(0, RANK**-0.5)
    layer.train()
    return layer


def qlora_functional(layer):
    """``fn(x, A, B)`` under bf16 autocast; on float64 inputs the exact math on the dequantised W."""
    import torch
    import torch.nn.functional as F

    from slothc.kernels import qlora_linear as qmod

    qs = layer.base_layer.weight.quant_state
    w64 = qmod.dequantize_4bit_reference(*_state(layer.base_layer.weight.data, qs), qs.shape, qs.blocksize, qs.quant_type,
                                         torch.float32).double()
    scaling = layer.scaling["default"]

    def fn(x, a, b):
        if x.dtype == torch.float64:  # the float64 reference of the correctness gate
            return F.linear(x, w64) + F.linear(F.linear(x, a), b) * scaling
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return torch.func.functional_call(layer, {"lora_A.default.weight": a, "lora_B.default.weight": b}, (x,))

    return fn


def bench_linear(rec, device, quick, rep_ms, out_path):
    import torch

    import _harness as H
    from bench_lora_linear import compiled_providers, finish_case, time_floor

    shapes = ((128, 256), (256, 128)) if quick else LINEAR_SHAPES
    tokens = 64 if quick else TOKENS
    modes = ["fwd", "bwd", "full"]
    for k, m in shapes:
        layer = qlora_layer(k, m, device)
        a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
        b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
        a._bench_name, b._bench_name = "A", "B"
        qs = layer.base_layer.weight.quant_state
        from slothc.kernels import qlora_linear as qmod

        w_bf16 = qmod.dequantize(*_state(layer.base_layer.weight.data, qs), qs.shape, 64, "nf4", torch.bfloat16)

        def make_set(k=k, m=m):
            return {"x": torch.randn(tokens, k, device=device, dtype=torch.bfloat16, requires_grad=True),
                    "dy": torch.randn(tokens, m, device=device, dtype=torch.bfloat16)}

        mm = 2 * tokens * k * m
        case = H.FwdBwdCase(op=OP, variant="nf4 double-quant, autocast bf16, fp32 adapters", shape=(tokens, k, m), dtype=torch.bfloat16,
                            make_set=make_set, params=[a, b], bytes_moved={mode: None for mode in modes},
                            flops={"fwd": mm, "bwd": mm, "full": 2 * mm},
                            extra={"rank": RANK, "lora_alpha": ALPHA, "tokens": tokens, "in_features": k, "out_features": m})
        floor_case = H.FwdBwdCase(**{**case.__dict__, "params": [w_bf16]})
        floor = time_floor(rec, floor_case, device, modes, rep_ms)
        fused_flag: dict = {}
        fn = qlora_functional(layer)
        build = lambda names: compiled_providers(fn, names, fused_flag, (OP,), floor="base_matmul")  # noqa: E731
        rows = H.run_fwd_bwd(rec, case, build(["eager", "inductor", "slothc"]), device, modes=modes, rep_ms=rep_ms)
        finish_case(out_path, rows, floor, lambda name: build([name])[name](), make_set, case.params, device, fused_flag)
        del layer, w_bf16
        torch.cuda.empty_cache() if H.is_cuda(device) else None


# -- step --------------------------------------------------------------------------------------------


def llama_8b_config(quick):
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           vocab_size=512, max_position_embeddings=256)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)


def quantized_model(config, device, seed=0):
    """A random bf16 model whose decoder linears are bitsandbytes NF4 (double quant) ``Linear4bit``,
    as ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`` gives."""
    import torch
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for name, module in list(model.model.layers.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, blocksize=64, compress_statistics=True,
                                             quant_type="nf4")
                q = q.to(device)  # quantises
                setattr(module, child_name, q)
                del child
    model.is_loaded_in_4bit = True
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return model


def bench_step(rec, device, quick, checkpointing, steps, warmup, budget_s, providers=("eager", "slothc", "slothc_cudagraphs"),
               logits="keep"):
    import torch
    from peft import LoraConfig, get_peft_model

    import _harness as H

    config = llama_8b_config(quick)
    batch, seq = (2, 64) if quick else (2, 2048)
    variants = [(p, ckpt) for ckpt in {"off": (False,), "on": (True,), "both": (False, True)}[checkpointing] for p in providers]
    start = time.time()
    for provider, ckpt in variants:
        if time.time() - start > budget_s:
            rec.add(op="qlora_step", provider=provider, mode="step", shape=(batch, seq), dtype=torch.bfloat16, status="skipped",
                    reason=f"time budget ({budget_s:.0f} s) spent", gradient_checkpointing=ckpt)
            continue
        torch._dynamo.reset()
        model = quantized_model(config, device)
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0))
        if ckpt:
            from slothc import tiny

            tiny.enable_checkpointing(model.base_model.model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        report = None
        run = model
        cudagraphs = provider == "slothc_cudagraphs"
        if provider.startswith("slothc"):
            import slothc

            report = slothc.Report()
            mode = "reduce-overhead" if cudagraphs else "default"
            run = torch.compile(model, backend="slothc", options={"report": report, "mode": mode, "logits": logits})
        elif provider == "inductor":
            run = torch.compile(model)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)

        def step():
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the last one's outputs may be reused
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss = run(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach().clone()  # a CUDA-graph output is overwritten by the next replay

        try:
            cuda = H.is_cuda(device)
            torch.cuda.reset_peak_memory_stats() if cuda else None
            t0 = time.time()
            first = step().item()
            compile_s = time.time() - t0
            for _ in range(warmup - 1):
                step()
            H.synchronize(device)
            # Over every step, the first (compile; CUDA graphs: their recording) included: a CUDA
            # graph's memory pool is allocated while it is recorded and then held (reserved, not
            # "allocated" during a replay), so the timed steps alone would not show it.
            peak_all = torch.cuda.max_memory_allocated() if cuda else None
            reserved = torch.cuda.max_memory_reserved() if cuda else None
            torch.cuda.reset_peak_memory_stats() if cuda else None
            t0 = time.time()
            losses = [step() for _ in range(steps)]
            H.synchronize(device)
            dt = (time.time() - t0) / steps
            peak = torch.cuda.max_memory_allocated() if cuda else None
            reserved = max(reserved, torch.cuda.max_memory_reserved()) if cuda else None
            fused = {k: report.count(k) for k in ("qlora_linear", "rms_norm", "rope", "mlp", "linear_cross_entropy", "causal_mask")} if report else None
            skipped = [f"{s.fusion} {s.module}: {s.reason}" for s in report.skipped][:20] if report else None
            row = rec.add(op="qlora_step", provider=provider, mode="step", shape=(batch, seq), dtype=torch.bfloat16,
                          timing=H.Timing(dt * 1e3, dt * 1e3, dt * 1e3, "wall/steps"), tokens_per_s=batch * seq / dt, peak_mem_bytes=peak,
                          peak_all_steps_bytes=peak_all, peak_reserved_bytes=reserved,
                          first_loss=first, last_loss=float(losses[-1]), first_step_s=compile_s, steps=steps,
                          gradient_checkpointing=ckpt, logits=logits if provider.startswith("slothc") else "keep", fused=fused, skipped=skipped, graphs=report.graphs if report else None,
                          model="llama-3.1-8b shape" if not quick else "tiny")
            print(f"[step {provider} ckpt={ckpt}] {dt * 1e3:.1f} ms/step {batch * seq / dt:.0f} tokens/s peak "
                  f"{(peak or 0) / 2**30:.2f} GiB (all steps {(peak_all or 0) / 2**30:.2f}, reserved {(reserved or 0) / 2**30:.2f}) first step {compile_s:.1f} s loss {first:.4f} -> {float(losses[-1]):.4f} fused {fused}",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            rec.add(op="qlora_step", provider=provider, mode="step", shape=(batch, seq), dtype=torch.bfloat16, status="error",
                    reason=f"{type(e).__name__}: {e}"[:800], gradient_checkpointing=ckpt)
            print(f"[step {provider} ckpt={ckpt}] error: {type(e).__name__}: {e}"[:800], flush=True)
        del run, model, opt, params
        torch._dynamo.reset()
        torch.cuda.empty_cache() if H.is_cuda(device) else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--out", default=None, help="JSONL file the rows are appended to")
    p.add_argument("--table", default=None, help="text file the final table is appended to")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes; runs on CPU (Triton kernels interpreted)")
    p.add_argument("--rep-ms", type=float, default=None)
    p.add_argument("--checkpointing", choices=("off", "on", "both"), default="off", help="step: gradient checkpointing (non-reentrant)")
    p.add_argument("--slothc-logits", choices=("keep", "drop"), default="keep",
                   help="step: the slothc variants' logits option (drop: the loss only, as HF's Trainer reads it)")
    p.add_argument("--steps", type=int, default=None, help="step: timed steps (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=2, help="step: untimed steps first (the first compiles)")
    p.add_argument("--step-providers", nargs="+", default=["eager", "slothc", "slothc_cudagraphs"], choices=list(STEP_PROVIDERS))
    p.add_argument("--step-budget-s", type=float, default=420.0, help="step: skip the remaining variants after this long")
    args = p.parse_args(argv)
    import _harness as H
    from bench_lora_linear import _write

    device = args.device or H.default_device()
    if not H.is_cuda(device):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rep_ms = args.rep_ms or (20.0 if args.quick else 100.0)
    import torch

    torch.manual_seed(0)
    rec = H.Recorder(None, device)  # rows are written per part (the linear part writes its own, with memory fields)
    H.measure_ceilings(rec, device, matmul=True, quick=args.quick)
    _write(args.out, rec.rows)
    print(f"copy {rec.copy_gbps:.0f} GB/s, bf16 matmul {rec.matmul_tflops:.0f} TFLOP/s on {rec.env['device']}", flush=True)
    for part in args.parts:
        n = len(rec.rows)
        if part == "dequant":
            bench_dequant(rec, device, args.quick, rep_ms)
        elif part == "gemm":
            bench_gemm(rec, device, args.quick, rep_ms)
        elif part == "linear":
            bench_linear(rec, device, args.quick, rep_ms, args.out)
        elif part == "step":
            bench_step(rec, device, args.quick, args.checkpointing, args.steps or (2 if args.quick else 5), args.warmup,
                       args.step_budget_s, args.step_providers, args.slothc_logits)
        if part != "linear":
            _write(args.out, rec.rows[n:])
    H.finish(rec, "qlora (NF4, double quant, blocksize 64)", args.table)
    return rec.rows


if __name__ == "__main__":
    main()
