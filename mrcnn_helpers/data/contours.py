"""Binary masks to COCO segmentations: pixel-boundary polygon tracing, simplification, RLE fallback.

Conventions: a mask is a bool/uint8 array [H, W] (row = y, column = x); pixel (y, x) covers the
square [x, x+1) x [y, y+1). Polygons are COCO lists [x0, y0, x1, y1, ...] of pixel-corner
coordinates. With those, pycocotools rasterizes a traced (unsimplified) boundary back to exactly
the same pixels, so a polygon is a lossless encoding of any mask region without holes.
"""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils

# Unit steps along pixel edges, and the turn order used to resolve pinch vertices (two pixels that
# touch only at a corner): turning right (towards the interior) keeps 4-connected parts apart.
_RIGHT_TURN = {(1, 0): (0, 1), (0, 1): (-1, 0), (-1, 0): (0, -1), (0, -1): (1, 0)}


def trace_boundaries(mask: np.ndarray) -> list[np.ndarray]:
    """All boundary loops of a binary mask, along pixel edges.

    Returns a list of int arrays [K, 2] of (x, y) pixel corners with only the corners where the
    direction changes. Outer boundaries are clockwise on screen (positive shoelace area with y
    down), holes counter-clockwise (negative area). Parts touching only at a corner are separate.
    """
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    inside = m[1:-1, 1:-1]
    # For each pixel edge between inside and outside, one directed edge with the interior on the
    # right of travel (screen coordinates). Offsets of the padded array cancel out in the vertices.
    starts, steps = [], []
    ys, xs = np.nonzero(inside & ~m[:-2, 1:-1])           # outside above: top edge, going right
    starts.append(np.stack([xs, ys], 1)); steps.append((1, 0))
    ys, xs = np.nonzero(inside & ~m[1:-1, 2:])            # outside right: right edge, going down
    starts.append(np.stack([xs + 1, ys], 1)); steps.append((0, 1))
    ys, xs = np.nonzero(inside & ~m[2:, 1:-1])            # outside below: bottom edge, going left
    starts.append(np.stack([xs + 1, ys + 1], 1)); steps.append((-1, 0))
    ys, xs = np.nonzero(inside & ~m[1:-1, :-2])           # outside left: left edge, going up
    starts.append(np.stack([xs, ys + 1], 1)); steps.append((0, -1))

    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for pts, step in zip(starts, steps):
        for x, y in pts.tolist():
            outgoing.setdefault((x, y), []).append(step)

    loops = []
    while outgoing:
        start = next(iter(outgoing))
        vertex, prev_step, first_step = start, None, None
        corners = []
        while True:
            options = outgoing[vertex]
            if len(options) == 1 or prev_step is None:
                step = options.pop(0)
            else:
                # Pinch vertex: two ways out; take the right turn relative to how we arrived.
                want = _RIGHT_TURN[prev_step]
                step = want if want in options else options[0]
                options.remove(step)
            if not options:
                del outgoing[vertex]
            if step != prev_step:
                corners.append(vertex)
            if first_step is None:
                first_step = step
            prev_step = step
            vertex = (vertex[0] + step[0], vertex[1] + step[1])
            if vertex == start or vertex not in outgoing:
                break
        # The start vertex is a corner only if the loop turns there.
        if prev_step == first_step:
            corners = corners[1:]
        if len(corners) >= 3:
            loops.append(np.asarray(corners, dtype=np.int64))
    return loops


def signed_area(loop: np.ndarray) -> float:
    """Shoelace area of a closed loop [K, 2]; positive for outer boundaries (see trace_boundaries)."""
    x, y = loop[:, 0].astype(np.float64), loop[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _douglas_peucker(points: np.ndarray, epsilon: float) -> np.ndarray:
    """Open polyline simplification keeping both end points (iterative, no recursion limit)."""
    keep = np.zeros(len(points), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    pts = points.astype(np.float64)
    while stack:
        lo, hi = stack.pop()
        if hi - lo < 2:
            continue
        a, b = pts[lo], pts[hi]
        seg = b - a
        rel = pts[lo + 1:hi] - a
        norm = np.hypot(seg[0], seg[1])
        if norm == 0:
            dist = np.hypot(rel[:, 0], rel[:, 1])
        else:
            dist = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / norm
        i = int(np.argmax(dist))
        if dist[i] > epsilon:
            mid = lo + 1 + i
            keep[mid] = True
            stack.append((lo, mid))
            stack.append((mid, hi))
    return points[keep]


def simplify_loop(loop: np.ndarray, epsilon: float) -> np.ndarray:
    """Douglas-Peucker on a closed loop [K, 2]: split at the vertex farthest from the first one."""
    if len(loop) <= 4 or epsilon <= 0:
        return loop
    far = int(np.argmax(np.hypot(*(loop - loop[0]).T.astype(np.float64))))
    first = _douglas_peucker(np.concatenate([loop[:far + 1]]), epsilon)
    second = _douglas_peucker(np.concatenate([loop[far:], loop[:1]]), epsilon)
    out = np.concatenate([first[:-1], second[:-1]])
    return out if len(out) >= 3 else loop


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterize COCO polygons (union) to a uint8 [height, width] mask with pycocotools."""
    rles = mask_utils.frPyObjects(polygons, height, width)
    return mask_utils.decode(mask_utils.merge(rles))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary masks of the same shape (1.0 when both are empty)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def encode_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of a binary mask [H, W], JSON-ready ({"size": [H, W], "counts": str})."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def mask_to_segmentation(mask: np.ndarray, epsilon: float = 0.5, min_iou: float = 0.97):
    """COCO segmentation of a binary mask [H, W]: polygons when possible, otherwise RLE.

    Regions without holes become one polygon per 4-connected part, simplified with tolerance
    `epsilon` pixels and kept simplified only if their rasterization still has IoU >= `min_iou`
    with the mask (else the exact pixel-boundary polygons are used). Regions with holes (an
    instance occluded in its middle) cannot be a union of polygons, so they are encoded as
    compressed RLE. Returns (segmentation, kind) with kind "polygon" or "rle".
    """
    mask = np.asarray(mask, dtype=bool)
    loops = trace_boundaries(mask)
    if not loops or any(signed_area(loop) < 0 for loop in loops):
        return encode_rle(mask), "rle"
    height, width = mask.shape
    exact = [loop.reshape(-1).astype(int).tolist() for loop in loops]
    simplified = [simplify_loop(loop, epsilon).reshape(-1).astype(int).tolist() for loop in loops]
    if simplified != exact and mask_iou(polygons_to_mask(simplified, height, width), mask) >= min_iou:
        return simplified, "polygon"
    return exact, "polygon"
