"""The evaluation loop of eval.py (`evaluate`): fake models and crafted samples with metrics by hand."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eval import evaluate, format_metrics
from vpd.metrics import NYU_EIGEN_CROP
from vpd.tasks import ConstantClass, ConstantDepth

CPU = torch.device("cpu")


def run(model, task, samples, **kw):
    return evaluate(model, task, samples, CPU, workers=0, **kw)


# ----------------------------------------------------------------------------- semseg

K = 4


class LabelFromImage(nn.Module):
    """Pointwise fake: class round(10 * channel 0), so the image can carry the answer."""
    num_classes = K

    def forward(self, x):
        cls = (x[:, 0] * 10).round().long().clamp(0, K - 1)
        return 10.0 * F.one_hot(cls, K).permute(0, 3, 1, 2).float()


def seg_sample(label, index, pred=None):
    pred = label.clamp(max=K - 1) if pred is None else pred  # ignore pixels (255) -> class 3 in the image
    image = torch.stack([pred.float() / 10, torch.zeros_like(label, dtype=torch.float32),
                         torch.zeros_like(label, dtype=torch.float32)])
    return {"image": image, "label": label, "index": index}


def seg_labels():
    a = torch.ones(4, 4, dtype=torch.int64)
    a[:, 2:] = 2
    b = torch.ones(4, 4, dtype=torch.int64)
    b[0] = 255  # an ignored row
    return a, b


def test_semseg_ground_truth_model_is_perfect_and_ignore_is_ignored():
    a, b = seg_labels()
    wrong_on_ignored = b.clamp(max=K - 1)  # predicts class 3 on the ignored row
    m = run(LabelFromImage(), "semseg", [seg_sample(a, 0), seg_sample(b, 1, wrong_on_ignored)])
    assert m["mIoU"] == 100 and m["aAcc"] == 100 and m["mAcc"] == 100
    assert math.isnan(m["IoU"][0]) and math.isnan(m["IoU"][3])  # in neither ground truth nor prediction


def test_semseg_constant_model_by_hand():
    a, b = seg_labels()
    m = run(ConstantClass(K, 1), "semseg", [seg_sample(a, 0), seg_sample(b, 1)])
    # class 1: I = 8 + 12, label area 20, predicted area 16 + 12 (ignored row excluded) -> U = 28
    # class 2: I = 0, U = 8 (its label area)
    assert m["IoU"][1] == pytest.approx(100 * 20 / 28) and m["IoU"][2] == 0
    assert m["mIoU"] == pytest.approx(100 * (20 / 28) / 2)
    assert m["aAcc"] == pytest.approx(100 * 20 / 28)
    assert m["mAcc"] == pytest.approx(50.0)


def test_semseg_label_at_another_size_than_the_image():
    # ADE20K's evaluation view: the image is resized, the label stays at the original size
    label = torch.ones(6, 10, dtype=torch.int64)
    image = torch.full((3, 12, 20), 0.1)  # class 1 everywhere, at twice the size
    m = run(LabelFromImage(), "semseg", [{"image": image, "label": label, "index": 0}])
    assert m["mIoU"] == 100


def test_semseg_ms_flip_is_vpds_five_scales_each_flipped():
    # VPD's --aug-test: the dataset's views at ratios 1.0, 1.125, 1.25, 1.375, 1.5, each plain and flipped
    calls = []

    class Recorder(LabelFromImage):
        def forward(self, x):
            # each image's width (channel 2 is 1 on it, 0 on the padding); channel 1 marks its left edge
            calls.extend((int((w[2, 0] != 0).sum()), bool(w[1, 0, 0] == 0)) for w in x)
            return super().forward(x)

    def view(side):
        image = seg_sample(torch.ones(side, side, dtype=torch.int64), 0)["image"]
        image[1, :, 0] = 1.0
        image[2] = 1.0
        return image
    sample = dict(seg_sample(torch.ones(64, 64, dtype=torch.int64), 0), image=view(64),
                  ms_images=[view(side) for side in (64, 72, 80, 88, 96)])  # as ADE20K(ms_ratios=...) gives
    m = run(Recorder(), "semseg", [sample], ms_flip=True)
    assert m["mIoU"] == 100
    assert sorted(calls) == sorted((w, flipped) for w in (64, 72, 80, 88, 96) for flipped in (False, True))
    calls.clear()
    run(Recorder(), "semseg", [sample])  # single scale, no flip: the headline protocol
    assert calls == [(64, False)]
    del sample["ms_images"]
    with pytest.raises(ValueError, match="no multi-scale views"):
        run(Recorder(), "semseg", [sample], ms_flip=True)


def test_evaluate_leaves_the_models_mode_as_it_was():
    for training in (True, False):
        model = ConstantClass(K, 1).train(training)
        a, _ = seg_labels()
        run(model, "semseg", [seg_sample(a, 0)])
        assert model.training is training


def test_semseg_max_samples_counts_only_those():
    a, b = seg_labels()
    m = run(ConstantClass(K, 1), "semseg", [seg_sample(a, 0), seg_sample(b, 1)], max_samples=1)
    assert m["IoU"][1] == pytest.approx(100 * 8 / 16)  # image a only: I 8, U 16


# ----------------------------------------------------------------------------- depth

class DepthFromImage(nn.Module):
    """Pointwise fake: depth = 5 * (channel 0 + 1)."""

    def forward(self, x, scene_ids):
        return 5 * (x[:, :1] + 1)


def depth_sample(gt, pred, index=0):
    image = (pred / 5 - 1).expand(3, -1, -1).clone()
    return {"image": image, "depth": gt[None].clone(), "scene_id": 0, "index": index}


def test_nyu_depth_takes_vpds_two_windows_and_their_flips():
    # VPD's NYU test (shift_window_test, flip_test): one forward of 480x480 windows at x = 0 and x = 160,
    # then the same two flipped; channel 1 carries x / 1000, so a window's first column names its start
    seen = []

    class Recorder(DepthFromImage):
        def forward(self, x, scene_ids):
            seen.append([(tuple(v.shape[-2:]), round(1000 * float(v[1, 0, 0]))) for v in x])
            return super().forward(x, scene_ids)
    sample = depth_sample(torch.full((480, 640), 5.0), torch.full((480, 640), 5.0))
    sample["image"][1] = torch.arange(640.0) / 1000
    m = run(Recorder(), "depth", [sample], depth_crop=None)
    assert seen == [[((480, 480), 0), ((480, 480), 160), ((480, 480), 479), ((480, 480), 639)]]
    assert m["abs_rel"] < 1e-6
    seen.clear()
    run(Recorder(), "depth", [sample], depth_crop=None, flip=False)  # eval.py --no-flip: the windows alone
    assert seen == [[((480, 480), 0), ((480, 480), 160)]]


def test_depth_eigen_crop_and_invalid_pixels():
    torch.manual_seed(0)
    gt = 0.5 + 9 * torch.rand(480, 640)
    pred = gt.clone()
    t, b, l, r = NYU_EIGEN_CROP
    pred[:t] = pred[b:] = 9.9  # wrong outside the Eigen crop only
    pred[:, :l] = pred[:, r:] = 9.9
    gt[100:120, 100:140] = 0  # no measurement: a wrong prediction there does not count
    pred[100:120, 100:140] = 0.01
    m = run(DepthFromImage(), "depth", [depth_sample(gt, pred)], depth_crop="eigen")
    assert m["d1"] == 1 and m["abs_rel"] < 1e-5 and m["rmse"] < 1e-4
    m = run(DepthFromImage(), "depth", [depth_sample(gt, pred)], depth_crop=None)
    assert m["d1"] < 0.9 and m["rmse"] > 1  # the same prediction without the crop


def test_depth_constant_model_by_hand():
    gt = torch.ones(32, 48)
    gt[:, 24:] = 2.0
    m = run(ConstantDepth(1.5), "depth", [depth_sample(gt, gt)], depth_crop=None)
    lg = [math.log(1.5), math.log(0.75)]  # log pred - log gt on the two halves
    assert m["d1"] == 0 and m["d2"] == 1 and m["d3"] == 1  # ratios 1.5 and 4/3
    assert m["abs_rel"] == pytest.approx((0.5 + 0.25) / 2)
    assert m["sq_rel"] == pytest.approx((0.25 + 0.125) / 2)
    assert m["rmse"] == pytest.approx(0.5)
    assert m["rmse_log"] == pytest.approx(math.sqrt((lg[0] ** 2 + lg[1] ** 2) / 2))
    assert m["log10"] == pytest.approx((abs(math.log10(1.5)) + abs(math.log10(0.75))) / 2)
    mean_sq, mean = (lg[0] ** 2 + lg[1] ** 2) / 2, (lg[0] + lg[1]) / 2
    assert m["silog"] == pytest.approx(math.sqrt(mean_sq - 0.5 * mean ** 2))


def test_depth_cap_is_the_models_max_depth():
    # KITTI's 80 m: depths beyond NYU's 10 m are scored, and only those below the cap
    gt = torch.full((32, 48), 20.0)
    gt[:, 24:] = 40.0
    gt[:, 40:] = 90.0  # beyond the cap: not scored
    m = run(ConstantDepth(20.0), "depth", [depth_sample(gt, gt)], depth_crop=None, max_depth=80.0)
    assert m["abs_rel"] == pytest.approx((24 * 0 + 16 * 0.5) / 40) and m["d1"] == pytest.approx(24 / 40)


def test_depth_baseline_is_the_mean_of_valid_pixels():
    from vpd.tasks import baseline_model
    a, b = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    a[0, 0, :2] = 2.0  # two measured pixels in one image, three in the other; zeros are no measurement
    b[0, 1, :3] = 7.0
    model, name = baseline_model("depth", [{"depth": a}, {"depth": b}])
    assert model.depth == pytest.approx((2 * 2 + 3 * 7) / 5) and name == "mean depth 5.000 m"


def test_depth_metrics_average_over_images():
    gt = torch.ones(32, 48)
    perfect = depth_sample(gt, gt)
    off = depth_sample(gt, 2 * gt, index=1)  # abs_rel 1, rmse 1 on this image
    m = run(DepthFromImage(), "depth", [perfect, off], depth_crop=None, flip=False)
    assert m["abs_rel"] == pytest.approx(0.5, abs=1e-6) and m["rmse"] == pytest.approx(0.5, abs=1e-6)
    assert m["d1"] == pytest.approx(0.5)


def test_kitti_garg_crop_is_taken_on_the_original_frame():
    # KITTI's eval view is the 352x1216 KB crop of a 375x1242 frame; BTS/VPD put the Garg crop at
    # fractions of the full frame: rows 153:371, cols 44:1197 there, i.e. rows 130:348, cols 31:1184 here
    gt = torch.full((352, 1216), 2.0)
    gt[130:348, 31:1184] = 1.0  # a constant 1 m prediction is exact inside the crop only
    sample = {"image": torch.zeros(3, 352, 1216), "depth": gt[None], "orig_size": torch.tensor([375, 1242]),
              "scene_id": 0, "index": 0}
    m = run(ConstantDepth(1.0), "depth", [sample], depth_crop="garg", max_depth=80.0)
    assert m["abs_rel"] == 0 and m["d1"] == 1
    gt[347, 600] = 2.0  # one pixel of the crop's last row
    m = run(ConstantDepth(1.0), "depth", [sample], depth_crop="garg", max_depth=80.0)
    assert m["abs_rel"] == pytest.approx(0.5 / (218 * 1153))


def test_kitti_eigen_crop_is_taken_on_the_original_frame():
    # KITTI's Eigen crop: rows 0.3324..0.9135, cols 0.0359..0.9641 of the 375x1242 frame = rows 124:342,
    # cols 44:1197 there; the KB crop starts at row 23, col 13: rows 101:319, cols 31:1184 of the map
    gt = torch.full((352, 1216), 2.0)
    gt[101:319, 31:1184] = 1.0
    sample = {"image": torch.zeros(3, 352, 1216), "depth": gt[None], "orig_size": torch.tensor([375, 1242]),
              "scene_id": 0, "index": 0}
    m = run(ConstantDepth(1.0), "depth", [sample], depth_crop="kitti_eigen", max_depth=80.0)
    assert m["abs_rel"] == 0 and m["d1"] == 1


# ----------------------------------------------------------------------------- refer

class MaskFromImage(nn.Module):
    """Fake: target where channel 0 > 0."""

    def forward(self, x, tokens):
        fg = (x[:, 0] > 0).float()
        return torch.stack([1 - fg, fg], 1) * 10


def refer_sample(gt, pred, index):
    image = torch.stack([pred.float() * 2 - 1] * 3)
    return {"image": image, "mask": gt.to(torch.uint8), "mask_resized": gt.to(torch.uint8),
            "tokens": torch.zeros(40, dtype=torch.long), "index": index}


def test_refer_metrics_by_hand():
    z = torch.zeros(16, 16, dtype=torch.bool)
    square = z.clone()
    square[4:12, 4:12] = True
    half = z.clone()
    half[4:12, 4:8] = True
    samples = [refer_sample(square, square, 0),  # IoU 1
               refer_sample(z, z, 1),  # both empty: IoU 0 (LAVT), nothing added to the sums
               refer_sample(square, half, 2)]  # IoU 32 / 64
    m = run(MaskFromImage(), "refer", samples)
    assert m["oIoU"] == pytest.approx(100 * (64 + 32) / (64 + 64))
    assert m["mIoU"] == pytest.approx(100 * 1.5 / 3)
    assert m["P@0.5"] == pytest.approx(100 * 2 / 3)
    assert all(m[f"P@{t}"] == pytest.approx(100 / 3) for t in (0.6, 0.7, 0.8, 0.9))


def test_refer_scores_at_input_size_unless_full_res():
    gt = torch.zeros(16, 16, dtype=torch.bool)
    gt[:, :8] = True
    sample = refer_sample(gt, gt, 0)
    big = torch.zeros(32, 32, dtype=torch.uint8)
    big[:, :4] = 1  # the original-size mask disagrees with the prediction
    sample["mask"] = big
    assert run(MaskFromImage(), "refer", [sample])["oIoU"] == pytest.approx(100)
    m = run(MaskFromImage(), "refer", [sample], refer_full_res=True)
    assert m["oIoU"] == pytest.approx(100 * 4 / 16)  # prediction upsampled: left half; truth: left 4 columns


def test_refer_whole_image_baseline():
    square = torch.zeros(16, 16, dtype=torch.bool)
    square[:4] = True
    m = run(ConstantClass(2, 1), "refer", [refer_sample(square, square, 0)])
    assert m["oIoU"] == pytest.approx(100 * 64 / 256)


def test_refer_baseline_model_takes_the_whole_image_as_the_target():
    from vpd.tasks import baseline_model
    model, name = baseline_model("refer", [])
    square = torch.zeros(16, 16, dtype=torch.bool)
    square[:4] = True
    m = run(model, "refer", [refer_sample(square, square, 0)])
    assert name == "whole image" and m["oIoU"] == pytest.approx(100 * 64 / 256)


# ----------------------------------------------------------------------------- visualisations, printing

def test_save_vis_writes_one_png_per_sample(tmp_path):
    a, b = seg_labels()
    run(LabelFromImage(), "semseg", [seg_sample(a, 3), seg_sample(b, 7)], save_vis=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["000003.png", "000007.png"]
    gt = torch.ones(32, 48)
    run(DepthFromImage(), "depth", [depth_sample(gt, gt, index=5)], depth_crop=None, save_vis=str(tmp_path / "d"))
    assert os.listdir(tmp_path / "d") == ["000005.png"]


def test_format_metrics_lists_seen_classes():
    text = format_metrics({"mIoU": 50.0, "IoU": [float("nan"), 25.0, 75.0]}, ["a", "b", "c"])
    assert "mIoU: 50.0000" in text and "2 classes seen" in text and "b: 25.00" in text and " a:" not in text


def test_semseg_windows_are_the_training_crop():
    # a 40x100 image with 32-pixel windows (stride 21): 2 rows x 5 columns, each window seen once
    sizes = []

    class Recorder(LabelFromImage):
        def forward(self, x):
            sizes.extend(tuple(w.shape[-2:]) for w in x)
            return super().forward(x)

    label = torch.ones(40, 100, dtype=torch.int64)
    m = run(Recorder(), "semseg", [seg_sample(label, 0)], seg_crop=32)
    assert m["mIoU"] == 100 and len(sizes) == 2 * 5  # (40-32+20)//21+1 = 2, (100-32+20)//21+1 = 5
    # where they lie, by mmseg's slide_inference: x1 = min(i * 21, 100 - 32), y1 = min(j * 21, 40 - 32)
    starts = []

    class Placed(LabelFromImage):  # channels 1 and 2 carry x / 1000 and y / 1000
        def forward(self, x):
            starts.extend((round(1000 * float(w[2, 0, 0])), round(1000 * float(w[1, 0, 0]))) for w in x)
            return super().forward(x)
    sample = seg_sample(label, 0)
    sample["image"][1], sample["image"][2] = torch.arange(100.0) / 1000, torch.arange(40.0)[:, None] / 1000
    run(Placed(), "semseg", [sample], seg_crop=32)
    assert sorted(starts) == [(y, x) for y in (0, 8) for x in (0, 21, 42, 63, 68)]
    sizes.clear()
    run(Recorder(), "semseg", [seg_sample(label, 0)])  # the paper's 512 window covers it whole
    assert len(sizes) == 1


def test_default_semseg_window_is_the_papers_512():
    # mmseg's slide test of VPD: 512x512 windows, stride 341; a 40x600 image takes two, at x = 0 and x = 88
    widths = []

    class Recorder(LabelFromImage):
        def forward(self, x):
            widths.extend(int((w[2, 0] != 0).sum()) for w in x)  # channel 2 is 1 on the image, 0 on the padding
            return super().forward(x)
    sample = seg_sample(torch.ones(40, 600, dtype=torch.int64), 0)
    sample["image"][2] = 1.0
    run(Recorder(), "semseg", [sample])
    assert widths == [512, 512]


def test_eval_main_hands_the_protocol_to_evaluate(tmp_path, monkeypatch):
    # eval.py passes on the checkpoint's crop, depth crop and cap, and the flags given; on a CPU it
    # evaluates in float32 unless --amp asks otherwise
    from types import SimpleNamespace

    import eval as eval_script
    calls = []
    (tmp_path / "model.safetensors").write_bytes(b"")  # (checkpoint_task and build_eval, which read it, are faked)

    def recording(model, task, dataset, device, autocast, max_samples, **kw):
        with autocast():
            kw["autocast"] = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        calls.append(dict(kw, max_samples=max_samples))
        return {"score": 1.0, "IoU": [50.0, float("nan")]}
    monkeypatch.setattr(eval_script, "evaluate", recording)
    for task, flags in (("depth", ["--no-flip"]), ("depth", []), ("semseg", ["--ms-flip", "--amp", "bf16"]),
                        ("refer", ["--refer-full-res"])):
        ev = SimpleNamespace(model=None, task=task, dataset=[0] * 5, data_root=str(tmp_path), sd_ckpt="/sd",
                             depth_crop="garg", max_depth=80.0, crop=64, dataset_name="x", split_by=None, split="y")
        monkeypatch.setattr(eval_script, "build_eval", lambda args, device, ev=ev: ev)
        monkeypatch.setattr(eval_script, "checkpoint_task", lambda ckpt, task, ev=ev: (ev.task, None))
        eval_script.main(eval_script.get_args(["--ckpt", str(tmp_path / "model.safetensors"), "--out", str(tmp_path),
                                               "--device", "cpu", *flags]))
    depth, flipped, semseg, refer = calls
    assert all(c["save_vis"] is None and c["max_samples"] is None for c in calls)
    assert flipped["flip"] and not depth["flip"]  # VPD's flip averaging unless --no-flip
    # --save-vis PNGs go into a folder per protocol, as the metrics files do: runs do not overwrite each other
    eval_script.main(eval_script.get_args(["--ckpt", str(tmp_path / "model.safetensors"), "--out", str(tmp_path),
                                           "--device", "cpu", "--save-vis", "--refer-full-res", "--max-samples", "3"]))
    assert calls[-1]["save_vis"] == str(tmp_path / "vis_x_y_fullres_first3") and calls[-1]["max_samples"] == 3
    assert os.path.isfile(tmp_path / "metrics_x_y_fullres_first3.json")
    eval_script.main(eval_script.get_args(["--ckpt", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "all"),
                                           "--device", "cpu", "--refer-full-res", "--max-samples", "1000"]))
    assert os.listdir(tmp_path / "all") == ["metrics_x_y_fullres.json"]  # all 5 of the set scored: no _first1000
    every = json.load(open(tmp_path / "all" / "metrics_x_y_fullres.json"))
    assert (every["max_samples"], every["samples"]) == (None, 5)
    # the files say what was run: flip only for depth (the others have no such option), the data and amp
    # (and per precision: bf16 in the name, float32 not)
    saved = {n: json.load(open(tmp_path / n)) for n in ("metrics_x_y_noflip.json", "metrics_x_y_msflip_bf16.json",
                                                       "metrics_x_y_fullres.json")}
    assert [m["flip"] for m in saved.values()] == [False, None, None]
    assert saved["metrics_x_y_msflip_bf16.json"]["IoU"] == [50.0, None]  # a class never seen: null, not bare NaN
    assert [m["amp"] for m in saved.values()] == ["off", "bf16", "off"]
    assert all(m["data_root"] == str(tmp_path) and m["samples"] == 5 and m["sd_ckpt"] == "/sd" for m in saved.values())
    assert depth["depth_crop"] == "garg" and depth["max_depth"] == 80.0 and not depth["flip"]
    assert semseg["seg_crop"] == 64 and semseg["ms_flip"] and not depth["ms_flip"]
    assert refer["refer_full_res"] and not semseg["refer_full_res"]
    assert depth["autocast"] is None and semseg["autocast"] == torch.bfloat16


def test_eval_refuses_an_out_it_cannot_write_before_loading_anything(tmp_path, monkeypatch):
    import eval as eval_script
    monkeypatch.setattr(eval_script, "build_eval", lambda args, device: pytest.fail("loaded before --out was checked"))
    (tmp_path / "file").write_text("")
    (tmp_path / "m.pth").write_bytes(b"PK\x03\x04")  # a released file's first bytes: only those would be read before
    with pytest.raises(SystemExit, match="is not writable"):
        eval_script.main(eval_script.get_args(["--ckpt", str(tmp_path / "m.pth"), "--task", "depth",
                                               "--out", str(tmp_path / "file" / "eval"), "--device", "cpu"]))
    # a flag of another task is refused before the default --out, eval/ beside the checkpoint, is made
    with pytest.raises(SystemExit, match="--ms-flip is only for the semseg task, not depth"):
        eval_script.main(eval_script.get_args(["--ckpt", str(tmp_path / "m.pth"), "--task", "depth", "--ms-flip",
                                               "--device", "cpu"]))
    assert not os.path.exists(tmp_path / "eval")


def test_eval_leaves_no_folder_beside_a_ckpt_that_is_not_there(tmp_path, monkeypatch):
    # the default --out is eval/ beside --ckpt: a mistyped path must not leave one behind
    import eval as eval_script
    monkeypatch.chdir(tmp_path)
    for ckpt, words in (("typo/model.safetensors", "no such file"), (".", "is a folder")):
        with pytest.raises(SystemExit, match=words):
            eval_script.main(eval_script.get_args(["--ckpt", ckpt, "--data-root", "x", "--device", "cpu"]))
    assert os.listdir(tmp_path) == []


def test_to_device_moves_the_multi_scale_views_too():
    from vpd.tasks import to_device
    batch = {"image": torch.zeros(1, 3, 4, 4), "ms_images": [torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 5, 5)],
             "path": ["a.jpg"]}
    moved = to_device(batch, torch.device("meta"))
    assert moved["image"].is_meta and all(v.is_meta for v in moved["ms_images"]) and moved["path"] == ["a.jpg"]
