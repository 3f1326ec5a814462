#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on a machine with one CUDA GPU, <= 8 minutes: installs the CUDA build of
# the torch version pinned in requirements.txt into a venv beside the repository (.venv-gpu, reusing the
# other pinned packages), then writes bench/results-gpu.json.
#   bash bench/gpu.sh                    # wheels from download.pytorch.org (network needed)
#   TORCH_WHEELS=/path/to/wheels bash bench/gpu.sh   # offline: a folder holding the torch CUDA wheel
#   TORCH_CUDA=cu128 bash bench/gpu.sh   # another CUDA build (default cu128)
# Extra arguments go to `python -m bench.gpu` (e.g. --budget-s 300, --size 768).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
CUDA_TAG=${TORCH_CUDA:-cu128}
TORCH_VERSION=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements.txt | head -1)
started=$(date +%s)
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [ -n "${TORCH_WHEELS:-}" ]; then
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$TORCH_WHEELS" "torch==${TORCH_VERSION}"
  else
    "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${CUDA_TAG}"
  fi
  grep -v '^torch==' requirements.txt > "$VENV/requirements-no-torch.txt"
  "$VENV/bin/python" -m pip install -q -r "$VENV/requirements-no-torch.txt"
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt
  "$VENV/bin/python" -m pip install -q --no-deps -e .
fi
"$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
left=$(( 480 - ($(date +%s) - started) - 30 ))
"$VENV/bin/python" -m bench.gpu --budget-s "$(( left > 60 ? left : 60 ))" "$@"
