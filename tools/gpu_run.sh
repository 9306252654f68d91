#!/usr/bin/env bash
# The GPU runs behind the README's GPU figures, in parts of under 10 minutes each (tables in
# $OUT/*.txt, each ending with its command's exit status, 124 when it timed out):
#   OUT=results bash tools/gpu_run.sh eager      # flash/bf16/compile checks, eager benchmarks, DDP demo (~9 min)
#   OUT=results bash tools/gpu_run.sh compiled   # compiled bf16 at batch 16, NHWC: semseg step, UNet fwd+bwd and its
#                                                # kernel profile (~10 min)
#   OUT=results bash tools/gpu_run.sh graphs 16  # the semseg step under CUDA graphs (reduce-overhead) at these
#                                                # batches (default 2; ~5 min each)
#   OUT=results bash tools/gpu_run.sh unet 16    # the UNet fwd+bwd under CUDA graphs at these batches (default 16;
#                                                # ~3 min each)
#   OUT=results bash tools/gpu_run.sh kernels    # SD's attention and conv shapes under each kernel choice, the VAE's
#                                                # attention, eager, and the group norms compiled, at batches 16 and 2 (~9 min)
#   OUT=results bash tools/gpu_run.sh profile    # the compiled semseg step at batch 16, timed, then a kernel profile of
#                                                # it; the group norms' ways at batch 16; the compiled VAE encoder (~9 min)
#   OUT=results bash tools/gpu_run.sh sweep 2 8  # compiled NHWC semseg step at these batches: speed, peak memory (~5 min each)
#   OUT=results bash tools/gpu_run.sh evalms     # ADE20K's ms + flip test of one image: 4 windows per forward vs 1 (~1 min)
#   OUT=results bash tools/gpu_run.sh ddp 16     # the compiled semseg step split at DDP's buckets at these batches
#                                                # (default 2; ~5 min each; the same step without DDP: sweep)
#   OUT=results bash tools/gpu_run.sh ddpgraphs  # the same split step under CUDA graphs: does reduce-overhead work under DDP (~5 min)
# Compiling the full model takes minutes (about 4 on an H200; a 230 s limit cut the semseg step short on an
# H100, and 120 s the UNet; bench.py prints each warm-up's time, the compile's), so each compiled row has a
# long timeout, and each batch of the sweep is its own process: one static-shape compile each (a second
# batch in the same process would be recompiled with a dynamic batch dimension), each row kept if a later
# one runs out of time.
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
OUT=${OUT:-gpu_results}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
B="python3 bench.py --size full --res 512 --device cuda"

# run FILE SECONDS COMMAND...: the output on screen and in $OUT/FILE, then the command's exit status
run() {
  local file=$1 seconds=$2
  shift 2
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$file"
  echo "exit status ${PIPESTATUS[0]}" | tee -a "$OUT/$file"
}

part=${1:-eager}
shift || true
case "$part" in
eager)
  run check.txt 270 python3 tools/gpu_check.py
  run unet_bf16.txt 75 $B --batch 8 --dtype bf16 --which unet --iters 10 --warmup 3
  run eager_fp32.txt 60 $B --batch 2 --dtype fp32 --which unet_fwdbwd,train_semseg --iters 5 --warmup 2
  run sweep_bf16.txt 80 $B --dtype bf16 --which "" --sweep-batch 2,8,16 --iters 5 --warmup 2
  demo=${TMPDIR:-/tmp}/demo_gpu  # outside $OUT, which comes back from the GPU machine
  rm -rf "$demo"  # an earlier run's checkpoint there: train.py would refuse to overwrite it
  run demo_train.txt 60 torchrun --nproc_per_node=1 train.py --demo --iters 20 --log-every 5 --eval-max 8 \
    --device cuda --out "$demo" ;;
compiled)
  run compiled_semseg16.txt 340 $B --batch 16 --dtype bf16 --compile --channels-last --which train_semseg \
    --iters 5 --warmup 2 --json "$OUT/compiled_semseg16.json"
  run compiled_unet16.txt 250 $B --batch 16 --dtype bf16 --compile --channels-last --no-ref --which unet_fwdbwd \
    --iters 5 --warmup 2 --json "$OUT/compiled_unet16.json" --profile "$OUT/profile_unet16.txt" ;;
graphs)  # at batch 16 on an H100: 191.7 ms against 190.4 compiled alone, though its kernels add up to 176.9
  for batch in ${@:-2}; do
    run graphs_semseg$batch.txt 300 $B --batch "$batch" --dtype bf16 --compile --compile-mode reduce-overhead \
      --channels-last --which train_semseg --iters 10 --warmup 3 --json "$OUT/graphs_semseg$batch.json"
  done ;;
unet)  # the UNet's share of the peak by batch under CUDA graphs: 31.7% at 16, 34.0 at 32, 36.2 at 64 on an H100
  for batch in ${@:-16}; do
    run graphs_unet$batch.txt 240 $B --batch "$batch" --dtype bf16 --compile --compile-mode reduce-overhead \
      --channels-last --no-ref --which unet_fwdbwd --iters 10 --warmup 3 --json "$OUT/graphs_unet$batch.json"
  done ;;
kernels)  # where the UNet's time goes, whether another attention or convolution kernel would pay
  for b in 16 2; do
    run kernels$b.txt 280 python3 bench_kernels.py --batch $b --res 512 --json "$OUT/kernels$b.json"
  done ;;
profile)  # where the semseg step's time goes beyond the UNet (201 ms against the UNet's 132 at batch 16 on an H100)
  run compiled_semseg16.txt 300 $B --batch 16 --dtype bf16 --compile --channels-last --which train_semseg \
    --iters 5 --warmup 2 --json "$OUT/compiled_semseg16.json" --profile "$OUT/profile_semseg16.txt"
  run norms16.txt 200 python3 bench_kernels.py --batch 16 --res 512 --which unet_norm,vae_norm \
    --json "$OUT/norms16.json"
  run vae16.txt 90 $B --batch 16 --dtype bf16 --compile --channels-last --no-ref --which vae_enc --iters 5 --warmup 2 \
    --json "$OUT/vae16.json" ;;
sweep)  # a fresh H100's cold compile took 252 s at batch 8 (21 s from inductor's cache on the same machine)
  for b in "${@:-2 8}"; do
    for batch in $b; do
      run compiled_semseg$batch.txt 330 $B --batch "$batch" --dtype bf16 --compile --channels-last \
        --which train_semseg --iters 5 --warmup 2 --json "$OUT/compiled_semseg$batch.json"
    done
  done ;;
evalms)  # eval.py's semseg test (eager bf16): its windows batched against mmseg's one per forward
  run eval_semseg.txt 150 $B --dtype bf16 --which eval_semseg --iters 3 --warmup 1 --json "$OUT/eval_semseg.json" ;;
ddp)  # what train.py's DDP(compile(model)) costs a GPU beyond the communication: ~130 graphs, one per 25 MB bucket of 3.3 GiB
  for batch in ${@:-2}; do
    run semseg${batch}_ddp.txt 300 $B --batch "$batch" --dtype bf16 --compile --channels-last --which train_semseg \
      --iters 10 --warmup 3 --ddp --json "$OUT/semseg${batch}_ddp.json"
  done ;;
ddpgraphs)
  run semseg2_ddp_graphs.txt 300 $B --batch 2 --dtype bf16 --compile --compile-mode reduce-overhead --channels-last \
    --which train_semseg --iters 10 --warmup 3 --ddp --json "$OUT/semseg2_ddp_graphs.json" ;;
*) echo "usage: bash tools/gpu_run.sh eager|compiled|graphs [batches]|unet [batches]|kernels|profile|sweep [batches]|evalms|ddp [batches]|ddpgraphs" >&2
   exit 2 ;;
esac
