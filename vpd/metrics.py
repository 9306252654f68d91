"""Evaluation metrics of the three VPD tasks.

Each metric keeps only running sums in one small CPU tensor, so evaluation under torch.distributed is:
every rank `update()`s its own shard, then `reduce()` all-reduces the sums, then `compute()` on any rank
gives the numbers of the whole set. Definitions follow the reference code of each task:

- SegMetric: mmseg's `intersect_and_union` / `total_area_to_metrics` (ADE20K mIoU, aAcc, mAcc).
- DepthMetric: VPD's depth/utils_depth/metrics.py (from GLPDepth): nine metrics per image, then the
  mean over images.
- ReferMetric: VPD's refer/test.py (from LAVT): overall IoU, mean IoU and precision@0.5:0.9 over
  sentences.
Each rank evaluates its own shard (vpd.sampler.ShardedEvalSampler, no sample counted twice).
"""
import math

import torch
import torch.distributed as dist

from vpd.dist import is_dist


def _all_reduce_sum_(t):
    """Sum `t` over all ranks, in place; outside torch.distributed it is left as it is."""
    if not is_dist():
        return t
    # NCCL reduces only CUDA tensors; gloo reduces CPU ones
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buf = t.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    t.copy_(buf)
    return t


class _Sums:
    """Running sums in `self.sums`, reduced across ranks exactly once."""

    def __init__(self, sums):
        self.sums = sums
        self._reduced = False

    def _check_open(self):
        if self._reduced:
            raise RuntimeError(f"{type(self).__name__}: update() after reduce(); the sums already hold "
                               "every rank's samples")

    def reduce(self):
        """All-reduce the sums over ranks (when torch.distributed is initialised). Call once, at the end."""
        if self._reduced:
            raise RuntimeError(f"{type(self).__name__}.reduce() was already called: a second call would "
                               "count every sample world-size times")
        _all_reduce_sum_(self.sums)
        self._reduced = True


def _check_maps(pred, target, names, ndim):
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError(f"{names[0]} and {names[1]} must be torch tensors, got "
                         f"{type(pred).__name__} and {type(target).__name__}")
    if pred.shape != target.shape:
        raise ValueError(f"{names[0]} {tuple(pred.shape)} and {names[1]} {tuple(target.shape)} differ in shape")
    if pred.dim() not in ndim:
        raise ValueError(f"{names[0]} must have {' or '.join(map(str, ndim))} dims, got shape {tuple(pred.shape)}")


class SegMetric(_Sums):
    """Semantic segmentation: per-class intersection, union and label area over the whole set (mmseg).

    Pixels labelled `ignore_index` are dropped from both maps first. IoU_c = I_c / U_c and Acc_c = I_c /
    label_c; a class absent from ground truth and prediction over the whole set has IoU NaN and one
    absent from ground truth has Acc NaN; the means skip NaNs, as mmseg does. Results in percent.
    """

    def __init__(self, num_classes, ignore_index=255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a real class id (num_classes {num_classes})")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        super().__init__(torch.zeros(3, num_classes, dtype=torch.int64))  # rows: intersect, union, label

    def _check_ids(self, x, what):
        if x.numel() and (x.min() < 0 or x.max() >= self.num_classes):
            bad = x[(x < 0) | (x >= self.num_classes)].unique()[:5].tolist()
            raise ValueError(f"{what} holds ids {bad} outside [0, {self.num_classes})"
                             + (f" other than ignore_index {self.ignore_index}" if what == "label" else ""))

    @torch.no_grad()
    def update(self, pred, label):
        """pred, label: (B, H, W) integer class maps (pred = logits.argmax(1))."""
        self._check_open()
        _check_maps(pred, label, ("pred", "label"), (3,))
        if pred.is_floating_point() or label.is_floating_point() or pred.dtype == torch.bool:
            raise ValueError(f"pred and label must be integer class maps, got {pred.dtype} and {label.dtype}")
        self._check_ids(pred, "pred")
        keep = label != self.ignore_index
        pred, label = pred[keep].long(), label[keep].long()
        self._check_ids(label, "label")
        n = self.num_classes
        inter = torch.bincount(label[pred == label], minlength=n)
        area_pred = torch.bincount(pred, minlength=n)
        area_label = torch.bincount(label, minlength=n)
        self.sums += torch.stack([inter, area_pred + area_label - inter, area_label]).cpu()

    def compute(self):
        inter, union, area_label = self.sums.double()
        if area_label.sum() == 0:
            raise ValueError("SegMetric.compute(): no labelled pixel was seen")
        iou = inter / union  # 0/0 = NaN: class in neither ground truth nor prediction
        acc = inter / area_label  # 0/0 = NaN: class not in ground truth
        return {"aAcc": 100 * (inter.sum() / area_label.sum()).item(),
                "mIoU": 100 * iou.nanmean().item(),
                "mAcc": 100 * acc.nanmean().item(),
                "IoU": (100 * iou).tolist(),
                "Acc": (100 * acc).tolist()}


# Valid-region crops of depth evaluation. NYU's Eigen crop is fixed pixels of the 480x640 map; the KITTI
# crops are fractions of the map size, (top, bottom, left, right), truncated with int() as in VPD.
NYU_EIGEN_CROP = (45, 471, 41, 601)
KITTI_CROPS = {"garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
               "kitti_eigen": (0.3324324, 0.91351351, 0.0359477, 0.96405229)}
DEPTH_METRICS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")


def depth_crop_mask(h, w, crop):
    """(h, w) bool mask of the pixels a depth benchmark scores (before the valid-depth test): crop
    "eigen" (NYU, rows 45:471, cols 41:601 of a 480x640 map), "garg" or "kitti_eigen" (KITTI, the
    fractions KITTI_CROPS of the full frame), or None (every pixel)."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    if crop is None:
        mask[:] = True
    elif crop == "eigen":
        if (h, w) != (480, 640):
            raise ValueError(f"the NYU Eigen crop needs a 480x640 depth map, got {h}x{w}; "
                             "use crop=None for other sizes")
        t, b, l, r = NYU_EIGEN_CROP
        mask[t:b, l:r] = True
    elif crop in KITTI_CROPS:
        t, b, l, r = KITTI_CROPS[crop]
        mask[int(t * h):int(b * h), int(l * w):int(r * w)] = True
    else:
        raise ValueError(f"unknown crop {crop!r}: use 'eigen' (NYU), 'garg', 'kitti_eigen' or None")
    return mask


class DepthMetric(_Sums):
    """Monocular depth: VPD's nine metrics on each image's valid pixels, averaged over images.

    valid = min_depth < gt < max_depth, inside the crop (depth_crop_mask: "eigen" for NYU, "garg" or
    "kitti_eigen" for KITTI, None for none). Predictions have NaN
    set to min_depth and +inf to max_depth (as VPD), then are clamped to [min_depth, max_depth] (as BTS;
    VPD's eval stops at the NaN/inf repair, but its head outputs sigmoid * max_depth, which lies inside
    the range unless it falls below min_depth, so the clamp changes nothing there).
    Formulas (d = log pred - log gt over valid pixels): d1..d3 = share of max(pred/gt, gt/pred) < 1.25^k,
    abs_rel = mean|pred-gt|/gt, sq_rel = mean (pred-gt)^2/gt, rmse, rmse_log = sqrt(mean d^2),
    log10 = mean|log10 pred - log10 gt|, silog = sqrt(mean d^2 - 0.5 (mean d)^2). The silog is VPD's
    (the weight 0.5 of its training loss, no x100), not BTS's sqrt(mean d^2 - (mean d)^2) * 100.
    """

    def __init__(self, min_depth=1e-3, max_depth=10.0, crop="eigen"):
        if not 0 <= min_depth < max_depth:
            raise ValueError(f"need 0 <= min_depth < max_depth, got {min_depth}, {max_depth}")
        depth_crop_mask(480, 640, crop)  # an unknown crop fails here, not at the first image
        self.min_depth, self.max_depth, self.crop = min_depth, max_depth, crop
        super().__init__(torch.zeros(len(DEPTH_METRICS) + 1, dtype=torch.float64))  # metric sums, images

    def crop_mask(self, h, w):
        """(h, w) bool mask of the evaluated region."""
        return depth_crop_mask(h, w, self.crop)

    @torch.no_grad()
    def update(self, pred, gt, region=None):
        """pred, gt: depth in metres, one image (H, W) or a batch (B, H, W) / (B, 1, H, W).
        region: an (H, W) bool mask of the scored pixels instead of the crop's, for maps whose crop is
        not a function of their own size (KITTI's KB-cropped maps: vpd.data.depth_eval_mask)."""
        self._check_open()
        _check_maps(pred, gt, ("pred", "gt"), (2, 3, 4))
        if pred.dim() == 4 and pred.shape[1] != 1:
            raise ValueError(f"a 4-d depth batch must be (B, 1, H, W), got {tuple(pred.shape)}")
        h, w = pred.shape[-2:]
        if region is None:
            region = self.crop_mask(h, w)
        elif tuple(region.shape) != (h, w) or region.dtype != torch.bool:
            raise ValueError(f"region must be a bool ({h}, {w}) mask, got {region.dtype} {tuple(region.shape)}")
        gt = gt.detach().reshape(-1, h, w).cpu()  # (B, H, W)
        # range test in gt's own dtype, as VPD: a float32 gt of 1e-3 equals min_depth and is left out
        valid = (gt > self.min_depth) & (gt < self.max_depth) & region.cpu()
        gt = gt.double()
        pred = pred.detach().reshape(-1, h, w).double().cpu()
        pred = pred.nan_to_num(nan=self.min_depth, posinf=self.max_depth, neginf=self.min_depth)
        pred = pred.clamp(self.min_depth, self.max_depth)
        for i in range(pred.shape[0]):
            if not valid[i].any():
                raise ValueError(f"image {i} of the batch has no valid ground-truth pixel in "
                                 f"({self.min_depth}, {self.max_depth}) inside crop {self.crop!r}")
            self.sums[:-1] += self._image_metrics(pred[i][valid[i]], gt[i][valid[i]])
            self.sums[-1] += 1

    @staticmethod
    def _image_metrics(p, g):
        ratio = torch.maximum(p / g, g / p)
        diff, dlog = p - g, p.log() - g.log()
        return torch.stack([
            (ratio < 1.25).double().mean(),
            (ratio < 1.25 ** 2).double().mean(),
            (ratio < 1.25 ** 3).double().mean(),
            (diff.abs() / g).mean(),
            (diff ** 2 / g).mean(),
            (diff ** 2).mean().sqrt(),
            (dlog ** 2).mean().sqrt(),
            (p.log10() - g.log10()).abs().mean(),
            ((dlog ** 2).mean() - 0.5 * dlog.mean() ** 2).sqrt(),
        ])

    def compute(self):
        n = self.sums[-1].item()
        if n == 0:
            raise ValueError("DepthMetric.compute(): no image was seen")
        return {k: (s / n).item() for k, s in zip(DEPTH_METRICS, self.sums[:-1])}


class ReferMetric(_Sums):
    """Referring segmentation, LAVT/VPD conventions, every sentence counted once.

    Per sentence I = |pred & gt|, U = |pred | gt|, IoU = I/U, and 0 when U = 0 (both masks empty), as
    LAVT's test.py does. oIoU = sum I / sum U over sentences, mIoU = mean IoU, P@t = share of sentences
    with IoU >= t (LAVT compares with >=). Results in percent; oIoU is NaN if every union was empty.
    """
    THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)

    def __init__(self):
        # sum I, sum U, sum IoU, sentences, then one hit count per threshold; float64 counts stay exact
        super().__init__(torch.zeros(4 + len(self.THRESHOLDS), dtype=torch.float64))

    @torch.no_grad()
    def update(self, pred, gt):
        """pred, gt: (B, H, W) bool masks, one row per sentence."""
        self._check_open()
        _check_maps(pred, gt, ("pred", "gt"), (3,))
        if pred.dtype != torch.bool or gt.dtype != torch.bool:
            raise ValueError(f"pred and gt must be bool masks (e.g. logits.argmax(1) == 1), "
                             f"got {pred.dtype} and {gt.dtype}")
        inter = (pred & gt).flatten(1).sum(1).double().cpu()  # (B,)
        union = (pred | gt).flatten(1).sum(1).double().cpu()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
        hits = [(iou >= t).sum().item() for t in self.THRESHOLDS]
        self.sums += torch.tensor([inter.sum().item(), union.sum().item(), iou.sum().item(), len(iou), *hits],
                                  dtype=torch.float64)

    def compute(self):
        cum_i, cum_u, sum_iou, n = self.sums[:4].tolist()
        if n == 0:
            raise ValueError("ReferMetric.compute(): no sentence was seen")
        out = {"oIoU": 100 * cum_i / cum_u if cum_u > 0 else math.nan, "mIoU": 100 * sum_iou / n}
        for t, hits in zip(self.THRESHOLDS, self.sums[4:].tolist()):
            out[f"P@{t}"] = 100 * hits / n
        return out


def json_ready(x):
    """`x` with every NaN float (e.g. the IoU of a class never seen) as None: JSON has no NaN, and strict
    readers refuse Python's bare `NaN`."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x
