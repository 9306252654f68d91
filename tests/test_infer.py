"""Test-time inference bookkeeping (vpd/infer.py) with fake models whose outputs are known by hand."""
import numpy as np
import pytest
import torch
from torch import nn

from vpd.infer import depth_predict, pad_to, refer_logits, semseg_probs, slide_logits


class Pointwise(nn.Module):
    """A 1x1 conv: translation-equivariant, so windows of any placement agree with the whole image."""

    def __init__(self, k=5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x):
        return self.conv(x)


class Recorder(nn.Module):
    """Records the top-left (row, col) of every window, read from coordinate channels of the image."""

    def __init__(self):
        super().__init__()
        self.seen, self.calls = [], 0

    def forward(self, x):
        self.calls += 1
        self.seen += [(int(w[0, 0, 0]), int(w[1, 0, 0]), tuple(x.shape[-2:])) for w in x]
        return torch.ones(x.shape[0], 2, *x.shape[-2:])


def coords(h, w):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([ys, xs, torch.zeros(h, w)])[None]  # (1, 3, h, w)


def test_pad_to_pads_bottom_right_and_reports_size():
    x = torch.ones(1, 3, 50, 64)
    xp, size = pad_to(x, 32)
    assert xp.shape == (1, 3, 64, 64) and size == (50, 64)
    assert xp[..., :50, :].eq(1).all() and xp[..., 50:, :].eq(0).all()
    same = torch.ones(1, 3, 64, 128)
    assert pad_to(same)[0] is same  # nothing to pad: the input itself


def test_slide_windows_follow_mmseg_grid():
    # H=100, W=150, crop 64, stride 43: mmseg's grid has (100-64+42)//43+1 = 2 rows and
    # (150-64+42)//43+1 = 3 columns; windows are shifted back inside the image at the far edges
    rec = Recorder()
    out = slide_logits(rec, coords(100, 150), 2, crop=64, stride=43)
    assert sorted(rec.seen) == sorted((y, x, (64, 64)) for y in (0, 36) for x in (0, 43, 86))
    assert torch.allclose(out, torch.ones_like(out))  # overlap counts divide out exactly


def test_slide_equals_whole_image_for_translation_equivariant_model():
    model = Pointwise()
    image = torch.randn(2, 3, 100, 150)
    with torch.no_grad():
        whole = model(image)
        slid = slide_logits(model, image, 5, crop=64, stride=43)
    assert torch.allclose(slid, whole, atol=1e-5)


def test_windows_go_through_the_model_a_batch_at_a_time():
    # the 2 x 3 windows of test_slide_windows_follow_mmseg_grid over two different images: 12 crops,
    # `batch` per forward (the last group shorter), each one's output back where it came from
    class Echo(Recorder):  # returns its coordinate channels (image 1's are offset by 1000)
        def forward(self, x):
            super().forward(x)
            return x[:, :2].clone()
    images = torch.cat([coords(100, 150), coords(100, 150) + 1000])
    for batch, calls in ((4, 3), (5, 3), (1, 12)):
        rec = Echo()
        out = slide_logits(rec, images, 2, crop=64, stride=43, batch=batch)
        assert rec.calls == calls
        assert sorted(rec.seen) == sorted((y + o, x + o, (64, 64)) for y in (0, 36) for x in (0, 43, 86) for o in (0, 1000))
        assert torch.equal(out, images[:, :2])


def mmseg_probs(model, views, k, out_size, crop, stride):
    """mmseg's slide test written out: one window of one image per forward, a view and its mirror image
    one after the other, each softmax taken at the output size."""
    probs = 0
    for x in views:
        for flipped in (False, True):
            x = x.flip(-1) if flipped else x
            H, W = x.shape[-2:]
            logits, count = torch.zeros(x.shape[0], k, H, W), torch.zeros(1, 1, H, W)
            for r in range(max(H - crop + stride - 1, 0) // stride + 1):
                for c in range(max(W - crop + stride - 1, 0) // stride + 1):
                    y2, x2 = min(r * stride + crop, H), min(c * stride + crop, W)
                    y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                    for i in range(x.shape[0]):
                        window, (h, w) = pad_to(x[i:i + 1, :, y1:y2, x1:x2])
                        logits[i:i + 1, :, y1:y2, x1:x2] += model(window)[..., :h, :w]
                    count[..., y1:y2, x1:x2] += 1
            logits = logits / count
            logits = logits.flip(-1) if flipped else logits
            probs = probs + torch.nn.functional.interpolate(logits, size=out_size, mode="bilinear").softmax(1)
    return probs / (2 * len(views))


def test_batched_windows_predict_what_mmseg_does():
    # a tiny VPD semseg model (BatchNorm in eval mode, cross-attention maps, padding): crops of two
    # views and their mirror images, 1, 5 or 8 per forward (groups of 5 leave a short last one), give
    # the probabilities of mmseg's one window of one image per forward
    from vpd.demo import TINY_CLIP, TINY_UNET, TINY_VAE
    from vpd.model import build_model
    torch.manual_seed(0)
    model = build_model("semseg", unet_cfg=TINY_UNET, vae_cfg=TINY_VAE, clip_cfg=TINY_CLIP, num_classes=7).eval()
    for b in (1, 2):
        views = [torch.rand(b, 3, 80, 112) * 2 - 1, torch.rand(b, 3, 96, 136) * 2 - 1]
        with torch.no_grad():
            want = mmseg_probs(model, views, 7, (80, 112), crop=64, stride=42)
            for batch in (1, 5, 8):
                got = semseg_probs(model, views, 7, (80, 112), flip=True, crop=64, batch=batch)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_small_image_is_padded_and_cut():
    model = Pointwise()
    image = torch.randn(1, 3, 40, 50)  # smaller than a crop, and not a multiple of 64
    with torch.no_grad():
        out = slide_logits(model, image, 5, crop=512, stride=341)
    assert out.shape == (1, 5, 40, 50)
    assert torch.allclose(out, model(image), atol=1e-5)


def test_semseg_flip_and_output_size():
    model = Pointwise()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        plain = semseg_probs(model, [image], 5, (64, 96))
        flipped = semseg_probs(model, [image], 5, (64, 96), flip=True)
        expected = model(image).softmax(1)
        resized = semseg_probs(model, [image], 5, (32, 48))
    assert torch.allclose(plain, expected, atol=1e-5)
    assert torch.allclose(flipped, expected, atol=1e-5)  # a wrong un-flip would mirror the map
    assert resized.shape == (1, 5, 32, 48)
    ms = semseg_probs(model, [image, torch.nn.functional.interpolate(image, size=(96, 144))], 5, (64, 96), flip=True)
    assert ms.shape == (1, 5, 64, 96) and torch.allclose(ms.sum(1), torch.ones(1, 64, 96), atol=1e-5)


class DepthFake(nn.Module):
    """Depth fakes: 'image' returns channel 0, 'column' the column index inside the crop it is given,
    'scene' the scene id; each records the input sizes."""

    def __init__(self, mode):
        super().__init__()
        self.mode, self.sizes = mode, []

    def forward(self, x, ids):
        self.sizes.append(tuple(x.shape[-2:]))
        b, _, h, w = x.shape
        if self.mode == "image":
            return x[:, :1].clone()
        if self.mode == "column":
            return torch.arange(w, dtype=torch.float32).expand(b, 1, h, w).clone()
        return ids.float().view(b, 1, 1, 1).expand(b, 1, h, w).clone()


def test_depth_windows_and_flip_reproduce_a_pointwise_map():
    image = torch.rand(2, 3, 96, 128)
    fake = DepthFake("image")
    out = depth_predict(fake, image, torch.tensor([1, 2]), flip=True)
    assert out.shape == (2, 1, 96, 128)
    assert torch.allclose(out, image[:, :1], atol=1e-6)
    assert fake.sizes == [(96, 96)]  # one call: 2 windows x 2 images x (plain, flipped)


def test_depth_window_averaging_by_hand():
    # windows [0, 96) and [32, 128) of a 96x128 image; the fake returns the crop-local column
    h, w, s = 96, 128, 32
    out = depth_predict(DepthFake("column"), torch.zeros(1, 3, h, w), torch.tensor([0]), flip=False)
    c = np.arange(w, dtype=np.float64)
    total = np.where(c < h, c, 0) + np.where(c >= s, c - s, 0)
    count = (c < h).astype(float) + (c >= s)
    assert np.allclose(out[0, 0, 5].numpy(), total / count)
    # with the flip, local column k and its mirror h-1-k average to (h-1)/2 everywhere
    flipped = depth_predict(DepthFake("column"), torch.zeros(1, 3, h, w), torch.tensor([0]), flip=True)
    assert torch.allclose(flipped, torch.full_like(flipped, (h - 1) / 2))


def test_depth_scene_ids_follow_their_images_and_padding_is_cut():
    fake = DepthFake("scene")
    out = depth_predict(fake, torch.zeros(2, 3, 48, 64), torch.tensor([3, 7]), flip=True)
    assert out[0].eq(3).all() and out[1].eq(7).all()
    assert fake.sizes == [(64, 64)]  # 48 is padded to a multiple of 32, then cut off again
    fake = DepthFake("scene")
    depth_predict(fake, torch.zeros(1, 3, 480, 640), torch.tensor([0]))
    assert fake.sizes == [(480, 480)]  # 480 goes as it is: the model pads it to 512 itself


def test_depth_portrait_image_is_one_window():
    image = torch.rand(1, 3, 64, 48)
    out = depth_predict(DepthFake("image"), image, torch.tensor([0]), flip=True)
    assert torch.allclose(out, image[:, :1], atol=1e-6)


def test_refer_logits_resized_to_the_mask():
    # logits that are ramps in x and y: bilinear resizing (half-pixel centres, clamped at the border)
    # samples a ramp at (j + 0.5) * in / out - 0.5, by hand; nearest would give whole numbers
    def model(x, tokens):
        h, w = x.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        return torch.stack([xs, ys])[None].expand(x.shape[0], 2, h, w)
    out = refer_logits(model, torch.zeros(1, 3, 64, 64), torch.zeros(1, 40, dtype=torch.long), (30, 50))
    assert out.shape == (1, 2, 30, 50)
    at = lambda n: ((torch.arange(n) + 0.5) * 64 / n - 0.5).clamp(0, 63)  # noqa: E731
    torch.testing.assert_close(out[0, 0], at(50).expand(30, 50))
    torch.testing.assert_close(out[0, 1], at(30)[:, None].expand(30, 50))


@pytest.mark.parametrize("windows", [4, 5])
def test_depth_windows_cover_every_column(windows):
    image = torch.rand(1, 3, 32, 100)  # (100 - 32) is not a multiple of windows - 1 = 3 or 4
    out = depth_predict(DepthFake("image"), image, torch.tensor([0]), flip=False, windows=windows)
    assert torch.isfinite(out).all() and torch.allclose(out, image[:, :1], atol=1e-6)


def test_four_depth_windows_by_hand():
    # KITTI-style: 4 windows of 32 over 100 columns start at 0, 22, 45, 68 (the last ends at 100, the
    # others evenly between, rounded down); the fake returns the crop-local column, averaged where they overlap
    out = depth_predict(DepthFake("column"), torch.zeros(1, 3, 32, 100), torch.tensor([0]), flip=False, windows=4)
    c = np.arange(100, dtype=np.float64)
    inside = [(c >= s) & (c < s + 32) for s in (0, 22, 45, 68)]
    total = sum(np.where(m, c - s, 0) for m, s in zip(inside, (0, 22, 45, 68)))
    assert np.allclose(out[0, 0, 3].numpy(), total / sum(m.astype(float) for m in inside))


def test_depth_too_few_windows_is_an_error():
    with pytest.raises(ValueError, match="at least 4"):
        depth_predict(DepthFake("image"), torch.rand(1, 3, 32, 100), torch.tensor([0]), windows=2)


def test_depth_one_window_is_the_whole_image():
    # predict.py's choice for images wider than 2:1: one forward over the whole (padded) image
    image = torch.rand(1, 3, 32, 100)
    fake = DepthFake("column")
    out = depth_predict(fake, image, torch.tensor([0]), flip=False, windows=1)
    assert fake.sizes == [(32, 128)]  # 100 padded to a multiple of 32, in one piece
    assert torch.equal(out[0, 0, 0], torch.arange(100, dtype=torch.float32))


def test_semseg_logits_are_resized_before_the_softmax():
    # mmseg resizes logits to the label size and then takes the softmax: at an upsampled pixel between
    # logits 0 and 4 (weights 3/4, 1/4) the probability is sigmoid(1), not the mean of the two sigmoids
    class Step(nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
            logits[:, 0, :, x.shape[-1] // 2:] = 4.0  # class 0 favoured on the right half
            return logits
    probs = semseg_probs(Step(), [torch.zeros(1, 3, 64, 128)], 2, out_size=(64, 256), crop=512)
    # output column 127 samples input x = (127 + 0.5) / 2 - 0.5 = 63.25: logit 0.75 * 0 + 0.25 * 4 = 1
    torch.testing.assert_close(probs[0, 0, :, 127], torch.full((64,), torch.sigmoid(torch.tensor(1.0)).item()))


def test_views_at_other_scales_are_averaged_at_the_output_size():
    # one view per scale, each predicted and resized to the label's size, softmaxes averaged
    class Half(nn.Module):  # class 1 where channel 0 is positive, else class 0
        def forward(self, x):
            return torch.cat([torch.zeros_like(x[:, :1]), 4 * x[:, :1]], 1)
    small, large = torch.ones(1, 3, 32, 32), torch.zeros(1, 3, 64, 64)
    probs = semseg_probs(Half(), [small, large], 2, out_size=(16, 16))
    s = torch.sigmoid(torch.tensor(4.0))  # class 1's probability on the small view; 1/2 on the large one
    torch.testing.assert_close(probs[0, 1], torch.full((16, 16), ((s + 0.5) / 2).item()))


def test_slide_rows_follow_mmseg_grid_for_a_tall_image():
    # the row count is mmseg's too: H=150, crop 64, stride 43 gives (150-64+42)//43+1 = 3 rows (86 = 2 strides
    # exactly: without mmseg's "- 1" a 4th row would repeat the last window and weigh it twice)
    rec = Recorder()
    slide_logits(rec, coords(150, 100), 2, crop=64, stride=43)
    assert sorted(rec.seen) == sorted((y, x, (64, 64)) for y in (0, 43, 86) for x in (0, 36))


def test_image_between_half_a_crop_and_a_crop_is_one_window_from_the_corner():
    # mmseg: y1 = max(y2 - crop, 0); a 40x50 image under a 64 crop is one window at (0, 0), padded to 64x64
    # (y2 - crop = -24 as a slice start would take only rows 16..39 and leave the others uncounted)
    rec = Recorder()
    out = slide_logits(rec, coords(40, 50), 2, crop=64, stride=43)
    assert rec.seen == [(0, 0, (64, 64))]
    assert torch.equal(out, torch.ones(1, 2, 40, 50))


def test_depth_windows_that_tile_the_image_exactly_are_allowed():
    # 2 windows of 32 cover a 32x64 image with no overlap: [0, 32) and [32, 64), crop-local columns 0..31 twice
    out = depth_predict(DepthFake("column"), torch.zeros(1, 3, 32, 64), torch.tensor([0]), flip=False, windows=2)
    assert torch.equal(out[0, 0, 7], torch.arange(32, dtype=torch.float32).repeat(2))
