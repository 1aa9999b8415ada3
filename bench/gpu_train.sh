#!/usr/bin/env bash
# One GPU call for the end-to-end benchmark (bench/train_step.py), optionally after GPU tests run
# in parallel (pytest-xdist is in the machine's image). From the repository root on the device
# machine, carrying the wheels and Unsloth's unpacked packages:
#
#     run(command="OUT=$OUT SLOTHC_GIT_SHA=<sha> TEST_ARGS='tests/kernels' TRAIN_ARGS='--workload a' bash bench/gpu_train.sh",
#         carry=[".whl", ".carry"], timeout_s=600)
#
# COVERAGE_ARGS (e.g. '--device cuda --jobs 10'): `slothc coverage` in the background from the start,
# next to the tests, stopped by SIGINT at T_TOTAL less T_MARGIN; its table, rewritten after each
# architecture, lands in $OUT (coverage.log, coverage-transformers-<version>-cuda.{md,json}). Not
# next to a benchmark: it would take the benchmark's CPU time.
#
# PRE: a shell command run first, in this script's environment (the carried wheels on PYTHONPATH),
# with its output in $OUT/pre.log, e.g. PRE='python3 bench/guard_cost.py --device cuda'; it gets
# T_TOTAL less T_MARGIN at most.
#
# Writes to $OUT: env.txt, pre.log (when PRE is set), tests.log (when TEST_ARGS is set), train.log, and the benchmark's
# <date>-<device>-train-<workload>.{json,md} (rewritten after each variant, so a run cut short
# keeps the variants it finished; TRAIN_ARGS2's and TRAIN_ARGS3's in run2/ and run3/).
#
# Limits in seconds: T_TOTAL (default 570, under the tool's 10-minute command limit) for the whole
# script; T_TESTS (default 200) for the tests, which are stopped by SIGINT so that pytest still
# prints its summary of failures; the benchmark gets what is left, less T_MARGIN (default 15).
# TEST_JOBS: pytest-xdist workers (default 8). SLOTHC_HYPOTHESIS_MAX_EXAMPLES: the gpu profile's
# examples per property (default here 60, to fit the call).
set -o pipefail
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
T_TOTAL=${T_TOTAL:-570}
T_TESTS=${T_TESTS:-200}
T_MARGIN=${T_MARGIN:-15}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/env.txt" 2>&1 || echo "wheel install failed" | tee -a "$OUT/env.txt"
# slothc's metadata, for its torch_dynamo_backends entry point (the e2e tests compile with
# backend="slothc" by name); the code itself is imported from the checkout, first on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/slothc_dist . \
    >> "$OUT/env.txt" 2>&1 || echo "slothc metadata install failed" | tee -a "$OUT/env.txt"
export PYTHONPATH=/tmp/site:$PWD:/tmp/slothc_dist${PYTHONPATH:+:$PYTHONPATH}
[ -d .carry/unsloth_site ] && export SLOTHC_UNSLOTH_SITE=$PWD/.carry/unsloth_site
{
    echo "git_sha ${SLOTHC_GIT_SHA:-unknown}"
    python3 - <<'PY'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0])
for d in ("torch", "triton", "transformers", "peft", "accelerate", "liger-kernel", "bitsandbytes", "hypothesis", "pytest-xdist"):
    try:
        print(f"{d:<13}", md.version(d))
    except md.PackageNotFoundError:
        print(f"{d:<13} (missing)")
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
PY
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
} >> "$OUT/env.txt" 2>&1

if [ -n "${PRE:-}" ]; then
    echo "=== pre: $PRE" | tee "$OUT/pre.log"
    timeout -k 10 $((T_TOTAL - T_MARGIN - SECONDS)) bash -c "$PRE" >> "$OUT/pre.log" 2>&1
    echo "=== pre rc=$? ($SECONDS s since the start)" | tee -a "$OUT/pre.log"
    grep -v "^\s*$" "$OUT/pre.log" | tail -n 30
fi

cov_pid=
if [ -n "${COVERAGE_ARGS:-}" ]; then
    echo "=== coverage: $COVERAGE_ARGS (limit $((T_TOTAL - T_MARGIN - SECONDS))s)" | tee "$OUT/coverage.log"
    # shellcheck disable=SC2086  # $COVERAGE_ARGS: word splitting wanted
    timeout -s INT -k 20 $((T_TOTAL - T_MARGIN - SECONDS)) python3 -m slothc.coverage $COVERAGE_ARGS --out-dir "$OUT" \
        >> "$OUT/coverage.log" 2>&1 &
    cov_pid=$!
fi

if [ -n "${TEST_ARGS:-}" ]; then
    echo "=== tests: $TEST_ARGS (limit ${T_TESTS}s, ${TEST_JOBS:-8} workers)" | tee "$OUT/tests.log"
    t0=$SECONDS
    # shellcheck disable=SC2086  # $TEST_ARGS: word splitting wanted
    SLOTHC_HYPOTHESIS_PROFILE=gpu SLOTHC_HYPOTHESIS_MAX_EXAMPLES=${SLOTHC_HYPOTHESIS_MAX_EXAMPLES:-60} \
        timeout -s INT -k 20 "$T_TESTS" python3 -m pytest $TEST_ARGS -q -rfE -p no:cacheprovider -n "${TEST_JOBS:-8}" \
        >> "$OUT/tests.log" 2>&1
    rc=$?
    echo "=== tests rc=$rc ($((SECONDS - t0)) s; 124/130: stopped at the limit)" | tee -a "$OUT/tests.log"
    tail -n 25 "$OUT/tests.log"
fi

# TRAIN_ARGS, then TRAIN_ARGS2 and TRAIN_ARGS3 when set (e.g. other variants of another workload):
# each gets what is left before the deadline, and its own folder ($OUT, $OUT/run2, $OUT/run3), so
# that two runs of one workload do not write over each other's results.
: > "$OUT/train.log"
n=0
for args in "${TRAIN_ARGS:-}" "${TRAIN_ARGS2:-}" "${TRAIN_ARGS3:-}"; do
    n=$((n + 1))
    [ -n "$args" ] || continue
    out_dir=$OUT
    [ "$n" -gt 1 ] && out_dir=$OUT/run$n
    left=$((T_TOTAL - SECONDS - T_MARGIN))
    if [ "$left" -lt 30 ]; then
        echo "=== train_step: $args SKIPPED (${left}s left)" | tee -a "$OUT/train.log"
        continue
    fi
    echo "=== train_step: $args (limit ${left}s)" | tee -a "$OUT/train.log"
    # shellcheck disable=SC2086  # $args: word splitting wanted
    SLOTHC_GIT_SHA=${SLOTHC_GIT_SHA:-unknown} timeout -k 10 "$left" python3 bench/train_step.py $args --out-dir "$out_dir" \
        2>&1 | tee -a "$OUT/train.log"
    echo "=== train_step rc=${PIPESTATUS[0]} ($SECONDS s since the start)" | tee -a "$OUT/train.log"
done

if [ -n "$cov_pid" ]; then
    wait "$cov_pid"
    echo "=== coverage rc=$? ($SECONDS s since the start; 124/130: stopped at the limit)" | tee -a "$OUT/coverage.log"
    tail -n 3 "$OUT/coverage.log"
fi
