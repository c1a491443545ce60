"""Dataset doctor: find every problem of a COCO instances dataset at once, and write a fixed copy.

check_dataset reads the JSON and (optionally) every image, and reports each problem type with
its severity, count and examples (PROBLEMS lists them). Errors are what breaks training or
silently corrupts it or the metrics; warnings are what the loader works around (clips, drops)
but you should know about; info is neither. The same pass works out the cleaned dataset, which
fix_dataset writes to a new folder (JSON + links or copies of the good images) without touching
the original; the fixed copy passes the doctor with no error and no warning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pycocotools.mask as mask_utils
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .coco import read_coco_json

# code: (severity, what it means, what --fix does)
PROBLEMS: dict[str, tuple[str, str, str]] = {
    "invalid_entry": ("error", "entry lacks a required field or has a wrong type",
                      "entry dropped (an image's annotations with it)"),
    "duplicate_image_id": ("error", "two images share an id", "later duplicates dropped"),
    "duplicate_annotation_id": ("error", "two annotations share an id",
                                "later duplicates get new ids"),
    "duplicate_category_id": ("error", "two categories share an id", "later duplicates dropped"),
    "category_id_zero": ("error", "category id 0 (background in TLT's labels)",
                         "renumbered to the largest id + 1"),
    "missing_image": ("error", "image file not found", "image and its annotations dropped"),
    "unreadable_image": ("error", "image file unreadable or corrupt",
                         "image and its annotations dropped"),
    "image_size_mismatch": ("error", "image file size differs from the JSON's width / height",
                            "image and its annotations dropped"),
    "unknown_image": ("error", "annotation refers to an image id not in 'images'",
                      "annotation dropped"),
    "unknown_category": ("error", "annotation has a category id not in 'categories'",
                         "annotation dropped"),
    "invalid_segmentation": ("error", ("segmentation is neither polygons nor an RLE of the "
                                       "image's size"), "annotation dropped"),
    "empty_mask": ("error", "segmentation covers no pixel of the image", "annotation dropped"),
    "invalid_bbox": ("error", "bbox is not 4 finite numbers [x, y, w, h]",
                     "bbox recomputed from the mask"),
    "degenerate_box": ("error", "bbox width or height <= 0", "bbox recomputed from the mask"),
    "box_outside_image": ("error", "bbox lies entirely outside the image",
                          "bbox recomputed from the mask"),
    "polygon_too_few_points": ("warning", "polygon with fewer than 3 points (training ignores it)",
                               "polygon removed"),
    "missing_bbox": ("warning", "annotation has no bbox (training takes the mask's)",
                     "bbox set from the mask"),
    "box_partly_outside": ("warning", "bbox extends past the image border (training clips it)",
                           "bbox clipped to the image"),
    "mask_outside_box": ("warning", ("mask pixels lie > 1 px outside the bbox (training crops "
                                  "them away)"), "bbox set to the mask's extent"),
    "empty_image": ("info", "image has no annotations (a background-only sample)", "kept"),
}
# TAO's warnings file lists, per image, the annotation ids with box and with mask problems.
_TAO_KIND = {"invalid_bbox": "box", "degenerate_box": "box", "box_outside_image": "box",
             "box_partly_outside": "box", "missing_bbox": "box", "mask_outside_box": "mask",
             "polygon_too_few_points": "mask", "empty_mask": "mask", "invalid_segmentation": "mask"}
MAX_EXAMPLES = 5
_BOX_TOL = 0.01   # px a box may pass the image border by (float noise), before it is flagged
_MASK_TOL = 1.0   # px mask pixels may pass the box by (polygon rasterization rounds outwards)


@dataclasses.dataclass
class DoctorReport:
    """What check_dataset found. counts / examples are keyed by problem code (see PROBLEMS);
    per_image maps image id -> {"box": [annotation ids], "mask": [annotation ids]} (TAO's form).
    `fixed` is the cleaned dataset (a COCO dict) that fix_dataset writes."""

    json_file: str
    image_dir: str | None
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    counts: dict = dataclasses.field(default_factory=dict)
    examples: dict = dataclasses.field(default_factory=dict)
    per_image: dict = dataclasses.field(default_factory=dict)
    fixed: dict | None = dataclasses.field(default=None, repr=False)

    def add(self, code: str, message: str, image_id=None, ann_id=None) -> None:
        self.counts[code] = self.counts.get(code, 0) + 1
        examples = self.examples.setdefault(code, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(message)
        kind = _TAO_KIND.get(code)
        if kind and image_id is not None and ann_id is not None:
            entry = self.per_image.setdefault(str(image_id), {"box": [], "mask": []})
            if ann_id not in entry[kind]:
                entry[kind].append(ann_id)

    def total(self, severity: str) -> int:
        return sum(n for code, n in self.counts.items() if PROBLEMS[code][0] == severity)

    @property
    def num_errors(self) -> int:
        return self.total("error")

    @property
    def num_warnings(self) -> int:
        return self.total("warning")

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings and info allowed)."""
        return self.num_errors == 0

    def to_dict(self) -> dict:
        problems = {code: {"severity": PROBLEMS[code][0], "count": n,
                           "description": PROBLEMS[code][1], "fix": PROBLEMS[code][2],
                           "examples": self.examples.get(code, [])}
                    for code, n in sorted(self.counts.items(), key=lambda kv: _order(kv[0]))}
        return {"dataset": self.json_file, "images_dir": self.image_dir,
                "num_images": self.num_images, "num_annotations": self.num_annotations,
                "num_categories": self.num_categories, "errors": self.num_errors,
                "warnings": self.num_warnings, "info": self.total("info"),
                "problems": problems, "per_image": self.per_image}

    def write_json(self, path: str | os.PathLike) -> str:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    def format(self) -> str:
        """Human-readable report: one block per severity, problem types with counts and examples."""
        lines = [f"{self.json_file}: {self.num_images} images, {self.num_annotations} annotations, "
                 f"{self.num_categories} categories" +
                 (f" (images in {self.image_dir})" if self.image_dir else " (images not checked)")]
        for severity in ("error", "warning", "info"):
            codes = [c for c in sorted(self.counts, key=_order) if PROBLEMS[c][0] == severity]
            if codes:
                lines.append(f"{severity}s:")
            for code in codes:
                lines.append(f"  {code} ({self.counts[code]}): {PROBLEMS[code][1]}; "
                             f"--fix: {PROBLEMS[code][2]}")
                lines.extend(f"    - {e}" for e in self.examples.get(code, []))
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {self.num_errors} errors, {self.num_warnings} warnings, "
                     f"{self.total('info')} info")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: the counts of every error type (for refusing to train on a bad dataset)."""
        parts = [f"{code}: {n} (e.g. {self.examples[code][0]})" for code, n in self.counts.items()
                 if PROBLEMS[code][0] == "error"]
        return "; ".join(parts)


def _order(code: str) -> int:
    return list(PROBLEMS).index(code)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_numbers(values) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _check_image_file(path: str, width: int, height: int, decode: bool) -> tuple[str, str] | None:
    """(code, detail) of a problem with one image file, or None when it is fine."""
    if not os.path.isfile(path):
        return "missing_image", "file not found"
    try:
        with Image.open(path) as im:
            size = im.size
            if decode:
                im.load()  # a truncated or corrupt file fails here, not at open
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        return "unreadable_image", str(e) or type(e).__name__
    if size != (width, height):
        return "image_size_mismatch", (f"file is {size[1]}x{size[0]} (h x w), the JSON says "
                                       f"{height}x{width}")
    return None


def check_dataset(json_file: str | os.PathLike, image_dir: str | os.PathLike | None = None, *,
                  decode_images: bool = True, workers: int = 8) -> DoctorReport:
    """Check a COCO instances dataset; returns a DoctorReport (with the fixed dataset in .fixed).

    image_dir: folder the JSON's file_name entries are relative to; None skips the image checks.
    decode_images: fully decode each image (finds truncated / corrupt files; slower) rather than
    reading its header only. workers: threads reading images. Raises DataError only when the
    file is not a COCO instances JSON at all (unreadable, not JSON, missing top-level lists).
    """
    json_file = os.fspath(json_file)
    data = read_coco_json(json_file)
    report = DoctorReport(json_file, None if image_dir is None else os.fspath(image_dir),
                          num_images=len(data["images"]), num_annotations=len(data["annotations"]),
                          num_categories=len(data["categories"]))
    categories, remap = _check_categories(data["categories"], report)
    images, declared = _check_images(data["images"], report, image_dir, decode_images, workers)
    annotations = _check_annotations(data["annotations"], report, images, declared, categories,
                                     remap)
    originally_used = {a.get("image_id") for a in data["annotations"] if isinstance(a, dict)}
    for image_id, info in images.items():
        if image_id not in originally_used:
            report.add("empty_image", f"image {image_id} ({info['file_name']})")
    fixed = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    fixed["images"] = list(images.values())
    fixed["annotations"] = annotations
    fixed["categories"] = list(categories.values())
    report.fixed = fixed
    return report


def _check_categories(entries: list, report: DoctorReport) -> tuple[dict, dict]:
    categories, remap = {}, {}
    for index, cat in enumerate(entries):
        if not (isinstance(cat, dict) and _is_int(cat.get("id")) and "name" in cat):
            report.add("invalid_entry", f"categories[{index}] needs an integer 'id' and a 'name'")
            continue
        if cat["id"] in categories or (cat["id"] == 0 and 0 in remap):
            report.add("duplicate_category_id", f"category id {cat['id']} ('{cat['name']}') "
                       f"declared again at categories[{index}]")
            continue
        if cat["id"] == 0:
            report.add("category_id_zero", f"category '{cat['name']}' has id 0")
            remap[0] = None  # new id assigned below, once all ids are known
            categories[0] = dict(cat)
            continue
        categories[cat["id"]] = dict(cat)
    if 0 in remap:
        new_id = max([c for c in categories if c != 0], default=0) + 1
        remap[0] = new_id
        categories[new_id] = dict(categories.pop(0), id=new_id)
    return categories, remap


def _check_images(entries: list, report: DoctorReport, image_dir, decode: bool,
                  workers: int) -> tuple[dict, set]:
    """(kept images by id, every validly declared image id)."""
    candidates, declared = {}, set()
    for index, img in enumerate(entries):
        ok = (isinstance(img, dict) and _is_int(img.get("id")) and isinstance(img.get("file_name"), str)
              and _is_int(img.get("width")) and _is_int(img.get("height"))
              and img["width"] > 0 and img["height"] > 0)
        if not ok:
            report.add("invalid_entry", f"images[{index}] needs integer 'id', 'width' > 0, "
                       f"'height' > 0 and a 'file_name' string")
            continue
        if img["id"] in declared:
            report.add("duplicate_image_id", f"image id {img['id']} used again by images[{index}] "
                       f"({img['file_name']})")
            continue
        declared.add(img["id"])
        candidates[img["id"]] = dict(img)
    if image_dir is None:
        return candidates, declared
    image_dir = os.fspath(image_dir)
    infos = list(candidates.values())

    def check(info):
        return _check_image_file(os.path.join(image_dir, info["file_name"]), info["width"],
                                 info["height"], decode)

    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        results = list(pool.map(check, infos))
    for info, problem in zip(infos, results):
        if problem is not None:
            code, detail = problem
            report.add(code, f"image {info['id']} ({os.path.join(image_dir, info['file_name'])}): "
                       f"{detail}")
            del candidates[info["id"]]
    return candidates, declared


def _check_annotations(entries: list, report: DoctorReport, images: dict, declared: set,
                       categories: dict, remap: dict) -> list:
    kept, seen_ids = [], set()
    declared_categories = sorted((set(categories) - set(remap.values())) | set(remap))
    max_id = max([a["id"] for a in entries if isinstance(a, dict) and _is_int(a.get("id"))],
                 default=0)
    for index, ann in enumerate(entries):
        if not (isinstance(ann, dict) and _is_int(ann.get("id")) and "image_id" in ann
                and "category_id" in ann):
            report.add("invalid_entry", f"annotations[{index}] needs an integer 'id', an "
                       f"'image_id' and a 'category_id'")
            continue
        ann = dict(ann)
        if ann["id"] in seen_ids:
            max_id += 1
            report.add("duplicate_annotation_id", f"annotation id {ann['id']} used again by "
                       f"annotations[{index}] (image {ann['image_id']}); --fix makes it {max_id}")
            ann["id"] = max_id
        seen_ids.add(ann["id"])
        where = f"annotation {ann['id']} (image {ann['image_id']})"
        if ann["image_id"] not in declared:
            report.add("unknown_image", f"{where}: image id not in 'images'")
            continue
        category = ann["category_id"]
        if category in remap:
            ann["category_id"] = remap[category]
        elif category not in categories:
            report.add("unknown_category", f"{where}: category_id {category!r} not in "
                       f"{declared_categories[:10]}")
            continue
        info = images.get(ann["image_id"])
        if info is None:
            continue  # its image was dropped (missing, corrupt, ...): reported there
        fixed = _check_geometry(ann, info, report, where)
        if fixed is not None:
            kept.append(fixed)
    return kept


def _check_geometry(ann: dict, info: dict, report: DoctorReport, where: str) -> dict | None:
    """The annotation with its segmentation and box checked against the image; None = drop."""
    height, width = info["height"], info["width"]
    image_id, ann_id = info["id"], ann["id"]
    segm = ann.get("segmentation")
    rle = None
    if isinstance(segm, list):
        if not all(_finite_numbers(p) for p in segm):
            report.add("invalid_segmentation", f"{where}: polygons must be lists of finite numbers",
                       image_id, ann_id)
            return None
        good = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]
        if len(good) < len(segm):
            report.add("polygon_too_few_points", f"{where}: {len(segm) - len(good)} of "
                       f"{len(segm)} polygons have fewer than 3 points", image_id, ann_id)
        ann["segmentation"] = good
        if good:
            rle = mask_utils.merge(mask_utils.frPyObjects(good, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            report.add("invalid_segmentation", f"{where}: RLE size {segm['size']} but the image is "
                       f"{[height, width]} (h, w)", image_id, ann_id)
            return None
        try:
            rle = (mask_utils.frPyObjects(segm, height, width) if isinstance(segm["counts"], list)
                   else dict(segm))
            mask_utils.area(rle)
        except (TypeError, ValueError, OverflowError) as e:
            report.add("invalid_segmentation", f"{where}: unreadable RLE ({e})", image_id, ann_id)
            return None
    else:
        report.add("invalid_segmentation", f"{where}: segmentation is {type(segm).__name__}, "
                   f"expected a list of polygons or an RLE dict", image_id, ann_id)
        return None
    area = int(mask_utils.area(rle)) if rle is not None else 0
    if area == 0:
        report.add("empty_mask", f"{where}: the segmentation covers no pixel", image_id, ann_id)
        return None
    mask_box = [float(v) for v in mask_utils.toBbox(rle)]
    ann["bbox"] = _check_box(ann.get("bbox"), mask_box, width, height, report, where,
                             image_id, ann_id)
    if not isinstance(ann.get("area"), (int, float)) or isinstance(ann.get("area"), bool):
        ann["area"] = area
    return ann


def _check_box(bbox, mask_box: list, width: int, height: int, report: DoctorReport, where: str,
               image_id, ann_id) -> list:
    """The bbox to keep: the given one, clipped or replaced by the mask's extent when wrong."""
    if bbox is None:
        report.add("missing_bbox", f"{where}: no bbox", image_id, ann_id)
        return mask_box
    if not (_finite_numbers(bbox) and len(bbox) == 4):
        report.add("invalid_bbox", f"{where}: bbox {bbox!r}", image_id, ann_id)
        return mask_box
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        report.add("degenerate_box", f"{where}: bbox {bbox} has width or height <= 0",
                   image_id, ann_id)
        return mask_box
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        report.add("box_outside_image", f"{where}: bbox {bbox} outside the {width}x{height} "
                   f"(w x h) image", image_id, ann_id)
        return mask_box
    box = list(bbox)
    if x < -_BOX_TOL or y < -_BOX_TOL or x + w > width + _BOX_TOL or y + h > height + _BOX_TOL:
        report.add("box_partly_outside", f"{where}: bbox {bbox} extends past the {width}x{height} "
                   f"(w x h) image", image_id, ann_id)
        x1, y1 = max(0.0, x), max(0.0, y)
        box = [x1, y1, min(float(width), x + w) - x1, min(float(height), y + h) - y1]
    mx, my, mw, mh = mask_box
    if (mx < box[0] - _MASK_TOL or my < box[1] - _MASK_TOL or mx + mw > box[0] + box[2] + _MASK_TOL
            or my + mh > box[1] + box[3] + _MASK_TOL):
        report.add("mask_outside_box", f"{where}: mask spans {mask_box}, bbox is {bbox}",
                   image_id, ann_id)
        return mask_box
    return box


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def fix_dataset(json_file: str | os.PathLike, image_dir: str | os.PathLike,
                out_dir: str | os.PathLike, *, copy_images: bool = False,
                report: DoctorReport | None = None, decode_images: bool = True,
                workers: int = 8) -> dict:
    """Write the cleaned copy of a dataset (what check_dataset's report says --fix does).

    Layout: out_dir/annotations/<json file name> and out_dir/images/<file_name> for every kept
    image: a symbolic link to the original (absolute path), or a copy with copy_images (also
    used where links cannot be made). The original JSON and images are only read. out_dir must
    be new or empty and outside image_dir. report: a check_dataset report of the same dataset
    (computed when None). Returns dict(json=..., images=..., report=<the original's report>,
    num_images=..., num_annotations=...).
    """
    json_file, image_dir, out_dir = os.fspath(json_file), os.fspath(image_dir), os.fspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise DataError(f"--fix output {out_dir} exists and is not an empty folder; give a new one")
    if _inside(out_dir, image_dir):
        raise DataError(f"--fix output {out_dir} is inside the image folder {image_dir}; the "
                        f"original must stay untouched: give a folder elsewhere")
    if report is None:
        report = check_dataset(json_file, image_dir, decode_images=decode_images, workers=workers)
    if report.image_dir is None or report.fixed is None:
        raise ValueError("fix_dataset needs a report made with the image folder (check_dataset "
                         "with image_dir), so missing and corrupt images are left out")
    fixed = report.fixed
    images_out = os.path.join(out_dir, "images")
    json_out = os.path.join(out_dir, "annotations", os.path.basename(json_file))
    os.makedirs(images_out, exist_ok=True)
    os.makedirs(os.path.dirname(json_out), exist_ok=True)
    for info in fixed["images"]:
        src = os.path.realpath(os.path.join(image_dir, info["file_name"]))
        dst = os.path.join(images_out, info["file_name"])
        if not _inside(dst, images_out):
            raise DataError(f"{json_file}: image {info['id']} has file_name {info['file_name']!r}, "
                            f"which leaves the image folder; cannot place it under {images_out}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(dst):
            continue  # two image entries for one file (different ids): one link serves both
        if copy_images:
            shutil.copy2(src, dst)
        else:
            try:
                os.symlink(src, dst)
            except OSError:  # no symlinks here (some filesystems, Windows): copy instead
                shutil.copy2(src, dst)
    tmp = json_out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(fixed, f)
    os.replace(tmp, json_out)
    return {"json": json_out, "images": images_out, "report": report,
            "num_images": len(fixed["images"]), "num_annotations": len(fixed["annotations"])}
