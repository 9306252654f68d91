import json

import numpy as np
import pytest
import torch
from PIL import Image

from vpd.data import BadSampleError, read_depth_png
from vpd.vis import (CLASS_PALETTE, DEPTH_LUT, colorize_depth, colorize_labels,
                     overlay_mask, plot_curves, save_depth_png16)


def test_palette_has_150_distinct_non_black_colours():
    assert CLASS_PALETTE.shape == (150, 3) and CLASS_PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in CLASS_PALETTE}) == 150
    assert CLASS_PALETTE.sum(1).min() > 0


def test_colorize_labels_maps_ids_and_blacks_out_ignore():
    label = torch.tensor([[0, 1, 255], [149, 2, 255]])
    img = colorize_labels(label)
    assert img.mode == "RGB" and img.size == (3, 2)  # PIL size is (W, H)
    a = np.asarray(img)
    assert (a[0, 0] == CLASS_PALETTE[0]).all() and (a[1, 0] == CLASS_PALETTE[149]).all()
    assert (a[:, 2] == 0).all()
    with pytest.raises(ValueError, match=r"ids \[150\]"):
        colorize_labels(np.array([[150, 0]]))
    with pytest.raises(ValueError, match="2-d"):
        colorize_labels(np.zeros((1, 2, 2), dtype=np.int64))


def test_colorize_depth_range_ends_and_holes():
    depth = np.array([[1.0, 2.0, 3.0, 0.0], [np.nan, 0.5, 9.0, 2.0]])
    img = colorize_depth(depth, vmin=1.0, vmax=3.0)
    assert img.mode == "RGB" and img.size == (4, 2)
    a = np.asarray(img)
    assert (a[0, 0] == DEPTH_LUT[0]).all() and (a[0, 2] == DEPTH_LUT[255]).all()
    assert (a[0, 1] == DEPTH_LUT[128]).all()  # midpoint: 0.5 * 255 = 127.5 rounds to 128
    assert (a[1, 1] == DEPTH_LUT[0]).all() and (a[1, 2] == DEPTH_LUT[255]).all()  # clipped to the ends
    assert (a[0, 3] == 0).all() and (a[1, 0] == 0).all()  # no depth: black
    # default range from the valid pixels: 0.5 .. 9
    b = np.asarray(colorize_depth(torch.tensor(depth)))
    assert (b[1, 1] == DEPTH_LUT[0]).all() and (b[1, 2] == DEPTH_LUT[255]).all()
    with pytest.raises(ValueError, match="no valid"):
        colorize_depth(np.zeros((2, 2)))
    # inf, -inf and negative depths are holes too, and stay out of the default range
    odd = np.array([[1.0, 2.0, np.inf, -np.inf, -0.5]])
    for img in (colorize_depth(odd, vmin=1.0, vmax=2.0), colorize_depth(odd)):
        c = np.asarray(img)
        assert (c[0, 2:] == 0).all() and (c[0, 0] == DEPTH_LUT[0]).all() and (c[0, 1] == DEPTH_LUT[255]).all()
    with pytest.raises(ValueError, match="below vmin"):
        colorize_depth(depth, vmin=3.0, vmax=1.0)


def test_depth_colormap_is_a_smooth_ramp_without_black():
    assert DEPTH_LUT.shape == (256, 3)
    assert len({tuple(c) for c in DEPTH_LUT}) > 200  # distinct steps
    assert DEPTH_LUT.astype(int).sum(1).min() > 60  # black stays free for holes
    step = np.abs(np.diff(DEPTH_LUT.astype(int), axis=0)).max()
    assert step <= 12  # no jumps between neighbouring entries


def test_overlay_mask_blends_only_inside_the_mask():
    image = Image.new("RGB", (3, 2), (100, 100, 100))
    mask = np.array([[True, False, False], [False, False, True]])
    a = np.asarray(overlay_mask(image, mask, color=(255, 0, 0), alpha=0.25))
    assert a.shape == (2, 3, 3)
    # 0.75 * 100 + 0.25 * 255 = 138.75 -> 139; 0.75 * 100 = 75
    assert a[0, 0].tolist() == [139, 75, 75] and a[1, 2].tolist() == [139, 75, 75]
    assert a[0, 1].tolist() == [100, 100, 100]
    # the defaults: a red tint at half strength, 0.5 * 100 + 0.5 * 255 = 177.5 -> 178
    assert np.asarray(overlay_mask(image, mask))[0, 0].tolist() == [178, 50, 50]
    with pytest.raises(ValueError, match="does not match"):
        overlay_mask(image, np.zeros((3, 2), dtype=bool))
    with pytest.raises(ValueError, match="must be bool"):
        overlay_mask(image, np.zeros((2, 3), dtype=np.uint8))
    for alpha in (1.5, -0.1):  # outside [0, 1] the blend would leave 0..255 and wrap in uint8
        with pytest.raises(ValueError, match="alpha"):
            overlay_mask(image, mask, alpha=alpha)


def test_depth_png16_round_trip_to_the_millimetre(tmp_path):
    rng = np.random.default_rng(0)
    depth = rng.uniform(0, 10, size=(17, 23))
    depth[0, 0] = 65.535  # the largest storable depth (65.536 m would be 65536: 0 in 16 bits)
    path = tmp_path / "d.png"
    save_depth_png16(torch.tensor(depth), path)
    with Image.open(path) as img:
        raw = np.asarray(img)
    assert raw.dtype == np.uint16 and raw.shape == (17, 23)
    assert (raw == np.rint(depth * 1000)).all()
    assert np.abs(read_depth_png(path, 1000) - depth).max() <= 0.0005 + 1e-6
    for too_far in (65.536, 70.0):
        with pytest.raises(ValueError, match="65.535"):
            save_depth_png16(np.full((2, 2), too_far), tmp_path / "x.png")
    with pytest.raises(ValueError, match="spans"):  # negative depth would wrap around in uint16
        save_depth_png16(np.full((2, 2), -0.01), tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        save_depth_png16(np.full((2, 2), np.nan), tmp_path / "x.png")
    with pytest.raises(BadSampleError, match="missing.png"):
        read_depth_png(tmp_path / "missing.png", 1000)
    save_depth_png16(np.full((2, 2), 70.0), tmp_path / "k.png", units_per_metre=256)  # KITTI units: 0..255.996 m
    assert (read_depth_png(tmp_path / "k.png", 256) == 70.0).all()
    with pytest.raises(ValueError, match="holds 0 to 255.996 m"):
        save_depth_png16(np.full((2, 2), 300.0), tmp_path / "k.png", units_per_metre=256)


def records():
    out = [{"run": "demo", "args": {"lr": 1e-4}}]  # settings: no series
    for s in range(0, 200, 10):
        out.append({"step": s, "loss": 2.0 / (1 + s / 20), "lr": 1e-4 * min(1, s / 50)})
    out.append({"step": 199, "mIoU": 41.5})
    return out


def test_plot_curves_from_records_and_jsonl(tmp_path):
    img = plot_curves(records(), tmp_path / "a.png", width=500, panel_height=150)
    with Image.open(tmp_path / "a.png") as saved:
        a = np.asarray(saved.convert("RGB"))
    assert a.shape == (450, 500, 3)  # three panels: loss, lr, mIoU
    colours = {tuple(c) for c in a.reshape(-1, 3)}
    assert len(colours) > 3  # not one colour: background, axes, text and lines
    assert tuple(CLASS_PALETTE[0]) in colours  # the first panel's line colour is drawn
    dark = (a.sum(2) < 200)
    assert dark[:150].sum() > 500  # axes, ticks and labels in the first panel
    assert img.size == (500, 450)

    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in records()) + "\n")
    plot_curves(str(log), tmp_path / "b.png", width=500, panel_height=150)
    with Image.open(tmp_path / "b.png") as saved:
        assert (np.asarray(saved.convert("RGB")) == a).all()


def test_plot_curves_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_curves(tmp_path / "none.jsonl", tmp_path / "x.png")
    with pytest.raises(ValueError, match="no numeric series"):
        plot_curves([{"step": 1}, {"run": "x"}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no numeric 'step'"):
        plot_curves([{"loss": 1.0}], tmp_path / "x.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        plot_curves(bad, tmp_path / "x.png")


def test_colorize_depth_of_a_constant_map_is_the_low_end():
    # vmin == vmax (a flat prediction) is a valid range: every pixel at t = 0, no error
    a = np.asarray(colorize_depth(np.full((2, 3), 2.5)))
    assert (a == DEPTH_LUT[0]).all()


def test_colorize_labels_refuses_ids_above_ignore_and_honours_other_ignore_indices():
    with pytest.raises(ValueError, match=r"ids \[300\]"):
        colorize_labels(np.array([[300, 0]]))
    a = np.asarray(colorize_labels(np.array([[-1, 4]]), ignore_index=-1))
    assert (a[0, 0] == 0).all() and (a[0, 1] == CLASS_PALETTE[4]).all()


def test_axis_ticks_are_1_2_5_steps_that_cover_the_data():
    from vpd.vis import _nice_ticks
    ticks, lo, hi = _nice_ticks(0, 5)  # raw step (5 - 0) / 5 = 1 exactly: step 1
    assert ticks == [0, 1, 2, 3, 4, 5] and (lo, hi) == (0, 5)
    ticks, lo, hi = _nice_ticks(0, 0.95)  # raw 0.19 -> step 0.2, range rounded out to 1.0
    assert ticks == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0]) and lo == 0 and hi == pytest.approx(1.0)
    ticks, lo, hi = _nice_ticks(0.3, 0.95)  # raw 0.13 -> step 0.2; the low end rounded down to 0.2
    assert ticks == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and lo == pytest.approx(0.2)
    assert _nice_ticks(0, 2.2)[0] == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5])  # raw 0.44 -> a step of 5 x 10^-1


def test_plot_curves_skips_non_finite_values_and_blank_lines(tmp_path):
    # a NaN loss (a diverged step) and blank lines in the log leave the picture as without them
    clean = records()
    plot_curves(clean, tmp_path / "clean.png", width=400, panel_height=120)
    log = tmp_path / "log.jsonl"
    lines = [json.dumps(r) for r in clean]
    lines.insert(3, json.dumps({"step": 15, "loss": float("nan")}))
    lines.insert(5, "")
    log.write_text("\n".join(lines) + "\n\n")
    plot_curves(str(log), tmp_path / "noisy.png", width=400, panel_height=120)
    with Image.open(tmp_path / "clean.png") as a, Image.open(tmp_path / "noisy.png") as b:
        assert (np.asarray(a) == np.asarray(b)).all()


def test_depth_colormap_runs_from_blue_near_to_red_far():
    # the docstring's orientation: vmin dark blue, vmax dark red (a reversed table would still be smooth)
    near, far = DEPTH_LUT[0].astype(int), DEPTH_LUT[255].astype(int)
    assert near[2] > near[0] and near[2] > near[1]
    assert far[0] > far[1] and far[0] > far[2]
    a = np.asarray(colorize_depth(np.array([[1.0, 5.0]])))
    assert a[0, 0, 2] > a[0, 0, 0] and a[0, 1, 0] > a[0, 1, 2]


def test_overlay_mask_is_not_transposed_on_a_square_image():
    image = Image.new("RGB", (2, 2), (0, 0, 0))
    mask = np.array([[False, True], [False, False]])  # row 0, column 1
    a = np.asarray(overlay_mask(image, mask, color=(200, 0, 0), alpha=1.0))
    assert a[0, 1].tolist() == [200, 0, 0] and a[1, 0].tolist() == [0, 0, 0]


def test_plot_curves_draws_each_series_left_to_right_and_upwards(tmp_path):
    # logged out of step order: (0, 0), (20, 0), (5, 10). Sorted by step that is a peak at a quarter
    # of the x range; the peak is the panel's highest point, and the descending side at step 12.5
    # sits at half height (drawn in log order a segment would run along the bottom there)
    recs = [{"step": 0, "loss": 0.0}, {"step": 20, "loss": 0.0}, {"step": 5, "loss": 10.0},
            {"step": 0, "lr": 1.0}, {"step": 20, "lr": 2.0}]
    a = np.asarray(plot_curves(recs, tmp_path / "p.png", width=400, panel_height=200).convert("RGB"))
    line = (a[:200] == CLASS_PALETTE[0]).all(2)
    rows, cols = np.nonzero(line)
    left, right, top, bottom = cols.min(), cols.max(), rows.min(), rows.max()  # steps 0..20, loss 0..10
    peak_cols = cols[rows == top]
    assert abs(peak_cols.mean() - (left + 0.25 * (right - left))) <= 3
    col = int(round(left + 0.625 * (right - left)))
    mid_rows = np.nonzero(line[:, col])[0]
    assert mid_rows.size and np.abs(mid_rows - (top + bottom) / 2).max() <= 3
    # the second panel gets its own colour
    assert (a[200:] == CLASS_PALETTE[1]).all(2).any() and not (a[200:] == CLASS_PALETTE[0]).all(2).any()
