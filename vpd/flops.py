"""Analytic cost of the networks VPD runs: multiply-accumulates (MACs) per layer, from the config.

Counted: convolutions, linears and the two attention matmuls (Q K^T and A V). Not counted: norms,
activations, softmax, residual adds, biases, up-sampling: they are elementwise, a few percent of
the time and none of the MACs. 1 MAC = 2 FLOP. Layer names mirror the checkpoint's (ldm's
openaimodel.py and model.py), so a count can be read next to the module tree.

SD v1.5 at a 64x64 latent with 77 text tokens: the UNet forward is 401.6 G MACs (0.80 TFLOP), the
VAE encoder at 512x512 is 0.56 T MACs (1.12 TFLOP), the CLIP text tower 6.6 G MACs.
"""
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class Layer:
    name: str  # checkpoint-style module name, e.g. "input_blocks.1.1.transformer_blocks.0.attn1"
    kind: str  # conv3x3 | conv1x1 | linear | attn_proj | geglu | self_attn | cross_attn
    macs: int  # multiply-accumulates for the whole batch


def conv_macs(h_out, w_out, c_in, c_out, k):
    return h_out * w_out * k * k * c_in * c_out


def by_kind(layers):
    """Sum a layer list per kind, plus 'total'."""
    out = defaultdict(int)
    for l in layers:
        out[l.kind] += l.macs
    out["total"] = sum(l.macs for l in layers)
    return dict(out)


def total(layers):
    return sum(l.macs for l in layers)


# ---------------------------------------------------------------------------------------------------
# UNet (ldm openaimodel.UNetModel, SD v1 layout)

def _check_latent(h, w, levels):
    f = 2 ** (levels - 1)
    if h <= 0 or w <= 0 or h % f or w % f:
        raise ValueError(f"latent size {h}x{w} must be positive and divisible by {f} "
                         f"({levels} resolution levels); image size = 8 x latent size")


def _res_block(name, h, w, c_in, c_out, emb_dim, B):
    # in_layers.2 / out_layers.3 are the 3x3 convs (ldm's indices), emb_layers.1 the time linear
    layers = [Layer(f"{name}.in_layers.2", "conv3x3", B * conv_macs(h, w, c_in, c_out, 3)),
              Layer(f"{name}.emb_layers.1", "linear", B * emb_dim * c_out),
              Layer(f"{name}.out_layers.3", "conv3x3", B * conv_macs(h, w, c_out, c_out, 3))]
    if c_in != c_out:
        layers.append(Layer(f"{name}.skip_connection", "conv1x1", B * conv_macs(h, w, c_in, c_out, 1)))
    return layers


def _spatial_transformer(name, h, w, c, n_ctx, context_dim, depth, B):
    hw = h * w
    layers = [Layer(f"{name}.proj_in", "conv1x1", B * hw * c * c)]
    for d in range(depth):
        blk = f"{name}.transformer_blocks.{d}"
        layers += [
            # self-attention: q, k, v, out projections on HW tokens; QK^T and AV are HW x HW x C
            Layer(f"{blk}.attn1.to_qkv_out", "attn_proj", B * 4 * hw * c * c),
            Layer(f"{blk}.attn1.matmuls", "self_attn", B * 2 * hw * hw * c),
            # cross-attention: q and out on HW tokens, k and v on the n_ctx text tokens
            Layer(f"{blk}.attn2.to_q_out", "attn_proj", B * 2 * hw * c * c),
            Layer(f"{blk}.attn2.to_kv", "attn_proj", B * 2 * n_ctx * context_dim * c),
            Layer(f"{blk}.attn2.matmuls", "cross_attn", B * 2 * hw * n_ctx * c),
            # GEGLU feed-forward: C -> 2 x 4C (value and gate), then 4C -> C
            Layer(f"{blk}.ff.net.0.proj", "geglu", B * hw * c * 8 * c),
            Layer(f"{blk}.ff.net.2", "geglu", B * hw * 4 * c * c),
        ]
    layers.append(Layer(f"{name}.proj_out", "conv1x1", B * hw * c * c))
    return layers


def unet_layers(cfg, latent_hw, n_ctx=77, batch=1, out_head=True):
    """Per-layer MACs of one UNet forward at latent size (h, w) with `n_ctx` context tokens.

    cfg needs ldm's UNet fields: in_channels, out_channels, model_channels, channel_mult,
    num_res_blocks, attention_resolutions, transformer_depth, context_dim. `out_head=False` leaves
    out the final GroupNorm-SiLU-conv, which VPD's feature extractor does not run.
    """
    h, w = latent_hw
    mult, nrb, B = tuple(cfg.channel_mult), cfg.num_res_blocks, batch
    _check_latent(h, w, len(mult))
    mc, emb = cfg.model_channels, 4 * cfg.model_channels
    st = lambda name, h, w, c: _spatial_transformer(name, h, w, c, n_ctx, cfg.context_dim,
                                                    cfg.transformer_depth, B)
    layers = [Layer("time_embed.0", "linear", B * mc * emb), Layer("time_embed.2", "linear", B * emb * emb),
              Layer("input_blocks.0.0", "conv3x3", B * conv_macs(h, w, cfg.in_channels, mc, 3))]
    skips, ch, ds, i = [mc], mc, 1, 1  # skip channels, like ldm's input_block_chans
    for level, m in enumerate(mult):
        for _ in range(nrb):
            layers += _res_block(f"input_blocks.{i}.0", h, w, ch, m * mc, emb, B)
            ch = m * mc
            if ds in cfg.attention_resolutions:
                layers += st(f"input_blocks.{i}.1", h, w, ch)
            skips.append(ch)
            i += 1
        if level != len(mult) - 1:  # Downsample: stride-2 3x3 conv
            h, w, ds = h // 2, w // 2, ds * 2
            layers.append(Layer(f"input_blocks.{i}.0.op", "conv3x3", B * conv_macs(h, w, ch, ch, 3)))
            skips.append(ch)
            i += 1
    layers += _res_block("middle_block.0", h, w, ch, ch, emb, B)
    layers += st("middle_block.1", h, w, ch)
    layers += _res_block("middle_block.2", h, w, ch, ch, emb, B)
    i = 0
    for level, m in reversed(list(enumerate(mult))):
        for r in range(nrb + 1):
            layers += _res_block(f"output_blocks.{i}.0", h, w, ch + skips.pop(), m * mc, emb, B)
            ch, j = m * mc, 1
            if ds in cfg.attention_resolutions:
                layers += st(f"output_blocks.{i}.1", h, w, ch)
                j = 2
            if level and r == nrb:  # Upsample: nearest x2, then a 3x3 conv
                h, w, ds = h * 2, w * 2, ds // 2
                layers.append(Layer(f"output_blocks.{i}.{j}.conv", "conv3x3", B * conv_macs(h, w, ch, ch, 3)))
            i += 1
    if out_head:
        layers.append(Layer("out.2", "conv3x3", B * conv_macs(h, w, ch, cfg.out_channels, 3)))
    return layers


def unet_macs(cfg, latent_hw, n_ctx=77, batch=1, out_head=True):
    return total(unet_layers(cfg, latent_hw, n_ctx, batch, out_head))


# ---------------------------------------------------------------------------------------------------
# VAE encoder (ldm model.Encoder + quant_conv)

def vae_encoder_layers(cfg, image_hw, batch=1):
    """Per-layer MACs of the VAE encoder (and quant_conv) on an image of size (H, W).

    cfg needs ldm's fields: in_channels, ch, ch_mult, num_res_blocks, z_channels, embed_dim, and
    optionally double_z (default True: the encoder outputs mean and log-variance).
    """
    h, w = image_hw
    mult, B = tuple(cfg.ch_mult), batch
    _check_latent(h, w, len(mult))
    layers = [Layer("encoder.conv_in", "conv3x3", B * conv_macs(h, w, cfg.in_channels, cfg.ch, 3))]
    ch = cfg.ch
    for level, m in enumerate(mult):
        for r in range(cfg.num_res_blocks):
            name, c_out = f"encoder.down.{level}.block.{r}", cfg.ch * m
            layers += [Layer(f"{name}.conv1", "conv3x3", B * conv_macs(h, w, ch, c_out, 3)),
                       Layer(f"{name}.conv2", "conv3x3", B * conv_macs(h, w, c_out, c_out, 3))]
            if ch != c_out:
                layers.append(Layer(f"{name}.nin_shortcut", "conv1x1", B * conv_macs(h, w, ch, c_out, 1)))
            ch = c_out
        if level != len(mult) - 1:  # pad (0,1,0,1), then a stride-2 3x3 conv without padding
            h, w = h // 2, w // 2
            layers.append(Layer(f"encoder.down.{level}.downsample.conv", "conv3x3",
                                B * conv_macs(h, w, ch, ch, 3)))
    hw = h * w
    mid = lambda name: [Layer(f"{name}.conv1", "conv3x3", B * conv_macs(h, w, ch, ch, 3)),
                        Layer(f"{name}.conv2", "conv3x3", B * conv_macs(h, w, ch, ch, 3))]
    layers += mid("encoder.mid.block_1")
    # single-head attention over all HW positions; q, k, v, proj_out are 1x1 convs
    layers += [Layer("encoder.mid.attn_1.q_k_v_proj_out", "attn_proj", B * 4 * hw * ch * ch),
               Layer("encoder.mid.attn_1.matmuls", "self_attn", B * 2 * hw * hw * ch)]
    layers += mid("encoder.mid.block_2")
    double = 2 if getattr(cfg, "double_z", True) else 1
    z, e = cfg.z_channels * double, cfg.embed_dim * double
    layers += [Layer("encoder.conv_out", "conv3x3", B * conv_macs(h, w, ch, z, 3)),
               Layer("quant_conv", "conv1x1", B * conv_macs(h, w, z, e, 1))]
    return layers


def vae_encoder_macs(cfg, image_hw, batch=1):
    return total(vae_encoder_layers(cfg, image_hw, batch))


# ---------------------------------------------------------------------------------------------------
# CLIP text tower (HF CLIPTextModel layout)

def clip_text_layers(n_tokens=77, width=768, layers=12, mlp=3072, batch=1):
    """Per-layer MACs of the CLIP text transformer (the embedding lookup costs no MACs)."""
    T, B = n_tokens, batch
    out = []
    for i in range(layers):
        name = f"encoder.layers.{i}"
        out += [Layer(f"{name}.self_attn.qkv_out_proj", "attn_proj", B * 4 * T * width * width),
                Layer(f"{name}.self_attn.matmuls", "self_attn", B * 2 * T * T * width),
                Layer(f"{name}.mlp.fc1", "linear", B * T * width * mlp),
                Layer(f"{name}.mlp.fc2", "linear", B * T * mlp * width)]
    return out


def clip_text_macs(n_tokens=77, width=768, layers=12, mlp=3072, batch=1):
    return total(clip_text_layers(n_tokens, width, layers, mlp, batch))


# ---------------------------------------------------------------------------------------------------
# A VPD training step

def train_step_flops(unet_cfg, vae_cfg, image_hw, n_ctx, batch=1, head_macs=0):
    """FLOPs of one VPD training step: the trainable part (UNet without `out`, plus the task head's
    `head_macs` forward MACs) costs 3 forwards (forward, then grads w.r.t. inputs and weights);
    the frozen VAE encoder one forward. The text is precomputed or frozen, so it is left out."""
    h, w = image_hw
    unet = unet_macs(unet_cfg, (h // 8, w // 8), n_ctx, batch, out_head=False)
    vae = vae_encoder_macs(vae_cfg, image_hw, batch)
    return 2 * (3 * (unet + head_macs) + vae)
