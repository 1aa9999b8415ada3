"""slothc::rope against Hugging Face's own rotary code (rotate_half, interleaved, partial rotary).

The eager references are transformers' functions: Llama's ``apply_rotary_pos_emb`` (rotate_half,
``unsqueeze_dim``), Cohere's (interleaved pairs), DeepSeek-V3's ``apply_rotary_pos_emb_interleave``
(interleaved pairs in, halves out, one angle a pair: the op's ``deinterleave``), GPT-OSS's
(halves, one angle a pair) and the partial-rotary split of Phi-3 / GPT-NeoX /
StableLM (``cat([rotate(x[..., :r]), x[..., r:]])``). q and k come as the models make them: views of
one projection's output (``[B, S, H*D] -> [B, S, H, D]``, transposed for heads-first attention), or
of a fused qkv projection (rows not adjacent). cos and sin are real rotary tables (cos/sin repeated
over each pair) or arbitrary values (the op's formulas do not assume the repetition). On CPU the
kernel runs in the Triton interpreter; the "torch" path is the reference CPU tensors take without it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as cohere_apply_rotary_pos_emb
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave as deepseek_apply_rotary_pos_emb
from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb as gpt_oss_apply_rotary_pos_emb
from transformers.models.gptj.modeling_gptj import rotate_every_two
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary_pos_emb

from slothc import testing
from slothc.kernels import rope as rope_module
from tests.helpers import count_calls

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEAD_DIMS = (64, 80, 96, 128, 256)
STYLES = ("llama", "gptj", "cohere", "deepseek", "gpt_oss")
INTERLEAVED_TABLES = ("gptj", "cohere")  # cos/sin repeated over each pair (else over the halves)
HALF_TABLES = ("deepseek", "gpt_oss")  # the model reads one angle a pair: the first half of the table


def _gptj_apply(q, k, cos, sin, unsqueeze_dim):
    """GPT-J's rotation (``rotate_every_two``: interleaved pairs, no casts) with Llama's broadcasting."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_every_two(q) * sin), (k * cos) + (rotate_every_two(k) * sin)


def _apply(style):
    if style == "llama":  # rotate_half
        return lambda q, k, cos, sin, unsqueeze_dim: llama_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    if style == "cohere":  # interleaved, computed in fp32 and cast back to q's dtype
        return lambda q, k, cos, sin, unsqueeze_dim: cohere_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    if style == "deepseek":  # slices its [.., r] tables to [.., r/2] itself
        return lambda q, k, cos, sin, unsqueeze_dim: deepseek_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    if style == "gpt_oss":  # its rotary module makes [.., r/2] tables
        return lambda q, k, cos, sin, unsqueeze_dim: gpt_oss_apply_rotary_pos_emb(
            q, k, cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2], unsqueeze_dim=unsqueeze_dim)
    return _gptj_apply


def eager_rope(q, k, cos, sin, rotary_dim, style, unsqueeze_dim):
    """HF's rotation (``style``) on the first ``rotary_dim`` channels, the rest passed through."""
    apply = _apply(style)
    k_in = q if k is None else k
    q_rot, k_rot = apply(q[..., :rotary_dim], k_in[..., :rotary_dim], cos, sin, unsqueeze_dim)
    outs = [torch.cat([q_rot, q[..., rotary_dim:]], dim=-1)]
    if k is not None:
        outs.append(torch.cat([k_rot, k[..., rotary_dim:]], dim=-1))
    return outs


def fused_rope(q, k, cos, sin, rotary_dim, style, unsqueeze_dim):
    """The op as the pass calls it for ``style`` (one angle a pair: the half table repeated over the halves)."""
    out_dtype = q.dtype if style == "cohere" else None
    if style in HALF_TABLES:
        half = cos.shape[-1] // 2
        cos, sin = (torch.cat((t[..., :half], t[..., :half]), -1) for t in (cos, sin))
    c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    interleaved = style in INTERLEAVED_TABLES or style == "deepseek"
    return torch.ops.slothc.rope(q, k, c, s, rotary_dim, interleaved, out_dtype, style == "deepseek")


def rotary_tables(batch, seq, rotary_dim, dtype, seed, interleaved, arbitrary=False):
    """cos/sin ``[batch, seq, rotary_dim]`` as a rotary embedding module makes them (or arbitrary values)."""
    g = torch.Generator().manual_seed(seed + 7)
    if arbitrary:
        cos, sin = (torch.randn(batch, seq, rotary_dim, generator=g) for _ in range(2))
    else:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        positions = torch.randint(0, 4096, (batch, seq), generator=g).float()
        freqs = positions[..., None] * inv_freq
        emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
    return cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)


def projected(batch, seq, heads, head_dim, dtype, seed, form, heads_first, extra=0):
    """q or k as attention makes it: ``linear(x).view(B, S, H, D)`` (transposed if heads-first)."""
    width = heads * head_dim
    if form == "fused_qkv":  # one slice of a wider projection: rows not adjacent
        t = testing.make_tensor((batch, seq, width + extra + 3), dtype, seed, device=DEVICE)[..., :width]
    else:
        t = testing.make_tensor((batch, seq, width), dtype, seed, device=DEVICE)
    t = t.unflatten(-1, (heads, head_dim))
    if heads_first:
        t = t.transpose(1, 2)
    if form == "contiguous":
        t = t.contiguous()
    return t.detach().requires_grad_()


@st.composite
def rope_cases(draw):
    scale = testing.size_scale()
    head_dim = draw(st.one_of(st.sampled_from(HEAD_DIMS), st.integers(1, 40).map(lambda n: 2 * n)))
    rotary = draw(st.sampled_from(["full", "quarter", "any"]))
    if rotary == "full":
        rotary_dim = head_dim
    elif rotary == "quarter" and head_dim % 8 == 0:
        rotary_dim = head_dim // 4
    else:
        rotary_dim = 2 * draw(st.integers(1, head_dim // 2))  # half may be odd: 2 * 9 = 18
    kv_heads = draw(st.integers(1, 4))
    q_heads = kv_heads * draw(st.sampled_from([1, 2, 4, 8]))
    max_tokens = max(1, scale.max_rows * 4)
    batch = draw(st.integers(1, 2))
    seq = draw(st.one_of(st.just(1), st.integers(1, max(1, max_tokens // batch))))
    precision = draw(st.sampled_from(["fp32", "bf16", "fp16", "autocast"]))
    return dict(
        head_dim=head_dim, rotary_dim=rotary_dim, q_heads=q_heads, kv_heads=kv_heads, batch=batch, seq=seq,
        precision=precision, style=draw(st.sampled_from(STYLES)), heads_first=draw(st.booleans()),
        form=draw(st.sampled_from(["contiguous", "transposed", "fused_qkv"])), with_k=draw(st.booleans()),
        cos_batch=draw(st.sampled_from(["batch", "broadcast"])), arbitrary=draw(st.booleans()), seed=draw(testing.seeds()),
    )


def _inputs(case):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "autocast": torch.bfloat16}[case["precision"]]
    # Under autocast the projections are bf16 and the rotary tables stay fp32: the result is fp32.
    table_dtype = torch.float32 if case["precision"] == "autocast" else dtype
    b, s, d, seed = case["batch"], case["seq"], case["head_dim"], case["seed"]
    q = projected(b, s, case["q_heads"], d, dtype, seed, case["form"], case["heads_first"], extra=2 * case["kv_heads"] * d)
    k = projected(b, s, case["kv_heads"], d, dtype, seed + 1, case["form"], case["heads_first"]) if case["with_k"] else None
    cos_b = b if case["cos_batch"] == "batch" else 1
    cos, sin = rotary_tables(cos_b, s, case["rotary_dim"], table_dtype, seed, case["style"] in INTERLEAVED_TABLES, case["arbitrary"])
    return q, k, cos, sin


@pytest.mark.parametrize("path", ["kernel", "torch"])
@given(case=rope_cases())
def test_rope_matches_eager(path, case):
    q, k, cos, sin = _inputs(case)
    args = (case["rotary_dim"], case["style"], 1 if case["heads_first"] else 2)
    with pytest.MonkeyPatch.context() as mp:
        if path == "torch":
            mp.setattr(rope_module, "_use_kernel", lambda xs, cos, sin: False)
        testing.check_against_eager(
            lambda q, k, cos, sin: fused_rope(q, k, cos, sin, *args),
            lambda q, k, cos, sin: eager_rope(q, k, cos, sin, *args),
            q, k, cos, sin, seed=case["seed"],
        )


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (80, 80), (96, 96), (128, 128), (256, 256), (80, 20), (96, 18), (64, 2)])
def test_head_dims_and_rotary_dims(head_dim, rotary_dim, style):
    # Every head dim of the issue, partial rotary with an odd half (18 / 2 = 9) and a single pair.
    case = dict(head_dim=head_dim, rotary_dim=rotary_dim, q_heads=4, kv_heads=2, batch=2, seq=3, precision="bf16",
                style=style, heads_first=True, form="transposed", with_k=True, cos_batch="batch",
                arbitrary=False, seed=1)
    q, k, cos, sin = _inputs(case)
    testing.check_against_eager(
        lambda q, k, cos, sin: fused_rope(q, k, cos, sin, rotary_dim, style, 1),
        lambda q, k, cos, sin: eager_rope(q, k, cos, sin, rotary_dim, style, 1),
        q, k, cos, sin, seed=1,
    )


def test_result_keeps_the_input_layout():
    """Like eager's elementwise result: q's strides (a transposed view stays one), the promoted dtype."""
    case = dict(head_dim=16, rotary_dim=16, q_heads=4, kv_heads=2, batch=2, seq=5, precision="autocast", style="llama",
                heads_first=True, form="transposed", with_k=True, cos_batch="broadcast", arbitrary=False, seed=0)
    q, k, cos, sin = _inputs(case)
    q_out, k_out = fused_rope(q, k, cos, sin, 16, "llama", 1)
    e_q, e_k = eager_rope(q, k, cos, sin, 16, "llama", 1)
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()
    assert q_out.dtype == e_q.dtype == torch.float32 and k_out.dtype == e_k.dtype == torch.float32


def test_one_launch_rotates_q_and_k(monkeypatch):
    from slothc.kernels import _launch

    if not (torch.cuda.is_available() or _launch.interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    calls = count_calls(monkeypatch, rope_module, ["rope_launch"])
    case = dict(head_dim=16, rotary_dim=8, q_heads=4, kv_heads=1, batch=1, seq=3, precision="fp16", style="gptj",
                heads_first=False, form="contiguous", with_k=True, cos_batch="batch", arbitrary=False, seed=0)
    q, k, cos, sin = _inputs(case)
    q_out, k_out = fused_rope(q, k, cos, sin, 8, "gptj", 2)
    assert calls["rope_launch"] == 1
    (q_out.float().sum() + k_out.float().sum()).backward()
    assert calls["rope_launch"] == 2 and q.grad is not None and k.grad is not None


@pytest.mark.parametrize("grad_layout", ["sdpa", "contiguous"])
def test_gradient_in_the_layout_of_q(grad_layout):
    """dq is written in q's layout whatever the upstream gradient's (SDPA's backward keeps its inputs'
    layout, a matmul attention's is contiguous): the view that made q then reads it without a copy."""
    case = dict(head_dim=16, rotary_dim=16, q_heads=4, kv_heads=2, batch=2, seq=5, precision="bf16", style="llama",
                heads_first=True, form="transposed", with_k=True, cos_batch="batch", arbitrary=False, seed=0)
    q, k, cos, sin = _inputs(case)
    q_out, k_out = fused_rope(q, k, cos, sin, 16, "llama", 1)
    dq, dk = torch.randn_like(q_out), torch.randn_like(k_out)
    if grad_layout == "contiguous":
        dq, dk = dq.contiguous(), dk.contiguous()
    seen = {}
    q.register_hook(lambda g: seen.update(q=g.stride()))
    k.register_hook(lambda g: seen.update(k=g.stride()))
    torch.autograd.backward([q_out, k_out], [dq, dk])
    assert seen == {"q": q.stride(), "k": k.stride()}


def test_saves_only_cos_and_sin():
    """The backward needs nothing of q or k: it rotates the incoming gradients."""
    case = dict(head_dim=16, rotary_dim=16, q_heads=2, kv_heads=2, batch=1, seq=4, precision="fp32", style="llama",
                heads_first=True, form="transposed", with_k=True, cos_batch="batch", arbitrary=False, seed=0)
    q, k, cos, sin = _inputs(case)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        q_out, k_out = fused_rope(q, k, cos, sin, 16, "llama", 1)
    assert saved == [(1, 1, 4, 16), (1, 1, 4, 16)]


def test_only_one_output_used():
    """A graph that uses only k's result: q's output gets no gradient, k's is eager's."""
    q, k, cos, sin = _inputs(dict(head_dim=8, rotary_dim=8, q_heads=2, kv_heads=1, batch=1, seq=3, precision="fp32",
                                  style="llama", heads_first=True, form="contiguous", with_k=True,
                                  cos_batch="batch", arbitrary=True, seed=3))
    q_out, k_out = fused_rope(q, k, cos, sin, 8, "llama", 1)
    (dk,) = torch.autograd.grad(k_out.sum(), [k])
    e_q, e_k = eager_rope(q, k, cos, sin, 8, "llama", 1)
    (edk,) = torch.autograd.grad(e_k.sum(), [k])
    torch.testing.assert_close(dk, edk)


@pytest.mark.parametrize("with_k", [False, True])
@pytest.mark.parametrize("heads_first", [False, True])
def test_opcheck_rope(with_k, heads_first):
    case = dict(head_dim=24, rotary_dim=16, q_heads=4, kv_heads=2, batch=2, seq=3, precision="autocast", style="gptj" if heads_first else "llama",
                heads_first=heads_first, form="transposed", with_k=with_k, cos_batch="broadcast", arbitrary=False, seed=0)
    q, k, cos, sin = _inputs(case)
    dim = 1 if heads_first else 2
    c, s = cos.unsqueeze(dim), sin.unsqueeze(dim)
    for deinterleave in (False, True) if heads_first else (False,):
        torch.library.opcheck(torch.ops.slothc.rope.default, (q, k, c, s, 16, heads_first, None, deinterleave))
        torch.library.opcheck(torch.ops.slothc.rope.default, (q, k, c, s, 16, heads_first, torch.float16, deinterleave))
        dq = torch.randn(q.shape, device=DEVICE, dtype=torch.float32)
        dk = torch.randn(k.shape, device=DEVICE, dtype=torch.float32) if with_k else None
        q_out = torch.ops.slothc.rope(q, k, c, s, 16, heads_first, None, deinterleave)
        strides = [list(t.stride()) for t in q_out] + [None]
        torch.library.opcheck(
            torch.ops.slothc.rope_backward.default,
            (dq, dk, c, s, 16, heads_first, q.dtype, k.dtype if with_k else None, strides[0], strides[1] if with_k else None,
             deinterleave),
        )


def test_bad_input_is_a_clear_error():
    q, cos = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="must have one shape"):
        torch.ops.slothc.rope(q, None, cos, cos[..., :4], 8, False, None, False)
    with pytest.raises(ValueError, match="positive even int"):
        torch.ops.slothc.rope(q, None, cos[..., :7], cos[..., :7], 7, False, None, False)
    with pytest.raises(ValueError, match="smaller than rotary_dim"):
        torch.ops.slothc.rope(q[..., :4], None, cos, cos, 8, False, None, False)
    with pytest.raises(ValueError, match="broadcast beyond"):
        torch.ops.slothc.rope(q, None, torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8), 8, False, None, False)
    with pytest.raises(ValueError, match="no head dim"):
        full = torch.randn(2, 2, 3, 8)
        torch.ops.slothc.rope(full, None, full, full, 8, False, None, False)
    with pytest.raises(ValueError, match="differ in batch or sequence size"):
        torch.ops.slothc.rope(q, torch.randn(2, 2, 3, 8), cos, cos, 8, False, None, False)
    with pytest.raises(ValueError, match="needs interleaved=True"):
        torch.ops.slothc.rope(q, None, cos, cos, 8, False, None, True)
    with pytest.raises(NotImplementedError, match="no gradient for cos/sin"):
        torch.ops.slothc.rope(q, None, cos.requires_grad_(), cos, 8, False, None, False)


def test_reference_is_the_transposed_rotation():
    """The backward formula is the VJP: <rope(x), y> == <x, rope_backward(y)> for arbitrary cos/sin."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 5, 12, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, 12, generator=g, dtype=torch.float64)
    cos, sin = torch.randn(2, 1, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 1, 5, 8, generator=g, dtype=torch.float64)
    for interleaved, deinterleave in ((False, False), (True, False), (True, True)):
        fwd = rope_module.rope_reference(x, cos, sin, 8, interleaved, deinterleave=deinterleave)
        bwd = rope_module.rope_reference(y, cos, sin, 8, interleaved, backward=True, deinterleave=deinterleave)
        torch.testing.assert_close((fwd * y).sum(), (x * bwd).sum())
