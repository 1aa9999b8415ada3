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


def test_tiny_run_writes_results(tmp_path, monkeypatch):
    # The variants' processes run slothc's ops as their torch code (TRITON_INTERPRET=0): this is a test
    # of the harness; the kernels in a training step have their own (tests/e2e), and the interpreter
    # took 40 of this test's 80 s. The table's line for an interpreted run:
    # test_markdown_says_when_the_kernels_ran_in_the_interpreter.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
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
    assert result["triton_interpreter"] is False and "Triton interpreter" not in table


def test_markdown_says_when_the_kernels_ran_in_the_interpreter():
    result = {"workload": {"name": "x", "description": "d"}, "device": "cpu", "versions": {"torch": "2"}, "date": "d", "steps": 1,
              "warmup": 1, "variants": {"eager": {"status": "ok", "tokens_per_s": 100.0}}}
    assert "Triton interpreter" not in train_bench.markdown(result)
    assert "slothc's kernels ran in the Triton interpreter" in train_bench.markdown({**result, "triton_interpreter": True})


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
    with pytest.raises(ValueError, match="one optimizer"):  # a file without the key was measured with foreach
        train_bench.merge([first, dict(second, optimizer="fused")])
    assert train_bench.merge([first, dict(second, optimizer="foreach")])["variants"]["unsloth"]["tokens_per_s"] == 120.0


def _fake_step(limit, calls, other_error_at=None):
    """A step that runs out of memory above ``limit`` tokens (and fails otherwise at ``other_error_at``)."""
    import torch

    def step(ids):
        calls.append(ids.shape[1])
        if other_error_at is not None and ids.shape[1] >= other_error_at:
            raise RuntimeError("an unrelated failure")
        if ids.shape[1] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 1.0

    return step


def test_max_seq_search_doubles_then_bisects_and_resets_after_an_oom():
    calls, resets = [], []
    ms = train_bench.max_seq(_fake_step(20000, calls), vocab=8, start=4096, device="cpu", budget_s=60,
                             reset=lambda: resets.append(1), resolution=0.125)
    assert calls[:4] == [4096, 8192, 16384, 32768]  # doubling until the first failure
    assert ms["complete"] and ms["max_seq"] <= 20000 < ms["max_seq"] * 1.125 and ms["upper_bound"] > 20000
    assert ms["max_seq"] % 256 == 0 and len(resets) == len(calls)  # the gradients are dropped after each probe
    assert [p["fits"] for p in ms["probes"]] == [c <= 20000 for c in calls]
    # a finer resolution takes more probes and lands closer
    fine = train_bench.max_seq(_fake_step(20000, []), vocab=8, start=4096, device="cpu", budget_s=60, resolution=0.0)
    assert 20000 - 256 < fine["max_seq"] <= 20000 and len(fine["probes"]) > len(ms["probes"])


def test_max_seq_search_records_an_error_that_is_no_oom_and_an_open_bracket():
    ms = train_bench.max_seq(_fake_step(10**9, [], other_error_at=16384), vocab=8, start=4096, device="cpu", budget_s=60)
    assert ms["max_seq"] == 8192 and ms["upper_bound"] is None and not ms["complete"]
    assert ms["error"] == "RuntimeError: an unrelated failure" and "an unrelated failure" in ms["traceback"]
    assert train_bench._max_seq_cell(ms) == ">= 8192"
    assert train_bench._max_seq_cell({"max_seq": 8192, "upper_bound": 16384, "complete": False}) == "8192-16384"
    assert train_bench._max_seq_cell({"max_seq": 9000, "upper_bound": 9100, "complete": True}) == "9000"
    assert train_bench._max_seq_cell({"max_seq": 0, "upper_bound": None, "complete": False, "error": "E"}) == "failed (below)"


def test_merge_takes_a_later_runs_max_seq_search():
    def run(sha, variants):
        return {"workload": {"name": "a", "description": "d"}, "device": "dev", "versions": {"torch": "2"}, "date": "d",
                "steps": 10, "warmup": 3, "git_sha": sha, "variants": variants}

    search = {"max_seq": 65536, "upper_bound": 70000, "complete": True, "search_s": 50.0,
              "probes": [{"seq": 65536, "fits": True, "s": 9.0}, {"seq": 70000, "fits": False, "s": 3.0}]}
    first = run("aaa", {"eager": {"status": "ok", "tokens_per_s": 100.0, "losses": [1.0]},
                        "slothc": {"status": "ok", "tokens_per_s": 150.0, "losses": [1.0]}})
    second = run("bbb", {"slothc": {"status": "ok", "tokens_per_s": 140.0, "losses": [1.0], "max_seq": search}})
    v = train_bench.merge([first, second])["variants"]
    assert v["slothc"]["tokens_per_s"] == 150.0 and v["slothc"]["run"] == "1: aaa"  # the first run's throughput
    assert v["slothc"]["max_seq"]["max_seq"] == 65536 and v["slothc"]["max_seq"]["run"] == "2: bbb"
    table = train_bench.markdown(train_bench.merge([first, second]))
    assert "| 65536 |" in table and "- slothc (run 2: bbb): 65536 in 50 s: 65536 ok (9 s), 70000 OOM (3 s)" in table


@pytest.mark.parametrize("optimizer", ["foreach", "fused"])
def test_the_step_takes_either_adamw(optimizer):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)

    class Out:
        def __init__(self, loss):
            self.loss = loss

    def run(input_ids, labels):
        return Out(model(input_ids.float()).square().mean())

    before = model.weight.detach().clone()
    step = train_bench._stepper(run, model, "cpu", cudagraphs=False, optimizer=optimizer)
    loss = step(torch.ones(2, 4, dtype=torch.long))
    assert loss > 0 and not torch.equal(model.weight, before)
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step


def test_timeline_finds_where_the_gpu_waits_and_what_the_host_ran():
    """Two steps of kernels on two streams (us): overlaps count once; each gap is binned by length and
    the longest are named with the host ops running at their middle, outermost first."""
    kernels = [("gemm", 0, 100), ("norm", 50, 120),  # overlapping: busy 0-120
               ("rope", 122, 130),                   # a 2 us gap
               ("attn", 150, 250),                   # a 20 us gap
               ("gemm", 1250, 1350),                 # the step boundary: 1000 us
               ("norm", 1352, 1400), ("rope", 1420, 1450), ("attn", 1451, 1550)]
    cpu = [("step", 0, 1200, 0), ("float", 250, 1240, 1), ("aten::_local_scalar_dense", 260, 1230, 2), ("step", 1200, 1600, 0)]
    t = train_bench.timeline(kernels, cpu, steps=2)
    assert t["kernels_per_step"] == 4
    assert t["span_ms"] == pytest.approx(1550 / 2 / 1e3)
    busy = 120 + 8 + 100 + 100 + 48 + 30 + 99
    assert t["busy_ms"] == pytest.approx(busy / 2 / 1e3) and t["idle_ms"] == pytest.approx((1550 - busy) / 2 / 1e3)
    assert t["gaps"]["under_5us"] == {"count": 1.5, "ms": pytest.approx((2 + 2 + 1) / 2 / 1e3)}  # 2, 2, 1 us: three in two steps
    assert t["gaps"]["5_to_50us"] == {"count": 1.0, "ms": pytest.approx(40 / 2 / 1e3)} and t["gaps"]["over_50us"]["count"] == 0.5
    first = t["largest"][0]
    assert first["us"] == 1000 and first["after"] == "attn" and first["before"] == "gemm"
    assert first["host"] == ["step", "float", "aten::_local_scalar_dense"]
    table = train_bench.markdown({"workload": {"name": "x", "description": "d"}, "device": "dev", "versions": {}, "date": "d",
                                  "steps": 1, "warmup": 1, "variants": {"slothc": {
                                      "status": "ok", "tokens_per_s": 1.0, "peak_gib": 1.0, "step_ms": 1.0,
                                      "profile": {"gpu_ms_per_step": 0.5, "slothc_kernels_ms": 0.1, "top": [], "timeline": t}}}})
    assert "slothc timeline: 4 kernels a step" in table and "1000 us after `attn`, before `gemm`" in table


def test_max_seq_search_records_the_graphs_compiled_after_each_probe():
    """A probe that recompiled shows: the graph count after each probe, and the table prints it with
    what each graph fused, what was skipped and why Dynamo recompiled."""
    compiled = [1]

    def step(ids):
        if ids.shape[1] == 16384:  # this length recompiles
            compiled[0] += 1
        if ids.shape[1] > 20000:
            raise __import__("torch").OutOfMemoryError("too long")

    ms = train_bench.max_seq(step, vocab=8, start=4096, device="cpu", budget_s=60, graphs=lambda: compiled[0])
    assert [p["graphs"] for p in ms["probes"]][:4] == [1, 1, 2, 2]
    ms.update(per_graph=[{"rms_norm": 5}, {"rms_norm": 5, "causal_mask": 2}], skipped=["graph 1: rope: why"],
              recompiles=["tensor 'ids' size mismatch at index 1"])
    result = {"workload": {"name": "x", "description": "d"}, "device": "dev", "versions": {}, "date": "d", "steps": 1, "warmup": 1,
              "variants": {"slothc": {"status": "ok", "tokens_per_s": 1.0, "peak_gib": 1.0, "max_seq": ms}}}
    table = train_bench.markdown(result)
    assert "16384 ok (0 s, 2 graphs)" in table and "fused, by graph: 0: rms_norm 5; 1: causal_mask 2, rms_norm 5" in table
    assert "skipped: graph 1: rope: why" in table and "recompiled: tensor 'ids' size mismatch at index 1" in table


@pytest.mark.parametrize("guard_filter", ["none", "nn_modules"])
def test_guard_filter_skips_the_guards_on_module_attributes(guard_filter):
    """``--guard-filter nn_modules`` reaches torch.compile: a module attribute changed after the
    compile then goes unseen (no recompile, the old value); without it Dynamo recompiles."""
    import torch

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.scale = torch.nn.Linear(4, 4), 2.0

        def forward(self, input_ids):
            return self.lin(input_ids) * self.scale

    torch._dynamo.reset()
    model, x = Scaled(), torch.randn(2, 4)
    run, report = train_bench._compile(model, "slothc", guard_filter)
    try:
        first = run(x)
        model.scale = 3.0
        second = run(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(second, first * (1.0 if guard_filter == "nn_modules" else 1.5))
    assert report.graphs == (1 if guard_filter == "nn_modules" else 2), str(report)


def test_first_replays_times_each_graph_replay_and_restores_the_method(monkeypatch):
    """The host time before a step's first CUDA-graph replay (``before_replay_ms``) is read from
    the replay times this records; off (a variant without CUDA graphs) it records nothing."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: calls.append(self))
    original = torch.cuda.CUDAGraph.replay
    with train_bench.replay_times(False) as times:
        assert torch.cuda.CUDAGraph.replay is original
    with train_bench.replay_times(True) as times:
        assert torch.cuda.CUDAGraph.replay is not original
        torch.cuda.CUDAGraph.replay("g1")
        torch.cuda.CUDAGraph.replay("g2")
    assert calls == ["g1", "g2"] and len(times) == 2 and times[0] <= times[1]
    assert torch.cuda.CUDAGraph.replay is original


def test_markdown_gives_the_host_time_before_the_first_replay():
    result = {"workload": {"name": "x", "description": "d"}, "device": "dev", "versions": {"torch": "2"}, "date": "d", "steps": 1,
              "warmup": 1, "variants": {"slothc_cudagraphs": {"status": "ok", "tokens_per_s": 100.0, "before_replay_ms": 9.87},
                                        "eager": {"status": "ok", "tokens_per_s": 50.0}}}
    table = train_bench.markdown(result)
    assert "slothc_cudagraphs: 9.9 ms a step (median, no profiler)" in table
    assert sum("first CUDA-graph replay" in line for line in table.splitlines()) == 1  # the variant that has it


def test_device_tag_names_the_model_not_the_memory():
    # "NVIDIA H100 80GB HBM3" once gave files named "-hbm3-train-a" (its last word).
    assert train_bench.device_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert train_bench.device_tag("NVIDIA H200") == "h200"
    assert train_bench.device_tag("NVIDIA A100-SXM4-80GB") == "a100"
    assert train_bench.device_tag("Some Accelerator") == "accelerator"
