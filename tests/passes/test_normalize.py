"""Every spelling of one computation normalizes to the same canonical graph."""

import operator

import pytest
import torch
import torch.nn.functional as F

from tests.passes._capture import capture, targets
from slothc.passes.matcher import RuleSet

NO_RULES = RuleSet()


def _canonical(fn, *args):
    _, (gm,), _ = capture(fn, *args, rules=NO_RULES)
    return targets(gm), gm


CAST_SPELLINGS = [
    lambda x: x.float(),
    lambda x: x.to(torch.float32),
    lambda x: x.to(dtype=torch.float32),
    lambda x: x.type(torch.float32),
    lambda x: x.to(x.device, torch.float32),
]


@pytest.mark.parametrize("spelling", range(len(CAST_SPELLINGS)))
def test_casts_become_one_to(spelling):
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    found, gm = _canonical(CAST_SPELLINGS[spelling], x)
    assert found == [torch.Tensor.to]
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.args[1:] == (torch.float32,) and not node.kwargs


SQUARE_SPELLINGS = [
    lambda x: x.pow(2),
    lambda x: x**2,
    lambda x: x * x,
    lambda x: torch.square(x),
    lambda x: torch.pow(x, 2.0),
]


@pytest.mark.parametrize("spelling", range(len(SQUARE_SPELLINGS)))
def test_squares_become_pow_2(spelling):
    found, gm = _canonical(SQUARE_SPELLINGS[spelling], torch.randn(3, 4))
    assert found == [torch.pow]
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.args[1] == 2 and isinstance(node.args[1], int)


@pytest.mark.parametrize(
    "fn, expected",
    [
        (lambda v: torch.rsqrt(v), [torch.rsqrt]),
        (lambda v: v.rsqrt(), [torch.rsqrt]),
        (lambda v: 1 / torch.sqrt(v), [torch.rsqrt]),
        (lambda v: torch.sqrt(v).reciprocal(), [torch.rsqrt]),
        (lambda v: (v + 1) / torch.sqrt(v), [operator.add, torch.rsqrt, operator.mul]),
    ],
)
def test_rsqrt_spellings(fn, expected):
    found, _ = _canonical(fn, torch.rand(3, 4) + 0.5)
    assert sorted(map(str, found)) == sorted(map(str, expected))


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x.mean(-1, keepdim=True),
        lambda x: torch.mean(x, dim=-1, keepdim=True),
        lambda x: x.mean(dim=[-1], keepdim=True),
        lambda x: x.mean(2, True),
    ],
)
def test_mean_is_positional_with_negative_dim(fn):
    _, gm = _canonical(fn, torch.randn(2, 3, 4))
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.target is torch.mean and node.args[1:] == (-1, True) and not node.kwargs


def test_methods_become_functions_and_kwargs_positional():
    def fn(x, w):
        return F.linear(input=x, weight=w).view(-1).mul(2.0)

    found, gm = _canonical(fn, torch.randn(2, 3), torch.randn(4, 3))
    assert found == [F.linear, torch.Tensor.view, operator.mul]
    linear = next(n for n in gm.graph.nodes if n.target is F.linear)
    assert len(linear.args) == 3 and linear.args[2] is None and not linear.kwargs


def test_normalized_graph_computes_the_same():
    def fn(x):
        h = x.float()
        return (h / torch.sqrt((h * h).mean(dim=[2], keepdim=True) + 1e-6)).type_as(x)

    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    _, _, out = capture(fn, x, rules=NO_RULES)
    torch.testing.assert_close(out, fn(x))


@pytest.mark.parametrize(
    "fn",
    [lambda x, w: x @ w.T, lambda x, w: x @ w.t(), lambda x, w: torch.matmul(x, w.transpose(0, 1)), lambda x, w: x @ w.transpose(-1, -2)],
    ids=["T", "t()", "matmul_transpose", "transpose_neg"],
)
def test_hand_written_linear_becomes_linear(fn):
    x, w = torch.randn(2, 3, 8), torch.randn(5, 8)
    found, gm = _canonical(fn, x, w)
    assert found == [F.linear]
    _, _, out = capture(fn, x, w, rules=NO_RULES)
    torch.testing.assert_close(out, fn(x, w))


@pytest.mark.parametrize(
    "fn", [lambda x, w: x @ w, lambda x, w: x @ w.T.contiguous()], ids=["no_transpose", "copied"]
)
def test_other_matmuls_stay(fn):
    found, _ = _canonical(fn, torch.randn(2, 8), torch.randn(8, 8))
    assert F.linear not in found


def test_gelu_gets_its_keyword():
    def fn(x):
        return F.gelu(x) + F.gelu(x, approximate="tanh") + F.silu(x, inplace=False)

    _, gm = _canonical(fn, torch.randn(4))
    gelus = [n for n in gm.graph.nodes if n.target is F.gelu]
    assert [n.kwargs for n in gelus] == [{"approximate": "none"}, {"approximate": "tanh"}] and all(len(n.args) == 1 for n in gelus)
    (silu,) = [n for n in gm.graph.nodes if n.target is F.silu]
    assert silu.args[1:] == (False,) and not silu.kwargs


ROTATE_SPELLINGS = [  # one rotate_every_two, as GPT-J, GLM and RoFormer write it
    lambda x: torch.stack((-x[:, :, :, 1::2], x[:, :, :, ::2]), dim=-1).flatten(-2),
    lambda x: torch.stack((-x[..., 1::2], x[..., 0::2]), dim=4).flatten(3),
    lambda x: torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape_as(x),
    lambda x: torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).view(*x.shape),
]


@pytest.mark.parametrize("spelling", range(len(ROTATE_SPELLINGS)))
def test_interleaved_rotations_become_one_form(spelling):
    x = torch.randn(2, 3, 4, 8)
    found, gm = _canonical(ROTATE_SPELLINGS[spelling], x)
    assert found == [operator.getitem, operator.neg, operator.getitem, torch.stack, torch.Tensor.flatten]
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_function"}
    assert nodes[torch.stack].args[1] == -1 and not nodes[torch.stack].kwargs
    assert nodes[torch.Tensor.flatten].args[1:] == (-2, -1)
    indexes = sorted(str(n.args[1]) for n in gm.graph.nodes if n.target is operator.getitem)
    assert indexes == sorted([str((Ellipsis, slice(1, None, 2))), str((Ellipsis, slice(None, None, 2)))])
    torch.testing.assert_close(gm(x)[0] if isinstance(gm(x), (tuple, list)) else gm(x), ROTATE_SPELLINGS[0](x))


def test_cat_dim_is_positional_and_negative():
    found, gm = _canonical(lambda a, b: torch.cat((a, b), dim=2), torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    (node,) = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert node.args[1] == -1 and not node.kwargs


def test_other_reshapes_of_a_stack_stay():
    found, _ = _canonical(lambda x: torch.stack((x, x), dim=-1).reshape(2, -1), torch.randn(2, 3, 4))
    assert torch.Tensor.flatten not in found
