"""The group norms of vpd/norm.py: the ways they compile for a GPU against torch's, and which way each network takes."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from vpd import norm as norm_module
from vpd.norm import GroupNorm, GroupNorm32, group_norm_in_layout


def spread_input(shape=(3, 12, 5, 7)):
    """Channels of a group far apart in mean and scale, and far from zero: the combination must not cancel."""
    C = shape[1]
    x = torch.randn(shape) * torch.rand(C, 1, 1) * 4 + torch.randn(C, 1, 1) * 50
    return x.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("per_channel", [True, False])
def test_group_norm_in_layout_is_group_norm(per_channel):
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 12, eps=1e-6)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = spread_input()
    want = norm.double()(x.double())
    torch.testing.assert_close(group_norm_in_layout(x.double(), norm, per_channel), want)
    norm.float()
    err = {name: (y.double() - want).abs().max().item()  # in float32, as both networks compute it
           for name, y in (("ours", group_norm_in_layout(x, norm, per_channel)), ("torch", norm(x)))}
    assert err["ours"] < 1e-4 and err["ours"] < 4 * err["torch"] + 1e-6, err
    # the dtype F.group_norm gives under CUDA autocast (a bf16 input, float32 weights: float32), or without it
    assert group_norm_in_layout(x.bfloat16(), norm, per_channel).dtype == torch.float32
    assert group_norm_in_layout(x.bfloat16(), norm.bfloat16(), per_channel).dtype == torch.bfloat16


@pytest.mark.parametrize("per_channel", [True, False])
def test_gradients_in_layout_are_group_norms(per_channel):
    # the UNet trains through these: their gradients against torch's group norm backward, in float64
    torch.manual_seed(0)
    x = spread_input().double().requires_grad_()
    w, b = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    grad = torch.randn(3, 12, 5, 7, dtype=torch.float64).to(memory_format=torch.channels_last)
    norm = SimpleNamespace(num_groups=4, weight=w.requires_grad_(), bias=b.requires_grad_(), eps=1e-5)
    got = torch.autograd.grad(group_norm_in_layout(x, norm, per_channel), (x, w, b), grad)
    want = torch.autograd.grad(F.group_norm(x, 4, w, b, eps=1e-5), (x, w, b), grad)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)
    assert got[0].is_contiguous(memory_format=torch.channels_last)  # the gradient keeps the layout


def test_on_a_gpu_torch_group_norm_turns_nhwc_into_nchw_and_ours_do_not():
    # why the UNet compiles its norms in x's layout for a GPU (vpd/norm.py): F.group_norm makes a GPU input
    # contiguous (NCHW) first, so its traced output and its input's gradient are NCHW, which cuDNN's
    # convolution backward then copies to NHWC; on the CPU it keeps the input's layout
    with FakeTensorMode(), torch.no_grad():  # a GPU tensor without a GPU
        for device, torch_keeps_nhwc in (("cuda", False), ("cpu", True)):
            x = torch.empty(2, 64, 8, 8, device=device).to(memory_format=torch.channels_last)
            norm = SimpleNamespace(num_groups=32, weight=torch.empty(64, device=device),
                                   bias=torch.empty(64, device=device), eps=1e-5)
            nhwc = [y.is_contiguous(memory_format=torch.channels_last) for y in (
                F.group_norm(x, 32, norm.weight, norm.bias), group_norm_in_layout(x, norm, per_channel=False),
                group_norm_in_layout(x, norm, per_channel=True))]
            assert nhwc == [torch_keeps_nhwc, True, True], device


def test_compiled_for_gpu_means_compiling_a_gpu_tensor(monkeypatch):
    with FakeTensorMode():
        gpu, cpu = torch.empty(1, 32, 4, 4, device="cuda"), torch.empty(1, 32, 4, 4)
    assert not norm_module.compiled_for_gpu(gpu)  # eager: F.group_norm (one fused aten kernel)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert norm_module.compiled_for_gpu(gpu) and not norm_module.compiled_for_gpu(cpu)


def test_which_way_each_norm_takes(gpu_norm_ways):
    # compiled for a GPU (stood in for here): the UNet's norms always in x's layout, per group below
    # PER_CHANNEL_PIXELS pixels and per channel from there up; the VAE's per channel from there up, else
    # F.group_norm; all the same norm
    pixels = norm_module.PER_CHANNEL_PIXELS
    torch.manual_seed(0)
    for module, h, way in ((GroupNorm32(64), pixels - 1, [False]), (GroupNorm32(64), pixels, [True]),
                           (GroupNorm(32, 64), pixels - 1, []), (GroupNorm(32, 64), pixels, [True])):
        torch.nn.init.normal_(module.weight), torch.nn.init.normal_(module.bias)
        x = torch.randn(1, 64, h, 1).to(memory_format=torch.channels_last)
        gpu_norm_ways.clear()
        with torch.no_grad():
            xin = x.bfloat16() if isinstance(module, GroupNorm32) else x
            y = module(xin)
        assert gpu_norm_ways == way, (type(module).__name__, h)
        assert y.dtype == xin.dtype  # a float32 output would carry float32 activations on through the UNet
        want = F.group_norm(x.double(), 32, module.weight.double(), module.bias.double(), module.eps)
        tol = 2 ** -7 if isinstance(module, GroupNorm32) else 1e-5  # GroupNorm32 hands back bf16 here
        assert (y.double() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.parametrize("cls", [GroupNorm, GroupNorm32])
def test_eager_norms_are_torchs(cls):
    # eager (and on the CPU) both norms are F.group_norm itself
    torch.manual_seed(0)
    module = cls(32, 64) if cls is GroupNorm else cls(64)
    torch.nn.init.normal_(module.weight), torch.nn.init.normal_(module.bias)
    x = torch.randn(2, 64, 3, 3)
    with torch.no_grad():
        assert torch.equal(module(x), F.group_norm(x, 32, module.weight, module.bias, module.eps))
