"""VPD: Stable Diffusion v1.5's UNet as a backbone for dense visual perception."""
