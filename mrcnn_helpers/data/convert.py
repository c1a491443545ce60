"""Converters from common annotation layouts to COCO instances JSON.

Every converter writes one COCO instances file (images, annotations with polygon or RLE
segmentations, bbox [x, y, w, h] and area from the mask, categories with ids 1..K) and returns a
dict with "json" (the file), "images" (the folder its file_name entries are relative to: put it
in the spec's train_image_dir / val_image_dir), counts, and "skipped" counts of what could not
be used. Masks become polygons traced along pixel edges (contours.py), which pycocotools
rasterizes back to exactly the same pixels; regions with holes become RLE. A polygon tolerance
> 0 simplifies the polygons (smaller files, IoU >= 0.97 with the mask).

Every converter refuses an output JSON that is one of the files it reads, writes it atomically
(fileio), and reads images through images.py (pixel limit, one-line errors).

Layouts:
- LabelMe: labelme.py (a folder of LabelMe JSON files, EXIF orientation handled).
- VOC: VOC_ROOT/JPEGImages/<id>.jpg, VOC_ROOT/SegmentationObject/<id>.png (palette indices:
  1..254 = instance, 0 = background, 255 = void) and VOC_ROOT/SegmentationClass/<id>.png (class
  indices). An instance takes the class most of its pixels have; void pixels belong to no one.
- Per-instance mask folder: see convert_mask_folder.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from ..errors import DataError
from ..fileio import atomic_write, check_output_path, json_safe
from .contours import mask_to_segmentation
from .images import IMAGE_EXTENSIONS, image_size, open_image
from .progress import progress_bar

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
# LabelMe's labels.txt convention: these names are not classes.
_LABELME_RESERVED = ("__ignore__", "_background_")
# Category names in a --labels / --class-names file: more than any dataset has.
_MAX_NAMES = 100_000


def check_tolerance(tolerance) -> float:
    """A polygon tolerance as a float in [0, 100] px; DataError naming the option otherwise."""
    try:
        value = float(tolerance)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 100.0:
        raise DataError(f"--polygon-tolerance {tolerance!r}: expected a number of pixels from 0 "
                        f"to 100")
    return value


def mask_annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int,
                    tolerance: float = 0.0) -> dict | None:
    """COCO annotation of a binary mask [H, W] (None when the mask is empty).

    bbox is the tight integer box of the mask pixels, area their count; the segmentation is
    exact polygons (tolerance 0) or simplified ones (tolerance in px), RLE for regions with holes.
    """
    mask = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    segmentation, _ = mask_to_segmentation(mask, epsilon=float(tolerance))
    x0, y0 = int(xs.min()), int(ys.min())
    return {"id": int(ann_id), "image_id": int(image_id), "category_id": int(category_id),
            "segmentation": segmentation,
            "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
            "area": int(xs.size), "iscrowd": 0}


def write_coco_json(data: dict, path: str | os.PathLike) -> str:
    """Write a COCO dict to `path` atomically (fileio: temporary file + rename); returns the path."""
    text = json.dumps(json_safe(data), separators=(",", ":"))
    return os.fspath(atomic_write(path, text, error=DataError, what="COCO JSON"))


def category_entries(names, supercategory: str = "") -> list[dict]:
    """COCO categories with ids 1..K in the order of `names`."""
    return [{"id": i, "name": str(n), "supercategory": supercategory}
            for i, n in enumerate(names, start=1)]


def read_name_list(path: str | os.PathLike, what: str = "names file") -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped. Raises DataError naming the file when it
    cannot be read or holds no name or more than 100000."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from e
    if not names or len(names) > _MAX_NAMES:
        raise DataError(f"{what} {path} holds {len(names)} names; expected 1 to {_MAX_NAMES}, one "
                        f"per line")
    return names


def read_label_list(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (LabelMe's __ignore__ / _background_ skipped)."""
    return [n for n in read_name_list(path, "labels file") if n not in _LABELME_RESERVED]


def _read_index_png(path: str, what: str, size: tuple[int, int]) -> np.ndarray:
    """Palette / grayscale PNG of `size` (w, h) as its raw index values [H, W] (not colours)."""
    with open_image(path, f"{what} {path}") as im:
        if im.mode not in ("P", "L", "I", "I;16", "1"):
            raise DataError(f"{path}: {what} must be a palette or grayscale PNG of indices, "
                            f"got mode {im.mode}")
        if im.size != size:
            raise DataError(f"{what} {path} is {im.size[1]}x{im.size[0]} but the image is "
                            f"{size[1]}x{size[0]} (h x w)")
        return np.asarray(im).astype(np.int64)


def _find_image(folder: str, stem: str) -> str | None:
    for ext in IMAGE_EXTENSIONS:
        for candidate in (stem + ext, stem + ext.upper()):
            if os.path.isfile(os.path.join(folder, candidate)):
                return candidate
    return None


# ------------------------------------------------------------------------------------------ VOC

def convert_voc(voc_root: str | os.PathLike, out_json: str | os.PathLike, *,
                split: str | None = None, class_names=VOC_CLASSES,
                polygon_tolerance: float = 0.0, progress: bool = False) -> dict:
    """Convert VOC-style instance PNGs (SegmentationObject + SegmentationClass) to COCO.

    split: name of VOC_ROOT/ImageSets/Segmentation/<split>.txt listing the image ids; None = every
    PNG in SegmentationObject. class_names: index -> name, index 0 = background (VOC's 20
    classes by default); category ids are the class indices, so every split gets the same ids.
    Instances whose pixels are all background in SegmentationClass are skipped and counted.
    """
    root = os.fspath(voc_root)
    polygon_tolerance = check_tolerance(polygon_tolerance)
    objects_dir = os.path.join(root, "SegmentationObject")
    classes_dir = os.path.join(root, "SegmentationClass")
    images_dir = os.path.join(root, "JPEGImages")
    if not os.path.isdir(objects_dir):
        raise DataError(f"{root}: no SegmentationObject folder (expected VOC layout: JPEGImages/, "
                        f"SegmentationObject/, SegmentationClass/)")
    inputs = []
    if split:
        list_file = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        try:
            with open(list_file, encoding="utf-8") as f:
                stems = [line.split()[0] for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read split list {list_file}: "
                            f"{getattr(e, 'strerror', None) or e}") from e
        inputs.append(list_file)
    else:
        stems = sorted(os.path.splitext(n)[0] for n in os.listdir(objects_dir)
                       if n.lower().endswith(".png"))
    files = []
    for stem in stems:
        file_name = _find_image(images_dir, stem)
        if file_name is None:
            raise DataError(f"no image for {stem} in {images_dir} (tried {list(IMAGE_EXTENSIONS)})")
        files.append(file_name)
        inputs += [os.path.join(images_dir, file_name), os.path.join(objects_dir, stem + ".png"),
                   os.path.join(classes_dir, stem + ".png")]
    check_output_path(out_json, inputs, option="output JSON")
    skipped = {"background_instances": 0}
    images, annotations = [], []
    for image_id, (stem, file_name) in enumerate(progress_bar(
            list(zip(stems, files)), "convert-voc", unit="img", enabled=progress), start=1):
        size = image_size(os.path.join(images_dir, file_name))
        objects = _read_index_png(os.path.join(objects_dir, stem + ".png"),
                                  "SegmentationObject PNG", size)
        classes = _read_index_png(os.path.join(classes_dir, stem + ".png"),
                                  "SegmentationClass PNG", size)
        _check_voc_indices(objects, classes, stem, len(class_names))
        images.append({"id": image_id, "file_name": file_name, "width": size[0],
                       "height": size[1]})
        for value in np.unique(objects):
            if value in (0, 255):
                continue
            mask = objects == value
            votes = np.bincount(classes[mask & (classes != 255)], minlength=len(class_names))
            votes[0] = 0
            if not votes.any():
                skipped["background_instances"] += 1
                continue
            label = int(np.argmax(votes))
            annotations.append(mask_annotation(mask, len(annotations) + 1, image_id, label,
                                               polygon_tolerance))
    categories = [{"id": i, "name": str(n), "supercategory": ""}
                  for i, n in enumerate(class_names) if i > 0]
    data = {"info": {"description": f"converted from VOC instance masks in {root}"},
            "images": images, "annotations": annotations, "categories": categories}
    return {"json": write_coco_json(data, out_json), "images": images_dir,
            "num_images": len(images), "num_annotations": len(annotations),
            "categories": list(class_names[1:]), "skipped": skipped}


def _check_voc_indices(objects: np.ndarray, classes: np.ndarray, stem: str, num_names: int) -> None:
    """Refuse index PNGs whose values VOC's layout cannot have (a 16- or 32-bit PNG could hold
    millions of distinct "instances", or class indices that would size an array by their value)."""
    if objects.size and (objects.min() < 0 or objects.max() > 255):
        value = objects.min() if objects.min() < 0 else objects.max()
        raise DataError(f"SegmentationObject/{stem}.png has value {value}; instance indices are "
                        f"1..254 (0 = background, 255 = void)")
    bad = classes[(classes != 255) & ((classes < 0) | (classes >= num_names))]
    if bad.size:
        raise DataError(f"SegmentationClass/{stem}.png has class index {bad[0]}, beyond the "
                        f"{num_names} class names (255 = void)")


# ------------------------------------------------------------------------- per-instance masks

_INDEX_SUFFIX = re.compile(r"^(.*?)(?:[_-]\d+)?$")


def category_of_mask_file(file_name: str) -> str:
    """Category name of a mask file: its stem without a trailing _N / -N instance number."""
    stem = os.path.splitext(os.path.basename(file_name))[0]
    return _INDEX_SUFFIX.match(stem).group(1) or stem


def convert_mask_folder(root: str | os.PathLike, out_json: str | os.PathLike, *,
                        categories: list[str] | None = None, images_subdir: str = "images",
                        masks_subdir: str = "masks", polygon_tolerance: float = 0.0,
                        progress: bool = False) -> dict:
    """Convert a folder of per-instance binary mask PNGs to COCO instances.

    Layout:
        ROOT/images/<name>.<jpg|png|...>          one image per sample
        ROOT/masks/<name>/<category>_<k>.png     one PNG per instance, same size as the image;
                                                 non-zero pixels = the instance
    The category is the mask file's stem without a trailing _<k> or -<k> (so "person_0.png",
    "person-1.png" and "person.png" are all "person"; "traffic_light_2.png" is
    "traffic_light"). categories: names in id order (1..K); default every name found, sorted.
    Images without a mask folder are kept with no annotations; empty masks are skipped and
    counted; a mask folder without its image raises DataError.
    """
    root = os.fspath(root)
    polygon_tolerance = check_tolerance(polygon_tolerance)
    images_dir, masks_dir = os.path.join(root, images_subdir), os.path.join(root, masks_subdir)
    for folder in (images_dir, masks_dir):
        if not os.path.isdir(folder):
            raise DataError(f"{folder} not found (expected {root}/{images_subdir}/<name>.jpg and "
                            f"{root}/{masks_subdir}/<name>/<category>_<k>.png)")
    image_files = sorted(n for n in os.listdir(images_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
    by_stem = {os.path.splitext(n)[0]: n for n in image_files}
    orphans = sorted({d for d in os.listdir(masks_dir)
                      if os.path.isdir(os.path.join(masks_dir, d))} - set(by_stem))
    if orphans:
        raise DataError(f"mask folders without an image in {images_dir}: {orphans[:5]}")
    mask_files = {stem: sorted(n for n in os.listdir(os.path.join(masks_dir, stem))
                               if n.lower().endswith(".png"))
                  for stem in by_stem if os.path.isdir(os.path.join(masks_dir, stem))}
    found = sorted({category_of_mask_file(n) for files in mask_files.values() for n in files})
    names = list(categories) if categories else found
    category_of = {n: i for i, n in enumerate(names, start=1)}
    unknown = sorted(set(found) - set(category_of))
    if unknown:
        raise DataError(f"mask categories {unknown} are not in the given list {names}")
    check_output_path(out_json, [os.path.join(images_dir, n) for n in image_files]
                      + [os.path.join(masks_dir, stem, n) for stem, files in mask_files.items()
                         for n in files], option="output JSON")
    skipped = {"empty_masks": 0}
    images, annotations = [], []
    for image_id, (stem, file_name) in enumerate(progress_bar(
            sorted(by_stem.items()), "convert-masks", unit="img", enabled=progress), start=1):
        width, height = image_size(os.path.join(images_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for name in mask_files.get(stem, []):
            path = os.path.join(masks_dir, stem, name)
            with open_image(path, f"mask {path}") as im:
                if im.size != (width, height):
                    raise DataError(f"mask {path} is {im.size[1]}x{im.size[0]} but the image "
                                    f"{file_name} is {height}x{width} (h x w)")
                mask = np.asarray(im.convert("L")) > 0
            ann = mask_annotation(mask, len(annotations) + 1, image_id,
                                  category_of[category_of_mask_file(name)], polygon_tolerance)
            if ann is None:
                skipped["empty_masks"] += 1
                continue
            annotations.append(ann)
    data = {"info": {"description": f"converted from per-instance masks in {root}"},
            "images": images, "annotations": annotations, "categories": category_entries(names)}
    return {"json": write_coco_json(data, out_json), "images": images_dir,
            "num_images": len(images), "num_annotations": len(annotations), "categories": names,
            "skipped": skipped}
