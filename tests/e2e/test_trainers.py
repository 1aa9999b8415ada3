"""The training loops users run, with slothc compiled in, in both ``logits`` modes.

- ``transformers.Trainer`` trains through the model's own loss: the fused loss is in the compiled
  graph, and the per-step losses equal eager's.
- trl's ``SFTTrainer`` (trl >= 1.x) computes the loss and its token-accuracy/entropy metrics with
  its own chunked LM head (``add_fused_lm_head``), not with the model's logits: slothc fuses the rest
  of the model, and training and metrics work unchanged in both modes.

Two optimizer steps of a tiny Llama with LoRA, on CPU, eager vs slothc, same seed and data. SGD:
Adam's first step is sign(g), which turns rounding-level differences of near-zero gradients into
learning-rate-sized ones.
"""

from __future__ import annotations

import math

import pytest
import torch

import slothc
from slothc.tiny import add_lora, load_in_4bit, tiny_model
from tests.helpers import reference_ops_on_cpu

STEPS, BATCH, SEQ, VOCAB = 2, 2, 16, 128


@pytest.fixture(autouse=True)
def _reference_ops_on_cpu(monkeypatch):
    with reference_ops_on_cpu(monkeypatch):
        yield


def _model(qlora=None):
    """The tiny Llama with LoRA; ``qlora`` (a compute dtype): saved and loaded back in 4 bits (NF4,
    double quant) first."""
    model = tiny_model("llama", layers=2, hidden=64, vocab=VOCAB, seed=0)
    if qlora is not None:
        model = load_in_4bit(model, compute_dtype=qlora)
    torch.manual_seed(0)  # the adapters' initialisation draws from the global generator
    return add_lora(model, r=4, alpha=8)


def _model_compiled(logits_mode, qlora=None):
    """The tiny LoRA model, compiled with slothc in ``logits_mode`` (None: eager), and its report."""
    model = _model(qlora)
    report = slothc.Report()
    if logits_mode is not None:
        model.compile(backend="slothc", options={"inner": "aot_eager", "report": report, "logits": logits_mode})
    return model, report


def _dataset():
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (STEPS * BATCH, SEQ), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def _args(cls, name, **kw):
    return cls(
        output_dir=f"/tmp/slothc-test-{name}", max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-2,
        lr_scheduler_type="constant", optim="sgd", use_cpu=True, seed=0, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, **kw,
    )


def _losses(trainer) -> list:
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def _train_hf(logits_mode):
    from transformers import Trainer, TrainingArguments, default_data_collator

    model, report = _model_compiled(logits_mode)
    dataset = _dataset().map(lambda ex: {"labels": ex["input_ids"]})
    trainer = Trainer(model=model, args=_args(TrainingArguments, "hf"), train_dataset=dataset, data_collator=default_data_collator)
    return _losses(trainer), report


def _train_sft(logits_mode, qlora=None):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    from trl import SFTConfig, SFTTrainer

    model, report = _model_compiled(logits_mode, qlora)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0", eos_token="t1")
    args = _args(SFTConfig, "sft", max_length=SEQ, dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=tokenizer)
    losses = _losses(trainer)
    metrics = [log for log in trainer.state.log_history if "mean_token_accuracy" in log]
    assert metrics and all(math.isfinite(m["mean_token_accuracy"]) for m in metrics)
    return losses, report


@pytest.mark.parametrize("logits", ["keep", "drop"])
def test_transformers_trainer_trains_through_the_fused_loss(logits):
    eager, _ = _train_hf(None)
    torch._dynamo.reset()
    fused, report = _train_hf(logits)
    torch._dynamo.reset()
    assert report.count("linear_cross_entropy") >= 1, str(report)
    assert len(fused) == STEPS
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(eager), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("logits", ["keep", "drop"])
def test_trl_sft_trainer_works_in_both_modes(logits):
    eager, _ = _train_sft(None)
    torch._dynamo.reset()
    fused, report = _train_sft(logits)
    torch._dynamo.reset()
    assert report.count("rms_norm") >= 1, str(report)  # the model is compiled and fused
    assert len(fused) == STEPS
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(eager), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compute", ["bf16", "fp32"])
def test_trl_sft_trainer_trains_a_qlora_model(compute):
    """QLoRA through SFTTrainer, which trains under bf16 autocast: the tiny Llama loaded in 4 bits
    (bitsandbytes on the CPU). With ``bnb_4bit_compute_dtype=bfloat16`` (the QLoRA recipe) every 4-bit
    LoRA linear is fused with its dequantisation; with float32 bitsandbytes computes its base in fp32
    where a linear under autocast would not: skipped, and the report names the setting to change."""
    pytest.importorskip("bitsandbytes")
    from slothc.passes.qlora_linear import AUTOCAST_DTYPE

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[compute]
    eager, _ = _train_sft(None, qlora=dtype)
    torch._dynamo.reset()
    fused, report = _train_sft("keep", qlora=dtype)
    torch._dynamo.reset()
    assert len(fused) == STEPS
    if compute == "bf16":
        assert report.count("qlora_linear") == 2 * 7, str(report)
        assert not [s for s in report.skipped if s.fusion in ("qlora_linear", "lora_linear")], str(report)
        torch.testing.assert_close(torch.tensor(fused), torch.tensor(eager), rtol=2e-3, atol=0)  # bf16 model
    else:
        assert not report.count("qlora_linear"), str(report)
        reasons = {s.reason for s in report.skipped if s.fusion == "qlora_linear"}
        assert reasons == {AUTOCAST_DTYPE}, str(report)
        torch.testing.assert_close(torch.tensor(fused), torch.tensor(eager), rtol=1e-4, atol=1e-5)
