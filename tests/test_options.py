"""Backend options are validated: a typo is an error that lists what is valid, never a silent no-op."""

import pytest
import torch

import slothc
from slothc.options import FUSIONS, IMPLEMENTED, Options


def test_defaults_enable_every_implemented_fusion():
    opts = Options.from_dict(None)
    assert opts.enabled == frozenset(IMPLEMENTED) and opts.inner == "inductor" and opts.report is False


def test_fusion_can_be_disabled():
    assert "rms_norm" not in Options.from_dict({"rms_norm": False}).enabled


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rmsnorm": True}, "unknown slothc option 'rmsnorm'; valid options: rms_norm"),
        ({"inner": "tvm"}, "'inner' must be one of 'inductor', 'aot_eager', 'eager'"),
        ({"report": "yes"}, "'report' must be True or False"),
        ({"rms_norm": 1}, "'rms_norm' must be True or False"),
        ({"mode": "fast"}, "'mode' must be one of 'default', 'reduce-overhead', 'max-autotune'"),
        ({"mode": "reduce-overhead", "inner": "eager"}, "mode 'reduce-overhead' is an Inductor mode and needs inner='inductor'"),
        ("rms_norm", "options must be a dict"),
    ],
)
def test_bad_options_raise_with_valid_choices(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Options.from_dict(options)


def test_every_fusion_is_implemented_and_on_by_default():
    assert set(IMPLEMENTED) == set(FUSIONS)
    assert Options().enabled == Options.from_dict({}).enabled == frozenset(FUSIONS)


def test_unimplemented_fusion_cannot_be_enabled(monkeypatch):
    # every fusion ships now; the guard stays for reserved names of later versions
    import slothc.options as options_module

    missing = "qlora_linear"
    monkeypatch.setattr(options_module, "IMPLEMENTED", tuple(f for f in FUSIONS if f != missing))
    with pytest.raises(ValueError, match="not available in this version"):
        Options.from_dict({missing: True})
    assert missing not in Options.from_dict({missing: False}).enabled


def test_bad_option_fails_at_compile_time_through_torch_compile():
    fn = torch.compile(lambda x: x + 1, backend="slothc", options={"no_such_option": True})
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown slothc option 'no_such_option'"):
        fn(torch.randn(3))
    torch._dynamo.reset()


def test_report_option_logs_at_compile_time(caplog):
    def norm(x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    torch._dynamo.reset()
    with caplog.at_level("INFO", logger="slothc"):
        torch.compile(norm, backend="slothc", options={"inner": "eager", "report": True})(torch.randn(2, 8))
    torch._dynamo.reset()
    assert any("fused rms_norm: 1 site" in r.getMessage() for r in caplog.records)


def test_explain_report_renders_sites_and_skips():
    def fn(x):
        h, g = x.float(), x.float()
        a = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        b = g * (torch.rsqrt(g.pow(2).mean(-1, keepdim=True)) + 1e-6)
        return a + b

    report = slothc.explain(fn, torch.randn(2, 8))
    text = str(report)
    assert report.count("rms_norm") == 1 and len(report.skipped) == 1
    assert "fused rms_norm: 1 site" in text and "skipped: eps added after rsqrt" in text


def _norm(x):
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def test_mode_reaches_inductor_as_its_config(monkeypatch):
    # torch.compile(..., mode=...) passes the mode to the backend, which hands Inductor that mode's
    # options (reduce-overhead: CUDA graphs) and notes it in the report.
    import slothc.backend as backend

    seen = []

    def fake_inductor(gm, example_inputs, **kwargs):
        seen.append(kwargs)
        return gm.forward

    monkeypatch.setattr(backend, "_inner", lambda name: fake_inductor)
    report = slothc.Report()
    x = torch.randn(2, 8)
    # torch.compile takes mode or options, not both: the "mode" key is the way to give both.
    cases = (("reduce-overhead", None), (None, {"mode": "reduce-overhead", "report": report}),
             (None, {"mode": "max-autotune-no-cudagraphs"}), (None, None))
    for mode, options in cases:
        torch._dynamo.reset()
        out = torch.compile(_norm, backend="slothc", mode=mode, options=options)(x)
        torch.testing.assert_close(out, _norm(x))
    torch._dynamo.reset()
    assert seen == [{"config_patches": {"triton.cudagraphs": True}}, {"config_patches": {"triton.cudagraphs": True}},
                    {"config_patches": {"max_autotune": True, "coordinate_descent_tuning": True}}, {}]
    assert report.count("rms_norm") == 1
    assert any("mode reduce-overhead" in n and "CUDA graphs" in n for n in report.notes)


def test_mode_given_twice_must_agree():
    with pytest.raises(ValueError, match="mode 'reduce-overhead' given to torch.compile and mode 'max-autotune' in the options"):
        slothc.backend.slothc(None, [], options={"mode": "max-autotune"}, mode="reduce-overhead")


def test_reduce_overhead_on_cpu_compiles_and_matches():
    # On the CPU Inductor records no CUDA graphs (it says so in its perf hints); the graph still runs fused.
    report = slothc.Report()
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    out = torch.compile(_norm, backend="slothc", options={"mode": "reduce-overhead", "report": report})(x)
    torch._dynamo.reset()
    torch.testing.assert_close(out, _norm(x))
    assert report.count("rms_norm") == 1


def test_graph_breaks_are_a_note_with_their_reason():
    """Code between two graphs runs eagerly: the report says so, and why Dynamo broke there."""

    class TwoGraphs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    torch._dynamo.reset()
    report = slothc.Report()
    torch.compile(TwoGraphs(), backend="slothc", options={"report": report, "inner": "eager"})(torch.randn(2, 8))
    torch._dynamo.reset()
    (note,) = [n for n in report.notes if "graph breaks" in n]
    assert report.graphs == 2 and note.startswith("2 graphs: Dynamo split the model at graph breaks"), report.notes
    assert "graph_break" in note  # the reason Dynamo recorded names the call
    assert "2 graphs" in str(report)


def test_a_recompile_is_a_note_of_its_own_not_a_graph_break():
    """A second input size compiles the same frame again (the dynamic-size graph): the report says
    recompile, and does not call it a graph break."""
    torch._dynamo.reset()
    report = slothc.Report()
    f = torch.compile(torch.nn.Linear(8, 8), backend="slothc", options={"report": report, "inner": "eager"})
    for n in (2, 3, 5):
        f(torch.randn(n, 8))
    torch._dynamo.reset()
    assert report.graphs == 2, str(report)
    assert not [n for n in report.notes if "graph breaks" in n], report.notes
    (note,) = [n for n in report.notes if "compiled a piece again" in n]
    assert note.startswith("1 of the 2 graphs: Dynamo compiled a piece again"), note
