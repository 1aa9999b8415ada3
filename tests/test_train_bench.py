"""The end-to-end benchmark harness (slothc/train_bench.py), on the CPU at a tiny size: each variant
in its own process, same batches, losses compared with eager's, JSON and Markdown written."""

import json

import pytest

from slothc import train_bench


def test_flops_formula_gives_the_issue_floor():
    """Workload (a) at 716 TFLOP/s: the matmul-bound floor is about 132k tokens/s (5.41 GFLOP a token)."""
    from transformers import AutoConfig

    w = train_bench.WORKLOADS["a"]
    config = AutoConfig.for_model(w.arch, **w.config)
    n_lora = 16 * sum(i + o for i, o in [(2048, 2048), (2048, 512), (2048, 512), (2048, 2048), (2048, 8192), (2048, 8192), (8192, 2048)]) * 16
    per_token = train_bench.flops_per_token(config, 2048, n_lora)
    assert 5.3e9 < per_token < 5.5e9
    assert 129e3 < 716e12 / per_token < 135e3


def test_tiny_run_writes_results(tmp_path):
    status = train_bench.main(["--workload", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
                               "--variants", "eager", "slothc", "unsloth", "--out-dir", str(tmp_path)])
    assert status == 0
    (path,) = tmp_path.glob("*-cpu-train-tiny.json")
    result = json.loads(path.read_text())
    assert set(result) >= {"device", "versions", "workload", "variants"}
    assert set(result["versions"]) >= {"torch", "triton", "transformers", "peft", "liger_kernel", "unsloth", "bitsandbytes"}
    eager, fused = result["variants"]["eager"], result["variants"]["slothc"]
    for r in (eager, fused):
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and len(r["losses"]) == 3, r
    assert fused["loss_vs_eager"] < 2e-2, (eager["losses"], fused["losses"])  # bf16 autocast on the CPU
    assert fused["fused"]["rms_norm"] == 5 and fused["fused"]["lora_linear"] == 14 and fused["fused"]["linear_cross_entropy"] == 1, fused
    unsloth = result["variants"]["unsloth"]
    if unsloth["status"] != "ok":  # not installed here (CI): the reason is recorded, the run goes on
        assert unsloth["status"] in ("unavailable", "error") and unsloth["reason"]
    table = (tmp_path / path.name.replace(".json", ".md")).read_text()
    assert "| eager |" in table and "| slothc |" in table and "| unsloth |" in table


def test_markdown_marks_a_failed_variant():
    result = {"workload": {"name": "x", "description": "d"}, "device": "dev", "versions": {"torch": "2"}, "date": "d", "steps": 1,
              "warmup": 1, "variants": {"eager": {"status": "ok", "tokens_per_s": 100.0, "peak_gib": 2.0},
                                        "slothc": {"status": "ok", "tokens_per_s": 150.0, "peak_gib": 1.0},
                                        "liger": {"status": "error", "reason": "boom"}}}
    table = train_bench.markdown(result)
    assert "| liger | error: boom |" in table
    assert "| slothc | 150 | 1.50 | 1.50 |" in table  # the best peer is eager here


def test_merge_takes_later_runs_variants_that_the_first_lacks_or_did_not_finish():
    def run(sha, variants):
        return {"workload": {"name": "a", "description": "d"}, "device": "dev", "versions": {"torch": "2"}, "date": "d",
                "steps": 10, "warmup": 3, "git_sha": sha, "variants": variants}

    first = run("aaa", {"eager": {"status": "ok", "tokens_per_s": 100.0, "losses": [1.0, 2.0]},
                        "slothc": {"status": "ok", "tokens_per_s": 150.0, "losses": [1.0, 2.5]},
                        "unsloth": {"status": "unavailable", "reason": "no module"}})
    second = run("bbb", {"eager": {"status": "ok", "tokens_per_s": 90.0, "losses": [1.0, 2.0]},
                         "unsloth": {"status": "ok", "tokens_per_s": 120.0, "losses": [1.0, 2.25]},
                         "slothc": {"status": "ok", "tokens_per_s": 999.0, "losses": [1.0, 2.0]}})
    merged = train_bench.merge([first, second])
    v = merged["variants"]
    assert v["eager"]["tokens_per_s"] == 100.0 and v["eager"]["run"] == "1: aaa"  # the first run's eager
    assert v["slothc"]["tokens_per_s"] == 150.0  # a finished variant is not replaced
    assert v["unsloth"]["tokens_per_s"] == 120.0 and v["unsloth"]["run"] == "2: bbb"
    assert v["unsloth"]["loss_vs_eager"] == 0.25
    table = train_bench.markdown(merged)
    assert "run 2: bbb: unsloth (its eager: 90 tokens/s)" in table
    assert "| unsloth | 120 | 1.20 |" in table
    with pytest.raises(ValueError, match="one workload"):
        train_bench.merge([first, dict(second, workload={"name": "b", "description": "d"})])
