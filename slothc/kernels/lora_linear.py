"""LoRA linear: the frozen base matmul and the low-rank update in one op, with a derived backward.

One projection ``p`` with base weight ``W`` [M, K] (frozen), optional frozen bias ``b``, and adapters
``i`` with ``A_i`` [r_i, K], ``B_i`` [M, r_i] and scale ``s_i`` (PEFT's ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA)::

    Y = X W^T + b + sum_i s_i (X A_i^T) B_i^T

Backward (W and b frozen, so no dW, db). With ``T_i = X A_i^T`` [N, r_i] (saved by the forward) and
``G_i = s_i dY B_i`` [N, r_i]::

    dX   = dY W + sum_i G_i A_i          (dY W is the only big product; G_i A_i has rank r_i)
    dA_i = s_i (dY B_i)^T X = G_i^T X
    dB_i = s_i dY^T (X A_i^T) = s_i dY^T T_i

Several projections that read the same ``X`` (q/k/v, gate/up) are one call: the down-projections of
all their adapters are *one* matmul ``X [A_1; A_2; ...]^T`` (X read once for all of them), and in the
backward ``dX`` is accumulated over the projections into one buffer, with every ``G_i A_i`` in one
matmul ``[G_1, G_2, ...] [A_1; A_2; ...]``, and every ``dA_i`` in one ``[G_1, G_2, ...]^T X``.

Matmul order, so that each big operand is read as few times as possible:

- forward: ``T = X A^T`` (reads X), then per projection ``C = T (s B)^T (+ b)`` (small K = r) and
  ``Y = C + X W^T`` as one cuBLAS ``addmm`` (C read in its epilogue: the update costs one read of Y's
  size, no separate add pass). The scale is folded into the small ``B`` (``s B``: M x r values), not
  applied to Y.
- backward: ``G = dY (s B)`` (reads dY), ``dX = G A + dY W`` (``addmm``, one more per projection),
  ``dA = G^T X`` (reads X), ``dB = s dY^T T`` (reads dY).

Saved for the backward: X (needed for dA anyway) and the small T; the base output is not kept.

With PEFT's ``lora_dropout`` in training the adapters read ``Xa = dropout(X)``, computed by torch in
the graph (so its random mask is eager's) and passed as ``xa``: then ``T = Xa A^T``,
``dA = G^T Xa``, and the backward returns ``dX = dY W`` and ``dXa = G A`` apart (autograd takes
``dXa`` through the dropout and adds it to ``dX``); ``Xa`` is saved instead of ``X``.

Dtypes mirror what eager PEFT computes (``base_dtype``: the base linear's result, ``lora_dtype``: the
adapters' product, ``out_dtype``: PEFT's final ``result.to(torch_result_dtype)``). Under autocast
these are the autocast dtype while X, the adapters or W may be fp32: the op casts its operands to
them, as autocast would, and computes with fp32 accumulation (cuBLAS). Eager PEFT with fp32 adapters
under bf16 autocast casts X to fp32 and back around every LoRA branch (``x.to(lora_A.weight.dtype)``,
then autocast's cast to bf16): a lossless round trip that the op skips. Gradients come back in the
dtypes of X, A and B (fp32 for fp32 adapters), like autocast's cast backward gives them.

When the three dtypes are one (all bf16 under autocast, all fp32 without), the fused path above runs;
otherwise (e.g. a bf16 model with fp32 adapters and no autocast: eager computes the base product in
bf16 and the update in fp32 and adds in fp32) the base and the update are computed separately in their
dtypes and summed in the promoted dtype, like eager.

The op runs the same code on CPU and CUDA (the matmuls are the vendor BLAS); it is a custom op so that
Inductor treats it as one opaque call and AOTAutograd uses the backward above.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch


def _mm_plus_low_rank(p, q, l, r, bias=None, shape=None):
    """``p @ q + l @ r (+ bias)`` for the fused path (one dtype): ``l @ r`` (small K) first, then the
    big product accumulated onto it in place: cuBLAS reads it as C in the epilogue, overlapped with
    the compute. In place, because ``torch.addmm(c, p, q)`` into a new tensor first copies c there
    (a device-to-device copy of the whole output: measured 17 us a call at 8192 x 4096 on an H200).

    Measured against one Triton GEMM with the update in its epilogue on an H200 (bf16, 8192 tokens,
    r=16; bench/results/2026-12-01-h200-lora-epilogue-trial.jsonl): the Triton kernel reached 76-88%
    of the matmul peak where this composition reached 81-97%, so it was dropped.

    ``shape``: the result's shape (leading dims of the input), allocated as such, so that it is not a
    view (autograd forbids in-place changes of a view returned by a multi-output function).
    """
    out = torch.empty((*shape[:-1], shape[-1]) if shape else (p.shape[0], q.shape[1]), dtype=l.dtype, device=l.device)
    c = out.view(p.shape[0], q.shape[1])
    if bias is not None:
        torch.addmm(bias, l, r, out=c)
    else:
        torch.mm(l, r, out=c)
    c.addmm_(p, q)
    return out


# --------------------------------------------------------------------------------------------
# Layout of one call: projections, and adapters assigned to them
# --------------------------------------------------------------------------------------------


def _groups(adapter_proj: Sequence[int], n_proj: int) -> list[list[int]]:
    """Adapter indices of each projection."""
    groups: list[list[int]] = [[] for _ in range(n_proj)]
    for i, p in enumerate(adapter_proj):
        if not 0 <= p < n_proj:
            raise ValueError(f"slothc::lora_linear: adapter {i} belongs to projection {p}, but there are {n_proj}")
        groups[p].append(i)
    return groups


def stacked_a(lora_a: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``[A_1; A_2; ...]`` [sum r, K] in ``dtype`` (one adapter: no copy beyond the cast)."""
    return torch.cat([a.to(dtype) for a in lora_a]) if len(lora_a) > 1 else lora_a[0].to(dtype)


def _offsets(lora_a: Sequence[torch.Tensor]) -> list[int]:
    offsets = [0]
    for a in lora_a:
        offsets.append(offsets[-1] + a.shape[0])
    return offsets


def _check(x, weight_shapes, biases, lora_a, lora_b, scaling, adapter_proj, xa=None) -> None:
    """``weight_shapes``: each projection's ``(out, in)`` (the weights themselves may not exist yet:
    the QLoRA op dequantises them when first read)."""
    if xa is not None and tuple(xa.shape) != tuple(x.shape):
        raise ValueError(f"slothc::lora_linear: xa has shape {tuple(xa.shape)}, expected x's {tuple(x.shape)}")
    if len(weight_shapes) == 0:
        raise ValueError("slothc::lora_linear needs at least one projection")
    if len(biases) != len(weight_shapes):
        raise ValueError(f"slothc::lora_linear: {len(biases)} biases for {len(weight_shapes)} projections (use None for none)")
    if not len(lora_a) == len(lora_b) == len(scaling) == len(adapter_proj):
        raise ValueError(
            f"slothc::lora_linear: lora_a, lora_b, scaling and adapter_proj must have one entry per adapter, "
            f"got {len(lora_a)}, {len(lora_b)}, {len(scaling)}, {len(adapter_proj)}"
        )
    k = x.shape[-1]
    for p, (w, b) in enumerate(zip(weight_shapes, biases)):
        if len(w) != 2 or w[1] != k:
            raise ValueError(f"slothc::lora_linear: weight {p} has shape {tuple(w)}, expected (out, {k})")
        if b is not None and tuple(b.shape) != (w[0],):
            raise ValueError(f"slothc::lora_linear: bias {p} has shape {tuple(b.shape)}, expected ({w[0]},)")
    groups = _groups(adapter_proj, len(weight_shapes))
    for p, members in enumerate(groups):
        for i in members:
            a, b = lora_a[i], lora_b[i]
            if a.dim() != 2 or a.shape[1] != k:
                raise ValueError(f"slothc::lora_linear: lora_a {i} has shape {tuple(a.shape)}, expected (r, {k})")
            if tuple(b.shape) != (weight_shapes[p][0], a.shape[0]):
                raise ValueError(
                    f"slothc::lora_linear: lora_b {i} has shape {tuple(b.shape)}, expected ({weight_shapes[p][0]}, {a.shape[0]})"
                )


@contextlib.contextmanager
def _no_autocast(x: torch.Tensor):
    # The op computes in the dtypes it is given; an ambient autocast (the caller's) must not recast
    # the matmuls inside it. No autograd either: the op's backward is its own (and out= matmuls
    # refuse inputs that require grad when the implementation is called directly).
    with torch.autocast(x.device.type, enabled=False), torch.no_grad():
        yield


# --------------------------------------------------------------------------------------------
# Reference: eager PEFT's math, term by term (the spec; tests compare the op against it)
# --------------------------------------------------------------------------------------------


def lora_linear_reference(x, weights, biases, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype):
    """What eager PEFT computes for each projection: ``(base + sum_i (x A_i^T B_i^T) * s_i).to(out_dtype)``
    with ``base`` in ``base_dtype`` and each update in ``lora_dtype`` (differentiable; plain torch)."""
    outs = []
    with torch.autocast(x.device.type, enabled=False):  # differentiable: no _no_autocast here
        for p, members in enumerate(_groups(adapter_proj, len(weights))):
            b = biases[p]
            result = torch.nn.functional.linear(
                x.to(base_dtype), weights[p].to(base_dtype), b.to(base_dtype) if b is not None else None
            )
            for i in members:
                xl = x.to(lora_dtype)
                update = torch.nn.functional.linear(torch.nn.functional.linear(xl, lora_a[i].to(lora_dtype)), lora_b[i].to(lora_dtype))
                result = result + update * scaling[i]
            outs.append(result.to(out_dtype))
    return outs


# --------------------------------------------------------------------------------------------
# The implementation (forward and backward)
# --------------------------------------------------------------------------------------------


def _scaled_b(lora_b, scaling, i, dtype):
    # s B in B's dtype (one rounding: the product is computed in fp32), then cast like autocast would.
    return (lora_b[i] * scaling[i]).to(dtype) if scaling[i] != 1.0 else lora_b[i].to(dtype)


def lora_linear_fwd(x, weights, biases, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, xa=None,
                    sum_dtype=None, check=True):
    """``([Y_p for each projection], T)``; ``T = Xa [A_1; A_2; ...]^T`` [N, sum r] in ``lora_dtype``,
    ``Xa`` the adapters' input: ``xa`` if given (PEFT's dropout of x in training), else x.
    ``sum_dtype``: the dtype base and update are added in when the dtypes differ (default: their
    promotion, as ``lora.Linear`` adds them; PEFT's 4-bit layer adds them in the output dtype).

    ``weights`` is read once per projection, in order (``weights[p]``): it may be a sequence that
    makes each weight when asked (the QLoRA op dequantises there, so that no full-precision weight
    outlives the call); such a caller checks the shapes itself (``check=False``)."""
    if check:
        _check(x, [tuple(w.shape) for w in weights], biases, lora_a, lora_b, scaling, adapter_proj, xa)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    xa2 = xa.reshape(-1, k) if xa is not None else x2
    n = x2.shape[0]
    groups = _groups(adapter_proj, len(weights))
    offsets = _offsets(lora_a)
    fused = base_dtype == lora_dtype == out_dtype
    with _no_autocast(x):
        if lora_a:
            a_all = stacked_a(lora_a, lora_dtype)
            xl = xa2.to(lora_dtype)
            t = xl @ a_all.t()
        else:
            t = x2.new_empty((n, 0), dtype=lora_dtype)
        xb = xl if lora_a and xa is None and base_dtype == lora_dtype else x2.to(base_dtype)
        outs = []
        for p, members in enumerate(groups):
            w, b = weights[p].to(base_dtype), biases[p]
            m = w.shape[0]
            if members:
                cols = [slice(offsets[i], offsets[i + 1]) for i in members]
                t_p = t[:, cols[0]] if len(members) == 1 else torch.cat([t[:, c] for c in cols], dim=1)
                scaled = [_scaled_b(lora_b, scaling, i, lora_dtype) for i in members]
                b_p = scaled[0] if len(scaled) == 1 else torch.cat(scaled, dim=1)  # no copy for one adapter
            # Each output is allocated in its final shape, never a view (see _mm_plus_low_rank).
            bias_b = b.to(base_dtype) if b is not None else None
            if fused and members:
                y = _mm_plus_low_rank(xb, w.t(), t_p, b_p.t(), bias_b, shape=(*lead, m))
            elif fused:
                y = torch.nn.functional.linear(xb.reshape(*lead, k), w, bias_b)
            else:
                y = torch.nn.functional.linear(xb.reshape(*lead, k), w, bias_b)
                if members:
                    promoted = sum_dtype or torch.promote_types(base_dtype, lora_dtype)
                    y = y.to(promoted) + (t_p @ b_p.t()).view(*lead, m).to(promoted)
                y = y.to(out_dtype)
            outs.append(y)
    return outs, t


def low_rank_grads(dys, t, lora_a, lora_b, scaling, adapter_proj, lora_dtype, n):
    """``(G, [dB_i])`` of the backward (module docstring): ``G = [s_i dY_p B_i for every adapter i]``
    [N, sum r] in ``lora_dtype`` (None without adapters), ``dB_i = s_i dY_p^T T_i``. ``dys``: each
    projection's [N, M_p] gradient, or None where it got none. Called with autocast off."""
    offsets = _offsets(lora_a)
    dyls = [dy.to(lora_dtype) if dy is not None else None for dy in dys]
    gs, db = [], []
    for i, p in enumerate(adapter_proj):
        dyl = dyls[p]
        if dyl is None:  # the projection's output got no gradient
            gs.append(t.new_zeros((n, lora_a[i].shape[0]), dtype=lora_dtype))
            db.append(torch.zeros_like(lora_b[i]))
            continue
        gs.append(dyl @ _scaled_b(lora_b, scaling, i, lora_dtype))
        t_i = t[:, offsets[i] : offsets[i + 1]]
        if scaling[i] != 1.0:
            # s dY^T T rounded once: the BLAS scales its fp32 accumulator (alpha; beta = 0
            # ignores the uninitialised input), where the product rounded and then scaled would
            # round twice (a bf16 ulp off eager's on a small sum; found on the GPU)
            db_i = torch.empty((dyl.shape[1], t_i.shape[1]), dtype=lora_dtype, device=t.device)
            torch.addmm(db_i, dyl.t(), t_i, beta=0, alpha=scaling[i], out=db_i)
        else:
            db_i = dyl.t() @ t_i
        db.append(db_i.to(lora_b[i].dtype))
    g_all = (gs[0] if len(gs) == 1 else torch.cat(gs, dim=1)) if offsets[-1] else None
    return g_all, db


def lora_linear_bwd(grads, x, t, weights, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, need_dx,
                    split=False, need_dxa=False, x_dtype=None):
    """``(dX or None, dXa or None, [dA_i], [dB_i])`` of :func:`lora_linear_fwd` (module docstring).

    ``x`` is the adapters' input (``Xa``). ``split``: the forward had a separate ``xa``; then
    ``dX = sum_p dY_p W_p`` (base path only, in ``x_dtype``) and ``dXa = G A`` are returned apart
    (autograd takes dXa through the dropout and adds it to dX). Otherwise ``dX`` is their sum.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    n = x2.shape[0]
    groups = _groups(adapter_proj, len(weights))
    offsets = _offsets(lora_a)
    r_total = offsets[-1]
    fused = base_dtype == lora_dtype == out_dtype
    with _no_autocast(x):
        dys = [g.reshape(n, -1) if g is not None else None for g in grads]
        g_all, db = low_rank_grads(dys, t, lora_a, lora_b, scaling, adapter_proj, lora_dtype, n)
        da = []
        if r_total:
            da_all = g_all.t() @ x2.to(lora_dtype)
            # Outputs of a custom op may not alias each other: slices of da_all are copied out.
            copy = len(lora_a) > 1
            da = [da_all[offsets[i] : offsets[i + 1]].to(lora_a[i].dtype, copy=copy) for i in range(len(lora_a))]
        dx = dxa = None
        wants_g_a = r_total and (need_dx and not split or split and need_dxa)
        a_all = stacked_a(lora_a, lora_dtype) if wants_g_a else None
        # Lazily: each weight is read (made, for the QLoRA op) once, in the one loop below that runs.
        projections = ((dys[p], weights[p]) for p in range(len(weights)) if dys[p] is not None)
        if split:
            if need_dxa:
                dxa = (g_all @ a_all if r_total else x2.new_zeros((n, k), dtype=lora_dtype)).to(x.dtype).view(*lead, k)
            if need_dx:
                acc = None
                for dy, w in projections:
                    wb = w.to(base_dtype)
                    acc = acc.addmm_(dy.to(base_dtype), wb) if acc is not None else dy.to(base_dtype) @ wb
                dx = (acc if acc is not None else x2.new_zeros((n, k), dtype=base_dtype)).to(x_dtype or x.dtype).view(*lead, k)
        elif need_dx:
            if fused:
                acc = None
                for j, (dy, w) in enumerate(projections):
                    wb = w.to(base_dtype)
                    if j == 0 and r_total:
                        acc = _mm_plus_low_rank(dy, wb, g_all, a_all)
                    else:
                        acc = acc.addmm_(dy, wb) if acc is not None else dy @ wb
                if acc is None and r_total:
                    acc = g_all @ a_all
                dx = acc if acc is not None else x2.new_zeros((n, k), dtype=base_dtype)
            else:
                promoted = torch.promote_types(base_dtype, lora_dtype)
                acc = (g_all @ a_all).to(promoted) if r_total else x2.new_zeros((n, k), dtype=promoted)
                for dy, w in projections:
                    acc = acc + (dy.to(base_dtype) @ w.to(base_dtype)).to(promoted)
                dx = acc
            dx = dx.to(x.dtype).view(*lead, k)
    return dx, dxa, da, db


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("slothc::lora_linear", mutates_args=())
def lora_linear(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[Optional[torch.Tensor]],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    adapter_proj: list[int],
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    out_dtype: torch.dtype,
    xa: Optional[torch.Tensor] = None,
) -> list[torch.Tensor]:
    """``[Y_0, ..., Y_{P-1}, T]``: one output per projection (see the module docstring), then the
    saved low-rank product ``T`` (for the backward; the graph does not use it). ``xa``: the
    adapters' input when it is not ``x`` (PEFT's ``lora_dropout`` in training, computed by torch's
    own dropout in the graph, so that its random mask is eager's)."""
    outs, t = lora_linear_fwd(x, weights, biases, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, xa)
    return [*outs, t]


def fake_outputs(x, weights, lora_a, lora_dtype, out_dtype) -> list[torch.Tensor]:
    """Empty outputs of the forward (also slothc::mlp's, with h for x): one per projection, then T."""
    lead = x.shape[:-1]
    n = 1
    for s in lead:
        n = n * s
    outs = [x.new_empty((*lead, w.shape[0]), dtype=out_dtype) for w in weights]
    r_total = sum(a.shape[0] for a in lora_a)
    return [*outs, x.new_empty((n, r_total), dtype=lora_dtype)]


@lora_linear.register_fake
def _lora_linear_fake(x, weights, biases, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, xa=None):
    _check(x, [tuple(w.shape) for w in weights], biases, lora_a, lora_b, scaling, adapter_proj, xa)
    return fake_outputs(x, weights, lora_a, lora_dtype, out_dtype)


@torch.library.custom_op("slothc::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    grads: list[Optional[torch.Tensor]],
    x: torch.Tensor,
    t: torch.Tensor,
    weights: list[torch.Tensor],
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    adapter_proj: list[int],
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    out_dtype: torch.dtype,
    need_dx: bool,
    split: bool = False,
    need_dxa: bool = False,
    x_dtype: Optional[torch.dtype] = None,
) -> list[torch.Tensor]:
    """``[dX, dXa, dA_0, ..., dB_0, ...]`` of ``slothc::lora_linear`` (``x``: the adapters' input;
    ``split``: the forward had a separate ``xa``, see :func:`lora_linear_bwd`); ``dX`` and ``dXa``
    are empty tensors where not asked for."""
    dx, dxa, da, db = lora_linear_bwd(grads, x, t, weights, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype,
                                      out_dtype, need_dx, split, need_dxa, x_dtype)
    empty = x.new_empty(0)
    return [dx if dx is not None else empty, dxa if dxa is not None else x.new_empty(0), *da, *db]


@lora_linear_backward.register_fake
def _lora_linear_backward_fake(grads, x, t, weights, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype,
                               need_dx, split=False, need_dxa=False, x_dtype=None):
    dx = x.new_empty(x.shape, dtype=(x_dtype or x.dtype) if split else x.dtype) if need_dx else x.new_empty(0)
    dxa = x.new_empty(x.shape) if split and need_dxa else x.new_empty(0)
    return [dx, dxa, *[torch.empty_like(a) for a in lora_a], *[torch.empty_like(b) for b in lora_b]]


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_a, lora_b, scaling, adapter_proj, base_dtype, lora_dtype, out_dtype, xa = inputs
    t = output[-1]
    ctx.n_proj, ctx.n_adapters = len(weights), len(lora_a)
    ctx.bias_has_none = any(b is None for b in biases)
    ctx.split, ctx.x_dtype = xa is not None, x.dtype
    # The backward reads the adapters' input (for dA) and never the base input (W is frozen).
    ctx.save_for_backward(xa if xa is not None else x, t, *weights, *lora_a, *lora_b)
    ctx.config = (list(scaling), list(adapter_proj), base_dtype, lora_dtype, out_dtype)


def _backward(ctx, grads):
    x, t, *rest = ctx.saved_tensors
    weights = rest[: ctx.n_proj]
    lora_a = rest[ctx.n_proj : ctx.n_proj + ctx.n_adapters]
    lora_b = rest[ctx.n_proj + ctx.n_adapters :]
    scaling, adapter_proj, base_dtype, lora_dtype, out_dtype = ctx.config
    need_dx = ctx.needs_input_grad[0]
    need_dxa = ctx.split and ctx.needs_input_grad[10]
    out = torch.ops.slothc.lora_linear_backward(
        list(grads[: ctx.n_proj]), x, t, list(weights), list(lora_a), list(lora_b), scaling, adapter_proj,
        base_dtype, lora_dtype, out_dtype, need_dx, ctx.split, need_dxa, ctx.x_dtype,
    )
    dx = out[0] if need_dx else None
    dxa = out[1] if need_dxa else None
    da = list(out[2 : 2 + ctx.n_adapters])
    db = list(out[2 + ctx.n_adapters :])
    frozen = [None] * ctx.n_proj  # W and b: no gradient (the pass only fuses frozen ones)
    # torch.library matches the structure of the inputs: a Tensor?[] holding a None is one leaf.
    no_bias = None if ctx.bias_has_none else list(frozen)
    no_adapters = [] if not ctx.n_adapters else None  # an empty list input needs an empty list back
    grads_in = (dx, frozen, no_bias, da, db, no_adapters, no_adapters, None, None, None)
    # The structure follows the arguments as passed: xa is passed only when there is one.
    return (*grads_in, dxa) if ctx.split else grads_in


torch.library.register_autograd("slothc::lora_linear", _backward, setup_context=_setup_context)
