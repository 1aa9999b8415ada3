"""The end-to-end benchmark: a full LoRA/QLoRA training step, slothc against what users would pick instead.

    python bench/train_step.py --workload a                 # GPU: Llama-3.2-1B shape, bf16 LoRA, 4 x 2048
    slothc bench --workload b --variants eager slothc       # the same, as a command
    slothc bench --workload tiny --device cpu               # a CPU smoke run (what CI runs)

One step = forward, backward and an AdamW step on the adapters, under bf16 autocast with fp32
adapters (PEFT's default, how HF's Trainer runs ``bf16=True``). ``--optimizer``: ``fused``
(default since 2026-12-02: HF's Trainer's default ``adamw_torch_fused`` with torch >= 2.8) or
``foreach`` (``torch.optim.AdamW``'s default, what the tables of 2026-12-01 used: it costs the
variants without CUDA graphs host time, Unsloth's step of (a) 11%), the same for every variant. The model is built from a config
with random weights (no download), saved once to a folder, and every variant loads that folder in
**its own process** (so that the memory figures do not mix), with the same seed and the same
batches (random tokens from a fixed generator).

Variants (``--variants``):

- ``eager``: transformers + PEFT as they are (SDPA attention);
- ``inductor``: ``torch.compile(model)``;
- ``liger``: Liger-Kernel's ``_apply_liger_kernel(model_type)`` before the model is built, where it
  supports the architecture;
- ``slothc``: ``torch.compile(model, backend="slothc", options={"logits": "drop"})`` (the step
  reads the loss only, as HF's Trainer does); ``slothc_cudagraphs``: the same with
  ``mode="reduce-overhead"``. ``SLOTHC_BENCH_OPTIONS`` (JSON, recorded in the result) is merged
  into both variants' options for A/B trials, e.g. ``'{"add_rms_norm": false}'``;
  ``SLOTHC_BENCH_STACKS_AFTER_S``: a variant prints its Python stacks after that long (a stuck
  variant's timeout then reports where it was);
- ``unsloth``: ``FastLanguageModel.from_pretrained(folder, load_in_16bit=True or load_in_4bit=True,
  use_gradient_checkpointing=False)`` and its ``get_peft_model``, where it imports; otherwise the
  variant records why. ``SLOTHC_UNSLOTH_SITE``: a folder of unpacked packages put first on its
  process's ``sys.path`` (``bench/fetch_unsloth.sh`` makes one for a machine without network).

Figures per variant: ``tokens_per_s`` (median step time over ``--steps`` steps after ``--warmup``),
``peak_gib`` (``torch.cuda.max_memory_allocated`` over all steps; ``reserved_gib`` next to it:
CUDA graphs keep their pool reserved), ``compile_s`` (the first step's time less a median step),
``mfu`` (below), ``losses`` (every step's; they must agree with eager's: ``loss_vs_eager``), and with
``--max-seq`` the longest sequence that fits at batch 1 (``max_seq``: doubling from the workload's
tokens, batch x length, then bisection to within ``--max-seq-resolution`` of the bracket's lower end,
bounded by ``--max-seq-budget-s``; the table shows an open bracket as ``>= lo`` or ``lo-hi``).

MFU = tokens/s x FLOPs per token / the bf16 matmul peak measured in the same run (an 8192^3
``torch.mm``), with FLOPs per token of a LoRA step (frozen base weights: no weight gradient)::

    4 N_frozen + 6 N_lora + 6 L s D

(causal attention: QK^T and PV are 2 s D FLOPs each a token in the forward, halved by the mask, so
2 s D; the backward twice the forward).

``N_frozen``: the matmul weights of the decoder and the lm_head (forward 2N, dX 2N); ``N_lora``: the
adapters (forward, dX, dW: 6N); ``L`` layers, ``s`` the sequence length, ``D`` = heads x head dim.

Results: ``<out-dir>/<date>-<device>-train.json`` (``{"device", "versions", "workload", "variants":
{name: {...}}}``, one file per workload run: ``-train-<workload>.json``) and a Markdown table next to
it, with ratios against eager and against the best peer. ``--profile`` adds a ``torch.profiler``
table of the slothc steps' top kernels (with and without CUDA graphs), with the share of slothc's own kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

VARIANTS = ("eager", "inductor", "liger", "slothc", "slothc_cudagraphs", "unsloth")
PEERS = ("eager", "inductor", "liger", "unsloth")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    arch: str
    config: dict
    batch: int
    seq: int
    qlora: bool = False
    description: str = ""


def _llama(hidden, inter, layers, heads, kv, vocab, tie, rope_theta=500000.0):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tie, rope_theta=rope_theta,
                max_position_embeddings=131072, rms_norm_eps=1e-5)


WORKLOADS = {
    "a": Workload("a", "llama", _llama(2048, 8192, 16, 32, 8, 128256, True), 4, 2048,
                  description="Llama-3.2-1B shape, bf16 LoRA r=16 on all linear layers, batch 4 x 2048"),
    "b": Workload("b", "llama", _llama(4096, 14336, 32, 32, 8, 128256, False), 2, 2048, qlora=True,
                  description="Llama-3.1-8B shape, NF4 QLoRA (double quant) r=16, batch 2 x 2048"),
    "c": Workload("c", "gemma2", dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                                      num_key_value_heads=4, head_dim=256, vocab_size=256000, query_pre_attn_scalar=256,
                                      sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                                      max_position_embeddings=8192), 2, 2048,
                  description="Gemma-2-2B shape (soft-capping, 256k vocabulary), bf16 LoRA r=16, batch 2 x 2048"),
    "tiny": Workload("tiny", "llama", _llama(64, 128, 2, 4, 2, 256, False), 2, 32,
                     description="tiny Llama (CPU smoke run)"),
    "tiny4bit": Workload("tiny4bit", "llama", _llama(64, 128, 2, 4, 2, 256, False), 2, 32, qlora=True,
                         description="tiny Llama, NF4 QLoRA (CPU smoke run)"),
}
RANK, ALPHA = 16, 32


# --------------------------------------------------------------------------------------------------
# FLOPs


def flops_per_token(config, seq: int, n_lora: int) -> float:
    """Model FLOPs of one token of a LoRA training step (module docstring)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, layers = text.hidden_size, text.num_hidden_layers
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", heads) or heads
    inter = text.intermediate_size
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    n_frozen = layers * per_layer + text.vocab_size * hidden
    attention = 6 * layers * seq * heads * head_dim
    return 4 * n_frozen + 6 * n_lora + attention


# --------------------------------------------------------------------------------------------------
# The parent: build and save the model once, run each variant in its own process


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "triton", "transformers", "peft", "liger_kernel", "unsloth", "bitsandbytes", "trl", "slothc"):
        try:
            out[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            out[name] = None
    return out


def save_model(workload: Workload, folder: str, seed: int = 0, device: str = "cpu") -> None:
    """The workload's model with random bf16 weights, and a tokenizer, saved to ``folder``.

    ``device``: where the weights are drawn (an 8B model's random init takes minutes on a CPU and
    seconds on a GPU); the saved folder is the same either way in kind, not in values."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(workload.arch, **workload.config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the variants' processes get the whole card
    _save_tokenizer(folder, config.vocab_size)


def _save_tokenizer(folder: str, vocab: int) -> None:
    """A word-level tokenizer of ``vocab`` tokens (Unsloth's loader wants one next to the model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1", bos_token="t2").save_pretrained(folder)


def run_workload(workload: Workload, variants, args, write=None) -> dict:
    """Each variant in its own process; ``write(result)``, when given, after each one (a run cut
    short keeps the variants it finished)."""
    device = args.device
    with tempfile.TemporaryDirectory(prefix=f"slothc-train-{workload.name}-") as folder:
        t0 = time.time()
        print(f"[{workload.name}] {workload.description}: saving the random model", flush=True)
        save_model(workload, folder, device=device)
        print(f"[{workload.name}] saved in {time.time() - t0:.0f} s", flush=True)
        results = {}
        for variant in variants:
            t0 = time.time()
            print(f"[{workload.name}] {variant}: starting (own process)", flush=True)
            results[variant] = _child(workload, variant, folder, args)
            r = results[variant]
            if r.get("tokens_per_s"):
                peak = f", peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else ""
                host = f", {r['before_replay_ms']:.1f} ms before the first graph replay" if r.get("before_replay_ms") is not None else ""
                detail = f", {r['tokens_per_s']:.0f} tokens/s{peak}{host}, losses {', '.join(f'{x:.4f}' for x in r['losses'][:3])}"
            else:
                detail = f" ({r.get('reason', '')[:300]})"
            print(f"[{workload.name}] {variant}: {r.get('status')}{detail} in {time.time() - t0:.0f} s", flush=True)
            if write is not None:
                write(_result(workload, results, args))
    return _result(workload, results, args)


def _result(workload: Workload, results: dict, args) -> dict:
    from slothc.kernels._launch import interpreting

    _compare_losses(results)
    return {"device": _device_name(args.device), "versions": _versions(), "workload": dataclasses.asdict(workload), "variants": results,
            "date": datetime.date.today().isoformat(), "steps": args.steps, "warmup": args.warmup,
            "optimizer": args.optimizer, "guard_filter": args.guard_filter, "git_sha": os.environ.get("SLOTHC_GIT_SHA"),
            "slothc_bench_options": json.loads(os.environ.get("SLOTHC_BENCH_OPTIONS") or "{}"),
            "triton_interpreter": interpreting() and not args.device.startswith("cuda")}


def _child(workload, variant, folder, args) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, "-m", "slothc.train_bench", "--child", variant, "--folder", folder, "--workload", workload.name,
               "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup), "--result", out.name,
               "--optimizer", args.optimizer, "--guard-filter", args.guard_filter]
        if args.max_seq:
            cmd += ["--max-seq", "--max-seq-budget-s", str(args.max_seq_budget_s), "--max-seq-resolution", str(args.max_seq_resolution)]
        if args.profile and variant.startswith("slothc"):
            cmd += ["--profile"]
        try:
            proc = subprocess.run(cmd, timeout=args.variant_timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired as e:
            tail = e.stderr or e.stdout or ""
            tail = (tail.decode(errors="replace") if isinstance(tail, bytes) else tail)[-8000:]
            return {"status": "error", "reason": f"timed out after {args.variant_timeout_s} s" + (f": {tail}" if tail else "")}
        text = open(out.name).read()
        if text.strip():
            return json.loads(text)
        tail = (proc.stderr or proc.stdout or "")[-1500:]
        return {"status": "error", "reason": f"exit {proc.returncode}: {tail}"}


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.machine()})"


def _compare_losses(results: dict) -> None:
    eager = results.get("eager", {}).get("losses")
    for name, r in results.items():
        if eager and r.get("losses"):
            n = min(len(eager), len(r["losses"]))
            r["loss_vs_eager"] = max(abs(a - b) for a, b in zip(eager[:n], r["losses"][:n]))


# --------------------------------------------------------------------------------------------------
# The child: one variant


def _load(workload: Workload, variant: str, folder: str, device: str, long_context: bool = False):
    """The variant's model. ``long_context`` (the longest-sequence search): Unsloth is told the
    config's ``max_position_embeddings`` as its ``max_seq_length`` (with the workload's 2048 its
    step hit a device-side assert at 8192 tokens on the H200)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if workload.qlora:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    if variant == "unsloth":
        site = os.environ.get("SLOTHC_UNSLOTH_SITE")  # unpacked packages carried to a machine without network
        if site:
            sys.path.insert(0, site)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        from unsloth import FastLanguageModel

        max_len = workload.config.get("max_position_embeddings", workload.seq) if long_context else workload.seq
        model, _ = FastLanguageModel.from_pretrained(folder, load_in_4bit=workload.qlora, load_in_16bit=not workload.qlora,
                                                     use_gradient_checkpointing=False, max_seq_length=max_len)
        model = FastLanguageModel.get_peft_model(
            model, r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, use_gradient_checkpointing=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        return model
    if variant == "liger":
        from liger_kernel.transformers import _apply_liger_kernel

        _apply_liger_kernel(workload.arch)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa", quantization_config=quant,
                                                 device_map={"": device})
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"))
    model.config.use_cache = False
    return model


def _compile(model, variant: str, guard_filter: str = "none"):
    """The variant's callable and, for slothc, its fusion report. ``guard_filter="nn_modules"``: every
    compiled variant skips Dynamo's guards on module attributes
    (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``), which a training step does not change;
    the guard check of a PEFT model of (a)'s structure took 2.9 ms a call on a CPU, 0.19 ms so.
    Unsafe outside such a loop: ``model.eval()`` then would not recompile."""
    import torch

    extra = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe} if guard_filter == "nn_modules" else {}
    if variant == "inductor":
        return torch.compile(model, options=extra or None), None
    if variant.startswith("slothc"):
        import slothc

        report = slothc.Report()
        options = {"logits": "drop", "report": report}
        if variant == "slothc_cudagraphs":
            options["mode"] = "reduce-overhead"
        # A/B trials of one fusion or option, e.g. SLOTHC_BENCH_OPTIONS='{"add_rms_norm": false}'
        options.update(json.loads(os.environ.get("SLOTHC_BENCH_OPTIONS") or "{}"))
        from slothc.backend import slothc as backend  # the function: no installed entry point needed (a bare checkout)

        return torch.compile(model, backend=backend, options={**options, **extra}), report
    return model, None


def _batches(vocab: int, batch: int, seq: int, n: int, device: str):
    import torch

    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(n)]


def _stepper(run, model, device, cudagraphs: bool, optimizer: str = "fused"):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if optimizer == "fused" else {}))
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    def step(ids):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # a sync a step: the step time is the wall time between syncs

    step.reset = lambda: opt.zero_grad(set_to_none=True)  # after a step that failed half way
    return step


def child_main(args) -> dict:
    import torch

    if os.environ.get("SLOTHC_BENCH_STACKS_AFTER_S"):  # a stuck variant: its Python stacks on stderr
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["SLOTHC_BENCH_STACKS_AFTER_S"]), repeat=True)

    workload = WORKLOADS[args.workload]
    variant = args.child
    cuda = args.device.startswith("cuda")
    out: dict = {"status": "ok"}
    try:
        torch.manual_seed(0)
        model = _load(workload, variant, args.folder, args.device, long_context=args.max_seq)
        model.train()
        n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run, report = _compile(model, variant, args.guard_filter)
        step = _stepper(run, model, args.device, variant == "slothc_cudagraphs", args.optimizer)
        vocab = model.config.vocab_size
        batches = _batches(vocab, workload.batch, workload.seq, args.warmup + args.steps, args.device)
        torch.cuda.reset_peak_memory_stats() if cuda else None
        times, losses, before_replay = [], [], []
        with replay_times(variant == "slothc_cudagraphs") as replays:
            for ids in batches:
                replays.clear()
                t0 = time.perf_counter()
                losses.append(step(ids))
                times.append(time.perf_counter() - t0)
                before_replay.append((replays[0] - t0) * 1e3 if replays else None)
        timed = times[args.warmup:]
        median = statistics.median(timed)
        tokens = workload.batch * workload.seq
        out.update(tokens_per_s=tokens / median, step_ms=median * 1e3, compile_s=max(times[0] - median, 0.0), losses=losses,
                   n_lora=n_lora)
        if all(b is not None for b in before_replay[args.warmup:]):
            # the host time from the step's call (right after the last step's loss read, a sync) to
            # its first CUDA-graph replay: the GPU has nothing to do meanwhile
            out["before_replay_ms"] = statistics.median(before_replay[args.warmup:])
        if cuda:
            out.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30, reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
            peak = matmul_peak_tflops()
            out.update(matmul_peak_tflops=peak, mfu=tokens / median * flops_per_token(model.config, workload.seq, n_lora) / (peak * 1e12))
        else:
            out.update(peak_gib=None, reserved_gib=None, mfu=None)
        if report is not None:
            out["fused"] = {k: v for k, v in ((f, report.count(f)) for f in report.fused) if v}
            out["skipped"] = [f"{s.fusion} {s.module}: {s.reason}" for s in report.skipped][:30]
            out["graphs"] = report.graphs
        if args.profile:
            out["profile"] = profile_step(step, batches[-1])
        if args.max_seq:
            # from the workload's tokens at batch 1: batch and length change at once (one recompile)
            out["max_seq"] = max_seq(step, vocab, workload.batch * workload.seq, args.device, args.max_seq_budget_s,
                                     reset=step.reset, resolution=args.max_seq_resolution,
                                     graphs=(lambda: report.graphs) if report is not None else None)
            if report is not None:  # the graphs the search compiled, too: what each fused, what each skipped
                out["max_seq"].update(per_graph=report.per_graph(),
                                      skipped=sorted({f"graph {s.graph}: {s.fusion}: {s.reason}" for s in report.skipped})[:20],
                                      recompiles=_recompile_reasons())
    except ImportError as e:
        out = {"status": "unavailable", "reason": f"{type(e).__name__}: {e}"[:600]}
    except Exception as e:  # noqa: BLE001  (recorded, and the next variant runs)
        out = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:600], "traceback": traceback.format_exc()[-2000:]}
    return out


@contextlib.contextmanager
def replay_times(on: bool, on_replay=None):
    """While on, the times (``time.perf_counter``) of every CUDA-graph replay, in a list the caller
    clears at each step; ``on_replay()``, if given, runs just before each replay (after its time is
    taken)."""
    import torch

    times: list = []
    if not on:
        yield times
        return
    replay = torch.cuda.CUDAGraph.replay

    def timed(self):
        times.append(time.perf_counter())
        if on_replay is not None:
            on_replay()
        return replay(self)

    torch.cuda.CUDAGraph.replay = timed
    try:
        yield times
    finally:
        torch.cuda.CUDAGraph.replay = replay


def _recompile_reasons(limit: int = 10) -> list:
    """Why Dynamo recompiled (the failed guards it recorded), for the longest-sequence search."""
    try:
        from torch._dynamo.utils import guard_failures
    except ImportError:
        return []
    reasons = [str(r) for failures in guard_failures.values() for r in failures]
    return [" ".join(r.split())[:300] for r in reasons][:limit]


def matmul_peak_tflops(size: int = 8192, reps: int = 20) -> float:
    """The bf16 ``torch.mm`` rate (TFLOP/s, median of ``reps``) on the current GPU."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return 2 * size**3 / statistics.median(ts) / 1e12


_SLOTHC_KERNELS = ("_rms_norm", "_layer_norm", "_rope", "_dequantize_4bit", "_mlp_", "_cross_entropy", "_lce", "slothc")


def _annotation(key: str) -> bool:
    """A user annotation's range on the GPU timeline (``Optimizer.step#AdamW.step``), not a kernel:
    its time is that of the kernels inside it, counted already."""
    return "#" in key or key.startswith("ProfilerStep")


def profile_step(step, ids, top: int = 25) -> dict:
    """Top kernels of two profiled steps by GPU time, and the share of slothc's own kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step(ids)
    rows = []
    total = 0.0
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0)
        if t and ev.device_type == torch.autograd.DeviceType.CUDA and not _annotation(ev.key):
            rows.append((ev.key, t / 2e3, ev.count // 2))
            total += t / 2e3
    rows.sort(key=lambda r: -r[1])
    ours = sum(t for k, t, _ in rows if any(s in k for s in _SLOTHC_KERNELS))
    out = {"gpu_ms_per_step": total, "slothc_kernels_ms": ours, "top": [{"kernel": k[:120], "ms": t, "calls": c} for k, t, c in rows[:top]]}
    kernels, cpu = [], []
    for ev in prof.events():
        start, end = ev.time_range.start, ev.time_range.end
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            if not _annotation(ev.key):
                kernels.append((ev.key, start, end))
        elif end > start:
            depth, parent = 0, ev.cpu_parent
            while parent is not None:
                depth, parent = depth + 1, parent.cpu_parent
            cpu.append((ev.key, start, end, depth))
    if kernels:
        out["timeline"] = timeline(kernels, cpu, steps=2)
    return out


def timeline(kernels: list, cpu: list, steps: int, top: int = 8) -> dict:
    """Where the GPU waits: from the kernels' ``(name, start, end)`` and the host's ops
    ``(name, start, end, depth)`` of ``steps`` profiled steps (microseconds, one clock).

    ``span_ms``: first kernel's start to last kernel's end, a step; ``busy_ms``: the union of the
    kernels' intervals (streams that overlap count once), a step; ``idle_ms``: the difference, split
    by gap length (``gaps``: count and ms a step of gaps under 5 us, 5-50 us, over 50 us: launch
    latency inside a CUDA graph, a host that launches one kernel at a time, a host that is far
    behind); ``largest``: the longest gaps, each with the kernels on either side and the host ops
    running at its middle (outermost first), so that what the GPU waited for is named."""
    ks = sorted(kernels, key=lambda k: k[1])
    busy, gaps = 0.0, []
    cur_start, cur_end, cur_name = ks[0][1], ks[0][2], ks[0][0]
    for name, start, end in ks[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, cur_end, start, cur_name, name))
            cur_start = start
        if end >= cur_end:
            cur_end, cur_name = end, name
    busy += cur_end - cur_start
    span = max(k[2] for k in ks) - ks[0][1]
    bins = {"under_5us": (0.0, 5.0), "5_to_50us": (5.0, 50.0), "over_50us": (50.0, float("inf"))}
    hist = {b: {"count": sum(1 for g in gaps if lo <= g[0] < hi) / steps,
                "ms": sum(g[0] for g in gaps if lo <= g[0] < hi) / steps / 1e3} for b, (lo, hi) in bins.items()}
    largest = []
    for length, start, end, before, after in sorted(gaps, key=lambda g: -g[0])[:top]:
        mid = (start + end) / 2
        host = sorted((c for c in cpu if c[1] <= mid <= c[2]), key=lambda c: c[3])
        largest.append({"us": round(length, 1), "after": before[:80], "before": after[:80],
                        "host": [c[0][:80] for c in host][:6]})
    return {"kernels_per_step": len(ks) / steps, "span_ms": span / steps / 1e3, "busy_ms": busy / steps / 1e3,
            "idle_ms": (span - busy) / steps / 1e3, "gaps": hist, "largest": largest}


def max_seq(step, vocab: int, start: int, device: str, budget_s: float, reset=None, resolution: float = 0.125,
            graphs=None) -> dict:
    """The longest sequence that trains at batch 1: doubling from ``start``, then bisection until the
    bracket is within ``resolution`` of its lower end (and at least 256), or the budget is spent.

    One step a probe (the optimizer's state exists already: the timed steps made it). A probe that
    runs out of memory calls ``reset`` (the gradients it left are dropped) and counts as too long; any
    other error ends the search and is recorded (``error``). ``upper_bound``: the shortest length
    that did not fit (None: none was found in the budget); ``complete``: the bracket was closed.
    ``graphs`` (optional): the number of graphs compiled so far, recorded after each probe, so that
    a probe that recompiled shows."""
    import torch

    t0 = time.time()
    probes = []

    def fits(seq):
        ids = torch.randint(0, vocab, (1, seq), device=device)
        t = time.time()
        try:
            step(ids)
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        finally:
            del ids
            if reset is not None:
                reset()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        probes.append({"seq": seq, "fits": ok, "s": round(time.time() - t, 1), **({"graphs": graphs()} if graphs else {})})
        return ok

    def done(lo, hi):
        return hi - lo <= max(256, resolution * lo)

    lo, hi, seq, error = 0, None, start, None
    try:
        while time.time() - t0 < budget_s:
            if fits(seq):
                lo, seq = seq, seq * 2
            else:
                hi = seq
                break
        while hi is not None and not done(lo, hi) and time.time() - t0 < budget_s:
            mid = (lo + hi) // 2 // 256 * 256
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    except Exception as e:  # noqa: BLE001  (recorded: the variant's other figures stand)
        error = f"{type(e).__name__}: {e}"[:300]
        trace = traceback.format_exc()[-4000:]
    out = {"max_seq": lo, "upper_bound": hi, "search_s": time.time() - t0, "complete": hi is not None and done(lo, hi),
           "probes": probes}
    if error:
        out["error"], out["traceback"] = error, trace
    return out


# --------------------------------------------------------------------------------------------------
# Tables


def _max_seq_cell(ms) -> str:
    if not ms:
        return "-"
    if ms.get("error") and not ms.get("max_seq"):
        return "failed (below)"
    if ms.get("complete"):
        return str(ms["max_seq"])
    return f"{ms['max_seq']}-{ms['upper_bound']}" if ms.get("upper_bound") else f">= {ms['max_seq']}"


def markdown(result: dict) -> str:
    w, v = result["workload"], result["variants"]
    ok = {k: r for k, r in v.items() if r.get("status") == "ok"}
    eager = ok.get("eager", {}).get("tokens_per_s")
    peers = [k for k in PEERS if k in ok and k != "eager"] + (["eager"] if "eager" in ok else [])
    best_peer = max(peers, key=lambda k: ok[k]["tokens_per_s"]) if peers else None
    lines = [f"### Workload {w['name']}: {w['description']}", "",
             f"{result['device']}; " + ", ".join(f"{k} {x}" for k, x in result["versions"].items() if x) + f"; {result['date']}",
             f"median of {result['steps']} steps after {result['warmup']} warm-up; AdamW {result.get('optimizer', 'foreach')}; "
             + ("Dynamo's guards on module attributes skipped in every compiled variant (--guard-filter nn_modules); "
                if result.get("guard_filter", "none") != "none" else "")
             + "peak = max_memory_allocated over all steps", ""]
    if result.get("triton_interpreter"):
        lines[-1:-1] = ["slothc's kernels ran in the Triton interpreter (TRITON_INTERPRET=1, the CPU default here): a smoke run "
                        "of the kernel path, not a speed measure"]
    if len(result.get("runs", [])) > 1:
        by_run = {}
        for name, r in v.items():
            by_run.setdefault(r.get("run"), []).append(name)
        eagers = {x["run"]: x.get("eager_tokens_per_s") for x in result["runs"]}
        lines += ["merged from device calls on one machine type (each variant in its own process either way): "
                  + "; ".join(f"run {run}: {', '.join(names)}" + (f" (its eager: {eagers[run]:.0f} tokens/s)" if eagers.get(run) else "")
                              for run, names in by_run.items()), ""]
    lines += [
             "| variant | tokens/s | x eager | x best peer | peak GiB | reserved GiB | MFU | compile s | loss vs eager | max seq |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"

    for name, r in v.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {r.get('reason', '')[:160]} | | | | | | | | |")
            continue
        tps = r["tokens_per_s"]
        vs_best = tps / ok[best_peer]["tokens_per_s"] if best_peer and name not in PEERS else None
        lines.append(f"| {name} | {tps:.0f} | {f(tps / eager if eager else None, '.2f')} | {f(vs_best, '.2f')} | {f(r.get('peak_gib'), '.2f')} | "
                     f"{f(r.get('reserved_gib'), '.2f')} | {f(r.get('mfu'), '.1%')} | {f(r.get('compile_s'), '.0f')} | "
                     f"{f(r.get('loss_vs_eager'), '.2e')} | {_max_seq_cell(r.get('max_seq'))} |")
    if best_peer:
        lines += ["", f"best peer by tokens/s: {best_peer}" + (" (no other peer finished)" if best_peer == "eager" else "")]
    searched = {name: r["max_seq"] for name, r in ok.items() if r.get("max_seq")}
    if searched:
        lines += ["", "max seq: the longest sequence that trained at batch 1 (one step a probe; `a-b`: fits at a, not at b, "
                  "the search's time ran out between them; `>= a`: nothing failed in the time)"]
        for name, ms in searched.items():
            probes = ", ".join(f"{p['seq']} {'ok' if p['fits'] else 'OOM'} ({p['s']:.0f} s"
                               + (f", {p['graphs']} graphs" if p.get("graphs") is not None else "") + ")" for p in ms.get("probes", []))
            run = f" (run {ms['run']})" if ms.get("run") else ""
            error = f"; stopped by {' '.join(ms['error'].split())[:240]}" if ms.get("error") else ""
            lines.append(f"- {name}{run}: {_max_seq_cell(ms)} in {ms.get('search_s', 0):.0f} s: {probes}{error}")
            if ms.get("per_graph"):
                lines.append("  - fused, by graph: " + "; ".join(
                    f"{i}: " + (", ".join(f"{k} {n}" for k, n in sorted(g.items())) or "nothing") for i, g in enumerate(ms["per_graph"])))
            lines += [f"  - skipped: {x}" for x in ms.get("skipped", [])[:6]]
            lines += [f"  - recompiled: {x[:200]}" for x in ms.get("recompiles", [])[:4]]
    for name, r in ok.items():
        if r.get("fused") is not None:
            fused = ", ".join(f"{k} {n}" for k, n in sorted(r["fused"].items())) or "nothing"
            lines += ["", f"{name} fused: {fused}; graphs {r.get('graphs', '-')}"]
            lines += [f"- skipped: {s}" for s in r.get("skipped", [])[:10]]
    for name, r in ok.items():
        if r.get("before_replay_ms") is not None:
            lines += ["", f"{name}: {r['before_replay_ms']:.1f} ms a step (median, no profiler) from the step's call, right after "
                      "the last step's loss was read, to its first CUDA-graph replay: host time the GPU waits through"]
    for name, r in ok.items():
        prof = r.get("profile")
        if prof:
            # results of before annotations were left out: their ranges out of the rows and the total
            dropped = sum(t["ms"] for t in prof["top"] if _annotation(t["kernel"]))
            prof = dict(prof, top=[t for t in prof["top"] if not _annotation(t["kernel"])], gpu_ms_per_step=prof["gpu_ms_per_step"] - dropped)
            share = prof["slothc_kernels_ms"] / prof["gpu_ms_per_step"] if prof.get("gpu_ms_per_step") else 0.0
            lines += ["", f"{name} profile (torch.profiler, two steps): {prof['gpu_ms_per_step']:.1f} ms of GPU time a step against "
                      f"{r['step_ms']:.1f} ms of wall time; slothc's own kernels {prof['slothc_kernels_ms']:.1f} ms ({share:.0%})", "",
                      "| kernel | ms a step | calls a step |", "| --- | ---: | ---: |"]
            lines += [f"| `{t['kernel'][:90]}` | {t['ms']:.2f} | {t['calls']} |" for t in prof["top"][:15]]
            tl = prof.get("timeline")
            if tl:
                g = tl["gaps"]
                lines += ["", f"{name} timeline: {tl['kernels_per_step']:.0f} kernels a step; the GPU busy {tl['busy_ms']:.1f} ms of a "
                          f"{tl['span_ms']:.1f} ms span (first kernel to last, a step), idle {tl['idle_ms']:.1f} ms: gaps under 5 us "
                          f"{g['under_5us']['count']:.0f} ({g['under_5us']['ms']:.1f} ms), 5-50 us {g['5_to_50us']['count']:.0f} "
                          f"({g['5_to_50us']['ms']:.1f} ms), over 50 us {g['over_50us']['count']:.0f} ({g['over_50us']['ms']:.1f} ms). "
                          "Longest gaps:"]
                lines += [f"- {x['us']:.0f} us after `{x['after'][:50]}`, before `{x['before'][:50]}`; host: "
                          + (" > ".join(f"`{h[:50]}`" for h in x["host"]) or "no op") for x in tl["largest"][:5]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Command line


def parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", nargs="+", default=["a"], choices=list(WORKLOADS))
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="default: all on CUDA; eager, inductor and slothc on the CPU")
    p.add_argument("--device", default=None, help="default cuda when there is one")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first; the first compiles (default 3)")
    p.add_argument("--optimizer", default="fused", choices=("fused", "foreach"),
                   help="AdamW's implementation, the same for every variant (default fused: HF Trainer's default)")
    p.add_argument("--guard-filter", default="none", choices=("none", "nn_modules"),
                   help="nn_modules: every compiled variant skips Dynamo's guards on module attributes (a trial of the "
                        "host time before a step's graphs launch; unsafe outside a training loop that leaves the model as it is)")
    p.add_argument("--max-seq", action="store_true", help="also search the longest sequence at batch 1")
    p.add_argument("--max-seq-budget-s", type=float, default=240.0, help="time of the search, a variant (default 240 s)")
    p.add_argument("--max-seq-resolution", type=float, default=0.125,
                   help="bisect until the bracket is within this share of its lower end (default 0.125)")
    p.add_argument("--profile", action="store_true", help="profile the slothc steps, with and without CUDA graphs (top kernels)")
    p.add_argument("--variant-timeout-s", type=float, default=900.0, help="a variant's process is stopped after this long")
    p.add_argument("--out-dir", default=None, help="where the JSON and Markdown go (default: print only)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge one workload's result files from several runs into one table (no run)")
    # the child process
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def merge(results: list) -> dict:
    """One workload's results from several runs (device calls) in one table: the first run's variants,
    then each later run's variants that the earlier ones lack or did not finish (an error, a
    timeout, unavailable), and a later run's longest-sequence search where the earlier ones made none
    (its run recorded in it). Every variant records the run it came from (``run``: the run's git sha
    and position); ``runs`` lists them. Ratios are against the eager of the first run that has one."""
    if not results:
        raise ValueError("merge: no results given")
    names = {r["workload"]["name"] for r in results}
    if len(names) != 1:
        raise ValueError(f"merge: results of one workload expected, got {sorted(names)}")
    devices = {r["device"] for r in results}
    if len(devices) != 1:
        raise ValueError(f"merge: results of one device expected, got {sorted(devices)}")
    # every variant's step must be the same; files from before a flag ran with its first value
    for key, before, what in (("optimizer", "foreach", "one optimizer"), ("guard_filter", "none", "one --guard-filter")):
        seen = {r.get(key, before) for r in results}
        if len(seen) != 1:
            raise ValueError(f"merge: results of {what} expected (every variant's step must be the same), got {sorted(seen)}")
    merged = dict(results[0], variants={}, runs=[])
    for i, r in enumerate(results):
        run = f"{i + 1}: {r.get('git_sha') or 'unknown'}"
        eager = r["variants"].get("eager", {}).get("tokens_per_s")
        merged["runs"].append({"run": run, "date": r.get("date"), "versions": r.get("versions"), "steps": r.get("steps"),
                               "eager_tokens_per_s": eager})
        for name, v in r["variants"].items():
            have = merged["variants"].get(name)
            if have is None or (have.get("status") != "ok" and v.get("status") == "ok"):
                merged["variants"][name] = dict(v, run=run)
            elif have.get("status") == "ok" and not have.get("max_seq") and v.get("max_seq"):  # a later search
                merged["variants"][name] = dict(have, max_seq=dict(v["max_seq"], run=run))
    _compare_losses(merged["variants"])
    return merged


def device_tag(name: str) -> str:
    """The file names' device: the model number in a CUDA device's name ("NVIDIA H100 80GB HBM3"
    -> "h100", "NVIDIA H200" -> "h200"), else its last word."""
    models = [w for w in re.split(r"[\s-]+", name) if re.fullmatch(r"[A-Za-z]{1,3}\d{2,4}[A-Za-z]?", w)]
    return (models[0] if models else name.split()[-1]).lower()


def _write(result: dict, name: str, out_dir: str, cuda: bool) -> str:
    os.makedirs(out_dir, exist_ok=True)
    tag = "cpu" if not cuda else device_tag(result["device"])
    stem = os.path.join(out_dir, f"{result['date']}-{tag}-train-{name}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    return stem


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.merge:
        results = []
        for path in args.merge:
            with open(path) as f:
                results.append(json.load(f))
        merged = merge(results)
        print(markdown(merged), flush=True)
        if args.out_dir:
            cuda = not merged["device"].startswith("cpu")
            print(f"wrote {_write(merged, merged['workload']['name'], args.out_dir, cuda)}.json and .md", flush=True)
        return 0
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        args.workload = args.workload[0]
        result = child_main(args)
        with open(args.result, "w") as f:
            json.dump(result, f)
        return 0
    cuda = args.device.startswith("cuda")
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    variants = args.variants or (list(VARIANTS) if cuda else ["eager", "inductor", "slothc"])
    status = 0
    for name in args.workload:
        result = run_workload(WORKLOADS[name], variants, args, write=(lambda r, n=name: _write(r, n, args.out_dir, cuda)) if args.out_dir else None)
        table = markdown(result)
        print(table, flush=True)
        if args.out_dir:
            print(f"wrote {_write(result, name, args.out_dir, cuda)}.json and .md", flush=True)
        if any(r.get("status") == "error" for r in result["variants"].values()):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
