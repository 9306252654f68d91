"""CLIP text tower against the real SD v1.5 tensor list and transformers' CLIPTextModel; the tokenizer
against open_clip's reference tokenizer (openai/CLIP's simple_tokenizer)."""
import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from vpd.checkpoint import CheckpointError
from vpd.clip import EOS, CLIPConfig, CLIPTextModel, Tokenizer

SD15 = Path(__file__).resolve().parents[1].parent / "shared" / "sd15_tensors.json"
PREFIX = "cond_stage_model.transformer.text_model."
TINY = CLIPConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=16)


def test_full_config_matches_sd15_tensor_list():
    ref = json.loads(SD15.read_text())["shapes"]
    ref = {k[len(PREFIX):]: v for k, v in ref.items() if k.startswith(PREFIX)}
    assert ref.pop("embeddings.position_ids") == [1, 77]
    with torch.device("meta"):
        model = CLIPTextModel(CLIPConfig())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref
    assert sum(p.numel() for p in model.parameters()) == 123_060_480
    # the defaults are the file's text config; the head count leaves no trace in the shapes
    cfg = json.loads(SD15.read_text())["configs"]["clip"]
    assert vars(CLIPConfig()) == {k: cfg[k] for k in vars(CLIPConfig())}
    assert {layer.self_attn.n_head for layer in model.encoder.layers} == {cfg["num_attention_heads"]}


@pytest.fixture(scope="module")
def reference():
    """transformers' CLIPTextModel (eager attention) with random weights, and the same weights in SD layout."""
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=TINY.vocab_size, hidden_size=TINY.hidden_size,
                            intermediate_size=TINY.intermediate_size, num_hidden_layers=TINY.num_hidden_layers,
                            num_attention_heads=TINY.num_attention_heads,
                            max_position_embeddings=TINY.max_position_embeddings, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5, bos_token_id=TINY.vocab_size - 2,
                            eos_token_id=TINY.vocab_size - 1, pad_token_id=TINY.vocab_size - 1)
    config._attn_implementation = "eager"
    ref = HFCLIPTextModel(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # non-trivial norms and biases
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    assert ref.config._attn_implementation == "eager"
    state = {PREFIX + k.removeprefix("text_model."): v.clone() for k, v in ref.state_dict().items()}
    state[PREFIX + "embeddings.position_ids"] = torch.arange(TINY.max_position_embeddings)[None]  # as in SD files
    return ref, state


def test_parity_with_transformers(reference):
    ref, state = reference
    model = CLIPTextModel.from_checkpoint(state, TINY).eval()
    assert not any("position_ids" in k for k in model.state_dict())
    eos = TINY.vocab_size - 1
    g = torch.Generator().manual_seed(3)
    for L in (16, 9):  # full length and a shorter sequence
        ids = torch.randint(1, eos - 1, (3, L), generator=g)
        for row, n in enumerate((2, 5, L)):  # EOS at different places, EOS padding after it as SD pads
            ids[row, n - 1:] = eos
        with torch.no_grad():
            hidden, pooled = model(ids)
            out = ref(input_ids=ids)
        torch.testing.assert_close(hidden, out.last_hidden_state)
        torch.testing.assert_close(pooled, out.pooler_output)
        torch.testing.assert_close(pooled, hidden[[0, 1, 2], [1, 4, L - 1]])


def test_load_dtype_and_errors(reference, tmp_path):
    _, state = reference
    model = CLIPTextModel.from_checkpoint(state, TINY, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        CLIPTextModel.from_checkpoint(tmp_path / "missing.safetensors", TINY)
    bad = dict(state)
    bad[PREFIX + "encoder.layers.1.mlp.fc1.weight"] = torch.zeros(100, TINY.hidden_size)
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight"):
        CLIPTextModel.from_checkpoint(bad, TINY)
    with pytest.raises(ValueError, match="exceed"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 5))


# -----------------------------------------------------------------------------
# tokenizer

@pytest.fixture(scope="module")
def open_clip_tokenizer():
    # open_clip's package __init__ needs torchvision; its tokenizer module does not, so load it by path
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch not installed (pip install --no-deps open_clip_torch)")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


TEXTS = [
    "a photo of a cat.",
    "",
    "A PHOTO of a Dog!!! What's up?? (yes/no) -- ok... #hashtag @user e-mail: x_y@z.com",
    "it's I'LL they'RE we've I'm you'd Don't",
    "numbers: 3.14159, 1,000,000 and 42nd on 2023-10-05 at 12:30",
    "café naïve résumé Ångström façade Zürich über crème brûlée",
    "cafe\u0301 cre\u0300me",  # decomposed accents: NFC composes them
    "\u2460 x\u00b2 \u00bd cup \u216b",  # compatibility forms (circled 1, superscript 2, 1/2, XII): kept, not NFKC'd
    "I ❤️ pizza 🍕🍕 😀👍🏽 👨‍👩‍👧 ok",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &amp;amp; &#39;s &eacute;t&eacute;",
    "  lots\tof\n\n whitespace   here  ",
    "東京タワーの夜景 北京烤鸭 서울의 밤",
    "Привет мир, Γειά σου κόσμε, مرحبا",
    "pool table, billiard table, snooker table",
    " ".join(["the quick brown fox jumps over the lazy dog"] * 12),  # > 77 tokens
]


def test_encode_matches_open_clip(open_clip_tokenizer):
    ref, ours = open_clip_tokenizer, Tokenizer()
    for text in TEXTS:
        assert ours.encode(text) == [ref.sot_token_id] + ref.encode(text) + [ref.eot_token_id], text
    assert (ref.sot_token_id, ref.eot_token_id) == (49406, 49407)


@pytest.mark.parametrize("max_length", [77, 40, 2, None])  # None: both tokenizers' default, CLIP's 77
def test_padded_tensor_matches_open_clip(open_clip_tokenizer, max_length):
    kw = {} if max_length is None else {"max_length": max_length}
    ref = open_clip_tokenizer(TEXTS, context_length=max_length)
    n = ref.shape[1]
    for i, text in enumerate(TEXTS):  # open_clip pads with 0, SD with EOS
        ref[i, min(len(open_clip_tokenizer.encode(text)) + 2, n):] = EOS
    ours = Tokenizer()(TEXTS, **kw)
    assert ours.dtype == torch.long and ours.shape == (len(TEXTS), max_length or 77)
    assert torch.equal(ours, ref)
    long = ours[-1]  # truncated: BOS, max_length-2 text tokens, EOS
    assert long[0] == 49406 and long[-1] == EOS and (long[1:-1] != EOS).all()
    assert torch.equal(Tokenizer()("a photo of a cat.", **kw), ours[:1])


def test_python_whitespace_separates_words_as_in_open_clip(open_clip_tokenizer, monkeypatch):
    # every character Python's str.split() takes for whitespace separates words, as open_clip's
    # whitespace_clean does; that includes \x1c-\x1f, which the BPE split pattern's \s does not
    # match. The reference runs without its ftfy pass (which deletes them), as clean() does.
    import ftfy
    monkeypatch.setattr(ftfy, "fix_text", lambda text: text)
    ref, ours = open_clip_tokenizer, Tokenizer()
    for text in ["a\x1cb", "one\x1dtwo\x1ethree\x1ffour", "tab\x0bbed\x85line\u2028sep", "no\xa0break\u3000ideo"]:
        assert ours.encode(text) == [ref.sot_token_id] + ref.encode(text) + [ref.eot_token_id], repr(text)
    assert ours.encode("a\x1cb") == ours.encode("a b") != ours.encode("ab")


def test_tokenizer_errors_and_cache(tmp_path):
    tok = Tokenizer()
    assert Tokenizer().bpe is tok.bpe  # built once per process
    assert tok.bpe.get_vocab_size() == 49408
    assert (tok.bpe.token_to_id("<|startoftext|>"), tok.bpe.token_to_id("<|endoftext|>")) == (49406, 49407)
    for bad in (0, 1, 2.5, "77", None):
        with pytest.raises(ValueError, match="max_length"):
            tok("a cat", max_length=bad)
    with pytest.raises(ValueError, match="str"):
        tok.encode(["a cat"])
    empty = tmp_path / "empty.txt.gz"
    with gzip.open(empty, "wt") as f:
        f.write("")
    with pytest.raises(ValueError, match="empty.txt.gz"):
        Tokenizer(empty)
    with pytest.raises(FileNotFoundError, match="nothere.txt.gz"):
        Tokenizer(tmp_path / "nothere.txt.gz")
