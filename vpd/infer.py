"""Test-time inference of each task: what a model predicts for one full image.

semseg: mmseg's sliding window (512 crops, stride 341; 4 crops per forward, mmseg's one), optional
        multi-scale (VPD's MS_RATIOS, views resized by the dataset) + flip, softmax averaged at the
        label's size.
depth:  VPD's flip + shifted square windows, averaged.
refer:  one forward, logits resized to the mask's size.
The segmentation networks take sides that are multiples of 64, the depth network multiples of 32
(it pads 480 to 512 itself); other sizes are zero-padded here and the padding is cut off the prediction
(refer_logits pads nothing: its inputs are resized to a multiple of 64).
"""
import torch
import torch.nn.functional as F

MS_RATIOS = (1.0, 1.125, 1.25, 1.375, 1.5)  # VPD's multi-scale test ratios (of ADE20K's (2048, 512) scale)


def pad_to(x, multiple=64):
    """Zero-pad (B, C, H, W) on the bottom/right to multiples of `multiple`; return (x, (H, W))."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return (F.pad(x, (0, pw, 0, ph)) if ph or pw else x), (h, w)


def _seg_logits(model, x):
    xp, (h, w) = pad_to(x)
    return model(xp)[..., :h, :w]


def slide_logits(model, image, num_classes, crop=512, stride=341, batch=4):
    """mmseg's slide inference: overlapping crops, logits summed and divided by the overlap count.
    The crops (all of one size) go through the model `batch` at a time: mmseg runs them one by one,
    which leaves a GPU waiting on kernel launches. (4: the float32 logits of four 512x512 crops over
    150 classes take 630 MB.)"""
    b, _, H, W = image.shape
    rows = max(H - crop + stride - 1, 0) // stride + 1
    cols = max(W - crop + stride - 1, 0) // stride + 1
    logits = image.new_zeros(b, num_classes, H, W, dtype=torch.float32)
    count = image.new_zeros(1, 1, H, W, dtype=torch.float32)
    crops = []  # (image index, window) of every crop
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, H), min(c * stride + crop, W)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            count[:, :, y1:y2, x1:x2] += 1
            crops += [(i, y1, y2, x1, x2) for i in range(b)]
    for k in range(0, len(crops), batch):
        group = crops[k:k + batch]
        out = _seg_logits(model, torch.cat([image[i:i + 1, :, y1:y2, x1:x2] for i, y1, y2, x1, x2 in group]))
        for o, (i, y1, y2, x1, x2) in zip(out.float(), group):
            logits[i, :, y1:y2, x1:x2] += o
    return logits.div_(count)


def semseg_probs(model, views, num_classes, out_size, flip=False, crop=512, stride=None, batch=4):
    """Class probabilities (B, K, *out_size), averaged over `views` (a list of (B, 3, h, w): one image
    at one or more scales, e.g. ADE20K's ms_images) and, with flip, their mirror images. Windows of
    `crop`, `stride` apart (default 2/3 of the crop: mmseg's 341 for VPD's 512), `batch` per forward."""
    stride = stride or crop * 2 // 3
    probs = views[0].new_zeros(views[0].shape[0], num_classes, *out_size, dtype=torch.float32)
    for x in views:
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            logits = slide_logits(model, xi, num_classes, crop, stride, batch)
            logits = logits.flip(-1) if flipped else logits
            probs += F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False).softmax(1)
    return probs.div_(len(views) * (2 if flip else 1))


def depth_predict(model, image, scene_ids, flip=True, windows=2):
    """VPD's depth test: `windows` square crops along the long side (2 for 480x640: x=0 and x=160)
    and their flips, predictions averaged where they overlap. Returns (B, 1, H, W) metres.
    windows=1 predicts the whole image in one piece; more windows must cover it (KITTI: ceil(W / H))."""
    b, _, h, w = image.shape
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    if w > h and 1 < windows and windows * h < w:
        raise ValueError(f"{windows} windows of {h}x{h} cannot cover a {h}x{w} image: use at least {-(-w // h)}")
    if w > h and windows > 1:
        starts = [i * (w - h) // (windows - 1) for i in range(windows)]  # the last window ends at w
        spans = [(x1, x1 + h) for x1 in starts]
    else:
        spans = [(0, w)]
    crops = torch.cat([image[..., x1:x2] for x1, x2 in spans])  # (windows * B, 3, h, side)
    ids = scene_ids.repeat(len(spans))
    if flip:
        crops, ids = torch.cat([crops, crops.flip(-1)]), torch.cat([ids, ids])
    # the depth model pads sides that are multiples of 32 to 64 itself and crops its fused 1/32 map
    # back (VPD: 480 -> 512), as in training; only other sides are zero-padded here
    xp, (ch, cw) = pad_to(crops, 32)
    pred = model(xp, ids)[..., :ch, :cw].float()
    if flip:
        n = pred.shape[0] // 2
        pred = (pred[:n] + pred[n:].flip(-1)) / 2
    out = image.new_zeros(b, 1, h, w, dtype=torch.float32)
    count = image.new_zeros(1, 1, h, w, dtype=torch.float32)
    for i, (x1, x2) in enumerate(spans):
        out[..., x1:x2] += pred[i * b:(i + 1) * b]
        count[..., x1:x2] += 1
    return out / count


def refer_logits(model, image, tokens, out_size):
    logits = model(image, tokens).float()
    return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
