"""Where the UNet's time goes and which kernels suit it on this GPU, in a minute or two.

Runs the UNet once on the meta device to list the shapes of its attention, convolution and linear
layers at the given size, then times each distinct shape forward + backward, eagerly:
  attention   every SDPA kernel that takes the shape (flash, efficient, cuDNN, math)
  convolution (NHWC, as --channels-last) cuDNN's default choice, then with cudnn.benchmark (autotuned per shape)
  linear      the default matmul (cuBLAS: no choice to make, timed for its share)
and sums the times over the UNet's layers. Each shape is timed alone, so the sums leave out what runs
between these kernels (norms, activations, residual adds, copies): set against the UNet's measured
step, the rest is that elementwise work; and the rows show what a kernel choice could gain. TFLOP/s: 3x the forward's
FLOPs (two backward matmuls per forward one), as vpd/flops.py counts them, at the row's fastest kernel.
Every attention layer is timed as SDPA, also the few whose maps VPD keeps (an explicit softmax there).
A self-attention's q/k/v projections are one linear, as vpd/unet.py runs them (the three weights joined).
Last, the frozen VAE encoder's one attention layer (a single head 512 wide), forward only: each SDPA
kernel that takes it, and written out (two matrix products around a softmax; faster, but its scores
are rounded to bf16 between them). And the group norms, each way of computing them (NORM_WAYS:
F.group_norm, and `group_norm_in_layout` in vpd/norm.py from statistics per group or per channel), each
shape compiled (the only rows that compile: the question is the code inductor writes for them), on NHWC
inputs:
  UNet  norm, SiLU and a 1x1 convolution, forward + backward: what F.group_norm's NCHW output and
        gradient cost the convolution's backward (cuDNN copies them to NHWC) is in the time
  VAE   norm and SiLU, forward only (the VAE is frozen)

    python bench_kernels.py --batch 16 --res 512                       # bf16, SD v1.5, on the GPU
    python bench_kernels.py --batch 16 --res 512 --which unet_norm,vae_norm   # the group norms alone
    python bench_kernels.py --device cpu --size tiny --dtype fp32 --res 64 --iters 2
"""
import argparse
import json
import math
import statistics
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import check_json_path, sync, timed
from eval import count
from vpd.demo import TINY_UNET, TINY_VAE
from vpd.flops import conv_macs
from vpd.unet import CrossAttention, UNet, UNetConfig
from vpd.norm import GroupNorm32, group_norm_in_layout
from vpd.vae import VAE, VAEConfig

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
NORM_WAYS = ("native", "per-group", "per-channel")  # F.group_norm; `group_norm_in_layout`'s two ways
SECTIONS = ("attention", "conv", "linear", "vae_attention", "unet_norm", "vae_norm")  # bench_kernels.py --which


def group_norm(x, norm, how):
    """A group norm of x, one of the NORM_WAYS."""
    if how == "native":
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return group_norm_in_layout(x, norm, per_channel=how == "per-channel")


def layer_shapes(cfg, batch, res, n_text):
    """Counters of the UNet's attention shapes (B, heads, Lq, Lk, d), convolutions (input shape,
    weight shape, stride, padding) and linears (input shape, weight shape) at a res x res image."""
    with torch.device("meta"):
        unet = UNet(cfg)
        x = torch.empty(batch, cfg.in_channels, res // 8, res // 8)
        context = torch.empty(batch, n_text, cfg.context_dim)
    attn, conv, linear = Counter(), Counter(), Counter()

    def on_attention(module, args, kwargs):
        x, context = args[0], kwargs.get("context", args[1] if len(args) > 1 else None)
        lk = x.shape[1] if context is None else context.shape[1]
        attn[(x.shape[0], module.heads, x.shape[1], lk, module.to_q.out_features // module.heads)] += 1
        if context is None:  # q, k and v as one linear on the weights joined, not the three modules
            linear[(tuple(x.shape), (3 * module.to_q.out_features, x.shape[-1]))] += 1

    def on_conv(module, args):
        conv[(tuple(args[0].shape), tuple(module.weight.shape), module.stride, module.padding)] += 1

    def on_linear(module, args):
        linear[(tuple(args[0].shape), tuple(module.weight.shape))] += 1

    for m in unet.modules():
        if isinstance(m, CrossAttention):
            m.register_forward_pre_hook(on_attention, with_kwargs=True)
        elif isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(on_conv)
        elif isinstance(m, nn.Linear):
            m.register_forward_pre_hook(on_linear)
    unet(x, torch.ones(batch), context)
    return attn, conv, linear


def timer(device, fn, iters, warmup):
    """Median ms of fn() over `iters` calls after `warmup`; None when the kernel refuses the inputs."""
    try:
        fn()  # also the first call's setup (cuDNN autotuning): never timed
    except RuntimeError:  # "No available kernel": this backend does not take the shape
        return None
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(timed(fn, device) * 1e3 for _ in range(iters))


def attention_step(shape, dtype, device, backend):
    B, heads, lq, lk, d = shape
    q = torch.randn(B, heads, lq, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, heads, lk, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn(B, heads, lq, d, device=device, dtype=dtype)

    def step():
        q.grad = k.grad = v.grad = None  # a fresh gradient each time, as in training: no accumulating add
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v)
        out.backward(grad)  # the backward kernel is the forward's: no need to hold the context here
    return step


def conv_step(shape, dtype, device):
    """A convolution of an NHWC input, forward + backward."""
    x_shape, w_shape, stride, padding = shape
    fmt = torch.channels_last
    x = torch.randn(x_shape, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()
    w = torch.randn(w_shape, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()
    out = F.conv2d(x, w, stride=stride, padding=padding)
    grad = torch.randn_like(out)

    def step():
        x.grad = w.grad = None
        F.conv2d(x, w, stride=stride, padding=padding).backward(grad)
    return step


def linear_step(shape, dtype, device):
    x_shape, w_shape = shape
    x = torch.randn(x_shape, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(w_shape, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(*x_shape[:-1], w_shape[0], device=device, dtype=dtype)

    def step():
        x.grad = w.grad = None
        F.linear(x, w).backward(grad)
    return step


def vae_attention_step(shape, dtype, device, how):
    """The VAE encoder's attention (B, 1 head, L, L, d), forward without gradient (the VAE is frozen):
    an SDPA kernel (a key of BACKENDS), or "explicit": the scores written out, a softmax, a product."""
    B, L, d = shape
    q, k, v = (torch.randn(B, 1, L, d, device=device, dtype=dtype) for _ in range(3))

    def step():
        with torch.no_grad():
            if how == "explicit":
                return ((q * d ** -0.5) @ k.transpose(-1, -2)).softmax(dim=-1) @ v
            with sdpa_kernel(BACKENDS[how]):
                return F.scaled_dot_product_attention(q, k, v)
    return step


def norm_input_shapes(module, *inputs):
    """A Counter of the input shapes of `module`'s group norms in one forward of `inputs`."""
    shapes = Counter()
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            m.register_forward_pre_hook(lambda norm, args: shapes.update([tuple(args[0].shape)]))
    module(*inputs)
    return shapes


def unet_norm_shapes(cfg, batch, res, n_text):
    """A Counter of the input shapes of the UNet's group norms at a res x res image."""
    with torch.device("meta"):
        unet = UNet(cfg)
        x = torch.empty(batch, cfg.in_channels, res // 8, res // 8)
        context = torch.empty(batch, n_text, cfg.context_dim)
    return norm_input_shapes(unet, x, torch.ones(batch), context)


def unet_norm_steps(shape, dtype, device):
    """A UNet group norm (float32 within, as GroupNorm32), its SiLU and a 1x1 convolution on an NHWC input,
    compiled, forward + backward, each way on the same input, norm and convolution: {way: step} for each
    of NORM_WAYS, a step returning the input's gradient."""
    torch.compiler.reset()
    C = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
    norm = GroupNorm32(C).to(device)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    conv = nn.Conv2d(C, C, 1, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    grad = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)

    def make(how):
        @torch.compile(dynamic=False)
        def norm_silu_conv(x):
            return conv(F.silu(group_norm(x.float(), norm, how)).to(dtype))

        def step():
            x.grad = norm.weight.grad = norm.bias.grad = conv.weight.grad = conv.bias.grad = None
            norm_silu_conv(x).backward(grad)
            return x.grad
        return step
    return {how: make(how) for how in NORM_WAYS}


def vae_norm_shapes(cfg, batch, res):
    """A Counter of the input shapes of the VAE encoder's group norms at a res x res image."""
    with torch.device("meta"):
        encoder = VAE(cfg, decoder=False).encoder
        x = torch.empty(batch, cfg.in_channels, res, res)
    return norm_input_shapes(encoder, x)


def vae_norm_steps(shape, dtype, device):
    """The VAE encoder's group norm and SiLU on an NHWC input, compiled, forward without gradient, as the
    encoder runs them under autocast (float32 within, the next convolution's dtype out), each way on the
    same input and norm: {way: step} for each of NORM_WAYS, a step returning the output."""
    torch.compiler.reset()  # fresh graphs for each shape: the recompile limit would otherwise fall back to eager
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    norm = nn.GroupNorm(32, shape[1], eps=1e-6, device=device)
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)

    def make(how):
        @torch.compile(dynamic=False)
        def norm_silu(x):
            return F.silu(group_norm(x.float(), norm, how)).to(dtype)

        def step():
            with torch.no_grad():
                return norm_silu(x)
        return step
    return {how: make(how) for how in NORM_WAYS}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--res", type=count(64), default=512, help="image side (latent = res / 8)")
    p.add_argument("--batch", type=count(1), default=16)
    p.add_argument("--text", type=count(1), default=77, help="context tokens (77: bench.py's UNet rows; 150: "
                   "ADE20K's classes, the semseg model's context)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--iters", type=count(1), default=10)
    p.add_argument("--warmup", type=count(0), default=3)
    p.add_argument("--which", default=",".join(SECTIONS),
                   help=f"comma list of the sections to time: {', '.join(SECTIONS)}")
    p.add_argument("--json", default="", help="also write the rows and totals here")
    args = p.parse_args(argv)
    which = args.which.split(",")
    if not set(which) <= set(SECTIONS):
        raise SystemExit(f"--which {args.which}: sections are {', '.join(SECTIONS)}")
    if args.res % 64:
        raise SystemExit(f"--res {args.res}: the UNet takes multiples of 64")
    check_json_path(args.json)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible (--device cpu times the CPU's kernels)")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = UNetConfig() if args.size == "full" else TINY_UNET
    attn, conv, linear = layer_shapes(cfg, args.batch, args.res, args.text)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.size} UNet, {args.res}x{args.res}, batch {args.batch}, "
          f"{args.text} text tokens, {args.dtype}; ms per forward + backward, medians of {args.iters}")
    rows = []

    def report(kind, shape, label, n, flops, ms):
        best = min((t for t in ms.values() if t is not None), default=None)
        tflops = flops / best / 1e9 if best else float("nan")  # one layer's FLOPs in one layer's time
        rows.append(dict(kind=kind, shape=shape, count=n, gflop=n * flops / 1e9, ms=ms))
        print(f"{label:58} {n:>3} " + " ".join(f"{t:>9.3f}" if t is not None else f"{'-':>9}" for t in ms.values())
              + f" {tflops:>8.2f}")

    if "attention" in which:
        print(f"\n{'attention (B, heads, Lq, Lk, d)':58} {'n':>3} " + " ".join(f"{b:>9}" for b in BACKENDS)
              + f" {'TFLOP/s':>8}")
        for shape, n in sorted(attn.items(), key=lambda kv: -kv[0][2]):
            B, heads, lq, lk, d = shape
            ms = {b: timer(device, attention_step(shape, dtype, device, k), args.iters, args.warmup)
                  for b, k in BACKENDS.items()}
            report("attention", shape, str(shape), n, 3 * 4 * B * heads * lq * lk * d, ms)

    if "conv" in which:
        print(f"\n{'convolution (input, weight, stride, pad)':58} {'n':>3} {'default':>9} {'autotuned':>9} "
              f"{'TFLOP/s':>8}")
        for shape, n in sorted(conv.items(), key=lambda kv: -kv[0][0][2]):
            (B, _, H, W), (cout, cin, kh, kw), stride, pad = shape
            h_out, w_out = (H + 2 * pad[0] - kh) // stride[0] + 1, (W + 2 * pad[1] - kw) // stride[1] + 1
            ms = {"default": None, "autotuned": None}  # (the CPU has no cuDNN to autotune: a second timing is noise)
            for benchmark, b in ((False, "default"), (True, "autotuned"))[:2 if device.type == "cuda" else 1]:
                torch.backends.cudnn.benchmark = benchmark  # cuDNN's heuristics, then autotuning
                ms[b] = timer(device, conv_step(shape, dtype, device), args.iters, args.warmup)
            report("convolution", shape, f"{shape[0]} {shape[1]} s{stride[0]} p{pad[0]}", n,
                   3 * 2 * B * conv_macs(h_out, w_out, cin, cout, kh), ms)  # SD's kernels are square
        torch.backends.cudnn.benchmark = False

    if "linear" in which:
        print(f"\n{'linear (input, weight)':58} {'n':>3} {'default':>9} {'TFLOP/s':>8}")
        for shape, n in sorted(linear.items(), key=lambda kv: -math.prod(kv[0][0])):
            x_shape, (cout, cin) = shape
            ms = {"default": timer(device, linear_step(shape, dtype, device), args.iters, args.warmup)}
            report("linear", shape, f"{shape[0]} {shape[1]}", n, 3 * 2 * math.prod(x_shape[:-1]) * cin * cout, ms)

    # outside the totals below: the VAE is not the UNet
    vae_cfg = VAEConfig() if args.size == "full" else TINY_VAE
    if "vae_attention" in which:
        side = args.res // 2 ** (len(vae_cfg.ch_mult) - 1)  # the VAE's attention runs at its lowest resolution
        shape = (args.batch, side * side, vae_cfg.ch * vae_cfg.ch_mult[-1])
        ways = (*BACKENDS, "explicit")
        print(f"\n{'VAE attention, forward (B, L, d), 1 head':58} {'n':>3} " + " ".join(f"{k:>9}" for k in ways)
              + f" {'TFLOP/s':>8}")
        ms = {k: timer(device, vae_attention_step(shape, dtype, device, k), args.iters, args.warmup) for k in ways}
        B, L, d = shape
        report("vae_attention", shape, str(shape), 1, 2 * 2 * B * L * L * d, ms)  # forward only: two products

    ways = NORM_WAYS
    for kind, title, shapes, make, passes, where in (
            ("unet_norm", "UNet norm, SiLU, 1x1 conv; fwd + bwd, compiled, NHWC",
             lambda: unet_norm_shapes(cfg, args.batch, args.res, args.text), unet_norm_steps, 4, "the UNet"),
            ("vae_norm", "VAE norm, SiLU; forward, compiled, NHWC",
             lambda: vae_norm_shapes(vae_cfg, args.batch, args.res), vae_norm_steps, 2, "the encoder")):
        if kind not in which:
            continue
        shapes = shapes()
        print(f"\n{title:58} {'n':>3} " + " ".join(f"{k:>11}" for k in ways)
              + f" {'GB/s':>8} {'max diff':>9}")
        sums = dict.fromkeys(ways, 0.0)
        for shape, n in sorted(shapes.items(), key=lambda kv: -kv[1] * math.prod(kv[0])):  # the most bytes first
            steps = make(shape, dtype, device)
            ms = {k: timer(device, steps[k], args.iters, args.warmup) for k in ways}
            # the ways' results (the norm's output, or the input's gradient) on the same input, against F.group_norm's
            diff = max((steps["native"]().float() - steps[k]().float()).abs().max().item() for k in ways[1:]) \
                if None not in ms.values() else float("nan")
            rows.append(dict(kind=kind, shape=shape, count=n, gflop=0.0, ms=ms, max_diff=diff))
            # the least traffic in x's size: the VAE's x read, y written; the UNet's also the gradients
            gb = passes * math.prod(shape) * torch.finfo(dtype).bits / 8 / 1e9
            best = min((t for t in ms.values() if t is not None), default=float("nan"))
            print(f"{str(shape):58} {n:>3} " + " ".join(f"{t:>11.3f}" if t is not None else f"{'-':>11}"
                                                        for t in ms.values()) + f" {gb / best * 1e3:>8.0f} {diff:>9.2g}")
            sums = {k: None if sums[k] is None or ms[k] is None else sums[k] + n * ms[k] for k in ways}
        print(f"{'summed over ' + where:58} {'':>3} " + " ".join(f"{t:>11.2f}" if t is not None else f"{'-':>11}"
                                                                 for t in sums.values()))

    # per kernel choice: the sum over all layers, where that choice takes every shape of its kind
    totals = {}
    for kind in ("attention", "convolution", "linear"):
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:  # a section left out (--which)
            continue
        for b in mine[0]["ms"]:
            times = [r["count"] * r["ms"][b] for r in mine if r["ms"][b] is not None]
            totals[f"{kind} {b}"] = sum(times) if len(times) == len(mine) else None
        best = [min((t for t in r["ms"].values() if t is not None), default=None) for r in mine]
        totals[f"{kind} best per shape"] = (sum(r["count"] * t for r, t in zip(mine, best))
                                            if None not in best else None)  # a shape no kernel took
        gflop = sum(r["gflop"] for r in mine)
        print(f"\n{kind}: {gflop:.1f} GFLOP per forward + backward; summed ms over the UNet's layers:")
        for k, v in totals.items():
            if k.startswith(kind):
                print(f"  {k[len(kind) + 1:]:16} " + (f"{v:9.2f} ms  {gflop / v:7.2f} TFLOP/s" if v else f"{'-':>9}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, args=vars(args), rows=rows, totals=totals), f,
                      indent=1)
    return rows, totals


if __name__ == "__main__":
    main()
