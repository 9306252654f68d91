import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vpd.checkpoint import CheckpointError, listing, load_checkpoint, torch_load

# torch 2.6 lists a file's globals (torch.serialization.get_unsafe_globals_in_checkpoint): what reading
# Lightning's objects as stand-ins needs. torch 2.5 refuses such files with a message saying so (tested below).
LISTS_GLOBALS = hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint")


def toy():
    return nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4))


def sd_layout(m, prefix="model.x."):
    state = {prefix + k: v.clone() for k, v in m.state_dict().items()}
    state["other.weight"] = torch.zeros(2)  # another component's tensor: must be passed over
    return state


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "legacy ckpt", "dict"])
def test_loads_prefix_strictly(tmp_path, fmt):
    src_model = toy()
    state = sd_layout(src_model)
    if fmt == "safetensors":
        src = tmp_path / "m.safetensors"
        save_file(state, src)
    elif fmt.endswith("ckpt"):  # torch < 1.6 wrote the legacy (non-zip) format, which cannot be mmap'd
        src = tmp_path / "m.ckpt"
        torch.save({"state_dict": state, "global_step": 3}, src, _use_new_zipfile_serialization=fmt == "ckpt")
    else:
        src = state
    with torch.device("meta"):
        m = toy()
    load_checkpoint(m, src, "model.x.")
    for k, v in src_model.state_dict().items():
        assert torch.equal(m.state_dict()[k], v)


def test_a_live_module_keeps_its_dtype_and_its_parameters():
    # a module not on `meta` is copied into: a bfloat16 module stays bfloat16, and an optimizer holding
    # its parameters still holds the module's
    src_model = toy()
    m = toy().bfloat16()
    params = [id(p) for p in m.parameters()]
    load_checkpoint(m, sd_layout(src_model), "model.x.")
    assert [id(p) for p in m.parameters()] == params
    for k, v in src_model.state_dict().items():
        assert m.state_dict()[k].dtype == torch.bfloat16 and torch.equal(m.state_dict()[k], v.bfloat16())


def test_errors_name_keys_and_leave_module_untouched(tmp_path):
    m = toy()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    state = sd_layout(toy())
    state["model.x.0.weight"] = torch.zeros(5, 3)
    del state["model.x.1.bias"]
    state["model.x.9.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(m, state, "model.x.", cfg="ToyConfig(width=4)")
    msg = str(e.value)
    assert "missing (1): 1.bias" in msg and "unexpected (1): 9.weight" in msg
    assert "0.weight: file [5, 3] vs model [4, 3]" in msg and "ToyConfig(width=4)" in msg
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(toy(), tmp_path / "nope.safetensors", "model.x.")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not tensors")
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        load_checkpoint(toy(), junk, "model.x.")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("plain text")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as e:
        load_checkpoint(toy(), junk, "model.x.")
    # torch's advice to load with weights_only=False (running code from the file) is not passed on
    assert "not a torch file" in str(e.value) and "weights_only" not in str(e.value)
    with pytest.raises(CheckpointError, match="no tensors under 'model.x.'") as e:
        load_checkpoint(toy(), {"vae.w": torch.zeros(1)}, "model.x.")
    assert "VPD release" not in str(e.value)
    bare = tmp_path / "tensor.pt"  # one tensor, no names
    torch.save(torch.zeros(2), bare)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a dict of tensors"):
        load_checkpoint(toy(), bare, "model.x.")
    nested = tmp_path / "vpd_depth.ckpt"  # tensors one level down, as in a released VPD file
    torch.save({"model": sd_layout(toy()), "optimizer": {}}, nested)
    with pytest.raises(CheckpointError, match=r"no tensors at its top level or under 'state_dict' "
                                              r"\(its keys: model, optimizer\); it looks like a VPD release: "
                                              r"eval.py and predict.py take that as --ckpt"):
        load_checkpoint(toy(), nested, "model.x.")
    # the semseg release keeps its tensors under state_dict, the UNet as unet.unet.diffusion_model.*
    with pytest.raises(CheckpointError, match=r"no tensors under 'model.x.'.*it looks like a VPD release"):
        load_checkpoint(toy(), {"unet.unet.diffusion_model.out.0.weight": torch.zeros(1)}, "model.x.")


def test_linear_weight_fits_1x1_conv():
    m = nn.Conv2d(4, 3, 1)
    w, b = torch.randn(3, 4), torch.randn(3)
    load_checkpoint(m, {"p.weight": w, "p.bias": b}, "p.")
    assert torch.equal(m.weight[:, :, 0, 0], w)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(m, {"p.weight": torch.randn(4, 3), "p.bias": b}, "p.")
    with pytest.raises(CheckpointError, match="wrong shape"):  # a transposed linear, as torch refuses it too
        load_checkpoint(nn.Linear(3, 4), {"p.weight": torch.randn(3, 4), "p.bias": torch.randn(4)}, "p.")
    with pytest.raises(CheckpointError, match="wrong shape"):  # only that way round: no 1x1 conv for a linear
        load_checkpoint(nn.Linear(4, 3), {"p.weight": torch.randn(3, 4, 1, 1), "p.bias": b}, "p.")
    with pytest.raises(CheckpointError, match="wrong shape"):  # a linear is no 3x3 conv
        load_checkpoint(nn.Conv2d(4, 3, 3), {"p.weight": w, "p.bias": b}, "p.")


def test_integer_buffers_keep_their_dtype():
    # BatchNorm's num_batches_tracked is int64: the float dtype asked for applies to float tensors only
    src = nn.BatchNorm2d(2)
    src.num_batches_tracked.fill_(7)
    with torch.device("meta"):
        m = nn.BatchNorm2d(2)
    load_checkpoint(m, {"p." + k: v for k, v in src.state_dict().items()}, "p.", dtype=torch.bfloat16)
    assert m.num_batches_tracked.dtype == torch.int64 and m.num_batches_tracked.item() == 7
    assert m.weight.dtype == torch.bfloat16


def test_listing_counts_only_when_it_cuts():
    assert listing("abcde", 5) == "a, b, c, d, e"
    assert listing("abcdef", 5) == "a, b, c, d, e, ... (6 in all)"


def test_modules_loaded_from_a_dict_own_their_tensors():
    state = sd_layout(toy())
    with torch.device("meta"):
        a, b = toy(), toy()
    load_checkpoint(a, state, "model.x.")
    load_checkpoint(b, state, "model.x.")
    with torch.no_grad():
        a[0].weight.add_(1.0)  # an optimizer step on one model
    assert torch.equal(b[0].weight, state["model.x.0.weight"])  # neither the other model nor the dict moves
    assert not torch.equal(a[0].weight, state["model.x.0.weight"])
    assert a[0].weight.data_ptr() != state["model.x.0.weight"].data_ptr()


@pytest.mark.skipif(not LISTS_GLOBALS, reason="torch < 2.6")
def test_ckpt_with_lightning_objects_loads_and_other_objects_are_refused(tmp_path, monkeypatch):
    # ldm's SD v1 .ckpt files carry Lightning's ModelCheckpoint callback state next to the weights
    import sys
    import types

    import numpy as np
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = torch.tensor(0.5)
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    state = sd_layout(toy())
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": state, "global_step": np.int64(470000),
                "callbacks": {ModelCheckpoint: {"best_model_score": None}, "obj": ModelCheckpoint()}}, path)
    mixed = tmp_path / "mixed.ckpt"  # Lightning's objects and one that is not inert
    torch.save({"state_dict": state, "callbacks": {"obj": ModelCheckpoint()}, "hook": Hook()}, mixed)
    monkeypatch.undo()  # the reader has no Lightning installed
    with torch.device("meta"):
        m = toy()
    load_checkpoint(m, path, "model.x.")
    assert all(torch.equal(v, state["model.x." + k]) for k, v in m.state_dict().items())

    torch.save({"state_dict": state, "hook": Hook()}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="test_checkpoint.Hook"):
        load_checkpoint(toy(), tmp_path / "other.ckpt", "model.x.")
    # a legacy (non-zip) file: refused with torch's message, which names the global
    torch.save({"state_dict": state, "hook": Hook()}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="test_checkpoint.Hook"):
        load_checkpoint(toy(), tmp_path / "legacy.ckpt", "model.x.")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):  # stand-ins only if all are inert
        load_checkpoint(toy(), mixed, "model.x.")
    # a class the caller allows, next to the stand-ins (VPD's refer file pickles its argparse args)
    import argparse
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4), "step": np.int64(3)}, tmp_path / "refer.pth")
    obj = torch_load(tmp_path / "refer.pth", allow=[argparse.Namespace])
    assert obj["args"].lr == 1e-4 and torch.equal(obj["model"]["model.x.0.weight"], state["model.x.0.weight"])


class Hook:
    """A class no weights-only load should construct."""


def test_ckpt_with_lightning_objects_asks_for_torch_2_6_where_torch_lists_no_globals(tmp_path, monkeypatch):
    ModelCheckpoint = fake_class(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
    torch.save({"state_dict": sd_layout(toy()), "callbacks": {"obj": ModelCheckpoint()}}, tmp_path / "sd.ckpt")
    torch.save({"state_dict": sd_layout(toy()), "hook": Hook()}, tmp_path / "other.ckpt")
    monkeypatch.undo()
    if LISTS_GLOBALS:  # as torch 2.5
        monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint")
    with pytest.raises(CheckpointError, match=r"holds pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint "
                                              r"objects besides its tensors: reading them needs torch >= 2.6"):
        load_checkpoint(toy(), tmp_path / "sd.ckpt", "model.x.")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint .*test_checkpoint.Hook"):
        load_checkpoint(toy(), tmp_path / "other.ckpt", "model.x.")


def fake_class(monkeypatch, qualified):
    """A class importable (while monkeypatched) as `qualified`, e.g. a library this machine lacks."""
    import sys
    import types
    module, name = qualified.rsplit(".", 1)
    parts = module.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[:i]) not in sys.modules:
            monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    mod = types.ModuleType(module)
    cls = type(name, (), {"__module__": module, "__qualname__": name})
    setattr(mod, name, cls)
    monkeypatch.setitem(sys.modules, module, mod)
    return cls


@pytest.mark.skipif(not LISTS_GLOBALS, reason="torch < 2.6")
def test_ckpt_from_other_numpy_and_lightning_versions_loads(tmp_path, monkeypatch):
    # numpy 1 pickles its scalars as numpy.core.multiarray.scalar (numpy 2: numpy._core...) and Lightning 2
    # lives under `lightning.`: files written with them hold the same inert extras
    extras = [fake_class(monkeypatch, n)() for n in ("numpy.core.multiarray.scalar",
                                                      "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")]
    lookalike = fake_class(monkeypatch, "pytorch_lightning_hooks.Hook")()  # not Lightning: a name that starts alike
    state = sd_layout(toy())
    torch.save({"state_dict": state, "extras": extras}, tmp_path / "old.ckpt")
    torch.save({"state_dict": state, "hook": lookalike}, tmp_path / "lookalike.ckpt")
    monkeypatch.undo()
    with torch.device("meta"):
        m = toy()
    load_checkpoint(m, tmp_path / "old.ckpt", "model.x.")
    assert all(torch.equal(v, state["model.x." + k]) for k, v in m.state_dict().items())
    with pytest.raises(CheckpointError, match="pytorch_lightning_hooks.Hook"):
        load_checkpoint(toy(), tmp_path / "lookalike.ckpt", "model.x.")
