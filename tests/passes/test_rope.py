"""The rope pattern: each family's own ``apply_rotary_pos_emb`` from transformers, rewritten to
``slothc::rope`` with q and k in one call; near-misses reported with their reason.

The attention stand-in projects q and k (GQA: k has fewer heads), views them per head (transposed
for heads-first attention) and calls the family's function from transformers with cos/sin made the
way its rotary module makes them. Each case checks the report, that one op call rotates q and k, and
that the rewritten graph computes eager's result and gradients.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.cohere import modeling_cohere
from transformers.models.deepseek_v2 import modeling_deepseek_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3
from transformers.models.ernie4_5 import modeling_ernie4_5
from transformers.models.glm import modeling_glm
from transformers.models.gpt_oss import modeling_gpt_oss
from transformers.models.gptj import modeling_gptj
from transformers.models.llama import modeling_llama
from transformers.models.llama4 import modeling_llama4
from transformers.models.modernbert_decoder import modeling_modernbert_decoder
from transformers.models.nanochat import modeling_nanochat
from transformers.models.phi3 import modeling_phi3
from transformers.models.roformer import modeling_roformer

from slothc import testing
from slothc.passes import rope as rope_pass
from slothc.passes.matcher import INTERMEDIATE_ESCAPES
from slothc.passes.meta import val
from tests.passes._capture import capture

ROPE_OP = torch.ops.slothc.rope.default

# family -> (apply function, heads-first, interleaved, takes the rotary dim from cos)
FAMILIES = {
    "llama": (modeling_llama.apply_rotary_pos_emb, True, False),
    "phi3": (modeling_phi3.apply_rotary_pos_emb, True, False),  # partial rotary from cos's width
    "cohere": (modeling_cohere.apply_rotary_pos_emb, True, True),  # fp32, cast back
    "glm": (modeling_glm.apply_rotary_pos_emb, True, True),  # partial, interleaved, cos halves repeated
    "gptj": (None, False, True),  # seq-first, q and k rotated by separate calls, partial by slicing
    "nanochat": (modeling_nanochat.apply_rotary_pos_emb, True, False),  # rotate_half with flipped signs
    "modernbert_decoder": (modeling_modernbert_decoder.apply_rotary_pos_emb, True, False),  # q.float() twice
    "ernie4_5": (modeling_ernie4_5.apply_rotary_pos_emb, True, True),  # GLM's tables, rotate then upcast
    # interleaved pairs in, halves out, the first half of rotate_half's tables (one angle a pair)
    "deepseek_v3": (modeling_deepseek_v3.apply_rotary_pos_emb_interleave, True, True),
    "gpt_oss": (modeling_gpt_oss.apply_rotary_pos_emb, True, False),  # halves, tables of one angle a pair
}
HALF_TABLES = ("deepseek_v3", "gpt_oss")  # the op gets cat((cos, cos), -1): two cats stay in the graph


def _tables(batch, seq, width, interleaved, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, width, 2, dtype=torch.float32) / width))
    freqs = torch.randint(0, 512, (batch, seq), generator=g).float()[..., None] * inv_freq
    emb = freqs.repeat_interleave(2, -1) if interleaved else torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(torch.nn.Module):
    """q and k as attention makes them, then the family's rotary function; returns (q_embed, k_embed)."""

    def __init__(self, family, hidden=32, heads=4, kv_heads=2, head_dim=8, rotary_dim=None, dtype=torch.float32):
        super().__init__()
        self.family, self.heads, self.kv_heads, self.head_dim = family, heads, kv_heads, head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.q_proj = torch.nn.Linear(hidden, heads * head_dim, bias=False, dtype=dtype)
        self.k_proj = torch.nn.Linear(hidden, kv_heads * head_dim, bias=False, dtype=dtype)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        if self.family == "gptj":
            r = self.rotary_dim
            q_rot = modeling_gptj.apply_rotary_pos_emb(q[:, :, :, :r], sin, cos)
            k_rot = modeling_gptj.apply_rotary_pos_emb(k[:, :, :, :r], sin, cos)
            return torch.cat([q_rot, q[:, :, :, r:]], dim=-1), torch.cat([k_rot, k[:, :, :, r:]], dim=-1)
        apply = FAMILIES[self.family][0]
        return apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def _inputs(model, batch=2, seq=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, model.q_proj.in_features, generator=g).to(dtype).requires_grad_()
    interleaved = FAMILIES[model.family][2]
    if model.family == "gptj":  # GPT-J's sincos table: one entry a pair
        cos, sin = _tables(batch, seq, model.rotary_dim, False, dtype, seed)
        return x, cos[..., : model.rotary_dim // 2], sin[..., : model.rotary_dim // 2]
    if model.family in ("glm", "ernie4_5", "deepseek_v3"):  # the first half is read (per pair) by apply_rotary_pos_emb
        cos, sin = _tables(batch, seq, model.rotary_dim, False, dtype, seed)
        return x, cos, sin
    if model.family == "gpt_oss":  # its rotary module makes one angle a pair
        cos, sin = _tables(batch, seq, model.rotary_dim, False, dtype, seed)
        return x, cos[..., : model.rotary_dim // 2], sin[..., : model.rotary_dim // 2]
    cos, sin = _tables(batch, seq, model.rotary_dim, interleaved, dtype, seed)
    return x, cos, sin


def _run(model, *inputs):
    """The captured (rewritten) graph against eager: fp32 within assert_close; half precision by
    the float64 criterion (the op rounds once where eager rounds three times)."""
    eager_model, ref_model = copy.deepcopy(model), copy.deepcopy(model).double()
    eager_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    report, graphs, out = capture(model, *inputs)
    expected, ref = eager_model(*eager_in), ref_model(*ref_in)
    grads_out = [torch.randn_like(e) for e in expected]
    got = list(out) + list(torch.autograd.grad(out, [inputs[0], *model.parameters()], grads_out))
    want = list(expected) + list(torch.autograd.grad(expected, [eager_in[0], *eager_model.parameters()], grads_out))
    ref = list(ref) + list(torch.autograd.grad(ref, [ref_in[0], *ref_model.parameters()], [g.double() for g in grads_out]))
    for i, (g, w, r) in enumerate(zip(got, want, ref)):
        if g.dtype == torch.float32 and inputs[0].dtype == torch.float32:
            torch.testing.assert_close(g, w)
        else:
            testing.assert_matches_reference(g, w, r, k=2 if i < len(out) else 3, name=f"result {i}")
    return report, graphs[0]


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ROPE_OP]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_fuses_q_and_k_in_one_call(family):
    rotary_dim = {"phi3": 4, "glm": 4, "gptj": 4}.get(family)
    model = Attention(family, rotary_dim=rotary_dim)
    report, gm = _run(model, *_inputs(model))
    assert report.count("rope") == 2, str(report)
    assert not [s for s in report.skipped if s.fusion == "rope"], str(report)
    (call,) = _calls(gm)
    assert call.args[1] is not None  # q and k in the one call
    assert all("q and k in one launch" in s.variant for s in report.fused["rope"])
    variant = report.fused["rope"][0].variant
    assert variant.startswith("interleaved" if FAMILIES[family][2] else "rotate_half")
    if rotary_dim:
        assert f"partial {rotary_dim}/8" in variant
    if family in ("cohere", "modernbert_decoder", "ernie4_5"):
        assert "fp32 then cast back" in variant
    if family == "nanochat":
        assert "sin negated" in variant
    # the rotation is gone from the graph: no cat/stack left, no neg but NanoChat's one -sin
    left = [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.cat, torch.stack, operator.neg)]
    assert left == ([operator.neg] if family == "nanochat" else [torch.cat] * 2 if family in HALF_TABLES else [])


@given(
    family=st.sampled_from(list(FAMILIES)),
    heads=st.sampled_from([(4, 4), (4, 2), (8, 1)]),
    head_dim=st.sampled_from([8, 12, 16]),
    partial=st.booleans(),
    batch=st.integers(1, 2),
    seq=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_fused_and_equal_to_eager(family, heads, head_dim, partial, batch, seq, dtype):
    if family not in ("phi3", "glm", "gptj"):
        partial = False  # their rotary code rotates every channel
    rotary_dim = head_dim // 2 if partial and (head_dim // 2) % 2 == 0 else None
    model = Attention(family, heads=heads[0], kv_heads=heads[1], head_dim=head_dim, rotary_dim=rotary_dim, dtype=dtype)
    x, cos, sin = _inputs(model, batch, seq, dtype)
    report, gm = _run(model, x, cos, sin)
    assert report.count("rope") == 2 and len(_calls(gm)) == 1, str(report)


def test_autocast_result_is_fp32_like_eager():
    """bf16 projections and fp32 cos/sin (autocast): eager's result, and the op's, are fp32."""
    model = Attention("llama", dtype=torch.bfloat16)
    x, cos, sin = _inputs(model)
    x = x.detach().to(torch.bfloat16).requires_grad_()
    report, gm = _run(model, x, cos.float(), sin.float())
    assert report.count("rope") == 2
    (call,) = _calls(gm)
    assert [t.dtype for t in val(call)] == [torch.float32, torch.float32]


def _reasons(report):
    return [s.reason for s in report.skipped if s.fusion == "rope"]


def test_cos_that_needs_grad_is_skipped():
    class Learned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.angles = torch.nn.Parameter(torch.randn(5, 8))

        def forward(self, q, k):
            return modeling_llama.apply_rotary_pos_emb(q, k, self.angles.cos()[None], self.angles.sin()[None])

    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    report, graphs, _ = capture(Learned(), q, k)
    assert report.count("rope") == 0
    assert _reasons(report) == [rope_pass.COS_SIN_NEED_GRAD] * 2


def test_unequal_halves_are_skipped():
    def rotate_uneven(x):  # "halves" of 3 and 5 channels: not a rotation
        return torch.cat((-x[..., 3:], x[..., :3]), dim=-1)

    def fn(q, cos, sin):
        return q * cos + rotate_uneven(q) * sin

    q, (cos, sin) = torch.randn(2, 4, 5, 8), _tables(2, 5, 8, False)
    report, _, _ = capture(fn, q, cos[:, None], sin[:, None])
    assert report.count("rope") == 0 and _reasons(report) == [rope_pass.UNEQUAL_HALVES]


def test_scaling_inside_the_rotation_is_reported():
    def fn(q, cos, sin):
        return q * cos * 0.5 + modeling_llama.rotate_half(q) * sin * 0.5

    q, (cos, sin) = torch.randn(2, 4, 5, 8), _tables(2, 5, 8, False)
    report, _, _ = capture(fn, q, cos[:, None], sin[:, None])
    assert report.count("rope") == 0 and _reasons(report) == [rope_pass.NOT_ROPE_FORM]


def test_cos_without_a_head_dim_is_skipped():
    def fn(q, cos, sin):
        return q * cos + modeling_llama.rotate_half(q) * sin

    q = torch.randn(2, 4, 5, 8)
    cos, sin = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)  # one table per head
    report, _, _ = capture(fn, q, cos, sin)
    assert report.count("rope") == 0 and _reasons(report) == [rope_pass.rope_kernels.NO_HEAD_DIM]


def test_rotation_used_elsewhere_is_skipped():
    def fn(q, cos, sin):
        rotated = modeling_llama.rotate_half(q)
        return q * cos + rotated * sin, rotated.sum()

    q, (cos, sin) = torch.randn(2, 4, 5, 8), _tables(2, 5, 8, False)
    report, _, _ = capture(fn, q, cos[:, None], sin[:, None])
    assert report.count("rope") == 0 and _reasons(report) == [INTERMEDIATE_ESCAPES]


def test_rotations_of_different_tables_stay_apart():
    """q and k rotated with different cos/sin (not a model, but legal): two calls, both right."""

    def fn(q, k, cos, sin, cos2, sin2):
        rotate = modeling_llama.rotate_half
        return q * cos + rotate(q) * sin, k * cos2 + rotate(k) * sin2

    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    (cos, sin), (cos2, sin2) = _tables(2, 5, 8, False), _tables(2, 5, 8, False, seed=1)
    args = (q, k, cos[:, None], sin[:, None], cos2[:, None], sin2[:, None])
    report, graphs, out = capture(fn, *args)
    for o, e in zip(out, fn(*args)):
        torch.testing.assert_close(o, e)
    assert report.count("rope") == 2 and len(_calls(graphs[0])) == 2
    assert all(call.args[1] is None for call in _calls(graphs[0]))


def test_roformer_reshape_as_spelling():
    """RoFormer writes rotate_every_two's flatten as ``reshape_as`` and builds cos/sin by stacking."""
    q, k = torch.randn(2, 4, 5, 8, requires_grad=True), torch.randn(2, 4, 5, 8, requires_grad=True)
    sinusoidal = torch.randn(1, 1, 5, 8)
    fn = modeling_roformer.RoFormerSelfAttention.apply_rotary_position_embeddings
    report, graphs, out = capture(fn, sinusoidal, q, k)
    for o, e in zip(out, fn(sinusoidal, q, k)):
        torch.testing.assert_close(o, e)
    assert report.count("rope") == 2 and len(_calls(graphs[0])) == 1, str(report)


COMPLEX = {
    "llama4": (modeling_llama4.apply_rotary_emb, False),  # seq-first q [B, S, H, D], freqs_cis [B, S, D/2]
    "deepseek_v2": (modeling_deepseek_v2.apply_rotary_emb, True),  # heads-first, freqs_cis unsqueezed at 1
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(COMPLEX))
def test_complex_product_is_the_interleaved_rotation(family, dtype):
    """Llama 4's and DeepSeek-V2's ``view_as_real(view_as_complex(x.float()...) * freqs_cis)``: one
    call for q and k, eager's results and gradients (bf16: by the float64 criterion)."""
    fn, heads_first = COMPLEX[family]
    g = torch.Generator().manual_seed(0)
    shape_q, shape_k = ((2, 4, 5, 8), (2, 2, 5, 8)) if heads_first else ((2, 5, 4, 8), (2, 5, 2, 8))
    q = torch.randn(shape_q, generator=g).to(dtype).requires_grad_()
    k = torch.randn(shape_k, generator=g).to(dtype).requires_grad_()
    freqs = torch.polar(torch.ones(2, 5, 4), torch.rand(2, 5, 4, generator=g) * 100)
    report, graphs, out = capture(fn, q, k, freqs)
    assert report.count("rope") == 2 and not [s for s in report.skipped if s.fusion == "rope"], str(report)
    assert all(s.variant.startswith("complex product, interleaved, fp32 then cast back") for s in report.fused["rope"]), str(report)
    (call,) = _calls(graphs[0])
    assert call.args[1] is not None  # q and k in one call
    assert not [n for n in graphs[0].graph.nodes if n.target in (torch.view_as_complex, operator.mul)]
    grads = [torch.randn_like(o) for o in out]
    got = list(out) + list(torch.autograd.grad(out, [q, k], grads))
    q_e, k_e = (t.detach().clone().requires_grad_() for t in (q, k))
    want = list(fn(q_e, k_e, freqs))
    want += list(torch.autograd.grad(want, [q_e, k_e], grads))
    q_r, k_r = (t.detach().double().requires_grad_() for t in (q, k))
    ref = list(fn(q_r, k_r, freqs.to(torch.complex128)))
    ref += list(torch.autograd.grad(ref, [q_r, k_r], [g.double() for g in grads]))
    for i, (a, w, r) in enumerate(zip(got, want, ref)):
        if dtype == torch.float32:
            torch.testing.assert_close(a, w)
        else:
            testing.assert_matches_reference(a, w, r.to(torch.float64), k=2 if i < 2 else 3, name=f"result {i}")


def test_complex_product_in_another_form_is_reported():
    """Not flattened back to x's layout: the product of some other pairs; reported, left alone."""

    def fn(q, freqs):
        return torch.view_as_real(torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2)) * freqs)

    q, freqs = torch.randn(2, 5, 4, 8), torch.polar(torch.ones(2, 5, 1, 4), torch.randn(2, 5, 1, 4))
    report, _, out = capture(fn, q, freqs)
    torch.testing.assert_close(out, fn(q, freqs))
    assert report.count("rope") == 0 and _reasons(report) == [rope_pass.COMPLEX_ROTATION]


def test_disabled_by_option():
    model = Attention("llama")
    report, graphs, _ = capture(model, *_inputs(model), options={"rope": False})
    assert report.count("rope") == 0 and not _calls(graphs[0])
