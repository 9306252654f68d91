"""The demo world: tiny SD networks with random weights, saved in the real SD checkpoint layout.

`train.py --demo` and the tests write such a file and then take exactly the code path a real
`v1-5-pruned-emaonly.safetensors` takes; only the configs are small.
"""
import os

import torch
from safetensors.torch import save_file

from vpd.clip import PREFIX as clip_prefix
from vpd.clip import CLIPConfig, CLIPTextModel
from vpd.trained import write_atomic
from vpd.unet import PREFIX as unet_prefix
from vpd.unet import UNet, UNetConfig
from vpd.vae import PREFIX as vae_prefix
from vpd.vae import VAE, VAEConfig


TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1, num_heads=4, context_dim=32)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
TINY_CLIP = CLIPConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def write_random_sd(path, seed=0, unet=TINY_UNET, vae=TINY_VAE, clip=TINY_CLIP):
    """Random-weight UNet, VAE and CLIP text encoder as one SD v1 `.safetensors` file (written once)."""
    if os.path.isfile(path):
        return path
    state = {}
    with torch.random.fork_rng(devices=[]):  # the caller's random stream goes on as if the file had existed
        torch.manual_seed(seed)
        for prefix, module in ((unet_prefix, UNet(unet)), (vae_prefix, VAE(vae)), (clip_prefix, CLIPTextModel(clip))):
            state.update({prefix + k: v.contiguous() for k, v in module.state_dict().items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(lambda p: save_file(state, p), path)  # a crash leaves no half file (nor a temporary) behind
    return path


def wake_zero_weights_(module, generator, std=None):
    """Random values N(0, std) for the weights SD initialises to zero (ldm's zero_module convs, head
    outputs), so every path of a random model carries signal and gradient; std defaults to
    1/sqrt(fan_in)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * (std or p[0].numel() ** -0.5))
    return module
