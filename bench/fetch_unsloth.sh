#!/usr/bin/env bash
# Unsloth for the GPU machine, which has no network: run this on a machine with PyPI, then carry
# .carry/unsloth_site (about 27 MiB; git-ignored) with the run tool, and point the benchmark at it:
#
#     bash bench/fetch_unsloth.sh                       # here
#     SLOTHC_UNSLOTH_SITE=$PWD/.carry/unsloth_site python3 bench/train_step.py --variants unsloth ...   # there
#
# What is carried: unsloth and unsloth_zoo with its unsloth_zoo_downloads (the web UI folder `studio/`, 82 MiB, and the CLI are
# dropped: training does not import them), cut_cross_entropy, and what the GPU machine lacks of
# their requirements: trl (<= 1.15, unsloth's bound), datasets (< 5), dill, multiprocess (Python 3.12).
# Only the unsloth variant's process puts it on sys.path.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.carry/unsloth_site
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$tmp" unsloth unsloth_zoo cut_cross_entropy "trl<=1.15.0" "datasets<5" dill
python3 -m pip download -q --no-deps --python-version 3.12 --only-binary :all: -d "$tmp" multiprocess
rm -rf "$dest" && mkdir -p "$dest"
for wheel in "$tmp"/*.whl; do python3 -m zipfile -e "$wheel" "$dest"; done
rm -rf "$dest/studio" "$dest/unsloth_cli" "$tmp"
du -sh "$dest"
