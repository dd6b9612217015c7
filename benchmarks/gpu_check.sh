#!/usr/bin/env bash
# The GPU check in one command (docs/benchmarks.md, "The GPU check").
#
#   bash benchmarks/gpu_check.sh wheels     # HERE, with network: the wheels the GPU machine lacks -> benchmarks/.wheels/
#   bash benchmarks/gpu_check.sh [ARGS]     # THERE, no network: install the carried wheels, run gpu_check.py ARGS
#
# The GPU machine has torch 2.11 (CUDA), transformers, peft, tiktoken, safetensors, accelerate,
# pyarrow, pandas, xxhash, fsspec, ... and Python 3.12; it lacks omegaconf, torchao, TRL and TRL's
# datasets (+ dill, multiprocess). The wheels are pure Python except torchao (cp310-abi3; its C++
# extensions are not loaded: TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=benchmarks/.wheels
if [[ "${1:-}" == "wheels" ]]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" \
        omegaconf==2.4.0 torchao==0.18.0 trl==1.16.0 datasets==4.8.0 dill==0.4.1 multiprocess==0.70.19
    ls -l "$WHEELS"
    exit 0
fi
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
