"""Import of the released VPD checkpoints (wl-zhao/VPD) into our task models.

What each file holds (torch pickles):
    depth  (.ckpt)  {'model': state}           names under encoder.* / decoder.* / last_layer_depth.*
    semseg (.pth)   {'meta': ..., 'state_dict': state}   mmseg names, plus ldm's noise-schedule buffers
    refer  (.pth)   {'model': state, 'optimizer', 'epoch', 'lr_scheduler', 'args': argparse.Namespace}

Name mapping, by prefix (official -> ours); a rule without a trailing dot names one tensor:

    depth                                   semseg / refer
    encoder.unet.unet.diffusion_model. -> backbone.unet.      unet.unet.diffusion_model. -> backbone.unet.
    encoder.encoder_vq.                -> backbone.vae.       encoder_vq.                -> backbone.vae.
    encoder.text_adapter.              -> backbone.text_adapter.   text_adapter.  -> backbone.text_adapter.
    encoder.gamma                      -> backbone.gamma      gamma                      -> backbone.gamma
    encoder.class_embeddings           -> class_embeddings    class_embeddings (semseg)  -> class_embeddings
    encoder.layer1.                    -> head.down8.
    encoder.layer2.                    -> head.down16.        semseg: mmseg's ConvModule wraps a conv as `.conv`
    encoder.out_layer.                 -> head.fuse.          neck.lateral_convs.i.conv. -> head.lateral_convs.i.
    decoder.deconv_layers.             -> head.deconv.        neck.fpn_convs.i.conv.     -> head.fpn_convs.i.
    decoder.conv_layers.               -> head.conv.          decode_head.scale_heads.   -> head.scale_heads.
    last_layer_depth.                  -> head.predict.       decode_head.conv_seg.      -> head.classifier.

    refer (LAVT SimpleDecoding): classifier.{conv1_4, bn1_4, conv2_4, bn2_4}. -> head.fuse32.{0, 1, 3, 4}.,
    the same for _3 -> fuse16 and _2 -> fuse8, classifier.conv1_1. -> head.classifier.

`official_model(path, task, sd_ckpt)` builds the whole model from a released file: everything but
the refer model's CLIP text encoder (read from the SD file) comes from the file itself, class
embeddings included (evaluating the released models must use those, not recomputed ones). A file
without the frozen VAE (should a slimmed copy such as `fpn_vpd_sd1-5_512x512_slim.ckpt` leave it out)
takes it from the SD file too, as VPD's code does: it builds the model from the SD file and loads a
release over it non-strictly.

Dropped on purpose: `sd_model.*` (ldm's noise-schedule buffers in the semseg file) and the UNet's
unused `out.*` head. Any other name, or a rule that matches nothing (but the VAE's), is an error.
The refer file holds no CLIP: our `clip.*` comes from the SD checkpoint.
"""
import argparse
import os

import torch

from vpd.checkpoint import CheckpointError, describe, listing, mismatch_lines, torch_load

_BACKBONE = [("unet.unet.diffusion_model.", "backbone.unet."), ("encoder_vq.", "backbone.vae."),
             ("text_adapter.", "backbone.text_adapter."), ("gamma", "backbone.gamma")]

RULES = {
    "depth": [("encoder." + a, b) for a, b in _BACKBONE] + [
        ("encoder.class_embeddings", "class_embeddings"),
        ("encoder.layer1.", "head.down8."),
        ("encoder.layer2.", "head.down16."),
        ("encoder.out_layer.", "head.fuse."),
        ("decoder.deconv_layers.", "head.deconv."),
        ("decoder.conv_layers.", "head.conv."),
        ("last_layer_depth.", "head.predict."),
    ],
    "semseg": _BACKBONE + [("class_embeddings", "class_embeddings")]
    + [(f"neck.lateral_convs.{i}.conv.", f"head.lateral_convs.{i}.") for i in range(4)]
    + [(f"neck.fpn_convs.{i}.conv.", f"head.fpn_convs.{i}.") for i in range(4)] + [
        ("decode_head.scale_heads.", "head.scale_heads."),
        ("decode_head.conv_seg.", "head.classifier."),
    ],
    "refer": _BACKBONE + [
        (f"classifier.{layer}{level}.", f"head.{block}.{index}.")
        for level, block in (("_4", "fuse32"), ("_3", "fuse16"), ("_2", "fuse8"))
        for layer, index in (("conv1", 0), ("bn1", 1), ("conv2", 3), ("bn2", 4))
    ] + [("classifier.conv1_1.", "head.classifier.")],
}

DROP = {
    "depth": ("encoder.unet.unet.diffusion_model.out.",),
    "semseg": ("sd_model.", "unet.unet.diffusion_model.out."),
    "refer": ("unet.unet.diffusion_model.out.",),
}

NOT_IN_FILE = {"depth": (), "semseg": (), "refer": ("clip.",)}  # model parts the file does not carry
VAE = "backbone.vae."  # frozen: a file may leave it out (the SD file has it)


def _rename(name, rules, inverse=False):
    for official, ours in rules:
        src, dst = (ours, official) if inverse else (official, ours)
        if name == src or (src.endswith(".") and name.startswith(src)):
            return dst + name[len(src):]
    return None


def official_name(name, task):
    """The name one of our `task` model's tensors has in VPD's own model (and its released files)."""
    _check_task(task)
    vpd_name = _rename(name, RULES[task], inverse=True)
    if vpd_name is None:
        raise ValueError(f"'{name}' has no name in a VPD {task} checkpoint")
    return vpd_name


def _check_task(task):
    if task not in RULES:
        raise ValueError(f"unknown task {task!r}: one of {tuple(RULES)}")


def read_official(src):
    """The state dict of a released VPD file (or a dict already holding one)."""
    if isinstance(src, dict):
        obj = src
    else:
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"official VPD checkpoint not found: {path}")
        obj = torch_load(path, allow=[argparse.Namespace])  # the refer file pickles its training args
        if not isinstance(obj, dict):  # e.g. a class-embeddings file
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict: not a VPD checkpoint")
    for key in ("state_dict", "model"):  # mmseg files / depth and refer files
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{describe(src)} holds no tensors")
    return state


def load_official(src, task, model=None):
    """Released VPD checkpoint (path or dict) -> state dict in our names, class embeddings included.

    Refuses names no rule knows and rules that match nothing (but the VAE's: a file may leave the
    frozen VAE out). With `model` (a task model of ours, possibly built on `meta`), also checks every
    name and shape against it and loads the tensors; `clip.*` of a refer model, and for a file without
    the VAE a VAE the model already holds (not on `meta`), are left as they are.
    """
    _check_task(task)
    official = read_official(src)
    if any(name.startswith("model.diffusion_model.") for name in official):
        raise CheckpointError(f"a Stable Diffusion checkpoint (model.diffusion_model.*), not a VPD {task} model: "
                              "it is what --sd-ckpt takes")
    state, unknown, unused = _renamed(official, task)
    if unknown or unused:
        other = next((t for t in RULES if t != task and _renamed(official, t)[1:] == ([], [])), None)
        if other is not None:  # said so, not hundreds of unknown names
            raise CheckpointError(f"a VPD {other} checkpoint by its names, not a {task} one: give --task {other}")
        msg = f"not a VPD {task} checkpoint as released"
        if unknown:
            msg += f"\n  unknown names ({len(unknown)}): {listing(unknown, 8)}"
        if unused:
            msg += f"\n  missing groups (no tensor for): {listing(unused, 8)}"
        raise CheckpointError(msg)
    if model is not None:
        _load_into(model, state, task, copy=isinstance(src, dict))
    return state


def _renamed(official, task):
    """-> (state in our names, official names no rule knows, rules (but the VAE's) that matched nothing)."""
    rules, state, unknown, used = RULES[task], {}, [], set()
    for name, t in official.items():
        if name.startswith(DROP[task]):
            continue
        ours = _rename(name, rules)
        if ours is None:
            unknown.append(name)
            continue
        used.add(next(r for r in rules if _rename(name, [r]) is not None))
        state[ours] = t
    return state, unknown, [f"{a}* -> {b}*" for a, b in rules if (a, b) not in used and b != VAE]


def has_vae(state):
    """Whether a state dict in our names holds the frozen VAE."""
    return any(k.startswith(VAE) for k in state)


def _load_into(model, state, task, copy=False):
    """copy: give the model its own tensors (the state's belong to a caller's dict)."""
    # a file without the VAE leaves the model's own, if it has one already (read from an SD file)
    vae_ready = not any(t.is_meta for t in model.backbone.vae.state_dict().values())
    not_in_file = NOT_IN_FILE[task] + ((VAE,) if vae_ready and not has_vae(state) else ())
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(not_in_file)}
    official = lambda k: _rename(k, RULES[task], inverse=True) or "?"
    missing = [f"{k} ({official(k)})" for k in expected if k not in state]
    unexpected = [f"{k} ({official(k)})" for k in state if k not in expected]
    wrong = [f"{official(k)}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"VPD {task} checkpoint does not fit {type(model).__name__}"
                              + mismatch_lines(missing, unexpected, wrong))
    cast = {k: v.to(expected[k].dtype, copy=copy) for k, v in state.items()}
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(cast, strict=False, assign=on_meta)
    return model


def to_official(state, task):
    """Our state dict -> the released file's names (the inverse table); parts the file does not carry
    (`clip.*`) are left out."""
    _check_task(task)
    out = {}
    for k, v in state.items():
        if k.startswith(NOT_IN_FILE[task]):
            continue
        out[official_name(k, task)] = v
    return out


def refer_trained_on(path):
    """The dataset and split set a released refer file was trained on, from the training args it pickles
    (LAVT's --dataset and --splitBy): {"dataset": ..., "split_by": ...}, either left out where the file
    does not say. A zip file's tensors are mapped, not read: this second load costs the pickle's parse."""
    obj = torch_load(os.fspath(path), allow=[argparse.Namespace])
    args = vars(obj["args"]) if isinstance(obj, dict) and isinstance(obj.get("args"), argparse.Namespace) else {}
    said = {"dataset": args.get("dataset"), "split_by": args.get("splitBy")}
    return {k: v for k, v in said.items() if isinstance(v, str) and v}


class SDFileError(ValueError):
    """The SD file given for a release's frozen CLIP / VAE cannot give them."""


def official_model(src, task, sd_ckpt=None, **kw):
    """A task model with the weights of a released VPD file. The model is built on `meta` and takes the
    file's tensors; `sd_ckpt` (an SD v1 file) supplies the refer model's CLIP, and the VAE of a file
    without one. kw goes to build_model (configs, head widths); semseg's class count and refer's token
    count are read off the file."""
    from vpd.model import build_model
    from vpd.unet import UNetConfig

    _check_task(task)
    if task == "refer" and sd_ckpt is None:
        raise ValueError("the refer model needs an SD file (--sd-ckpt) for its CLIP text encoder, which the VPD "
                         "file does not hold")
    state = load_official(src, task)
    vae_from_sd = not has_vae(state)
    if vae_from_sd and sd_ckpt is None:
        raise ValueError("the file holds no VAE (a slimmed release): give the SD file the model was trained from "
                         "(--sd-ckpt; v1-5-pruned-emaonly for VPD's), for its frozen VAE encoder")
    if sd_ckpt is not None and not vae_from_sd and task != "refer":
        vae = "encoder.encoder_vq.*" if task == "depth" else "encoder_vq.*"
        raise ValueError(f"the released {task} file holds VAE tensors ({vae}) and the UNet: an SD file "
                         "(--sd-ckpt) is read only for the refer model's CLIP or for a release without the VAE")
    if task == "refer":  # N text tokens widen the 1/32 map: conv1_4 takes C64 + (C32 + N) channels
        cfg = kw.get("unet_cfg") or UNetConfig()
        kw["max_tokens"] = state["head.fuse32.0.weight"].shape[1] - cfg.model_channels * sum(cfg.channel_mult[-2:])
    else:
        kw["class_embeddings"] = state["class_embeddings"]
    with torch.device("meta"):
        model = build_model(task, **kw)
    try:
        if task == "refer":
            model.load_frozen_clip(sd_ckpt)
        if vae_from_sd:
            model.backbone.load_frozen_vae(sd_ckpt)
    except ValueError as e:  # said of the SD file: the VPD file itself was read
        raise SDFileError(f"--sd-ckpt {sd_ckpt}: {e}") from None
    _load_into(model, state, task, copy=isinstance(src, dict))
    return model
