#!/usr/bin/env bash
# Creates benchmarks/.venvs/torchtune: torch 2.13.0 first (see setup_trl.sh), then torchtune with
# torchao (torchtune imports torchao at import time; 0.6.1 imports only with torchao 0.15.0 -- newer torchao removed APIs it uses) and safetensors for the shared weights.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.venvs/torchtune"
python3 -m venv "$venv"
"$venv/bin/pip" install -q ${TORCH_SPEC:-torch==2.13.0}
"$venv/bin/pip" install -q "torchtune==${TORCHTUNE_VERSION:-0.6.1}" "torchao==${TORCHAO_VERSION:-0.15.0}" safetensors numpy
"$venv/bin/python" -c "import torch, torchtune; print('torchtune', torchtune.__version__, 'torch', torch.__version__)"
