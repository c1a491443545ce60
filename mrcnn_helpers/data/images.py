"""Image files: the one list of extensions the toolkit reads, folder listing, and the one reader.

Every command that reads images (training, evaluation, `infer`, `deploy` folders, calibration,
converters, the dataset doctor, TFRecords) lists them with `list_image_files` and opens them with
`open_image` (header: size, EXIF) or decodes them with `load_image` / `decode_image` /
`decode_mask`, so they accept the same files, convert colours the same way and refuse the same
oversized ones.

The pixel limit: an image of more than `max_image_pixels()` pixels (MAX_IMAGE_PIXELS =
16384 x 16384 unless the environment variable MRCNN_MAX_IMAGE_PIXELS says otherwise) is refused
with ImageTooLargeError naming the file, its size and the limit, before a single pixel is
decoded: a 20000 x 20000 PNG of a few kilobytes would otherwise take 1.2 GB as RGB (and 4.8 GB
as float) in every loader worker. The limit applies to sizes declared in annotation files too
(pycocotools allocates width x height bytes per mask it decodes, and counts in 32 bits).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections.abc import Iterator
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
# Default pixel limit: 16384 x 16384, 4x the largest side any detection model here trains at.
MAX_IMAGE_PIXELS = 16384 * 16384
PIXEL_LIMIT_ENV = "MRCNN_MAX_IMAGE_PIXELS"
# pycocotools counts mask pixels in 32-bit integers: no limit may pass this.
_HARD_PIXEL_LIMIT = 2**31
# Failures PIL raises for files it cannot parse or decode (truncated, corrupt, not an image).
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError,
                  IndexError, TypeError, Image.DecompressionBombError)

# PIL's own process-wide guard is kept at the same limit (open_image raises it to the configured
# one); the warning it gives between 1x and 2x its limit only precedes the error open_image
# raises for those images itself.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageTooLargeError(DataError):
    """An image (file or size declared in an annotation file) has more pixels than the limit."""


def max_image_pixels() -> int:
    """The pixel limit in force: MRCNN_MAX_IMAGE_PIXELS when set (an integer, at most 2**31),
    else MAX_IMAGE_PIXELS. Raises DataError for a malformed value of the variable."""
    text = os.environ.get(PIXEL_LIMIT_ENV, "").strip()
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(text.replace("_", ""))
    except ValueError:
        limit = 0
    if not 1 <= limit <= _HARD_PIXEL_LIMIT:
        raise DataError(f"{PIXEL_LIMIT_ENV}={text!r}: expected a whole number of pixels from 1 to "
                        f"{_HARD_PIXEL_LIMIT} (pycocotools counts mask pixels in 32 bits)")
    return limit


def _limit_text(limit: int) -> str:
    side = int(limit ** 0.5)
    shape = f" ({side} x {side})" if side * side == limit else ""
    return (f"the limit of {limit} pixels{shape}; set {PIXEL_LIMIT_ENV} to a larger number of "
            f"pixels to read it anyway")


def check_image_size(width, height, where: str) -> None:
    """Raise ImageTooLargeError naming `where` when width x height exceeds max_image_pixels()."""
    limit = max_image_pixels()
    if int(width) * int(height) > limit:
        raise ImageTooLargeError(f"image {where} is {width}x{height} (w x h) = "
                                 f"{int(width) * int(height)} pixels, more than "
                                 f"{_limit_text(limit)}")


@contextlib.contextmanager
def open_image(source: str | os.PathLike | bytes, where: str | None = None) -> Iterator[Image.Image]:
    """Open an image file (path) or encoded bytes for reading, its size checked against the limit.

    Yields the PIL image with only its header read (size, mode, EXIF); call `.load()` or convert
    it inside the block. Raises DataError naming `where` (default: the path) when the file is
    missing ("image file not found: ..."), not an image or corrupt ("cannot read image ...:
    reason"), and ImageTooLargeError when it has more pixels than max_image_pixels(). Errors
    raised while decoding inside the block are reported the same way.
    """
    if where is None:
        where = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    limit = max_image_pixels()
    # PIL's own guard must not refuse what the configured limit allows (it errs past 2x its
    # value); its smaller default would otherwise win for limits above 179M pixels.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS != limit:
        Image.MAX_IMAGE_PIXELS = limit
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(handle) as im:
            check_image_size(im.size[0], im.size[1], where)
            yield im
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {where}") from e
    except Image.DecompressionBombError as e:
        # PIL's own guard (at twice the limit) fired before the size could be read: its
        # message holds the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{found.group(1)} pixels" if found else f"more than {2 * limit} pixels"
        raise ImageTooLargeError(f"image {where} has {count}, more than "
                                 f"{_limit_text(limit)}") from e
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot read image {where}: {str(e) or type(e).__name__}") from e


def image_size(path: str | os.PathLike, where: str | None = None) -> tuple[int, int]:
    """(width, height) of an image file from its header (see open_image for the errors)."""
    with open_image(path, where) as im:
        return im.size


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
    the image id when the file is missing, unreadable, corrupt or over the pixel limit.
    """
    where = os.fspath(path) + (f" (image id {image_id})" if image_id is not None else "")
    try:
        with open_image(path, where) as im:
            im.load()
            array = _to_rgb_array(im)
    except ImageTooLargeError:
        raise
    except DataError as e:
        raise DataError(f"{e}; {DOCTOR_HINT}") from e.__cause__
    return _as_tensor(array)


def decode_image(data: bytes, where: str) -> torch.Tensor:
    """Encoded image bytes (JPEG, PNG, ...) -> RGB uint8 Tensor[3, h, w], converted as load_image.
    Raises DataError naming `where` when the bytes are not a readable image or exceed the
    pixel limit."""
    if not isinstance(data, (bytes, bytearray)):
        raise DataError(f"cannot decode the image of {where}: expected encoded bytes, got "
                        f"{type(data).__name__}")
    with open_image(data, f"of {where}") as im:
        im.load()
        array = _to_rgb_array(im)
    return _as_tensor(array)


def decode_mask(data: bytes, where: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Encoded single-channel mask (PNG) -> its values as an array [h, w] (first channel).

    size: the (width, height) it must have, checked from the header before decoding. Raises
    DataError naming `where` for unreadable bytes, a wrong size or one over the pixel limit.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise DataError(f"{where}: expected PNG bytes, got {type(data).__name__}")
    with open_image(data, where) as im:
        if size is not None and tuple(im.size) != tuple(size):
            raise DataError(f"{where} is {im.size[1]}x{im.size[0]} (h x w), the image "
                            f"{size[1]}x{size[0]}")
        array = np.asarray(im)
    return array[..., 0] if array.ndim == 3 else array


def exif_orientation(im: Image.Image) -> int:
    """The EXIF Orientation (1..8; 1 = as stored) of an open image; 1 when absent or invalid."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is an image without orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1
