"""Image files: the one list of extensions the toolkit reads, folder listing, and the one reader.

Every command that reads images (training, evaluation, `infer`, `deploy` folders, calibration,
converters, the dataset doctor) lists them with `list_image_files` and decodes them with
`load_image` / `decode_image`, so they accept the same files and convert colours the same way.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

# Lower-case suffixes of the image files the toolkit reads (anything PIL decodes among them).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Said wherever a defect is found that the dataset doctor finds (and fixes) everywhere at once.
DOCTOR_HINT = ("run `mrcnn data check JSON --images DIR` for a full report, and add "
               "`--fix OUT_DIR` to write a cleaned copy")


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether `path` has one of IMAGE_EXTENSIONS (any case)."""
    return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(directory: str | os.PathLike) -> list[Path]:
    """Image files (IMAGE_EXTENSIONS, any case) directly in `directory`, sorted by name.

    Raises DataError naming the directory when it is missing, not a directory, or holds none.
    """
    directory = Path(directory)
    if not directory.exists():
        raise DataError(f"input directory not found: {directory}")
    if not directory.is_dir():
        raise DataError(f"input path is not a directory: {directory}")
    files = sorted(p for p in directory.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {directory}")
    return files


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """uint8 [h, w, 3] RGB pixels of a loaded PIL image (see load_image for the conversions)."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        gray = np.asarray(im, dtype=np.float64) / 257.0
        return np.repeat(np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None], 3, 2)
    if im.mode == "F":
        gray = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, 2)
    return np.array(im.convert("RGB"))


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def load_image(path: str | os.PathLike, image_id: int | None = None) -> torch.Tensor:
    """Read an image file as RGB uint8 Tensor[3, h, w].

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted; 16-/32-bit
    integer images are scaled by 1/257 (0..65535 -> 0..255). EXIF orientation is not applied:
    COCO annotations refer to the pixels as stored. Raises DataError naming the path and
    the image id when the file is missing, unreadable or corrupt.
    """
    path = os.fspath(path)
    where = f"{path}" + (f" (image id {image_id})" if image_id is not None else "")
    try:
        with Image.open(path) as im:
            im.load()
            array = _to_rgb_array(im)
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {where}; {DOCTOR_HINT}") from e
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {where}: {e}; {DOCTOR_HINT}") from e
    return _as_tensor(array)


def decode_image(data: bytes, where: str) -> torch.Tensor:
    """Encoded image bytes (JPEG, PNG, ...) -> RGB uint8 Tensor[3, h, w], converted as load_image.
    Raises DataError naming `where` when the bytes are not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            array = _to_rgb_array(im)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot decode the image of {where}: {e}") from e
    return _as_tensor(array)
