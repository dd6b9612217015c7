#!/usr/bin/env bash
# Creates benchmarks/.venvs/trl: torch 2.13.0 (installed FIRST: any other torch spec pulls GBs of
# CUDA wheels on a CPU machine), then TRL and the transformers stack it runs on. On a GPU machine
# set TORCH_SPEC to your own build (e.g. TORCH_SPEC="torch==2.13.0 --index-url ...cu128").
# peft: TRL's LoRA path (benchmarks/lora_plan.py runs DPOTrainer with a PEFT LoraConfig).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="$here/.venvs/trl"
python3 -m venv "$venv"
"$venv/bin/pip" install -q ${TORCH_SPEC:-torch==2.13.0}
"$venv/bin/pip" install -q "trl==${TRL_VERSION:-1.16.0}" "transformers==${TRANSFORMERS_VERSION:-5.23.0}" \
    "peft==${PEFT_VERSION:-0.21.2}" accelerate datasets safetensors numpy
"$venv/bin/python" -c "import torch, trl, transformers, peft; print('trl', trl.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
