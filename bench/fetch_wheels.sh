#!/usr/bin/env bash
# The wheels that the GPU machine lacks (it has no network): run this on a machine with PyPI, then
# carry .whl (git-ignored, about 4.5 MiB) with the run tool; bench/gpu_train.sh and
# bench/gpu_session.sh install them. See bench/README.md, "Wheels carried to the GPU machine".
#
#     bash bench/fetch_wheels.sh            # liger-kernel and a slimmed bitsandbytes into .whl/
#     OPTIONAL=1 bash bench/fetch_wheels.sh # also the test tools, into .whl/optional/ (only if missing there)
#
# bitsandbytes' PyPI wheel (41 MiB) holds a native library for each CUDA version; only the CPU one
# and the one for the machine's torch (BNB_CUDA, default cuda130: torch 2.11+cu130) are kept, and
# RECORD loses the lines of the removed files so that pip still installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER=${LIGER:-0.8.5}
BNB=${BNB:-0.50.2}
BNB_CUDA=${BNB_CUDA:-cuda130}
dl=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64)
mkdir -p .whl
rm -f .whl/liger_kernel-*.whl .whl/bitsandbytes-*.whl
"${dl[@]}" -d .whl "liger-kernel==$LIGER"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${dl[@]}" -d "$tmp" "bitsandbytes==$BNB"
wheel=$(ls "$tmp"/bitsandbytes-*.whl)
name=$(basename "$wheel")
mkdir "$tmp/x"
python3 -m zipfile -e "$wheel" "$tmp/x"
find "$tmp/x/bitsandbytes" -name 'libbitsandbytes_*' \
    ! -name 'libbitsandbytes_cpu.*' ! -name "libbitsandbytes_${BNB_CUDA}.*" -delete
record=$(ls "$tmp"/x/bitsandbytes-*.dist-info/RECORD)
python3 - "$tmp/x" "$record" <<'PY'
import os, sys
root, record = sys.argv[1], sys.argv[2]
lines = open(record).read().splitlines()
kept = [l for l in lines if os.path.exists(os.path.join(root, l.split(",")[0]))]
open(record, "w").write("\n".join(kept) + "\n")
print(f"RECORD: {len(lines) - len(kept)} removed files dropped")
PY
(cd "$tmp/x" && python3 -m zipfile -c "$PWD/../$name.new" ./*)
mv "$tmp/$name.new" ".whl/$name"

if [ -n "${OPTIONAL:-}" ]; then
    mkdir -p .whl/optional
    "${dl[@]}" -d .whl/optional hypothesis==6.155.2 sortedcontainers==2.4.0 pytest==9.0.3 iniconfig==2.3.0 \
        pluggy==1.6.0 packaging==26.2 pygments==2.20.0 sympy==1.14.0 mpmath==1.3.0
fi
ls -la .whl
du -sh .whl
