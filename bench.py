"""Speed and memory of our networks next to diffusers', on the same weights and inputs.

    python bench.py --size tiny --which unet_fwd                  # quick look on CPU
    python bench.py --size full --res 256 --which unet_fwd --rounds 3
    python bench.py --size full --res 512 --batch 2 --device cuda --dtype bf16 --which unet,vae,train
    python bench.py --size full --device cuda --dtype bf16 --sweep-batch 2,8,16

Rows (same names in the printed table and in --json):
  unet_fwd     UNet forward (no_grad), ours vs diffusers' UNet2DConditionModel
  unet_fwdbwd  UNet forward + backward of mean(out^2) (weight and input grads)
  vae_enc      VAE encoder to the posterior mode (no_grad), ours vs diffusers' AutoencoderKL
  train_<task> one VPD training step (forward, loss, backward, AdamW step); ours only. With --compile,
               the loss is compiled apart from the model, as train.py compiles it
  eval_semseg  ADE20K's multi-scale + flip test of one image, --res high and 4/3 as wide (512x682 at
               512), in --res windows: ours batches 4 windows per forward; ref is ours one window per
               forward, as mmseg runs them (eager always, as eval.py; --batch does not apply)
Weights are random, drawn once for our modules (ldm's zero-initialised layers get random values
too, so outputs are not trivially zero) and handed to diffusers through its own ldm-checkpoint
converters, so both sides compute the same function; the script checks that before timing.

ms/iter: median over all timed iterations (`--rounds` x `--iters`, after `--warmup` untimed ones);
ours and the reference take turns iteration by iteration, the first alternating. The JSON also
holds the median of the back-to-back ratios (`ours_ref_ms_paired`), steadier on a shared machine.
peak MiB: memory on top of what was live before the iteration: weights, inputs, optimizer state
and the previous iteration's gradients (freed by zero_grad at the start of the step, then written
anew); so the step's peak total = weights + gradients + optimizer state + peak MiB.
CUDA: max_memory_allocated minus the allocated memory before. CPU: peak resident set size (VmHWM,
reset through /proc/self/clear_refs) minus the resident size before, after malloc_trim hands freed
heap back to the OS; so it includes allocator slack. Measured in one extra iteration per round; the
median over rounds. Not measured under CUDA graphs (--compile-mode reduce-overhead or max-autotune
on CUDA).
tensor MiB: the peak of the bytes held by tensors created during one more iteration (TensorPeak):
exact and allocator-independent on any device, blind to workspaces an op frees before returning;
counts new gradients in full (peak MiB nets them against the freed old ones); not measured with
--compile.
--ddp: the training step's model wrapped as train.py wraps it under torchrun, DDP around the compiled
model, in a process group of this one process: DDP adds its gradient buckets, and torch.compile splits
the model into one graph per bucket so that each bucket's all-reduce can start while the backward
goes on (`graphs` in the JSON and under the table: the graphs compiled for the row, the loss's one
among them). What several GPUs
add, the communication itself, is not in it.
attention: the scaled-dot-product-attention ops one more iteration dispatches (lines under the
table, `attention_ops` in the JSON): which kernel (flash, efficient, cuDNN, math) really ran.
TFLOP/s: analytic FLOPs (vpd/flops.py) per iteration / time; % peak: of the dense bf16 peak of the
GPU (table below), whatever --dtype is.
"""
import argparse
import ctypes
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from eval import count
from vpd import flops
from vpd.clip import CLIPConfig
from vpd.demo import TINY_CLIP, TINY_UNET, TINY_VAE, wake_zero_weights_
from vpd.dist import amp_autocast
from vpd.heads import Upsample2x
from vpd.infer import MS_RATIOS, semseg_probs
from vpd.model import build_model
from vpd.optim import build_optimizer
from vpd.unet import UNet, UNetConfig
from vpd.vae import VAE, VAEConfig

PRESETS = {
    "full": dict(unet=UNetConfig(), vae=VAEConfig(), clip=CLIPConfig()),
    "tiny": dict(unet=TINY_UNET, vae=TINY_VAE, clip=TINY_CLIP),  # the demo's configs
}
# dense, no sparsity; the first key contained in the device name wins (PCIe / NVL before SXM)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200 NVL": 835, "H200": 989, "A100": 312}
N_TEXT = {"semseg": 150, "depth": 1, "refer": 40}  # context tokens of each task (ADE20K classes, scene, sentence)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs
WHICH = ("unet_fwd", "unet_fwdbwd", "vae_enc", "train", "eval_semseg")


# ---------------------------------------------------------------------------------------------------
# measuring

class PeakMemory:
    """Peak memory above the level at start(), in MiB (see the module docstring)."""

    def __init__(self, device):
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None

    @staticmethod
    def _status_kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}")

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.libc.malloc_trim(0)  # freed heap back to the OS, so RSS ~ live memory
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = self._status_kib("VmRSS") * 1024

    def stop(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        return (self._status_kib("VmHWM") * 1024 - self.base) / 2 ** 20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_of(fn, device):
    mem = PeakMemory(device)
    mem.start()
    fn()
    return mem.stop()


class TensorPeak(TorchDispatchMode):
    """Peak bytes of the tensors created while active and still alive, exactly: every op's output
    storages are counted until Python frees them (a storage keeps its Python object while it
    lives). Allocator-independent, so it settles small differences the RSS figure blurs; it does
    not see workspaces an op allocates and frees inside itself."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: nothing new was allocated
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if id(st) not in self.live and id(st) not in inputs:
                    self.live[id(st)] = st.nbytes()
                    self.now += st.nbytes()
                    weakref.finalize(st, self._free, id(st))
        self.peak = max(self.peak, self.now)
        return out


def tensor_peak_of(fn):
    with TensorPeak() as tp:
        fn()
    return tp.peak / 2 ** 20


def run_pair(name, fns, flops_per_iter, batch, args, device):
    """Time the callables of `fns` ({impl: fn}) -> one row per impl.

    Ours and the reference take turns iteration by iteration (who goes first alternates), so a
    slowdown from other work on the machine hits both alike; memory is measured in a separate
    iteration per impl and round."""
    impls = list(fns)
    # a CUDA graph's replay allocates nothing (its memory pool was filled at capture, during warm-up),
    # so the allocator's peak would miss its activations: not measured under CUDA graphs. Inductor
    # runs a graph it cannot capture as it is, quietly: the skips are counted into the row.
    graphs = args.compile and args.compile_mode in CUDA_GRAPH_MODES and device.type == "cuda"
    skips_before = counters["inductor"]["cudagraph_skips"]
    for impl in impls:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            fns[impl]()
        sync(device)
        # with --compile this is the compile too (minutes for the full model on a GPU): the limits of a GPU call
        print(f"warm-up {name} / {impl}: {time.perf_counter() - t0:.1f} s", flush=True)
    times = {impl: [] for impl in impls}
    peaks = {impl: [] for impl in impls}
    # a dispatch mode would make compiled graphs recompile or fall back: not measured with --compile
    tensor_peaks = {impl: None if args.compile else tensor_peak_of(fns[impl]) for impl in impls}
    for r in range(args.rounds):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            peaks[impl].append(None if graphs else peak_of(fns[impl], device))
        for i in range(args.iters):
            for impl in (impls if (r * args.iters + i) % 2 == 0 else impls[::-1]):
                times[impl].append(timed(fns[impl], device))
    # which SDPA kernels ran (flash, efficient, cuDNN, math): compiled graphs fix theirs when traced
    attention = {impl: attention_ops(fns[impl]) for impl in impls}
    skips = counters["inductor"]["cudagraph_skips"] - skips_before
    if graphs and skips:
        print(f"warning: {name}: inductor skipped CUDA graphs {skips} time(s); TORCH_LOGS=cudagraphs says why",
              file=sys.stderr)
    rows = []
    for impl in impls:
        ms = 1000 * statistics.median(times[impl])
        tflops = flops_per_iter / (ms / 1000) / 1e12
        rows.append(dict(name=name, impl=impl, batch=batch, ms=ms, img_s=batch / (ms / 1000),
                         peak_mib=None if graphs else statistics.median(peaks[impl]),
                         tensor_mib=tensor_peaks[impl], tflops=tflops,
                         pct_peak=100 * tflops / args.peak_tflops if args.peak_tflops else None,
                         gflop_per_iter=flops_per_iter / 1e9, ms_min=1000 * min(times[impl]),
                         ms_all=[1000 * t for t in times[impl]], peak_mib_all=peaks[impl],
                         cudagraph_skips=skips if graphs else None, attention_ops=attention[impl]))
    if "ref" in fns:
        ours, ref = rows
        ours["ours_ref_ms"] = ours["ms"] / ref["ms"]
        # median of the ratios of back-to-back iterations: the steadiest figure on a busy machine
        ours["ours_ref_ms_paired"] = statistics.median(a / b for a, b in zip(times["ours"], times["ref"]))
        ours["ours_ref_mem"] = ours["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] else None
        ours["ours_ref_tensor_mem"] = ours["tensor_mib"] / ref["tensor_mib"] if ref["tensor_mib"] else None
    for r in rows:  # at once: a run cut short later (a timeout in the profile or in the next row) keeps the figure
        print(f"timed {name} / {r['impl']}: {r['ms']:.1f} ms/iter, {r['img_s']:.2f} img/s", flush=True)
    if args.profile:
        profile_into(args.profile, name, fns, device)
    return rows


def attention_ops(fn):
    """The scaled-dot-product-attention ops one more call of `fn` dispatches (none under CUDA graphs,
    whose replay dispatches no op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key})


def profile_into(path, name, fns, device):
    """One more iteration per impl under torch.profiler, appended to `path` as three tables: the busiest
    kernels (self time), then the ops by their total time, kernels launched inside them included, then
    the tensor copies by the op that asked for them (`copy_origins`).
    The second splits a training step into its phases: the compiled graphs' forwards (CompiledFunction: the
    model's, then the loss's), their backwards (CompiledFunctionBackward) and Optimizer.step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for impl, fn in fns.items():
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            fn()
            sync(device)
        ops = prof.key_averages()
        tables = [ops.table(sort_by=f"{prefix}{device.type}_time_total", row_limit=rows, max_name_column_width=80)
                  for prefix, rows in (("self_", 80), ("", 40))]  # kernels of half a millisecond show too
        with open(path, "a") as f:
            f.write(f"== {name} / {impl}\n{tables[0]}\nby total time:\n{tables[1]}\n"
                    f"copies by the op that asked for them:\n{copy_origins(prof.events(), device)}\n")


# ops that only pass a copy on: the op above them is the one that wanted it
COPY_CHAIN = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to"}


def copy_origins(events, device, rows=25):
    """A table of the profiled `aten::copy_` calls grouped by the op that asked for each (the nearest caller
    outside COPY_CHAIN: a cuDNN convolution given its input in another memory layout, say; a compiled
    graph's own call when inductor copies) and by the copied shape: calls and time (the device's, on a GPU)."""
    groups = {}
    for e in events:
        if e.name != "aten::copy_":
            continue
        caller = e.cpu_parent
        while caller is not None and caller.name in COPY_CHAIN:
            caller = caller.cpu_parent
        key = ("(called directly)" if caller is None else caller.name[:70], str(e.input_shapes[0]))
        calls, us = groups.get(key, (0, 0.0))
        groups[key] = (calls + 1, us + (e.device_time_total if device.type == "cuda" else e.cpu_time_total))
    lines = [f"{'asked for by':<70}  {'shape':<24}  {'calls':>5}  {'ms':>8}"]
    for (caller, shape), (calls, us) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:rows]:
        lines.append(f"{caller:<70}  {shape:<24}  {calls:>5}  {us / 1000:>8.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# models

def ldm_original_config(unet_cfg, vae_cfg):
    """The ldm YAML (v1-inference.yaml layout) that diffusers reads its configs from."""
    return {"model": {"params": {
        "unet_config": {"params": dict(in_channels=unet_cfg.in_channels, out_channels=unet_cfg.out_channels,
                                       model_channels=unet_cfg.model_channels,
                                       channel_mult=list(unet_cfg.channel_mult),
                                       num_res_blocks=unet_cfg.num_res_blocks,
                                       attention_resolutions=list(unet_cfg.attention_resolutions),
                                       num_heads=unet_cfg.num_heads, transformer_depth=unet_cfg.transformer_depth,
                                       context_dim=unet_cfg.context_dim, use_linear_in_transformer=False)},
        "first_stage_config": {"params": {"embed_dim": vae_cfg.embed_dim, "ddconfig": dict(
            double_z=True, z_channels=vae_cfg.z_channels, resolution=256, in_channels=vae_cfg.in_channels,
            out_ch=vae_cfg.out_ch, ch=vae_cfg.ch, ch_mult=list(vae_cfg.ch_mult),
            num_res_blocks=vae_cfg.num_res_blocks, attn_resolutions=[], dropout=0.0)}},
    }}}


def diffusers_unet(ours: UNet, vae_cfg):
    """diffusers' UNet2DConditionModel holding our UNet's weights (shared tensors, no copy)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)
    ckpt = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(ldm_original_config(ours.cfg, vae_cfg), ckpt)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True, assign=True)
    return ref


def diffusers_vae(ours: VAE, unet_cfg):
    """diffusers' AutoencoderKL (encoder side) holding our VAE encoder's weights."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     create_vae_diffusers_config_from_ldm)
    ckpt = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    config = create_vae_diffusers_config_from_ldm(ldm_original_config(unet_cfg, ours.cfg), ckpt)
    config.pop("scaling_factor", None)
    config["sample_size"] = 256
    with torch.device("meta"):
        ref = AutoencoderKL(**config)
    del ref.decoder, ref.post_quant_conv  # encoder-only, as ours; no weights to give them
    sd = {k: v for k, v in convert_ldm_vae_checkpoint(ckpt, config).items()
          if not k.startswith(("decoder.", "post_quant_conv."))}
    ref.load_state_dict(sd, strict=True, assign=True)
    return ref


@contextmanager
def full_float32():
    """Full float32 matrix products, whatever amp_autocast set for the bf16 rows (TF32): the checks compare
    two computations of the same function, not TF32's rounding of them."""
    was = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(was)


def check_same(name, ours_out, ref_out, tol):
    err = ((ours_out.float() - ref_out.float()).abs().max() / ref_out.float().abs().max()).item()
    print(f"check {name}: max |ours - ref| / max |ref| = {err:.2e}")
    if not err < tol:
        raise RuntimeError(f"{name}: ours and the reference disagree ({err:.2e} >= {tol}); the rows would compare "
                           "different computations")
    return err


# ---------------------------------------------------------------------------------------------------
# benchmarks

def place(module, args, device):
    module = module.to(device)
    return module.to(memory_format=torch.channels_last) if args.channels_last else module


def compiled(fn, args):
    return torch.compile(fn, mode=args.compile_mode) if args.compile else fn


def prepare(module, args, device):
    return compiled(place(module, args, device), args)


def image_like(shape, args, device, gen):
    x = torch.randn(shape, generator=gen).to(device)
    return x.to(memory_format=torch.channels_last) if args.channels_last else x


def bench_unet(args, device, cfgs, gen, which):
    unet_cfg, B, lat = cfgs["unet"], args.batch, args.res // 8
    ours = UNet(unet_cfg)
    wake_zero_weights_(ours, gen)
    ours = ours.to(device)
    x = image_like((B, unet_cfg.in_channels, lat, lat), args, device, gen)
    ctx = torch.randn(B, args.ctx, unet_cfg.context_dim, generator=gen).to(device)
    t = torch.ones(B, device=device)  # VPD's timestep
    ours.grad_checkpointing = args.grad_checkpoint
    check, ref = None, None
    if not args.no_ref:
        ref = diffusers_unet(ours, cfgs["vae"])
        with torch.no_grad(), full_float32():
            check = check_same("unet", ours(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample, 1e-3)
        if args.grad_checkpoint:
            ref.enable_gradient_checkpointing()
        ref = prepare(ref, args, device)
    ours = prepare(ours, args, device)
    models = {"ours": ours, "ref": ref} if ref is not None else {"ours": ours}
    call = {"ours": lambda m, x: m(x, t, ctx), "ref": lambda m, x: m(x, t, encoder_hidden_states=ctx).sample}
    macs = flops.unet_macs(unet_cfg, (lat, lat), n_ctx=args.ctx, batch=B)
    rows = []
    if "unet_fwd" in which:
        def fwd(f):
            def step():
                with torch.no_grad(), args.autocast():
                    f()
            return step
        for m in models.values():
            m.eval()
        rows += run_pair("unet_fwd", {k: fwd(lambda k=k, m=m: call[k](m, x)) for k, m in models.items()},
                         2 * macs, B, args, device)
    if "unet_fwdbwd" in which:
        x_grad = x.clone().requires_grad_(True)  # input grads too, as in training (features feed a head)

        def fwdbwd(impl, model):
            def step():
                model.zero_grad(set_to_none=True)
                x_grad.grad = None
                with args.autocast():
                    out = call[impl](model, x_grad)
                out.float().square().mean().backward()
            return step
        for m in models.values():
            m.train()
        rows += run_pair("unet_fwdbwd", {k: fwdbwd(k, m) for k, m in models.items()}, 6 * macs, B, args, device)
    for r in rows:
        r["check_rel_err"] = check
    return rows


def bench_vae(args, device, cfgs, gen):
    vae_cfg, B = cfgs["vae"], args.batch
    ours = VAE(vae_cfg, decoder=False)
    wake_zero_weights_(ours, gen)
    ours = ours.to(device).eval()
    img = image_like((B, vae_cfg.in_channels, args.res, args.res), args, device, gen).clamp(-1, 1)
    check, enc = None, {}
    if not args.no_ref:
        ref = diffusers_vae(ours, cfgs["unet"]).eval()
        with torch.no_grad(), full_float32():
            check = check_same("vae", ours.encode(img).mode(), ref.encode(img).latent_dist.mode(), 1e-3)
        ref = place(ref, args, device)
        enc["ref"] = lambda x: ref.encode(x).latent_dist.mode()
    ours = place(ours, args, device)
    enc = {"ours": lambda x: ours.encode(x).mode(), **enc}  # ours first: the rows' order
    # the encode functions compiled, not the modules: torch.compile(module) compiles only its forward
    enc = {k: compiled(f, args) for k, f in enc.items()}

    def no_grad(f):
        def step():
            with torch.no_grad(), args.autocast():
                f(img)
        return step
    macs = flops.vae_encoder_macs(vae_cfg, (args.res, args.res), batch=B)
    rows = run_pair("vae_enc", {k: no_grad(f) for k, f in enc.items()}, 2 * macs, B, args, device)
    for r in rows:
        r["check_rel_err"] = check
    return rows


def train_setup(task, batch, args, device, cfgs, gen):
    """A task model, its optimizer and one training step as a callable; -> (step, FLOPs per step)."""
    cfg_u, cfg_v = cfgs["unet"], cfgs["vae"]
    model = build_model(task, unet_cfg=cfg_u, vae_cfg=cfg_v, clip_cfg=cfgs["clip"])
    wake_zero_weights_(model.backbone, gen)
    model = model.to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.backbone.unet.grad_checkpointing = args.grad_checkpoint
    res, B = args.res, batch
    images = image_like((B, 3, res, res), args, device, gen).clamp(-1, 1)
    if task == "semseg":
        K = model.class_embeddings.shape[0]
        inputs = (images,)
        target = torch.randint(0, K, (B, res, res), generator=gen).to(device)
        target[:, :, : res // 8] = 255  # some ignored pixels, as ADE20K has
    elif task == "depth":
        inputs = (images, torch.randint(0, model.class_embeddings.shape[0], (B,), generator=gen).to(device))
        target = (torch.rand(B, 1, res, res, generator=gen) * 10).to(device)
    else:
        vocab = cfgs["clip"].vocab_size
        inputs = (images, torch.randint(0, vocab, (B, model.max_tokens), generator=gen).to(device))
        target = torch.randint(0, 2, (B, res, res), generator=gen).to(device)
    step_flops = flops.train_step_flops(cfg_u, cfg_v, (res, res), N_TEXT[task], batch=B,
                                        head_macs=head_macs(model, inputs))
    if task == "refer":  # the frozen CLIP text tower runs forward once
        c = cfgs["clip"]
        step_flops += 2 * flops.clip_text_macs(model.max_tokens, c.hidden_size, c.num_hidden_layers,
                                               c.intermediate_size, batch=B)
    opt = build_optimizer(model, lr=1e-6, weight_decay=1e-2, unet_lr_mult=0.1, fused=device.type == "cuda")  # as train.py
    fwd = torch.compile(model, mode=args.compile_mode) if args.compile else model
    loss = torch.compile(model.loss) if args.compile else model.loss  # as train.py
    if args.ddp:  # train.py's order: DDP around the compiled model
        ids = [torch.cuda.current_device()] if device.type == "cuda" else None
        fwd = DDP(fwd, device_ids=ids, bucket_cap_mb=args.ddp, gradient_as_bucket_view=True)

    def step():
        opt.zero_grad(set_to_none=True)
        with args.autocast():
            out = fwd(*inputs)
        loss(out, target).backward()
        opt.step()
    return step, step_flops


def head_macs(model, inputs):
    """The task head's forward MACs, counted on this very model (its shapes depend on the task), its x2
    upsamples' matrix products left out: resampling, which vpd/flops.py does not count as work either."""
    from torch.utils.flop_counter import FlopCounterMode
    fc = FlopCounterMode(display=False, depth=None)
    with fc, torch.no_grad():
        model(*inputs)
    counts, head = fc.get_flop_counts(), f"{type(model).__name__}.head"
    upsamples = [f"{head}.{name}" for name, m in model.head.named_modules() if isinstance(m, Upsample2x)]
    return (sum(counts[head].values()) - sum(sum(counts.get(k, {}).values()) for k in upsamples)) // 2


def bench_eval_semseg(args, device, cfgs, gen):
    model = build_model("semseg", unet_cfg=cfgs["unet"], vae_cfg=cfgs["vae"], clip_cfg=cfgs["clip"])
    wake_zero_weights_(model.backbone, gen)
    model = model.to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    h, w = args.res, args.res * 4 // 3
    views = [image_like((1, 3, round(h * r), round(w * r)), args, device, gen).clamp(-1, 1) for r in MS_RATIOS]
    K = model.num_classes
    seen = []  # the windows of one test, counted as the model sees them
    hook = model.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].shape[0]))
    with torch.no_grad(), full_float32():
        probs = semseg_probs(model, views, K, (h, w), flip=True, crop=args.res, batch=4)
        hook.remove()
        check = None if args.no_ref else check_same(
            "eval_semseg", probs, semseg_probs(model, views, K, (h, w), flip=True, crop=args.res, batch=1), 1e-3)
    window = image_like((1, 3, args.res, args.res), args, device, gen)
    macs = (flops.unet_macs(cfgs["unet"], (h // 8, h // 8), K, out_head=False)
            + flops.vae_encoder_macs(cfgs["vae"], (h, h)) + head_macs(model, (window,)))

    def test(batch):
        def step():
            with torch.no_grad(), args.autocast():
                semseg_probs(model, views, K, (h, w), flip=True, crop=args.res, batch=batch)
        return step
    fns = {"ours": test(4), **({} if args.no_ref else {"ref": test(1)})}
    rows = run_pair("eval_semseg", fns, 2 * macs * sum(seen), 1, args, device)
    for r in rows:
        r.update(windows=sum(seen), check_rel_err=check)
    return rows


def train_rows(name, task, batch, args, device, cfgs, gen):
    """run_pair's row of one training step, with the number of graphs compiled for it."""
    before = counters["aot_autograd"]["total"]
    step, step_flops = train_setup(task, batch, args, device, cfgs, gen)
    rows = run_pair(name, {"ours": step}, step_flops, batch, args, device)
    for r in rows:
        r["graphs"] = counters["aot_autograd"]["total"] - before if args.compile else None
    return rows


def bench_train(args, device, cfgs, gen, tasks):
    return [row for task in tasks for row in train_rows(f"train_{task}", task, args.batch, args, device, cfgs, gen)]


def sweep_batch(args, device, cfgs, gen, batches):
    """The semseg step at each batch. A batch the GPU cannot hold is a row marked out of memory and the
    sweep goes on: finding that batch is what a sweep is for, and the rows before it are kept."""
    rows = []
    for B in batches:
        torch._dynamo.reset()  # compiled: a static graph per batch, not a recompile with a dynamic batch dimension
        name = f"train_semseg bs={B}"
        try:
            rows += train_rows(name, "semseg", B, args, device, cfgs, gen)
        except torch.OutOfMemoryError:
            print(f"{name}: out of memory", flush=True)
            rows.append(dict(name=name, impl="ours", batch=B, error="out of memory"))
            gc.collect()  # the failed step's tensors, held by reference cycles through its frames
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------
# report

def print_table(rows):
    head = ["name", "impl", "ms/iter", "min ms", "img/s", "peak MiB", "tensor MiB", "TFLOP/s", "% peak",
            "ours/ref ms", "ours/ref mem", "ours/ref tensor"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    lines = [[r["name"], r["impl"], r.get("error") or fmt(r["ms"], ".1f"), fmt(r.get("ms_min"), ".1f"),
              fmt(r.get("img_s"), ".2f"), fmt(r.get("peak_mib"), ".0f"), fmt(r.get("tensor_mib"), ".1f"),
              fmt(r.get("tflops"), ".3f"), fmt(r.get("pct_peak"), ".1f"), fmt(r.get("ours_ref_ms"), ".3f"),
              fmt(r.get("ours_ref_mem"), ".3f"), fmt(r.get("ours_ref_tensor_mem"), ".3f")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    for line in [head] + lines:
        print(" | ".join(x.ljust(w) for x, w in zip(line, widths)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(PRESETS), default="tiny", help="SD v1.5 sizes, or a tiny config")
    p.add_argument("--res", type=count(64), default=256, help="image size (square); the latent is res/8")
    p.add_argument("--batch", type=count(1), default=1)
    p.add_argument("--ctx", type=count(1), default=77, help="text tokens of the UNet benchmark's context")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast, fp32 weights")
    p.add_argument("--compile", action="store_true", help="torch.compile both sides")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode (reduce-overhead: CUDA graphs, against launch overhead)")
    p.add_argument("--no-ref", action="store_true", help="time ours only (no diffusers models are built)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute blocks in backward (both sides)")
    p.add_argument("--ddp", type=float, nargs="?", const=25.0, default=None, metavar="BUCKET_MB",
                   help="training rows: wrap the model in DDP over this one process, as train.py does under "
                        "torchrun (gradient buckets of BUCKET_MB, default 25 as there)")
    p.add_argument("--profile", default="", help="append a torch.profiler table of one more iteration per row here")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--iters", type=count(1), default=5, help="timed iterations per round")
    p.add_argument("--warmup", type=count(0), default=1, help="untimed iterations first")
    p.add_argument("--rounds", type=count(1), default=1, help="rounds of one memory iteration + --iters timed ones")
    p.add_argument("--which", default="unet,vae,train",
                   help=f"comma list of {', '.join(WHICH)}; 'unet' = unet_fwd,unet_fwdbwd; 'vae' = vae_enc; "
                        "train or train_<task> for semseg, depth, refer")
    p.add_argument("--sweep-batch", type=counts, default=[], help="comma list of batch sizes for the semseg training "
                   "step (one that runs out of memory is a row saying so)")
    p.add_argument("--threads", type=count(0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the rows here")
    args = p.parse_args(argv)
    if args.compile_mode and not args.compile:
        raise SystemExit("--compile-mode needs --compile")
    if args.res % 64:
        raise SystemExit(f"--res {args.res}: must be a multiple of 64 (the UNet halves the latent 3 times)")
    if args.ddp is not None and args.ddp <= 0:
        raise SystemExit(f"--ddp {args.ddp:g}: bucket size must be > 0 MB")
    check_json_path(args.json)
    return args


def check_json_path(path):
    """--json's file must be writable: found out now, not after the (long) timing."""
    folder = os.path.dirname(os.path.abspath(path))
    if path and (os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK)):
        raise SystemExit(f"--json {path}: cannot write a file there")


def counts(text):
    """argparse type: a comma list of integers >= 1 (batch sizes)."""
    parse = count(1)
    return [parse(t) for t in text.split(",") if t.strip()]


def parse_which(spec):
    which, tasks = set(), []
    for w in filter(None, (s.strip() for s in spec.split(","))):
        if w == "unet":
            which |= {"unet_fwd", "unet_fwdbwd"}
        elif w == "vae":
            which.add("vae_enc")
        elif w == "train":
            tasks += ["semseg", "depth", "refer"]
        elif w.startswith("train_") and w[6:] in N_TEXT:
            tasks.append(w[6:])
        elif w in WHICH:
            which.add(w)
        else:
            raise SystemExit(f"--which: unknown {w!r}; use {', '.join(WHICH)}, unet, vae or train_<semseg|depth|refer>")
    return which, tasks


def main(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    which, tasks = parse_which(args.which)
    if "eval_semseg" in which and args.compile:
        raise SystemExit("eval_semseg times eval.py's eager model: run it without --compile")
    if which - {"eval_semseg"} and not args.no_ref and importlib.util.find_spec("diffusers") is None:  # (the others have none)
        raise SystemExit("the UNet / VAE rows compare with diffusers, which is not installed: pip install -r "
                         "requirements-test.txt, or --no-ref to time ours alone")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.sweep_batch
    if ("semseg" in tasks and args.batch == 1 or 1 in batches) and args.res < 128:  # (the sweep is semseg's)
        raise SystemExit(f"--res {args.res} with batch 1: the semseg head's BatchNorm (its FPN scale head at 1/64) "
                         "sees a single 1x1 value in training; use --res 128 or more, or a larger batch")
    if args.ddp is not None and not (tasks or batches):
        raise SystemExit("--ddp wraps the training step's model: add a train_<task> row or --sweep-batch")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # inductor's settings given through the environment (e.g. TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1) are part of a
    # row's setting; its cache folder is not (inductor writes that one there itself)
    inductor_env = {k: v for k, v in sorted(os.environ.items())
                    if k.startswith("TORCHINDUCTOR_") and k != "TORCHINDUCTOR_CACHE_DIR"}
    args.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    args.autocast = amp_autocast("bf16" if args.dtype == "bf16" else "off", device)  # as train.py's --amp
    cfgs, gen = PRESETS[args.size], torch.Generator().manual_seed(args.seed)
    print(f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, size {args.size}, "
          f"res {args.res}, batch {args.batch}, {args.dtype}, compile {args.compile}, "
          f"channels_last {args.channels_last}, grad_checkpoint {args.grad_checkpoint}"
          + (f", compile mode {args.compile_mode}" if args.compile_mode else "")
          + (f", DDP over 1 process, {args.ddp:g} MB buckets" if args.ddp else "")
          + "".join(f", {k}={v}" for k, v in inductor_env.items()))
    if args.ddp:  # an in-process store: one rank needs no address or port
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    try:
        rows = run_rows(args, device, cfgs, gen, which, tasks, batches)
    finally:
        if args.ddp:
            dist.destroy_process_group()
    print_table(rows)
    for r in rows:
        if "attention_ops" in r:  # (not in a row that ran out of memory)
            print(f"attention in {r['name']} / {r['impl']}: {', '.join(r['attention_ops']) or '-'}")
        if r.get("graphs"):
            print(f"graphs compiled for {r['name']}: {r['graphs']}")
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "autocast"}
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "args": meta, "inductor_env": inductor_env,
                       "rows": rows}, f, indent=1)
    return rows


def run_rows(args, device, cfgs, gen, which, tasks, batches):
    rows = []
    if which & {"unet_fwd", "unet_fwdbwd"}:
        rows += bench_unet(args, device, cfgs, gen, which)
    if "vae_enc" in which:
        rows += bench_vae(args, device, cfgs, gen)
    if tasks:
        rows += bench_train(args, device, cfgs, gen, tasks)
    if "eval_semseg" in which:
        rows += bench_eval_semseg(args, device, cfgs, gen)
    if batches:
        rows += sweep_batch(args, device, cfgs, gen, batches)
    return rows


if __name__ == "__main__":
    main(parse_args())
