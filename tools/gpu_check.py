"""GPU checks that a CPU cannot make: flash attention on SD's head sizes, bf16 autocast and
torch.compile of the UNet's features and maps against the fp32 eager result, and a compiled bf16
semseg training step (finite loss, UNet gradients, no VAE gradients).

    PYTHONPATH=. python tools/gpu_check.py   # one line per check; exits non-zero on a failure
"""
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vpd.model import build_model
from vpd.unet import UNet, UNetConfig


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(ok, what):
    """A failed check ends the run with its name (not an assert: `python -O` would skip those)."""
    if not ok:
        raise SystemExit(f"GPU CHECK FAILED: {what}")


def main():
    check(torch.cuda.is_available(), "no CUDA device")
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    torch.manual_seed(0)
    unet = UNet(UNetConfig()).to(dev).eval()
    for p in unet.parameters():  # ldm zero-initialises some output layers: give every layer a signal
        if p.ndim > 1:
            p.data.normal_(0, 0.02)
    x, ctx = torch.randn(2, 4, 64, 64, device=dev), torch.randn(2, 77, 768, device=dev)
    with torch.no_grad():
        ref_feats, ref_maps = unet.features(x, 1, ctx)
        ref_out = unet(x, 1, ctx)
        # head dims 40/80/160: the flash kernel must accept all of them (it raises if it cannot run)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", torch.bfloat16):
            out = unet(x, 1, ctx)
        print(f"flash attention bf16 forward: rel err vs fp32 {rel_err(out, ref_out):.2e}", flush=True)
        # bf16 rounding through ~25 layers gives ~1e-2; a wrong kernel ~1
        check(rel_err(out, ref_out) < 0.1, "flash attention bf16 forward against fp32")
        with torch.autocast("cuda", torch.bfloat16):
            feats, maps = unet.features(x, 1, ctx)
        errs = [rel_err(a, b) for a, b in zip(feats, ref_feats)] + [rel_err(maps[k], ref_maps[k]) for k in ref_maps]
        print(f"bf16 features + maps: max rel err {max(errs):.2e}", flush=True)
        check(max(errs) < 0.1, "bf16 features and maps against fp32")
        t = time.time()
        compiled = torch.compile(unet.features)
        with torch.autocast("cuda", torch.bfloat16):
            cfeats, cmaps = compiled(x, 1, ctx)
        errs = [rel_err(a, b) for a, b in zip(cfeats, ref_feats)] + [rel_err(cmaps[k], ref_maps[k]) for k in ref_maps]
        print(f"compiled bf16 features: max rel err {max(errs):.2e} (compile {time.time() - t:.0f} s)", flush=True)
        check(max(errs) < 0.1, "compiled bf16 features and maps against fp32")
    del unet, compiled

    # the full semseg model: bf16 + compile forward/backward, gradient where it belongs
    model = build_model("semseg", class_embeddings=torch.randn(150, 768)).to(dev).train()
    for p in model.backbone.unet.parameters():  # as above: no zero-initialised layer blocking gradients
        if p.ndim > 1:
            p.data.normal_(0, 0.02)
    images, label = torch.rand(2, 3, 512, 512, device=dev) * 2 - 1, torch.randint(0, 150, (2, 512, 512), device=dev)
    step = torch.compile(model)
    t = time.time()
    with torch.autocast("cuda", torch.bfloat16):
        loss = model.loss(step(images), label)
    loss.backward()
    torch.cuda.synchronize()
    g_unet = model.backbone.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight.grad
    check(torch.isfinite(loss).item(), f"compiled bf16 semseg step: loss {loss.item()}")
    check(g_unet is not None and g_unet.abs().sum() > 0, "compiled bf16 semseg step: no UNet gradient")
    check(all(p.grad is None for p in model.backbone.vae.parameters()), "compiled bf16 semseg step: VAE gradients")
    print(f"compiled bf16 semseg step: loss {loss.item():.3f}, UNet grads ok, VAE frozen "
          f"(first step incl. compile {time.time() - t:.0f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)")
    print("GPU CHECKS PASSED")


if __name__ == "__main__":
    main()
