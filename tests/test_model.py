"""VPD backbone and task models: the feature path checked against hand computations (latent =
posterior mean, t = 1, adapted context, attention maps recomputed from attn2's inputs), shapes on a
tiny config and on the full SD v1.5 config (meta device), gradients, frozen parts, losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from vpd.clip import CLIPConfig, CLIPTextModel
from vpd.demo import wake_zero_weights_
from vpd.model import TASKS, TextAdapter, VPDBackbone, VPDDepth, VPDRefer, VPDSeg, build_model
from vpd.unet import UNetConfig
from vpd.vae import VAEConfig

TINY_UNET = UNetConfig(model_channels=32, num_res_blocks=1, num_heads=2, context_dim=32)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
TINY_CLIP = CLIPConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_DEPTH_HEAD = dict(fuse_channels=32, deconv_channels=8, out_channels=16)


def wake(module, seed=0):
    """The model with SD's zero-initialised weights given random values (every path carries signal)."""
    return wake_zero_weights_(module, torch.Generator().manual_seed(seed), std=0.05)


def tiny(task, seed=0, **kw):
    torch.manual_seed(seed)
    if task == "depth":
        kw = {**TINY_DEPTH_HEAD, **kw}
    if task == "semseg":
        kw = {"num_classes": 5, "channels": 16, **kw}
    return wake(build_model(task, unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP, **kw), seed)


def images(b=2, h=64, w=64, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- the backbone's feature path --------------------------------------------------------------

def test_text_adapter_is_residual_mlp_scaled_by_gamma():
    a = TextAdapter(8)
    t, gamma = torch.randn(3, 8), torch.randn(8)
    fc1, fc2 = a.fc[0], a.fc[2]
    mlp = F.linear(F.gelu(F.linear(t, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    torch.testing.assert_close(a(t, gamma), t + gamma * mlp)


def test_backbone_init_values_and_frozen_vae():
    bb = VPDBackbone(TINY_UNET, TINY_VAE, text_dim=32)
    assert torch.equal(bb.gamma, torch.full((32,), 1e-4))
    assert not hasattr(bb.unet, "out") and not hasattr(bb.vae, "decoder")
    assert not any(p.requires_grad for p in bb.vae.parameters())
    bb.train()
    assert bb.training and bb.unet.training and not bb.vae.training


def sinusoid(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    return torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])[None]


@pytest.mark.parametrize("shared_text", [True, False])
def test_backbone_equals_hand_computed_vpd_feature_path(shared_text):
    torch.manual_seed(0)
    bb = wake(VPDBackbone(TINY_UNET, TINY_VAE, text_dim=32)).eval()
    with torch.no_grad():
        bb.gamma.normal_()  # make the adapter visible
    x = images(2, 64, 128)  # non-square: latent 8x16
    text = torch.randn(3, 32) if shared_text else torch.randn(2, 3, 32)
    unet = bb.unet
    seen = {"attn": [], "out": {}}

    def attn_hook(name):
        def hook(mod, args, kwargs):
            seen["attn"].append((name, args[0], args[1] if len(args) > 1 else kwargs["context"]))
        return hook

    def st_hook(mod, args):
        seen["hw"] = args[0].shape[-2:]

    hooks = [unet.input_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(latent=a[0])),
             unet.time_embed.register_forward_pre_hook(lambda m, a: seen.update(temb=a[0]))]
    for name, mod in unet.named_modules():
        if name.endswith("attn2"):
            hooks.append(mod.register_forward_pre_hook(attn_hook(name), with_kwargs=True))
        if type(mod).__name__ == "SpatialTransformer":  # records h, w for the attn2 inside it
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, n=name: seen["attn"].append((n, "hw", a[0].shape[-2:]))))
    for j, block in enumerate(unet.output_blocks):
        hooks.append(block.register_forward_hook(lambda m, a, out, j=j: seen["out"].__setitem__(j, out[0])))
    with torch.no_grad():
        feats = bb(x, text)
    for h in hooks:
        h.remove()

    # latent: the posterior mean (first half of quant_conv's moments), unscaled
    moments = bb.vae.quant_conv(bb.vae.encoder(x))
    torch.testing.assert_close(seen["latent"], moments[:, :4])
    # t = 1 (not 0): cos-first sinusoid of 1
    torch.testing.assert_close(seen["temb"], sinusoid(1.0, 32).expand(2, -1))
    # context of every attn2: T + gamma * MLP(T), broadcast to the batch
    fc1, fc2 = bb.text_adapter.fc[0], bb.text_adapter.fc[2]
    ctx = text + bb.gamma * F.linear(F.gelu(F.linear(text, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    ctx = ctx.expand(2, -1, -1)
    attn_calls = [(n, a, c) for n, a, c in seen["attn"] if not isinstance(a, str)]
    assert len(attn_calls) == sum(1 for n, _ in unet.named_modules() if n.endswith("attn2"))
    for _, _, c in attn_calls:
        torch.testing.assert_close(c, ctx)

    # attention maps by hand: softmax(q k^T / sqrt(d)) per head, averaged over heads, kept for the
    # encoder/decoder attn2 layers with h*w <= latent h*w / 4, averaged per resolution
    kept, hw = {}, None
    for name, a, c in seen["attn"]:
        if isinstance(a, str):
            hw = tuple(c)
            continue
        if name.startswith("middle_block") or hw[0] * hw[1] > 8 * 16 / 4:
            continue
        attn = unet.get_submodule(name)
        q, k = attn.to_q(a), attn.to_k(c)  # (B, HW, inner), (B, N, inner)
        heads = attn.heads
        q = q.view(2, q.shape[1], heads, -1).transpose(1, 2)
        k = k.view(2, k.shape[1], heads, -1).transpose(1, 2)
        p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1).mean(1)  # (B, HW, N)
        kept.setdefault(hw, []).append(p.transpose(1, 2).reshape(2, 3, *hw))
    assert sorted(kept) == [(2, 4), (4, 8)]
    assert [len(v) for _, v in sorted(kept.items())] == [3, 3]  # per level: 1 encoder + 2 decoder layers (tiny)
    maps = {s: torch.stack(v).mean(0) for s, v in kept.items()}

    # features: output blocks before each upsampling block and the last one, finest first
    fb = [seen["out"][j] for j in (7, 4, 2, 0)]
    expected = [fb[0], torch.cat([fb[1], maps[(4, 8)]], 1), torch.cat([fb[2], maps[(2, 4)]], 1), fb[3]]
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 16), (2, 67, 4, 8), (2, 131, 2, 4), (2, 128, 1, 2)]
    for got, want in zip(feats, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_backbone_runs_the_frozen_vae_under_the_callers_autocast():
    torch.manual_seed(0)
    bb = VPDBackbone(TINY_UNET, TINY_VAE, text_dim=32)
    seen = {}
    bb.unet.input_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(latent=a[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = bb(images(1), torch.randn(3, 32))
    assert seen["latent"].dtype == torch.bfloat16 and not seen["latent"].requires_grad
    assert [f.shape[1] for f in feats] == bb.feature_channels(3)
    with torch.no_grad():
        assert bb(images(1), torch.randn(3, 32))[0].dtype == torch.float32  # no autocast: float32


def test_backbone_and_task_models_have_no_graph_breaks(monkeypatch):
    # what train.py compiles: the backbone inside each task model, in training mode (dropout, BatchNorm
    # statistics), depth also at a side it pads to 64; a break is a host sync or a recompile per step
    torch._dynamo.reset()
    x, x96, scenes = images(2), images(2, 96, 96), torch.tensor([3, 5])
    for model, args in [(VPDBackbone(TINY_UNET, TINY_VAE, text_dim=32), (x, torch.randn(3, 32))),
                        (tiny("semseg"), (x,)), (tiny("refer"), (x, torch.randint(0, 49407, (2, 40)))),
                        (tiny("depth"), (x, scenes)), (tiny("depth"), (x96, scenes))]:
        explanation = torch._dynamo.explain(model.train())(*args)
        assert explanation.graph_break_count == 0, (type(model).__name__, explanation.break_reasons)
    # compiled for a GPU, the UNet's and VAE's group norms take the ways of vpd/norm.py: traced here, the
    # UNet's per group at these sizes, then every norm per channel
    from vpd import norm
    monkeypatch.setattr(norm, "compiled_for_gpu", lambda x: True)
    for pixels in (norm.PER_CHANNEL_PIXELS, 0):
        monkeypatch.setattr(norm, "PER_CHANNEL_PIXELS", pixels)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(tiny("semseg").train())(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


def test_backbone_keeps_channels_last():
    # the maps joined to the features follow the features' layout, so every head conv reads NHWC
    torch.manual_seed(0)
    bb = VPDBackbone(TINY_UNET, TINY_VAE, text_dim=32).eval()
    x, text = images(2), torch.randn(3, 32)
    with torch.no_grad():
        want = bb(x, text)
        got = bb.to(memory_format=torch.channels_last)(x, text)
    assert len(got) == 4 and all(g.is_contiguous(memory_format=torch.channels_last) for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blocks,channels", [((), [32, 64, 128, 128]), (("input",), [32, 67, 131, 128]),
                                             (("middle",), [32, 64, 128, 131]),
                                             (("input", "output", "middle"), [32, 67, 131, 131])])
def test_feature_channels_follow_the_map_blocks(blocks, channels):
    # maps of 1/16 and 1/32 come from the encoder / decoder layers, the middle block's from 1/64
    # (a quarter of the latent or less): the announced channels are those the forward returns
    torch.manual_seed(0)
    bb = VPDBackbone(TINY_UNET, TINY_VAE, text_dim=32, map_blocks=blocks).eval()
    assert bb.feature_channels(3) == channels
    with torch.no_grad():
        assert [f.shape[1] for f in bb(images(1), torch.randn(3, 32))] == channels


def test_maps_pass_gradients_when_not_detached():
    # detach_maps=False: the maps' gradient reaches the UNet's attn2 queries/keys and the text adapter
    torch.manual_seed(0)
    bb = wake(VPDBackbone(TINY_UNET, TINY_VAE, text_dim=32, detach_maps=False))
    feats = bb(images(1), torch.randn(3, 32))
    feats[1][:, 64:].pow(2).sum().backward()  # the 1/16 level's 3 map channels only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.text_adapter.parameters())
    to_k = [m.to_k.weight for n, m in bb.unet.named_modules() if n.endswith("attn2")]
    assert any(w.grad is not None and w.grad.abs().sum() > 0 for w in to_k)


def test_sd_feature_channels_and_blocks():
    with torch.device("meta"):
        seg = VPDBackbone()
        depth = VPDBackbone(map_blocks=())
    assert seg.feature_channels(150) == [320, 790, 1430, 1280]
    assert seg.feature_channels(40) == [320, 680, 1320, 1280]
    assert depth.feature_channels(1) == [320, 640, 1280, 1280]
    assert tuple(seg.unet.feature_blocks) == (1, 4, 7, 11)  # VPD's output blocks 1, 4, 7 and the last


# --- task models: shapes ----------------------------------------------------------------------

@pytest.mark.parametrize("h,w", [(64, 64), (64, 128)])
def test_tiny_task_models_output_shapes(h, w):
    x = images(2, h, w)
    with torch.no_grad():
        assert tiny("semseg").eval()(x).shape == (2, 5, h, w)
        assert tiny("refer").eval()(x, torch.randint(0, 49407, (2, 40))).shape == (2, 2, h, w)
        depth = tiny("depth").eval()(x, torch.tensor([0, 26]))
        assert depth.shape == (2, 1, h, w) and depth.min() > 0 and depth.max() < 10


def test_refer_text_is_the_sentences_clip_token_states():
    # VPD/LAVT condition on CLIP's last hidden states, one vector per token (not the pooled sentence vector)
    model = tiny("refer").eval()
    ids = torch.randint(1, 49406, (2, 40))
    ids[:, 0], ids[:, 6], ids[:, 7:] = 49406, 49407, 49407
    seen = {}
    model.backbone.register_forward_pre_hook(lambda m, a: seen.update(text=a[1]))
    with torch.no_grad():
        model(images(2), ids)
        states = model.clip.final_layer_norm(model.clip.encoder.layers[-1](
            model.clip.encoder.layers[-2](model.clip.embeddings(ids))))  # TINY_CLIP has 2 layers
    assert seen["text"].shape == (2, 40, 32)
    torch.testing.assert_close(seen["text"], states)


def test_seg_text_is_the_class_embeddings_in_their_order():
    # map channel k is class k: the backbone is conditioned on the class embeddings as they are stored
    model = tiny("semseg").eval()
    seen = {}
    model.backbone.register_forward_pre_hook(lambda m, a: seen.update(text=a[1]))
    with torch.no_grad():
        model(images(1))
    assert torch.equal(seen["text"], model.class_embeddings)


def test_seg_classes_need_not_be_the_text_rows():
    # num_classes sets the logits; the class embeddings only set the text (and map) count N
    torch.manual_seed(0)
    bb = VPDBackbone(TINY_UNET, TINY_VAE, text_dim=32)
    model = VPDSeg(bb, torch.randn(3, 32), num_classes=5, channels=16).eval()
    assert model.head.in_channels == [32, 67, 131, 128]
    with torch.no_grad():
        assert model(images(1)).shape == (1, 5, 64, 64)


def test_seg_and_refer_logits_are_upsampled_as_mmseg_and_lavt_do():
    # mmseg resizes the 1/8 logits with align_corners=False, VPD's refer model with align_corners=True
    x = images(1, 64, 128)
    for task, align, extra in (("semseg", False, ()), ("refer", True, (torch.randint(0, 49407, (1, 40)),))):
        model = tiny(task).eval()
        seen = {}
        model.head.register_forward_hook(lambda m, a, out: seen.update(logits=out))
        with torch.no_grad():
            out = model(x, *extra)
        low = seen["logits"]
        assert low.shape[-2:] == (8, 16) and low.std() > 0
        ref = F.interpolate(low, size=(64, 128), mode="bilinear", align_corners=align)
        torch.testing.assert_close(out, ref)
        assert not torch.allclose(out, F.interpolate(low, size=(64, 128), mode="bilinear", align_corners=not align))


def test_task_outputs_are_float32_under_bf16_autocast():
    # the heads' bf16 logits are upsampled, and depths predicted, in float32: not rounded to bf16 again
    x, ids = images(1), torch.randint(0, 49407, (1, 40))
    models = [tiny("semseg").eval(), tiny("refer").eval(), tiny("depth").eval()]
    logits = []
    for m in models[:2]:
        m.head.register_forward_hook(lambda m, args, out: logits.append(out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [models[0](x), models[1](x, ids), models[2](x, torch.tensor([0]))]
    assert [o.dtype for o in outs] == [torch.float32] * 3
    assert [t.dtype for t in logits] == [torch.bfloat16] * 2  # (so the test has something to keep from rounding)
    for out, t, corners in zip(outs, logits, (False, True)):  # semseg as mmseg resizes, refer as LAVT does
        up = F.interpolate(t.float(), size=x.shape[-2:], mode="bilinear", align_corners=corners)
        torch.testing.assert_close(out, up, rtol=1e-6, atol=1e-6)
        assert (out == out.bfloat16().float()).float().mean() < 0.5  # not on bf16's grid


def test_depth_pads_to_64_and_crops_the_fused_map():
    model = tiny("depth").eval()
    x = images(1, 96, 96)  # 96 = 3 x 32: padded to 128, fused 1/32 map 4x4 -> 3x3
    seen = {}
    model.head.deconv.register_forward_pre_hook(lambda m, a: seen.update(fused=a[0]))
    model.backbone.register_forward_pre_hook(lambda m, a: seen.update(padded=a[0], text=a[1]))
    with torch.no_grad():
        out = model(x, torch.tensor([4]))
    assert out.shape == (1, 1, 96, 96) and seen["fused"].shape[-2:] == (3, 3)
    assert seen["padded"].shape[-2:] == (128, 128)
    torch.testing.assert_close(seen["padded"][..., :96, :96], x)
    assert seen["padded"][..., 96:, :].abs().sum() == 0 and seen["padded"][..., :, 96:].abs().sum() == 0
    torch.testing.assert_close(seen["text"], model.class_embeddings[4].view(1, 1, -1))
    with pytest.raises(ValueError, match="multiple of 32"):
        model(images(1, 80, 96), torch.tensor([0]))


@pytest.mark.parametrize("h,w,padded,fused", [(96, 128, (128, 128), (3, 4)), (64, 96, (64, 128), (2, 3))])
def test_depth_pads_and_crops_each_side_by_its_own_amount(h, w, padded, fused):
    # only the side that is not a multiple of 64 is padded (bottom or right), and the fused 1/32 map
    # is cut back to (h/32, w/32); each image gets the embedding of its own scene id
    model = tiny("depth").eval()
    x = images(2, h, w)
    seen = {}
    model.head.deconv.register_forward_pre_hook(lambda m, a: seen.update(fused=a[0]))
    model.backbone.register_forward_pre_hook(lambda m, a: seen.update(padded=a[0], text=a[1]))
    with torch.no_grad():
        out = model(x, torch.tensor([4, 7]))
    assert out.shape == (2, 1, h, w)
    assert seen["padded"].shape[-2:] == padded and seen["fused"].shape[-2:] == fused
    torch.testing.assert_close(seen["padded"][..., :h, :w], x)
    assert seen["padded"][..., h:, :].abs().sum() == 0 and seen["padded"][..., :, w:].abs().sum() == 0
    torch.testing.assert_close(seen["text"], model.class_embeddings[[4, 7]].view(2, 1, -1))


def test_full_size_models_on_meta():
    with torch.device("meta"):
        seg, depth, refer = (build_model(t) for t in TASKS)
        assert seg.class_embeddings.shape == (150, 768) and depth.class_embeddings.shape == (27, 768)
        assert seg(torch.empty(1, 3, 512, 512)).shape == (1, 150, 512, 512)
        assert seg(torch.empty(1, 3, 512, 768)).shape == (1, 150, 512, 768)
        assert depth(torch.empty(2, 3, 480, 480), torch.zeros(2, dtype=torch.long)).shape == (2, 1, 480, 480)
        assert depth(torch.empty(1, 3, 512, 512), torch.zeros(1, dtype=torch.long)).shape == (1, 1, 512, 512)
        ids = torch.zeros(1, 40, dtype=torch.long)
        assert refer(torch.empty(1, 3, 512, 512), ids).shape == (1, 2, 512, 512)
    assert seg.head.in_channels == [320, 790, 1430, 1280]
    assert depth.head.in_channels == [320, 640, 1280, 1280]
    assert seg.head.dropout.p == 0.1 and depth.head.max_depth == 10.0  # FPNHead dropout 0.1; NYUv2 10 m
    assert refer.head.in_channels == [320, 680, 1320, 1280]
    unet = sum(p.numel() for p in seg.backbone.unet.parameters())
    assert unet == 859_520_964 - (320 * 2 + 4 * 320 * 9 + 4)  # SD's UNet without its `out` head
    assert sum(p.numel() for p in refer.clip.parameters()) == 123_060_480


# --- task models: gradients, frozen parts, losses ---------------------------------------------

def run_loss(task, model):
    x = images(2, 64, 64)
    if task == "semseg":
        label = torch.randint(0, 5, (2, 64, 64))
        label[:, :8] = 255
        return model.loss(model(x), label)
    if task == "depth":
        return model.loss(model(x, torch.tensor([1, 2])), torch.rand(2, 1, 64, 64) * 5 + 0.5)
    return model.loss(model(x, torch.randint(0, 49407, (2, 40))), torch.randint(0, 2, (2, 64, 64)))


def test_backbone_maps_carry_no_gradient_by_default():
    # VPD stores the maps from ldm's checkpointed blocks' first, no_grad pass: the models built for
    # training must get them detached
    model = tiny("semseg")
    assert model.backbone.detach_maps
    feats = model.backbone(images(1), model.class_embeddings)
    assert feats[1].shape[1] == 64 + 5  # the 1/16 map: UNet channels, then one map per class
    # (squared: the maps' plain sum is the same whatever the weights, softmaxes summing to one)
    feats[1][:, 64:].pow(2).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("task", TASKS)
def test_loss_reaches_unet_adapter_gamma_head_but_not_frozen_parts(task):
    model = tiny(task).train()
    assert not model.backbone.vae.training and (task != "refer" or not model.clip.training)
    loss = run_loss(task, model)
    assert torch.isfinite(loss)
    loss.backward()
    nonzero = lambda m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert nonzero(model.backbone.unet) and nonzero(model.backbone.text_adapter) and nonzero(model.head)
    assert model.backbone.gamma.grad is not None and model.backbone.gamma.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.vae.parameters())
    if task == "refer":
        assert all(p.grad is None and not p.requires_grad for p in model.clip.parameters())
    else:
        assert not model.class_embeddings.requires_grad and "class_embeddings" in model.state_dict()


def test_seg_loss_is_mmseg_cross_entropy():
    logits = torch.randn(1, 3, 2, 2)
    label = torch.tensor([[[0, 2], [255, 1]]])
    logp = logits.log_softmax(1)[0]
    want = -(logp[0, 0, 0] + logp[2, 0, 1] + logp[1, 1, 1]) / 4  # ignored pixel counts in the mean
    torch.testing.assert_close(VPDSeg.loss(logits, label), want)


def test_depth_loss_is_scale_invariant_log_loss():
    pred = torch.tensor([[[[1.0, 2.0], [4.0, 3.0]]]])
    gt = torch.tensor([[[[2.0, 2.0], [0.0, 1.0]]]])
    d = [math.log(2 / 1), math.log(2 / 2), math.log(1 / 3)]
    want = math.sqrt(sum(x * x for x in d) / 3 - 0.5 * (sum(d) / 3) ** 2)
    assert VPDDepth.loss(pred, gt).item() == pytest.approx(want, rel=1e-6)
    # a global scale of the prediction only moves the mean of d
    assert VPDDepth.loss(pred * 3, gt).item() == pytest.approx(
        math.sqrt(sum(x * x for x in [v - math.log(3) for v in d]) / 3 - 0.5 * (sum(d) / 3 - math.log(3)) ** 2),
        rel=1e-6)
    assert VPDDepth.loss(pred, torch.zeros_like(gt)).isnan()  # no valid pixel: NaN, as the official loss
    with pytest.raises(ValueError, match="differ"):  # (B, 1, H, W) against (B, H, W) is no broadcast
        VPDDepth.loss(pred, gt[:, 0])


def test_depth_loss_gradient_is_that_of_the_valid_pixels_alone():
    # the loss is written with masks (no host sync); its gradient must be that of the loss over the
    # selected valid pixels, also where an invalid pixel's prediction is 0 (log 0 there must not leak NaN)
    torch.manual_seed(0)
    gt = torch.rand(2, 1, 4, 5) * 5
    gt[gt < 1.5] = 0.0
    pred = (torch.rand(2, 1, 4, 5) * 5 + 0.1).where(gt > 0, torch.zeros(())).requires_grad_()
    ref = pred.detach().clone().requires_grad_()
    VPDDepth.loss(pred, gt).backward()
    valid = gt > 0
    d = torch.log(gt[valid]) - torch.log(ref[valid])
    torch.sqrt((d ** 2).mean() - 0.5 * d.mean() ** 2).backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad[~valid] == 0).all()
    torch.testing.assert_close(pred.grad, ref.grad)


def test_refer_loss_is_weighted_cross_entropy():
    logits = torch.randn(1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 1]]])
    logp = logits.log_softmax(1)[0, :, 0]
    want = -(0.9 * logp[0, 0] + 1.1 * logp[1, 1] + 1.1 * logp[1, 2]) / (0.9 + 1.1 + 1.1)
    torch.testing.assert_close(VPDRefer.loss(logits, target), want)
    logits, target = torch.randn(2, 2, 3, 4), torch.randint(0, 2, (2, 3, 4))
    torch.testing.assert_close(VPDRefer.loss(logits, target),
                               F.cross_entropy(logits, target, weight=torch.tensor([0.9, 1.1])))


def test_losses_have_no_graph_breaks():
    # a break here is a host sync per training step (a data-dependent branch or shape)
    torch._dynamo.reset()
    for loss, args in [(VPDSeg.loss, (torch.randn(2, 5, 4, 4), torch.randint(0, 5, (2, 4, 4)))),
                       (VPDDepth.loss, (torch.rand(2, 1, 4, 4) + 0.1, torch.rand(2, 1, 4, 4) - 0.3)),
                       (VPDRefer.loss, (torch.randn(2, 2, 4, 4), torch.randint(0, 2, (2, 4, 4))))]:
        report = torch._dynamo.explain(loss)(*args)
        assert report.graph_break_count == 0, report.break_reasons
    torch._dynamo.reset()


def test_wake_gives_only_all_zero_weights_values_of_std_one_over_sqrt_fan_in():
    # SD's zero-initialised convs and heads get N(0, 1/fan_in) weights; biases and weights that already
    # have values are left as they are
    torch.manual_seed(0)
    lin, conv, kept = torch.nn.Linear(400, 3), torch.nn.Conv2d(16, 64, 3), torch.nn.Linear(4, 4)
    for m in (lin, conv):
        torch.nn.init.zeros_(m.weight)
        torch.nn.init.zeros_(m.bias)
    before = [p.clone() for p in kept.parameters()]
    wake_zero_weights_(torch.nn.ModuleList([lin, conv, kept]), torch.Generator().manual_seed(0))
    assert lin.weight.std().item() == pytest.approx(400 ** -0.5, rel=0.1)
    assert conv.weight.std().item() == pytest.approx((16 * 3 * 3) ** -0.5, rel=0.1)  # fan_in = in * kh * kw
    assert not lin.bias.any() and not conv.bias.any()
    assert all(torch.equal(p, q) for p, q in zip(kept.parameters(), before))


# --- construction ------------------------------------------------------------------------------

def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown task"):
        build_model("detection")
    refer = tiny("refer")
    with pytest.raises(ValueError, match=r"\(1, 40\)"):
        refer(images(1), torch.zeros(1, 77, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of 64"):
        tiny("semseg")(images(1, 64, 96))
    with pytest.raises(ValueError, match="text_dim"):
        VPDBackbone(TINY_UNET, TINY_VAE, text_dim=768)
    with pytest.raises(ValueError, match=r"must be .*\(2, N, "):  # per-image text for another batch size
        VPDBackbone(TINY_UNET, TINY_VAE, text_dim=32)(images(2), torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="VAE latent channels 8"):  # the UNet reads 4-channel latents
        VPDBackbone(TINY_UNET, VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, embed_dim=8), text_dim=32)


def test_from_checkpoint_takes_unet_vae_and_clip_from_an_sd_file(tmp_path):
    from vpd.unet import UNet
    from vpd.vae import VAE
    torch.manual_seed(3)
    unet, vae, clip = UNet(TINY_UNET), VAE(TINY_VAE), CLIPTextModel(TINY_CLIP)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})  # decoder included
    sd.update({"cond_stage_model.transformer.text_model." + k: v for k, v in clip.state_dict().items()})
    sd["alphas_cumprod"] = torch.ones(1000)
    model = build_model("refer", sd_ckpt=sd, unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP)
    ours = model.state_dict()
    for k, v in unet.state_dict().items():
        if not k.startswith("out."):
            assert torch.equal(ours["backbone.unet." + k], v), k
    for k, v in vae.state_dict().items():
        if not k.startswith("decoder."):
            assert torch.equal(ours["backbone.vae." + k], v), k
    for k, v in clip.state_dict().items():
        assert torch.equal(ours["clip." + k], v), k
    assert not any(t.is_meta for t in ours.values())
    assert torch.equal(model.backbone.gamma, torch.full((32,), 1e-4))
    assert not any(p.requires_grad for p in model.backbone.vae.parameters())
    bb = VPDBackbone.from_checkpoint(sd, TINY_UNET, TINY_VAE, text_dim=32, gamma_init=0.25)  # a chosen start
    assert torch.equal(bb.gamma, torch.full((32,), 0.25))
    assert all(p.requires_grad for p in model.backbone.unet.parameters())
