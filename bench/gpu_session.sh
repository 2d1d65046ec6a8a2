#!/bin/bash
# One device call of the GPU verification (nvidia-h200-x2), from the repo root, wheels carried in .whl/
# (bench/make_gpu_bundle.sh). Results land in $OUT (JSONL + logs); a summary is printed last.
#   bench/gpu_session.sh one   # GPU0: HF Trainer baselines; GPU1: correctness checks, then fineray's loop
#   bench/gpu_session.sh two   # 2 GPUs through Ray Train: DDP scaling, ZeRO-3 and FSDP with resume
#   bench/gpu_session.sh cases "GPU1 fineray cases" "GPU0 baseline cases"   # a re-run of chosen cases
set -u
part=${1:?one|two|cases}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
el() { echo "$(( $(date +%s) - t0 ))s"; }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false FINERAY_CACHE=/tmp/fineray-cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), 'transformers', transformers.__version__, 'peft', peft.__version__)"
echo "installed at $(el)"

summary() {
  echo "=== summary at $(el)"
  grep -h "^CHECK" "$OUT"/checks.log 2>/dev/null
  grep -h '"error"' "$OUT"/*.jsonl 2>/dev/null | cut -c1-400
  python3 bench/train_throughput.py --table "$OUT"/base.jsonl "$OUT"/fineray.jsonl 2>/dev/null
  python3 - "$OUT" <<'EOF'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("fineray*.jsonl")):
    for line in f.read_text().splitlines():
        r = json.loads(line)
        if "peak_alloc_gib" in r and "estimate_gib" in r:
            print(f"MEM {r['case']}: measured {r['peak_alloc_gib']:.1f} GiB (reserved {r['peak_reserved_gib']:.1f}),"
                  f" estimate {r['estimate_gib']:.1f} GiB, measured/estimate {r['measured_over_estimate']:.2f},"
                  f" loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
EOF
}

watch() {  # print one line of progress per log every 30 s while the jobs run
  while [ -n "$(jobs -r)" ]; do
    sleep 30
    for f in "$@"; do echo "[$(el)] $(basename "$f"): $(grep -h -E 'RESULT|Error|error' "$f" 2>/dev/null | tail -1 | cut -c1-220)"; done
  done
}

if [ "$part" = one ]; then
  (CUDA_VISIBLE_DEVICES=0 timeout 480 python3 bench/train_throughput.py --side baseline \
     --cases 1b-real16,1b-full8,8b-real4,8b-full4,8b-real8 --out "$OUT"/base.jsonl > "$OUT"/base.log 2>&1) &
  (export CUDA_VISIBLE_DEVICES=1
   timeout 90 python3 bench/gpu_checks.py > "$OUT"/checks.log 2>&1
   for cases in 1b-real16-nocompile,1b-real16,1b-full8 8b-real8-nocompile,8b-real4,8b-real8,8b-full4 \
                8b-qlora-real8,8b-qlora-full4; do
     left=$(( 500 - $(date +%s) + t0 )); [ $left -lt 40 ] && break
     TORCH_LOGS=recompiles timeout $left python3 bench/train_throughput.py --side fineray --cases $cases \
       --out "$OUT"/fineray.jsonl
   done > "$OUT"/fineray.log 2>&1) &
  watch "$OUT"/base.log "$OUT"/fineray.log
  wait
  summary
elif [ "$part" = two ]; then  # Ray Train on 2 GPUs first; then, in the time left, QLoRA and 8B batch-4 re-runs
  budget=${2:-560}
  timeout $(( budget - 80 )) python3 bench/gpu_strategies.py --shape 1b --runs ddp1,ddp2,zero3,fsdp --steps 24 \
    --warmup 8 --batch 16 --full-batch 8 --ckpt 2 --out "$OUT"/strategies.jsonl --workdir /tmp/strat \
    --deadline-s $(( budget - 260 )) > "$OUT"/strategies.log 2>&1 &
  watch "$OUT"/strategies.log
  wait
  grep -h -E "^(RESULT|SCALING|SKIP)" "$OUT"/strategies.log | cut -c1-1200
  left=$(( budget - 25 - $(date +%s) + t0 ))
  echo "time left for the 1-GPU re-runs: ${left}s"
  if [ $left -gt 90 ]; then
    (CUDA_VISIBLE_DEVICES=0 timeout $left python3 bench/train_throughput.py --side baseline --cases 8b-real4-long \
       --out "$OUT"/base.jsonl > "$OUT"/base.log 2>&1) &
    (CUDA_VISIBLE_DEVICES=1 timeout $left python3 bench/train_throughput.py --side fineray \
       --cases 8b-qlora-real8,8b-real4-long,8b-qlora-full4 --out "$OUT"/fineray.jsonl > "$OUT"/fineray.log 2>&1) &
    watch "$OUT"/base.log "$OUT"/fineray.log
    wait
    summary
  fi
elif [ "$part" = three ]; then  # 8B realistic batch 4 over 30 steps (allocator variants), QLoRA vs LoRA
  (export CUDA_VISIBLE_DEVICES=0
   timeout 200 python3 bench/train_throughput.py --side baseline --cases 8b-real4-long --out "$OUT"/base.jsonl
   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 200 python3 bench/train_throughput.py --side baseline \
     --cases 8b-real4-long --tag expseg --out "$OUT"/base.jsonl) > "$OUT"/base.log 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   timeout 150 python3 bench/train_throughput.py --side fineray --cases 8b-real4-long --tag noexpseg \
     --set train.fast.expandable_segments=false --out "$OUT"/fineray.jsonl
   timeout 260 python3 bench/train_throughput.py --side fineray --cases 8b-real4-long,8b-qlora-real8,8b-qlora-full4 \
     --out "$OUT"/fineray.jsonl) > "$OUT"/fineray.log 2>&1 &
  watch "$OUT"/base.log "$OUT"/fineray.log
  wait
  summary
else
  fr=${2:-}; bl=${3:-}
  [ -n "$bl" ] && (CUDA_VISIBLE_DEVICES=0 timeout 400 python3 bench/train_throughput.py --side baseline --cases "$bl" \
     --out "$OUT"/base.jsonl > "$OUT"/base.log 2>&1) &
  [ -n "$fr" ] && (CUDA_VISIBLE_DEVICES=1 timeout 400 python3 bench/train_throughput.py --side fineray --cases "$fr" \
     --out "$OUT"/fineray.jsonl > "$OUT"/fineray.log 2>&1) &
  watch "$OUT"/base.log "$OUT"/fineray.log
  wait
  summary
fi
echo "done at $(el)"
