"""The causal_mask pass: an SDPA mask that is provably the causal one becomes is_causal=True.

transformers <= 5.17 (and later ones with torch < 2.14) build the mask explicitly while compiling;
transformers 5.24 with torch 2.13 (CI) takes its shortcut and passes no mask. ``like_517`` makes the
installed version build the mask as 5.17 does (its ``_ignore_causal_mask_sdpa`` returns False under
tracing), so the pass sees the graph the GPU machine's transformers gives.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import slothc
from slothc import tiny
from slothc.passes import causal_mask

SDPA = torch._C._nn.scaled_dot_product_attention


@pytest.fixture
def like_517(monkeypatch):
    import transformers.masking_utils as mu

    original = mu._ignore_causal_mask_sdpa

    def never_while_compiling(padding_mask, *args, **kwargs):
        if torch.compiler.is_compiling():
            return False
        return original(padding_mask, *args, **kwargs)

    monkeypatch.setattr(mu, "_ignore_causal_mask_sdpa", never_while_compiling)


def _capture(fn, *args, options=None, dynamic=None, **kwargs):
    """(report, [graphs after the passes], output) of ``fn`` compiled with slothc (inner eager)."""
    report, graphs = slothc.Report(), []

    def backend(gm, example_inputs):
        from slothc.backend import compile_graph
        from slothc.options import Options

        out = compile_graph(gm, example_inputs, Options.from_dict({"inner": "eager", **(options or {})}), report)
        graphs.append(gm)
        return out

    torch._dynamo.reset()
    try:
        out = torch.compile(fn, backend=backend, dynamic=dynamic)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return report, graphs, out


def _sdpa_calls(gm):
    return [n for n in gm.graph.nodes if n.target is SDPA]


def _model(arch="llama", **overrides):
    model = tiny.tiny_model(arch, layers=2, **overrides)
    model.config._attn_implementation = "sdpa"
    return model.train()


def test_explicit_causal_mask_becomes_is_causal(like_517):
    model = _model()
    batch = tiny.sample_batch(model.config, seq=12)
    del batch["attention_mask"]
    eager = model(**batch)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    report, graphs, out = _capture(model, **batch)
    assert report.count("causal_mask") == 2, str(report)
    calls = _sdpa_calls(graphs[0])
    assert len(calls) == 2 and all(n.kwargs["is_causal"] is True and n.kwargs["attn_mask"] is None for n in calls)
    assert not [n for n in graphs[0].graph.nodes if n.target in (torch.Tensor.expand, "expand") and "mask" in n.name]
    torch.testing.assert_close(out.loss, eager.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], msg=name)


def test_mask_passed_into_checkpointed_layers(like_517):
    """Gradient checkpointing: each layer is a nested body whose SDPA reads the mask as an input;
    the pass follows it to what the caller passes (the 8B QLoRA step's case)."""
    model = _model()
    tiny.enable_checkpointing(model)
    batch = tiny.sample_batch(model.config, seq=12)
    del batch["attention_mask"]
    expected = model(**batch).loss
    report, graphs, out = _capture(model, **batch)
    assert report.count("causal_mask") == 2 and not [s for s in report.skipped if s.fusion == "causal_mask"], str(report)
    from slothc.passes.meta import graphs as nested

    calls = [n for g in nested(graphs[0]) for n in g.nodes if n.target is SDPA]
    assert len(calls) == 2 and all(n.kwargs["is_causal"] is True and n.kwargs["attn_mask"] is None for n in calls)
    torch.testing.assert_close(out.loss, expected)


def test_a_mask_from_the_attention_mask_input_is_reported(like_517):
    model = _model()
    batch = tiny.sample_batch(model.config, seq=12)  # attention_mask of ones, as a training loop passes it
    report, graphs, _ = _capture(model, **batch)
    assert report.count("causal_mask") == 0
    assert [s.reason for s in report.skipped if s.fusion == "causal_mask"] == [causal_mask.READS_INPUT] * 2, str(report)
    assert all(n.kwargs.get("attn_mask") is not None for n in _sdpa_calls(graphs[0]))


def test_sliding_window_is_not_the_causal_mask(like_517):
    model = _model("mistral", sliding_window=4)
    batch = tiny.sample_batch(model.config, seq=12)
    del batch["attention_mask"]
    report, _, out = _capture(model, **batch)
    torch.testing.assert_close(out.loss, model(**batch).loss)
    assert report.count("causal_mask") == 0
    assert {s.reason for s in report.skipped if s.fusion == "causal_mask"} == {causal_mask.NOT_CAUSAL}, str(report)


def test_disabled_by_option(like_517):
    model = _model()
    batch = tiny.sample_batch(model.config, seq=12)
    del batch["attention_mask"]
    report, graphs, _ = _capture(model, **batch, options={"causal_mask": False})
    assert report.count("causal_mask") == 0 and not [s for s in report.skipped if s.fusion == "causal_mask"]
    assert all(n.kwargs.get("attn_mask") is not None for n in _sdpa_calls(graphs[0]))


def _attention(mask_fn):
    def fn(q, k, v):
        n = q.shape[-2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_fn(n, q), is_causal=False)

    return fn


@pytest.mark.parametrize(
    "name, mask_fn, fused",
    [
        ("bool", lambda n, q: torch.arange(n)[None, :] <= torch.arange(n)[:, None], True),
        ("tril", lambda n, q: torch.ones(n, n, dtype=torch.bool).tril(), True),
        ("additive_inf", lambda n, q: torch.full((n, n), -math.inf).triu(1), True),
        ("additive_min", lambda n, q: torch.full((n, n), torch.finfo(torch.float32).min).triu(1), True),
        ("soft_bias", lambda n, q: torch.full((n, n), -math.inf).triu(1) + 0.5, False),
        ("upper", lambda n, q: torch.ones(n, n, dtype=torch.bool).triu(), False),
        ("window", lambda n, q: torch.ones(n, n, dtype=torch.bool).tril() & ~torch.ones(n, n, dtype=torch.bool).tril(-3), False),
    ],
)
def test_mask_spellings(name, mask_fn, fused):
    q, k, v = (torch.randn(2, 3, 8, 16) for _ in range(3))
    fn = _attention(mask_fn)
    report, graphs, out = _capture(fn, q, k, v)
    torch.testing.assert_close(out, fn(q, k, v))
    assert report.count("causal_mask") == int(fused), str(report)
    if not fused:
        assert [s.reason for s in report.skipped] == [causal_mask.NOT_CAUSAL], str(report)


@pytest.mark.parametrize("diagonal, fused", [(0, True), (2, False)], ids=["top_left", "bottom_right"])
def test_query_and_key_lengths_differ(diagonal, fused):
    """SDPA's is_causal aligns to the top left: that mask is fused; a cache's bottom-right one is not."""
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)

    def fn(q, k, v):
        mask = torch.ones(4, 6, dtype=torch.bool).tril(diagonal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    report, _, out = _capture(fn, q, k, v)
    torch.testing.assert_close(out, fn(q, k, v))
    assert report.count("causal_mask") == int(fused)
    assert [s.reason for s in report.skipped] == ([] if fused else [causal_mask.NOT_CAUSAL])


def _arange(n, q):
    return torch.arange(n, device=q.device)


def _packed(pos_fn, prepend=lambda first: first - 1, starts=lambda diff: diff.ne(1)):
    """transformers' mask at batch size 1 (masking_utils, as Dynamo traces it): causal over the
    position ids, ANDed with its packed-sequence term (a new sequence wherever the position ids do not
    step by 1), that term's ids from ``pos_fn(n, q)``; ``prepend``: the value put before the first id
    (transformers: one below it); ``starts``: where a sequence starts, from the differences
    (transformers: where they are not 1). Literals, not a closure's int, which Dynamo would make a size."""

    def mask_fn(n, q):
        pos = pos_fn(n, q).unsqueeze(0)
        seq = starts(torch.diff(pos, prepend=prepend(pos[..., :1]), dim=-1)).cumsum(-1)
        b = torch.arange(1, device=q.device)[:, None, None, None]
        qi, ki = _arange(n, q)[None, None, :, None], _arange(n, q)[None, None, None, :]
        ids = (_arange(n, q) + 0).unsqueeze(0).expand(1, -1)  # the causal term over the graph's own positions
        mask = qi.new_ones((), dtype=torch.bool) & (ids[b, ki] <= ids[b, qi]).to(q.device) & (seq[b, qi] == seq[b, ki]).to(q.device)
        return mask.expand(1, -1, n, n)

    return mask_fn


@pytest.mark.parametrize(
    "name, mask_fn, proved",
    [
        ("causal", lambda n, q: _arange(n, q)[None, :] <= _arange(n, q)[:, None], True),
        ("causal_offset_and_expand", lambda n, q: ((_arange(n, q) + 0)[None, None, None, :] <= (_arange(n, q) + 0)[None, None, :, None])
         .expand(q.shape[0], -1, n, n), True),
        ("causal_spelled_ge", lambda n, q: _arange(n, q)[:, None] >= _arange(n, q)[None, :], True),
        ("strict", lambda n, q: _arange(n, q)[None, :] < _arange(n, q)[:, None], False),
        ("transposed", lambda n, q: _arange(n, q)[:, None] <= _arange(n, q)[None, :], False),
        ("window", lambda n, q: (_arange(n, q)[None, :] <= _arange(n, q)[:, None])
         & (_arange(n, q)[None, :] > _arange(n, q)[:, None] - 3), False),
        ("shifted", lambda n, q: _arange(n, q)[None, :] <= _arange(n, q)[:, None] + 1, False),
        ("tril", lambda n, q: torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), False),  # not interpreted
        # batch size 1: the packed-sequence term over the graph's own position ids (one sequence)
        ("packed_term_one_sequence", _packed(lambda n, q: _arange(n, q) + 0), True),
        # a first difference unlike the others: the diff's rule refuses it (conservative: that mask is
        # causal still, every token in sequence 1)
        ("packed_term_first_step_2", _packed(lambda n, q: _arange(n, q) + 0, prepend=lambda first: first - 2), False),
        # every token starts a sequence (differences of 1 != 2): a diagonal mask (the cumsum's rule refuses it)
        ("packed_term_every_token_a_sequence", _packed(lambda n, q: _arange(n, q) + 0, starts=lambda diff: diff.ne(2)), False),
    ],
)
def test_dynamic_sizes_causal_mask_is_proved_for_every_size(name, mask_fn, proved):
    """With symbolic sizes the mask is interpreted symbolically (slothc.passes.symbolic_mask): the
    plain causal one gets is_causal=True for every size; others, and ops it does not interpret,
    keep the dynamic-sizes reason. Two lengths run through one graph, each equal to eager."""
    fn = _attention(mask_fn)
    q, k, v = (torch.randn(2, 3, 8, 16) for _ in range(3))
    report, graphs, out = _capture(fn, q, k, v, dynamic=True)
    torch.testing.assert_close(out, fn(q, k, v))
    assert report.count("causal_mask") == int(proved), str(report)
    if proved:
        (call,) = _sdpa_calls(graphs[0])
        assert call.kwargs["is_causal"] is True and call.kwargs["attn_mask"] is None
        # one graph for every size: other lengths run through it, each equal to eager
        report = slothc.Report()
        torch._dynamo.reset()
        try:
            compiled = torch.compile(fn, backend="slothc", options={"inner": "eager", "report": report}, dynamic=True)
            for n in (5, 8, 13):
                q2, k2, v2 = (torch.randn(2, 3, n, 16) for _ in range(3))
                torch.testing.assert_close(compiled(q2, k2, v2), fn(q2, k2, v2))
        finally:
            torch._dynamo.reset()
        assert report.graphs == 1 and report.count("causal_mask") == 1, str(report)
    else:
        assert [s.reason for s in report.skipped] == [causal_mask.DYNAMIC], str(report)


def test_a_second_length_recompiles_with_symbolic_sizes_and_stays_causal(like_517):
    """A tiny Llama trained at three sequence lengths (Dynamo's default automatic dynamic shapes):
    the first graph's mask is evaluated, the second graph (symbolic sizes, used for the second and
    third length) has its mask proved causal for every size; every loss is eager's."""
    model = _model()
    report = slothc.Report()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="slothc", options={"inner": "aot_eager", "report": report})
        for seq in (12, 20, 28):
            batch = tiny.sample_batch(model.config, seq=seq)
            del batch["attention_mask"]
            torch.testing.assert_close(compiled(**batch).loss, model(**batch).loss)
    finally:
        torch._dynamo.reset()
    assert report.graphs == 2 and [g.get("causal_mask") for g in report.per_graph()] == [2, 2], str(report)
    assert [g.get("rms_norm") for g in report.per_graph()] == [5, 5], str(report)
    assert not [s for s in report.skipped if s.fusion == "causal_mask"], str(report)


def test_batch_size_one_with_its_packed_sequence_term_is_proved_for_every_size(like_517):
    """Batch 2, then batch 1 at two lengths (the longest-sequence search's probes; batch 1 is also
    how many fine-tunes run): at batch 1 transformers ANDs its packed-sequence check into the mask.
    Its position ids are the graph's own arange, so the dynamic graph's mask is still proved causal
    (on the H200 it was not: an explicit [S, S] mask, a recompile when S * S passed 2**31, and out of
    memory at 131072 tokens); every loss is eager's."""
    model = _model()
    report = slothc.Report()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="slothc", options={"inner": "aot_eager", "report": report})
        for batch, seq in ((2, 12), (1, 20), (1, 28)):
            b = tiny.sample_batch(model.config, batch=batch, seq=seq)
            del b["attention_mask"]
            torch.testing.assert_close(compiled(**b).loss, model(**b).loss)
    finally:
        torch._dynamo.reset()
    assert report.graphs == 2 and [g.get("causal_mask") for g in report.per_graph()] == [2, 2], str(report)
    assert not [s for s in report.skipped if s.fusion == "causal_mask"], str(report)


def test_a_packed_sequence_term_over_input_position_ids_is_not_proved():
    """Padding-free packing: the position ids restart at each sequence and come in as a graph input,
    which the proof does not read, so the block-diagonal mask is kept; the output is eager's."""

    def fn(q, k, v, position_ids):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_packed(lambda n, q: position_ids[0])(q.shape[-2], q))

    q, k, v = (torch.randn(1, 3, 12, 16) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    report, graphs, out = _capture(fn, q, k, v, pos, dynamic=True)
    torch.testing.assert_close(out, fn(q, k, v, pos))
    assert report.count("causal_mask") == 0 and [s.fusion for s in report.skipped] == ["causal_mask"], str(report)
    assert all(n.kwargs.get("attn_mask") is not None for n in _sdpa_calls(graphs[0]))


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_no_padding_option_proves_the_mask_of_an_all_ones_attention_mask(like_517, inner):
    """``padding="none"``: the attention_mask input is taken as ones, the mask is the causal one, and
    the graph checks the input at run time; loss and gradients are eager's."""
    model = _model()
    batch = tiny.sample_batch(model.config, seq=12)  # attention_mask of ones, as a collator passes it
    eager = model(**batch)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    report, graphs, out = _capture(model, **batch, options={"padding": "none", "inner": inner})
    assert report.count("causal_mask") == 2 and not [s for s in report.skipped if s.fusion == "causal_mask"], str(report)
    assert all("padding='none'" in s.variant for s in report.fused["causal_mask"])
    calls = _sdpa_calls(graphs[0])
    assert len(calls) == 2 and all(n.kwargs["is_causal"] is True and n.kwargs["attn_mask"] is None for n in calls)
    assert len([n for n in graphs[0].graph.nodes if n.target is torch._assert_async]) == 1  # one check a graph
    torch.testing.assert_close(out.loss, eager.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], msg=name)


def test_no_padding_option_stops_a_padded_batch(like_517):
    """The promise is checked: a padded batch after a batch of ones raises, naming the option
    (the mask was dropped: training on would attend to the padding)."""
    model = _model()
    batch = tiny.sample_batch(model.config, seq=12)
    padded = dict(batch, attention_mask=batch["attention_mask"].clone())
    padded["attention_mask"][0, -3:] = 0
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="slothc", options={"padding": "none", "inner": "aot_eager"})
        compiled(**batch).loss.backward()  # a batch of ones trains
        with pytest.raises(RuntimeError, match="options=\\{'padding': 'none'\\}"):
            compiled(**padded)
    finally:
        torch._dynamo.reset()


def test_a_mask_built_in_another_graph_is_reported_as_such():
    """The mask is an input itself, as in a piece of a DDP-split graph or after a graph break (seen
    with torch 2.11 under DDP and FSDP2): not evaluated, and not called an attention_mask."""
    def fn(q, k, v, mask):
        return SDPA(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6)
    report, graphs, out = _capture(fn, q, k, v, mask, options={"padding": "none"})
    assert report.count("causal_mask") == 0
    assert [s.reason for s in report.skipped if s.fusion == "causal_mask"] == [causal_mask.MASK_IS_INPUT], str(report)
    torch.testing.assert_close(out, fn(q, k, v, mask))


def test_no_padding_option_leaves_other_inputs_unproved(like_517):
    """Only an input named attention_mask is taken as ones: a mask that reads another input (here the
    token ids, as a mask of the pad token would) stays, with the reason."""
    def fn(q, k, v, ids):
        mask = (ids != 0)[:, None, None, :] & torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        return SDPA(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    ids = torch.ones(2, 6, dtype=torch.long)
    report, graphs, out = _capture(fn, q, k, v, ids, options={"padding": "none"})
    assert report.count("causal_mask") == 0
    assert [s.reason for s in report.skipped if s.fusion == "causal_mask"] == [causal_mask.READS_INPUT]
    torch.testing.assert_close(out, fn(q, k, v, ids))


def test_padding_option_is_validated():
    from slothc.options import Options

    assert Options.from_dict({"padding": "none"}).padding == "none" and Options.from_dict({}).padding == "unknown"
    with pytest.raises(ValueError, match="'padding' must be one of 'unknown', 'none'"):
        Options.from_dict({"padding": False})
