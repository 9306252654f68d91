"""Task heads on top of the VPD feature pyramid.

Every head takes the backbone's four maps, finest first: [1/8, 1/16, 1/32, 1/64] of the image, with
channel counts `in_channels` (for SD v1.5 and N text tokens: [320, 640+N, 1280+N, 1280], or
[320, 640, 1280, 1280] when the backbone keeps no attention maps).

- FPNSegHead: mmseg's FPN neck + FPNHead ("Semantic FPN"), as VPD's ADE20K config builds them.
- DepthHead: VPD's NYUv2 decoder (GLPDepth / SimpleBaseline style deconvolutions).
- ReferHead: LAVT's SimpleDecoding, as VPD's referring-segmentation model uses it.
- resize_bilinear: the segmentation models' logits brought to the image size; Upsample2x, the FPN head's
  x2 upsampling, by the same matrix products.

Module names are plain; vpd/official.py holds the short table mapping the released checkpoints'
names onto them.
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn


def resize_bilinear(x, size, align_corners=False):
    """F.interpolate(x, size, mode="bilinear") in float32, as two matrix products: out = A_h x A_w^T, each
    row of A holding an output pixel's two interpolation weights (the source position clamped to the
    input, as PyTorch clamps it). The same values up to rounding, but a backward of two more products
    rather than a scatter: F.interpolate's backward adds each output pixel's gradient into four input
    pixels, on CUDA atomically, and at x8 (a 1/8 map to the image) some 256 adds land on each input pixel."""
    with _float32_region(x):  # autocast would run the products in bf16
        a_h = _interp_matrix(x.shape[-2], size[0], align_corners, x.device)
        a_w = _interp_matrix(x.shape[-1], size[1], align_corners, x.device)
        # the height first, on the small map; then the big product as one (B*K*H, w) x (w, W) matrix product
        y = (x.float().transpose(-1, -2) @ a_h.T).transpose(-1, -2)  # (..., H, w)
        return y @ a_w.T


class Upsample2x(nn.Module):
    """x2 bilinear upsampling (align_corners=False, as mmseg's Upsample in FPNHead) by resize_bilinear's matrix
    products, back in x's dtype and memory format: its backward is two more products, where F.interpolate's
    (eager, and compiled alike) adds each gradient into its source pixels atomically."""

    def forward(self, x):
        return cast_like(resize_bilinear(x, (2 * x.shape[-2], 2 * x.shape[-1])), x)


def cast_like(y, x):
    """y in x's dtype and, for a channels-last x, memory format (resize_bilinear returns float32, NCHW)."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return y.to(x.dtype, memory_format=torch.channels_last if nhwc else torch.contiguous_format)


def _float32_region(x):
    """Autocast turned off for x's device (devices without autocast, such as meta, have nothing to turn off).
    CPU and CUDA are named first: torch 2.5's compiler cannot trace the availability check (a graph break)."""
    device = x.device.type
    has_autocast = device in ("cpu", "cuda") or torch.amp.is_autocast_available(device)
    return torch.autocast(device, enabled=False) if has_autocast else nullcontext()


def _interp_matrix(n_in, n_out, align_corners, device):
    """(n_out, n_in) bilinear weights: the hat function max(0, 1 - |src - j|) around each output's source
    position src, which gives weight 1 - frac(src) to floor(src) and frac(src) to the next pixel."""
    i = torch.arange(n_out, device=device, dtype=torch.float64)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else i * 0
    else:
        src = (i + 0.5) * (n_in / n_out) - 0.5
    src = src.clamp(0, n_in - 1)
    j = torch.arange(n_in, device=device, dtype=torch.float64)
    return (1 - (src[:, None] - j[None, :]).abs()).clamp(min=0).float()


class ConvBNReLU(nn.Module):
    """3x3 conv (no bias: BN follows) -> BatchNorm -> ReLU; `conv`/`bn` as in mmcv's ConvModule."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _check_inputs(feats, in_channels, what):
    if len(feats) != len(in_channels):
        raise ValueError(f"{what} takes {len(in_channels)} feature maps, got {len(feats)}")
    got = [f.shape[1] for f in feats]
    if got != list(in_channels):
        raise ValueError(f"{what} expects feature channels {list(in_channels)}, got {got}")


class FPNSegHead(nn.Module):
    """Semantic FPN (mmseg FPN neck + FPNHead) -> class logits at 1/8 of the image.

    Neck: a 1x1 lateral conv per level to `channels`, a top-down pass adding each coarser lateral
    (nearest-upsampled) into the finer one, then a 3x3 conv per level. Head: per level
    log2(stride / finest stride) (at least one) 3x3 conv-BN-ReLU blocks, each followed by a x2
    bilinear upsample for the coarser levels, so that all land at 1/8; summed; Dropout2d; 1x1 conv.
    """

    def __init__(self, in_channels: list, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.in_channels = list(in_channels)
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        self.scale_heads = nn.ModuleList()
        for i in range(len(in_channels)):
            blocks = []
            for _ in range(max(1, i)):  # level i sits 2**i below the finest: i conv+upsample steps
                blocks.append(ConvBNReLU(channels, channels))
                if i > 0:
                    blocks.append(Upsample2x())
            self.scale_heads.append(nn.Sequential(*blocks))  # indices as mmseg's: conv blocks at 0, 2, 4
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self._init_weights()

    def _init_weights(self):
        # mmseg: Xavier-uniform neck convs, Kaiming head convs, N(0, 0.01) classifier
        for m in [*self.lateral_convs, *self.fpn_convs]:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        for m in self.scale_heads.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats):
        _check_inputs(feats, self.in_channels, "FPNSegHead")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse into fine
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        x = self.scale_heads[0](outs[0])
        for head, o in zip(self.scale_heads[1:], outs[1:]):
            y = head(o)  # at 1/8 by its x2 upsamples unless the map's sides are odd somewhere on the way
            if y.shape[-2:] != x.shape[-2:]:  # (mmseg resizes regardless: compiled, a same-size resize still costs)
                y = cast_like(resize_bilinear(y, x.shape[-2:]), y)
            x = x + y
        return self.classifier(self.dropout(x))


class DepthHead(nn.Module):
    """VPD's NYUv2 depth decoder -> depth in (0, max_depth) at the image size (32x the 1/32 map).

    Fuse at 1/32: 1/8 -> conv s2, GroupNorm(16), ReLU, conv s2; 1/16 -> conv s2; 1/32 concatenated
    with the nearest-x2 upsampled 1/64 map. Concatenate, 1x1 conv to `fuse_channels`, GroupNorm(16),
    ReLU. Decode: 3 x (ConvTranspose k2 s2 -> BN -> ReLU), 3x3 conv-BN-ReLU to
    `out_channels`, bilinear x2 twice, 3x3 conv, ReLU, 3x3 conv to 1, sigmoid x max_depth.
    `forward(feats, crop=None)`: `crop` (h, w) trims the fused 1/32 map to its top-left h x w
    (VPD pads 480x480 inputs to 512 and drops the fused map's last row and column).
    """

    def __init__(self, in_channels: list, max_depth: float = 10.0, fuse_channels: int = 1536,
                 deconv_channels: int = 32, out_channels: int = 192):
        super().__init__()
        c8, c16, c32, c64 = in_channels
        self.in_channels = list(in_channels)
        self.max_depth = max_depth
        self.down8 = nn.Sequential(
            nn.Conv2d(c8, c8, 3, stride=2, padding=1), nn.GroupNorm(16, c8), nn.ReLU(),
            nn.Conv2d(c8, c8, 3, stride=2, padding=1))
        self.down16 = nn.Sequential(nn.Conv2d(c16, c16, 3, stride=2, padding=1))
        self.fuse = nn.Sequential(nn.Conv2d(c8 + c16 + c32 + c64, fuse_channels, 1),
                                  nn.GroupNorm(16, fuse_channels), nn.ReLU())
        deconv, c = [], fuse_channels
        for _ in range(3):  # 1/32 -> 1/4
            deconv += [nn.ConvTranspose2d(c, deconv_channels, 2, stride=2, bias=False),
                       nn.BatchNorm2d(deconv_channels), nn.ReLU()]
            c = deconv_channels
        self.deconv = nn.Sequential(*deconv)
        self.conv = nn.Sequential(nn.Conv2d(c, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU())
        self.predict = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(out_channels, 1, 3, padding=1))
        self._init_weights()

    def _init_weights(self):
        # VPD: truncated N(0, 0.02) for the fusing convs, N(0, 0.001) for the decoder, BN at 1
        for m in [*self.down8, *self.down16, *self.fuse]:
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for m in [*self.deconv, *self.conv, *self.predict]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats, crop=None):
        _check_inputs(feats, self.in_channels, "DepthHead")
        f8, f16, f32, f64 = feats
        f64 = F.interpolate(f64, scale_factor=2, mode="nearest")
        x = self.fuse(torch.cat([self.down8(f8), self.down16(f16), f32, f64], dim=1))  # all at 1/32
        if crop is not None:
            x = x[:, :, :crop[0], :crop[1]]
        x = self.conv(self.deconv(x))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.predict[:-1](x)
        # the last conv and the sigmoid in float32: under bf16 autocast depths would round to 3-6 cm steps
        with _float32_region(x):
            return torch.sigmoid(self.predict[-1](x.float())) * self.max_depth


def _fuse_block(in_ch, hidden):
    return nn.Sequential(nn.Conv2d(in_ch, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                         nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())


class ReferHead(nn.Module):
    """LAVT's SimpleDecoding -> (B, 2, H/8, W/8) mask logits (background, target).

    Top-down: upsample the 1/64 map to 1/32 (bilinear, align_corners), concatenate with 1/32, two
    3x3 conv-BN-ReLU; the same with 1/16, then with 1/8; a 1x1 conv to the 2 classes.
    `hidden` defaults to half the coarsest map's channels (640 for SD v1.5).
    """

    def __init__(self, in_channels: list, hidden: int = None):
        super().__init__()
        c8, c16, c32, c64 = in_channels
        self.in_channels = list(in_channels)
        hidden = hidden or c64 // 2
        self.fuse32 = _fuse_block(c64 + c32, hidden)
        self.fuse16 = _fuse_block(hidden + c16, hidden)
        self.fuse8 = _fuse_block(hidden + c8, hidden)
        self.classifier = nn.Conv2d(hidden, 2, 1)

    @staticmethod
    def _up_cat(x, skip):
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([x, skip], dim=1)

    def forward(self, feats):
        _check_inputs(feats, self.in_channels, "ReferHead")
        f8, f16, f32, f64 = feats
        x = self.fuse32(self._up_cat(f64, f32))
        x = self.fuse16(self._up_cat(x, f16))
        x = self.fuse8(self._up_cat(x, f8))
        return self.classifier(x)
