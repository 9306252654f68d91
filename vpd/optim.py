"""Optimizer parameter groups and the three learning-rate schedules of the paper's recipes."""
import torch

from vpd.official import official_name


def param_groups(model, lr, weight_decay, unet_lr_mult, official=None):
    """AdamW groups: the UNet at `lr * unet_lr_mult`, everything else trainable at `lr`; no weight
    decay on 1-d tensors (norm weights, biases, `gamma`). Frozen parts (VAE, CLIP) have
    requires_grad=False and are left out. Each group carries `lr_scale` so schedules can rescale.

    official="semseg" / "refer": VPD's own groups for that task's model, which its code picks by
    substrings of its tensor names (official_name): no decay for names holding "norm" (the UNet's
    transformer norms), every other tensor decayed, biases and BatchNorms included; semseg's mmcv
    `custom_keys` try "norm" before "unet", so those norms also train at the full lr. VPD's depth
    groups are the default ones."""
    if official not in (None, "semseg", "refer", "depth"):
        raise ValueError(f"official={official!r}: a task name (semseg, refer or depth) or None")
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if official in ("semseg", "refer"):
            vpd_name = official_name(name, official)
            at_unet_lr = "unet" in vpd_name and not (official == "semseg" and "norm" in vpd_name)
            decayed = "norm" not in vpd_name
        else:
            at_unet_lr, decayed = name.startswith("backbone.unet."), p.ndim > 1
        scale = unet_lr_mult if at_unet_lr else 1.0
        decay = weight_decay if decayed else 0.0
        g = groups.setdefault((scale, decay), {"params": [], "lr_scale": scale, "lr": lr * scale,
                                               "weight_decay": decay})
        g["params"].append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return list(groups.values())


def lr_factor(step, total, schedule, warmup=0, warmup_ratio=1e-6, power=1.0, min_ratio=0.0, peak=None):
    """Learning rate at `step` (0-based, before the update) as a fraction of the peak lr.

    poly: mmseg / LAVT, (1 - step/total)^power decaying to `min_ratio`, with mmcv's linear warmup
          from `warmup_ratio` over `warmup` steps (semseg: 1500 steps from 1e-6; refer: no warmup).
    updown: VPD's depth recipe, rising from `min_ratio` to 1 at step `peak` (default: half way;
          VPD puts it at epoch epochs // 2) with exponent `power`, then falling back at the same
          rate and staying at `min_ratio`.
    """
    if schedule == "poly":
        f = (1 - min(step, total) / total) ** power * (1 - min_ratio) + min_ratio
        if step < warmup:  # mmcv: warmup_lr = regular_lr * (1 - (1 - step/warmup) * (1 - ratio))
            f *= 1 - (1 - step / warmup) * (1 - warmup_ratio)
        return f
    if schedule == "updown":
        x = (step + 1) / (peak or total / 2)  # VPD counts steps from 1
        if x < 1:
            return (1 - min_ratio) * x ** power + min_ratio
        return max(min_ratio, 1 - (1 - min_ratio) * (x - 1) ** power)
    raise ValueError(f"unknown schedule {schedule!r} (poly or updown)")


def build_optimizer(model, lr, weight_decay, unet_lr_mult, fused=None, official=None):
    groups = param_groups(model, lr, weight_decay, unet_lr_mult, official)
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, **kw)


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
