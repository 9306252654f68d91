"""Text embeddings for VPD: class names -> one CLIP vector per class, cached on disk.

Depth recipe (VPD's depth/dump_nyu_text_embeddings.py): each name (underscores read as spaces) is put
into the 80 ImageNet prompt templates of CLIP's zero-shot classifier; each prompt goes through the
frozen CLIP text encoder, tokenised to 20 positions; the pooled output (final hidden state at the
end-of-text token) is averaged over the templates. No L2 normalisation, neither per template nor
after averaging. The causal mask makes the pooled output independent of how much padding follows
the end-of-text token, so 20 positions only matter through truncation of very long prompts.
ADE20K's class embeddings (VPD's segmentation/class_embeddings.pth) take one prompt per class: the
author describes them as the CLIP features of "a photo of a [CLASS LABEL]" (wl-zhao/VPD issue #22),
and the file's row norms (27.5-28.9) fit single prompts: the 80-template averages of VPD's NYUv2 file
are near 22.5 (averaging vectors that point apart shortens them). The exact wording
is not published: we take it as written there, "a photo of a {}" (also CLIP's README zero-shot prompt).
"""
import hashlib
import json
import os

import torch
from tqdm import tqdm

from vpd.data import ADE20K_CLASSES, NYU_SCENES  # noqa: F401  (the class names, re-exported here)
from vpd.checkpoint import load_error
from vpd.trained import weights_fingerprint, write_atomic

IMAGENET_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]

ADE20K_TEMPLATES = ["a photo of a {}"]

MAX_LENGTH = 20  # the script's FrozenCLIPEmbedder(max_length=20) (vpd/models.py: pooler_output) for the class prompts


def load_class_embeddings(path, count, dim) -> torch.Tensor:
    """(count, dim) float32 class embeddings from a file holding one tensor: a torch file (.pth / .pt,
    e.g. VPD's segmentation/class_embeddings.pth, the released model's text) or a .safetensors file
    with one tensor in it. Rows follow the task's class order (ADE20K_CLASSES / NYU_SCENES)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class embeddings file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        tensors = list(load_file(path).values())
        if len(tensors) != 1:
            raise ValueError(f"{path}: a class embeddings file holds one tensor, this one {len(tensors)}")
        emb = tensors[0]
    else:
        try:
            emb = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (not a torch file, or one holding objects: say which file)
            raise ValueError(f"{path}: cannot read class embeddings from it ({load_error(e)})") from None
    if not torch.is_tensor(emb) or tuple(emb.shape) != (count, dim) or not emb.is_floating_point():
        what = f"a {tuple(emb.shape)} {emb.dtype} tensor" if torch.is_tensor(emb) else type(emb).__name__
        raise ValueError(f"{path}: class embeddings must be a ({count}, {dim}) float tensor, got {what}")
    bad = (~emb.isfinite()).any(dim=1).nonzero().flatten().tolist()
    if bad:  # a run would train on them and stop at its first save, blaming the learning rate
        raise ValueError(f"{path}: class embeddings of rows {bad[:5]}{' ...' if len(bad) > 5 else ''} are not "
                         "finite (NaN or inf)")
    return emb.float()


def file_identity(path) -> str:
    """A cheap identity for a checkpoint file: absolute path, size and modification time."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _prompts(name, templates):
    name = name.replace("_", " ").strip()
    return [t.format(name) for t in templates]


@torch.no_grad()
def compute_class_embeddings(names, clip, tokenizer, max_length=MAX_LENGTH, templates=IMAGENET_TEMPLATES):
    """(K, D) float32 on the CPU: per name, the pooled CLIP output averaged over the templates."""
    device = next(clip.parameters()).device
    out = []
    for name in tqdm(names, desc="class embeddings", unit="name", leave=False, dynamic_ncols=True):
        ids = tokenizer(_prompts(name, templates), max_length=max_length).to(device)  # (T, max_length)
        _, pooled = clip(ids)  # (T, D)
        out.append(pooled.float().mean(dim=0).cpu())
    return torch.stack(out)


def class_embeddings(names, clip, tokenizer, cache_dir=None, ckpt_id=None, max_length=MAX_LENGTH,
                     templates=IMAGENET_TEMPLATES) -> torch.Tensor:
    """(K, D) CLIP class embeddings for `names` (averaged over `templates`), cached in `cache_dir`
    when one is given.

    The cache file is keyed by the names, the recipe and `ckpt_id`, the identity of the text encoder's
    weights: pass `file_identity(sd_path)` when CLIP was loaded from that file; left as None, it is
    `weights_fingerprint(clip)`, exact but it reads every weight. A cached file is reused only when its
    recorded names and identity both match; otherwise the embeddings are recomputed and rewritten.
    """
    names = list(names)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"class names must be a non-empty list of non-empty strings, got {names!r}")
    templates = list(templates)
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise ValueError(f"templates must be a non-empty list of strings with one '{{}}' each, got {templates!r}")
    if cache_dir is None:
        return compute_class_embeddings(names, clip, tokenizer, max_length, templates)
    if ckpt_id is None:
        ckpt_id = weights_fingerprint(clip)
    key = {"names": names, "ckpt_id": ckpt_id, "templates": templates, "max_length": max_length}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(os.fspath(cache_dir), f"class_embeddings-{digest}.pt")
    if os.path.isfile(path):
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("names") == names and cached.get("ckpt_id") == ckpt_id:
            return cached["embeddings"]
    emb = compute_class_embeddings(names, clip, tokenizer, max_length, templates)
    os.makedirs(cache_dir, exist_ok=True)
    # a concurrent reader (another rank) never sees half a file
    write_atomic(lambda p: torch.save({"names": names, "ckpt_id": ckpt_id, "embeddings": emb}, p), path)
    return emb
