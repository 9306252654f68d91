"""predict.py on tiny random models saved the way train.py saves them (model.safetensors + the SD file
it names): outputs have each input's own odd, non-square size and hold what the model predicts,
recomputed here by hand from the model (windows, flips, padding, resizing); bad inputs stop with a
message naming the problem."""
import json
import os
import shutil
from dataclasses import asdict
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # predict.py is a script at the repository root
import predict  # noqa: E402
import train  # noqa: E402
from vpd.clip import Tokenizer  # noqa: E402
from vpd.data import NYU_SCENES, BadSampleError, ImageFolder, read_rgb  # noqa: E402
from vpd.demo import TINY_CLIP, TINY_UNET, TINY_VAE, wake_zero_weights_, write_random_sd  # noqa: E402
from vpd.model import build_model  # noqa: E402
from vpd.synthetic import scene_sample  # noqa: E402
from vpd.tasks import load_model, model_kwargs  # noqa: E402
from vpd.trained import frozen_fingerprint, save_weights  # noqa: E402

SIZE = 64  # --size of every run here: the networks see at most 64x128
CROPS = {"depth": 64, "semseg": 128, "refer": 64}  # the "training crop" in each checkpoint's metadata
H, W = 77, 131  # odd, non-square test images


def wake(module, seed=0):
    """The model with SD's zero-initialised weights given random values (every path carries signal)."""
    return wake_zero_weights_(module, torch.Generator().manual_seed(seed), std=0.05)


def write_image(path, h, w, seed):
    """A smooth gradient plus noise: predictions vary across the image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([255 * yy / h, 255 * xx / w, 128 + 0 * xx], -1)
    img = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    sd = write_random_sd(str(root / "tiny_sd.safetensors"))
    imgs = root / "images"
    imgs.mkdir()
    wide = write_image(str(imgs / "wide.png"), H, W, 0)
    tall = write_image(str(imgs / "tall.jpg"), W, H, 1)
    return SimpleNamespace(root=root, sd=sd, images=str(imgs), wide=wide, tall=tall, ckpts={})


def checkpoint(world, task):
    """A tiny `task` model written as train.py writes it (trained weights + metadata naming the SD file)."""
    if task in world.ckpts:
        return world.ckpts[task]
    torch.manual_seed(0)
    kw = model_kwargs(task, SimpleNamespace(max_depth=10.0), demo=True)
    emb = {"depth": torch.randn(len(NYU_SCENES), TINY_UNET.context_dim), "semseg": torch.randn(150, 32)}.get(task)
    model = wake(build_model(task, world.sd, TINY_UNET, TINY_VAE, TINY_CLIP, class_embeddings=emb, **kw), 0).eval()
    if task == "depth":  # VPD's decoder starts at N(0, 0.001): a flat 5 m; torch's default init varies
        for m in model.head.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.reset_parameters()
    if task == "refer":  # centre the mask logits on the test image so that both classes appear
        x = ImageFolder([world.wide], "refer", SIZE)[0]["image"][None]
        with torch.no_grad():
            logits = model(x, Tokenizer()("the man", max_length=model.max_tokens))
            model.head.classifier.bias[1] -= (logits[0, 1] - logits[0, 0]).median()
    meta = dict(task=task, sd_ckpt=world.sd, demo=True, dataset=None, unet=asdict(TINY_UNET),
                vae=asdict(TINY_VAE), clip=asdict(TINY_CLIP), model_kwargs=kw,
                depth_crop=None, args=dict(crop=CROPS[task], demo_size=train.DEMO["demo_size"]),
                frozen_sha256=frozen_fingerprint(model))
    path = str(world.root / f"{task}.safetensors")
    save_weights(model, path, meta)
    world.ckpts[task] = path
    return path


def run(*argv):
    predict.main(predict.get_args([str(a) for a in argv]))


def error_of(*argv):
    with pytest.raises(SystemExit) as e:
        run(*argv)
    assert isinstance(e.value.code, str), "must exit with a message (status 1), not a bare code"
    return e.value.code


def png(path):
    with Image.open(path) as im:
        return im.mode, np.asarray(im)


# --- each task: sizes and values ------------------------------------------------------------

def test_depth_png_is_uint16_mm_of_the_models_prediction(world, tmp_path):
    ckpt = checkpoint(world, "depth")
    run("--ckpt", ckpt, "--size", SIZE, "--scene", "kitchen", "--out", tmp_path, world.images)
    model, _ = load_model(ckpt)
    model.eval()
    sid = torch.tensor([NYU_SCENES.index("kitchen")])

    def f(x):  # the model on one square window, zero-padded to 64, with its flip averaged in
        h, w = x.shape[-2:]
        a = model(F.pad(x, (0, 64 - w, 0, 64 - h)), sid)[..., :h, :w]
        b = model(F.pad(x.flip(-1), (0, 64 - w, 0, 64 - h)), sid)[..., :h, :w]
        return (a + b.flip(-1)) / 2

    for name, (h, w) in (("wide", (H, W)), ("tall", (W, H))):
        path = world.wide if name == "wide" else world.tall
        x = ImageFolder([path], "depth", SIZE)[0]["image"][None]
        with torch.no_grad():
            if name == "wide":  # 77x131 -> 38x64: VPD's two windows, at x=0 and x=26, averaged on overlap
                img = x[..., :38, :64]
                left, right = f(img[..., :38]), f(img[..., 26:])
                ref = torch.zeros(1, 1, 38, 64)
                cnt = torch.zeros(1, 1, 38, 64)
                ref[..., :38] += left
                ref[..., 26:] += right
                cnt[..., :38] += 1
                cnt[..., 26:] += 1
                ref = ref / cnt
            else:  # 131x77 -> 64x38: portrait, one whole-image window
                ref = f(x[..., :64, :38])
        ref = F.interpolate(ref, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
        mode, mm = png(tmp_path / f"{name}_depth.png")
        assert mode == "I;16" and mm.dtype == np.uint16 and mm.shape == (h, w)
        assert np.abs(mm.astype(np.float64) - ref * 1000).max() <= 0.5 + 1e-2
        assert mm.std() > 0  # the prediction varies across the image
        mode, color = png(tmp_path / f"{name}_depth_color.png")
        assert mode == "RGB" and color.shape == (h, w, 3)


def test_depth_scene_changes_the_prediction(world, tmp_path):
    ckpt = checkpoint(world, "depth")
    for scene in ("kitchen", "bedroom", " Living Room ", "living_room"):  # names as people write them, too
        run("--ckpt", ckpt, "--size", SIZE, "--scene", scene, "--no-flip", "--out", tmp_path / scene, world.wide)
    assert not np.array_equal(png(tmp_path / "kitchen" / "wide_depth.png")[1],
                              png(tmp_path / "bedroom" / "wide_depth.png")[1])
    assert np.array_equal(png(tmp_path / " Living Room " / "wide_depth.png")[1],
                          png(tmp_path / "living_room" / "wide_depth.png")[1])


def test_depth_panorama_is_predicted_whole(world, tmp_path):
    # wider than 2:1 -> one forward over the whole image (and its flip), not VPD's two windows
    ckpt = checkpoint(world, "depth")
    pano = write_image(str(tmp_path / "pano.png"), 20, 150, 3)  # -> 9x64 at --size 64
    run("--ckpt", ckpt, "--size", SIZE, "--no-flip", "--out", tmp_path, pano)
    model, _ = load_model(ckpt)
    model.eval()
    x = ImageFolder([pano], "depth", SIZE)[0]["image"][None, :, :9, :64]
    with torch.no_grad():
        ref = model(F.pad(x, (0, 0, 0, 32 - 9)), torch.tensor([NYU_SCENES.index("living_room")]))[..., :9, :]
    ref = F.interpolate(ref, size=(20, 150), mode="bilinear", align_corners=False)[0, 0].numpy()
    mode, mm = png(tmp_path / "pano_depth.png")
    assert mode == "I;16" and mm.shape == (20, 150)
    assert np.abs(mm.astype(np.float64) - ref * 1000).max() <= 0.5 + 1e-2


def test_semseg_ids_and_palette_at_the_image_size(world, tmp_path):
    ckpt = checkpoint(world, "semseg")
    run("--task", "semseg", "--ckpt", ckpt, "--size", SIZE, "--out", tmp_path, world.wide, world.tall)
    model, _ = load_model(ckpt)
    model.eval()
    for name, (h, w) in (("wide", (H, W)), ("tall", (W, H))):
        path = world.wide if name == "wide" else world.tall
        x = ImageFolder([path], "semseg", SIZE)[0]["image"][None]
        rh, rw = x.shape[-2:]
        assert min(rh, rw) == SIZE and max(rh, rw) <= CROPS["semseg"]  # one sliding window covers it
        with torch.no_grad():
            logits = model(F.pad(x, (0, -rw % 64, 0, -rh % 64)))[..., :rh, :rw]
        ref = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
        mode, ids = png(tmp_path / f"{name}_semseg_ids.png")
        assert mode == "L" and ids.shape == (h, w)
        assert ids.max() < 150 and len(np.unique(ids)) > 1
        assert (ids == ref).mean() > 0.999  # ties aside, the argmax of the model's logits
        mode, color = png(tmp_path / f"{name}_semseg.png")
        assert mode == "RGB" and color.shape == (h, w, 3)
        from vpd.vis import CLASS_PALETTE
        assert np.array_equal(color, CLASS_PALETTE[ids])


def test_refer_mask_is_binary_and_matches_the_model(world, tmp_path):
    ckpt = checkpoint(world, "refer")
    run("--ckpt", ckpt, "--size", SIZE, "--text", "the man", "--out", tmp_path, world.wide)
    model, _ = load_model(ckpt)
    model.eval()
    x = ImageFolder([world.wide], "refer", SIZE)[0]["image"][None]
    assert x.shape[-2:] == (SIZE, SIZE)
    # CLIP ids of "the man": <start>, "the</w>" 518, "man</w>" 786, <end>, then <end> padding
    tokens = torch.full((1, model.max_tokens), 49407)
    tokens[0, :3] = torch.tensor([49406, 518, 786])
    with torch.no_grad():
        logits = F.interpolate(model(x, tokens), size=(H, W), mode="bilinear", align_corners=False)
    ref = (logits[0].argmax(0) == 1).numpy()
    mode, mask = png(tmp_path / "wide_refer_mask.png")
    assert mode == "L" and mask.shape == (H, W) and set(np.unique(mask)) == {0, 255}
    assert ((mask == 255) == ref).mean() > 0.999
    mode, overlay = png(tmp_path / "wide_refer.png")
    original = np.asarray(Image.open(world.wide).convert("RGB"))
    assert mode == "RGB" and overlay.shape == (H, W, 3)
    assert np.array_equal(overlay[mask == 0], original[mask == 0])  # untouched off the mask
    assert not np.array_equal(overlay[mask == 255], original[mask == 255])


def test_several_sentences_give_each_its_numbered_masks_as_one_at_a_time_would(world, tmp_path, capsys):
    ckpt = checkpoint(world, "refer")
    for k, text in enumerate(["the man", "the red car on the left"], 1):
        run("--ckpt", ckpt, "--size", SIZE, "--text", text, "--out", tmp_path / f"one{k}", world.wide)
    folder = tmp_path / "both"
    folder.mkdir()
    shutil.copy(world.wide, folder / "wide.png")
    for _ in range(2):  # the second run finds the first one's numbered PNGs in the folder: not inputs
        run("--ckpt", ckpt, "--size", SIZE, "--text", "the man", "--text", "the red car on the left", "--out",
            folder, folder)
    assert sorted(os.listdir(folder)) == ["wide.png", "wide_refer1.png", "wide_refer1_mask.png", "wide_refer2.png",
                                          "wide_refer2_mask.png"]
    assert "sentence 2 (<name>_refer2.png, <name>_refer2_mask.png): the red car on the left" in capsys.readouterr().out
    masks = [png(folder / f"wide_refer{k}_mask.png")[1] for k in (1, 2)]
    assert not np.array_equal(masks[0], masks[1])  # two sentences, two masks
    for k in (1, 2):  # batched together as predicted one per run (ties aside: a batch may sum in another order)
        assert (masks[k - 1] == png(tmp_path / f"one{k}" / "wide_refer_mask.png")[1]).mean() > 0.999
        assert (png(folder / f"wide_refer{k}.png")[1] == png(tmp_path / f"one{k}" / "wide_refer.png")[1]).mean() > 0.999


def test_refer_says_when_the_text_is_longer_than_the_model_reads(world, tmp_path, capsys):
    ckpt = checkpoint(world, "refer")
    room = load_model(ckpt)[0].max_tokens - 2  # BOS and EOS take two places
    # "the</w>" and "man</w>" are one CLIP token each (see above)
    run("--ckpt", ckpt, "--size", SIZE, "--text", " ".join(["the man"] * (room // 2)), "--out", tmp_path, world.wide)
    assert "tokens long" not in capsys.readouterr().out
    run("--ckpt", ckpt, "--size", SIZE, "--text", " ".join(["the man"] * (room // 2 + 1)), "--out", tmp_path,
        world.wide)
    assert f"is {room + 2} tokens long: this model reads its first {room}" in capsys.readouterr().out
    tokens = Tokenizer()(" ".join(["the man"] * (room // 2 + 1)), max_length=room + 2)
    assert tokens[0, -2] == 786 and tokens[0, -1] == 49407  # the cut: the first 19 pairs, then EOS


# --- bad input ------------------------------------------------------------------------------

def test_a_moved_sd_file_is_named_and_the_one_read_is_recorded(world, tmp_path):
    moved = tmp_path / "moved.safetensors"  # the SD file the checkpoint names, as if moved away from there
    shutil.copy(world.sd, moved)
    with safe_open(checkpoint(world, "depth"), framework="pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    ckpt = str(tmp_path / "model.safetensors")
    save_file(state, ckpt, metadata={"vpd": meta["vpd"].replace(json.dumps(world.sd)[1:-1], "/gone/sd.safetensors")})
    with pytest.raises(SystemExit, match="the SD checkpoint /gone/sd.safetensors .* is not there: pass --sd-ckpt"):
        load_model(ckpt)
    assert load_model(ckpt, sd_ckpt=str(moved))[1]["sd_ckpt"] == str(moved)  # what eval.py's metrics file says
    assert load_model(checkpoint(world, "depth"))[1]["sd_ckpt"] == os.path.abspath(world.sd)
    other = write_random_sd(str(tmp_path / "other.safetensors"), seed=1)  # same shapes, other weights
    with pytest.raises(SystemExit, match=r"other.safetensors is not the SD file .* was trained with: its frozen VAE "
                                         r"weights differ from those training read$"):
        load_model(ckpt, sd_ckpt=other)
    os.replace(other, moved)  # the file at the path the checkpoint names, replaced by another
    save_file(state, ckpt, metadata={"vpd": meta["vpd"].replace(json.dumps(world.sd)[1:-1], str(moved))})
    with pytest.raises(SystemExit, match=r"VAE weights differ .* \(replaced since\?\): give that file as --sd-ckpt"):
        load_model(ckpt)


def test_an_sd_file_is_checked_by_its_frozen_parts_alone(world, tmp_path):
    # a fine-tune of the same SD (another UNet: the model's own is in its checkpoint) serves; one whose
    # text encoder differs does not: the refer model reads its sentences with that CLIP
    from safetensors.torch import load_file
    sd = load_file(world.sd)
    ckpt = checkpoint(world, "refer")
    for prefix, same in (("model.diffusion_model.", True), ("cond_stage_model.", False)):
        key = next(k for k in sd if k.startswith(prefix) and sd[k].is_floating_point())
        path = str(tmp_path / f"{prefix}safetensors")
        save_file(dict(sd, **{key: sd[key] + 0.01}), path)
        if same:
            assert load_model(ckpt, sd_ckpt=path)[1]["sd_ckpt"] == path
        else:
            with pytest.raises(SystemExit, match="its frozen VAE/CLIP weights differ"):
                load_model(ckpt, sd_ckpt=path)


def test_only_the_frozen_parts_are_read_from_the_sd_file(world, tmp_path):
    # the UNet, adapter and head are the weight file's own: an SD file without its UNet serves, and the
    # model holds exactly the weight file's tensors and the SD file's VAE encoder and CLIP, none left on meta
    from safetensors.torch import load_file
    sd = load_file(world.sd)
    frozen_only = str(tmp_path / "frozen_only.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.")}, frozen_only)
    ckpt = checkpoint(world, "refer")
    model, _ = load_model(ckpt, sd_ckpt=frozen_only)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    state, trained = model.state_dict(), load_file(ckpt)
    assert set(state) == set(trained) | {k for k in state if k.startswith(("backbone.vae.", "clip."))}
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    for ours, prefix in (("backbone.vae.", "first_stage_model."), ("clip.", "cond_stage_model.transformer.text_model.")):
        assert all(torch.equal(v, sd[prefix + k[len(ours):]]) for k, v in state.items() if k.startswith(ours))
    assert not any(p.requires_grad for p in [*model.backbone.vae.parameters(), *model.clip.parameters()])
    assert not model.backbone.vae.training and not model.clip.training


def test_images_beyond_pils_decompression_bomb_limit_are_predicted(world, tmp_path, monkeypatch):
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS (179 MP by default) as a possible attack: a user's own
    # panorama is predicted all the same (here the limit is lowered instead of writing a 200 MP file)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W // 4)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(world.wide)
    run("--ckpt", checkpoint(world, "depth"), "--size", SIZE, "--out", tmp_path, world.wide)
    assert png(tmp_path / "wide_depth.png")[1].shape == (H, W)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", H * W // 4)  # a dataset file says which file, as any other
    with pytest.raises(BadSampleError, match=f"cannot read image {world.wide}.*exceeds limit"):
        read_rgb(world.wide)


def test_missing_and_unreadable_images(world, tmp_path, capsys):
    ckpt = checkpoint(world, "depth")
    missing = tmp_path / "nope.jpg"
    assert f"image not found: {missing}" in error_of("--ckpt", ckpt, "--out", tmp_path, missing)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert f"cannot read image {text}" in error_of("--ckpt", ckpt, "--out", tmp_path, text)
    truncated = tmp_path / "cut.png"  # a valid header, the pixel data cut off: fails when decoded
    data = open(world.wide, "rb").read()
    truncated.write_bytes(data[:len(data) // 2])
    err = error_of("--ckpt", ckpt, "--size", SIZE, "--out", tmp_path / "o", truncated, world.wide)
    assert err.startswith("1 image(s) skipped:") and f"cannot read image {truncated}" in err
    assert os.path.isfile(tmp_path / "o" / "wide_depth.png")  # the image after it was still predicted
    capsys.readouterr()
    err = error_of("--ckpt", ckpt, "--size", SIZE, "--out", tmp_path / "o3", truncated)  # nothing written
    assert err.startswith("1 image(s) skipped:") and "wrote the" not in capsys.readouterr().out
    deep = tmp_path / "depth16.png"  # a 16-bit depth map given as a photo: refused from its header
    Image.fromarray(np.full((8, 8), 3000, np.uint16)).save(deep)
    err = error_of("--ckpt", ckpt, "--out", tmp_path / "o2", deep)
    assert f"cannot read image {deep}" in err and "(mode I;16) is not a photo" in err
    assert not os.path.exists(tmp_path / "o2")  # nothing readable: stopped before the model load
    # in a folder, a file whose header cannot be read is skipped like a truncated one (macOS's hidden
    # ._wide.jpg beside it is not read at all)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("._wide.jpg", "broken.jpg"):
        (folder / name).write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_image(str(folder / "wide.jpg"), H, W, 0)
    err = error_of("--ckpt", ckpt, "--size", SIZE, "--out", tmp_path / "o3", folder)
    assert err.startswith("1 image(s) skipped:") and f"cannot read image {folder / 'broken.jpg'}" in err
    assert os.path.isfile(tmp_path / "o3" / "wide_depth.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in error_of("--ckpt", ckpt, "--out", tmp_path, empty)


def test_a_strip_of_extreme_aspect_is_predicted_at_its_size(world, tmp_path):
    strip = tmp_path / "strip.png"  # at --size 64 its 1-pixel side would be resized to 0 rows
    Image.fromarray(np.full((1, 1000, 3), 128, np.uint8)).save(strip)
    run("--ckpt", checkpoint(world, "depth"), "--size", SIZE, "--out", tmp_path, strip)
    mode, mm = png(tmp_path / "strip_depth.png")
    assert mode == "I;16" and mm.shape == (1, 1000)


def test_option_errors(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the calls without --out make the default predictions/ here, not in the repository
    depth, refer = checkpoint(world, "depth"), checkpoint(world, "refer")
    assert "--text is required" in error_of("--ckpt", refer, "--out", tmp_path, world.wide)
    assert "--text is only for the refer task" in error_of("--ckpt", depth, "--text", "a cat", world.wide)
    for size in (100, 96):  # 96: a multiple of 32 (what depth takes), not of 64
        assert f"--size {size}: the refer network takes sides that are multiples of 64" in error_of(
            "--ckpt", refer, "--size", size, "--text", "a cat", "--out", tmp_path, world.wide)  # not a traceback
    assert "--scene is only for the depth task, not semseg" in error_of(
        "--ckpt", checkpoint(world, "semseg"), "--scene", "kitchen", "--out", tmp_path, world.wide)
    err = error_of("--ckpt", depth, "--scene", "garage", world.wide)
    assert "'garage' is not an NYUv2 scene type" in err and "living_room" in err
    assert "depth model, not semseg" in error_of("--task", "semseg", "--ckpt", depth, "--out", tmp_path, world.wide)
    assert "depth model, not refer" in error_of("--task", "refer", "--ckpt", depth, world.wide)  # not "--text"
    assert f"--ckpt {tmp_path / 'x.safetensors'}: no such file" in error_of("--ckpt", tmp_path / "x.safetensors",
                                                                             world.wide)
    # train.py's other file, the run's folder, and a tensor file (VPD's class embeddings) are named as such
    state = tmp_path / "run" / "state.pt"
    state.parent.mkdir()
    state.write_bytes(b"")
    assert "training state (what --resume reads): give the model.safetensors" in error_of("--ckpt", state, world.wide)
    assert error_of("--ckpt", state.parent, world.wide) == f"--ckpt {state.parent} is a folder"
    (state.parent / "model.safetensors").write_bytes(b"")
    assert f"is a folder: give {state.parent / 'model.safetensors'}" in error_of("--ckpt", state.parent, world.wide)
    torch.save(torch.zeros(150, 768), tmp_path / "class_embeddings.pth")
    assert "holds a Tensor, not a state dict: not a VPD checkpoint" in error_of(
        "--task", "semseg", "--ckpt", tmp_path / "class_embeddings.pth", world.wide)  # a message, not a traceback
    other = tmp_path / "b"
    other.mkdir()
    write_image(str(other / "wide.jpg"), 8, 8, 2)
    assert "would write the same output names" in error_of("--ckpt", depth, world.wide, other)
    assert "--size 16 is too small" in error_of("--ckpt", depth, "--size", 16, world.wide)
    predict.check_options(predict.get_args(["--ckpt", depth, "--size", "32", world.wide]), "depth")  # 32: the least
    err = error_of("--ckpt", refer, "--text", "a cat", "--no-flip", world.wide)
    assert "--no-flip is only for the depth task, not refer" in err
    assert f"--sd-ckpt {tmp_path / 'sd.safetensors'}: no such file" in error_of(
        "--ckpt", depth, "--sd-ckpt", tmp_path / "sd.safetensors", world.wide)


def test_cli_exits_nonzero_without_traceback(world, tmp_path):
    ckpt = checkpoint(world, "depth")
    p = subprocess.run([sys.executable, "predict.py", "--ckpt", ckpt, "--scene", "garage", world.wide],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "'garage' is not an NYUv2 scene type" in p.stderr and "Traceback" not in p.stderr


def test_default_size_follows_the_training_crop():
    trained = {"demo": False, "args": {"crop": 384}}
    assert predict.default_size("refer", trained) == 384 and predict.default_size("semseg", trained) == 384
    assert predict.default_size("depth", trained) == 640  # depth crops at NYU's scale: not a resize
    assert [predict.default_size(t, {}) for t in ("semseg", "refer", "depth")] == [512, 512, 640]  # official
    assert predict.default_size("depth", {"dataset": "kitti", "args": {"crop": 352}}) == 1216  # KITTI's width


def test_demo_depth_models_see_the_demos_frames_at_their_own_scale(tmp_path):
    # a demo depth model trained on uncropped-scale crops of the demo's frames: its default --size keeps
    # such a frame at its size (fitting it into the 96 crop would shrink it to 0.75x, doubling the error)
    meta = {"demo": True, "args": dict(train.DEMO, crop=train.DEMO_CROP["depth"])}
    frame = tmp_path / "frame.jpg"
    Image.fromarray(scene_sample(0, 0, train.DEMO["demo_size"])["rgb"]).save(frame)
    sample = ImageFolder([frame], "depth", size=predict.default_size("depth", meta))[0]
    assert sample["resized_size"].tolist() == sample["orig_size"].tolist() == [96, 128]


def test_depth_takes_two_windows_up_to_twice_as_wide_as_tall():
    # VPD's two square windows cover a landscape image up to 2:1 (at 2:1 they just meet); square,
    # portrait and wider images are predicted whole
    assert [predict.depth_windows(32, w) for w in (32, 33, 63, 64, 65, 200)] == [1, 2, 2, 2, 1, 1]
    assert predict.depth_windows(64, 32) == 1
    # KITTI models (trained on squares) take as many as cover any landscape image, as eval.py's KITTI test
    assert [predict.depth_windows(32, w, kitti=True) for w in (32, 33, 64, 65, 200)] == [1, 2, 2, 3, 7]
    assert predict.depth_windows(64, 32, kitti=True) == 1


def test_official_depth_model_gets_the_scene_rows_it_was_trained_with():
    assert predict.scene_index("study_room", official=False) == NYU_SCENES.index("study_room")
    assert predict.scene_index("study_room", official=True) == NYU_SCENES.index("study")
    assert predict.scene_index("office_kitchen", official=True) == NYU_SCENES.index("kitchen")
    assert predict.scene_index("home_office", official=True) == NYU_SCENES.index("home_office")
    assert all(predict.scene_index(s, official=False) == i for i, s in enumerate(NYU_SCENES))


def test_semseg_sliding_window_stride_is_mmsegs(monkeypatch):
    import vpd.infer
    seen = {}

    def fake_slide(model, image, k, crop, stride, batch):
        seen.update(crop=crop, stride=stride)
        return torch.zeros(1, k, *image.shape[-2:])

    monkeypatch.setattr(vpd.infer, "slide_logits", fake_slide)
    model = SimpleNamespace(num_classes=150)
    sample = {"image": torch.zeros(3, 8, 8), "orig_size": torch.tensor([8, 8])}
    predict.predict_semseg(model, sample, crop=512)
    assert seen == {"crop": 512, "stride": 341}  # VPD's test_cfg: crop (512, 512), stride (341, 341)


def test_semseg_window_is_the_checkpoints_training_crop(world, tmp_path, monkeypatch):
    # our semseg checkpoints name their training crop (128 here, not the paper's 512): it is the window
    seen = []

    def fake_probs(model, image, k, size, crop):
        seen.append(crop)
        return torch.zeros(1, k, *size)

    monkeypatch.setattr(predict, "semseg_probs", fake_probs)
    run("--ckpt", checkpoint(world, "semseg"), "--size", SIZE, "--out", tmp_path, world.wide)
    assert seen == [CROPS["semseg"]]


class SceneRecorder(torch.nn.Module):
    """A depth model that records the scene ids it is fed and predicts 1 m everywhere."""
    max_depth = 10.0

    def __init__(self, scenes=len(NYU_SCENES)):
        super().__init__()
        self.register_buffer("class_embeddings", torch.zeros(scenes, 8))
        self.ids = []

    def forward(self, x, ids):
        self.ids += ids.tolist()
        return torch.ones(x.shape[0], 1, *x.shape[-2:])


def test_official_depth_model_is_fed_the_scene_row_it_was_trained_with(world, tmp_path, monkeypatch):
    ckpt = tmp_path / "vpd_depth.ckpt"  # an official release: no metadata, --task given
    ckpt.write_bytes(b"PK\x03\x04")  # a torch.save archive's first bytes (load_model is a stand-in)
    for official, row in ((True, "study"), (False, "study_room")):  # VPD's substring match for its release
        model = SceneRecorder()
        monkeypatch.setattr(predict, "load_model",
                            lambda *a, m=model, o=official: (m, dict(task="depth", dataset=None, official=o)))
        run("--task", "depth", "--ckpt", ckpt, "--size", SIZE, "--scene", "study_room", "--out", tmp_path / row,
            world.wide)
        assert model.ids and set(model.ids) == {NYU_SCENES.index(row)}
    monkeypatch.setattr(predict, "load_model", lambda *a: (SceneRecorder(5), dict(task="depth", dataset=None)))
    assert "has 5 scene embeddings, not NYUv2's 27" in error_of("--task", "depth", "--ckpt", ckpt, "--size", SIZE,
                                                                "--out", tmp_path, world.wide)


def test_kitti_depth_is_written_in_256ths_of_a_metre_and_takes_its_one_scene(world, tmp_path, monkeypatch):
    # KITTI's maximum depth (80 m) overflows 16-bit millimetres: its PNGs are in 1/256 m, KITTI's own
    # convention; every frame is conditioned on the model's only scene (row 0), --scene is refused
    ckpt = tmp_path / "vpd_kitti.ckpt"  # no metadata: --task given, the rest from load_model
    ckpt.write_bytes(b"PK\x03\x04")  # a torch.save archive's first bytes (load_model is a stand-in)
    model = SceneRecorder(1)
    model.max_depth = 80.0
    monkeypatch.setattr(predict, "load_model", lambda *a: (model, dict(task="depth", dataset="kitti")))
    run("--task", "depth", "--ckpt", ckpt, "--size", SIZE, "--out", tmp_path, world.wide)
    mode, depth = png(tmp_path / "wide_depth.png")
    assert mode == "I;16" and depth.shape == (H, W) and (depth == 256).all()  # the model's 1 m everywhere
    assert model.ids and set(model.ids) == {0}
    assert "is a KITTI model, conditioned on one scene only" in error_of(
        "--task", "depth", "--ckpt", ckpt, "--size", SIZE, "--scene", "kitchen", "--out", tmp_path, world.wide)


def test_a_folder_gives_its_images_whatever_the_case_of_their_extension(tmp_path, capsys):
    # cameras write IMG_0001.JPG: a folder's images are found by extension, upper case too
    write_image(str(tmp_path / "IMG_0001.JPG"), 8, 8, 0)
    write_image(str(tmp_path / "b.png"), 8, 8, 1)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "IMG_0002.HEIC").write_bytes(b"a format PIL does not read")
    (tmp_path / ".DS_Store").write_bytes(b"")  # hidden: not mentioned
    (tmp_path / "._IMG_0001.JPG").write_bytes(b"macOS metadata, not an image")  # hidden, image-named: not read
    write_image(str(tmp_path / ".thumb.png"), 8, 8, 2)  # a hidden image too: a folder gives what it shows
    assert predict.image_paths([str(tmp_path)], "out", "depth") == (
        [str(tmp_path / "IMG_0001.JPG"), str(tmp_path / "b.png")], [])
    assert predict.image_paths([str(tmp_path / ".thumb.png")], "out", "depth") == ([str(tmp_path / ".thumb.png")], [])
    assert f"{tmp_path}: 2 file(s) of other types not read (IMG_0002.HEIC, notes.txt; images are .jpg" in (
        capsys.readouterr().out)


def test_frames_after_the_first_transparency_and_replaced_outputs_are_said(tmp_path, capsys):
    # an animated GIF and an APNG give their first frame, an RGBA PNG its colours: each said before the model loads
    rng = np.random.default_rng(0)
    checker = (np.indices((9, 11)).sum(0) % 2)[..., None]  # two colours a frame: a GIF's palette keeps them exactly
    first, second = (Image.fromarray(np.where(checker, a, b).astype(np.uint8))
                     for a, b in (([255, 0, 0], [0, 0, 0]), ([0, 255, 0], [0, 0, 255])))
    first.save(tmp_path / "a.gif", save_all=True, append_images=[second])
    first.save(tmp_path / "b.png", save_all=True, append_images=[second])
    first.save(tmp_path / "c.png")
    first.save(tmp_path / "d.jpg", format="MPO", save_all=True, append_images=[second])  # a camera JPEG + preview
    Image.fromarray(rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)).save(tmp_path / "e.png")
    assert predict.image_paths([str(tmp_path)], str(tmp_path / "out"), "depth")[0] == [
        str(tmp_path / n) for n in ("a.gif", "b.png", "c.png", "d.jpg", "e.png")]
    out = capsys.readouterr().out
    assert "2 image(s) with several frames (a.gif, b.png): the first frame of each is predicted" in out
    assert "1 image(s) with transparency (e.png): predicted from their colours alone" in out
    assert "earlier output" not in out
    # what is read is the first frame, and the colour channels alone
    for name in ("a.gif", "b.png"):
        np.testing.assert_array_equal(read_rgb(str(tmp_path / name)), np.asarray(first, np.float32))
    np.testing.assert_array_equal(read_rgb(str(tmp_path / "e.png")),
                                  np.asarray(Image.open(tmp_path / "e.png"), np.float32)[..., :3])
    # a rerun into the same --out: the outputs it replaces are named
    (tmp_path / "out").mkdir()
    for name in ("c_depth.png", "c_depth_color.png", "c_semseg.png"):
        (tmp_path / "out" / name).write_bytes(b"")
    predict.image_paths([str(tmp_path / "c.png")], str(tmp_path / "out"), "depth")
    assert f"{tmp_path / 'out'}: 2 earlier output(s) will be replaced (c_depth.png, c_depth_color.png)" in (
        capsys.readouterr().out)


def test_outputs_are_named_after_the_file_name_without_its_extension_alone(world, tmp_path):
    # scan.001.png and scan.002.png: only the last dot starts the extension, so neither overwrites the other
    for name in ("scan.001.png", "scan.002.png"):
        write_image(str(tmp_path / name), H, W, 0)
    run("--ckpt", checkpoint(world, "depth"), "--size", SIZE, "--out", tmp_path / "out", tmp_path)
    assert sorted(os.listdir(tmp_path / "out")) == [f"scan.00{i}_depth{c}.png" for i in (1, 2) for c in ("", "_color")]


def test_a_folder_that_is_out_gives_its_photos_not_earlier_outputs(world, tmp_path, capsys):
    # predicting a folder into itself twice: the second run reads the photos again, not the first run's PNGs
    ckpt = checkpoint(world, "depth")
    write_image(str(tmp_path / "photo.png"), H, W, 0)
    (tmp_path / "sub").mkdir()
    write_image(str(tmp_path / "sub" / "other.png"), H, W, 1)
    for folder in (tmp_path, str(tmp_path) + os.sep):  # the same folder, spelt another way the second time
        run("--ckpt", ckpt, "--size", SIZE, "--out", tmp_path, folder)
    assert sorted(os.listdir(tmp_path)) == ["photo.png", "photo_depth.png", "photo_depth_color.png", "sub"]
    out = capsys.readouterr().out
    assert "its 2 earlier output(s) (photo_depth.png, photo_depth_color.png) are not inputs" in out
    assert f"{tmp_path}: 1 subfolder(s) not searched" in out
    # a folder and a file in it: each file once, not two inputs of the same name
    assert predict.image_paths([world.images, world.wide], "out", "depth") == ([world.tall, world.wide], [])
    # in another folder, files of those names are photos like any other
    assert predict.image_paths([str(tmp_path)], "elsewhere", "depth")[0] == [
        str(tmp_path / n) for n in ("photo.png", "photo_depth_color.png")]  # (the 16-bit PNG: not a photo)


def test_an_input_that_another_inputs_output_would_overwrite_is_refused(tmp_path):
    # a photo named b_depth.png beside b.png, predicted into their own folder: b's depth map would replace it
    write_image(str(tmp_path / "b.png"), 8, 8, 0)
    write_image(str(tmp_path / "b_semseg.png"), 8, 8, 1)
    files = [str(tmp_path / "b.png"), str(tmp_path / "b_semseg.png")]
    with pytest.raises(SystemExit, match=r"b_semseg.png is an input that the outputs of .*b.png would overwrite"):
        predict.image_paths(files, str(tmp_path), "semseg")
    assert predict.image_paths(files, str(tmp_path), "depth")[0] == files  # depth writes b_depth*.png
    assert predict.image_paths(files, str(tmp_path / "out"), "semseg")[0] == files  # another --out


def test_semseg_without_size_sees_the_image_at_its_training_scale(world, tmp_path, monkeypatch):
    # no --size: the checkpoint's training crop (128) is the short side the network sees, not the paper's 512
    seen = []

    def fake_probs(model, images, k, size, crop):
        seen.append(tuple(images[0].shape[-2:]))
        return torch.zeros(1, k, *size)

    monkeypatch.setattr(predict, "semseg_probs", fake_probs)
    run("--ckpt", checkpoint(world, "semseg"), "--out", tmp_path, world.wide)
    assert seen == [(CROPS["semseg"], round(W * CROPS["semseg"] / H))]


def test_refer_overlay_of_a_rotated_phone_photo_is_upright(world, tmp_path):
    # a phone JPEG stored landscape with EXIF orientation 6 is shown portrait: the mask is predicted on
    # the upright image, and the overlay is drawn on that same upright image
    from PIL import ImageOps
    stored = np.asarray(Image.open(world.wide).convert("RGB"))  # 77 x 131
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown rotated 90 degrees clockwise
    phone = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(phone, exif=exif, quality=95)
    run("--ckpt", checkpoint(world, "refer"), "--size", SIZE, "--text", "the man", "--out", tmp_path, phone)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(phone)).convert("RGB"))
    assert upright.shape == (W, H, 3)
    _, mask = png(tmp_path / "phone_refer_mask.png")
    _, overlay = png(tmp_path / "phone_refer.png")
    assert mask.shape == (W, H) and overlay.shape == (W, H, 3)
    assert np.array_equal(overlay[mask == 0], upright[mask == 0]) and (mask == 0).any()


def test_images_are_read_ahead_in_threads_in_order_and_at_most_two_ahead():
    # while one image is predicted the next two are read (decoded, resized) by threads, no more; a read
    # that fails is raised for that image alone
    import threading
    entered = [threading.Event() for _ in range(6)]

    class Photos(list):
        def __getitem__(self, i):
            entered[i].set()
            if i == 4:
                raise BadSampleError("cannot read image 4")
            return i
    got = []
    for i, read in enumerate(predict.read_ahead(Photos(range(6)))):
        if i == 0:  # nothing asked for yet beyond image 0: the threads read 1 and 2 meanwhile
            assert entered[1].wait(10) and entered[2].wait(10) and not entered[3].is_set()
        try:
            got.append(read.result())
        except BadSampleError as e:
            got.append(str(e))
    assert got == [0, 1, 2, 3, "cannot read image 4", 5]


def test_writes_wait_in_a_bounded_queue_and_a_failed_one_is_raised(world, tmp_path, monkeypatch):
    # PNGs are written by threads beside the predictions; while writes are held up, predictions stop
    # at most WAITING images ahead of them (their predictions stay in memory); a write that fails stops
    # the run with one line naming the image, not lost in its thread
    import threading
    import time
    for i in range(8):
        write_image(str(tmp_path / f"img{i}.png"), H, W, i)
    gate, done, ahead = threading.Event(), [], []
    real_save, real_predict = predict.save_outputs, predict.predict_depth

    def held_save(task, out, stem, *rest):
        gate.wait(30)
        if stem == "img6":
            raise OSError("disk full")
        done.append(real_save(task, out, stem, *rest))

    def counting_predict(*a, **kw):
        ahead.append(len(ahead) + 1 - len(done))  # predictions made, this one included, minus writes done
        return real_predict(*a, **kw)
    monkeypatch.setattr(predict, "save_outputs", held_save)
    monkeypatch.setattr(predict, "predict_depth", counting_predict)

    def release():  # once WAITING + 1 predictions wait, and 2 s more in which an unbounded loop would go on
        while len(ahead) < predict.WAITING + 1:
            time.sleep(0.01)
        deadline = time.time() + 2.0
        while len(ahead) < 8 and time.time() < deadline:
            time.sleep(0.01)
        gate.set()
    threading.Thread(target=release, daemon=True).start()
    with pytest.raises(SystemExit, match=r"^cannot write the predictions of .*img6.png: disk full$"):
        run("--ckpt", checkpoint(world, "depth"), "--size", SIZE, "--out", tmp_path / "out", tmp_path)
    assert len(ahead) == 8 and max(ahead) == predict.WAITING + 1
    assert len(done) == 7  # the other images were written
