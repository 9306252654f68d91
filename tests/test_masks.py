import os
import pickle

import numpy as np
import pytest

from vpd.masks import (counts_to_rle_string, load_plain_pickle, mask_to_polygons, polygon_to_mask, rle_decode,
                       rle_encode, rle_string_to_counts, segmentation_to_mask)


def test_rectangle_polygon_covers_the_pixels_whose_centres_are_inside():
    m = polygon_to_mask([[2, 3, 10, 3, 10, 8, 2, 8]], 12, 12)
    expected = np.zeros((12, 12), np.uint8)
    expected[3:8, 2:10] = 1  # centres 3.5..7.5 in [3, 8], 2.5..9.5 in [2, 10]
    np.testing.assert_array_equal(m, expected)


def test_l_shape_and_union_of_two_polygons():
    l_shape = [0, 0, 4, 0, 4, 2, 2, 2, 2, 4, 0, 4]
    square = [6, 5, 8, 5, 8, 7, 6, 7]
    m = polygon_to_mask([l_shape, square], 8, 9)
    expected = {(r, c) for r in (0, 1) for c in range(4)} | {(r, c) for r in (2, 3) for c in (0, 1)} \
        | {(r, c) for r in (5, 6) for c in (6, 7)}
    assert {tuple(p) for p in np.argwhere(m)} == expected


def test_uncompressed_rle_is_column_major_and_starts_with_background():
    # 3x4 mask with pixels (row 1, col 0), (row 2, col 0), (row 0, col 1):
    # column-major walk: col0 = 0 1 1, col1 = 1 0 0, col2/col3 = 0 0 0 -> runs 1, 3, 8.
    expected = np.zeros((3, 4), np.uint8)
    expected[1, 0] = expected[2, 0] = expected[0, 1] = 1
    np.testing.assert_array_equal(rle_decode({"size": [3, 4], "counts": [1, 3, 8]}), expected)
    assert rle_encode(expected, compressed=False)["counts"] == [1, 3, 8]
    first = np.zeros((2, 2), np.uint8)
    first[0, 0] = 1  # a mask starting with foreground gets an empty first background run
    assert rle_encode(first, compressed=False)["counts"] == [0, 1, 3]


def test_compressed_rle_string_by_hand():
    # counts 5, 2, 30, 1, 3 (41 pixels). Small values are one char chr(48 + v); 30 has bit 0x10
    # set so it needs a second group: 'n' (30 | 0x20) then '0'; from the 4th count on the stored
    # value is the difference to two counts back: 1 - 2 = -1 -> 'O', 3 - 30 = -27 -> 'U', 'O'.
    s = "52n0OUO"
    assert rle_string_to_counts(s) == [5, 2, 30, 1, 3]
    assert counts_to_rle_string([5, 2, 30, 1, 3]) == s
    m = rle_decode({"size": [41, 1], "counts": s})
    assert np.flatnonzero(m[:, 0]).tolist() == [5, 6, 37]
    assert rle_encode(m)["counts"] == s


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(1, 30, 2)
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        for compressed in (True, False):
            np.testing.assert_array_equal(rle_decode(rle_encode(m, compressed)), m)


def test_bad_rle_is_rejected():
    with pytest.raises(ValueError, match="sum to 5"):
        rle_decode({"size": [2, 3], "counts": [1, 4]})
    with pytest.raises(ValueError, match="non-negative"):
        rle_decode({"size": [2, 3], "counts": [3, -1, 4]})  # sums to 6: only the sign check sees it
    with pytest.raises(ValueError, match="size"):
        segmentation_to_mask({"size": [2, 3], "counts": [6]}, 3, 2)


def test_traced_polygons_rasterise_back_and_holes_are_refused():
    m = np.zeros((9, 10), np.uint8)
    m[1:4, 2:6] = 1
    m[4:7, 2:3] = 1
    m[7, 8] = m[8, 9] = 1  # two pixels touching at a corner
    polys = mask_to_polygons(m)
    np.testing.assert_array_equal(polygon_to_mask(polys, 9, 10), m)
    ring = np.zeros((6, 6), np.uint8)
    ring[1:5, 1:5] = 1
    ring[2:4, 2:4] = 0
    assert mask_to_polygons(ring) is None


def test_segmentation_dispatch():
    poly = [[0, 0, 2, 0, 2, 2, 0, 2]]
    m = segmentation_to_mask(poly, 3, 3)
    assert m.sum() == 4
    np.testing.assert_array_equal(segmentation_to_mask(rle_encode(m), 3, 3), m)
    with pytest.raises(ValueError, match="unknown segmentation"):
        segmentation_to_mask("oops", 3, 3)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_restricted_unpickler_reads_plain_data_and_refuses_classes(tmp_path):
    good = tmp_path / "refs(unc).p"
    data = [{"ref_id": 1, "sentences": [{"sent": "the red box", "sent_id": 3}], "split": "train", "x": 1.5}]
    good.write_bytes(pickle.dumps(data, protocol=2))
    assert load_plain_pickle(good) == data
    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ValueError, match=r"evil\.p.*refusing"):
        load_plain_pickle(evil)


def test_truncated_pickle_names_the_file(tmp_path):
    p = tmp_path / "refs(umd).p"
    p.write_bytes(pickle.dumps([{"a": list(range(100))}])[:-20])
    with pytest.raises(ValueError, match=r"refs\(umd\)\.p"):
        load_plain_pickle(p)
    with pytest.raises(FileNotFoundError, match="nothing.p"):
        load_plain_pickle(tmp_path / "nothing.p")


def test_slanted_polygon_takes_the_pixels_whose_centres_are_inside():
    # triangle (0,0) (5,0) (0,4): pixel (x, y) is inside when x + 0.5 < 5 * (1 - (y + 0.5) / 4), by hand
    mask = polygon_to_mask([[0, 0, 5, 0, 0, 4]], 4, 6)
    assert mask.sum(1).tolist() == [4, 3, 2, 1]
    assert all(mask[y, :w].all() and not mask[y, w:].any() for y, w in enumerate([4, 3, 2, 1]))


def test_polygons_of_one_or_two_points_add_nothing_and_malformed_ones_are_refused():
    square = [1, 1, 4, 1, 4, 4, 1, 4]
    want = polygon_to_mask([square], 6, 6)
    assert want.sum() == 9
    assert np.array_equal(polygon_to_mask([[2, 2, 5, 5], square, [3, 3]], 6, 6), want)
    for bad in ([1, 1, 4, 1, 4], [1, 1, 4, 1, 4, 4, 1]):  # an odd count of numbers
        with pytest.raises(ValueError, match="flat list of \\(x, y\\) pairs"):
            polygon_to_mask([square, bad], 6, 6)


def test_overlapping_polygons_give_their_union():
    a, b = [0, 0, 4, 0, 4, 4, 0, 4], [2, 2, 6, 2, 6, 6, 2, 6]
    expected = np.zeros((7, 7), np.uint8)
    expected[0:4, 0:4] = 1
    expected[2:6, 2:6] = 1  # the overlap 2:4 x 2:4 stays set
    np.testing.assert_array_equal(polygon_to_mask([a, b], 7, 7), expected)


def test_vertex_on_a_row_centre_is_crossed_once():
    # a 6 x 4 rectangle with an extra collinear vertex on its right side at y = 1.5 (row 1's centre)
    # is still that rectangle: the two edges meeting there must count as one crossing
    m = polygon_to_mask([[0, 0, 6, 0, 6, 1.5, 6, 4, 0, 4]], 5, 8)
    expected = np.zeros((5, 8), np.uint8)
    expected[:4, :6] = 1
    np.testing.assert_array_equal(m, expected)


def test_polygon_reaching_past_the_right_border_is_clipped_not_cut():
    # x from 2 to 20 in a 10-wide image: columns 2..9 are inside (the crossing at 20 lies off the image)
    m = polygon_to_mask([[2, 1, 20, 1, 20, 3, 2, 3]], 4, 10)
    expected = np.zeros((4, 10), np.uint8)
    expected[1:3, 2:] = 1
    np.testing.assert_array_equal(m, expected)


def test_traced_rectangle_is_its_four_corners():
    m = np.zeros((6, 8), np.uint8)
    m[1:4, 2:6] = 1
    polys = mask_to_polygons(m)
    assert len(polys) == 1 and len(polys[0]) == 8  # collinear points along the sides are dropped
    assert {tuple(polys[0][i:i + 2]) for i in range(0, 8, 2)} == {(2.0, 1.0), (6.0, 1.0), (6.0, 4.0), (2.0, 4.0)}


def test_centres_on_half_integer_edges_are_decided_as_pycocotools():
    # pixel centres lie exactly on the edges of a rectangle x 2.5..5.5, y 1.5..3.5. pycocotools (rleFrPoly:
    # vertices x5 rounded half up, a column's run starts at row ceil((5 y + 0.5) / 5 - 0.5)) takes rows 2, 3
    # and columns 3, 4, 5: a centre on the top or left edge is outside, on the bottom or right edge inside
    m = polygon_to_mask([[2.5, 1.5, 5.5, 1.5, 5.5, 3.5, 2.5, 3.5]], 6, 8)
    expected = np.zeros((6, 8), np.uint8)
    expected[2:4, 3:6] = 1
    np.testing.assert_array_equal(m, expected)


def test_sliver_between_two_pixel_centres_covers_nothing():
    # x 2.1..2.4 holds no centre (2.5 is past it): both crossings of a row toggle the same column and cancel
    assert polygon_to_mask([[2.1, 0, 2.4, 0, 2.4, 3, 2.1, 3]], 4, 6).sum() == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools under numpy 2
def test_against_pycocotools():
    # pycocotools is what REFER / LAVT decode COCO segmentations with: RLE both ways exactly, polygons
    # exactly on axis-aligned integer / half-integer edges, within a boundary pixel along slanted ones
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = (rng.random((rng.integers(1, 30), rng.integers(1, 30))) < rng.random()).astype(np.uint8)
        ref = mask_api.encode(np.asfortranarray(m))
        assert rle_encode(m)["counts"] == ref["counts"].decode()
        np.testing.assert_array_equal(rle_decode(ref), mask_api.decode(ref))
    h, w, wrong, area = 24, 20, 0, 0
    for _ in range(50):
        (x0, x1), (y0, y1) = np.sort(rng.integers(0, 2 * w, 2) / 2), np.sort(rng.integers(0, 2 * h, 2) / 2)
        rect = [x0, y0, x1, y0, x1, y1, x0, y1]
        ref = mask_api.decode(mask_api.merge(mask_api.frPyObjects([rect], h, w)))
        np.testing.assert_array_equal(polygon_to_mask([rect], h, w), ref)
        poly = list(np.round(rng.uniform(0, min(h, w), 12), 2))
        ref = mask_api.decode(mask_api.merge(mask_api.frPyObjects([poly], h, w)))
        wrong, area = wrong + (polygon_to_mask([poly], h, w) != ref).sum(), area + ref.sum()
    assert wrong < 0.07 * area  # 6.1%: these small random hexagons are mostly boundary
