"""The VPD backbone (frozen VAE encoder + text-conditioned SD UNet) and the three task models.

Mirrors wl-zhao/VPD `vpd/models.py` (TextAdapter*, UNetWrapper) and the task wrappers
`segmentation/models/vpd_seg.py`, `depth/models_depth/model.py`, `refer/models_refer/model.py`.

    image (B, 3, H, W) in [-1, 1] --VAE encoder, posterior mode--> latent (B, 4, H/8, W/8)
    text T (N, D) or (B, N, D) --T + gamma * MLP(T)--> context
    UNet at t = 1 over (latent, context) -> [C@1/8, 2C+N@1/16, 4C+N@1/32, 4C@1/64]
                                            (features with the averaged cross-attention maps)
    task head -> logits / depth at the image size

All task models take images in [-1, 1] (VPD's depth code maps [0, 1] inputs with x*2-1 itself).
State-dict prefixes: `backbone.unet.` (SD UNet, for its lr multiplier), `backbone.vae.` (frozen),
`backbone.text_adapter.`, `backbone.gamma`, `head.`, `class_embeddings`, `clip.` (frozen, refer).
"""
import torch
import torch.nn.functional as F
from torch import nn

from vpd.clip import CLIPTextModel, Tokenizer
from vpd.heads import DepthHead, FPNSegHead, ReferHead, resize_bilinear
from vpd.unet import UNet, UNetConfig
from vpd.vae import VAE, VAEConfig

MAP_MAX_FRACTION = 0.25  # keep maps with h*w <= 1/4 of the latent's: 1/16 and 1/32 of the image
GAMMA_INIT = 1e-4  # VPD's start for the text adapter's per-channel scale
TASKS = ("semseg", "depth", "refer")


class TextAdapter(nn.Module):
    """T + gamma * fc(T): a residual MLP on the text embeddings, scaled by a learned per-channel gamma."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, text, gamma):
        return text + gamma * self.fc(text)


class VPDBackbone(nn.Module):
    """Frozen VAE encoder + SD UNet run once at t=1 with adapted text as cross-attention context.

    map_blocks: which attn2 groups give attention maps ("input", "output", "middle"); () for none
    (VPD's depth model). detach_maps: maps carry no gradient, as in the official training.
    """

    def __init__(self, unet_cfg: UNetConfig = None, vae_cfg: VAEConfig = None, text_dim: int = 768,
                 map_blocks=("input", "output"), detach_maps: bool = True,
                 gamma_init: float = GAMMA_INIT):
        super().__init__()
        self.unet_cfg = unet_cfg = unet_cfg or UNetConfig()
        self.vae_cfg = vae_cfg = vae_cfg or VAEConfig()
        if unet_cfg.context_dim != text_dim:
            raise ValueError(f"text_dim {text_dim} must equal the UNet's context_dim {unet_cfg.context_dim}")
        if vae_cfg.embed_dim != unet_cfg.in_channels:
            raise ValueError(f"VAE latent channels {vae_cfg.embed_dim} != UNet in_channels {unet_cfg.in_channels}")
        self.map_blocks = tuple(map_blocks)
        self.detach_maps = detach_maps
        self.vae = VAE(vae_cfg, decoder=False)
        self.unet = UNet(unet_cfg)
        del self.unet.out  # unused; kept, its parameters would never get a gradient (DDP refuses that)
        self.text_adapter = TextAdapter(text_dim)
        self.gamma = nn.Parameter(torch.full((text_dim,), gamma_init))
        self.vae.requires_grad_(False)
        self.vae.eval()

    def load_frozen_vae(self, sd_path, dtype=torch.float32):
        """The VAE encoder of an SD v1 file (or dict), frozen (its decoder is not read)."""
        self.vae = VAE.from_checkpoint(sd_path, self.vae_cfg, decoder=False, dtype=dtype).requires_grad_(False).eval()

    @classmethod
    def from_checkpoint(cls, sd_path, unet_cfg: UNetConfig = None, vae_cfg: VAEConfig = None,
                        dtype=torch.float32, **kw):
        """UNet and VAE encoder from an SD v1 file (the VAE decoder is not read); new adapter and gamma."""
        with torch.device("meta"):
            model = cls(unet_cfg, vae_cfg, **kw)
        model.unet = UNet.from_checkpoint(sd_path, model.unet_cfg, dtype=dtype)
        del model.unet.out
        model.load_frozen_vae(sd_path, dtype)
        text_dim = model.gamma.shape[0]
        model.text_adapter = TextAdapter(text_dim).to(dtype)
        model.gamma = nn.Parameter(torch.full((text_dim,), kw.get("gamma_init", GAMMA_INIT), dtype=dtype))
        return model

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: always in inference mode
        return self

    def map_levels(self):
        """Feature levels (0 = 1/8 ... 3 = 1/64) that get the attention maps concatenated."""
        cfg = self.unet_cfg
        last = 2 ** (len(cfg.channel_mult) - 1)
        sizes = set(cfg.attention_resolutions) if {"input", "output"} & set(self.map_blocks) else set()
        if "middle" in self.map_blocks:
            sizes.add(last)
        return [i for i in range(len(cfg.channel_mult)) if 2 ** i in sizes and 1 / 4 ** i <= MAP_MAX_FRACTION]

    def feature_channels(self, n_text: int) -> list:
        """Channels of the four returned maps for N text tokens ([320, 640+N, 1280+N, 1280] in SD)."""
        mc, levels = self.unet_cfg.model_channels, self.map_levels()
        return [mc * m + (n_text if i in levels else 0) for i, m in enumerate(self.unet_cfg.channel_mult)]

    def encode_images(self, images):
        """(B, 3, H, W) in [-1, 1] -> VAE posterior mode (B, 4, H/8, W/8); no gradient. Not multiplied
        by SD's latent scale 0.18215: VPD feeds the UNet the raw posterior mode."""
        with torch.no_grad():
            return self.vae.encode(images).mode()

    def forward(self, images, text):
        """images (B, 3, H, W) in [-1, 1], H and W multiples of 64; text (N, D) shared by the batch or
        (B, N, D) per image -> [C@1/8, 2C+N@1/16, 4C+N@1/32, 4C@1/64] (SD: 320, 640+N, 1280+N, 1280)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if text.ndim not in (2, 3) or (text.ndim == 3 and text.shape[0] != images.shape[0]):
            raise ValueError(f"text must be (N, D) or ({images.shape[0]}, N, D), got {tuple(text.shape)}")
        B = images.shape[0]
        latents = self.encode_images(images)
        context = self.text_adapter(text, self.gamma)
        if context.ndim == 2:
            context = context.expand(B, -1, -1)  # (B, N, D): the same text for every image
        feats, maps = self.unet.features(latents, 1, context, map_blocks=self.map_blocks,
                                         map_max_fraction=MAP_MAX_FRACTION, detach_maps=self.detach_maps)
        out = []
        for f in feats:
            m = maps.pop((f.shape[-2], f.shape[-1]), None)
            if m is not None:  # in f's dtype and memory layout, so the joined map keeps both
                fmt = torch.channels_last if f.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
                f = torch.cat([f, m.to(f.dtype, memory_format=fmt)], dim=1)
            out.append(f)
        if maps:
            raise RuntimeError(f"attention maps of sizes {sorted(maps)} match no feature map")
        return out


def _check_images(images, multiple):
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[2] % multiple or images.shape[3] % multiple:
        raise ValueError(f"image size {tuple(images.shape[2:])} must be a multiple of {multiple}")


class VPDSeg(nn.Module):
    """ADE20K semantic segmentation: class-name embeddings as text (N = K), Semantic FPN head."""

    def __init__(self, backbone: VPDBackbone, class_embeddings, num_classes: int = None, channels: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        if class_embeddings.ndim != 2:
            raise ValueError(f"class_embeddings must be (K, D), got {tuple(class_embeddings.shape)}")
        self.backbone = backbone
        self.register_buffer("class_embeddings", class_embeddings.detach().clone())
        self.num_classes = num_classes or class_embeddings.shape[0]
        self.head = FPNSegHead(backbone.feature_channels(class_embeddings.shape[0]), self.num_classes, channels,
                               dropout)

    def forward(self, images):
        """images (B, 3, H, W) in [-1, 1], H and W multiples of 64 -> logits (B, K, H, W)."""
        _check_images(images, 64)
        logits = self.head(self.backbone(images, self.class_embeddings))  # (B, K, H/8, W/8)
        # upsampled in float32, not rounded to bf16 again (the loss and inference take float32 anyway)
        return resize_bilinear(logits, images.shape[-2:])

    @staticmethod
    def loss(logits, label, ignore_index=255):
        """Cross-entropy over the non-ignored pixels, divided by ALL pixels, as mmseg 0.x does
        (CrossEntropyLoss with avg_non_ignore=False). label: (B, H, W) int64."""
        ce = F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="none")
        return ce.mean()


class VPDDepth(nn.Module):
    """NYUv2 depth: the image's scene-class embedding as text (N = 1), no attention maps, VPD's
    deconvolution head. Sizes that are multiples of 32 but not of 64 (VPD: 480x480) are zero-padded
    at the bottom and right to a multiple of 64; the fused 1/32 map is then cut back to H/32 x W/32."""

    def __init__(self, backbone: VPDBackbone, class_embeddings, max_depth: float = 10.0, **head_kw):
        super().__init__()
        if class_embeddings.ndim != 2:
            raise ValueError(f"class_embeddings must be (K, D), got {tuple(class_embeddings.shape)}")
        self.backbone = backbone
        self.register_buffer("class_embeddings", class_embeddings.detach().clone())
        self.max_depth = max_depth
        self.head = DepthHead(backbone.feature_channels(1), max_depth, **head_kw)

    def forward(self, images, scene_ids):
        """images (B, 3, H, W) in [-1, 1], H and W multiples of 32; scene_ids (B,) int64 indices
        into the class embeddings -> depth (B, 1, H, W) in (0, max_depth) metres."""
        _check_images(images, 32)
        if scene_ids.shape != (images.shape[0],):
            raise ValueError(f"scene_ids must be ({images.shape[0]},), got {tuple(scene_ids.shape)}")
        H, W = images.shape[-2:]
        pad_h, pad_w = -H % 64, -W % 64
        x = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
        text = self.class_embeddings[scene_ids].unsqueeze(1)  # (B, 1, D)
        crop = (H // 32, W // 32) if pad_h or pad_w else None
        return self.head(self.backbone(x, text), crop=crop)

    @staticmethod
    def loss(pred, gt, lambd=0.5):
        """Scale-invariant log loss on gt > 0: sqrt(mean(d^2) - lambd * mean(d)^2), d = log gt - log pred.
        Written with masks, not by selecting the valid pixels, so a step has no host sync; a batch with no
        valid pixel gives NaN (the datasets refuse depth maps with none)."""
        if pred.shape != gt.shape:  # the masked form below would broadcast them silently
            raise ValueError(f"depth loss: prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ")
        valid = gt > 0
        n = valid.sum()
        # log(1) = 0 on invalid pixels: no log(0), whose infinite gradient times the mask's 0 would be NaN
        d = torch.log(torch.where(valid, gt, 1.0)) - torch.log(torch.where(valid, pred.float(), 1.0))
        mean = d.sum() / n
        return torch.sqrt((d ** 2).sum() / n - lambd * mean ** 2)


class VPDRefer(nn.Module):
    """Referring segmentation: the sentence's frozen-CLIP token states as text (N = max_tokens),
    LAVT's SimpleDecoding head, 2 classes (background, target)."""

    def __init__(self, backbone: VPDBackbone, clip: CLIPTextModel, max_tokens: int = 40, hidden: int = None):
        super().__init__()
        if clip.cfg.hidden_size != backbone.gamma.shape[0]:
            raise ValueError(f"CLIP width {clip.cfg.hidden_size} != backbone text_dim {backbone.gamma.shape[0]}")
        self.backbone = backbone
        self.clip = clip
        self.clip.requires_grad_(False)
        self.clip.eval()
        self.max_tokens = max_tokens
        self.head = ReferHead(backbone.feature_channels(max_tokens), hidden)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        return self

    def load_frozen_clip(self, sd_path):
        """The CLIP text encoder of an SD v1 file (or dict), frozen, in this model's CLIP config."""
        self.clip = CLIPTextModel.from_checkpoint(sd_path, self.clip.cfg).requires_grad_(False).eval()

    def forward(self, images, token_ids):
        """images (B, 3, H, W) in [-1, 1], H and W multiples of 64; token_ids (B, max_tokens) CLIP ids
        padded with end-of-text -> logits (B, 2, H, W)."""
        _check_images(images, 64)
        if token_ids.shape != (images.shape[0], self.max_tokens):
            raise ValueError(f"token_ids must be ({images.shape[0]}, {self.max_tokens}), got {tuple(token_ids.shape)}")
        with torch.no_grad():
            text, _ = self.clip(token_ids)  # (B, max_tokens, D)
        logits = self.head(self.backbone(images, text))  # (B, 2, H/8, W/8)
        return resize_bilinear(logits, images.shape[-2:], align_corners=True)

    @staticmethod
    def loss(logits, target):
        """Cross-entropy with class weights [0.9, 1.1] (background, target). target: (B, H, W) int64."""
        # the weighted mean F.cross_entropy(weight=[0.9, 1.1]) takes, with the weights made on the device:
        # a weight tensor built from a Python list is a copy from the host, which waits for the GPU
        w = torch.where(target == 1, 1.1, 0.9)
        return (w * F.cross_entropy(logits.float(), target, reduction="none")).sum() / w.sum()


def build_model(task, sd_ckpt=None, unet_cfg=None, vae_cfg=None, clip_cfg=None, class_embeddings=None,
                cache_dir=None, class_names=None, text_device="cpu", **kw):
    """A task model ("semseg", "depth" or "refer").

    sd_ckpt: an SD v1 file to take the UNet, VAE encoder (and for refer the CLIP text encoder) from;
    None builds random weights from the configs (the tiny demo). class_embeddings (K, D) for
    semseg / depth: None computes them from `class_names` (default the ADE20K / NYUv2 names; one prompt
    per class for semseg, the 80-template average for depth, see vpd/text.py) with the file's CLIP
    (cached in `cache_dir`; computed on `text_device`), or, with no file, draws random ones. kw goes
    to the task model (num_classes, max_depth, max_tokens, head widths...).
    """
    from vpd import text as T

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: one of {TASKS}")
    unet_cfg = unet_cfg or UNetConfig()
    bkw = dict(text_dim=unet_cfg.context_dim, map_blocks=() if task == "depth" else ("input", "output"))
    if sd_ckpt is not None:
        backbone = VPDBackbone.from_checkpoint(sd_ckpt, unet_cfg, vae_cfg, **bkw)
    else:
        backbone = VPDBackbone(unet_cfg, vae_cfg, **bkw)

    def clip_model():
        return CLIPTextModel.from_checkpoint(sd_ckpt, clip_cfg) if sd_ckpt is not None else CLIPTextModel(clip_cfg)

    if task == "refer":
        return VPDRefer(backbone, clip_model(), **kw)
    if class_embeddings is None:
        names = class_names or (T.ADE20K_CLASSES if task == "semseg" else T.NYU_SCENES)
        if sd_ckpt is not None:
            ckpt_id = None if isinstance(sd_ckpt, dict) else T.file_identity(sd_ckpt)
            templates = T.ADE20K_TEMPLATES if task == "semseg" else T.IMAGENET_TEMPLATES
            class_embeddings = T.class_embeddings(names, clip_model().to(text_device), Tokenizer(),
                                                  cache_dir=cache_dir, ckpt_id=ckpt_id, templates=templates)
        else:
            k = (kw.get("num_classes") or len(names)) if task == "semseg" else len(names)
            class_embeddings = torch.randn(k, unet_cfg.context_dim)  # stand-ins: no CLIP weights to use
    if task == "semseg":
        return VPDSeg(backbone, class_embeddings, **kw)
    return VPDDepth(backbone, class_embeddings, **kw)
