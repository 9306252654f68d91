"""Our training checkpoints: trained weights as safetensors, training state as a small torch file.

`model.safetensors` holds what training changes (UNet, adapter, gamma, head) and the buffers (class
embeddings, norm statistics), with the task and configs as JSON metadata, so `eval.py` and
`predict.py` rebuild the model from it plus the frozen VAE / CLIP of the SD checkpoint it names
(checked against the sha256 of those weights that training recorded: the file may move, not change).
`state.pt` holds the same tensors again with the optimizer and RNG state: resuming reads that one
file, so no crash between two writes can leave weights and optimizer of different steps. Each file
is written to a temporary name and renamed: a crash never leaves half a file.
"""
import hashlib
import json
import os
from contextlib import suppress

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FROZEN = ("backbone.vae.", "clip.")  # parts that come from the SD checkpoint and never change


def write_atomic(write, path):
    """`write(tmp)`, then rename tmp to `path`: the old file or the new one, never half of one. The data
    reaches the disk before the rename, so that a power cut cannot leave the new name on an empty file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() makes files (safetensors writes them 0600: unreadable to a group)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or a full disk: no half-written copy (GBs at full size) left beside it
        with suppress(OSError):
            os.remove(tmp)
        raise


def weights_fingerprint(module, prefixes=None) -> str:
    """sha256 over a module's tensor names, shapes, dtypes and bytes (those whose names start with one of
    `prefixes`, if given): a second or two for CLIP-L."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if prefixes is not None and not name.startswith(prefixes):
            continue
        if t.is_meta:
            raise ValueError(f"cannot fingerprint {type(module).__name__}: '{name}' is on the meta device")
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{list(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # (0-d: one element)
    return h.hexdigest()


def frozen_fingerprint(model) -> str:
    """Which SD weights a model's frozen VAE / CLIP hold, wherever their file lies now: recorded by
    training, checked where the model is rebuilt from an SD file (resume, eval, predict)."""
    return weights_fingerprint(model, FROZEN)


def trained_state(model):
    """What training changes and the buffers: every tensor of the state dict but the frozen parts."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith(FROZEN)}


def save_weights(model, path, meta: dict, state=None):
    """model's `trained_state` (or `state`, one already taken) as safetensors with `meta` as JSON."""
    state = trained_state(model) if state is None else state
    write_atomic(lambda p: save_file(state, p, metadata={"vpd": json.dumps(meta)}), path)


def save_state(obj, path):
    write_atomic(lambda p: torch.save(obj, p), path)


def save_json(obj, path):
    def write(p):
        with open(p, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomic(write, path)


def read_meta(path):
    """The metadata of one of our weight files, or None for any other file (e.g. an official one)."""
    if not str(path).endswith(".safetensors"):
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("vpd")
    except Exception as e:
        raise ValueError(f"{path} is not a readable .safetensors file ({e})") from None
    return json.loads(meta) if meta else None


def load_weights(model, path):
    """Load our weight file into a model built for it; every non-frozen tensor must be there."""
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    return load_trained_state(model, state, path)


def load_trained_state(model, state, where):
    """Load a `trained_state` (from `where`, named in errors) into a model built for it."""
    expected = {k for k in model.state_dict() if not k.startswith(FROZEN)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{where} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{where} does not fit this model: shapes differ for {wrong[:5]}")
    # a model built on `meta` takes the tensors themselves (there is nothing to copy them into), in its dtypes
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=any(t.is_meta for t in own.values()))
    return model
