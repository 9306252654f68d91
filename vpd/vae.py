"""Stable Diffusion v1's KL autoencoder (the "VAE"), laid out like ldm's checkpoint.

Mirrors ldm/models/autoencoder.py `AutoencoderKL` and ldm/modules/diffusionmodules/model.py
(`Encoder`, `Decoder`, `ResnetBlock`, `AttnBlock`, `Downsample`, `Upsample`). Module names are the
checkpoint's minus `first_stage_model.`, so loading is a prefix strip. VPD only uses the encoder's
posterior mean; the decoder can be left out (`decoder=False`).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpd.checkpoint import load_checkpoint
from vpd.norm import GroupNorm

PREFIX = "first_stage_model."  # of the autoencoder's tensors in an SD v1 file


@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3


def Normalize(channels):
    return GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 conv on the skip when the width changes (no time input)."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs as in the v1 file."""

    def __init__(self, ch):
        super().__init__()
        self.norm = Normalize(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head whose width is the whole channel dim
        q, k, v = (t(h).flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q, self.k, self.v))
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # strided views send SDPA to its slow math path
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        # ldm pads only right and bottom, then convolves unpadded; symmetric padding would shift by a pixel
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = 2**(len(ch_mult)-1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, cfg.ch * mult))
                block_in = cfg.ch * mult
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)  # double_z: mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        # ldm numbers the up levels like the down levels (up.0 is the finest), but builds and runs
        # them coarsest first; each level has one more ResnetBlock than the encoder's
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[i]))
                block_in = cfg.ch * cfg.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The posterior q(z|x): a diagonal Gaussian from the encoder's moments (B, 2*embed_dim, h, w)."""

    def __init__(self, moments):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as ldm: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self):
        return self.mean

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


class VAE(nn.Module):
    """ldm's AutoencoderKL. Latents are NOT scaled by 0.18215 here; a caller that wants SD's latent
    scale multiplies itself (VPD does not)."""

    def __init__(self, cfg: VAEConfig = None, decoder: bool = True):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        self.encoder = Encoder(cfg)
        if decoder:
            self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def downsample_factor(self):
        return 2 ** (len(self.cfg.ch_mult) - 1)

    def encode(self, x) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) in [-1, 1], H and W multiples of the downsample factor (8 for SD)."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"VAE.encode expects (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"VAE.encode: image size {tuple(x.shape[2:])} is not a multiple of {f}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z: (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f)."""
        if not hasattr(self, "decoder"):
            raise RuntimeError("VAE.decode: this VAE was built with decoder=False (encoder only)")
        if z.ndim != 4 or z.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"VAE.decode expects (B, {self.cfg.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=False, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @classmethod
    def from_checkpoint(cls, src, cfg: VAEConfig = None, decoder: bool = True, dtype=torch.float32):
        """Build on `meta` and take the `first_stage_model.*` tensors of an SD v1 file (or dict) as weights.
        With decoder=False the file's `decoder.*` tensors are passed over."""
        cfg = cfg or VAEConfig()
        with torch.device("meta"):
            model = cls(cfg, decoder=decoder)
        ignore = () if decoder else ("decoder.",)
        return load_checkpoint(model, src, PREFIX, cfg, ignore=ignore, dtype=dtype)
