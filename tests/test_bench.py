"""bench.py runs on the tiny config: ours against diffusers on the same function, or ours alone."""
import json
import math

import pytest

import bench


@pytest.mark.parametrize("no_ref", [False, True])
def test_bench_rows_and_json(tmp_path, no_ref):
    out = tmp_path / "rows.json"
    argv = ["--size", "tiny", "--res", "128", "--batch", "2", "--which", "unet,vae,train_semseg",
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
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))


def test_bench_profile_appends_a_table_per_row(tmp_path):
    out = tmp_path / "profile.txt"
    argv = ["--size", "tiny", "--res", "128", "--which", "unet_fwd,vae_enc", "--iters", "1", "--warmup", "0",
            "--profile", str(out)]
    bench.main(bench.parse_args(argv))
    text = out.read_text()
    heads = [line for line in text.splitlines() if line.startswith("== ")]
    assert heads == ["== unet_fwd / ours", "== unet_fwd / ref", "== vae_enc / ours", "== vae_enc / ref"]
    assert "aten::convolution" in text and "aten::_scaled_dot_product" in text


def test_bench_refuses_bad_flags():
    for argv in (["--compile-mode", "reduce-overhead"], ["--res", "100"], ["--sdpa", "cudnn"], ["--cudnn-benchmark"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_kernel_bench_times_every_layer_shape_of_the_unet(tmp_path):
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
    assert all(r["ms"]["default"] > 0 and r["ms"]["autotuned"] > 0 for r in rows if r["kind"] == "convolution")
    assert all(r["ms"]["default"] > 0 for r in rows if r["kind"] == "linear")
    assert totals["attention math"] > 0 and totals["convolution default"] > 0 and totals["linear default"] > 0
    assert json.loads((tmp_path / "k.json").read_text())["totals"] == totals
