"""The qlora_linear pattern: bitsandbytes' 4-bit layers (with PEFT's LoRA on top) as Dynamo captures them.

Each case builds real ``bitsandbytes.nn.Linear4bit`` layers (quantised on the CPU), wraps them with
PEFT as a 4-bit model is wrapped, captures the graph with Dynamo, runs the slothc passes and checks
the report, the rewritten graph's targets (no bitsandbytes op left, no full-precision weight
computed outside the op), and that it computes what eager does (forward and every gradient).
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F

from slothc.passes import lora_linear as lora_pass
from slothc.passes import qlora_linear as qlora_pass
from tests.passes._capture import capture, targets

bnb = pytest.importorskip("bitsandbytes")

QLORA_OP = torch.ops.slothc.qlora_linear.default
BNB_OPS = (torch.ops.bitsandbytes.gemm_4bit.default, torch.ops.bitsandbytes.dequantize_4bit.default,
           torch.ops.higher_order.autograd_function_apply)


def linear4bit(k, m, bias=False, compute=torch.bfloat16, quant_type="nf4", nested=True, blocksize=64, seed=0):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(k, m, bias=bias, compute_dtype=compute, compress_statistics=nested, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(torch.randn(m, k) * k**-0.5, requires_grad=False, blocksize=blocksize,
                                     compress_statistics=nested, quant_type=quant_type)
    if bias:
        # in the compute dtype: bitsandbytes casts another bias's .data in place on the first call,
        # which Dynamo refuses (a graph break)
        layer.bias = torch.nn.Parameter(torch.randn(m).to(compute), requires_grad=False)
    return layer.to("cpu")


class Block(torch.nn.Module):
    """q/k-like 4-bit projections of one input, then an output projection (a 4-bit model's layer)."""

    is_loaded_in_4bit = True  # transformers' flag on a 4-bit model: PEFT picks its bnb LoRA layer by it

    def __init__(self, hidden=64, **kw):
        super().__init__()
        self.q = linear4bit(hidden, hidden, seed=1, **kw)
        self.k = linear4bit(hidden, 32, seed=2, **kw)
        self.o = linear4bit(hidden + 32, hidden, seed=3, **{**kw, "blocksize": 32} if (hidden + 32) % 64 else kw)

    def forward(self, x):
        return self.o(torch.cat([self.q(x), self.k(x)], dim=-1))


def _peft(model=None, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = model or Block()
    config = dict(r=4, lora_alpha=8, target_modules=["q", "k", "o"], init_lora_weights=False)
    config.update(lora)
    model = get_peft_model(model, LoraConfig(**config))
    model.train()
    return model


def _run(model, x, options=None, autocast=None, seed=None):
    """(report, rewritten graph): the output and every trainable gradient equal eager's."""
    eager = copy.deepcopy(model)
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else (lambda: torch.autocast("cpu", enabled=False))
    if seed is not None:
        torch.manual_seed(seed)
    with ctx():
        report, graphs, out = capture(model, x, options=options)
    if seed is not None:
        torch.manual_seed(seed)
    x_eager = x.detach().clone().requires_grad_(x.requires_grad)
    with ctx():
        expected = eager(x_eager)
    _close(out, expected, "output")
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    if x.requires_grad:
        _close(x.grad, x_eager.grad, "x")
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        if p.requires_grad:
            _close(p.grad, q.grad, name)
    return report, graphs[0]


def _close(actual, expected, name):
    # bf16 compute: 2% of the largest magnitude (the kernel tests bound the error against float64)
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2 * max(scale, 1.0), msg=name)


def _short(module):
    return module.rsplit(".", 1)[-1]


def _no_bnb_left(gm):
    assert not [t for t in targets(gm) if t in BNB_OPS], gm.code
    assert torch.ops.slothc.dequantize_4bit.default not in targets(gm)  # dequantised inside the op only


def test_every_4bit_lora_linear_fused_when_x_needs_grad():
    """x needs a gradient: bitsandbytes' MatMul4Bit (an autograd function in the graph)."""
    report, gm = _run(_peft(), torch.randn(2, 5, 64, requires_grad=True))
    assert sorted(_short(m) for m in report.modules("qlora_linear")) == ["k", "o", "q"], str(report)
    variants = {_short(s.module): s.variant for s in report.fused["qlora_linear"]}
    assert variants["q"] == variants["k"] == "nf4, double-quant, blocksize 64, peft, input shared by 2"
    assert variants["o"] == "nf4, double-quant, blocksize 32, peft"
    assert targets(gm).count(QLORA_OP) == 2  # q and k read one x: one call
    _no_bnb_left(gm)
    assert not report.skipped and not report.fused.get("lora_linear"), str(report)


def test_code_book_is_made_at_compile_time(monkeypatch):
    """The op's cached code book is first made by the pass, not in the op's first run: under
    mode="reduce-overhead" that run is inside a CUDA graph's pool, where a cached tensor is a live
    allocation the graph does not own (CUDA graph trees refused the 8B step for it)."""
    import inspect

    from slothc.kernels import qlora_linear as qlora_kernels

    monkeypatch.setattr(qlora_kernels, "_CODES", {})
    callers, code_book = [], qlora_kernels.code_book

    def recorded(quant_type, device):
        callers.append(inspect.stack()[1].filename.replace("\\", "/").rsplit("/", 2)[-2])
        return code_book(quant_type, device)

    monkeypatch.setattr(qlora_kernels, "code_book", recorded)
    report, graphs, out = capture(_peft(), torch.randn(2, 5, 64, requires_grad=True))
    assert report.count("qlora_linear") == 3, str(report)
    assert callers and callers[0] == "passes", callers  # made by the pass before any op ran
    assert set(qlora_kernels._CODES) == {("nf4", "cpu")}


@pytest.mark.parametrize("k_config", [dict(blocksize=32), dict(nested=False), dict(quant_type="fp4")],
                         ids=["blocksize", "double_quant", "quant_type"])
def test_projections_of_one_input_merge_only_with_one_4bit_format(k_config):
    """q and k read one x, but one call takes one blocksize, quant type and double quantisation."""
    block = Block()
    block.k = linear4bit(64, 32, seed=2, **k_config)
    report, gm = _run(_peft(block), torch.randn(2, 5, 64, requires_grad=True))
    assert report.count("qlora_linear") == 3 and targets(gm).count(QLORA_OP) == 3, str(report)
    assert not any("input shared" in s.variant for s in report.fused["qlora_linear"]), str(report)


def test_direct_gemm_when_x_needs_no_grad():
    """A frozen input (the first layer of a model with frozen embeddings): gemm_4bit is called directly."""
    report, gm = _run(_peft(), torch.randn(3, 64))
    assert report.count("qlora_linear") == 3 and not report.skipped, str(report)
    _no_bnb_left(gm)


@pytest.mark.parametrize("quant_type, nested", [("fp4", False), ("fp4", True), ("nf4", False)])
def test_quant_types_and_plain_absmax(quant_type, nested):
    report, gm = _run(_peft(Block(quant_type=quant_type, nested=nested)), torch.randn(2, 64, requires_grad=True))
    assert report.count("qlora_linear") == 3, str(report)
    assert all(s.variant.startswith(quant_type + (", double-quant" if nested else ", blocksize")) for s in report.fused["qlora_linear"])
    _no_bnb_left(gm)


def test_bias_two_adapters_and_rslora():
    model = _peft(Block(bias=True), use_rslora=True, r=8, lora_alpha=16)
    from peft import LoraConfig

    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k", "o"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    for name, p in model.named_parameters():  # set_adapter leaves only the active adapters trainable
        p.requires_grad_("lora_" in name)
    report, gm = _run(model, torch.randn(2, 64, requires_grad=True))
    assert report.count("qlora_linear") == 3, str(report)
    assert all("peft (2 adapters)" in s.variant for s in report.fused["qlora_linear"]), str(report)
    call = next(n for n in gm.graph.nodes if n.target is QLORA_OP)  # q and k, merged (their bias casts moved before it)
    assert call.args[12] == [pytest.approx(16 / 8**0.5), pytest.approx(2.0)] * 2  # rsLoRA on the first only
    assert call.args[13] == [0, 0, 1, 1]  # two adapters a projection
    assert len(call.args[9]) == 2 and all(b is not None for b in call.args[9])  # the biases


def test_autocast():
    """Under autocast (bf16 model, bf16 compute dtype) PEFT does not cast the update."""
    x = torch.randn(2, 64).bfloat16().requires_grad_()
    report, gm = _run(_peft(), x, autocast=torch.bfloat16)
    assert report.count("qlora_linear") == 3 and not report.skipped, str(report)
    _no_bnb_left(gm)


def test_dropout_in_training():
    report, gm = _run(_peft(lora_dropout=0.25), torch.randn(2, 64, requires_grad=True), seed=7)
    assert report.count("qlora_linear") == 3, str(report)
    # a dropout input each: the calls stay apart (as in the LoRA pass)
    assert all(s.variant.endswith("peft, dropout") for s in report.fused["qlora_linear"])
    assert targets(gm).count(QLORA_OP) == 3
    assert F.dropout in targets(gm)  # torch's own dropout: eager's mask


def test_4bit_linear_without_lora():
    """A 4-bit layer PEFT does not target is fused alone (dequantised in the op, W not kept)."""
    report, gm = _run(_peft(target_modules=["q"]), torch.randn(2, 64, requires_grad=True))
    variants = sorted((_short(s.module), s.variant) for s in report.fused["qlora_linear"])
    assert variants == [("k", "nf4, double-quant, blocksize 64, no LoRA"), ("o", "nf4, double-quant, blocksize 32, no LoRA"),
                        ("q", "nf4, double-quant, blocksize 64, peft")], str(report)
    _no_bnb_left(gm)


def test_trainable_bias_is_skipped_and_computes_eagers():
    model = _peft(Block(bias=True))
    model.base_model.model.q.base_layer.bias.requires_grad_(True)
    report, gm = _run(model, torch.randn(2, 64, requires_grad=True))
    assert [(s.fusion, s.reason) for s in report.skipped] == [
        ("qlora_linear", qlora_pass.TRAINABLE_BIAS), ("lora_linear", lora_pass.BASE_4BIT)
    ], str(report)
    assert report.skipped[0].module.endswith("q.base_layer") and report.skipped[1].module.endswith(".q")
    assert sorted(_short(m) for m in report.modules("qlora_linear")) == ["k", "o"], str(report)


def test_disabled_leaves_bitsandbytes_alone():
    report, gm = _run(_peft(), torch.randn(2, 64, requires_grad=True), options={"qlora_linear": False})
    assert not report.fused.get("qlora_linear")
    assert [(s.fusion, s.reason) for s in report.skipped] == [("lora_linear", lora_pass.BASE_4BIT)] * 3, str(report)
    assert torch.ops.higher_order.autograd_function_apply in targets(gm)


def test_dequantize_then_linear_spelled_out():
    """bitsandbytes' dequantize_4bit (double-quantised absmax decoded in the graph) read by a linear."""
    layer = linear4bit(64, 48, seed=4)
    qs = layer.weight.quant_state

    def fn(x, packed, absmax8, code2, absmax2, offset):
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax8, absmax2, code2, 256, torch.float32)
        absmax = absmax + offset
        w = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, 64, "nf4", [48, 64], torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), w).to(torch.float32)

    args = (layer.weight.data, qs.absmax, qs.state2.code, qs.state2.absmax, qs.offset)
    x = torch.randn(3, 64)
    report, graphs, out = capture(fn, x, *args)
    assert [s.variant for s in report.fused["qlora_linear"]] == ["nf4, double-quant, blocksize 64, no LoRA"], str(report)
    torch.testing.assert_close(out, fn(x, *args))
    _no_bnb_left(graphs[0])


class _StraightThrough(torch.autograd.Function):
    """An autograd function around gemm_4bit whose backward is not the matmul's (a straight-through
    estimator): not bitsandbytes' MatMul4Bit, so it is not rewritten."""

    @staticmethod
    def forward(ctx, x, packed, absmax):
        return torch.ops.bitsandbytes.gemm_4bit.default(x, packed, [48, 64], absmax, 64, "nf4")

    @staticmethod
    def backward(ctx, grad):
        return grad.sum(-1, keepdim=True).expand(*grad.shape[:-1], 64), None, None


def test_other_autograd_function_is_reported_not_rewritten():
    layer = linear4bit(64, 48, nested=False, seed=5)

    def fn(x, packed, absmax):
        return _StraightThrough.apply(x, packed, absmax)

    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    report, graphs, out = capture(fn, x, layer.weight.data, layer.weight.quant_state.absmax)
    assert [s.reason for s in report.skipped if s.fusion == "qlora_linear"] == [qlora_pass.NOT_MATMUL_4BIT], str(report)
    assert not report.fused.get("qlora_linear")
    assert torch.ops.higher_order.autograd_function_apply in targets(graphs[0])


def test_direct_gemm_on_an_input_that_needs_grad_is_reported():
    layer = linear4bit(64, 48, nested=False, seed=6)

    def fn(x, packed, absmax):
        return torch.ops.bitsandbytes.gemm_4bit.default(x, packed, [48, 64], absmax, 64, "nf4")

    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    report, graphs, _ = capture(fn, x, layer.weight.data, layer.weight.quant_state.absmax)
    assert [s.reason for s in report.skipped] == [qlora_pass.DIRECT_GEMM_NEEDS_GRAD], str(report)
    assert torch.ops.bitsandbytes.gemm_4bit.default in targets(graphs[0])


def _as_torch_2_11(gm, sizes=False):
    """Rewrite a captured graph the way torch 2.11's Dynamo records MatMul4Bit: the forward body also
    returns the packed weight's view, and (inside gradient checkpointing) the outer graph reads it
    with a getitem nobody uses. ``sizes``: as in a graph with symbolic sizes (the recompile for a
    second sequence length), it also returns what MatMul4Bit keeps of them, ``A.numel()`` and
    ``A.numel() == 0``."""
    apply_hop = torch.ops.higher_order.autograd_function_apply
    changed = 0
    for node in list(gm.graph.nodes):
        if node.target is not apply_hop:
            continue
        fwd = getattr(gm, node.args[0].target)
        (out,) = [n for n in fwd.graph.nodes if n.op == "output"]
        (results, saved) = out.args[0]
        view = next(n for n in fwd.graph.nodes if n.target in ("view", torch.Tensor.view))
        extra = [view]
        if sizes:
            gemm = next(n for n in fwd.graph.nodes if n.target is torch.ops.bitsandbytes.gemm_4bit.default)
            with fwd.graph.inserting_before(gemm):
                numel = fwd.graph.call_method("numel", (gemm.args[0],))
                extra = [numel, fwd.graph.call_function(operator.eq, (numel, 0)), view]
        out.args = (((*results, *extra), saved),)
        fwd.recompile()
        with gm.graph.inserting_after(node):
            gm.graph.call_function(operator.getitem, (node, 1))
        changed += 1
    gm.recompile()
    return changed


@pytest.mark.parametrize("sizes", [False, True], ids=["static", "symbolic_sizes"])
def test_matmul4bit_as_torch_2_11_records_it(sizes):
    from slothc import passes
    from slothc.options import Options
    from slothc.report import Report

    model = _peft()
    x = torch.randn(2, 64, requires_grad=True)
    eager = copy.deepcopy(model)
    report, seen = Report(), []

    def backend(gm, example_inputs):
        seen.append(_as_torch_2_11(gm, sizes))
        passes.run(gm, Options.from_dict({"inner": "eager"}), report)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    assert seen == [3]
    assert report.count("qlora_linear") == 3 and not report.skipped, str(report)
    x_eager = x.detach().clone().requires_grad_()
    expected = eager(x_eager)
    _close(out, expected, "output")
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    _close(x.grad, x_eager.grad, "x")


def _dequant_fn(dtype, offset=True, cast=None, out_dtype=None):
    """linear(x, bitsandbytes' dequantize_4bit(...)) spelled out, as a graph may read it."""

    def fn(x, packed, absmax8, code2, absmax2, off):
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax8, absmax2, code2, 256, torch.float32)
        if offset:
            absmax = absmax + off
        w = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, 64, "nf4", [48, 64], dtype)
        y = F.linear(x.to(cast) if cast is not None else x, w)
        return y.to(out_dtype) if out_dtype is not None else y

    return fn


def _dequant_args(seed=4):
    layer = linear4bit(64, 48, seed=seed)
    qs = layer.weight.quant_state
    return (layer.weight.data, qs.absmax, qs.state2.code, qs.state2.absmax, qs.offset)


@pytest.mark.parametrize(
    "fn, x_dtype, reason",
    [
        # dequantised to fp16, then autocast's bf16 linear: two roundings the op does not reproduce
        (_dequant_fn(torch.float16), torch.float32, qlora_pass.DEQUANT_DTYPE),
        # a double-quantised absmax without its offset: not bitsandbytes' state
        (_dequant_fn(torch.bfloat16, offset=False), torch.bfloat16, qlora_pass.STATE_NOT_INPUT),
    ],
    ids=["dequant_dtype", "state_not_input"],
)
def test_dequantize_near_misses_are_reported_and_compute_eagers(fn, x_dtype, reason):
    args = _dequant_args()
    x = torch.randn(3, 64, dtype=x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report, graphs, out = capture(fn, x, *args)
        expected = fn(x, *args)
    assert [s.reason for s in report.skipped if s.fusion == "qlora_linear"] == [reason], str(report)
    assert not report.fused.get("qlora_linear")
    torch.testing.assert_close(out, expected)


def test_backward_in_another_half_dtype_is_reported():
    """A weight quantised from fp16 with a bf16 compute dtype: MatMul4Bit's backward dequantises to
    fp16 and casts to bf16 (two roundings), which the op does not reproduce."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 64).half() * 0.1, requires_grad=False, blocksize=64, compress_statistics=True,
                                     quant_type="nf4")
    layer = layer.to("cpu")
    layer.train()
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    report, graphs, out = capture(layer, x)
    assert [s.reason for s in report.skipped] == [qlora_pass.BACKWARD_DTYPE], str(report)
    assert torch.ops.higher_order.autograd_function_apply in targets(graphs[0])  # bitsandbytes' own, kept
    assert torch.ops.slothc.dequantize_4bit.default not in targets(graphs[0])
    x_eager = x.detach().clone().requires_grad_()
    expected = layer(x_eager)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_eager.grad, rtol=0, atol=0)


def test_compute_cast_then_autocast_fuses_the_linear_of_the_cast():
    """x cast to fp16, then autocast's bf16 linear: the op's x is the cast (it casts to bf16 as
    autocast does), so the result is eager's to the bit."""
    args = _dequant_args()
    fn = _dequant_fn(torch.float32, cast=torch.float16, out_dtype=torch.float32)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report, graphs, out = capture(fn, x, *args)
        expected = fn(x, *args)
    assert [s.variant for s in report.fused["qlora_linear"]] == ["nf4, double-quant, blocksize 64, no LoRA"], str(report)
    assert not report.skipped, str(report)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_cpu_inference_path_is_reported():
    """model.eval() with no grad on a CPU with AVX512-BF16: bitsandbytes repacks the weight for its
    gemv_4bit kernel in the graph; that is inference, reported and left alone."""
    model = _peft()
    model.eval()
    if not model.base_model.model.q.base_layer.support_avx512bf16_for_cpu:
        pytest.skip("bitsandbytes' CPU inference path needs AVX512-BF16")
    x = torch.randn(2, 64).bfloat16()
    expected = copy.deepcopy(model)(x)
    report, graphs, out = capture(model, x)
    skipped = sorted((_short(s.module), s.reason) for s in report.skipped if s.fusion == "qlora_linear")
    assert skipped == [("base_layer", qlora_pass.CPU_INFERENCE)] * 2, str(report)  # q and k: x needs no grad
    # o reads q's and k's LoRA outputs, which need grad: bitsandbytes' MatMul4Bit, fused
    assert report.modules("qlora_linear") == ["base_model.model.o"], str(report)
    _close(out, expected, "output")


def test_direct_gemm_under_no_grad_is_fused():
    """Inside ``torch.no_grad()`` bitsandbytes calls gemm_4bit directly even on an input that needs
    grad (a router, a scorer): no gradient flows there, so it is fused like any frozen input."""
    layer = linear4bit(64, 48, nested=False, seed=7)

    def fn(x):
        with torch.no_grad():
            y = layer(x)  # x is bf16 already: Linear4bit's cast is a no-op, the input still needs grad
        return x * y.sum()

    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    report, graphs, out = capture(fn, x)
    assert [s.variant for s in report.fused["qlora_linear"]] == ["nf4, blocksize 64, no LoRA"], str(report)
    assert not report.skipped, str(report)
    torch.testing.assert_close(out, fn(x))


class MLP4bit(torch.nn.Module):
    """A Llama MLP of 4-bit linears: down(silu(gate(x)) * up(x))."""

    is_loaded_in_4bit = True

    def __init__(self, hidden=64, inter=128):
        super().__init__()
        self.gate = linear4bit(hidden, inter, seed=1)
        self.up = linear4bit(hidden, inter, seed=2)
        self.down = linear4bit(inter, hidden, seed=3)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("targets_", [["gate", "up", "down"], ["gate", "up"]], ids=["lora_on_down", "down_without_lora"])
def test_activation_merges_with_the_4bit_down_projection(targets_):
    """act(g) * u and the 4-bit down projection (with or without LoRA) become slothc::qlora_mlp: h not kept;
    gate and up read one x: one qlora_linear call."""
    report, gm = _run(_peft(MLP4bit(), target_modules=targets_), torch.randn(2, 5, 64, requires_grad=True))
    assert [s.variant for s in report.fused["mlp"]] == ["silu + down"], str(report)
    assert targets(gm).count(torch.ops.slothc.qlora_mlp.default) == 1 and targets(gm).count(QLORA_OP) == 1, str(report)
    assert torch.ops.slothc.mlp_act.default not in targets(gm)
    _no_bnb_left(gm)


def test_4bit_down_projection_with_dropout_keeps_its_activation_apart():
    """A dropout input on the down projection (xa): slothc::qlora_mlp does not take one; the activation
    op and the QLoRA op stay two."""
    report, gm = _run(_peft(MLP4bit(), target_modules=["gate", "up", "down"], lora_dropout=0.5), torch.randn(2, 5, 64, requires_grad=True),
                      seed=3)
    assert [s.variant for s in report.fused["mlp"]] == ["silu"], str(report)
    assert torch.ops.slothc.mlp_act.default in targets(gm) and torch.ops.slothc.qlora_mlp.default not in targets(gm)
