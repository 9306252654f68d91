"""Train VPD on one task.

    python train.py --demo                                    # tiny model, synthetic world, ~90 s on 2 CPU cores
    torchrun --nproc_per_node=8 train.py --task semseg --sd-ckpt v1-5-pruned-emaonly.safetensors --data-root data/ade
    python train.py --task depth --sd-ckpt ... --data-root data/nyu   # 1 GPU: 8 accumulated forwards of 3

Every setting of the paper's recipes but the schedule's shape (its kind, power and floor) is a flag;
flags left out take the task's preset (PRESETS in train.py; the README's table). Launched by torchrun it runs DDP
(nccl on GPU, gloo on CPU). Checkpoints go to --out: model.safetensors (trained weights) and
state.pt (step, weights, optimizer, RNG, args); --resume continues exactly where a run stopped.
"""
import argparse
import json
import math
import os
import random
import signal
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from eval import count, evaluate
from vpd import dist
from vpd.data import error_line
from vpd.optim import build_optimizer, lr_factor, set_lr
from vpd.trained import (load_trained_state, read_meta, save_json, save_state, save_weights, trained_state,
                         write_atomic)
from vpd.sampler import GlobalBatchSampler
from vpd.metrics import json_ready
from vpd.model import TASKS
from vpd.tasks import (DATASETS, baseline_model, build_task, demo_files, demo_out, forward_loss, refer_split_by,
                       to_device)
from vpd.vis import plot_curves

# The paper's recipes (VPD's configs and scripts). batch_size is the global batch of one optimizer step;
# micro_batch the images per process per forward: depth's 3 as on VPD's 8 GPUs, since its SILog loss
# (not a mean over images) and unsynchronised BatchNorm see one forward's images (semseg and refer:
# batch_size / processes, their losses are means and their BatchNorm is synchronised).
PRESETS = {
    "semseg": dict(lr=8e-5, weight_decay=1e-3, unet_lr_mult=0.1, iters=80_000, epochs=None, batch_size=16,
                   crop=512, schedule="poly", power=1.0, warmup_iters=1500, min_lr_ratio=0.0, eval_every=8000),
    "depth": dict(lr=5e-4, weight_decay=0.1, unet_lr_mult=0.01, iters=None, epochs=25, batch_size=24, micro_batch=3,
                  crop=480, schedule="updown", power=0.9, warmup_iters=0, min_lr_ratio=3e-5 / 5e-4, eval_every=None),
    "refer": dict(lr=5e-5, weight_decay=1e-2, unet_lr_mult=1.0, iters=None, epochs=40, batch_size=32,
                  crop=512, schedule="poly", power=0.9, warmup_iters=0, min_lr_ratio=0.0, eval_every=None),
}
# --demo: a tiny random-weight model on the synthetic world, the whole pipeline in ~90 s on 2 CPU cores.
DEMO = dict(iters=300, batch_size=8, micro_batch=None, lr=1e-3, unet_lr_mult=1.0, warmup_iters=0, eval_every=None,
            log_every=10, save_every=100, demo_images=192, demo_size=128)
DEMO_CROP = {"semseg": 128, "depth": 96, "refer": 128}  # synthetic images are 128x96
CROP_MULTIPLE = {"semseg": 64, "depth": 32, "refer": 64}  # the side lengths each network takes
# Settings that shape a run's trajectory: --resume must continue with the values it was started with.
RUN_SETTINGS = ("task", "iters", "epochs", "batch_size", "micro_batch", "amp", "lr", "weight_decay", "unet_lr_mult",
                "param_groups", "warmup_iters", "crop", "seed", "dataset", "split_by", "schedule", "power",
                "min_lr_ratio", "demo_images", "demo_size")
RUN_FILES = ("sd_ckpt", "data_root", "class_embeddings")  # where given, the same contents (the demo writes its own)
PRESET_ONLY = ("schedule", "power", "min_lr_ratio", "demo_images", "demo_size")  # no flag: PRESETS / DEMO alone
# left out on --resume, the run's own: its recipe, files, and what it logs, saves and evaluates (not the
# flags of speed and hardware: --compile, --channels-last, --grad-checkpoint, --device, --workers)
FROM_RUN = tuple(k for k in RUN_SETTINGS if k not in PRESET_ONLY) + RUN_FILES + (
    "demo", "log_every", "save_every", "eval_every", "eval_max", "text_cache")


def factor(zero_ok):
    """argparse type: a finite float > 0, or >= 0 where zero_ok (a negative lr or decay climbs the loss,
    and torch's optimizer says so only once the model is built)."""
    def parse(text):
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(x) or x < 0 or (x == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if zero_ok else '>'} 0, got {text}")
        return x
    return parse


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, help="semseg (ADE20K), depth (NYUv2 / KITTI) or refer (RefCOCO)")
    p.add_argument("--demo", action="store_true", default=None,
                   help="tiny random model on synthetic data (task depth unless --task says; a given tiny-config "
                        "--sd-ckpt or synthetic --data-root is used instead of writing one into --out)")
    p.add_argument("--sd-ckpt", help="Stable Diffusion v1.x .safetensors or .ckpt")
    p.add_argument("--data-root", help="dataset root in its standard layout (see README)")
    p.add_argument("--dataset", default=None, help="depth: nyu|kitti; refer: refcoco|refcoco+|refcocog")
    p.add_argument("--split-by", choices=["unc", "umd", "google"], default=None,
                   help="refer: REFER's split set, unc (refcoco, refcoco+; default) or umd / google (refcocog; "
                   "default umd)")
    p.add_argument("--out", default=None, help="output directory (default out/<task>; --demo: out/demo, "
                   "out/demo_semseg, out/demo_refer)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out; the flags of "
                   "its recipe, files, logging and evaluation left out are the run's own")
    p.add_argument("--auto-resume", action="store_true", help="--resume if --out holds a checkpoint, else start the "
                   "run: one command for a job a scheduler may stop and requeue (mmseg's --auto-resume)")
    p.add_argument("--iters", type=count(1), help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=count(1))
    p.add_argument("--batch-size", type=count(1), help="global batch per optimizer step")
    p.add_argument("--micro-batch", type=count(1), help="images per process per forward, accumulated to "
                   "--batch-size (default: --batch-size / processes; the depth recipe: 3)")
    p.add_argument("--lr", type=factor(zero_ok=False))
    p.add_argument("--weight-decay", type=factor(zero_ok=True))
    p.add_argument("--unet-lr-mult", type=factor(zero_ok=True), help="0 keeps the UNet as it is (but for the "
                   "transformer norms under semseg's --param-groups official)")
    p.add_argument("--param-groups", choices=["default", "official"], default=None,
                   help="official: VPD's own lr / weight-decay groups for semseg and refer (README, 'Optimizer "
                        "groups'); depth's are the default ones")
    p.add_argument("--warmup-iters", type=count(0))
    p.add_argument("--crop", type=count(1))
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None,
                   help="autocast dtype (default: bf16 on GPU, off on CPU, where bf16 is slower; "
                        "--resume: the run's own)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (backend: inductor, or e.g. aot_eager, which needs no C++ compiler)")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default=None,
                   help="inductor's mode; reduce-overhead replays CUDA graphs, against the launch overhead of "
                        "small per-GPU batches")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per UNet block")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC memory layout for the convolutions (what GPU bf16 convolution kernels read natively)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--workers", type=count(0), help="data loader processes per training process (default: up to 4)")
    p.add_argument("--seed", type=count(0), help="(default 0)")
    p.add_argument("--log-every", type=count(1), help="steps per log line (default 50; --demo: 10)")
    p.add_argument("--eval-every", type=count(1), help="steps between evaluations (always at the last step)")
    p.add_argument("--eval-max", type=count(1), default=None, help="evaluate on at most this many samples")
    p.add_argument("--save-every", type=count(1), help="steps between checkpoints (default 1000, --demo: 100; "
                   "always at the end)")
    p.add_argument("--stop-after", type=count(1), default=None, help="end the run after this step, having saved a "
                   "checkpoint (the schedule still spans --iters; continue later with --resume)")
    p.add_argument("--class-embeddings", default=None, metavar="FILE",
                   help="semseg / depth: a (K, 768) tensor file used as the class embeddings instead of computing "
                        "them, e.g. VPD's segmentation/class_embeddings.pth (the released model's exact text)")
    p.add_argument("--text-cache", default=None, help="directory caching class embeddings (default: text_cache "
                   "beside --out)")
    args = p.parse_args(argv)
    if args.compile_mode and args.compile != "inductor":
        p.error("--compile-mode is inductor's: give it with --compile (inductor)")
    state = resumed_run(args)
    started = state["args"] if state else None
    if started and args.task not in (None, started["task"]):
        raise SystemExit(f"--resume: {args.out} holds a {started['task']} run, not {args.task}")
    if started and args.demo and not started["demo"]:
        raise SystemExit(f"--resume: the run in {args.out} is not a --demo run: leave out --demo")
    for k in FROM_RUN if started else ():
        if getattr(args, k) is None and not derived(k, state):
            setattr(args, k, started.get(k))
    args.demo = bool(args.demo)
    if args.task is None:
        if not args.demo:
            p.error("--task is required (semseg, depth or refer), or --demo for the tiny demo")
        args.task = "depth"
    if not args.demo and (args.sd_ckpt is None or args.data_root is None):
        p.error("real training needs both --sd-ckpt and --data-root (or --demo for the tiny demo)")
    demo = dict(DEMO, crop=DEMO_CROP[args.task]) if args.demo else {}
    common = dict(log_every=50, save_every=1000, workers=min(4, os.cpu_count() or 1), seed=0, param_groups="default")
    epochs_given = args.epochs is not None and args.iters is None
    for k, v in {**common, **PRESETS[args.task], **demo}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if epochs_given:  # --epochs alone sets the length: not the preset's --iters, which would override it
        args.iters = None
    for k in (*RUN_FILES, "text_cache"):  # absolute: --resume compares or reuses them, maybe from another directory
        if getattr(args, k) is not None:
            setattr(args, k, os.path.abspath(getattr(args, k)))
    if args.iters is None and args.epochs is None:
        p.error("give --iters or --epochs")
    if args.schedule == "updown" and args.warmup_iters:
        p.error("--warmup-iters: the depth schedule (VPD's rise from 3e-5 to 5e-4 and back) has no warmup")
    if args.param_groups == "official" and args.task == "depth":
        p.error("--param-groups official: VPD's depth groups are the default ones")
    if args.split_by is not None and args.task != "refer":
        p.error(f"--split-by is for the refer task, not {args.task}")
    if args.dataset is not None and args.dataset not in DATASETS[args.task]:
        p.error(f"--dataset {args.dataset!r} is not a {args.task} dataset: {', '.join(DATASETS[args.task])}")
    if args.demo and args.data_root is None and args.dataset not in (None, DATASETS[args.task][0]):
        p.error(f"--demo synthesises {DATASETS[args.task][0]} data only: --dataset {args.dataset} wants "
                "--data-root with its files")
    # the defaults written out, so that --resume with them given is the same run
    args.dataset = args.dataset or DATASETS[args.task][0]
    args.split_by = refer_split_by(args.dataset, args.split_by) if args.task == "refer" else None
    if args.class_embeddings and args.task == "refer":
        p.error("--class-embeddings is for semseg and depth: the refer model reads its sentences with CLIP")
    if args.crop % CROP_MULTIPLE[args.task]:
        p.error(f"--crop {args.crop}: the {args.task} network takes sides that are multiples of "
                f"{CROP_MULTIPLE[args.task]}")
    args.out = args.out or (demo_out(args.task) if args.demo else os.path.join("out", args.task))
    return args


def resumed_run(args):
    """The state.pt (mapped, not read) of the run --resume continues, or --auto-resume where --out holds one;
    None for a new run."""
    if not (args.resume or args.auto_resume):
        return None
    out = args.out or (demo_out(args.task or "depth") if args.demo else os.path.join("out", args.task) if args.task
                       else None)
    if out is None:
        if args.resume:
            raise SystemExit("--resume: give --out, the run's folder (or --task for out/<task>, --demo for out/demo)")
        return None
    args.out, path = out, os.path.join(out, "state.pt")
    if not os.path.isfile(path):
        if args.resume:
            raise SystemExit(f"--resume: no checkpoint to resume from in {out} (expected {path})")
        return None
    try:  # mmap: the flags without reading the weights, and each process maps the optimizer state, no copy of its own
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file: say which)
        raise SystemExit(f"--resume: cannot read the checkpoint in {out}: {type(e).__name__}: {e}") from None


def derived(k, state):
    """Whether a resumed run's setting `k` was not chosen but derived, and so is derived again rather than
    taken: a micro-batch of the batch / processes, and the demo's own SD file and data in its --out (a run
    moved or copied elsewhere takes those in its new folder)."""
    started = state["args"]
    if k == "micro_batch":
        return started["micro_batch"] == started["batch_size"] // len(state["ranks"])
    if k in ("sd_ckpt", "data_root") and started["demo"] and started[k] is not None:
        own = os.path.normpath(demo_files(started["out"], started["task"])[k == "data_root"])
        path = os.path.normpath(started[k])  # absolute; the run's --out maybe relative to where it ran
        return path == own or path.endswith(os.sep + own.lstrip(os.sep))
    return False


def main(args):
    rank, world, device = dist.setup(args.device)
    master = rank == 0
    print0 = print if master else (lambda *a, **k: None)
    dist.writable_dir(args.out)
    state_path, weights_path = os.path.join(args.out, "state.pt"), os.path.join(args.out, "model.safetensors")
    log_path, metrics_path = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "metrics.json")
    curves_path = os.path.join(args.out, "curves.png")
    # micro_set: --micro-batch or the depth preset's 3; None: derived from --batch-size
    micro_set, micro = args.micro_batch, args.micro_batch or args.batch_size // world
    if micro == 0 or args.batch_size % (micro * world):
        split = f"{world} process{'es' * (world > 1)}" + (f" x --micro-batch {micro_set}" if micro_set else "")
        recipe = args.task == "depth" and not args.demo and micro_set == 3  # the preset's, or given as it
        raise SystemExit(f"--batch-size {args.batch_size} does not split evenly over {split}"
                         + ("; the depth recipe forwards 3 images per process: give a --batch-size that is a "
                            "multiple of 3 x processes, or another --micro-batch" if recipe else ""))
    args.micro_batch, accum = micro, args.batch_size // (micro * world)
    # the semseg head's BatchNorm at 1/64 of the crop: over the micro-batch, and over all GPUs under SyncBN
    values = micro * (world if device.type == "cuda" else 1) * (args.crop // 64) ** 2
    if args.task == "semseg" and values < 2:
        raise SystemExit(f"--crop {args.crop} with {micro} image{'s' * (micro > 1)} per forward: the semseg head's "
                         "BatchNorm would normalise its 1/64 map over one value per channel; give a larger --crop "
                         "or --micro-batch")
    args.amp = dist.resolve_amp(args.amp, device)

    state, moved = resumed_run(args), []
    if args.auto_resume and not args.resume:
        print0(f"--auto-resume: {'continuing the run in' if state else 'no checkpoint yet in'} {args.out}")
    args.resume = state is not None
    if state is not None:
        if len(state["ranks"]) != world:
            n = len(state["ranks"])
            raise SystemExit(f"--resume: {args.out} was written by {n} processes, this run has {world}: "
                             f"launch it with {n} (torchrun --nproc_per_node)")
        started = dict(state["args"], dataset=state["args"]["dataset"] or DATASETS[args.task][0])  # None: the default
        started.setdefault("param_groups", "default")  # runs from before the flag
        if args.task == "refer":
            started["split_by"] = refer_split_by(started["dataset"], started["split_by"])
        changed = [k for k in RUN_SETTINGS if started.get(k) != getattr(args, k, None)]
        if "batch_size" in changed and micro_set is None:  # derived from --batch-size, then and now (see derived)
            changed = [k for k in changed if k != "micro_batch"]
        # files at another path (moved, or copied to a local disk): taken if they hold what the run's did,
        # checked once read; a run from before the SD file's fingerprint was recorded compares paths alone
        moved = [k for k in RUN_FILES if getattr(args, k) is not None and started.get(k) != getattr(args, k)]
        changed += [k for k in moved if k == "sd_ckpt" and "frozen_sha256" not in state]
        if changed:  # a preset-only setting differs when train.py's presets changed since the run started
            def shown(v):  # (a run's length: --iters or --epochs, the other unset)
                return "unset" if v is None else v
            said = [f"{k} {started.get(k)} (this train.py's preset: {getattr(args, k, None)})" if k in PRESET_ONLY
                    else f"--{k.replace('_', '-')} {shown(started.get(k))} (not {shown(getattr(args, k, None))})"
                    for k in changed]
            raise SystemExit(f"--resume: the run in {args.out} was started with {', '.join(said)}; pass the same values"
                             + ("; a preset differs: resume with the train.py the run started with"
                                if set(changed) & set(PRESET_ONLY) else ""))
        if args.stop_after is not None and args.stop_after <= state["step"]:
            raise SystemExit(f"--stop-after {args.stop_after}: the run in {args.out} is already at step "
                             f"{state['step']}; give a later step, or leave it out to finish the run")
    elif os.path.isfile(state_path):
        raise SystemExit(f"--out {args.out} holds the checkpoint of an earlier run: continue it with --resume, "
                         "or give another --out")
    elif os.path.isfile(weights_path):  # a finished run whose state.pt was deleted to save space
        raise SystemExit(f"--out {args.out} holds the trained weights of an earlier run ({weights_path}): "
                         "give another --out")
    elif master:  # what a run that ended before its first checkpoint left: not this run's log and results
        left = [name for name in (log_path, metrics_path, curves_path) if os.path.isfile(name)]
        for name in left:
            os.remove(name)
        if left:
            print0(f"removed {', '.join(map(os.path.basename, left))} from {args.out}: left by a run that ended "
                   "before its first checkpoint")
    if master:  # the temporary of a save that was killed outright (kill -9, power cut): GBs at full size
        for name in os.listdir(args.out):
            if name.startswith(("state.pt.tmp", "model.safetensors.tmp")):
                os.remove(os.path.join(args.out, name))

    torch.manual_seed(args.seed + rank)
    # --- task: datasets, model, evaluation (vpd/tasks.py) ---
    try:
        built = build_task(args, device, log=print0)
    except (ValueError, FileNotFoundError) as e:  # bad files / configs: say which, without a traceback
        raise SystemExit(f"{type(e).__name__}: {e}") from None
    model, train_set = built.model.to(device), built.train_set
    if args.grad_checkpoint:
        model.backbone.unet.grad_checkpointing = True
    if args.channels_last:  # the weights' layout is enough: each convolution's output follows it
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == "cuda" and args.task != "depth":  # VPD's seg and refer heads use SyncBN
        # across GPUs; its depth head normalises each GPU's own batch of 3
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw = model  # saved and evaluated; never the compiled / DDP wrapper (no _orig_mod. / module. prefixes)

    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"the training set has {len(train_set)} samples, fewer than one batch of {args.batch_size}")
    if state is not None and state["train_samples"] != len(train_set):  # batches and length
        raise SystemExit(f"--resume: the run in {args.out} trained on {state['train_samples']} samples; "
                         f"--data-root {args.data_root} now holds {len(train_set)}")
    # resumed runs: the files' contents, whether given at a new path or replaced at the run's own one
    if state is not None and "frozen_sha256" in state and built.meta["frozen_sha256"] != state["frozen_sha256"]:
        given = f"--sd-ckpt {args.sd_ckpt}" if args.sd_ckpt else f"the demo's SD file in {args.out}"
        raise SystemExit(f"--resume: {given} is not the SD file the run in {args.out} started with "
                         f"({state['args']['sd_ckpt'] or 'the one written there'}): its frozen VAE/CLIP weights differ")
    if state is not None and args.class_embeddings and not torch.equal(raw.class_embeddings.cpu(),
                                                                       state["model"]["class_embeddings"]):
        raise SystemExit(f"--resume: --class-embeddings {args.class_embeddings} holds other text embeddings than the "
                         f"run in {args.out} started with ({state['args'].get('class_embeddings')})")
    for k in moved:  # (resumed runs only)
        given, was = f"--{k.replace('_', '-')} {getattr(args, k)}", state["args"].get(k) or "the SD file's embeddings"
        same = {"sd_ckpt": "the same frozen weights", "class_embeddings": "the same embeddings",
                "data_root": f"as many training samples, {len(train_set)}"}[k]
        print0(f"--resume: {given} in place of {was}, which the run started with ({same})")
    total = args.iters or args.epochs * steps_per_epoch
    stop = min(total, args.stop_after or total)
    peak = (args.epochs // 2) * steps_per_epoch if args.epochs and not args.iters else None

    autocast = dist.amp_autocast(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    optimizer = build_optimizer(raw, args.lr, args.weight_decay, args.unet_lr_mult, fused=device.type == "cuda",
                                official=args.task if args.param_groups == "official" else None)
    step, loss_sum, last = 0, 0.0, 0  # loss_sum: this rank's loss since the last log line at step `last`
    redo_eval = False

    def eval_due(s):
        return s == total or bool(args.eval_every and s % args.eval_every == 0)
    if state is not None:
        # a crash between the two writes of a save leaves the previous weights file (or none): write it again
        weights_step = (read_meta(weights_path) or {}).get("step") if os.path.isfile(weights_path) else None
        evaluated = read_json(metrics_path).get("step") == state["step"]  # metrics.json: the step evaluated last
        if state["step"] == total and weights_step == state["step"] and evaluated and os.path.isfile(curves_path):
            print0(f"--resume: the run in {args.out} is complete (step {total}, evaluated): nothing to do")
            dist.teardown()
            return
        try:
            load_trained_state(raw, state["model"], state_path)
        except ValueError as e:
            raise SystemExit(f"--resume: {e}") from None
        if master and weights_step != state["step"]:
            save_weights(raw, weights_path, dict(built.meta, step=state["step"], args=state["args"]))
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, last = state["step"], state["last_log"]
        # a run killed in the evaluation that follows its checkpoint evaluates again
        redo_eval = eval_due(step) and not evaluated
        mine = state["ranks"][rank]
        loss_sum = mine["loss_sum"]
        torch.set_rng_state(mine["torch"])
        np.random.set_state(mine["numpy"])
        random.setstate(mine["python"])
        if device.type == "cuda" and mine.get("cuda") is not None:
            torch.cuda.set_rng_state(mine["cuda"], device)
        if master and os.path.isfile(log_path):
            # drop the lines a crashed run wrote after this checkpoint, a last one without its newline
            # (torn by the crash), and the line of an evaluation that is run again
            with open(log_path) as f:
                keep = [json.loads(line) for line in f if line.strip() and line.endswith("\n")]
            keep = [r for r in keep if r["step"] < step or (r["step"] == step and ("loss" in r or not redo_eval))]
            tmp = f"{log_path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(tmp, log_path)
        elif master:
            print(f"{log_path} is missing: the log (and curves.png) restarts at step {step + 1}")
        print0(f"resumed from {args.out} at step {step}")

    loss_fn = raw.loss
    if args.compile:  # compiled at the first step, not here
        # inductor advises TF32 wherever it compiles a float32 matrix product on a GPU: resize_bilinear's products
        # upsample the logits in float32 on purpose
        warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores for float32 matrix multiplication")
        model = torch.compile(model, backend=args.compile, mode=args.compile_mode)
        # the loss too, apart from the model that DDP wraps: compiled, semseg's cross-entropy reads the float32
        # logits at the image size (150 x 512 x 512 per image) once each way, and keeps no log-probabilities
        loss_fn = torch.compile(raw.loss, backend=args.compile)
        print0(f"--compile {args.compile}: the first step compiles the model (minutes for SD v1.5 with inductor)")
        if args.compile_mode == "reduce-overhead" and device.type != "cuda":
            print0(f"--compile-mode reduce-overhead: CUDA graphs need a GPU; on {device.type} the model is compiled "
                   "without them")
    elif device.type == "cuda":  # eager stays the default until the compiled DDP step has been run on GPUs
        print0("eager: on a GPU, --compile --channels-last trains a semseg step 1.6x faster at 16 images per GPU, "
               "and with --compile-mode reduce-overhead 3.9x at 2 (README, Benchmarks)")
    if world > 1:  # the gradients are views into DDP's all-reduce buckets: not copied into them and back each
        # step, and no second copy of them held (3.3 GB for SD v1.5)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)

    print0(f"{args.task}: {len(train_set)} training samples, {total} step{'s' * (total != 1)} of {args.batch_size} "
           f"images ({world} process{'es' if world > 1 else ''} x {micro} x {accum} accumulation), amp {args.amp}")
    bar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True)
    saved = step if state is not None else None  # the step of the checkpoint in --out
    advice = "lower --lr" + (", or use --amp bf16 (fp16 overflows)" if args.amp == "fp16" else "")
    doing = None  # what the run was doing besides training when it stopped: "save" or "eval"

    def save():
        nonlocal saved, doing
        # a diverged run keeps its last good checkpoint; all ranks decide together (norm statistics differ by rank)
        doing = "save"
        bad = next((k for k, v in raw.state_dict().items() if v.is_floating_point() and not v.isfinite().all()), None)
        bad = next((b for b in dist.gather_objects(bad) if b is not None), None)
        if bad is not None:
            bar.close()
            where = f"the checkpoint in {args.out} stays at step {saved}" if saved else "no checkpoint was written"
            raise SystemExit(f"non-finite weights after step {step} ({bad}): not saved; {where} ({advice})")
        mine = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                    cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    loss_sum=float(loss_sum))
        ranks = dist.gather_objects(mine)  # each rank resumes its own RNG streams and loss window
        if master:  # state.pt first: it alone is what --resume reads
            weights = trained_state(raw)  # one copy on the host for both files
            save_state(dict(step=step, last_log=last, model=weights, optimizer=optimizer.state_dict(),
                            scaler=scaler.state_dict(), args=vars(args), ranks=ranks, train_samples=len(train_set),
                            frozen_sha256=built.meta["frozen_sha256"]),
                       state_path)
            save_weights(raw, weights_path, dict(built.meta, step=step, args=vars(args)), weights)
        dist.barrier()
        saved, doing = step, None

    def stopped(what):
        """One line for a run that ends early, and how it can go on."""
        bar.close()  # the message on a line of its own
        at = saved
        if doing == "save":  # state.pt is replaced whole or not at all: the old checkpoint or the new one
            at = f"{step}, if the save got that far" + (f", else {saved}" if saved is not None else "")
        where = (f"the checkpoint in {args.out} is at step {at}: continue with --resume --out {args.out}"
                 if at is not None else "no checkpoint was written yet (a new run may take this --out)")
        when = {"save": f"in the save after step {step}", "eval": f"in the evaluation after step {step}"}
        return f"{what} {when.get(doing, f'in step {step + 1}')}; {where}"

    def next_batch(it):
        try:
            return next(it)
        except ValueError as e:  # a file or a setting the data cannot take (BadSampleError included)
            raise SystemExit(stopped(error_line(e))) from None

    def run_eval():
        nonlocal doing
        doing = "eval"
        dist.broadcast_buffers(raw)
        protocol = dict(workers=args.workers, depth_crop=built.meta["depth_crop"],  # the baseline's too
                        max_depth=getattr(raw, "max_depth", 10.0), seg_crop=args.crop)
        try:
            metrics = evaluate(raw, args.task, built.eval_set, device, autocast, args.eval_max, **protocol)
        except ValueError as e:  # an unreadable evaluation file, or no valid ground truth
            where = (f"the checkpoint in {args.out} is at step {saved}: eval.py evaluates it" if saved is not None
                     else "no checkpoint was written yet")
            raise SystemExit(f"evaluation after step {step}: {error_line(e)} ({where})") from None
        baseline = None
        if args.demo and step == total:  # the demo shows what training bought over a trivial predictor
            train_set.set_epoch(0)  # fitted to the first epoch's samples: the same however the run got here
            base_model, base_name = baseline_model(args.task, train_set)
            baseline = evaluate(base_model.to(device), args.task, built.eval_set, device, nullcontext, args.eval_max,
                                **protocol)
        if master:
            if step == total:  # the finished bar stays above the last table, not drawn again below it
                bar.close()
            # tqdm.write: the table below the progress bar, not over it (the evaluation bar has just moved the cursor)
            tqdm.write(side_by_side(metrics, baseline, f"step {step}", base_name if baseline else None))
            with open(log_path, "a") as f:
                f.write(json.dumps(dict(step=step, **{f"eval/{k}": v for k, v in metrics.items()
                                                      if isinstance(v, float)})) + "\n")
            samples = min(args.eval_max or len(built.eval_set), len(built.eval_set))
            save_json(json_ready(dict(step=step, samples=samples, **metrics, **(
                {"baseline": dict(name=base_name, **baseline)} if baseline else {}))), metrics_path)
        doing = None
        return metrics

    model.train()
    t0, timed = time.time(), step  # the speed window: steps since `timed`, from t0 (saves and evaluations left out)
    try:
        if redo_eval:  # (evaluate() puts the model in eval mode and back)
            run_eval()
            t0 = time.time()  # the redone evaluation is no training time either
        while step < stop:
            epoch = step // steps_per_epoch
            train_set.set_epoch(epoch)  # augmentations are a function of (seed, epoch, index)
            sampler = GlobalBatchSampler(len(train_set), micro, world, rank, accum, args.seed, epoch,
                                         start_step=step % steps_per_epoch)
            # its own generator: creating a loader must not draw from the global RNG (dropout), or a
            # resumed run, which creates one more loader, would drift from the uninterrupted one
            loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers,
                                                 pin_memory=device.type == "cuda",
                                                 generator=torch.Generator().manual_seed(args.seed))
            it = iter(loader)
            for _ in range(steps_per_epoch - step % steps_per_epoch):
                if step >= stop:
                    break
                lr = args.lr * lr_factor(step, total, args.schedule, args.warmup_iters, power=args.power,
                                         min_ratio=args.min_lr_ratio, peak=peak)
                set_lr(optimizer, lr)  # each group at lr x its multiplier
                for a in range(accum):
                    batch = to_device(next_batch(it), device)
                    sync = a == accum - 1 or world == 1
                    with (nullcontext() if sync else model.no_sync()), autocast():
                        loss = forward_loss(model, loss_fn, args.task, batch) / accum
                    scaler.scale(loss).backward()
                    loss_sum += loss.detach()  # no host sync per micro-step
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if step % args.log_every == 0 or step == total:
                    dt = time.time() - t0
                    loss_avg = dist.mean_over_ranks(float(loss_sum) / (step - last), device)
                    rec = dict(step=step, loss=loss_avg, lr=lr, ms=1000 * dt / (step - timed),
                               img_s=(step - timed) * args.batch_size / dt)
                    if device.type == "cuda":  # this rank's peak since the last log line, to size batches by
                        rec["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                        torch.cuda.reset_peak_memory_stats(device)
                    if not np.isfinite(loss_avg):
                        bar.close()  # the message on a line of its own
                        where = (f"the checkpoint in {args.out} is at step {saved}" if saved
                                 else "no checkpoint was written")
                        raise SystemExit(f"loss is {loss_avg} at step {step}: stopping; {where} ({advice})")
                    bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", img_s=f"{rec['img_s']:.1f}")
                    if master:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                    loss_sum, t0, last, timed = 0.0, time.time(), step, step
                paused = time.time()
                if step % args.save_every == 0 or step in (total, stop):
                    save()
                if eval_due(step):
                    run_eval()
                t0 += time.time() - paused
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see terminate)
        raise SystemExit(stopped(str(e) or "interrupted")) from None
    except torch.OutOfMemoryError:
        what = "out of memory"
        if doing is None:  # in a training step, not a save or an evaluation
            hints = [f"a --micro-batch under {micro} (accumulated to the same --batch-size)"] if micro > 1 else []
            hints += [] if args.grad_checkpoint else ["--grad-checkpoint"]
            what += f" with {micro} image{'s' * (micro > 1)} per forward" + (
                f" (try {' or '.join(hints)})" if hints else "")
        raise SystemExit(stopped(what)) from None
    except RuntimeError as e:  # (after OutOfMemoryError, one of its kind)
        # a scheduler's SIGTERM to every process of the job: the DataLoader's SIGCHLD handler, seeing a loader
        # worker's death, may run before terminate's first line can replace it, and raise this instead
        if "is killed by signal: Terminated" not in str(e):
            raise
        raise SystemExit(stopped("terminated")) from None
    bar.close()
    if master and step < total:
        print0(f"stopped after step {step} of {total} (--stop-after): continue with --resume --out {args.out} "
               "(--stop-after left out, or a later step)")
    elif master:
        # whole or not at all: a finished run is known by its plot (--resume), so a torn one must not stand for it
        write_atomic(lambda path: plot_curves(log_path, path), curves_path)
        print0(f"done: {weights_path}, {metrics_path}, {curves_path}")
    dist.teardown()


def read_json(path):
    """A JSON file's object, or {} when there is none (or half of one: a run killed while writing it)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def side_by_side(metrics, baseline=None, title="", baseline_name=None):
    """The scalar metrics as a table, with a baseline's column beside them when given."""
    names = [k for k, v in metrics.items() if isinstance(v, float)]
    head = f"{title:<12}{'model':>10}" + (f"   baseline: {baseline_name}" if baseline else "")
    rows = [f"{k:<12}{metrics[k]:>10.4f}" + (f"{baseline[k]:>13.4f}" if baseline else "") for k in names]
    return "\n".join([head] + rows)


def terminate(signum, frame):
    """SIGTERM, what a cluster scheduler (and torchrun, passing on its own) sends before killing a job: a
    run ends as on Ctrl-C, saying which checkpoint it leaves. A scheduler signals every process of the job,
    loader workers too: their deaths are expected from here on, not an error for the DataLoader's SIGCHLD
    handler to raise over that message (a handler that does nothing: with SIG_DFL, a SIGCHLD already pending
    prints a "race condition" error). The workers must stay killable: the DataLoader and Python's exit stop
    stray ones with SIGTERM."""
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    raise KeyboardInterrupt("terminated")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, terminate)
    try:
        main(get_args())
    except KeyboardInterrupt as e:  # before training started (the loop says which checkpoint there is)
        raise SystemExit(str(e) or "interrupted") from None
