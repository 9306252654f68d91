"""Predict depth, semantic segmentation or a referred object's mask on your own images.

    python predict.py --task depth --ckpt out/depth/model.safetensors photo.jpg            # -> predictions/
    python predict.py --task depth --ckpt vpd_depth.ckpt --scene kitchen photos/
    python predict.py --task semseg --ckpt out/semseg/model.safetensors a.jpg b.png --out seg/
    python predict.py --task refer --ckpt out/refer/model.safetensors street.jpg --text "the man on the left"
    python predict.py --ckpt out/refer/model.safetensors street.jpg --text "the red car" --text "the dog"

Inputs are image files and folders of images (jpg, png, ...; any size and aspect). A folder gives
its own images, not its subfolders' nor hidden files' (nor, when it is also --out, earlier outputs).
An image that cannot be read is skipped, listed at the end, and the run exits with status 1; a path that
does not exist (a typo) stops the run before anything is read. An animated image gives its first frame,
a transparent one its colours (the log names both, and the earlier outputs a run replaces). Every output
PNG has the input image's own size (as shown: a JPEG's EXIF orientation applied) and is named after it
(<name> = the file name without extension):

  depth   <name>_depth.png         16-bit depth in millimetres (x 1/256 m instead for models whose
                                   maximum depth exceeds 65.5 m, e.g. KITTI; the log says which)
          <name>_depth_color.png   the same, colourised (near = blue, far = red, per image)
  semseg  <name>_semseg.png        class colours (a fixed palette of vpd/vis.py)
          <name>_semseg_ids.png    class ids 0..K-1 (ADE20K: class i is ADE20K_CLASSES[i])
  refer   <name>_refer.png         the image with the referred object tinted red
          <name>_refer_mask.png    the object's mask: 255 on the object, 0 elsewhere
                                   (several --text: <name>_refer<k>.png and <name>_refer<k>_mask.png
                                   for the k-th sentence, k = 1, 2, ...; one forward per image for all)

How each task sees an image (vpd/data.py ImageFolder, vpd/infer.py):
  depth   resized, aspect kept, to fit --size x --size (default 640: NYU's 480x640 frames keep
          their training scale; KITTI models: 1216, the width of KITTI's benchmark crop). A
          landscape image at most twice as wide as tall gets VPD's NYU test: two square windows at
          its left and right ends, plus flips (--no-flip), averaged; any other image is predicted
          whole, plus its flip. KITTI models (trained on 352x352 crops) take a landscape image in
          as many square windows as cover it, as eval.py scores them.
          VPD's depth model is conditioned on one of NYUv2's 27 scene types. --scene picks it
          (default living_room: the generic room of mixed furniture at middle distances, and one
          of NYUv2's most frequent scenes). Every prediction thus uses a text input the model was
          trained with; try the scene nearest to your photo.
  semseg  resized, aspect kept, to short side --size (default 512, as ADE20K's test), 512 sliding
          windows with stride 341, logits resized to the image's size.
  refer   resized to --size x --size (default 512, aspect not kept, as in training).
Our semseg and refer models default to their training crop (512 in the paper's recipes) as --size
and semseg window; demo depth models on the synthetic NYU frames to those frames' width.
"""
import argparse
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from vpd import vis
from vpd.clip import Tokenizer
from vpd.data import (IMAGE_EXTENSIONS, KB_CROP, KITTI_SCENES, NYU_SCENES, BadSampleError, ImageFolder, check_photo,
                      read_rgb, undo, vpd_scene_id)
from vpd.dist import amp_autocast, setup, writable_dir
from vpd.infer import depth_predict, refer_logits, semseg_probs
from vpd.model import TASKS
from vpd.tasks import checkpoint_task, load_model, to_device, training_crop

NYU_WIDTH = 640  # depth's default --size (see the docstring); semseg's and refer's is the training crop
WAITING = 4  # images whose PNGs may wait to be written
READ_AHEAD = 2  # images read (decoded, resized) while the one before them is predicted
DEFAULT_SCENE = "living_room"
OUTPUTS = {"depth": ("_depth.png", "_depth_color.png"), "semseg": ("_semseg.png", "_semseg_ids.png"),
           "refer": ("_refer.png", "_refer_mask.png")}  # <name> + these, per task
# the names OUTPUTS and output_ends give, refer's numbered ones too: a folder that is --out holds these
EARLIER_OUTPUT = re.compile(r"_(depth|depth_color|semseg|semseg_ids|refer\d*|refer\d*_mask)\.png$")


def output_ends(task, sentences=1):
    """<name> + these are one image's PNGs: OUTPUTS, or refer's numbered per sentence when several."""
    if task == "refer" and sentences > 1:
        return tuple(f"_refer{k}{end}" for k in range(1, sentences + 1) for end in (".png", "_mask.png"))
    return OUTPUTS[task]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--task", choices=TASKS, help="depth, semseg or refer (read from our own checkpoints; "
                   "required for an official VPD file)")
    p.add_argument("--ckpt", required=True, help="our model.safetensors, or an official VPD .ckpt/.pth")
    p.add_argument("--sd-ckpt", help="SD v1.x file for the frozen VAE/CLIP (default: the one training used). An "
                   "official release needs one only for refer (its CLIP) or when the release holds no VAE")
    p.add_argument("--text", action="append", help="refer: the referring expression, e.g. \"the man on the left\"; "
                   "again for more sentences, each predicted on every image")
    p.add_argument("--scene", default=None, help=f"depth: NYUv2 scene type (default {DEFAULT_SCENE}); one of "
                   + ", ".join(NYU_SCENES))
    p.add_argument("--size", type=int, help="network input size (see above; default per task)")
    p.add_argument("--no-flip", action="store_true", help="depth: no flip averaging")
    p.add_argument("--out", default="predictions", help="output folder (default predictions/)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None,
                   help="autocast dtype (default: bf16 on GPU, off on CPU)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- checks before the model loads

def named(paths, shown=3):
    """The first few file names of a list, for one line of output."""
    names = [os.path.basename(p) for p in paths[:shown]]
    return ", ".join(names) + (", ..." if len(paths) > shown else "")


def image_paths(inputs, out, task, sentences=1):
    """Files and folders -> (image paths, skipped). A folder gives its images, sorted: not its
    subfolders' or hidden files, nor, when it is --out, an earlier run's outputs. A file whose header cannot
    be read is skipped and named, as one found truncated later; none readable stops us before the model load."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            # not hidden files: .DS_Store, and the ._<name>.jpg metadata copies macOS writes to other drives
            names = sorted(n for n in os.listdir(item) if not n.startswith("."))
            if os.path.abspath(item) == os.path.abspath(out):
                ours = [n for n in names if EARLIER_OUTPUT.search(n)]
                if ours:
                    print(f"{item} is --out: its {len(ours)} earlier output(s) ({named(ours)}) are not inputs")
                names = [n for n in names if n not in ours]
            subfolders = sum(os.path.isdir(os.path.join(item, n)) for n in names)
            if subfolders:
                print(f"{item}: {subfolders} subfolder(s) not searched (give them as inputs too)")
            found = [os.path.join(item, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
            others = [n for n in names if not n.lower().endswith(IMAGE_EXTENSIONS)
                      and os.path.isfile(os.path.join(item, n))]
            if others:  # e.g. a phone's .heic photos: said, not silently left out
                print(f"{item}: {len(others)} file(s) of other types not read ({named(others)}; "
                      f"images are {', '.join(IMAGE_EXTENSIONS)})")
            if not found:
                raise SystemExit(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {item}")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise SystemExit(f"image not found: {item}")
    readable, skipped, animated, transparent = [], [], [], []
    for path in paths:  # read the headers now, before the (slow) model load
        try:
            with Image.open(path) as im:
                check_photo(im)
                # an MPO is a camera's JPEG with previews or a stereo twin after the photo: its first frame is the photo
                if getattr(im, "is_animated", False) and im.format != "MPO":
                    animated.append(path)
                if "A" in im.mode or "a" in im.mode or "transparency" in im.info:
                    transparent.append(path)
            readable.append(path)
        except (OSError, SyntaxError, ValueError) as e:
            skipped.append(f"cannot read image {path}: {e}")
    if not readable:
        raise SystemExit("\n".join(skipped))
    for line in skipped:  # now, not only in the summary after the (slow) model load and predictions
        print(f"skipped: {line}")
    if animated:  # a GIF, an APNG, a multi-page TIFF: said, not silently cut to its first frame
        print(f"{len(animated)} image(s) with several frames ({named(animated)}): the first frame of each is predicted")
    if transparent:  # what lies under transparent pixels is whatever the file stores there, often black
        print(f"{len(transparent)} image(s) with transparency ({named(transparent)}): predicted from their colours "
              "alone, the transparency ignored")
    stems = {}
    for path in readable:  # outputs are named after the file: two inputs must not share a name
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems and os.path.abspath(stems[stem]) != os.path.abspath(path):
            raise SystemExit(f"{stems[stem]} and {path} would write the same output names ({stem}_*.png): "
                             "rename one or predict them into different --out folders")
        stems[stem] = path
    outputs = {os.path.realpath(os.path.join(out, stem + end)): path for stem, path in stems.items()
               for end in output_ends(task, sentences)}
    for path in stems.values():  # e.g. a photo named b_depth.png next to b.png: b's depth would replace it
        if os.path.realpath(path) in outputs:
            raise SystemExit(f"{path} is an input that the outputs of {outputs[os.path.realpath(path)]} would "
                             "overwrite: rename it or predict into another --out folder")
    earlier = [path for path in outputs if os.path.isfile(path)]
    if earlier:  # a rerun into the same folder: said before the model loads, while Ctrl-C loses nothing
        print(f"{out}: {len(earlier)} earlier output(s) will be replaced ({named(earlier)})")
    return list(dict.fromkeys(stems.values())), skipped  # each file once


def check_options(args, task):
    if task == "refer":
        if args.text is None:
            raise SystemExit('--text is required for the refer task, e.g. --text "the man on the left"')
        if not all(t.strip() for t in args.text):
            raise SystemExit("--text is empty")
    elif args.text is not None:
        raise SystemExit(f"--text is only for the refer task, not {task}")
    if task == "depth":
        if args.scene is not None:
            scene = args.scene.strip().lower().replace(" ", "_")
            if scene not in NYU_SCENES:
                raise SystemExit(f"--scene {args.scene!r} is not an NYUv2 scene type; one of: {', '.join(NYU_SCENES)}")
            args.scene = scene
    elif args.scene is not None:
        raise SystemExit(f"--scene is only for the depth task, not {task}")
    if args.no_flip and task != "depth":
        raise SystemExit(f"--no-flip is only for the depth task, not {task}")
    if args.size is not None and args.size < 32:
        raise SystemExit(f"--size {args.size} is too small (at least 32)")
    if task == "refer" and args.size is not None and args.size % 64:  # images are resized to size x size
        raise SystemExit(f"--size {args.size}: the refer network takes sides that are multiples of 64")


def scene_index(scene, official):
    """Row of the depth model's scene embeddings for an NYUv2 scene name. The released VPD model was
    trained with its loader's substring match (the first name contained: study_room -> study,
    office_kitchen -> kitchen), so its rows for such names never saw an image."""
    return vpd_scene_id(scene) if official else NYU_SCENES.index(scene)


def default_size(task, meta):
    """The scale training saw: semseg and refer models' crop (semseg: short side, refer: side); depth models
    crop without resizing, so the width of their frames (NYU: 640, KITTI's benchmark crop: 1216, demo runs
    too; the demo's synthetic NYU frames: --demo's demo_size, 128)."""
    if task != "depth":
        return training_crop(task, meta)
    if meta.get("dataset") == "kitti":
        return KB_CROP[1]
    return int(meta["args"]["demo_size"]) if meta.get("demo") else NYU_WIDTH


# ----------------------------------------------------------------------------- prediction of one image

def depth_windows(h, w, kitti=False):
    """VPD's two windows for landscape images up to 2:1 (they then cover it); the whole image otherwise.
    KITTI models: as many square windows as cover a landscape image, as they are trained and evaluated."""
    if kitti and w > h:
        return max(2, -(-w // h))
    return 2 if h < w <= 2 * h else 1


def predict_depth(model, sample, scene_id, flip, kitti=False):
    """-> (H, W) metres at the original size."""
    rh, rw = sample["resized_size"].tolist()
    x = sample["image"][None, :, :rh, :rw]  # (1, 3, h, w): the image without ImageFolder's padding
    ids = torch.tensor([scene_id], device=x.device)
    pred = depth_predict(model, x, ids, flip=flip, windows=depth_windows(rh, rw, kitti))  # (1, 1, h, w)
    return undo(pred[0, 0], sample)


def predict_semseg(model, sample, crop):
    """-> (H, W) int64 class ids at the original size."""
    k = model.num_classes
    size = tuple(sample["orig_size"].tolist())
    probs = semseg_probs(model, [sample["image"][None]], k, size, crop=crop)
    return probs[0].argmax(0)


def predict_refer(model, sample, tokens):
    """tokens (S, max_tokens), S sentences -> (S, H, W) bool masks at the original size."""
    size = tuple(sample["orig_size"].tolist())
    images = sample["image"][None].expand(tokens.shape[0], -1, -1, -1)  # one batch: the image per sentence
    return refer_logits(model, images, tokens, size).argmax(1) == 1


# ----------------------------------------------------------------------------- writing PNGs

def save_outputs(task, out, stem, pred, image_path, depth_units=1000):
    """The PNGs of one image (see the module docstring); returns their paths."""
    paths = [os.path.join(out, stem) + end for end in output_ends(task, len(pred) if task == "refer" else 1)]
    pred = pred.cpu().numpy()
    if task == "depth":
        vis.save_depth_png16(pred, paths[0], depth_units)
        vis.colorize_depth(pred).save(paths[1])
    elif task == "semseg":
        vis.colorize_labels(pred).save(paths[0])  # raises on ids >= 150 (its palette): the ids below fit uint8
        Image.fromarray(pred.astype(np.uint8)).save(paths[1])
    else:
        rgb = read_rgb(image_path, upright=True).astype(np.uint8)  # as the masks were predicted
        for mask, overlay_path, mask_path in zip(pred, paths[::2], paths[1::2]):
            vis.overlay_mask(rgb, mask).save(overlay_path)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    return paths


def read_ahead(dataset, ahead=READ_AHEAD):
    """Futures of the dataset's samples, in order, each read by a thread up to `ahead` images before it is
    wanted: decoding and resizing a phone photo takes about as long as a GPU's prediction of it, and Pillow's
    decoders and torch's resize release the GIL, so reading overlaps predicting."""
    with ThreadPoolExecutor(ahead) as reader:
        reads = deque(reader.submit(dataset.__getitem__, i) for i in range(min(ahead, len(dataset))))
        for i in range(len(dataset)):
            if i + ahead < len(dataset):
                reads.append(reader.submit(dataset.__getitem__, i + ahead))
            yield reads.popleft()


def finish(write, image_path):
    """Waits for one image's PNGs to be written; a failed write (full disk, a folder of an output's
    name) stops the run with one line."""
    try:
        write.result()
    except OSError as e:
        raise SystemExit(f"cannot write the predictions of {image_path}: {e}") from None


# ----------------------------------------------------------------------------- main

def main(args):
    Image.MAX_IMAGE_PIXELS = None  # your own photos, panoramas included: no decompression-bomb limit
    task, meta = checkpoint_task(args.ckpt, args.task)  # before the options of the wrong task
    meta = meta or {}
    check_options(args, task)
    paths, skipped = image_paths(args.images, args.out, task, len(args.text or ()))
    size = args.size or default_size(task, meta)
    writable_dir(args.out)
    _, _, device = setup(args.device)

    print(f"loading {args.ckpt}")
    try:
        model, meta = load_model(args.ckpt, args.task, args.sd_ckpt)  # the same metadata, official files too
    except (ValueError, FileNotFoundError) as e:  # unreadable or mismatched files: say which, no traceback
        raise SystemExit(f"{type(e).__name__}: {e}") from None
    model = model.to(device).eval()
    autocast = amp_autocast(args.amp, device)

    kitti = task == "depth" and meta.get("dataset") == "kitti"
    if kitti:  # one text condition for every KITTI frame
        if args.scene is not None:
            raise SystemExit(f"--scene: {args.ckpt} is a KITTI model, conditioned on one scene only")
        args.scene, scene_id = KITTI_SCENES[0], 0
    elif task == "depth":
        args.scene = args.scene or DEFAULT_SCENE
        scene_id = scene_index(args.scene, meta.get("official", False))
        if model.class_embeddings.shape[0] != len(NYU_SCENES):
            raise SystemExit(f"--ckpt {args.ckpt} has {model.class_embeddings.shape[0]} scene embeddings, "
                             f"not NYUv2's {len(NYU_SCENES)}: --scene cannot name one")
    if task == "depth":
        depth_units = 1000 if model.max_depth * 1000 <= 65535 else 256
        print(f"depth: scene {args.scene}, PNGs in 1/{depth_units} m")
    if task == "refer":
        tokenizer = Tokenizer()
        for k, text in enumerate(args.text, 1):
            if len(args.text) > 1:
                print(f"sentence {k} (<name>_refer{k}.png, <name>_refer{k}_mask.png): {text}")
            n, room = len(tokenizer.encode(text)) - 2, model.max_tokens - 2  # without BOS and EOS
            if n > room:
                print(f"--text {text!r} is {n} tokens long: this model reads its first {room}")
        tokens = tokenizer(args.text, max_length=model.max_tokens).to(device)  # (sentences, max_tokens)

    train_crop = training_crop(task, meta)  # semseg's sliding window
    dataset = ImageFolder(paths, task, size)
    # PNGs are written by two threads while the next image is predicted: at a photo's full size, colouring
    # and compressing take longer than a GPU's prediction (Pillow's encoders release the GIL). At most
    # WAITING + 1 images' outputs wait, each holding its prediction; on Ctrl-C or an error those already
    # predicted are still written.
    writes, written = deque(), 0
    with torch.inference_mode(), autocast(), ThreadPoolExecutor(2) as writer:
        for read in tqdm(read_ahead(dataset), total=len(dataset), desc=f"predict {task}", unit="img",
                         dynamic_ncols=True):
            try:
                sample = read.result()
            except BadSampleError as e:  # e.g. a truncated file, which only decoding finds: the others go on
                tqdm.write(f"skipped: {e}")
                skipped.append(str(e))
                continue
            sample = to_device(sample, device)
            if task == "depth":
                pred = predict_depth(model, sample, scene_id, flip=not args.no_flip, kitti=kitti).float()
            elif task == "semseg":
                pred = predict_semseg(model, sample, crop=train_crop)
            else:
                pred = predict_refer(model, sample, tokens)
            stem = os.path.splitext(os.path.basename(sample["path"]))[0]
            writes.append((writer.submit(save_outputs, task, args.out, stem, pred.cpu(), sample["path"],
                                         depth_units if task == "depth" else 1000), sample["path"]))
            written += 1
            if len(writes) > WAITING:
                finish(*writes.popleft())  # the oldest write
        for w in writes:
            finish(*w)
    if written:  # (none: the empty --out is removed as we exit)
        print(f"wrote the {task} predictions of {written} image(s) to {args.out}")
    if skipped:
        raise SystemExit(f"{len(skipped)} image(s) skipped:\n" + "\n".join(skipped))


if __name__ == "__main__":
    try:
        main(get_args())
    except KeyboardInterrupt:
        raise SystemExit("interrupted") from None
