"""Reading tensors out of Stable Diffusion checkpoints and loading them strictly.

An SD v1 file holds the UNet, the VAE and the text encoder under three name prefixes. Each network
reads only its own prefix; a `.safetensors` file is read lazily, so building the UNet does not pull
the VAE and CLIP tensors of a 4 GB file into memory. Shapes are checked against the module before a
single tensor is copied, so a bad file leaves nothing half-loaded.
"""
import os
import pickle
import re
import zipfile

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the module asked for."""


# Globals that Lightning and numpy leave next to the weights in ldm's .ckpt files (SD v1's hold the
# state of Lightning's ModelCheckpoint callback, a numpy global_step in some): read as inert stand-ins.
INERT_GLOBALS = ("pytorch_lightning.", "lightning.", "numpy.dtype", "numpy.dtypes.",
                 "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")


class _Inert:
    """What an inert global unpickles to: it takes any arguments and state, and keeps none of them."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def torch_load(path, allow=()):
    """A torch pickle under weights_only (no code from the file runs), with the classes in `allow` let
    through; Lightning / numpy objects in it become inert stand-ins, any other non-tensor global is
    refused with a CheckpointError naming the class found (load_error: without torch's advice to load
    with weights_only=False)."""
    mmap = zipfile.is_zipfile(path)  # torch >= 1.6's format; older files are read whole
    try:
        try:
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            if not mmap:  # torch lists the globals of zip files only
                raise
            if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):  # torch 2.5 lists no globals
                found = refused_global(e)
                if found and found.startswith(INERT_GLOBALS):
                    raise CheckpointError(f"{path} holds {found} objects besides its tensors: reading them needs "
                                          f"torch >= 2.6, this is {torch.__version__} (or give the .safetensors "
                                          "file)") from None
                raise
            allowed = {f"{c.__module__}.{c.__qualname__}" for c in allow}
            names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
            if not names or not all(n.startswith(INERT_GLOBALS) for n in names):
                raise
            stand_ins = [(type(n.rsplit(".", 1)[-1], (_Inert,), {}), n) for n in names]
            with torch.serialization.safe_globals([*allow, *stand_ins]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({load_error(e)})") from None


def load_error(e):
    """torch.load's error in one line. Under weights_only, its advice to load with weights_only=False
    (running code from the file) is left out: say what the file holds instead."""
    text = " ".join(str(e).split())
    if isinstance(e, KeyError):  # torch's legacy reader on a file that is no pickle: its first byte as a key
        return "not a torch file"
    if isinstance(e, pickle.UnpicklingError):
        found = refused_global(e)
        return f"it holds a {found} object, not only tensors" if found else "not a torch file of tensors"
    return f"{type(e).__name__}: {text}"


def refused_global(e):
    """The class a weights_only load refused (its UnpicklingError names it), or None."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", " ".join(str(e).split()))
    return found.group(1) if found else None


# the depth and refer releases keep their tensors under 'model', the semseg one under 'state_dict' as
# unet.unet.diffusion_model.*: given where an SD file is wanted, say what they are
RELEASE_HINT = "; it looks like a VPD release: eval.py and predict.py take that as --ckpt (an SD v1 file is --sd-ckpt)"


def _open(src):
    """Return (names, get_shape, get_tensor) for a path or a dict of tensors."""
    if isinstance(src, dict):
        return list(src), lambda k: tuple(src[k].shape), lambda k: src[k]
    path = os.fspath(src)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            f = safe_open(path, framework="pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None
        return list(f.keys()), lambda k: tuple(f.get_slice(k).get_shape()), f.get_tensor
    obj = torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # ldm / Lightning files keep the tensors under `state_dict`
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} has no tensors at its top level or under 'state_dict' "
                              f"(its keys: {listing([str(k) for k in obj])})"
                              + (RELEASE_HINT if isinstance(obj.get("model"), dict) else ""))
    obj = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return list(obj), lambda k: tuple(obj[k].shape), lambda k: obj[k]


def tensor_shapes(src, prefix=""):
    """{name: shape} of the tensors under `prefix` in `src` (full names), without reading their data
    from a .safetensors file."""
    names, get_shape, _ = _open(src)
    return {k: get_shape(k) for k in names if k.startswith(prefix)}


def describe(src):
    return "<state dict>" if isinstance(src, dict) else os.fspath(src)


def listing(items, n=5):
    """The first `n` of `items`, comma-separated, with the count when there are more."""
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def mismatch_lines(missing, unexpected, wrong):
    """The lines of a load error naming the first missing, unexpected and wrong-shape tensors."""
    msg = ""
    if missing:
        msg += f"\n  missing ({len(missing)}): {listing(missing)}"
    if unexpected:
        msg += f"\n  unexpected ({len(unexpected)}): {listing(unexpected)}"
    if wrong:
        msg += f"\n  wrong shape ({len(wrong)}): {listing(wrong, 3)}"
    return msg


def _fits(file_shape, model_shape):
    """Equal shapes, or a [out, in] linear weight where the model has a [out, in, 1, 1] 1x1 conv
    (some re-saved SD files store the VAE's attention projections as linears)."""
    strip = lambda s: tuple(s[:2]) if len(s) > 2 and all(d == 1 for d in s[2:]) else tuple(s)
    return tuple(file_shape) == tuple(model_shape) or (
        len(file_shape) == 2 and strip(model_shape) == tuple(file_shape))


def load_checkpoint(module: nn.Module, src, prefix: str, cfg=None, ignore=(), dtype=torch.float32, flat=False):
    """Load the tensors named `prefix + <module key>` from `src` into `module`, strictly.
    flat: the file names them `prefix + <module key without its dots>`, as ldm's EMA copies.

    `src`: a `.safetensors` path, a torch checkpoint path (tensors at the top level or under
    `state_dict`) or a dict of tensors. Names under `prefix` that start with one of `ignore` are
    passed over (e.g. `embeddings.position_ids`). A module built on the `meta` device gets the
    file's tensors assigned (no second copy in memory); from a dict it gets copies, so that it never
    shares storage with the caller's tensors (or with another module loaded from the same dict).
    A live module keeps its own dtype (its parameters are copied into). A 2-d linear weight is
    accepted for a 1x1 conv of the same size. Raises CheckpointError naming the first offending keys
    and the config expected; the module is untouched when it raises.
    """
    names, get_shape, get_tensor = _open(src)
    under = [k for k in names if k.startswith(prefix) and not k[len(prefix):].startswith(tuple(ignore))]
    expected = module.state_dict()
    name_of = {k: prefix + (k.replace(".", "") if flat else k) for k in expected}
    in_file, wanted = set(under), set(name_of.values())
    ours = {k: n for k, n in name_of.items() if n in in_file}
    missing = [k for k in expected if k not in ours]
    unexpected = [k[len(prefix):] for k in under if k not in wanted]
    wrong = [f"{k}: file {list(get_shape(ours[k]))} vs model {list(expected[k].shape)}"
             for k in expected if k in ours and not _fits(get_shape(ours[k]), expected[k].shape)]
    if missing or unexpected or wrong:
        what = type(module).__name__
        if not under:
            msg = f"{describe(src)} has no tensors under '{prefix}': not a checkpoint holding a {what}"
            msg += RELEASE_HINT if any(".unet.diffusion_model." in k for k in names) else ""
        else:
            msg = f"{describe(src)} does not match {what}" + mismatch_lines(missing, unexpected, wrong)
        if cfg is not None:
            msg += f"\n  expected config: {cfg}"
        raise CheckpointError(msg)
    copy = isinstance(src, dict)  # a file's tensors are fresh; a dict's belong to the caller
    state = {k: get_tensor(ours[k]).to(dtype if expected[k].is_floating_point() else expected[k].dtype, copy=copy)
             .reshape(expected[k].shape) for k in expected}
    on_meta = any(t.is_meta for t in expected.values())
    module.load_state_dict(state, strict=True, assign=on_meta)
    return module
