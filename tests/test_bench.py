"""bench.py runs on the tiny config: ours against diffusers on the same function, or ours alone."""
import json
import math
import re
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import bench_loader

SD15 = Path(__file__).resolve().parents[1].parent / "shared" / "sd15_tensors.json"



@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend: the graphs are traced as inductor's would be, but not
    compiled (inductor needs a C++ compiler here, and minutes); a mode (reduce-overhead) is inductor's."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn=None, mode=None, **kw: compile_(fn, **{**kw, "backend": "aot_eager"}))

def counted_flops(fn):
    """FLOPs of fn() as FlopCounterMode sees them (MATH attention: no formula for the fused CPU kernel)."""
    fc = FlopCounterMode(display=False, depth=None)
    with fc, sdpa_kernel(SDPBackend.MATH):
        fn()
    return fc.get_total_flops()


def row_flops_by_counter(res, batch, n_ctx):
    """Each row's work per iteration, counted on freshly built tiny modules (not bench's)."""
    from vpd.demo import TINY_CLIP, TINY_UNET, TINY_VAE
    from vpd.model import build_model
    from vpd.unet import UNet
    from vpd.vae import VAE
    torch.manual_seed(0)
    unet, vae = UNet(TINY_UNET), VAE(TINY_VAE, decoder=False).eval()
    x = torch.randn(batch, 4, res // 8, res // 8, requires_grad=True)
    ctx, t = torch.randn(batch, n_ctx, TINY_UNET.context_dim), torch.ones(batch)
    with torch.no_grad():
        fwd = counted_flops(lambda: unet(x, t, ctx))
        enc = counted_flops(lambda: vae.encode(torch.rand(batch, 3, res, res) * 2 - 1).mode())
    fwdbwd = counted_flops(lambda: unet(x, t, ctx).square().mean().backward())
    model = build_model("semseg", unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP).train()
    step = counted_flops(lambda: model.loss(model(torch.rand(batch, 3, res, res) * 2 - 1),
                                            torch.randint(0, 150, (batch, res, res))).backward())
    return {"unet_fwd": fwd, "unet_fwdbwd": fwdbwd, "vae_enc": enc, "train_semseg": step}


@pytest.mark.parametrize("no_ref", [False, True])
def test_bench_rows_and_json(tmp_path, no_ref, resize_uncounted, monkeypatch, capsys):
    out = tmp_path / "rows.json"
    monkeypatch.setenv("TORCHINDUCTOR_NOT_A_SETTING", "1")  # inductor's environment is part of a row's setting
    argv = ["--size", "tiny", "--res", "128", "--batch", "2", "--ctx", "7", "--which", "unet,vae,train_semseg",
            "--iters", "1", "--warmup", "0", "--json", str(out)] + (["--no-ref"] if no_ref else [])
    rows = bench.main(bench.parse_args(argv))
    impls = ["ours"] if no_ref else ["ours", "ref"]
    want = [(n, i) for n in ("unet_fwd", "unet_fwdbwd", "vae_enc") for i in impls] + [("train_semseg", "ours")]
    assert [(r["name"], r["impl"]) for r in rows] == want
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0 and r["tensor_mib"] > 0
        assert r["attention_ops"] and all("scaled_dot_product" in op for op in r["attention_ops"]), r
        if r["name"] != "train_semseg":
            # the two sides were checked to compute the same function before timing
            assert (r["check_rel_err"] is None) == no_ref and (no_ref or r["check_rel_err"] < 1e-3)
    assert all(("ours_ref_ms" in r) != no_ref for r in rows if r["impl"] == "ours" and r["name"] != "train_semseg")
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert saved["device"] == "cpu" and saved["torch"] == torch.__version__
    assert saved["inductor_env"]["TORCHINDUCTOR_NOT_A_SETTING"] == "1"
    assert ", TORCHINDUCTOR_NOT_A_SETTING=1" in capsys.readouterr().out.splitlines()[0]
    assert saved["args"]["batch"] == 2 and saved["args"]["ctx"] == 7 and saved["args"]["no_ref"] == no_ref
    if not no_ref:
        # the analytic FLOPs behind TFLOP/s: each row's work counted op by op on the same sizes. The
        # forwards are exact; fwd+bwd counts the input grads of the first conv, which autograd skips
        # (+0.08%); the training step leaves out VPD's text adapter and map products (-0.003%)
        with resize_uncounted():
            counted = row_flops_by_counter(128, 2, 7)
        for r in rows:
            rel = {"unet_fwd": 1e-12, "vae_enc": 1e-12, "unet_fwdbwd": 1e-3, "train_semseg": 1e-4}[r["name"]]
            assert r["gflop_per_iter"] * 1e9 == pytest.approx(counted[r["name"]], rel=rel), r["name"]
            assert r["tflops"] == pytest.approx(r["gflop_per_iter"] / r["ms"])  # GFLOP per ms = TFLOP/s
            assert r["img_s"] == pytest.approx(2 * 1000 / r["ms"])


def test_each_row_times_the_implementation_it_names(monkeypatch):
    # which library's modules each timed function runs: ours (vpd.*) or diffusers' (a late-bound
    # lambda would time one side twice, after the same-function check passed)
    seen = {}
    real_run_pair = bench.run_pair

    def recording(name, fns, *args):
        for impl, fn in fns.items():
            libs = set()
            hook = torch.nn.modules.module.register_module_forward_pre_hook(
                lambda m, inputs: libs.add(type(m).__module__.split(".")[0]))
            try:
                fn()
            finally:
                hook.remove()
            seen[name, impl] = libs - {"torch"}
        return real_run_pair(name, fns, *args)
    monkeypatch.setattr(bench, "run_pair", recording)
    monkeypatch.setattr(bench, "attention_ops", lambda fn: [])
    bench.main(bench.parse_args(["--size", "tiny", "--res", "64", "--batch", "2", "--which", "unet,vae",
                                 "--iters", "1", "--warmup", "0"]))
    for name in ("unet_fwd", "unet_fwdbwd", "vae_enc"):
        assert seen[name, "ours"] == {"vpd"} and seen[name, "ref"] == {"diffusers"}, name


def test_bench_eval_semseg_row_counts_every_window(monkeypatch, resize_uncounted):
    monkeypatch.setattr(bench, "attention_ops", lambda fn: [])  # (profiling 44 windows' ops takes seconds)
    # ADE20K's ms + flip test of a 64x85 image in 64 windows (stride 42): views 64x85, 72x96, 80x106, 88x117,
    # 96x128 take 1x2, 2x2, 2x2, 2x3, 2x3 windows (mmseg's grid), 22 in all, each also flipped
    seen, check_same = [], bench.check_same  # the check at full float32 products, TF32 allowed or not
    monkeypatch.setattr(bench, "check_same", lambda *a: seen.append(torch.get_float32_matmul_precision())
                        or check_same(*a))
    was = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        rows = bench.main(bench.parse_args(["--size", "tiny", "--res", "64", "--which", "eval_semseg", "--iters", "1",
                                            "--warmup", "0"]))
    finally:
        torch.set_float32_matmul_precision(was)
    assert seen == ["highest"]
    assert [r["impl"] for r in rows] == ["ours", "ref"] and all(r["windows"] == 44 for r in rows)
    assert rows[0]["check_rel_err"] < 1e-5  # the two compute the same probabilities
    assert rows[0]["ours_ref_ms"] > 0 and rows[0]["img_s"] == pytest.approx(1000 / rows[0]["ms"])
    # the analytic FLOPs against the same test counted op by op on a fresh tiny model: they leave out
    # only VPD's text adapter (two D x D linears on the N class embeddings), which runs once per forward:
    # 14 forwards here, as a view and its mirror image take 1, 1, 1, 2 and 2 forwards of up to 4 windows
    from vpd.demo import TINY_CLIP, TINY_UNET, TINY_VAE
    from vpd.infer import MS_RATIOS, semseg_probs
    from vpd.model import build_model
    model = build_model("semseg", unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP).eval()
    views = [torch.zeros(1, 3, round(64 * r), round(85 * r)) for r in MS_RATIOS]
    with torch.no_grad(), resize_uncounted():
        counted = counted_flops(lambda: semseg_probs(model, views, 150, (64, 85), flip=True, crop=64))
    n, d = model.class_embeddings.shape
    assert rows[0]["gflop_per_iter"] * 1e9 + 14 * 2 * (2 * n * d * d) == pytest.approx(counted, rel=1e-12)
    with pytest.raises(SystemExit, match="without --compile"):
        bench.main(bench.parse_args(["--which", "eval_semseg", "--compile"]))


def test_bench_profile_appends_a_table_per_row(tmp_path):
    out = tmp_path / "profile.txt"
    argv = ["--size", "tiny", "--res", "128", "--which", "unet_fwd,vae_enc", "--iters", "1", "--warmup", "0",
            "--profile", str(out)]
    bench.main(bench.parse_args(argv))
    text = out.read_text()
    heads = [line for line in text.splitlines() if line.startswith("== ")]
    assert heads == ["== unet_fwd / ours", "== unet_fwd / ref", "== vae_enc / ours", "== vae_enc / ref"]
    assert "aten::convolution" in text and "aten::_scaled_dot_product" in text
    assert text.count("by total time:") == 4


def test_bench_prints_each_rows_timing_before_its_profile(tmp_path, monkeypatch, capsys):
    # a run cut short in the profile (a timeout) keeps the figure it came for
    def cut(*a):
        raise KeyboardInterrupt("timeout")
    monkeypatch.setattr(bench, "profile_into", cut)
    with pytest.raises(KeyboardInterrupt):
        bench.main(bench.parse_args(["--size", "tiny", "--res", "128", "--which", "vae_enc", "--iters", "2",
                                     "--warmup", "0", "--no-ref", "--profile", str(tmp_path / "p.txt")]))
    timed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("timed ")]
    assert len(timed) == 1 and re.fullmatch(r"timed vae_enc / ours: [\d.]+ ms/iter, [\d.]+ img/s", timed[0])


def test_bench_profile_splits_a_training_step_by_total_time(tmp_path):
    out = tmp_path / "profile.txt"
    bench.main(bench.parse_args(["--size", "tiny", "--res", "128", "--batch", "2", "--which", "train_semseg",
                                 "--iters", "1", "--warmup", "0", "--profile", str(out)]))
    by_total = out.read_text().split("by total time:\n")[1]
    lines = by_total.splitlines()  # a rule, the header, a rule, the rows, a rule
    rows = [line.split() for line in lines[3:lines.index(lines[0], 3)]]
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    # columns from the right: calls, mean, CPU total, its %, self CPU, its %; names may hold spaces
    totals = [float(r[-3].rstrip("usm")) * unit[r[-3].lstrip("0123456789.")] for r in rows]
    assert totals == sorted(totals, reverse=True) and len(totals) == 40
    assert ["Optimizer.step#AdamW.step"] in [r[:-6] for r in rows]  # a phase: a wrapper of little self time
    copies = out.read_text().split("copies by the op that asked for them:\n")[1].splitlines()
    assert copies[0].startswith("asked for by") and int(copies[1].split()[-2]) > 0  # (which ops: CPU kernels')


def test_profile_names_the_op_behind_each_copy():
    x = torch.randn(48, 32).t()
    def fn():
        torch.nn.functional.layer_norm(x, (48,))  # the CPU kernel wants x contiguous: a copy inside it
        x.contiguous()  # asked for directly
        x.contiguous()
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    lines = bench.copy_origins(prof.events(), torch.device("cpu")).splitlines()
    assert lines[0].split() == ["asked", "for", "by", "shape", "calls", "ms"]
    rows = sorted(line.split()[:-1] for line in lines[1:])
    assert rows == [["(called", "directly)", "[32,", "48]", "2"], ["aten::native_layer_norm", "[32,", "48]", "1"]]


def test_bench_refuses_bad_flags(tmp_path):
    for argv in (["--compile-mode", "reduce-overhead"], ["--res", "100"], ["--res", "0"], ["--batch", "0"],
                 ["--ctx", "0"], ["--iters", "0"], ["--rounds", "0"], ["--warmup", "-1"], ["--threads", "-1"],
                 ["--sweep-batch", "2,x"], ["--sweep-batch", "2,0"]):
        with pytest.raises(SystemExit):  # before any model is built
            bench.parse_args(argv)
    assert bench.parse_args(["--sweep-batch", "2, 8,"]).sweep_batch == [2, 8]
    with pytest.raises(SystemExit, match="--json .*nowhere/x.json: cannot write a file there"):
        bench.parse_args(["--json", str(tmp_path / "nowhere" / "x.json")])  # not after the timing
    # a semseg training step of one image at 64x64: its FPN head's BatchNorm would see one value per channel at
    # 1/64. The sweep trains semseg steps whatever --which names: a batch of 1 in it is refused too
    for argv in (["--which", "train_semseg", "--batch", "1"], ["--which", "unet_fwd", "--sweep-batch", "1,2"]):
        with pytest.raises(SystemExit, match="semseg head's BatchNorm .* sees a single 1x1 value"):
            bench.main(bench.parse_args(argv + ["--no-ref", "--res", "64"]))
    for argv, match in ((["--which", "unet_fwd", "--ddp"], "add a train_<task> row"),
                        (["--which", "train_semseg", "--ddp", "0"], "must be > 0")):
        with pytest.raises(SystemExit, match=match):
            bench.main(bench.parse_args(argv + ["--no-ref"]))


def test_ddp_splits_the_compiled_training_step_at_its_buckets(monkeypatch, aot_eager):
    # train.py's DDP(compile(model)) under torchrun: the compiler splits the model's graph at DDP's
    # gradient buckets. Compiled here with aot_eager, graphs counted
    wrapped, ddp = [], bench.DDP
    monkeypatch.setattr(bench, "DDP", lambda m, **kw: wrapped.append((type(m).__name__, kw)) or ddp(m, **kw))
    def run_pair(name, fns, *args):  # one step, untimed
        fns["ours"]()
        return [dict(name=name, impl="ours", attention_ops=[])]
    monkeypatch.setattr(bench, "run_pair", run_pair)
    monkeypatch.setattr(bench, "print_table", lambda rows: None)
    argv = ["--size", "tiny", "--res", "64", "--batch", "2", "--which", "train_semseg", "--compile"]
    graphs = []
    for extra in ([], ["--ddp", "10"]):
        torch._dynamo.reset()
        [row] = bench.main(bench.parse_args(argv + extra))
        graphs.append(row["graphs"])
        assert not torch.distributed.is_initialized()  # the one-process group is gone again
    assert wrapped == [("OptimizedModule", dict(device_ids=None, bucket_cap_mb=10.0,  # around the compiled model
                                                gradient_as_bucket_view=True))]  # as train.py
    model = bench.build_model("semseg", unet_cfg=bench.TINY_UNET, vae_cfg=bench.TINY_VAE, clip_cfg=bench.TINY_CLIP)
    mb = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad) / 2 ** 20
    assert graphs[0] == 2 and graphs[1] >= math.ceil(mb / 10) + 1 > 2  # the model's graphs and the loss's one
    assert bench.parse_args(["--ddp"]).ddp == 25.0  # DDP's default, as train.py leaves it


@pytest.mark.parametrize("which", ["unet_fwd", "unet_fwdbwd", "vae_enc"])
def test_compile_compiles_what_each_row_times(monkeypatch, aot_eager, which):
    # torch.compile(module) compiles only the module's forward: a row calling another method (the VAE's
    # encode) would time eager code under --compile. Each timed call must run a compiled graph.
    graphs = []

    def run_pair(name, fns, *args):  # one call, untimed, its compiled graphs counted
        before = counters["aot_autograd"]["total"]
        fns["ours"]()
        graphs.append(counters["aot_autograd"]["total"] - before)
        return [dict(name=name, impl="ours", attention_ops=[])]
    monkeypatch.setattr(bench, "run_pair", run_pair)
    monkeypatch.setattr(bench, "print_table", lambda rows: None)
    torch._dynamo.reset()
    bench.main(bench.parse_args(["--size", "tiny", "--res", "64", "--which", which, "--compile", "--no-ref"]))
    assert graphs == [1]


def test_bench_without_diffusers_says_what_to_install_or_to_pass(monkeypatch):
    # the UNet / VAE rows time diffusers too: without it, a message (not an ImportError) naming the fix;
    # --no-ref, and the training steps (which have no reference), run without it
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else find_spec(name, *a))
    ran = []
    monkeypatch.setattr(bench, "run_rows", lambda args, device, cfgs, gen, which, tasks, batches: ran.append(which) or [])
    for which in ("unet_fwd", "vae_enc", "unet,train_semseg"):
        with pytest.raises(SystemExit, match="pip install -r requirements-test.txt, or --no-ref to time ours alone"):
            bench.main(bench.parse_args(["--which", which]))
    bench.main(bench.parse_args(["--which", "unet", "--no-ref"]))
    bench.main(bench.parse_args(["--which", "train_semseg", "--batch", "2"]))
    assert ran == [{"unet_fwd", "unet_fwdbwd"}, set()]


def test_kernel_bench_times_every_layer_shape_of_the_unet(tmp_path, aot_eager):
    import bench_kernels
    from vpd import flops
    from vpd.demo import TINY_UNET
    from vpd.unet import UNetConfig

    def macs(attn, conv, linear):  # from the shapes the hooks saw
        a = sum(n * B * h * lq * lk * d * 2 for (B, h, lq, lk, d), n in attn.items())
        c = sum(n * B * ((H + 2 * p[0] - kh) // s[0] + 1) * ((W + 2 * p[1] - kw) // s[1] + 1) * co * ci * kh * kw
                for ((B, _, H, W), (co, ci, kh, kw), s, p), n in conv.items())
        li = sum(n * math.prod(x[:-1]) * co * ci for (x, (co, ci)), n in linear.items())
        return a, c, li

    def analytic(cfg, latent, batch, n_text):  # vpd/flops.py's count, the UNet's `out` conv included
        k = flops.by_kind(flops.unet_layers(cfg, (latent, latent), n_ctx=n_text, batch=batch))
        return (k["self_attn"] + k["cross_attn"], k["conv3x3"] + k["conv1x1"],
                k["linear"] + k["attn_proj"] + k["geglu"])

    assert macs(*bench_kernels.layer_shapes(UNetConfig(), 2, 512, 150)) == analytic(UNetConfig(), 64, 2, 150)
    rows, totals = bench_kernels.main(["--device", "cpu", "--size", "tiny", "--dtype", "fp32", "--res", "64",
                                       "--batch", "2", "--text", "7", "--iters", "1", "--warmup", "0",
                                       "--json", str(tmp_path / "k.json")])
    attn_gflop = sum(r["gflop"] for r in rows if r["kind"] == "attention")
    conv_gflop = sum(r["gflop"] for r in rows if r["kind"] == "convolution")
    linear_gflop = sum(r["gflop"] for r in rows if r["kind"] == "linear")
    a, c, li = analytic(TINY_UNET, 8, 2, 7)
    assert (attn_gflop, conv_gflop, linear_gflop) == pytest.approx((6 * a / 1e9, 6 * c / 1e9, 6 * li / 1e9))
    assert all(r["ms"]["math"] > 0 for r in rows if r["kind"] == "attention")  # math takes any shape
    assert all(r["ms"]["default"] > 0 and r["ms"]["autotuned"] is None for r in rows if r["kind"] == "convolution")
    assert totals["convolution autotuned"] is None  # no cuDNN on the CPU: not a second timing's noise as a gain
    assert all(r["ms"]["default"] > 0 for r in rows if r["kind"] == "linear")
    assert totals["attention math"] > 0 and totals["convolution default"] > 0 and totals["linear default"] > 0
    assert json.loads((tmp_path / "k.json").read_text())["totals"] == totals
    # the VAE's attention at 1/8 of the image (TINY_VAE: 32 x 2 channels), by SDPA's math kernel and written out
    (vae,) = [r for r in rows if r["kind"] == "vae_attention"]
    assert vae["shape"] == (2, 64, 64) and vae["ms"]["math"] > 0 and vae["ms"]["explicit"] > 0
    # the VAE encoder's group norms: 14 at five shapes (TINY_VAE: 32, 32, 64, 64 channels), each way timed
    norms = {r["shape"]: r["count"] for r in rows if r["kind"] == "vae_norm"}
    assert norms == {(2, 64, 8, 8): 8, (2, 32, 64, 64): 2, (2, 32, 32, 32): 2, (2, 32, 16, 16): 1,
                     (2, 64, 16, 16): 1}
    # the UNet's group norms, forward + backward: every GroupNorm32 of the UNet once, each way timed
    from vpd.norm import GroupNorm32
    from vpd.unet import UNet
    with torch.device("meta"):
        modules = [m for m in UNet(TINY_UNET).modules() if isinstance(m, GroupNorm32)]
    unet_norms = [r for r in rows if r["kind"] == "unet_norm"]
    assert sum(r["count"] for r in unet_norms) == len(modules) > 0
    assert {r["shape"][1] for r in unet_norms} == {m.num_channels for m in modules}
    for kind in ("vae_norm", "unet_norm"):
        assert all(t > 0 for r in rows if r["kind"] == kind for t in r["ms"].values())
        assert all(r["max_diff"] < 1e-4 for r in rows if r["kind"] == kind)  # the ways agree


def test_kernel_vae_attention_written_out_is_sdpa():
    import bench_kernels
    cpu = torch.device("cpu")

    def attention(how):
        torch.manual_seed(0)
        return bench_kernels.vae_attention_step((2, 10, 16), torch.float64, cpu, how)()
    torch.testing.assert_close(attention("explicit"), attention("math"))


@pytest.mark.parametrize("steps_of", ["vae_norm_steps", "unet_norm_steps"])
def test_kernel_bench_compiles_each_norm_once(aot_eager, steps_of):
    # one static graph per shape and way, run by every timed call: no recompile, no fall back to eager;
    # the VAE's steps return the norm's output, the UNet's the input's gradient
    import bench_kernels
    cpu = torch.device("cpu")
    for shape in ((2, 64, 8, 8), (2, 32, 16, 16)):
        steps, outs = getattr(bench_kernels, steps_of)(shape, torch.float32, cpu), {}
        for how, step in list(steps.items()) * 2:  # each way compiled at its first call only
            before = counters["aot_autograd"]["total"]
            outs.setdefault(how, []).append(step())
            assert counters["aot_autograd"]["total"] - before == (len(outs[how]) == 1)
            assert outs[how][-1].is_contiguous(memory_format=torch.channels_last)
        for how in bench_kernels.NORM_WAYS[1:]:  # the same x: the same norm, or gradient
            torch.testing.assert_close(outs["native"][0], outs[how][0], atol=1e-4, rtol=1e-4)
        assert outs["native"][0].std() > 0.1  # (a norm with random weights: not a constant)


def test_bench_kernels_refuses_bad_flags(tmp_path, monkeypatch):
    import bench_kernels
    for argv in (["--res", "0"], ["--batch", "0"], ["--iters", "0"], ["--text", "0"], ["--device", "tpu"],
                 ["--which", "unet_norm,norms"]):
        with pytest.raises(SystemExit):
            bench_kernels.main(argv + ["--device", "cpu"] if "--device" not in argv else argv)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device visible"):
        bench_kernels.main([])  # the default device: a message, not a traceback
    with pytest.raises(SystemExit, match="cannot write a file there"):
        bench_kernels.main(["--device", "cpu", "--json", str(tmp_path / "nowhere" / "k.json")])


def test_kernel_totals_of_a_shape_no_kernel_takes_are_none(monkeypatch):
    # every backend refuses one attention shape: its kind's "best per shape" total is None, not a sum without it
    import bench_kernels
    refused, seen = object(), []

    def attention_step(shape, *args):
        seen.append(shape)
        return refused if shape == seen[0] else (lambda: None)
    monkeypatch.setattr(bench_kernels, "attention_step", attention_step)
    for steps in ("vae_norm_steps", "unet_norm_steps"):  # nothing to compile
        monkeypatch.setattr(bench_kernels, steps,
                            lambda *args: dict.fromkeys(bench_kernels.NORM_WAYS, lambda: torch.zeros(1)))
    monkeypatch.setattr(bench_kernels, "timer", lambda device, fn, iters, warmup: None if fn is refused else 1.0)
    _, totals = bench_kernels.main(["--device", "cpu", "--size", "tiny", "--dtype", "fp32", "--res", "64",
                                    "--batch", "2", "--text", "7", "--iters", "1", "--warmup", "0"])
    assert len(set(seen)) > 1 and totals["attention best per shape"] is None and totals["attention math"] is None
    assert totals["convolution best per shape"] > 0 and totals["linear best per shape"] > 0


def test_kernel_steps_start_from_fresh_gradients():
    # as in training, each timed step writes its gradients anew, not onto the last step's (an extra add)
    import bench_kernels
    cpu = torch.device("cpu")
    for step in (bench_kernels.attention_step((1, 2, 8, 4, 8), torch.float32, cpu, bench_kernels.BACKENDS["math"]),
                 bench_kernels.conv_step(((1, 4, 6, 6), (4, 4, 3, 3), (1, 1), (1, 1)), torch.float32, cpu),
                 bench_kernels.linear_step(((3, 5), (2, 5)), torch.float32, cpu)):
        step()
        leaves = [c.cell_contents for c in step.__closure__ if torch.is_tensor(c.cell_contents)
                  and c.cell_contents.requires_grad]
        once = [t.grad.clone() for t in leaves]
        step()
        assert leaves and all(torch.equal(t.grad, g) for t, g in zip(leaves, once))


def test_run_pair_figures_from_scripted_times_and_memory(monkeypatch):
    # timings and memory scripted per call, so every figure of a row has a hand-computed value
    ms = {"ours": [10, 11, 90, 12, 13, 200, 14, 15, 300], "ref": [40, 22, 30, 24, 13, 100, 28, 30, 150]}
    mib = {"ours": [100, 300, 120], "ref": [200, 200, 260]}  # one memory iteration per round
    log = []
    fns = {impl: (lambda impl=impl: log.append(("call", impl))) for impl in ("ours", "ref")}
    impl_of = {fn: impl for impl, fn in fns.items()}
    left = {k: list(v) for k, v in ms.items()}
    left_mib = {k: list(v) for k, v in mib.items()}

    def timed(fn, device):
        log.append(("timed", impl_of[fn]))
        return left[impl_of[fn]].pop(0) / 1000
    monkeypatch.setattr(bench, "timed", timed)

    def peak_of(fn, device):
        log.append(("peak", impl_of[fn]))
        return left_mib[impl_of[fn]].pop(0)
    monkeypatch.setattr(bench, "peak_of", peak_of)
    monkeypatch.setattr(bench, "tensor_peak_of", lambda fn: {"ours": 50.0, "ref": 80.0}[impl_of[fn]])
    monkeypatch.setattr(bench, "attention_ops", lambda fn: ["aten::scaled_dot_product_attention"])
    args = SimpleNamespace(warmup=2, rounds=3, iters=3, compile=False, compile_mode=None, profile="", peak_tflops=800)
    ours, ref = bench.run_pair("unet_fwd", fns, 2.8e12, 4, args, torch.device("cpu"))

    # --warmup untimed calls of each first, then rounds x iters timed ones, the first alternating
    assert sorted(log[:4]) == [("call", "ours")] * 2 + [("call", "ref")] * 2
    timed_log = [impl for what, impl in log if what == "timed"]
    assert [what for what, _ in log[4:] if what != "peak"] == ["timed"] * 18
    # one memory iteration of each per round before its timed ones, who goes first alternating by round
    rounds = [[impl for what, impl in log[4 + 8 * r: 4 + 8 * r + 2]] for r in range(3)]
    assert rounds == [["ours", "ref"], ["ref", "ours"], ["ours", "ref"]]
    assert [what for what, _ in log[4:]] == (["peak"] * 2 + ["timed"] * 6) * 3
    assert timed_log == ["ours", "ref", "ref", "ours"] * 4 + ["ours", "ref"]
    assert ours["ms_all"] == pytest.approx(ms["ours"]) and ref["ms_all"] == pytest.approx(ms["ref"])
    assert ours["ms"] == pytest.approx(14) and ref["ms"] == pytest.approx(30)  # medians, not means
    assert ours["ms_min"] == pytest.approx(10) and ref["ms_min"] == pytest.approx(13)
    assert ours["img_s"] == pytest.approx(4 / 0.014)
    assert ours["gflop_per_iter"] == pytest.approx(2800)
    assert ours["tflops"] == pytest.approx(200) and ours["pct_peak"] == pytest.approx(25)  # 2.8 TFLOP in 14 ms, of 800
    assert ours["ours_ref_ms"] == pytest.approx(14 / 30)
    # median of ours/ref per iteration: 0.25 .5 3 .5 1 2 .5 .5 2
    assert ours["ours_ref_ms_paired"] == pytest.approx(0.5)
    assert ours["peak_mib_all"] == mib["ours"] and ours["peak_mib"] == 120 and ref["peak_mib"] == 200
    assert ours["ours_ref_mem"] == pytest.approx(0.6) and ours["ours_ref_tensor_mem"] == pytest.approx(0.625)
    assert ours["batch"] == 4 and "ours_ref_ms" not in ref


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
                                        ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
                                        ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA GeForce RTX 4090", None)])
def test_percent_of_peak_uses_the_devices_dense_bf16_peak(monkeypatch, name, peak):
    # vendor datasheets, dense bf16 TFLOP/s (half the with-sparsity figure); an unknown GPU gets none
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    def run_rows(args, *rest):
        seen["peak"] = args.peak_tflops
        return []
    monkeypatch.setattr(bench, "run_rows", run_rows)
    bench.main(bench.parse_args(["--device", "cuda", "--which", "unet_fwd"]))
    assert seen["peak"] == peak


def test_check_same_rejects_a_different_function():
    a = torch.ones(4)
    assert bench.check_same("x", a, a, 1e-3) == 0
    with pytest.raises(RuntimeError, match="disagree"):
        bench.check_same("x", a * 1.01, a, 1e-3)
    with pytest.raises(RuntimeError, match="disagree"):
        bench.check_same("x", torch.full((4,), float("nan")), a, 1e-3)


@pytest.mark.parametrize("which", ["unet_fwd", "vae_enc"])
def test_bench_stops_before_timing_when_diffusers_computes_something_else(monkeypatch, which):
    # the reference gets its own, 10% larger output conv: ours is untouched (the models share weights)
    for make, attr in ((bench.diffusers_unet, "conv_out"), (bench.diffusers_vae, "quant_conv")):
        def perturbed(ours, cfg, make=make, attr=attr):
            ref = make(ours, cfg)
            conv = getattr(ref, attr)
            conv.weight = torch.nn.Parameter(conv.weight.detach() * 1.1)
            return ref
        monkeypatch.setattr(bench, make.__name__, perturbed)
    monkeypatch.setattr(bench, "run_pair", lambda *a: pytest.fail("timed a pair that computes different functions"))
    with pytest.raises(RuntimeError, match="disagree"):
        bench.main(bench.parse_args(["--size", "tiny", "--res", "64", "--which", which]))


def test_cpu_peak_memory_counts_only_what_the_call_adds():
    keep = torch.ones(16 * 2 ** 20)  # 64 MiB live before and during the call: not part of its peak
    big = torch.ones(64 * 2 ** 20)  # an earlier 256 MiB peak: the high-water mark must be reset
    del big
    mib = bench.peak_of(lambda: torch.ones(8 * 2 ** 20).sum(), torch.device("cpu"))  # 32 MiB
    assert 28 < mib < 44, mib
    del keep

    # small tensors come from the heap: freed under a live block they stay resident, and a call that
    # reuses them would look free unless that heap is handed back to the OS before measuring
    def blocks():
        return [torch.ones(2 ** 12) for _ in range(2048)]  # 2048 x 16 KiB = 32 MiB
    old = blocks()
    sentinel = torch.ones(16)
    del old
    mib = bench.peak_of(blocks, torch.device("cpu"))
    assert 28 < mib < 44, mib
    del sentinel


def test_tensor_peak_is_exact_and_skips_views_and_in_place_results():
    w = torch.ones(2 ** 20)  # 4 MiB from before: its views and in-place updates allocate nothing
    with bench.TensorPeak() as tp:
        w.add_(1)
        v = w.view(2, -1)
        a = torch.ones(2 ** 18)  # 1 MiB
        b = torch.ones(2 ** 19)  # 2 MiB: 3 MiB live
        del b
        c = torch.ones(2 ** 18)  # 2 MiB live
    assert tp.peak == 3 * 2 ** 20 and tp.now == 2 * 2 ** 20
    del v, a, c


@pytest.mark.parametrize("task,rel", [("depth", 3e-5), ("refer", 1e-3)])
def test_train_step_flops_match_flop_counter(task, rel):
    # the step's FLOPs (UNet + head 3x, frozen VAE and, for refer, frozen CLIP text 1x) against the
    # counter over one real step: context sizes and the head's count come from the task model. Depth
    # is off by +0.0017% (the first conv's input grads, counted, which autograd skips; one text token
    # more would be +0.005%); refer by -0.04% (the text adapter and map products over its 40 tokens,
    # left out of the analytic count)
    args = bench.parse_args(["--size", "tiny", "--res", "64"])
    args.autocast = nullcontext
    step, step_flops = bench.train_setup(task, 2, args, torch.device("cpu"), bench.PRESETS["tiny"],
                                         torch.Generator().manual_seed(0))
    assert step_flops == pytest.approx(counted_flops(step), rel=rel)


def test_sweep_batch_builds_each_batch(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "run_pair", lambda name, fns, fl, batch, *a: seen.append((name, fl, batch)) or [])
    args = bench.parse_args(["--size", "tiny", "--res", "64", "--batch", "3"])
    args.autocast = nullcontext
    bench.sweep_batch(args, torch.device("cpu"), bench.PRESETS["tiny"], torch.Generator().manual_seed(0), [2, 4])
    (n2, f2, b2), (n4, f4, b4) = seen
    assert (n2, b2, n4, b4) == ("train_semseg bs=2", 2, "train_semseg bs=4", 4)
    assert f4 == 2 * f2  # every FLOP term is linear in the batch


def test_sweep_batch_resets_dynamo_before_each_batch(monkeypatch):
    # each batch size gets its own static-shape compile, not a recompile with a dynamic batch dimension
    events = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("reset"))

    def train_setup(task, B, *args):
        events.append(B)
        return None, 0
    monkeypatch.setattr(bench, "train_setup", train_setup)
    monkeypatch.setattr(bench, "run_pair", lambda *a: [])
    bench.sweep_batch(SimpleNamespace(compile=False), torch.device("cpu"), None, None, [2, 4])
    assert events == ["reset", 2, "reset", 4]


def test_a_sweep_batch_out_of_memory_is_a_row_and_the_sweep_goes_on(monkeypatch, tmp_path, capsys):
    # a sweep finds the largest batch a GPU holds: the batch that does not fit is marked, the others are timed
    real = bench.train_setup

    def train_setup(task, B, *args):
        step, step_flops = real(task, B, *args)
        if B != 4:
            return step, step_flops

        def too_big():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return too_big, step_flops
    monkeypatch.setattr(bench, "train_setup", train_setup)
    json_path = tmp_path / "sweep.json"
    bench.main(bench.parse_args(["--size", "tiny", "--res", "64", "--which", "", "--sweep-batch", "2,4,3",
                                 "--iters", "1", "--warmup", "0", "--json", str(json_path)]))
    table = {l.split(" | ")[0].strip(): [c.strip() for c in l.split(" | ")]
             for l in capsys.readouterr().out.splitlines() if l.startswith("train_semseg bs=") and " | " in l}
    assert table["train_semseg bs=4"][2:5] == ["out of memory", "-", "-"]
    assert float(table["train_semseg bs=2"][2]) > 0 and float(table["train_semseg bs=3"][2]) > 0
    rows = json.loads(json_path.read_text())["rows"]
    assert [(r["batch"], r.get("error")) for r in rows] == [(2, None), (4, "out of memory"), (3, None)]


def test_print_table_puts_each_figure_under_its_column(capsys):
    row = dict(name="unet_fwd", impl="ours", ms=12.25, ms_min=10.5, img_s=163.27, peak_mib=2186.4, tensor_mib=99.25,
               tflops=0.125, pct_peak=12.06, ours_ref_ms=0.931, ours_ref_mem=1.004, ours_ref_tensor_mem=0.885)
    bench.print_table([row])
    head, line = [[c.strip() for c in l.split(" | ")] for l in capsys.readouterr().out.splitlines()]
    assert dict(zip(head, line)) == {
        "name": "unet_fwd", "impl": "ours", "ms/iter": "12.2", "min ms": "10.5", "img/s": "163.27", "peak MiB": "2186",
        "tensor MiB": "99.2", "TFLOP/s": "0.125", "% peak": "12.1", "ours/ref ms": "0.931", "ours/ref mem": "1.004",
        "ours/ref tensor": "0.885"}


@pytest.mark.parametrize("epochs", [1, 3])
def test_loader_rate_excludes_the_warm_up_epoch(monkeypatch, epochs):
    # a fake clock: each sample costs 1 s to load and the very first 100 s more (a start-up cost), so
    # the rate is 1 image/s exactly when the untimed first epoch takes the start-up and only later ones count
    # (all --epochs of them: one is enough)
    clock = [0.0]
    monkeypatch.setattr(bench_loader, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            clock[0] += 1 if clock[0] else 101
            return {"image": torch.zeros(3, 2, 2)}

        def set_epoch(self, epoch):
            pass
    assert bench_loader.images_per_second(Slow(), workers=0, batch_size=4, epochs=epochs) == pytest.approx(1.0)


def test_timed_waits_for_the_device_before_stopping_the_clock(monkeypatch):
    # on a GPU the call only queues work: a step's time runs until the device is done with it
    clock = [0.0]
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench, "sync", lambda device: clock.__setitem__(0, clock[0] + 5.0))  # the GPU's work
    assert bench.timed(lambda: clock.__setitem__(0, clock[0] + 1.0), torch.device("cuda")) == 6.0


def test_cuda_peak_memory_is_what_the_call_adds_once_its_work_is_done(monkeypatch):
    # a fake allocator: 100 MiB live, an earlier 900 MiB peak, and the call's 30 MiB landing on synchronize
    MiB = 2 ** 20
    state = dict(now=100 * MiB, peak=900 * MiB, queued=[])

    def synchronize():
        for n in state["queued"]:
            state["peak"] = max(state["peak"], state["now"] + n)
        state["queued"].clear()
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: state.update(peak=state["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    assert bench.peak_of(lambda: state["queued"].append(30 * MiB), torch.device("cuda")) == 30


def test_run_pair_leaves_out_the_memory_figures_it_cannot_measure(monkeypatch):
    # --compile: no TensorPeak (a dispatch mode would make compiled graphs recompile); CUDA graphs
    # (reduce-overhead, max-autotune on CUDA): no allocator peak either, their replay allocates nothing
    monkeypatch.setattr(bench, "sync", lambda device: None)
    monkeypatch.setattr(bench, "timed", lambda fn, device: 0.01)
    monkeypatch.setattr(bench, "attention_ops", lambda fn: [])
    monkeypatch.setattr(bench, "tensor_peak_of", lambda fn: pytest.fail("TensorPeak under --compile"))
    monkeypatch.setattr(bench, "peak_of", lambda fn, device: 1.0)
    fns = {"ours": lambda: None, "ref": lambda: None}
    for mode, device, measured in (("reduce-overhead", "cuda", False), ("max-autotune", "cuda", False),
                                   ("default", "cuda", True), ("reduce-overhead", "cpu", True)):
        args = SimpleNamespace(warmup=0, rounds=1, iters=1, compile=True, compile_mode=mode, profile="",
                               peak_tflops=None)
        ours, ref = bench.run_pair("unet_fwd", fns, 1e9, 1, args, torch.device(device))
        assert ours["tensor_mib"] is None and ref["tensor_mib"] is None and ours["ours_ref_tensor_mem"] is None
        assert (ours["peak_mib"], ours["ours_ref_mem"]) == ((1.0, 1.0) if measured else (None, None)), mode
        assert ours["peak_mib_all"] == ([1.0] if measured else [None]), mode


def test_refer_step_counts_the_frozen_text_tower_once():
    # the refer step = UNet and head 3x, VAE 1x (train_step_flops) plus the CLIP text tower, run forward
    # only under no_grad: its FLOPs as the counter sees them in the model's clip module
    from vpd import flops
    from vpd.demo import TINY_CLIP, TINY_UNET, TINY_VAE
    from vpd.model import build_model
    args = bench.parse_args(["--size", "tiny", "--res", "64"])
    args.autocast = nullcontext
    _, step_flops = bench.train_setup("refer", 2, args, torch.device("cpu"), bench.PRESETS["tiny"],
                                      torch.Generator().manual_seed(0))
    model = build_model("refer", unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP).train()
    fc = FlopCounterMode(display=False, depth=None)
    with fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.rand(2, 3, 64, 64) * 2 - 1, torch.zeros(2, model.max_tokens, dtype=torch.long))
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    text, head = counts["VPDRefer.clip"], counts["VPDRefer.head"] // 2
    assert text > 0
    rest = flops.train_step_flops(TINY_UNET, TINY_VAE, (64, 64), model.max_tokens, batch=2, head_macs=head)
    assert step_flops - rest == text


def run_kernel_bench_on_fakes(monkeypatch, argv, ms_of):
    """bench_kernels.main with nothing built or run: each step is a record of what it was asked for
    (kind, shape, dtype, device, SDPA backend), and the timer returns ms_of(step) (None: refused)."""
    import bench_kernels
    steps = []

    class Step(SimpleNamespace):
        def __call__(self):  # (the norm rows compare their ways' results)
            return torch.zeros(1)

    def fake(kind):
        def make(shape, dtype, device, backend=None):
            steps.append(Step(kind=kind, shape=shape, dtype=dtype, device=device, backend=backend))
            return steps[-1]
        return make
    for kind in ("attention", "conv", "linear", "vae_attention"):
        monkeypatch.setattr(bench_kernels, f"{kind}_step", fake(kind))
    for kind in ("vae_norm", "unet_norm"):
        monkeypatch.setattr(bench_kernels, f"{kind}_steps", lambda shape, dtype, device, kind=kind: {
            how: fake(kind)(shape, dtype, device, how) for how in bench_kernels.NORM_WAYS})

    def timer(device, step, iters, warmup):
        step.cudnn_benchmark = torch.backends.cudnn.benchmark  # as it was when this step was timed
        return ms_of(step)
    monkeypatch.setattr(bench_kernels, "timer", timer)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # and put back after the test
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rows, totals = bench_kernels.main(argv)
    return steps, rows, totals


def test_kernel_rows_tflops_is_one_layers_flops_in_one_layers_time(monkeypatch, capsys):
    # SD v1.5 at 512, batch 16 (the defaults), nothing run: every kernel takes 2 ms. A row's TFLOP/s is
    # fwd + bwd = 3x the forward's FLOPs of one layer over one layer's time, however many layers share it:
    # attention 3 x 2 matmuls x 2 B h Lq Lk d, convolution 3 x 2 B Hout Wout k^2 Cin Cout
    run_kernel_bench_on_fakes(monkeypatch, [], lambda step: 2.0)
    want = {}
    for line in capsys.readouterr().out.splitlines():
        a = re.match(r"\((\d+), (\d+), (\d+), (\d+), (\d+)\) +(\d+) .* ([\d.]+)$", line)
        c = re.match(r"\((\d+), \d+, (\d+), (\d+)\) \((\d+), (\d+), (\d+), \d+\) s(\d+) p(\d+) +(\d+) .* ([\d.]+)$",
                     line)
        if a:
            B, h, lq, lk, d, n = map(int, a.groups()[:6])
            want[line] = (float(a[7]), 3 * 4 * B * h * lq * lk * d / 2e-3 / 1e12, n)
        elif c:
            B, H, W, cout, cin, k, s, p, n = map(int, c.groups()[:9])
            hw = ((H + 2 * p - k) // s + 1) * ((W + 2 * p - k) // s + 1)
            want[line] = (float(c[10]), 3 * 2 * B * hw * k * k * cin * cout / 2e-3 / 1e12, n)
    assert len(want) > 20 and any(n > 1 for _, _, n in want.values())  # rows shared by several layers
    for line, (printed, tflops, n) in want.items():
        assert printed == pytest.approx(tflops, abs=0.006), line


def test_kernel_bench_times_the_sections_asked_for(monkeypatch):
    # --which: the group norms alone (nothing else built or timed), the rows with the most bytes first
    steps, rows, totals = run_kernel_bench_on_fakes(monkeypatch, ["--which", "unet_norm,vae_norm"], lambda step: 1.0)
    assert {s.kind for s in steps} == {r["kind"] for r in rows} == {"unet_norm", "vae_norm"} and totals == {}
    for kind in ("unet_norm", "vae_norm"):
        sizes = [r["count"] * math.prod(r["shape"]) for r in rows if r["kind"] == kind]
        assert len(sizes) > 1 and sizes == sorted(sizes, reverse=True)


def test_kernel_timer_is_the_median_in_ms_after_an_untimed_first_call_and_the_warm_up(monkeypatch):
    # a fake GPU: a call only queues its work, which lands on the clock at the next synchronize. The
    # first call costs 100 s (setup, cuDNN autotuning), the two warm-ups 50 s each, then 1, 2, 6, 4, 3 s:
    # all of it is called, none of the first three is timed, and the result is their median, 3 s, in ms
    import bench_kernels
    clock, queued, costs = [0.0], [0.0], [100, 50, 50, 1, 2, 6, 4, 3]

    def sync(device):
        clock[0] += queued[0]
        queued[0] = 0.0
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench, "sync", sync)
    monkeypatch.setattr(bench_kernels, "sync", sync)
    ms = bench_kernels.timer(torch.device("cuda"), lambda: queued.__setitem__(0, queued[0] + costs.pop(0)),
                             iters=5, warmup=2)
    assert ms == 3000 and costs == []


def test_kernel_timer_gives_no_time_to_a_kernel_that_refuses_the_shape():
    # SDPA raises RuntimeError for a backend that cannot take the inputs: no time, nothing more called;
    # any other error is a bug in the step and is raised
    import bench_kernels
    calls = []

    def refused():
        calls.append(1)
        raise RuntimeError("No available kernel. Aborting execution.")
    assert bench_kernels.timer(torch.device("cpu"), refused, iters=3, warmup=2) is None and calls == [1]

    def broken():
        raise TypeError("a bug in the step")
    with pytest.raises(TypeError):
        bench_kernels.timer(torch.device("cpu"), broken, iters=3, warmup=2)


def dispatched_ops(fn):
    """The aten ops fn() dispatches below autograd, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))
    ops = []
    with Record():
        fn()
    return ops


def test_kernel_attention_steps_run_the_sdpa_backend_they_are_named_after():
    # on a CPU SDPA has a flash kernel and the math path (explicit matmuls and softmax); the efficient
    # and cuDNN kernels are CUDA-only, so those steps must refuse
    import bench_kernels
    from torch.nn.attention import SDPBackend as K
    cpu = torch.device("cpu")
    assert bench_kernels.BACKENDS == {"flash": K.FLASH_ATTENTION, "efficient": K.EFFICIENT_ATTENTION,
                                      "cudnn": K.CUDNN_ATTENTION, "math": K.MATH}
    steps = {name: bench_kernels.attention_step((1, 2, 8, 4, 8), torch.float32, cpu, backend)
             for name, backend in bench_kernels.BACKENDS.items()}
    flash = "aten._scaled_dot_product_flash_attention_for_cpu.default"
    assert flash in dispatched_ops(steps["flash"])
    math_ops = dispatched_ops(steps["math"])
    assert flash not in math_ops and "aten.bmm.default" in math_ops
    for name in ("efficient", "cudnn"):
        with pytest.raises(RuntimeError):
            steps[name]()


def test_kernel_conv_step_is_one_channels_last_convolution_and_its_backward():
    # channels_last: the layout cuDNN's bf16 tensor-core kernels want and that --channels_last trains in;
    # the timed step is the convolution and its backward from the given output gradient, nothing more
    # (no loss reduction, no gradient accumulation, no layout copy)
    import bench_kernels
    step = bench_kernels.conv_step(((2, 4, 6, 6), (8, 4, 3, 3), (2, 2), (1, 1)), torch.float32, torch.device("cpu"))
    leaves = [c.cell_contents for c in step.__closure__ if torch.is_tensor(c.cell_contents)
              and c.cell_contents.requires_grad]
    assert len(leaves) == 2 and all(t.is_contiguous(memory_format=torch.channels_last) for t in leaves)
    step()
    ops = [op for op in dispatched_ops(step) if op != "aten.detach.default"]  # detach: the leaves' grads
    assert ops == ["aten.convolution.default", "aten.convolution_backward.default"]


def test_kernel_steps_do_the_work_their_rows_count(monkeypatch):
    # each step's forward + backward as FlopCounterMode counts it, on the tiny UNet's shapes (math attention:
    # the counter has no formula for the fused CPU kernel), equals the FLOPs its row gives one layer
    import bench_kernels
    counted = {}
    for kind in ("attention", "conv", "linear", "vae_attention"):
        def tagged(shape, *args, make=getattr(bench_kernels, f"{kind}_step"), kind=kind):
            step = make(shape, *args)
            step.key = (kind, shape, args[-1] if "attention" in kind else None)
            return step
        monkeypatch.setattr(bench_kernels, f"{kind}_step", tagged)

    for steps in ("vae_norm_steps", "unet_norm_steps"):  # rows of bytes, not FLOPs
        monkeypatch.setattr(bench_kernels, steps,
                            lambda *args: dict.fromkeys(bench_kernels.NORM_WAYS, lambda: torch.zeros(1)))

    def timer(device, step, iters, warmup):
        if not hasattr(step, "key"):  # a norm's
            return 1.0
        kind, shape, backend = step.key
        if backend not in (None, bench_kernels.BACKENDS["math"], "math"):
            return None
        counted[kind, shape] = counted_flops(step)
        return 1.0
    monkeypatch.setattr(bench_kernels, "timer", timer)
    rows, _ = bench_kernels.main(["--device", "cpu", "--size", "tiny", "--dtype", "fp32", "--res", "64",
                                  "--batch", "2", "--text", "7"])
    kinds = {"attention": "attention", "convolution": "conv", "linear": "linear", "vae_attention": "vae_attention"}
    rows = [r for r in rows if r["kind"] in kinds]
    assert len(counted) == len(rows)
    for r in rows:
        assert counted[kinds[r["kind"]], r["shape"]] == pytest.approx(r["gflop"] * 1e9 / r["count"], rel=1e-12), r


def sd15_unet_layers(batch, latent, n_text):
    """SD v1.5's UNet layers read off its checkpoint's tensors: attention (B, heads, Lq, Lk, d) per
    transformer block, one self- and one cross-attention over the text, with SD v1.5's 8 heads and
    attention levels (input_blocks 1-2 / 4-5 / 7-8 and output_blocks 9-11 / 6-8 / 3-5 at 1, 1/2, 1/4 of
    the latent side, the middle block at 1/8); the 4-D weights' shapes (convolutions) and the 2-D ones (linears),
    a self-attention's q, k and v weights as one, stacked (vpd/unet.py runs them as one linear)."""
    shapes = json.loads(SD15.read_text())["shapes"]
    prefix = "model.diffusion_model."
    weights = {k: s for k, s in shapes.items() if k.startswith(prefix) and k.endswith(".weight")}
    linears = Counter(tuple(s) for k, s in weights.items() if len(s) == 2 and not re.search(r"attn1\.to_[kv]\.", k))
    for k, (c_out, c_in) in ((k, s) for k, s in weights.items() if k.endswith("attn1.to_q.weight")):
        linears[c_out, c_in] -= 1
        linears[3 * c_out, c_in] += 1
    attn = Counter()
    for k, s in shapes.items():
        m = re.fullmatch(re.escape(prefix) + r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\."
                         r"transformer_blocks\.0\.attn1\.to_q\.weight", k)
        if m:
            group, _, i = m[1].partition(".")
            i = int(i or 0)
            level = {"input_blocks": (i - 1) // 3, "middle_block": 3, "output_blocks": 3 - i // 3}[group]
            L, d = (latent >> level) ** 2, s[0] // 8
            attn[batch, 8, L, L, d] += 1
            attn[batch, 8, L, n_text, d] += 1
    return attn, Counter(tuple(s) for s in weights.values() if len(s) == 4), +linears


def test_kernel_layer_shapes_are_sd15s_layers():
    # the hooks see every attention of SD v1.5 with its (Lq, Lk) and head size, one convolution per 4-D
    # weight of the checkpoint, and one linear per 2-D weight, a self-attention's q, k and v joined into one
    import bench_kernels
    from vpd.unet import UNetConfig
    attn, conv, linear = bench_kernels.layer_shapes(UNetConfig(), 3, 512, 150)
    sd_attn, sd_conv, sd_linear = sd15_unet_layers(3, 64, 150)
    assert attn == sd_attn and sum(attn.values()) == 32
    assert Counter(w for (x, w, s, p), n in conv.items() for _ in range(n)) == sd_conv
    assert Counter(w for (x, w), n in linear.items() for _ in range(n)) == sd_linear
    assert all(x[0] == 3 for (x, *_), n in list(conv.items()) + list(linear.items()))


def test_kernel_bench_sums_scripted_times_over_sd15s_layers(monkeypatch, tmp_path):
    # the defaults (SD v1.5, 512, batch 16, 77 tokens, bf16, CUDA), nothing run: flash takes 1 ms a
    # layer, the efficient kernel refuses every shape, cuDNN attention 3 ms, math 4; convolutions 2 ms with
    # cuDNN's default choice and 1 ms autotuned; linears 0.5 ms. Each total is that time times the layer
    # count read off SD v1.5's checkpoint
    from torch.nn.attention import SDPBackend as K
    attn_ms = {K.FLASH_ATTENTION: 1.0, K.EFFICIENT_ATTENTION: None, K.CUDNN_ATTENTION: 3.0, K.MATH: 4.0}

    def ms_of(step):
        if step.kind == "attention":
            return attn_ms[step.backend]
        return (1.0 if step.cudnn_benchmark else 2.0) if step.kind == "conv" else 0.5
    out = tmp_path / "k.json"
    steps, rows, totals = run_kernel_bench_on_fakes(monkeypatch, ["--json", str(out)], ms_of)
    attn, conv, linear = sd15_unet_layers(16, 64, 77)
    na, nc, nl = sum(attn.values()), sum(conv.values()), sum(linear.values())
    assert totals == {"attention flash": na, "attention efficient": None, "attention cudnn": 3 * na,
                      "attention math": 4 * na, "attention best per shape": na,
                      "convolution default": 2 * nc, "convolution autotuned": nc, "convolution best per shape": nc,
                      "linear default": 0.5 * nl, "linear best per shape": 0.5 * nl}
    assert not torch.backends.cudnn.benchmark  # autotuning is switched off again after the convolutions
    assert {r["shape"]: r["count"] for r in rows if r["kind"] == "attention"} == attn
    assert all(s.dtype == torch.bfloat16 and s.device == torch.device("cuda") for s in steps)
    # the VAE's 1-head attention at 64x64: every SDPA kernel and written out
    assert [(s.shape, s.backend) for s in steps if s.kind == "vae_attention"] == [
        ((16, 4096, 512), how) for how in ("flash", "efficient", "cudnn", "math", "explicit")]
    # largest first: attention by query length, convolutions by input height, linears by input size
    for kind, size in (("attention", lambda s: s[2]), ("convolution", lambda s: s[0][2]),
                       ("linear", lambda s: math.prod(s[0]))):
        sizes = [size(r["shape"]) for r in rows if r["kind"] == kind]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1], kind
    saved = json.loads(out.read_text())
    assert saved["device"] == "NVIDIA H100 80GB HBM3" and saved["torch"] == torch.__version__
    assert saved["args"]["batch"] == 16 and saved["args"]["text"] == 77 and saved["args"]["dtype"] == "bf16"
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["totals"] == totals
    with pytest.raises(SystemExit):  # the UNet halves the latent three times: a multiple of 64
        run_kernel_bench_on_fakes(monkeypatch, ["--res", "96"], ms_of)


class LoaderProcesses(torch.utils.data.Dataset):
    """Each sample says which process loaded it (module level: a worker process may need to import it)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import os
        return {"image": torch.zeros(3, 2, 2), "pid": os.getpid()}

    def set_epoch(self, epoch):
        pass


def test_loader_times_the_workers_started_in_the_warm_up_epoch(monkeypatch):
    # with workers, the untimed epoch takes their start-up only if the same workers then load the timed epochs
    import os
    pids = []

    class Recording(torch.utils.data.DataLoader):
        def __iter__(self):
            pids.append(set())
            for batch in super().__iter__():
                pids[-1].update(batch["pid"].tolist())
                yield batch
    monkeypatch.setattr(bench_loader, "DataLoader", Recording)
    bench_loader.images_per_second(LoaderProcesses(), workers=1, batch_size=2, epochs=2)
    assert len(pids) == 3 and pids[0] == pids[1] == pids[2] and os.getpid() not in pids[0]


def test_loader_main_times_each_pipeline_on_synthetic_data(monkeypatch, capsys):
    # 4 synthetic images a task at 64 wide (48 high: NYU's crop shrinks to fit), batch 2, 2 epochs, 0 and
    # 3 workers (3 faked at 7 im/s: no processes): each pipeline timed with the flags, one column per
    # worker count, and the temporary data removed afterwards
    import os
    import sys
    calls, real = [], bench_loader.images_per_second

    def rate(ds, workers, batch_size, epochs):
        calls.append((type(ds).__name__, workers, batch_size, epochs))
        return real(ds, workers, batch_size, epochs) if workers == 0 else 7.0
    monkeypatch.setattr(bench_loader, "images_per_second", rate)
    monkeypatch.setattr(sys, "argv", ["bench_loader.py", "--n", "4", "--size", "64", "--batch-size", "2",
                                      "--epochs", "2", "--workers", "0", "3"])
    bench_loader.main()
    assert calls == [(name, w, 2, 2) for name in ("NYUv2", "ADE20K", "RefCOCO") for w in (0, 3)]
    wrote, head, *table = capsys.readouterr().out.splitlines()
    m = re.fullmatch(r"wrote 12 synthetic images \(48x64\) in [\d.]+ s to (\S+)", wrote)
    assert m and not os.path.exists(m[1])
    assert head.split()[-4:] == ["0", "workers", "3", "workers"]
    assert len(table) == 3 and all(line.endswith(" im/s      7.0 im/s") for line in table)
    assert [int(line[36:].split()[0]) for line in table][:2] == [4, 4]  # depth, semseg: an image a sample
    assert table[0].startswith("depth (NYU recipe, 48x48 crop)")  # the crop it timed


def test_loader_bench_refuses_what_would_time_nothing():
    for argv in (["--n", "0"], ["--size", "16"], ["--batch-size", "0"], ["--epochs", "0"], ["--workers", "-1"]):
        with pytest.raises(SystemExit):
            bench_loader.main(argv)
    # fewer training images than a batch: whole batches only are timed, so no image would be (0.0 im/s)
    with pytest.raises(SystemExit, match="2 training images of --n 2, fewer than --batch-size 4: give a larger --n"):
        bench_loader.main(["--n", "2", "--size", "64", "--batch-size", "4", "--workers", "0"])


def load_gpu_check():
    """A fresh copy of tools/gpu_check.py as a module (tools/ is not a package)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gpu_check_on_cpu(monkeypatch):
    """tools/gpu_check.py with CUDA faked on the CPU: its `torch` is torch but for the CUDA calls, bf16
    autocast is the CPU's, torch.compile a recording pass-through, the UNet tiny with SD's 768-wide text
    context (the script's context and class embeddings are 768 wide), and its 512x512 images and 64x64
    latents at 1/8 the side. Returns (module, faults, record): add to `faults` what should go wrong --
    "forward" (the bf16 UNet output 50% off), "features" / "maps" (eager bf16 features / maps 50% off),
    "compiled" / "compiled_maps" (compiled features / maps 50% off), "zero_grads" (the compiled step passes a
    zero gradient), "vae_grads" (the compiled step lets gradient into the VAE's quant_conv)."""
    import dataclasses
    from vpd.demo import TINY_UNET, TINY_VAE
    from vpd.model import build_model
    from vpd.unet import UNet
    gpu_check = load_gpu_check()
    cfg = dataclasses.replace(TINY_UNET, context_dim=768)
    faults, record = set(), dict(backends=[], compiled=[], calls=0)
    in_compiled = [False]

    class FaultyUNet(UNet):
        def forward(self, *args, **kw):
            out = super().forward(*args, **kw)
            return out * 1.5 if "forward" in faults and torch.is_autocast_enabled("cpu") else out

        def features(self, *args, **kw):
            feats, maps = super().features(*args, **kw)
            if torch.is_autocast_enabled("cpu") and not in_compiled[0]:
                feats = [f * 1.5 for f in feats] if "features" in faults else feats
                maps = {k: m * 1.5 for k, m in maps.items()} if "maps" in faults else maps
            return feats, maps

    def compile(fn):
        record["compiled"].append(fn)

        def run(*args, **kw):
            record["calls"] += 1
            if isinstance(fn, torch.nn.Module):  # the semseg model
                if "vae_grads" in faults:
                    fn.backbone.vae.quant_conv.requires_grad_(True)
                    fn.backbone.encode_images = lambda images: fn.backbone.vae.encode(images).mode()
                out = fn(*args, **kw)
                return out * 0 if "zero_grads" in faults else out
            in_compiled[0] = True
            try:
                feats, maps = fn(*args, **kw)
            finally:
                in_compiled[0] = False
            return ([f * 1.5 for f in feats] if "compiled" in faults else feats), (
                {k: m * 1.5 for k, m in maps.items()} if "compiled_maps" in faults else maps)
        return run

    def small(make):
        def f(*args, **kw):
            if len(args) == 4:  # (B, C, H, W): images, latents
                args = (*args[:2], args[2] // 8, args[3] // 8)
            elif len(args) == 3 and isinstance(args[2], tuple):  # randint(low, high, (B, H, W)): labels
                args = (*args[:2], (args[2][0], args[2][1] // 8, args[2][2] // 8))
            return make(*args, **kw)
        return f

    class FakeTorch:
        def __getattr__(self, name):
            return getattr(torch, name)
    fake = FakeTorch()
    fake.cuda = SimpleNamespace(is_available=lambda: True, get_device_name=lambda device=None: "fake GPU",
                                synchronize=lambda: None, max_memory_allocated=lambda device=None: 0)
    fake.device = lambda kind: torch.device("cpu")
    fake.autocast = lambda device_type, dtype=None, **kw: torch.autocast("cpu", dtype, **kw)
    fake.compile = compile
    fake.rand, fake.randn, fake.randint = small(torch.rand), small(torch.randn), small(torch.randint)
    monkeypatch.setattr(gpu_check, "torch", fake)
    monkeypatch.setattr(gpu_check, "UNet", FaultyUNet)
    monkeypatch.setattr(gpu_check, "UNetConfig", lambda: cfg)
    monkeypatch.setattr(gpu_check, "build_model", lambda task, class_embeddings: build_model(
        task, unet_cfg=cfg, vae_cfg=TINY_VAE, class_embeddings=class_embeddings))
    real_sdpa_kernel = gpu_check.sdpa_kernel
    monkeypatch.setattr(gpu_check, "sdpa_kernel", lambda backend: record["backends"].append(backend)
                        or real_sdpa_kernel(backend))
    return gpu_check, faults, record


def test_gpu_check_passes_a_sound_run(gpu_check_on_cpu, capsys):
    # the flash kernel forced under bf16 autocast; the UNet's features and the semseg model each compiled
    # and run; every check passes and says so
    gpu_check, faults, record = gpu_check_on_cpu
    gpu_check.main()
    lines = capsys.readouterr().out.splitlines()
    assert record["backends"] == [SDPBackend.FLASH_ATTENTION]
    features, model = record["compiled"]
    assert features.__name__ == "features" and isinstance(model, torch.nn.Module) and record["calls"] == 2
    assert len(lines) == 6 and lines[-1] == "GPU CHECKS PASSED"


@pytest.mark.parametrize("fault, last, failed", [
    ("forward", "flash attention bf16 forward", "flash attention bf16 forward against fp32"),
    ("features", "bf16 features + maps", "bf16 features and maps against fp32"),
    ("maps", "bf16 features + maps", "bf16 features and maps against fp32"),
    ("compiled", "compiled bf16 features", "compiled bf16 features and maps against fp32"),
    ("compiled_maps", "compiled bf16 features", "compiled bf16 features and maps against fp32"),
    ("zero_grads", "compiled bf16 features", "compiled bf16 semseg step: no UNet gradient"),
    ("vae_grads", "compiled bf16 features", "compiled bf16 semseg step: VAE gradients")])
def test_gpu_check_fails_at_the_check_for_what_went_wrong(gpu_check_on_cpu, capsys, fault, last, failed):
    # each fault is caught by its own check, which names itself: the lines printed stop at that check's
    gpu_check, faults, record = gpu_check_on_cpu
    faults.add(fault)
    with pytest.raises(SystemExit, match=f"^GPU CHECK FAILED: {failed}$"):
        gpu_check.main()
    assert capsys.readouterr().out.splitlines()[-1].startswith(last)


def test_gpu_check_rel_err_is_the_difference_norm_over_the_references():
    # a = (3, -1) against b = (3, 4): |a - b| = |(0, 5)| = 5 over |b| = 5; bf16 inputs are compared in float32
    rel_err = load_gpu_check().rel_err
    assert rel_err(torch.tensor([3.0, -1.0]), torch.tensor([3.0, 4.0])) == 1.0
    assert rel_err(torch.tensor([3.0, -1.0], dtype=torch.bfloat16), torch.tensor([3.0, 4.0])) == 1.0


# ----------------------------------------------------------------------------- what the reported figures rest on

def test_memory_figures_are_in_mib(monkeypatch):
    # /proc's VmHWM over VmRSS in KiB, and live tensor bytes, both reported in MiB (2^20 bytes, not 10^6)
    kib = {"VmRSS": 100 * 1024, "VmHWM": 100 * 1024}
    monkeypatch.setattr(bench.PeakMemory, "_status_kib", staticmethod(lambda field: kib[field]))
    assert bench.peak_of(lambda: kib.update(VmHWM=132 * 1024), torch.device("cpu")) == 32.0
    assert bench.tensor_peak_of(lambda: torch.ones(2 ** 18)) == 1.0  # 2^18 float32 values: 1 MiB


def test_the_same_function_check_sees_small_and_one_sided_differences(monkeypatch):
    a = torch.ones(4)
    with pytest.raises(RuntimeError, match="disagree"):  # smaller everywhere: |ours - ref| must be taken
        bench.check_same("x", a * 0.99, a, 1e-3)
    # diffusers' output conv 0.2% larger: max |ours - ref| / max |ref| = 0.002 / 1.002, about 2e-3 > 1e-3
    for make, name in ((bench.diffusers_unet, "conv_out"), (bench.diffusers_vae, "quant_conv")):
        def scaled(ours, cfg, make=make, name=name):
            ref = make(ours, cfg)
            conv = getattr(ref, name)  # new tensors: the reference may share ours' storage
            conv.weight = torch.nn.Parameter(conv.weight.detach() * 1.002)
            conv.bias = torch.nn.Parameter(conv.bias.detach() * 1.002)
            return ref
        monkeypatch.setattr(bench, make.__name__, scaled)
    monkeypatch.setattr(bench, "run_pair", lambda *a: pytest.fail("timed despite the difference"))
    for which in ("unet_fwd", "vae_enc"):
        with pytest.raises(RuntimeError, match="disagree"):
            bench.main(bench.parse_args(["--size", "tiny", "--res", "64", "--which", which]))


class Convolutions(torch.utils._python_dispatch.TorchDispatchMode):
    """Records each forward convolution: its input's and weight's layouts and its output dtype."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            self.seen.append((args[0].is_contiguous(memory_format=torch.channels_last),
                              args[1].is_contiguous(memory_format=torch.channels_last), out.dtype))
        return out


def bench_convolutions(monkeypatch, extra):
    """bench.main on the tiny models with `extra` flags: what torch.compile was given, and each timed
    function's convolutions (run once outside the recording first: lazy set-up)."""
    compiled, seen = [], {}
    monkeypatch.setattr(torch, "compile", lambda m, mode=None, **kw: compiled.append((type(m).__name__, mode)) or m)

    def run_pair(name, fns, flops, batch, args, device):
        for impl, fn in fns.items():
            fn()
            with Convolutions() as c:
                fn()
            seen[name, impl] = c.seen
        return []
    monkeypatch.setattr(bench, "run_pair", run_pair)
    monkeypatch.setattr(bench, "print_table", lambda rows: None)
    bench.main(bench.parse_args(["--size", "tiny", "--res", "128", "--batch", "2", "--which", "unet,vae,train_semseg",
                                 *extra]))
    return compiled, seen


def test_layout_precision_compile_and_checkpointing_flags_reach_the_timed_models(monkeypatch):
    mode = "max-autotune-no-cudagraphs"
    compiled, fast = bench_convolutions(monkeypatch, ["--channels-last", "--grad-checkpoint", "--dtype", "bf16",
                                                      "--compile", "--compile-mode", mode])
    _, plain = bench_convolutions(monkeypatch, [])
    assert Counter(compiled) == Counter([(n, mode) for n in ("UNet", "UNet2DConditionModel", "VPDSeg")]
                                        + [("function", mode)] * 2  # the two VAEs' encode
                                        + [("function", None)])  # + the loss, as train.py
    for key, convs in fast.items():
        assert convs and convs[0][0], key  # the input enters channels-last
        assert all(w for _, w, _ in convs) and all(d == torch.bfloat16 for _, _, d in convs), key
    for key in (("unet_fwdbwd", "ours"), ("unet_fwdbwd", "ref"), ("train_semseg", "ours")):
        assert len(fast[key]) > len(plain[key]), key  # checkpointing recomputes forwards in the backward


def test_warm_up_work_is_finished_before_the_clock_starts(monkeypatch, capsys):
    # a fake GPU: calls queue work, a sync runs it on the clock; warm-up calls queue 100 s, timed ones 1 s
    clock, queued, calls = [0.0], [0.0], [0]

    def sync(device):
        clock[0] += queued[0]
        queued[0] = 0.0

    def fn():
        calls[0] += 1
        queued[0] += 100 if calls[0] <= 2 else 1
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench, "sync", sync)
    monkeypatch.setattr(bench, "attention_ops", lambda fn: [])
    args = SimpleNamespace(warmup=2, rounds=1, iters=3, compile=True, compile_mode="reduce-overhead", profile="",
                           peak_tflops=None)
    (row,) = bench.run_pair("unet_fwd", {"ours": fn}, 1e9, 1, args, torch.device("cuda"))
    assert row["ms_all"] == [1000.0] * 3
    # the warm-up's time is printed (with --compile, the compile's: what a GPU call's limits must allow)
    assert "warm-up unet_fwd / ours: 200.0 s\n" in capsys.readouterr().out


def kernel_lines(monkeypatch, capsys):
    """bench_kernels' printed report with scripted times: flash 1 ms, cuDNN 3, math 4 (efficient refused)."""
    attention = {SDPBackend.FLASH_ATTENTION: 1.0, SDPBackend.EFFICIENT_ATTENTION: None,
                 SDPBackend.CUDNN_ATTENTION: 3.0, SDPBackend.MATH: 4.0}

    def ms_of(step):
        if step.kind == "attention":
            return attention[step.backend]
        return (1.0 if step.cudnn_benchmark else 2.0) if step.kind == "conv" else 0.5
    run_kernel_bench_on_fakes(monkeypatch, [], ms_of)
    return capsys.readouterr().out.splitlines()


def test_kernel_report_sums_attention_over_layers_and_rates_rows_at_their_fastest_kernel(monkeypatch, capsys):
    from vpd import flops
    from vpd.unet import UNetConfig
    lines = kernel_lines(monkeypatch, capsys)
    kinds = flops.by_kind(flops.unet_layers(UNetConfig(), (64, 64), n_ctx=77, batch=16))
    gflop = 6 * (kinds["self_attn"] + kinds["cross_attn"]) / 1e9  # forward + backward: 3 x 2 FLOPs per MAC
    i = next(i for i, line in enumerate(lines) if line.startswith("attention: "))
    assert float(re.match(r"attention: ([\d.]+) GFLOP", lines[i])[1]) == pytest.approx(gflop, abs=0.05)
    flash = re.match(r"\s+flash\s+([\d.]+) ms\s+([\d.]+) TFLOP/s", lines[i + 1])
    assert float(flash[1]) == 32.0  # SD's 32 attention layers at 1 ms each
    assert float(flash[2]) == pytest.approx(gflop / 32.0, abs=0.006)  # GFLOP per ms = TFLOP/s
    rows = [re.match(r"\((\d+), (\d+), (\d+), (\d+), (\d+)\) +\d+ .* ([\d.]+)$", line) for line in lines]
    rows = [r for r in rows if r]
    assert len(rows) > 3
    for r in rows:  # each shape's TFLOP/s at flash's 1 ms, not at math's 4
        b, h, lq, lk, d = map(int, r.groups()[:5])
        assert float(r[6]) == pytest.approx(3 * 4 * b * h * lq * lk * d / 1e-3 / 1e12, abs=0.006)


def test_reference_checks_compare_full_float32_products(monkeypatch):
    # a bf16 run on a GPU lets float32 products take TF32 (vpd/dist.py); the checks that ours and the
    # reference compute the same function run at full float32 all the same, and the setting comes back
    seen = []
    check_same = bench.check_same
    monkeypatch.setattr(bench, "check_same", lambda *a: seen.append(torch.get_float32_matmul_precision())
                        or check_same(*a))
    was = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        bench.main(bench.parse_args(["--size", "tiny", "--res", "64", "--which", "unet_fwd,vae_enc",
                                     "--iters", "1", "--warmup", "0"]))
        assert seen == ["highest"] * 2 and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(was)
