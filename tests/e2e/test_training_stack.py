"""The training stack around a slothc-compiled model (tiny Llama with LoRA, CPU):

- HF's ``Trainer`` compiling through its own arguments (``torch_compile_backend="slothc"``): refused
  by accelerate (its enum of backend names), which the test pins;
- gradient accumulation: the loss is the model's sum over ``num_items_in_batch``, equal to eager's;
- sequence lengths that change between batches: one recompile (dynamic shapes), not one a step, and
  the dynamic graph is fused too;
- generation in eval mode after training;
- the adapter saved with ``save_pretrained`` has eager's keys and values, and loads into plain PEFT;
- padding-free packing (``position_ids`` restarting inside a row): eager's loss and gradients.
"""

from __future__ import annotations


import pytest
import torch

import slothc
from slothc.tiny import add_lora, tiny_model
from tests.e2e.test_trainers import BATCH, SEQ, STEPS, VOCAB, _args, _dataset, _losses
from tests.helpers import reference_ops_on_cpu


@pytest.fixture(autouse=True)
def _reference_ops_on_cpu(monkeypatch):
    with reference_ops_on_cpu(monkeypatch):
        yield


def _model():
    torch.manual_seed(0)  # the adapters' initialisation draws from the global generator
    return add_lora(tiny_model("llama", layers=2, hidden=64, vocab=VOCAB, seed=0), r=4, alpha=8, init_lora_weights=False)


def _train(compile_kwargs=None, model_compile=None):
    """Two SGD steps with HF's Trainer (labels = input ids): (losses, model)."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = _model()
    if model_compile is not None:
        model.compile(backend="slothc", options=model_compile)
    dataset = _dataset().map(lambda ex: {"labels": ex["input_ids"]})
    trainer = Trainer(model=model, args=_args(TrainingArguments, "stack", **(compile_kwargs or {})), train_dataset=dataset,
                      data_collator=default_data_collator)
    return _losses(trainer), model


def test_trainer_compile_arguments_are_refused_by_accelerate():
    """``TrainingArguments(torch_compile=True, torch_compile_backend="slothc")`` cannot work today:
    the Trainer hands the name to accelerate's ``TorchDynamoPlugin``, which accepts only the members
    of its ``DynamoBackend`` enum (accelerate 1.15), before torch.compile could look "slothc" up.
    The way that works is one line before the Trainer: ``model.compile(backend="slothc")``
    (tests/e2e/test_trainers.py). This test fails, and the README's sentence should change, when
    accelerate takes other backends."""
    with pytest.raises(ValueError, match="'SLOTHC' is not a valid DynamoBackend"):
        _train({"torch_compile": True, "torch_compile_backend": "slothc"})


def test_gradient_accumulation_divides_by_num_items_in_batch():
    from transformers import Trainer, TrainingArguments, default_data_collator

    def run(options):
        model = _model()
        if options is not None:
            model.compile(backend="slothc", options=options)
        # masked labels of different counts: the sum over num_items_in_batch differs from a mean of means
        dataset = _dataset().map(lambda ex, i: {"labels": [-100] * (i % 3 * 4) + ex["input_ids"][i % 3 * 4:]}, with_indices=True)
        args = _args(TrainingArguments, "accum", gradient_accumulation_steps=2)
        args.per_device_train_batch_size = 1
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
        return _losses(trainer)

    report = slothc.Report()
    eager = run(None)
    torch._dynamo.reset()
    fused = run({"inner": "aot_eager", "report": report})
    assert report.count("linear_cross_entropy") >= 1, str(report)
    assert len(fused) == len(eager) > 0
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(eager), rtol=1e-4, atol=1e-5)


def test_changing_sequence_lengths_recompile_once_and_stay_fused():
    model = _model()
    report = slothc.Report()
    compiled = torch.compile(model, backend="slothc", options={"inner": "aot_eager", "report": report})
    g = torch.Generator().manual_seed(0)
    for seq in (12, 16, 20, 24):
        ids = torch.randint(3, VOCAB, (2, seq), generator=g)
        out = compiled(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.testing.assert_close(out.loss, model(input_ids=ids, labels=ids).loss, rtol=1e-4, atol=1e-5)
    assert report.graphs == 2, str(report)  # the first length static, then one dynamic graph for the others
    per_graph = [sum(1 for sites in report.fused.values() for s in sites if s.graph == i) for i in range(2)]
    assert per_graph[1] == per_graph[0] > 0, (per_graph, str(report))


def test_generation_after_training():
    _, model = _train(model_compile={"inner": "aot_eager"})
    model.eval()
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_saved_adapter_is_eagers_and_loads_into_plain_peft(tmp_path):
    from peft import PeftModel

    _, eager = _train()
    torch._dynamo.reset()
    _, fused = _train(model_compile={"inner": "aot_eager"})
    eager.save_pretrained(tmp_path / "eager")
    fused.save_pretrained(tmp_path / "fused")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "eager" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    loaded = PeftModel.from_pretrained(tiny_model("llama", layers=2, hidden=64, vocab=VOCAB, seed=0), tmp_path / "fused")
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_padding_free_packing_with_position_ids():
    """Two sequences packed in one row, told apart by position_ids (trl's padding_free): slothc's
    loss and gradients are eager's, and eager's are not those of one long sequence."""
    model = _model()
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    labels = ids.clone()
    labels[0, 6] = -100  # no loss across the boundary
    eager = model(input_ids=ids, position_ids=pos, labels=labels).loss
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with torch.no_grad():
        assert abs(model(input_ids=ids, labels=labels).loss.item() - eager.item()) > 1e-4  # packing changes the result
    report = slothc.Report()
    fused = torch.compile(model, backend="slothc", options={"inner": "aot_eager", "report": report})(input_ids=ids, position_ids=pos,
                                                                                                      labels=labels).loss
    fused.backward()
    assert report.count("rms_norm") == 5 and report.count("lora_linear") == 14, str(report)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
