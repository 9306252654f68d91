"""CLIP ViT-L/14's text tower and its BPE tokenizer, as Stable Diffusion v1 uses them.

The model mirrors the HF `CLIPTextModel` layout stored in SD v1 files under
`cond_stage_model.transformer.text_model.` (names here are the checkpoint's minus that prefix).
The tokenizer is CLIP's byte-level BPE (openai/CLIP simple_tokenizer.py), run by the `tokenizers`
library; ids are padded with end-of-text to 77 as SD does.
"""
import gzip
import html
import os
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from vpd.checkpoint import load_checkpoint

PREFIX = "cond_stage_model.transformer.text_model."  # of the text encoder's tensors in an SD v1 file
BOS, EOS = 49406, 49407  # <|startoftext|>, <|endoftext|>
BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


# -----------------------------------------------------------------------------
# text encoder

@dataclass
class CLIPConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # no position_ids buffer
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class Attention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        B, L, C = x.shape
        # (B, L, C) -> (B, heads, L, d)
        q, k, v = (p(x).view(B, L, self.n_head, C // self.n_head).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # CLIP's text tower is causal
        return self.out_proj(y.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu, what CLIP was trained with


class EncoderLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPConfig = None):
        super().__init__()
        self.cfg = cfg = cfg or CLIPConfig()
        self.embeddings = Embeddings(cfg)
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids):
        """input_ids: (B, L) LongTensor, L <= max_position_embeddings.
        Returns (last_hidden_state (B, L, C), pooled (B, C)); pooled is the final hidden state at the
        end-of-text token, found as the largest id in each row (EOS is the last id of the vocabulary)."""
        if input_ids.ndim != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"CLIPTextModel expects (B, L) int64 token ids, got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        if input_ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: {input_ids.shape[1]} tokens exceed the "
                             f"{self.cfg.max_position_embeddings} positions")
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        x = self.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
        return x, pooled

    @classmethod
    def from_checkpoint(cls, src, cfg: CLIPConfig = None, dtype=torch.float32):
        """Build on `meta` and take the SD v1 file's text-encoder tensors as weights."""
        cfg = cfg or CLIPConfig()
        with torch.device("meta"):
            model = cls(cfg)
        return load_checkpoint(model, src, PREFIX, cfg,
                               ignore=("embeddings.position_ids",), dtype=dtype)


# -----------------------------------------------------------------------------
# tokenizer

# CLIP's pre-tokenisation: common English contractions, runs of letters, single digits, runs of
# other symbols; whitespace separates and is dropped
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode():
    """CLIP's (= GPT-2's) byte -> character table, in vocabulary order: printable Latin-1 bytes stand
    for themselves, the other 68 (whitespace, controls) are moved to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


@lru_cache(maxsize=None)
def _bpe(path):
    """The `tokenizers` BPE pipeline for a merges file; built once per process and file."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as BPETokenizer
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP BPE merges file not found: {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    n_merges = 49152 - 256 - 2  # CLIP keeps this many merges: 256 bytes x2 + merges + 2 special = 49408
    merges = [tuple(line.split()) for line in lines[1:n_merges + 1]]  # line 0 is a version header
    if len(merges) < n_merges or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is empty or truncated: expected {n_merges} BPE merges after the header line, "
                         f"found {len(merges)} lines of which {sum(len(m) == 2 for m in merges)} are pairs")
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab)}
    tok = BPETokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),  # keep matches, drop the rest
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # utf-8 bytes -> table characters
    ])
    return tok


def clean(text):
    """CLIP's text cleaning: html entities (twice, for double-escaped text), NFC, one space, lower case.
    openai/CLIP also runs ftfy.fix_text first; of its repairs only NFC is kept, so mojibake, curly quotes
    and full-width forms are tokenised as they are, and the control characters Python counts as
    whitespace (vertical tab, \x1c-\x1f, NEL) separate words here (ftfy deletes the first ones and
    turns NEL into an ellipsis)."""
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP BPE tokenizer. `encode` gives BOS ... EOS ids; calling it gives SD's padded (B, 77) tensor."""

    def __init__(self, bpe_path=BPE_PATH):
        self.bpe = _bpe(os.fspath(bpe_path))

    def encode(self, text: str) -> list:
        if not isinstance(text, str):
            raise ValueError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return [BOS] + self.bpe.encode(clean(text), add_special_tokens=False).ids + [EOS]

    def __call__(self, texts, max_length: int = 77) -> torch.Tensor:
        """texts: a str or a list of str -> (B, max_length) int64: BOS, at most max_length-2 tokens, EOS,
        then EOS padding (SD's convention; open_clip pads with 0)."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), max_length), EOS, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > max_length:
                ids = ids[:max_length - 1] + [EOS]
            out[i, :len(ids)] = torch.tensor(ids)
        return out
