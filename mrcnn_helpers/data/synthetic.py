"""A small synthetic COCO instance-segmentation dataset: circles, triangles and squares.

Made to exercise the whole pipeline in minutes on a CPU while not being trivial: textured
backgrounds (gradients, stripes, blotches, checkers, noise), textured objects whose colour leans
towards their class but overlaps with the others, scales from ~12 to ~110 px on a 256 image,
touching and overlapping instances (later ones occlude earlier ones) and some empty images.

Ground truth is the *visible* part of each instance: instances are laid out top-down, and one
whose visible part would be too small is dropped before anything is painted, so no unlabelled
fragments remain in the pixels. Segmentations are COCO polygons traced along pixel edges (exact
under pycocotools' rasterization); visible regions with holes are stored as compressed RLE.

Two styles. "textured" (the default) is the above. "simple" is what the CPU demo trains on:
smooth, muted backgrounds, solid objects in their class's hue, 1-5 objects of 20-90 px (on a
256 image) that touch less often. A ResNet-10 learns it to a high mask AP within a few hundred
CPU steps, so a first run shows what the pipeline does in minutes; boundaries, occlusion and
the three shapes still have to be segmented exactly.

Everything is drawn from numpy Generators seeded by (seed, split, image index): the same seed
gives byte-identical JSON and identical PNG pixels.
"""

from __future__ import annotations

import colorsys
import json
import operator
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError
from ..fileio import atomic_output, atomic_write, check_writable_dir
from .contours import mask_to_segmentation

CLASS_NAMES = ("circle", "triangle", "square")
# Hue (0..1) each class leans towards; a quarter of the objects take any hue instead.
_CLASS_HUES = (0.02, 0.33, 0.62)
_SPLITS = {"train": 1, "val": 2}
# Bounds of generate_synthetic_dataset's arguments: a render allocates a few float images of
# image_size per object, and every image is written as an almost incompressible PNG.
MIN_SIDE, MAX_SIDE = 32, 4096
MAX_IMAGES = 1_000_000
_DESCRIPTION = "synthetic shapes"
STYLES = ("textured", "simple")


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of image `index` (0-based) of `split` ("train" / "val") for `seed`."""
    return np.random.default_rng([int(seed), _SPLITS[split], int(index)])


def _random_color(rng: np.random.Generator, hue: float | None = None, sat=(0.0, 0.6),
                  val=(0.15, 0.95), hue_sd: float = 0.05) -> np.ndarray:
    h = rng.random() if hue is None else (hue + rng.normal(0.0, hue_sd)) % 1.0
    rgb = colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val))
    return np.asarray(rgb, dtype=np.float32) * 255.0


def _coords(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return xs, ys


def _pattern(rng: np.random.Generator, height: int, width: int, kind: str) -> np.ndarray:
    """A [height, width] float32 pattern in 0..1 of the given kind."""
    xs, ys = _coords(height, width)
    angle = rng.uniform(0.0, np.pi)
    proj = xs * np.cos(angle) + ys * np.sin(angle)
    if kind == "gradient":
        proj = proj - proj.min()
        return proj / max(float(proj.max()), 1.0)
    if kind == "stripes":
        period = rng.uniform(4.0, 24.0)
        return 0.5 + 0.5 * np.sin(2.0 * np.pi * proj / period + rng.uniform(0.0, 2.0 * np.pi))
    if kind == "checker":
        cell = rng.uniform(6.0, 32.0)
        other = -xs * np.sin(angle) + ys * np.cos(angle)
        return ((np.floor(proj / cell) + np.floor(other / cell)) % 2).astype(np.float32)
    # "blotches": smooth low-frequency noise, upsampled from a coarse grid.
    coarse = (rng.random((int(rng.integers(3, 9)), int(rng.integers(3, 9)))) * 255).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    return np.asarray(smooth, dtype=np.float32) / 255.0


def _simple_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float32 [height, width, 3] smooth, muted background in 0..255 (the "simple" style)."""
    kind = ("gradient", "blotches")[int(rng.integers(2))]
    c1, c2 = (_random_color(rng, sat=(0.0, 0.25), val=(0.2, 0.55)) for _ in range(2))
    t = _pattern(rng, height, width, kind)[..., None]
    return c1 + (c2 - c1) * t + rng.normal(0.0, 3.0, (height, width, 3)).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float32 [height, width, 3] textured background in 0..255."""
    kind = ("gradient", "stripes", "blotches", "checker")[int(rng.integers(4))]
    c1, c2 = _random_color(rng), _random_color(rng)
    t = _pattern(rng, height, width, kind)[..., None]
    image = c1 + (c2 - c1) * t
    if rng.random() < 0.5:  # a second, fainter layer so textures are not all alike
        t2 = _pattern(rng, height, width, ("gradient", "blotches")[int(rng.integers(2))])[..., None]
        image = image * (0.75 + 0.5 * t2)
    return image + rng.normal(0.0, rng.uniform(3.0, 14.0), (height, width, 3)).astype(np.float32)


def _simple_texture(rng: np.random.Generator, label: int, height: int, width: int) -> np.ndarray:
    """Float32 [height, width, 3] solid fill in the class's hue (the "simple" style)."""
    base = _random_color(rng, _CLASS_HUES[label - 1], sat=(0.6, 1.0), val=(0.7, 1.0), hue_sd=0.02)
    return base + rng.normal(0.0, 3.0, (height, width, 3)).astype(np.float32)


def _object_texture(rng: np.random.Generator, label: int, height: int, width: int) -> np.ndarray:
    """Float32 [height, width, 3] fill of one object (covers its bounding box)."""
    hue = _CLASS_HUES[label - 1] if rng.random() < 0.75 else None
    base = _random_color(rng, hue, sat=(0.45, 1.0), val=(0.45, 1.0))
    kind = ("solid", "gradient", "stripes", "blotches")[int(rng.integers(4))]
    if kind == "solid":
        fill = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    else:
        t = _pattern(rng, height, width, kind)[..., None]
        fill = base * (0.6 + 0.5 * t)
    return fill + rng.normal(0.0, rng.uniform(2.0, 10.0), (height, width, 3)).astype(np.float32)


def _shape_mask(label: int, cx: float, cy: float, size: float, angle: float,
                height: int, width: int) -> np.ndarray:
    """Bool [height, width] mask of one whole shape of extent ~`size` px centred at (cx, cy)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if CLASS_NAMES[label - 1] == "circle":
        r = size / 2.0
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        if CLASS_NAMES[label - 1] == "triangle":
            radius, corners = size / 2.0, 3
        else:  # square of side ~0.75 size, so its diagonal is about `size`
            radius, corners = size * 0.75 / np.sqrt(2.0), 4
        thetas = angle + 2.0 * np.pi * np.arange(corners) / corners
        pts = [(cx + radius * np.cos(t), cy + radius * np.sin(t)) for t in thetas]
        draw.polygon(pts, fill=1)
    return np.asarray(canvas, dtype=bool)


# Per style: (most objects per image + 1, size range in px on a 256 image, chance that an object
# is placed against an earlier one).
_LAYOUTS = {"textured": (7, (12.0, 110.0), 0.4), "simple": (6, (20.0, 90.0), 0.2)}


def _layout(rng: np.random.Generator, height: int, width: int,
            style: str = "textured") -> list[tuple[int, np.ndarray]]:
    """Random instances in drawing order (bottom first): list of (label, whole-shape mask)."""
    if rng.random() < 0.08:  # some images have no objects at all
        return []
    most, (smallest, largest), touching = _LAYOUTS[style]
    unit = min(height, width) / 256.0
    shapes, centres = [], []
    for _ in range(int(rng.integers(1, most))):
        label = int(rng.integers(1, 4))
        size = float(np.exp(rng.uniform(np.log(smallest), np.log(largest)))) * unit
        if centres and rng.random() < touching:
            # Next to an earlier object: touching or overlapping it.
            px, py, psize = centres[int(rng.integers(len(centres)))]
            direction = rng.uniform(0.0, 2.0 * np.pi)
            dist = (psize + size) / 2.0 * rng.uniform(0.55, 1.05)
            cx, cy = px + dist * np.cos(direction), py + dist * np.sin(direction)
        else:
            margin = size / 4.0
            cx, cy = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        shapes.append((label, _shape_mask(label, cx, cy, size, angle, height, width)))
        centres.append((cx, cy, size))
    return shapes


def _visible_instances(shapes, min_pixels: int, min_fraction: float):
    """Top-down occlusion: [(drawing index, label, whole mask, visible mask)] of kept instances.

    An instance is kept when at least `min_pixels` and `min_fraction` of its in-image area stay
    visible under the kept instances drawn after it; dropped ones are never painted.
    """
    covered = None
    kept = []
    for index in range(len(shapes) - 1, -1, -1):
        label, whole = shapes[index]
        visible = whole if covered is None else whole & ~covered
        n_visible = int(np.count_nonzero(visible))
        if n_visible < min_pixels or n_visible < min_fraction * np.count_nonzero(whole):
            continue
        covered = whole.copy() if covered is None else covered | whole
        kept.append((index, label, whole, visible))
    return kept[::-1]


def render_image(rng: np.random.Generator, height: int, width: int, style: str = "textured"):
    """One synthetic image: (uint8 [height, width, 3] RGB, [(label, visible bool mask [h, w])])."""
    simple = style == "simple"
    image = (_simple_background if simple else _background)(rng, height, width)
    unit2 = (min(height, width) / 256.0) ** 2
    instances = _visible_instances(_layout(rng, height, width, style), max(8, int(30 * unit2)),
                                   0.2)
    texture = _simple_texture if simple else _object_texture
    for _, label, whole, _ in instances:
        ys, xs = np.nonzero(whole)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        fill = texture(rng, label, y1 - y0, x1 - x0)
        region = whole[y0:y1, x0:x1]
        image[y0:y1, x0:x1][region] = fill[region]
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return pixels, [(label, visible) for _, label, _, visible in instances]


def _annotation(ann_id: int, image_id: int, label: int, visible: np.ndarray) -> dict:
    ys, xs = np.nonzero(visible)
    x0, y0 = int(xs.min()), int(ys.min())
    segmentation, _ = mask_to_segmentation(visible)
    return {
        "id": ann_id, "image_id": image_id, "category_id": label,
        "segmentation": segmentation,
        "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
        "area": int(xs.size), "iscrowd": 0,
    }


def _write_split(out_dir: Path, split: str, num_images: int, height: int, width: int,
                 seed: int, style: str) -> tuple[str, str]:
    image_dir = check_writable_dir(out_dir / split, option="synthetic image folder")
    images, annotations = [], []
    for index in range(num_images):
        rng = image_rng(seed, split, index)
        pixels, instances = render_image(rng, height, width, style)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        # Low zlib effort: these noisy textures barely compress, and speed matters more here.
        with atomic_output(image_dir / file_name, error=DataError, what="synthetic image") as f:
            Image.fromarray(pixels).save(f, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for label, visible in instances:
            annotations.append(_annotation(len(annotations) + 1, image_id, label, visible))
    coco = {
        "info": {"description": f"{_DESCRIPTION}, {split} split, seed {seed}"
                                + (f", style {style}" if style != "textured" else "")},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                       for i, name in enumerate(CLASS_NAMES)],
    }
    json_path = out_dir / "annotations" / f"instances_{split}.json"
    atomic_write(json_path, json.dumps(coco, separators=(",", ":")), error=DataError,
                 what="synthetic annotations")
    return str(json_path), str(image_dir)


def _check_arguments(out: Path, num_train, num_val, image_size, seed,
                     style="textured") -> tuple[int, int]:
    """(height, width) of valid arguments; DataError naming the argument and its range else."""
    if style not in STYLES:
        raise DataError(f"style = {style!r}: must be one of {', '.join(STYLES)}")
    for name, value in (("num_train", num_train), ("num_val", num_val), ("seed", seed)):
        try:
            operator.index(value)
        except TypeError:
            raise DataError(f"{name} = {value!r}: must be a whole number") from None
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not 0 <= value <= MAX_IMAGES:
            raise DataError(f"{name} = {value!r}: must be a whole number from 0 to {MAX_IMAGES}")
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise DataError(f"image_size = {image_size!r}: must be (height, width)") from None
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        raise DataError(f"image_size = ({height}, {width}): height and width must be from "
                        f"{MIN_SIDE} to {MAX_SIDE} px")
    if not 0 <= seed < 2**63:
        raise DataError(f"seed = {seed!r}: must be a whole number from 0 to 2**63 - 1")
    if out.exists() and not out.is_dir():
        raise DataError(f"synthetic dataset folder {out} is a file: name a folder")
    for split in _SPLITS:
        existing = out / "annotations" / f"instances_{split}.json"
        if existing.exists() and not _is_synthetic(existing):
            raise DataError(f"{existing} exists and is not a synthetic dataset: writing {out} "
                            f"would replace it; choose another folder")
        images = out / split
        if not existing.exists() and images.is_dir() and any(images.iterdir()):
            raise DataError(f"{images} holds files but no synthetic dataset: writing {out} could "
                            f"replace them; choose another folder")
    parent = next(p for p in (out, *out.parents) if p.exists())
    needed = (num_train + num_val) * height * width * 3  # the PNGs barely compress
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise DataError(f"the synthetic dataset needs about {needed / 2**30:.2f} GiB, only "
                        f"{free / 2**30:.2f} GiB free in {parent}; lower num_train / num_val / "
                        f"image_size")
    return height, width


def _is_synthetic(path: Path) -> bool:
    """Whether `path` is the annotation file of a dataset this module wrote."""
    try:
        info = json.loads(path.read_text(encoding="utf-8")).get("info", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(info, dict) and str(info.get("description", "")).startswith(_DESCRIPTION)


def generate_synthetic_dataset(out_dir: str | os.PathLike, num_train: int = 200, num_val: int = 50,
                               image_size: tuple[int, int] = (256, 256), seed: int = 0,
                               style: str = "textured") -> dict:
    """Write the synthetic shapes dataset under `out_dir` and return its paths.

    Layout: out_dir/train/NNNNNN.png, out_dir/val/NNNNNN.png,
    out_dir/annotations/instances_train.json and instances_val.json (COCO instances; image ids
    1..N per split; categories 1 "circle", 2 "triangle", 3 "square"). image_size is (height,
    width), each side 32..4096; num_train / num_val 0..1000000; seed >= 0. Deterministic: the
    same arguments give byte-identical JSON and identical pixels; train and val are drawn from
    separate random streams. style: "textured" (default) or "simple" (the CPU demo's easier
    task; see the module docstring). out_dir may hold an earlier synthetic dataset (it is replaced),
    nothing else of that layout. Every file is written atomically. Raises DataError for bad
    arguments, a folder holding other annotations, or too little disk space. Returns
    dict(train_json=..., train_images=..., val_json=..., val_images=...) with str paths.
    """
    out = Path(out_dir)
    height, width = _check_arguments(out, num_train, num_val, image_size, seed, style)
    train_json, train_images = _write_split(out, "train", num_train, height, width, seed, style)
    val_json, val_images = _write_split(out, "val", num_val, height, width, seed, style)
    return {"train_json": train_json, "train_images": train_images,
            "val_json": val_json, "val_images": val_images}
