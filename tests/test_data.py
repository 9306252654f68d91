import colorsys
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vpd import transforms as T
from vpd.clip import Tokenizer
from vpd.data import (ADE20K, ADE20K_CLASSES, KITTI, NYU_SCENES, NYUv2, RefCOCO, BadSampleError, ImageFolder,
                      depth_eval_mask, read_rgb, undo)
from vpd.infer import MS_RATIOS
from vpd.synthetic import make_synthetic, scene_sample
from vpd.tasks import datasets


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth")
    return {"depth": make_synthetic(str(base / "nyu"), "depth", n=8, size=64),
            "semseg": make_synthetic(str(base / "ade"), "semseg", n=5, size=64),
            "refer": make_synthetic(str(base / "coco"), "refer", n=10, size=64)}


# ----------------------------------------------------------------------------- NYUv2

def test_nyu_eval_view_matches_the_written_depth_and_scene(synth):
    ds = NYUv2(synth["depth"], split="test")
    assert len(ds) == 2  # room 3 (images 6, 7) is the test room
    s = ds[0]
    assert s["image"].shape == (3, 48, 64) and s["image"].dtype == torch.float32
    assert s["image"].min() >= -1 and s["image"].max() <= 1
    png = np.asarray(Image.open(ds.depths[0])).astype(np.float32)
    torch.testing.assert_close(s["depth"][0], torch.from_numpy(png / 1000.0))
    truth = scene_sample(0, 6, 64)
    np.testing.assert_allclose(s["depth"][0].numpy(), truth["depth"], atol=5.1e-4)
    assert s["scene"] == truth["scene"] and NYU_SCENES[s["scene_id"]] == truth["scene"]
    rgb = (s["image"].permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(rgb - truth["rgb"]).mean() < 4  # JPEG quality 95


def test_nyu_train_view_is_seeded_and_batches(synth):
    ds = NYUv2(synth["depth"], crop=(32, 40), seed=1)
    a, b = ds[1], NYUv2(synth["depth"], crop=(32, 40), seed=1)[1]
    assert a["image"].shape == (3, 32, 40) and a["depth"].shape == (1, 32, 40)
    torch.testing.assert_close(a["image"], b["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], a["image"])
    assert not torch.equal(NYUv2(synth["depth"], crop=(32, 40), seed=2)[1]["image"], a["image"])
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 32, 40) and batch["scene_id"].dtype == torch.int64


def test_nyu_scene_names():
    assert NYUv2._scene_id("kitchen_0028b", "rgb_00045.jpg", "exact") == NYU_SCENES.index("kitchen")
    assert NYUv2._scene_id("living_room_0010", "rgb_1.jpg", "exact") == NYU_SCENES.index("living_room")
    assert NYUv2._scene_id("study_room_0004", "rgb_1.jpg", "exact") == NYU_SCENES.index("study_room")
    # the standard train list's two office recordings outside the <scene>_<NNNN> pattern
    for d in ("nyu_office_0", "nyu_office_1"):
        assert NYUv2._scene_id(d, "rgb_00001.jpg", "exact") == NYU_SCENES.index("office")
        assert NYUv2._scene_id(d, "rgb_00001.jpg", "vpd") == NYU_SCENES.index("office")
    # the official loader's substring match sends study_room to "study"
    assert NYUv2._scene_id("study_room_0004", "rgb_1.jpg", "vpd") == NYU_SCENES.index("study")
    assert NYUv2._scene_id("garage_0001", "rgb_1.jpg", "vpd") is None  # no name contained: None, not StopIteration
    assert len(NYU_SCENES) == 27 and len(ADE20K_CLASSES) == 150


def test_nyu_bad_inputs(synth, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/sync"):
        NYUv2(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="BTS"):
        NYUv2(synth["depth"], list_file=str(tmp_path / "missing_list.txt"))
    lst = tmp_path / "list.txt"
    lst.write_text("/kitchen_0001/rgb_00001.jpg /kitchen_0001/sync_depth_00001.png 518.8\n")
    with pytest.raises(FileNotFoundError, match="kitchen_0001/rgb_00001.jpg"):
        NYUv2(synth["depth"], list_file=str(lst))


def test_nyu_unreadable_files_name_the_file(synth, tmp_path):
    import shutil
    root = tmp_path / "nyu"
    shutil.copytree(synth["depth"], root)
    ds = NYUv2(str(root), split="test")
    Image.fromarray(np.full((48, 64), 7, np.uint8)).save(ds.depths[1])  # 8-bit instead of 16-bit
    with pytest.raises(BadSampleError, match=os.path.basename(ds.depths[1]) + ".*16-bit"):
        ds[1]
    shutil.copy(os.path.join(synth["depth"], os.path.relpath(ds.depths[1], root)), ds.depths[1])
    with open(ds.images[0], "r+b") as f:
        f.truncate(200)  # a truncated JPEG
    with pytest.raises(BadSampleError, match=os.path.basename(ds.images[0])):
        ds[0]
    Image.fromarray(np.zeros((48, 64), np.uint16)).save(ds.depths[1])  # no measurement at all
    with pytest.raises(BadSampleError, match=os.path.basename(ds.depths[1]) + ".*no valid"):
        ds[1]
    train = NYUv2(synth["depth"], split="test", train=True, crop=(64, 64))  # a crop taller than the 48-row images
    with pytest.raises(BadSampleError, match=os.path.basename(train.images[0]) + ": image 48x64 is smaller than the "
                       "crop 64x64"):
        train[0]


# ----------------------------------------------------------------------------- ADE20K

def test_ade_eval_view_reduces_labels_at_original_size(synth):
    ds = ADE20K(synth["semseg"], split="validation")
    s = ds[0]
    assert s["image"].shape == (3, 512, 683)  # short side 48 -> 512, long side 64 * 512 / 48 -> 683
    assert s["label"].shape == (48, 64) and s["label"].dtype == torch.int64
    truth = scene_sample(0, 4, 64)["classes"]  # ADE_val_00000005 is image index 4
    label = s["label"].numpy()
    assert ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[3] == "floor" and ADE20K_CLASSES[5] == "ceiling"
    assert np.all(label[truth == 0] == 0) and np.all(label[truth == 1] == 3) and np.all(label[truth == 2] == 5)
    assert np.all(label[truth == 3] == 255)  # the poster is "other" -> ignore
    torch.testing.assert_close(s["orig_size"], torch.tensor([48, 64]))


def test_ade_multi_scale_views_are_resized_from_the_original(synth):
    # mmseg's MultiScaleFlipAug: scale (int(2048 r), int(512 r)) per ratio, each a keep-ratio resize of
    # the ORIGINAL image (48x64 here): short side 512 r, long side 64 * 512 r / 48 rounded half up
    ds = ADE20K(synth["semseg"], split="validation", ms_ratios=MS_RATIOS)
    s = ds[0]
    sizes = [tuple(v.shape[-2:]) for v in s["ms_images"]]
    assert sizes == [(512, 683), (576, 768), (640, 853), (704, 939), (768, 1024)]
    assert torch.equal(s["ms_images"][0], s["image"])
    original = np.asarray(Image.open(ds.images[0]).convert("RGB"), dtype=np.float32)
    once = torch.from_numpy(T.resize_image(original, (640, 853))).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(s["ms_images"][2], once)
    twice = torch.nn.functional.interpolate(s["image"][None], size=(640, 853), mode="bilinear")[0]
    assert (s["ms_images"][2] - twice).abs().max() > 1e-2  # not a resize of the 512 view (float error: 1e-7)
    assert "ms_images" not in ADE20K(synth["semseg"], split="validation")[0]
    with pytest.raises(ValueError, match="ms_ratios"):
        ADE20K(synth["semseg"], split="training", ms_ratios=MS_RATIOS)


def test_ade_one_ratio_is_a_view_and_scales_are_truncated_as_mmsegs(synth):
    # a single ratio is still a multi-scale view; int(512 * 1.001) = 512 (round would give 513)
    s = ADE20K(synth["semseg"], split="validation", ms_ratios=[1.001])[0]
    assert [tuple(v.shape[-2:]) for v in s["ms_images"]] == [(512, 683)]
    for bad in ([], [1.0, 0.0], [-0.5]):
        with pytest.raises(ValueError, match="ms_ratios"):
            ADE20K(synth["semseg"], split="validation", ms_ratios=bad)


def test_ade_train_view_batches(synth):
    ds = ADE20K(synth["semseg"], seed=3)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 512, 512) and batch["label"].shape == (2, 512, 512)
    assert set(batch["label"].unique().tolist()) <= {0, 3, 5, 41, 111, 119, 255}


def test_ade_train_view_resizes_to_the_scale_of_its_crop(synth):
    # mmseg's (2048, 512) goes with its 512 crops; train.py --crop c trains at (4c, c). The synthetic images are
    # 64x48: at (256, 64) x ratio 0.5-2 their short side becomes 32-128, so a 64 crop is padded (image 0, label
    # 255) whenever the ratio is under 1; at (2048, 512) it becomes 256-1024 and is never padded.
    def padded(ds):
        found = 0
        for epoch in range(4):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                s = ds[i]
                found += bool((s["label"][-1] == 255).all() and (s["image"][:, -1] == 0).all())
        return found

    by_crop, _ = datasets("semseg", synth["semseg"], 64)
    assert padded(by_crop) > 0
    assert padded(ADE20K(synth["semseg"], crop=(64, 64))) == 0


def test_ade_bad_inputs(synth, tmp_path):
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016/images/training"):
        ADE20K(str(tmp_path))
    import shutil
    root = tmp_path / "ade"
    shutil.copytree(synth["semseg"], root)
    os.remove(root / "ADEChallengeData2016/annotations/training/ADE_train_00000002.png")
    with pytest.raises(FileNotFoundError, match="ADE_train_00000002.png"):
        ADE20K(str(root))


# ----------------------------------------------------------------------------- RefCOCO

def test_refcoco_eval_view_walks_every_sentence_with_exact_masks(synth):
    tok = Tokenizer()
    ds = RefCOCO(synth["refer"], split="val", tokenizer=tok)
    truth = scene_sample(0, 7, 64)  # image index 7 is the only val image of ten
    assert len(ds) == sum(len(s) for _, s in truth["refs"])
    seen = []
    for i in range(len(ds)):
        s = ds[i]
        k = next(k for k, sents in truth["refs"] if s["sentence"] in sents)
        mask = (truth["instances"] == k + 1).astype(np.uint8)
        np.testing.assert_array_equal(s["mask"].numpy(), mask)
        assert s["mask"].sum() > 0
        # what LAVT / VPD score against: the mask resized by PIL's nearest, the image by PIL's bilinear
        # (not mirrored: a flip would swap the sentences' left and right)
        np.testing.assert_array_equal(s["mask_resized"].numpy(),
                                      np.asarray(Image.fromarray(mask).resize((512, 512), Image.NEAREST)))
        rgb = np.asarray(Image.fromarray(truth["rgb"]).resize((512, 512), Image.BILINEAR), dtype=np.float32)
        assert np.abs(((s["image"].permute(1, 2, 0) + 1) * 127.5).numpy() - rgb).mean() < 3  # (stored as JPEG)
        n = len(tok.encode(s["sentence"]))  # BOS, the sentence's tokens, EOS
        assert s["tokens"].shape == (40,) and s["tokens"][n - 1] == 49407 and (s["tokens"][:n - 1] != 49407).all()
        assert torch.all(s["tokens"][n:] == 49407)
        seen.append(s["sentence"])
    assert sorted(seen) == sorted(t for _, sents in truth["refs"] for t in sents)


def test_refcoco_keeps_only_the_images_and_objects_of_its_splits_refs(synth):
    with open(os.path.join(synth["refer"], "refer", "data", "refcoco", "instances.json")) as f:
        instances = json.load(f)
    for split in ("train", "val"):
        ds = RefCOCO(synth["refer"], split=split)
        assert set(ds.anns) == {r["ann_id"] for r in ds.refs} and set(ds.imgs) == {r["image_id"] for r in ds.refs}
        assert len(ds.anns) < len(instances["annotations"]) and len(ds.imgs) < len(instances["images"])


def test_refcoco_train_view_is_seeded_and_batches(synth):
    ds = RefCOCO(synth["refer"], split="train", tokenizer=Tokenizer(), max_tokens=3, seed=0)
    s = ds[0]
    assert s["image"].shape == (3, 512, 512) and s["mask"].dtype == torch.uint8
    assert s["tokens"].tolist()[-1] == 49407 and s["tokens"].tolist()[0] == 49406  # cut keeps the end token
    i = next(i for i, r in enumerate(ds.refs) if len(r["sentences"]) >= 2)
    first, picks = ds[i]["sentence"], set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        picks.add(ds[i]["sentence"])
    ds.set_epoch(0)
    assert ds[0]["sentence"] == s["sentence"] and ds[i]["sentence"] == first
    assert len(picks) >= 2 and picks <= {x["sent"] for x in ds.refs[i]["sentences"]}  # one sentence per epoch
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["mask"].shape == (2, 512, 512) and batch["tokens"].shape == (2, 3)


def test_refcoco_bad_inputs(synth, tmp_path):
    with pytest.raises(FileNotFoundError, match="refer/data/refcoco"):
        RefCOCO(str(tmp_path))
    import shutil
    root = tmp_path / "coco"
    shutil.copytree(synth["refer"], root)
    with pytest.raises(ValueError, match="testC.*available"):
        RefCOCO(str(root), split="testC")
    # an image of another size than instances.json says: the sample is refused, naming both
    ds = RefCOCO(str(root), split="val")
    photo = ds._image_path(ds.refs[ds.items[0][0]])
    Image.open(photo).resize((10, 12)).save(photo)
    with pytest.raises(BadSampleError, match=r"is \(12, 10\), instances.json says"):
        ds[0]
    refs = root / "refer/data/refcoco/refs(unc).p"
    refs.write_bytes(refs.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p"):
        RefCOCO(str(root))


# ----------------------------------------------------------------------------- KITTI

def test_kitti_kb_crop_depth_scale_and_eval_mask(tmp_path):
    import shutil
    h, w = 375, 1242
    drive = "2011_09_26_drive_0002_sync"
    img_dir = tmp_path / "2011_09_26" / drive / "image_02" / "data"
    gt_dir = tmp_path / "data_depth_annotated" / "train" / drive / "proj_depth" / "groundtruth" / "image_02"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / "0000000005.png")
    raw = rng.integers(0, 90 * 256, (h, w)).astype(np.uint16)
    Image.fromarray(raw).save(gt_dir / "0000000005.png")
    (tmp_path / "test_list.txt").write_text(
        f"2011_09_26/{drive}/image_02/data/0000000005.png {drive}/proj_depth/groundtruth/image_02/0000000005.png 721.5377\n"
        f"2011_09_26/{drive}/image_02/data/0000000006.png None 721.5377\n")
    ds = KITTI(str(tmp_path), split="test")
    assert len(ds) == 1 and ds.without_gt == 1
    s = ds[0]
    assert s["image"].shape == (3, 352, 1216) and s["depth"].shape == (1, 352, 1216)
    expected = raw[375 - 352:, 13:13 + 1216].astype(np.float32) / 256.0  # bottom rows, (1242-1216)/2 = 13
    expected[expected > 80] = 0
    np.testing.assert_allclose(s["depth"][0].numpy(), expected)
    mask = depth_eval_mask(s["orig_size"], "garg", kb_crop=True)
    full = np.zeros((h, w), bool)
    full[153:371, 44:1197] = True  # int(0.40810811*375)=153, int(0.99189189*375)=371, 44, 1197
    np.testing.assert_array_equal(mask.numpy(), full[23:, 13:1229])
    train = KITTI(str(tmp_path), split="train", list_file=str(tmp_path / "test_list.txt"))
    assert train[0]["image"].shape == (3, 352, 352)
    # VPD's eigen_benchmark lists: raw frames under raw_data/, depth paths naming data_depth_annotated/
    (tmp_path / "raw_data").mkdir()
    (tmp_path / "2011_09_26").rename(tmp_path / "raw_data" / "2011_09_26")
    (tmp_path / "vpd_list.txt").write_text(
        f"/raw_data/2011_09_26/{drive}/image_02/data/0000000005.png "
        f"/data_depth_annotated/train/{drive}/proj_depth/groundtruth/image_02/0000000005.png\n")
    vpd_style = KITTI(str(tmp_path), split="test", list_file=str(tmp_path / "vpd_list.txt"))
    np.testing.assert_array_equal(vpd_style[0]["depth"].numpy(), s["depth"].numpy())
    # the same list over BTS's layout, the raw frames in the root itself
    (tmp_path / "raw_data" / "2011_09_26").rename(tmp_path / "2011_09_26")
    bts_layout = KITTI(str(tmp_path), split="test", list_file=str(tmp_path / "vpd_list.txt"))
    assert bts_layout.images == [str(tmp_path / f"2011_09_26/{drive}/image_02/data/0000000005.png")]
    np.testing.assert_array_equal(bts_layout[0]["image"].numpy(), s["image"].numpy())
    (tmp_path / "2011_09_26").rename(tmp_path / "raw_data" / "2011_09_26")
    merged = tmp_path / "data_depth_annotated"  # the same list over merged train/ and val/ folders
    (merged / "train" / drive).rename(merged / drive)
    vpd_style = KITTI(str(tmp_path), split="test", list_file=str(tmp_path / "vpd_list.txt"))
    np.testing.assert_array_equal(vpd_style[0]["depth"].numpy(), s["depth"].numpy())
    # data_depth_annotated.zip unzipped in the root itself: train/ and val/ there, no data_depth_annotated/
    (tmp_path / "train").mkdir()
    (merged / drive).rename(tmp_path / "train" / drive)
    shutil.rmtree(merged)  # (with its emptied train/)
    (tmp_path / "bts_list.txt").write_text(  # BTS's depth path, without train/
        f"raw_data/2011_09_26/{drive}/image_02/data/0000000005.png {drive}/proj_depth/groundtruth/image_02/0000000005.png\n")
    for list_file in ("bts_list.txt", "vpd_list.txt"):
        unzipped = KITTI(str(tmp_path), split="test", list_file=str(tmp_path / list_file))
        np.testing.assert_array_equal(unzipped[0]["depth"].numpy(), s["depth"].numpy())


def _kitti_root(root, gt_dir, size=(375, 1242), metres=10, split="test"):
    """One black KITTI frame of `size` under root, its ground truth (`metres` everywhere) under
    root/<gt_dir>; a BTS-style <split>_list.txt."""
    drive = "2011_09_26_drive_0002_sync"
    img_dir = root / "2011_09_26" / drive / "image_02" / "data"
    gt = root / gt_dir / drive / "proj_depth" / "groundtruth" / "image_02"
    img_dir.mkdir(parents=True)
    gt.mkdir(parents=True)
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(img_dir / "0000000005.png")
    Image.fromarray(np.full(size, metres * 256, np.uint16)).save(gt / "0000000005.png")
    (root / f"{split}_list.txt").write_text(f"2011_09_26/{drive}/image_02/data/0000000005.png "
                                            f"{drive}/proj_depth/groundtruth/image_02/0000000005.png 721.5377\n")
    return str(gt / "0000000005.png")


def test_kitti_unzipped_annotations_are_found_with_val_alone_and_the_folder_wins(tmp_path):
    # data_depth_annotated.zip unzipped in the root, of which only val/ is there (an eval-only setup)
    gt = _kitti_root(tmp_path / "a", "val")
    assert KITTI(str(tmp_path / "a"), split="test").depths == [gt]
    # data_depth_annotated/ is there: a train/ folder of something else in the root does not replace it
    gt = _kitti_root(tmp_path / "b", os.path.join("data_depth_annotated", "train"))
    (tmp_path / "b" / "train").mkdir()
    assert KITTI(str(tmp_path / "b"), split="test").depths == [gt]


def test_float_and_32_bit_images_are_refused_as_photos(tmp_path):
    from vpd.data import check_photo
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.ones((8, 8), np.int32)).save(tmp_path / "int32.tif")
    Image.fromarray(np.full((8, 8), 40000, np.uint16).astype(">u2")).save(tmp_path / "be16.tif")  # big-endian
    for name, mode in (("float.tif", "F"), ("int32.tif", "I"), ("be16.tif", "I;16B")):
        with Image.open(tmp_path / name) as im:
            assert im.mode == mode
            with pytest.raises(ValueError, match=f"mode {mode}"):
                check_photo(im)
        with pytest.raises(BadSampleError, match="16/32-bit"):
            read_rgb(tmp_path / name)


def test_nyu_eigen_mask():
    m = depth_eval_mask((480, 640), "eigen")
    assert m.sum() == 426 * 560 and m[45, 41] and not m[44, 41] and not m[471, 600]


# ----------------------------------------------------------------------------- ImageFolder

def test_image_folder_turns_photos_upright_and_refuses_16_bit_images(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a white band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown rotated 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    s = ImageFolder([str(tmp_path / "phone.jpg")], "refer", size=32)[0]
    assert s["orig_size"].tolist() == [40, 20]  # as viewers show it
    top, bottom = s["image"][:, :8].mean(), s["image"][:, -8:].mean()
    assert top > 0.9 and bottom < -0.9  # the band's side turned to the top
    assert read_rgb(tmp_path / "phone.jpg").shape == (20, 40, 3)  # datasets keep the stored pixels
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(BadSampleError, match="16/32-bit"):
        ImageFolder([str(tmp_path / "deep.png")], "depth", size=32)[0]


def test_image_folder_and_undo(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"a.jpg": (30, 50), "b.png": (40, 20)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    paths = [str(tmp_path / name) for name in sizes]
    ds = ImageFolder(paths, "depth", size=64)
    s = ds[1]  # b.png, 40x20 -> fits 64x64 as 64x32, padded right by 32
    assert s["image"].shape == (3, 64, 64) and s["resized_size"].tolist() == [64, 32]
    assert torch.all(s["image"][:, :, 32:] == 0) and s["path"] == paths[1]
    a = ds[0]  # a.jpg, 30x50 -> 38x64, padded at the bottom (the image keeps its top-left corner)
    assert a["resized_size"].tolist() == [38, 64] and torch.all(a["image"][:, 38:] == 0)
    assert a["image"][:, :38].abs().sum(0).gt(0).float().mean() > 0.9
    back = undo(s["image"], s)
    assert back.shape == (3, 40, 20)
    orig = torch.from_numpy(np.asarray(Image.open(tmp_path / "b.png"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert (back - orig).abs().mean() < 0.35  # random noise, resampled twice
    classes = torch.randint(0, 5, (64, 64))
    assert undo(classes, s).dtype == torch.int64 and undo(classes, s).shape == (40, 20)
    batch = next(iter(DataLoader(ImageFolder(paths, "refer", size=32), batch_size=2)))
    outs = undo(torch.zeros(2, 1, 32, 32), batch)
    assert [tuple(o.shape) for o in outs] == [(1, 30, 50), (1, 40, 20)]
    (tmp_path / "strips").mkdir()  # an extreme aspect either way: the thin side resized to 1 pixel, not 0
    for name, (h, w) in {"wide.png": (1, 1000), "tall.png": (1000, 1)}.items():
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(tmp_path / "strips" / name)
        s = ImageFolder([str(tmp_path / "strips" / name)], "depth", size=64)[0]
        assert s["image"].shape == (3, 64, 64) and min(s["resized_size"].tolist()) == 1
        grey = 128 / 127.5 - 1
        strip, pad = (s["image"][:, :1], s["image"][:, 1:]) if h == 1 else (s["image"][..., :1], s["image"][..., 1:])
        assert torch.allclose(strip, torch.full_like(strip, grey), atol=1e-6) and torch.all(pad == 0)
        assert torch.allclose(undo(s["image"], s), torch.full((3, h, w), grey), atol=1e-6)  # its pixels back
    with pytest.raises(ValueError, match="at least one image"):
        ImageFolder([], "depth")
    with pytest.raises(FileNotFoundError, match="c.jpg"):
        ImageFolder([str(tmp_path / "c.jpg")], "depth")
    with pytest.raises(ValueError, match="task"):
        ImageFolder(paths, "pose")


# ----------------------------------------------------------------------------- transforms

def test_semseg_augmentation_is_a_function_of_seed_epoch_index():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (60, 80, 3)).astype(np.float32)
    label = rng.integers(0, 5, (60, 80))
    a = T.semseg_train(img, label, T.sample_rng(0, 0, 3))
    b = T.semseg_train(img, label, T.sample_rng(0, 0, 3))
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    for other in (T.sample_rng(1, 0, 3), T.sample_rng(0, 1, 3), T.sample_rng(0, 0, 4)):
        assert not torch.equal(T.semseg_train(img, label, other)[0], a[0])
    x, y = a
    assert x.shape == (3, 512, 512) and y.shape == (512, 512)
    # pad regions: where the label is 255 padding, the image is 0
    pad_rows = (y == 255).all(dim=1)
    assert torch.all(x[:, pad_rows] == 0)


def test_cat_max_ratio_is_respected_when_a_crop_allows_it():
    label = np.zeros((100, 100), np.int64)
    label[:, 70:] = 1  # crops with left in 33..50 have both classes below 75%
    crop = (50, 50)

    def ok(box):
        t, l = box
        counts = np.bincount(label[t:t + 50, l:l + 50].ravel(), minlength=2)
        return counts.max() / counts.sum() < 0.75 and (counts > 0).sum() > 1
    with_rule = [ok(T.crop_with_cat_max_ratio(label, crop, T.sample_rng(s, 0, 0))) for s in range(200)]
    without = [ok(T.crop_with_cat_max_ratio(label, crop, T.sample_rng(s, 0, 0), cat_max_ratio=1.0)) for s in range(200)]
    # one try succeeds with p = 18/51; ten tries fail with p = (33/51)^10 ~ 1.3%, then an 11th free crop
    assert np.mean(with_rule) > 0.95 and np.mean(without) < 0.5
    ignored = label.copy()
    ignored[:, 70:] = 255  # ignored pixels do not count as a class: the rule can never pass
    box = T.crop_with_cat_max_ratio(ignored, crop, T.sample_rng(0, 0, 0))
    assert 0 <= box[0] <= 50 and 0 <= box[1] <= 50


def test_cut_depth_writes_a_full_height_stripe_of_normalised_depth():
    img = np.zeros((20, 30, 3), np.float32)
    depth = np.full((20, 30), 5.0, np.float32)
    out = T.cut_depth(img, depth, np.random.default_rng(0), max_depth=10.0)
    cols = np.flatnonzero(out[0, :, 0] > 0)
    assert len(cols) >= 1 and np.all(np.diff(cols) == 1)
    assert np.all(out[:, cols] == 127.5) and np.all(np.delete(out, cols, axis=1) == 0)


def test_depth_augmentation_applies_cut_depth_to_a_quarter_of_samples_changing_with_the_epoch():
    # A flat grey image stays one colour under every colour jitter (each is a per-pixel function
    # of the value), so two distinct colours after augmentation mean a CutDepth stripe.
    img = np.full((40, 40, 3), 100.0, np.float32)
    depth = np.full((40, 40), 10.0, np.float32)  # written as 255

    def stripe(epoch, index):
        x, _ = T.depth_train(img, depth, T.sample_rng(0, epoch, index), (40, 40))
        return {1: False, 2: True}[len(torch.unique(x.reshape(3, -1), dim=1).T)]
    hits = np.array([[stripe(e, i) for i in range(50)] for e in range(8)])  # (epoch, index)
    assert 0.15 < hits.mean() < 0.35  # 400 draws of p = 1/4: 3.3 standard deviations either side
    assert hits.any(axis=0).sum() > 35 and not hits.all(axis=0).any()  # not the same samples every epoch


def test_hsv_matches_colorsys_and_round_trips():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (4, 5, 3))
    img[0, :3] = [[0, 0, 0], [90, 90, 90], [200, 200, 40]]  # black, grey, two equal largest channels
    hsv = T.rgb_to_hsv(img)
    ref = np.array([colorsys.rgb_to_hsv(*(p / 255)) for p in img.reshape(-1, 3)]).reshape(4, 5, 3)
    np.testing.assert_allclose(hsv[..., 0] / 360.0, ref[..., 0], atol=1e-9)
    np.testing.assert_allclose(hsv[..., 1:], ref[..., 1:], atol=1e-9)
    np.testing.assert_allclose(T.hsv_to_rgb(hsv), img, atol=1e-9)
    whole = img.round()  # 8-bit input is read as the same numbers (channel differences must not wrap)
    np.testing.assert_allclose(T.rgb_to_hsv(whole.astype(np.uint8)), T.rgb_to_hsv(whole), atol=1e-4)
    np.testing.assert_allclose(T.saturate(whole.astype(np.uint8), 1.5), T.saturate(whole, 1.5), atol=1e-3)


def test_saturation_is_colorsys_hsv_with_saturation_scaled_and_clipped():
    # mmseg's saturation step goes through HSV; saturate() skips the round trip and must land on the same RGB
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, (6, 7, 3))
    img[0, :3] = [[0, 0, 0], [90, 90, 90], [200, 200, 40]]
    for factor in (0.0, 0.5, 1.5, 4.0):  # 4: most pixels clip at saturation 1
        ref = []
        for p in img.reshape(-1, 3) / 255:
            h, sat, v = colorsys.rgb_to_hsv(*p)
            ref.append(colorsys.hsv_to_rgb(h, min(sat * factor, 1.0), v))
        np.testing.assert_allclose(T.saturate(img, factor), np.array(ref).reshape(img.shape) * 255, atol=1e-9)


def test_keep_ratio_size_by_hand():
    assert T.keep_ratio_size(480, 640, (2048, 512)) == (512, 683)
    assert T.keep_ratio_size(100, 1000, (2048, 512)) == (205, 2048)  # long side caps the factor at 2.048


def test_refer_resize_matches_pil_as_lavt_and_vpd_resize():
    # VPD's refer/transforms.py resizes PIL images with torchvision: the image by PIL's (antialiased)
    # bilinear, the "P"-mode mask by PIL's nearest; Pillow is the independent reference here
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (61, 90, 3), dtype=np.uint8)
    mask = (rng.random((61, 90)) > 0.5).astype(np.uint8)
    x, m = T.refer_resize(img.astype(np.float32), mask, (40, 70))  # down in both sides
    ref = np.asarray(Image.fromarray(img).resize((70, 40), Image.BILINEAR)).astype(np.float32)
    assert np.abs(((x.permute(1, 2, 0) + 1) * 127.5).numpy() - ref).max() <= 1.01  # PIL rounds to uint8
    ref_mask = np.asarray(Image.fromarray(mask, mode="L").convert("P").resize((70, 40), Image.BILINEAR))
    np.testing.assert_array_equal(m.numpy(), ref_mask)


def test_photometric_hue_shift_range_is_mmsegs():
    # mmseg draws the hue shift with numpy's randint(-18, 18): -18..17, never +18
    from vpd.transforms import photometric_distortion, rgb_to_hsv
    img = np.full((1, 1, 3), (200.0, 50.0, 50.0), np.float32)  # saturated red, hue 0
    shifts = set()
    for seed in range(400):
        out = photometric_distortion(img, np.random.default_rng(seed), brightness_delta=0, contrast=(1, 1),
                                     saturation=(1, 1))
        hue = float(rgb_to_hsv(out)[0, 0, 0])
        shifts.add(round(((hue + 180) % 360 - 180) / 2))
    assert min(shifts) == -18 and max(shifts) == 17


def test_depth_augmentation_flips_image_and_depth_together():
    # image and depth both rise left to right; every step keeps that order per pixel on a grey ramp
    # (CutDepth writes the depth as grey, rising too), so after any flip they must still agree
    ramp = np.linspace(50, 200, 64, dtype=np.float32)
    img = np.repeat(np.tile(ramp, (48, 1))[..., None], 3, axis=2)
    depth = np.tile(np.linspace(1, 9, 64, dtype=np.float32), (48, 1))
    signs = set()
    for seed in range(20):
        x, d = T.depth_train(img, depth, T.sample_rng(seed, 0, 0), (32, 32))
        a, b = x[:, :, -1].mean() - x[:, :, 0].mean(), d[:, :, -1].mean() - d[:, :, 0].mean()
        assert (a > 0) == (b > 0), seed
        signs.add(bool(b > 0))
    assert signs == {True, False}  # both flipped and unflipped samples were seen


def test_semseg_crop_padding_is_ignored_and_cat_max_ratio_skips_ignored_pixels():
    rng = np.random.default_rng(0)
    img, label = rng.uniform(0, 255, (64, 64, 3)).astype(np.float32), rng.integers(0, 5, (64, 64))
    x, y = T.semseg_train(img, label, T.sample_rng(0, 0, 0), ratio_range=(0.5, 0.5))  # 64x64 -> 256x256
    assert (y[256:] == 255).all() and (y[:, 256:] == 255).all() and (y[:256, :256] != 255).all()
    # mmseg pads after Normalize with pad_val=0: 0 in the network's [-1, 1] input, not black (-1)
    assert (x[:, 256:] == 0).all() and (x[:, :, 256:] == 0).all()
    # the left 2x2 box holds one labelled class (and ignored pixels): always refused for the right one
    two = np.array([[255, 0, 1], [255, 0, 1]])
    assert all(T.crop_with_cat_max_ratio(two, (2, 2), T.sample_rng(s, 0, 0))[1] == 1 for s in range(30))


class Scripted:
    """A generator whose draws are given in order (random / uniform / integers share one queue)."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def random(self):
        return self.draws.pop(0)

    def uniform(self, low=0.0, high=1.0):
        return self.draws.pop(0)

    def integers(self, low, high=None):
        return self.draws.pop(0)


def test_cut_depth_stripe_and_brightness_by_hand():
    img, depth = np.full((10, 100, 3), 100.0, np.float32), np.full((10, 100), 5.0, np.float32)
    # a = 0.5, b = 1: stripe from column 50, int((100 - 50) * 1 * 0.75) = 37 wide, depth 5 / 10 -> 127.5
    out = T.cut_depth(img, depth, Scripted(0.5, 1.0), max_depth=10.0)
    assert np.flatnonzero(out[0, :, 0] == 127.5).tolist() == list(range(50, 87))
    # depth recipe with only brightness on: alpha = 1, beta = 0.1 of 255 -> 100 + 25.5
    draws = Scripted(0.9,  # no CutDepth
                     0.9,  # no flip
                     0, 0,  # crop at (0, 0)
                     0.1, 0.0, 0.1,  # brightness/contrast: on, alpha - 1 = 0, beta = 0.1
                     0.9, 0.9)  # no gamma, no hue/saturation/value
    x, _ = T.depth_train(img, depth, draws, (10, 100))
    torch.testing.assert_close((x + 1) * 127.5, torch.full_like(x, 125.5))
    # and with contrast: alpha = 1 + 0.2, beta = 0.1 of 255 -> 100 * 1.2 + 25.5 (albumentations: alpha first)
    draws = Scripted(0.9, 0.9, 0, 0, 0.1, 0.2, 0.1, 0.9, 0.9)
    x, _ = T.depth_train(img, depth, draws, (10, 100))
    torch.testing.assert_close((x + 1) * 127.5, torch.full_like(x, 145.5))


def test_ade20k_evaluation_view_is_resized_without_antialiasing(tmp_path):
    # mmseg resizes with OpenCV's INTER_LINEAR: a 2x downscale averages 2x2 blocks (no wider filter)
    base = tmp_path / "ADEChallengeData2016"
    for d in ("images/validation", "annotations/validation"):
        (base / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(base / "images/validation/a.jpg", quality=100)
    Image.fromarray(rng.integers(0, 151, (8, 8), dtype=np.uint8)).save(base / "annotations/validation/a.png")
    decoded = np.asarray(Image.open(base / "images/validation/a.jpg"), dtype=np.float32)
    x = ADE20K(str(tmp_path), "validation", train=False, scale=(8, 4))[0]["image"]  # short side 8 -> 4
    blocks = decoded.reshape(4, 2, 4, 2, 3).mean((1, 3))
    torch.testing.assert_close(x, torch.from_numpy(blocks).permute(2, 0, 1) / 127.5 - 1, atol=1e-5, rtol=0)


def test_cat_max_ratio_refuses_a_crop_at_exactly_the_ratio():
    # mmseg keeps a crop only when the largest class covers strictly less than cat_max_ratio
    label = np.zeros((4, 8), np.int64)
    label[:, 3:5] = 1
    # first box (0, 0): columns 0..3 hold 12 zeros and 4 ones, 12/16 = 0.75 exactly -> refused;
    # second box (0, 2): columns 2..5 hold 8 and 8 -> kept
    assert T.crop_with_cat_max_ratio(label, (4, 4), Scripted(0, 0, 0, 2)) == (0, 2)


def test_photometric_distortion_clips_brightness_and_saturation_like_mmseg():
    # mmseg's convert() clips every step to the valid range: brightness to [0, 255], saturation to its maximum
    grey = np.full((1, 1, 3), 240.0, np.float32)
    # brightness on with delta +32; contrast last; saturation, hue and contrast off: 272 -> 255
    out = T.photometric_distortion(grey, Scripted(1, 32.0, 0, 0, 0, 0))
    assert out.tolist() == [[[255.0, 255.0, 255.0]]]
    red = np.full((1, 1, 3), (200.0, 50.0, 50.0), np.float32)  # hue 0, saturation 0.75, value 200
    # saturation x1.5 -> 1.125, clipped to 1: the minimum channel becomes 200 * (1 - 1) = 0
    out = T.photometric_distortion(red, Scripted(0, 0, 1, 1.5, 0, 0))
    np.testing.assert_allclose(out[0, 0], [200.0, 0.0, 0.0], atol=1e-3)


def test_semseg_flip_mirrors_image_and_label_left_right_together():
    # mmseg RandomFlip (horizontal, p = 0.5); resize at ratio 1 to the same size is the identity here
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (8, 12, 3)).astype(np.float32)
    label = rng.integers(0, 5, (8, 12))
    kw = dict(scale=(12, 8), crop=(8, 12), cat_max_ratio=1.0)
    photometric_off = (0, 0, 0, 0, 0)
    for flip_draw, cols in ((0.1, slice(None, None, -1)), (0.9, slice(None))):
        x, y = T.semseg_train(img, label, Scripted(1.0, 0, 0, flip_draw, *photometric_off), **kw)
        np.testing.assert_array_equal(y.numpy(), label[:, cols])
        torch.testing.assert_close(x, torch.from_numpy(img[:, cols] / 127.5 - 1).permute(2, 0, 1).float())


def test_cut_depth_stripe_is_at_least_one_column_and_clipped_to_white():
    img, depth = np.zeros((4, 10, 3), np.float32), np.full((4, 10), 15.0, np.float32)  # deeper than max_depth
    # a = 0.5, b = 0: int(max((10 - 5) * 0 * 0.75, 1)) = 1 column, at 5; 15 m / 10 m * 255 is clipped to 255
    out = T.cut_depth(img, depth, Scripted(0.5, 0.0), max_depth=10.0)
    assert np.flatnonzero(out[0, :, 0]).tolist() == [5]
    assert np.all(out[:, 5] == 255.0)


def test_depth_hue_saturation_value_shifts_are_in_opencv_8bit_units():
    # albumentations HueSaturationValue on uint8 images: hue in 180-per-turn units, saturation/value in 0..255
    img = np.full((2, 2, 3), (200.0, 50.0, 50.0), np.float32)  # hue 0, s = 0.75, v = 200
    draws = Scripted(0.9, 0.9, 0, 0,  # no CutDepth, no flip, crop at (0, 0)
                     0.9, 0.9,  # no brightness/contrast, no gamma
                     0.1, 10.0, 51.0, 20.0)  # HSV on: hue +10 (20 degrees), saturation +51, value +20
    x, _ = T.depth_train(img, np.ones((2, 2), np.float32), draws, (2, 2))
    # s = 0.75 + 51/255 = 0.95, v = 220: max 220, min 220 * 0.05 = 11, at 20 degrees G = 11 + 209 * 20/60
    expected = torch.tensor([220.0, 11.0 + 209.0 / 3.0, 11.0])
    torch.testing.assert_close((x[:, 0, 0] + 1) * 127.5, expected, atol=1e-3, rtol=0)
    # saturation and value clip at their maxima: s = 0.9 + 0.2 -> 1 (the smallest channel 0), v = 250 + 20 -> 255
    img = np.full((2, 2, 3), (250.0, 25.0, 25.0), np.float32)
    draws = Scripted(0.9, 0.9, 0, 0, 0.9, 0.9, 0.1, 0.0, 51.0, 20.0)
    x, _ = T.depth_train(img, np.ones((2, 2), np.float32), draws, (2, 2))
    torch.testing.assert_close((x[:, 0, 0] + 1) * 127.5, torch.tensor([255.0, 0.0, 0.0]), atol=1e-3, rtol=0)


def test_depth_crop_larger_than_the_image_in_one_side_is_an_error():
    with pytest.raises(ValueError, match="smaller than the crop"):
        T.depth_train(np.zeros((40, 30, 3), np.float32), np.ones((40, 30), np.float32), T.sample_rng(0, 0, 0),
                      (32, 32))


# ----------------------------------------------------------------------------- published class orders, dataset details

def test_nyu_and_ade_class_orders_are_the_published_ones():
    # row i of a released depth model's class_embeddings is VPD's depth/nyu_class_list.json entry i
    vpd_list = ["printer_room", "bathroom", "living_room", "study", "conference_room", "study_room", "kitchen",
                "home_office", "bedroom", "dinette", "playroom", "indoor_balcony", "laundry_room", "basement",
                "excercise_room", "foyer", "home_storage", "cafe", "furniture_store", "office_kitchen",
                "student_lounge", "dining_room", "reception_room", "computer_lab", "classroom", "office", "bookstore"]
    assert list(NYU_SCENES) == vpd_list
    # class k is PNG value k + 1: mmseg's ADE20KDataset classes, as written there ("bed " with its space)
    mmseg = ["wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass",
             "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
             "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
             "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
             "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
             "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
             "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
             "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
             "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
             "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
             "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
             "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
             "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
             "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
             "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
             "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag"]
    assert list(ADE20K_CLASSES) == [name.strip() for name in mmseg]


def test_reduce_ade_label_by_hand():
    from vpd.data import reduce_ade_label
    out = reduce_ade_label(np.array([[0, 1, 2], [149, 150, 0]], np.uint8))
    assert out.dtype == np.int64 and out.tolist() == [[255, 0, 1], [148, 149, 255]]
    with pytest.raises(BadSampleError, match="151"):
        reduce_ade_label(np.array([[151]], np.uint8))


def test_nyu_evaluation_view_of_the_training_split_reads_sync(synth):
    # the split names the folder (sync/ vs official_splits/test/), `train` only the augmentation
    ds = NYUv2(synth["depth"], split="train", train=False)
    assert all(os.sep + "sync" + os.sep in p for p in ds.images)
    s = ds[0]  # image 0 (room 0) is a training image, at full size
    assert s["image"].shape == (3, 48, 64)
    np.testing.assert_allclose(s["depth"][0].numpy(), scene_sample(0, 0, 64)["depth"], atol=5.1e-4)
    test_aug = NYUv2(synth["depth"], split="test", train=True, crop=(32, 32))
    assert all("official_splits" in p for p in test_aug.images) and test_aug[0]["image"].shape == (3, 32, 32)


def test_kitti_odd_width_frame_image_and_depth_share_the_kb_crop(tmp_path):
    # a 376x1241 frame (drive 2011_09_28's size): BTS's left margin int((1241 - 1216) / 2) = 12, top 376 - 352 = 24
    from vpd.data import kb_crop_box
    assert kb_crop_box(376, 1241) == (24, 12) and kb_crop_box(375, 1242) == (23, 13)
    assert kb_crop_box(370, 1224) == (18, 4) and kb_crop_box(374, 1238) == (22, 11)
    h, w, drive = 376, 1241, "2011_09_28_drive_0001_sync"
    img_dir = tmp_path / "2011_09_28" / drive / "image_02" / "data"
    gt_dir = tmp_path / "data_depth_annotated" / "val" / drive / "proj_depth" / "groundtruth" / "image_02"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(img_dir / "0000000001.png")  # PNG: exact pixels back
    raw = rng.integers(0, 70 * 256, (h, w)).astype(np.uint16)
    Image.fromarray(raw).save(gt_dir / "0000000001.png")
    image = f"2011_09_28/{drive}/image_02/data/0000000001.png"
    gt = f"{drive}/proj_depth/groundtruth/image_02/0000000001.png"
    # BTS list (gt under the download's val/ folder), with a frame without ground truth first
    (tmp_path / "bts.txt").write_text(f"{image.replace('01.png', '00.png')} None 707.0\n{image} {gt} 707.0\n")
    # VPD's list names data_depth_annotated/val/ itself
    (tmp_path / "vpd.txt").write_text(f"/{image} /data_depth_annotated/val/{gt}\n")
    for lst in ("bts.txt", "vpd.txt"):
        ds = KITTI(str(tmp_path), split="test", list_file=str(tmp_path / lst))
        assert len(ds) == 1 and ds.without_gt == (1 if lst == "bts.txt" else 0)
        s = ds[0]
        np.testing.assert_array_equal(s["depth"][0].numpy(), raw[24:, 12:12 + 1216].astype(np.float32) / 256.0)
        expected = torch.from_numpy(rgb[24:, 12:12 + 1216].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
        torch.testing.assert_close(s["image"], expected, atol=1e-6, rtol=0)
    merged = tmp_path / "data_depth_annotated"  # val/ merged into the folder: VPD's list still names val/
    (merged / "val" / drive).rename(merged / drive)
    s = KITTI(str(tmp_path), split="test", list_file=str(tmp_path / "vpd.txt"))[0]
    np.testing.assert_array_equal(s["depth"][0].numpy(), raw[24:, 12:12 + 1216].astype(np.float32) / 256.0)


def test_kitti_eigen_eval_mask_by_hand():
    # Eigen crop of a 375x1242 frame: rows int(0.3324324*375) = 124 .. int(0.91351351*375) = 342,
    # columns int(0.0359477*1242) = 44 .. int(0.96405229*1242) = 1197
    full = np.zeros((375, 1242), bool)
    full[124:342, 44:1197] = True
    np.testing.assert_array_equal(depth_eval_mask((375, 1242), "kitti_eigen").numpy(), full)
    np.testing.assert_array_equal(depth_eval_mask((375, 1242), "kitti_eigen", kb_crop=True).numpy(),
                                  full[23:, 13:1229])


def test_refcoco_train_view_draws_every_sentence_of_a_ref(synth):
    ds = RefCOCO(synth["refer"], split="train")
    i = max(range(len(ds.refs)), key=lambda j: len(ds.refs[j]["sentences"]))
    assert len(ds.refs[i]["sentences"]) == 3
    picks = set()
    for epoch in range(40):  # a sentence missing after 40 uniform draws of 3: p = 3 (2/3)^40 ~ 3e-7
        ds.set_epoch(epoch)
        picks.add(ds[i]["sentence"])
    assert picks == {x["sent"] for x in ds.refs[i]["sentences"]}


def test_refcoco_images_are_named_by_instances_not_by_the_refs_file_name(synth, tmp_path):
    # REFER's refs carry a file_name with a suffix ("COCO_train2014_000000581857_16.jpg") that names no
    # file; the image file is the one instances.json gives for the ref's image_id
    import pickle
    import shutil
    root = tmp_path / "coco"
    shutil.copytree(synth["refer"], root)
    refs_file = root / "refer/data/refcoco/refs(unc).p"
    refs = pickle.loads(refs_file.read_bytes())
    for r in refs:
        r["file_name"] = f"COCO_train2014_{r['image_id']:012d}_{r['ref_id'] % 7}.jpg"
    refs_file.write_bytes(pickle.dumps(refs, protocol=2))
    ds = RefCOCO(str(root), split="val")
    s = ds[0]
    truth = scene_sample(0, 7, 64)  # the val image
    assert s["mask"].shape == truth["instances"].shape and s["mask"].sum() > 0


def test_refcoco_view_follows_train_not_the_split_name(synth):
    # the evaluation view walks every sentence whatever the split; the training view one sample per ref
    ev = RefCOCO(synth["refer"], split="train", train=False)
    assert len(ev) == sum(len(r["sentences"]) for r in ev.refs) > len(ev.refs)
    s = ev[0]
    assert s["orig_size"].tolist() == list(s["mask"].shape) == [48, 64]  # (H, W) of the 64-wide, 48-high image
    tr = RefCOCO(synth["refer"], split="val", train=True)
    assert len(tr) == len(tr.refs) and "orig_size" not in tr[0]


# ----------------------------------------------------------------------------- transforms: the recipes in detail

def test_semseg_label_resize_is_opencv_nearest():
    # mmcv rescales labels with cv2.INTER_NEAREST: output pixel d takes source floor(d * in / out), not the
    # pixel-centre floor((d + 0.5) * in / out). 7 -> 5 (scale 1.4): sources 0, 1, 2, 4, 5 (centres: 0, 2, 3, 4, 6)
    label = 10 * np.arange(7)[:, None] + np.arange(7)[None]  # label[y, x] = 10 y + x
    img = np.zeros((7, 7, 3), np.float32)
    _, y = T.semseg_train(img, label, Scripted(1.0, 0, 0, 0.9, 0, 0, 0, 0, 0), scale=(5, 5), crop=(5, 5),
                          cat_max_ratio=1.0)  # ratio 1, crop at (0, 0), no flip, photometric steps off
    src = np.array([0, 1, 2, 4, 5])
    np.testing.assert_array_equal(y.numpy(), 10 * src[:, None] + src[None])


def test_semseg_scale_ratio_is_truncated_as_mmsegs():
    # mmseg Resize(ratio_range): scale (int(2048 r), int(512 r)); r = 0.9995 gives (2046, 511), so a 100x100
    # label becomes 511x511 and the 512 crop is padded by one ignored row and column (rounding: 512, no pad)
    rng = np.random.default_rng(0)
    img, label = rng.uniform(0, 255, (100, 100, 3)).astype(np.float32), rng.integers(0, 5, (100, 100))
    _, y = T.semseg_train(img, label, Scripted(0.9995, 0, 0, 0.9, 0, 0, 0, 0, 0), cat_max_ratio=1.0)
    assert (y[511] == 255).all() and (y[:, 511] == 255).all() and (y[:511, :511] != 255).all()


def test_random_crop_reaches_every_offset():
    # mmseg / albumentations: offset = randint(0, margin + 1), so the last offset (the crop at the far
    # edge) is drawn too: margins 2 and 4 give tops 0..2 and lefts 0..4
    boxes = {T.random_crop_box(10, 12, (8, 8), np.random.default_rng(s)) for s in range(200)}
    assert {t for t, _ in boxes} == {0, 1, 2} and {l for _, l in boxes} == {0, 1, 2, 3, 4}


def test_cat_max_ratio_tries_ten_crops_then_takes_an_eleventh():
    # mmseg RandomCrop: a first box, up to 10 checks each drawing a new box on failure: the 11th box is
    # taken unchecked. A one-class label fails every check, so the boxes drawn are (0, 0), (0, 1), ... (0, 10)
    label = np.zeros((8, 16), np.int64)
    draws = Scripted(*[v for i in range(11) for v in (0, i)])
    assert T.crop_with_cat_max_ratio(label, (4, 4), draws) == (0, 10)
    assert draws.draws == []


def test_photometric_contrast_is_applied_first_or_last():
    # mmseg: contrast (alpha in 0.5..1.5, clipped to [0, 255]) either right after brightness or at the end
    grey = np.full((1, 1, 3), 100.0, np.float32)
    # brightness off, contrast first (on, x1.5), saturation off, hue off
    assert T.photometric_distortion(grey, Scripted(0, 1, 1, 1.5, 0, 0)).tolist() == [[[150.0] * 3]]
    # brightness off, contrast last: saturation off, hue off, contrast on (x0.5)
    assert T.photometric_distortion(grey, Scripted(0, 0, 0, 0, 1, 0.5)).tolist() == [[[50.0] * 3]]
    # 200 x 1.5 = 300 is clipped to 255
    assert T.photometric_distortion(2 * grey, Scripted(0, 1, 1, 1.5, 0, 0)).tolist() == [[[255.0] * 3]]


def test_augmentation_ranges_are_the_recipes():
    img = np.full((8, 8, 3), 100.0, np.float32)

    def uniform_ranges(rng):
        return [c[1:] for c in rng.calls if c[0] == "uniform"]
    # mmseg PhotoMetricDistortion defaults: brightness +-32, contrast 0.5..1.5, saturation 0.5..1.5
    rng = Gates(0.1)  # below every probability: each step applies
    T.photometric_distortion(img, rng)
    assert uniform_ranges(rng) == [(-32, 32), (0.5, 1.5), (0.5, 1.5)]
    # VPD's NYU recipe (albumentations): RandomBrightnessContrast(0.2, 0.2), RandomGamma(80, 120),
    # HueSaturationValue(20, 30, 20)
    rng = Gates(0.1)
    T.depth_train(img, np.ones((8, 8), np.float32), rng, (8, 8))
    assert uniform_ranges(rng) == [(-0.2, 0.2), (-0.2, 0.2), (80, 120), (-20, 20), (-30, 30), (-20, 20)]


class Gates:
    """A generator whose random() draws are all `x` (a step gated by p applies iff x < p), recording every
    call; uniform gives the middle of its range, integers its lowest value (1 for an integers(n) coin)."""

    def __init__(self, x):
        self.x, self.calls = x, []

    def random(self):
        self.calls.append("random")
        return self.x

    def uniform(self, low=0.0, high=1.0):
        self.calls.append(("uniform", low, high))
        return (low + high) / 2

    def integers(self, low, high=None):
        self.calls.append(("integers", low, high))
        return low if high is not None else 1


def test_semseg_recipe_draws_mmsegs_ranges_and_flips_with_p_one_half():
    # mmseg's ADE20K pipeline: Resize(ratio_range=(0.5, 2.0)), RandomCrop, RandomFlip(prob=0.5), then
    # PhotoMetricDistortion, whose every coin is randint(2) (contrast first: its second coin skipped)
    label = np.arange(100).reshape(10, 10)  # 1.25 x scale (8, 8) = (10, 10): no resize; 100 classes
    photometric = [("integers", 2, None), ("uniform", -32, 32), ("integers", 2, None), ("integers", 2, None),
                   ("uniform", 0.5, 1.5), ("integers", 2, None), ("uniform", 0.5, 1.5), ("integers", 2, None),
                   ("integers", -18, 18)]
    for x, flipped in ((0.4999, True), (0.5001, False)):
        rng = Gates(x)
        _, y = T.semseg_train(np.zeros((10, 10, 3), np.float32), label, rng, scale=(8, 8), crop=(4, 4))
        assert rng.calls == [("uniform", 0.5, 2.0), ("integers", 0, 7), ("integers", 0, 7), "random", *photometric]
        assert y.tolist() == (label[:4, 3::-1] if flipped else label[:4, :4]).tolist()


def test_semseg_crop_is_redrawn_while_a_class_covers_three_quarters():
    # mmseg RandomCrop(cat_max_ratio=0.75): a crop where one class has >= 75% of the labelled pixels is
    # drawn again, 10 times at most (our Gates keep drawing the same top-left crop: 2 + 10 x 2 offsets)
    for ones, redrawn in ((4, True), (5, False)):  # 12 / 16 = 0.75: redrawn; 11 / 16: kept
        label = np.zeros((10, 10), np.int64)
        label.flat[[r * 10 + c for r in range(4) for c in range(4)][:ones]] = 1
        rng = Gates(0.9)
        T.semseg_train(np.zeros((10, 10, 3), np.float32), label, rng, scale=(8, 8), crop=(4, 4))
        assert rng.calls.count(("integers", 0, 7)) == (22 if redrawn else 2)


def test_depth_recipe_cuts_a_quarter_and_flips_and_colours_with_p_one_half():
    # VPD's NYU recipe: CutDepth on p = 0.25 (two draws: position, width), then albumentations'
    # HorizontalFlip, RandomBrightnessContrast, RandomGamma, HueSaturationValue, each p = 0.5
    depth = np.tile(np.arange(1.0, 9.0, dtype=np.float32), (8, 1))
    colour = [("uniform", -0.2, 0.2), ("uniform", -0.2, 0.2), "random", ("uniform", 80, 120), "random",
              ("uniform", -20, 20), ("uniform", -30, 30), ("uniform", -20, 20)]
    crop = [("integers", 0, 1), ("integers", 0, 1)]
    for x, cut, on in ((0.2499, True, True), (0.2501, False, True), (0.4999, False, True), (0.5001, False, False)):
        rng = Gates(x)
        _, d = T.depth_train(np.zeros((8, 8, 3), np.float32), depth, rng, (8, 8))
        expected = ["random", *(["random", "random"] if cut else []), "random", *crop, "random"]
        expected += colour if on else ["random", "random"]
        assert rng.calls == expected, x
        assert d[0].tolist() == (depth[:, ::-1] if on else depth).tolist()


def test_depth_gamma_by_hand():
    # albumentations RandomGamma: (x / 255) ** (g / 100) * 255; g = 120 on grey 127.5 -> 255 * 0.5 ** 1.2
    img, depth = np.full((4, 4, 3), 127.5, np.float32), np.ones((4, 4), np.float32)
    draws = Scripted(0.9, 0.9, 0, 0,  # no CutDepth, no flip, crop at (0, 0)
                     0.9,  # no brightness/contrast
                     0.1, 120.0,  # gamma on, 1.2
                     0.9)  # no hue/saturation/value
    x, _ = T.depth_train(img, depth, draws, (4, 4))
    torch.testing.assert_close((x + 1) * 127.5, torch.full_like(x, 255 * 0.5 ** 1.2))


def test_cut_depth_stripe_starts_at_the_truncated_position():
    # VPD: l = int(alpha * W); alpha = 0.37, W = 10 -> column 3 (not 4), one column wide (beta = 0)
    out = T.cut_depth(np.zeros((2, 10, 3), np.float32), np.full((2, 10), 5.0, np.float32), Scripted(0.37, 0.0),
                      max_depth=10.0)
    assert np.flatnonzero(out[0, :, 0]).tolist() == [3]


# ----------------------------------------------------------------------------- dataset classes: lists, defaults, file checks

def test_split_list_skips_blank_lines_and_refuses_short_lines_and_empty_lists(synth, tmp_path):
    lines = open(os.path.join(synth["depth"], "train_list.txt")).read().splitlines()
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("\n" + "\n\n".join(lines) + "\n\n")  # blank lines anywhere are no samples
    assert NYUv2(synth["depth"], list_file=str(spaced)).images == NYUv2(synth["depth"]).images
    short = tmp_path / "short.txt"
    short.write_text(lines[0] + "\n/classroom_0000/rgb_00001.jpg\n")  # a line without its depth path
    with pytest.raises(ValueError, match=r"short\.txt:2: expected 'image depth"):
        NYUv2(synth["depth"], list_file=str(short))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        NYUv2(synth["depth"], list_file=str(empty))


def _write_nyu_frame(root, depth_mm):
    """One 480x640 NYU training frame (black image, constant depth) and its BTS list line."""
    scene = root / "sync" / "kitchen_0001"
    scene.mkdir(parents=True)
    Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(scene / "rgb_00001.png")
    Image.fromarray(np.full((480, 640), depth_mm, np.uint16)).save(scene / "sync_depth_00001.png")
    (root / "train_list.txt").write_text("/kitchen_0001/rgb_00001.png /kitchen_0001/sync_depth_00001.png 518.8\n")


def test_nyu_training_defaults_are_vpds_480_crop_and_10_m(tmp_path):
    # VPD's NYU recipe: 480x480 crops; depths up to 10 m, which is also the model's output cap and the
    # scale CutDepth writes depth with (5 m -> grey 127.5, i.e. 0 in [-1, 1])
    from vpd.tasks import model_kwargs
    _write_nyu_frame(tmp_path, 5000)
    ds = NYUv2(str(tmp_path))
    assert model_kwargs("depth", ds, demo=False)["max_depth"] == 10.0
    # CutDepth on (a = 0.5, b = 0: column 320), no flip, crop at (0, 0), colour steps off
    ds.rng = lambda index: Scripted(0.0, 0.5, 0.0, 0.9, 0, 0, 0.9, 0.9, 0.9)
    s = ds[0]
    assert s["image"].shape == (3, 480, 480) and s["depth"].shape == (1, 480, 480)
    torch.testing.assert_close(s["image"][:, :, 320], torch.zeros(3, 480))
    assert (s["image"][:, :, 319] == -1).all() and (s["image"][:, :, 321] == -1).all()


def test_kitti_frame_of_exactly_the_kb_size_and_cut_depth_at_80_m(tmp_path):
    # a frame already 352x1216 is its own KB crop; KITTI's CutDepth writes depth / 80 m * 255
    from vpd.data import kb_crop_box
    assert kb_crop_box(352, 1216) == (0, 0)
    for h, w in ((351, 1216), (352, 1215)):
        with pytest.raises(ValueError, match=f"image {h}x{w} is smaller than the KB crop 352x1216"):
            kb_crop_box(h, w)
    _kitti_root(tmp_path / "small", "data_depth_annotated", size=(352, 1200))  # a frame narrower than the crop
    with pytest.raises(BadSampleError, match=r"0000000005.png: image 352x1200 is smaller than the KB crop"):
        KITTI(str(tmp_path / "small"), split="test", train=False)[0]
    assert kb_crop_box(352, 1219) == (0, 1)  # BTS: int((1219 - 1216) / 2) = int(1.5) = 1
    _kitti_root(tmp_path, "data_depth_annotated", size=(352, 1216), metres=40, split="train")
    ds = KITTI(str(tmp_path), crop=(352, 704))
    # CutDepth on (a = 0.5, b = 0: column 608), no flip, crop at (0, 0), colour steps off
    ds.rng = lambda index: Scripted(0.0, 0.5, 0.0, 0.9, 0, 0, 0.9, 0.9, 0.9)
    s = ds[0]
    assert s["image"].shape == (3, 352, 704)
    torch.testing.assert_close(s["image"][:, :, 608], torch.zeros(3, 352))  # 40 m of 80 -> grey 127.5
    assert (s["image"][:, :, 607] == -1).all() and (s["image"][:, :, 609] == -1).all()
    assert KITTI(str(tmp_path), train=False)[0]["image"].shape == (3, 352, 1216)  # the view follows `train`


def test_nyu_missing_depth_file_is_reported_at_construction(synth, tmp_path):
    import shutil
    root = tmp_path / "nyu"
    shutil.copytree(synth["depth"], root)
    os.remove(root / "official_splits/test/bathroom/sync_depth_00007.png")
    with pytest.raises(FileNotFoundError, match="sync_depth_00007.png"):
        NYUv2(str(root), split="test")


def test_annotation_of_another_size_than_its_image_is_refused(synth, tmp_path):
    # a depth / label map must cover its image pixel for pixel (the eval view keeps both at full size)
    import shutil
    shutil.copytree(synth["depth"], tmp_path / "nyu")
    ds = NYUv2(str(tmp_path / "nyu"), split="test")
    Image.fromarray(np.full((48, 60), 1000, np.uint16)).save(ds.depths[0])
    with pytest.raises(BadSampleError, match="rgb_00006.jpg.*depth map"):
        ds[0]
    shutil.copytree(synth["semseg"], tmp_path / "ade")
    ds = ADE20K(str(tmp_path / "ade"), "validation")
    Image.fromarray(np.ones((48, 60), np.uint8)).save(ds.labels[0])
    with pytest.raises(BadSampleError, match="ADE_val_00000005.jpg.*label"):
        ds[0]


def test_ade_label_must_be_an_8_bit_png(synth, tmp_path):
    # a 16-bit map would be cut to 8 bits without a word (300 -> 44, a valid class)
    import shutil
    shutil.copytree(synth["semseg"], tmp_path / "ade")
    ds = ADE20K(str(tmp_path / "ade"), "validation")
    Image.fromarray(np.full((48, 64), 300, np.uint16)).save(ds.labels[0])
    with pytest.raises(BadSampleError, match="ADE_val_00000005.png.*8-bit"):
        ds[0]


def test_ade_view_follows_train_not_the_split_name_and_only_jpgs_are_samples(synth, tmp_path):
    ev = ADE20K(synth["semseg"], "training", train=False)
    s = ev[0]
    assert s["label"].shape == (48, 64) and s["orig_size"].tolist() == [48, 64]
    tr = ADE20K(synth["semseg"], "validation", train=True)[0]
    assert tr["image"].shape == (3, 512, 512) and "orig_size" not in tr
    import shutil
    shutil.copytree(synth["semseg"], tmp_path / "ade")
    (tmp_path / "ade/ADEChallengeData2016/images/validation/Thumbs.db").write_bytes(b"\0")  # not an image
    assert len(ADE20K(str(tmp_path / "ade"), "validation")) == 1


def test_refcoco_ref_naming_an_image_missing_from_instances_is_refused(synth, tmp_path):
    import pickle
    import shutil
    root = tmp_path / "coco"
    shutil.copytree(synth["refer"], root)
    refs_file = root / "refer/data/refcoco/refs(unc).p"
    refs = pickle.loads(refs_file.read_bytes())
    val = next(r for r in refs if r["split"] == "val")
    val["image_id"] = 999
    refs_file.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(ValueError, match=f"ref {val['ref_id']} .* image 999"):
        RefCOCO(str(root), split="val")


def test_image_folder_resize_rules_per_task(tmp_path):
    # semseg fits (4 size, size) as ADE20K's (2048, 512): a 10x100 strip at size 8 -> factor min(32/100, 8/10)
    Image.fromarray(np.full((10, 100, 3), 128, np.uint8)).save(tmp_path / "strip.png")
    assert ImageFolder([str(tmp_path / "strip.png")], "semseg", size=8)[0]["resized_size"].tolist() == [3, 32]
    # depth and semseg resize as OpenCV's INTER_LINEAR (a 2x downscale averages 2x2 blocks), refer as
    # PIL's antialiased bilinear (LAVT/VPD resize PIL images)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    blocks = torch.from_numpy(img.astype(np.float32).reshape(4, 2, 4, 2, 3).mean((1, 3))).permute(2, 0, 1) / 127.5 - 1
    for task, size in (("depth", 4), ("semseg", 4)):
        torch.testing.assert_close(ImageFolder([str(tmp_path / "a.png")], task, size=size)[0]["image"], blocks,
                                   atol=1e-5, rtol=0)
    x = ImageFolder([str(tmp_path / "a.png")], "refer", size=4)[0]["image"]
    ref = np.asarray(Image.fromarray(img).resize((4, 4), Image.BILINEAR)).astype(np.float32)
    assert np.abs(((x.permute(1, 2, 0) + 1) * 127.5).numpy() - ref).max() <= 1.01  # PIL rounds to uint8
    assert (x - blocks).abs().max() > 0.05  # the wider filter is not a block average


def test_undo_maps_class_ids_by_nearest_and_refuses_a_smaller_prediction():
    meta = {"orig_size": torch.tensor([4, 4]), "resized_size": torch.tensor([2, 2])}
    ids = torch.tensor([[0, 4], [4, 0]])
    expected = torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4], [4, 4, 0, 0], [4, 4, 0, 0]])  # each id a 2x2 block
    assert torch.equal(undo(ids, meta), expected)
    with pytest.raises(ValueError, match="smaller than the resized image"):
        undo(torch.zeros(2, 2, 1), meta)
