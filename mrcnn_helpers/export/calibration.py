"""INT8 calibration data without TensorRT: the batches a calibrator feeds, and its cache file.

Calibration images go through exactly the preprocessing of training and evaluation: the
dataset's image reader (`load_image`), `resize_and_pad` to the exported image size, then the
normalization the exported graph expects (`normalize_input`). The TensorRT calibrator
(tensorrt.make_entropy_calibrator) only copies these arrays to the GPU.

TLT's flags map as: --cal-image-dir DIR, --batches N, --cal-batch-size B (must equal the
engine's fixed batch), --cal-cache-file FILE (written after calibration, reused when present).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mrcnn_helpers.errors import DataError
from mrcnn_helpers.inference.metadata import ExportError, ExportMetadata, normalize_input


class CalibrationError(ExportError):
    """Calibration images or cache cannot be used as given."""


class CalibrationBatches:
    """Iterable of `batches` float32 arrays [batch_size, 3, H, W] from the images of a directory.

    Images are taken in sorted file-name order (deterministic); the directory must hold at least
    batches * batch_size images (TLT's rule). Each pass re-reads the files.
    """

    def __init__(self, image_dir, meta: ExportMetadata, *, batch_size: int, batches: int):
        from mrcnn_helpers.data.images import list_image_files

        if int(batch_size) < 1 or int(batches) < 1:
            raise CalibrationError(f"--cal-batch-size ({batch_size}) and --batches ({batches}) "
                                   "must be >= 1")
        if int(batch_size) != meta.batch_size:
            raise CalibrationError(
                f"calibration batch size {batch_size} differs from the exported graph's fixed "
                f"batch {meta.batch_size}: export with --batch-size {batch_size}, or calibrate "
                f"with --cal-batch-size {meta.batch_size}")
        self.meta = meta
        self.batch_size, self.batches = int(batch_size), int(batches)
        try:
            files = list_image_files(image_dir)
        except DataError as exc:  # missing directory, no images
            raise CalibrationError(f"calibration images: {exc}") from None
        needed = self.batch_size * self.batches
        if len(files) < needed:
            raise CalibrationError(
                f"{image_dir} has {len(files)} images, but --batches {self.batches} x "
                f"--cal-batch-size {self.batch_size} needs {needed}; add images or lower --batches")
        self.files = files[:needed]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 3, *self.meta.image_size)

    def __len__(self) -> int:
        return self.batches

    def load(self, path) -> np.ndarray:
        """One image as the graph takes it: float32 [3, H, W]."""
        from mrcnn_helpers.data import load_image, resize_and_pad

        padded, _ = resize_and_pad(load_image(str(path)), self.meta.image_size)
        return normalize_input(padded.numpy()[None], self.meta)[0]

    def __iter__(self):
        for b in range(self.batches):
            chunk = self.files[b * self.batch_size:(b + 1) * self.batch_size]
            yield np.ascontiguousarray(np.stack([self.load(p) for p in chunk]))


class CalibrationCache:
    """The calibration cache file: read when present (calibration is then skipped), written
    atomically after calibration."""

    def __init__(self, path):
        self.path = Path(path) if path else None

    def read(self) -> bytes | None:
        if self.path is None or not self.path.is_file():
            return None
        data = self.path.read_bytes()
        return data or None  # an empty file (killed run) means "calibrate again"

    def write(self, data) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, self.path)

    def exists(self) -> bool:
        return self.read() is not None
