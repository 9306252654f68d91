"""Import of the released VPD checkpoints: official names written out from wl-zhao/VPD's module
structure, round trips through files laid out as the released ones, and clear refusals."""
import argparse
import re

import pytest
import torch
from safetensors.torch import save_file

from test_model import TINY_CLIP, TINY_DEPTH_HEAD, TINY_UNET, TINY_VAE, tiny
from vpd.checkpoint import CheckpointError
from vpd.model import build_model
from vpd.official import SDFileError, load_official, official_model, to_official

NOISE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"]
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
WB = ("weight", "bias")


class NotAllowed:
    """A class a weights_only load must refuse."""


def official_file(task, state, tmp_path):
    """Write `state` (official names) the way the released file of `task` is laid out."""
    if task == "depth":
        obj, name = {"model": state}, "vpd_depth.ckpt"
    elif task == "semseg":
        obj, name = {"meta": {"iter": 80000}, "state_dict": state}, "vpd_seg.pth"
    else:
        obj, name = {"model": state, "optimizer": {}, "epoch": 39, "lr_scheduler": {},
                     "args": argparse.Namespace(lr=5e-5, token_length=40)}, "vpd_refer.pth"
    path = tmp_path / name
    torch.save(obj, path)
    return path


def released_state(task, model):
    """Our model's tensors under the official names, with the extras the released files carry."""
    state = to_official(model.state_dict(), task)
    unet = "encoder.unet.unet.diffusion_model." if task == "depth" else "unet.unet.diffusion_model."
    if task != "depth":  # the depth file had the UNet's `out` deleted; the others keep it
        state[unet + "out.0.weight"] = torch.ones(32)
        state[unet + "out.2.weight"] = torch.zeros(4, 32, 3, 3)
    if task == "semseg":
        state.update({f"sd_model.{n}": torch.rand(1000) for n in NOISE_BUFFERS})
    return state


def official_shapes(task):
    with torch.device("meta"):
        model = build_model(task)
    return {k: list(v.shape) for k, v in to_official(model.state_dict(), task).items()}


def test_depth_names_and_shapes_are_vpd_s():
    s = official_shapes("depth")
    head = {k for k in s if not k.startswith(("encoder.unet.", "encoder.encoder_vq.", "encoder.text_adapter."))}
    want = {"encoder.gamma", "encoder.class_embeddings"}
    want |= {f"encoder.layer1.{i}.{p}" for i in (0, 1, 3) for p in WB} | {f"encoder.layer2.0.{p}" for p in WB}
    want |= {f"encoder.out_layer.{i}.{p}" for i in (0, 1) for p in WB}
    want |= {f"decoder.deconv_layers.{i}.weight" for i in (0, 3, 6)}  # ConvTranspose, bias=False
    want |= {f"decoder.deconv_layers.{i}.{p}" for i in (1, 4, 7) for p in BN}
    want |= {f"decoder.conv_layers.0.{p}" for p in WB} | {f"decoder.conv_layers.1.{p}" for p in BN}
    want |= {f"last_layer_depth.{i}.{p}" for i in (0, 2) for p in WB}
    assert head == want
    assert s["encoder.out_layer.0.weight"] == [1536, 3520, 1, 1]
    assert s["decoder.deconv_layers.0.weight"] == [1536, 32, 2, 2]
    assert s["decoder.conv_layers.0.weight"] == [192, 32, 3, 3] and s["last_layer_depth.2.weight"] == [1, 192, 3, 3]
    assert s["encoder.class_embeddings"] == [27, 768] and s["encoder.gamma"] == [768]
    assert s["encoder.text_adapter.fc.2.weight"] == [768, 768]
    assert s["encoder.unet.unet.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == [320, 768]
    assert s["encoder.encoder_vq.quant_conv.weight"] == [8, 8, 1, 1]
    assert not any(k.startswith(("encoder.encoder_vq.decoder.", "encoder.unet.unet.diffusion_model.out.")) for k in s)


def test_semseg_names_and_shapes_are_mmseg_s():
    s = official_shapes("semseg")
    assert s["neck.lateral_convs.1.conv.weight"] == [256, 790, 1, 1]
    assert s["neck.lateral_convs.2.conv.bias"] == [256] and s["neck.fpn_convs.3.conv.weight"] == [256, 256, 3, 3]
    heads = {k for k in s if k.startswith("decode_head.")}
    want = {f"decode_head.scale_heads.{i}.{j}.conv.weight" for i, j in
            [(0, 0), (1, 0), (2, 0), (2, 2), (3, 0), (3, 2), (3, 4)]}
    want |= {f"decode_head.scale_heads.{i}.{j}.bn.{p}" for i, j in
             [(0, 0), (1, 0), (2, 0), (2, 2), (3, 0), (3, 2), (3, 4)] for p in BN}
    want |= {"decode_head.conv_seg.weight", "decode_head.conv_seg.bias"}
    assert heads == want
    assert s["decode_head.conv_seg.weight"] == [150, 256, 1, 1] and s["class_embeddings"] == [150, 768]
    assert s["gamma"] == [768] and s["encoder_vq.encoder.conv_in.weight"] == [128, 3, 3, 3]


def test_refer_names_and_shapes_are_lavt_s():
    s = official_shapes("refer")
    head = {k for k in s if k.startswith("classifier.")}
    want = {f"classifier.conv{a}_{b}.weight" for a in (1, 2) for b in (4, 3, 2)}  # 3x3 convs, no bias
    want |= {f"classifier.bn{a}_{b}.{p}" for a in (1, 2) for b in (4, 3, 2) for p in BN}
    want |= {"classifier.conv1_1.weight", "classifier.conv1_1.bias"}
    assert head == want
    assert s["classifier.conv1_4.weight"] == [640, 2600, 3, 3] and s["classifier.conv1_3.weight"] == [640, 1320, 3, 3]
    assert s["classifier.conv1_2.weight"] == [640, 960, 3, 3] and s["classifier.conv1_1.weight"] == [2, 640, 1, 1]
    assert not any(k.startswith("clip.") or "text_model" in k for k in s)


def test_layers_of_equal_shape_keep_their_places():
    # mmseg's FPN applies fpn_convs.i to level i (finest first), like lateral_convs.i: the four 3x3 convs
    # share one shape, and the laterals' biases too, so only their index says which is which
    state = released_state("semseg", tiny("semseg"))
    for i in range(4):
        state[f"neck.fpn_convs.{i}.conv.bias"] = torch.full((16,), float(i))
        state[f"neck.lateral_convs.{i}.conv.bias"] = torch.full((16,), 10.0 + i)
    got = load_official(state, "semseg")
    for i in range(4):
        assert torch.equal(got[f"head.fpn_convs.{i}.bias"], torch.full((16,), float(i)))
        assert torch.equal(got[f"head.lateral_convs.{i}.bias"], torch.full((16,), 10.0 + i))
    # LAVT's SimpleDecoding: block _4 at 1/32, _3 at 1/16, _2 at 1/8, each conv1_k, bn1_k, ReLU, conv2_k, bn2_k,
    # ReLU. Only the conv1s' inputs differ in width: every conv2 and BN has one shape across blocks and within
    model = tiny("refer")
    assert [type(m).__name__ for m in model.head.fuse32] == ["Conv2d", "BatchNorm2d", "ReLU"] * 2
    state = released_state("refer", model)
    for level in (4, 3, 2):
        state[f"classifier.conv2_{level}.weight"] = torch.full_like(state[f"classifier.conv2_{level}.weight"], level)
        for b in (1, 2):
            bias = state[f"classifier.bn{b}_{level}.bias"]
            state[f"classifier.bn{b}_{level}.bias"] = torch.full_like(bias, 10 * level + b)
    got = load_official(state, "refer")
    for level, block in ((4, "fuse32"), (3, "fuse16"), (2, "fuse8")):
        assert (got[f"head.{block}.3.weight"] == level).all()
        assert (got[f"head.{block}.1.bias"] == 10 * level + 1).all()
        assert (got[f"head.{block}.4.bias"] == 10 * level + 2).all()


@pytest.mark.parametrize("task", ["depth", "semseg", "refer"])
def test_released_file_round_trips_into_a_model(task, tmp_path):
    source = tiny(task, seed=0).eval()
    path = official_file(task, released_state(task, source), tmp_path)
    want = {k: v for k, v in source.state_dict().items() if not k.startswith("clip.")}
    state = load_official(path, task)
    assert state.keys() == want.keys()
    for k in want:
        assert torch.equal(state[k], want[k]), k

    target = tiny(task, seed=1)  # different weights, same shapes
    load_official(path, task, model=target)
    got = target.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    args = {"depth": (torch.tensor([3]),), "semseg": (), "refer": (torch.randint(0, 49407, (1, 40)),)}[task]
    if task == "refer":
        target.clip.load_state_dict(source.clip.state_dict())  # the CLIP comes from the SD file
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(x, *args), source(x, *args))


def test_load_into_a_meta_model_assigns_the_tensors(tmp_path):
    source = tiny("depth", seed=0)
    path = official_file("depth", released_state("depth", source), tmp_path)
    with torch.device("meta"):
        target = build_model("depth", unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP, **TINY_DEPTH_HEAD)
    load_official(path, "depth", model=target)
    assert not any(t.is_meta for t in target.state_dict().values())
    assert torch.equal(target.class_embeddings, source.class_embeddings)


def test_a_model_loaded_from_a_dict_owns_its_tensors():
    released = released_state("depth", tiny("depth", seed=0))
    key = "encoder.out_layer.0.weight"
    before = released[key].clone()
    with torch.device("meta"):
        target = build_model("depth", unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP, **TINY_DEPTH_HEAD)
    load_official(released, "depth", model=target)
    built = official_model(released, "depth", unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP,
                           **TINY_DEPTH_HEAD)
    with torch.no_grad():  # an optimizer step on each model
        target.head.fuse[0].weight.add_(1.0)
        built.head.fuse[0].weight.add_(1.0)
    assert torch.equal(released[key], before)  # the caller's dict does not move


def test_unknown_missing_and_misshapen_names_are_refused(tmp_path):
    model = tiny("semseg")
    good = released_state("semseg", model)

    with pytest.raises(CheckpointError, match=r"unknown names \(1\): decode_head\.extra\.weight"):
        load_official({**good, "decode_head.extra.weight": torch.zeros(1)}, "semseg")
    # a rule without a trailing dot names one tensor: a longer name that starts like it is no match
    with pytest.raises(CheckpointError, match=r"unknown names \(1\): gamma_ema"):
        load_official({**good, "gamma_ema": torch.zeros(768)}, "semseg")

    no_group = {k: v for k, v in good.items() if not k.startswith("decode_head.conv_seg.")}
    with pytest.raises(CheckpointError, match=r"missing groups.*decode_head\.conv_seg\.\* -> head\.classifier\."):
        load_official(no_group, "semseg")

    missing = {k: v for k, v in good.items() if k != "decode_head.conv_seg.bias"}
    load_official(missing, "semseg")  # the group is there: only a model can tell one tensor is missing
    with pytest.raises(CheckpointError, match=r"missing \(1\): head\.classifier\.bias \(decode_head\.conv_seg\.bias\)"):
        load_official(missing, "semseg", model=model)

    # a tensor the model has no place for (a fifth scale head) is refused, not passed over
    extra = {**good, "decode_head.scale_heads.4.0.conv.weight": torch.zeros(16, 16, 3, 3)}
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): head\.scale_heads\.4\.0\.conv\.weight"):
        load_official(extra, "semseg", model=model)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_official({"model": {"epoch": 3}}, "depth")

    wrong = {**good, "neck.lateral_convs.0.conv.weight": torch.zeros(16, 3, 1, 1)}
    with pytest.raises(CheckpointError, match=r"neck\.lateral_convs\.0\.conv\.weight: file \[16, 3, 1, 1\] vs model "
                                              r"\[16, 32, 1, 1\]"):
        load_official(wrong, "semseg", model=model)

    # a depth file is not a semseg file, nor a semseg file a refer one: said so, not hundreds of unknown names
    depth = released_state("depth", tiny("depth"))
    with pytest.raises(CheckpointError, match="^a VPD depth checkpoint by its names, not a semseg one: give --task"):
        load_official(depth, "semseg")
    for task, other in (("semseg", "refer"), ("refer", "depth"), ("refer", "semseg")):
        with pytest.raises(CheckpointError, match=f"^a VPD {task} checkpoint by its names, not a {other} one"):
            load_official(released_state(task, tiny(task)), other)
    # the UNet's unused `out` head is dropped from a depth file too (the released one had it deleted)
    out_head = "encoder.unet.unet.diffusion_model.out.0.weight"
    assert load_official({**depth, out_head: torch.ones(32)}, "depth").keys() == load_official(depth, "depth").keys()
    with pytest.raises(ValueError, match="unknown task"):
        load_official(good, "detection")
    # an SD file given as the model: said so, not 600 unknown names
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "cond_stage_model.x": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"a Stable Diffusion checkpoint .*not a VPD semseg model.*--sd-ckpt"):
        load_official(sd, "semseg")


def test_pickles_with_other_classes_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"gamma": torch.zeros(2)}, "args": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_official(path, "refer")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official(tmp_path / "missing.pth", "refer")


@pytest.mark.parametrize("task", ["depth", "semseg", "refer"])
def test_official_model_is_built_from_the_file_alone(task, tmp_path):
    source = tiny(task, seed=0).eval()
    path = official_file(task, released_state(task, source), tmp_path)
    sd = {"cond_stage_model.transformer.text_model." + k[len("clip."):]: v
          for k, v in source.state_dict().items() if k.startswith("clip.")}
    head = {"depth": TINY_DEPTH_HEAD, "semseg": {"channels": 16}, "refer": {}}[task]
    model = official_model(path, task, sd_ckpt=sd if task == "refer" else None, unet_cfg=TINY_UNET,
                           vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP, **head).eval()
    assert not any(t.is_meta for t in model.state_dict().values())
    assert not any(p.requires_grad for p in model.backbone.vae.parameters())
    if task == "refer":
        assert model.max_tokens == 40 and not any(p.requires_grad for p in model.clip.parameters())
    else:
        assert torch.equal(model.class_embeddings, source.class_embeddings)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    args = {"depth": (torch.tensor([3]),), "semseg": (), "refer": (torch.randint(0, 49407, (1, 40)),)}[task]
    with torch.no_grad():
        torch.testing.assert_close(model(x, *args), source(x, *args))
    if task == "refer":
        with pytest.raises(ValueError, match=r"needs an SD file \(--sd-ckpt\) for its CLIP text encoder"):
            official_model(path, task)
        no_clip = tmp_path / "vae_only.safetensors"  # an SD file that cannot give the CLIP: said of it, not the release
        save_file({"first_stage_model.encoder.conv_in.bias": torch.zeros(3)}, str(no_clip))
        with pytest.raises(SDFileError, match=rf"^--sd-ckpt {re.escape(str(no_clip))}: "):
            official_model(path, task, sd_ckpt=str(no_clip), unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP)


def test_an_sd_file_for_an_official_depth_or_semseg_model_is_refused(tmp_path):
    # their files hold the VAE and UNet; an --sd-ckpt would be read for nothing (only refer takes CLIP from it)
    from vpd.tasks import load_model
    sd = tmp_path / "v1-5.safetensors"
    sd.write_bytes(b"")  # (there, but not read)
    for task in ("depth", "semseg"):
        path = official_file(task, released_state(task, tiny(task)), tmp_path)
        vae = r"encoder\.encoder_vq\.\*" if task == "depth" else r"encoder_vq\.\*"  # each release's own names
        with pytest.raises(SystemExit, match=rf"the released {task} file holds VAE tensors \({vae}\) and the "
                                             r"UNet: an SD file \(--sd-ckpt\) is read only"):
            load_model(str(path), task, sd_ckpt=str(sd))
    with pytest.raises(SystemExit, match="--sd-ckpt v1-4.safetensors: no such file"):  # before the release is read
        load_model(str(path), "semseg", sd_ckpt="v1-4.safetensors")


@pytest.mark.parametrize("task", ["depth", "semseg", "refer"])
def test_a_release_without_the_vae_takes_it_from_the_sd_file(task, tmp_path):
    # VPD's code builds its model from the SD file and loads a release over it non-strictly: a slimmed
    # file without the frozen VAE (encoder_vq.*) works there with the SD file's; here with --sd-ckpt's
    source = tiny(task, seed=0).eval()
    vae = "encoder.encoder_vq." if task == "depth" else "encoder_vq."
    slim = {k: v for k, v in released_state(task, source).items() if not k.startswith(vae)}
    assert len(slim) < len(released_state(task, source))
    path = official_file(task, slim, tmp_path)
    assert not any(k.startswith("backbone.vae.") for k in load_official(path, task))  # no "missing group" error
    sd = {"first_stage_model." + k: v for k, v in source.backbone.vae.state_dict().items()}
    if task == "refer":  # (its CLIP comes from the SD file in any case)
        sd.update({"cond_stage_model.transformer.text_model." + k: v for k, v in source.clip.state_dict().items()})
    head = {"depth": TINY_DEPTH_HEAD, "semseg": {"channels": 16}, "refer": {}}[task]
    # loaded into a model of ours: its VAE stays, if it has one (not on `meta`)
    target = tiny(task, seed=1)
    vae_before = {k: v.clone() for k, v in target.backbone.vae.state_dict().items()}
    load_official(path, task, model=target)
    assert all(torch.equal(v, target.backbone.vae.state_dict()[k]) for k, v in vae_before.items())
    first_conv = lambda m: m.backbone.unet.input_blocks[0][0].weight  # noqa: E731
    assert torch.equal(first_conv(target), first_conv(source))  # the rest is the file's
    with torch.device("meta"):
        bare = build_model(task, unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP, **head,
                           **({"num_classes": 5} if task == "semseg" else {}))
    with pytest.raises(CheckpointError, match=r"missing \(\d+\): backbone\.vae\."):
        load_official(path, task, model=bare)
    model = official_model(path, task, sd_ckpt=sd, unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP, **head)
    model.eval()
    assert not any(p.requires_grad for p in model.backbone.vae.parameters())
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    args = {"depth": (torch.tensor([3]),), "semseg": (), "refer": (torch.randint(0, 49407, (1, 40)),)}[task]
    with torch.no_grad():
        torch.testing.assert_close(model(x, *args), source(x, *args))
    if task != "refer":  # (refer needs an SD file anyway)
        with pytest.raises(ValueError, match=r"holds no VAE \(a slimmed release\): give the SD file"):
            official_model(path, task, unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP, **head)
    # another part left out is still refused
    no_head = {k: v for k, v in slim.items() if not any(h in k for h in ("last_layer_depth.", "conv_seg.", "conv1_1."))}
    with pytest.raises(CheckpointError, match="missing groups"):
        load_official(no_head, task)


def test_a_refer_release_is_scored_on_the_dataset_its_args_name(tmp_path, monkeypatch):
    # LAVT's training args travel in the refer file: a G-Ref model is scored on G-Ref (its split set
    # too) unless --dataset asks for another, not on RefCOCO by default
    from types import SimpleNamespace

    from vpd import official, tasks
    path = tmp_path / "gref.pth"
    torch.save({"model": {}, "args": argparse.Namespace(dataset="refcocog", splitBy="google", lr=5e-5)}, path)
    assert official.refer_trained_on(path) == {"dataset": "refcocog", "split_by": "google"}
    bare = tmp_path / "bare.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=5e-5)}, bare)
    assert official.refer_trained_on(bare) == {}
    monkeypatch.setattr(official, "official_model", lambda *a, **kw: torch.nn.Identity())  # the weights: elsewhere
    asked = []
    monkeypatch.setattr(tasks, "datasets", lambda task, root, crop, **kw: asked.append(kw) or (None, None))

    def scored_on(ckpt, dataset=None):
        args = SimpleNamespace(ckpt=str(ckpt), task="refer", sd_ckpt=None, data_root="refer/data", dataset=dataset,
                               split_by=None, split=None, ms_flip=False)
        ev = tasks.build_eval(args, torch.device("cpu"))
        assert (ev.dataset_name, ev.split_by) == (asked[-1]["dataset"], asked[-1]["split_by"])
        return ev.dataset_name, ev.split_by
    assert scored_on(path) == ("refcocog", "google")
    assert scored_on(path, dataset="refcoco") == ("refcoco", "unc")  # another dataset: its own split set
    assert scored_on(bare) == ("refcoco", "unc")  # a file that does not say: the default, as before
    clef = tmp_path / "clef.pth"
    torch.save({"model": {}, "args": argparse.Namespace(dataset="refclef", splitBy="unc")}, clef)
    with pytest.raises(SystemExit, match=r"clef.pth was trained on 'refclef', not one of ours .*: give --dataset"):
        scored_on(clef)
    assert scored_on(clef, dataset="refcoco+") == ("refcoco+", "unc")
