"""The group norms of SD's UNet and VAE, and the ways they compile for a GPU.

On a GPU tensor, F.group_norm costs an NHWC network twice over:
- it first makes x contiguous (NCHW), so its traced output, and the gradient its backward hands on, are
  NCHW. In a backward graph, inductor gives cuDNN's convolution backward its arguments in the traced
  layouts, and cuDNN copies every NCHW one to NHWC first: 7.5 ms of copies in the H100 profile of the
  semseg step at batch 16, 1.3 ms with the UNet's norms below;
- inductor decomposes it (torch/_refs `native_group_norm`) into reductions over x as (B, groups,
  C / groups, H * W), which on NHWC memory stride by a pixel's C channels: at the VAE encoder's 512x512
  levels they read at a fifth of the bandwidth of the elementwise passes (README, the H100 profile).
`group_norm_in_layout` normalises elementwise on x, in x's layout, forward and backward, from statistics
gathered per group, reduced as torch reduces them, or per channel, which reads NHWC memory in order: the
faster way from PER_CHANNEL_PIXELS pixels up. Eager, and on the CPU, the norms stay F.group_norm: one
fused aten kernel, and on the CPU it keeps the input's layout.
"""
import torch
import torch.nn.functional as F
from torch import nn


def compiled_for_gpu(x):
    return x.is_cuda and torch.compiler.is_compiling()


def group_norm_in_layout(x, norm, per_channel):
    """`norm` (an nn.GroupNorm) of x (B, C, H, W), applied elementwise on x, so in x's memory layout.
    Its statistics are gathered either per group, over a view of x as torch reduces them, or per channel
    and then combined per group: a group's mean is the mean of its channels' means, its variance the mean
    of their variances plus the variance of their means (exact, and as stable as the per-channel ones).
    Reduced over H and W, a channels-last x is read in memory order, the channels side by side. Computed
    in float32 (or wider); returned in the dtype of x and the weight promoted, as F.group_norm gives
    under CUDA autocast."""
    B, C, H, W = x.shape
    G = norm.num_groups
    out_dtype = torch.promote_types(x.dtype, norm.weight.dtype)
    x = x.to(torch.promote_types(out_dtype, torch.float32))
    if per_channel:
        var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
        var, mean = var.view(B, G, C // G), mean.view(B, G, C // G)
        group_mean = mean.mean(-1, keepdim=True)
        group_var = (var + (mean - group_mean).square()).mean(-1, keepdim=True)
    else:  # (a view of NHWC memory too: C splits into groups, H and W merge)
        group_var, group_mean = torch.var_mean(x.reshape(B, G, C // G, H * W), dim=(2, 3), correction=0)
        group_var, group_mean = group_var.view(B, G, 1), group_mean.view(B, G, 1)
    scale = torch.rsqrt(group_var + norm.eps) * norm.weight.view(G, C // G)  # (B, G, C / G)
    shift = norm.bias.view(G, C // G) - group_mean * scale
    return (x * scale.view(B, C, 1, 1) + shift.view(B, C, 1, 1)).to(out_dtype)


# From this many pixels per channel up, the per-channel statistics are the faster forward on an H100
# (bench_kernels.py's VAE rows at batch 16: at 512x512 2x faster than F.group_norm, at 256x256 as fast or
# faster; at 128x128 and 64x64 F.group_norm or per group is). Below it, in the UNet's rows (norm, SiLU
# and a 1x1 conv, forward + backward), per group beat both other ways at 64x64 by 1.1-1.5x.
PER_CHANNEL_PIXELS = 256 * 256


def per_channel(x):
    return x.shape[-2] * x.shape[-1] >= PER_CHANNEL_PIXELS


class GroupNorm(nn.GroupNorm):
    """The VAE's norm: nn.GroupNorm, but compiled for a GPU it gathers its statistics per channel from
    PER_CHANNEL_PIXELS pixels up. The VAE is frozen and runs forward only, where inductor's own layout
    choices keep the convolutions' inputs NHWC: speed alone decides, and below that size F.group_norm
    was the faster."""

    def forward(self, x):
        if compiled_for_gpu(x) and per_channel(x):
            return group_norm_in_layout(x, self, per_channel=True)
        return super().forward(x)


class GroupNorm32(nn.GroupNorm):
    """The UNet's norm: GroupNorm(32) computed in float32 and cast back (half-precision statistics drift).
    Compiled for a GPU it is `group_norm_in_layout` at every size: the UNet trains, and F.group_norm's
    NCHW output and gradient would cost copies in the backward (module docstring)."""

    def __init__(self, channels, eps=1e-5):
        super().__init__(32, channels, eps=eps)

    def forward(self, x):
        if compiled_for_gpu(x):
            return group_norm_in_layout(x.float(), self, per_channel(x)).to(x.dtype)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)
