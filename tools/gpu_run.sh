#!/usr/bin/env bash
# The GPU run behind the README's GPU figures: correctness checks, then the benchmarks.
# Usage (repo root, on a CUDA machine): OUT=results bash tools/gpu_run.sh
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
B="python3 bench.py --size full --res 512 --device cuda"
timeout 150 python3 tools/gpu_check.py 2>&1 | tee "$OUT/check.txt"
timeout 75 $B --batch 8 --dtype bf16 --which unet --iters 10 --warmup 3 --json "$OUT/unet_bf16.json" 2>&1 | tee "$OUT/unet_bf16.txt"
timeout 140 $B --batch 8 --dtype bf16 --compile --which unet_fwdbwd,train_semseg --iters 10 --warmup 3 --json "$OUT/compiled_bf16.json" 2>&1 | tee "$OUT/compiled_bf16.txt"
timeout 60 $B --batch 2 --dtype fp32 --which unet_fwdbwd,train_semseg --iters 5 --warmup 2 --json "$OUT/eager_fp32.json" 2>&1 | tee "$OUT/eager_fp32.txt"
timeout 80 $B --dtype bf16 --which "" --sweep-batch 2,8,16 --iters 5 --warmup 2 --json "$OUT/sweep_bf16.json" 2>&1 | tee "$OUT/sweep_bf16.txt"
timeout 60 torchrun --nproc_per_node=1 train.py --demo --iters 20 --log-every 5 --eval-max 8 --device cuda --out /tmp/demo_gpu 2>&1 | tail -15 | tee "$OUT/demo_train.txt"
