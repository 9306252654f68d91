import math
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vpd.metrics import DepthMetric, ReferMetric, SegMetric
from vpd.sampler import ShardedEvalSampler

approx = pytest.approx


# ---------------------------------------------------------------- segmentation

def test_seg_hand_computed_with_ignore_and_absent_class():
    label = torch.tensor([[[0, 0, 1, 255], [1, 1, 255, 255]]])
    pred = torch.tensor([[[0, 1, 1, 2], [1, 0, 0, 0]]])  # the only 2 falls on an ignored pixel
    m = SegMetric(3)
    m.update(pred, label)
    r = m.compute()
    # kept pixels (label, pred): (0,0) (0,1) (1,1) (1,1) (1,0)
    # class 0: I 1, pred 2, label 2 -> U 3;  class 1: I 2, pred 3, label 3 -> U 4;  class 2: nowhere
    assert r["IoU"][0] == approx(100 / 3) and r["IoU"][1] == approx(50)
    assert math.isnan(r["IoU"][2]) and math.isnan(r["Acc"][2])
    assert r["Acc"][0] == approx(50) and r["Acc"][1] == approx(200 / 3)
    assert r["mIoU"] == approx(100 * 5 / 12)
    assert r["mAcc"] == approx(100 * 7 / 12)
    assert r["aAcc"] == approx(60)


def test_seg_class_predicted_but_not_in_ground_truth_counts_as_zero_iou():
    m = SegMetric(3)
    m.update(torch.tensor([[[0, 0], [0, 2]]]), torch.tensor([[[0, 0], [0, 0]]]))
    r = m.compute()
    assert r["IoU"][0] == approx(75) and r["IoU"][2] == 0 and math.isnan(r["IoU"][1])
    assert r["mIoU"] == approx(37.5)  # (75 + 0) / 2: class 1 excluded, class 2 included
    assert r["mAcc"] == approx(75) and math.isnan(r["Acc"][2])  # no ground truth: no accuracy
    assert r["aAcc"] == approx(75)


def test_seg_accumulates_over_the_set_not_per_image():
    # image 1: class 0 perfect on 1 pixel; image 2: class 0 wrong on 3 pixels. Per-image IoU of class 0
    # would average (1 + 0) / 2; over the set it is I 1 / U 4.
    m = SegMetric(2)
    m.update(torch.tensor([[[0]]]), torch.tensor([[[0]]]))
    m.update(torch.tensor([[[1, 1, 1]]]), torch.tensor([[[0, 0, 0]]]))
    assert m.compute()["IoU"][0] == approx(25)


def test_seg_perfect_prediction():
    label = torch.randint(0, 5, (2, 7, 9))
    m = SegMetric(5)
    m.update(label.clone(), label)
    r = m.compute()
    assert r["mIoU"] == approx(100) and r["aAcc"] == approx(100) and r["mAcc"] == approx(100)


def test_seg_rejects_bad_input():
    m = SegMetric(3)
    with pytest.raises(ValueError, match=r"label holds ids \[7\]"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [255, 1]]]))
    with pytest.raises(ValueError, match="pred holds ids"):
        m.update(torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class maps"):
        m.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class maps"):  # a float label map (e.g. not yet .long())
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="integer class maps"):  # a bool mask is not a class map
        m.update(torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="must have 3 dims"):  # one map needs its batch axis
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in shape"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no labelled pixel"):
        m.compute()
    with pytest.raises(ValueError, match="real class id"):
        SegMetric(300, ignore_index=255)


def test_seg_ignore_index_just_past_the_classes():
    # ignore_index == num_classes is no class id, so it is a valid ignore label
    m = SegMetric(3, ignore_index=3)
    m.update(torch.tensor([[[0, 2, 1]]]), torch.tensor([[[0, 3, 1]]]))
    assert m.compute()["aAcc"] == 100


def np_seg_reference(preds, labels, n, ignore=255):
    """mmseg's numbers through a confusion matrix."""
    cm = np.zeros((n, n), dtype=np.int64)
    for p, l in zip(preds, labels):
        keep = l != ignore
        np.add.at(cm, (l[keep], p[keep]), 1)
    inter = np.diag(cm).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (cm.sum(0) + cm.sum(1) - inter)
        acc = inter / cm.sum(1)
    return {"aAcc": 100 * inter.sum() / cm.sum(), "mIoU": 100 * np.nanmean(iou), "mAcc": 100 * np.nanmean(acc),
            "IoU": 100 * iou}


def test_seg_matches_numpy_confusion_matrix_on_random_data():
    g = torch.Generator().manual_seed(0)
    n = 6
    preds = [torch.randint(0, n - 1, (2, 13, 17), generator=g) for _ in range(4)]  # never predicts 5
    labels = [torch.randint(0, n - 2, (2, 13, 17), generator=g) for _ in range(4)]  # never labels 4, 5
    for l in labels:
        l[torch.rand(l.shape, generator=g) < 0.2] = 255
    m = SegMetric(n)
    for p, l in zip(preds, labels):
        m.update(p, l)
    r = m.compute()
    ref = np_seg_reference([p.numpy() for p in preds], [l.numpy() for l in labels], n)
    for k in ("aAcc", "mIoU", "mAcc"):
        assert r[k] == approx(ref[k], rel=1e-12)
    np.testing.assert_allclose(r["IoU"], ref["IoU"], rtol=1e-12)
    assert math.isnan(r["IoU"][5]) and r["IoU"][4] == 0


# ---------------------------------------------------------------- depth

def test_depth_hand_computed_and_averaged_per_image():
    m = DepthMetric(crop=None)
    m.update(torch.tensor([[1.5, 4.0]]), torch.tensor([[1.0, 4.0]]))
    # image 2: the second gt pixel is 0 (no depth), so only a perfect pixel counts
    m.update(torch.tensor([[2.0, 5.0]]), torch.tensor([[2.0, 0.0]]))
    r = m.compute()
    l = math.log(1.5)
    # image 1: ratio (1.5, 1): d1 1/2, d2 = d3 = 1 (1.5 < 1.5625); image 2: all perfect
    assert r["d1"] == approx((0.5 + 1) / 2) and r["d2"] == approx(1) and r["d3"] == approx(1)
    assert r["abs_rel"] == approx((0.25 + 0) / 2)  # pooled over the 3 pixels it would be 1/6
    assert r["sq_rel"] == approx((0.125 + 0) / 2)
    assert r["rmse"] == approx(math.sqrt(0.125) / 2)
    assert r["rmse_log"] == approx(l / math.sqrt(2) / 2)
    assert r["log10"] == approx(math.log10(1.5) / 2 / 2)
    # silog = sqrt(mean d^2 - 0.5 (mean d)^2) = sqrt(l^2/2 - l^2/8)
    assert r["silog"] == approx(l * math.sqrt(3 / 8) / 2)


def test_depth_valid_range_is_open():
    m = DepthMetric(min_depth=1e-3, max_depth=10.0, crop=None)
    # gt 10 and 1e-3 are excluded, so only the perfect middle pixel is evaluated
    m.update(torch.tensor([[1.0, 2.0, 1.0]]), torch.tensor([[10.0, 2.0, 1e-3]]))
    assert m.compute()["rmse"] == 0


def test_depth_thresholds_are_strict_at_exactly_1_25_powers():
    # VPD/GLPDepth: d_k = share of max(pred/gt, gt/pred) < 1.25^k; 1.25, 1.5625 and 1.953125 are exact floats
    m = DepthMetric(crop=None)
    m.update(torch.tensor([[1.25, 1.5625, 1.953125, 1.0]]), torch.ones(1, 4))
    r = m.compute()
    assert (r["d1"], r["d2"], r["d3"]) == (0.25, 0.5, 0.75)
    m = DepthMetric(crop=None)
    m.update(torch.ones(1, 3), torch.tensor([[1.25, 1.5625, 1.953125]]))  # gt/pred side of the max
    r = m.compute()
    assert (r["d1"], r["d2"], r["d3"]) == (0.0, 1 / 3, 2 / 3)

def test_depth_clamps_and_repairs_predictions():
    m = DepthMetric(min_depth=1e-3, max_depth=10.0, crop=None)
    m.update(torch.tensor([[20.0, math.inf, math.nan, -1.0, -math.inf]]), torch.full((1, 5), 5.0))
    # predictions become 10, 10, 1e-3, 1e-3, 1e-3 (-inf lies below the range: clamped up, as BTS)
    assert m.compute()["abs_rel"] == approx((1 + 1 + 3 * (5 - 1e-3) / 5) / 5)


def test_depth_defaults_are_the_nyu_protocol():
    # NYUv2: depths scored in (1e-3, 10) m inside the Eigen crop; eval.py relies on the min_depth default
    m = DepthMetric()
    assert (m.min_depth, m.max_depth, m.crop) == (1e-3, 10.0, "eigen")
    with pytest.raises(ValueError, match="min_depth < max_depth"):  # an empty range scores nothing
        DepthMetric(min_depth=5.0, max_depth=5.0)


def test_nyu_eigen_crop_excludes_a_corrupted_border():
    gt = torch.full((480, 640), 2.0)
    pred = torch.full((480, 640), 9.0)  # wrong everywhere ...
    pred[45:471, 41:601] = 2.0  # ... except inside the crop
    m = DepthMetric(crop="eigen")
    m.update(pred, gt)
    r = m.compute()
    assert r["rmse"] == 0 and r["d1"] == 1
    m = DepthMetric(crop=None)
    m.update(pred, gt)
    assert m.compute()["rmse"] > 0.5
    mask = DepthMetric(crop="eigen").crop_mask(480, 640)
    assert mask.sum() == 426 * 560
    assert mask[45, 41] and mask[470, 600] and not mask[44, 41] and not mask[471, 600] and not mask[45, 40] \
        and not mask[45, 601]
    with pytest.raises(ValueError, match="480x640"):
        DepthMetric(crop="eigen").crop_mask(352, 1216)


def test_kitti_garg_crop_on_a_kitti_sized_map():
    mask = DepthMetric(max_depth=80, crop="garg").crop_mask(375, 1242)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    # 0.40810811*375 = 153.04, 0.99189189*375 = 371.96, 0.03594771*1242 = 44.65, 0.96405229*1242 = 1197.35
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (153, 371, 44, 1197)
    mask = DepthMetric(max_depth=80, crop="kitti_eigen").crop_mask(375, 1242)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    assert (rows[0], rows[-1] + 1) == (124, 342)  # 0.3324324*375 = 124.66, 0.91351351*375 = 342.57
    assert (cols[0], cols[-1] + 1) == (44, 1197)  # 0.0359477*1242 = 44.65, 0.96405229*1242 = 1197.35


def test_depth_rejects_bad_input():
    with pytest.raises(ValueError, match="no valid ground-truth pixel"):
        DepthMetric(crop=None).update(torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown crop"):
        DepthMetric(crop="kitti")
    with pytest.raises(ValueError, match="no image"):
        DepthMetric().compute()
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        DepthMetric(crop=None).update(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"region must be a bool \(2, 3\) mask"):
        DepthMetric(crop=None).update(torch.ones(2, 3), torch.ones(2, 3), region=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"region must be a bool \(2, 3\) mask"):  # 0/1 ints would index rows
        DepthMetric(crop=None).update(torch.ones(2, 3), torch.ones(2, 3), region=torch.ones(2, 3, dtype=torch.long))


def test_depth_region_replaces_the_crop():
    gt = torch.ones(4, 6)
    pred = torch.full((4, 6), 2.0)
    pred[:, :2] = 1.0  # exact in the first two columns only
    region = torch.zeros(4, 6, dtype=torch.bool)
    region[:, :2] = True
    m = DepthMetric(crop=None)
    m.update(pred, gt, region=region)
    assert m.compute()["abs_rel"] == 0


def np_depth_reference(pred, gt, lo, hi):
    """VPD's nine metrics of one image, written with numpy."""
    pred = np.clip(pred, lo, hi)
    v = (gt > lo) & (gt < hi)
    p, g = pred[v], gt[v]
    t = np.maximum(p / g, g / p)
    e = np.log(p) - np.log(g)
    return np.array([np.mean(t < 1.25), np.mean(t < 1.5625), np.mean(t < 1.953125),
                     np.mean(np.abs(p - g) / g), np.mean((p - g) ** 2 / g), np.sqrt(np.mean((p - g) ** 2)),
                     np.sqrt(np.mean(e ** 2)), np.mean(np.abs(np.log10(p) - np.log10(g))),
                     np.sqrt(np.mean(e ** 2) - 0.5 * np.mean(e) ** 2)])


def test_depth_matches_numpy_on_random_batches():
    g = torch.Generator().manual_seed(1)
    gt = torch.rand(5, 1, 24, 32, generator=g) * 12  # some pixels beyond max_depth
    pred = (gt * torch.exp(0.3 * torch.randn(gt.shape, generator=g))).float()
    m = DepthMetric(crop=None)
    m.update(pred[:2], gt[:2])
    m.update(pred[2:], gt[2:])
    r = m.compute()
    ref = np.mean([np_depth_reference(pred[i, 0].double().numpy(), gt[i, 0].double().numpy(), 1e-3, 10.0)
                   for i in range(5)], axis=0)
    names = ["d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"]
    np.testing.assert_allclose([r[k] for k in names], ref, rtol=1e-10)


# ---------------------------------------------------------------- referring segmentation

def test_refer_hand_computed_with_empty_masks():
    pred = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 1]], [[1, 0], [0, 0]]]).bool()
    gt = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 1]]]).bool()
    m = ReferMetric()
    m.update(pred, gt)
    r = m.compute()
    # IoU per sentence: 1/2, 0 (empty union counts as 0), 1, 0
    assert r["oIoU"] == approx(100 * 5 / 8)
    assert r["mIoU"] == approx(100 * 1.5 / 4)
    assert r["P@0.5"] == approx(50)  # IoU exactly 0.5 is a hit: LAVT compares with >=
    assert r["P@0.6"] == r["P@0.7"] == r["P@0.8"] == r["P@0.9"] == approx(25)


def test_refer_threshold_is_inclusive_at_0_7():
    gt = torch.zeros(1, 1, 10, dtype=torch.bool)
    gt[..., :7] = True
    m = ReferMetric()
    m.update(torch.ones(1, 1, 10, dtype=torch.bool), gt)  # I 7 / U 10
    r = m.compute()
    assert r["P@0.7"] == 100 and r["P@0.8"] == 0 and r["oIoU"] == approx(70)


def test_refer_rejects_non_bool_masks():
    with pytest.raises(ValueError, match="bool masks"):
        ReferMetric().update(torch.ones(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.bool))
    # one (H, W) mask would be read as H sentences of one row each
    with pytest.raises(ValueError, match="must have 3 dims"):
        ReferMetric().update(torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool))


def test_refer_all_empty_unions_give_nan_oiou():
    # sum I / sum U is 0/0 when every sentence has both masks empty: undefined, not 0
    m = ReferMetric()
    m.update(torch.zeros(2, 3, 3, dtype=torch.bool), torch.zeros(2, 3, 3, dtype=torch.bool))
    r = m.compute()
    assert math.isnan(r["oIoU"]) and r["mIoU"] == 0 and r["P@0.5"] == 0


def test_refer_matches_numpy_loop_on_random_masks():
    g = torch.Generator().manual_seed(2)
    pred = torch.rand(12, 9, 11, generator=g) < 0.5
    gt = torch.rand(12, 9, 11, generator=g) < 0.4
    gt[3] = False
    pred[3] = False  # one sentence with both masks empty
    m = ReferMetric()
    m.update(pred[:5], gt[:5])
    m.update(pred[5:], gt[5:])
    r = m.compute()
    ious, ci, cu = [], 0, 0
    for p, t in zip(pred.numpy(), gt.numpy()):
        i, u = np.logical_and(p, t).sum(), np.logical_or(p, t).sum()
        ious.append(i / u if u else 0.0)
        ci, cu = ci + i, cu + u
    assert r["oIoU"] == approx(100 * ci / cu) and r["mIoU"] == approx(100 * np.mean(ious))
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert r[f"P@{t}"] == approx(100 * np.mean(np.array(ious) >= t))


# ---------------------------------------------------------------- sharding and reduction

@pytest.mark.parametrize("n,world", [(0, 1), (1, 3), (5, 2), (7, 3), (10, 4), (3, 8), (654, 8)])
def test_sharded_sampler_covers_every_index_once(n, world):
    shards = [list(ShardedEvalSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ShardedEvalSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]


def test_sharded_sampler_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank 2, world 2"):
        ShardedEvalSampler(5, 2, 2)


def test_reduce_without_distributed_is_identity_and_only_once():
    m = ReferMetric()
    m.update(torch.ones(1, 2, 2, dtype=torch.bool), torch.ones(1, 2, 2, dtype=torch.bool))
    m.reduce()
    assert m.compute()["mIoU"] == 100
    with pytest.raises(RuntimeError, match="already called"):
        m.reduce()
    with pytest.raises(RuntimeError, match="after reduce"):
        m.update(torch.ones(1, 2, 2, dtype=torch.bool), torch.ones(1, 2, 2, dtype=torch.bool))


def _eval_set():
    """Five samples (an odd count: shards of 3 and 2) of segmentation, depth and referring data."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(5):
        label = torch.randint(0, 4, (1, 6, 8), generator=g)
        label[:, 0] = 255
        gt = torch.rand(6, 8, generator=g) * 10
        out.append((torch.randint(0, 4, (1, 6, 8), generator=g), label,
                    gt + torch.randn(6, 8, generator=g).abs(), gt,
                    torch.rand(2, 6, 8, generator=g) < 0.5, torch.rand(2, 6, 8, generator=g) < 0.5))
    return out


def _evaluate(indices, reduce):
    seg, depth, refer = SegMetric(4), DepthMetric(crop=None), ReferMetric()
    data = _eval_set()
    for i in indices:
        p, l, dp, dg, rp, rg = data[i]
        seg.update(p, l)
        depth.update(dp, dg)
        refer.update(rp, rg)
    if reduce:
        for m in (seg, depth, refer):
            m.reduce()
    return seg.compute(), depth.compute(), refer.compute()


def spawn(fn, *args, nprocs=2, seconds=120):
    """mp.spawn(fn, (nprocs, *args)) with a deadline: processes stuck in a collective or at exit fail the
    test instead of hanging the suite."""
    ctx = mp.start_processes(fn, args=(nprocs, *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=1):  # True once all have exited; raises if one failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__}: {nprocs} processes not done after {seconds} s")


def init_gloo(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a collective a rank never joins fails, not hangs


def _dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    init_gloo(rank, world, init_file)
    try:
        result = _evaluate(ShardedEvalSampler(5), reduce=True)  # rank/world read from torch.distributed
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_reduce_equals_one_process(tmp_path):
    spawn(_dist_worker, str(tmp_path / "init"), str(tmp_path))
    single = _evaluate(range(5), reduce=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for g, s in zip(got, single):
            assert g.keys() == s.keys()
            for k in s:
                np.testing.assert_allclose(g[k], s[k], rtol=1e-12, err_msg=k)


def _dist_helpers_worker(rank, world, init_file, out_dir):
    from vpd import dist as vdist
    torch.set_num_threads(1)
    init_gloo(rank, world, init_file)
    try:
        got = dict(rank=vdist.rank(), world=vdist.world_size(), gathered=vdist.gather_objects({"rank": rank, "rng": [rank] * 3}),
                   mean=vdist.mean_over_ranks(float(10 * rank + 1), torch.device("cpu")))
        vdist.barrier()
        torch.save(got, f"{out_dir}/helpers{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_dist_helpers(tmp_path):
    # train.py logs the loss of the global batch (mean over ranks) and saves every rank's own RNG state
    from vpd import dist as vdist
    assert vdist.gather_objects("x") == ["x"] and vdist.mean_over_ranks(3.0, "cpu") == 3.0 and vdist.rank() == 0
    spawn(_dist_helpers_worker, str(tmp_path / "init"), str(tmp_path))
    for rank in range(2):
        got = torch.load(tmp_path / f"helpers{rank}.pt")
        assert got["rank"] == rank and got["world"] == 2 and got["mean"] == 6.0  # (1 + 11) / 2
        assert got["gathered"] == [{"rank": 0, "rng": [0, 0, 0]}, {"rank": 1, "rng": [1, 1, 1]}]
