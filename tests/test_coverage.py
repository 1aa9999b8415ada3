"""slothc coverage on a fixed sample of architectures (the full run is the command, not a CI test):
each in its own process, equal to eager, every site fused; the table and the summary line."""

import json

from slothc import coverage

SAMPLE = ["llama", "qwen3", "gemma2", "gpt_neox", "phi3", "mamba"]


def test_sample_of_architectures(tmp_path):
    assert coverage.main(["--arch", *SAMPLE, "--jobs", "2", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("coverage-transformers-*.json")
    result = json.loads(path.read_text())
    rows = {r["arch"]: r for r in result["rows"]}
    for arch in ("llama", "qwen3", "gemma2", "gpt_neox", "phi3"):
        r = rows[arch]
        assert r["status"] == "ok" and r["correct"] and r["fully_fused"], r
        assert r["fused"]["lora"] == r["candidates"]["lora"] > 0 and r["fused"]["loss"] == 1, r
    assert rows["gemma2"]["candidates"]["norm"] == 9 and rows["qwen3"]["candidates"]["norm"] == 9  # q/k norms too
    assert rows["phi3"]["fused"]["mlp"] == rows["phi3"]["candidates"]["mlp"] == 2  # the fused gate_up projection
    # Mamba: PEFT refuses LoRA on its out_proj and conv1d: the other linears get it, and the row says so
    assert rows["mamba"]["status"] == "ok" and rows["mamba"]["correct"], rows["mamba"]
    assert rows["mamba"]["lora_targets"] == "all linear but conv1d, out_proj (PEFT refuses them)"
    assert rows["mamba"]["fused"]["lora"] == rows["mamba"]["candidates"]["lora"] > 0
    assert result["summary"] == "6 architectures: 6 correct, 6 fully fused, 0 failed (0 do not build or train without slothc either)"
    table = (tmp_path / path.name.replace(".json", ".md")).read_text()
    assert "| llama | ok | yes | yes |" in table and result["summary"] in table


def test_a_wrong_result_is_not_correct(monkeypatch):
    """The judgement can fail: a slothc loss off by 1% is reported as not equal to eager."""
    import torch

    real_step = coverage._step

    def skewed(model, batch, fp64=False):
        loss, grads = real_step(model, batch, fp64)
        return (loss * 1.01, grads) if hasattr(model, "_orig_mod") else (loss, grads)

    monkeypatch.setattr(coverage, "_step", skewed)
    row = coverage.check_arch("llama")
    torch._dynamo.reset()
    assert row["status"] == "ok" and not row["correct"] and row["mismatches"][0].startswith("loss:"), row
