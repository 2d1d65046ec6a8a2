#!/bin/bash
# GPU evidence for issue 14 on one H200 (nvidia-h200), from the repo root, wheels carried in .whl/.
# dpo needs only `bench/make_gpu_bundle.sh strong .whl` (TRL, datasets, pydantic; no Ray). grpo also needs Ray
# (the rollout engine is a Ray actor): build the full bundle, then add the strong wheels beside it:
#   bench/make_gpu_bundle.sh .whl && bench/make_gpu_bundle.sh strong /tmp/strong && cp /tmp/strong/*.whl .whl/
# (check `du -sh .whl` stays under the 64 MiB carry limit; grpo needs neither DeepSpeed nor bitsandbytes, and the
# 2026-12-03 run left both out: 47 MiB). Two calls on the same warm machine (each under the
# 10-minute command limit):
#   bash bench/gpu_preference.sh dpo    # fineray DPO vs TRL DPOTrainer + PEFT: 1B then 8B shapes
#   bash bench/gpu_preference.sh grpo   # GRPO step split: fineray (engine actor, policy) vs TRL GRPOTrainer
#                                       # (HF generate, then transformers continuous batching: trl-cb)
# Results: $OUT/dpo.jsonl, $OUT/grpo.jsonl, logs; the comparison table is printed last.
set -u
part=${1:?dpo|grpo}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false FINERAY_CACHE=/tmp/fineray-cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, trl, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'ray', ray.__version__)"
left() { echo $(( ${1:-560} - $(date +%s) + t0 )); }
if [ "$part" = dpo ]; then
  for c in 1b-dpo8 8b-dpo4; do
    for side in trl fineray; do  # one process per run: each side starts with an empty allocator
      timeout $(left) python3 bench/preference_throughput.py dpo --cases $c --side $side --out "$OUT"/dpo.jsonl \
        >> "$OUT"/dpo.log 2>&1
      grep -h "^RESULT" "$OUT"/dpo.log | tail -1 | cut -c1-300
    done
  done
  python3 bench/preference_throughput.py table "$OUT"/dpo.jsonl
else
  for side in engine trl policy trl-cb; do
    timeout $(left) python3 bench/preference_throughput.py grpo --cases 1b-grpo --side $side --out "$OUT"/grpo.jsonl \
      >> "$OUT"/grpo.log 2>&1
    grep -h "^RESULT" "$OUT"/grpo.log | tail -1 | cut -c1-300
  done
  python3 bench/preference_throughput.py table "$OUT"/grpo.jsonl
fi
echo "done at $(( $(date +%s) - t0 ))s"
