"""Activations as sympy expressions, their derivatives derived, and the fused kernels emitted from them.

The MLP of a language model computes ``h = act(g) * u`` (``g`` the gate projection, ``u`` the up
projection). Its backward needs ``act'``::

    dg = dh * u * act'(g)        du = dh * act(g)

An activation here is **one sympy expression** in ``x``. :func:`derive` differentiates it with sympy,
simplifies the derivative, and :class:`Activation` emits from the pair

- the Triton source of the fused forward kernel (``g, u -> h``) and backward kernel
  (``dh, g, u -> dg, du``, recomputing ``act(g)`` instead of reading a stored copy), compiled on first
  use;
- plain-torch functions of the same formulas (``forward``, ``backward``) for CPU tensors, so the
  derived derivative is what runs on every device.

Both compute in fp32 and round once to the output dtype. Adding an activation is one line in
:data:`ACTIVATIONS`: its expression, and how the graph spells it (the eager function the MLP pattern
matches, see ``slothc/passes/mlp.py``).

Numerically robust derivatives need robust building blocks, so two functions have their own
derivative rule instead of being expanded: :class:`Sigmoid` (``sigmoid' = sigmoid * (1 - sigmoid)``;
expanding ``1 / (1 + exp(-x))`` would give ``exp(-x) / (1 + exp(-x))**2``, which is ``inf / inf`` for
``x < -88`` in fp32) and sympy's own ``tanh`` (``1 - tanh**2``). Non-smooth activations are
``Piecewise`` expressions; their derivative is taken branch by branch, and the value at a kink is the
branch the condition selects, e.g. ``relu'(0) = 0`` like torch's ``threshold_backward``.
"""

from __future__ import annotations

import dataclasses
import functools
import linecache
import math
from typing import Callable, Optional, Sequence

import sympy
import torch

X = sympy.Symbol("x", real=True)


class Sigmoid(sympy.Function):
    """``1 / (1 + exp(-x))``, kept as one function so that its derivative stays in terms of itself."""

    def fdiff(self, argindex=1):
        s = Sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_rewrite_as_exp(self, arg, **kwargs):
        return 1 / (1 + sympy.exp(-arg))


_SQRT_2_OVER_PI = sympy.sqrt(2 / sympy.pi)

# name -> expression in X. The names are the ``act`` strings of ``slothc::mlp`` and its report.
EXPRESSIONS = {
    "silu": X * Sigmoid(X),
    "gelu": X / 2 * (1 + sympy.erf(X / sympy.sqrt(2))),
    "gelu_tanh": X / 2 * (1 + sympy.tanh(_SQRT_2_OVER_PI * (X + sympy.Float("0.044715") * X**3))),
    "relu": sympy.Piecewise((X, X > 0), (0, True)),
    "relu2": sympy.Piecewise((X**2, X > 0), (0, True)),
    "quick_gelu": X * Sigmoid(sympy.Float("1.702") * X),
}


# The functions the printers know (in both targets); a derivative is kept in terms of these.
_PRINTABLE = (Sigmoid, sympy.exp, sympy.erf, sympy.tanh, sympy.Piecewise)


def derive(expr: sympy.Expr) -> sympy.Expr:
    """``d expr / dx``, simplified; the value at a kink of a ``Piecewise`` is its selected branch."""
    d = sympy.diff(expr, X)
    if isinstance(d, sympy.Piecewise):
        # sympy.simplify may merge branches into Heaviside or Max forms; keep the branches.
        return sympy.Piecewise(*[(_stable(_simplify(e)), c) for e, c in d.args])
    return _stable(_simplify(d))


def _stable(e: sympy.Expr) -> sympy.Expr:
    """``tanh(u)**2`` as ``1 - 4 sigmoid(2u) sigmoid(-2u)``: tanh's derivative ``1 - tanh(u)**2`` then
    reads ``4 sigmoid(2u) sigmoid(-2u)`` (sympy cancels the ones), without the cancellation of
    ``1 - t*t`` for ``t`` near +-1 (GELU-tanh's gradient lost up to ~15 fp32 ulps to it)."""
    return e.replace(
        lambda a: a.is_Pow and isinstance(a.base, sympy.tanh) and a.exp == 2,
        lambda a: 1 - 4 * Sigmoid(2 * a.base.args[0]) * Sigmoid(-2 * a.base.args[0]),
    )


def _simplify(e: sympy.Expr) -> sympy.Expr:
    """The simplest of sympy's forms that stays in the printable functions: ``simplify`` may trade
    ``1 - tanh(u)**2`` for ``1 / cosh(u)**2``, which overflows in fp32 (and is not printed)."""
    for candidate in (sympy.simplify(e), sympy.factor_terms(e), e):
        if all(isinstance(f, _PRINTABLE) for f in candidate.atoms(sympy.Function)):
            return candidate
    raise NotImplementedError(f"derivative {e} uses functions the printers do not know")


# --------------------------------------------------------------------------------------------
# Printing: one printer, two targets (Triton, torch)
# --------------------------------------------------------------------------------------------


class _Printer:
    """Prints an expression of the supported functions as Python source for one target.

    Unsupported constructs raise ``NotImplementedError`` naming them: a new activation that needs a
    function not listed here needs it added (in both targets) before it can be used.
    """

    def __init__(self, target: str):
        assert target in ("triton", "torch")
        self.target = target

    def fn(self, name: str) -> str:
        if self.target == "triton":
            return {"exp": "tl.exp", "erf": "tl.math.erf", "sigmoid": "tl.sigmoid", "tanh": "_tanh",
                    "where": "tl.where", "sqrt": "tl.sqrt"}[name]
        return {"exp": "torch.exp", "erf": "torch.erf", "sigmoid": "torch.sigmoid", "tanh": "torch.tanh",
                "where": "torch.where", "sqrt": "torch.sqrt"}[name]

    def __call__(self, e) -> str:
        if isinstance(e, sympy.Symbol):
            return e.name
        if e.is_Number or (e.is_number and not e.free_symbols):
            value = float(e)
            return repr(value) if math.isfinite(value) else f"float({str(value)!r})"
        if isinstance(e, sympy.Add):
            return "(" + " + ".join(self(a) for a in e.args) + ")"
        if isinstance(e, sympy.Mul):
            num, den = [], []
            for a in e.args:
                if isinstance(a, sympy.Pow) and a.exp.is_number and a.exp < 0:
                    den.append(self(sympy.Pow(a.base, -a.exp)))
                else:
                    num.append(self(a))
            text = " * ".join(num) if num else "1.0"
            return f"({text} / ({' * '.join(den)}))" if den else f"({text})"
        if isinstance(e, sympy.Pow):
            base, exp = e.base, e.exp
            if exp.is_Integer and 0 < int(exp) <= 4:
                return "(" + " * ".join([self(base)] * int(exp)) + ")"
            if exp.is_Integer and -4 <= int(exp) < 0:
                return f"(1.0 / {self(sympy.Pow(base, -exp))})"
            if exp == sympy.Rational(1, 2):
                return f"{self.fn('sqrt')}({self(base)})"
            raise NotImplementedError(f"power {e} (only small integer powers and sqrt are printed)")
        if isinstance(e, Sigmoid):
            return f"{self.fn('sigmoid')}({self(e.args[0])})"
        if isinstance(e, sympy.exp):
            return f"{self.fn('exp')}({self(e.args[0])})"
        if isinstance(e, sympy.erf):
            return f"{self.fn('erf')}({self(e.args[0])})"
        if isinstance(e, sympy.tanh):
            return f"{self.fn('tanh')}({self(e.args[0])})"
        if isinstance(e, sympy.core.relational.Relational):
            return self.cond(e)
        if isinstance(e, sympy.Piecewise):
            (last, cond), rest = e.args[-1], e.args[:-1]
            if cond is not sympy.true:
                raise NotImplementedError(f"Piecewise without a final True branch: {e}")
            text = self(last)
            for branch, cond in reversed(rest):
                text = f"{self.fn('where')}({self.cond(cond)}, {self(branch)}, {text})"
            return text
        raise NotImplementedError(f"{type(e).__name__} in {e}: not printable for {self.target}")

    def cond(self, c) -> str:
        if isinstance(c, sympy.Symbol):  # a condition that sympy.cse named
            return c.name
        ops = {sympy.StrictGreaterThan: ">", sympy.GreaterThan: ">=", sympy.StrictLessThan: "<", sympy.LessThan: "<="}
        for cls, op in ops.items():
            if isinstance(c, cls):
                return f"({self(c.lhs)} {op} {self(c.rhs)})"
        raise NotImplementedError(f"condition {c}")

    def block(self, exprs: list, names: list, indent: str, keep: Optional[Sequence[str]] = None) -> str:
        """Statements computing ``exprs`` into ``names``, common subexpressions shared (sympy.cse).
        ``keep``: emit only the statements these names need, from the same shared form, so that a
        kernel computing ``f`` alone computes it with the same operations, in the same order, as
        one computing ``f`` and ``df`` (and so rounds it the same way)."""
        replacements, reduced = sympy.cse(exprs, symbols=sympy.numbered_symbols("t"))
        outputs = [(name, expr) for name, expr in zip(names, reduced) if keep is None or name in keep]
        needed = set().union(*(e.free_symbols for _, e in outputs)) if outputs else set()
        for sym, val in reversed(replacements):
            if sym in needed:
                needed |= val.free_symbols
        lines = [f"{indent}{sym.name} = {self(val)}" for sym, val in replacements if keep is None or sym in needed]
        lines += [f"{indent}{name} = {self(expr)}" for name, expr in outputs]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------

_TRITON_TEMPLATE = '''
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh from the sigmoid (robust at both ends: 1 and -1 exactly for large |x|).
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _mlp_{name}_fwd_kernel(
    g_ptr,  # gate [n_rows, n_cols], unit column stride
    u_ptr,  # up [n_rows, n_cols], unit column stride
    h_ptr,  # out: act(g) * u [n_rows, n_cols], contiguous
    stride_g_row,
    stride_u_row,
    n_cols,
    BLOCK_SIZE_N: tl.constexpr,
):
    """h = act(g) * u, computed in fp32, rounded once."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask = cols < n_cols
    x = tl.load(g_ptr + row * stride_g_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u_row + cols, mask=mask, other=0.0).to(tl.float32)
{forward}
    tl.store(h_ptr + row * n_cols + cols, (f * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mlp_{name}_bwd_kernel(
    dh_ptr,  # grad of h [n_rows, n_cols], unit column stride
    g_ptr,  # gate, as in the forward
    u_ptr,  # up, as in the forward
    dg_ptr,  # out: dh * u * act'(g) [n_rows, n_cols], contiguous
    du_ptr,  # out: dh * act(g) [n_rows, n_cols], contiguous
    stride_dh_row,
    stride_g_row,
    stride_u_row,
    n_cols,
    BLOCK_SIZE_N: tl.constexpr,
):
    """dg = dh * u * act'(g), du = dh * act(g); act(g) recomputed, not read."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    mask = cols < n_cols
    dh = tl.load(dh_ptr + row * stride_dh_row + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(g_ptr + row * stride_g_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u_row + cols, mask=mask, other=0.0).to(tl.float32)
{backward}
    tl.store(dg_ptr + row * n_cols + cols, (dh * u * df).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * n_cols + cols, (dh * f).to(du_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mlp_{name}_bwd_da_kernel(
    dh_ptr,  # grad of h [n_rows, n_cols], unit column stride
    g_ptr,  # gate, as in the forward
    u_ptr,  # up, as in the forward
    gl_ptr,  # G = s dY B of the down projection's adapters [n_rows, n_rank], unit column stride
    dg_ptr,  # out: dh * u * act'(g) [n_rows, n_cols], contiguous (may be dh's buffer)
    du_ptr,  # out: dh * act(g) [n_rows, n_cols], contiguous
    part_ptr,  # out: this program's rows' G^T h, fp32 [n_splits, n_rank, n_cols]
    stride_dh_row,
    stride_g_row,
    stride_u_row,
    stride_gl_row,
    n_rows,
    n_cols,
    n_rank,
    rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """dg, du as _mlp_{name}_bwd_kernel, and the down projection's dA = G^T h from the same tiles: h is
    recomputed in registers (rounded as the forward stored it), never written. Each program owns a
    column block of rows_per_program rows; its partial G^T h goes to part_ptr[program_id(1)]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    ranks = tl.arange(0, BLOCK_R)
    rmask = ranks < n_rank
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    row0 = tl.program_id(1).to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, BLOCK_M):
        rows = row0 + start + tl.arange(0, BLOCK_M)
        live = rows < n_rows
        mask = live[:, None] & cmask[None, :]
        dh = tl.load(dh_ptr + rows[:, None] * stride_dh_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(g_ptr + rows[:, None] * stride_g_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + rows[:, None] * stride_u_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
{backward_2d}
        tl.store(dg_ptr + rows[:, None] * n_cols + cols[None, :], (dh * u * df).to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + rows[:, None] * n_cols + cols[None, :], (dh * f).to(du_ptr.dtype.element_ty), mask=mask)
        h = tl.where(mask, f * u, 0.0).to(g_ptr.dtype.element_ty).to(gl_ptr.dtype.element_ty)
        gl = tl.load(gl_ptr + rows[:, None] * stride_gl_row + ranks[None, :], mask=live[:, None] & rmask[None, :], other=0.0)
        if DOT_FP32:  # fp32 inputs; and the interpreter, whose bf16 dot is wrong (exact products either way)
            acc += tl.dot(tl.trans(gl).to(tl.float32), h.to(tl.float32), input_precision="ieee")
        else:  # bf16/fp16 on the tensor cores, fp32 accumulation
            acc += tl.dot(tl.trans(gl), h)
    out = part_ptr + tl.program_id(1).to(tl.int64) * n_rank * n_cols + ranks[:, None] * n_cols + cols[None, :]
    tl.store(out, acc, mask=rmask[:, None] & cmask[None, :])
'''

_TORCH_TEMPLATE = '''
import torch


def _like(v, x):
    # A branch of constants (torch.where(c, 1.0, 0.0)) is in the default dtype, a constant a float.
    return v.to(x.dtype) if isinstance(v, torch.Tensor) else torch.full_like(x, v)


def forward(x):
{forward}
    return _like(f, x)


def forward_and_derivative(x):
{backward}
    return _like(f, x), _like(df, x)
'''


@dataclasses.dataclass(frozen=True)
class Activation:
    """One activation: its expression, its derived derivative, and the code emitted from them."""

    name: str
    expr: sympy.Expr

    @functools.cached_property
    def derivative(self) -> sympy.Expr:
        return derive(self.expr)

    @functools.cached_property
    def _forward_expr(self) -> sympy.Expr:
        # The expression in the derivative's simplified form, so that sympy.cse shares their terms.
        return _simplify(self.expr) if not isinstance(self.expr, sympy.Piecewise) else self.expr

    @functools.cached_property
    def triton_source(self) -> str:
        p = _Printer("triton")
        return _TRITON_TEMPLATE.format(
            name=self.name,
            # f in the forward kernel from the backward's shared form: the backward kernel that
            # recomputes h = act(g) * u for dA (bwd_da) must round it as the forward stored it
            # (gelu_tanh's two forms of the tanh argument differed in the last bit on the H200).
            forward=p.block([self._forward_expr, self.derivative], ["f", "df"], "    ", keep=["f"]),
            backward=p.block([self._forward_expr, self.derivative], ["f", "df"], "    "),
            backward_2d=p.block([self._forward_expr, self.derivative], ["f", "df"], "        "),
        )

    @functools.cached_property
    def torch_source(self) -> str:
        p = _Printer("torch")
        return _TORCH_TEMPLATE.format(
            forward=p.block([self._forward_expr, self.derivative], ["f", "df"], "    ", keep=["f"]),  # as the kernels
            backward=p.block([self._forward_expr, self.derivative], ["f", "df"], "    "),
        )

    @functools.cached_property
    def _torch_module(self) -> dict:
        return _load(self.torch_source, f"<slothc.derive torch {self.name}>")

    @functools.cached_property
    def _triton_module(self) -> dict:
        return _load(self.triton_source, f"<slothc.derive triton {self.name}>")

    # -- torch (CPU) path: fp32 compute, one rounding ----------------------------------------------

    def forward(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``act(g) * u`` in fp32, rounded to ``g``'s dtype."""
        return (self._torch_module["forward"](g.float()) * u.float()).to(g.dtype)

    def backward(self, dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dh * u * act'(g), dh * act(g))`` in fp32, rounded to ``g``'s and ``u``'s dtypes."""
        f, df = self._torch_module["forward_and_derivative"](g.float())
        dhf = dh.float()
        return (dhf * u.float() * df).to(g.dtype), (dhf * f).to(u.dtype)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """``act(x)`` alone, in ``x``'s dtype (computed in its dtype, for tests and references)."""
        return self._torch_module["forward"](x)

    def act_derivative(self, x: torch.Tensor) -> torch.Tensor:
        """``act'(x)`` in ``x``'s dtype."""
        return self._torch_module["forward_and_derivative"](x)[1]

    # -- Triton kernels ------------------------------------------------------------------------------

    @property
    def fwd_kernel(self):
        return self._triton_module[f"_mlp_{self.name}_fwd_kernel"]

    @property
    def bwd_kernel(self):
        return self._triton_module[f"_mlp_{self.name}_bwd_kernel"]

    @property
    def bwd_da_kernel(self):
        return self._triton_module[f"_mlp_{self.name}_bwd_da_kernel"]


def _load(source: str, filename: str) -> dict:
    """Execute generated ``source`` as a module. Its lines are registered with ``linecache`` so that
    ``inspect.getsource`` (which ``triton.jit`` uses to read a kernel) and tracebacks find them."""
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict = {"__name__": filename}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


ACTIVATIONS: dict[str, Activation] = {name: Activation(name, expr) for name, expr in EXPRESSIONS.items()}


def activation(name: str) -> Activation:
    """The activation called ``name``; a clear error listing the known ones otherwise."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}") from None


# How eager code spells each activation, for tests and the MLP pattern: name -> torch function.
def eager_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch.nn.functional as F

    return {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "relu2": lambda x: torch.square(F.relu(x)),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    }[name]
