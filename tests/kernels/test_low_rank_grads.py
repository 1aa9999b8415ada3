"""The LoRA backward's G and dB in one pass over dY (``lora_linear.low_rank_grads_triton``).

Checked against the BLAS path it replaces (``_low_rank_grads_blas``: two products, each reading
dY) and against float64 products of the same rounded operands (``dy.to(lora_dtype)``, s B rounded
to ``lora_dtype``, T), with ``testing.assert_matches_reference``: G and every adapter's dB, over
shapes, dtypes, ranks, several adapters a projection (side by side or interleaved with another
projection's), dY layouts, and a projection whose output got no gradient. The fixed cases below
take each of the kernel's four write paths (G and dB final or as partial sums); under the
interpreter the tiles are 16 wide, so the CI profile's small shapes reach all of them.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slothc import testing
from slothc.kernels import _launch
from slothc.kernels import lora_linear as lora_module
from tests.helpers import count_calls

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if not _launch.use_triton(torch.empty(0, device=DEVICE)):
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the kernel does not run here", allow_module_level=True)


def _make(n, outs, adapters, lora_dtype, dy_dtype, layout, seed, no_grad=(), b_dtype=None):
    """(dys, t, lora_a, lora_b, scaling, adapter_proj) for ``adapters = [(projection, rank, s), ...]``;
    B in ``b_dtype`` (fp32 adapters under autocast: B fp32, products in the autocast dtype)."""
    ranks = [r for _, r, _ in adapters]
    lora_a = [torch.empty((r, 4), device=DEVICE) for r in ranks]  # only their shapes are read
    lora_b = [testing.make_tensor((outs[p], r), b_dtype or lora_dtype, seed + i,
                                  device=DEVICE, scale=r**-0.5) for i, (p, r, _) in enumerate(adapters)]
    t = testing.make_tensor((n, sum(ranks)), lora_dtype, seed + 50, device=DEVICE)
    dys = [None if p in no_grad else testing.make_tensor((n, m), dy_dtype, seed + 60 + p, layout=layout, device=DEVICE)
           for p, m in enumerate(outs)]
    return dys, t, lora_a, lora_b, [s for *_, s in adapters], [p for p, _, _ in adapters]


def _reference64(dys, t, lora_a, lora_b, scaling, adapter_proj, lora_dtype):
    """float64 products of the rounded operands the BLAS path multiplies."""
    offsets = lora_module._offsets(lora_a)
    gs, dbs = [], []
    for i, p in enumerate(adapter_proj):
        if dys[p] is None:
            gs.append(torch.zeros((t.shape[0], lora_a[i].shape[0]), dtype=torch.float64, device=DEVICE))
            dbs.append(torch.zeros(lora_b[i].shape, dtype=torch.float64, device=DEVICE))
            continue
        dyl = dys[p].to(lora_dtype).double()
        sb = lora_module._scaled_b(lora_b, scaling, i, lora_dtype).double()
        gs.append(dyl @ sb)
        dbs.append(scaling[i] * (dyl.t() @ t[:, offsets[i] : offsets[i + 1]].double()))
    return torch.cat(gs, dim=1), dbs


def _check(n, outs, adapters, lora_dtype, dy_dtype=None, layout="contiguous", seed=0, no_grad=(), b_dtype=None):
    args = _make(n, outs, adapters, lora_dtype, dy_dtype or lora_dtype, layout, seed, no_grad, b_dtype)
    dys, t, lora_a, lora_b, scaling, proj = args
    assert lora_module.low_rank_kernel_fits(dys, t, lora_a, proj, lora_dtype, n)
    g, db = lora_module.low_rank_grads_triton(*args, lora_dtype, n)
    g_blas, db_blas = lora_module._low_rank_grads_blas(*args, lora_dtype, n)
    g64, db64 = _reference64(*args, lora_dtype)
    testing.assert_matches_reference(g, g_blas, g64, name="G")
    for i, (d, d_blas, d64) in enumerate(zip(db, db_blas, db64)):
        assert d.dtype == lora_b[i].dtype and d.is_contiguous()
        # dB is rounded to lora_dtype before it is stored in B's dtype, like the BLAS path's
        testing.assert_matches_reference(d, d_blas, d64, name=f"dB {i}", low_dtype=lora_dtype)
    for p in no_grad:  # a projection without a gradient: zeros, as the BLAS path gives
        for i in (i for i, q in enumerate(proj) if q == p):
            assert not db[i].any()
    return g, db


@st.composite
def cases(draw):
    scale = testing.size_scale()
    n_proj = draw(st.integers(1, 3))
    outs = [draw(st.integers(1, min(scale.max_cols, 600))) for _ in range(n_proj)]
    adapters = []
    for p in range(n_proj):
        for _ in range(draw(st.integers(1 if p == 0 else 0, 2))):
            adapters.append((p, draw(st.integers(1, 64)), draw(st.sampled_from([0.5, 1.0, 2.0, 16 / 7]))))
    if draw(st.booleans()):  # projections' adapters interleaved: not side by side in G
        adapters = draw(st.permutations(adapters))
    lora_dtype = draw(testing.dtypes())
    # fp32 dY with 16-bit adapters (cast on load) and 16-bit dY with fp32 adapters (PEFT's upcast)
    dy_dtype = draw(st.sampled_from([lora_dtype, torch.float32 if lora_dtype != torch.float32 else torch.bfloat16]))
    no_grad = (draw(st.integers(0, n_proj - 1)),) if n_proj > 1 and draw(st.booleans()) else ()
    b_dtype = draw(st.sampled_from([lora_dtype, torch.float32]))
    return dict(b_dtype=b_dtype, n=draw(st.integers(1, scale.max_rows * 8)), outs=outs, adapters=adapters, lora_dtype=lora_dtype,
                dy_dtype=dy_dtype, layout=draw(st.sampled_from(["contiguous", "padded", "transposed"])),
                seed=draw(testing.seeds()), no_grad=no_grad)


@given(case=cases())
def test_matches_blas_and_float64(case):
    _check(**case)


# (rows, columns): with the interpreter's 16-wide tiles, one column block and one row split, then
# several of either and both; on the GPU the same shapes scaled up by 32.
_PATHS = {"final_both": (16, 16), "partial_g": (16, 40), "partial_db": (150, 16), "partial_both": (150, 40)}


@pytest.mark.parametrize("path", list(_PATHS))
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_write_path(path, lora_dtype, monkeypatch):
    n, m = _PATHS[path]
    if not _launch.interpreting():
        n, m = n * 32, m * 32
    cfg = lora_module.low_rank_config(n, m, 16, DEVICE)
    want_g_final, want_db_final = path in ("final_both", "partial_db"), path in ("final_both", "partial_g")
    if _launch.interpreting():  # the shapes were chosen for the interpreter's tiles
        assert (cfg["n_col_blocks"] == 1, cfg["splits"] == 1) == (want_g_final, want_db_final)
    calls = count_calls(monkeypatch, lora_module, ["_sum_partials"])
    _check(n, [m], [(0, 16, 2.0)], lora_dtype, seed=7)
    assert calls["_sum_partials"] == (cfg["n_col_blocks"] > 1) + (cfg["splits"] > 1)


def test_one_token_rank_one_and_the_largest_rank():
    _check(1, [33], [(0, 1, 0.5)], torch.bfloat16)
    _check(40, [24, 8], [(0, lora_module.MAX_KERNEL_RANK - 1, 0.25), (0, 1, 2.0), (1, 16, 1.0)], torch.float32)


def test_a_rank_over_the_kernels_takes_the_blas_path(monkeypatch):
    dys, t, lora_a, lora_b, scaling, proj = _make(8, [16], [(0, lora_module.MAX_KERNEL_RANK + 1, 1.0)], torch.float32,
                                                  torch.float32, "contiguous", 1)
    assert not lora_module.low_rank_kernel_fits(dys, t, lora_a, proj, torch.float32, 8)
    calls = count_calls(monkeypatch, lora_module, ["low_rank_grads_triton", "_low_rank_grads_blas"])
    lora_module.low_rank_grads(dys, t, lora_a, lora_b, scaling, proj, torch.float32, 8)
    assert calls == {"_low_rank_grads_blas": 1}


def test_the_switch_takes_the_blas_path(monkeypatch):
    dys, t, lora_a, _, _, proj = _make(8, [16], [(0, 4, 1.0)], torch.bfloat16, torch.bfloat16, "contiguous", 2)
    assert lora_module.low_rank_kernel_fits(dys, t, lora_a, proj, torch.bfloat16, 8)
    monkeypatch.setattr(lora_module, "LOW_RANK_KERNEL", False)
    assert not lora_module.low_rank_kernel_fits(dys, t, lora_a, proj, torch.bfloat16, 8)


def test_same_bits_every_run():
    """No atomics: the partial sums are added in one order (on the GPU, several programs write them)."""
    args = _make(300, [200, 40], [(0, 16, 2.0), (1, 8, 0.5)], torch.bfloat16, torch.bfloat16, "contiguous", 3)
    first = lora_module.low_rank_grads_triton(*args, torch.bfloat16, 300)
    for _ in range(3):
        again = lora_module.low_rank_grads_triton(*args, torch.bfloat16, 300)
        assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


def test_the_ops_backward_launches_the_kernel(monkeypatch):
    """slothc::lora_linear's backward takes the kernel, so its tests (test_lora_linear.py, the MLP and
    QLoRA ops) test it too."""
    calls = count_calls(monkeypatch, lora_module, ["low_rank_grads_triton", "_low_rank_grads_blas"])
    x = testing.make_tensor((5, 24), torch.bfloat16, 4, device=DEVICE, requires_grad=True)
    w = [testing.make_tensor((m, 24), torch.bfloat16, 5 + m, device=DEVICE) for m in (16, 8)]
    a = [testing.make_tensor((4, 24), torch.float32, 9 + i, device=DEVICE, requires_grad=True) for i in range(2)]
    b = [testing.make_tensor((m, 4), torch.float32, 11 + m, device=DEVICE, requires_grad=True) for m in (16, 8)]
    outs = torch.ops.slothc.lora_linear(x, w, [None, None], a, b, [2.0, 2.0], [0, 1], torch.bfloat16, torch.float32,
                                        torch.bfloat16)
    sum(o.float().sum() for o in outs[:2]).backward()
    assert calls == {"low_rank_grads_triton": 1}
