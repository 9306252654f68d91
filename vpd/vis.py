"""Pictures of predictions and training curves, with Pillow and numpy only.

Segmentation labels get a fixed palette, depth a rainbow colormap, referring masks a coloured overlay;
depth maps are stored as 16-bit PNGs in millimetres (the NYUv2 convention); a JSON-lines training log
becomes one line plot per logged series. Inputs may be numpy arrays or torch tensors (any device).
"""
import colorsys
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _array(x, what):
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    if isinstance(x, Image.Image):
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, a torch tensor or a PIL image, got {type(x).__name__}")
    return x


def _check_2d(x, what):
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-d (H, W), got shape {x.shape}")


def _make_palette(n):
    """n distinct, non-black colours: hues a golden angle apart, cycling through three tones so that
    neighbouring ids differ in brightness as well as hue."""
    tones = [(0.85, 0.95), (0.45, 0.9), (0.9, 0.6)]  # (saturation, value)
    out = []
    for i in range(n):
        s, v = tones[i % 3]
        r, g, b = colorsys.hsv_to_rgb((i * 0.6180339887498949) % 1.0, s, v)
        out.append((round(255 * r), round(255 * g), round(255 * b)))
    return np.array(out, dtype=np.uint8)


CLASS_PALETTE = _make_palette(150)  # (150, 3) uint8, one colour per class id 0..149 (our own, not mmseg's)
CLASS_PALETTE.flags.writeable = False


def colorize_labels(label, palette=CLASS_PALETTE, ignore_index=255):
    """(H, W) class ids -> RGB image; `ignore_index` pixels are black."""
    label = _array(label, "label")
    _check_2d(label, "label")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must hold integer class ids, got {label.dtype}")
    palette = np.asarray(palette, dtype=np.uint8)
    keep = label != ignore_index
    ids = label[keep].astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= len(palette)):
        bad = np.unique(ids[(ids < 0) | (ids >= len(palette))])[:5].tolist()
        raise ValueError(f"label holds ids {bad} outside the palette's [0, {len(palette)}) "
                         f"and other than ignore_index {ignore_index}")
    rgb = np.zeros(label.shape + (3,), dtype=np.uint8)
    rgb[keep] = palette[ids]
    return Image.fromarray(rgb)


# A turbo-like rainbow (dark blue -> cyan -> green -> yellow -> red -> dark red), sampled at 11 evenly
# spaced points and linearly interpolated to a 256-entry table. Neither end is black, so black stays
# free to mark pixels without depth.
_RAINBOW_ANCHORS = np.array([
    (48, 18, 59), (68, 96, 222), (52, 161, 250), (27, 214, 203), (72, 248, 131), (164, 252, 60),
    (226, 220, 55), (254, 163, 48), (240, 96, 24), (194, 40, 4), (122, 4, 3)], dtype=np.float64)
DEPTH_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_RAINBOW_ANCHORS)), c)
                      for c in _RAINBOW_ANCHORS.T], axis=1).round().astype(np.uint8)  # (256, 3)
DEPTH_LUT.flags.writeable = False


def colorize_depth(depth, vmin=None, vmax=None):
    """(H, W) depth -> RGB image: vmin dark blue ... vmax dark red, values outside clipped to the ends.

    Pixels without a depth (<= 0, NaN or inf, as in ground-truth maps with holes) are black. vmin/vmax
    default to the range of the valid pixels.
    """
    d = _array(depth, "depth").astype(np.float64)
    _check_2d(d, "depth")
    valid = np.isfinite(d) & (d > 0)
    if (vmin is None or vmax is None) and not valid.any():
        raise ValueError("depth has no valid (finite, > 0) pixel to take vmin/vmax from; pass them")
    vmin = d[valid].min() if vmin is None else float(vmin)
    vmax = d[valid].max() if vmax is None else float(vmax)
    if vmax < vmin:
        raise ValueError(f"vmax {vmax} is below vmin {vmin}")
    t = (np.where(valid, d, vmin) - vmin) / max(vmax - vmin, 1e-12)
    rgb = DEPTH_LUT[np.rint(np.clip(t, 0, 1) * 255).astype(np.int64)]
    rgb[~valid] = 0
    return Image.fromarray(rgb)


def overlay_mask(image, mask, color=(255, 0, 0), alpha=0.5):
    """Blend `color` into the RGB `image` where the (H, W) bool `mask` is set: (1-alpha)*image + alpha*color."""
    img = _array(image, "image")
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8 (H, W, 3), got shape {img.shape} dtype {img.dtype}")
    mask = _array(mask, "mask")
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    if mask.shape != img.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {img.shape[:2]}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = img.astype(np.float64)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, dtype=np.float64)
    return Image.fromarray(np.rint(out).astype(np.uint8))


def save_depth_png16(depth_m, path, units_per_metre=1000):
    """Write (H, W) depth in metres as a 16-bit PNG of depth * units_per_metre (1000: whole
    millimetres, 0..65.535 m; 256: KITTI's convention, 0..255.996 m), 0 = no depth."""
    d = _array(depth_m, "depth_m").astype(np.float64)
    _check_2d(d, "depth_m")
    if not np.isfinite(d).all():
        raise ValueError("depth_m holds NaN or inf; a uint16 PNG cannot store them")
    units = np.rint(d * units_per_metre)
    if units.size and (units.min() < 0 or units.max() > 65535):
        raise ValueError(f"depth_m spans [{d.min():.4g}, {d.max():.4g}] m; a uint16 PNG of 1/{units_per_metre} m "
                         f"holds 0 to {65535 / units_per_metre:g} m")
    Image.fromarray(units.astype(np.uint16)).save(path, format="PNG")


def _read_jsonl(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"log not found: {path}")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not JSON ({e})") from None
    return records


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _collect_series(records, x):
    """{name: ([x...], [y...])} for every numeric key; non-finite values are left out of the line."""
    series = {}
    for n, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"record {n} is a {type(rec).__name__}, not a dict")
        names = [k for k, v in rec.items() if k != x and _is_number(v)]
        if not names:
            continue  # e.g. a record of strings only
        if not _is_number(rec.get(x)):
            raise ValueError(f"record {n} has values {names} but no numeric {x!r}: {rec}")
        for k in names:
            if math.isfinite(rec[k]):
                xs, ys = series.setdefault(k, ([], []))
                xs.append(rec[x])
                ys.append(rec[k])
    return series


def _nice_ticks(lo, hi, n=5):
    """About n ticks at 1, 2 or 5 x 10^k spacing, and the axis range rounded out to whole ticks."""
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [k * step for k in range(first, last + 1)], first * step, last * step


def plot_curves(records, out_png, x="step", width=720, panel_height=220):
    """Line plots of every numeric series in a training log against `x`, one panel per series.

    records: a JSON-lines file path or a list of dicts such as {"step": 10, "loss": 0.5, "lr": 1e-4}.
    Records with no number besides `x` (e.g. strings only) are skipped; one with numbers but no numeric `x`
    is an error.
    Writes `out_png` and returns the image.
    """
    if isinstance(records, (str, os.PathLike)):
        records = _read_jsonl(os.fspath(records))
    series = _collect_series(records, x)
    if not series:
        raise ValueError(f"no numeric series besides {x!r} to plot")
    font = ImageFont.load_default()
    img = Image.new("RGB", (width, panel_height * len(series)), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, 16, 26, 40  # panel margins in pixels
    for p, (name, (xs, ys)) in enumerate(series.items()):
        y0 = p * panel_height
        ax_l, ax_r, ax_t, ax_b = left, width - right, y0 + top, y0 + panel_height - bottom
        xticks, xlo, xhi = _nice_ticks(min(xs), max(xs))
        yticks, ylo, yhi = _nice_ticks(min(ys), max(ys))

        def to_px(u, v):
            return (ax_l + (u - xlo) / (xhi - xlo) * (ax_r - ax_l),
                    ax_b - (v - ylo) / (yhi - ylo) * (ax_b - ax_t))

        draw.text((ax_l, y0 + 6), name, fill="black", font=font)
        for t in yticks:
            _, py = to_px(xlo, t)
            draw.line([(ax_l, py), (ax_r, py)], fill=(230, 230, 230))
            draw.line([(ax_l - 4, py), (ax_l, py)], fill="black")
            label = f"{t:.6g}"
            w = draw.textbbox((0, 0), label, font=font)[2]
            draw.text((ax_l - 7 - w, py - 6), label, fill="black", font=font)
        for t in xticks:
            px, _ = to_px(t, ylo)
            draw.line([(px, ax_b), (px, ax_b + 4)], fill="black")
            label = f"{t:.6g}"
            w = draw.textbbox((0, 0), label, font=font)[2]
            draw.text((px - w / 2, ax_b + 6), label, fill="black", font=font)
        draw.rectangle([ax_l, ax_t, ax_r, ax_b], outline="black")
        draw.text(((ax_l + ax_r) / 2 - 10, ax_b + 22), x, fill="black", font=font)
        colour = tuple(int(c) for c in CLASS_PALETTE[p % len(CLASS_PALETTE)])
        points = [to_px(u, v) for u, v in sorted(zip(xs, ys))]
        if len(points) == 1:
            (px, py), = points
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        else:
            draw.line(points, fill=colour, width=2)
    img.save(out_png, format="PNG")
    return img
