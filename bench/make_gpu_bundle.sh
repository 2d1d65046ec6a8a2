#!/bin/bash
# Wheels for the offline GPU device (Python 3.12, x86-64, torch 2.11 cu130 image that already has torch,
# transformers, peft, accelerate, triton, numpy, pyyaml, typer, rich, safetensors, msgpack, psutil, ...).
# Adds: Ray 2.60 (slimmed), DeepSpeed 0.19.8 (built here from its sdist: PyPI has no wheel; no ops are
# compiled, fineray hands DeepSpeed a torch AdamW), bitsandbytes 0.50.2 (only the CUDA 13.0 + CPU libraries),
# pydantic 2 (the image has none) and what Ray/DeepSpeed import. Must stay under the 64 MiB carry limit.
# Usage: bench/make_gpu_bundle.sh [OUTDIR=.whl]
#        bench/make_gpu_bundle.sh strong [OUTDIR=.whl]   # only what bench/gpu_strong.sh and gpu_preference.sh need (~5.3 MB)
# Install there: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#                export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
mode=full
if [ "${1:-}" = strong ]; then mode=strong; shift; fi
out=${1:-.whl}
mkdir -p "$out"; out=$(cd "$out" && pwd); rm -f "$out"/*.whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
if [ $mode = strong ]; then
  # The strong baseline (bench/strong_baseline.py) and fineray's loop: TRL 1.16.0 (needs transformers >= 4.56.2;
  # runs with the device's 5.17.0 and this machine's 5.24.0), Liger 0.8.5 (Triton >= 2.3.1; the device has 3.6),
  # datasets 5.0.1 (TRL imports it; 5.0.1 accepts pyarrow >= 21 and huggingface-hub < 2, which the device's image
  # has (hub 1.33); 5.2 wants pyarrow >= 24) with dill and multiprocess (not in the image), pydantic for fineray.
  # No Ray, DeepSpeed or bitsandbytes: the throughput bench runs the loop in-process.
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$out" \
    trl==1.16.0 liger-kernel==0.8.5 datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  ls -la "$out"; du -sh "$out"
  exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

slim() {  # slim WHEEL PATTERN...: re-zip a wheel without the files matching the patterns
  local whl=$1; shift
  rm -rf "$tmp/x"; mkdir "$tmp/x"; (cd "$tmp/x" && unzip -q "$whl")
  for pat in "$@"; do (cd "$tmp/x" && rm -rf $pat); done
  (cd "$tmp/x" && find . -name '*.js.map' -delete && zip -q -r -9 "$out/$(basename "$whl")" .)
}

python3 -m pip download -q --no-deps "${plat[@]}" -d "$tmp" ray==2.60.0 bitsandbytes==0.50.2
# Ray: no Java jars, no dashboard web UI, no RLlib (Train/Tune/Serve/Data stay).
slim "$(ls "$tmp"/ray-*.whl)" ray/jars ray/dashboard/client/build ray/rllib
# bitsandbytes: the image's torch is cu130; drop the other CUDA, ROCm and XPU builds.
slim "$(ls "$tmp"/bitsandbytes-*.whl)" 'bitsandbytes/libbitsandbytes_cuda1[12]*' \
  'bitsandbytes/libbitsandbytes_cuda132.so' 'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
# DeepSpeed: sdist only on PyPI; build a pure-Python wheel (DS_BUILD_OPS=0: ops would JIT-build on use).
python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp/sd" deepspeed==0.19.8
DS_BUILD_OPS=0 "${PY:-python3}" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$tmp"/sd/deepspeed-*.tar.gz
python3 -m pip download -q --no-deps "${plat[@]}" -d "$out" \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection hjson \
  jsonschema jsonschema-specifications referencing rpds-py tensorboardX
ls -la "$out"; du -sh "$out"
