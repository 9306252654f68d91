"""What differs between the three tasks: their datasets, how a model is built and fed, its loss.

train.py, eval.py and predict.py build datasets and models and compute the training loss through
these functions; what they do with a prediction (metrics, output files) stays in each script. The demo
(`--demo`) writes a tiny random SD checkpoint and a synthetic dataset, then takes the same paths.
"""
import os
from contextlib import suppress
from dataclasses import asdict
from types import SimpleNamespace

import torch
from safetensors import safe_open
from torch import nn

from vpd import data, dist
from vpd.checkpoint import tensor_shapes
from vpd.clip import CLIPConfig, Tokenizer
from vpd.infer import MS_RATIOS
from vpd.model import build_model
from vpd.text import load_class_embeddings
from vpd.trained import frozen_fingerprint, load_weights, read_meta
from vpd.unet import UNetConfig
from vpd.vae import VAEConfig

# Where each task's data comes from, said in every "missing data" error.
SOURCES = {
    "semseg": "ADE20K: http://sceneparsing.csail.mit.edu (ADEChallengeData2016.zip), unzipped under --data-root",
    "depth": "NYUv2: the BTS/VPD 'sync' training set and official_splits/test, with train_list.txt and "
             "test_list.txt (BTS's nyudepthv2_*_files_with_gt.txt) under --data-root; KITTI: the Eigen split",
    "refer": "RefCOCO: refer/data/<dataset>/refs(<split_by>).p and instances.json from the REFER toolkit, "
             "COCO train2014 images under refer/data/images/mscoco/images/train2014",
}
DATASETS = {"semseg": ("ade20k",), "depth": ("nyu", "kitti"), "refer": ("refcoco", "refcoco+", "refcocog")}
EVAL_SPLITS = {"semseg": "validation", "depth": "test", "refer": "val"}  # what each task evaluates on by default
DEMO_HEADS = {"semseg": dict(channels=32), "depth": dict(fuse_channels=64, deconv_channels=16, out_channels=32),
              "refer": dict(hidden=32)}


def to_device(batch, device):
    """Tensors, and lists of tensors (ADE20K's ms_images), moved to `device`; other values as they are."""
    def move(v):
        if isinstance(v, list) and all(torch.is_tensor(t) for t in v):
            return [t.to(device, non_blocking=True) for t in v]
        return v.to(device, non_blocking=True) if torch.is_tensor(v) else v
    return {k: move(v) for k, v in batch.items()}


def forward_loss(model, loss, task, batch):
    """Training loss of one batch. `model` may be the DDP/compiled wrapper; `loss` is the task model's
    `.loss`, or that compiled."""
    if task == "semseg":
        return loss(model(batch["image"]), batch["label"])
    if task == "depth":
        return loss(model(batch["image"], batch["scene_id"]), batch["depth"])
    return loss(model(batch["image"], batch["tokens"]), batch["mask"].long())


def refer_max_tokens(dataset):
    """Text length of a refer model: 77 for RefCOCOg's long sentences, 40 for RefCOCO / RefCOCO+."""
    return 77 if dataset == "refcocog" else 40


def refer_split_by(dataset, split_by=None):
    """REFER's split set: the one given, else umd for RefCOCOg and unc for RefCOCO / RefCOCO+."""
    return split_by or ("umd" if dataset == "refcocog" else "unc")


def datasets(task, root, crop, seed=0, dataset=None, split_by=None, split=None, demo=False, scene_match="exact",
             ms_ratios=None, train=True, max_tokens=None):
    """(train_set, eval_set) of `task` under `root`; a clear error when the layout is not there.
    train=False: no training set (None), so that evaluation needs only the split it scores.
    scene_match: how NYUv2 images get their scene type (data.NYUv2; "vpd" as the released model saw them).
    ms_ratios: semseg's multi-scale test views (data.ADE20K). max_tokens: the refer model's text length
    (default: refer_max_tokens)."""
    if dataset is not None and dataset not in DATASETS[task]:
        raise SystemExit(f"--dataset {dataset!r} is not a {task} dataset: {', '.join(DATASETS[task])}")
    try:
        if task == "depth" and dataset == "kitti":
            # square crops, at most the KB-cropped frame's 352 rows: the input VPD's depth model takes for KITTI
            # (its forward pads 352x352 as it pads 480x480), and the square windows evaluation slides over a frame
            side = min(crop, data.KB_CROP[0])
            make = (lambda: data.KITTI(root, "train", crop=(side, side), seed=seed),
                    lambda: data.KITTI(root, "test", train=False))
        elif task == "depth":
            make = (lambda: data.NYUv2(root, "train", crop=(crop, crop), seed=seed, scene_match=scene_match),
                    lambda: data.NYUv2(root, "test", train=False, scene_match=scene_match))
        elif task == "semseg":
            scale = (4 * crop, crop)  # (2048, 512) for the paper's 512 crops
            make = (lambda: data.ADE20K(root, "training", crop=(crop, crop), scale=scale, seed=seed),
                    lambda: data.ADE20K(root, "validation", train=False, scale=scale, ms_ratios=ms_ratios))
        else:
            kw = dict(dataset=dataset or "refcoco", split_by=refer_split_by(dataset, split_by),
                      tokenizer=Tokenizer(), max_tokens=max_tokens or refer_max_tokens(dataset),
                      size=(crop, crop))
            make = (lambda: data.RefCOCO(root, split="train", seed=seed, **kw),
                    lambda: data.RefCOCO(root, split=split or EVAL_SPLITS[task], train=False, **kw))
        return (make[0]() if train else None), make[1]()
    except (FileNotFoundError, ValueError) as e:
        if demo:
            raise
        raise SystemExit(f"{e}\n--data-root {root} does not hold the {task} data in its standard layout. "
                         f"Get it from {SOURCES[task]}.") from None


def demo_out(task):
    """Where `--demo` writes by default: out/demo for the depth demo, out/demo_<task> for the others."""
    return os.path.join("out", "demo" if task == "depth" else f"demo_{task}")


def demo_files(out, task):
    """Where the demo writes its SD file and synthetic dataset in `out`, when not given others."""
    return os.path.join(out, "tiny_sd.safetensors"), os.path.join(out, f"synthetic_{task}")


def stored_path(ckpt, meta, key):
    """A model's SD file (key "sd_ckpt") or data root ("data_root") as its metadata names it; for a demo
    run moved elsewhere, the one its demo wrote beside the model file, as train.py --resume takes it."""
    path = meta[key]
    if meta.get("demo") and path is not None and not os.path.exists(path):
        own = demo_files(os.path.dirname(os.path.abspath(ckpt)), meta["task"])[key == "data_root"]
        if os.path.exists(own):
            return own
    return path


def make_demo_files(out, task, n, size, seed=0, sd_ckpt=None, data_root=None):
    """A tiny random SD checkpoint and a synthetic dataset under `out` (each written once, and only
    when not given); returns (sd_ckpt, data_root)."""
    from vpd.demo import write_random_sd
    from vpd.synthetic import make_synthetic
    own_sd, own_root = demo_files(out, task)
    sd = sd_ckpt or write_random_sd(own_sd, seed=seed)
    root = data_root or own_root
    if data_root is None and not os.path.isdir(root):
        tmp = f"{root}.tmp{os.getpid()}"
        make_synthetic(tmp, task, n, seed=seed, size=size)
        os.replace(tmp, root)
    return sd, root


def _configs(demo):
    from vpd.demo import TINY_CLIP, TINY_UNET, TINY_VAE
    return (TINY_UNET, TINY_VAE, TINY_CLIP) if demo else (UNetConfig(), VAEConfig(), CLIPConfig())


def model_kwargs(task, train_set, demo, dataset=None):
    kw = dict(DEMO_HEADS[task]) if demo else {}
    if task == "depth":
        kw["max_depth"] = train_set.max_depth
    if task == "refer":
        kw["max_tokens"] = refer_max_tokens(dataset)
    return kw


def build_task(args, device, log=print):
    """Datasets and model of a training run, plus the metadata saved with its checkpoints."""
    if args.demo:
        if dist.rank() == 0:  # under torchrun rank 0 writes the files while the others wait
            make_demo_files(args.out, args.task, args.demo_images, args.demo_size, args.seed, args.sd_ckpt,
                            args.data_root)
        dist.barrier()
        files = make_demo_files(args.out, args.task, args.demo_images, args.demo_size, args.seed, args.sd_ckpt,
                                args.data_root)
        args.sd_ckpt, args.data_root = map(os.path.abspath, files)  # as given paths are: --resume compares them
    check_sd_file(args.sd_ckpt, ". Download Stable Diffusion v1.5 (v1-5-pruned-emaonly.safetensors) and pass its path.")
    train_set, eval_set = datasets(args.task, args.data_root, args.crop, args.seed, args.dataset, args.split_by,
                                   demo=args.demo)
    unet_cfg, vae_cfg, clip_cfg = _configs(args.demo)
    kw = model_kwargs(args.task, train_set, args.demo, args.dataset)
    log(f"building the {args.task} model from {args.sd_ckpt}")
    cache = args.text_cache or os.path.join(os.path.dirname(os.path.abspath(args.out)), "text_cache")
    names = data.KITTI_SCENES if args.dataset == "kitti" else None  # None: the task's own (NYUv2 / ADE20K)
    emb = None
    if args.class_embeddings:
        count = len(names or (data.ADE20K_CLASSES if args.task == "semseg" else data.NYU_SCENES))
        emb = load_class_embeddings(args.class_embeddings, count, unet_cfg.context_dim)
    # rank 0 builds first: it computes the class embeddings (on the GPU: NYUv2's 27 names x 80 prompts
    # take minutes on a CPU) and caches them, which the other processes then read
    if dist.rank() != 0:
        dist.barrier()
    model = build_model(args.task, args.sd_ckpt, unet_cfg, vae_cfg, clip_cfg, class_embeddings=emb, cache_dir=cache,
                        class_names=names, text_device=device, **kw)
    if dist.rank() == 0:
        dist.barrier()
    meta = dict(task=args.task, sd_ckpt=os.path.abspath(args.sd_ckpt), demo=args.demo, dataset=args.dataset,
                data_root=os.path.abspath(args.data_root), frozen_sha256=frozen_fingerprint(model),
                unet=asdict(unet_cfg), vae=asdict(vae_cfg), clip=asdict(clip_cfg), model_kwargs=kw,
                depth_crop=depth_crop(args.task, args.dataset, args.demo))
    return SimpleNamespace(model=model, train_set=train_set, eval_set=eval_set, meta=meta)


def depth_crop(task, dataset, demo):
    if task != "depth" or demo:
        return None
    return "garg" if dataset == "kitti" else "eigen"


def _cfg(cls, d):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def check_sd_file(path, missing=""):
    """Refuse an --sd-ckpt that is no SD file: a folder, a missing file (`missing` says what to do), or one of
    our trained models (what --ckpt takes)."""
    if os.path.isdir(path):
        raise SystemExit(f"--sd-ckpt {path} is a folder: give the Stable Diffusion v1.5 file itself")
    if not os.path.isfile(path):
        raise SystemExit(f"--sd-ckpt {path}: no such file{missing}")
    with suppress(ValueError):  # an unreadable file: its loader says so
        if read_meta(path) is not None:
            raise SystemExit(f"--sd-ckpt {path} is a trained VPD model (what --ckpt takes): --sd-ckpt takes the "
                             "Stable Diffusion v1.5 file")


def check_ckpt(ckpt):
    """Refuse, with what to give instead, a --ckpt that is no model file: a folder, a missing file,
    train.py's state.pt or a file of another kind."""
    if os.path.isdir(ckpt):
        inside = os.path.join(ckpt, "model.safetensors")
        raise SystemExit(f"--ckpt {ckpt} is a folder" + (f": give {inside}" if os.path.isfile(inside) else ""))
    if not os.path.isfile(ckpt):
        raise SystemExit(f"--ckpt {ckpt}: no such file")
    if os.path.basename(ckpt) == "state.pt":
        raise SystemExit(f"--ckpt {ckpt} is train.py's training state (what --resume reads): give the "
                         "model.safetensors of the same folder")
    if not ckpt.endswith((".safetensors", ".ckpt", ".pth", ".pt")):
        raise SystemExit(f"--ckpt {ckpt}: not a checkpoint (ours: model.safetensors; VPD's: .ckpt / .pth)")
    if not ckpt.endswith(".safetensors"):
        with open(ckpt, "rb") as f:
            head = f.read(4)
        if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):  # torch.save's zip archive, or its older pickle
            raise SystemExit(f"--ckpt {ckpt}: not a file torch.save wrote, as VPD's .ckpt / .pth are")


def checkpoint_task(ckpt, task=None):
    """The task of a model file (checked to be one): `task`, or the one our metadata names; a
    released VPD file needs `task`. Reads the file's header only. Returns (task, our metadata or None)."""
    check_ckpt(ckpt)
    try:
        meta = read_meta(ckpt)
    except ValueError as e:
        raise SystemExit(f"--ckpt {e}") from None
    if meta is None and task is None:
        if ckpt.endswith(".safetensors") and tensor_shapes(ckpt, "model.diffusion_model."):  # (its header only)
            raise SystemExit(f"--ckpt {ckpt} is a Stable Diffusion checkpoint (model.diffusion_model.*), not a VPD "
                             "model: it is what --sd-ckpt takes")
        raise SystemExit(f"--task is required for {ckpt}: it holds no metadata of ours, so it is read as a "
                         "released VPD checkpoint")
    if meta is not None and task is not None and meta["task"] != task:
        raise SystemExit(f"--ckpt {ckpt} is a {meta['task']} model, not {task}")
    return task or meta["task"], meta


def load_model(ckpt, task=None, sd_ckpt=None):
    """A model for evaluation / prediction from our `model.safetensors` (rebuilt from its metadata +
    the frozen parts of its SD file) or from an official VPD release. Returns (model, meta)."""
    task, meta = checkpoint_task(ckpt, task)
    if sd_ckpt is not None:
        check_sd_file(sd_ckpt)
    if meta is None:  # an official VPD checkpoint
        from vpd.official import SDFileError, official_model, refer_trained_on
        try:
            model = official_model(ckpt, task, sd_ckpt=sd_ckpt)
        except SDFileError as e:
            raise SystemExit(str(e)) from None
        except ValueError as e:
            raise SystemExit(f"--ckpt {ckpt}: {e}") from None
        # a refer release names its dataset (a RefCOCO+ or G-Ref model is not scored on RefCOCO unasked)
        trained = refer_trained_on(ckpt) if task == "refer" else {}
        return model, dict(task=task, demo=False, dataset=trained.get("dataset"), official=True,
                           args={"split_by": trained["split_by"]} if "split_by" in trained else {},
                           depth_crop=depth_crop(task, None, False), sd_ckpt=os.path.abspath(sd_ckpt) if sd_ckpt else None)
    sd = sd_ckpt or stored_path(ckpt, meta, "sd_ckpt")
    if not os.path.isfile(sd):
        raise SystemExit(f"the SD checkpoint {sd} (frozen VAE/CLIP of this model) is not there: pass --sd-ckpt")
    with safe_open(ckpt, framework="pt") as f:  # the model's own text embeddings, not recomputed
        emb = f.get_tensor("class_embeddings") if "class_embeddings" in f.keys() else None
    # built on `meta`: only the frozen parts are read from the SD file; the UNet, adapter and head are
    # the weight file's (reading the SD file's UNet too would double the start's reads and memory)
    with torch.device("meta"):
        model = build_model(meta["task"], None, _cfg(UNetConfig, meta["unet"]), _cfg(VAEConfig, meta["vae"]),
                            _cfg(CLIPConfig, meta["clip"]), class_embeddings=emb, **meta["model_kwargs"])
    model.backbone.load_frozen_vae(sd)
    if hasattr(model, "clip"):
        model.load_frozen_clip(sd)
    if "frozen_sha256" in meta and frozen_fingerprint(model) != meta["frozen_sha256"]:  # (older files: unchecked)
        frozen = "VAE/CLIP" if hasattr(model, "clip") else "VAE"
        raise SystemExit(f"{sd} is not the SD file {ckpt} was trained with: its frozen {frozen} weights differ from "
                         "those training read" + ("" if sd_ckpt else " (replaced since?): give that file as --sd-ckpt"))
    return load_weights(model, ckpt), dict(meta, sd_ckpt=os.path.abspath(sd))  # the SD file read, moved or not


def training_crop(task, meta):
    """The input size a model trained at (its own evaluation too); official releases: the paper's."""
    crop = meta.get("args", {}).get("crop")
    return int(crop) if crop else (480 if task == "depth" else 512)


def build_eval(args, device):
    """Model + evaluation set for eval.py."""
    model, meta = load_model(args.ckpt, args.task, args.sd_ckpt)
    task = meta["task"]
    root = args.data_root
    if root is None and meta.get("demo"):
        root = stored_path(args.ckpt, meta, "data_root")  # the synthetic set the demo trained on
        if not os.path.isdir(root):
            raise SystemExit(f"the demo's data {root}, which {args.ckpt} trained on, is not there: give its new "
                             "place with --data-root")
    if root is None:
        raise SystemExit("--data-root is required")
    crop = training_crop(task, meta)
    trained_on = meta.get("dataset") or DATASETS[task][0]
    if args.dataset is None and trained_on not in DATASETS[task]:
        raise SystemExit(f"{args.ckpt} was trained on {trained_on!r}, not one of ours ({', '.join(DATASETS[task])}): "
                         "give --dataset")
    dataset = args.dataset or trained_on
    if task == "depth" and dataset != trained_on:  # another depth range, camera and text condition
        raise SystemExit(f"--dataset {dataset}: {args.ckpt} is a {trained_on} depth model; it is evaluated on "
                         f"{trained_on} only")
    # refer: the split set the model trained with (e.g. RefCOCOg's google), unless another dataset is asked
    trained_split_by = meta.get("args", {}).get("split_by") if dataset == trained_on else None
    split_by = refer_split_by(dataset, args.split_by or trained_split_by) if task == "refer" else None
    # the released depth model was trained with VPD's substring scene match (study_room -> study)
    _, eval_set = datasets(task, root, crop, dataset=dataset, split_by=split_by, split=args.split,
                           demo=meta.get("demo", False), scene_match="vpd" if meta.get("official") else "exact",
                           ms_ratios=MS_RATIOS if args.ms_flip else None, train=False,
                           max_tokens=getattr(model, "max_tokens", None))
    return SimpleNamespace(model=model.to(device), task=task, dataset=eval_set, data_root=root, sd_ckpt=meta["sd_ckpt"],
                           depth_crop=meta.get("depth_crop"),
                           max_depth=getattr(model, "max_depth", 10.0), crop=crop, dataset_name=dataset,
                           split_by=split_by, split=args.split or EVAL_SPLITS[task])


class ConstantDepth(nn.Module):
    """Depth baseline: the same depth at every pixel."""

    def __init__(self, depth: float):
        super().__init__()
        self.depth = float(depth)

    def forward(self, images, scene_ids):
        return images.new_full((images.shape[0], 1, *images.shape[-2:]), self.depth)


class ConstantClass(nn.Module):
    """Segmentation baseline: the same class at every pixel (logit 1 for it, 0 for the others)."""

    def __init__(self, num_classes: int, cls: int):
        super().__init__()
        self.num_classes, self.cls = num_classes, cls

    def forward(self, images, tokens=None):
        logits = images.new_zeros(images.shape[0], self.num_classes, *images.shape[-2:])
        logits[:, self.cls] = 1
        return logits


def baseline_model(task, train_set, max_samples=256):
    """A trivial predictor fitted to (up to `max_samples` of) the training set, and its name.
    depth: the mean training depth everywhere; semseg: the most frequent training class everywhere;
    refer: the whole image as the target."""
    n = min(len(train_set), max_samples)
    if task == "depth":
        total, count = 0.0, 0
        for i in range(n):
            d = train_set[i]["depth"]
            total, count = total + d[d > 0].double().sum().item(), count + int((d > 0).sum())
        if count == 0:
            raise ValueError("the training set has no valid depth pixel")
        return ConstantDepth(total / count), f"mean depth {total / count:.3f} m"
    if task == "semseg":
        k = len(data.ADE20K_CLASSES)
        hist = torch.zeros(k, dtype=torch.int64)
        for i in range(n):
            label = train_set[i]["label"]
            hist += torch.bincount(label[label != data.IGNORE_INDEX].flatten(), minlength=k)[:k]
        cls = int(hist.argmax())
        return ConstantClass(k, cls), f"always '{data.ADE20K_CLASSES[cls]}'"
    return ConstantClass(2, 1), "whole image"
