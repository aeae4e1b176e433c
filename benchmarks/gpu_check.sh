#!/usr/bin/env bash
# The prepared GPU check (issue 14): on a one-GPU machine with this repository, in one call of a
# few minutes: the CUDA tests, then benchmarks/gpu_check.py (bf16 training tokens/s and MFU of
# palm-350m eager and compiled, the SDPA kernel, cached decoding, the fused loss's chunk sweep).
# It installs nothing (GPU machines may be offline): it uses PALM_PYTHON, else .venv/bin/python
# when its torch sees CUDA, else python3, and imports palm from this checkout.
#   bash benchmarks/gpu_check.sh                 # writes benchmarks/gpu_check.{json,md}
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # every step at toy size, on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
# The first Python whose torch sees a GPU (for --cpu-dry-run: any torch).
want='import torch,sys; sys.exit(not torch.cuda.is_available())'
[ "${1:-}" = "--cpu-dry-run" ] && want='import torch'
py=""
for candidate in ${PALM_PYTHON:-} .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "$want" 2>/dev/null; then
        py="$candidate"
        break
    fi
done
if [ -z "$py" ]; then
    echo "gpu_check: no Python here has a torch that sees a CUDA GPU (set PALM_PYTHON)" >&2
    exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check: python $py"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
missing=$("$py" -c "
import importlib.util as u
need = ['numpy', 'safetensors', 'sentencepiece', 'einops', 'yaml', 'tqdm', 'tensorboardX']
print(' '.join(n for n in need if u.find_spec(n) is None))")
[ -n "$missing" ] && echo "gpu_check: missing modules (install them for the full check): $missing"
status=0
out="${GPU_CHECK_OUT:-benchmarks/gpu_check}"
if [ "${1:-}" = "--cpu-dry-run" ]; then
    "$py" benchmarks/gpu_check.py --cpu-dry-run --out "$out" || status=1
    exit $status
fi
if "$py" -c "import pytest" 2>/dev/null; then
    timeout 240 "$py" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_optim.py || status=1
else
    echo "gpu_check: pytest is not installed; skipping the CUDA tests"
fi
timeout 420 "$py" benchmarks/gpu_check.py --out "$out" || status=1
exit $status
