"""Shared pieces of the slothc microbenchmarks: timing, ceilings, result rows, tables.

Every bench script measures the two ceilings of the device in the same run (METHOD: measure them,
don't quote datasheets) and reports each timing against them:

- copy bandwidth: a large device-to-device copy, counting bytes read plus bytes written;
- bf16 matmul rate: an n x n x n product on random data (for the matmul-bound fusions).

Two timers on CUDA, both reported as median and 20th/80th percentiles:

- primary, ``timer = "cuda_graph"``: each call (``fwd``: one forward; ``full``: forward and
  ``y.backward(dy)``) is captured once in a CUDA graph and ``g.replay()`` is timed by
  ``triton.testing.do_bench`` (CUDA events, L2 flushed before each replay). This is the GPU time of
  the kernels, with the per-call CPU cost (custom-op dispatch, Triton's Python launcher, the
  autograd engine) taken out: what the bandwidth ceilings are about. ``bwd`` = ``full`` - ``fwd``
  (``bwd_method = "full_minus_fwd"``);
- secondary, ``wall_*`` fields: the un-graphed calls timed by ``do_bench`` (``bwd``: the backward
  alone, a fresh forward untimed before each call, ``events+setup``). What an eager loop pays, CPU
  launch overhead included whenever the CPU is slower than the GPU.

When a provider's call cannot be captured, the row records ``graph_error`` and its primary columns
hold the wall timer's numbers with ``timer`` naming that timer (tables mark such cells with ``*``).
Besides the L2 flush, the wall timer rotates among several input sets when one set is under 4x the
L2, and the graph timer captures one graph per set, replayed round robin, when one set fits in L2,
so that no call reads what the previous one left in the cache. On CPU
(``--quick`` smoke runs under ``TRITON_INTERPRET=1``) there are neither CUDA graphs nor do_bench: a
plain wall-clock timer (``perf_counter``) stands in for both, and its numbers only show that the
pipeline runs.

``time_provider`` runs both timers for one provider (``run_fwd_bwd`` uses it after its check;
benches with their own check, like the loss bench, call it directly). ``peak_memory`` measures the
peak CUDA memory of one un-graphed call (``max_memory_allocated`` over what was allocated before).

Run as a script for the ceilings alone, or to summarise a results file:

    python3 bench/_harness.py ceilings --out results.jsonl
    python3 bench/_harness.py summarize results.jsonl > results.md    # Markdown, for bench/results/
    python3 bench/_harness.py compact results.jsonl                   # providers side by side
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)  # median, p20, p80: the order do_bench returns them in
DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2, used when the device does not report its own


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    # "cuda_graph" (graph replays timed by do_bench); "do_bench"; "events+setup" (do_bench's method
    # written out, an untimed setup before each call); "perf_counter" (CPU)
    method: str


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: torch.device | str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable,
    device: torch.device | str,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Optional[Sequence[torch.Tensor]] = None,
    setup: Optional[Callable[[], object]] = None,
) -> Timing:
    """Median, p20 and p80 of ``fn``'s run time in milliseconds.

    ``fn`` must already have run once (compilation and autotuning stay out of the numbers).
    ``grad_to_none``: leaves whose ``.grad`` is reset before each call, so that a backward
    pass assigns its gradient instead of accumulating into the last one (an extra kernel).
    ``setup``: when given, each call is ``fn(setup())`` with only ``fn`` timed (a backward pass
    timed alone needs a fresh forward graph before each call: Inductor's compiled backward frees
    its saved tensors, so ``retain_graph=True`` is refused). Without it, ``fn()`` is timed by
    ``triton.testing.do_bench``; with it, by the same method written out (CUDA events around the
    call, L2 flushed before it).
    """
    grad_to_none = list(grad_to_none or [])
    if is_cuda(device) and setup is None:
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES)
        )
        return Timing(float(med), float(p20), float(p80), "do_bench")
    cuda = is_cuda(device)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if cuda else None

    def call() -> float:
        for t in grad_to_none:
            t.grad = None
        arg = setup() if setup is not None else None
        run = (lambda: fn(arg)) if setup is not None else fn
        if cuda:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            return (start, end)
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) * 1e3

    def elapsed(marks) -> list[float]:
        if cuda:
            torch.cuda.synchronize(device)
            return [s.elapsed_time(e) for s, e in marks]
        return list(marks)

    estimate = max(statistics.median(elapsed([call() for _ in range(5 if cuda else 1)])), 1e-4)
    for _ in range(max(1, int(warmup_ms / estimate))):
        call()
    n = max(3 if not cuda else 1, min(2000 if cuda else 1000, int(rep_ms / estimate)))
    samples = elapsed([call() for _ in range(n)])
    method = "events+setup" if cuda else "perf_counter"
    return Timing(_quantile(samples, 0.5), _quantile(samples, 0.2), _quantile(samples, 0.8), method)


def time_graphs(
    work: Callable[[dict], object],
    sets: Sequence[dict],
    device: torch.device | str,
    *,
    leaves: Sequence[torch.Tensor] = (),
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    warm_calls: int = 3,
) -> Timing:
    """GPU time of ``work(s)``: captured once per input set in its own CUDA graph, replays timed.

    ``work(s)`` runs the call on input set ``s`` (a forward, or a forward and its backward) and may
    return tensors to keep alive (the graph's outputs). First it runs ``warm_calls`` times per set
    on a side stream (compilation, autotuning, lazily built backward graphs, Triton module loads:
    nothing of that may happen during capture), as ``torch.cuda.graphs`` asks. Then one graph per
    set is captured, and ``g.replay()`` is timed by ``triton.testing.do_bench`` (CUDA events, L2
    flushed before each replay), round robin over the sets' graphs.

    ``leaves``: tensors whose ``.grad`` is set to None before each warm-up call and each capture,
    so the captured backward assigns its gradients (into the graph's own memory, rewritten on every
    replay) instead of accumulating. They are None again on return.

    Raises whatever the warm-up, the capture or the replay raises (the caller records it); the
    current stream is restored either way.
    """
    import triton.testing

    device = torch.device(device)
    leaves = list(leaves)

    def reset():
        for t in leaves:
            t.grad = None

    prev = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(prev)
    graphs: list = []
    keep: list = []
    try:
        with torch.cuda.stream(side):
            for _ in range(warm_calls):
                for s in sets:
                    reset()
                    work(s)
        prev.wait_stream(side)
        torch.cuda.synchronize(device)
        for s in sets:
            reset()
            g = torch.cuda.CUDAGraph()
            graphs.append(g)
            with torch.cuda.graph(g):
                keep.append(work(s))
        torch.cuda.synchronize(device)
        replays = [g.replay for g in graphs]
        for r in replays:  # one replay each, checked, before do_bench's own first call
            r()
        torch.cuda.synchronize(device)
        med, p20, p80 = triton.testing.do_bench(
            rotate(replays), warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES)
        )
        return Timing(float(med), float(p20), float(p80), "cuda_graph")
    finally:
        # A failed capture can leave the capture stream current (torch.cuda.graph's exit raises
        # before restoring it): put the caller's stream back.
        torch.cuda.set_stream(prev)
        reset()
        keep.clear()
        graphs.clear()


def peak_memory(stages: Sequence[Callable[[object], object]], device: torch.device | str) -> list[dict]:
    """CUDA memory of running ``stages`` once, un-graphed, in order, each given the last one's result
    (the first gets None): per stage ``{"peak": bytes, "retained": bytes}``.

    Definition: with the inputs already allocated, ``torch.cuda.synchronize()``,
    ``before = torch.cuda.memory_allocated()``, ``torch.cuda.reset_peak_memory_stats()``; after each
    stage (synchronized) ``peak = torch.cuda.max_memory_allocated() - before`` (the most allocated
    at any moment since the start, over what the inputs held) and ``retained =
    torch.cuda.memory_allocated() - before`` (what is still allocated: results, tensors saved for
    the backward, gradients, anything a stage keeps alive). Bytes the tensors hold, rounded up to
    the caching allocator's blocks (512 B); memory the allocator keeps cached but free, CUDA
    graphs' pools and cuBLAS/Triton workspaces allocated outside it are not counted. The last
    stage's result is dropped before returning; what the stages left (e.g. ``.grad``) is the
    caller's to free. Raises on a device other than CUDA.
    """
    if not is_cuda(device):
        raise RuntimeError(f"peak memory is measured on CUDA only, not {torch.device(device).type}")
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out, marks = None, []
    for stage in stages:
        out = stage(out)
        torch.cuda.synchronize(device)
        marks.append(
            {
                "peak": torch.cuda.max_memory_allocated(device) - before,
                "retained": torch.cuda.memory_allocated(device) - before,
            }
        )
    del out
    return marks


def full_minus_fwd(full: Timing, fwd: Timing) -> Timing:
    """The backward's GPU time as ``full`` - ``fwd`` (both graph-timed).

    Median: the difference of the medians. Band: ``full.p20 - fwd.p80`` to ``full.p80 - fwd.p20``,
    the difference's range when each timing lies within its own p20-p80 (wider than either band;
    the two were measured separately, so no per-call difference exists).
    """
    return Timing(
        full.median_ms - fwd.median_ms, full.p20_ms - fwd.p80_ms, full.p80_ms - fwd.p20_ms, full.method
    )


def _quantile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (the rule torch.quantile and do_bench use)."""
    s = sorted(samples)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def l2_bytes(device: torch.device | str) -> int:
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)
    return DEFAULT_L2_BYTES


def rotation_count(bytes_per_set: int, device: torch.device | str, *, limit: int = 16) -> int:
    """How many input sets to rotate among so that together they are 4x the L2 (1 if one set is).

    Always 1 on CPU: its numbers only show that the pipeline runs.
    """
    if bytes_per_set <= 0 or not is_cuda(device):
        return 1
    return max(1, min(limit, math.ceil(4 * l2_bytes(device) / bytes_per_set)))


def rotate(calls: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs ``calls[0]``, then ``calls[1]``, ... round robin."""
    if len(calls) == 1:
        return calls[0]
    ring = itertools.cycle(calls)
    return lambda: next(ring)()


# --------------------------------------------------------------------------------------------------
# Ceilings


def copy_bandwidth(
    device: torch.device | str, nbytes: int = 2**30, rep_ms: float = 100.0
) -> tuple[float, Timing, int]:
    """Device-to-device copy rate: (GB/s with 1 GB = 1e9 bytes, timing, bytes moved).

    Bytes moved = bytes read plus bytes written. Random bf16 data in a buffer far larger than the
    L2 (1 GiB by default), copied with ``Tensor.copy_``.
    """
    n = nbytes // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    t = time_fn(lambda: dst.copy_(src), device, rep_ms=rep_ms)
    moved = 2 * src.numel() * src.element_size()
    return moved / (t.median_ms * 1e-3) / 1e9, t, moved


def matmul_peak(
    device: torch.device | str, n: int = 8192, dtype: torch.dtype = torch.bfloat16, rep_ms: float = 200.0
) -> tuple[float, Timing, int]:
    """Dense n x n x n matmul rate: (TFLOP/s, timing, flops), on random data (zeros run faster: METHOD)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    t = time_fn(lambda: a @ b, device, rep_ms=rep_ms)
    flops = 2 * n**3
    return flops / (t.median_ms * 1e-3) / 1e12, t, flops


# --------------------------------------------------------------------------------------------------
# Environment and result rows


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_sha() -> str:
    """``SLOTHC_GIT_SHA`` when set (the GPU machine's copy has no .git), else ``git rev-parse``."""
    sha = os.environ.get("SLOTHC_GIT_SHA")
    if sha:
        return sha
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        def git(*args):
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)

        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode == 0:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def device_name(device: torch.device | str) -> str:
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def environment(device: torch.device | str) -> dict:
    """The fields every row carries."""
    import triton

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel"),
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }


class Recorder:
    """Collects result rows, appends each as one JSON line to ``out`` (when given) as it comes."""

    def __init__(
        self,
        out: Optional[str],
        device: torch.device | str,
        copy_gbps: Optional[float] = None,
        matmul_tflops: Optional[float] = None,
    ):
        self.out = out
        self.env = environment(device)
        self.copy_gbps = copy_gbps
        # the measured bf16 matmul rate; rows given ``flops`` carry their fraction of it
        self.matmul_tflops = matmul_tflops
        self.rows: list[dict] = []
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def add(
        self,
        *,
        op: str,
        provider: str,
        mode: str,
        shape: Sequence[int],
        dtype: torch.dtype | str,
        timing: Optional[Timing] = None,
        bytes_moved: Optional[int] = None,
        flops: Optional[float] = None,
        status: str = "ok",
        wall: Optional[Timing] = None,
        **extra,
    ) -> dict:
        """One row. ``status``: ok | skipped | mismatch | error (the last three carry ``reason``).

        ``timing`` fills the primary columns (``median_ms``, ``p20_ms``, ``p80_ms``, ``timer``,
        ``gbps``, ``frac_copy_bw``); ``wall``, when given, the secondary ones (``wall_median_ms``,
        ``wall_p20_ms``, ``wall_p80_ms``, ``wall_timer``, ``wall_gbps``, ``wall_frac_copy_bw``).
        ``flops`` (matmul-bound ops) adds ``flops``, ``tflops`` and, once the matmul ceiling is known
        (``matmul_tflops``), ``frac_matmul_peak``; with ``wall`` also ``wall_tflops`` and
        ``wall_frac_matmul_peak``.
        """
        row = dict(self.env)
        row.update(
            op=op,
            provider=provider,
            mode=mode,
            shape=list(shape),
            dtype=str(dtype).replace("torch.", ""),
            status=status,
            median_ms=timing.median_ms if timing else None,
            p20_ms=timing.p20_ms if timing else None,
            p80_ms=timing.p80_ms if timing else None,
            timer=timing.method if timing else None,
            bytes=bytes_moved,
            gbps=None,
            copy_gbps=self.copy_gbps,
            frac_copy_bw=None,
        )
        row["gbps"], row["frac_copy_bw"] = self._rate(timing, bytes_moved)
        if flops:
            row["flops"] = flops
        if timing and flops and timing.median_ms > 0:
            row["tflops"] = flops / (timing.median_ms * 1e-3) / 1e12
            if op != "ceiling" and self.matmul_tflops:
                row["matmul_tflops"] = self.matmul_tflops
                row["frac_matmul_peak"] = row["tflops"] / self.matmul_tflops
        if wall is not None or "wall_error" in extra:
            row.update(
                wall_median_ms=wall.median_ms if wall else None,
                wall_p20_ms=wall.p20_ms if wall else None,
                wall_p80_ms=wall.p80_ms if wall else None,
                wall_timer=wall.method if wall else None,
            )
            row["wall_gbps"], row["wall_frac_copy_bw"] = self._rate(wall, bytes_moved)
            if flops and wall is not None and wall.median_ms > 0:
                row["wall_tflops"] = flops / (wall.median_ms * 1e-3) / 1e12
                if self.matmul_tflops:
                    row["wall_frac_matmul_peak"] = row["wall_tflops"] / self.matmul_tflops
        row.update(extra)
        row = {k: _jsonable(v) for k, v in row.items()}
        self.rows.append(row)
        if self.out:
            with open(self.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def _rate(self, timing: Optional[Timing], bytes_moved: Optional[int]) -> tuple:
        """(GB/s, fraction of copy bandwidth) of ``bytes_moved`` in ``timing``'s median; None where
        undefined (no timing, no bytes, or a median <= 0: a derived bwd lost in the noise)."""
        if not timing or not bytes_moved or not timing.median_ms > 0:
            return None, None
        gbps = bytes_moved / (timing.median_ms * 1e-3) / 1e9
        return gbps, (gbps / self.copy_gbps if self.copy_gbps else None)


def _jsonable(v):
    """Plain JSON: non-finite floats as strings ("inf", "nan"), dtypes and devices as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v).replace("torch.", "")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# --------------------------------------------------------------------------------------------------
# Checks


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf if ``out`` holds a NaN or inf."""
    o, r = out.detach().double(), ref.detach().double()
    if not torch.isfinite(o).all():
        return math.inf
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


# The gate before timing (a broken provider is recorded, not timed). Each output's relative L2
# error against a float64 run of eager may be at most CHECK_FACTOR times eager's own error, or
# CHECK_TOL, whichever is larger: a right kernel differs by rounding (about 2e-3 in bf16), a wrong
# one by O(1). The floor keeps exact-to-rounding outputs from failing on a near-zero eager error;
# the factor lets gradients through where eager's reduction is itself imprecise.
CHECK_TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}
CHECK_FACTOR = 4.0


class Skip(Exception):
    """A provider that cannot run here (not installed, wrong device); the message is the reason."""


@dataclass
class FwdBwdCase:
    """One shape of one op, benchmarked over providers and modes.

    ``make_set()`` returns a fresh input set ``{"x": leaf requiring grad, "dy": upstream gradient}``
    (an op of several inputs and outputs: ``x`` a tuple of leaves, ``dy`` a tuple of gradients);
    ``params`` are shared by all sets (weights are small and stay in L2 in a real model too);
    ``bytes_moved[mode]`` is the op's minimal traffic for that mode (the bench states its model).
    """

    op: str
    variant: str
    shape: tuple
    dtype: torch.dtype
    make_set: Callable[[], dict]
    params: list
    bytes_moved: dict
    extra: Optional[dict] = None
    flops: Optional[dict] = None  # matmul-bound ops: flops per mode (rows then carry tflops, frac_matmul_peak)


def run_fwd_bwd(
    rec: Recorder,
    case: FwdBwdCase,
    providers: dict,
    device: torch.device | str,
    *,
    modes: Sequence[str] = ("fwd", "bwd", "full"),
    rep_ms: float = 100.0,
    warmup_ms: float = 25.0,
    log=print,
) -> list[dict]:
    """Check each provider against ``providers["eager"]``, then time it in each mode.

    ``providers``: name -> builder; ``builder()`` returns ``fn(x, *params) -> y`` for this case or
    raises ``Skip``. Builders run per case, so a compiled provider compiles for this shape alone.
    Modes: ``fwd`` (forward with autograd recording, as in training), ``bwd`` (the backward),
    ``full`` (forward then backward). Returns the rows added.

    On CUDA each mode gets two timings (module docstring): the primary one from CUDA-graph replays
    (``bwd``: graph-timed ``full`` - ``fwd``), the secondary ``wall_*`` one from the un-graphed
    calls (``bwd``: the backward alone, a fresh forward untimed before each call). A provider whose
    call cannot be captured gets ``graph_error`` and the wall numbers in its primary columns, with
    ``timer`` naming the wall timer. On CPU the wall timer alone fills both.
    """
    rows = []
    trainable = [p for p in case.params if p.requires_grad]
    set_bytes = _set_bytes(case.make_set())
    sets = [case.make_set() for _ in range(rotation_count(set_bytes, device))]
    extra = dict(case.extra or {}, variant=case.variant, rotation_sets=len(sets))
    tol = CHECK_TOL.get(case.dtype, 1e-2)

    def add(provider, mode, **kw):
        r = rec.add(op=case.op, provider=provider, mode=mode, shape=case.shape, dtype=case.dtype, **extra, **kw)
        rows.append(r)
        tag = f"[{case.op} {case.variant} {'x'.join(map(str, case.shape))} {mode} {provider}]"
        if r["status"] == "ok":
            pct = r["frac_copy_bw"] * 100 if r["frac_copy_bw"] is not None else None
            wpct = r["wall_frac_copy_bw"] * 100 if r.get("wall_frac_copy_bw") is not None else None
            note = f"  graph_error: {r['graph_error'][:200]}" if r.get("graph_error") else ""
            note += f"  wall_error: {r['wall_error'][:200]}" if r.get("wall_error") else ""
            log(
                f"{tag} {_fmt(r['median_ms'], '.4f')} ms  {_fmt(r['gbps'], '.0f')} GB/s  {_fmt(pct, '.0f')}% copy"
                f" ({r['timer']});  wall {_fmt(r.get('wall_median_ms'), '.4f')} ms  {_fmt(wpct, '.0f')}% copy"
                f" ({r.get('wall_timer')}){note}"
            )
        else:
            log(f"{tag} {r['status']}: {r.get('reason')}")
        return r

    def outputs(fn, s, params):
        xs = _map(s["x"], lambda t: t, flat=True)
        y = fn(s["x"], *params)
        grads = torch.autograd.grad(y, xs + [p for p in params if p.requires_grad], s["dy"])
        if isinstance(y, (tuple, list)):  # several outputs (q and k): compared as one vector
            y = torch.cat([t.reshape(-1) for t in y])
        synchronize(device)
        dx = ["dx"] if len(xs) == 1 else [f"dx{i}" for i in range(len(xs))]
        names = ["y", *dx] + [f"d{getattr(p, '_bench_name', i)}" for i, p in enumerate(trainable)]
        return dict(zip(names, [y.detach(), *grads]))

    ref64 = eager = None
    for name, builder in providers.items():
        try:
            fn = builder()
        except Skip as e:
            for mode in modes:
                add(name, mode, status="skipped", reason=str(e))
            continue
        except Exception as e:  # noqa: BLE001  a provider failing to build must not stop the others
            for mode in modes:
                add(name, mode, status="error", reason=f"build: {type(e).__name__}: {e}"[:500])
            continue
        # Correctness first: against eager, and against eager run on float64 copies of the inputs.
        try:
            if eager is None:
                if name != "eager":
                    raise RuntimeError("the first provider must be eager (the reference)")
                x64 = _map(sets[0]["x"], lambda t: t.detach().double().requires_grad_(True))
                s64 = {"x": x64, "dy": _map(sets[0]["dy"], lambda t: t.double())}
                p64 = [p.detach().double().requires_grad_(p.requires_grad) for p in case.params]
                ref64 = outputs(fn, s64, p64)
            got = outputs(fn, sets[0], case.params)
            eager = eager or got
            errs = {f"err_{k}": rel_err(v, eager[k]) for k, v in got.items()}
            errs.update({f"err64_{k}": rel_err(v, ref64[k]) for k, v in got.items()})
        except Exception as e:  # noqa: BLE001
            for mode in modes:
                add(name, mode, status="error", reason=f"check: {type(e).__name__}: {e}"[:500])
            continue
        limit = {k: max(tol, CHECK_FACTOR * rel_err(eager[k], ref64[k])) for k in got}
        bad = {k: f"{errs['err64_' + k]:.3g} > {limit[k]:.3g}" for k in got if not errs[f"err64_{k}"] <= limit[k]}
        if bad:
            for mode in modes:
                reason = f"error vs float64 over max({tol}, {CHECK_FACTOR:g} x eager's): {bad}"
                add(name, mode, status="mismatch", reason=reason, **errs)
            continue
        timed = time_provider(fn, sets, case.params, device, modes=modes, rep_ms=rep_ms, warmup_ms=warmup_ms)
        for mode, (timing, fields) in timed.items():
            kw = dict(bytes_moved=case.bytes_moved[mode], flops=(case.flops or {}).get(mode), **errs, **fields)
            if timing is None:
                add(name, mode, status="error", **kw)
            else:
                add(name, mode, timing=timing, **kw)
    return rows


def time_provider(
    fn: Callable,
    sets: Sequence[dict],
    params: Sequence,
    device: torch.device | str,
    *,
    modes: Sequence[str] = ("fwd", "bwd", "full"),
    rep_ms: float = 100.0,
    warmup_ms: float = 25.0,
    warm_calls: int = 3,
    no_graph: Optional[str] = None,
) -> dict:
    """Both timings of ``fn(s["x"], *params)`` in each mode: ``{mode: (primary Timing or None, row
    fields)}``. ``no_graph``: a reason not to capture ``fn`` at all (it syncs with the host, say:
    a failed capture can leave CUDA state, e.g. the RNG's, broken for later work); the rows then
    carry the wall timer with that reason as ``graph_error``.

    ``sets``: input sets ``{"x": leaf requiring grad, "dy": upstream gradient}``; ``params``: shared
    by all sets, those that require grad get gradients too (non-tensors and tensors that do not
    are passed through). Wall timings first (kept in memory), then the graphs (``time_graphs``,
    ``warm_calls`` warm-up calls per set before capture): a capture that goes wrong cannot take the
    wall numbers with it. The fields: ``wall`` (the wall Timing, for ``Recorder.add``) or
    ``wall_error``, the graph fields (``graph_sets``, ``graph_error``, ``graph_skipped``,
    ``bwd_method``, ``graph_fwd_ms``, ``graph_full_ms``) and, where neither timer gave a number,
    ``reason``. Gradients are None again on return.
    """
    trainable = [p for p in params if isinstance(p, torch.Tensor) and p.requires_grad]
    walls: dict = {}
    for mode in modes:
        try:
            walls[mode] = _time_mode(fn, mode, sets, params, trainable, device, rep_ms, warmup_ms)
        except Exception as e:  # noqa: BLE001
            walls[mode] = f"{mode}: {_err(e)}"
        finally:
            _reset_grads(sets, trainable)
    if is_cuda(device):
        torch.cuda.empty_cache()  # the graphs' private pools come on top of what the wall calls cached
    if no_graph and is_cuda(device):
        graphs = {"sets": 0, "fwd": f"not captured: {no_graph}", "full": f"not captured: {no_graph}"}
    else:
        graphs = _graph_timings(fn, modes, sets, params, trainable, device, rep_ms, warmup_ms, warm_calls)
    out = {}
    for mode in modes:
        wall = walls[mode] if isinstance(walls[mode], Timing) else None
        fields: dict = {"wall": wall}
        if wall is None:
            fields["wall_error"] = walls[mode]
        timing, graph_fields = _primary(mode, graphs, wall, device)
        fields.update(graph_fields)
        if timing is None:
            fields["reason"] = f"graph: {graph_fields.get('graph_error')}; wall: {walls[mode]}"[:1000]
        out[mode] = (timing, fields)
    return out


def _set_bytes(s: dict) -> int:
    """Bytes of one input set (its tensors, or tuples of them)."""
    return sum(t.numel() * t.element_size() for v in s.values() for t in _map(v, lambda t: t, flat=True))


def _backward(y, dy) -> None:
    """``y.backward(dy)``; ``y`` and ``dy`` may be sequences (an op with several outputs)."""
    torch.autograd.backward(y, dy)


def _map(v, fn, flat: bool = False):
    """``fn`` over a tensor or a tuple/list of tensors (``flat``: as a list)."""
    if isinstance(v, (tuple, list)):
        return [fn(t) for t in v] if flat else type(v)(fn(t) for t in v)
    return [fn(v)] if flat else fn(v)


def _err(e: BaseException) -> str:
    """``Type: message``, with the exception it happened during (a failed capture's first cause)."""
    msg = f"{type(e).__name__}: {e}"
    ctx = e.__cause__ or e.__context__
    if ctx is not None:
        msg += f" (during {type(ctx).__name__}: {ctx})"
    return msg[:1000]


def _reset_grads(sets, trainable) -> None:
    for s in sets:
        for t in _map(s["x"], lambda t: t, flat=True):
            t.grad = None
    for p in trainable:
        p.grad = None


def _graph_timings(fn, modes, sets, params, trainable, device, rep_ms, warmup_ms, warm_calls=3) -> dict:
    """``{"sets": graphs per mode, "fwd": Timing | error str, "full": ...}`` from CUDA-graph
    replays; ``{}`` off CUDA.

    ``bwd`` needs both (it is ``full`` - ``fwd``).
    """
    if not is_cuda(device):
        return {}
    need = [m for m in ("fwd", "full") if m in modes or "bwd" in modes]
    leaves = [t for s in sets for t in _map(s["x"], lambda t: t, flat=True)] + list(trainable)
    # One graph per input set, replayed round robin, only while one set fits in L2 (do_bench flushes
    # L2 before each replay anyway); else the first set alone.
    set_bytes = _set_bytes(sets[0])
    if set_bytes > l2_bytes(device):
        sets = sets[:1]
    work = {
        "fwd": lambda s: fn(s["x"], *params),
        "full": lambda s: _backward(fn(s["x"], *params), s["dy"]),
    }
    out: dict = {"sets": len(sets)}
    for mode in need:
        try:
            out[mode] = time_graphs(
                work[mode], sets, device, leaves=leaves, warmup_ms=warmup_ms, rep_ms=rep_ms,
                warm_calls=warm_calls,
            )
        except Exception as e:  # noqa: BLE001  recorded in the rows; the wall timer stands in
            out[mode] = f"{mode} capture/replay: {_err(e)}"
        finally:
            _reset_grads(sets, trainable)
            torch.cuda.empty_cache()  # this mode's graph pool, before the next mode captures its own
    return out


def _primary(mode, graphs: dict, wall: Optional[Timing], device) -> tuple[Optional[Timing], dict]:
    """The primary timing of ``mode`` and the row fields that say where it came from.

    The graph timing when there is one (``bwd``: ``full`` - ``fwd``, ``bwd_method =
    "full_minus_fwd"``); otherwise the wall timing, with ``graph_error`` (CUDA) or ``graph_skipped``
    (CPU) saying why, and ``timer`` naming the wall timer (``bwd_method = "direct"`` for ``bwd``).
    """
    fields: dict = {"graph_sets": graphs.get("sets")} if graphs else {}
    if not is_cuda(device):
        fields["graph_skipped"] = f"no CUDA graphs on {torch.device(device).type}: wall timer only"
        got = None
    elif mode == "bwd":
        fwd, full = graphs.get("fwd"), graphs.get("full")
        if isinstance(fwd, Timing) and isinstance(full, Timing):
            got = full_minus_fwd(full, fwd)
            fields["graph_fwd_ms"], fields["graph_full_ms"] = fwd.median_ms, full.median_ms
        else:
            got = None
            fields["graph_error"] = "; ".join(str(g) for g in (fwd, full) if not isinstance(g, Timing))
    else:
        g = graphs.get(mode)
        got = g if isinstance(g, Timing) else None
        if got is None:
            fields["graph_error"] = str(g)
    if mode == "bwd":
        fields["bwd_method"] = "full_minus_fwd" if got is not None else "direct"
    return (got if got is not None else wall), fields


def _time_mode(fn, mode, sets, params, trainable, device, rep_ms, warmup_ms) -> Timing:
    """The wall timing of ``mode`` (un-graphed calls; see ``time_fn``)."""
    leaves = [t for s in sets for t in _map(s["x"], lambda t: t, flat=True)] + list(trainable)
    ring = itertools.cycle(sets)
    if mode == "fwd":
        calls = [lambda s=s: fn(s["x"], *params) for s in sets]
        for call in calls:  # first calls compile and autotune; keep them out of the timing
            call()
        synchronize(device)
        return time_fn(rotate(calls), device, rep_ms=rep_ms, warmup_ms=warmup_ms)
    if mode == "bwd":
        # The forward runs untimed before each call; the graph is used once, as in training.
        def forward():
            s = next(ring)
            return fn(s["x"], *params), s["dy"]

        def backward(state):
            y, dy = state
            _backward(y, dy)

        for _ in sets:
            backward(forward())
        synchronize(device)
        return time_fn(
            backward, device, rep_ms=rep_ms, warmup_ms=warmup_ms, grad_to_none=leaves, setup=forward
        )
    if mode == "full":
        calls = [lambda s=s: _backward(fn(s["x"], *params), s["dy"]) for s in sets]
        for call in calls:
            call()
        synchronize(device)
        return time_fn(rotate(calls), device, rep_ms=rep_ms, warmup_ms=warmup_ms, grad_to_none=leaves)
    raise ValueError(f"unknown mode {mode!r}; use fwd, bwd or full")


# --------------------------------------------------------------------------------------------------
# Tables


def _fmt(v, spec: str) -> str:
    return "-" if v is None or isinstance(v, str) else format(v, spec)


def _pct(frac) -> Optional[float]:
    return None if frac is None or isinstance(frac, str) else frac * 100


TIMERS_NOTE = (
    "GPU time: CUDA-graph replays timed by do_bench (L2 flushed before each replay); "
    "bwd = full - fwd. Wall: the un-graphed calls timed by do_bench (bwd: CUDA events around "
    "backward() alone, a fresh forward untimed before each call), CPU launch overhead included."
)
MEMORY_NOTE = (
    "GiB (x eager's): torch.cuda.max_memory_allocated() - memory_allocated() before the call, "
    "peak stats reset after the inputs exist; one un-graphed call"
)
FALLBACK_NOTE = (
    "* not graph-timed: the cell holds the wall timer's number (the row's `timer`); "
    "`graph_error` says why (`graph_skipped` on CPU)."
)


def _fallback(r: dict) -> bool:
    """Whether a norm row's primary number comes from a timer other than CUDA-graph replays."""
    return r["op"] != "ceiling" and r.get("median_ms") is not None and r.get("timer") != "cuda_graph"


def _timer_label(r: dict, star: bool = True) -> str:
    if r.get("timer") == "cuda_graph":
        return "graph:full-fwd" if r.get("bwd_method") == "full_minus_fwd" else "graph"
    return f"{r.get('timer') or '-'}{'*' if star and _fallback(r) else ''}"


def _status(r: dict, width: int) -> str:
    if r["status"] != "ok":
        return " ".join(f"{r['status']}: {r.get('reason', '')}".split())[:width]
    out = "ok"
    if r.get("graph_error"):
        out += f"; graph_error: {r['graph_error']}"
    if r.get("wall_error"):
        out += f"; wall_error: {r['wall_error']}"
    if r.get("tflops"):
        out += f" ({r['tflops']:.0f} TFLOP/s)"
    return " ".join(out.split())[:width]


def format_table(rows: Iterable[dict], keys: Sequence[str] = ("variant", "shape")) -> str:
    """Plain-text table: one line per row, the primary (graph) timing with its speed-up over the
    ``eager`` row of the same case, then the wall timing. Rows with flops and no bytes (matmul-bound
    ops) give TFLOP/s and % of the bf16 matmul peak in the rate columns."""
    rows = list(rows)
    eager = _eager_times(rows, keys)
    graphed = len(_blocks(rows)) > 1
    shape_of = {id(r): "x".join(str(s) for s in r["shape"]) for r in rows}
    w_op = max([11] + [len(r["op"]) for r in rows])
    w_shape = max([14] + [len(v) for v in shape_of.values()])
    w_prov = max([9] + [len(r["provider"]) for r in rows])
    mm = _is_matmul_bound(rows)
    head = (
        f"{'op':<{w_op}} {'variant':<10} {'shape':<{w_shape}} {'dtype':<9} {'mode':<5} {'provider':<{w_prov}} "
        f"{'ms':>8} {'p20-p80 ms':>17} {'GB/s' + ('|TF/s' if mm else ''):>6} {'%ceil' if mm else '%copy':>5} "
        f"{'x eager':>7} {'timer':<15}{'wall ms':>8} {'%ceil' if mm else '%copy':>5}  status"
    )
    lines = ([TIMERS_NOTE, FALLBACK_NOTE] if graphed else []) + [head, "-" * len(head)]
    for r in rows:
        spread = "-" if r.get("p20_ms") is None else f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}"
        speedup = _speedup(r, eager, keys)
        by_flops = r.get("gbps") is None and r.get("tflops") is not None and r["op"] != "ceiling"
        rate = r.get("tflops") if by_flops else r.get("gbps")
        frac = r.get("frac_matmul_peak") if by_flops else r.get("frac_copy_bw")
        wfrac = r.get("wall_frac_matmul_peak") if by_flops else r.get("wall_frac_copy_bw")
        lines.append(
            f"{r['op']:<{w_op}} {str(r.get('variant', '-')):<10} {shape_of[id(r)]:<{w_shape}} {r['dtype']:<9} "
            f"{r['mode']:<5} {r['provider']:<{w_prov}} {_fmt(r.get('median_ms'), '.4f'):>8} {spread:>17} "
            f"{_fmt(rate, '.0f'):>{9 if mm else 6}} {_fmt(_pct(frac), '.0f'):>5} {_fmt(speedup, '.2f'):>7} "
            f"{_timer_label(r, graphed):<15}{_fmt(r.get('wall_median_ms'), '.4f'):>8} {_fmt(_pct(wfrac), '.0f'):>5}  "
            f"{_status(r, 90)}"
        )
    return "\n".join(lines)


def _case(r: dict, keys: Sequence[str]) -> tuple:
    return (r["op"], r["mode"], r["dtype"]) + tuple(str(r.get(k)) for k in keys)


def _eager_times(rows: Sequence[dict], keys: Sequence[str]) -> dict:
    return {
        _case(r, keys): (r["median_ms"], r.get("timer"))
        for r in rows
        if r["provider"] == "eager" and isinstance(r.get("median_ms"), (int, float)) and r["median_ms"] > 0
    }


def _speedup(r: dict, eager: dict, keys: Sequence[str]) -> Optional[float]:
    """Eager's median over this row's, of the same case and the same timer (else None: a ratio
    across timers would mix CPU overhead into one side only)."""
    e = eager.get(_case(r, keys))
    ms = r.get("median_ms")
    if not e or not isinstance(ms, (int, float)) or ms <= 0 or e[1] != r.get("timer"):
        return None
    return e[0] / ms


def print_table(rows: Iterable[dict], title: str = "", file=None) -> None:
    file = file or sys.stdout
    rows = list(rows)
    if title:
        print(f"\n== {title}", file=file)
    if rows:
        env = rows[0]
        print(
            f"device {env['device']}; torch {env['torch']}, triton {env['triton']}, "
            f"transformers {env['transformers']}, liger-kernel {env['liger_kernel']}; git {env['git_sha']}; "
            f"copy bandwidth {_fmt(env.get('copy_gbps'), '.0f')} GB/s",
            file=file,
        )
    print(format_table(rows), file=file)
    file.flush()


def _load(paths: Sequence[str]) -> list[dict]:
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def _cases(rows: Sequence[dict]) -> tuple[list, dict]:
    """(providers in order of appearance, {(op, variant, shape, dtype, mode): {provider: row}})."""
    provs = list(dict.fromkeys(r["provider"] for r in rows if r["op"] != "ceiling"))
    cases: dict = {}
    for r in rows:
        if r["op"] != "ceiling":
            key = (r["op"], str(r.get("variant", "-")), "x".join(map(str, r["shape"])), r["dtype"], r["mode"])
            cases.setdefault(key, {})[r["provider"]] = r
    return provs, cases


def _blocks(rows: Sequence[dict]) -> list[tuple[bool, str]]:
    """The tables to show, as (wall?, title): GPU time and wall time; one block when no row is
    graph-timed (CPU runs, or files from before the graph timer)."""
    norm = [r for r in rows if r["op"] != "ceiling" and r.get("median_ms") is not None]
    if not any(r.get("timer") == "cuda_graph" for r in norm):
        timers = ", ".join(sorted({str(r.get("timer")) for r in norm})) or "-"
        return [(False, f"No CUDA-graph timings (timers: {timers})")]
    blocks = [(False, "GPU time (CUDA graph)")]
    if any(r.get("wall_timer") for r in norm):
        blocks.append((True, "Wall (un-graphed calls)"))
    return blocks


def _cell(
    r: Optional[dict], wall: bool, spec: str = "{ms:.4f}{mark:1} {pct}%", pct_spec: str = "3.0f", star: bool = True
) -> str:
    """One provider's number for a case: ms and % of copy bandwidth (matmul-bound rows, which carry
    no bytes: % of the bf16 matmul peak); ``*`` where not graph-timed (when ``star``: in a table
    that has graph timings beside it)."""
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"].upper()
    ms = r.get("wall_median_ms" if wall else "median_ms")
    if ms is None or isinstance(ms, str):
        return "-"
    frac = r.get("wall_frac_copy_bw" if wall else "frac_copy_bw")
    if frac is None:
        frac = r.get("wall_frac_matmul_peak" if wall else "frac_matmul_peak")
    pct = _fmt(_pct(frac), pct_spec)
    return spec.format(ms=ms, mark="*" if star and not wall and _fallback(r) else "", pct=pct)


def _mem_cell(r: Optional[dict]) -> str:
    """Peak memory of a ``full`` row in GiB, with its ratio to eager's."""
    if r is None:
        return ""
    peak = r.get("peak_mem_bytes")
    if not isinstance(peak, (int, float)):
        return r["status"].upper() if r["status"] != "ok" else "-"
    ratio = r.get("peak_mem_ratio_eager")
    return f"{peak / 2**30:.2f}" + (f" ({ratio:.2f}x)" if isinstance(ratio, (int, float)) else "")


def _has_memory(rows: Sequence[dict]) -> bool:
    return any(isinstance(r.get("peak_mem_bytes"), (int, float)) for r in rows)


def _is_matmul_bound(rows: Sequence[dict]) -> bool:
    return any(r.get("frac_matmul_peak") is not None or r.get("wall_frac_matmul_peak") is not None for r in rows)


def _ceiling_lines(rows: Sequence[dict], prefix: str) -> list[str]:
    out = []
    for r in rows:
        if r["op"] == "ceiling":
            val = f"{r['gbps']:.0f} GB/s" if r.get("gbps") else f"{r.get('tflops') or 0:.0f} TFLOP/s"
            out.append(f"{prefix}{r['provider']}: {val}")
    return out


def compact_table(rows: Sequence[dict]) -> str:
    """One line per op/variant/shape/mode, one column per provider: ms and % of copy bandwidth
    (matmul-bound ops: % of the bf16 matmul peak).

    Two blocks: GPU time (the primary, CUDA-graph timer), then wall time (the un-graphed calls),
    the latter only when the rows carry it; then, for ops that measured it, the peak memory of the
    forward and backward (``full`` rows) in GiB with its ratio to eager's.
    """
    provs, cases = _cases(rows)
    lines = _ceiling_lines(rows, "ceiling ")
    blocks = _blocks(rows)
    w_op = max([11] + [len(k[0]) + 1 for k in cases])
    w_shape = max([12] + [len(k[2]) + 1 for k in cases])
    w_prov = {p: max(15, len(p) + 1) for p in provs}

    def line(key, cells):
        return f"{key[0]:<{w_op}}{key[1]:<10}{key[2]:<{w_shape}}{key[4]:<5}" + "".join(
            f"| {c:<{w_prov[p]}}" for p, c in zip(provs, cells)
        )

    head = line(("op", "variant", "shape", "-", "mode"), provs)
    what = "ms and % of copy bandwidth"
    if _is_matmul_bound(rows):
        what += " (matmul-bound ops: % of bf16 matmul peak)"
    for wall, title in blocks:
        lines += ["", f"{title}: {what}", head, "-" * len(head)]
        for key, by in cases.items():
            lines.append(line(key, [_cell(by.get(p), wall, star=len(blocks) > 1) for p in provs]))
    if _has_memory(rows):
        lines += ["", f"Peak memory of forward + backward: {MEMORY_NOTE}", head, "-" * len(head)]
        for key, by in cases.items():
            if key[4] == "full" and _has_memory(list(by.values())):
                lines.append(line(key, [_mem_cell(by.get(p)) for p in provs]))
    if len(blocks) > 1:
        lines += ["", TIMERS_NOTE]
        if any(_fallback(r) for r in rows):
            lines.append(FALLBACK_NOTE)
    return "\n".join(lines)


def summarize(paths: Sequence[str]) -> str:
    """A short Markdown summary of JSONL result files: environment, ceilings, and per op the GPU
    (graph) times and the wall times side by side, then every row."""
    rows = _load(paths)
    if not rows:
        return "(no rows)\n"
    env = rows[0]
    out = [
        f"# Bench results {env['date'][:10]} on {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
        f"liger-kernel {env['liger_kernel']}, git {env['git_sha']}",
        "",
    ]
    graphed = len(_blocks(rows)) > 1
    if graphed:
        out += [TIMERS_NOTE, ""]
    for r in rows:
        if r["op"] == "ceiling":
            val = f"{r['gbps']:.0f} GB/s" if r.get("gbps") else f"{r.get('tflops', 0):.0f} TFLOP/s"
            out.append(f"- ceiling `{r['provider']}` {'x'.join(map(str, r['shape']))} {r['dtype']}: {val}")
    if graphed and any(_fallback(r) for r in rows):
        out += ["", "\\" + FALLBACK_NOTE]
    for op in dict.fromkeys(r["op"] for r in rows if r["op"] != "ceiling"):
        sel = [r for r in rows if r["op"] == op]
        provs, cases = _cases(sel)
        out += ["", f"## {op}"]
        blocks = _blocks(sel)
        mm = _is_matmul_bound(sel)  # rows carry flops, not bytes: rates against the matmul peak
        for wall, title in blocks:
            out += [
                "",
                f"{title}: ms (% of {'bf16 matmul peak' if mm else 'copy bandwidth'})",
                "",
                "| variant | shape | mode | " + " | ".join(provs) + " |",
                "| --- | --- | --- | " + " | ".join("---:" for _ in provs) + " |",
            ]
            for key, by in cases.items():
                cells = [_cell(by.get(p), wall, "{ms:.4f}{mark} ({pct}%)", ".0f", len(blocks) > 1).replace("*", "\\*") for p in provs]
                out.append(f"| {key[1]} | {key[2]} {key[3]} | {key[4]} | " + " | ".join(cells) + " |")
        if _has_memory(sel):
            out += [
                "",
                f"Peak memory of forward + backward: {MEMORY_NOTE}",
                "",
                "| variant | shape | " + " | ".join(provs) + " |",
                "| --- | --- | " + " | ".join("---:" for _ in provs) + " |",
            ]
            for key, by in cases.items():
                if key[4] == "full" and _has_memory(list(by.values())):
                    cells = [_mem_cell(by.get(p)) for p in provs]
                    out.append(f"| {key[1]} | {key[2]} {key[3]} | " + " | ".join(cells) + " |")
        if mm:
            rate, frac, wfrac = "TFLOP/s", "frac_matmul_peak", "wall_frac_matmul_peak"
        else:
            rate, frac, wfrac = "GB/s", "frac_copy_bw", "wall_frac_copy_bw"
        pct_name = "% mm peak" if mm else "% copy"
        out += [
            "",
            "All rows:",
            "",
            f"| variant | shape | mode | provider | ms | p20-p80 | {rate} | {pct_name} | x eager | timer "
            f"| wall ms | wall {pct_name} | status |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
        ]
        keys = ("variant", "shape")
        eager = _eager_times(sel, keys)
        for r in sel:
            sp = _speedup(r, eager, keys)
            spread = "-" if r.get("p20_ms") is None else f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}"
            status = _status(r, 80).replace("|", "/")
            out.append(
                f"| {r.get('variant', '-')} | {'x'.join(map(str, r['shape']))} {r['dtype']} | {r['mode']} | "
                f"{r['provider']} | {_fmt(r.get('median_ms'), '.4f')} | {spread} | "
                f"{_fmt(r.get('tflops' if mm else 'gbps'), '.0f')} | "
                f"{_fmt(_pct(r.get(frac)), '.0f')} | {_fmt(sp, '.2f')} | "
                f"{_timer_label(r, graphed).replace('*', chr(92) + '*')} | {_fmt(r.get('wall_median_ms'), '.4f')} | "
                f"{_fmt(_pct(r.get(wfrac)), '.0f')} | {status} |"
            )
    return "\n".join(out) + "\n"


def measure_ceilings(
    rec: Recorder, device: torch.device | str, *, matmul: bool = True, quick: bool = False
) -> float:
    """Measure copy bandwidth (and the bf16 matmul rate), record them as ``op="ceiling"`` rows.

    Sets ``rec.copy_gbps`` (and ``rec.matmul_tflops``) so that later rows carry their fraction of
    it. Returns the copy GB/s.
    """
    nbytes = 2**24 if quick else 2**30
    gbps, t, moved = copy_bandwidth(device, nbytes)
    rec.copy_gbps = gbps
    rec.add(
        op="ceiling", provider="copy", mode="d2d", shape=[nbytes // 2], dtype=torch.bfloat16,
        timing=t, bytes_moved=moved,
    )
    if matmul:
        size = 256 if quick else 8192
        tflops, t, flops = matmul_peak(device, size)
        rec.add(
            op="ceiling", provider="matmul", mode="mm", shape=[size] * 3, dtype=torch.bfloat16,
            timing=t, flops=flops,
        )
        rec.matmul_tflops = tflops
    return gbps


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------
# Command line shared by the fwd/bwd benches

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench_parser(description: str, providers: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden sizes (default 2048 4096 8192)")
    p.add_argument("--rows", type=int, default=None, help="rows = batch x tokens (default 16384 = 4 x 4096)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--variants", nargs="+", default=["frozen", "trainable"], choices=["frozen", "trainable"])
    p.add_argument("--modes", nargs="+", default=["fwd", "bwd", "full"], choices=["fwd", "bwd", "full"])
    p.add_argument("--providers", nargs="+", default=list(providers), choices=list(providers))
    p.add_argument("--rep-ms", type=float, default=None, help="timed ms per measurement (default 100; quick 20)")
    p.add_argument("--out", default=None, help="JSONL file the rows are appended to")
    p.add_argument("--table", default=None, help="text file the final table is appended to")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-matmul-peak", action="store_true", help="skip measuring the bf16 matmul ceiling")
    p.add_argument("--quick", action="store_true", help="tiny sizes; runs on CPU (Triton kernels interpreted)")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the size defaults; on CPU set ``TRITON_INTERPRET=1`` (before any Triton kernel is defined)."""
    args.device = args.device or default_device()
    if not is_cuda(args.device):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.torch_dtype = DTYPES[args.dtype]
    args.hidden = args.hidden or ([128, 256] if args.quick else [2048, 4096, 8192])
    args.rows = args.rows or (64 if args.quick else 16384)
    args.rep_ms = args.rep_ms or (20.0 if args.quick else 100.0)
    return args


def finish(rec: Recorder, title: str, table_path: Optional[str]) -> None:
    """Print the table, and append it to ``table_path`` when given."""
    print_table(rec.rows, title=title)
    if table_path:
        with open(table_path, "a") as f:
            print_table(rec.rows, title=title, file=f)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("ceilings", help="measure copy bandwidth and the bf16 matmul rate")
    c.add_argument("--out", default=None, help="JSONL file to append the rows to")
    c.add_argument("--quick", action="store_true", help="tiny buffers (smoke run)")
    s = sub.add_parser("summarize", help="Markdown summary of JSONL result files")
    s.add_argument("paths", nargs="+")
    k = sub.add_parser("compact", help="compact text table of JSONL result files (providers side by side)")
    k.add_argument("paths", nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "ceilings":
        device = default_device()
        rec = Recorder(args.out, device)
        measure_ceilings(rec, device, quick=args.quick)
        for r in rec.rows:
            print(f"{r['provider']:<7} {r.get('gbps') or r.get('tflops'):.1f} {'GB/s' if r.get('gbps') else 'TFLOP/s'}")
    elif args.cmd == "compact":
        print(compact_table(_load(args.paths)))
    else:
        sys.stdout.write(summarize(args.paths))


if __name__ == "__main__":
    main()
