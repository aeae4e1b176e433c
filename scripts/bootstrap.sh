#!/usr/bin/env bash
# Create .venv (if missing) and install palm into it with the given extras (e.g. "dev").
# torch is installed first, pinned, so that pip takes the local CPU build and never downloads
# a multi-GB CUDA build; set PALM_TORCH_SPEC to choose another (e.g. "torch" on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --disable-pip-version-check "${PALM_TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v '^WARNING: Location' || true
"$py" -c "import torch" || { echo "error: torch failed to install into .venv; set PALM_TORCH_SPEC to a torch release your platform has" >&2; exit 1; }
target="."
[ -n "$extras" ] && target=".[${extras}]"
"$py" -m pip install -q --disable-pip-version-check -e "$target" 2>&1 | grep -v '^WARNING: Location' || true
"$py" -c "import palm" || { echo "error: palm failed to install into .venv (see pip's output above)" >&2; exit 1; }
