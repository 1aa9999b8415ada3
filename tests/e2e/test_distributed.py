"""slothc under torch.distributed on the CPU: gloo, two processes that each test starts and stops
(``tests/e2e/_ranks.py``), one training step compared with single-process eager on the global batch.

- DDP: Dynamo's DDPOptimizer splits the graph at DDP's bucket boundaries and calls slothc once per
  piece. Each piece is fused, the report says what each piece fused, and a LoRA site that a boundary
  cut in two is reported (the base linear in one piece, its adapters in the next).
- FSDP2: ``fully_shard`` on each decoder layer and on the root, slothc on the whole model (Dynamo
  breaks the graph at each sharded module: 5 graphs). The fused loss reads the lm_head weight that
  FSDP2 gathered for the root's forward, and its gradient (a trainable lm_head) is reduce-scattered.
- A DTensor weight in the graph (FSDP2's sharded parameter read outside its module's forward): the
  loss is left unfused, with the reason.

Tolerances: every rank's loss is the mean over its half, and DDP/FSDP2 average the gradients of the
halves; one process sums the same terms in another order, and the fused ops sum in another order
than eager. In fp32 (eps 1.2e-7) over the few hundred terms of a tiny model that is a few 1e-6
relative at most: rtol 1e-5 for the loss, 1e-4 for gradients (the other e2e tests' bounds), atol
1e-6 for gradient entries near zero. Not sharing the gradients (no all-reduce) is off by O(1).
"""

from __future__ import annotations


import pytest
import torch

import slothc
from slothc.backend import DDP_PIECES
from slothc.passes.causal_mask import MASK_IS_INPUT
from slothc.passes.lora_linear import BASE_IN_ANOTHER_GRAPH
from slothc.passes.matcher import TENSOR_SUBCLASS
from tests.e2e import _ranks
from tests.helpers import reference_ops_on_cpu

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)


@pytest.fixture(autouse=True)
def _reference_ops_on_cpu(monkeypatch):
    with reference_ops_on_cpu(monkeypatch):
        yield


def _single_process(build):
    """Eager loss and gradients of one process on the global batch, and slothc's sites on it."""
    ids = _ranks.global_batch()
    model = build()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    sites = slothc.explain(build(), input_ids=ids, labels=ids)
    return loss.detach(), _ranks.trainable_grads(model), sites


def _assert_same_step(ranks, loss, grads):
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss, rtol=1e-5, atol=1e-6)
    for rank, r in enumerate(ranks):
        assert r["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {name}")


def test_ddp_pieces_are_fused_and_train_as_one_process(tmp_path):
    ranks = _ranks.launch("ddp", tmp_path)
    loss, grads, single = _single_process(_ranks.ddp_model)
    _assert_same_step(ranks, loss, grads)

    report = ranks[0]["report"]
    assert report.graphs >= 2 and DDP_PIECES in report.notes, str(report)  # DDPOptimizer split the graph
    per_graph = report.per_graph()
    text = str(report)
    for i, counts in enumerate(per_graph):
        assert counts, f"piece {i} fused nothing\n{text}"
        assert f"    graph {i}: " + ", ".join(f"{f} {n}" for f, n in counts.items()) in text
    for fusion in slothc.report.FUSIONS:
        assert sum(c.get(fusion, 0) for c in per_graph) == report.count(fusion)

    cut = [s for s in report.skipped if s.reason == BASE_IN_ANOTHER_GRAPH]
    # torch 2.11 also splits some layers between their mask and their attention (2.13 does not)
    masks = [s for s in report.skipped if s.fusion == "causal_mask" and s.reason == MASK_IS_INPUT]
    assert cut and len(cut) + len(masks) == len(report.skipped), text
    for fusion in ("rms_norm", "rope", "linear_cross_entropy"):
        assert report.count(fusion) == single.count(fusion) > 0, (fusion, text)
    assert report.count("lora_linear") + len(cut) == single.count("lora_linear"), text
    # An MLP whose up projection was cut has act(gate) in one piece and its product with up in the next.
    unfused_mlps = set(single.modules("mlp")) - set(report.modules("mlp"))
    assert unfused_mlps == {s.module.rsplit(".", 1)[0] for s in cut if s.module.endswith(".up_proj")}, text


def test_fsdp2_fused_loss_reads_the_gathered_lm_head(tmp_path):
    ranks = _ranks.launch("fsdp2", tmp_path)
    loss, grads, single = _single_process(_ranks.fsdp_model)
    assert any(name.endswith("lm_head.modules_to_save.default.weight") for name in grads)
    for logits, variant in (("keep", "logits"), ("drop", "hidden states, logits dropped")):
        runs = [r[logits] for r in ranks]
        assert runs[0]["lm_head"] == ("DTensor", (_ranks.VOCAB // _ranks.WORLD, 64))  # sharded outside the forward
        _assert_same_step(runs, loss, grads)
        report = runs[0]["report"]
        # torch 2.11 breaks the graph between the mask and the layers (2.13 does not): reported as such
        assert all(s.fusion == "causal_mask" and s.reason == MASK_IS_INPUT for s in report.skipped), str(report)
        for fusion in ("rms_norm", "rope", "lora_linear", "mlp", "linear_cross_entropy"):
            assert report.count(fusion) == single.count(fusion) > 0, (logits, fusion, str(report))
        assert [s.variant for s in report.fused["linear_cross_entropy"]] == [variant], str(report)


def test_a_dtensor_weight_in_the_graph_is_skipped_not_fused(tmp_path):
    import torch.nn.functional as F

    ranks = _ranks.launch("dtensor_loss", tmp_path)
    hidden, weight, labels = (t.clone() for t in ranks[0]["inputs"])
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = F.cross_entropy(F.linear(hidden, weight), labels)
    loss.backward()
    for r in ranks:
        for got in (r["eager"], r["fused"]):
            torch.testing.assert_close(got, (loss.detach(), weight.grad, hidden.grad), rtol=1e-5, atol=1e-6)
        report = r["report"]
        assert report.count("linear_cross_entropy") == 0, str(report)
        assert [(s.fusion, s.reason) for s in report.skipped] == [("linear_cross_entropy", TENSOR_SUBCLASS)], str(report)
