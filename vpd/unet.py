"""The Stable Diffusion v1 UNet, and VPD's way of reading features out of it.

Mirrors ldm's `ldm/modules/diffusionmodules/openaimodel.py` (UNetModel, ResBlock, Downsample,
Upsample, TimestepEmbedSequential) and `ldm/modules/attention.py` (SpatialTransformer,
BasicTransformerBlock, CrossAttention, FeedForward, GEGLU) class by class. Attribute names are the
checkpoint's minus `model.diffusion_model.`, so an SD v1 file loads with no renaming table.

`UNet.forward` predicts noise. `UNet.features` is the VPD backbone: the outputs of four decoder
blocks plus the cross-attention maps of the text tokens, averaged per resolution.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vpd.checkpoint import CheckpointError, describe, load_checkpoint, tensor_shapes
from vpd.norm import GroupNorm32

PREFIX = "model.diffusion_model."
# ldm's EMA copy, in files that also hold the training weights (v1-5-pruned, not -emaonly): each
# parameter's name without its dots, e.g. model_ema.diffusion_modelinput_blocks00weight.
EMA_PREFIX = "model_ema.diffusion_model"
MAP_BLOCKS = ("input", "middle", "output")


@dataclass
class UNetConfig:
    """SD v1.x (v1-inference.yaml). 859,520,964 parameters with these defaults."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)  # downsample factors that get a SpatialTransformer
    num_heads: int = 8  # at every level, so the head dim grows with the channels (40/80/160)
    transformer_depth: int = 1
    context_dim: int = 768


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) timesteps, cos first (ldm's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---------------------------------------------------------------------------------------------
# ldm/modules/attention.py


class CrossAttention(nn.Module):
    """Multi-head attention of x over `context` (itself when None)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # ldm's to_out.1 is a p=0 dropout

    def forward(self, x, context=None, keep_map=False):
        """x (B, L, C), context (B, N, Cc) -> (out (B, L, C), head-averaged probs (B, L, N) or None).

        With keep_map the softmax is written out so its probabilities can be returned; otherwise
        SDPA runs its fused kernel and no (L, N) matrix is kept."""
        B, L, _ = x.shape
        if context is None:  # self-attention: one product on the three weights joined, faster than three
            q, k, v = F.linear(x, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])).chunk(3, -1)
        else:
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (z.view(B, z.shape[1], self.heads, -1).transpose(1, 2) for z in (q, k, v))  # (B, heads, L|N, d)
        probs = None
        if keep_map:
            scale = q.shape[-1] ** -0.5
            # softmax in float32 so the maps keep their precision under bf16 autocast
            probs = ((q @ k.transpose(-1, -2)).float() * scale).softmax(dim=-1)  # (B, heads, L, N)
            out = probs.to(v.dtype) @ v
            probs = probs.mean(dim=1)  # (B, L, N), float32
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, L, -1)  # (B, L, heads*d)
        return self.to_out(out), probs


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # net.1 is ldm's dropout (p=0 in SD); the identity keeps net.2 where the checkpoint has it
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention over the text, GEGLU feed-forward."""

    def __init__(self, dim, n_heads, d_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads=n_heads, dim_head=d_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context, keep_map=False):
        x = x + self.attn1(self.norm1(x))[0]
        a, probs = self.attn2(self.norm2(x), context, keep_map)
        x = x + a
        x = x + self.ff(self.norm3(x))
        return x, probs


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (v1: 1x1 conv projections)."""

    def __init__(self, in_channels, n_heads, d_head, depth, context_dim):
        super().__init__()
        inner = n_heads * d_head
        self.norm = GroupNorm32(in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, in_channels, 1)
        nn.init.zeros_(self.proj_out.weight)  # ldm's zero_module: the block starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context, keep_map=False):
        """-> (x, list of cross-attention maps (B, N, h, w), one per block when keep_map)."""
        B, _, H, W = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        C = x.shape[1]
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, HW, C); free for channels_last input, and
        # the later LayerNorm / linears run faster on a contiguous copy than on the strided view
        maps = []
        for block in self.transformer_blocks:
            x, probs = block(x, context, keep_map)
            if probs is not None:
                maps.append(probs.transpose(1, 2).reshape(B, -1, H, W))  # (B, N, h, w)
        x = x.transpose(1, 2).reshape(B, C, H, W)
        return self.proj_out(x) + x_in, maps


# ---------------------------------------------------------------------------------------------
# ldm/modules/diffusionmodules/openaimodel.py


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between, plus a skip connection."""

    def __init__(self, channels, emb_channels, out_channels):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # out_layers.2 is ldm's dropout (p=0 in SD); the identity keeps the conv at out_layers.3
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[3].weight)  # ldm's zero_module
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def join(parts):
    """Concatenate a list of maps on channels and empty the list, dropping its references."""
    x = torch.cat(parts, dim=1)
    parts.clear()
    return x


class TimestepEmbedSequential(nn.Sequential):
    """A UNet block: passes the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x, emb, context, keep_map=False):
        """-> (x, list of the block's cross-attention maps; empty unless keep_map).

        x may be a list of maps to join on channels (a decoder block's input and its skip). The
        list is emptied once joined, so no caller's frame keeps the parts alive; in inference the
        joined map is freed as soon as the first layer has read it (training keeps it for the backward)."""
        x = join(x) if isinstance(x, list) else x
        maps = []
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x, m = layer(x, context, keep_map)
                maps += m
            else:
                x = layer(x)
        return x, maps


class UNet(nn.Module):
    """ldm's UNetModel for SD v1: input_blocks (encoder), middle_block, output_blocks, out."""

    def __init__(self, cfg: UNetConfig = None):
        super().__init__()
        self.cfg = cfg = cfg or UNetConfig()
        widths = [cfg.model_channels * m for m in cfg.channel_mult]
        if any(w % 32 or w % cfg.num_heads for w in widths) or cfg.num_res_blocks < 1:
            raise ValueError(f"every level's width {widths} must be a multiple of 32 (GroupNorm) and of "
                             f"num_heads={cfg.num_heads}, and num_res_blocks >= 1: {cfg}")
        self.grad_checkpointing = False  # when training: recompute each block in the backward
        mc, emb_dim = cfg.model_channels, cfg.model_channels * 4

        def transformer(ch):
            return SpatialTransformer(ch, cfg.num_heads, ch // cfg.num_heads, cfg.transformer_depth, cfg.context_dim)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, ch), transformer(ch), ResBlock(ch, emb_dim, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)  # ldm's zero_module
        nn.init.zeros_(self.out[2].bias)

        # VPD's features: the output block before each level's upsampling block (1, 4, 7 in SD),
        # and the last one; coarsest first here, returned finest first.
        n = cfg.num_res_blocks + 1
        self.feature_blocks = tuple(n * i + n - 2 for i in range(len(cfg.channel_mult) - 1)) + (
            len(self.output_blocks) - 1,)

    @classmethod
    def from_checkpoint(cls, src, cfg=None, dtype=torch.float32, ema=True):
        """Build on `meta` and load `model.diffusion_model.*` of an SD v1 file strictly. A file that
        also holds EMA weights gives those (ema=True): they are what the -emaonly release holds as
        `model.diffusion_model.*`, the weights VPD starts from."""
        cfg = cfg or UNetConfig()
        with torch.device("meta"):
            model = cls(cfg)
        use_ema = ema and bool(tensor_shapes(src, EMA_PREFIX))
        try:
            load_checkpoint(model, src, EMA_PREFIX if use_ema else PREFIX, cfg, dtype=dtype, flat=use_ema)
        except CheckpointError:
            to_k = PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
            shape = tensor_shapes(src, to_k).get(to_k)
            if shape is not None and shape[-1] == 1024 and cfg.context_dim != 1024:
                where = describe(src)
                raise CheckpointError(
                    f"{where} looks like a Stable Diffusion 2.x UNet (cross-attention context 1024, {to_k} "
                    f"has shape {list(shape)}); this is the SD v1 UNet, config {cfg}") from None
            raise
        return model

    def _check_inputs(self, x, t, context):
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, h, w), got {tuple(x.shape)}")
        f = 2 ** (len(cfg.channel_mult) - 1)
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"latent size must be a multiple of {f}, got {tuple(x.shape[2:])}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be ({x.shape[0]}, N, {cfg.context_dim}), got {tuple(context.shape)}")
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
        return t

    def _block(self, block, h, emb, context, keep_map):
        if self.grad_checkpointing and self.training:
            # the recomputation calls the block again with these arguments: a list would be empty
            h = join(h) if isinstance(h, list) else h
            return checkpoint(block, h, emb, context, keep_map, use_reentrant=False)
        return block(h, emb, context, keep_map)

    def _run(self, x, t, context, map_blocks=(), max_map_hw=0.0, keep_feats=False):
        """The UNet up to (not including) `out`.
        -> (last hidden state, VPD features coarsest first (when keep_feats), kept cross-attention maps)."""
        t = self._check_inputs(x, t, context)
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        keep = lambda group, h: group in map_blocks and h.shape[-2] * h.shape[-1] <= max_map_hw
        maps, feats, skips, h = [], [], [], x
        for block in self.input_blocks:
            h, m = self._block(block, h, emb, context, keep("input", h))
            skips.append(h)
            maps += m
        h, m = self._block(self.middle_block, h, emb, context, keep("middle", h))
        maps += m
        for i, block in enumerate(self.output_blocks):
            keep_map, parts = keep("output", h), [h, skips.pop()]
            del h  # from here the loop refers to the two maps only through `parts`, which the block empties
            h, m = self._block(block, parts, emb, context, keep_map)
            maps += m
            if keep_feats and i in self.feature_blocks:
                feats.append(h)
        return h, feats, maps

    def forward(self, x, t, context):
        """x (B, in, h, w) latent, t (B,) or scalar timestep, context (B, N, context_dim)
        -> noise prediction (B, out, h, w)."""
        h, _, _ = self._run(x, t, context)
        return self.out(h)

    def features(self, x, t, context, map_blocks=("input", "output"), map_max_fraction=0.25, detach_maps=True):
        """VPD's backbone pass (the `out` head is not computed).

        -> feats: outputs of the `feature_blocks`, finest first ([C@h, 2C@h/2, 4C@h/4, 4C@h/8] in SD),
           maps: {(h, w): (B, N, h, w)}: for each attn2 in the `map_blocks` groups ("input",
           "middle", "output") whose h*w <= map_max_fraction * latent h*w, the softmax over the
           text tokens averaged over heads, then over all kept layers of the same size. For a 64x64
           latent the defaults keep the 32x32 and 16x16 maps of the encoder and decoder, as VPD.
           Maps carry no gradient unless detach_maps=False. map_blocks=(): no maps, {}."""
        map_blocks = (map_blocks,) if isinstance(map_blocks, str) else tuple(map_blocks)
        bad = [g for g in map_blocks if g not in MAP_BLOCKS]
        if bad:
            raise ValueError(f"map_blocks must be among {MAP_BLOCKS}, got {bad}")
        _, feats, maps = self._run(x, t, context, map_blocks, map_max_fraction * x.shape[-2] * x.shape[-1],
                                   keep_feats=True)
        by_size = {}
        for m in maps:
            by_size.setdefault((m.shape[-2], m.shape[-1]), []).append(m)
        out = {}
        for size, ms in by_size.items():
            avg = torch.stack(ms).mean(dim=0).to(feats[0].dtype)  # averaged in float32
            out[size] = avg.detach() if detach_maps else avg
        return feats[::-1], out
