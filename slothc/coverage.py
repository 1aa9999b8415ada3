"""Coverage: every causal-LM architecture of the installed transformers, fused and checked against eager.

    slothc coverage                                  # every architecture; table in the current folder
    slothc coverage --arch llama qwen3 gemma2        # some
    slothc coverage --out-dir docs --jobs 2          # Markdown + JSON into docs/

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, in its own process (a crash or a
hang costs that architecture only; ``--budget-s`` bounds each one):

1. a tiny random-initialised model from the config class (``slothc.tiny``: few layers, small hidden
   size, derived from the config's own fields), PEFT LoRA on all linear layers (B random too, so
   every adapter gradient is non-zero), training mode, fp32, dropout off (each run would draw its
   own masks);
2. one training step in eager, one in float64 (the reference) and one compiled with slothc
   (``--inner``, default ``aot_eager``: AOTAutograd and slothc's backward formulas, without
   Inductor's compile time; ``inductor`` for the full path);
3. the loss and every LoRA gradient are judged as the tests judge a fused op: slothc's error
   against the float64 run may not exceed ``K`` times eager's own error plus a floor of fp32
   rounding (``correct``); where the model has an op without float64 support (grouped MoE
   matmuls), against eager within 1e-4 of its largest value (``reference`` says which);
4. the fusion report's sites per kind against the candidate sites: the modules that the eager
   step ran whose class is a norm (``*RMSNorm``, ``*LayerNorm``), PEFT's LoRA linears, the attention
   modules (each rotates q and k: two RoPE sites where the config has rotary embeddings), the gated
   MLP modules (a ``gate`` projection), and the loss. ``fully_fused``: every norm, LoRA and loss site fused,
   and RoPE where there is one.

Rows: ``status`` (``ok``, ``failed`` with the error, ``eager failed``: the model does not train
without slothc either, ``timeout``), ``correct``, ``fused`` and ``candidates`` per kind, ``skipped``
(the report's reasons), seconds. The summary line: ``N architectures: X correct, Y fully fused, Z
failed``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

KINDS = ("norm", "rope", "lora", "mlp", "loss")
K = 4.0  # slothc's error may be this many times eager's (plus the floor): the e2e tests' bound


def _candidates(model, run) -> dict:
    """Candidate sites: modules that ``run()`` executed, by class (module docstring)."""
    import torch

    ran = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: ran.add(id(mod))) for m in model.modules()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    from peft.tuners.lora import LoraLayer

    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    rotary = any(getattr(text, k, None) for k in ("rope_theta", "rotary_dim", "rope_scaling", "rope_parameters", "partial_rotary_factor"))
    counts = dict.fromkeys(KINDS, 0)
    for m in model.modules():
        if id(m) not in ran:
            continue
        name = type(m).__name__
        if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), torch.nn.Linear):
            counts["lora"] += 1
        elif name.endswith("RMSNorm") or name.endswith("LayerNorm") or isinstance(m, torch.nn.LayerNorm):
            counts["norm"] += 1
        elif name.endswith("Attention") and rotary:
            counts["rope"] += 2
        elif name.endswith("MLP") and any("gate" in child for child, _ in m.named_children()):
            counts["mlp"] += 1  # a gated MLP (gate and up, or Phi-3's gate_up): the mlp fusion's pattern
    counts["loss"] = 1
    return counts


def _fused(report) -> dict:
    return {
        "norm": report.count("rms_norm") + report.count("layer_norm"),
        "rope": report.count("rope"),
        "lora": report.count("lora_linear") + report.count("qlora_linear"),
        "mlp": report.count("mlp"),
        "loss": report.count("linear_cross_entropy"),
    }


def _step(model, batch, fp64=False):
    import torch

    from slothc.testing import float64_mode

    with float64_mode() if fp64 else contextlib.nullcontext():
        loss = model(**batch).loss
        loss.backward()
    grads = {n.replace("_orig_mod.", ""): p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def _error(fused, eager, ref) -> tuple[float, float, float]:
    import torch

    f, e, r = (t.double() for t in (fused, eager, ref))
    floor = 4 * torch.finfo(torch.float32).eps * r.abs().max().item()
    return (f - r).abs().max().item(), (e - r).abs().max().item(), floor


def no_dropout(model) -> None:
    """Dropout off everywhere (modules, float ``*drop*`` attributes, config fields read in forward):
    eager, float64 and slothc would each draw their own masks, and no comparison would hold."""
    import torch

    configs = [model.config] + [v for v in vars(model.config).values() if hasattr(v, "to_dict")]  # raw: no per-layer getattr
    for config in configs:
        for key, value in list(vars(config).items()):
            if "drop" in key.lower() and isinstance(value, float):
                setattr(config, key, 0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for key, value in list(vars(m).items()):
            if "drop" in key.lower() and isinstance(value, float):
                setattr(m, key, 0.0)


def _with_lora(model, row: dict):
    """PEFT LoRA on all linear layers; where PEFT refuses some of them (Mamba's ``out_proj`` and
    ``conv1d``), on every other linear, and the row says which were left out."""
    import re

    import torch

    from slothc import tiny

    try:
        return tiny.add_lora(copy.deepcopy(model), init_lora_weights=False)  # a refusal leaves its model half wrapped
    except ValueError as e:
        found = re.search(r"Incompatible modules: \{([^}]*)\}", str(e))
        if not found:
            raise
        refused = {name.strip(" '\"") for name in found.group(1).split(",")}
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - refused - {"lm_head"}
        row["lora_targets"] = f"all linear but {', '.join(sorted(refused))} (PEFT refuses them)"
        return tiny.add_lora(model, target_modules=sorted(names), init_lora_weights=False)


def check_arch(arch: str, layers: int = 2, hidden: int = 64, inner: str = "aot_eager") -> dict:
    """One architecture (module docstring); runs in the calling process."""
    import torch

    import slothc
    from slothc import tiny

    t0 = time.time()
    row: dict = {"arch": arch}
    try:
        torch.manual_seed(0)
        model = _with_lora(tiny.tiny_model(arch, layers=layers, hidden=hidden), row).train()
        no_dropout(model)
        batch = dict(tiny.sample_batch(model.config, batch=2, seq=16), use_cache=False)  # training: no KV cache
        ref_model = copy.deepcopy(model).double()
        fused_model = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "build failed", "error": f"{type(e).__name__}: {e}"[:400], "seconds": time.time() - t0}
    try:
        ran: dict = {}

        def eager_step():
            ran["loss"], ran["grads"] = _step(model, batch)

        candidates = _candidates(model, eager_step)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "eager failed", "error": f"{type(e).__name__}: {e}"[:400], "seconds": time.time() - t0}
    try:
        ref_loss, ref_grads = _step(ref_model, batch, fp64=True)
        row["reference"] = "float64"
    except Exception as e:  # noqa: BLE001  (an op without float64 support: judged against eager alone)
        ref_loss = ref_grads = None
        row["reference"] = f"eager fp32 (no float64 run: {type(e).__name__}: {str(e)[:120]})"
    report = slothc.Report()
    try:
        torch._dynamo.reset()
        compiled = torch.compile(fused_model, backend="slothc", options={"inner": inner, "report": report})
        loss, grads = _step(compiled, batch)
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "failed", "error": f"{type(e).__name__}: {e}"[:400],
                "traceback": traceback.format_exc()[-1500:], "seconds": time.time() - t0}
    finally:
        torch._dynamo.reset()
    worst, correct = [], True
    names = ["loss", *sorted(ran["grads"])]
    missing = [n for n in ran["grads"] if n not in grads]
    for name in names:
        f, e = (loss, ran["loss"]) if name == "loss" else (grads.get(name), ran["grads"][name])
        if ref_grads is None:  # no float64 run: within fp32 noise of eager
            r = e
        else:
            r = ref_loss if name == "loss" else ref_grads.get(name)
        if f is None or r is None:
            correct = False
            continue
        err_f, err_e, floor = _error(f, e, r)
        if ref_grads is None:
            err_e, floor = 0.0, 1e-4 * e.double().abs().max().item() + 1e-6
        if err_f > K * err_e + floor:
            correct = False
            worst.append(f"{name}: slothc error {err_f:.3g} > {K:g} x eager {err_e:.3g} + {floor:.3g}")
    fused = _fused(report)
    full = all(fused[k] >= candidates[k] for k in ("norm", "lora", "loss")) and (candidates["rope"] == 0 or fused["rope"] >= candidates["rope"])
    return {**row, "status": "ok", "correct": correct and not missing, "fully_fused": full, "fused": fused, "candidates": candidates,
            "mismatches": (worst + [f"{n}: no gradient under slothc" for n in missing])[:5],
            "skipped": sorted({f"{s.fusion}: {s.reason}" for s in report.skipped})[:12], "graphs": report.graphs,
            "loss": float(ran["loss"]), "seconds": time.time() - t0}


# --------------------------------------------------------------------------------------------------
# Many architectures: one process each


def _run_child(arch: str, args) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, "-m", "slothc.coverage", "--child", arch, "--result", out.name, "--layers", str(args.layers),
               "--hidden", str(args.hidden), "--inner", args.inner]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, timeout=args.budget_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"arch": arch, "status": "timeout", "error": f"over the {args.budget_s:.0f} s budget", "seconds": time.time() - t0}
        text = open(out.name).read()
        if text.strip():
            return json.loads(text)
        return {"arch": arch, "status": "failed", "error": f"process exit {proc.returncode}: {(proc.stderr or '')[-400:]}",
                "seconds": time.time() - t0}


def summary(rows: list) -> str:
    correct = sum(1 for r in rows if r.get("correct"))
    full = sum(1 for r in rows if r.get("correct") and r.get("fully_fused"))
    failed = sum(1 for r in rows if r["status"] in ("failed", "timeout") or (r["status"] == "ok" and not r.get("correct")))
    not_run = sum(1 for r in rows if r["status"] in ("build failed", "eager failed"))
    return (f"{len(rows)} architectures: {correct} correct, {full} fully fused, {failed} failed "
            f"({not_run} do not build or train without slothc either)")


def markdown(rows: list, versions: dict) -> str:
    lines = [f"# slothc coverage: transformers {versions.get('transformers')}", "",
             ", ".join(f"{k} {v}" for k, v in versions.items() if v), "", summary(rows), "",
             "Fused / candidate sites per kind (candidates: the modules the eager step ran, by class; "
             "see `slothc/coverage.py`).", "",
             "| arch | status | equal to eager | fully fused | norm | rope | lora | mlp | loss | skipped (reasons) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['arch']} | {r['status']}: {r.get('error', '')[:120].replace('|', '/')} | | | | | | | | |")
            continue
        f, c = r["fused"], r["candidates"]
        cells = " | ".join(f"{f[k]}/{c[k]}" for k in KINDS)
        skipped = "; ".join(r["skipped"])[:200].replace("|", "/")
        lines.append(f"| {r['arch']} | ok | {'yes' if r['correct'] else 'NO: ' + '; '.join(r['mismatches'])[:120]} | "
                     f"{'yes' if r['fully_fused'] else 'no'} | {cells} | {skipped} |")
    return "\n".join(lines) + "\n"


def run(archs, args) -> list:
    rows, t0 = [], time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(_run_child, a, args): a for a in archs}
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            r = fut.result()
            rows.append(r)
            state = r["status"] if r["status"] != "ok" else ("correct" if r["correct"] else "NOT EQUAL") + (
                ", fully fused" if r.get("fully_fused") else "")
            eta = (time.time() - t0) / i * (len(archs) - i)
            print(f"[{i}/{len(archs)}] {r['arch']}: {state} ({r.get('seconds', 0):.0f} s; about {eta / 60:.0f} min left)", flush=True)
    rows.sort(key=lambda r: r["arch"])
    return rows


def parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=None, help="model_type names (default: every causal-LM architecture)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--inner", default="aot_eager", choices=("aot_eager", "inductor", "eager"), help="slothc's inner compiler")
    p.add_argument("--budget-s", type=float, default=180.0, help="time budget of one architecture (default 180 s)")
    p.add_argument("--jobs", type=int, default=1, help="architectures checked at once (one process each)")
    p.add_argument("--out-dir", default=None, help="write coverage-<transformers version>.md and .json there")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        import logging
        import warnings

        import torch

        # One thread: the eager and slothc runs then sum in one order whatever else the machine
        # runs (with several jobs on few cores, a thread pool that shrinks changes fp32 roundings).
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        row = check_arch(args.child, args.layers, args.hidden, args.inner)
        with open(args.result, "w") as f:
            json.dump(row, f)
        return 0
    from slothc import tiny
    from slothc.train_bench import _versions

    archs = args.arch or tiny.causal_lm_archs()
    for a in archs:
        tiny.check_arch(a)
    rows = run(archs, args)
    versions = {k: v for k, v in _versions().items() if k in ("torch", "transformers", "peft", "slothc")}
    print(summary(rows), flush=True)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        stem = os.path.join(args.out_dir, f"coverage-transformers-{versions['transformers']}")
        with open(stem + ".json", "w") as f:
            json.dump({"versions": versions, "summary": summary(rows), "rows": rows}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(rows, versions))
        print(f"wrote {stem}.md and .json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
