"""Training augmentations for the three VPD tasks, in numpy/torch.

Every random choice comes from a `np.random.Generator` the caller passes in; datasets draw it
with `sample_rng(seed, epoch, index)`, so a sample's augmentation depends only on those three
numbers: a resumed run or a different number of loader workers sees the same images.

Images travel as float32 (H, W, 3) arrays in [0, 255] (RGB); `to_tensor` makes the network input
(3, H, W) in [-1, 1] (x / 127.5 - 1). Photometric steps clip to [0, 255] but stay in float in
between (mmseg and albumentations truncate to uint8 after each step: under one grey level each).
Resizing follows OpenCV's INTER_LINEAR / INTER_NEAREST (no antialiasing), as mmseg and
albumentations use, via torch's bilinear (align_corners=False) and legacy nearest; the referring
pipeline follows PIL instead (LAVT/VPD resize PIL images with torchvision): antialiased bilinear
and pixel-centre nearest (torch's "nearest-exact").
"""
import numpy as np
import torch
import torch.nn.functional as F


def sample_rng(seed, epoch, index):
    """The generator for one sample's augmentation: a pure function of (seed, epoch, index)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


def to_tensor(img):
    """(H, W, 3) float/uint8 in [0, 255] -> (3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    return x.permute(2, 0, 1) / 127.5 - 1.0


# ----------------------------------------------------------------------------- geometry

def resize_image(img, size, antialias=False):
    """Bilinear resize of an (H, W, C) or (H, W) float array to size = (h, w) (antialias: as PIL)."""
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]  # (1, C, H, W)
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias)
    x = x[0, 0] if img.ndim == 2 else x[0].permute(1, 2, 0)
    return x.numpy()


def resize_nearest(arr, size, exact=False):
    """Nearest resize of an (H, W) label/mask/depth array to size = (h, w), dtype kept; OpenCV's
    source pixel floor(x * scale), or with exact=True PIL's floor((x + 0.5) * scale)."""
    x = torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32))[None, None]
    x = F.interpolate(x, size=tuple(size), mode="nearest-exact" if exact else "nearest")[0, 0].numpy()
    return x.astype(arr.dtype)


def keep_ratio_size(h, w, scale):
    """mmcv's keep-ratio rescale: the largest (h, w) with long side <= max(scale), short <= min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def random_crop_box(h, w, crop, rng):
    """Top-left corner of a uniformly placed crop; crop = (ch, cw) may exceed (h, w) (then 0)."""
    top = int(rng.integers(0, max(h - crop[0], 0) + 1))
    left = int(rng.integers(0, max(w - crop[1], 0) + 1))
    return top, left


def crop_with_cat_max_ratio(label, crop, rng, cat_max_ratio=0.75, ignore_index=255, tries=10):
    """mmseg RandomCrop: retry up to `tries` times until no class covers >= cat_max_ratio of the
    crop's labelled pixels (and there are at least two classes); after that, one more fresh crop."""
    h, w = label.shape
    box = random_crop_box(h, w, crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            t, l = box
            classes, counts = np.unique(label[t:t + crop[0], l:l + crop[1]], return_counts=True)
            counts = counts[classes != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = random_crop_box(h, w, crop, rng)
    return box


# ----------------------------------------------------------------------------- colour

# (Channel views and np.maximum / np.minimum chains: numpy reduces over a trailing axis of 3 some
# thirty times slower than it compares three planes. Values known to lie within one turn are wrapped
# by a comparison, not by float %, which costs as much as the rest of a step.)

def _value_chroma(img):
    """Float (H, W, 3) RGB, its largest channel v and chroma c = v - smallest channel, each (H, W)."""
    img = img if img.dtype.kind == "f" else img.astype(np.float32)  # (uint8 differences would wrap)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    return img, v, v - np.minimum(np.minimum(r, g), b)


def rgb_to_hsv(img):
    """(H, W, 3) RGB in [0, 255] -> hue in degrees [0, 360), saturation and value in [0, 1]."""
    img, v, c = _value_chroma(img)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    # the sextant of the largest channel (0, 2 or 4) plus the signed position within it; grey pixels
    # (c = 0) get hue 0, as their numerator is 0
    num = np.where(v == r, g - b, np.where(v == g, b - r + 2 * c, r - g + 4 * c))
    h = num / np.maximum(c, 1e-12)  # in [-1, 5]
    h = np.where(h < 0, h + 6.0, h) * 60.0
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    return np.stack([h, s, v / 255.0], -1)


def hsv_to_rgb(hsv):
    """Inverse of rgb_to_hsv; returns RGB in [0, 255]."""
    h6, vs, v = hsv[..., 0] % 360.0 / 60.0, hsv[..., 2] * hsv[..., 1], hsv[..., 2]
    channels = []
    for n in (5.0, 3.0, 1.0):  # R, G, B: the standard closed form of the hexcone
        k = n + h6  # in [1, 11): (n + h6) mod 6 below
        k = np.where(k >= 6.0, k - 6.0, k)
        channels.append(v - vs * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.stack(channels, -1) * 255.0


def saturate(img, factor):
    """HSV saturation scaled by `factor` and clipped at 1, hue and value kept, without an HSV round trip:
    each channel is v - v * s * t(hue) (v the largest channel, s = (v - smallest) / v, t in [0, 1]), so
    scaling s by min(factor, 1 / s) scales each channel's distance below v by the same."""
    img, v, c = _value_chroma(img)
    scale = np.minimum(factor, v / np.maximum(c, 1e-12))
    return np.maximum(v[..., None] - scale[..., None] * (v[..., None] - img), 0.0)  # (v - v/c * c: -1e-5)


def photometric_distortion(img, rng, brightness_delta=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5),
                           hue_delta=18):
    """mmseg PhotoMetricDistortion: each step applied with p=0.5, contrast first or last at random.

    hue_delta is in OpenCV's 8-bit hue units (180 per turn), i.e. 2 degrees each.
    """
    img = img.astype(np.float32)
    if rng.integers(2):
        img = np.clip(img + rng.uniform(-brightness_delta, brightness_delta), 0, 255)
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        img = np.clip(img * rng.uniform(*contrast), 0, 255)
    if rng.integers(2):
        img = saturate(img, rng.uniform(*saturation))
    if rng.integers(2):
        hsv = rgb_to_hsv(img)
        hsv[..., 0] += 2.0 * rng.integers(-hue_delta, hue_delta)  # mmseg's randint: -18..17
        img = hsv_to_rgb(hsv)
    if not contrast_first and rng.integers(2):
        img = np.clip(img * rng.uniform(*contrast), 0, 255)
    return img.astype(np.float32)


# ----------------------------------------------------------------------------- semantic segmentation

def semseg_train(img, label, rng, scale=(2048, 512), ratio_range=(0.5, 2.0), crop=(512, 512),
                 cat_max_ratio=0.75, ignore_index=255):
    """mmseg's ADE20K train pipeline: random keep-ratio resize, cat_max_ratio crop, flip,
    photometric distortion, normalise, pad to `crop` (image 0 after normalising, label 255).

    img (H, W, 3) in [0, 255], label (H, W) int -> image (3, ch, cw) in [-1, 1], label (ch, cw) int64.
    """
    ratio = rng.uniform(*ratio_range)
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    size = keep_ratio_size(*label.shape, target)
    img, label = resize_image(img, size), resize_nearest(label, size)
    t, l = crop_with_cat_max_ratio(label, crop, rng, cat_max_ratio, ignore_index)
    img, label = img[t:t + crop[0], l:l + crop[1]], label[t:t + crop[0], l:l + crop[1]]
    if rng.random() < 0.5:
        img, label = img[:, ::-1], label[:, ::-1]
    img = photometric_distortion(img, rng)
    x = to_tensor(img)
    y = torch.from_numpy(label.astype(np.int64))
    ph, pw = crop[0] - x.shape[1], crop[1] - x.shape[2]
    x = F.pad(x, (0, pw, 0, ph), value=0.0)
    y = F.pad(y, (0, pw, 0, ph), value=ignore_index)
    return x, y


# ----------------------------------------------------------------------------- depth

def cut_depth(img, depth, rng, max_depth, p=0.75):
    """CutDepth (VPD/GLPDepth): a full-height vertical stripe of the image becomes the depth map.

    The stripe starts at l = int(a * W) and is int(max((W - a W) * b * p, 1)) wide, a, b ~ U(0, 1).
    The depth is written as a grey level depth / max_depth * 255 (the official code copies raw
    millimetres into a uint8 array, which wraps around; normalising is what CutDepth describes).
    """
    w = img.shape[1]
    a, b = rng.random(), rng.random()
    left = int(a * w)
    width = int(max((w - a * w) * b * p, 1))
    img = img.copy()
    img[:, left:left + width, :] = np.clip(depth[:, left:left + width, None] / max_depth * 255.0, 0, 255)
    return img


def depth_train(img, depth, rng, crop=(480, 480), max_depth=10.0):
    """VPD's NYU recipe (albumentations defaults): CutDepth on a quarter of the samples (drawn per
    sample and epoch; the official loader takes every 4th sample each worker loads), then
    HorizontalFlip(p=.5), RandomCrop, RandomBrightnessContrast(0.2, 0.2, p=.5),
    RandomGamma(80-120, p=.5), HueSaturationValue(hue 20, sat 30, val 20, p=.5).

    img (H, W, 3) in [0, 255], depth (H, W) metres -> image (3, ch, cw) in [-1, 1], depth (1, ch, cw).
    """
    h, w = depth.shape
    if h < crop[0] or w < crop[1]:
        raise ValueError(f"image {h}x{w} is smaller than the crop {crop[0]}x{crop[1]}")
    img = img.astype(np.float32)
    if rng.random() < 0.25:
        img = cut_depth(img, depth, rng, max_depth)
    if rng.random() < 0.5:
        img, depth = img[:, ::-1], depth[:, ::-1]
    t, l = random_crop_box(h, w, crop, rng)
    img, depth = img[t:t + crop[0], l:l + crop[1]], depth[t:t + crop[0], l:l + crop[1]]
    if rng.random() < 0.5:  # brightness_by_max: beta is a fraction of 255
        alpha, beta = 1.0 + rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2) * 255.0
        img = np.clip(img * alpha + beta, 0, 255)
    if rng.random() < 0.5:
        gamma = rng.uniform(80, 120) / 100.0
        img = (img / 255.0) ** gamma * 255.0
    if rng.random() < 0.5:  # shifts in OpenCV 8-bit HSV units: hue 180 per turn, sat/val 0..255
        hue, sat, val = rng.uniform(-20, 20), rng.uniform(-30, 30), rng.uniform(-20, 20)
        hsv = rgb_to_hsv(img)
        hsv[..., 0] += 2.0 * hue
        hsv[..., 1] = np.clip(hsv[..., 1] + sat / 255.0, 0, 1)
        hsv[..., 2] = np.clip(hsv[..., 2] + val / 255.0, 0, 1)
        img = hsv_to_rgb(hsv)
    return to_tensor(img), torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None]


# ----------------------------------------------------------------------------- referring segmentation

def refer_resize(img, mask, size=(512, 512)):
    """LAVT/VPD: resize image (PIL bilinear) and mask (PIL nearest: torchvision resizes the "P"-mode
    mask with bilinear asked, which PIL does by nearest for palette images) to `size`, no aspect
    kept, no flip (a flip would swap "left" and "right" in the sentence)."""
    return (to_tensor(resize_image(img, size, antialias=True)),
            torch.from_numpy(resize_nearest(mask, size, exact=True)))
