import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vpd.data import NYU_SCENES
from vpd.synthetic import Obj, make_synthetic, render, scene_sample


def _room(objects=()):
    return dict(scene="kitchen", floor=1.5, ceiling=1.2, back=6.0, left=2.0, right=2.5,
                poster=(-5.0, -5.0), objects=list(objects))  # poster out of sight


def test_depth_of_planes_follows_the_pinhole_formula():
    h, w = 48, 64
    _, depth, classes, _ = render(_room(), 0.0, 0.0, h, w)
    f = 0.81 * w
    # Looking straight ahead, row v sees the floor at z = floor_height * f / (v + 0.5 - h/2).
    v = h - 1
    assert classes[v, w // 2] == 1
    assert depth[v, w // 2] == pytest.approx(1.5 * f / (v + 0.5 - h / 2), rel=1e-5)
    # The centre of the image sees the back wall at its distance.
    assert classes[h // 2, w // 2] == 0
    assert depth[h // 2, w // 2] == pytest.approx(6.0, rel=1e-5)
    # The left wall at x = -2: column u sees it at z = 2 f / (w/2 - u - 0.5) (row at the horizon).
    assert depth[h // 2, 0] == pytest.approx(min(2.0 * f / (w / 2 - 0.5), 6.0), rel=1e-5)


def test_sphere_on_the_axis_is_at_distance_minus_radius():
    sphere = Obj("sphere", "red", (0.0, 0.0, 3.0), (0.5,))
    _, depth, classes, inst = render(_room([sphere]), 0.0, 0.0, 48, 64)
    centre = depth[23:25, 31:33]
    assert np.all(inst[23:25, 31:33] == 1) and np.all(classes[23:25, 31:33] == 5)
    # The four central rays are (a, a, 1), a = 0.5 / f: |t (a, a, 1) - (0, 0, 3)| = 0.5 gives
    # (1 + 2a^2) t^2 - 6 t + 8.75 = 0; depth is the nearer root t (the ray's z is 1).
    f = 0.81 * 64
    q = 1 + 2 * (0.5 / f) ** 2
    np.testing.assert_allclose(centre, (3 - np.sqrt(9 - q * 8.75)) / q, rtol=1e-6)
    # the sphere's silhouette: angular radius asin(r / d) -> about f * tan(asin(0.5/3)) px
    width = (inst[24] == 1).sum()
    assert abs(width - 2 * f * np.tan(np.arcsin(0.5 / 3.0))) <= 2


def test_scene_sample_is_deterministic_and_refers_uniquely():
    a, b = scene_sample(3, 5, 64), scene_sample(3, 5, 64)
    np.testing.assert_array_equal(a["rgb"], b["rgb"])
    assert not np.array_equal(a["rgb"], scene_sample(4, 5, 64)["rgb"])
    checked = 0
    for i in range(12):
        s = scene_sample(0, i, 96)
        assert s["depth"].max() < 10.0 and s["depth"].min() > 0
        vis = [s["objects"][k] for k in s["visible"]]
        for k, sentences in s["refs"]:
            o = s["objects"][k]
            for sent in sentences:
                m = re.fullmatch(r"the (\w+) (box|sphere|cylinder)", sent)
                if m and m.group(1) in ("red", "green", "blue", "yellow", "purple", "orange"):
                    assert sum(q.colour == m.group(1) and q.kind == m.group(2) for q in vis) == 1
                    assert (o.colour, o.kind) == (m.group(1), m.group(2))
                    checked += 1
                m = re.fullmatch(r"the (box|sphere|cylinder)", sent)
                if m:
                    assert sum(q.kind == m.group(1) for q in vis) == 1 and o.kind == m.group(1)
                    checked += 1
    assert checked > 5


def test_layouts_on_disk(tmp_path):
    root = make_synthetic(str(tmp_path / "nyu"), "depth", n=8, size=64)
    lines = open(os.path.join(root, "train_list.txt")).read().split("\n")[:-1]
    assert len(lines) + len(open(os.path.join(root, "test_list.txt")).readlines()) == 8
    img, dep, focal = lines[0].split()
    assert re.fullmatch(r"/[a-z_]+_\d{4}/rgb_\d{5}\.jpg", img) and float(focal) > 0
    assert img.split("/")[1].rsplit("_", 1)[0] in NYU_SCENES
    png = Image.open(os.path.join(root, "sync", dep.lstrip("/")))
    assert png.mode.startswith("I") and np.asarray(png).dtype == np.uint16
    assert 0 < np.asarray(png).max() < 10000  # millimetres, under 10 m

    root = make_synthetic(str(tmp_path / "ade"), "semseg", n=5, size=64)
    ann = Image.open(os.path.join(root, "ADEChallengeData2016/annotations/validation/ADE_val_00000005.png"))
    assert ann.mode == "L" and set(np.unique(np.asarray(ann))) <= {0, 1, 4, 6, 42, 112, 120}

    root = make_synthetic(str(tmp_path / "coco"), "refer", n=10, size=64)
    inst = json.load(open(os.path.join(root, "refer/data/refcoco/instances.json")))
    kinds = {"polygon" if isinstance(a["segmentation"], list) else type(a["segmentation"]["counts"]).__name__
             for a in inst["annotations"]}
    assert kinds == {"polygon", "list", "str"}
    assert os.path.isfile(os.path.join(root, "refer/data/images/mscoco/images/train2014/COCO_train2014_000000000001.jpg"))


def test_cli(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "vpd.synthetic", "--task", "depth", "--n", "2", "--size", "32",
                        "--out", str(out)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr
    assert (out / "train_list.txt").exists()


def test_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        make_synthetic("/tmp/never", "pose", n=1)
