"""COCO instances <-> sharded TFRecord files in the schema TLT's Mask R-CNN reads.

Each record is a tf.train.Example for one image, with the features of the TF Object Detection
API's COCO converter (create_coco_tf_record.py), which TLT's data loader decodes:

  image/encoded           bytes    the image file's bytes, unchanged (JPEG, PNG, ...)
  image/format            bytes    "jpeg" | "png" | ... (lower case PIL format)
  image/height, /width    int64    pixel size
  image/filename          bytes    file_name from the JSON
  image/source_id         bytes    str(COCO image id)
  image/key/sha256        bytes    hex SHA-256 of image/encoded
  image/object/bbox/xmin, xmax, ymin, ymax   float  box edges normalized by width / height
  image/object/class/label    int64   COCO category id (not the contiguous label)
  image/object/class/text     bytes   category name
  image/object/is_crowd       int64   0 / 1
  image/object/area           float   annotation area (pixels)
  image/object/mask           bytes   per instance: PNG (mode L) of the whole image, 1 = instance

The writer keeps exactly the annotations CocoInstanceDataset would use (boxes clipped to the
image; empty boxes and segmentations without a polygon of >= 3 points dropped and counted), so
TfRecordInstanceDataset gives the same samples as CocoInstanceDataset over the same data. Box
coordinates pass through float32 (TLT's format); the reader snaps values within float32's
error of a multiple of 0.01 px back to it, so integer and COCO boxes round-trip exactly.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import logging
import math
import os

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from ..errors import DataError
from ..fileio import atomic_write_json, check_output_path
from .annotations import KIND, coordinate_limit
from .coco import load_coco, select_instances
from .images import DOCTOR_HINT, check_image_size, decode_image, decode_mask, open_image
from .instances import InstanceSampleDataset, box_pixel_window
from .progress import progress_bar
from .tfrecord import TFRecordWriter, decode_example, encode_example, index_tfrecord, read_record

log = logging.getLogger(__name__)

# More shards than any dataset needs (TLT wrote 256 for COCO); each is an open file while writing,
# and the usual limit of open files per process is 1024.
MAX_SHARDS = 1000


def shard_paths(out_prefix: str | os.PathLike, num_shards: int) -> list[str]:
    """File names of a sharded set: PREFIX-00000-of-0000N.tfrecord (TLT's glob `PREFIX*.tfrecord`)."""
    prefix = os.fspath(out_prefix)
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


def _png_mask(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def coco_image_example(coco, image_id: int, image_dir: str, source: str,
                       include_masks: bool = True) -> tuple[bytes, list]:
    """(serialized tf.train.Example of one image, checks of the annotations dropped)."""
    info = coco.imgs[image_id]
    path = os.path.join(image_dir, info["file_name"])
    where = f"{path} (image id {image_id})"
    try:
        with open(path, "rb") as f:
            encoded = f.read()
    except OSError as e:
        raise DataError(f"cannot read image {where}: {e.strerror or e}; {DOCTOR_HINT}") from e
    with open_image(encoded, where) as im:
        fmt, (w, h) = (im.format or "").lower(), im.size
    height, width = int(info["height"]), int(info["width"])
    if (h, w) != (height, width):
        raise DataError(f"image {where} is {h}x{w} (h x w) but {source} says "
                        f"{height}x{width}; {DOCTOR_HINT}")
    picked, dropped = select_instances(coco, image_id, source, skip_crowd=False)
    names = {c["id"]: str(c["name"]) for c in coco.dataset["categories"]}
    boxes = np.array([c.box for c in picked], dtype=np.float64).reshape(-1, 4)
    features = {
        "image/encoded": encoded, "image/format": fmt or "unknown",
        "image/height": height, "image/width": width,
        "image/filename": str(info["file_name"]), "image/source_id": str(image_id),
        "image/key/sha256": hashlib.sha256(encoded).hexdigest(),
        "image/object/bbox/xmin": ("float", (boxes[:, 0] / width).tolist()),
        "image/object/bbox/xmax": ("float", (boxes[:, 2] / width).tolist()),
        "image/object/bbox/ymin": ("float", (boxes[:, 1] / height).tolist()),
        "image/object/bbox/ymax": ("float", (boxes[:, 3] / height).tolist()),
        "image/object/class/label": ("int", [c.ann["category_id"] for c in picked]),
        "image/object/class/text": ("bytes", [names[c.ann["category_id"]] for c in picked]),
        "image/object/is_crowd": ("int", [int(c.iscrowd) for c in picked]),
        "image/object/area": ("float", [c.area for c in picked]),
    }
    if include_masks:
        features["image/object/mask"] = ("bytes", [_png_mask(mask_utils.decode(c.rle))
                                                   for c in picked])
    return encode_example(features), dropped


def write_coco_tfrecords(json_file: str | os.PathLike, image_dir: str | os.PathLike,
                         out_prefix: str | os.PathLike, num_shards: int = 1, *,
                         include_masks: bool = True, progress: bool = True) -> dict:
    """Convert a COCO instances dataset into `num_shards` TFRecord files (TLT's schema, see above).

    Images go in image-id order, image k (0-based) to shard k mod num_shards. Every shard is
    written through fileio.atomic_output: a shard appears only when complete, and a failure (a
    full disk) leaves no partial or temporary file. Also writes OUT_PREFIX_warnings.json (TAO's
    form: {image id: {"box": [annotation ids dropped for their box], "mask": [ids dropped for
    their segmentation]}}). Returns dict(files=[...], num_images, num_annotations,
    num_dropped, warnings_json). Raises DataError for unreadable images, size mismatches,
    annotations readers refuse, and outputs that would replace an input.
    """
    if not isinstance(num_shards, int) or not 1 <= num_shards <= MAX_SHARDS:
        raise DataError(f"--shards must be an integer from 1 to {MAX_SHARDS}, got {num_shards!r}")
    source = os.fspath(json_file)
    paths = shard_paths(out_prefix, num_shards)
    warnings_json = f"{os.fspath(out_prefix)}_warnings.json"
    for output in (*paths, warnings_json):
        check_output_path(output, [source, image_dir], option="output")
    coco = load_coco(source, check_annotations=False)  # judged image by image below
    if any(c["id"] == 0 for c in coco.dataset["categories"]):
        raise DataError(f"{source}: category id 0 is background in TLT's records; {DOCTOR_HINT} "
                        f"(the fix renumbers it)")
    warnings, num_annotations, num_dropped = {}, 0, 0
    image_ids = sorted(coco.imgs)
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(TFRecordWriter(p)) for p in paths]
        for k, image_id in enumerate(progress_bar(image_ids, "to-tfrecord", unit="img",
                                                  enabled=progress)):
            data, dropped = coco_image_example(coco, image_id, os.fspath(image_dir), source,
                                               include_masks)
            writers[k % len(writers)].write(data)
            num_annotations += len(coco.imgToAnns.get(image_id, [])) - len(dropped)
            num_dropped += len(dropped)
            if dropped:
                warnings[str(image_id)] = _dropped_reasons(dropped)
    atomic_write_json(warnings_json, warnings, indent=1, error=DataError, what="warnings file")
    if num_dropped:
        log.warning("%s: %d annotations dropped (empty mask, degenerate or outside box); see %s",
                    source, num_dropped, warnings_json)
    return {"files": paths, "num_images": len(image_ids), "num_annotations": num_annotations,
            "num_dropped": num_dropped, "warnings_json": warnings_json}


def _dropped_reasons(dropped: list) -> dict:
    """TAO's {"box": [ids], "mask": [ids]} of an image's dropped annotations."""
    out = {"box": [], "mask": []}
    for check in dropped:
        out[KIND[check.drop_reason()]].append(check.ann["id"])
    return out


def tfrecord_files(pattern: str, field: str = "file pattern") -> list[str]:
    """Sorted files matching a glob pattern (or a comma-separated list of patterns)."""
    files = sorted({f for p in str(pattern).split(",") if p.strip()
                    for f in glob.glob(os.path.expanduser(p.strip()))})
    if not files:
        raise DataError(f"{field} '{pattern}' matches no TFRecord file")
    return files


class TfRecordInstanceDataset(InstanceSampleDataset):
    """TFRecord shards (TLT / TF Object Detection schema) as Mask R-CNN samples.

    Gives the same sample dicts as CocoInstanceDataset (see instances.py) for the same data.
    files: list of paths (or a glob pattern string). categories: COCO category dicts ({"id",
    "name"}) defining the contiguous labels (sorted by id -> 1..K); None reads every record once
    to collect the ids and names present. coco: optional pycocotools COCO ground truth (the
    val_json_file), for evaluation; image ids then must exist in it. Records are indexed at
    construction (headers only); each read verifies the data CRC, and corruption raises
    DataError naming the file and byte offset. Records without image/object/mask, with masks of
    the wrong size or with labels outside `categories` also raise DataError naming the record.
    """

    def __init__(self, files, *, categories=None, coco=None, image_size=(512, 512), train=True,
                 augment=False, skip_crowd=True, gt_mask_size=112, max_num_instances=200,
                 scale_range=(0.8, 1.25), max_images=None):
        super().__init__(image_size=image_size, train=train, augment=augment,
                         skip_crowd=skip_crowd, gt_mask_size=gt_mask_size,
                         max_num_instances=max_num_instances, scale_range=scale_range)
        self.files = tfrecord_files(files) if isinstance(files, str) else [os.fspath(f) for f in files]
        if not self.files:
            raise DataError("TfRecordInstanceDataset needs at least one file")
        self.source = self.files[0] if len(self.files) == 1 else f"{len(self.files)} TFRecord files"
        self.coco = coco
        self._index = [(i, off, length) for i, path in enumerate(self.files)
                       for off, length in index_tfrecord(path)]
        if max_images is not None:
            self._index = self._index[:max(0, int(max_images))]
        if categories is None:
            categories = self._scan_categories()
        cats = sorted(categories, key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in cats]
        self.class_names = ["background"] + [str(c["name"]) for c in cats]
        self._label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}

    def _scan_categories(self) -> list[dict]:
        names = {}
        for i in range(len(self._index)):
            feats, _ = self._read(i)
            texts = feats.get("image/object/class/text", [])
            for k, cid in enumerate(feats.get("image/object/class/label", [])):
                name = texts[k].decode("utf-8", "replace") if k < len(texts) else f"class_{cid}"
                names.setdefault(int(cid), name)
        log.info("%s: categories collected from the records: %s", self.source, sorted(names))
        return [{"id": cid, "name": name} for cid, name in sorted(names.items())]

    def _where(self, index: int) -> str:
        file_index, offset, _ = self._index[index]
        return f"{self.files[file_index]} (record at byte offset {offset})"

    def _read(self, index: int) -> tuple[dict, str]:
        file_index, offset, length = self._index[index]
        path = self.files[file_index]
        with open(path, "rb") as f:
            data = read_record(f, path, offset, length)
        where = self._where(index)
        return decode_example(data, where), where

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict:
        feats, where = self._read(index)
        image_id = self._image_id(feats, where)
        declared = (_int_feature(feats, "image/height", where),
                    _int_feature(feats, "image/width", where))
        if min(declared) < 1:
            raise DataError(f"{where}: image/height x image/width = {declared[0]}x{declared[1]}; "
                            f"both must be >= 1")
        check_image_size(declared[1], declared[0], f"of {where}")
        image = decode_image(_one(feats, "image/encoded", where), where)
        height, width = int(image.shape[1]), int(image.shape[2])
        if declared != (height, width):
            raise DataError(f"{where}: image/height x image/width say {declared[0]}x{declared[1]} "
                            f"but the encoded image is {height}x{width}")
        instances = self._instances(feats, where, width, height)
        return self._sample(image, image_id, instances)

    def _image_id(self, feats: dict, where: str) -> int:
        raw = _one(feats, "image/source_id", where)
        try:
            image_id = int(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (ValueError, TypeError) as e:
            raise DataError(f"{where}: image/source_id {raw!r} is not an integer COCO image id") from e
        if self.coco is not None and image_id not in self.coco.imgs:
            raise DataError(f"{where}: image id {image_id} is not in the ground truth JSON; the "
                            f"records and val_json_file must describe the same images")
        return image_id

    def _instances(self, feats: dict, where: str, width: int, height: int) -> list:
        """(box, label, mask source) of the objects of a record, checked like COCO annotations:
        coordinates finite and within annotations.coordinate_limit of the image (else DataError),
        empty boxes after clipping left out."""
        keys = ("xmin", "ymin", "xmax", "ymax")
        coords = [feats.get(f"image/object/bbox/{k}", []) for k in keys]
        labels = feats.get("image/object/class/label", [])
        n = len(labels)
        if any(len(c) != n for c in coords):
            raise DataError(f"{where}: image/object/bbox/* and image/object/class/label have "
                            f"different lengths ({[len(c) for c in coords]} vs {n})")
        masks = feats.get("image/object/mask")
        if n and (masks is None or len(masks) != n):
            raise DataError(f"{where}: {n} objects but {0 if masks is None else len(masks)} "
                            f"image/object/mask entries; Mask R-CNN needs one PNG mask per object "
                            f"(write the records with masks)")
        crowd = _object_values(feats, "image/object/is_crowd", n, 0, where)
        areas = _object_values(feats, "image/object/area", n, None, where)
        limit = coordinate_limit(height, width)
        picked = []
        for k in range(n):
            if crowd[k] not in (0, 1):
                raise DataError(f"{where}: object {k} has image/object/is_crowd {crowd[k]!r}; "
                                f"expected 0 or 1")
            if crowd[k] and self.skip_crowd:
                continue
            pixels = []
            for key, values, extent in zip(keys, coords, (width, height, width, height)):
                value = values[k]
                if not (isinstance(value, float) and math.isfinite(value)
                        and abs(value * extent) <= limit):
                    raise DataError(f"{where}: object {k} has image/object/bbox/{key} {value!r}; "
                                    f"box edges must be finite and within +-{limit:g} px "
                                    f"(normalized: +-{limit / extent:g})")
                pixels.append(_snap(value * extent, extent))
            x1, y1, x2, y2 = pixels
            box = np.array([max(0.0, x1), max(0.0, y1), min(float(width), x2),
                            min(float(height), y2)], dtype=np.float64)
            if not (box[2] > box[0] and box[3] > box[1]):
                continue
            label = self._label_of.get(labels[k]) if isinstance(labels[k], int) else None
            if label is None:
                raise DataError(f"{where}: object {k} has image/object/class/label {labels[k]}, "
                                f"not one of the category ids {self.category_ids}")
            area = areas[k]
            if area is None:
                area = float((box[2] - box[0]) * (box[3] - box[1]))
            elif not (isinstance(area, float) and math.isfinite(area) and area >= 0):
                raise DataError(f"{where}: object {k} has image/object/area {area!r}; expected a "
                                f"finite number >= 0")
            picked.append((area, box, label, (masks[k], where, k, width, height)))
        return self._keep_largest(picked)[0]

    def _mask_crop(self, source, box):
        png, where, k, width, height = source
        mask = decode_mask(png, f"{where}: image/object/mask {k}", size=(width, height))
        x0, y0, x1, y1 = box_pixel_window(box, width, height)
        return (mask[y0:y1, x0:x1] > 0).astype(np.uint8), (x0, y0)


def _snap(value: float, extent: int) -> float:
    """A pixel coordinate read back from a float32 normalized one, snapped to the nearest 0.01 px
    when within float32's rounding error of it (|error| <= 2**-24 * extent): integer and COCO's
    two-decimal boxes then come back exactly, others keep the float32 value (< 1e-4 px off)."""
    snapped = round(value * 100.0) / 100.0
    return snapped if abs(value - snapped) <= 1e-7 * extent else value


def _one(feats: dict, key: str, where: str):
    values = feats.get(key)
    if not values:
        raise DataError(f"{where}: feature '{key}' is missing (TLT's TFRecord schema needs it)")
    return values[0]


def _int_feature(feats: dict, key: str, where: str) -> int:
    value = _one(feats, key, where)
    if not isinstance(value, int):
        raise DataError(f"{where}: feature '{key}' is {value!r}; expected an int64 value")
    return value


def _object_values(feats: dict, key: str, n: int, default, where: str) -> list:
    """The per-object values of an optional feature (`default` for each when absent)."""
    values = feats.get(key) or [default] * n
    if len(values) != n:
        raise DataError(f"{where}: {len(values)} values of '{key}' for {n} objects")
    return values
