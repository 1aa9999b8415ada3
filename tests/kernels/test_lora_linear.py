"""slothc::lora_linear against eager PEFT's LoRA ``Linear`` math, and float64.

The eager function is PEFT's ``lora.Linear.forward`` as it reads (base layer, then per adapter
``x.to(lora_A.dtype)``, ``lora_B(lora_A(x)) * scaling``, the final cast), under autocast when the case
says so. Properties draw shapes, ranks 1..64, scalings (``alpha / r``, rsLoRA's ``alpha / sqrt(r)``,
arbitrary), bias on/off, one or two adapters, one to three projections sharing the input, dtypes and
the three mixed-precision set-ups PEFT training uses; every case checks each output and the
gradients of x and every adapter weight with ``slothc.testing.check_against_eager``.
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
from slothc.kernels import lora_linear as lora_module

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HALF = (torch.bfloat16, torch.float16)

# How a training run holds its weights and computes, by name:
#   "plain":    everything in one dtype, no autocast (x, W, adapters: dtype)
#   "autocast": fp32 weights and adapters, fp32 x, under autocast(dtype) (HF Trainer with bf16=True
#               on an fp32 model)
#   "upcast":   a half-precision model (x, W: dtype) with fp32 adapters (PEFT's default
#               autocast_adapter_dtype), no autocast: the update is computed in fp32
#   "upcast_autocast": the same under autocast(dtype): the "1B workload" set-up
SETUPS = ("plain", "autocast", "upcast", "upcast_autocast")


def peft_lora_linear(x, weight, bias, adapters, dropout=None):
    """``peft.tuners.lora.layer.Linear.forward`` for ``adapters = [(A, B, scaling), ...]``;
    ``dropout``: the adapters' dropout (a function of x), identity by default."""
    result = F.linear(x, weight, bias)
    torch_result_dtype = result.dtype
    for lora_a, lora_b, scaling in adapters:
        xa = x.to(lora_a.dtype) if x.dtype != lora_a.dtype else x  # PEFT's _cast_input_dtype
        xa = dropout(xa) if dropout is not None else xa
        result = result + F.linear(F.linear(xa, lora_a), lora_b) * scaling
    return result.to(torch_result_dtype)


def _dropout_like(mask, p):
    """Dropout with a fixed mask (what torch's dropout computes, without its random draw)."""
    return lambda t: t * mask.to(t.dtype) / (1 - p)


def _dtypes(setup, dtype):
    """(x and W dtype, adapter dtype, autocast dtype or None)."""
    return {
        "plain": (dtype, dtype, None),
        "autocast": (torch.float32, torch.float32, dtype),
        "upcast": (dtype, torch.float32, None),
        "upcast_autocast": (dtype, torch.float32, dtype),
    }[setup]


def _op_dtypes(setup, dtype):
    """(base, lora, out) dtypes of the op: what eager computes in for the set-up."""
    x_dtype, a_dtype, autocast = _dtypes(setup, dtype)
    if autocast is not None:
        return autocast, autocast, autocast
    return x_dtype, a_dtype, x_dtype


def _autocast(dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=dtype)


@st.composite
def lora_cases(draw):
    scale = testing.size_scale()
    setup = draw(st.sampled_from(SETUPS))
    dtype = draw(testing.dtypes()) if setup == "plain" else draw(st.sampled_from(HALF))
    if DEVICE.type == "cpu" and setup in ("autocast", "upcast_autocast"):
        dtype = torch.bfloat16  # CPU autocast is bf16 only
    max_k = min(scale.max_cols, 512)
    k = draw(st.integers(1, max_k))
    n_proj = draw(st.integers(1, 3))
    outs = [draw(st.integers(1, max_k)) for _ in range(n_proj)]
    adapters = []  # (projection, rank, scaling)
    for p in range(n_proj):
        for _ in range(draw(st.integers(1 if p == 0 else 0, 2))):
            r = draw(st.integers(1, 64))
            alpha = draw(st.sampled_from([1, 8, 16, 32]))
            kind = draw(st.sampled_from(["alpha/r", "rslora", "any"]))
            s = {"alpha/r": alpha / r, "rslora": alpha / math.sqrt(r)}.get(kind) or draw(st.floats(0.01, 8.0))
            adapters.append((p, r, s))
    rows = draw(st.integers(1, min(scale.max_rows * 8, 2048)))
    lead = draw(st.sampled_from([(rows,), (1, rows), (rows, 1)]))
    bias = [draw(st.booleans()) for _ in range(n_proj)]
    layout = draw(st.sampled_from(["contiguous", "padded", "transposed"]))
    need_dx = draw(st.booleans())
    # PEFT's lora_dropout in training: the op reads the dropped-out input as xa (one dropout a call)
    dropout = draw(st.sampled_from([None, 0.1, 0.5])) if n_proj == 1 else None
    return dict(setup=setup, dtype=dtype, k=k, outs=outs, adapters=adapters, lead=lead, bias=bias,
                layout=layout, need_dx=need_dx, seed=draw(testing.seeds()), dropout=dropout)


def _make(case):
    x_dtype, a_dtype, _ = _dtypes(case["setup"], case["dtype"])
    seed, k = case["seed"], case["k"]
    # A small input scale keeps products O(1): the bound is relative to the largest element.
    x = testing.make_tensor((*case["lead"], k), x_dtype, seed, layout=case["layout"], device=DEVICE,
                            requires_grad=case["need_dx"])
    weights = [testing.make_tensor((m, k), x_dtype, seed + 1 + p, device=DEVICE, scale=k**-0.5) for p, m in enumerate(case["outs"])]
    biases = [testing.make_tensor((m,), x_dtype, seed + 10 + p, device=DEVICE) if b else None for p, (m, b) in enumerate(zip(case["outs"], case["bias"]))]
    lora_a, lora_b = [], []
    for i, (p, r, s) in enumerate(case["adapters"]):
        # B ~ 1 / (s sqrt(r)): the update s x A^T B^T is O(1) like the base product (a trained B is
        # small); a large one would make every output a cancellation of large terms.
        lora_a.append(testing.make_tensor((r, k), a_dtype, seed + 20 + i, device=DEVICE, scale=k**-0.5, requires_grad=True))
        lora_b.append(testing.make_tensor((case["outs"][p], r), a_dtype, seed + 40 + i, device=DEVICE,
                                          scale=r**-0.5 / max(1.0, s), requires_grad=True))
    return x, weights, biases, lora_a, lora_b


def _fns(case):
    n_proj = len(case["outs"])
    scaling = [s for _, _, s in case["adapters"]]
    proj = [p for p, _, _ in case["adapters"]]
    base, lora, out = _op_dtypes(case["setup"], case["dtype"])
    autocast = _dtypes(case["setup"], case["dtype"])[2]

    dropout = None
    if case.get("dropout"):
        g = torch.Generator().manual_seed(case["seed"] + 7)
        mask = (torch.rand((*case["lead"], case["k"]), generator=g) >= case["dropout"]).to(DEVICE)
        dropout = _dropout_like(mask, case["dropout"])

    def fused(x, *params):
        weights, biases = list(params[:n_proj]), list(params[n_proj : 2 * n_proj])
        lora_a = list(params[2 * n_proj : 2 * n_proj + len(proj)])
        lora_b = list(params[2 * n_proj + len(proj) :])
        with _autocast(autocast):  # the op must not be recast by an ambient autocast
            if dropout is not None:
                xa = dropout(x.to(lora_a[0].dtype) if x.dtype != lora_a[0].dtype else x)
                outs = torch.ops.slothc.lora_linear(x, weights, biases, lora_a, lora_b, scaling, proj, base, lora, out, xa)
            else:
                outs = torch.ops.slothc.lora_linear(x, weights, biases, lora_a, lora_b, scaling, proj, base, lora, out)
        return outs[:n_proj]

    def eager(x, *params):
        weights, biases = params[:n_proj], params[n_proj : 2 * n_proj]
        lora_a, lora_b = params[2 * n_proj : 2 * n_proj + len(proj)], params[2 * n_proj + len(proj) :]
        with _autocast(autocast):
            return [
                peft_lora_linear(x, weights[p], biases[p], [(lora_a[i], lora_b[i], scaling[i]) for i in range(len(proj)) if proj[i] == p],
                                 dropout)
                for p in range(n_proj)
            ]

    return fused, eager


@given(case=lora_cases())
def test_lora_linear_matches_eager_peft(case):
    x, weights, biases, lora_a, lora_b = _make(case)
    fused, eager = _fns(case)
    testing.check_against_eager(fused, eager, x, *weights, *biases, *lora_a, *lora_b, seed=case["seed"])


@given(case=lora_cases())
def test_fused_output_dtypes_are_eagers(case):
    x, weights, biases, lora_a, lora_b = _make(case)
    fused, eager = _fns(case)
    args = (x, *weights, *biases, *lora_a, *lora_b)
    f_out, e_out = fused(*args), eager(*args)
    assert [o.dtype for o in f_out] == [o.dtype for o in e_out]
    assert [o.shape for o in f_out] == [o.shape for o in e_out]
    grads = torch.autograd.grad(sum(o.float().sum() for o in f_out), [*lora_a, *lora_b])
    assert [g.dtype for g in grads] == [p.dtype for p in (*lora_a, *lora_b)]  # fp32 adapters get fp32 grads


def test_rank_64_and_one_token():
    case = dict(setup="plain", dtype=torch.float32, k=96, outs=[80], adapters=[(0, 64, 0.25)], lead=(1,),
                bias=[True], layout="contiguous", need_dx=True, seed=3)
    x, weights, biases, lora_a, lora_b = _make(case)
    fused, eager = _fns(case)
    testing.check_against_eager(fused, eager, x, *weights, *biases, *lora_a, *lora_b)


@pytest.mark.parametrize("setup, dtype", [("plain", torch.float32), ("plain", torch.bfloat16), ("upcast", torch.bfloat16)])
def test_dropout_input_gets_its_own_gradient(setup, dtype):
    # xa = dropout(x): dX = dY W from the op, plus dXa = G A through the dropout (autograd adds them)
    case = dict(setup=setup, dtype=dtype, k=48, outs=[40], adapters=[(0, 8, 2.0), (0, 4, 0.5)], lead=(3, 5),
                bias=[True], layout="contiguous", need_dx=True, seed=5, dropout=0.3)
    x, weights, biases, lora_a, lora_b = _make(case)
    fused, eager = _fns(case)
    testing.check_against_eager(fused, eager, x, *weights, *biases, *lora_a, *lora_b)


def test_no_input_grad_skips_dx(monkeypatch):
    case = dict(setup="plain", dtype=torch.float32, k=32, outs=[16, 8], adapters=[(0, 4, 2.0), (1, 2, 2.0)], lead=(5,),
                bias=[False, False], layout="contiguous", need_dx=False, seed=1)
    x, weights, biases, lora_a, lora_b = _make(case)
    seen = []
    original = lora_module.lora_linear_bwd
    monkeypatch.setattr(lora_module, "lora_linear_bwd", lambda *a: seen.append(a[11]) or original(*a))  # need_dx
    outs = torch.ops.slothc.lora_linear(x, weights, biases, lora_a, lora_b, [2.0, 2.0], [0, 1], torch.float32, torch.float32, torch.float32)
    sum(o.sum() for o in outs[:2]).backward()
    assert seen == [False]  # x needs no grad: the dY W matmuls are not run
    assert all(p.grad is not None for p in (*lora_a, *lora_b))


def _opcheck_args(setup, dtype, n_proj=2, bias=(True, False)):
    case = dict(setup=setup, dtype=dtype, k=24, outs=[16, 8][:n_proj], adapters=[(0, 4, 2.0), (0, 2, 0.5), (n_proj - 1, 3, 1.5)],
                lead=(2, 3), bias=list(bias)[:n_proj], layout="contiguous", need_dx=True, seed=0)
    x, weights, biases, lora_a, lora_b = _make(case)
    base, lora, out = _op_dtypes(setup, dtype)
    return (x, weights, biases, lora_a, lora_b, [s for *_, s in case["adapters"]], [p for p, *_ in case["adapters"]], base, lora, out)


@pytest.mark.parametrize("setup", ["plain", "upcast"])
@pytest.mark.parametrize("bias", [(True, False), (True, True), (False, False)], ids=["mixed_bias", "bias", "no_bias"])
def test_opcheck(setup, bias):
    args = _opcheck_args(setup, torch.float32 if setup == "plain" else torch.bfloat16, bias=bias)
    torch.library.opcheck(torch.ops.slothc.lora_linear.default, args)
    xa = (args[0] * 2.0).detach().requires_grad_()  # a separate adapters' input (dropout)
    torch.library.opcheck(torch.ops.slothc.lora_linear.default, (*args, xa))


def test_opcheck_backward_op():
    x, weights, biases, lora_a, lora_b, scaling, proj, base, lora, out = _opcheck_args("plain", torch.float32)
    outs, t = lora_module.lora_linear_fwd(x, weights, biases, lora_a, lora_b, scaling, proj, base, lora, out)
    grads = [torch.randn_like(o) for o in outs]
    for need_dx, split, need_dxa in ((True, False, False), (False, False, False), (True, True, True), (False, True, True)):
        torch.library.opcheck(
            torch.ops.slothc.lora_linear_backward.default,
            (grads, x.detach(), t.detach(), weights, [a.detach() for a in lora_a], [b.detach() for b in lora_b], scaling, proj, base,
             lora, out, need_dx, split, need_dxa, x.dtype),
        )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(weights=[a["weights"][0][:, :-1]] + a["weights"][1:]), "weight 0 has shape"),
        (lambda a: a.update(lora_b=[a["lora_b"][0][:-1]] + a["lora_b"][1:]), "lora_b 0 has shape"),
        (lambda a: a.update(scaling=a["scaling"][:-1]), "one entry per adapter"),
        (lambda a: a.update(adapter_proj=[0, 0, 5]), "belongs to projection 5"),
        (lambda a: a.update(biases=a["biases"][:1]), "biases for 2 projections"),
    ],
    ids=["weight_shape", "lora_b_shape", "scaling_count", "projection_index", "bias_count"],
)
def test_bad_input_names_what_to_change(change, message):
    names = ("x", "weights", "biases", "lora_a", "lora_b", "scaling", "adapter_proj", "base_dtype", "lora_dtype", "out_dtype")
    args = dict(zip(names, _opcheck_args("plain", torch.float32)))
    change(args)
    with pytest.raises(ValueError, match=message):
        torch.ops.slothc.lora_linear(*args.values())


def test_reference_is_peft(monkeypatch):
    """lora_linear_reference (the spec in the module) is PEFT's own Linear, run through peft."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10))
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=5, target_modules=["0"], init_lora_weights=False, use_rslora=True))
    layer = model.base_model.model[0]
    x = torch.randn(4, 12)
    ref = lora_module.lora_linear_reference(
        x, [layer.base_layer.weight], [layer.base_layer.bias], [layer.lora_A["default"].weight], [layer.lora_B["default"].weight],
        [layer.scaling["default"]], [0], torch.float32, torch.float32, torch.float32,
    )[0]
    torch.testing.assert_close(ref, model(x))
    assert layer.scaling["default"] == pytest.approx(5 / math.sqrt(3))
