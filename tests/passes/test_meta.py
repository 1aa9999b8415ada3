"""``slothc.passes.meta.propagate``: fake values for nodes a pass inserts, with symbolic sizes too."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv, StatelessSymbolicContext, DimDynamic

from slothc.passes.meta import propagate, val


def _symbolic(shape, dynamic_dims):
    mode = FakeTensorMode(shape_env=ShapeEnv())
    dims = [DimDynamic.DYNAMIC if i in dynamic_dims else DimDynamic.STATIC for i in range(len(shape))]
    return mode, mode.from_tensor(torch.randn(shape), symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))


def _graph_with(x_val, w_val, target):
    g = torch.fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    x.meta["example_value"], w.meta["example_value"] = x_val, w_val
    node = g.call_function(target, (x, w))
    g.output(node)
    return node


def test_linear_of_a_symbolic_input():
    """What the 4-bit pass inserts in the graph Dynamo recompiles for a second sequence length. On
    torch 2.11 the C++ body of ``linear`` (its ``matmul``) calls ``numel()`` and raised "Cannot call
    numel() on tensor with symbolic sizes/strides" (the 8B longest-sequence search on the H200)."""
    mode, x = _symbolic((2, 7, 16), dynamic_dims={1})
    w = mode.from_tensor(torch.randn(8, 16))
    node = _graph_with(x, w, torch.nn.functional.linear)
    assert propagate([node], node)
    out = val(node)
    assert isinstance(out.shape[1], torch.SymInt) and out.shape[0] == 2 and out.shape[2] == 8
    assert out.shape[1] == x.shape[1]  # the same symbol, not a new size


def test_ops_run_under_the_python_dispatcher():
    """As Dynamo runs them on fake values: composite ops then take their Python decompositions,
    which take symbolic sizes; their C++ bodies need not (the torch 2.11 failure above)."""
    seen = []

    def probe(x, w):
        seen.append(torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.PythonDispatcher))
        return x @ w.t()

    mode, x = _symbolic((3, 16), dynamic_dims={0})
    node = _graph_with(x, mode.from_tensor(torch.randn(4, 16)), probe)
    assert propagate([node], node)
    assert seen == [True]
