"""The SD v1 UNet against the checkpoint layout and against diffusers' UNet2DConditionModel."""
import dataclasses
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vpd.checkpoint import CheckpointError, load_checkpoint
from vpd.unet import PREFIX, UNet, UNetConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# SD v1's layout at a tiny width: 4 levels, attention at downsample factors 1, 2, 4. Two heads so
# that a head count / head dim mix-up shows (2 heads of 16..64 channels).
TINY = UNetConfig(model_channels=32, num_heads=2, context_dim=32)
# Two levels, one ResBlock each: enough structure for tracing and checkpointing tests, fast.
SMALL = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                   num_heads=2, context_dim=32)
B, N = 2, 5  # batch, text tokens


def random_state(cfg, seed=0):
    """Random SD-layout weights (the zero-initialised convs of a fresh model would hide bugs)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, s in shapes.items():
        if len(s) > 1:
            w = torch.randn(s, generator=g) / s[1:].numel() ** 0.5
        elif "norm" in k and k.endswith("weight"):
            w = 1 + 0.1 * torch.randn(s, generator=g)
        else:
            w = 0.1 * torch.randn(s, generator=g)
        state[PREFIX + k] = w
    return state


def inputs(h=16, w=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, h, w, generator=g)
    ctx = torch.randn(B, N, TINY.context_dim, generator=g)
    return x, torch.tensor([1.0, 500.0]), ctx


def diffusers_unet(cfg, state):
    """diffusers' UNet with the same weights, converted by diffusers' own single-file code."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    levels = len(cfg.channel_mult)
    attn = [2 ** i in cfg.attention_resolutions for i in range(levels)]
    ref = UNet2DConditionModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=[("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in attn],
        up_block_types=[("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in attn[::-1]],
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.num_heads,  # diffusers' SD1 configs store the head count here
        transformer_layers_per_block=cfg.transformer_depth)
    ref.load_state_dict(convert_ldm_unet_checkpoint(state, {"layers_per_block": cfg.num_res_blocks}), strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(our UNet loaded from a .safetensors file, diffusers' UNet, the state, the file)."""
    state = random_state(TINY)
    path = tmp_path_factory.mktemp("unet") / "tiny.safetensors"
    save_file(state, path)
    return UNet.from_checkpoint(path, TINY).eval(), diffusers_unet(TINY, state), state, path


def test_full_config_matches_sd15_checkpoint_layout():
    from vpd.unet import CrossAttention
    info = json.loads((SHARED / "sd15_tensors.json").read_text())
    expected = {k[len(PREFIX):]: v for k, v in info["shapes"].items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        model = UNet(UNetConfig())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    assert sum(p.numel() for p in model.parameters()) == 859_520_964 == info["param_counts"][PREFIX]
    # the defaults are v1-inference.yaml's; the head count leaves no trace in the shapes, so it is read
    # off the attention layers: 8 heads at every level, of 40, 80 and 160 channels
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(UNetConfig()).items()}
    assert cfg == info["configs"]["unet"]
    heads = {(m.heads, m.to_q.out_features // m.heads) for m in model.modules() if isinstance(m, CrossAttention)}
    assert heads == {(8, 40), (8, 80), (8, 160)}


@pytest.mark.parametrize("size", [(16, 24), (16, 16)])
def test_forward_matches_diffusers(tiny, size):
    ours, ref, _, _ = tiny
    x, t, ctx = inputs(*size)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == want.shape == x.shape
    assert (got - want).abs().max() <= 1e-4 * want.std()


def test_fractional_timesteps_match_diffusers(tiny):
    # the sinusoid takes real-valued t (ldm and diffusers alike), so t is not rounded to an integer
    ours, ref, _, _ = tiny
    x, _, ctx = inputs(16, 16)
    t = torch.tensor([0.5, 499.75])
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    assert (got - want).abs().max() <= 1e-4 * want.std()


def test_deeper_transformers_match_diffusers():
    # transformer_depth 2: both blocks of every SpatialTransformer run, and each block's attn2 map
    # counts in its resolution's average, as diffusers' up/down blocks with two transformer layers
    cfg = dataclasses.replace(TINY, transformer_depth=2)
    state = random_state(cfg, seed=3)
    ours, ref = UNet.from_checkpoint(state, cfg).eval(), diffusers_unet(cfg, state)
    x, t, ctx = inputs(8, 16)
    groups = ("input", "middle", "output")
    want_feats, want_maps, n_kept = reference_features(ref, x, t, ctx, groups, 1.0)
    assert n_kept == 2 * 16  # two attn2 per transformer, 16 transformers
    with torch.no_grad():
        feats, maps = ours.features(x, t, ctx, map_blocks=groups, map_max_fraction=1.0)
    for got, want in zip(feats, want_feats):
        assert (got - want).abs().max() <= 1e-4 * want.std()
    assert set(maps) == set(want_maps)
    for size, m in maps.items():
        torch.testing.assert_close(m, want_maps[size], rtol=0, atol=1e-5)


def test_norm_epsilons_match_diffusers(tiny):
    # GroupNorm 1e-5 in ResBlocks, 1e-6 before the transformers; LayerNorm 1e-5: too small for the
    # parity test's unit-scale activations to show, so compared one by one
    from collections import Counter
    ours, ref, _, _ = tiny

    def eps(model):
        kinds = (torch.nn.GroupNorm, torch.nn.LayerNorm)
        return Counter((next(k.__name__ for k in kinds if isinstance(m, k)), m.eps) for m in model.modules()
                       if isinstance(m, kinds))
    assert eps(ours) == eps(ref)
    assert sum(n for (kind, e), n in eps(ours).items() if kind == "LayerNorm" and e == 1e-5) > 0


def test_scalar_timestep_and_bad_inputs(tiny):
    ours = tiny[0]
    x, _, ctx = inputs()
    with torch.no_grad():
        assert torch.equal(ours(x, 1, ctx), ours(x, torch.tensor([1.0, 1.0]), ctx))
        with pytest.raises(ValueError, match="multiple of 8"):
            ours(x[..., :12], 1, ctx)
        with pytest.raises(ValueError, match="multiple of 8"):  # height too, not only width
            ours(x[..., :12, :], 1, ctx)
        with pytest.raises(ValueError, match="x must be"):
            ours(x[:, :3], 1, ctx)
        with pytest.raises(ValueError, match="context must be"):  # batch 1 would silently mix rows
            ours(x, 1, ctx[:1])
        with pytest.raises(ValueError, match="context must be"):
            ours(x, 1, ctx[..., :16])
        with pytest.raises(ValueError, match="t must be"):
            ours(x, torch.ones(3), ctx)
        with pytest.raises(ValueError, match="map_blocks"):
            ours.features(x, 1, ctx, map_blocks=("down",))
    with pytest.raises(ValueError, match="multiple of 32"):
        UNet(UNetConfig(model_channels=48))
    with pytest.raises(ValueError, match="num_heads"):  # 32 channels in 3 heads: the heads would not fill the width
        UNet(UNetConfig(model_channels=32, num_heads=3, context_dim=32))
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNet(dataclasses.replace(SMALL, num_res_blocks=0))


@pytest.mark.parametrize("per_channel", [False, True])
def test_compiled_for_a_gpu_the_norms_still_give_diffusers_forward_and_gradients(tiny, monkeypatch, gpu_norm_ways,
                                                                                  per_channel):
    # every GroupNorm32 normalising in x's layout (vpd/norm.py), as the UNet compiles them for a GPU, with
    # statistics per group (this small) or per channel (from PER_CHANNEL_PIXELS up), taken here on the CPU:
    # the output, and the gradient it hands the input, are still diffusers'
    from vpd import norm
    ours, ref, _, _ = tiny
    if per_channel:
        monkeypatch.setattr(norm, "PER_CHANNEL_PIXELS", 1)
    x, t, ctx = inputs()
    x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = ours(got_x, t, ctx)
    want = ref(want_x, t, encoder_hidden_states=ctx).sample
    got.backward(grad), want.backward(grad)
    assert gpu_norm_ways == [per_channel] * sum(isinstance(m, torch.nn.GroupNorm) for m in ours.modules())
    assert gpu_norm_ways
    assert (got - want).abs().max() <= 1e-4 * want.std()
    assert (got_x.grad - want_x.grad).abs().max() <= 1e-4 * want_x.grad.std()


def test_channels_last(tiny):
    ours = tiny[0]
    x, t, ctx = inputs()
    with torch.no_grad():
        want = ours(x, t, ctx)
        ours.to(memory_format=torch.channels_last)
        try:
            got = ours(x.to(memory_format=torch.channels_last), t, ctx)
            feats, _ = ours.features(x.to(memory_format=torch.channels_last), t, ctx)
        finally:
            ours.to(memory_format=torch.contiguous_format)
    assert (got - want).abs().max() <= 1e-5 * want.std()
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in [got, *feats])


class RecordCrossAttention:
    """A diffusers attention processor that leaves the output to diffusers' own AttnProcessor and
    records softmax(QK^T * scale) averaged over heads for cross-attention calls."""

    def __init__(self, name, store):
        from diffusers.models.attention_processor import AttnProcessor
        self.name, self.store, self.inner = name, store, AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kw):
        if encoder_hidden_states is not None:
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, k)  # (B*heads, L, N)
            self.store.append((self.name, probs.view(hidden_states.shape[0], attn.heads, *probs.shape[1:]).mean(1)))
        return self.inner(attn, hidden_states, encoder_hidden_states, **kw)


def reference_features(ref, x, t, ctx, groups, fraction):
    """Features via hooks on diffusers' up blocks, maps via RecordCrossAttention, selected and
    averaged per resolution the VPD way. -> (feats, maps, number of attn2 layers kept)"""
    feats, records = {}, []
    hooks = []
    for i in (1, 4, 7, 11):  # ldm output_blocks.i = up_blocks[i // 3], layer i % 3
        up = ref.up_blocks[i // 3]
        mod = up.attentions[i % 3] if hasattr(up, "attentions") else up.resnets[i % 3]
        hooks.append(mod.register_forward_hook(
            lambda m, a, out, i=i: feats.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
    original = dict(ref.attn_processors)
    ref.set_attn_processor({name: RecordCrossAttention(name, records) for name in ref.attn_processors})
    try:
        with torch.no_grad():
            ref(x, t, encoder_hidden_states=ctx)
    finally:
        for h in hooks:
            h.remove()
        ref.set_attn_processor(original)
    group_of = {"down_blocks": "input", "mid_block": "middle", "up_blocks": "output"}
    H, W = x.shape[-2:]
    by_size = {}
    for name, probs in records:
        f = next(f for f in (1, 2, 4, 8) if (H // f) * (W // f) == probs.shape[1])
        h, w = H // f, W // f
        if group_of[name.split(".")[0]] in groups and h * w <= fraction * H * W:
            by_size.setdefault((h, w), []).append(probs.transpose(1, 2).reshape(B, N, h, w))
    maps = {k: sum(v) / len(v) for k, v in by_size.items()}
    return [feats[i] for i in (11, 7, 4, 1)], maps, sum(len(v) for v in by_size.values())


class CountAttention(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.sdpa = self.softmax = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        self.sdpa += name == "scaled_dot_product_attention"
        self.softmax += name == "softmax"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("groups,fraction,sizes", [
    (("input", "output"), 0.25, {(8, 12), (4, 6)}),  # VPD's default: 1/2 and 1/4 of the latent
    (("input", "middle", "output"), 1.0, {(16, 24), (8, 12), (4, 6), (2, 3)}),
    (("middle",), 0.25, {(2, 3)}),
    (("input",), 0.25, {(8, 12), (4, 6)}),  # each group alone: the encoder's maps only, then the decoder's
    (("output",), 0.25, {(8, 12), (4, 6)}),
])
def test_features_and_maps_match_diffusers(tiny, groups, fraction, sizes):
    ours, ref, _, _ = tiny
    x, t, ctx = inputs()
    want_feats, want_maps, n_kept = reference_features(ref, x, t, ctx, groups, fraction)
    head_calls = []
    hooks = [m.register_forward_hook(lambda *a: head_calls.append(1)) for m in ours.out.modules()]
    counter = CountAttention()
    try:
        with torch.no_grad(), counter:
            feats, maps = ours.features(x, t, ctx, map_blocks=groups, map_max_fraction=fraction)
    finally:
        for h in hooks:
            h.remove()
    assert head_calls == []  # the `out` head is never computed
    assert [f.shape[1:] for f in feats] == [(32, 16, 24), (64, 8, 12), (128, 4, 6), (128, 2, 3)]
    for got, want in zip(feats, want_feats):
        assert (got - want).abs().max() <= 1e-4 * want.std()
    assert set(maps) == set(want_maps) == sizes
    for size, m in maps.items():
        assert m.shape == (B, N, *size)
        torch.testing.assert_close(m, want_maps[size], rtol=0, atol=1e-5)
        torch.testing.assert_close(m.sum(1), torch.ones(B, *size), rtol=0, atol=1e-5)
    # explicit softmax only in the kept attn2 layers; every other attention runs on SDPA
    assert counter.softmax == n_kept and counter.sdpa == len(ref.attn_processors) - n_kept


def test_feature_defaults_are_vpds_and_a_group_may_be_named_alone(tiny):
    # defaults: encoder and decoder maps of at most 1/4 of the latent (VPD's 1/2 and 1/4 sizes)
    ours, ref, _, _ = tiny
    x, t, ctx = inputs()
    _, want_maps, _ = reference_features(ref, x, t, ctx, ("input", "output"), 0.25)
    _, want_mid, _ = reference_features(ref, x, t, ctx, ("middle",), 1.0)
    with torch.no_grad():
        _, maps = ours.features(x, t, ctx)
        _, mid = ours.features(x, t, ctx, map_blocks="middle", map_max_fraction=1.0)
    for got, want in ((maps, want_maps), (mid, want_mid)):
        assert set(got) == set(want)
        for size, m in got.items():
            torch.testing.assert_close(m, want[size], rtol=0, atol=1e-5)
    assert set(maps) == {(8, 12), (4, 6)} and set(mid) == {(2, 3)}


def test_bfloat16_weights_and_inputs(tiny):
    # a bf16 model on bf16 inputs (no autocast): runs, stays near the float32 reference, and gives
    # features and maps in bf16
    _, ref, _, path = tiny
    half = UNet.from_checkpoint(path, TINY, dtype=torch.bfloat16).eval()
    x, t, ctx = inputs()
    layer_maps = {}  # every attn2's float32 map by size, to average by hand

    def record(m, a, out):
        if out[1] is not None:
            L = out[1].shape[1]
            hw = next((h, w) for h, w in [(16, 24), (8, 12), (4, 6), (2, 3)] if h * w == L)
            layer_maps.setdefault(hw, []).append(out[1].transpose(1, 2).reshape(B, N, *hw))
    hooks = [m.register_forward_hook(record) for n, m in half.named_modules() if n.endswith("attn2")]
    try:
        with torch.no_grad():
            want = ref(x, t, encoder_hidden_states=ctx).sample
            got = half(x.bfloat16(), t, ctx.bfloat16())
            feats, maps = half.features(x.bfloat16(), t, ctx.bfloat16())
    finally:
        for h in hooks:
            h.remove()
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 0.1 * want.std()
    assert all(f.dtype == torch.bfloat16 for f in feats)
    assert set(maps) == {(8, 12), (4, 6)} and all(m.dtype == torch.bfloat16 for m in maps.values())
    # the layers' maps are averaged in float32 and rounded to bf16 once, not rounded one by one first
    assert all(m.dtype == torch.float32 for ms in layer_maps.values() for m in ms)
    for size, m in maps.items():
        assert torch.equal(m, torch.stack(layer_maps[size]).mean(0).bfloat16())


def test_norm_and_attention_precision_under_autocast():
    # GroupNorm32 normalises in float32 and hands back the input's dtype; attention maps come out of
    # a float32 softmax (rows sum to 1 to float32 precision) even when autocast runs the matmuls in bf16
    from vpd.unet import CrossAttention, GroupNorm32
    g = torch.Generator().manual_seed(0)
    norm = GroupNorm32(64)
    x = torch.randn(2, 64, 4, 4, generator=g).bfloat16()
    seen = []

    class GroupNormDtype(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "group_norm":
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with GroupNormDtype():
        y = norm(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_auto = norm(x)
    assert y.dtype == y_auto.dtype == torch.bfloat16 and seen == [torch.float32] * 2
    want = torch.nn.functional.group_norm(x.double(), 32, eps=1e-5)
    assert (y.double() - want).abs().max() <= 2 ** -7 * want.abs().max()

    attn = CrossAttention(64, 32, heads=2, dim_head=32)
    q_in, c = torch.randn(2, 12, 64, generator=g), torch.randn(2, N, 32, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, probs = attn(q_in, c, keep_map=True)
    assert out.dtype == torch.bfloat16 and probs.dtype == torch.float32 and probs.shape == (2, 12, N)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 12), rtol=0, atol=1e-6)


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_group_norm_normalises_with_its_own_epsilon(eps):
    # eps is what the SpatialTransformer (1e-6) and ResBlock (1e-5) norms differ by; on activations
    # whose variance is near eps the two give visibly different outputs, so each must use its own
    from vpd.unet import GroupNorm32
    g = torch.Generator().manual_seed(0)
    norm, want = GroupNorm32(64, eps=eps), torch.nn.GroupNorm(32, 64, eps=eps)
    with torch.no_grad():
        for p, q in zip(norm.parameters(), want.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
            q.copy_(p)
    x = 1e-3 * torch.randn(2, 64, 4, 4, generator=g)  # variance 1e-6
    with torch.no_grad():
        torch.testing.assert_close(norm(x), want(x), rtol=1e-5, atol=1e-5)


def test_fresh_model_zero_initialises_like_ldm():
    # ldm's zero_module: a freshly built UNet (no checkpoint) predicts exactly zero noise, each ResBlock
    # starts as its skip connection and each SpatialTransformer as the identity
    from vpd.unet import ResBlock, SpatialTransformer
    g = torch.Generator().manual_seed(0)
    model = UNet(SMALL).eval()
    x, t, ctx = inputs(8, 16)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), torch.zeros_like(x))
        emb = torch.randn(B, 4 * SMALL.model_channels, generator=g)
        blocks = [m for m in model.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
        assert len(blocks) == 8 + 7  # ResBlocks, SpatialTransformers
        for m in blocks:
            c = m.in_layers[2].in_channels if isinstance(m, ResBlock) else m.proj_in.in_channels
            h = torch.randn(B, c, 4, 8, generator=g)
            if isinstance(m, ResBlock):
                assert torch.equal(m(h, emb), m.skip_connection(h))
            else:
                assert torch.equal(m(h, ctx)[0], h)


def test_decoder_block_empties_its_input_list(tiny):
    # the joined (input, skip) list is cleared, so the caller's list drops both maps during the block
    ours = tiny[0]
    emb = torch.randn(1, 4 * TINY.model_channels)
    parts = [torch.randn(1, 128, 2, 3), torch.randn(1, 128, 2, 3)]
    with torch.no_grad():
        out, _ = ours.output_blocks[0](parts, emb, torch.randn(1, N, TINY.context_dim))
    assert parts == [] and out.shape == (1, 128, 2, 3)


def test_decoder_inputs_are_freed_once_joined(tiny):
    # inside a decoder block only the joined map is alive: the previous block's output and the skip
    # it was joined with are gone by the time the block's first layer runs (no frame keeps them)
    ours = tiny[0]
    x, t, ctx = inputs()
    refs, alive = {}, []
    j = 5  # an output block whose input (output block 4) and skip (input block 6) are not features
    hooks = [ours.output_blocks[j - 1].register_forward_hook(lambda m, a, out: refs.update(h=weakref.ref(out[0]))),
             ours.input_blocks[len(ours.input_blocks) - 1 - j].register_forward_hook(
                 lambda m, a, out: refs.update(skip=weakref.ref(out[0]))),
             ours.output_blocks[j][0].register_forward_pre_hook(
                 lambda m, a: alive.append((refs["h"]() is not None, refs["skip"]() is not None)))]
    try:
        with torch.no_grad():
            ours(x, t, ctx)
    finally:
        for h in hooks:
            h.remove()
    assert alive == [(False, False)]


def test_no_maps_and_map_gradients(tiny):
    ours = tiny[0]
    x, t, ctx = inputs()
    counter = CountAttention()
    with torch.no_grad(), counter:
        feats, maps = ours.features(x, t, ctx, map_blocks=())
    assert maps == {} and len(feats) == 4 and counter.softmax == 0 and counter.sdpa == 32
    _, maps = ours.features(x, t, ctx)
    assert all(not m.requires_grad for m in maps.values())  # detached by default, as VPD trains
    _, maps = ours.features(x, t, ctx, detach_maps=False)
    maps[(8, 12)].pow(2).sum().backward()
    q = ours.output_blocks[6][1].transformer_blocks[0].attn2.to_q.weight  # an 8x12 decoder attn2
    assert q.grad is not None and q.grad.abs().sum() > 0
    ours.zero_grad(set_to_none=True)


def test_ckpt_file_loads(tiny, tmp_path):
    ours, _, state, _ = tiny
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": {**state, "betas": torch.zeros(3)}, "global_step": 1}, path)
    loaded = UNet.from_checkpoint(path, TINY)
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    half = UNet.from_checkpoint(path, TINY, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_ema_weights_are_preferred_when_the_file_has_both(tiny, tmp_path):
    # v1-5-pruned holds the training weights under model.diffusion_model.* and their EMA under
    # model_ema.<name without dots> (ldm's LitEma); -emaonly holds the EMA as model.diffusion_model.*
    ours, _, state, _ = tiny
    ema = random_state(TINY, seed=7)
    both = {**state, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5),
            **{"model_ema." + k.removeprefix("model.").replace(".", ""): v for k, v in ema.items()}}
    save_file(both, tmp_path / "pruned.safetensors")
    loaded = UNet.from_checkpoint(tmp_path / "pruned.safetensors", TINY)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[PREFIX + k]), k
    training = UNet.from_checkpoint(tmp_path / "pruned.safetensors", TINY, ema=False)
    for k, v in training.state_dict().items():
        assert torch.equal(v, state[PREFIX + k]), k
    del both["model_ema.diffusion_modelout2bias"]
    save_file(both, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \(1\): out.2.bias"):
        UNet.from_checkpoint(tmp_path / "partial.safetensors", TINY)


def test_checkpoint_errors(tiny, tmp_path):
    _, _, state, _ = tiny
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        UNet.from_checkpoint(tmp_path / "nowhere.safetensors", TINY)

    key = PREFIX + "input_blocks.4.0.in_layers.2.weight"
    bad = {**state, key: torch.zeros(64, 32, 3, 1)}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="input_blocks.4.0.in_layers.2.weight") as e:
        UNet.from_checkpoint(tmp_path / "bad.safetensors", TINY)
    assert "2.x" not in str(e.value)
    model = UNet(TINY)  # a failed load leaves a live model as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_checkpoint(model, tmp_path / "bad.safetensors", PREFIX, TINY)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    sd2 = random_state(UNetConfig(model_channels=32, num_heads=2, context_dim=1024))  # SD 2.x context width
    save_file(sd2, tmp_path / "sd2.safetensors")
    with pytest.raises(CheckpointError, match=r"Stable Diffusion 2\.x.*SD v1"):
        UNet.from_checkpoint(tmp_path / "sd2.safetensors", TINY)
    # a 1024-wide config asked for that width: a bad tensor there is reported as itself, not as SD 2.x
    wide = UNetConfig(model_channels=32, num_heads=2, context_dim=1024)
    with pytest.raises(CheckpointError, match="input_blocks.4.0.in_layers.2.weight") as e:
        UNet.from_checkpoint({**sd2, key: torch.zeros(64, 32, 3, 1)}, wide)
    assert "2.x" not in str(e.value)


def test_no_graph_breaks():
    ours = UNet.from_checkpoint(random_state(SMALL), SMALL).eval()
    x, t, ctx = inputs(8, 16)
    torch._dynamo.reset()
    for fn, args in [(ours, (x, t, ctx)), (ours.features, (x, 1, ctx))]:
        report = torch._dynamo.explain(fn)(*args)
        assert report.graph_break_count == 0, report.break_reasons
        assert report.graph_count == 1
    torch._dynamo.reset()


def test_grad_checkpointing_same_gradients():
    model = UNet.from_checkpoint(random_state(SMALL), SMALL).train()
    x, t, ctx = inputs(8, 16)
    calls = []
    model.input_blocks[1].register_forward_pre_hook(lambda *a: calls.append(1))
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        calls.clear()
        model.zero_grad(set_to_none=True)
        feats, maps = model.features(x, t, ctx, detach_maps=False)
        assert list(maps) == [(4, 8)]
        loss = model(x, t, ctx).pow(2).mean() + sum(f.mean() for f in feats) + sum(m.pow(2).mean() for m in maps.values())
        loss.backward()
        assert len(calls) == (4 if flag else 2)  # two passes, each recomputed when checkpointing
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-5, atol=1e-6, msg=k)
    model.eval()  # checkpointing is for training only: in eval the backward recomputes nothing
    calls.clear()
    model(x, t, ctx).pow(2).mean().backward()
    assert len(calls) == 1


def test_forward_holds_no_more_tensor_memory_than_diffusers(tiny):
    # exact peak of live activation bytes (bench.TensorPeak), not RSS: allocator-independent, so
    # a decoder that kept its joined skip input alive through a whole block would show here
    from bench import TensorPeak
    ours, ref, _, _ = tiny
    x, t, ctx = inputs(32, 32)
    peaks = []
    for f in (lambda: ours(x, t, ctx), lambda: ref(x, t, encoder_hidden_states=ctx).sample):
        with torch.no_grad(), TensorPeak() as tp:
            f()
        peaks.append(tp.peak)
    assert 0 < peaks[0] <= peaks[1], peaks
