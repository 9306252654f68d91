"""Evaluate a trained VPD model (ours or an official release) with the paper's test protocol.

    python eval.py --task depth --ckpt out/depth/model.safetensors --data-root data/nyu
    python eval.py --task semseg --ckpt vpd_seg.pth --data-root data/ade --ms-flip
    torchrun --nproc_per_node=8 eval.py --task refer --ckpt ... --data-root data/refer --dataset refcoco --split val
    python eval.py --demo     # the checkpoint of `train.py --demo`

semseg: mIoU / aAcc / per-class IoU, sliding windows of the training crop (512, stride 341), optional
multi-scale + flip. depth: the nine metrics with the Eigen crop (NYU) or Garg crop (KITTI), flip +
shifted square windows (two for NYU's 480x640, as many as cover a KITTI frame). refer: oIoU, mIoU,
precision@0.5:0.9 over every sentence. Results on stdout and in
<out>/metrics_<dataset>[_<refer split set>]_<split>[_<test-time options>][_<bf16|fp16>].json (one file per protocol;
default <out>: eval/ next to the checkpoint); --save-vis writes coloured predictions. Under torchrun
each sample is counted exactly once (no DistributedSampler padding).
"""
import argparse
import math
import os
from contextlib import nullcontext

import torch
from tqdm import tqdm

from vpd import dist
from vpd.data import ADE20K_CLASSES, depth_eval_mask, error_line
from vpd.infer import depth_predict, refer_logits, semseg_probs
from vpd.metrics import KITTI_CROPS, DepthMetric, ReferMetric, SegMetric, json_ready
from vpd.model import TASKS
from vpd.sampler import ShardedEvalSampler
from vpd.tasks import build_eval, checkpoint_task, demo_out, to_device
from vpd.trained import save_json


@torch.no_grad()
def evaluate(model, task, dataset, device, autocast=nullcontext, max_samples=None, ms_flip=False,
             flip=True, save_vis=None, depth_crop="eigen", max_depth=10.0, workers=2, refer_full_res=False,
             seg_crop=512):
    """Metrics of `model` on `dataset` (its evaluation view, batch 1); each rank takes its shard of
    the first `max_samples` samples, and the metric sums are added over ranks at the end.
    semseg: sliding windows of seg_crop (the training crop) with stride 2/3 of it (512: 341, as mmseg).
    refer: scored against `mask_resized` (the mask at the network's input size, as LAVT / VPD
    score), or with refer_full_res against `mask` at the original image size."""
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    sampler = ShardedEvalSampler(n)
    # its own generator: a loader seeds its workers from the global RNG otherwise, and an evaluation
    # during training would shift the dropout draws of the steps after it (a resumed run would differ)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers,
                                         generator=torch.Generator())
    if task == "semseg":
        k = model.num_classes
        metric = SegMetric(k)
    elif task == "depth":
        metric = DepthMetric(max_depth=max_depth, crop=depth_crop)
    else:
        metric = ReferMetric()
    was_training = model.training
    model.eval()
    for batch in tqdm(loader, desc=f"eval {task}", disable=sampler.rank != 0, dynamic_ncols=True,
                      leave=False):
        batch = to_device(batch, device)
        image = batch["image"]
        with autocast():
            if task == "semseg":
                label = batch["label"]
                if ms_flip and "ms_images" not in batch:
                    raise ValueError("ms_flip: the dataset gives no multi-scale views (ADE20K(..., ms_ratios=MS_RATIOS))")
                views = batch["ms_images"] if ms_flip else [image]
                probs = semseg_probs(model, views, k, label.shape[-2:], flip=ms_flip, crop=seg_crop)
                pred = probs.argmax(1)
                metric.update(pred, label)
            elif task == "depth":
                windows = max(2, math.ceil(image.shape[-1] / image.shape[-2]))  # 2 for NYU's 480x640
                pred = depth_predict(model, image, batch["scene_id"], flip=flip, windows=windows)
                pred = torch.nn.functional.interpolate(pred, size=batch["depth"].shape[-2:], mode="bilinear")
                metric.update(pred, batch["depth"], region=kitti_region(batch, depth_crop))
            else:
                mask = batch["mask" if refer_full_res else "mask_resized"].bool()
                pred = refer_logits(model, image, batch["tokens"], mask.shape[-2:]).argmax(1) == 1
                metric.update(pred, mask)
        if save_vis:
            _save_vis(task, save_vis, batch, pred)
    model.train(was_training)
    metric.reduce()
    return metric.compute()


def kitti_region(batch, crop):
    """KITTI's Garg / Eigen crop in the frame of the KB-cropped map (fractions of the ORIGINAL image, as
    BTS scores; GLPDepth takes them of the KB-cropped map); None for maps whose crop DepthMetric takes
    from their own size."""
    if crop not in KITTI_CROPS or "orig_size" not in batch:
        return None
    if len(batch["orig_size"]) != 1:
        raise ValueError("KITTI evaluation takes one image per batch")
    return depth_eval_mask(batch["orig_size"][0].tolist(), crop, kb_crop=True)


def format_metrics(metrics, class_names=None):
    """Scalar metrics one per line; per-class IoU (semseg) for the classes that occur."""
    lines = [f"{k:>10}: {v:.4f}" for k, v in metrics.items() if isinstance(v, float)]
    if "IoU" in metrics:
        names = class_names or [str(i) for i in range(len(metrics["IoU"]))]
        seen = [(names[i], v) for i, v in enumerate(metrics["IoU"]) if v == v]  # NaN: class never seen
        lines.append(f"per-class IoU ({len(seen)} classes seen):")
        lines += [f"{name:>24}: {v:.2f}" for name, v in seen]
    return "\n".join(lines)


def _save_vis(task, out_dir, batch, pred):
    from vpd import vis
    os.makedirs(out_dir, exist_ok=True)
    name = f"{int(batch['index'][0]):06d}.png"
    if task == "semseg":
        vis.colorize_labels(pred[0].cpu().numpy()).save(os.path.join(out_dir, name))
    elif task == "depth":
        vis.colorize_depth(pred[0, 0].float().cpu().numpy()).save(os.path.join(out_dir, name))
    else:
        image = ((batch["image"][0].float().cpu().permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()
        mask = torch.nn.functional.interpolate(pred[:, None].float(), size=image.shape[:2])[0, 0] > 0.5
        vis.overlay_mask(image, mask.cpu().numpy()).save(os.path.join(out_dir, name))


def metrics_name(protocol):
    """metrics_<dataset>[_<split_by>]_<split>[_msflip][_noflip][_fullres][_first<N>][_bf16|_fp16].json: one file
    per protocol (split_by: refer's unc / umd / google split sets), and per precision: autocast's dtype, none for
    float32 (a GPU run's default bf16 and an --amp off run of one model do not overwrite each other)."""
    tags = [protocol["dataset"], *([protocol["split_by"]] if protocol["split_by"] else []), protocol["split"]]
    tags += [tag for tag, on in (("msflip", protocol["ms_flip"]), ("noflip", protocol["flip"] is False),
                                 ("fullres", protocol["refer_full_res"])) if on]
    tags += [f"first{protocol['max_samples']}"] if protocol["max_samples"] else []
    tags += [protocol["amp"]] if protocol["amp"] != "off" else []
    return "metrics_" + "_".join(tags) + ".json"


def count(at_least):
    """argparse type: an int >= at_least (0 or a negative count would divide by zero or do nothing)."""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < at_least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {at_least}, got {n}")
        return n
    return parse


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--ckpt", help="our model.safetensors, or an official VPD .ckpt/.pth")
    p.add_argument("--demo", action="store_true", help="evaluate the checkpoint of `train.py --demo` (out/demo, or "
                   "out/demo_<task> with --task semseg / refer) on its synthetic set")
    p.add_argument("--sd-ckpt", help="SD v1.x file for the frozen VAE/CLIP (default: the one training used). An "
                   "official release needs one only for refer (its CLIP) or when the release holds no VAE")
    p.add_argument("--data-root", help="dataset root in its standard layout (see README); only the evaluated split "
                   "needs to be there (default for --demo: its synthetic set)")
    p.add_argument("--dataset", default=None, help="depth: nyu|kitti; refer: refcoco|refcoco+|refcocog (default: "
                   "the one the model trained on; a released refer file names its own)")
    p.add_argument("--split-by", choices=["unc", "umd", "google"], default=None,
                   help="refer: default the split set the model trained with; for another --dataset, unc "
                   "(refcoco, refcoco+) or umd (refcocog; google too)")
    p.add_argument("--split", default=None, help="refer: val, testA, testB, test, ...")
    p.add_argument("--out", default=None, help="where metrics_<protocol>.json goes (default: eval/ next to --ckpt)")
    p.add_argument("--ms-flip", action="store_true", help="semseg: multi-scale + flip test")
    p.add_argument("--no-flip", action="store_true", help="depth: no flip averaging")
    p.add_argument("--refer-full-res", action="store_true",
                   help="refer: score masks at the original image size, not at the network's input size (the "
                        "training crop: 512x512 in the paper's recipe)")
    p.add_argument("--max-samples", type=count(1))
    p.add_argument("--save-vis", action="store_true", help="also write each sample's prediction as a coloured PNG "
                   "(<sample index, 6 digits>.png, e.g. 000012.png) into vis_<protocol>/ in --out")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None, help="default: bf16 on GPU, off on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=count(0), default=2, help="data loader processes")
    args = p.parse_args(argv)
    if args.demo and args.ckpt is None:
        args.ckpt = os.path.join(demo_out(args.task or "depth"), "model.safetensors")
        if not os.path.isfile(args.ckpt):
            p.error(f"no demo checkpoint at {args.ckpt}: run `python train.py --demo"
                    f"{' --task ' + args.task if args.task else ''}` first")
    if args.ckpt is None:
        p.error("--ckpt is required (or --demo)")
    return args


def check_task_flags(args, task):
    """Refuse flags of another task: they would be ignored without a word."""
    for flag, owner in (("ms_flip", "semseg"), ("no_flip", "depth"), ("refer_full_res", "refer"), ("split", "refer"),
                        ("split_by", "refer")):
        if getattr(args, flag) and task != owner:
            raise SystemExit(f"--{flag.replace('_', '-')} is only for the {owner} task, not {task}")


def main(args):
    rank, world, device = dist.setup(args.device)
    # the checkpoint checked (its header read: --task, or the task ours names) before its folder gets an
    # eval/ folder, and flags of another task refused before minutes of model loading
    check_task_flags(args, checkpoint_task(args.ckpt, args.task)[0])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval")
    dist.writable_dir(out)
    if rank == 0:
        print(f"loading {args.ckpt} and the evaluation set")
    try:
        ev = build_eval(args, device)  # model from the checkpoint + the evaluation set
    except (ValueError, FileNotFoundError) as e:  # unreadable or mismatched files: say which, no traceback
        raise SystemExit(f"{type(e).__name__}: {e}") from None
    autocast = dist.amp_autocast(args.amp, device)
    n = len(ev.dataset) if args.max_samples is None else min(args.max_samples, len(ev.dataset))
    # flip: depth's flip averaging (semseg flips with --ms-flip; refer never); first N: only if N < all
    protocol = dict(dataset=ev.dataset_name, split_by=ev.split_by, split=ev.split, ms_flip=args.ms_flip,
                    flip=not args.no_flip if ev.task == "depth" else None, refer_full_res=args.refer_full_res,
                    max_samples=n if n < len(ev.dataset) else None, amp=dist.resolve_amp(args.amp, device))
    name = metrics_name(protocol)  # metrics_<protocol>.json, and vis_<protocol>/ for the PNGs
    vis_dir = os.path.join(out, "vis_" + name[len("metrics_"):-len(".json")]) if args.save_vis else None
    try:
        metrics = evaluate(ev.model, ev.task, ev.dataset, device, autocast, args.max_samples, ms_flip=args.ms_flip,
                           flip=not args.no_flip, save_vis=vis_dir,
                           depth_crop=ev.depth_crop, max_depth=ev.max_depth, workers=args.workers,
                           refer_full_res=args.refer_full_res, seg_crop=ev.crop)
    except ValueError as e:  # an unreadable file (BadSampleError), or no valid ground truth
        raise SystemExit(error_line(e)) from None
    if rank == 0:
        # BTS's KITTI Eigen test list names frames without ground truth ('None'): say how many were left out
        skipped = getattr(ev.dataset, "without_gt", 0)
        print(f"{ev.task} on {n} samples ({world} process{'es' if world > 1 else ''}), {args.ckpt}"
              + (f"; {skipped} listed without ground truth left out" if skipped else ""))
        print(format_metrics(metrics, ADE20K_CLASSES if ev.task == "semseg" else None))
        path = os.path.join(out, name)
        save_json(json_ready(dict(ckpt=os.path.abspath(args.ckpt), task=ev.task, samples=n, **protocol,
                                  data_root=os.path.abspath(ev.data_root), sd_ckpt=ev.sd_ckpt, **metrics)), path)
        print(f"wrote {path}")
    dist.teardown()


if __name__ == "__main__":
    try:
        main(get_args())
    except KeyboardInterrupt:
        raise SystemExit("interrupted") from None
