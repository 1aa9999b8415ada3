#!/usr/bin/env bash
# One GPU session: install the carried wheels, record the environment, run the GPU kernel tests,
# then the benchmarks (RMSNorm, LayerNorm, LM head + cross-entropy). Run from the repository root
# on the device machine, with OUT set to the folder that comes back:
#
#     SLOTHC_GIT_SHA=<sha> bash bench/gpu_session.sh
#
# Writes to $OUT: env.txt, tests.log, bench.log, bench.jsonl, bench.txt, summary.md.
# Every step is bounded by `timeout`, and all of them by one deadline, T_TOTAL seconds after the
# start (default 570: 9.5 minutes, under the device tool's 10-minute command limit): a step's limit
# is its own or what is left before the deadline, whichever is smaller, less what the later steps
# are promised (the tests give way to the benchmarks). A failing or timed-out step is recorded and
# the script goes on (the benchmarks run even if the tests fail). The bench rows are appended as
# they come, so a bench cut short keeps what it measured. The repository is not pip-installed
# there: PYTHONPATH carries the repository root.
#
# Limits in seconds, overridable: T_TOTAL, and per step T_INSTALL T_ENV T_TESTS T_RMS T_LN T_LCE
# T_LORA T_MLP T_ROPE T_QLORA T_SUMMARY. SLOTHC_SKIP_TESTS=1 skips the tests (a benchmark-only rerun). TEST_ARGS: pytest paths
# and flags. BENCHES: which benchmarks run (default "rms_norm layer_norm linear_cross_entropy
# lora_linear mlp rope qlora"; the
# others are skipped and promised no time). BENCH_ARGS: extra flags for every bench (e.g. "--rep-ms
# 50", or "--quick" for a dry run of this script on a CPU machine); LCE_ARGS: extra flags for the
# linear_cross_entropy bench alone (e.g. "--tokens 8192 --providers eager slothc"); LORA_ARGS and
# MLP_ARGS, ROPE_ARGS, QLORA_ARGS: the same for the lora_linear, mlp, rope and qlora benches.

set -o pipefail
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1

T_TOTAL=${T_TOTAL:-570}
T_INSTALL=${T_INSTALL:-45}
T_ENV=${T_ENV:-30}
T_TESTS=${T_TESTS:-170}
T_RMS=${T_RMS:-150}
T_LN=${T_LN:-110}
T_LCE=${T_LCE:-150}
T_LORA=${T_LORA:-200}
T_MLP=${T_MLP:-120}
T_ROPE=${T_ROPE:-120}
T_QLORA=${T_QLORA:-300}
T_SUMMARY=${T_SUMMARY:-15}
T_KILL=5  # grace between timeout's TERM and KILL
BENCHES=${BENCHES:-rms_norm layer_norm linear_cross_entropy lora_linear mlp rope qlora}
selected() { [[ " $BENCHES " == *" $1 "* ]]; }
# A bench that is not selected is promised no time (nor its kill grace: K_*).
K_RMS=$T_KILL K_LN=$T_KILL K_LCE=$T_KILL K_LORA=$T_KILL K_MLP=$T_KILL K_ROPE=$T_KILL K_QLORA=$T_KILL
selected rms_norm || T_RMS=0 K_RMS=0
selected layer_norm || T_LN=0 K_LN=0
selected linear_cross_entropy || T_LCE=0 K_LCE=0
selected lora_linear || T_LORA=0 K_LORA=0
selected mlp || T_MLP=0 K_MLP=0
selected rope || T_ROPE=0 K_ROPE=0
selected qlora || T_QLORA=0 K_QLORA=0
# What the benches after each one are promised (their limits and kill graces), and the summary.
R_AFTER_QLORA=$((2 * T_SUMMARY))
R_AFTER_ROPE=$((T_QLORA + K_QLORA + R_AFTER_QLORA))
R_AFTER_MLP=$((T_ROPE + K_ROPE + R_AFTER_ROPE))
R_AFTER_LORA=$((T_MLP + K_MLP + R_AFTER_MLP))
R_AFTER_LCE=$((T_LORA + K_LORA + R_AFTER_LORA))
R_AFTER_LN=$((T_LCE + K_LCE + R_AFTER_LCE))
R_AFTER_RMS=$((T_LN + K_LN + R_AFTER_LN))

declare -a RESULTS=()
step() {  # step NAME SECONDS RESERVE LOG COMMAND...: run bounded by min(SECONDS, time left before
          # the deadline - RESERVE); output to stdout and appended to LOG
    local name=$1 limit=$2 reserve=$3 log=$4 t0=$SECONDS rc left
    shift 4
    left=$((T_TOTAL - SECONDS - reserve - T_KILL))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "=== $name: SKIPPED, no time left before the ${T_TOTAL}s deadline" | tee -a "$log"
        RESULTS+=("$name skipped (deadline)")
        return 124
    fi
    echo "=== $name (limit ${limit}s)" | tee -a "$log"
    # The limit, for a command that paces itself (bench_linear_cross_entropy's --budget-s default).
    SLOTHC_STEP_LIMIT_S=$limit timeout -k "$T_KILL" "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "=== $name: TIMED OUT after ${limit}s" | tee -a "$log"
    fi
    RESULTS+=("$name rc=$rc ($((SECONDS - t0))s)")
    return "$rc"
}

# 1. Wheels: .whl/*.whl always (liger-kernel); .whl/optional/*.whl only where the machine lacks
#    the package (pytest, hypothesis, sympy and their needs are in its image; a second pytest
#    shadowing the image's one could break the image's pytest plugins).
missing=$(python3 - <<'PY'
import glob, importlib.metadata as md, os
for f in sorted(glob.glob(".whl/optional/*.whl")):
    try:
        md.version(os.path.basename(f).split("-")[0])
    except md.PackageNotFoundError:
        print(f)
PY
)
: > "$OUT/env.txt"
[ -n "$missing" ] && echo "installing missing optional wheels: ${missing//$'\n'/ }" | tee -a "$OUT/env.txt"
# What the later steps are promised: the benchmarks and the summary, each with its kill grace.
R_BENCH=$((T_RMS + K_RMS + R_AFTER_RMS))
# shellcheck disable=SC2086  # $missing: word splitting wanted
step install "$T_INSTALL" "$R_BENCH" "$OUT/env.txt" python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl $missing
# slothc's own metadata, for its torch_dynamo_backends entry point (backend="slothc" by name, as
# the e2e tests compile): built from the checkout, offline; the code itself is imported from the
# checkout, which comes first on PYTHONPATH.
step slothc-metadata "$T_INSTALL" "$R_BENCH" "$OUT/env.txt" python3 -m pip install -q --no-index --no-deps \
    --no-build-isolation --no-compile --target /tmp/slothc_dist .
export PYTHONPATH=/tmp/site:$PWD:/tmp/slothc_dist${PYTHONPATH:+:$PYTHONPATH}
if [ -z "${SLOTHC_GIT_SHA:-}" ]; then
    echo "WARNING: SLOTHC_GIT_SHA is not set; rows will say git_sha=unknown" | tee -a "$OUT/env.txt"
fi

# 2. Environment (read-only queries: the card's settings are left alone).
cat > /tmp/slothc_env.py <<'PY'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], sys.executable)
for d in ("torch", "triton", "transformers", "peft", "accelerate", "liger-kernel", "bitsandbytes", "hypothesis", "pytest", "sympy"):
    try:
        print(f"{d:<13}", md.version(d))
    except md.PackageNotFoundError:
        print(f"{d:<13} (missing)")
import torch._inductor.config as ic  # the bench's inductor_chunked provider needs this config
ac = getattr(ic, "auto_chunker", None)
print("inductor auto_chunker:", "missing" if ac is None else
      {k: getattr(ac, k) for k in ("enable", "output_size_threshold", "amplify_ratio_threshold", "num_chunk") if hasattr(ac, k)})
import liger_kernel.ops.rms_norm, liger_kernel.ops.layer_norm, liger_kernel.ops.fused_linear_cross_entropy, liger_kernel.ops.rope  # noqa: E401,F401
import slothc.ops  # noqa: E401,F401  the ops register on import
print("imports ok: liger_kernel ops; torch.ops.slothc:", sorted(n for n in dir(torch.ops.slothc) if not n.startswith("_")))
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
p = torch.cuda.get_device_properties(0)
print("device", p.name, f"{p.multi_processor_count} SMs", f"{p.total_memory / 2**30:.1f} GiB",
      f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB", f"cc {p.major}.{p.minor}")
PY
step versions "$T_ENV" "$R_BENCH" "$OUT/env.txt" python3 /tmp/slothc_env.py
step nvidia-smi "$T_ENV" "$R_BENCH" "$OUT/env.txt" nvidia-smi
step gpu-state "$T_ENV" "$R_BENCH" "$OUT/env.txt" nvidia-smi \
    --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv

# 3. GPU kernel tests; a failure is recorded and the benchmarks run anyway.
: > "$OUT/tests.log"
if [ "${SLOTHC_SKIP_TESTS:-0}" = 1 ]; then
    echo "=== tests skipped (SLOTHC_SKIP_TESTS=1)" | tee -a "$OUT/tests.log"
else
    export SLOTHC_HYPOTHESIS_PROFILE=${SLOTHC_HYPOTHESIS_PROFILE:-gpu}
    # TEST_ARGS: which tests (default the kernel properties); e.g. "tests/kernels tests/e2e -k ..."
    # shellcheck disable=SC2086  # $TEST_ARGS: word splitting wanted
    step tests "$T_TESTS" "$R_BENCH" "$OUT/tests.log" python3 -m pytest ${TEST_ARGS:-tests/kernels} -q -rfE \
        || echo "=== tests FAILED or timed out; going on to the benchmarks" | tee -a "$OUT/tests.log"
fi

# 4. Benchmarks: rows to bench.jsonl, tables to bench.txt, progress to bench.log. Each step's reserve:
#    the later benches' limits and kill graces, and the summary.
: > "$OUT/bench.log"
bench() {  # bench NAME LIMIT RESERVE SCRIPT FLAGS...: run one selected bench as a step
    local name=$1 limit=$2 reserve=$3 script=$4
    shift 4
    if ! selected "$name"; then
        echo "=== bench_$name: not selected (BENCHES=$BENCHES)" | tee -a "$OUT/bench.log"
        RESULTS+=("bench_$name not selected")
        return 0
    fi
    step "bench_$name" "$limit" "$reserve" "$OUT/bench.log" \
        python3 "$script" --out "$OUT/bench.jsonl" --table "$OUT/bench.txt" "$@"
}
# shellcheck disable=SC2086  # $BENCH_ARGS, $LCE_ARGS: word splitting wanted
bench rms_norm "$T_RMS" "$R_AFTER_RMS" bench/bench_rms_norm.py ${BENCH_ARGS:-}
# shellcheck disable=SC2086
bench layer_norm "$T_LN" "$R_AFTER_LN" bench/bench_layer_norm.py --no-matmul-peak ${BENCH_ARGS:-}
# shellcheck disable=SC2086
bench linear_cross_entropy "$T_LCE" "$R_AFTER_LCE" bench/bench_linear_cross_entropy.py ${BENCH_ARGS:-} ${LCE_ARGS:-}
# shellcheck disable=SC2086
bench lora_linear "$T_LORA" "$R_AFTER_LORA" bench/bench_lora_linear.py ${BENCH_ARGS:-} ${LORA_ARGS:-}
# shellcheck disable=SC2086
bench mlp "$T_MLP" "$R_AFTER_MLP" bench/bench_mlp.py ${BENCH_ARGS:-} ${MLP_ARGS:-}
# shellcheck disable=SC2086
bench rope "$T_ROPE" "$R_AFTER_ROPE" bench/bench_rope.py ${BENCH_ARGS:-} ${ROPE_ARGS:-}
# shellcheck disable=SC2086
bench qlora "$T_QLORA" "$R_AFTER_QLORA" bench/bench_qlora.py ${BENCH_ARGS:-} ${QLORA_ARGS:-}

# 5. Summary: Markdown for bench/results/, then a compact table last (the reply shows the tail).
if [ -s "$OUT/bench.jsonl" ]; then
    timeout "$T_SUMMARY" python3 bench/_harness.py summarize "$OUT/bench.jsonl" > "$OUT/summary.md"
    timeout "$T_SUMMARY" python3 bench/_harness.py compact "$OUT/bench.jsonl"
fi
echo
echo "=== steps (rc 124/137: timed out)" | tee -a "$OUT/bench.log"
printf '  %s\n' "${RESULTS[@]}" | tee -a "$OUT/bench.log"
