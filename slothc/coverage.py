"""Coverage: every causal-LM architecture of the installed transformers, fused and checked against eager.

    slothc coverage                                  # every architecture; table in the current folder
    slothc coverage --arch llama qwen3 gemma2        # some
    slothc coverage --out-dir docs --jobs 2          # Markdown + JSON into docs/
    slothc coverage --arch dots1 --update docs/coverage-transformers-5.24.0.json   # rerun rows of a committed table
    slothc coverage --device cuda --jobs 8 --out-dir docs   # on a GPU: slothc's Triton kernels run (table -cuda)

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, in its own process (a crash or a
hang costs that architecture only; ``--budget-s`` bounds each one):

1. a tiny random-initialised model from the config class (``slothc.tiny``: few layers, small hidden
   size, derived from the config's own fields), PEFT LoRA on all linear layers (B random too, so
   every adapter gradient is non-zero), training mode, fp32, dropout off (each run would draw its
   own masks);
2. on ``--device`` (default ``cpu``; on ``cuda`` the fused ops run their Triton kernels, where on
   the CPU they run their torch code), one training step in eager, one in float64 (the
   reference) and one compiled with slothc
   (``--inner``, default ``aot_eager``: AOTAutograd and slothc's backward formulas, without
   Inductor's compile time; ``inductor`` for the full path);
3. the loss and every LoRA gradient are judged as the tests judge a fused op: slothc's error
   against the float64 run may not exceed ``K`` times eager's own error plus a floor of fp32
   rounding (``correct``); where the model has an op without float64 support (grouped MoE
   matmuls), against eager within 1e-4 of its largest value (``reference`` says which);
   where slothc is not eager's, the step is run once more under ``torch.compile(backend="eager")``
   (Dynamo's trace alone, no slothc): if that differs from eager as much and slothc equals it, the
   row says so (``compile_differs``: the model's code differs under compile, not slothc's rewrite;
   still not counted correct). There the causality of both is checked too (a causal LM's logits at
   a position do not change when later tokens do): where eager is not causal and the plain compile
   is, eager is the one that is wrong (``eager_not_causal``: transformers 5.17's Doge skips the
   causal mask in eager, where its dynamic mask needs it, and builds it under compile); such a row
   is not counted correct (no run equals it) nor failed;
4. the fusion report's sites per kind against the candidate sites: the modules that the eager
   step ran whose class is a norm (``*RMSNorm``, ``*LayerNorm``; its result shaped like its input,
   and not a wrapper of another norm), PEFT's LoRA linears, the tensors
   that transformers' rotary functions (``apply_rotary_pos_emb`` and kin, found by name) rotated
   (q and k of each call: NoPE layers call none; where no such function ran but the config has
   rotary embeddings, two for each attention module), the gated MLP modules (a ``gate``
   projection), and the loss. ``fully_fused``: every norm, LoRA and loss site fused,
   and RoPE where there is one, and no norm, RoPE, LoRA or loss site skipped (counts are summed
   over a model's graphs, so where Dynamo compiles many, e.g. the recompiles of an MoE's expert
   loop, a count can pass its candidates while one graph skips a site: the skip decides).

Rows: ``status`` (``ok``, ``failed`` with the error, ``eager failed``: the model does not train
without slothc either, ``timeout``, ``not a text decoder``), ``correct``, ``fused`` and ``candidates``
per kind, ``skipped`` (the report's reasons), seconds. The summary line: ``N architectures: X correct,
Y fully fused, Z failed``, then the architectures that are no decoder of text alone and the share of
the others that is correct.

Not a text decoder: an architecture whose text-only step does not build or train in eager, and whose
classes say it needs more than text (``not_a_text_decoder``): its tokens are audio codebooks (the
config's ``num_codebooks``), it reads a backbone model's states (a ``backbone_*`` config field: a
speculative-decoding assistant), or its model class declares ``input_modalities`` other than text
(image, audio). Its row keeps the error; it is not counted as a failure nor in the text decoders.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

KINDS = ("norm", "rope", "lora", "mlp", "loss")
# fusions whose skipped sites keep a row from "fully fused" (the 4-bit pass's skips do not: the
# coverage models are bf16, where what it looks at is no 4-bit linear)
SITE_FUSIONS = ("rms_norm", "layer_norm", "rope", "lora_linear", "linear_cross_entropy")
NOT_TEXT = "not a text decoder"  # the status of an excluded architecture (module docstring)
K = 4.0  # slothc's error may be this many times eager's (plus the floor): the e2e tests' bound


_ROTARY_FUNCTION = re.compile(r"^_?apply_\w*(rotary|rope)")  # apply_rotary_pos_emb, _apply_rotary_emb, ...
_TABLE_ARGUMENT = re.compile(r"cos|sin|freq|pos|emb|theta")  # an argument that is a table, not a rotated tensor


class _RotaryCalls:
    """Counts the tensors that transformers' rotary functions (``apply_rotary_pos_emb`` and kin, by
    name) rotate while it is active: the tensors of rank >= 3 among the arguments that are not tables
    (named like ``cos``, ``sin``, ``freqs``, ``sinusoidal_pos``): q and k in Llama's ``(q, k, cos,
    sin)`` and RoFormer's ``(sinusoidal_pos, query, key, value=None)``, one in GPT-J's ``(tensor,
    sin, cos)`` and Gemma 4's ``(x, cos, sin)``. A call
    made from inside another such function (GPT-OSS's ``_apply_rotary_emb``) is part of that one.
    NoPE layers (SmolLM3, Cohere 2, EXAONE 4) and models that switch RoPE off call none."""

    def __init__(self):
        self.tensors, self.calls, self._depth = 0, 0, 0

    def __enter__(self):
        sys.setprofile(self._event)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)

    def _event(self, frame, event, arg):
        if event not in ("call", "return") or not _ROTARY_FUNCTION.match(frame.f_code.co_name):
            return
        if event == "return":
            self._depth -= 1
            return
        self._depth += 1
        if self._depth > 1:
            return
        import torch

        self.calls += 1
        for name in frame.f_code.co_varnames[: frame.f_code.co_argcount]:
            value = frame.f_locals.get(name)
            self.tensors += not _TABLE_ARGUMENT.search(name) and isinstance(value, torch.Tensor) and value.dim() >= 3


def _is_norm(module) -> bool:
    import torch

    name = type(module).__name__
    return name.endswith("RMSNorm") or name.endswith("LayerNorm") or isinstance(module, torch.nn.LayerNorm)


def _candidates(model, run) -> dict:
    """Candidate sites: modules that ``run()`` executed, by class, and the tensors its rotary
    functions rotated (module docstring)."""
    import torch

    ran, same_shape = set(), {}

    def ran_hook(mod, inputs, output):
        ran.add(id(mod))
        x = inputs[0] if inputs else None
        same_shape[id(mod)] = isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and output.shape == x.shape

    hooks = [m.register_forward_hook(ran_hook) for m in model.modules()]
    try:
        with _RotaryCalls() as rotary_calls:
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
        elif _is_norm(m) and same_shape.get(id(m)) and not any(_is_norm(c) for c in m.children()):
            counts["norm"] += 1  # a norm: not a wrapper of one (AXK2's gated norm), nor one that returns only its scale (HY-V4's)
        elif name.endswith("Attention") and rotary:
            counts["rope"] += 2
        elif name.endswith("MLP") and any("gate" in child for child, _ in m.named_children()):
            counts["mlp"] += 1  # a gated MLP (gate and up, or Phi-3's gate_up): the mlp fusion's pattern
    if rotary_calls.calls:  # the rotations that ran (else: two an attention module, where the config has RoPE)
        counts["rope"] = rotary_calls.tensors
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


def fully_fused(fused: dict, candidates: dict, skipped: list) -> bool:
    """Every norm, LoRA and loss site fused, RoPE where there is one, and none of them skipped
    (``skipped``: the row's ``"fusion: reason"`` strings)."""
    counts = all(fused[k] >= candidates[k] for k in ("norm", "lora", "loss")) and (candidates["rope"] == 0 or fused["rope"] >= candidates["rope"])
    return counts and not any(s.split(":", 1)[0] in SITE_FUSIONS for s in skipped)


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


def _compile_alone_step(model, batch):
    """The step under ``torch.compile(backend="eager")``: Dynamo's trace run as is, no slothc."""
    import torch

    torch._dynamo.reset()
    try:
        return _step(torch.compile(model, backend="eager"), batch)
    finally:
        torch._dynamo.reset()


def compile_alone_differs(model, batch, loss, grads, ran, bounds) -> str | None:
    """Where slothc's step is not eager's: whether ``torch.compile`` without slothc (Dynamo's trace of
    the model, ``backend="eager"``) differs from eager too, and slothc equals it within the same
    bounds. Then the difference is in what Dynamo traced (the model's code under compile), not in
    slothc's rewrite: a string saying so (by how much), else None."""
    try:
        c_loss, c_grads = _compile_alone_step(model, batch)
    except Exception:  # noqa: BLE001  (the compile fails alone: nothing to compare with)
        return None
    eager = {"loss": ran["loss"], **ran["grads"]}
    ours = {"loss": loss, **grads}
    alone = {"loss": c_loss, **c_grads}
    if not all(n in ours and n in alone for n in bounds):
        return None
    diff = {n: (alone[n].double() - eager[n].double()).abs().max().item() for n in bounds}
    if not any(diff[n] > bounds[n] for n in bounds):
        return None  # Dynamo alone is eager's: the difference is slothc's
    # slothc equals Dynamo's trace: within eager's bound, or (where the trace is far from eager) within
    # 1% of that distance: the trace's own rounding differs from eager's as well (measured: 1-2x the
    # bound of a 1e-8 gradient next to a 5e-3 difference of the trace)
    if any((ours[n].double() - alone[n].double()).abs().max().item() > max(bounds[n], 0.01 * diff[n]) for n in bounds):
        return None
    return (f"torch.compile without slothc (backend='eager') differs from eager as much (loss {float(c_loss):.6g} "
            f"against eager's {float(ran['loss']):.6g}) and slothc equals it: the difference is in Dynamo's trace "
            f"of the model, not in slothc")


def not_causal(model, batch) -> str | None:
    """Whether ``model``'s logits at the first half of the positions change when the tokens of the
    second half do (a causal LM's cannot): a string saying by how much, else None."""
    import torch

    ids = batch["input_ids"]
    half = ids.shape[1] // 2
    changed = ids.clone()
    changed[:, half:] = ids[:, half:].roll(1, dims=1)  # the same tokens (none special), in another order
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        first = model(**{**inputs, "input_ids": ids}).logits[:, :half].double()
        second = model(**{**inputs, "input_ids": changed}).logits[:, :half].double()
    diff = (first - second).abs().max().item()
    if diff <= 1e-4 * first.abs().max().item():
        return None
    return f"its logits at positions 0-{half - 1} change by {diff:.3g} when tokens {half}- change"


def eager_not_causal(model, plain_model, batch) -> str | None:
    """Where torch.compile alone differs from eager and slothc equals it (``compile_alone_differs``):
    whether eager is the one that is wrong, as far as a causal LM can be checked without a second
    implementation: eager is not causal and torch.compile alone is. A string saying so, else None."""
    import torch

    eager = not_causal(model, batch)
    if eager is None:
        return None
    torch._dynamo.reset()
    try:
        compiled = not_causal(torch.compile(plain_model, backend="eager"), batch)
    except Exception:  # noqa: BLE001  (nothing to compare with)
        return None
    finally:
        torch._dynamo.reset()
    return None if compiled else f"eager is not causal ({eager}); torch.compile alone is, and slothc equals it"


def _judge(loss, grads, eager_loss, eager_grads, ref_loss, ref_grads):
    """``(correct, mismatches, bounds)``: the loss and every gradient eager has, slothc's error against
    the reference (None: no float64 run, judged against eager within 1e-4) at most ``K`` x eager's
    plus the floor (module docstring)."""
    worst, correct, bounds = [], True, {}
    for name in ["loss", *sorted(eager_grads)]:
        f, e = (loss, eager_loss) if name == "loss" else (grads.get(name), eager_grads[name])
        r = e if ref_grads is None else (ref_loss if name == "loss" else ref_grads.get(name))
        if f is None or r is None:
            correct = False
            continue
        err_f, err_e, floor = _error(f, e, r)
        if ref_grads is None:
            err_e, floor = 0.0, 1e-4 * e.double().abs().max().item() + 1e-6
        bounds[name] = K * err_e + floor
        if err_f > bounds[name]:
            correct = False
            worst.append(f"{name}: slothc error {err_f:.3g} > {K:g} x eager {err_e:.3g} + {floor:.3g}")
    return correct, worst, bounds


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


def _not_tensor_linears(model) -> set:
    """Names of the ``nn.Linear`` subclasses whose own ``forward`` returns no tensor (Llama 4's and
    PhiMoE's routers return scores and indices): PEFT's LoRA wrapper reads ``.dtype`` of the result."""
    import torch

    names = set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and type(m).forward is not torch.nn.Linear.forward:
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a router's jitter draws no adapter init
                    out = m(torch.zeros(1, 1, m.in_features, dtype=m.weight.dtype))
            except Exception:  # noqa: BLE001  (needs other arguments: left to PEFT)
                continue
            if not isinstance(out, torch.Tensor):
                names.add(name.rsplit(".", 1)[-1])
    return names


def _with_lora(model, row: dict):
    """PEFT LoRA on all linear layers; where PEFT refuses some of them (Mamba's ``out_proj`` and
    ``conv1d``) or cannot wrap them (a linear whose forward returns a tuple), on every other linear,
    and the row says which were left out."""
    import re

    import torch

    from slothc import tiny

    linears = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    no_tensor = _not_tensor_linears(model)
    if no_tensor:
        row["lora_targets"] = f"all linear but {', '.join(sorted(no_tensor))} (a linear whose forward returns no tensor)"
        return tiny.add_lora(model, target_modules=sorted(linears - no_tensor), init_lora_weights=False)
    try:
        return tiny.add_lora(copy.deepcopy(model), init_lora_weights=False)  # a refusal leaves its model half wrapped
    except ValueError as e:
        found = re.search(r"Incompatible modules: \{([^}]*)\}", str(e))
        if not found:
            raise
        refused = {name.strip(" '\"") for name in found.group(1).split(",")}
        row["lora_targets"] = f"all linear but {', '.join(sorted(refused))} (PEFT refuses them)"
        return tiny.add_lora(model, target_modules=sorted(linears - refused), init_lora_weights=False)


def not_a_text_decoder(arch: str) -> str | None:
    """What ``arch`` needs besides text, read from its causal-LM class and that class's config class
    (their declarations, not an instance: some default configs do not validate), else None."""
    import dataclasses

    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    model_cls = AutoModelForCausalLM._model_mapping[CONFIG_MAPPING[arch]]
    config_cls = getattr(model_cls, "config_class", None) or CONFIG_MAPPING[arch]
    fields = {f.name: f.default for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else {}
    if isinstance(fields.get("num_codebooks"), int) and fields["num_codebooks"] > 1:
        return "needs audio codebook tokens (num_codebooks)"
    backbone = sorted(n for n in fields if n.startswith("backbone_"))
    if backbone:
        return f"needs a backbone model's states ({backbone[0]}: an assistant model)"
    modalities = getattr(model_cls, "input_modalities", ("text",))
    other = [m for m in ((modalities,) if isinstance(modalities, str) else modalities) if m != "text"]
    if other:
        return f"needs {' and '.join(other)} input ({model_cls.__name__})"
    return None


def _excluded(row: dict) -> dict:
    """A row that did not build or train in eager, marked ``not a text decoder`` where the classes say so."""
    why = not_a_text_decoder(row["arch"])
    return {**row, "status": NOT_TEXT, "needs": why, "text_status": row["status"]} if why else row


def check_arch(arch: str, layers: int = 2, hidden: int = 64, inner: str = "aot_eager", device: str = "cpu") -> dict:
    """One architecture (module docstring); runs in the calling process."""
    import torch

    import slothc
    from slothc import tiny

    t0 = time.time()
    row: dict = {"arch": arch}
    try:
        torch.manual_seed(0)
        model = _with_lora(tiny.tiny_model(arch, layers=layers, hidden=hidden), row).train().to(device)
        no_dropout(model)
        batch = dict(tiny.sample_batch(model.config, batch=2, seq=16, device=device), use_cache=False)  # training: no KV cache
        ref_model = copy.deepcopy(model).double()
        fused_model = copy.deepcopy(model)
        plain_model = copy.deepcopy(model)  # torch.compile without slothc, run only when slothc is not eager's
    except Exception as e:  # noqa: BLE001
        return _excluded({**row, "status": "build failed", "error": f"{type(e).__name__}: {e}"[:400], "seconds": time.time() - t0})
    try:
        ran: dict = {}

        def eager_step():
            ran["loss"], ran["grads"] = _step(model, batch)

        candidates = _candidates(model, eager_step)
    except Exception as e:  # noqa: BLE001
        return _excluded({**row, "status": "eager failed", "error": f"{type(e).__name__}: {e}"[:400], "seconds": time.time() - t0})
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
    correct, worst, bounds = _judge(loss, grads, ran["loss"], ran["grads"], ref_loss, ref_grads)
    missing = [n for n in ran["grads"] if n not in grads]
    if not correct or missing:
        same = compile_alone_differs(plain_model, batch, loss, grads, ran, bounds)
        if same:
            row["compile_differs"] = same
            why = eager_not_causal(model, plain_model, batch)
            if why:
                row["eager_not_causal"] = why
    fused = _fused(report)
    skipped = sorted({f"{s.fusion}: {s.reason}" for s in report.skipped})
    full = fully_fused(fused, candidates, skipped)
    return {**row, "status": "ok", "correct": correct and not missing, "fully_fused": full, "fused": fused, "candidates": candidates,
            "mismatches": (worst + [f"{n}: no gradient under slothc" for n in missing])[:5],
            "skipped": skipped[:12], "graphs": report.graphs,
            "loss": float(ran["loss"]), "seconds": time.time() - t0}


# --------------------------------------------------------------------------------------------------
# Many architectures: one process each


def _run_child(arch: str, args) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, "-m", "slothc.coverage", "--child", arch, "--result", out.name, "--layers", str(args.layers),
               "--hidden", str(args.hidden), "--inner", args.inner, "--device", args.device]
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
    """``N architectures: X correct, Y fully fused, Z failed (W do not build or train without slothc
    either)``, then the excluded architectures by what they need and the text decoders' share correct."""
    correct = sum(1 for r in rows if r.get("correct"))
    full = sum(1 for r in rows if r.get("correct") and r.get("fully_fused"))
    failed = sum(1 for r in rows if r["status"] in ("failed", "timeout")
                 or (r["status"] == "ok" and not r.get("correct") and not r.get("eager_not_causal")))
    not_run = sum(1 for r in rows if r["status"] in ("build failed", "eager failed"))
    dynamo = sorted(r["arch"] for r in rows if r["status"] == "ok" and not r.get("correct") and r.get("compile_differs"))
    wrong_eager = sorted(r["arch"] for r in rows if r["status"] == "ok" and not r.get("correct") and r.get("eager_not_causal"))
    excluded: dict = {}
    for r in rows:
        if r["status"] == NOT_TEXT:
            excluded.setdefault(r["needs"].split(" (")[0], []).append(r["arch"])
    n_excluded = sum(map(len, excluded.values()))
    text = len(rows) - n_excluded
    share = f"{100 * correct / text:.1f}%" if text else "-"
    why = "; ".join(f"{need}: {', '.join(sorted(archs))}" for need, archs in sorted(excluded.items()))
    alone = (f"; {len(dynamo)} where torch.compile alone differs from eager as much and slothc equals it: "
             f"{', '.join(dynamo)}") if dynamo else ""
    causal = (f", of which {len(wrong_eager)} where eager is not causal and torch.compile alone is: "
              f"{', '.join(wrong_eager)}") if wrong_eager else ""
    return (f"{len(rows)} architectures: {correct} correct, {full} fully fused, {failed} failed "
            f"({not_run} do not build or train without slothc either{alone}{causal}); {n_excluded} not text decoders"
            f"{f' ({why})' if why else ''}; text decoders: {correct} of {text} correct ({share})")


def merge(committed: list, new: list) -> list:
    """The rows of a committed table with those of a partial rerun in place of theirs (by ``arch``),
    sorted; architectures new to the table are added."""
    rows = {r["arch"]: r for r in committed}
    rows.update({r["arch"]: r for r in new})
    return [rows[a] for a in sorted(rows)]


def _cell(text: str, n: int) -> str:
    """``text`` on one line of a Markdown table cell, at most ``n`` characters."""
    return " ".join(text.split())[:n].replace("|", "/")


def markdown(rows: list, versions: dict, partial: str | None = None) -> str:
    lines = [f"# slothc coverage: transformers {versions.get('transformers')}", "",
             ", ".join(f"{k} {v}" for k, v in versions.items() if v), "", *([f"**{partial}**", ""] if partial else []),
             summary(rows), "",
             "Fused / candidate sites per kind (candidates: the modules the eager step ran, by class; "
             "see `slothc/coverage.py`).", "",
             "| arch | status | equal to eager | fully fused | norm | rope | lora | mlp | loss | skipped (reasons) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r["status"] == NOT_TEXT:
            lines.append(f"| {r['arch']} | {NOT_TEXT}: {r['needs']}; text only: {r['text_status']}: "
                         f"{_cell(r.get('error', ''), 100)} | | | | | | | | |")
            continue
        if r["status"] != "ok":
            lines.append(f"| {r['arch']} | {r['status']}: {_cell(r.get('error', ''), 120)} | | | | | | | | |")
            continue
        f, c = r["fused"], r["candidates"]
        cells = " | ".join(f"{f[k]}/{c[k]}" for k in KINDS)
        skipped = "; ".join(r["skipped"])[:200].replace("|", "/")
        if r["correct"]:
            equal = "yes"
        elif r.get("eager_not_causal"):
            equal = "NO, eager is wrong: " + r["eager_not_causal"][:160]
        elif r.get("compile_differs"):
            equal = "NO, as torch.compile alone: " + r["compile_differs"][:160]
        else:
            equal = "NO: " + "; ".join(r["mismatches"])[:120]
        lines.append(f"| {r['arch']} | ok | {equal} | "
                     f"{'yes' if r['fully_fused'] else 'no'} | {cells} | {skipped} |")
    return "\n".join(lines) + "\n"


def run(archs, args, on_row=None) -> list:
    """Every architecture of ``archs``, ``--jobs`` at a time; ``on_row(rows)`` after each one (the
    rows so far: a run stopped half way keeps them)."""
    rows, t0 = [], time.time()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs))
    try:
        futures = {pool.submit(_run_child, a, args): a for a in archs}
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            r = fut.result()
            rows.append(r)
            state = r["status"] if r["status"] != "ok" else ("correct" if r["correct"] else "NOT EQUAL") + (
                ", fully fused" if r.get("fully_fused") else "")
            eta = (time.time() - t0) / i * (len(archs) - i)
            print(f"[{i}/{len(archs)}] {r['arch']}: {state} ({r.get('seconds', 0):.0f} s; about {eta / 60:.0f} min left)", flush=True)
            if on_row is not None and i < len(archs):
                on_row(sorted(rows, key=lambda r: r["arch"]))
    finally:  # stopped (a time limit's SIGINT): no architecture starts after it
        pool.shutdown(wait=True, cancel_futures=True)
    rows.sort(key=lambda r: r["arch"])
    return rows


def parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=None, help="model_type names (default: every causal-LM architecture)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--inner", default="aot_eager", choices=("aot_eager", "inductor", "eager"), help="slothc's inner compiler")
    p.add_argument("--device", default="cpu", help="where each step runs: cpu (default) or cuda (the Triton kernels)")
    p.add_argument("--budget-s", type=float, default=180.0, help="time budget of one architecture (default 180 s)")
    p.add_argument("--jobs", type=int, default=1, help="architectures checked at once (one process each)")
    p.add_argument("--out-dir", default=None, help="write coverage-<transformers version>.md and .json there")
    p.add_argument("--update", default=None, metavar="JSON",
                   help="a committed coverage-*.json: its rows of --arch are replaced by this run's, the summary "
                        "recomputed from all rows, and it and its .md rewritten")
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
        row = check_arch(args.child, args.layers, args.hidden, args.inner, args.device)
        with open(args.result, "w") as f:
            json.dump(row, f)
        return 0
    from slothc import tiny
    from slothc.train_bench import _device_name, _versions

    archs = args.arch or tiny.causal_lm_archs()
    for a in archs:
        tiny.check_arch(a)
    if args.device != "cpu":
        import torch

        if not torch.device(args.device).type == "cuda" or not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    versions = {k: v for k, v in _versions().items() if k in ("torch", "triton", "transformers", "peft", "slothc")}
    versions["device"] = _device_name(args.device)
    committed = None
    if args.update:
        with open(args.update) as f:
            committed = json.load(f)
        differ = {k: (committed["versions"].get(k), v) for k, v in versions.items()
                  if k != "slothc" and k in committed["versions"] and committed["versions"][k] != v}
        if differ:  # one table, one set of versions
            raise SystemExit(f"--update: {args.update} was made with other versions ({differ}); rerun every architecture")
    stems = []
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        suffix = "" if args.device == "cpu" else "-cuda"
        stems.append(os.path.join(args.out_dir, f"coverage-transformers-{versions['transformers']}{suffix}"))
    if args.update:
        stems.append(args.update[: -len(".json")] if args.update.endswith(".json") else args.update)

    def write(rows, pending=()):
        if committed is not None:
            rows = merge(committed["rows"], rows)
        table_versions = {**committed["versions"], **versions} if committed is not None else versions
        partial = f"partial: {len(pending)} architectures not run yet ({', '.join(sorted(pending))})" if pending else None
        for stem in stems:
            with open(stem + ".json", "w") as f:
                json.dump({"versions": table_versions, "summary": summary(rows), **({"partial": partial} if partial else {}),
                           "rows": rows}, f, indent=1)
            with open(stem + ".md", "w") as f:
                f.write(markdown(rows, table_versions, partial))
        return rows

    # the table so far after each architecture, marked partial (a run stopped by a time limit keeps it)
    rows = run(archs, args, on_row=(lambda done: write(done, set(archs) - {r["arch"] for r in done})) if stems else None)
    rows = write(rows) if stems else rows  # --update names a stem: its merge is in write()
    print(summary(rows), flush=True)
    for stem in stems:
        print(f"wrote {stem}.md and .json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
