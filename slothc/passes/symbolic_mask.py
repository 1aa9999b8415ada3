"""A proof, for every size, that an SDPA mask built from symbolic sizes is the plain causal mask.

With dynamic shapes (a second sequence length recompiles the graph with symbolic sizes: Dynamo's
automatic dynamic shapes) transformers' mask is a function of sizes only, e.g.::

    q = arange(s0) + 0;  kv = arange(s0) + 0
    mask = (kv[None, None, None, :] <= q[None, None, :, None]).expand(s1, -1, s0, s0)

It cannot be evaluated at compile time (its sizes are unknown), so ``causal_mask`` used to leave it
alone. Here the mask subgraph is interpreted symbolically: each tensor is the ``sympy`` expression of
its element at a symbolic index (``arange(n)`` is a fresh index variable ``i`` with ``0 <= i < n``),
with, per dimension, the index variable it varies over (or none: a broadcast dimension) and its size.
Comparisons and boolean operators build the element's expression. The mask is causal for *every*
size when its last two dimensions vary over index variables ``q`` and ``kv`` whose ranges are the
query's and key's lengths (one symbol: no cache), it varies over no other dimension, and its element
simplifies to exactly ``kv <= q``.

At batch size 1 transformers also ANDs in its packed-sequence term, built from the position ids
(``diff`` of them, ``!= 1``, ``cumsum``, then ``seq[b, q] == seq[b, kv]``); where the position ids
are the graph's own ``arange`` (the caller passed none: one sequence) every step of it is interpreted
too: the ``diff`` of ``i + c`` is 1 at every index (its first element against the ``prepend``
included), so nothing starts a new sequence and the term is true. Position ids that are a graph input
(padding-free packing) are not interpreted, so such a mask is not proved.

Only the ops interpreted in ``_Interpreter._run`` are; anything else (a sliding window's ``>`` with a
size, a padding mask indexed by a graph input, vmap-built masks, floats) is not proved, and the caller
keeps its reason ("dynamic sizes"). A proof here is a proof: no size is sampled.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from typing import Optional

import sympy
import torch
from torch.fx import Node

from slothc.passes.meta import val


@dataclasses.dataclass(frozen=True)
class _Sym:
    """A tensor whose element at index ``(.., i_d, ..)`` is ``expr`` (free symbols: index variables)."""

    expr: sympy.Basic
    dims: tuple  # per dimension: the index variable it varies over, or None (broadcast)
    sizes: tuple  # per dimension: a sympy size (1 for a broadcast dimension not yet expanded)


class NotProved(Exception):
    pass


def _boolean(expr) -> bool:
    return isinstance(expr, (sympy.logic.boolalg.Boolean, sympy.core.relational.Relational))


def _size(x) -> sympy.Basic:
    if isinstance(x, torch.SymInt):
        return x.node.expr
    if isinstance(x, int):
        return sympy.Integer(x)
    raise NotProved(f"size {x!r}")


def _broadcast(a: _Sym, b: _Sym) -> tuple[tuple, tuple]:
    n = max(len(a.dims), len(b.dims))
    da, db = (None,) * (n - len(a.dims)) + a.dims, (None,) * (n - len(b.dims)) + b.dims
    sa, sb = (sympy.Integer(1),) * (n - len(a.sizes)) + a.sizes, (sympy.Integer(1),) * (n - len(b.sizes)) + b.sizes
    dims, sizes = [], []
    for x, y, p, r in zip(da, db, sa, sb):
        if x is not None and y is not None and x != y:
            raise NotProved("two index variables in one dimension")
        if p != r and p != 1 and r != 1:
            raise NotProved("sizes that do not broadcast")
        dims.append(x if x is not None else y)
        sizes.append(p if r == 1 else r)
    return tuple(dims), tuple(sizes)


def _scalar(x) -> Optional[sympy.Basic]:
    if isinstance(x, bool):
        return sympy.true if x else sympy.false
    if isinstance(x, (int, torch.SymInt)):
        return _size(x)
    return None


def _binary(fn):
    def op(a, b):
        sa, sb = _scalar(a), _scalar(b)
        if isinstance(a, _Sym) and isinstance(b, _Sym):
            dims, sizes = _broadcast(a, b)
            return _Sym(fn(a.expr, b.expr), dims, sizes)
        if isinstance(a, _Sym) and sb is not None:
            return _Sym(fn(a.expr, sb), a.dims, a.sizes)
        if isinstance(b, _Sym) and sa is not None:
            return _Sym(fn(sa, b.expr), b.dims, b.sizes)
        raise NotProved("an operand that is neither an index tensor nor an integer")

    return op


def _spellings(table: dict) -> dict:
    """Every way a traced graph names each op: ``operator.le``, ``torch.le``, ``torch.Tensor.le``, the
    method name ``"le"``, and the dunder method (``torch.Tensor.__le__``, ``"__le__"``: how torch 2.11's
    Dynamo records ``a == b`` on tensors, where later versions record ``operator.eq``)."""
    out = {}
    for name, fn in table.items():
        op = name.rstrip("_")  # and_, or_: operator's names; torch's are logical_and, __and__
        for spelling in (getattr(operator, name, None), getattr(torch, name, None), getattr(torch.Tensor, name, None), name,
                         getattr(torch, f"logical_{op}", None), f"logical_{op}" if op in ("and", "or") else None,
                         getattr(torch.Tensor, f"__{op}__", None), f"__{op}__"):
            if spelling is not None:
                out[spelling] = fn
    return out


_COMPARE = _spellings({
    "le": sympy.Le, "lt": sympy.Lt,
    # a >= b is b <= a: one form to compare against
    "ge": lambda a, b: sympy.Le(b, a), "gt": lambda a, b: sympy.Lt(b, a),
    "eq": sympy.Eq, "ne": sympy.Ne,
})
_ARITH = _spellings({"add": operator.add, "sub": operator.sub})
_LOGIC = _spellings({"and_": sympy.And, "or_": sympy.Or})


def _index(x: _Sym, key, ranges: dict) -> _Sym:
    """``x[key]`` for a key of ``None``, full slices, ``...`` and ``:1`` (the first element), or of
    index tensors only (advanced indexing, as transformers' mask functions read position ids)."""
    key = key if isinstance(key, tuple) else (key,)
    if key and all(isinstance(k, _Sym) for k in key):
        return _gather(x, key, ranges)
    if sum(k is Ellipsis for k in key) > 1:
        raise NotProved("two ellipses")
    if Ellipsis in key:
        at = key.index(Ellipsis)
        rest = len(x.dims) - (len([k for k in key if k is not None]) - 1)
        key = key[:at] + (slice(None, None, None),) * rest + key[at + 1:]
    dims, sizes, i, expr = [], [], 0, x.expr
    for k in key:
        if k is None:
            dims.append(None)
            sizes.append(sympy.Integer(1))
        elif isinstance(k, slice) and k == slice(None, None, None):
            dims.append(x.dims[i])
            sizes.append(x.sizes[i])
            i += 1
        elif isinstance(k, slice) and k.start in (None, 0) and k.stop == 1 and k.step in (None, 1):
            if x.dims[i] is not None:  # the element at index 0 of that dimension
                expr = expr.subs(x.dims[i], 0)
            dims.append(None)
            sizes.append(sympy.Integer(1))
            i += 1
        else:
            raise NotProved(f"index {k!r}")
    dims += x.dims[i:]
    sizes += x.sizes[i:]
    return _Sym(expr, tuple(dims), tuple(sizes))


def _gather(x: _Sym, index: tuple, ranges: dict) -> _Sym:
    """``x[i0, i1, ..]`` with an index tensor for each leading dimension: the element of ``x`` at the
    indices' elements. Each index must be a bare index variable whose range is that dimension's
    size (so every index is in bounds); the result broadcasts the indices' shapes."""
    if len(index) != len(x.dims):
        raise NotProved("advanced indexing of other than every dimension")
    expr, shape = x.expr, index[0]
    for d, ix in enumerate(index):
        var = sympy.simplify(ix.expr)
        if not (isinstance(var, sympy.Symbol) and var in ranges and sympy.simplify(ranges[var] - x.sizes[d]) == 0):
            raise NotProved("an index that is not an arange over the whole dimension")
        if x.dims[d] is not None:
            expr = expr.subs(x.dims[d], var)
        if d:
            dims, sizes = _broadcast(shape, ix)
            shape = _Sym(shape.expr, dims, sizes)
    return _Sym(expr, shape.dims, shape.sizes)


def _diff(x: _Sym, prepend: _Sym, dim: int) -> _Sym:
    """``torch.diff(x, dim=-1, prepend=p)`` with ``p`` of size 1 in that dimension: element ``j`` is
    ``x[j] - x[j-1]`` and element 0 is ``x[0] - p``; interpreted where both are one expression."""
    if dim not in (-1, len(x.dims) - 1) or not x.dims:
        raise NotProved("diff other than over the last dimension with a prepend")
    if prepend.sizes[-1] != 1 or prepend.dims[-1] is not None or len(prepend.dims) != len(x.dims):
        raise NotProved("a prepend of more than one element")
    i = x.dims[-1]
    if i is None:
        raise NotProved("diff over a broadcast dimension")
    step = sympy.simplify(x.expr - x.expr.subs(i, i - 1))
    first = sympy.simplify(x.expr.subs(i, 0) - prepend.expr)
    if sympy.simplify(step.subs(i, 0) - first) != 0:
        raise NotProved("the first difference is not like the others")
    dims, _ = _broadcast(x, prepend)
    return _Sym(step, dims, x.sizes)


def _cumsum(x: _Sym, dim: int) -> _Sym:
    """``cumsum`` over the last dimension of a tensor that is zero (false) everywhere: zero."""
    if dim not in (-1, len(x.dims) - 1):
        raise NotProved("cumsum other than over the last dimension")
    if x.expr not in (sympy.false, sympy.Integer(0)):
        raise NotProved("cumsum of a tensor that is not zero everywhere")
    return _Sym(sympy.Integer(0), x.dims, x.sizes)


def _expand(x: _Sym, *shape) -> _Sym:
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else shape
    if len(shape) < len(x.dims):
        raise NotProved("expand to fewer dimensions")
    pad = len(shape) - len(x.dims)
    dims, sizes = (None,) * pad + x.dims, (sympy.Integer(1),) * pad + x.sizes
    out = []
    for d, s, new in zip(dims, sizes, shape):
        if isinstance(new, int) and new == -1:
            out.append(s)
            continue
        new = _size(new)
        if d is not None and new != s:
            raise NotProved("expand changes a varying dimension's size")
        out.append(new)
    return _Sym(x.expr, dims, tuple(out))


class _Interpreter:
    def __init__(self):
        self.env: dict = {}
        self.ranges: dict = {}  # index variable -> its size
        self.fresh = itertools.count()

    def value(self, n):
        if not isinstance(n, Node):
            return n
        if n not in self.env:
            self.env[n] = self._run(n)
        return self.env[n]

    def _arg(self, a):
        if isinstance(a, Node):
            return self.value(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        return a

    def _run(self, n: Node):
        if n.op == "placeholder":
            v = val(n)
            if isinstance(v, torch.SymInt):
                return v  # a size
            raise NotProved(f"graph input {n.name}")
        if n.op not in ("call_function", "call_method"):
            raise NotProved(n.op)
        args = [self._arg(a) for a in n.args]
        kwargs = {k: self._arg(v) for k, v in n.kwargs.items()}
        t = n.target
        if t is torch.arange:
            kwargs.pop("device", None)
            kwargs.pop("dtype", None)
            if kwargs or not 1 <= len(args) <= 2:
                raise NotProved("arange with a step")
            start, end = (sympy.Integer(0), _size(args[0])) if len(args) == 1 else (_size(args[0]), _size(args[1]))
            i = sympy.Symbol(f"i{next(self.fresh)}", integer=True, nonnegative=True)
            self.ranges[i] = end - start
            return _Sym(start + i, (i,), (end - start,))
        if t in _ARITH and not kwargs:
            return _binary(_ARITH[t])(*args)
        if t in _COMPARE and not kwargs:
            return _binary(_COMPARE[t])(*args)
        if t in _LOGIC and not kwargs:
            return _binary(_LOGIC[t])(*args)
        if t is operator.getitem and isinstance(args[0], _Sym):
            return _index(args[0], args[1], self.ranges)
        if t in ("unsqueeze", torch.Tensor.unsqueeze, torch.unsqueeze) and isinstance(args[0], _Sym) and not kwargs:
            x, d = args[0], args[1]
            d = d + len(x.dims) + 1 if d < 0 else d
            return _Sym(x.expr, x.dims[:d] + (None,) + x.dims[d:], x.sizes[:d] + (sympy.Integer(1),) + x.sizes[d:])
        if t in ("new_ones", torch.Tensor.new_ones) and len(args) == 2 and tuple(args[1]) == () and kwargs.get("dtype") is torch.bool:
            return _Sym(sympy.true, (), ())  # a 0-dim True: the start of transformers' AND of mask terms
        if t in ("to", torch.Tensor.to) and isinstance(args[0], _Sym) and not kwargs \
                and all(isinstance(a, (torch.device, str)) for a in args[1:]):
            return args[0]  # a move to a device: the values are the same
        if t is torch.diff and isinstance(args[0], _Sym) and len(args) == 1 and set(kwargs) <= {"prepend", "dim", "n"} \
                and kwargs.get("n", 1) == 1 and isinstance(kwargs.get("prepend"), _Sym):
            return _diff(args[0], kwargs["prepend"], kwargs.get("dim", -1))
        if t in ("cumsum", torch.Tensor.cumsum, torch.cumsum) and isinstance(args[0], _Sym) and len(args) == 2 and not kwargs:
            return _cumsum(args[0], args[1])
        if t in ("expand", torch.Tensor.expand) and isinstance(args[0], _Sym) and not kwargs:
            return _expand(args[0], *args[1:])
        if t in ("bool", torch.Tensor.bool) and isinstance(args[0], _Sym) and _boolean(args[0].expr):
            return args[0]
        raise NotProved(f"op {getattr(t, '__name__', t)}")


def proves_causal(mask: Node, q_len, kv_len) -> bool:
    """True if ``mask`` (a node) is, for every value of the sizes it reads, the plain causal
    ``[.., q_len, kv_len]`` mask (module docstring); False when that is not shown."""
    interp = _Interpreter()
    try:
        m = interp.value(mask)
    except (NotProved, TypeError, ValueError, AttributeError):
        return False
    if not isinstance(m, _Sym) or len(m.dims) < 2 or not _boolean(m.expr):
        return False
    single = [d for d in m.dims[:-2] if d is not None and interp.ranges.get(d) == 1]  # over an arange(1) (batch 1): index 0
    m = _Sym(m.expr.subs({d: 0 for d in single}), tuple(None if d in single else d for d in m.dims[:-2]) + m.dims[-2:], m.sizes)
    q, kv = m.dims[-2], m.dims[-1]
    if q is None or kv is None or q == kv or any(d is not None for d in m.dims[:-2]):
        return False
    try:
        Q, KV = _size(q_len), _size(kv_len)
    except NotProved:
        return False
    if not (interp.ranges[q] == Q == m.sizes[-2] and interp.ranges[kv] == KV == m.sizes[-1] and sympy.simplify(Q - KV) == 0):
        return False
    # a <= b with a - b identically kv - q: the element is kv <= q at every index, for every size
    e = m.expr
    if isinstance(e, sympy.GreaterThan):  # sympy may hand back b >= a for a <= b
        e = sympy.LessThan(e.rhs, e.lhs, evaluate=False)
    return isinstance(e, sympy.LessThan) and sympy.simplify((e.lhs - e.rhs) - (kv - q)) == 0
