"""slothc coverage on a fixed sample of architectures (the full run is the command, not a CI test):
each in its own process, equal to eager, every site fused; the table and the summary line."""

import json

import pytest

from slothc import coverage

# cohere_compass_text: builds only with RoPE parameters per layer type (a later tiny config), and its
# norms are LayerNorms; phimoe: its router is a linear returning a tuple, left without LoRA. Each
# about 15 s with its process's start. Llama and GPT-NeoX, the plainest, are in tests/e2e.
SAMPLE = ["qwen3", "gemma2", "phi3", "mamba", "cohere_compass_text", "phimoe"]


def test_sample_of_architectures(tmp_path):
    assert coverage.main(["--arch", *SAMPLE, "--jobs", "2", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("coverage-transformers-*.json")
    result = json.loads(path.read_text())
    rows = {r["arch"]: r for r in result["rows"]}
    for arch in ("qwen3", "gemma2", "phi3", "cohere_compass_text", "phimoe"):
        r = rows[arch]
        assert r["status"] == "ok" and r["correct"] and r["fully_fused"], r
        assert r["fused"]["lora"] == r["candidates"]["lora"] > 0 and r["fused"]["loss"] == 1, r
    assert rows["gemma2"]["candidates"]["norm"] == 9 and rows["qwen3"]["candidates"]["norm"] == 9  # q/k norms too
    assert rows["phi3"]["fused"]["mlp"] == rows["phi3"]["candidates"]["mlp"] == 2  # the fused gate_up projection
    # Mamba: PEFT refuses LoRA on its out_proj and conv1d: the other linears get it, and the row says so
    assert rows["mamba"]["status"] == "ok" and rows["mamba"]["correct"], rows["mamba"]
    assert rows["mamba"]["lora_targets"] == "all linear but conv1d, out_proj (PEFT refuses them)"
    assert rows["mamba"]["fused"]["lora"] == rows["mamba"]["candidates"]["lora"] > 0
    assert rows["phimoe"]["lora_targets"] == "all linear but router (a linear whose forward returns no tensor)"
    assert result["summary"] == ("6 architectures: 6 correct, 6 fully fused, 0 failed (0 do not build or train without "
                                 "slothc either); 0 not text decoders; text decoders: 6 of 6 correct (100.0%)")
    table = (tmp_path / path.name.replace(".json", ".md")).read_text()
    assert "| qwen3 | ok | yes | yes |" in table and result["summary"] in table


def test_a_wrong_result_is_not_correct(monkeypatch):
    """The judgement can fail: a slothc loss off by 1% is reported as not equal to eager."""
    import torch

    real_step = coverage._step

    def skewed(model, batch, fp64=False):
        loss, grads = real_step(model, batch, fp64)
        return (loss * 1.01, grads) if hasattr(model, "_orig_mod") else (loss, grads)

    monkeypatch.setattr(coverage, "_step", skewed)
    monkeypatch.setattr(coverage, "_compile_alone_step", lambda model, batch: real_step(model, batch))  # Dynamo alone is eager's
    row = coverage.check_arch("llama")
    torch._dynamo.reset()
    assert row["status"] == "ok" and not row["correct"] and row["mismatches"][0].startswith("loss:"), row
    assert "compile_differs" not in row and "torch.compile alone" not in coverage.summary([row])


def test_a_difference_that_torch_compile_alone_makes_is_told_apart(monkeypatch):
    """Where torch.compile without slothc differs from eager as much (transformers 5.17's Doge), the
    row is still not correct, and it says that slothc equals the plain compile."""
    import torch

    real_step = coverage._step

    def skewed(model, batch, fp64=False):  # every compiled step, slothc's and the plain one
        loss, grads = real_step(model, batch, fp64)
        return (loss * 1.01, grads) if hasattr(model, "_orig_mod") else (loss, grads)

    monkeypatch.setattr(coverage, "_step", skewed)
    row = coverage.check_arch("llama")
    torch._dynamo.reset()
    assert row["status"] == "ok" and not row["correct"] and "slothc equals it" in row["compile_differs"], row
    assert "1 where torch.compile alone differs from eager as much and slothc equals it: llama" in coverage.summary([row])
    assert "| llama | ok | NO, as torch.compile alone: " in coverage.markdown([row], {})
    assert "eager_not_causal" not in row and ", 1 failed (" in coverage.summary([row])  # eager is causal here


def test_where_eager_is_not_causal_and_torch_compile_is_eager_is_the_one_wrong(monkeypatch):
    """Transformers 5.17's Doge: eager skips the causal mask (its own dynamic mask then sees every
    token), torch.compile builds it. The same on a tiny Llama whose attention modules say
    ``is_causal = False``: eager builds no mask for an unpadded batch and SDPA takes its causal flag
    from the module; under compile the mask is built. The row says eager is wrong, and is not failed."""
    import torch

    from slothc import tiny

    real = tiny.tiny_model

    def not_causal_in_eager(*args, **kw):
        model = real(*args, **kw)
        for m in model.modules():
            if hasattr(m, "is_causal"):
                m.is_causal = False
        return model

    monkeypatch.setattr(tiny, "tiny_model", not_causal_in_eager)
    row = coverage.check_arch("llama")
    torch._dynamo.reset()
    assert row["status"] == "ok" and not row["correct"] and "slothc equals it" in row["compile_differs"], row
    assert row["eager_not_causal"].startswith("eager is not causal (its logits at positions 0-7 change by "), row
    assert ", 0 failed (" in coverage.summary([row]) and "where eager is not causal and torch.compile alone is: llama" in coverage.summary([row])
    assert "| llama | ok | NO, eager is wrong: eager is not causal" in coverage.markdown([row], {})


def test_not_a_text_decoder_by_what_the_classes_declare():
    assert coverage.not_a_text_decoder("musicgen") == "needs audio codebook tokens (num_codebooks)"
    assert coverage.not_a_text_decoder("git") == "needs image input (GitForCausalLM)"
    assert coverage.not_a_text_decoder("gemma4_assistant").startswith("needs a backbone model's states")
    assert coverage.not_a_text_decoder("llama") is None and coverage.not_a_text_decoder("xmod") is None
    # only a row that does not run on text alone is excluded: Gemma 3 declares images but trains on text
    assert coverage._excluded({"arch": "gemma3", "status": "eager failed", "error": "e"})["status"] == coverage.NOT_TEXT
    assert coverage._excluded({"arch": "llama", "status": "eager failed", "error": "e"})["status"] == "eager failed"


def test_a_partial_rerun_merges_into_the_committed_table():
    ok = {"status": "ok", "correct": True, "fully_fused": True}
    committed = [{"arch": "a", **ok}, {"arch": "b", "status": "build failed", "error": "x"},
                 {"arch": "c", "status": "eager failed", "error": "y"}]
    new = [{"arch": "b", **ok, "fully_fused": False},
           {"arch": "c", "status": coverage.NOT_TEXT, "needs": "needs image input (C)", "text_status": "eager failed"}]
    rows = coverage.merge(committed, new)
    assert [r["arch"] for r in rows] == ["a", "b", "c"] and rows[1]["status"] == "ok"
    assert coverage.summary(rows) == ("3 architectures: 2 correct, 1 fully fused, 0 failed (0 do not build or train "
                                      "without slothc either); 1 not text decoders (needs image input: c); "
                                      "text decoders: 2 of 2 correct (100.0%)")
    assert coverage.summary(committed).startswith("3 architectures: 1 correct, 1 fully fused, 0 failed (2 do not")


def test_update_rewrites_the_committed_table(tmp_path, monkeypatch):
    """``--update``: this run's rows replace theirs, the summary is recomputed from every row."""
    from slothc.train_bench import _versions

    versions = {k: v for k, v in _versions().items() if k in ("torch", "transformers", "peft", "slothc")}
    path = tmp_path / "coverage-transformers-x.json"
    old = [{"arch": "llama", "status": "build failed", "error": "old"}, {"arch": "qwen3", "status": "ok", "correct": True,
            "fully_fused": True, "fused": dict.fromkeys(coverage.KINDS, 1), "candidates": dict.fromkeys(coverage.KINDS, 1),
            "skipped": [], "mismatches": []}]
    path.write_text(json.dumps({"versions": versions, "summary": coverage.summary(old), "rows": old}))
    monkeypatch.setattr(coverage, "run", lambda archs, args, on_row=None: [{**old[1], "arch": a} for a in archs])
    assert coverage.main(["--arch", "llama", "--update", str(path)]) == 0
    result = json.loads(path.read_text())
    assert [r["status"] for r in result["rows"]] == ["ok", "ok"]
    assert result["summary"].startswith("2 architectures: 2 correct, 2 fully fused, 0 failed")
    assert result["summary"] in (tmp_path / "coverage-transformers-x.md").read_text()


def test_a_run_stopped_half_way_leaves_the_table_so_far_marked_partial(tmp_path, monkeypatch):
    row = {"status": "ok", "correct": True, "fully_fused": True, "fused": dict.fromkeys(coverage.KINDS, 1),
           "candidates": dict.fromkeys(coverage.KINDS, 1), "skipped": [], "mismatches": []}

    def child(arch, args):
        if arch == "qwen3":
            raise KeyboardInterrupt  # the time limit's signal, in the middle of the run
        return {**row, "arch": arch}

    monkeypatch.setattr(coverage, "_run_child", child)
    with pytest.raises(KeyboardInterrupt):
        coverage.main(["--arch", "llama", "qwen3", "--out-dir", str(tmp_path)])
    (path,) = tmp_path.glob("coverage-transformers-*.json")
    result = json.loads(path.read_text())
    assert [r["arch"] for r in result["rows"]] == ["llama"] and result["partial"] == "partial: 1 architectures not run yet (qwen3)"
    assert "**partial: 1 architectures not run yet (qwen3)**" in path.with_suffix(".md").read_text()


def test_update_refuses_a_table_of_other_versions_or_another_device(tmp_path):
    from slothc.train_bench import _versions

    versions = {k: v for k, v in _versions().items() if k in ("torch", "transformers", "peft", "slothc")}
    path = tmp_path / "coverage-transformers-x.json"
    for other in ({"device": "NVIDIA H200"}, {"transformers": "0.0.1"}):
        path.write_text(json.dumps({"versions": {**versions, **other}, "summary": "", "rows": []}))
        with pytest.raises(SystemExit, match="rerun every architecture") as e:
            coverage.main(["--arch", "llama", "--update", str(path)])
        assert next(iter(other)) in str(e.value)


def test_cuda_without_a_gpu_is_a_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="use --device cpu"):
        coverage.main(["--arch", "llama", "--device", "cuda"])


@pytest.mark.gpu
def test_an_architecture_on_the_gpu_runs_the_triton_kernels():
    """On CUDA the fused ops run their Triton kernels, and the step is still eager's."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    row = coverage.check_arch("llama", device="cuda")
    torch._dynamo.reset()
    assert row["status"] == "ok" and row["correct"] and row["fully_fused"], row


def test_rotary_candidates_are_the_rotated_tensors():
    """Rotary functions are found by name; table arguments (cos, sin, freqs, sinusoidal_pos) do not
    count, wherever they stand; a call from inside another one is part of it; NoPE calls none."""
    import torch

    q, k, table = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 3, 4)

    def _apply_rotary_emb(x, cos, sin):  # GPT-OSS's inner function: one tensor
        return x * cos

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # Llama's: q and k
        return _apply_rotary_emb(q, cos, sin), _apply_rotary_emb(k, cos, sin)

    def apply_rotary_position_embeddings(sinusoidal_pos, query_layer, key_layer, value_layer=None):  # RoFormer's
        return query_layer, key_layer

    def apply_rotary_pos_emb_gemma4(x, cos, sin):  # one tensor, the tables after it
        return x

    def attention_without_rope(q, k):
        return q @ k.transpose(-1, -2)

    with coverage._RotaryCalls() as calls:
        apply_rotary_pos_emb(q, k, table, table)
        apply_rotary_position_embeddings(table[None], q, k)
        apply_rotary_pos_emb_gemma4(q, table, table)
        attention_without_rope(q, k)
    assert (calls.calls, calls.tensors) == (3, 2 + 2 + 1)


def test_norm_candidates_are_norms_not_their_wrappers_nor_their_scales():
    import torch

    class LlamaRMSNorm(torch.nn.Module):  # noqa: D101  (the class names are what the rule reads)
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class GatedRMSNorm(torch.nn.Module):  # AXK2's wrapper: its inner norm is the site
        def __init__(self):
            super().__init__()
            self.norm = LlamaRMSNorm()

        def forward(self, x):
            return self.norm(x) * 2

    class UnweightedRMSNorm(torch.nn.Module):  # HY-V4's: returns only the scale, [..., 1]
        def forward(self, x):
            return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gated, self.scale = GatedRMSNorm(), UnweightedRMSNorm()

        def forward(self, x):
            return self.gated(x) * self.scale(x)

    model, x = Model(), torch.randn(2, 8)
    model.config = type("Config", (), {})()
    assert coverage._candidates(model, lambda: model(x))["norm"] == 1


def test_a_skipped_site_keeps_a_row_from_fully_fused():
    """Counts summed over many graphs can pass the candidates while a graph skips a site (the MoE
    families under transformers 5.17): a norm, RoPE, LoRA or loss skip decides; a causal-mask or
    4-bit skip does not."""
    counts = dict.fromkeys(coverage.KINDS, 2)
    assert coverage.fully_fused(counts, counts, ["causal_mask: the mask reads a graph input", "qlora_linear: x"])
    assert not coverage.fully_fused(counts, counts, ["lora_linear: low-rank branch not in PEFT's plain LoRA form"])
    assert not coverage.fully_fused(counts, counts, ["rms_norm: why"])
    assert not coverage.fully_fused({**counts, "norm": 1}, counts, [])
