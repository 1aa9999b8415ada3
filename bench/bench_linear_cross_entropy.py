"""LM head + cross-entropy loss, forward and backward: eager (HF), Inductor (+ auto-chunker), Liger, slothc.

    python3 bench/bench_linear_cross_entropy.py --out results.jsonl             # GPU: vocab 128256, see Cases
    TRITON_INTERPRET=1 python3 bench/bench_linear_cross_entropy.py --quick      # CPU smoke run, tiny sizes

The "loss part" of a causal-LM training step: from the final hidden states ``h`` [N, H] and the
lm_head weight ``W`` [V, H] (both bf16) and the labels [N] (int64, about 10% set to -100), the mean
cross-entropy of the logits ``h @ W.T``, and its gradients. Hugging Face's ``ForCausalLMLoss``
computes it as below (labels here are already shifted).

Providers:

- ``eager``: ``F.cross_entropy(F.linear(h, W).float(), labels, ignore_index=-100)``, HF's order
  exactly: bf16 logits, ``.float()``, cross_entropy (reduction mean). Checked bitwise against
  ``transformers.loss.loss_utils.ForCausalLMLoss`` when transformers imports
  (``eager_matches_hf``).
- ``inductor``: ``torch.compile`` (default options) of that function.
- ``inductor_chunked``: the same with Inductor's auto-chunker, ``torch.compile(fn,
  options=CHUNKER_OPTIONS)``: ``auto_chunker.enable`` and its two thresholds at 0. Left at their
  defaults (output over 1M elements, output bytes over 8 x the matmul's input bytes) it never
  fires at these sizes: the amplification ``N*V / (H*(N + V))`` counts the weight as input and is
  1 to 7 here (recorded as ``amplify_ratio``). ``auto_chunked`` records whether the pass chunked
  (``torch._inductor.metrics.num_auto_chunking``; it gives up silently otherwise); Inductor
  picks the number of chunks (8). Skipped when the installed torch has no
  ``torch._inductor.config.auto_chunker``.
- ``slothc``: ``slothc.ops.linear_cross_entropy(h, W, labels)`` (ignore_index -100, mean; the
  wrapper over ``torch.ops.slothc.linear_cross_entropy``): the logits are never materialised, the
  gradients are computed chunk by chunk in the forward and the backward scales them.
- ``slothc_keep_logits``: what the graph pass emits when the model also returns its logits (the
  default, ``logits="keep"``): ``logits = F.linear(h, W)`` is materialised and kept alive (until
  the next call, as a model output holding it would), and ``torch.ops.slothc.cross_entropy`` reads
  them in bf16 (no fp32 copy, no fp32 log-softmax; its bf16 gradient is made in the forward and
  kept); the gradient reaches h through the lm_head's own backward. Its time and memory against
  ``slothc``'s say what returning logits costs.
- ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss(ignore_index=-100,
  reduction="mean")(W, h, labels)`` (the module, otherwise at its defaults as its HF integration
  uses it: chunks of next_pow2(N / ceil(V / H)) rows, so that a chunk's logits are about N x H
  elements; gradients computed in the forward; ``accum_dtype=None``, so dW accumulates in bf16).
  Its forward calls ``.item()`` (the count of kept labels), so it is not captured in a CUDA graph
  (a failed capture left the CUDA generator broken for the next case): its rows carry the wall
  timer (``graph_error`` says why); it runs last in each case, after the others.

Cases: vocab 128256; hidden 2048 and 4096; tokens 4096, 8192, 16384; bf16. Variants: ``frozen``
(W does not require grad: LoRA, at every shape) and ``trainable`` (W requires grad: dW too; at
``--trainable-at``, default hidden 2048 x 8192 tokens). h always requires grad. Inputs: h ~
N(0, 1), W ~ N(0, (LOGIT_STD / sqrt(H))^2), so the logits have a std of about 2; the ignored
positions are a random 10% of the tokens.

Modes: ``fwd`` (the forward, with autograd recording: for the fused providers it includes the
gradient matmuls) and ``full`` (forward and ``loss.backward()``); ``bwd`` on request
(``--modes``), ``full`` - ``fwd`` on the graph timer as in the other benches. Each timed twice
(``_harness``): the primary, CUDA-graph replays, and the wall timer (un-graphed calls).

Roofline: the op is matmul-bound; its flops are those of its matmuls, 2*N*H*V each: ``fwd`` 1 (the
logits), ``full`` 2 with W frozen (logits, dh) and 3 when trainable (+ dW), ``bwd`` the
difference. Rows carry ``tflops`` and ``frac_matmul_peak`` against the bf16 matmul rate measured in
the same run (and the same for the wall timer). The elementwise work (softmax over N x V) and the
10% of ignored rows (whose gradient rows are zero) are not counted. Fused providers do all of the
work in ``fwd``: compare providers on ``full``.

Peak memory (``peak_mem_bytes``, on every row of a provider and case): one un-graphed forward and
backward after the correctness check and before any timing, with the inputs already allocated and
every ``.grad`` None: ``torch.cuda.synchronize()``, ``before = torch.cuda.memory_allocated()``,
``torch.cuda.reset_peak_memory_stats()``, then the call; ``peak_mem_bytes =
torch.cuda.max_memory_allocated() - before`` after the backward (it includes dh, and dW when
trainable, which the call produces and leaves allocated). Also ``mem_fwd_peak_bytes`` (the same
after the forward alone), ``mem_fwd_retained_bytes`` (allocated after the forward: what is kept for
the backward, with the loss) and ``mem_after_bytes`` (allocated after the backward: the gradients,
and the logits for ``slothc_keep_logits``); ``peak_mem_ratio_eager`` = peak / eager's peak.
Allocated bytes, not reserved: the caching allocator's free cache is not counted. Only on CUDA.

Correctness, before any timing: loss, dh (and dW when trainable) of each provider against a float64
reference of the same math (computed on the device in chunks of rows, logits never rounded) and
against eager; a provider whose error against float64 is over max(1e-2 in bf16, 4 x eager's own)
is recorded as ``mismatch`` and not timed. The rows keep ``err_loss``, ``err_dh``, ``err_dw``
(against eager) and ``err64_*`` (against float64), relative L2 errors.

Memory: eager at 16384 tokens x 128256 vocab holds several N x V fp32 tensors (8.4 GB each);
between providers everything is freed (``torch.cuda.empty_cache``) and an out-of-memory error is
recorded as ``skipped`` for that provider and case. Inductor compiles once per shape and variant
(``torch._dynamo.reset()`` before each); ``first_call_s`` is the first call's time (compilation,
autotuning, Triton JIT), ``provider_s`` all the time a provider took in the case.

Time: the run is meant to take under 150 s on an H100 (README). ``--budget-s`` (by default the
limit ``gpu_session.sh`` gives the step, less 20 s) paces it: a provider or case that would start
after the budget is recorded as ``skipped`` ("time budget spent"), so that an overlong run still
ends with its tables instead of being killed.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _harness, and this checkout's slothc over any installed one

OP = "linear_cross_entropy"
IGNORE_INDEX = -100
IGNORED_FRAC = 0.1  # share of the tokens whose label is IGNORE_INDEX (padding, prompt tokens)
LOGIT_STD = 2.0  # std of the logits on random inputs (a trained lm_head's are of this order)
VOCAB = 128256  # Llama 3
REF_CHUNK_ROWS = 1024  # rows per chunk of the float64 reference (1024 x 128256 x 8 B = 1 GiB of logits)
PROVIDERS = ("eager", "inductor", "inductor_chunked", "slothc", "slothc_keep_logits", "liger")
# Inductor's auto-chunker, forced on: its thresholds (output elements; output bytes over input
# bytes) at 0, since the default ratio (8) is never reached here (module docstring).
CHUNKER_OPTIONS = {
    "auto_chunker.enable": True,
    "auto_chunker.output_size_threshold": 0,
    "auto_chunker.amplify_ratio_threshold": 0,
}


def hf_causal_lm_loss(hidden, weight, labels):
    """The loss of ``transformers``' ``ForCausalLMLoss`` on already shifted labels, mean reduction:
    bf16 logits, upcast, cross-entropy."""
    import torch.nn.functional as F

    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def eager_matches_hf(weight, device, rows: int = 64):
    """Whether ``hf_causal_lm_loss`` equals HF's ``ForCausalLMLoss`` bitwise on ``rows`` random tokens;
    None if transformers won't import."""
    import torch
    import torch.nn.functional as F

    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except Exception:  # noqa: BLE001
        return None
    with torch.no_grad():
        h = torch.randn(rows, weight.shape[1], device=device, dtype=weight.dtype)
        labels = make_labels(rows, weight.shape[0], device)
        hf = ForCausalLMLoss(F.linear(h, weight), None, weight.shape[0], shift_labels=labels)
        return bool(torch.equal(hf, hf_causal_lm_loss(h, weight, labels)))


def make_labels(n: int, vocab: int, device):
    """Random labels in [0, vocab) with a random IGNORED_FRAC of them set to IGNORE_INDEX."""
    import torch

    labels = torch.randint(0, vocab, (n,), device=device)
    labels[torch.randperm(n, device=device)[: round(IGNORED_FRAC * n)]] = IGNORE_INDEX
    return labels


def flops(tokens: int, hidden: int, vocab: int, trainable: bool) -> dict:
    """The op's matmul flops per mode: logits; + dh; + dW when trainable (2*N*H*V each)."""
    mm = 2 * tokens * hidden * vocab
    full = mm * (3 if trainable else 2)
    return {"fwd": mm, "bwd": full - mm, "full": full}


def amplify_ratio(tokens: int, hidden: int, vocab: int) -> float:
    """The auto-chunker's amplification of the logits matmul: output bytes over input bytes (h and W)."""
    return tokens * vocab / (hidden * (tokens + vocab))


def reference64(h, weight, labels, trainable: bool, chunk_rows: int = REF_CHUNK_ROWS) -> dict:
    """Loss, dh (and dW) of the mean cross-entropy of ``h @ weight.T`` in float64, chunk by chunk of
    rows so that no N x V float64 tensor exists; returned as float32 (enough for relative errors at
    the 1e-3 level) on the inputs' device.

    With z = h W^T, p = softmax(z), y the label and n the number of labels that are not ignored:
    loss = sum over kept rows of (logsumexp(z) - z_y) / n; G = (p - onehot(y)) / n on kept rows,
    0 on ignored ones; dh = G W; dW = G^T h.
    """
    import torch

    w64 = weight.detach().double()
    keep = labels != IGNORE_INDEX
    n = keep.sum().double()
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    dh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    dw = torch.zeros(w64.shape, dtype=torch.float64, device=h.device) if trainable else None
    for start in range(0, h.shape[0], chunk_rows):
        end = min(start + chunk_rows, h.shape[0])
        h64 = h[start:end].detach().double()
        z = h64 @ w64.T
        y, k = labels[start:end].clamp_min(0), keep[start:end]
        lse = torch.logsumexp(z, dim=1)
        loss += ((lse - z.gather(1, y[:, None])[:, 0]) * k).sum()
        g = z.sub_(lse[:, None]).exp_()  # softmax, in place of z
        g[torch.arange(end - start, device=h.device), y] -= 1.0
        g *= (k / n)[:, None]
        dh[start:end] = g @ w64
        if trainable:
            dw += g.T @ h64
        del z, g, h64
    out = {"loss": (loss / n).float(), "dh": dh}
    if trainable:
        out["dw"] = dw.float()
    return out


def providers(names):
    """name -> builder; a builder returns ``fn(h, W, labels) -> loss`` for one case or raises ``Skip``.

    eager first (the reference), liger last (its failed CUDA-graph capture after the others).
    """
    import torch
    import torch.nn.functional as F

    from _harness import Skip

    def eager():
        return hf_causal_lm_loss

    def inductor():
        torch._dynamo.reset()  # a fresh compile for this shape and variant
        return torch.compile(hf_causal_lm_loss)

    def inductor_chunked():
        cfg = getattr(torch._inductor.config, "auto_chunker", None)
        if cfg is None or not hasattr(cfg, "enable"):
            raise Skip(f"torch {torch.__version__} has no torch._inductor.config.auto_chunker")
        options = {k: v for k, v in CHUNKER_OPTIONS.items() if hasattr(cfg, k.split(".", 1)[1])}
        torch._dynamo.reset()

        def chunked_loss(hidden, weight, labels):  # its own code object: its own Dynamo cache entry
            return hf_causal_lm_loss(hidden, weight, labels)

        fn = torch.compile(chunked_loss, options=options)
        fn.bench_info = {"chunker_options": options}
        return fn

    def _slothc_op():
        try:
            import slothc.ops

            return slothc.ops.linear_cross_entropy
        except Exception as e:  # noqa: BLE001
            raise Skip(f"slothc.ops.linear_cross_entropy not available: {type(e).__name__}: {e}") from None

    def slothc():
        lce = _slothc_op()
        return lambda h, w, labels: lce(h, w, labels, ignore_index=IGNORE_INDEX, reduction="mean")

    def slothc_keep_logits():
        _slothc_op()
        import slothc.kernels.cross_entropy  # noqa: F401  registers torch.ops.slothc.cross_entropy
        held: dict = {}  # the model output that keeps the logits alive until the next call

        def fn(h, w, labels):
            # What the pass emits when the model returns its logits (options logits="keep"): the
            # lm_head stays, and slothc::cross_entropy reads its bf16 logits (no fp32 copy); the
            # gradient reaches h through the lm_head's own backward.
            held["logits"] = None  # as a training loop drops the last step's output first
            held["logits"] = logits = F.linear(h, w)
            loss, _ = torch.ops.slothc.cross_entropy(logits, labels, None, IGNORE_INDEX, "mean", 0.0, True)
            return loss

        fn.release = held.clear
        return fn

    def liger():
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except Exception as e:  # noqa: BLE001
            raise Skip(f"liger_kernel not importable: {type(e).__name__}: {e}") from None
        module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")

        def fn(h, w, labels):
            return module(w, h, labels)

        # Seen on an H200 (torch 2.11): the failed capture left the CUDA generator in capture
        # state, and the next case's torch.randn raised "Offset increment outside graph capture".
        fn.no_graph = "its forward calls .item() (host sync), so a CUDA graph cannot capture it"
        return fn

    table = {
        "eager": eager,
        "inductor": inductor,
        "inductor_chunked": inductor_chunked,
        "slothc": slothc,
        "slothc_keep_logits": slothc_keep_logits,
        "liger": liger,
    }
    order = ["eager"] + [n for n in PROVIDERS if n in names and n not in ("eager", "liger")]
    return {n: table[n] for n in order + (["liger"] if "liger" in names else [])}


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(device) -> None:
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_case(rec, provs, *, h, weight, labels, variant, modes, device, rep_ms, warmup_ms, extra, deadline=None,
             log=print):
    """Check, measure the memory of, and time every provider on one case; rows go to ``rec``.

    ``deadline`` (a ``time.perf_counter()`` value): providers that would start after it are
    recorded as skipped instead (the run's time budget).
    """
    import torch

    import _harness as H

    trainable = weight.requires_grad
    n, hidden = h.shape
    vocab = weight.shape[0]
    shape = (n, hidden, vocab)
    mode_flops = flops(n, hidden, vocab, trainable)
    dy = torch.ones((), device=device, dtype=torch.float32)  # d loss: the loss is the last node
    tol = H.CHECK_TOL.get(h.dtype, 1e-2)
    extra = dict(extra, variant=variant, tokens=n, hidden=hidden, vocab=vocab, ignore_index=IGNORE_INDEX,
                 ignored=int((labels == IGNORE_INDEX).sum()), amplify_ratio=amplify_ratio(n, hidden, vocab))
    tag0 = f"[{OP} {variant} {'x'.join(map(str, shape))}"

    def add(provider, mode, **kw):
        r = rec.add(op=OP, provider=provider, mode=mode, shape=shape, dtype=h.dtype, flops=mode_flops[mode],
                    **extra, **kw)
        tag = f"{tag0} {mode} {provider}]"
        if r["status"] == "ok":
            mem = r.get("peak_mem_bytes")
            note = f"  graph_error: {r['graph_error'][:160]}" if r.get("graph_error") else ""
            note += f"  wall_error: {r['wall_error'][:160]}" if r.get("wall_error") else ""
            ratio = r.get("peak_mem_ratio_eager")
            log(
                f"{tag} {H._fmt(r['median_ms'], '.3f')} ms {H._fmt(r.get('tflops'), '.4g')} TFLOP/s "
                f"{H._fmt(H._pct(r.get('frac_matmul_peak')), '.0f')}% mm ({r['timer']}); wall "
                f"{H._fmt(r.get('wall_median_ms'), '.3f')} ms; peak "
                f"{'-' if not isinstance(mem, (int, float)) else f'{mem / 2**30:.2f} GiB'}"
                f"{'' if not isinstance(ratio, (int, float)) else f' ({ratio:.2f}x eager)'}{note}"
            )
        else:
            log(f"{tag} {r['status']}: {r.get('reason')}")
        return r

    def all_modes(provider, **kw):
        for mode in modes:
            add(provider, mode, **kw)

    def outputs(fn):
        loss = fn(h, weight, labels)
        grads = torch.autograd.grad(loss, [h, weight] if trainable else [h], dy)
        H.synchronize(device)
        out = {"loss": loss.detach(), "dh": grads[0]}
        if trainable:
            out["dw"] = grads[1]
        return out

    def out_of_time():
        if deadline is None or time.perf_counter() < deadline:
            return None
        return "time budget spent (--budget-s; SLOTHC_STEP_LIMIT_S in gpu_session.sh)"

    if out_of_time():
        for name in provs:
            all_modes(name, status="skipped", reason=out_of_time())
        return
    t_ref = time.perf_counter()
    try:
        ref64 = reference64(h, weight, labels, trainable)
    except Exception as e:  # noqa: BLE001
        for name in provs:
            all_modes(name, status="skipped" if _is_oom(e) else "error", reason=f"float64 reference: {H._err(e)}")
        _free(device)
        return
    log(f"{tag0}] float64 reference {time.perf_counter() - t_ref:.2f} s")
    eager = eager_peak = None
    for name, builder in provs.items():
        t_prov = time.perf_counter()
        fn = got = None
        if out_of_time() and name != "eager":
            all_modes(name, status="skipped", reason=out_of_time())
            continue
        try:
            try:
                fn = builder()
            except H.Skip as e:
                all_modes(name, status="skipped", reason=str(e))
                continue
            except Exception as e:  # noqa: BLE001  a provider failing to build must not stop the others
                all_modes(name, status="error", reason=f"build: {H._err(e)}"[:500])
                continue
            info = dict(getattr(fn, "bench_info", {}))
            chunked0 = _auto_chunked()
            # Correctness first (the first call also compiles and autotunes: first_call_s).
            try:
                t0 = time.perf_counter()
                got = outputs(fn)
                info["first_call_s"] = time.perf_counter() - t0
                if name == "inductor_chunked":
                    info["auto_chunked"] = _auto_chunked() - chunked0
            except Exception as e:  # noqa: BLE001
                oom = _is_oom(e)
                all_modes(name, status="skipped" if oom else "error", reason=f"check: {H._err(e)}"[:500], **info)
                continue
            if name == "eager":  # first (providers()); if it failed, the gate is the float64 one alone
                eager = got
            errs = {f"err_{k}": H.rel_err(v, eager[k]) for k, v in got.items()} if eager else {}
            errs.update({f"err64_{k}": H.rel_err(v, ref64[k]) for k, v in got.items()})
            limit = {k: max(tol, H.CHECK_FACTOR * H.rel_err(eager[k], ref64[k]) if eager else 0.0) for k in got}
            bad = {k: f"{errs['err64_' + k]:.3g} > {limit[k]:.3g}" for k in got if not errs[f"err64_{k}"] <= limit[k]}
            if bad:
                reason = f"error vs float64 over max({tol}, {H.CHECK_FACTOR:g} x eager's): {bad}"
                all_modes(name, status="mismatch", reason=reason, **errs, **info)
                continue
            # Peak memory: one un-graphed forward and backward, before any timing.
            mem = _memory(fn, h, weight, labels, dy, device)
            if "peak_mem_bytes" in mem:
                if name == "eager":
                    eager_peak = mem["peak_mem_bytes"]
                if eager_peak:
                    mem["peak_mem_ratio_eager"] = mem["peak_mem_bytes"] / eager_peak
            elif mem.get("mem_error") and _is_oom_text(mem["mem_error"]):
                all_modes(name, status="skipped", reason=f"memory: {mem['mem_error']}", **errs, **info)
                continue
            _free(device)
            timed = H.time_provider(
                fn, [{"x": h, "dy": dy}], [weight, labels], device, modes=modes, rep_ms=rep_ms,
                warmup_ms=warmup_ms, warm_calls=1, no_graph=getattr(fn, "no_graph", None),
            )
            info["provider_s"] = time.perf_counter() - t_prov
            for mode, (timing, fields) in timed.items():
                kw = dict(**errs, **mem, **info, **fields)
                if timing is None:
                    kw["status"] = "skipped" if _is_oom_text(fields.get("reason", "")) else "error"
                    add(name, mode, **kw)
                else:
                    add(name, mode, timing=timing, **kw)
        finally:
            h.grad = None
            weight.grad = None
            getattr(fn, "release", lambda: None)()
            del fn, got
            _free(device)


def _is_oom_text(text: str) -> bool:
    return "OutOfMemoryError" in text or "out of memory" in text.lower()


def _auto_chunked() -> int:
    """How many graphs Inductor's auto-chunker has chunked in this process (0 where it does not exist)."""
    try:
        from torch._inductor import metrics

        return int(getattr(metrics, "num_auto_chunking", 0))
    except Exception:  # noqa: BLE001
        return 0


def _memory(fn, h, weight, labels, dy, device) -> dict:
    """The peak-memory fields of one un-graphed forward and backward (module docstring)."""
    import torch

    import _harness as H

    if not H.is_cuda(device):
        return {"mem_skipped": f"no CUDA memory statistics on {torch.device(device).type}"}
    h.grad = weight.grad = None
    getattr(fn, "release", lambda: None)()  # no logits left from the check in "before"
    _free(device)
    try:
        fwd, full = H.peak_memory([lambda _: fn(h, weight, labels), lambda loss: loss.backward(dy)], device)
    except Exception as e:  # noqa: BLE001
        return {"mem_error": H._err(e)}
    finally:
        h.grad = weight.grad = None
        getattr(fn, "release", lambda: None)()
    return {
        "peak_mem_bytes": full["peak"],
        "mem_fwd_peak_bytes": fwd["peak"],
        "mem_fwd_retained_bytes": fwd["retained"],
        "mem_after_bytes": full["retained"],
    }


def main(argv=None):
    import _harness as H

    p = H.bench_parser(__doc__.splitlines()[0], PROVIDERS)
    p.set_defaults(modes=["fwd", "full"])
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens N (default 4096 8192 16384; quick 64)")
    p.add_argument("--vocab", type=int, default=None, help=f"vocabulary V (default {VOCAB}; quick 256)")
    p.add_argument("--trainable-at", type=int, nargs=2, metavar=("HIDDEN", "TOKENS"), default=None,
                   help="the one shape of the trainable variant (default: first hidden, middle tokens)")
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up ms per measurement (default 10)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole run: providers and cases that would start later are recorded as "
                        "skipped (default: $SLOTHC_STEP_LIMIT_S less 20 s when set, as gpu_session.sh sets it; "
                        "else none)")
    args = p.parse_args(argv)
    rows_given = args.rows
    # --quick: tiny, because slothc's row kernel is slow in the Triton interpreter (about 4 s a call
    # at 64 x 256, 30 s at 128 x 1000) and the smoke run makes a dozen calls per provider and case.
    args.hidden = args.hidden or ([32] if args.quick else [2048, 4096])
    args.rep_ms = args.rep_ms or (20.0 if args.quick else 50.0)
    args = H.resolve_args(args)
    import torch

    tokens = args.tokens or ([rows_given] if rows_given else ([64] if args.quick else [4096, 8192, 16384]))
    vocab = args.vocab or (256 if args.quick else VOCAB)
    warmup_ms = args.warmup_ms or (5.0 if args.quick else 10.0)
    trainable_at = tuple(args.trainable_at or (args.hidden[0], tokens[len(tokens) // 2]))
    device, dtype = args.device, args.torch_dtype
    torch.manual_seed(0)
    t_start = time.perf_counter()
    budget = args.budget_s
    if budget is None and os.environ.get("SLOTHC_STEP_LIMIT_S"):
        budget = float(os.environ["SLOTHC_STEP_LIMIT_S"]) - 20.0  # room for the last provider and the tables
    deadline = None if budget is None else t_start + budget
    rec = H.Recorder(args.out, device)
    H.measure_ceilings(rec, device, matmul=not args.no_matmul_peak, quick=args.quick)
    print(
        f"copy bandwidth {rec.copy_gbps:.0f} GB/s, bf16 matmul {H._fmt(rec.matmul_tflops, '.0f')} TFLOP/s "
        f"on {rec.env['device']}",
        flush=True,
    )
    provs = providers(args.providers)
    cases = [(hd, n, "frozen") for hd in args.hidden for n in tokens if "frozen" in args.variants]
    if "trainable" in args.variants:  # right after its frozen twin, so a cut-short run keeps both
        hd, n = trainable_at
        at = [i for i, c in enumerate(cases) if c[:2] == (hd, n)]
        cases.insert(at[0] + 1 if at else len(cases), (hd, n, "trainable"))
    weights: dict = {}
    for hd, n, variant in cases:
        t_case = time.perf_counter()
        if hd not in weights:
            weights.clear()  # one weight at a time (1 GiB at hidden 4096)
            _free(device)
            w = torch.randn(vocab, hd, device=device, dtype=dtype)
            w.mul_(LOGIT_STD / math.sqrt(hd))
            weights[hd] = (w, eager_matches_hf(w, device))
            if weights[hd][1] is False:
                print(f"WARNING: hf_causal_lm_loss differs from transformers' ForCausalLMLoss at hidden {hd}")
        w, hf = weights[hd]
        w.requires_grad_(variant == "trainable")
        h = torch.randn(n, hd, device=device, dtype=dtype, requires_grad=True)
        labels = make_labels(n, vocab, device)
        run_case(
            rec, provs, h=h, weight=w, labels=labels, variant=variant, modes=args.modes, device=device,
            rep_ms=args.rep_ms, warmup_ms=warmup_ms, extra={"eager_matches_hf": hf}, deadline=deadline,
        )
        del h, labels
        _free(device)
        print(f"[{OP} {variant} {n}x{hd}x{vocab}] case done in {time.perf_counter() - t_case:.1f} s "
              f"({time.perf_counter() - t_start:.1f} s so far)", flush=True)
    H.finish(rec, f"{OP} ({args.dtype})", args.table)
    print("\n" + H.compact_table(rec.rows))
    if args.table:
        with open(args.table, "a") as f:
            print("\n" + H.compact_table(rec.rows), file=f)
    print(f"\n{OP}: {time.perf_counter() - t_start:.1f} s in all", flush=True)
    return rec.rows


if __name__ == "__main__":
    main()
