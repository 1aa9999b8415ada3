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
