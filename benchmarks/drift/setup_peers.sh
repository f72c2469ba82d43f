#!/usr/bin/env bash
# Creates benchmarks/drift/.venv with the peer drift libraries (alibi-detect, Evidently).
#
# They pin numpy<2 and pandas<3, which the main driftline environment (numpy 2)
# cannot have, so they live in their own venv (no --system-site-packages) and
# are driven by benchmarks/drift/peers.py as a subprocess. driftline itself is
# not installed there.
#
# Licences: alibi-detect is under the Business Source License 1.1 (Seldon;
# free for non-production use, production use needs a commercial licence) -
# it is a benchmark-only peer here, never a driftline dependency.
# Evidently is Apache-2.0.
#
# Usage: bash benchmarks/drift/setup_peers.sh [PYTHON]   (default: python3.11 or python)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
py="${1:-$(command -v python3.11 || command -v python)}"
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip >/dev/null
# torch first: this exact pin resolves to the local CPU build (any other spec pulls GBs of CUDA wheels).
"$venv/bin/python" -m pip install "torch==2.13.0"
"$venv/bin/python" -m pip install "alibi-detect[torch]==0.13.0" "evidently==0.7.23" "pandas<3" "numpy<2"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for p in ("torch", "alibi-detect", "evidently", "numpy", "pandas", "scikit-learn", "scipy"):
    print(f"{p}=={md.version(p)}")
PY
echo "peer venv ready: $venv"
