"""The pattern DSL: declare a pattern as the code it matches, its replacement, and its check.

A fusion states what it matches as a plain function written the way model code reads::

    def _rms_norm_llama_pattern(x, weight, eps, dim):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(dim, keepdim=True) + eps)
        return weight * h.to(x.dtype)

The function is traced once with ``torch.fx.symbolic_trace`` (lazily, on first use) and normalized
with the same rules as the model's graph (:mod:`slothc.passes.normalize`), so any spelling that
normalizes alike matches. Its parameters are the *captures*: each binds a graph node or a literal
(``eps`` binds ``1e-06``); a capture used twice must bind the same thing twice. ``x.dtype`` in a
pattern matches the literal dtype Dynamo folded in, provided it equals the dtype of what ``x``
bound. ``+`` and ``*`` are commutative: both operand orders are tried.

A :class:`Rule` ties a pattern to

- ``check(m: Match) -> str | None``: constraints on the fake-tensor metadata (shapes, dtypes,
  constant values, symbolic sizes). A returned string is the reason the candidate is a near-miss; it
  is recorded in the report as skipped, and the graph is left alone. Reasons are short, lowercase,
  stable constants defined next to the patterns (tests import them).
  A check may also return :data:`NOT_A_CANDIDATE`: the structure matched but the site is not one
  this fusion is about (nothing is recorded, the next rule is tried).
- ``replacement(m: Match, **captures)``: called with the captures as ``torch.fx.Proxy`` objects
  (literals stay literals); whatever it computes is recorded into the graph in front of the matched
  output, which is then rerouted to it. ``None`` makes a rule that only *reports* a known near-miss (its check: ``always(reason)``).
- ``finish(m, out_node)`` (optional): runs after the reroute succeeded, for edits beyond the matched
  output (e.g. another use of a value the fusion no longer computes). ``m.state`` carries what the
  replacement decided; ``m.options`` are the backend options; ``m.state["reads"]`` (set by a check)
  lists the nodes a replacement reads beyond the captures (the engine checks them as it does those).

After a rewrite the matched nodes, and the values that fed only them (captures whose producers are
now unused, transitively, pure calls only), are erased: a fusion that reads a value's *inputs*
instead of the value itself does not leave the old computation running in the graph.

The engine refuses a match whose intermediate values are used outside the pattern (rewriting would
have to compute them anyway), or that reads a tensor subclass (a DTensor: a weight FSDP2 sharded,
read outside its module's forward, or tensor parallel's; the ops take plain tensors), and verifies
that the replacement's fake value has the matched output's shape and dtype, undoing it and reporting
a skip otherwise: a replacement can never silently change what the graph computes. Nested graphs of higher-order ops (``tag_activation_checkpoint`` bodies from
gradient checkpointing, ``wrap``...) are visited too.

Rules compose into ordered :class:`RuleSet` values with ``+``; within a set the first rule that
matches a node wins, and nodes are visited from the graph's end so that the largest pattern (the one
whose output comes last) is tried before its own sub-patterns.

Debugging: ``SLOTHC_MATCH_DEBUG=<node name>`` prints why each rule did or did not match that node.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
from typing import Any, Callable

import torch
import torch.fx
from torch.fx import Graph, GraphModule, Node
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from slothc.passes.meta import graphs, propagate, val
from slothc.report import Report, Site, Skip, module_path

COMMUTATIVE = frozenset({operator.add, operator.mul})

NOT_A_CANDIDATE = "<not a candidate>"  # a check's "ignore this site" (never recorded)
INTERMEDIATE_ESCAPES = "an intermediate value is used outside the pattern"
REPLACEMENT_MISMATCH = "the fused op would change the output's shape or dtype"
NO_FAKE_VALUES = "no fake-tensor metadata on the graph"
TENSOR_SUBCLASS = (
    "an input is a DTensor or another tensor subclass (e.g. a weight sharded by FSDP2 or tensor parallel, "
    "read outside its module's forward): slothc's ops take plain tensors"
)


class Pattern:
    """A pattern function traced to a small normalized FX graph (see the module docstring)."""

    def __init__(self, fn: Callable):
        from slothc.passes.normalize import normalize_graph

        self.fn = fn
        self.name = fn.__name__
        graph = torch.fx.symbolic_trace(fn).graph
        normalize_graph(graph)
        self.graph = graph
        self.captures = [n.target for n in graph.nodes if n.op == "placeholder"]
        (output,) = [n for n in graph.nodes if n.op == "output"]
        self.output = output.args[0]
        if not isinstance(self.output, Node) or self.output.op == "placeholder":
            raise ValueError(f"pattern {self.name} must return one computed value")

    def __repr__(self) -> str:
        return f"Pattern({self.name})"


@dataclasses.dataclass
class Match:
    """A successful structural match of a pattern at ``root``."""

    rule: "Rule"
    root: Node
    captures: dict  # capture name -> Node or literal
    nodes: list  # the matched graph nodes, captures excluded, root included
    options: Any = None  # the backend Options the pass runs with
    state: dict = dataclasses.field(default_factory=dict)  # replacement -> finish

    def __getitem__(self, name: str):
        """The bound node or literal of a capture."""
        return self.captures[name]

    def val(self, name: str):
        """The fake value of a capture (its literal if it bound one)."""
        return val(self.captures[name])

    @property
    def out(self):
        """The fake value of the matched output."""
        return val(self.root)


@dataclasses.dataclass(frozen=True)
class Rule:
    fusion: str  # report key: "rms_norm", ...
    variant: str  # which spelling: "llama", "gemma", ...
    pattern: Callable  # the pattern function
    replacement: Callable | None  # (m, **captures) -> Proxy; None: report-only near-miss
    check: Callable | None = None  # (m) -> reason str | None | NOT_A_CANDIDATE
    finish: Callable | None = None  # (m, out_node) -> None, after a successful reroute

    @functools.cached_property
    def traced(self) -> Pattern:
        return Pattern(self.pattern)


class RuleSet:
    """An ordered collection of rules; compose with ``+``."""

    def __init__(self, rules=()):
        self.rules = tuple(rules)
        seen = set()
        for rule in self.rules:
            key = (rule.fusion, rule.pattern)
            if key in seen:
                raise ValueError(f"duplicate rule {rule.fusion}/{rule.pattern.__name__}")
            seen.add(key)

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(self.rules + other.rules)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)


def always(reason: str) -> Callable:
    """The check of a report-only rule: every match is the near-miss ``reason``."""

    def check(m) -> str:
        return reason

    return check


# -- matching ----------------------------------------------------------------------------------------


class _Fail(Exception):
    pass


def match(pattern: Pattern, node: Node) -> tuple[dict, list] | None:
    """Match ``pattern`` with its output at ``node``: (captures, matched nodes) or None."""
    state = _State()
    try:
        state.match(pattern.output, node)
        for capture, dtype in state.deferred_dtypes:
            bound = val(state.bindings.get(capture))
            if not isinstance(bound, torch.Tensor) or bound.dtype != dtype:
                raise _Fail(f"{dtype} is not the dtype of {capture}")
    except _Fail as fail:
        _debug(node, f"{pattern.name}: no match ({fail})")
        return None
    captures = {p.target: state.bindings[p] for p in pattern.graph.nodes if p.op == "placeholder" and p in state.bindings}
    return captures, list(state.matched.values())


class _State:
    def __init__(self):
        self.bindings: dict = {}  # pattern placeholder -> graph node or literal
        self.matched: dict = {}  # pattern node -> graph node
        self.deferred_dtypes: list = []  # (pattern placeholder, dtype literal): "x.dtype" checks

    def snapshot(self):
        return dict(self.bindings), dict(self.matched), list(self.deferred_dtypes)

    def restore(self, snap) -> None:
        self.bindings, self.matched, self.deferred_dtypes = dict(snap[0]), dict(snap[1]), list(snap[2])

    def match(self, pn, gn) -> None:
        if isinstance(pn, Node):
            self.match_node(pn, gn)
        elif isinstance(pn, slice):  # x[..., h:] with a captured bound
            if not isinstance(gn, slice):
                raise _Fail(f"expected a slice, got {gn!r}")
            self.match((pn.start, pn.stop, pn.step), (gn.start, gn.stop, gn.step))
        elif isinstance(pn, (list, tuple)):
            if not isinstance(gn, (list, tuple)) or len(pn) != len(gn):
                raise _Fail(f"expected a sequence of {len(pn)}")
            for p, g in zip(pn, gn):
                self.match(p, g)
        elif isinstance(gn, Node) or type(pn) is not type(gn) and not _both_numbers(pn, gn) or pn != gn:
            raise _Fail(f"literal {pn!r} != {gn!r}")

    def match_node(self, pn: Node, gn) -> None:
        if pn.op == "placeholder":
            if pn in self.bindings:
                if not _same(self.bindings[pn], gn):
                    raise _Fail(f"capture {pn.target} bound twice differently")
            else:
                self.bindings[pn] = gn
            return
        if pn.op == "call_function" and pn.target is getattr and pn.args[1] == "dtype":
            if not isinstance(gn, torch.dtype):
                raise _Fail("expected a dtype literal")
            self.deferred_dtypes.append((pn.args[0], gn))
            return
        if pn in self.matched:
            if self.matched[pn] is not gn:
                raise _Fail(f"{pn.name} matched two different nodes")
            return
        if not isinstance(gn, Node) or gn.op != pn.op or gn.target != pn.target:
            raise _Fail(f"{pn.name}: expected {_describe(pn.target)}, got {_describe(getattr(gn, 'target', gn))}")
        if len(gn.args) != len(pn.args) or set(gn.kwargs) != set(pn.kwargs):
            raise _Fail(f"{pn.name}: argument structure differs")
        self.matched[pn] = gn
        orders = [gn.args]
        if pn.target in COMMUTATIVE and len(gn.args) == 2:
            orders.append((gn.args[1], gn.args[0]))
        last = None
        for args in orders:
            snap = self.snapshot()
            try:
                self.match(tuple(pn.args), tuple(args))
                for key in pn.kwargs:
                    self.match(pn.kwargs[key], gn.kwargs[key])
                return
            except _Fail as fail:
                last = fail
                self.restore(snap)
        raise last


def _same(a, b) -> bool:
    if isinstance(a, Node) or isinstance(b, Node):
        return a is b
    return type(a) is type(b) and a == b


def _both_numbers(a, b) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool)


def _describe(target) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def _debug(node: Node, message: str) -> None:
    if os.environ.get("SLOTHC_MATCH_DEBUG") == getattr(node, "name", None):
        print(f"[slothc match {node.name}] {message}")


# -- applying ----------------------------------------------------------------------------------------


def apply(gm: GraphModule, rules: RuleSet, report: Report, graph_index: int = 0, options: Any = None) -> int:
    """Apply ``rules`` to ``gm`` and its nested subgraphs; record sites and skips. Returns #fused."""
    fused = 0
    for graph in graphs(gm):
        fused += apply_graph(graph, rules, report, graph_index, options)
    return fused


def apply_graph(graph: Graph, rules: RuleSet, report: Report, graph_index: int = 0, options: Any = None) -> int:
    if options is None:
        from slothc.options import Options

        options = Options()
    fused = 0
    visited: set = set()  # roots already reported or rewritten
    erased: set = set()
    records = []  # (site or skip), reported in graph order at the end
    for node in reversed(list(graph.nodes)):
        if node in erased or node in visited or node.op != "call_function":
            continue
        for rule in rules:
            if node.target is not rule.traced.output.target:
                continue  # early reject on the output's op
            found = match(rule.traced, node)
            if found is None:
                continue
            m = Match(rule, node, *found, options=options)
            reason = _check(m)
            if reason is NOT_A_CANDIDATE:
                continue
            visited.add(node)
            if reason is None:
                reason = _rewrite(graph, m, erased)
            # A rule may name the site better than the root's module (e.g. the lm_head the loss
            # reads), and the variant it chose at rewrite time.
            site = dict(fusion=rule.fusion, module=m.state.get("module", module_path(node)), node=node.name, graph=graph_index)
            if reason is None:
                records.append(Site(variant=m.state.get("variant", rule.variant), **site))
                fused += 1
                _debug(node, f"{rule.pattern.__name__}: fused")
            else:
                records.append(Skip(reason=reason, **site))
                _debug(node, f"{rule.pattern.__name__}: skipped: {reason}")
            break
    for record in reversed(records):
        (report.add_site if isinstance(record, Site) else report.add_skip)(record)
    return fused


def _check(m: Match) -> str | None:
    inner = set(m.nodes) - {m.root}
    for node in inner:
        if any(user not in inner and user is not m.root for user in node.users):
            return INTERMEDIATE_ESCAPES
    if val(m.root) is None:
        return NO_FAKE_VALUES
    if m.rule.check is not None:
        reason = m.rule.check(m)
        if reason is not None:
            return reason
    if m.rule.replacement is None:
        raise ValueError(f"report-only rule {m.rule.pattern.__name__} must have a check that returns a reason")
    reads = [*m.nodes, *(c for c in m.captures.values() if isinstance(c, Node)), *m.state.get("reads", ())]
    if any(_subclass(val(n)) for n in reads if n is not None):
        return TENSOR_SUBCLASS
    return None


def _subclass(value) -> bool:
    """A tensor subclass that traces as one (DTensor, NF4Tensor ...): its values are not its storage."""
    return isinstance(value, torch.Tensor) and is_traceable_wrapper_subclass(value)


def _rewrite(graph: Graph, m: Match, erased: set) -> str | None:
    """Record the replacement in front of the root, verify it, reroute the root's users to it."""
    root = m.root
    before = set(graph.nodes)
    tracer = torch.fx.proxy.GraphAppendingTracer(graph)
    proxies = {name: torch.fx.Proxy(b, tracer) if isinstance(b, Node) else b for name, b in m.captures.items()}
    with graph.inserting_before(root):
        out = m.rule.replacement(m, **proxies)
    new_nodes = [n for n in graph.nodes if n not in before]
    out_node = out.node if isinstance(out, torch.fx.Proxy) else out
    ok = isinstance(out_node, Node) and propagate(new_nodes, root)
    if ok:
        new, old = val(out_node), val(root)
        ok = (
            isinstance(new, torch.Tensor)
            and new.dtype == old.dtype
            and new.device == old.device
            and tuple(new.shape) == tuple(old.shape)
        )
    if not ok:
        for node in reversed(new_nodes):
            graph.erase_node(node)
        return REPLACEMENT_MISMATCH
    root.replace_all_uses_with(out_node)
    if m.rule.finish is not None:
        m.rule.finish(m, out_node)
    for node in reversed(list(graph.nodes)):
        if node in m.nodes and not node.users:
            graph.erase_node(node)
            erased.add(node)
    erase_dead_inputs([b for b in m.captures.values() if isinstance(b, Node)], graph, erased)
    return None


def erase_dead_inputs(nodes: list, graph: Graph, erased: set) -> None:
    """Erase ``nodes`` that lost their last user, and then their inputs that did (pure calls only)."""
    work = list(nodes)
    while work:
        node = work.pop()
        if node in erased or node.graph is not graph or node.users or node.op != "call_function" or node.is_impure():
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        erased.add(node)
        work.extend(inputs)
