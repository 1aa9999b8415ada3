"""Backend options: parsed once, validated, immutable.

``torch.compile(model, backend="slothc", options={...})`` hands the dict to the backend. Each key is
checked: an unknown key or a bad value raises ``ValueError`` naming what is valid, so a typo never
turns into a silently unfused model.

Keys
----
``<fusion name>`` (bool)
    Enable or disable one fusion (``rms_norm``, ``layer_norm``, ...). Every fusion this version
    implements is on by default. ``add_rms_norm`` (the residual add before a fused RMSNorm, and the
    gradient sum after its backward, in one kernel each) works on Inductor's graphs after
    AOTAutograd, so only with ``inner="inductor"``, and needs ``rms_norm``.
``inner`` (str)
    The compiler that runs after the fusion passes: ``"inductor"`` (default), ``"aot_eager"`` or
    ``"eager"`` (the last two are for debugging).
``mode`` (str)
    Inductor's mode, as ``torch.compile(model, backend="slothc", mode=...)`` passes it (the keyword
    and this key are the same setting; torch.compile takes ``mode`` or ``options``, not both, so
    with other options give it here): ``"default"``, ``"reduce-overhead"`` (Inductor records CUDA
    graphs of each compiled graph and replays them: the host cost of launching the kernels and ops,
    slothc's included, is paid once at recording), ``"max-autotune"`` or
    ``"max-autotune-no-cudagraphs"``. Only with ``inner="inductor"``. CUDA graphs keep their
    inputs and outputs in static buffers: an output of one step is overwritten by the next (a
    training loop that reads the loss before the next step is fine), and every new input shape is
    recorded anew.
``logits`` (str)
    What a graph that computes the loss from the lm_head logits *and* returns them (every Hugging
    Face causal LM does) gives back as its logits. ``"keep"`` (default): the real logits; the fused
    loss reads them instead of upcasting them (no fp32 copies, see ``linear_cross_entropy``).
    ``"drop"``: the logits are never materialised: the loss is computed chunk by chunk from the
    hidden states, and ``outputs.logits`` is an empty ``(batch, seq, 0)`` tensor (reading it fails
    loudly). For training loops that only use ``outputs.loss`` (``transformers.Trainer``; trl's
    ``SFTTrainer`` computes its own loss and metrics and is unaffected). Graphs without the loss
    (generation, evaluation without labels) return their logits in both modes.
``padding`` (str)
    Whether batches may be padded. ``"unknown"`` (default): an SDPA mask built from the model's
    ``attention_mask`` input stays (padding cannot be ruled out when compiling; the report says
    so). ``"none"``: no batch is padded (fixed-length chunks whose collator still passes an
    ``attention_mask`` of ones): the mask is taken as built from ones, so a causal one gives SDPA's
    ``is_causal=True`` flash path, and the graph checks the input at run time (an asynchronous
    device assert, no host sync): a padded batch raises an error naming this option instead of
    training without its mask. On a GPU that error is a device-side assert, which ends the process's
    CUDA context.
``recompute_norms`` (bool)
    True (default): each fused norm's output is recomputed in the backward instead of kept from the
    forward (AOTAutograd's partitioner is told to: ``passes.recompute_norm_outputs``). The norm's
    input is kept for its own backward anyway, so this keeps one activation less for each norm whose
    output a LoRA projection's backward reads (two a decoder layer), for one more norm forward each in
    the backward; the values are the same bits. False: the partitioner decides.
``report`` (bool or :class:`slothc.Report`)
    True: log the fusion report of every compiled graph at compile time (default False). A
    ``Report`` instance: collect the sites and skips of every graph compiled with these options
    into it (nothing is logged), e.g. to assert in a test what a real training compile fused.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# One name per fusion: option key, report key and op name ``slothc::<name>``.
FUSIONS = ("rms_norm", "add_rms_norm", "layer_norm", "rope", "lora_linear", "qlora_linear", "mlp", "linear_cross_entropy",
           "causal_mask")
# The fusions this version ships; the others are reserved names.
IMPLEMENTED = ("rms_norm", "add_rms_norm", "layer_norm", "rope", "lora_linear", "qlora_linear", "mlp", "linear_cross_entropy",
               "causal_mask")
INNER_COMPILERS = ("inductor", "aot_eager", "eager")
LOGITS_MODES = ("keep", "drop")
PADDING_MODES = ("unknown", "none")
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class Options:
    enabled: frozenset = frozenset(IMPLEMENTED)
    inner: str = "inductor"
    report: bool = False
    logits: str = "keep"
    mode: str = "default"
    padding: str = "unknown"
    recompute_norms: bool = True
    collect: Any = dataclasses.field(default=None, compare=False)  # a Report that every compiled graph records into (``report=Report()``)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "Options":
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"slothc options must be a dict, got {type(options).__name__}")
        valid_keys = (*FUSIONS, "inner", "logits", "mode", "padding", "recompute_norms", "report")
        enabled = set(IMPLEMENTED)
        inner, report, collect, logits, mode, padding = "inductor", False, None, "keep", "default", "unknown"
        recompute_norms = True
        for key, value in options.items():
            if key in FUSIONS:
                _expect_bool(key, value)
                if value and key not in IMPLEMENTED:
                    raise ValueError(
                        f"slothc option {key!r}: this fusion is not available in this version "
                        f"(available: {', '.join(IMPLEMENTED)}); set it to False or leave it out"
                    )
                (enabled.add if value else enabled.discard)(key)
            elif key == "inner":
                if value not in INNER_COMPILERS:
                    raise ValueError(
                        f"slothc option 'inner' must be one of {', '.join(map(repr, INNER_COMPILERS))}, got {value!r}"
                    )
                inner = value
            elif key == "logits":
                if value not in LOGITS_MODES:
                    raise ValueError(
                        f"slothc option 'logits' must be one of {', '.join(map(repr, LOGITS_MODES))}, got {value!r}"
                    )
                logits = value
            elif key == "recompute_norms":
                _expect_bool(key, value)
                recompute_norms = value
            elif key == "padding":
                if value not in PADDING_MODES:
                    raise ValueError(
                        f"slothc option 'padding' must be one of {', '.join(map(repr, PADDING_MODES))} "
                        f"('none': no batch is padded, checked at run time), got {value!r}"
                    )
                padding = value
            elif key == "mode":
                if value is None:
                    value = "default"
                if value not in INDUCTOR_MODES:
                    raise ValueError(
                        f"slothc option 'mode' must be one of {', '.join(map(repr, INDUCTOR_MODES))} (Inductor's modes), got {value!r}"
                    )
                mode = value
            elif key == "report":
                from slothc.report import Report

                if isinstance(value, Report):
                    collect = value
                else:
                    _expect_bool(key, value)
                    report = value
            else:
                raise ValueError(f"unknown slothc option {key!r}; valid options: {', '.join(valid_keys)}")
        if mode != "default" and inner != "inductor":
            raise ValueError(
                f"slothc: mode {mode!r} is an Inductor mode and needs inner='inductor' (got inner={inner!r}); "
                f"leave the mode out or use the Inductor inner compiler"
            )
        return cls(enabled=frozenset(enabled), inner=inner, report=report, logits=logits, mode=mode, padding=padding,
                   recompute_norms=recompute_norms, collect=collect)


def _expect_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        extra = " or a slothc.Report" if key == "report" else ""
        raise ValueError(f"slothc option {key!r} must be True or False{extra}, got {value!r}")
