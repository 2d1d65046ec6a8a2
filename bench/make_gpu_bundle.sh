#!/bin/bash
# Wheels for the offline GPU device (Python 3.12, x86-64, torch 2.11 cu130 image that already has torch,
# transformers, peft, accelerate, triton, numpy, pyyaml, typer, rich, safetensors, msgpack, psutil, ...).
# Adds: Ray 2.60 (slimmed), DeepSpeed 0.19.8 (built here from its sdist: PyPI has no wheel; no ops are
# compiled, fineray hands DeepSpeed a torch AdamW), bitsandbytes 0.50.2 (only the CUDA 13.0 + CPU libraries),
# pydantic 2 (the image has none) and what Ray/DeepSpeed import. Must stay under the 64 MiB carry limit.
# Usage: bench/make_gpu_bundle.sh [OUTDIR=.whl]
#        bench/make_gpu_bundle.sh --preference [OUTDIR=.whl]   # adds TRL 1.16 + datasets (bench/preference_throughput.py)
# Install there: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#                export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
if [ "${1:-}" = --preference ]; then  # TRL's trainers for the issue-14 comparison; added to an existing bundle
  out=${2:-.whl}; mkdir -p "$out"
  python3 -m pip download -q --no-deps -d "$out" trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  ls -la "$out"; du -sh "$out"; exit 0
fi
out=${1:-.whl}
mkdir -p "$out"; out=$(cd "$out" && pwd); rm -f "$out"/*.whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
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
