"""Drawing detections: translucent instance masks, box outlines and "name score" labels.

Pure PIL + numpy so annotated images can be written anywhere (CLI, notebooks, servers) without a
plotting library. Colors are fixed per class (PALETTE[label % len(PALETTE)]), so a class keeps its
color across images and runs.
"""

import functools

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Twenty well-separated RGB colors, each with a contrast ratio >= 3:1 against white (WCAG's bar
# for graphics), so plot lines and legend entries in class colors stay readable (no yellow or
# pastels); label 0 (background) is never drawn, so label 1 gets the first.
PALETTE = (
    (230, 25, 75), (30, 140, 60), (0, 110, 200), (210, 100, 0), (145, 30, 180),
    (0, 128, 128), (200, 40, 180), (110, 120, 0), (170, 110, 40), (0, 0, 128),
    (128, 0, 0), (90, 90, 90), (0, 140, 170), (190, 60, 120), (100, 60, 170),
    (60, 110, 30), (40, 40, 200), (0, 80, 140), (90, 60, 20), (120, 40, 90),
)


def class_color(label: int) -> tuple[int, int, int]:
    """The fixed RGB color of contiguous label `label` (1 -> PALETTE[0])."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _image_array(image) -> np.ndarray:
    """PIL image, uint8 HWC array or uint8 CHW tensor -> uint8 [h, w, 3] RGB array (a copy)."""
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"tensor images must be [3, h, w], got {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"images must be uint8 [h, w, 3], got {array.dtype} {tuple(array.shape)}")
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array.copy()


@functools.lru_cache(maxsize=16)
def _font(size: int):
    """The default font at `size` px, loaded once per size (a video draws every frame with it)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _label_glyphs(text: str, size: int) -> Image.Image:
    """`text` rendered once in the default font at `size` px as an 8-bit coverage image cropped
    to its ink: a video draws the same few hundred labels ("name 0.87") on every frame, and
    rendering them was most of the drawing time."""
    font = _font(size)
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox(
        (0, 0), text, font=font)
    glyphs = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(glyphs).text((-left, -top), text, fill=255, font=font)
    return glyphs


def _text_color(background) -> tuple[int, int, int]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def mask_extents(masks) -> np.ndarray:
    """int64 [N, 4]: the half-open rows and columns (y0, y1, x0, x1) each mask of [N, h, w]
    (bool array or tensor, on any device) occupies ([0, 0, 0, 0] for an empty one), from one max
    over each axis of its bytes (an any() over bools is several times slower). What drawing and
    the RLE encoding (inference/coco_results.py) read each mask within."""
    if isinstance(masks, torch.Tensor):
        m = masks.detach()
        m = m.view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)
        occupancy = (m.amax(dim=2).cpu().numpy() > 0, m.amax(dim=1).cpu().numpy() > 0)
    else:
        as_bytes = np.asarray(masks).astype(bool, copy=False).view(np.uint8)
        occupancy = (as_bytes.max(axis=2) > 0, as_bytes.max(axis=1) > 0)
    ranges = []
    for occupied in occupancy:
        first = occupied.argmax(axis=1)
        last = occupied.shape[1] - occupied[:, ::-1].argmax(axis=1)
        empty = ~occupied.any(axis=1)
        ranges += [np.where(empty, 0, first), np.where(empty, 0, last)]
    return np.stack(ranges, axis=1).astype(np.int64)


def _one_per_object(boxes: np.ndarray, masks: np.ndarray | None, order: np.ndarray,
                    overlap: float, extents: np.ndarray | None = None) -> np.ndarray:
    """Indices of `order` (best first) that are not another drawing of an object already kept:
    with masks, one whose mask lies more than `overlap` under the kept masks; without, one whose
    box overlaps a kept box with IoU above `overlap`. Class-agnostic, so an object claimed by
    two classes (or twice by one) is drawn once; occluded neighbours keep their visible masks.
    extents: mask_extents(masks), where the masks are read (each mask is empty outside it)."""
    kept: list[int] = []
    covered = None if masks is None else np.zeros(masks.shape[1:], dtype=bool)
    if masks is not None and extents is None:
        extents = mask_extents(masks)
    for i in order:
        if masks is not None:
            y0, y1, x0, x1 = extents[i]
            mask, under = masks[i, y0:y1, x0:x1], covered[y0:y1, x0:x1]
            area = int(np.count_nonzero(mask))
            if area and np.count_nonzero(mask & under) > overlap * area:
                continue
            under |= mask
        elif kept:
            k, b = boxes[kept], boxes[i]
            ix = np.clip(np.minimum(k[:, 2], b[2]) - np.maximum(k[:, 0], b[0]), 0, None)
            iy = np.clip(np.minimum(k[:, 3], b[3]) - np.maximum(k[:, 1], b[1]), 0, None)
            inter = ix * iy
            if np.any(inter > overlap * (_area(k) + _area(b) - inter)):
                continue
        kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


def draw_instances(image, boxes, scores, classes, class_names, masks=None,
                   score_threshold: float = 0.0, mask_alpha: float = 0.5,
                   duplicate_overlap: float | None = 0.6) -> Image.Image:
    """Return a new RGB PIL image with detections drawn on `image`.

    image: PIL image, uint8 [h, w, 3] array or uint8 [3, h, w] tensor; boxes: [N, 4]
    (x1, y1, x2, y2) in that image's pixels; scores: [N] or None (labels show the name only);
    classes: int [N] contiguous labels; class_names[label] names a label (index 0 = background;
    a label beyond the list is shown as its number); masks: bool [N, h, w] or None.
    Instances scoring below score_threshold are skipped, and so is a second drawing of an object
    (a mask more than duplicate_overlap under better-scored drawn masks; without masks, a box of
    IoU above it with a drawn box; None: draw every instance). Each mask is
    blended with its class color at mask_alpha; boxes are outlined in that color; labels sit on a
    filled background above the box (inside it at the top edge), kept inside the image, and show
    the score only where the box is wide enough for it.
    """
    canvas = _image_array(image)
    height, width = canvas.shape[:2]
    boxes = _to_numpy(boxes).astype(np.float64).reshape(-1, 4)
    classes = _to_numpy(classes).astype(np.int64).reshape(-1)
    n = boxes.shape[0]
    scores_np = None if scores is None else _to_numpy(scores).astype(np.float64).reshape(-1)
    keep = np.ones(n, dtype=bool) if scores_np is None else scores_np >= score_threshold
    if masks is not None:
        masks = _to_numpy(masks).astype(bool, copy=False)
        if masks.shape != (n, height, width):
            raise ValueError(f"masks must be [N={n}, h={height}, w={width}] like the image, got "
                             f"{tuple(masks.shape)}")
    order = np.flatnonzero(keep)
    if scores_np is not None:
        order = order[np.argsort(-scores_np[order], kind="stable")]
    extents = None if masks is None else mask_extents(masks)
    if duplicate_overlap is not None:
        order = _one_per_object(boxes, masks, order, duplicate_overlap, extents)
    if masks is not None and len(order):
        # Only the masks' regions are read and blended (a mask is empty outside its extent);
        # in float32 inside the rectangle holding all of them, rounded once at the end.
        drawn = extents[order]
        top, left = drawn[:, 0].min(), drawn[:, 2].min()
        bottom, right = drawn[:, 1].max(), drawn[:, 3].max()
        out = canvas[top:bottom, left:right].astype(np.float32)
        for i in order[::-1]:  # the best on top
            y0, y1, x0, x1 = extents[i]
            m = masks[i, y0:y1, x0:x1]
            region = out[y0 - top:y1 - top, x0 - left:x1 - left]
            color = np.array(class_color(classes[i]), dtype=np.float32)
            region[m] = region[m] * (1.0 - mask_alpha) + color * mask_alpha
        canvas[top:bottom, left:right] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return draw_boxes_and_labels(canvas, boxes, scores_np, classes, class_names, order)


def draw_boxes_and_labels(canvas: np.ndarray, boxes, scores, classes, class_names,
                          order) -> Image.Image:
    """The box outlines and labels of draw_instances on uint8 [h, w, 3] `canvas` (masks already
    blended there), for the instances `order` lists, best first (drawn last, so on top)."""
    height, width = canvas.shape[:2]
    boxes = _to_numpy(boxes).astype(np.float64).reshape(-1, 4)
    classes = _to_numpy(classes).astype(np.int64).reshape(-1)
    scores_np = None if scores is None else _to_numpy(scores).astype(np.float64).reshape(-1)
    result = Image.fromarray(canvas)
    draw = ImageDraw.Draw(result)
    line_width = max(1, round(min(height, width) / 200))
    font_size = max(8, round(min(height, width) / 40))
    pad = 1 if min(height, width) < 256 else 2
    for i in order[::-1]:
        color = class_color(classes[i])
        x1, y1, x2, y2 = boxes[i].tolist()
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line_width)
        label = int(classes[i])
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = name if scores_np is None else f"{name} {scores_np[i]:.2f}"
        glyphs = _label_glyphs(text, font_size)
        if scores_np is not None and glyphs.width > max(x2 - x1, 1) * 1.5:
            glyphs = _label_glyphs(name, font_size)  # a small box: the name only
        tw, th = glyphs.width + 2 * pad, glyphs.height + 2 * pad
        tx = min(max(x1, 0.0), max(width - tw, 0.0))
        ty = y1 - th if y1 - th >= 0 else max(min(y1, height - th), 0.0)
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=color)
        draw.bitmap((round(tx) + pad, round(ty) + pad), glyphs, fill=_text_color(color))
    return result
