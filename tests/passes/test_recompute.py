"""recompute_norms: a fused norm's output is recomputed in the backward, not kept from the forward.

Measured by what the compiled step saves for its backward (``saved_tensors_hooks`` see every tensor
AOTAutograd's compiled function keeps), against the same step with the option off: the norm outputs
that the LoRA projections read are gone, and loss and gradients are the same bits."""

import pytest
import torch

import slothc
from slothc import tiny
from tests.helpers import reference_ops_on_cpu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # on a GPU the Triton kernels run


@pytest.fixture(autouse=True)
def _reference_ops_on_cpu(monkeypatch):
    # On the CPU the ops' torch references (what is saved is the partitioner's choice either way; the
    # Triton interpreter would take most of a minute a test)
    with reference_ops_on_cpu(monkeypatch):
        yield


def _step(options, layers=2, checkpointing=False, autocast=False):
    torch.manual_seed(0)
    model = tiny.add_lora(tiny.tiny_model("llama", layers=layers, hidden=64), init_lora_weights=False).train().to(DEVICE)
    if checkpointing:
        tiny.enable_checkpointing(model)
    batch = tiny.sample_batch(model.config, batch=2, seq=32, device=DEVICE)
    del batch["attention_mask"]
    report = slothc.Report()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="slothc", options={"report": report, **options})
    ctx = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if autocast else torch.autocast(DEVICE.type, enabled=False)
    with ctx:
        compiled(**batch).loss.backward()  # compiles outside the hooks
    model.zero_grad()
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        loss = compiled(**batch).loss
    loss.backward()
    torch._dynamo.reset()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sum(saved.values()), loss.detach(), grads, report, model.config


@pytest.mark.parametrize("inner, autocast", [("aot_eager", False), ("inductor", True)])
def test_norm_outputs_are_recomputed_not_kept(inner, autocast):
    off_bytes, off_loss, off_grads, _, _ = _step({"inner": inner, "recompute_norms": False}, autocast=autocast)
    on_bytes, on_loss, on_grads, report, config = _step({"inner": inner}, autocast=autocast)
    assert report.count("rms_norm") == 5 and any("5 norm outputs are recomputed" in n for n in report.notes), str(report)
    # two norm outputs a layer (before q/k/v and gate/up) less one: the first layer's norm input is
    # then kept instead of recomputed from the embedding lookup (and some bytes of small tensors)
    y_bytes = 2 * 32 * config.hidden_size * (2 if autocast else 4)
    assert off_bytes - on_bytes > (2 * 2 - 1.5) * y_bytes, (off_bytes, on_bytes)
    assert torch.equal(on_loss, off_loss)
    assert on_grads.keys() == off_grads.keys() and all(torch.equal(on_grads[n], off_grads[n]) for n in on_grads)


def test_with_gradient_checkpointing_the_layers_are_left_alone():
    """HF gradient checkpointing recomputes each layer's body already: only the top-level graph's
    norm (the final one) is tagged, and the step is still eager's."""
    on_bytes, on_loss, on_grads, report, _ = _step({"inner": "aot_eager"}, checkpointing=True)
    assert report.count("rms_norm") == 5 and any("1 norm outputs are recomputed" in n for n in report.notes), str(report)
    torch.manual_seed(0)
    model = tiny.add_lora(tiny.tiny_model("llama", layers=2, hidden=64), init_lora_weights=False).train().to(DEVICE)
    batch = tiny.sample_batch(model.config, batch=2, seq=32, device=DEVICE)
    del batch["attention_mask"]
    loss = model(**batch).loss
    loss.backward()
    torch.testing.assert_close(on_loss, loss.detach())
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(on_grads[name], p.grad, msg=name)


def test_recompute_norms_is_validated():
    from slothc.options import Options

    assert Options.from_dict({}).recompute_norms is True and Options.from_dict({"recompute_norms": False}).recompute_norms is False
    with pytest.raises(ValueError, match="'recompute_norms' must be True or False"):
        Options.from_dict({"recompute_norms": "yes"})
