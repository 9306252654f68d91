"""COCO segmentation masks without pycocotools, and a pickle reader that cannot run code.

COCO stores an object's segmentation in one of three ways (cocodataset.org/#format-data):
  - polygons: a list of flat [x0, y0, x1, y1, ...] lists in pixel coordinates (the union is the object);
  - uncompressed RLE: {"size": [h, w], "counts": [n0, n1, ...]};
  - compressed RLE: {"size": [h, w], "counts": "<ascii string>"}.
RLE runs alternate background/foreground, start with background, and walk the image in column-major
(Fortran) order: down the first column, then the second, ...

Polygons are rasterised by the pixel-centre rule: pixel (x, y) belongs to a polygon when its centre
(x + 0.5, y + 0.5) lies inside it (even-odd rule); a centre exactly on an edge counts as inside on a
bottom or right edge and outside on a top or left one, as pycocotools decides. On axis-aligned edges
at integer or half-integer coordinates (rectangles, L shapes, the pixel-edge outlines
`mask_to_polygons` writes) this gives exactly pycocotools' masks; along slanted edges pycocotools'
own rasteriser can differ by a boundary pixel (about 2% of the area on random 40-pixel polygons).
"""
import pickle

import numpy as np


# ----------------------------------------------------------------------------- restricted pickle

class _RefusingUnpickler(pickle.Unpickler):
    # The REFER refs files hold only lists/dicts/str/int/float, which pickle rebuilds without any
    # class lookup. Refusing every lookup means a crafted file cannot import or call anything.
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load class {module}.{name}: only plain data is allowed")


def load_plain_pickle(path):
    """Read a pickle of plain Python data (lists, dicts, str, numbers); refuse any class."""
    try:
        with open(path, "rb") as f:
            return _RefusingUnpickler(f).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"pickle file not found: {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, ImportError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read pickle {path}: {type(e).__name__}: {e} "
                         f"(truncated, corrupt, or holding objects other than plain data)") from None


# ----------------------------------------------------------------------------- RLE

def rle_string_to_counts(s):
    """COCO's compressed counts string -> list of run lengths.

    Each count is written in 5-bit groups, least significant first, as chr(48 + group); bit 0x20
    of a group means "more groups follow", bit 0x10 of the last group is the sign. From the fourth
    count on, the value stored is the difference to the count two places earlier.
    """
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError(f"compressed RLE string ends inside a number: {s!r}")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {s[p]!r} in compressed RLE string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x -= 1 << (5 * k)  # sign-extend
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def counts_to_rle_string(counts):
    """List of run lengths -> COCO's compressed counts string (inverse of rle_string_to_counts)."""
    out = []
    for i, x in enumerate(counts):
        x = int(x)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: a negative x tends to -1
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle_decode(rle):
    """COCO RLE dict (counts as list or compressed string) -> uint8 mask (h, w) of 0/1."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE must be a dict with 'size' and 'counts', got {type(rle).__name__}")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = rle_string_to_counts(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any():
        raise ValueError("RLE counts must be non-negative")
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, but size {h}x{w} needs {h * w}")
    values = np.arange(len(counts)) % 2  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values.astype(np.uint8), counts)
    return flat.reshape(w, h).T.copy()  # column-major: the flat order walks down columns


def rle_encode(mask, compressed=True):
    """uint8/bool mask (h, w) -> COCO RLE dict; counts as a compressed string or a plain list."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-d (h, w), got shape {mask.shape}")
    h, w = mask.shape
    flat = (mask.T.reshape(-1) != 0).astype(np.int8)  # column-major order
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts  # the first run is always background
    if flat.size == 0:
        counts = []
    return {"size": [h, w], "counts": counts_to_rle_string(counts) if compressed else counts}


# ----------------------------------------------------------------------------- polygons

def polygon_to_mask(polygons, height, width):
    """Union of COCO polygons (list of flat [x0, y0, x1, y1, ...] lists) -> uint8 mask (h, w). A polygon
    of one or two points has no area: skipped (COCO has a few; detectron2 and mmdet drop them too)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for poly in polygons:
        if len(poly) not in (2, 4):
            mask |= _rasterise(poly, height, width)
    return mask


def _rasterise(poly, height, width):
    xy = np.asarray(poly, dtype=np.float64)
    if xy.ndim != 1 or xy.size % 2 or xy.size < 6:
        raise ValueError(f"a polygon needs a flat list of (x, y) pairs, at least 3, got {xy.size} numbers")
    xy = xy.reshape(-1, 2)
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    # Scanline at every row centre yc = r + 0.5; an edge crosses it when yc lies in (min y, max y]:
    # half-open, so a vertex on a scanline is crossed once, and a centre on a horizontal edge is inside
    # on the bottom one only (pycocotools' choice; [min y, max y) would move such a rectangle up a row).
    rows = np.arange(height) + 0.5
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    crosses = (rows[:, None] > lo[None]) & (rows[:, None] <= hi[None])  # (H, E)
    r, e = np.nonzero(crosses)
    t = (rows[r] - y0[e]) / (y1[e] - y0[e])
    xc = x0[e] + t * (x1[e] - x0[e])
    # Every crossing toggles all pixels whose centre lies strictly right of it: first such column
    # (a centre on a vertical edge is inside on the right edge only, again as pycocotools).
    col = np.clip(np.floor(xc - 0.5).astype(np.int64) + 1, 0, width)
    toggles = np.zeros((height, width + 1), dtype=np.int64)
    np.add.at(toggles, (r, col), 1)
    return (np.cumsum(toggles[:, :width], axis=1) % 2).astype(np.uint8)


def mask_to_polygons(mask):
    """Trace a mask's outline along pixel edges -> list of flat polygons, or None if it has holes.

    The result rasterises (pixel-centre rule) back to exactly the mask when it is not None; a mask
    with a hole cannot be written as a union of polygons, so the caller should store it as RLE.
    """
    m = np.pad(np.asarray(mask) != 0, 1)
    # Directed boundary edges between pixel corners, keeping the object on the right-hand side
    # (clockwise in image coordinates). Corner (x, y) of the unpadded image is (x, y) here too.
    edges = {}
    ys, xs = np.nonzero(m[1:-1, 1:-1] & ~m[:-2, 1:-1])  # top side: neighbour above is empty
    for y, x in zip(ys, xs):
        edges.setdefault((x, y), []).append((x + 1, y))
    ys, xs = np.nonzero(m[1:-1, 1:-1] & ~m[2:, 1:-1])  # bottom side
    for y, x in zip(ys, xs):
        edges.setdefault((x + 1, y + 1), []).append((x, y + 1))
    ys, xs = np.nonzero(m[1:-1, 1:-1] & ~m[1:-1, :-2])  # left side
    for y, x in zip(ys, xs):
        edges.setdefault((x, y + 1), []).append((x, y))
    ys, xs = np.nonzero(m[1:-1, 1:-1] & ~m[1:-1, 2:])  # right side
    for y, x in zip(ys, xs):
        edges.setdefault((x + 1, y), []).append((x + 1, y + 1))

    polygons = []
    while edges:
        start = next(iter(edges))
        loop, p = [start], start
        while True:
            nxt = edges[p].pop()
            if not edges[p]:
                del edges[p]
            if nxt == start:
                break
            loop.append(nxt)
            p = nxt
        pts = np.array(loop, dtype=np.int64)
        # Signed area (shoelace, y down): clockwise outer loops are positive, hole loops negative.
        area = 0.5 * np.sum(pts[:, 0] * np.roll(pts[:, 1], -1) - np.roll(pts[:, 0], -1) * pts[:, 1])
        if area < 0:
            return None
        polygons.append(_drop_collinear(pts).reshape(-1).astype(float).tolist())
    return polygons


def _drop_collinear(pts):
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    return pts[cross != 0]


# ----------------------------------------------------------------------------- COCO annotations

def segmentation_to_mask(segmentation, height, width):
    """Any COCO `segmentation` field (polygons, uncompressed or compressed RLE) -> uint8 mask (h, w)."""
    if isinstance(segmentation, list):
        return polygon_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict):
        m = rle_decode(segmentation)
        if m.shape != (height, width):
            raise ValueError(f"RLE size {m.shape} does not match the image size {(height, width)}")
        return m
    raise ValueError(f"unknown segmentation type {type(segmentation).__name__}: expected a list of "
                     f"polygons or an RLE dict")
