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
    # Row 0 sees the ceiling, 1.2 m above: z = 1.2 f / (h/2 - 0.5).
    assert classes[0, w // 2] == 2
    assert depth[0, w // 2] == pytest.approx(1.2 * f / (h / 2 - 0.5), rel=1e-5)
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


def test_objects_stand_apart_on_the_floor():
    # no two objects overlap: their footprints on the floor (a box's w x d rectangle, a sphere's or a
    # cylinder's disc) are disjoint, and each stands on the floor (its lowest point at the floor's y)
    from vpd.synthetic import make_room

    def foot(o):
        x, _, z = o.centre
        if o.kind == "box":
            return "rect", (x - o.size[0] / 2, x + o.size[0] / 2, z - o.size[2] / 2, z + o.size[2] / 2)
        return "disc", (x, z, o.size[0])

    def overlap(a, b):
        if a[0] == "disc" and b[0] == "disc":
            return np.hypot(a[1][0] - b[1][0], a[1][1] - b[1][1]) < a[1][2] + b[1][2]
        if a[0] == "rect" and b[0] == "rect":
            (x0, x1, z0, z1), (u0, u1, v0, v1) = a[1], b[1]
            return x0 < u1 and u0 < x1 and z0 < v1 and v0 < z1
        (x0, x1, z0, z1), (x, z, r) = (a[1], b[1]) if a[0] == "rect" else (b[1], a[1])
        return np.hypot(x - np.clip(x, x0, x1), z - np.clip(z, z0, z1)) < r

    pairs = 0
    for seed in range(30):
        room = make_room(np.random.default_rng(seed))
        objs = room["objects"]
        for o in objs:
            half = o.size[0] if o.kind == "sphere" else o.size[1] / 2
            assert o.centre[1] + half == pytest.approx(room["floor"])
        for i in range(len(objs)):
            for j in range(i):
                assert not overlap(foot(objs[i]), foot(objs[j])), (seed, i, j)
                pairs += 1
    assert pairs > 50


def on_screen(s):
    """The objects a reader of the image sees, from the rendered instance map: those covering at least
    max(20, 1/500 of the image) pixels (the module's rule for "visible", restated here)."""
    inst = s["instances"]
    least = max(20, inst.size // 500)
    return [o for k, o in enumerate(s["objects"]) if (inst == k + 1).sum() >= least]


def test_scene_sample_is_deterministic_and_refers_uniquely():
    a, b = scene_sample(3, 5, 64), scene_sample(3, 5, 64)
    np.testing.assert_array_equal(a["rgb"], b["rgb"])
    assert not np.array_equal(a["rgb"], scene_sample(4, 5, 64)["rgb"])
    checked = 0
    for i in range(12):
        s = scene_sample(0, i, 96)
        assert s["depth"].max() < 10.0 and s["depth"].min() > 0
        vis = on_screen(s)
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


def test_colour_only_expressions_name_the_one_object_of_that_colour():
    # "the red object": exactly one visible object is red, whatever its kind
    checked = 0
    for i in range(24):
        s = scene_sample(0, i, 64)
        vis = on_screen(s)
        for k, sentences in s["refs"]:
            for sent in sentences:
                m = re.fullmatch(r"the (\w+) object", sent)
                if m:
                    assert s["objects"][k].colour == m.group(1)
                    assert sum(q.colour == m.group(1) for q in vis) == 1, (i, sent)
                    checked += 1
    assert checked > 3


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
    # --n 2 images of --size 32 (24x32)
    lines = sum(len(open(out / f).read().splitlines()) for f in ("train_list.txt", "test_list.txt"))
    photos = sorted(out.rglob("rgb_*.jpg"))
    assert lines == 2 and len(photos) == 2 and all(Image.open(p).size == (32, 24) for p in photos)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="task"):
        make_synthetic("/tmp/never", "pose", n=1)
    with pytest.raises(ValueError, match="n >= 1"):
        make_synthetic(str(tmp_path / "none"), "depth", n=0)  # no image: the readers refuse empty split lists
    with pytest.raises(ValueError, match="size >= 32"):
        make_synthetic(str(tmp_path / "small"), "depth", n=1, size=16)
    assert os.listdir(tmp_path) == []  # refused before anything is written


def test_test_split_and_ade_names_follow_the_real_layouts(tmp_path):
    # NYU's official test set: official_splits/test/<scene type>/rgb_XXXXX.jpg (no recording number)
    root = make_synthetic(str(tmp_path / "nyu"), "depth", n=8, size=32)
    with open(os.path.join(root, "test_list.txt")) as f:
        lines = f.read().split()
    assert len(lines) == 2 * 3  # room 3 (images 6 and 7), three columns each
    for img, dep in zip(lines[0::3], lines[1::3]):
        scene, name = re.fullmatch(r"/([a-z_]+)/(rgb_\d{5}\.jpg)", img).groups()
        assert scene in NYU_SCENES and dep == f"/{scene}/sync_depth_{name[4:9]}.png"
        assert os.path.isfile(os.path.join(root, "official_splits", "test", scene, name))
    # ADE20K numbers its files from 1 in each split: images 0..3 are ADE_train_00000001..4, image 4 ADE_val_00000005
    root = make_synthetic(str(tmp_path / "ade"), "semseg", n=5, size=32)
    base = os.path.join(root, "ADEChallengeData2016")
    stems = [f"ADE_train_{i:08d}" for i in range(1, 5)]
    assert sorted(os.listdir(os.path.join(base, "images", "training"))) == [n + ".jpg" for n in stems]
    assert sorted(os.listdir(os.path.join(base, "annotations", "training"))) == [n + ".png" for n in stems]
    assert os.listdir(os.path.join(base, "images", "validation")) == ["ADE_val_00000005.jpg"]


def test_coco_bboxes_enclose_their_masks(tmp_path):
    from vpd.masks import segmentation_to_mask
    root = make_synthetic(str(tmp_path / "coco"), "refer", n=4, size=64)
    with open(os.path.join(root, "refer/data/refcoco/instances.json")) as f:
        inst = json.load(f)
    sizes = {im["id"]: (im["height"], im["width"]) for im in inst["images"]}
    assert inst["annotations"]
    for a in inst["annotations"]:
        m = segmentation_to_mask(a["segmentation"], *sizes[a["image_id"]])
        ys, xs = np.nonzero(m)
        # COCO bbox [x, y, width, height] of a pixel mask: the width counts both end pixels
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert a["area"] == m.sum()


def test_object_volumes():
    assert Obj("box", "red", (0, 0, 0), (0.5, 2.0, 3.0)).volume == pytest.approx(3.0)
    assert Obj("sphere", "red", (0, 0, 0), (0.5,)).volume == pytest.approx(np.pi / 6)  # 4/3 pi r^3
    assert Obj("cylinder", "red", (0, 0, 0), (0.5, 2.0)).volume == pytest.approx(np.pi / 2)  # pi r^2 h


def test_relational_expressions_pick_the_extreme_object():
    # "the [colour] kind on the left/right", "the largest/smallest kind", "the nearest/farthest kind":
    # the named object is the extreme one among the visible objects of that kind (and colour), by the margin
    volume = {"box": lambda s: s[0] * s[1] * s[2], "sphere": lambda s: 4 / 3 * np.pi * s[0] ** 3,
              "cylinder": lambda s: np.pi * s[0] ** 2 * s[1]}
    seen = set()
    for i in range(16):
        s = scene_sample(0, i, 64)
        objs, inst, width = s["objects"], s["instances"], s["instances"].shape[1]
        for k, sentences in s["refs"]:
            for sent in sentences:
                m = re.fullmatch(r"the (?:(\w+) )?(box|sphere|cylinder) on the (left|right)", sent) \
                    or re.fullmatch(r"the (largest|smallest|nearest|farthest) (box|sphere|cylinder)()", sent)
                if not m:
                    continue
                a, kind, side = m.groups()
                colour = a if side else None
                word = side or a
                group = [j for j in s["visible"]
                         if objs[j].kind == kind and colour in (None, objs[j].colour)]
                assert k in group and len(group) >= 2
                if word in ("left", "right"):
                    value = {j: np.nonzero(inst == j + 1)[1].mean() for j in group}  # mean column
                    margin = 0.05 * width
                elif word in ("largest", "smallest"):
                    value = {j: np.log(volume[kind](objs[j].size)) for j in group}
                    margin = np.log(1.3)
                else:
                    value = {j: objs[j].centre[2] for j in group}
                    margin = 0.5  # world z of the centre (the camera looks along +z, yawed by at most 0.25 rad)
                sign = 1 if word in ("right", "largest", "farthest") else -1
                others = [sign * value[j] for j in group if j != k]
                assert sign * value[k] - max(others) > margin, (i, sent)
                seen.add(word)
    assert seen == {"left", "right", "largest", "smallest", "nearest", "farthest"}


def test_box_on_the_axis_shows_its_front_face_at_its_near_distance():
    # a 1.0 x 0.6 x 0.8 m box centred 3 m ahead at eye height: only the face at z = 3 - 0.4 is seen
    # (the camera is inside its x and y extent), and pixel (v, u) sees it when the ray's point
    # ((u + 0.5 - w/2) z / f, (v + 0.5 - h/2) z / f) lies within the face's 1.0 x 0.6 m
    h, w = 48, 64
    box = Obj("box", "red", (0.0, 0.0, 3.0), (1.0, 0.6, 0.8))
    _, depth, classes, inst = render(_room([box]), 0.0, 0.0, h, w)
    f, z = 0.81 * w, 2.6
    v, u = np.mgrid[0:h, 0:w] + 0.5
    face = (np.abs((u - w / 2) * z / f) <= 0.5) & (np.abs((v - h / 2) * z / f) <= 0.3)
    assert face.sum() > 100
    np.testing.assert_array_equal(inst == 1, face)
    assert np.all(classes[face] == 4)
    np.testing.assert_allclose(depth[face], z, rtol=1e-6)


def test_cylinder_below_the_eye_shows_its_top_cap_and_its_side():
    # radius 0.5, 1 m high, axis 3 m ahead, top at y = 0.3 (0.3 m below the eye, y points down)
    h, w = 48, 64
    cyl = Obj("cylinder", "red", (0.0, 0.8, 3.0), (0.5, 1.0))
    _, depth, classes, inst = render(_room([cyl]), 0.0, 0.0, h, w)
    f = 0.81 * w
    a = 0.5 / f  # the centre column's ray leans a = (31.5 - 32) / f in x
    for v in (28, 29):
        # rows a little below the horizon pass over the near rim (y = 2.5 dy < 0.3) and meet the cap's
        # plane y = 0.3 at t = 0.3 / dy, 2.8-3.5 m ahead: inside the disc
        dy = (v + 0.5 - h / 2) / f
        assert inst[v, 31] == 1 and classes[v, 31] == 6
        assert depth[v, 31] == pytest.approx(0.3 / dy, rel=1e-5)
    # row 40 meets the curved side at y = 0.8 (within 0.3..1.3): the nearer root of
    # |t (a, ., 1) - (0, ., 3)|_xz = 0.5, i.e. (1 + a^2) t^2 - 6 t + 8.75 = 0
    q = 1 + a * a
    assert inst[40, 31] == 1
    assert depth[40, 31] == pytest.approx((3 - np.sqrt(9 - q * 8.75)) / q, rel=1e-5)
    # row 26 passes over the cap (its plane is reached 6.2 m ahead, beyond the back wall)
    assert inst[26, 31] == 0 and classes[26, 31] == 0


def test_tilted_camera_sees_the_floor_level_along_each_row():
    # pitch p looks down, yaw turns about the vertical, and the camera does not roll: a ray through row
    # v has the world y component cos(p) (v + 0.5 - h/2) / f + sin(p) in every column, so the floor
    # (1.5 m below) is at depth 1.5 / that all along the row, whatever the yaw
    h, w, pitch = 48, 64, 0.3
    f = 0.81 * w
    for yaw in (0.0, 0.2):
        _, depth, classes, _ = render(_room(), yaw, pitch, h, w)
        for v in (30, 47):
            dy = np.cos(pitch) * (v + 0.5 - h / 2) / f + np.sin(pitch)
            row = classes[v] == 1
            assert row.sum() > w // 2
            np.testing.assert_allclose(depth[v][row], 1.5 / dy, rtol=1e-5)


def test_poster_is_a_rectangle_on_the_back_wall():
    # the poster's pixels are labelled "poster" (ADE20K "other"), lie on the back wall and fill a rectangle
    room = dict(_room(), poster=(-0.6, -0.4))  # in front of the camera
    _, depth, classes, _ = render(room, 0.0, 0.0, 48, 64)
    rows, cols = np.nonzero(classes == 3)
    assert classes[24, 32] == 3 and len(rows) > 20
    block = classes[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert np.all(block == 3)
    np.testing.assert_allclose(depth[classes == 3], 6.0, rtol=1e-5)
    ring = classes[rows.min() - 1:rows.max() + 2, cols.min() - 1:cols.max() + 2].copy()
    ring[1:-1, 1:-1] = 0
    assert np.all(ring == 0)  # back wall around it


def test_objects_are_painted_in_the_colour_their_name_says():
    # "the red box" must look red: the hue of an object's mean colour is nearest to its colour name's
    import colorsys
    hue = {"red": 0, "orange": 30, "yellow": 60, "green": 120, "blue": 240, "purple": 280}
    seen = set()
    for i in range(0, 12, 2):
        s = scene_sample(0, i, 64)
        for k in s["visible"]:
            r, g, b = s["rgb"][s["instances"] == k + 1].mean(0) / 255
            hh = colorsys.rgb_to_hsv(r, g, b)[0] * 360
            dist = {c: min(abs(hh - x), 360 - abs(hh - x)) for c, x in hue.items()}
            assert min(dist, key=dist.get) == s["objects"][k].colour, (i, k, hh)
            seen.add(s["objects"][k].colour)
    assert len(seen) >= 4


def test_frames_of_one_room_share_its_scene_and_objects_seen_from_other_views():
    # as NYU's recordings: consecutive frames of a scene directory show the same room from another pose
    a, b, c = scene_sample(0, 2, 64), scene_sample(0, 3, 64), scene_sample(0, 4, 64)
    assert a["room"] == b["room"] != c["room"]
    assert a["scene"] == b["scene"] and a["objects"] == b["objects"]
    assert not np.array_equal(a["depth"], b["depth"])
    assert a["objects"] != c["objects"]


def test_depth_list_focal_back_projects_the_floor_square_to_the_walls(tmp_path):
    # BTS's third column is the focal length in pixels: with it, pixel (u, v) at depth z back-projects to
    # ((u + 0.5 - w/2) z / f, (v + 0.5 - h/2) z / f, z), and the room's floor comes out perpendicular to
    # its (vertical) walls; another focal scales x and y against z and tilts the planes
    root = make_synthetic(str(tmp_path / "nyu"), "depth", n=8, size=64)

    def plane(points):  # unit normal and rms distance of the least-squares plane
        centred = points - points.mean(0)
        _, sv, vt = np.linalg.svd(centred, full_matrices=False)
        return vt[-1], sv[-1] / np.sqrt(len(points))

    checked = 0
    for split, sub in (("train", "sync"), ("test", "official_splits/test")):
        with open(os.path.join(root, f"{split}_list.txt")) as f:
            lines = f.read().splitlines()
        for line in lines:
            img, dep, focal = line.split()
            i = int(re.search(r"rgb_(\d{5})", img).group(1))
            z = np.asarray(Image.open(os.path.join(root, sub, dep.lstrip("/")))).astype(np.float64) / 1000
            h, w = z.shape
            v, u = np.mgrid[0:h, 0:w] + 0.5
            f = float(focal)
            points = np.stack([(u - w / 2) * z / f, (v - h / 2) * z / f, z], -1)
            classes = scene_sample(0, i, 64)["classes"]
            floor, res_f = plane(points[classes == 1])
            wall, res_w = plane(points[(classes == 0) & (np.abs(u - w / 2) < 4)])  # a strip up the middle
            if res_w > 2e-3:
                continue  # the strip crosses two walls
            assert res_f < 2e-3 and abs(floor @ wall) < 0.01, (img, floor @ wall)
            checked += 1
    assert checked >= 5


def test_ade_annotations_give_each_object_kind_its_ade20k_class(tmp_path):
    # boxes, spheres and cylinders are written as ADE20K's "box", "ball" and "barrel" (PNG value =
    # index in the published class list + 1), so a semseg model sees three distinct object classes
    from vpd.data import ADE20K_CLASSES
    ade = {"box": "box", "sphere": "ball", "cylinder": "barrel"}
    root = make_synthetic(str(tmp_path / "ade"), "semseg", n=5, size=64)
    seen = set()
    for i in range(5):
        split, stem = ("validation", f"ADE_val_{i + 1:08d}") if i == 4 else ("training", f"ADE_train_{i + 1:08d}")
        ann = np.asarray(Image.open(os.path.join(root, "ADEChallengeData2016/annotations", split, stem + ".png")))
        s = scene_sample(0, i, 64)
        for k, o in enumerate(s["objects"]):
            m = s["instances"] == k + 1
            if m.any():
                assert np.all(ann[m] == ADE20K_CLASSES.index(ade[o.kind]) + 1), (i, o.kind)
                seen.add(o.kind)
    assert seen == set(ade)


def test_refer_annotations_are_the_rendered_objects_with_their_coco_categories(tmp_path):
    # every annotation decodes (polygon or RLE) to exactly its object's pixels; category_id is the id of
    # the COCO category named as the object's kind, and each ref carries its annotation's category
    import pickle

    from vpd.masks import segmentation_to_mask
    root = make_synthetic(str(tmp_path / "coco"), "refer", n=10, size=64)
    data = os.path.join(root, "refer/data/refcoco")
    with open(os.path.join(data, "instances.json")) as f:
        inst = json.load(f)
    with open(os.path.join(data, "refs(unc).p"), "rb") as f:
        refs = pickle.load(f)
    names = {c["id"]: c["name"] for c in inst["categories"]}
    assert sorted(names.values()) == ["box", "cylinder", "sphere"] and min(names) == 1  # COCO ids from 1
    samples = {im["id"]: scene_sample(0, im["id"] - 1, 64) for im in inst["images"]}
    anns = {}
    for a in inst["annotations"]:
        s = samples[a["image_id"]]
        h, w = s["instances"].shape
        m = segmentation_to_mask(a["segmentation"], h, w)
        ks = [k for k in s["visible"] if np.array_equal(m, s["instances"] == k + 1)]
        assert len(ks) == 1, a["id"]
        assert names[a["category_id"]] == s["objects"][ks[0]].kind
        assert a["iscrowd"] == 0  # one object, not a COCO crowd region
        anns[a["id"]] = a
    assert any(isinstance(a["segmentation"], list) for a in anns.values())
    for r in refs:
        assert r["category_id"] == anns[r["ann_id"]]["category_id"]


def test_refer_refs_have_the_unc_splits_and_refer_sentence_records(tmp_path):
    # refs(unc).p: splits train / val / testA / testB; each sentence {sent, raw, tokens (its words),
    # sent_id}, sent_ids unique over the file and listed again in the ref's sent_ids
    import pickle
    root = make_synthetic(str(tmp_path / "coco"), "refer", n=10, size=64)
    with open(os.path.join(root, "refer/data/refcoco/refs(unc).p"), "rb") as f:
        refs = pickle.load(f)
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    assert len({r["ref_id"] for r in refs}) == len(refs)
    ids = []
    for r in refs:
        assert r["sent_ids"] == [x["sent_id"] for x in r["sentences"]]
        for x in r["sentences"]:
            assert x["raw"] == x["sent"] and x["tokens"] == x["sent"].split()
            ids.append(x["sent_id"])
    assert len(set(ids)) == len(ids) > len(refs)
