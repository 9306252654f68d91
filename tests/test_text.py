"""Class-name embeddings: the VPD recipes (pooled CLIP output averaged over the 80 ImageNet templates
for depth, one "a photo of a {}" prompt for ADE20K, no normalisation), files of ready embeddings and
the on-disk cache (reused, invalidated by names or checkpoint identity)."""
import importlib.util
import os

import pytest
import torch
from torch import nn

from vpd.clip import CLIPConfig, CLIPTextModel, Tokenizer
from vpd.text import (ADE20K_CLASSES, ADE20K_TEMPLATES, IMAGENET_TEMPLATES, NYU_SCENES, class_embeddings,
                      file_identity, load_class_embeddings, weights_fingerprint)

TINY_CLIP = CLIPConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


class Counting(nn.Module):
    """A CLIP that counts its forward calls."""

    def __init__(self, clip):
        super().__init__()
        self.clip, self.calls = clip, 0

    def forward(self, ids):
        self.calls += 1
        return self.clip(ids)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return CLIPTextModel(TINY_CLIP).eval()


def test_name_lists():
    assert len(IMAGENET_TEMPLATES) == len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert len(NYU_SCENES) == len(set(NYU_SCENES)) == 27
    assert list(NYU_SCENES[:3]) == ["printer_room", "bathroom", "living_room"] and NYU_SCENES[-1] == "bookstore"
    assert len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == 150
    assert (ADE20K_CLASSES[0], ADE20K_CLASSES[7], ADE20K_CLASSES[12], ADE20K_CLASSES[-1]) == (
        "wall", "bed", "person", "flag")


def test_templates_are_clips_80_imagenet_templates():
    # the zero-shot templates of CLIP's ImageNet notebook, in its order, as open_clip ships them
    # (read from its data file: importing open_clip itself needs torchvision)
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(os.path.dirname(spec.origin), "zero_shot_metadata.py") if spec else None
    if path is None or not os.path.isfile(path):
        pytest.skip("open_clip_torch not installed")
    meta_spec = importlib.util.spec_from_file_location("open_clip_zero_shot_metadata", path)
    meta = importlib.util.module_from_spec(meta_spec)
    meta_spec.loader.exec_module(meta)
    assert IMAGENET_TEMPLATES == [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]


def test_embedding_is_mean_of_pooled_outputs_at_end_of_text(tok):
    clip = tiny_clip()
    names = ["living_room", "cafe"]
    got = class_embeddings(names, clip, tok)
    assert got.shape == (2, 32) and got.dtype == torch.float32
    for name, row in zip(["living room", "cafe"], got):
        ids = tok([t.format(name) for t in IMAGENET_TEMPLATES], max_length=77)  # long padding
        with torch.no_grad():
            hidden, _ = clip(ids)
        eot = [r.tolist().index(49407) for r in ids]  # first end-of-text token
        pooled = torch.stack([hidden[i, j] for i, j in enumerate(eot)])
        torch.testing.assert_close(row, pooled.mean(0), rtol=1e-5, atol=1e-5)
    # no L2 normalisation anywhere
    assert not torch.allclose(got.norm(dim=-1), torch.ones(2))


def test_ade20k_embedding_is_the_pooled_output_of_one_prompt(tok):
    # the author's description of VPD's ADE20K file (wl-zhao/VPD issue #22): "a photo of a [CLASS LABEL]"
    assert ADE20K_TEMPLATES == ["a photo of a {}"]
    clip = tiny_clip()
    got = class_embeddings(["chest_of_drawers", "wall"], clip, tok, templates=ADE20K_TEMPLATES)
    ids = tok(["a photo of a chest of drawers", "a photo of a wall"], max_length=77)
    with torch.no_grad():
        hidden, _ = clip(ids)
    eot = [r.tolist().index(49407) for r in ids]
    torch.testing.assert_close(got, torch.stack([hidden[i, j] for i, j in enumerate(eot)]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="templates"):
        class_embeddings(["wall"], clip, tok, templates=["a photo"])  # no place for the name
    with pytest.raises(ValueError, match="templates"):
        class_embeddings(["wall"], clip, tok, templates=["a {} or a {}"])  # one name fills one place


def test_models_take_their_tasks_recipe(tmp_path, monkeypatch):
    from vpd import text
    from vpd.demo import TINY_CLIP as CLIP, TINY_UNET, TINY_VAE, write_random_sd
    from vpd.model import build_model
    sd = write_random_sd(str(tmp_path / "sd.safetensors"))
    seen = {}
    real = text.class_embeddings

    def record(names, *a, templates, **kw):
        seen[len(names)] = templates
        return real(names[:2], *a, templates=templates, **kw).repeat(len(names), 1)[:len(names)]
    monkeypatch.setattr(text, "class_embeddings", record)
    build_model("semseg", sd, TINY_UNET, TINY_VAE, CLIP, channels=32)
    build_model("depth", sd, TINY_UNET, TINY_VAE, CLIP, fuse_channels=64, deconv_channels=16, out_channels=32)
    assert seen == {150: ADE20K_TEMPLATES, 27: IMAGENET_TEMPLATES}


def test_embeddings_files_are_read_and_checked(tmp_path):
    from safetensors.torch import save_file
    emb = torch.randn(3, 8)
    torch.save(emb, tmp_path / "e.pth")  # as VPD ships them: one pickled tensor
    save_file({"anything": emb}, str(tmp_path / "e.safetensors"))
    for name in ("e.pth", "e.safetensors"):
        assert torch.equal(load_class_embeddings(tmp_path / name, 3, 8), emb)
    torch.save(emb.half(), tmp_path / "half.pt")
    assert load_class_embeddings(tmp_path / "half.pt", 3, 8).dtype == torch.float32
    save_file({"a": emb, "b": emb.clone()}, str(tmp_path / "two.safetensors"))
    torch.save({"emb": emb}, tmp_path / "dict.pth")
    (tmp_path / "text.pth").write_text("hello, not a torch file")  # ('h' read as a legacy key: KeyError 104)
    torch.save(emb.long(), tmp_path / "ints.pth")
    torch.save(emb.t().contiguous(), tmp_path / "transposed.pth")  # (dim, count): rows would not be classes
    save_file({}, str(tmp_path / "empty.safetensors"))
    torch.save({"emb": emb, "obj": Counting(nn.Identity())}, tmp_path / "pickled.pth")  # code, not data
    nan = emb.clone()
    nan[2, 5] = float("nan")
    torch.save(nan, tmp_path / "nan.pth")  # a run would train on it, then stop at its first save
    for name, count, dim, words in [("e.pth", 4, 8, r"must be a \(4, 8\) float tensor, got a \(3, 8\)"),
                                    ("e.pth", 3, 16, r"\(3, 16\)"), ("two.safetensors", 3, 8, "holds one tensor"),
                                    ("dict.pth", 3, 8, "got dict"),
                                    ("text.pth", 3, 8, r"cannot read class embeddings from it \(not a torch file\)"),
                                    ("ints.pth", 3, 8, "torch.int64"), ("transposed.pth", 3, 8, r"got a \(8, 3\)"),
                                    ("empty.safetensors", 3, 8, "this one 0"),
                                    ("nan.pth", 3, 8, r"rows \[2\] are not finite"),
                                    ("pickled.pth", 3, 8, "cannot read class embeddings .*holds a .*Counting object")]:
        with pytest.raises(ValueError, match=words):
            load_class_embeddings(tmp_path / name, count, dim)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_class_embeddings(tmp_path / "nope.pth", 3, 8)


def test_long_prompts_are_truncated_to_20_positions(tok):
    # VPD's FrozenCLIPEmbedder(max_length=20): BOS + at most 18 tokens + EOS; pooled at that EOS
    clip = tiny_clip()
    name = "tall wooden chest of drawers with many small brass handles beside a very old window"
    ids = tok([t.format(name) for t in IMAGENET_TEMPLATES], max_length=77)
    lengths = [r.tolist().index(49407) + 1 for r in ids]
    assert max(lengths) > 20 and min(lengths) <= 20  # some prompts are cut, some are not
    cut = torch.stack([torch.cat([r[:19], torch.tensor([49407])]) if n > 20 else r[:20] for r, n in zip(ids, lengths)])
    with torch.no_grad():
        hidden_cut, _ = clip(cut)
        hidden_full, _ = clip(ids)
    want = torch.stack([hidden_cut[i, min(n, 20) - 1] for i, n in enumerate(lengths)]).mean(0)
    full = torch.stack([hidden_full[i, n - 1] for i, n in enumerate(lengths)]).mean(0)
    assert not torch.allclose(want, full, atol=1e-3)
    torch.testing.assert_close(class_embeddings([name], clip, tok)[0], want, rtol=1e-5, atol=1e-5)
    # an explicit max_length is honoured: 77 positions cut nothing here
    torch.testing.assert_close(class_embeddings([name], clip, tok, max_length=77)[0], full, rtol=1e-5, atol=1e-5)


def test_cache_is_reused_and_invalidated(tmp_path, tok):
    clip = Counting(tiny_clip())
    first = class_embeddings(["kitchen", "office"], clip, tok, cache_dir=tmp_path)
    assert clip.calls == 2 and len(os.listdir(tmp_path)) == 1
    again = class_embeddings(["kitchen", "office"], clip, tok, cache_dir=tmp_path)
    assert clip.calls == 2 and torch.equal(first, again)  # no CLIP call the second time

    reordered = class_embeddings(["office", "kitchen"], clip, tok, cache_dir=tmp_path)
    assert clip.calls == 4 and torch.allclose(reordered, first.flip(0), atol=1e-6)

    with torch.no_grad():  # another checkpoint: same names, different weights
        clip.clip.final_layer_norm.bias.add_(1.0)
    changed = class_embeddings(["kitchen", "office"], clip, tok, cache_dir=tmp_path)
    assert clip.calls == 6 and torch.allclose(changed, first + 1.0, atol=1e-5)
    assert class_embeddings(["kitchen", "office"], clip, tok, cache_dir=tmp_path).equal(changed)
    assert clip.calls == 6


def test_cache_keyed_by_file_identity(tmp_path, tok):
    ckpt = tmp_path / "sd.safetensors"
    ckpt.write_bytes(b"x" * 10)
    clip = Counting(tiny_clip())
    cache = tmp_path / "cache"
    class_embeddings(["cafe"], clip, tok, cache_dir=cache, ckpt_id=file_identity(ckpt))
    class_embeddings(["cafe"], clip, tok, cache_dir=cache, ckpt_id=file_identity(ckpt))
    assert clip.calls == 1
    ckpt.write_bytes(b"y" * 11)  # the file changed
    class_embeddings(["cafe"], clip, tok, cache_dir=cache, ckpt_id=file_identity(ckpt))
    assert clip.calls == 2
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        file_identity(tmp_path / "nope.ckpt")


def test_cache_holds_one_file_per_name_list(tmp_path, tok):
    # two name lists used in turn (semseg and depth from one checkpoint) are both served from the cache
    clip = Counting(tiny_clip())
    for names in (["kitchen"], ["office"], ["kitchen"], ["office"]):
        class_embeddings(names, clip, tok, cache_dir=tmp_path, ckpt_id="sd.ckpt:1:1")
    assert clip.calls == 2 and len(os.listdir(tmp_path)) == 2


def test_cache_holds_one_file_per_checkpoint(tmp_path, tok):
    # two SD files used in turn with the same names are both served from the cache
    clip = Counting(tiny_clip())
    for ckpt_id in ("a.ckpt:1:1", "b.ckpt:1:1", "a.ckpt:1:1", "b.ckpt:1:1"):
        class_embeddings(["kitchen"], clip, tok, cache_dir=tmp_path, ckpt_id=ckpt_id)
    assert clip.calls == 2 and len(os.listdir(tmp_path)) == 2


def test_cache_keyed_by_max_length(tmp_path, tok):
    # a prompt cut at 20 positions and the same prompt at 77 give different embeddings: two cache files
    clip = Counting(tiny_clip())
    name = "tall wooden chest of drawers with many small brass handles beside a very old window"
    cut = class_embeddings([name], clip, tok, cache_dir=tmp_path, ckpt_id="sd")
    full = class_embeddings([name], clip, tok, cache_dir=tmp_path, ckpt_id="sd", max_length=77)
    assert clip.calls == 2 and len(os.listdir(tmp_path)) == 2
    torch.testing.assert_close(full, class_embeddings([name], tiny_clip(), tok, max_length=77))
    assert not torch.allclose(cut, full, atol=1e-3)


def test_cache_keyed_by_templates(tmp_path, tok):
    # semseg (one prompt) and depth (80 templates) from one SD file and one name list: two cache files
    clip = Counting(tiny_clip())
    one = class_embeddings(["wall"], clip, tok, cache_dir=tmp_path, ckpt_id="sd", templates=ADE20K_TEMPLATES)
    avg = class_embeddings(["wall"], clip, tok, cache_dir=tmp_path, ckpt_id="sd")
    assert clip.calls == 2 and len(os.listdir(tmp_path)) == 2 and not torch.allclose(one, avg)


def test_file_identity_sees_path_size_and_mtime(tmp_path):
    a, b = tmp_path / "a" / "sd.ckpt", tmp_path / "b" / "sd.ckpt"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"x" * 10)
        os.utime(p, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert file_identity(a) != file_identity(b)  # same name, size and time, another file
    before = file_identity(a)
    a.write_bytes(b"y" * 10)  # rewritten in place within the same second: same size, new modification time
    os.utime(a, ns=(1_700_000_000_250_000_000, 1_700_000_000_250_000_000))
    assert file_identity(a) != before


def test_file_identity_of_a_relative_path_names_the_file(tmp_path, monkeypatch):
    # "sd.ckpt" seen from two working directories is two files
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "sd.ckpt").write_bytes(b"x" * 10)
        os.utime(tmp_path / d / "sd.ckpt", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    ids = []
    for d in ("a", "b"):
        monkeypatch.chdir(tmp_path / d)
        ids.append(file_identity("sd.ckpt"))
    assert ids[0] != ids[1] and ids[0].startswith(str(tmp_path / "a"))


def test_fingerprint_sees_names_and_shapes():
    def holder(name, shape):
        m = nn.Module()
        m.register_buffer(name, torch.arange(6.0).reshape(shape))
        return m

    prints = {weights_fingerprint(holder(n, s)) for n, s in [("w", (2, 3)), ("w", (3, 2)), ("v", (2, 3))]}
    assert len(prints) == 3  # same bytes, told apart by shape or by name
    as_ints = holder("w", (2, 3))
    as_ints.w = as_ints.w.view(torch.int32)  # the same bytes read as another dtype
    assert weights_fingerprint(as_ints) not in prints
    with pytest.raises(ValueError, match="meta device"):  # a model built on meta and never loaded
        weights_fingerprint(nn.Linear(2, 2, device="meta"))
    # the digest is sha256 over "name:shape:dtype;" and the tensor's bytes in order (checkpoints record it)
    import hashlib
    want = hashlib.sha256(b"w:[2, 3]:torch.float32;" + torch.arange(6.0).numpy().tobytes()).hexdigest()
    assert weights_fingerprint(holder("w", (2, 3))) == want
    bn = nn.BatchNorm2d(2)  # a 0-d tensor (num_batches_tracked) among them
    before = weights_fingerprint(bn)
    bn.num_batches_tracked += 1
    assert weights_fingerprint(bn) != before


def test_fingerprint_sees_every_weight_and_bad_names_are_refused(tok):
    a, b = tiny_clip(0), tiny_clip(0)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.encoder.layers[1].mlp.fc2.weight[0, 0] += 1e-3
    assert weights_fingerprint(a) != weights_fingerprint(b)
    with pytest.raises(ValueError, match="class names"):
        class_embeddings([], a, tok)
    with pytest.raises(ValueError, match="class names"):
        class_embeddings(["cafe", ""], a, tok)
    with pytest.raises(ValueError, match="class names"):
        class_embeddings(["cafe", "  "], a, tok)
