"""End to end: a tiny Llama quantised to 4 bits by transformers + bitsandbytes, with PEFT LoRA, compiled with slothc.

The model is saved with random weights and loaded back with ``BitsAndBytesConfig(load_in_4bit=True)``
(bitsandbytes' CPU backend here, CUDA on the GPU), exactly as a user loads a checkpoint for QLoRA.
One training step of the compiled model gives eager's loss and every LoRA gradient, judged against
a float64 run of the same model whose linears hold the exactly dequantised 4-bit weights: the slothc
error may not exceed a small multiple of eager's own. The report shows every 4-bit LoRA linear
fused with its dequantisation, and no bitsandbytes op is left in the graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

import slothc
from slothc.kernels import _launch
from slothc.kernels import qlora_linear as qmod
from tests.e2e.test_tiny_models import DEVICE, LAYERS, SCALAR_AUTOCAST_FLOOR, _assert_close_to_reference, _assert_grads_close, _batch, _step
from tests.helpers import count_calls
from tests.kernels.test_qlora_linear import bitsandbytes_training_path

bnb = pytest.importorskip("bitsandbytes")

# intermediate 128: every in_features a multiple of the blocksize, as in real models (bitsandbytes'
# own CPU dequantisation is only right then; see tests/kernels/test_qlora_linear.py)
CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=128)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", autouse=True)
def _training_path():
    # eager bitsandbytes as at training sizes (dequantise, then F.linear), the formula the op
    # reproduces; tiny batches would take its own 4-bit kernel on CUDA (tests/kernels/test_qlora_linear.py)
    with bitsandbytes_training_path():
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG)).save_pretrained(path)
    return path


@pytest.fixture
def reference_ops_on_cpu(monkeypatch):
    monkeypatch.setattr(_launch, "interpreting", lambda: False)


def _qlora_model(path, quant_type="nf4", nested=True, dtype=torch.float32, compute=torch.float32, input_grads=False):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested,
                               bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype, device_map={"": DEVICE})
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.train()
    # Frozen embeddings: the first layer's x needs no grad (bitsandbytes calls gemm_4bit directly, and
    # no dX is computed there), the second layer's does (bitsandbytes' MatMul4Bit). ``input_grads``:
    # what gradient checkpointing (prepare_model_for_kbit_training) sets, x needs grad everywhere
    # (Dynamo then takes ~15 s to trace the model on the CPU: one test only).
    if input_grads:
        model.enable_input_require_grads()
    return model


def _float64_reference(qmodel):
    """The same model in float64, its 4-bit linears replaced by nn.Linear holding the dequantised weights."""
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG)).to(DEVICE)
    ref = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    state = {}
    for name, p in qmodel.named_parameters():
        if isinstance(p, bnb.nn.Params4bit):
            qs = p.quant_state
            state[name] = qmod.dequantize_4bit_reference(*qmod.state_tensors(p.data, qs), qs.shape, qs.blocksize, qs.quant_type,
                                                         torch.float32)
        else:
            state[name] = p.detach().float()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    return ref.double()


def _assert_every_4bit_lora_linear_fused(report, variant_prefix):
    sites = report.fused.get("qlora_linear", [])
    expected = sorted(f"layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for i in range(LAYERS) for p in PROJECTIONS)
    found = sorted(s.module[s.module.index("layers.") :] for s in sites)
    assert found == expected, str(report)
    assert all(s.variant.startswith(variant_prefix) and ", peft" in s.variant for s in sites), str(report)
    # q/k/v and gate/up read one input each: one call (one host cost, one adapters' down-projection)
    shared = {s.module.rsplit(".", 1)[1]: s.variant.partition("input shared by ")[2] for s in sites}
    assert shared == {"q_proj": "3", "k_proj": "3", "v_proj": "3", "o_proj": "", "gate_proj": "2", "up_proj": "2", "down_proj": ""}, \
        str(report)
    assert not report.fused.get("lora_linear"), str(report)
    # the activation and the 4-bit down projection are one op (slothc::qlora_mlp): h is not kept
    assert [s.variant for s in report.fused["mlp"]] == ["silu + down"] * LAYERS, str(report)
    assert not [s for s in report.skipped if s.fusion in ("qlora_linear", "lora_linear")], str(report)


def _check_step(checkpoint, autocast=False, options=None, **load):
    qmodel = _qlora_model(checkpoint, **load)
    ref = _float64_reference(qmodel)
    eager, fused = qmodel, _qlora_model(checkpoint, **load)
    batch = _batch(CONFIG)
    ref_loss, ref_grads = _step(ref, batch, autocast=False, fp64=True)
    eager_loss, eager_grads = _step(eager, batch, autocast)
    report = slothc.Report()
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="slothc", options={"inner": "aot_eager", **(options or {}), "report": report})
    fused_loss, fused_grads = _step(compiled, batch, autocast)
    torch._dynamo.reset()
    half = autocast or load.get("compute", torch.float32) != torch.float32
    k = 3.0 if half else 2.0
    _assert_close_to_reference("loss", fused_loss, eager_loss, ref_loss, k, SCALAR_AUTOCAST_FLOOR if half else 0.0)
    _assert_grads_close(fused_grads, eager_grads, ref_grads, k + 1, half)
    return report


@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_qlora_step_matches_eager_fp32_compute(checkpoint, quant_type, nested, reference_ops_on_cpu):
    report = _check_step(checkpoint, quant_type=quant_type, nested=nested)
    _assert_every_4bit_lora_linear_fused(report, f"{quant_type}{', double-quant' if nested else ', blocksize 64'}")


@pytest.mark.parametrize("input_grads", [False, True], ids=["frozen_embeddings", "input_grads"])
def test_qlora_step_bf16_compute(checkpoint, input_grads, reference_ops_on_cpu):
    """fp32 model, bf16 compute dtype (a QLoRA config's usual bnb_4bit_compute_dtype)."""
    report = _check_step(checkpoint, compute=torch.bfloat16, input_grads=input_grads)
    _assert_every_4bit_lora_linear_fused(report, "nf4, double-quant")


def test_qlora_step_bf16_model_under_autocast(checkpoint, reference_ops_on_cpu):
    """A bf16 model, bf16 compute, HF Trainer's bf16 autocast: the usual QLoRA run."""
    report = _check_step(checkpoint, autocast=True, dtype=torch.bfloat16, compute=torch.bfloat16)
    _assert_every_4bit_lora_linear_fused(report, "nf4, double-quant")


def test_qlora_step_under_inductor(checkpoint, reference_ops_on_cpu):
    report = _check_step(checkpoint, options={"inner": "inductor"})
    _assert_every_4bit_lora_linear_fused(report, "nf4, double-quant")


def test_triton_dequantisation_in_a_training_step(checkpoint, monkeypatch):
    """The Triton kernel (CUDA, or the interpreter on the CPU) dequantises each call's weights (q/k/v
    together, o, gate/up together, down) in one launch in the forward and once more in the backward
    where dX is needed: everywhere but the first layer's q/k/v, whose input (the normed frozen
    embeddings) needs no grad."""
    if not torch.cuda.is_available() and not _launch.interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    launches = count_calls(monkeypatch, qmod, ("dequantize_4bit_group_launch",))
    _check_step(checkpoint)
    assert launches["dequantize_4bit_group_launch"] == 4 * LAYERS + (4 * LAYERS - 1)


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_sequence_lengths_that_change_recompile_once_and_stay_fused(checkpoint, inner, reference_ops_on_cpu):
    """Batches of other shapes (2 x 12, then 1 x 20 and 1 x 28, as the longest-sequence search runs
    them): one recompile with dynamic sizes, every 4-bit LoRA linear fused in both graphs, each loss
    eager's. On torch 2.11 (the GPU machine's) this recompile failed, "Cannot call numel() on tensor
    with symbolic sizes/strides" (the 8B longest-sequence search on the H200), and once that was
    fixed MatMul4Bit's body, which then also returns ``A.numel()``, went unfused; torch 2.13 shows
    neither (tests/passes/test_meta.py and test_qlora_linear.py's torch-2.11 graphs cover both)."""
    eager = _qlora_model(checkpoint, dtype=torch.bfloat16, compute=torch.bfloat16)
    fused = _qlora_model(checkpoint, dtype=torch.bfloat16, compute=torch.bfloat16)
    report = slothc.Report()
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="slothc", options={"inner": inner, "logits": "drop", "report": report})
    g = torch.Generator().manual_seed(0)
    try:
        for batch, seq in ((2, 12), (1, 20), (1, 28)):
            ids = torch.randint(0, CONFIG.vocab_size, (batch, seq), generator=g).to(DEVICE)
            eager_loss, _ = _step(eager, dict(input_ids=ids, labels=ids), autocast=True)
            loss, _ = _step(compiled, dict(input_ids=ids, labels=ids), autocast=True)
            _assert_close_to_reference("loss", loss, eager_loss, eager_loss.double(), 3.0, SCALAR_AUTOCAST_FLOOR)
    finally:
        torch._dynamo.reset()
    assert report.graphs == 2 and report.count("qlora_linear") == 2 * 7 * LAYERS, str(report)
    # the dynamic graph fuses what the first one does: norms, RoPE, the MLPs with their 4-bit down
    # projections, the loss and, where transformers builds one (5.17), the causal mask (proved for
    # every size); nothing is skipped
    first, dynamic = report.per_graph()
    assert dynamic == first and first.get("causal_mask", LAYERS) == LAYERS and not report.skipped, str(report)
    assert [s.variant for s in report.fused["mlp"]] == ["silu + down"] * 2 * LAYERS, str(report)
