"""vpd/dist.py: setup under torchrun's environment (the process group and the GPUs faked), autocast and the
output folder."""
import os

import pytest
import torch
import torch.distributed

from vpd import dist


def fake_launch(monkeypatch, gpus, env):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, device_id=None: calls.append((backend, device_id)))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return calls


def test_setup_under_torchrun_takes_the_global_rank_and_the_local_gpu(monkeypatch):
    # process 5 of 8, the second on its node: rank 5 in the group, but GPU 1 of this node
    calls = fake_launch(monkeypatch, True, {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert dist.setup("auto") == (5, 8, torch.device("cuda", 1))
    assert calls == [("set_device", 1), ("nccl", torch.device("cuda", 1))]
    calls.clear()
    assert dist.setup("cpu") == (5, 8, torch.device("cpu"))  # CPU processes talk over gloo
    assert calls == [("gloo", None)]


def test_setup_without_torchrun_is_one_process_and_auto_prefers_the_gpu(monkeypatch):
    calls = fake_launch(monkeypatch, True, {})
    assert dist.setup("auto") == (0, 1, torch.device("cuda"))
    calls = fake_launch(monkeypatch, False, {})
    assert dist.setup("auto") == (0, 1, torch.device("cpu")) and calls == []


def test_setup_refuses_a_missing_gpu_and_an_unknown_device(monkeypatch):
    fake_launch(monkeypatch, False, {})
    with pytest.raises(SystemExit, match="--device cuda asked for, but torch sees no CUDA device"):
        dist.setup("cuda")
    with pytest.raises(SystemExit, match="--device must be cpu, cuda or auto, not 'tpu'"):
        dist.setup("tpu")


def test_broadcast_buffers_sends_every_buffer_from_the_source_rank(monkeypatch):
    # BatchNorm statistics drift apart over ranks: before an evaluation every rank takes rank 0's
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4))
    sent = []
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast", lambda t, src: sent.append((id(t), src)))
    dist.broadcast_buffers(model)
    assert sent == [(id(b), 0) for b in model.buffers()] and len(sent) == 6  # mean, var, count of each BN
    monkeypatch.setattr(dist, "is_dist", lambda: False)
    dist.broadcast_buffers(model)  # one process: nothing to send
    assert len(sent) == 6


def test_helpers_outside_a_process_group_are_one_process():
    assert not dist.is_dist()
    assert (dist.rank(), dist.world_size()) == (0, 1)
    dist.barrier()
    dist.teardown()


def test_teardown_and_barrier_reach_the_process_group_when_there_is_one(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("destroy"))
    dist.barrier()
    dist.teardown()
    assert calls == ["barrier", "destroy"]


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # a CUDA autocast built on a CPU-only machine
def test_amp_autocast_defaults_to_bf16_on_a_gpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with dist.amp_autocast(None, cpu)():  # off on a CPU, where bf16 is slower
        assert not torch.is_autocast_enabled("cpu")
    with dist.amp_autocast("bf16", cpu)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with dist.amp_autocast("off", cpu)():
        assert not torch.is_autocast_enabled("cpu")
    # on a GPU the default is bf16; the context is only built here (entering it wants a GPU)
    ctx = dist.amp_autocast(None, cuda)()
    assert (ctx.device, ctx.fast_dtype) == ("cuda", torch.bfloat16)
    assert dist.amp_autocast("fp16", cuda)().fast_dtype == torch.float16


def test_autocast_on_a_gpu_lets_float32_products_take_tf32(monkeypatch):
    # (the products left in float32 under autocast take bf16 values: tests/test_heads.py checks TF32 holds them)
    set_to = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", set_to.append)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amp, device in (("off", cuda), ("bf16", cpu), (None, cpu)):
        dist.amp_autocast(amp, device)
    assert set_to == []  # float32 runs (the official configuration's stand-in) keep full float32 products
    for amp in (None, "bf16", "fp16"):
        dist.amp_autocast(amp, cuda)
    assert set_to == ["high"] * 3


def test_writable_dir_creates_the_folder_and_refuses_one_it_cannot_write(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    dist.writable_dir(tmp_path / "a" / "b")
    assert os.listdir(tmp_path / "a" / "b") == []  # the probe file is gone
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is not writable"):
        dist.writable_dir(tmp_path / "file" / "out")
    with pytest.raises(SystemExit, match=f"--out {tmp_path / 'file'} is a file, not a folder"):
        dist.writable_dir(tmp_path / "file")
