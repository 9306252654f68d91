"""Task heads: layer shapes of the official SD v1.5 configs, output shapes, and the wiring checked
against hand-written functional forwards."""
import pytest
import torch
import torch.nn.functional as F

from vpd.heads import DepthHead, FPNSegHead, ReferHead, resize_bilinear

SD_SEG = [320, 640 + 150, 1280 + 150, 1280]  # VPD's ADE20K neck in_channels [320, 790, 1430, 1280]
SD_DEPTH = [320, 640, 1280, 1280]
SD_REFER = [320, 680, 1320, 1280]


def pyramid(channels, h=16, w=24, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h >> i, w >> i, generator=g) for i, c in enumerate(channels)]


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def randomize_bn(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def bn(x, m):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def test_fpn_layers_match_mmseg_semantic_fpn_for_sd():
    with torch.device("meta"):
        head = FPNSegHead(SD_SEG, num_classes=150)
    s = shapes(head)
    assert [s[f"lateral_convs.{i}.weight"] for i in range(4)] == [[256, c, 1, 1] for c in SD_SEG]
    assert s["fpn_convs.3.weight"] == [256, 256, 3, 3] and s["fpn_convs.3.bias"] == [256]
    # mmseg FPNHead, strides 4/8/16/32: 1, 1, 2, 3 ConvModules, with Upsample layers between them
    convs = sorted(k[len("scale_heads."):-len(".conv.weight")] for k in s if k.endswith(".conv.weight"))
    assert convs == ["0.0", "1.0", "2.0", "2.2", "3.0", "3.2", "3.4"]
    assert not any(k.startswith("scale_heads.") and k.endswith(".conv.bias") for k in s)  # BN follows
    assert s["classifier.weight"] == [150, 256, 1, 1]
    assert sum(p.numel() for p in head.parameters()) == (
        256 * sum(SD_SEG) + 4 * 256 + 4 * (256 * 256 * 9 + 256) + 7 * (256 * 256 * 9 + 2 * 256) + 150 * 257)


def test_fpn_forward_matches_hand_written_semantic_fpn():
    chans = [8, 12, 16, 16]
    head = FPNSegHead(chans, num_classes=5, channels=8).eval()
    randomize_bn(head)
    feats = pyramid(chans)
    out = head(feats)
    assert out.shape == (2, 5, 16, 24)

    lat = [F.conv2d(f, c.weight, c.bias) for f, c in zip(feats, head.lateral_convs)]
    lat[2] = lat[2] + lat[3].repeat_interleave(2, -1).repeat_interleave(2, -2)  # nearest x2
    lat[1] = lat[1] + lat[2].repeat_interleave(2, -1).repeat_interleave(2, -2)
    lat[0] = lat[0] + lat[1].repeat_interleave(2, -1).repeat_interleave(2, -2)
    outs = [F.conv2d(x, c.weight, c.bias, padding=1) for x, c in zip(lat, head.fpn_convs)]
    total = 0
    for i, x in enumerate(outs):
        for j in range(max(1, i)):
            block = head.scale_heads[i][2 * j]
            x = F.relu(bn(F.conv2d(x, block.conv.weight, padding=1), block.bn))
            if i > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        total = total + x
    ref = F.conv2d(total, head.classifier.weight, head.classifier.bias)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)

    # training: mmseg's Dropout2d drops whole channels of the summed map, scaling the others by 1/(1-p)
    head.dropout.p = 0.5
    seen = {}
    head.dropout.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    torch.manual_seed(0)
    head.train()(feats)
    x, out = seen["x"].flatten(2), seen["out"].flatten(2)  # (B, C, HW)
    dropped = (out == 0).all(-1)
    assert dropped.any() and not dropped.all() and (x.abs().sum(-1) > 0).all()
    torch.testing.assert_close(out[~dropped], 2 * x[~dropped])


def test_fpn_sums_levels_resized_bilinearly_onto_the_finest():
    # mmseg FPNHead: output + resize(scale_head(x), output size, bilinear, align_corners=False); with odd
    # sizes the x2 upsampled coarse levels do not land exactly on the 1/8 map and that resize shows
    chans = [8, 8, 8, 8]
    head = FPNSegHead(chans, num_classes=3, channels=8).eval()
    randomize_bn(head)
    feats = pyramid(chans, h=10, w=14)  # 10x14, 5x7, 2x3, 1x1
    seen = {}
    for i, sh in enumerate(head.scale_heads):
        sh.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    head.dropout.register_forward_pre_hook(lambda m, a: seen.update(summed=a[0]))
    with torch.no_grad():
        head(feats)
    assert [tuple(seen[i].shape[-2:]) for i in range(4)] == [(10, 14), (10, 14), (8, 12), (8, 8)]
    want = seen[0] + sum(F.interpolate(seen[i], size=(10, 14), mode="bilinear", align_corners=False)
                         for i in range(1, 4))
    torch.testing.assert_close(seen["summed"], want)


def test_fpn_resizes_only_levels_off_the_finest_grid(monkeypatch):
    # a same-size bilinear resize is the identity (weights 1 and 0), but compiled it still gathers, and its
    # backward scatters: a level that lands on the 1/8 map exactly by its x2 upsamples is added as it is
    from vpd import heads
    chans = [8, 8, 8, 8]
    head = FPNSegHead(chans, num_classes=3, channels=8).eval()
    resize, resized = heads.resize_bilinear, []
    monkeypatch.setattr(heads, "resize_bilinear",
                        lambda x, size, *a: resized.append((tuple(x.shape[-2:]), tuple(size))) or resize(x, size, *a))
    with torch.no_grad():
        head(pyramid(chans, h=8, w=8))  # 8x8, 4x4, 2x2, 1x1: only the x2 upsamples of levels 1, 2, 3
    assert sorted(resized) == sorted([((4, 4), (8, 8))] * 3 + [((2, 2), (4, 4))] * 2 + [((1, 1), (2, 2))])
    resized.clear()
    with torch.no_grad():
        head(pyramid(chans, h=10, w=14))  # 10x14, 5x7, 2x3, 1x1: levels 2 and 3 land on 8x12 and 8x8
    onto_finest = [r for r in resized if r[1] == (10, 14)]
    assert sorted(onto_finest) == [((5, 7), (10, 14)), ((8, 8), (10, 14)), ((8, 12), (10, 14))]  # level 1: x2


def _uniform_bound_ok(w, bound):
    return w.abs().max() <= bound and w.abs().max() > 0.9 * bound and abs(w.std() / (bound / 3 ** 0.5) - 1) < 0.1


def test_fpn_init_is_mmseg_s():
    # mmseg: neck convs Xavier-uniform (bias 0), head ConvModules Kaiming-normal fan_out (relu),
    # conv_seg N(0, 0.01) with bias 0, BN at (1, 0)
    torch.manual_seed(0)
    head = FPNSegHead([64, 64, 64, 64], num_classes=150, channels=128)
    for conv in [*head.lateral_convs, *head.fpn_convs]:
        fan_in, fan_out = conv.in_channels * conv.kernel_size[0] ** 2, conv.out_channels * conv.kernel_size[0] ** 2
        assert _uniform_bound_ok(conv.weight, (6 / (fan_in + fan_out)) ** 0.5)
        assert not conv.bias.any()
    convs = [m for m in head.scale_heads.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 7
    for conv in convs:
        assert abs(conv.weight.std() / (2 / (128 * 9)) ** 0.5 - 1) < 0.05
    bns = [m for m in head.scale_heads.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bool((b.weight == 1).all() and (b.bias == 0).all()) for b in bns)
    assert abs(head.classifier.weight.std() / 0.01 - 1) < 0.05 and not head.classifier.bias.any()


def test_depth_head_init_is_vpd_s():
    # VPD: trunc_normal(std 0.02), bias 0 for layer1/layer2/out_layer; N(0, 0.001), bias 0 for the
    # decoder (deconvs, conv, last_layer_depth); BN at (1, 0). (The truncation, at +-2, is 100 std away:
    # no draw reaches it, so it is not checked.)
    torch.manual_seed(0)
    head = DepthHead([32, 32, 64, 64], fuse_channels=64, deconv_channels=32, out_channels=64)
    fusing = [m for m in [*head.down8, *head.down16, *head.fuse] if isinstance(m, torch.nn.Conv2d)]
    decoding = [m for m in [*head.deconv, *head.conv, *head.predict]
                if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(fusing) == 4 and len(decoding) == 6
    for m in fusing:
        assert abs(m.weight.std() / 0.02 - 1) < 0.1
    assert abs(torch.cat([m.weight.flatten() for m in decoding]).std() / 0.001 - 1) < 0.05
    assert all(not m.bias.any() for m in fusing + decoding if m.bias is not None)
    bns = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bool((b.weight == 1).all() and (b.bias == 0).all()) for b in bns)


def test_depth_head_layers_match_vpd_for_sd():
    with torch.device("meta"):
        head = DepthHead(SD_DEPTH)
    s = shapes(head)
    assert s["down8.0.weight"] == [320, 320, 3, 3] and s["down8.1.weight"] == [320]  # GroupNorm
    assert s["down8.3.weight"] == [320, 320, 3, 3] and s["down16.0.weight"] == [640, 640, 3, 3]
    assert s["fuse.0.weight"] == [1536, 3520, 1, 1] and s["fuse.1.weight"] == [1536]
    assert s["deconv.0.weight"] == [1536, 32, 2, 2] and "deconv.0.bias" not in s
    assert s["deconv.3.weight"] == [32, 32, 2, 2] and s["deconv.7.running_var"] == [32]
    assert "deconv.9.weight" not in s  # three deconv stages
    assert s["conv.0.weight"] == [192, 32, 3, 3] and s["conv.1.running_mean"] == [192]
    assert s["predict.0.weight"] == [192, 192, 3, 3] and s["predict.2.weight"] == [1, 192, 3, 3]
    assert head.fuse[1].num_groups == 16 and head.down8[1].num_groups == 16


def test_depth_head_output_range_size_and_crop():
    chans = [16, 16, 32, 32]
    head = DepthHead(chans, max_depth=10.0, fuse_channels=32, deconv_channels=8, out_channels=16).eval()
    with torch.no_grad():
        for m in [*head.deconv, *head.conv, *head.predict]:  # VPD's N(0, 0.001) init: spread it out
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                torch.nn.init.normal_(m.weight, std=0.2)
        feats = pyramid(chans, h=16, w=32)  # 1/8 of a 128x256 image
        out = head(feats)
        assert out.shape == (2, 1, 128, 256)
        assert out.min() >= 0 and out.max() <= 10.0 and out.std() > 0.1
        # crop trims the fused 1/32 map: 4x8 -> 3x7 gives 96x224
        cropped = head(feats, crop=(3, 7))
        assert cropped.shape == (2, 1, 96, 224)


def test_depth_head_predicts_in_float32_under_bf16_autocast():
    # bf16 depths step by 3 cm from 4 m and 6 cm from 8 m: the last conv and the sigmoid stay float32
    chans = [16, 16, 32, 32]
    head = DepthHead(chans, max_depth=10.0, fuse_channels=32, deconv_channels=8, out_channels=16).eval()
    with torch.no_grad():
        for m in [*head.deconv, *head.conv, *head.predict]:  # VPD's N(0, 0.001) init: every depth ~5 m
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                torch.nn.init.normal_(m.weight, std=0.2)
    feats = pyramid(chans, h=8, w=8)
    last = []  # the last conv's own output: an autocast conv would give bf16, cast up only by the sigmoid
    head.predict[-1].register_forward_hook(lambda m, args, out: last.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(feats)
    assert last == [torch.float32] and out.dtype == torch.float32
    assert (out != out.bfloat16().float()).float().mean() > 0.9  # off bf16's grid
    with torch.no_grad():
        assert torch.allclose(out, head(feats), atol=0.05)


def test_depth_head_matches_hand_written_decoder_with_crop():
    chans = [16, 16, 32, 32]
    head = DepthHead(chans, max_depth=2.5, fuse_channels=32, deconv_channels=8, out_channels=16).eval()
    randomize_bn(head)
    with torch.no_grad():
        for m in [*head.deconv, *head.conv, *head.predict]:  # VPD's N(0, 0.001) init would flatten the output
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                torch.nn.init.normal_(m.weight, std=0.2)
    feats = pyramid(chans, h=16, w=24)  # the 1/64 map is 2x3: its nearest upsampling is visible
    with torch.no_grad():
        out = head(feats, crop=(3, 5))  # fused 1/32 map 4x6 -> its top-left 3x5

    def gn_relu(x, conv, norm):
        return F.relu(F.group_norm(conv(x), norm.num_groups, norm.weight, norm.bias, norm.eps))

    with torch.no_grad():
        d8 = head.down8[3](gn_relu(feats[0], head.down8[0], head.down8[1]))
        up64 = feats[3].repeat_interleave(2, -1).repeat_interleave(2, -2)  # nearest x2
        c16 = head.down16[0]
        d16 = F.conv2d(feats[1], c16.weight, c16.bias, stride=2, padding=1)  # VPD's layer2: one conv, nothing after
        x = gn_relu(torch.cat([d8, d16, feats[2], up64], 1), head.fuse[0], head.fuse[1])
        x = x[:, :, :3, :5]  # VPD: [:, :, :-1, :-1], the last row and column dropped
        for i in range(0, len(head.deconv), 3):
            x = F.relu(bn(head.deconv[i](x), head.deconv[i + 1]))
        x = F.relu(bn(head.conv[0](x), head.conv[1]))
        for _ in range(2):  # VPD's Decoder.up, twice
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        ref = torch.sigmoid(head.predict[2](F.relu(head.predict[0](x)))) * 2.5  # sigmoid x max_depth
    assert out.shape == (2, 1, 96, 160)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_refer_head_layers_match_lavt_simple_decoding_for_sd():
    with torch.device("meta"):
        head = ReferHead(SD_REFER)
    s = shapes(head)
    assert s["fuse32.0.weight"] == [640, 1280 + 1320, 3, 3] and "fuse32.0.bias" not in s
    assert s["fuse32.3.weight"] == [640, 640, 3, 3] and s["fuse32.4.running_mean"] == [640]
    assert s["fuse16.0.weight"] == [640, 640 + 680, 3, 3]
    assert s["fuse8.0.weight"] == [640, 640 + 320, 3, 3]
    assert s["classifier.weight"] == [2, 640, 1, 1] and s["classifier.bias"] == [2]


def test_refer_head_matches_hand_written_decoding():
    chans = [8, 12, 12, 16]
    head = ReferHead(chans).eval()
    randomize_bn(head)
    feats = pyramid(chans, h=8, w=12)
    out = head(feats)
    assert out.shape == (2, 2, 8, 12)

    def block(x, seq):
        x = F.relu(bn(F.conv2d(x, seq[0].weight, padding=1), seq[1]))
        return F.relu(bn(F.conv2d(x, seq[3].weight, padding=1), seq[4]))

    def up(x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)

    f8, f16, f32, f64 = feats
    x = block(torch.cat([up(f64, f32), f32], 1), head.fuse32)
    x = block(torch.cat([up(x, f16), f16], 1), head.fuse16)
    x = block(torch.cat([up(x, f8), f8], 1), head.fuse8)
    ref = F.conv2d(x, head.classifier.weight, head.classifier.bias)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls,kw", [(FPNSegHead, {"num_classes": 3, "channels": 8}), (DepthHead, {"fuse_channels": 16}),
                                    (ReferHead, {})])
def test_heads_refuse_wrong_feature_channels(cls, kw):
    head = cls([16, 16, 32, 32], **kw)
    with pytest.raises(ValueError, match=r"\[16, 16, 32, 32\]"):
        head(pyramid([16, 17, 32, 32], h=8, w=8))
    with pytest.raises(ValueError, match="4 feature maps"):
        head(pyramid([16, 16, 32], h=8, w=8))


def test_head_norms_use_torchs_default_eps():
    # VPD's depth decoder, mmseg's SyncBN ConvModules and LAVT's SimpleDecoding all build their norms with
    # the defaults: eps 1e-5 (the UNet's transformer GroupNorms use 1e-6; these must not)
    with torch.device("meta"):
        heads = [FPNSegHead(SD_SEG, num_classes=150), DepthHead(SD_DEPTH), ReferHead(SD_REFER)]
    norms = [m for h in heads for m in h.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
    assert len(norms) == 7 + 6 + 6  # FPN: 7 BN; depth: 2 GN + 4 BN; refer: 6 BN
    assert all(m.eps == 1e-5 for m in norms)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size_in,size_out", [((8, 8), (64, 64)), ((7, 5), (61, 43)), ((9, 12), (4, 5)),
                                              ((1, 3), (5, 4)), ((6, 6), (6, 6))])
def test_resize_bilinear_is_torchs_bilinear_interpolation(align_corners, size_in, size_out):
    # values and input gradients against F.interpolate's own kernels (computed in float64 as the reference)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size_in, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, *size_out, generator=g, dtype=torch.float64)
    ref = F.interpolate(x, size=size_out, mode="bilinear", align_corners=align_corners)
    (ref_grad,) = torch.autograd.grad(ref, x, grad)
    out = resize_bilinear(x, size_out, align_corners)
    (out_grad,) = torch.autograd.grad(out, x, grad)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_grad, ref_grad, rtol=0, atol=1e-5)


def test_resize_bilinears_products_lose_nothing_to_tf32_at_x8():
    # vpd/dist.py lets a GPU run float32 products on TF32 (10-bit mantissa) under autocast: resize_bilinear's
    # inputs are bf16 logits, and at the training crop's x8 its weights are sixteenths, all held exactly
    from vpd.heads import _interp_matrix

    def tf32(t):  # float32 rounded to TF32's 10 mantissa bits (13 of 23 dropped, to nearest)
        bits = t.float().contiguous().view(torch.int32)
        return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    logits = torch.randn(10_000).mul(8).bfloat16().float()
    assert torch.equal(tf32(logits), logits)
    for n_in in (64, 60):  # 512 and 480 crops
        weights = _interp_matrix(n_in, 8 * n_in, False, "cpu")
        assert torch.equal(tf32(weights), weights)
    # align_corners (refer) and other ratios (evaluation at an image's own size): rounded, 2^-11 at most
    for args in ((64, 512, True), (64, 683, False)):
        weights = _interp_matrix(*args, "cpu")
        assert not torch.equal(tf32(weights), weights)
        assert ((tf32(weights) - weights).abs() <= weights.abs() * 2 ** -11).all()


def test_upsample2x_is_torchs_x2_bilinear_in_the_inputs_dtype_and_layout():
    from vpd.heads import Upsample2x
    x = torch.randn(2, 8, 5, 7)
    want = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(Upsample2x()(x), want, rtol=0, atol=1e-6)
    nhwc = x.bfloat16().to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Upsample2x()(nhwc)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    # from the bf16 values, in float32, rounded once: within half a bf16 step of the exact result
    exact = F.interpolate(nhwc.double(), scale_factor=2, mode="bilinear", align_corners=False)
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-30).all()


def test_resize_bilinear_stays_float32_under_bf16_autocast():
    x = torch.randn(1, 4, 8, 8).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = resize_bilinear(x.bfloat16(), (64, 64))
    assert out.dtype == torch.float32
    ref = F.interpolate(x.bfloat16().float(), size=(64, 64), mode="bilinear")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
