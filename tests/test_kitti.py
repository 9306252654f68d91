"""KITTI depth end to end: a small Eigen-split layout, training, evaluation and prediction."""
import json

import numpy as np
import pytest
from PIL import Image

import predict
import train
from vpd.data import KITTI, KITTI_SCENES
from vpd.demo import write_random_sd

H, W = 375, 1242  # a KITTI frame
DRIVE = "2011_09_26_drive_0002_sync"


def kitti_layout(root, n):
    img_dir = root / "2011_09_26" / DRIVE / "image_02" / "data"
    gt_dir = root / "data_depth_annotated" / "train" / DRIVE / "proj_depth" / "groundtruth" / "image_02"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = f"{i:010d}.png"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img_dir / name)
        depth = np.zeros((H, W), np.uint16)
        depth[::3, ::3] = rng.integers(256, 60 * 256, depth[::3, ::3].shape)  # sparse lidar-like points
        Image.fromarray(depth).save(gt_dir / name)
        lines.append(f"2011_09_26/{DRIVE}/image_02/data/{name} {DRIVE}/proj_depth/groundtruth/image_02/{name} 721.5\n")
    (root / "train_list.txt").write_text("".join(lines[:-1]))
    (root / "test_list.txt").write_text(lines[-1])
    return root


def test_kitti_samples_carry_the_single_scene(tmp_path):
    ds = KITTI(str(kitti_layout(tmp_path, 2)), "test", train=False)
    assert ds[0]["scene_id"] == 0 and ds[0]["scene"] == KITTI_SCENES[0]


def test_kitti_trains_on_the_square_windows_it_is_tested_with_and_is_scored_in_the_garg_crop(tmp_path):
    from vpd.data import KB_CROP
    from vpd.tasks import datasets, depth_crop
    train_set, _ = datasets("depth", str(kitti_layout(tmp_path, 2)), 352, dataset="kitti")
    assert train_set[0]["image"].shape[-2:] == (352, 352)  # the KB-cropped frame's height, square
    train_set, _ = datasets("depth", str(tmp_path), 480, dataset="kitti")  # NYU's 480 crop asked: capped at 352
    assert train_set[0]["image"].shape[-2:] == (352, 352)
    assert depth_crop("depth", "kitti", demo=False) == "garg" and depth_crop("depth", "nyu", demo=False) == "eigen"
    assert predict.default_size("depth", {"dataset": "kitti", "args": {"crop": 352}}) == KB_CROP[1] == 1216


def test_kitti_trains_evaluates_and_predicts(tmp_path, monkeypatch):
    import vpd.tasks
    root = kitti_layout(tmp_path / "kitti", 5)
    sd = write_random_sd(str(tmp_path / "sd.safetensors"))
    out = tmp_path / "run"
    calls, evaluate, depth_crop = [], train.evaluate, vpd.tasks.depth_crop

    def recording(model, *args, **kwargs):
        calls.append(kwargs)
        return evaluate(model, *args, **kwargs)
    monkeypatch.setattr(train, "evaluate", recording)
    # scored as a real (not --demo) KITTI run is: in the Garg crop, up to 80 m
    monkeypatch.setattr(vpd.tasks, "depth_crop", lambda task, dataset, demo: depth_crop(task, dataset, False))
    train.main(train.get_args(["--demo", "--task", "depth", "--dataset", "kitti", "--sd-ckpt", sd,
                               "--data-root", str(root), "--out", str(out), "--crop", "64", "--iters", "2",
                               "--batch-size", "2", "--workers", "0", "--text-cache", str(tmp_path / "cache")]))
    assert calls[0]["depth_crop"] == "garg" and calls[0]["max_depth"] == 80.0  # the model's evaluation
    assert len(calls) == 2 and calls[1] == calls[0]  # the demo's baseline, scored on the same pixels
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["rmse"]) and np.isfinite(metrics["d1"])
    from safetensors.torch import load_file
    assert load_file(str(out / "model.safetensors"))["class_embeddings"].shape[0] == len(KITTI_SCENES) == 1
    photo = tmp_path / "street.png"
    Image.fromarray(np.full((90, 300, 3), 128, np.uint8)).save(photo)
    ckpt = str(out / "model.safetensors")
    windows, depth_predict = [], predict.depth_predict

    def recording_windows(*args, **kwargs):
        windows.append((tuple(args[1].shape[-2:]), kwargs["windows"]))
        return depth_predict(*args, **kwargs)
    monkeypatch.setattr(predict, "depth_predict", recording_windows)
    predict.main(predict.get_args([str(photo), "--ckpt", ckpt, "--out", str(tmp_path / "pred")]))
    # at the width of KITTI's frames, from which the 64 crops were cut unscaled; in square windows as trained
    assert windows == [((365, 1216), 4)]
    depth = np.asarray(Image.open(tmp_path / "pred" / "street_depth.png"))
    assert depth.shape == (90, 300) and depth.dtype == np.uint16
    assert 0 < depth.max() <= 80 * 256  # a KITTI model (80 m) writes 1/256 m units
    with pytest.raises(SystemExit, match="KITTI model"):
        predict.main(predict.get_args([str(photo), "--ckpt", ckpt, "--scene", "kitchen", "--out", str(tmp_path / "p2")]))


def test_eval_of_a_kitti_model_reads_kitti_in_the_garg_crop_up_to_80_m(tmp_path, monkeypatch):
    # eval.py without --dataset: the checkpoint's dataset, its Garg crop and its 80 m cap (not NYU's 10 m)
    import torch

    import eval as eval_script
    import vpd.tasks
    root = kitti_layout(tmp_path, 2)
    model = torch.nn.Identity()
    model.max_depth = 80.0
    meta = dict(task="depth", demo=False, dataset="kitti", depth_crop="garg", sd_ckpt="sd.safetensors")
    monkeypatch.setattr(vpd.tasks, "load_model", lambda *a: (model, meta))
    ev = vpd.tasks.build_eval(eval_script.get_args(["--ckpt", "model.safetensors", "--data-root", str(root)]),
                              torch.device("cpu"))
    assert isinstance(ev.dataset, KITTI) and ev.dataset_name == "kitti"
    assert ev.depth_crop == "garg" and ev.max_depth == 80.0


def test_eval_says_how_many_listed_frames_have_no_ground_truth(tmp_path, monkeypatch, capsys):
    # BTS's Eigen test list names some frames with 'None' for depth: scored on the rest, and said so
    import eval as eval_script
    import vpd.tasks
    from vpd.tasks import ConstantDepth
    root = kitti_layout(tmp_path, 3)
    with open(root / "test_list.txt", "a") as f:
        f.write(f"2011_09_26/{DRIVE}/image_02/data/0000000000.png None 721.5\n")
    model = ConstantDepth(20.0)
    model.max_depth = 80.0
    meta = dict(task="depth", demo=False, dataset="kitti", depth_crop="garg", sd_ckpt="sd.safetensors")
    monkeypatch.setattr(vpd.tasks, "load_model", lambda *a: (model, meta))
    # no file: load_model is the stand-in
    monkeypatch.setattr(eval_script, "checkpoint_task", lambda ckpt, task: ("depth", meta))
    eval_script.main(eval_script.get_args(["--ckpt", str(tmp_path / "model.safetensors"), "--data-root", str(root),
                                           "--workers", "0"]))
    out = capsys.readouterr().out
    assert "depth on 1 samples" in out and "; 1 listed without ground truth left out" in out
    saved = json.loads((tmp_path / "eval" / "metrics_kitti_test.json").read_text())
    assert saved["samples"] == 1
