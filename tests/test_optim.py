"""Optimizer groups and the learning-rate schedules (vpd/optim.py) against the recipes' own formulas."""
import math

import pytest
import torch

from vpd.demo import TINY_CLIP, TINY_UNET, TINY_VAE
from vpd.model import build_model
from vpd.optim import build_optimizer, lr_factor, param_groups, set_lr


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("depth", None, TINY_UNET, TINY_VAE, TINY_CLIP, fuse_channels=16, deconv_channels=8,
                       out_channels=8)


def test_groups_cover_trainable_parameters_once(model):
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, unet_lr_mult=0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == set(trainable)
    assert not any(n.startswith("backbone.vae.") for n in trainable.values())  # frozen VAE left out
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = by_id[id(p)]
        unet = name.startswith("backbone.unet.")
        assert g["lr"] == pytest.approx(1e-5 if unet else 1e-3)
        assert g["lr_scale"] == (0.01 if unet else 1.0)
        assert g["weight_decay"] == (0.0 if p.ndim == 1 else 0.1), name  # no decay on norms, biases, gamma
    gamma = next(g for g in groups for p in g["params"] if p is model.backbone.gamma)
    assert gamma["weight_decay"] == 0.0 and gamma["lr_scale"] == 1.0


def test_set_lr_keeps_the_unet_multiplier(model):
    opt = build_optimizer(model, 1e-3, 0.1, 0.1)
    set_lr(opt, 2e-4)
    assert sorted({round(g["lr"], 12) for g in opt.param_groups}) == [2e-5, 2e-4]


def mmcv_semseg_group(vpd_name):
    """VPD's segmentation config (paramwise_cfg custom_keys) as mmcv's DefaultOptimizerConstructor applies
    it: keys sorted by name, then by length, longest first; the first key in the tensor's name decides."""
    custom_keys = {"unet": {"lr_mult": 0.1}, "encoder_vq": {"lr_mult": 0.0}, "text_encoder": {"lr_mult": 0.0},
                   "norm": {"decay_mult": 0.0}}
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in vpd_name:
            return custom_keys[key].get("lr_mult", 1.0), custom_keys[key].get("decay_mult", 1.0)
    return 1.0, 1.0


def vpd_refer_group(vpd_name, lr_mult=0.01):
    """VPD's refer/train.py groups: (lr scale, decay multiplier). Torch ignored its lr_scale key (so the
    recipe's multiplier is 1); the groups it meant are what a multiplier given to ours applies to."""
    if "unet" in vpd_name and "norm" in vpd_name:
        return lr_mult, 0.0
    if "unet" in vpd_name:
        return lr_mult, 1.0
    if "norm" in vpd_name:
        return 1.0, 0.0
    return 1.0, 1.0


@pytest.mark.parametrize("task, lr_mult, rule", [("semseg", 0.1, mmcv_semseg_group), ("refer", 0.01, vpd_refer_group)])
def test_official_groups_are_vpds_own(task, lr_mult, rule):
    from vpd.official import official_name
    with torch.device("meta"):
        model = build_model(task)
    groups = param_groups(model, lr=1.0, weight_decay=0.5, unet_lr_mult=lr_mult, official=task)
    by_id = {id(p): g for g in groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(by_id) == len(trainable)
    undecayed_unet = 0
    for name, p in trainable.items():
        g = by_id[id(p)]
        scale, decay_mult = rule(official_name(name, task))
        assert (g["lr_scale"], g["weight_decay"]) == (scale, 0.5 * decay_mult), name
        undecayed_unet += name.startswith("backbone.unet.") and g["weight_decay"] == 0
    # the UNet's transformer norms (GroupNorm norm, LayerNorms norm1-3): 16 blocks x 8 tensors; the
    # ResBlock GroupNorms (in_layers.0, out_layers.0), biases, head BatchNorms and gamma are decayed
    assert undecayed_unet == 128
    assert by_id[id(model.backbone.gamma)]["weight_decay"] == 0.5
    if task == "semseg":  # mmcv tries "norm" before "unet": those norms train at the full lr
        norm = model.backbone.unet.input_blocks[1][1].transformer_blocks[0].norm1.weight
        assert by_id[id(norm)]["lr_scale"] == 1.0
        assert by_id[id(model.backbone.unet.input_blocks[1][0].in_layers[0].weight)]["lr_scale"] == 0.1


def test_official_groups_name_a_task(model):
    with pytest.raises(ValueError, match="official='sesmeg'"):
        param_groups(model, 1e-3, 0.1, 0.01, official="sesmeg")
    # VPD's depth groups are the default ones
    assert [(g["lr_scale"], g["weight_decay"], len(g["params"])) for g in param_groups(model, 1e-3, 0.1, 0.01)] == \
        [(g["lr_scale"], g["weight_decay"], len(g["params"])) for g in param_groups(model, 1e-3, 0.1, 0.01, "depth")]


def test_no_trainable_parameters_is_an_error():
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(torch.nn.Linear(2, 2).requires_grad_(False), 1e-3, 0.0, 1.0)


def mmcv_poly(step, total, base, power, min_lr, warmup, ratio):
    """mmcv PolyLrUpdaterHook + linear warmup, as written in mmcv (by_epoch=False)."""
    coeff = (1 - step / total) ** power
    regular = (base - min_lr) * coeff + min_lr
    if warmup and step < warmup:
        k = (1 - step / warmup) * (1 - ratio)
        return regular * (1 - k)
    return regular


@pytest.mark.parametrize("step", [0, 1, 750, 1499, 1500, 40_000, 79_999])
def test_poly_with_warmup_matches_mmcv(step):
    # ADE20K recipe: 80k iterations, power 1, 1500 warmup iterations from 1e-6
    got = 8e-5 * lr_factor(step, 80_000, "poly", warmup=1500, warmup_ratio=1e-6, power=1.0)
    assert got == pytest.approx(mmcv_poly(step, 80_000, 8e-5, 1.0, 0.0, 1500, 1e-6), rel=1e-12)


def test_poly_hand_values():
    assert lr_factor(0, 100, "poly") == 1.0
    assert lr_factor(50, 100, "poly", power=0.9) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(100, 100, "poly") == 0.0
    assert lr_factor(0, 100, "poly", warmup=10) == pytest.approx(1e-6)
    assert lr_factor(5, 100, "poly", warmup=10) == pytest.approx(0.95 * (0.5 + 0.5e-6))


def vpd_depth_lr(global_step, iterations, half_epoch, max_lr=5e-4, min_lr=3e-5, power=0.9):
    """VPD/GLPDepth depth train loop: global_step counts from 1, peak at half_epoch epochs."""
    x = global_step / iterations / half_epoch
    if global_step < iterations * half_epoch:
        return (max_lr - min_lr) * x ** power + min_lr
    return max(min_lr, (min_lr - max_lr) * (x - 1) ** power + max_lr)


@pytest.mark.parametrize("step", [0, 1, 99, 500, 1199, 1200, 1201, 1800, 2399, 2500, 2999])
def test_updown_matches_vpd_depth(step):
    iterations, epochs = 100, 25  # steps per epoch; peak at epoch 12
    peak = (epochs // 2) * iterations
    got = 5e-4 * lr_factor(step, epochs * iterations, "updown", power=0.9, min_ratio=3e-5 / 5e-4, peak=peak)
    assert got == pytest.approx(vpd_depth_lr(step + 1, iterations, epochs // 2), rel=1e-9, abs=1e-15)


def test_updown_shape():
    f = [lr_factor(s, 1000, "updown", power=1.0, min_ratio=0.1) for s in range(1000)]
    assert max(f) == pytest.approx(1.0) and f.index(max(f)) == 499  # default peak: half way
    assert f[0] == pytest.approx(0.1 + 0.9 / 500) and f[-1] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(f[:499], f[1:500])) and all(a >= b for a, b in zip(f[499:], f[500:]))
    assert math.isclose(min(f), 0.1)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        lr_factor(0, 10, "cosine")


def test_poly_with_a_floor_is_mmcvs():
    # mmcv PolyLrUpdaterHook: (base - min) * (1 - t/T)^p + min, here as a factor of base with min = 0.1 base
    assert lr_factor(50, 100, "poly", min_ratio=0.1) == pytest.approx(0.9 * 0.5 + 0.1)


def test_poly_past_the_end_stays_at_the_floor():
    # past `total` (e.g. a last partial step) the poly factor stays at min_ratio instead of going
    # negative (power 1) or complex (power 0.9)
    assert lr_factor(120, 100, "poly") == 0.0
    assert lr_factor(120, 100, "poly", power=0.9, min_ratio=0.1) == pytest.approx(0.1)


def test_adamw_hyperparameters_are_the_recipes(model):
    # mmseg config / GLPDepth / LAVT: AdamW with betas (0.9, 0.999) and torch's eps 1e-8
    opt = build_optimizer(model, 8e-5, 1e-3, 0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in opt.param_groups)
    # train.py asks for the fused kernel on CUDA (bench.py's step times assume it); only then
    assert not any(g["fused"] for g in opt.param_groups)
    assert all(g["fused"] for g in build_optimizer(model, 8e-5, 1e-3, 0.1, fused=True).param_groups)
