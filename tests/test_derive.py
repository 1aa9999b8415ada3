"""slothc.derive: activations as one sympy expression, derivatives derived, code emitted.

The derived derivative is checked against autograd of the eager activation (as Hugging Face's
``ACT2FN`` computes it) in float64 on hypothesis-drawn inputs, including the kinks of the non-smooth
activations (exact zeros) and large magnitudes where naive formulas overflow.
"""

from __future__ import annotations

import pytest
import sympy
import torch
from hypothesis import given
from hypothesis import strategies as st

from slothc import derive
from slothc.derive import ACTIVATIONS, X, Activation, eager_activation

# Inputs a gate projection produces, and the edges: zero (the kink of relu / relu2), tiny values,
# and magnitudes where exp(-x) overflows fp32 (|x| > 88).
_VALUES = st.one_of(
    st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from([0.0, -0.0, 1e-30, -1e-30, 88.8, -88.8, 1e3, -1e3, 20.0, -20.0]),
)


def _hf(name):
    """The activation exactly as transformers' ACT2FN builds it (the graph patterns match these)."""
    from transformers.activations import ACT2FN

    key = {"gelu_tanh": "gelu_pytorch_tanh"}.get(name, name)
    return ACT2FN[key]


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_eager_spellings_are_transformers(name):
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    torch.testing.assert_close(eager_activation(name)(x), _hf(name)(x))


@pytest.mark.parametrize("name", ACTIVATIONS)
@given(values=st.lists(_VALUES, min_size=1, max_size=64))
def test_derived_derivative_matches_autograd(name, values):
    x = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(eager_activation(name)(x).sum(), x)
    a = ACTIVATIONS[name]
    with torch.no_grad():
        torch.testing.assert_close(a.act(x.detach()), eager_activation(name)(x.detach()), rtol=1e-12, atol=1e-300)
        # atol 1e-200: where autograd's 1 - tanh(u)**2 is exactly 0 in float64 (|x| >~ 19 for GELU-tanh) the
        # derived 4 sigmoid(2u) sigmoid(-2u) keeps the true ~1e-260 value
        torch.testing.assert_close(a.act_derivative(x.detach()), expected, rtol=1e-10, atol=1e-200)


@pytest.mark.parametrize("name", ACTIVATIONS)
@given(values=st.lists(_VALUES, min_size=1, max_size=64))
def test_fp32_formulas_stay_finite(name, values):
    # Where eager's fp32 derivative is finite, the derived one is too (no inf / inf from exp(-x)).
    x = torch.tensor(values, dtype=torch.float32, requires_grad=True)
    (expected,) = torch.autograd.grad(eager_activation(name)(x).sum(), x)
    got = ACTIVATIONS[name].act_derivative(x.detach())
    assert torch.isfinite(got[torch.isfinite(expected)]).all(), (x, got, expected)


def test_kinks_take_torchs_value():
    x = torch.tensor([0.0, -0.0], dtype=torch.float64)
    assert ACTIVATIONS["relu"].act_derivative(x).tolist() == [0.0, 0.0]  # threshold_backward: 0 at 0
    assert ACTIVATIONS["relu2"].act_derivative(x).tolist() == [0.0, 0.0]


def test_derivatives_are_simplified_sympy():
    assert derive.derive(X**3) == 3 * X**2
    silu = ACTIVATIONS["silu"].derivative
    assert silu.has(derive.Sigmoid) and not silu.has(sympy.exp)  # kept in terms of sigmoid (robust)
    gelu_tanh = ACTIVATIONS["gelu_tanh"].derivative
    assert gelu_tanh.has(sympy.tanh) and not gelu_tanh.has(sympy.cosh)  # 1 - tanh^2, not sech^2


def test_a_new_activation_is_one_expression():
    # x * tanh(x): not in the table; everything comes from the expression.
    a = Activation("x_tanh", X * sympy.tanh(X))
    x = torch.linspace(-30, 30, 241, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad((x * torch.tanh(x)).sum(), x)
    torch.testing.assert_close(a.act_derivative(x.detach()), expected)
    assert "_mlp_x_tanh_bwd_kernel" in a.triton_source and "@triton.jit" in a.triton_source
    g, u = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(a.forward(g, u), g * torch.tanh(g) * u)


def test_unsupported_function_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="log"):
        Activation("softplus", sympy.log(1 + sympy.exp(X))).torch_source


def test_unknown_activation_lists_the_known_ones():
    with pytest.raises(ValueError, match="silu"):
        derive.activation("swiglu7")


def test_generated_sources_are_readable_by_inspect():
    import inspect

    a = ACTIVATIONS["gelu"]
    src = inspect.getsource(a.fwd_kernel.fn)  # what triton.jit reads
    assert "_mlp_gelu_fwd_kernel" in src


def _f_statements(source: str, kernel: str) -> list[str]:
    """The statements of ``kernel`` in ``source`` that compute ``f`` (the t-temporaries and ``f``),
    as emitted, in order; ``df`` and the loads and stores left out."""
    body = source[source.index(f"def {kernel}(") :]
    body = body[: body.index("\n\n\n")] if "\n\n\n" in body else body
    lines = [line.strip() for line in body.splitlines()]
    assigned = [line for line in lines if line.split(" = ")[0].rstrip() in {"f"} | {f"t{i}" for i in range(64)}]
    used = set()
    for line in reversed(assigned):  # keep the temporaries f needs
        name, expr = line.split(" = ", 1)
        if name == "f" or name in used:
            used |= {tok for tok in expr.replace("(", " ").replace(")", " ").replace(",", " ").split() if tok.startswith("t")}
            used.add(name)
    return [line for line in assigned if line.split(" = ")[0] in used]


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_forward_kernel_computes_f_as_the_backward_kernels_do(name):
    """The backward kernel that sums dA = G^T h recomputes h = act(g) * u in registers and must get
    the forward kernel's bits: the same operations in the same order. gelu_tanh's forward once
    formed the tanh argument as x * sqrt(2) * (1 + c x^2) / sqrt(pi) and the backward as
    (x * sqrt(2) / sqrt(pi)) * (1 + c x^2), and on the H200 one dA element in 80 examples was off
    (tests/kernels/test_mlp.py::test_one_kernel_backward_matches_the_composed_one)."""
    source = derive.activation(name).triton_source
    forward = _f_statements(source, f"_mlp_{name}_fwd_kernel")
    assert forward and forward[-1].startswith("f = ")
    assert _f_statements(source, f"_mlp_{name}_bwd_kernel") == forward
    assert _f_statements(source, f"_mlp_{name}_bwd_da_kernel") == forward


def test_block_keep_emits_only_what_the_kept_names_need():
    p = derive._Printer("torch")
    exprs = [sympy.exp(X) * X, sympy.tanh(X) * sympy.exp(X)]
    full = p.block(exprs, ["f", "df"], "")
    kept = p.block(exprs, ["f", "df"], "", keep=["f"])
    assert "df" in full and "df" not in kept and "tanh" in full and "tanh" not in kept
    assert all(line in full.splitlines() for line in kept.splitlines())
