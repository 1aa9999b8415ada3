"""The pattern engine itself: commutativity, captures, dtype captures, escapes, safety of rewrites."""

import operator

import pytest
import torch

from slothc.passes.matcher import INTERMEDIATE_ESCAPES, REPLACEMENT_MISMATCH, Pattern, Rule, RuleSet, match
from tests.passes._capture import capture, targets


def _axpy_pattern(a, x, y):
    return a * x + y


def _axpy_replacement(m, a, x, y):
    return torch.addcmul(y, a, x)


AXPY = RuleSet([Rule("test", "axpy", _axpy_pattern, _axpy_replacement)])


@pytest.mark.parametrize(
    "fn",
    [
        lambda a, x, y: a * x + y,
        lambda a, x, y: y + x * a,
        lambda a, x, y: torch.add(y, torch.mul(x, a)),
        lambda a, x, y: y.add(a.mul(x)),
    ],
)
def test_commutative_and_respelled_operands_match(fn):
    a, x, y = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    report, (gm,), out = capture(fn, a, x, y, rules=AXPY)
    assert report.count("test") == 1, str(report)
    assert targets(gm) == [torch.addcmul]
    torch.testing.assert_close(out, fn(a, x, y))


def test_capture_bound_twice_must_be_the_same_node():
    def _square_plus(x, y):
        return x * x + y  # normalizes to pow(x, 2) + y: write the pattern the same way

    rules = RuleSet([Rule("test", "sq", lambda x, y: x.pow(2) + y, lambda m, x, y: torch.addcmul(y, x, x))])
    a, b = torch.randn(4), torch.randn(4)
    report, _, _ = capture(_square_plus, a, b, rules=rules)
    assert report.count("test") == 1
    report, _, _ = capture(lambda x, z, y: x * z + y, a, a.clone(), b, rules=rules)
    assert report.count("test") == 0  # x * z with distinct inputs is not x ** 2


def test_dtype_capture_must_equal_the_captured_tensors_dtype():
    def _cast_back_pattern(x, y):
        return (x.float() + y).to(x.dtype)

    rules = RuleSet([Rule("test", "cast", _cast_back_pattern, lambda m, x, y: (x.float() + y).to(m.val("x").dtype))])
    x, y = torch.randn(4, dtype=torch.bfloat16), torch.randn(4)
    assert capture(lambda x, y: (x.float() + y).to(torch.bfloat16), x, y, rules=rules)[0].count("test") == 1
    assert capture(lambda x, y: (x.float() + y).to(torch.float16), x, y, rules=rules)[0].count("test") == 0


def test_intermediate_used_elsewhere_is_a_near_miss():
    def fn(a, x, y):
        ax = a * x
        return ax + y, ax

    a, x, y = torch.randn(3), torch.randn(3), torch.randn(3)
    report, (gm,), _ = capture(fn, a, x, y, rules=AXPY)
    assert report.count("test") == 0
    assert [s.reason for s in report.skipped] == [INTERMEDIATE_ESCAPES]
    assert torch.addcmul not in targets(gm)


def test_replacement_that_changes_dtype_is_undone_and_reported():
    rules = RuleSet([Rule("test", "bad", _axpy_pattern, lambda m, a, x, y: torch.addcmul(y, a, x).double())])
    a, x, y = torch.randn(3), torch.randn(3), torch.randn(3)
    report, (gm,), out = capture(lambda a, x, y: a * x + y, a, x, y, rules=rules)
    assert report.count("test") == 0 and [s.reason for s in report.skipped] == [REPLACEMENT_MISMATCH]
    assert targets(gm) == [operator.mul, operator.add]
    assert out.dtype == torch.float32


def test_check_reason_is_reported_and_graph_left_alone():
    rules = RuleSet([Rule("test", "axpy", _axpy_pattern, _axpy_replacement, check=lambda m: "too small" if m.val("x").numel() < 8 else None)])
    report, (gm,), _ = capture(lambda a, x, y: a * x + y, *torch.randn(3, 4), rules=rules)
    assert [(s.fusion, s.reason) for s in report.skipped] == [("test", "too small")]
    assert torch.addcmul not in targets(gm)


def test_rule_sets_compose_and_reject_duplicates():
    other = RuleSet([Rule("test", "sq", lambda x: x.pow(2), lambda m, x: x * x)])
    assert len(AXPY + other) == 2
    with pytest.raises(ValueError, match="duplicate"):
        AXPY + AXPY


def test_pattern_is_traced_and_normalized():
    pattern = Pattern(lambda x: x.float().pow(2.0).mean(-1, keepdim=True))
    assert [n.target for n in pattern.graph.nodes if n.op == "call_function"] == [torch.Tensor.to, torch.pow, torch.mean]
    assert pattern.captures == ["x"]


def test_match_returns_none_on_a_different_graph():
    pattern = Pattern(_axpy_pattern)
    gm = torch.fx.symbolic_trace(lambda a, x, y: a * x - y)
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert match(pattern, out) is None
