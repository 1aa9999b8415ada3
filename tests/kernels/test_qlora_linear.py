"""slothc::dequantize_4bit and slothc::qlora_linear against bitsandbytes (and PEFT's 4-bit LoRA layer).

The dequantisation must be *bit-exact*: every property compares the op (the Triton kernel on CUDA
and in the interpreter, the torch reference otherwise) with bitsandbytes' own ``dequantize_4bit``
with ``torch.equal``, over shapes, blocksizes, NF4/FP4, double-quantised absmax on and off, and the
three output dtypes. On the CPU bitsandbytes' native kernel is only right when a row is a whole
number of blocks (it scales a block that crosses a row with a neighbour's absmax: [48, 96] with
blocksize 64 is wrong); other shapes are compared with bitsandbytes' torch implementation of the
same formula (``backends.default.ops._dequantize_4bit_compute``), which is right for all.

The QLoRA op is compared with the eager path: bitsandbytes' ``Linear4bit`` (its real forward and
``MatMul4Bit`` backward) plus PEFT's ``lora.bnb.Linear4bit`` math, and with float64 on the exactly
dequantised weight, forward and the gradients of x and every adapter.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from slothc import testing
from slothc.kernels import _launch
from slothc.kernels import qlora_linear as qmod
import slothc.kernels.mlp  # noqa: F401  (registers slothc::qlora_mlp)

bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
BLOCKSIZES = (64, 128, 256)


@contextlib.contextmanager
def bitsandbytes_training_path():
    """Make bitsandbytes' CUDA ``gemm_4bit`` take the path it takes at training sizes (more than
    1536 rows): dequantise W to the compute dtype, then ``F.linear``. That is the formula the op
    reproduces; below that size bitsandbytes runs its own 4-bit GEMM/GEMV kernel, which multiplies
    the exact fp32 codes (no bf16 W) and so is off from the dequantised formula by up to W's
    rounding: the small shapes of the tests would compare two formulas. No-op on the CPU."""
    if DEVICE.type != "cuda":
        yield
        return
    import bitsandbytes.backends.cuda.ops as cuda_ops

    saved = cuda_ops._gemm_4bit_custom_max_m
    cuda_ops._gemm_4bit_custom_max_m = 0
    try:
        yield
    finally:
        cuda_ops._gemm_4bit_custom_max_m = saved


@pytest.fixture(scope="module", autouse=True)
def _training_path():
    with bitsandbytes_training_path():
        yield


def quantize(w, blocksize, quant_type, nested):
    """bitsandbytes' quantisation of ``w``: (packed, QuantState)."""
    return BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def state_args(packed, qs):
    """The op's quantisation arguments, read off a QuantState as bitsandbytes' gemm_4bit reads them."""
    return qmod.state_tensors(packed, qs)


def bnb_torch_dequantize(packed, qs, dtype):
    """bitsandbytes' torch implementation (right for every shape)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    code = BF.get_4bit_type(qs.quant_type, device=packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, qs.blocksize, qs.shape, torch.float32).to(dtype)


def bnb_native_is_exact(shape, blocksize) -> bool:
    return DEVICE.type == "cuda" or shape[1] % blocksize == 0


def test_code_books_are_bitsandbytes():
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(qmod.code_book(quant_type, torch.device("cpu")), BF.get_4bit_type(quant_type, device="cpu"))


@st.composite
def dequant_cases(draw):
    scale = testing.size_scale()
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    rows = draw(st.integers(1, min(scale.max_rows * 16, 300)))
    # whole blocks a row (every real model), or any width
    cols = draw(st.one_of(st.integers(1, 4).map(lambda b: b * blocksize), st.integers(1, min(scale.max_cols, 300))))
    return dict(shape=(rows, cols), blocksize=blocksize, quant_type=draw(st.sampled_from(["nf4", "fp4"])),
                nested=draw(st.booleans()), dtype=draw(testing.dtypes()), seed=draw(testing.seeds()),
                scale=draw(st.sampled_from([1e-3, 0.05, 1.0, 300.0])))


def _dequant_case(case):
    w = testing.make_tensor(case["shape"], torch.float32, case["seed"], device=DEVICE, scale=case["scale"])
    packed, qs = quantize(w, case["blocksize"], case["quant_type"], case["nested"])
    out = torch.ops.slothc.dequantize_4bit(*state_args(packed, qs), list(case["shape"]), case["blocksize"], case["quant_type"],
                                           case["dtype"], 256)
    return packed, qs, out


@given(case=dequant_cases())
def test_dequantize_is_bit_exact_with_bitsandbytes(case):
    packed, qs, out = _dequant_case(case)
    assert out.dtype == case["dtype"] and tuple(out.shape) == case["shape"]
    assert torch.equal(out, bnb_torch_dequantize(packed, qs, case["dtype"]))
    if bnb_native_is_exact(case["shape"], case["blocksize"]):
        assert torch.equal(out, bnb_native(packed, qs).to(torch.float32).to(case["dtype"]))
        if case["dtype"] != torch.float32:  # bitsandbytes dequantising straight to the dtype
            assert torch.equal(out, bnb_native(packed, qs, quant_type=case["quant_type"]).to(case["dtype"]))


def bnb_native(packed, qs, **kwargs):
    """bitsandbytes' own ``dequantize_4bit``. Its CUDA path takes packed codes of one row
    (``packed.shape[0] == 1``) for a transposed input and returns the weight transposed: a weight
    of one or two values (one byte) comes back as [2, 1] for (1, 2) (found on the H200 with 40
    examples, 2026-12-03); transposed back here."""
    out = BF.dequantize_4bit(packed, qs, **kwargs)
    return out.t() if packed.shape[0] == 1 and tuple(out.shape) != tuple(qs.shape) else out


@given(case=dequant_cases())
def test_kernel_and_reference_agree_bit_for_bit(case):
    packed, qs, out = _dequant_case(case)
    ref = qmod.dequantize_4bit_reference(*state_args(packed, qs), case["shape"], case["blocksize"], case["quant_type"],
                                         case["dtype"])
    assert torch.equal(out, ref)


@st.composite
def group_dequant_cases(draw):
    """Up to five weights of one in_features (more than the kernel's three a launch: two launches
    into one buffer), odd row counts and widths included."""
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    cols = draw(st.one_of(st.integers(1, 3).map(lambda b: b * blocksize), st.integers(1, 150)))
    rows = draw(st.lists(st.integers(1, 90), min_size=1, max_size=5))
    return dict(rows=rows, cols=cols, blocksize=blocksize, quant_type=draw(st.sampled_from(["nf4", "fp4"])),
                nested=draw(st.booleans()), dtype=draw(testing.dtypes()), seed=draw(testing.seeds()))


@given(case=group_dequant_cases())
def test_weights_of_one_call_dequantise_together_bit_exactly(case):
    """:func:`dequantize_weights` (the QLoRA op's path): every weight equals bitsandbytes' own, the
    Triton kernel's weights are row blocks of one buffer, and it launches once a three weights."""
    states, shapes, expected = [], [], []
    for i, m in enumerate(case["rows"]):
        w = testing.make_tensor((m, case["cols"]), torch.float32, case["seed"] + i, device=DEVICE)
        packed, qs = quantize(w, case["blocksize"], case["quant_type"], case["nested"])
        states.append(state_args(packed, qs))
        shapes.append((m, case["cols"]))
        expected.append(bnb_torch_dequantize(packed, qs, case["dtype"]))
    with pytest.MonkeyPatch.context() as patch:
        launches = count_launches(patch)
        outs = qmod.dequantize_weights(states, shapes, case["blocksize"], case["quant_type"], case["dtype"])
    for out, ref in zip(outs, expected):
        assert out.dtype == case["dtype"] and torch.equal(out, ref)
    if _launch.use_triton(states[0][0]):
        n = len(shapes)
        assert launches == [3] * (n // 3) + ([n % 3] if n % 3 else [])
        base = outs[0].untyped_storage().data_ptr()
        assert all(o.untyped_storage().data_ptr() == base for o in outs)
    else:
        assert launches == []


def test_weights_of_one_call_need_one_in_features():
    w = [testing.make_tensor(shape, torch.float32, 0, device=DEVICE) for shape in ((8, 64), (8, 128))]
    states = [state_args(*quantize(x, 64, "nf4", True)) for x in w]
    with pytest.raises(ValueError, match="one in_features"):
        qmod.dequantize_4bit_group_launch(states, [(8, 64), (8, 128)], 64, "nf4", torch.bfloat16)


@given(
    rows=st.integers(1, 40), cols=st.integers(1, 70), blocksize=st.sampled_from(BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]), nested=st.booleans(), dtype=testing.dtypes(), seed=testing.seeds(),
)
def test_arbitrary_bytes_and_scales(rows, cols, blocksize, quant_type, nested, dtype, seed):
    """Any bytes, any scales (not only what quantisation produces): still bitsandbytes' formula."""
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, (-(-n // 2), 1), generator=g, dtype=torch.uint8)
    if nested:
        a8 = torch.randint(0, 256, (n_blocks,), generator=g, dtype=torch.uint8)
        code2 = torch.randn(256, generator=g)
        absmax = torch.rand(-(-n_blocks // 256), generator=g) * 10
        offset = torch.randn((), generator=g)
        scales = (code2[a8.long()] * absmax.repeat_interleave(256)[:n_blocks]) + offset
        args = (packed, absmax, a8, code2, offset)
    else:
        scales = torch.randn(n_blocks, generator=g) * 3
        args = (packed, scales, None, None, None)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    expected = _dequantize_4bit_compute(packed.reshape(-1), scales, BF.get_4bit_type(quant_type, device="cpu"), blocksize,
                                        (rows, cols), torch.float32).to(dtype)
    out = torch.ops.slothc.dequantize_4bit(*[a.to(DEVICE) if a is not None else None for a in args], [rows, cols], blocksize,
                                           quant_type, dtype, 256)
    assert torch.equal(out.cpu(), expected)


def test_nested_scale_is_rounded_before_the_offset():
    """code2[q] * absmax + offset with the product rounded first (no fused multiply-add), as bitsandbytes."""
    packed = torch.full((32, 1), 0xFF, dtype=torch.uint8, device=DEVICE)  # code 15: 1.0 in NF4
    code2 = torch.zeros(256, device=DEVICE)
    code2[0] = 1.0 + 2.0**-23  # the product's low bits matter
    absmax = torch.tensor([1.0 + 2.0**-22], device=DEVICE)
    offset = torch.tensor(-1.0, device=DEVICE)
    a8 = torch.zeros(1, dtype=torch.uint8, device=DEVICE)
    out = torch.ops.slothc.dequantize_4bit(packed, absmax, a8, code2, offset, [8, 8], 64, "nf4", torch.float32, 256)
    expected = (code2[0] * absmax[0]) + offset  # two roundings
    assert torch.equal(out, expected.expand(8, 8))


# -- the QLoRA op ------------------------------------------------------------------------------------

# How QLoRA runs hold their dtypes (compute dtype of the 4-bit layer, x, adapters, autocast):
#   "bf16_model":          x bf16, compute bf16, fp32 adapters (PEFT's default), no autocast
#   "bf16_model_adapters": x, compute and adapters in the half dtype, no autocast
#   "fp32_model":          x fp32, compute in the half dtype, fp32 adapters, no autocast
#   "autocast":            x and compute in the half dtype, fp32 adapters, under autocast (HF Trainer bf16=True)
SETUPS = ("bf16_model", "bf16_model_adapters", "fp32_model", "autocast")


def _setup_dtypes(setup, half):
    """(x dtype, compute dtype, adapter dtype, autocast dtype or None)."""
    return {
        "bf16_model": (half, half, torch.float32, None),
        "bf16_model_adapters": (half, half, half, None),
        "fp32_model": (torch.float32, half, torch.float32, None),
        "autocast": (half, half, torch.float32, half),
    }[setup]


def _op_dtypes(setup, half):
    """(base, lora, out): what the pass reads off the graph for the set-up."""
    x_dtype, compute, adapters, autocast = _setup_dtypes(setup, half)
    lora = autocast or adapters
    return compute, lora, x_dtype


def _autocast(dtype):
    return torch.autocast(DEVICE.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def make_layer(m, k, bias, compute, blocksize, quant_type, nested, seed, w_scale=None):
    """A real bitsandbytes ``Linear4bit`` with random (quantised) weights."""
    w = testing.make_tensor((m, k), torch.float32, seed, scale=w_scale or k**-0.5)
    layer = bnb.nn.Linear4bit(k, m, bias=bias, compute_dtype=compute, compress_statistics=nested, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    if bias:
        layer.bias = torch.nn.Parameter(testing.make_tensor((m,), torch.float32, seed + 1), requires_grad=False)
    layer = layer.to(DEVICE)
    layer.train()
    return layer


def layer_args(layer):
    qs = layer.weight.quant_state
    return (*state_args(layer.weight.data, qs), list(qs.shape), qs.blocksize, qs.quant_type)


def op_args(layers):
    """The op's 4-bit arguments for these layers (one projection each): packed, ..., nested_blocksize."""
    return qmod.op_state([(layer.weight.data, layer.weight.quant_state) for layer in layers])


def call_op(x, layers, biases, lora_a, lora_b, scaling, proj, base, lora, out, xa=None):
    *state, nested_blocksize = op_args(layers)
    return torch.ops.slothc.qlora_linear(x, *state, list(biases), list(lora_a), list(lora_b), list(scaling), list(proj), base, lora,
                                         out, xa, nested_blocksize)


def peft_qlora(layer, x, adapters):
    """``peft.tuners.lora.bnb.Linear4bit.forward``: the real 4-bit layer, ``.clone()``, then per adapter
    ``x.to(A.dtype)``, ``lora_B(lora_A(x)) * scaling``, cast to the result's dtype unless autocast."""
    result = layer(x).clone()
    for lora_a, lora_b, scaling in adapters:
        requires_conversion = not torch.is_autocast_enabled(x.device.type)
        xa = x.to(lora_a.dtype) if x.dtype != lora_a.dtype else x
        output = F.linear(F.linear(xa, lora_a), lora_b) * scaling
        if requires_conversion:
            output = output.to(result.dtype)
        result = result + output
    return result


@st.composite
def qlora_cases(draw):
    scale = testing.size_scale()
    blocksize = draw(st.sampled_from((64, 128)))
    k = blocksize * draw(st.integers(1, 3))
    m = draw(st.integers(1, min(scale.max_cols, 200)))
    setup = draw(st.sampled_from(SETUPS))
    half = draw(st.sampled_from((torch.bfloat16, torch.float16)))
    if DEVICE.type == "cpu" and setup == "autocast":
        half = torch.bfloat16  # CPU autocast is bf16 only
    n_adapters = draw(st.integers(0, 2))
    adapters = []
    for _ in range(n_adapters):
        r = draw(st.integers(1, 32))
        alpha = draw(st.sampled_from([1, 8, 16, 32]))
        adapters.append((r, draw(st.sampled_from([alpha / r, alpha / math.sqrt(r)]))))
    need_dx = draw(st.booleans())
    rows = draw(st.integers(1, min(scale.max_rows * 8, 512)))
    return dict(setup=setup, half=half, k=k, m=m, blocksize=blocksize, quant_type=draw(st.sampled_from(["nf4", "fp4"])),
                nested=draw(st.booleans()), bias=draw(st.booleans()), adapters=adapters,
                lead=draw(st.sampled_from([(rows,), (1, rows), (2, -(-rows // 2))])), need_dx=need_dx,
                seed=draw(testing.seeds()))


def _qlora_make(case):
    x_dtype, compute, a_dtype, _ = _setup_dtypes(case["setup"], case["half"])
    layer = make_layer(case["m"], case["k"], case["bias"], compute, case["blocksize"], case["quant_type"], case["nested"], case["seed"])
    x = testing.make_tensor((*case["lead"], case["k"]), x_dtype, case["seed"] + 2, device=DEVICE, requires_grad=case["need_dx"])
    lora_a, lora_b = [], []
    for i, (r, s) in enumerate(case["adapters"]):
        lora_a.append(testing.make_tensor((r, case["k"]), a_dtype, case["seed"] + 10 + i, device=DEVICE, scale=case["k"] ** -0.5,
                                          requires_grad=True))
        lora_b.append(testing.make_tensor((case["m"], r), a_dtype, case["seed"] + 20 + i, device=DEVICE,
                                          scale=r**-0.5 / max(1.0, s), requires_grad=True))
    return layer, x, lora_a, lora_b


def _qlora_fns(case, layer):
    n = len(case["adapters"])
    scaling = [s for _, s in case["adapters"]]
    base, lora, out = _op_dtypes(case["setup"], case["half"])
    autocast = _setup_dtypes(case["setup"], case["half"])[3]
    q = layer_args(layer)
    compute = layer.compute_dtype
    bias = layer.bias.to(compute) if layer.bias is not None else None
    w64 = qmod.dequantize_4bit_reference(*q[:5], q[5], q[6], q[7], torch.float32).double()

    def fused(x, *params):
        with _autocast(autocast):  # the op must not be recast by an ambient autocast
            return call_op(x, [layer], [bias], params[:n], params[n:], scaling, [0] * n, base, lora, out)[0]

    def eager(x, *params):
        with _autocast(autocast):
            return peft_qlora(layer, x, list(zip(params[:n], params[n:], scaling)))

    def ref(x, *params):  # float64 on the exactly dequantised weight
        y = F.linear(x, w64, layer.bias.double() if layer.bias is not None else None)
        for a, b, s in zip(params[:n], params[n:], scaling):
            y = y + F.linear(F.linear(x, a), b) * s
        return y

    return fused, eager, ref


@given(case=qlora_cases())
def test_qlora_linear_matches_bitsandbytes_and_peft(case):
    layer, x, lora_a, lora_b = _qlora_make(case)
    fused, eager, ref = _qlora_fns(case, layer)
    testing.check_against_eager(fused, eager, x, *lora_a, *lora_b, ref_fn=ref, seed=case["seed"])


@given(case=qlora_cases())
def test_output_and_gradient_dtypes_are_eagers(case):
    layer, x, lora_a, lora_b = _qlora_make(case)
    fused, eager, _ = _qlora_fns(case, layer)
    f, e = fused(x, *lora_a, *lora_b), eager(x, *lora_a, *lora_b)
    assert f.dtype == e.dtype and f.shape == e.shape
    params = [p for p in (x, *lora_a, *lora_b) if p.requires_grad]
    if params:
        grads = torch.autograd.grad(f.float().sum(), params)
        assert [g.dtype for g in grads] == [p.dtype for p in params]


@st.composite
def group_cases(draw):
    """Several projections of one input in one call (q/k/v, gate/up): each its own 4-bit weight,
    bias and 0-2 adapters; some outputs unused (no gradient reaches them)."""
    base = draw(qlora_cases())
    n_proj = draw(st.integers(2, 3))
    ms = [draw(st.integers(1, 96)) for _ in range(n_proj)]
    adapters = [[(draw(st.integers(1, 16)), draw(st.sampled_from([0.5, 2.0, 16 / math.sqrt(8)]))) for _ in range(draw(st.integers(0, 2)))]
                for _ in range(n_proj)]
    used = draw(st.lists(st.booleans(), min_size=n_proj, max_size=n_proj).filter(any))
    biases = [draw(st.booleans()) for _ in range(n_proj)]
    return dict(base, ms=ms, group_adapters=adapters, used=used, biases=biases)


def _group_make(case):
    x_dtype, compute, a_dtype, autocast = _setup_dtypes(case["setup"], case["half"])
    layers = [make_layer(m, case["k"], bias, compute, case["blocksize"], case["quant_type"], case["nested"], case["seed"] + 100 * p)
              for p, (m, bias) in enumerate(zip(case["ms"], case["biases"]))]
    x = testing.make_tensor((*case["lead"], case["k"]), x_dtype, case["seed"] + 2, device=DEVICE, requires_grad=case["need_dx"])
    params, proj, scaling = [], [], []
    for p, adapters in enumerate(case["group_adapters"]):
        trained = case["used"][p]  # an unused output's adapters get zeros from the op, None from eager: not compared
        for i, (r, s) in enumerate(adapters):
            a = testing.make_tensor((r, case["k"]), a_dtype, case["seed"] + 10 * p + i, device=DEVICE, scale=case["k"] ** -0.5,
                                    requires_grad=trained)
            b = testing.make_tensor((case["ms"][p], r), a_dtype, case["seed"] + 10 * p + i + 5, device=DEVICE, scale=r**-0.5 / max(1.0, s),
                                    requires_grad=trained)
            params.append((a, b))
            proj.append(p)
            scaling.append(s)
    return layers, x, params, proj, scaling


@given(case=group_cases())
def test_projections_sharing_an_input_match_each_layer_alone(case):
    """One call for P projections equals P PEFT 4-bit layers on the same x, forward and every
    gradient (unused outputs: their projections get no gradient)."""
    layers, x, params, proj, scaling = _group_make(case)
    base, lora, out = _op_dtypes(case["setup"], case["half"])
    autocast = _setup_dtypes(case["setup"], case["half"])[3]
    biases = [layer.bias.to(layer.compute_dtype) if layer.bias is not None else None for layer in layers]
    n = len(params)
    used = [p for p, u in enumerate(case["used"]) if u]

    def fused(x, *ab):
        with _autocast(autocast):
            outs = call_op(x, layers, biases, ab[:n], ab[n:], scaling, proj, base, lora, out)
        assert len(outs) == len(layers) + 1
        return [outs[p] for p in used]

    def eager(x, *ab):
        with _autocast(autocast):
            return [peft_qlora(layers[p], x, [(ab[i], ab[n + i], scaling[i]) for i in range(n) if proj[i] == p]) for p in used]

    w64 = [qmod.dequantize_4bit_reference(*layer_args(layer), torch.float32).double() for layer in layers]

    def ref(x, *ab):
        outs = []
        for p in used:
            y = F.linear(x, w64[p], layers[p].bias.double() if layers[p].bias is not None else None)
            for i in range(n):
                if proj[i] == p:
                    y = y + F.linear(F.linear(x, ab[i]), ab[n + i]) * scaling[i]
            outs.append(y)
        return outs

    a_list, b_list = [a for a, _ in params], [b for _, b in params]
    testing.check_against_eager(fused, eager, x, *a_list, *b_list, ref_fn=ref, seed=case["seed"])


def test_group_dequantises_each_weight_once_a_pass(monkeypatch):
    """Three projections: all three dequantised together forward, again backward (for dX), none saved;
    with the Triton kernel, in one launch each time."""
    case = dict(_simple(), ms=[40, 24, 24], group_adapters=[[(4, 2.0)], [(4, 2.0)], []], used=[True] * 3, biases=[True, False, False])
    layers, x, params, proj, scaling = _group_make(case)
    calls = []
    original = qmod.dequantize_weights
    monkeypatch.setattr(qmod, "dequantize_weights", lambda *a, **k: calls.append([tuple(s) for s in a[1]]) or original(*a, **k))
    launches = count_launches(monkeypatch)
    biases = [layers[0].bias.to(torch.bfloat16), None, None]
    outs = call_op(x, layers, biases, [a for a, _ in params], [b for _, b in params], scaling, proj, *(torch.bfloat16,) * 3)
    assert calls == [[(40, 128), (24, 128), (24, 128)]]
    assert launches == ([3] if _launch.use_triton(x) else [])
    sum(o.float().sum() for o in outs[:3]).backward()
    assert calls == [[(40, 128), (24, 128), (24, 128)]] * 2
    assert launches == ([3, 3] if _launch.use_triton(x) else [])
    assert all(a.grad is not None for a, _ in params) and x.grad is not None


def count_launches(monkeypatch) -> list:
    """The Triton kernel's launches, each as the number of weights it dequantised (PARTS)."""
    launches = []
    kernel = qmod._dequantize_4bit_kernel

    class Counting:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs["PARTS"])
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(qmod, "_dequantize_4bit_kernel", Counting())
    return launches


def _simple(setup="bf16_model", adapters=((4, 2.0),), need_dx=True, nested=True, bias=True, quant_type="nf4", m=40, k=128,
            lead=(2, 3)):
    return dict(setup=setup, half=torch.bfloat16, k=k, m=m, blocksize=64, quant_type=quant_type, nested=nested, bias=bias,
                adapters=list(adapters), lead=lead, need_dx=need_dx, seed=3)


def test_one_token_and_rank_64():
    case = _simple(adapters=[(64, 0.25)], lead=(1,), k=192, m=65)
    layer, x, lora_a, lora_b = _qlora_make(case)
    fused, eager, ref = _qlora_fns(case, layer)
    testing.check_against_eager(fused, eager, x, *lora_a, *lora_b, ref_fn=ref)


def test_backward_dequantises_again_and_saves_no_weight(monkeypatch):
    """The forward dequantises once, the backward once more (only for dX); nothing of W's size is saved."""
    case = _simple(need_dx=True)
    layer, x, lora_a, lora_b = _qlora_make(case)
    fused, _, _ = _qlora_fns(case, layer)
    calls = []
    original = qmod.dequantize_weights
    monkeypatch.setattr(qmod, "dequantize_weights", lambda *a, **k: calls.append(a[4]) or original(*a, **k))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fused(x, *lora_a, *lora_b)
    assert calls == [torch.bfloat16]
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= case["m"] * case["k"]], [t.shape for t in saved]
    y.float().sum().backward()
    assert calls == [torch.bfloat16, torch.bfloat16]
    calls.clear()
    case = _simple(need_dx=False)
    layer, x, lora_a, lora_b = _qlora_make(case)
    fused, _, _ = _qlora_fns(case, layer)
    fused(x, *lora_a, *lora_b).float().sum().backward()
    assert calls == [torch.bfloat16]  # x needs no grad: no second dequantisation
    assert all(p.grad is not None for p in (*lora_a, *lora_b))


def _opcheck_args(setup="bf16_model", n_adapters=2, nested=True, bias=True):
    case = _simple(setup=setup, adapters=[(4, 2.0), (3, 0.5)][:n_adapters], nested=nested, bias=bias)
    layer, x, lora_a, lora_b = _qlora_make(case)
    base, lora, out = _op_dtypes(setup, torch.bfloat16)
    b = layer.bias.to(layer.compute_dtype) if layer.bias is not None else None
    *state, nested_blocksize = op_args([layer])
    return layer, (x, *state, [b], lora_a, lora_b, [2.0, 0.5][:n_adapters], [0] * n_adapters, base, lora, out, None, nested_blocksize)


@pytest.mark.parametrize("setup", ["bf16_model", "bf16_model_adapters", "fp32_model"])
@pytest.mark.parametrize("n_adapters, nested, bias", [(2, True, True), (1, False, False), (0, True, False)])
def test_opcheck(setup, n_adapters, nested, bias):
    _, args = _opcheck_args(setup, n_adapters, nested, bias)
    torch.library.opcheck(torch.ops.slothc.qlora_linear.default, args)
    xa = (args[0] * 2.0).detach().requires_grad_()  # a separate adapters' input (dropout)
    if n_adapters:
        torch.library.opcheck(torch.ops.slothc.qlora_linear.default, (*args[:17], xa, args[18]))


def test_opcheck_dequantize_and_backward_op():
    layer, args = _opcheck_args()
    q = layer_args(layer)
    for dtype in FLOATS:
        torch.library.opcheck(torch.ops.slothc.dequantize_4bit.default, (*q, dtype, 256))
    x, *_ = args
    y, t = torch.ops.slothc.qlora_linear(*args)
    grad = torch.randn_like(y)
    lora_a, lora_b = [a.detach() for a in args[10]], [b.detach() for b in args[11]]
    for need_dx, split, need_dxa in ((True, False, False), (False, False, False), (True, True, True)):
        torch.library.opcheck(
            torch.ops.slothc.qlora_linear_backward.default,
            ([grad], x.detach(), t.detach(), *args[1:9], lora_a, lora_b, *args[12:17], need_dx, split, need_dxa, x.dtype, args[18]),
        )


@pytest.mark.parametrize(
    "index, value, message",
    [
        (1, [torch.zeros(7, dtype=torch.uint8)], "packed codes must be uint8 with ceil"),
        (2, [torch.zeros(3)], "double-quantised absmax needs"),
        (3, [], "given together .* or not at all"),
        (8, "int4", "quant_type 'int4'"),
        (7, 63, "blocksize 63"),
        (6, [40, 64], "packed codes must be uint8"),
        (6, [40, 128, 1], "shapes has 3 ints for 1 projections"),
        (13, [0, 1], "adapter 1 belongs to projection 1, but there are 1"),
        (9, [None, None], "2 biases for 1 projections"),
    ],
    ids=["packed_size", "absmax_size", "partial_nested_state", "quant_type", "odd_blocksize", "shape", "shapes_length",
         "adapter_projection", "biases"],
)
def test_bad_input_names_what_to_change(index, value, message):
    _, args = _opcheck_args()
    args = list(args)
    args[index] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    with pytest.raises(ValueError, match=message):
        torch.ops.slothc.qlora_linear(*args)


def test_eager_function_is_peft():
    """peft_qlora (the eager side of the properties) is PEFT's own lora.bnb.Linear4bit, run through peft."""
    from peft import LoraConfig, get_peft_model

    layer = make_layer(24, 128, True, torch.bfloat16, 64, "nf4", True, seed=5)
    holder = torch.nn.Sequential(layer)
    holder.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; PEFT picks its bnb layer by it
    model = get_peft_model(holder, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    wrapped = model.base_model.model[0]
    assert type(wrapped).__module__.startswith("peft.tuners.lora.bnb")
    x = torch.randn(5, 128, device=DEVICE, dtype=torch.bfloat16)
    a, b = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
    expected = peft_qlora(wrapped.base_layer, x, [(a, b, wrapped.scaling["default"])])
    assert torch.equal(wrapped(x), expected)


def test_reference_dequantisation_on_cpu_without_the_interpreter(monkeypatch):
    """The CPU implementation (the torch reference) is bit-exact too, not only the kernel."""
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    w = torch.randn(48, 96) * 0.1
    packed, qs = quantize(w, 64, "fp4", True)
    out = torch.ops.slothc.dequantize_4bit(*state_args(packed, qs), [48, 96], 64, "fp4", torch.bfloat16, 256)
    assert torch.equal(out, bnb_torch_dequantize(packed, qs, torch.bfloat16))


def test_public_wrappers_read_a_params4bit():
    """slothc.ops.dequantize_4bit / qlora_linear take the bitsandbytes weight itself."""
    from slothc import ops

    layer = make_layer(40, 128, False, torch.bfloat16, 64, "fp4", True, seed=9)
    qs = layer.weight.quant_state
    assert torch.equal(ops.dequantize_4bit(layer.weight, torch.bfloat16), bnb_torch_dequantize(layer.weight.data, qs, torch.bfloat16))
    x = torch.randn(3, 128, device=DEVICE, dtype=torch.bfloat16)
    a = torch.randn(4, 128, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(40, 4, device=DEVICE, dtype=torch.bfloat16)
    expected = call_op(x, [layer], [None], [a], [b], [0.5], [0], *(torch.bfloat16,) * 3)[0]
    assert torch.equal(ops.qlora_linear(x, layer.weight, [a], [b], [0.5]), expected)
    with pytest.raises(ValueError, match="expected a bitsandbytes 4-bit weight"):
        ops.qlora_linear(x, torch.randn(40, 128), [a], [b], [0.5])


# -- slothc::qlora_mlp: act(g) * u into a 4-bit down projection --------------------------------------


@st.composite
def qlora_mlp_cases(draw):
    case = draw(qlora_cases())
    return dict(case, act=draw(st.sampled_from(["silu", "gelu_tanh", "gelu", "relu2"])))


def _qlora_mlp_make(case):
    """(down layer, g, u, lora_a, lora_b): g and u as the gate/up projections give them (x's dtype,
    or the autocast dtype), the down layer reads the intermediate (k) and writes the hidden size (m)."""
    layer, x, lora_a, lora_b = _qlora_make(dict(case, need_dx=False))
    out = _op_dtypes(case["setup"], case["half"])[2]
    autocast = _setup_dtypes(case["setup"], case["half"])[3]
    dtype = autocast or out
    g = testing.make_tensor((*case["lead"], case["k"]), dtype, case["seed"] + 3, device=DEVICE, requires_grad=True)
    u = testing.make_tensor((*case["lead"], case["k"]), dtype, case["seed"] + 4, device=DEVICE, requires_grad=True)
    return layer, g, u, lora_a, lora_b


def _qlora_mlp_fns(case, layer):
    from slothc.derive import eager_activation

    n = len(case["adapters"])
    scaling = [s for _, s in case["adapters"]]
    base, lora, out = _op_dtypes(case["setup"], case["half"])
    autocast = _setup_dtypes(case["setup"], case["half"])[3]
    bias = layer.bias.to(layer.compute_dtype) if layer.bias is not None else None
    w64 = qmod.dequantize_4bit_reference(*layer_args(layer), torch.float32).double()
    act = eager_activation(case["act"])
    *state, nested_blocksize = op_args([layer])
    # The 4-bit layer returns its input's dtype: that of act(g) * u, which CUDA autocast runs in fp32
    # for relu2 (its square is a pow); the pass reads it off the graph (where, for that case, the
    # matcher keeps the unfused MLP: mlp_act would change the dtype).
    with _autocast(autocast):
        probe = torch.ones(1, device=DEVICE, dtype=autocast or out)
        out = (act(probe) * probe).dtype

    def fused(g, u, *params):
        with _autocast(autocast):
            return torch.ops.slothc.qlora_mlp(g, u, case["act"], *state, bias, list(params[:n]), list(params[n:]), scaling, base, lora,
                                              out, nested_blocksize)[0]

    def eager(g, u, *params):
        with _autocast(autocast):
            return peft_qlora(layer, act(g) * u, list(zip(params[:n], params[n:], scaling)))

    def parts(g, u, *params):
        """The base GEMM's result and each adapter's term: rounded to the output's dtype one by one
        before they are added, in PEFT's layer and the op alike."""
        h = act(g) * u
        base_part = F.linear(testing.rounded(h, base), w64, layer.bias.double() if layer.bias is not None else None)
        return [[base_part] + [F.linear(F.linear(h, a), b) * s for a, b, s in zip(params[:n], params[n:], scaling)]]

    def ref(g, u, *params):
        # the 4-bit GEMM reads h stored in the compute dtype, in the op and in eager alike
        return sum(parts(g, u, *params)[0])

    return fused, eager, ref, parts


@given(case=qlora_mlp_cases())
def test_qlora_mlp_matches_activation_then_peft_4bit_layer(case):
    layer, g, u, lora_a, lora_b = _qlora_mlp_make(case)
    fused, eager, ref, parts = _qlora_mlp_fns(case, layer)
    # parts_fn: a one-element bf16 output where the base (0.49) and the adapter's term (-0.56)
    # cancel failed on the GPU at 2.49x eager's error (4 ulps of the result, 1 of the parts)
    testing.check_against_eager(fused, eager, g, u, *lora_a, *lora_b, ref_fn=ref, parts_fn=parts, seed=case["seed"])


def test_qlora_mlp_keeps_neither_h_nor_w(monkeypatch):
    """W dequantised once forward, once backward; of the intermediate's size only g and u are saved."""
    case = dict(_simple(k=192, lead=(2, 5)), act="silu")
    layer, g, u, lora_a, lora_b = _qlora_mlp_make(case)
    fused, _, _, _ = _qlora_mlp_fns(case, layer)
    calls = []
    original = qmod.dequantize_weights
    monkeypatch.setattr(qmod, "dequantize_weights", lambda *a, **k: calls.append(tuple(a[1][0])) or original(*a, **k))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fused(g, u, *lora_a, *lora_b)
    assert calls == [(40, 192)]
    big = [t for t in saved if t.is_floating_point() and t.numel() >= g.numel()]
    assert len(big) == 2 and big[0] is g and big[1] is u, [t.shape for t in saved]
    y.float().sum().backward()
    assert calls == [(40, 192)] * 2 and g.grad is not None and u.grad is not None


@pytest.mark.parametrize("n_adapters, nested, bias", [(2, True, True), (1, False, False), (0, True, False)])
def test_opcheck_qlora_mlp(n_adapters, nested, bias):
    case = dict(_simple(adapters=[(4, 2.0), (3, 0.5)][:n_adapters], nested=nested, bias=bias, k=128), act="gelu_tanh")
    layer, g, u, lora_a, lora_b = _qlora_mlp_make(case)
    *state, nbs = op_args([layer])
    b = layer.bias.to(layer.compute_dtype) if layer.bias is not None else None
    dt = (torch.bfloat16,) * 3
    args = (g, u, "gelu_tanh", *state, b, lora_a, lora_b, [2.0, 0.5][:n_adapters], *dt, nbs)
    torch.library.opcheck(torch.ops.slothc.qlora_mlp.default, args)
    y, t = torch.ops.slothc.qlora_mlp(*args)
    torch.library.opcheck(
        torch.ops.slothc.qlora_mlp_backward.default,
        (torch.randn_like(y), g.detach(), u.detach(), t.detach(), "gelu_tanh", *state, [a.detach() for a in lora_a],
         [b_.detach() for b_ in lora_b], [2.0, 0.5][:n_adapters], *dt, nbs),
    )
