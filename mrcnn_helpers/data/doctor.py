"""Dataset doctor: find every problem of a COCO instances dataset at once, and write a fixed copy.

check_dataset reads the JSON and (optionally) every image, and reports each problem type with
its severity, count and examples. Errors are what breaks training or silently corrupts it or
the metrics; warnings are what the loader works around (clips, ignores) but you should know
about; info is neither. Annotations are judged by annotations.py, the same code training runs,
so the report says exactly what training will do: PROBLEMS gives, per problem, what --fix does
and what training does, one of
  - "refused: the file is not read": training, evaluation and to-tfrecord stop with a one-line
    DataError naming the file and the entry (malformed entries, ids, references, coordinates,
    RLE, area, iscrowd; images missing, unreadable, over the pixel limit or of the wrong size
    when their sample is read);
  - "annotation dropped and counted": training leaves the annotation out and its warning counts
    it per problem (empty mask, degenerate box, box outside the image);
  - a work-around for warnings (clip the box, use the mask's box, ignore a short polygon).
So a dataset with no error trains with nothing refused and nothing dropped. The same pass works
out the cleaned dataset, which fix_dataset writes to a new folder (JSON + links or copies of the
good images) without touching the original; the fixed copy passes with no error and no warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

from ..errors import DataError
from ..fileio import (
    atomic_output,
    atomic_write,
    atomic_write_json,
    check_output_path,
    check_writable_dir,
    json_safe,
)
from .annotations import KIND, REFUSED, check_annotation
from .annotations import PROBLEMS as ANNOTATION_PROBLEMS
from .coco import read_coco_json
from .images import ImageTooLargeError, check_image_size, open_image
from .progress import progress_bar

# code: (severity, what it means, what --fix does, what training does)
PROBLEMS: dict[str, tuple[str, str, str, str]] = {
    "invalid_entry": ("error", "entry lacks a required field or has a wrong type",
                      "entry dropped (an image's annotations with it)", REFUSED),
    "duplicate_image_id": ("error", "two images share an id", "later duplicates dropped",
                           REFUSED),
    "duplicate_annotation_id": ("error", "two annotations share an id",
                                "later duplicates get new ids", REFUSED),
    "duplicate_category_id": ("error", "two categories share an id", "later duplicates dropped",
                              REFUSED),
    "category_id_zero": ("error", "category id 0 (background in TLT's labels)",
                         "renumbered to the largest id + 1",
                         "used as any other id (labels are 1..K); to-tfrecord refuses it"),
    "image_too_large": ("error", "image (file or declared size) over the pixel limit",
                        "image and its annotations dropped", REFUSED),
    "missing_image": ("error", "image file not found", "image and its annotations dropped",
                      REFUSED),
    "unreadable_image": ("error", "image file unreadable or corrupt",
                         "image and its annotations dropped", REFUSED),
    "image_size_mismatch": ("error", "image file size differs from the JSON's width / height",
                            "image and its annotations dropped", REFUSED),
    "unknown_image": ("error", "annotation refers to an image id not in 'images'",
                      "annotation dropped", REFUSED),
    "unknown_category": ("error", "annotation has a category id not in 'categories'",
                         "annotation dropped", REFUSED),
    **ANNOTATION_PROBLEMS,
    "empty_image": ("info", "image has no annotations (a background-only sample)", "kept",
                    "used as a background-only sample"),
}
MAX_EXAMPLES = 5


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
        kind = KIND.get(code)
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
                           "training": PROBLEMS[code][3],
                           "examples": self.examples.get(code, [])}
                    for code, n in sorted(self.counts.items(), key=lambda kv: _order(kv[0]))}
        return {"dataset": self.json_file, "images_dir": self.image_dir,
                "num_images": self.num_images, "num_annotations": self.num_annotations,
                "num_categories": self.num_categories, "errors": self.num_errors,
                "warnings": self.num_warnings, "info": self.total("info"),
                "problems": problems, "per_image": self.per_image}

    def write_json(self, path: str | os.PathLike) -> str:
        """Write to_dict() to `path` atomically; refuses to write over the checked JSON."""
        check_output_path(path, [self.json_file], option="report")
        atomic_write_json(path, self.to_dict(), indent=1, error=DataError, what="report")
        return os.fspath(path)

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
                             f"--fix: {PROBLEMS[code][2]}; training: {PROBLEMS[code][3]}")
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


def _check_image_file(path: str, width: int, height: int, decode: bool) -> tuple[str, str] | None:
    """(code, detail) of a problem with one image file, or None when it is fine."""
    if not os.path.isfile(path):
        return "missing_image", "file not found"
    try:
        with open_image(path) as im:
            size = im.size
            if decode:
                im.load()  # a truncated or corrupt file fails here, not at open
    except ImageTooLargeError as e:
        return "image_too_large", str(e)
    except DataError as e:
        return "unreadable_image", str(e)
    if size != (width, height):
        return "image_size_mismatch", (f"file is {size[1]}x{size[0]} (h x w), the JSON says "
                                       f"{height}x{width}")
    return None


def check_dataset(json_file: str | os.PathLike, image_dir: str | os.PathLike | None = None, *,
                  decode_images: bool = True, workers: int = 8,
                  progress: bool = False) -> DoctorReport:
    """Check a COCO instances dataset; returns a DoctorReport (with the fixed dataset in .fixed).

    image_dir: folder the JSON's file_name entries are relative to; None skips the image checks.
    decode_images: fully decode each image (finds truncated / corrupt files; slower) rather than
    reading its header only. workers: threads reading images. progress: progress bars on a
    terminal. Raises DataError only when the file is not a COCO instances JSON at all
    (unreadable, not JSON, missing top-level lists).
    """
    json_file = os.fspath(json_file)
    data = read_coco_json(json_file)
    report = DoctorReport(json_file, None if image_dir is None else os.fspath(image_dir),
                          num_images=len(data["images"]), num_annotations=len(data["annotations"]),
                          num_categories=len(data["categories"]))
    categories, remap = _check_categories(data["categories"], report)
    images, declared = _check_images(data["images"], report, image_dir, decode_images, workers,
                                     progress)
    annotations = _check_annotations(data["annotations"], report, images, declared, categories,
                                     remap, progress)
    originally_used = {a.get("image_id") for a in data["annotations"]
                       if isinstance(a, dict) and _is_int(a.get("image_id"))}
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


def _check_images(entries: list, report: DoctorReport, image_dir, decode: bool, workers: int,
                  progress: bool) -> tuple[dict, set]:
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
        try:
            check_image_size(img["width"], img["height"], f"{img['file_name']} (images[{index}])")
        except ImageTooLargeError as e:
            report.add("image_too_large", f"image {img['id']}: {e}")
            continue
        candidates[img["id"]] = dict(img)
    if image_dir is None:
        return candidates, declared
    image_dir = os.fspath(image_dir)
    infos = list(candidates.values())

    def check(info):
        return _check_image_file(os.path.join(image_dir, info["file_name"]), info["width"],
                                 info["height"], decode)

    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        results = list(progress_bar(pool.map(check, infos), "checking images", total=len(infos),
                                    unit="img", enabled=progress))
    for info, problem in zip(infos, results):
        if problem is not None:
            code, detail = problem
            report.add(code, f"image {info['id']} ({os.path.join(image_dir, info['file_name'])}): "
                       f"{detail}")
            del candidates[info["id"]]
    return candidates, declared


def _check_annotations(entries: list, report: DoctorReport, images: dict, declared: set,
                       categories: dict, remap: dict, progress: bool) -> list:
    kept, seen_ids = [], set()
    declared_categories = sorted((set(categories) - set(remap.values())) | set(remap))
    max_id = max([a["id"] for a in entries if isinstance(a, dict) and _is_int(a.get("id"))],
                 default=0)
    for index, ann in enumerate(progress_bar(entries, "checking annotations", unit="ann",
                                             enabled=progress)):
        if not (isinstance(ann, dict) and _is_int(ann.get("id")) and _is_int(ann.get("image_id"))
                and _is_int(ann.get("category_id"))):
            report.add("invalid_entry", f"annotations[{index}] needs an integer 'id', "
                       f"'image_id' and 'category_id'")
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
        check = check_annotation(ann, info)
        for code, detail in check.problems:
            report.add(code, f"{where} has {detail}", info["id"], ann["id"])
        fixed = check.fixed()
        if fixed is not None:
            kept.append(fixed)
    return kept


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def fix_dataset(json_file: str | os.PathLike, image_dir: str | os.PathLike,
                out_dir: str | os.PathLike, *, copy_images: bool = False,
                report: DoctorReport | None = None, decode_images: bool = True,
                workers: int = 8, progress: bool = False) -> dict:
    """Write the cleaned copy of a dataset (what check_dataset's report says --fix does).

    Layout: out_dir/annotations/<json file name> and out_dir/images/<file_name> for every kept
    image: a symbolic link to the original (absolute path), or a copy with copy_images (also
    used where links cannot be made). The original JSON and images are only read; every file
    is written atomically (fileio). out_dir must be new or empty and outside image_dir.
    report: a check_dataset report of the same dataset (computed when None). Returns
    dict(json=..., images=..., report=<the original's report>, num_images=...,
    num_annotations=...).
    """
    json_file, image_dir, out_dir = os.fspath(json_file), os.fspath(image_dir), os.fspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise DataError(f"--fix output {out_dir} exists and is not an empty folder; give a new one")
    if _inside(out_dir, image_dir):
        raise DataError(f"--fix output {out_dir} is inside the image folder {image_dir}; the "
                        f"original must stay untouched: give a folder elsewhere")
    if report is None:
        report = check_dataset(json_file, image_dir, decode_images=decode_images, workers=workers,
                               progress=progress)
    if report.image_dir is None or report.fixed is None:
        raise ValueError("fix_dataset needs a report made with the image folder (check_dataset "
                         "with image_dir), so missing and corrupt images are left out")
    fixed = report.fixed
    images_out = os.path.join(out_dir, "images")
    json_out = os.path.join(out_dir, "annotations", os.path.basename(json_file))
    check_writable_dir(images_out, option="--fix images folder")
    for info in progress_bar(fixed["images"], "writing the fixed copy", unit="img",
                             enabled=progress):
        src = os.path.realpath(os.path.join(image_dir, info["file_name"]))
        dst = os.path.join(images_out, info["file_name"])
        if not _inside(dst, images_out):
            raise DataError(f"{json_file}: image {info['id']} has file_name {info['file_name']!r}, "
                            f"which leaves the image folder; cannot place it under {images_out}")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(dst):
            continue  # two image entries for one file (different ids): one link serves both
        if not copy_images:
            try:
                os.symlink(src, dst)
                continue
            except OSError:  # no symlinks here (some filesystems, Windows): copy instead
                pass
        _copy_file(src, dst)
    atomic_write(json_out, json.dumps(json_safe(fixed)), error=DataError, what="fixed JSON")
    return {"json": json_out, "images": images_out, "report": report,
            "num_images": len(fixed["images"]), "num_annotations": len(fixed["annotations"])}


def _copy_file(src: str, dst: str) -> None:
    """Copy an image atomically (a failure leaves no partial file), keeping its times."""
    with open(src, "rb") as source, atomic_output(dst, "wb", error=DataError,
                                                  what="image copy") as target:
        shutil.copyfileobj(source, target, 1 << 20)
    shutil.copystat(src, dst)
