#!/bin/bash
# Issue 13 on one H200, one device call: the engine tests on CUDA (fp32, graphs), then bench/generation.py on
# the Llama-1B (batch 32), Llama-8B (batch 16) and SmolLM2-135M (batch 32) shapes, 128 greedy tokens.
# Carry: .whl (pydantic wheels: bench/make_gpu_bundle.sh's last line, or pip download pydantic==2.14.4
# pydantic-core==2.50.5 annotated-types typing-inspection for cp312) and .bench/tok (the embedded model's
# tokenizer files, from ~/.cache/fineray/models/smollm2-135m-instruct).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
part=${1:-all}
if [[ $part == all || $part == tests ]]; then
  FINERAY_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/serve/test_engine.py 2>&1 | tail -15
fi
gen() { timeout "$1" python3 bench/generation.py --tokenizer .bench/tok --max-tokens 128 "${@:2}" 2>&1 | grep -v -i warn; }
if [[ $part == all || $part == 1b ]]; then
  gen 200 --shape llama-1b --clients 32 --adapters 1,8,32 --seconds 12 --warmup 4 --caches static,static-eager,dynamic \
    --out "$OUT/gen-llama-1b.json"
fi
if [[ $part == all || $part == 8b ]]; then
  gen 170 --shape llama-8b --clients 16 --adapters 1,8 --seconds 12 --warmup 4 --out "$OUT/gen-llama-8b.json"
fi
if [[ $part == all || $part == small ]]; then
  gen 90 --shape smollm2-135m --clients 32 --adapters 1,8,32 --seconds 8 --warmup 3 --out "$OUT/gen-smollm2.json"
fi
