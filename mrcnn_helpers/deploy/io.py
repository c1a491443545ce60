"""Frame sources and sinks of the deploy pipeline.

Sources yield (name, frame) pairs, frame an RGB uint8 numpy array [h, w, 3]:
  - a directory of images (sorted by name, named by their file names; the toolkit's one image
    reader, works without OpenCV);
  - a video file, an RTSP/HTTP stream URL, or a webcam ("webcam", "webcam:N" or a device number)
    through OpenCV (`pip install opencv-python-headless`); frames named frame_000000, ...
Sinks take (name, frame): an .mp4/.avi/.mkv file (OpenCV's VideoWriter) or a directory (one
image per frame under the frame's name, so an annotated folder mirrors its input folder).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from mrcnn_helpers.data.images import list_image_files, load_image
from mrcnn_helpers.errors import DataError
from mrcnn_helpers.fileio import atomic_output, check_output_path

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm")
STREAM_PREFIXES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "rtmp://")
DEFAULT_FPS = 30.0
# FourCC per container: mp4v plays everywhere OpenCV's bundled FFmpeg can write it.
FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "mp4v",
          ".webm": "VP80"}


def import_cv2(what: str):
    try:
        import cv2
    except ImportError:
        raise DataError(f"{what} needs OpenCV: pip install opencv-python-headless (a directory "
                        "of images works without it)") from None
    return cv2


class ImageDirSource:
    """Frames from the images of a directory, in file-name order; a corrupt image stops the run
    with a DataError naming it."""

    def __init__(self, directory):
        self.files = list_image_files(directory)
        self.fps = DEFAULT_FPS
        self.name = str(directory)
        self.inputs = [str(directory)]

    def __iter__(self):
        for path in self.files:
            yield path.name, load_image(path).permute(1, 2, 0).numpy()

    def close(self):
        pass


class VideoSource:
    """Frames of a video file, stream or camera through cv2.VideoCapture (BGR -> RGB)."""

    def __init__(self, target, name: str):
        cv2 = import_cv2(f"reading {name}")
        self._cv2 = cv2
        self.capture = cv2.VideoCapture(target)
        if not self.capture.isOpened():
            raise DataError(f"cannot open video source {name}: missing file, unsupported codec, "
                            "unreachable stream or busy camera")
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and fps > 0 else DEFAULT_FPS
        self.name = name
        self.inputs = [target] if isinstance(target, str) and Path(target).exists() else []

    def __iter__(self):
        index = 0
        while True:
            ok, frame = self.capture.read()
            if not ok:
                return
            yield f"frame_{index:06d}", self._cv2.cvtColor(frame, self._cv2.COLOR_BGR2RGB)
            index += 1

    def close(self):
        self.capture.release()


def open_source(spec: str):
    """A frame source for a directory, video file, stream URL or webcam (see module doc)."""
    text = str(spec)
    match = re.fullmatch(r"(?:webcam|camera)(?::(\d+))?|(\d+)", text)
    if match:
        index = int(match.group(1) or match.group(2) or 0)
        return VideoSource(index, f"webcam {index}")
    if text.lower().startswith(STREAM_PREFIXES):
        return VideoSource(text, text)
    path = Path(text)
    if path.is_dir():
        return ImageDirSource(path)
    if not path.exists():
        raise DataError(f"input not found: {text} (give a video file, a directory of images, an "
                        "rtsp:// URL or 'webcam')")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        # FFmpeg would "decode" almost anything (a text file renders as a picture of its text).
        raise DataError(f"input {text} is not a video file ({', '.join(VIDEO_SUFFIXES)}), a "
                        "directory of images, a stream URL or 'webcam'")
    return VideoSource(str(path), str(path))


class ImageDirSink:
    """Writes each frame into a directory under its name (an image file's name is kept, a video
    frame's name gets .png), atomically."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def write(self, name: str, frame: np.ndarray) -> None:
        path = self.directory / (name if Path(name).suffix else f"{name}.png")
        fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
        with atomic_output(path, "wb", what="annotated frame") as f:
            Image.fromarray(frame).save(f, format=fmt)
        self.count += 1

    def close(self):
        pass


class VideoSink:
    """Writes frames into a video file; opened at the first frame (its size fixes the video's)."""

    def __init__(self, path, fps: float):
        self.path = Path(path)
        self._cv2 = import_cv2(f"writing {self.path}")
        self.fps = float(fps)
        self.writer = None
        self.size = None
        self.count = 0

    def write(self, name: str, frame: np.ndarray) -> None:
        cv2 = self._cv2
        h, w = frame.shape[:2]
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fourcc = cv2.VideoWriter_fourcc(*FOURCC.get(self.path.suffix.lower(), "mp4v"))
            self.writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (w, h))
            if not self.writer.isOpened():
                raise DataError(f"cannot write video {self.path}: OpenCV has no encoder for "
                                f"{self.path.suffix}; try .avi, or an output directory")
            self.size = (h, w)
        elif (h, w) != self.size:
            frame = cv2.resize(frame, (self.size[1], self.size[0]))
        self.writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.count += 1

    def close(self):
        if self.writer is not None:
            self.writer.release()


def open_sink(output, fps: float = DEFAULT_FPS, inputs=()):
    """A video file sink for a video suffix, otherwise an image directory sink. inputs: what the
    run reads (the source's files): the output may not be one of them or lie inside one."""
    check_output_path(output, inputs, option="output")
    path = Path(output)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return VideoSink(path, fps)
    if path.suffix:
        raise DataError(f"output {output}: give a video file ({', '.join(VIDEO_SUFFIXES)}) or a "
                        "directory for annotated frames")
    return ImageDirSink(path)
