"""The VAE against the real SD v1.5 tensor list and against diffusers' AutoencoderKL as a reference."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vpd.checkpoint import CheckpointError
from vpd import norm as norm_module
from vpd.vae import VAE, DiagonalGaussian, VAEConfig

SD15 = Path(__file__).resolve().parents[1].parent / "shared" / "sd15_tensors.json"
PREFIX = "first_stage_model."
TINY = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=2, z_channels=4, embed_dim=4)


def test_full_config_matches_sd15_tensor_list():
    ref = json.loads(SD15.read_text())["shapes"]
    ref = {k[len(PREFIX):]: v for k, v in ref.items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        vae = VAE(VAEConfig())
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert ours == ref
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    cfg = json.loads(SD15.read_text())["configs"]["vae"]  # ldm's first_stage_config ddconfig + embed_dim
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in vars(VAEConfig()).items()} == {
        k: cfg[k] for k in vars(VAEConfig())}


def random_ldm_state(cfg, seed=0):
    """Random weights in the ldm file layout; norms get random affine params too so none is a no-op."""
    torch.manual_seed(seed)
    vae = VAE(cfg)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return {PREFIX + k: v.clone() for k, v in vae.state_dict().items()}


def diffusers_vae(cfg, state):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    n = len(cfg.ch_mult)
    config = dict(in_channels=cfg.in_channels, out_channels=cfg.out_ch,
                  down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                  block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                  latent_channels=cfg.embed_dim, norm_num_groups=32)
    ref = AutoencoderKL(**config)
    ref.load_state_dict(convert_ldm_vae_checkpoint(state, config), strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(ldm state, safetensors path, image, reference posterior mean, logvar, decoded image)."""
    state = random_ldm_state(TINY)
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    save_file(state, path)
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square, /8
    ref = diffusers_vae(TINY, state)
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        dec = ref.decode(post.mean).sample
    return state, path, x, post.mean, post.logvar, dec


def close(a, b):
    assert a.shape == b.shape
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= 1e-4 * scale, f"max abs err {err:.3g} vs output scale {scale:.3g}"


def test_parity_with_diffusers(tiny):
    state, path, x, mean, logvar, dec = tiny
    vae = VAE.from_checkpoint(path, TINY).eval()
    with torch.no_grad():
        post = vae.encode(x)
        assert post.mean.shape == (2, 4, 3, 5)
        close(post.mean, mean)
        close(post.logvar, logvar)
        close(post.mode(), mean)
        close(vae.decode(post.mean), dec)
        out, _ = vae(x)  # the posterior's mode by default, as AutoencoderKL's sample_posterior=False
        close(out, dec)


def test_linear_attention_weights_load(tiny, tmp_path):
    state, _, x, mean, logvar, dec = tiny
    attn = [k for k in state if ".attn_1." in k and k.endswith("weight") and state[k].ndim == 4]
    assert len(attn) == 8  # q, k, v, proj_out in encoder and decoder
    linear = {k: (v[:, :, 0, 0].contiguous() if k in attn else v) for k, v in state.items()}
    save_file(linear, tmp_path / "linear.safetensors")
    vae = VAE.from_checkpoint(tmp_path / "linear.safetensors", TINY)
    assert vae.encoder.mid.attn_1.q.weight.shape == (64, 64, 1, 1)
    with torch.no_grad():
        post = vae.encode(x)
        close(post.mean, mean)
        close(vae.decode(post.mean), dec)


def test_encoder_only(tiny):
    state, path, x, mean, logvar, _ = tiny
    vae = VAE.from_checkpoint(path, TINY, decoder=False)
    assert not any(k.startswith("decoder.") for k in vae.state_dict())
    assert "quant_conv.weight" in vae.state_dict() and "post_quant_conv.weight" in vae.state_dict()
    with torch.no_grad():
        close(vae.encode(x).mean, mean)
    with pytest.raises(RuntimeError, match="decoder=False"):
        vae.decode(mean)


def test_load_dtype(tiny):
    _, path, x, mean, *_ = tiny
    vae = VAE.from_checkpoint(path, TINY, decoder=False, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
    with torch.no_grad():
        got = vae.encode(x.bfloat16()).mean
    assert got.dtype == torch.bfloat16
    assert (got.float() - mean).abs().max() <= 0.05 * mean.abs().max()


def test_compiled_for_a_gpu_the_encoder_still_gives_diffusers_posterior(tiny, monkeypatch, gpu_norm_ways):
    # its norms gathering their statistics per channel (vpd/norm.py), taken here on the CPU at every size
    _, path, x, mean, logvar, _ = tiny
    vae = VAE.from_checkpoint(path, TINY, decoder=False).eval()
    monkeypatch.setattr(norm_module, "PER_CHANNEL_PIXELS", 0)
    with torch.no_grad():
        post = vae.encode(x.to(memory_format=torch.channels_last))
    assert gpu_norm_ways == [True] * sum(isinstance(m, torch.nn.GroupNorm) for m in vae.modules())
    assert gpu_norm_ways
    close(post.mean, mean)
    close(post.logvar, logvar)


def test_embed_dim_differs_from_z_channels():
    # ldm's AutoencoderKL: quant_conv maps the encoder's 2*z_channels moments to 2*embed_dim, so the
    # posterior and decode() are in embed_dim channels; post_quant_conv takes them back to z_channels
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=6)
    vae = VAE(cfg).eval()
    with torch.no_grad():
        post = vae.encode(torch.zeros(1, 3, 16, 16))
        assert post.mean.shape == post.logvar.shape == (1, 6, 8, 8)
        assert vae.decode(post.mean).shape == (1, 3, 16, 16)
        with pytest.raises(ValueError, match="expects"):
            vae.decode(torch.zeros(1, 4, 8, 8))


def test_posterior_clamp_and_sample():
    moments = torch.randn(1, 8, 2, 3)
    moments[:, 4:, 0, 0] = 50.0  # logvar beyond ldm's clamp
    moments[:, 4:, 1, 1] = -50.0
    post = DiagonalGaussian(moments)
    torch.testing.assert_close(post.mean, moments[:, :4])
    assert torch.all(post.logvar[:, :, 0, 0] == 20.0) and torch.all(post.logvar[:, :, 1, 1] == -30.0)
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
    noise = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(post.sample(torch.Generator().manual_seed(7)), post.mean + post.std * noise)


def test_bad_inputs(tiny, tmp_path):
    state, path, *_ = tiny
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        VAE.from_checkpoint(tmp_path / "nope.safetensors", TINY)
    bad = dict(state)
    bad[PREFIX + "encoder.conv_in.weight"] = torch.zeros(32, 3, 5, 5)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"encoder\.conv_in\.weight"):
        VAE.from_checkpoint(tmp_path / "bad.safetensors", TINY)
    vae = VAE(TINY, decoder=False)
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 3, 16, 20))
    with pytest.raises(ValueError, match="multiple of 8"):  # height too, not only width
        vae.encode(torch.zeros(1, 3, 20, 16))
    with pytest.raises(ValueError, match="expects"):
        VAE(TINY).decode(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="expects"):
        vae.encode(torch.zeros(1, 1, 16, 16))
