#!/usr/bin/env bash
# The GPU runs behind the README's GPU figures, in parts that each fit a 10-minute call
# (tables in $OUT/*.txt; at most 8 files come back from a device call):
#   OUT=results bash tools/gpu_run.sh eager      # flash/bf16/compile checks, eager benchmarks, DDP demo (~9 min)
#   OUT=results bash tools/gpu_run.sh compiled   # the compiled bf16 semseg training step at batch 16 (~4.5 min)
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
B="python3 bench.py --size full --res 512 --device cuda"
case "${1:-eager}" in
eager)
  timeout 270 python3 tools/gpu_check.py 2>&1 | tee "$OUT/check.txt"
  timeout 75 $B --batch 8 --dtype bf16 --which unet --iters 10 --warmup 3 2>&1 | tee "$OUT/unet_bf16.txt"
  timeout 60 $B --batch 2 --dtype fp32 --which unet_fwdbwd,train_semseg --iters 5 --warmup 2 2>&1 | tee "$OUT/eager_fp32.txt"
  timeout 80 $B --dtype bf16 --which "" --sweep-batch 2,8,16 --iters 5 --warmup 2 2>&1 | tee "$OUT/sweep_bf16.txt"
  timeout 60 torchrun --nproc_per_node=1 train.py --demo --iters 20 --log-every 5 --eval-max 8 --device cuda --out /tmp/demo_gpu 2>&1 | tail -15 | tee "$OUT/demo_train.txt" ;;
compiled)
  timeout 320 $B --batch 16 --dtype bf16 --compile --which train_semseg --iters 5 --warmup 2 --json "$OUT/compiled_semseg16.json" 2>&1 | tee "$OUT/compiled_semseg16.txt" ;;
*) echo "usage: bash tools/gpu_run.sh eager|compiled" >&2; exit 2 ;;
esac
