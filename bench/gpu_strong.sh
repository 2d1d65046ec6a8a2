#!/bin/bash
# One device call (nvidia-h200, one GPU) for issue 17: naive (HF Trainer + PEFT, dynamic padding) vs strong
# (TRL SFTTrainer + PEFT, padding-free, Liger, flex_attention document masks) vs fineray, median of 3 alternating
# runs, and the 8B realistic step profile (GPU busy vs wall per step). Carry .whl, built by
# `bench/make_gpu_bundle.sh strong` (~5.3 MB: TRL, Liger, datasets, dill, multiprocess, pydantic).
#   bash bench/gpu_strong.sh [BUDGET_S=510] [PLAN]
#   DEVICE=cpu bash bench/gpu_strong.sh 900 tiny-smoke:2    # dry run of this script on a CPU machine (no wheels)
# Results in $OUT: alt.jsonl (one row per run), table.md, worker-{naive,strong,fineray}.log, session.log.
# Priority order of the default plan: 8B realistic (3 rounds + profile), 1B realistic (3 rounds), 8B and 1B full
# length (1 round each); bench/alternate.py skips what no longer fits in the budget.
set -u
budget=${1:-510}
plan=${2:-8b-real4-long:3,1b-real16:3,8b-full4:1,1b-full8:1}
device=${DEVICE:-cuda}
py=${PY:-python3}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
t0=$(date +%s)
exec > >(tee -a "$OUT"/session.log) 2>&1
if [ "$device" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm --format=csv,noheader
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false FINERAY_CACHE=/tmp/fineray-cache
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=warning
$py - <<'EOF'
import importlib, importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
for dist, m in (("transformers", "transformers"), ("peft", "peft"), ("accelerate", "accelerate"), ("trl", "trl"),
                ("liger-kernel", "liger_kernel.transformers"), ("datasets", "datasets"), ("pyarrow", "pyarrow"),
                ("fsspec", "fsspec"), ("huggingface-hub", "huggingface_hub"), ("triton", "triton")):
    try:
        importlib.import_module(m)
        print(dist, md.version(dist))
    except Exception as e:  # noqa: BLE001
        print(dist, "IMPORT FAILED", type(e).__name__, str(e)[:200])
try:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    print("varlen_attn available")
except ImportError as e:
    print("varlen_attn missing", e)
EOF
left=$(( budget - $(date +%s) + t0 ))
echo "plan $plan, ${left}s for it (after $(( $(date +%s) - t0 ))s of set-up)"
# the first case of the plan (8B realistic) gets the profiled pass after its rounds
timeout $(( left + 30 )) $py bench/alternate.py --device "$device" --plan "$plan" --profile "${plan%%:*}" \
  --profile-steps 6 --budget-s "$left" --out "$OUT"/alt.jsonl --logs "$OUT"
echo "=== table at $(( $(date +%s) - t0 ))s"
$py bench/alternate.py --table "$OUT"/alt.jsonl | tee "$OUT"/table.md
echo "done at $(( $(date +%s) - t0 ))s"
