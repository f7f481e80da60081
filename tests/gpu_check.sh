#!/usr/bin/env bash
# The first-GPU check (issue 13): the GPU/TE tests, a tiny 2-stage STEP run with the TE spec and
# FP8, llama-368m memory vs the planner on CUDA, tokens/s per stage, and the stage-boundary memory
# at 368M scale; under 8 minutes on one H100. Details: tests/gpu_check.py.
#
# Run inside an NGC PyTorch container (it brings torch, Transformer Engine and apex), from the
# repository root, after installing the project without touching the container's torch:
#   pip install --no-deps -e . && pip install --no-deps "megatron-core==0.16.1" \
#       psutil pyyaml nltk tokenizers sentencepiece safetensors tqdm matplotlib pytest pytest-timeout
#   bash tests/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_check/
# Results: OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md; logs in OUT_DIR/logs/. Exit code 0
# when every check passed. Uses the first GPU of CUDA_VISIBLE_DEVICES and changes no GPU setting.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
if ! python -c "import megatron.core, megatron_step" 2>/dev/null; then
    echo "gpu_check: megatron_step or megatron-core is not importable; install as this script's" \
         "header says" >&2
    exit 2
fi
exec python tests/gpu_check.py --out-dir "${1:-gpu_check}"
