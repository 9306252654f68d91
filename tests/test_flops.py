"""The analytic MAC counts of vpd/flops.py against torch's FlopCounterMode run on real modules.

FlopCounterMode counts the multiply-adds of convolutions, matmuls and attention, and nothing
elementwise (norms, activations, softmax, bias adds): exactly what vpd/flops.py counts, so the two
must agree exactly, not just approximately. Attention runs with the MATH SDPA backend on CPU
because FlopCounterMode has no formula for the fused CPU flash kernel (on `meta` it decomposes by
itself). Full-size networks run on `meta`: shapes only, no memory, well under a second.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vpd import flops
from vpd.unet import UNet, UNetConfig
from vpd.vae import VAE, VAEConfig

TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                       attention_resolutions=(2, 1), num_heads=2, context_dim=16)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)


def counted_macs(fn):
    """(total MACs, per-module MACs) of fn() as FlopCounterMode sees them (it reports 2 per MAC)."""
    fc = FlopCounterMode(display=False, depth=None)
    with fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn()
    per_module = {k: sum(v.values()) // 2 for k, v in fc.get_flop_counts().items()}
    return fc.get_total_flops() // 2, per_module


def analytic_by_block(layers, root):
    """Sum analytic layers per top-level block, named as FlopCounterMode names modules."""
    out = {}
    for l in layers:
        parts = l.name.split(".")
        block = ".".join(parts[:2] if parts[0] in ("input_blocks", "output_blocks", "time_embed") else parts[:1])
        out[f"{root}.{block}"] = out.get(f"{root}.{block}", 0) + l.macs
    return out


def test_unet_tiny_matches_flop_counter_per_block():
    torch.manual_seed(0)
    model = UNet(TINY_UNET).eval()
    B, h, w, N = 2, 16, 12, 5  # non-square latent, batch > 1
    x, ctx = torch.randn(B, 4, h, w), torch.randn(B, N, 16)
    got, per_module = counted_macs(lambda: model(x, 1, ctx))
    layers = flops.unet_layers(TINY_UNET, (h, w), n_ctx=N, batch=B)
    assert got == flops.total(layers)
    for block, macs in analytic_by_block(layers, "UNet").items():
        assert per_module.get(block) == macs, block
    # VPD's feature pass skips `out`; writing the softmax out for the maps costs the same matmuls
    got_feats, _ = counted_macs(lambda: model.features(x, 1, ctx))
    assert got_feats == flops.unet_macs(TINY_UNET, (h, w), n_ctx=N, batch=B, out_head=False)
    assert got_feats < got


def test_kinds_match_the_ops_flop_counter_sees():
    # the per-kind split (the notes quote GEGLU and attention shares) against the op each kind runs as:
    # convolutions, linears (addmm / mm) and the attention matmuls (bmm under the MATH SDPA backend)
    def per_op(fn):
        fc = FlopCounterMode(display=False, depth=None)
        with fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            fn()
        ops = {str(k): v // 2 for k, v in fc.get_flop_counts()["Global"].items()}
        return ops.get("aten.convolution", 0), ops.get("aten.addmm", 0) + ops.get("aten.mm", 0), ops.get("aten.bmm", 0)

    torch.manual_seed(0)
    unet = UNet(TINY_UNET).eval()
    x, ctx = torch.randn(2, 4, 16, 12), torch.randn(2, 5, 16)
    k = flops.by_kind(flops.unet_layers(TINY_UNET, (16, 12), n_ctx=5, batch=2))
    conv, linear, bmm = per_op(lambda: unet(x, 1, ctx))
    assert conv == k["conv3x3"] + k["conv1x1"]  # proj_in / proj_out are 1x1 convs (use_linear_in_transformer=False)
    assert linear == k["linear"] + k["attn_proj"] + k["geglu"]
    assert bmm == k["self_attn"] + k["cross_attn"]
    # which matmuls are cross-attention: QK^T and AV of HW x 5 x C in 3 transformers at 16x12 (C 32),
    # 3 at 8x6 (C 64) and the middle one at 4x3 (C 64), batch 2
    assert k["cross_attn"] == 2 * 2 * 5 * (3 * 16 * 12 * 32 + 3 * 8 * 6 * 64 + 4 * 3 * 64)
    vae = VAE(TINY_VAE, decoder=False).eval()
    k = flops.by_kind(flops.vae_encoder_layers(TINY_VAE, (24, 16), batch=2))
    conv, linear, bmm = per_op(lambda: vae.encode(torch.randn(2, 3, 24, 16)).mode())
    assert conv == k["conv3x3"] + k["conv1x1"] + k["attn_proj"] and linear == 0  # the VAE's q, k, v, proj_out are 1x1 convs
    assert bmm == k["self_attn"] == 2 * 2 * (6 * 4) ** 2 * 64  # one attention over the 6x4 bottom, 64 channels


def test_unet_full_size_matches_ours_and_diffusers_on_meta():
    from diffusers import UNet2DConditionModel
    x, ctx = torch.randn(1, 4, 64, 64, device="meta"), torch.randn(1, 77, 768, device="meta")
    analytic = flops.unet_macs(UNetConfig(), (64, 64), n_ctx=77)
    with torch.device("meta"):
        ours = UNet(UNetConfig())
        ref = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # SD v1.5's config
    assert counted_macs(lambda: ours(x, 1, ctx))[0] == analytic
    assert counted_macs(lambda: ref(x, torch.ones(1, device="meta"), encoder_hidden_states=ctx))[0] == analytic


def test_unet_full_size_matches_the_notes():
    layers = flops.unet_layers(UNetConfig(), (64, 64), n_ctx=77)
    total = flops.total(layers)
    assert total == pytest.approx(401.6e9, rel=1e-3)  # "401.6 G multiply-adds", "about 0.80 TFLOP"
    assert 2 * total == pytest.approx(0.80e12, rel=0.01)
    kinds = flops.by_kind(layers)
    assert kinds["total"] == total == sum(v for k, v in kinds.items() if k != "total")
    assert kinds["geglu"] / total == pytest.approx(0.19, abs=0.005)  # "GEGLU 19%"
    # "64x64 self-attention 13%": input_blocks 1, 2 and output_blocks 9, 10, 11 run at 64x64
    full_res = ("input_blocks.1.", "input_blocks.2.", "output_blocks.9.", "output_blocks.10.", "output_blocks.11.")
    self64 = sum(l.macs for l in layers if l.kind == "self_attn" and l.name.startswith(full_res))
    assert self64 == 5 * 2 * 4096 * 4096 * 320  # QK^T and AV, each HW x HW x C, hand-computed
    assert self64 / total == pytest.approx(0.13, abs=0.005)


def test_vae_encoder_tiny_and_full_size():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    tiny = VAE(TINY_VAE, decoder=False).eval()
    x = torch.randn(2, 3, 24, 16)
    got, _ = counted_macs(lambda: tiny.encode(x).mode())
    assert got == flops.vae_encoder_macs(TINY_VAE, (24, 16), batch=2)

    analytic = flops.vae_encoder_macs(VAEConfig(), (512, 512))
    assert 2 * analytic == pytest.approx(1.12e12, rel=0.01)  # "the VAE encoder at 512x512: about 1.12 TFLOP"
    img = torch.randn(1, 3, 512, 512, device="meta")
    with torch.device("meta"):
        ours = VAE(VAEConfig(), decoder=False)
        ref = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    assert counted_macs(lambda: ours.encode(img).mode())[0] == analytic
    assert counted_macs(lambda: ref.encode(img).latent_dist.mode())[0] == analytic


def test_clip_text_matches_transformers_on_meta():
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        # SD v1's text encoder: CLIP ViT-L/14's text tower (the config's defaults are ViT-B's)
        ref = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12))
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    analytic = flops.clip_text_macs(n_tokens=77)
    assert counted_macs(lambda: ref(input_ids=ids))[0] == analytic
    assert round(2 * analytic / 1e9) == 13  # "CLIP text: 13 GFLOP"


def test_train_step_matches_the_notes():
    # "a VPD training sample at 512x512 (UNet forward+backward, VAE encoder forward) is about 3.5 TFLOP"
    step = flops.train_step_flops(UNetConfig(), VAEConfig(), (512, 512), n_ctx=150)
    assert round(step / 1e12, 1) == 3.5
    unet = flops.unet_macs(UNetConfig(), (64, 64), n_ctx=150, out_head=False)
    assert step == 2 * (3 * unet + flops.vae_encoder_macs(VAEConfig(), (512, 512)))
    head = 10 ** 9
    assert flops.train_step_flops(UNetConfig(), VAEConfig(), (512, 512), 150, batch=1, head_macs=head) == step + 6 * head


@pytest.mark.parametrize("task,rel", [("semseg", 2e-3), ("depth", 5e-4)])
def test_train_step_matches_flop_counter_over_forward_and_backward(task, rel, resize_uncounted):
    # an independent count of the step: the frozen VAE runs forward only, everything after it forward
    # and backward (the counter sees what autograd actually runs). The head, whose count is the counter's
    # own (3x its forward), is taken out of both sides: in this tiny config it is most of the step and
    # would hide an error in the UNet's count. Semseg is off by about -0.1% (the text adapter, left out of
    # the analytic count), depth by +0.03% (the first conv's input grads, counted, which autograd skips)
    from vpd.demo import TINY_CLIP, TINY_UNET, TINY_VAE
    from vpd.model import build_model
    torch.manual_seed(0)
    model = build_model(task, unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP).train()
    B, res = 2, 64
    images = torch.rand(B, 3, res, res) * 2 - 1
    if task == "semseg":
        inputs, target = (images,), torch.randint(0, 150, (B, res, res))
    else:
        inputs, target = (images, torch.zeros(B, dtype=torch.long)), torch.rand(B, 1, res, res) + 0.5
    counter = FlopCounterMode(display=False, depth=None)
    with counter, sdpa_kernel(SDPBackend.MATH), resize_uncounted():
        model.loss(model(*inputs), target).backward()
    head = FlopCounterMode(display=False, depth=None)
    with head, torch.no_grad(), resize_uncounted():  # (resampling: not counted on either side)
        model(*inputs)
    head_macs = sum(head.get_flop_counts()[f"{type(model).__name__}.head"].values()) // 2
    n_ctx = 150 if task == "semseg" else 1
    analytic = flops.train_step_flops(TINY_UNET, TINY_VAE, (res, res), n_ctx, batch=B)
    assert analytic == pytest.approx(counter.get_total_flops() - 6 * head_macs, rel=rel)


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="60x64"):
        flops.unet_macs(UNetConfig(), (60, 64))
    with pytest.raises(ValueError, match="100x512"):
        flops.vae_encoder_macs(VAEConfig(), (100, 512))
    with pytest.raises(ValueError, match="64x60"):  # the width is checked as well as the height
        flops.unet_macs(UNetConfig(), (64, 60))
    with pytest.raises(ValueError, match="512x100"):
        flops.vae_encoder_macs(VAEConfig(), (512, 100))



def test_vae_quant_conv_maps_z_channels_to_embed_dim():
    # SD has z_channels == embed_dim == 4; with them apart, quant_conv is 2 z -> 2 embed_dim channels
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=3)
    vae = VAE(cfg, decoder=False).eval()
    got, _ = counted_macs(lambda: vae.encode(torch.randn(2, 3, 16, 8)).mode())
    assert got == flops.vae_encoder_macs(cfg, (16, 8), batch=2)
