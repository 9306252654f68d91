"""Datasets in their public on-disk layouts (NYUv2, KITTI, ADE20K, RefCOCO) and a folder of own images.

Every sample is a dict a default DataLoader collate can batch in training:
  image  float32 (3, H, W) in [-1, 1] (x / 127.5 - 1)
  depth  float32 (1, H, W) metres, 0 = no measurement            (NYUv2, KITTI)
  label  int64 (H, W), 255 = ignore, classes 0..149              (ADE20K)
  mask   uint8 (H, W) 0/1, with `sentence`, `tokens`, `ref_id`   (RefCOCO)
  index  int: the dataset index the sample came from

`train=True` gives the augmented training view, seeded by (seed, epoch, index) (see
vpd/transforms.py; call `set_epoch` every epoch). `train=False` gives the evaluation view each
class documents. Files are checked at construction; a file that cannot be read raises an error
naming it when loaded (BadSampleError: train.py and eval.py stop with that one line).
"""
import json
import os
import re

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from vpd import transforms as T
from vpd.masks import load_plain_pickle, segmentation_to_mask
from vpd.metrics import depth_crop_mask

# The 27 NYUv2 scene types, in the order of VPD's depth/nyu_class_list.json: a depth model's
# `class_embeddings` row i is the text embedding of NYU_SCENES[i] ("excercise_room" is NYU's spelling).
NYU_SCENES = (
    "printer_room", "bathroom", "living_room", "study", "conference_room", "study_room", "kitchen",
    "home_office", "bedroom", "dinette", "playroom", "indoor_balcony", "laundry_room", "basement",
    "excercise_room", "foyer", "home_storage", "cafe", "furniture_store", "office_kitchen",
    "student_lounge", "dining_room", "reception_room", "computer_lab", "classroom", "office", "bookstore",
)

# The 150 ADE20K (SceneParsing benchmark) classes; label value v in the annotation PNGs is class v - 1.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet",
    "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle",
    "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)

# KITTI has no scene types; its frames all get this one text condition (VPD's depth model takes one).
KITTI_SCENES = ("street",)
IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class BadSampleError(ValueError):
    """A file of one sample cannot be read or has the wrong format."""


def error_line(e):
    """One line for an exception raised while loading data. A DataLoader worker's exception comes back
    with the worker's traceback as its message ("Caught ... Original Traceback ... <type>: <message>")."""
    lines = str(e).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines) or type(e).__name__


# ----------------------------------------------------------------------------- file readers

def check_photo(im):
    """Refuse an opened PIL image that is no photo: 16/32-bit single-channel (depth maps, float TIFFs),
    which convert("RGB") would clip at 255. The header tells, so this needs no decoding."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        raise ValueError(f"a 16/32-bit single-channel image (mode {im.mode}) is not a photo: give 8-bit RGB or grey")


def read_rgb(path, upright=False):
    """Image file -> float32 (H, W, 3) RGB in [0, 255]. upright: turned as the file's EXIF orientation
    says, as viewers show a phone photo (datasets keep the stored pixels: their labels refer to those)."""
    try:
        with Image.open(path) as im:
            check_photo(im)
            im.load()  # decode now so a truncated file fails here
            return np.asarray((ImageOps.exif_transpose(im) if upright else im).convert("RGB"), dtype=np.float32)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSampleError(f"cannot read image {path}: {e}") from None


def _read_png(path, what, modes, expected):
    """A single-channel PNG as an array, refusing other modes (e.g. an 8-bit depth map)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSampleError(f"cannot read {what} {path}: {e}") from None
    if mode not in modes:
        raise BadSampleError(f"{what} {path} has PIL mode {mode}, expected {expected}")
    return arr


def read_depth_png(path, units_per_metre):
    """16-bit depth PNG -> float32 (H, W) metres (0 stays 0 = no measurement)."""
    arr = _read_png(path, "depth map", ("I;16", "I;16B", "I;16L", "I"), "a 16-bit single-channel PNG")
    return arr.astype(np.float32) / units_per_metre


def read_label_png(path):
    """8-bit label PNG -> uint8 (H, W)."""
    return _read_png(path, "label map", ("L", "P"), "an 8-bit single-channel PNG").astype(np.uint8)


def _require_dir(path, layout):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"directory not found: {path} (expected layout: {layout})")


def _require_files(paths, what):
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3])
        raise FileNotFoundError(f"{len(missing)} {what} file(s) listed but missing, first: {shown}")


def _read_pair_list(list_file, hint):
    """BTS split file: 'image_path depth_path [focal]' per line -> list of (image, depth) strings."""
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"split list not found: {list_file}. {hint}")
    pairs = []
    with open(list_file) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise ValueError(f"{list_file}:{n}: expected 'image depth [focal]', got {line.strip()!r}")
            pairs.append((fields[0].lstrip("/"), fields[1].lstrip("/")))
    if not pairs:
        raise ValueError(f"split list {list_file} is empty")
    return pairs


# ----------------------------------------------------------------------------- shared machinery

class _SeededDataset(Dataset):
    """Seeded per-sample augmentation and `set_epoch`: a sample's draws are a function of (seed, epoch, index)."""

    def __init__(self, seed):
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def rng(self, index):
        return T.sample_rng(self.seed, self.epoch, index)


# ----------------------------------------------------------------------------- depth: NYUv2

def nyu_scene(scene_dir):
    """NYU scene directory -> scene type: 'kitchen_0028b' -> 'kitchen', 'living_room_0010' -> 'living_room',
    and the two office recordings of the standard train list, 'nyu_office_0' / 'nyu_office_1' -> 'office'."""
    return re.sub(r"^nyu_|_\d+[a-z]?$", "", scene_dir)


def vpd_scene_id(text):
    """VPD's loader's scene match: the first of the 27 names contained in `text` (None if none is), so
    study_room -> study and office_kitchen -> kitchen; the released depth model was trained with it."""
    return next((i for i, s in enumerate(NYU_SCENES) if s in text), None)


class _DepthDataset(_SeededDataset):
    """What NYUv2 and KITTI share: an RGB + 16-bit depth PNG pair per sample, and the depth recipe."""

    def _read_pair(self, index, units_per_metre):
        img = read_rgb(self.images[index])
        depth = read_depth_png(self.depths[index], units_per_metre)
        if img.shape[:2] != depth.shape:
            raise BadSampleError(f"{self.images[index]} is {img.shape[:2]} but its depth map is {depth.shape}")
        if not (depth > 0).any():  # nothing to learn or measure (and the training loss would be NaN)
            raise BadSampleError(f"depth map {self.depths[index]} has no valid (> 0) pixel")
        return img, depth

    def _depth_view(self, img, depth, index):
        """(image, depth) tensors: the training recipe, or the map as it is for evaluation."""
        if self.train:
            try:
                return T.depth_train(img, depth, self.rng(index), self.crop, self.max_depth)
            except ValueError as e:  # an image smaller than the crop: say which
                raise BadSampleError(f"{self.images[index]}: {e}") from None
        return T.to_tensor(img), torch.from_numpy(np.ascontiguousarray(depth))[None]


class NYUv2(_DepthDataset):
    """NYU Depth v2 in the BTS/VPD layout.

    root/sync/<scene>_<NNNN>[a-z]/rgb_XXXXX.jpg + sync_depth_XXXXX.png   (train, 24,231 in BTS's list)
    root/official_splits/test/<scene>/rgb_XXXXX.jpg + sync_depth_XXXXX.png (test, the official 654)
    Depth PNGs are uint16 millimetres. The split lists (root/train_list.txt, root/test_list.txt by
    default) use BTS's line format '/kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png
    [focal]'; the focal column is ignored.

    Training view: VPD's recipe (vpd.transforms.depth_train), crop (480, 480) by default.
    Evaluation view: the full image and depth map (480x640 for NYU), no resize, no crop; the Eigen
    crop for metrics is `depth_eval_mask(depth.shape[-2:], "eigen")`.
    `scene_match="exact"` maps the directory's scene type to NYU_SCENES by name; "vpd" reproduces
    the official loader, which takes the first NYU_SCENES name contained in "<dir>_<file>" (so
    study_room -> study and office_kitchen -> kitchen), as the released depth model was trained with.
    """

    def __init__(self, root, split="train", train=None, crop=(480, 480), list_file=None, max_depth=10.0,
                 scene_match="exact", seed=0):
        super().__init__(seed)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if scene_match not in ("exact", "vpd"):
            raise ValueError(f"scene_match must be 'exact' or 'vpd', got {scene_match!r}")
        self.train = split == "train" if train is None else bool(train)
        self.crop, self.max_depth = tuple(crop), float(max_depth)
        sub = "sync" if split == "train" else os.path.join("official_splits", "test")
        self.data_dir = os.path.join(root, sub)
        _require_dir(self.data_dir, f"{root}/{sub}/<scene>/rgb_XXXXX.jpg + sync_depth_XXXXX.png (BTS NYUv2)")
        list_file = list_file or os.path.join(root, f"{split}_list.txt")
        pairs = _read_pair_list(list_file, "The standard NYUv2 lists come from the BTS / VPD repositories "
                                "(nyudepthv2_train_files_with_gt.txt, nyudepthv2_test_files_with_gt.txt, "
                                "or VPD's depth/dataset/filenames/nyudepthv2/{train,test}_list.txt); "
                                "put it there under that name.")
        self.images = [os.path.join(self.data_dir, a) for a, _ in pairs]
        self.depths = [os.path.join(self.data_dir, b) for _, b in pairs]
        _require_files(self.images + self.depths, "NYUv2")
        self.scenes, self.scene_ids = [], []
        for (a, _) in pairs:
            scene_dir, name = a.split("/")[-2], a.split("/")[-1]
            sid = self._scene_id(scene_dir, name, scene_match)
            if sid is None:
                raise ValueError(f"{list_file}: scene of {a!r} ({nyu_scene(scene_dir)!r}) is not in NYU_SCENES")
            self.scene_ids.append(sid)
            self.scenes.append(NYU_SCENES[sid])

    @staticmethod
    def _scene_id(scene_dir, name, scene_match):
        if scene_match == "exact":
            scene = nyu_scene(scene_dir)
            return NYU_SCENES.index(scene) if scene in NYU_SCENES else None
        return vpd_scene_id(f"{scene_dir}_{name}")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        x, d = self._depth_view(*self._read_pair(index, 1000.0), index)
        return {"image": x, "depth": d, "scene": self.scenes[index], "scene_id": self.scene_ids[index],
                "index": index}


# ----------------------------------------------------------------------------- depth: KITTI

KB_CROP = (352, 1216)  # the KITTI benchmark crop (height, width), bottom-centre


def kb_crop_box(h, w):
    """Top-left corner of the KB crop: bottom rows, horizontally centred (BTS's rounding)."""
    if h < KB_CROP[0] or w < KB_CROP[1]:
        raise ValueError(f"image {h}x{w} is smaller than the KB crop {KB_CROP[0]}x{KB_CROP[1]}")
    return h - KB_CROP[0], (w - KB_CROP[1]) // 2


def depth_eval_mask(size, crop, kb_crop=False):
    """Boolean mask of the pixels a depth benchmark scores on an image of size (H, W): crop as
    vpd.metrics.depth_crop_mask ("eigen" NYU, "garg" / "kitti_eigen" KITTI). For KITTI with
    kb_crop=True it is returned in the coordinates of the 352x1216 KB crop of that image (the crops,
    fractions of the full frame, lie inside it)."""
    h, w = int(size[0]), int(size[1])
    mask = depth_crop_mask(h, w, crop)
    if kb_crop:
        t, l = kb_crop_box(h, w)
        mask = mask[t:t + KB_CROP[0], l:l + KB_CROP[1]]
    return mask


class KITTI(_DepthDataset):
    """KITTI depth, Eigen split, in the BTS layout.

    root/<date>/<drive>/image_02/data/XXXXXXXXXX.png                      (KITTI raw)
    root/data_depth_annotated/<drive>/proj_depth/groundtruth/image_02/XXXXXXXXXX.png (uint16, /256 = m)
    The annotated-depth download's train/ and val/ folders may be kept (both are searched) or merged.
    Lists (root/train_list.txt, root/test_list.txt by default; BTS's eigen_train_files_with_gt.txt /
    eigen_test_files_with_gt.txt, or VPD's eigen_benchmark lists, which name raw_data/<date>/... (looked
    for in root/raw_data/ or root/) and data_depth_annotated/<train|val>/...) hold 'image depth [focal]'
    lines; lines whose depth is 'None' (test images without ground truth) are left out and counted in
    `self.without_gt`.
    Depths beyond max_depth (80 m) are set to 0 (invalid).

    Training view: KB crop, then the depth recipe with a random `crop` (352x352: see vpd/tasks.py).
    Evaluation view: the KB crop of image and depth (352x1216) with `orig_size`, so that
    `depth_eval_mask(orig_size, "garg", kb_crop=True)` gives the Garg crop in the same frame.
    """

    def __init__(self, root, split="train", train=None, crop=(352, 352), list_file=None, max_depth=80.0, seed=0):
        super().__init__(seed)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.train = split == "train" if train is None else bool(train)
        self.crop, self.max_depth = tuple(crop), float(max_depth)
        gt_root = os.path.join(root, "data_depth_annotated")
        if not os.path.isdir(gt_root) and any(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
            gt_root = root  # data_depth_annotated.zip unzipped in the root: its own train/ and val/ folders
        _require_dir(gt_root, f"{root}/data_depth_annotated/<drive>/proj_depth/groundtruth/image_02/*.png "
                     f"(data_depth_annotated.zip holds train/ and val/: unzip it there or in {root}) next "
                     f"to the raw {root}/<date>/<drive>/image_02/data/*.png (BTS KITTI)")
        list_file = list_file or os.path.join(root, f"{split}_list.txt")
        pairs = _read_pair_list(list_file, "The standard Eigen lists come from the BTS repository "
                                "(eigen_train_files_with_gt.txt, eigen_test_files_with_gt.txt); "
                                "put it there under that name.")
        self.without_gt = sum(b == "None" for _, b in pairs)
        pairs = [(a, b) for a, b in pairs if b != "None"]
        self.images = [self._find_image(root, a) for a, _ in pairs]
        self.depths = [self._find_depth(gt_root, b) for _, b in pairs]
        _require_files(self.images + self.depths, "KITTI")

    @staticmethod
    def _find_image(root, rel):
        """VPD's lists name raw_data/<date>/...: found there, or in the root itself (BTS's layout)."""
        path = os.path.join(root, rel)
        if not os.path.isfile(path) and rel.startswith("raw_data/"):
            bare = os.path.join(root, rel.removeprefix("raw_data/"))
            return bare if os.path.isfile(bare) else path
        return path

    @staticmethod
    def _find_depth(gt_root, rel):
        rel = rel.removeprefix("data_depth_annotated/")  # VPD/GLPDepth's lists name the folder itself,
        rel = rel.split("/", 1)[1] if rel.startswith(("train/", "val/")) else rel  # and its train/ or val/
        for sub in ("", "train", "val"):
            p = os.path.join(gt_root, sub, rel)
            if os.path.isfile(p):
                return p
        return os.path.join(gt_root, rel)  # reported as missing by _require_files

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        img, depth = self._read_pair(index, 256.0)
        depth[depth > self.max_depth] = 0.0
        h, w = depth.shape
        try:
            t, l = kb_crop_box(h, w)
        except ValueError as e:
            raise BadSampleError(f"{self.images[index]}: {e}") from None
        img, depth = img[t:t + KB_CROP[0], l:l + KB_CROP[1]], depth[t:t + KB_CROP[0], l:l + KB_CROP[1]]
        x, d = self._depth_view(img, depth, index)
        return {"image": x, "depth": d, "orig_size": torch.tensor([h, w]), "scene": KITTI_SCENES[0], "scene_id": 0,
                "index": index}


# ----------------------------------------------------------------------------- semantic segmentation: ADE20K

def reduce_ade_label(label, path="label"):
    """ADE20K PNG values -> training labels: 0 ('other') -> 255 (ignore), v -> v - 1 (0..149)."""
    if label.max(initial=0) > len(ADE20K_CLASSES):
        raise BadSampleError(f"{path} holds value {int(label.max())}, above the {len(ADE20K_CLASSES)} classes")
    out = label.astype(np.int64) - 1
    out[label == 0] = IGNORE_INDEX
    return out


class ADE20K(_SeededDataset):
    """ADE20K (SceneParsing, 150 classes) in the benchmark's layout.

    root/ADEChallengeData2016/images/<split>/*.jpg + annotations/<split>/<same name>.png,
    split "training" (20,210) or "validation" (2,000).

    Training view: mmseg's recipe (vpd.transforms.semseg_train), 512x512.
    Evaluation view: the image resized keeping its aspect ratio to fit (2048, 512) (short side 512
    unless the long side would pass 2048), bilinear; `label` is the reduced label at the image's
    ORIGINAL size, for metrics on the prediction resized back; `orig_size` is (H, W). With
    `ms_ratios` (multi-scale test) also `ms_images`, one view per ratio r, each resized from the
    original to fit (int(2048 r), int(512 r)) as mmseg's MultiScaleFlipAug does.
    Batch evaluation samples one at a time (their sizes differ).
    """

    def __init__(self, root, split="training", train=None, crop=(512, 512), scale=(2048, 512), seed=0,
                 ms_ratios=None):
        super().__init__(seed)
        if split not in ("training", "validation"):
            raise ValueError(f"split must be 'training' or 'validation', got {split!r}")
        self.train = split == "training" if train is None else bool(train)
        if ms_ratios is not None and (self.train or not ms_ratios or min(ms_ratios) <= 0):
            raise ValueError(f"ms_ratios: positive ratios for the evaluation view, got {ms_ratios} "
                             f"({'training' if self.train else 'evaluation'} view)")
        self.crop, self.scale, self.ms_ratios = tuple(crop), tuple(scale), ms_ratios
        base = os.path.join(root, "ADEChallengeData2016")
        image_dir = os.path.join(base, "images", split)
        ann_dir = os.path.join(base, "annotations", split)
        layout = f"{base}/images/{split}/*.jpg and {base}/annotations/{split}/*.png"
        _require_dir(image_dir, layout)
        _require_dir(ann_dir, layout)
        names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(".jpg"))
        if not names:
            raise FileNotFoundError(f"no .jpg images in {image_dir} (expected layout: {layout})")
        self.images = [os.path.join(image_dir, n) for n in names]
        self.labels = [os.path.join(ann_dir, os.path.splitext(n)[0] + ".png") for n in names]
        _require_files(self.labels, "ADE20K annotation")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        img = read_rgb(self.images[index])
        label = reduce_ade_label(read_label_png(self.labels[index]), self.labels[index])
        if img.shape[:2] != label.shape:
            raise BadSampleError(f"{self.images[index]} is {img.shape[:2]} but its label is {label.shape}")
        if self.train:
            x, y = T.semseg_train(img, label, self.rng(index), scale=self.scale, crop=self.crop)
            return {"image": x, "label": y, "index": index}
        h, w = label.shape
        x = T.to_tensor(T.resize_image(img, T.keep_ratio_size(h, w, self.scale)))
        sample = {"image": x, "label": torch.from_numpy(label), "orig_size": torch.tensor([h, w]), "index": index}
        if self.ms_ratios:
            sizes = [T.keep_ratio_size(h, w, [int(s * r) for s in self.scale]) for r in self.ms_ratios]
            sample["ms_images"] = [T.to_tensor(T.resize_image(img, size)) for size in sizes]
        return sample


# ----------------------------------------------------------------------------- referring segmentation: RefCOCO

class RefCOCO(_SeededDataset):
    """RefCOCO / RefCOCO+ / G-Ref in the REFER (LAVT/VPD) layout, with `root` the folder holding refer/:

    root/refer/data/<dataset>/refs(<split_by>).p   pickle: list of refs {image_id, ann_id, ref_id,
                                                   split, sentences [{sent, tokens, raw, sent_id}]}
    root/refer/data/<dataset>/instances.json       COCO images (file_name, height, width) and
                                                   annotations (id, image_id, segmentation, bbox)
    root/refer/data/images/mscoco/images/train2014/COCO_train2014_XXXXXXXXXXXX.jpg
    (REFER's image folder, below its data root; pass `images=` for another place).

    Training view: one sample per ref, with a sentence drawn by the (seed, epoch, index) generator;
    image and mask resized to 512x512 (vpd.transforms.refer_resize).
    Evaluation view: one sample per sentence of every ref; the image resized to 512x512, `mask`
    at the ORIGINAL image size (for metrics at full resolution), `mask_resized` the 512x512
    nearest-resized mask (the official LAVT/VPD protocol scores at that size), `orig_size` (H, W).
    With a `tokenizer` (vpd.clip.Tokenizer), `tokens` holds the sentence's max_tokens CLIP ids (cut
    keeping the end token, padded with end-of-text; no mask: CLIP's causal attention never lets a real
    token see the padding after it, as in VPD).
    The refs pickle is read without allowing any class (vpd.masks.load_plain_pickle).
    """

    def __init__(self, root, dataset="refcoco", split_by="unc", split="train", train=None, images=None,
                 tokenizer=None, max_tokens=40, size=(512, 512), seed=0):
        super().__init__(seed)
        self.train = split == "train" if train is None else bool(train)
        self.tokenizer, self.max_tokens, self.size = tokenizer, int(max_tokens), tuple(size)
        data_dir = os.path.join(root, "refer", "data", dataset)
        _require_dir(data_dir, f"{root}/refer/data/{dataset}/refs({split_by}).p + instances.json (REFER)")
        self.image_dir = images or os.path.join(root, "refer", "data", "images", "mscoco", "images", "train2014")
        _require_dir(self.image_dir, "COCO train2014 images (COCO_train2014_XXXXXXXXXXXX.jpg)")
        refs_file = os.path.join(data_dir, f"refs({split_by}).p")
        inst_file = os.path.join(data_dir, "instances.json")
        refs = load_plain_pickle(refs_file)
        if not isinstance(refs, list):
            raise ValueError(f"{refs_file} should hold a list of refs, got {type(refs).__name__}")
        try:
            with open(inst_file) as f:
                instances = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"instances file not found: {inst_file}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {inst_file}: {e}") from None
        available = sorted({r["split"] for r in refs})
        self.refs = [r for r in refs if r["split"] == split]
        if not self.refs:
            raise ValueError(f"no refs with split {split!r} in {refs_file}; available: {available}")
        # only the split's images and objects: instances.json holds every COCO object of the dataset's images,
        # referred to or not, in every split, and each loader worker would keep them all as Python objects
        ann_ids, image_ids = {r["ann_id"] for r in self.refs}, {r["image_id"] for r in self.refs}
        self.imgs = {im["id"]: im for im in instances["images"] if im["id"] in image_ids}
        self.anns = {a["id"]: a for a in instances["annotations"] if a["id"] in ann_ids}
        for r in self.refs:
            if r["ann_id"] not in self.anns or r["image_id"] not in self.imgs:
                raise ValueError(f"{refs_file}: ref {r['ref_id']} names annotation {r['ann_id']} / image "
                                 f"{r['image_id']} that {inst_file} does not have")
        _require_files([self._image_path(r) for r in self.refs], "COCO image")
        # Evaluation walks every sentence: (ref position, sentence position) pairs.
        self.items = [(i, None) for i in range(len(self.refs))] if self.train else \
            [(i, j) for i, r in enumerate(self.refs) for j in range(len(r["sentences"]))]

    def _image_path(self, ref):
        return os.path.join(self.image_dir, self.imgs[ref["image_id"]]["file_name"])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        ref_pos, sent_pos = self.items[index]
        ref = self.refs[ref_pos]
        if sent_pos is None:
            sent_pos = int(self.rng(index).integers(len(ref["sentences"])))
        sentence = ref["sentences"][sent_pos]["sent"]
        img = read_rgb(self._image_path(ref))
        info = self.imgs[ref["image_id"]]
        try:
            mask = segmentation_to_mask(self.anns[ref["ann_id"]]["segmentation"], info["height"], info["width"])
        except ValueError as e:
            raise BadSampleError(f"annotation {ref['ann_id']} of {info['file_name']}: {e}") from None
        if img.shape[:2] != mask.shape:
            raise BadSampleError(f"{self._image_path(ref)} is {img.shape[:2]}, instances.json says {mask.shape}")
        x, m = T.refer_resize(img, mask, self.size)
        sample = {"image": x, "mask": m, "sentence": sentence, "ref_id": ref["ref_id"], "index": index}
        if not self.train:
            sample.update(mask=torch.from_numpy(mask), mask_resized=m, orig_size=torch.tensor(mask.shape))
        if self.tokenizer is not None:
            sample["tokens"] = self.tokenizer(sentence, max_length=self.max_tokens)[0]
        return sample


# ----------------------------------------------------------------------------- own images

class ImageFolder(Dataset):
    """Images of any size and aspect for inference, with what `undo` needs to map predictions back.

    task "depth":  keep-ratio resize to fit size x size, zero-pad (in [-1, 1]) bottom/right to size x size;
    task "semseg": keep-ratio resize to fit (4*size, size) as ADE20K evaluation does, no padding
                   (sizes differ: batch one at a time);
    task "refer":  resize to size x size (aspect not kept), as LAVT/VPD do.
    Samples: image, orig_size (H, W), resized_size (h, w), path, index. (predict.py lists the files.)
    """

    TASKS = ("depth", "semseg", "refer")

    def __init__(self, paths, task, size=512):
        if task not in self.TASKS:
            raise ValueError(f"task must be one of {self.TASKS}, got {task!r}")
        self.task, self.size = task, int(size)
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("ImageFolder needs at least one image path")
        _require_files(self.paths, "image")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        img = read_rgb(self.paths[index], upright=True)
        h, w = img.shape[:2]
        if self.task == "refer":
            rh, rw = self.size, self.size
        elif self.task == "depth":
            rh, rw = T.keep_ratio_size(h, w, (self.size, self.size))
        else:
            rh, rw = T.keep_ratio_size(h, w, (4 * self.size, self.size))
        rh, rw = max(rh, 1), max(rw, 1)  # the thin side of an extreme aspect (a 3000x1 strip) would round to 0
        # antialiased for refer, as PIL resizes its training images; semseg as ADE20K's test resize (OpenCV's,
        # no antialiasing); depth has no resize in training to follow, and takes the same as semseg
        x = T.to_tensor(T.resize_image(img, (rh, rw), antialias=self.task == "refer"))
        if self.task == "depth":  # bottom / right, so that depth images batch
            x = torch.nn.functional.pad(x, (0, self.size - rw, 0, self.size - rh), value=0.0)
        return {"image": x, "orig_size": torch.tensor([h, w]), "resized_size": torch.tensor([rh, rw]),
                "path": self.paths[index], "index": index}


def undo(pred, meta):
    """Map a prediction at network-input resolution back to the original image size.

    pred: (..., H_in, W_in) for one image, or (B, ..., H_in, W_in) with a collated batch of meta.
    meta: a sample of ImageFolder (or any dict with `orig_size` and `resized_size`; what lies beyond
    the resized size is padding, dropped).
    Floating predictions (logits, depth) are resized bilinearly, integer ones (class ids, masks)
    by nearest neighbour. A batch returns a list (the original sizes may differ).
    """
    orig = torch.as_tensor(meta["orig_size"])
    resized = torch.as_tensor(meta["resized_size"])
    if orig.ndim == 2:
        return [undo(pred[i], {"orig_size": orig[i], "resized_size": resized[i]})
                for i in range(orig.shape[0])]
    rh, rw = int(resized[0]), int(resized[1])
    if pred.shape[-2] < rh or pred.shape[-1] < rw:
        raise ValueError(f"prediction {tuple(pred.shape[-2:])} is smaller than the resized image {(rh, rw)}")
    x = pred[..., :rh, :rw]  # drop the padding
    lead = x.shape[:-2]
    x = x.reshape(1, -1, rh, rw)  # (1, C, h, w)
    size = (int(orig[0]), int(orig[1]))
    if x.is_floating_point():
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    else:
        x = torch.nn.functional.interpolate(x.float(), size=size, mode="nearest").to(pred.dtype)
    return x.reshape(*lead, *size)
