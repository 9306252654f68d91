"""A procedural indoor world written in the NYUv2, ADE20K and RefCOCO layouts, for tests and demos.

Each image is a room (floor, ceiling, back and side walls, a poster) with boxes, spheres and
cylinders standing on the floor, seen by a pinhole camera and ray-cast in numpy with exact
per-pixel depth (the camera z, as NYU stores it), class labels and instance ids. Colours and
textures follow the class (floor tiles, wall stripes, ringed cylinders) and the wall colour and
stripe period follow the room's scene type, so depth, class and scene can be learned from the image.
Referring expressions ("the red box", "the sphere on the left", "the largest cylinder") are kept
only when exactly one visible object satisfies them.

    root = make_synthetic("data/synth", "depth", n=200)      # then NYUv2(root); "semseg" for ADE20K, "refer" for RefCOCO
    python -m vpd.synthetic --task depth --n 200 --out data/synth
"""
import argparse
import json
import os
import pickle
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vpd.data import ADE20K_CLASSES, NYU_SCENES
from vpd.masks import mask_to_polygons, polygon_to_mask, rle_encode

# Synthetic classes and the ADE20K class each is written as (PNG value = ADE index + 1; 0 = "other").
CLASSES = ("wall", "floor", "ceiling", "poster", "box", "sphere", "cylinder")
ADE_NAME = {"wall": "wall", "floor": "floor", "ceiling": "ceiling", "poster": None,
            "box": "box", "sphere": "ball", "cylinder": "barrel"}
ADE_VALUE = np.array([0 if ADE_NAME[c] is None else ADE20K_CLASSES.index(ADE_NAME[c]) + 1 for c in CLASSES],
                     dtype=np.uint8)
KINDS = ("box", "sphere", "cylinder")
COLOURS = {"red": (200, 45, 40), "green": (50, 165, 60), "blue": (45, 75, 205),
           "yellow": (225, 200, 45), "purple": (135, 55, 165), "orange": (235, 135, 35)}
# Scene type -> (wall colour, wall stripe period in metres, floor tile size in metres, floor colour).
SCENES = {
    "bedroom": ((190, 170, 200), 0.5, 0.6, (150, 110, 80)),
    "kitchen": ((225, 225, 205), 0.25, 0.3, (170, 170, 170)),
    "living_room": ((205, 185, 150), 0.8, 0.9, (120, 85, 60)),
    "bathroom": ((175, 210, 220), 0.15, 0.2, (215, 215, 225)),
    "office": ((165, 170, 180), 1.2, 0.5, (90, 95, 110)),
    "classroom": ((210, 200, 160), 0.35, 0.45, (135, 130, 115)),
}
assert all(s in NYU_SCENES for s in SCENES)
FRAMES_PER_ROOM = 2  # NYU-like: several views of one room share a scene directory


@dataclass
class Obj:
    kind: str
    colour: str
    centre: tuple  # world (x, y, z) of the object's centre; y points down, the floor is y = floor
    size: tuple    # box (w, h, d); sphere (r,); cylinder (r, h)

    @property
    def volume(self):
        if self.kind == "box":
            return self.size[0] * self.size[1] * self.size[2]
        if self.kind == "sphere":
            return 4.0 / 3.0 * np.pi * self.size[0] ** 3
        return np.pi * self.size[0] ** 2 * self.size[1]


# ----------------------------------------------------------------------------- world

def make_room(rng):
    """Room geometry (camera at the origin), scene type and objects."""
    room = dict(scene=list(SCENES)[rng.integers(len(SCENES))], floor=rng.uniform(1.2, 1.6),
                ceiling=rng.uniform(1.1, 1.5), back=rng.uniform(4.5, 8.0),
                left=rng.uniform(1.8, 3.0), right=rng.uniform(1.8, 3.0))
    room["poster"] = (rng.uniform(-1.5, 0.2), rng.uniform(-0.9, -0.3))  # left x, top y on the back wall
    objects, foot = [], []
    for _ in range(int(rng.integers(2, 6))):
        for _ in range(50):
            kind = KINDS[rng.integers(3)]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            if kind == "box":
                w, h, d = rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.1), rng.uniform(0.3, 1.0)
                size, radius, half_h = (w, h, d), 0.5 * np.hypot(w, d), h / 2
            elif kind == "sphere":
                r = rng.uniform(0.2, 0.5)
                size, radius, half_h = (r,), r, r
            else:
                r, h = rng.uniform(0.15, 0.35), rng.uniform(0.4, 1.2)
                size, radius, half_h = (r, h), r, h / 2
            x = rng.uniform(-room["left"] + radius + 0.1, room["right"] - radius - 0.1)
            z = rng.uniform(1.8, room["back"] - radius - 0.2)
            if all(np.hypot(x - fx, z - fz) > radius + fr + 0.1 for fx, fz, fr in foot):
                objects.append(Obj(kind, colour, (x, room["floor"] - half_h, z), size))
                foot.append((x, z, radius))
                break
    room["objects"] = objects
    return room


def _rotation(yaw, pitch):
    """Camera -> world rotation: pitch about x (positive looks down), then yaw about y."""
    cp, sp, cy, sy = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    rx = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])  # (0, 0, 1) -> (0, sin, cos): down
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return ry @ rx


def render(room, yaw, pitch, height, width):
    """Ray-cast the room -> rgb uint8 (H, W, 3), depth float32 (H, W) metres (camera z),
    classes int64 (H, W) into CLASSES, instances int64 (H, W) (k + 1 for room["objects"][k], 0 else)."""
    f = 0.81 * width  # NYU's focal length relative to the image width (518.8 / 640)
    v, u = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    d_cam = np.stack([(u - width / 2) / f, (v - height / 2) / f, np.ones_like(u)], -1)  # (H, W, 3), z = 1
    d = d_cam @ _rotation(yaw, pitch).T  # world directions; the hit point is t * d, its camera z is t
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    big = np.inf
    t = np.full((height, width), big)
    cls = np.zeros((height, width), np.int64)
    inst = np.zeros((height, width), np.int64)
    normal = np.zeros((height, width, 3))

    def take(tc, c, k, n):
        hit = (tc > 1e-6) & (tc < t)
        t[hit], cls[hit], inst[hit] = tc[hit], c, k
        normal[hit] = n[hit] if np.ndim(n) == 3 else n

    with np.errstate(divide="ignore", invalid="ignore"):
        take(np.where(dy > 0, room["floor"] / dy, big), 1, 0, np.array([0.0, -1.0, 0.0]))
        take(np.where(dy < 0, -room["ceiling"] / dy, big), 2, 0, np.array([0.0, 1.0, 0.0]))
        take(np.where(dz > 0, room["back"] / dz, big), 0, 0, np.array([0.0, 0.0, -1.0]))
        take(np.where(dx < 0, -room["left"] / dx, big), 0, 0, np.array([1.0, 0.0, 0.0]))
        take(np.where(dx > 0, room["right"] / dx, big), 0, 0, np.array([-1.0, 0.0, 0.0]))
        for k, o in enumerate(room["objects"], 1):
            c = np.array(o.centre)
            cid = CLASSES.index(o.kind)
            if o.kind == "sphere":
                r = o.size[0]
                b = d @ c
                a = (d * d).sum(-1)
                disc = b * b - a * (c @ c - r * r)
                tc = np.where(disc >= 0, (b - np.sqrt(np.maximum(disc, 0))) / a, big)
                take(tc, cid, k, (tc[..., None] * d - c) / r)
            elif o.kind == "box":
                half = np.array(o.size) / 2
                t1, t2 = (c - half) / d, (c + half) / d  # (H, W, 3) slab entries/exits
                near = np.minimum(t1, t2)
                t_in, t_out = near.max(-1), np.maximum(t1, t2).min(-1)
                tc = np.where(t_out >= t_in, t_in, big)
                axis = near.argmax(-1)
                n = -np.sign(d) * (np.arange(3) == axis[..., None])
                take(tc, cid, k, n)
            else:
                r, h = o.size
                top = c[1] - h / 2
                a = dx * dx + dz * dz
                b = dx * c[0] + dz * c[2]
                disc = b * b - a * (c[0] ** 2 + c[2] ** 2 - r * r)
                ts = np.where(disc >= 0, (b - np.sqrt(np.maximum(disc, 0))) / a, big)
                ys = ts * dy
                ts = np.where((ys >= top) & (ys <= top + h), ts, big)
                n_side = np.stack([ts * dx - c[0], np.zeros_like(ts), ts * dz - c[2]], -1) / r
                take(ts, cid, k, n_side)
                tcap = np.where(dy != 0, top / dy, big)
                on_cap = (tcap * dx - c[0]) ** 2 + (tcap * dz - c[2]) ** 2 <= r * r
                take(np.where(on_cap, tcap, big), cid, k, np.array([0.0, -1.0, 0.0]))

    p = t[..., None] * d  # (H, W, 3) world hit points
    # The poster: a rectangle on the back wall, labelled "other" (ignored by ADE20K training).
    px, py = room["poster"]
    on_back = (cls == 0) & (np.abs(p[..., 2] - room["back"]) < 1e-6)
    poster = on_back & (p[..., 0] > px) & (p[..., 0] < px + 1.2) & (p[..., 1] > py) & (p[..., 1] < py + 0.8)
    cls[poster] = CLASSES.index("poster")

    rgb = _shade(room, p, cls, inst, normal)
    return rgb, t.astype(np.float32), cls, inst


def _shade(room, p, cls, inst, normal):
    wall_c, stripe, tile, floor_c = SCENES[room["scene"]]
    base = np.zeros(p.shape)
    pattern = np.ones(cls.shape)
    wall, floor, ceil, poster = (cls == CLASSES.index(n) for n in ("wall", "floor", "ceiling", "poster"))
    base[wall] = wall_c
    along = np.where(np.abs(normal[..., 2]) > 0.5, p[..., 0], p[..., 2])  # coordinate along the wall
    pattern[wall] = np.where((along[wall] // stripe) % 2 == 0, 1.0, 0.85)
    base[floor] = floor_c
    checker = ((np.floor(p[..., 0] / tile) + np.floor(p[..., 2] / tile)) % 2 == 0)
    pattern[floor] = np.where(checker[floor], 1.0, 0.7)
    base[ceil] = (235, 235, 230)
    base[poster] = (60, 60, 70)
    pattern[poster] = np.where(np.sin(p[..., 0] * 25)[poster] * np.sin(p[..., 1] * 25)[poster] > 0, 1.6, 0.7)
    for k, o in enumerate(room["objects"], 1):
        m = inst == k
        base[m] = COLOURS[o.colour]
        if o.kind == "cylinder":
            pattern[m] = np.where((p[..., 1][m] * 8) % 1.0 < 0.5, 1.0, 0.8)  # rings
        elif o.kind == "box":
            local = np.abs(p[m] - np.array(o.centre)) / (np.array(o.size) / 2)
            edge = (np.sort(local, -1)[:, 1] > 0.9)  # near an edge: two coordinates near the face
            pattern[m] = np.where(edge, 0.6, 1.0)
    light = np.array([-0.4, 0.8, 0.45])
    light /= np.linalg.norm(light)
    diffuse = np.clip(normal @ -light, 0, 1)  # light travels along +light: Lambert with -light
    shade = 0.55 + 0.45 * diffuse
    rgb = base * (pattern * shade)[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- one sample

def scene_sample(seed, index, size=256):
    """Everything the generator knows about image `index`: a pure function of (seed, index, size).

    Returns dict(rgb, depth, classes, instances, objects, scene, room, visible, refs) where refs is
    a list of (object position k, [sentences]) for visible objects with unambiguous expressions.
    """
    room_idx = index // FRAMES_PER_ROOM
    room = make_room(np.random.default_rng([seed, room_idx]))
    rng = np.random.default_rng([seed, room_idx, index])
    height, width = size * 3 // 4, size
    rgb, depth, classes, inst = render(room, rng.uniform(-0.25, 0.25), rng.uniform(0.1, 0.35), height, width)
    noise = rng.normal(0, 2.0, rgb.shape)
    rgb = np.clip(rgb + noise, 0, 255).astype(np.uint8)
    min_area = max(20, height * width // 500)
    visible = [k for k in range(len(room["objects"])) if (inst == k + 1).sum() >= min_area]
    refs = describe(room["objects"], inst, visible, rng)
    return dict(rgb=rgb, depth=depth, classes=classes, instances=inst, objects=room["objects"],
                scene=room["scene"], room=room_idx, visible=visible, refs=refs)


def describe(objects, inst, visible, rng, max_sentences=3):
    """Referring expressions that pick out exactly one visible object (checked, not assumed)."""
    width = inst.shape[1]
    cx = {k: np.nonzero(inst == k + 1)[1].mean() for k in visible}
    z = {k: objects[k].centre[2] for k in visible}

    def unique(filt, key=None, margin=0.0, largest=True):
        """The one visible object passing `filt` (and extreme in `key` by more than `margin`)."""
        cand = [k for k in visible if filt(objects[k])]
        if key is None:
            return cand[0] if len(cand) == 1 else None
        if len(cand) < 2:
            return None  # "the largest box" needs at least two boxes to compare
        vals = sorted(cand, key=lambda k: key(k), reverse=largest)
        best, second = vals[0], vals[1]
        return best if abs(key(best) - key(second)) > margin else None

    out = []
    for k in visible:
        o = objects[k]
        same_kind = lambda q: q.kind == o.kind  # noqa: E731
        same_both = lambda q: q.kind == o.kind and q.colour == o.colour  # noqa: E731
        cands = [
            (f"the {o.colour} {o.kind}", unique(same_both)),
            (f"the {o.kind}", unique(same_kind)),
            (f"the {o.colour} object", unique(lambda q: q.colour == o.colour)),
            (f"the {o.kind} on the left", unique(same_kind, lambda j: cx[j], 0.05 * width, largest=False)),
            (f"the {o.kind} on the right", unique(same_kind, lambda j: cx[j], 0.05 * width)),
            (f"the {o.colour} {o.kind} on the left", unique(same_both, lambda j: cx[j], 0.05 * width, False)),
            (f"the {o.colour} {o.kind} on the right", unique(same_both, lambda j: cx[j], 0.05 * width)),
            (f"the largest {o.kind}", unique(same_kind, lambda j: np.log(objects[j].volume), np.log(1.3))),
            (f"the smallest {o.kind}", unique(same_kind, lambda j: np.log(objects[j].volume), np.log(1.3), False)),
            (f"the nearest {o.kind}", unique(same_kind, lambda j: z[j], 0.5, largest=False)),
            (f"the farthest {o.kind}", unique(same_kind, lambda j: z[j], 0.5)),
        ]
        sentences = [s for s, who in cands if who == k]
        if sentences:
            order = rng.permutation(len(sentences))[:max_sentences]
            out.append((k, [sentences[i] for i in order]))
    return out


# ----------------------------------------------------------------------------- writers

def _save_jpg(path, rgb):
    Image.fromarray(rgb).save(path, quality=95, subsampling=0)  # 4:4:4 keeps small objects' colours


def _write_depth(root, n, seed, size):
    lists = {"train": [], "test": []}
    for i in range(n):
        s = scene_sample(seed, i, size)
        test = s["room"] % 4 == 3  # whole rooms go to the test split, as NYU splits by scene
        scene_dir = s["scene"] if test else f"{s['scene']}_{s['room']:04d}"
        base = os.path.join(root, "official_splits", "test") if test else os.path.join(root, "sync")
        os.makedirs(os.path.join(base, scene_dir), exist_ok=True)
        _save_jpg(os.path.join(base, scene_dir, f"rgb_{i:05d}.jpg"), s["rgb"])
        mm = np.round(s["depth"] * 1000.0).astype(np.uint16)
        Image.fromarray(mm).save(os.path.join(base, scene_dir, f"sync_depth_{i:05d}.png"))
        lists["test" if test else "train"].append(
            f"/{scene_dir}/rgb_{i:05d}.jpg /{scene_dir}/sync_depth_{i:05d}.png {0.81 * size:.4f}\n")
    for split, lines in lists.items():
        with open(os.path.join(root, f"{split}_list.txt"), "w") as f:
            f.writelines(lines)


def _write_semseg(root, n, seed, size):
    base = os.path.join(root, "ADEChallengeData2016")
    for split in ("training", "validation"):
        os.makedirs(os.path.join(base, "images", split), exist_ok=True)
        os.makedirs(os.path.join(base, "annotations", split), exist_ok=True)
    for i in range(n):
        s = scene_sample(seed, i, size)
        split, stem = ("validation", f"ADE_val_{i + 1:08d}") if i % 5 == 4 else ("training", f"ADE_train_{i + 1:08d}")
        _save_jpg(os.path.join(base, "images", split, stem + ".jpg"), s["rgb"])
        Image.fromarray(ADE_VALUE[s["classes"]]).save(os.path.join(base, "annotations", split, stem + ".png"))


REFER_SPLITS = ("train",) * 7 + ("val", "testA", "testB")  # by image index % 10


def _write_refer(root, n, seed, size):
    data = os.path.join(root, "refer", "data")
    image_dir = os.path.join(data, "images", "mscoco", "images", "train2014")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(data, "refcoco"), exist_ok=True)
    images, anns, refs = [], [], []
    kind_turn = 0  # rotate polygon / uncompressed RLE / compressed RLE over the annotations
    for i in range(n):
        s = scene_sample(seed, i, size)
        image_id = i + 1
        h, w = s["instances"].shape
        name = f"COCO_train2014_{image_id:012d}.jpg"
        _save_jpg(os.path.join(image_dir, name), s["rgb"])
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for k in s["visible"]:
            m = (s["instances"] == k + 1).astype(np.uint8)
            seg = None
            if kind_turn % 3 == 0:
                polys = mask_to_polygons(m)
                if polys is not None and np.array_equal(polygon_to_mask(polys, h, w), m):
                    seg = polys
                else:
                    kind_turn += 1  # a mask with holes cannot be polygons: write RLE instead
            if seg is None:
                seg = rle_encode(m, compressed=kind_turn % 3 == 2)
            kind_turn += 1
            ys, xs = np.nonzero(m)
            anns.append({"id": image_id * 100 + k, "image_id": image_id, "segmentation": seg,
                         "category_id": KINDS.index(s["objects"][k].kind) + 1, "area": int(m.sum()),
                         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                  float(ys.max() - ys.min() + 1)], "iscrowd": 0})
        for k, sentences in s["refs"]:
            ref_id = len(refs)
            sents = [{"sent": t, "raw": t, "tokens": t.split(), "sent_id": ref_id * 10 + j}
                     for j, t in enumerate(sentences)]
            refs.append({"image_id": image_id, "ann_id": image_id * 100 + k, "ref_id": ref_id,
                         "split": REFER_SPLITS[i % 10], "sentences": sents,
                         "sent_ids": [x["sent_id"] for x in sents],
                         "category_id": KINDS.index(s["objects"][k].kind) + 1,
                         # as REFER's: the image's name with a suffix, which names no file
                         "file_name": f"{os.path.splitext(name)[0]}_{ref_id}.jpg"})
    categories = [{"id": j + 1, "name": k, "supercategory": "shape"} for j, k in enumerate(KINDS)]
    with open(os.path.join(data, "refcoco", "instances.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    with open(os.path.join(data, "refcoco", "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)


WRITERS = {"depth": _write_depth, "semseg": _write_semseg, "refer": _write_refer}


def make_synthetic(root, task, n, seed=0, size=256):
    """Write n synthetic images (size wide, 3/4 size high) for `task` in its dataset layout under
    root; return the root to pass to NYUv2 / ADE20K / RefCOCO."""
    if task not in WRITERS:
        raise ValueError(f"task must be one of {sorted(WRITERS)}, got {task!r}")
    if n < 1 or size < 32:
        raise ValueError(f"need n >= 1 and size >= 32, got n={n}, size={size}")
    os.makedirs(root, exist_ok=True)
    WRITERS[task](root, int(n), int(seed), int(size))
    return root


def main():
    ap = argparse.ArgumentParser(description="write a synthetic dataset in a public layout")
    ap.add_argument("--task", required=True, choices=sorted(WRITERS))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", default="data/synth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=256, help="image width; height is 3/4 of it")
    args = ap.parse_args()
    print(make_synthetic(args.out, args.task, args.n, args.seed, args.size))


if __name__ == "__main__":
    main()
