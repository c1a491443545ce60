"""OpenCV's VideoWriter in a process of its own, fed through shared memory.

Encoding a 1344x832 frame as mp4v takes 5.6-7.4 ms of one core on the H200 machine; in the
deploy pipeline's writer thread it took twice as long, waiting for the GIL that the drawing and
inference threads hold between their C calls, and that thread bound the pipeline's frame rate.
Here the encoder is a child process (`python -m mrcnn_helpers.video_writer`: a plain
subprocess, so it never re-runs the caller's script as multiprocessing's spawn would, and it
imports only numpy and OpenCV). Frames travel through a ring of slots in a memory-mapped file
under /dev/shm, one copy each, unlinked as soon as both processes have mapped it (nothing is
left behind, even after a crash); slot numbers and replies are lines on the child's stdin and
stdout.

The child ignores Ctrl-C: the parent decides what an interrupted run keeps (deploy.io.VideoSink
publishes the frames written). A child that dies, hangs or reports an error makes the parent's
next call raise DataError naming the video.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from mrcnn_helpers.errors import DataError

SLOTS = 8  # frames in flight between the parent and the encoder
SHM_DIR = "/dev/shm"
_TIMEOUT_S = 60.0  # an encoder that answers nothing for this long is taken as hung


def available() -> bool:
    """Whether frames can be shared with a child process here (Linux's /dev/shm)."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def _map(path: str, size: int, slots: int, height: int, width: int):
    fd = os.open(path, os.O_RDWR)
    try:
        buffer = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return buffer, np.ndarray((slots, height, width, 3), np.uint8, buffer=buffer)


def _child() -> int:
    """The encoder: open the writer the parent names, write the slots it sends, reply."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import cv2

    def reply(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    try:
        args = json.loads(sys.stdin.readline())
        size = args["slots"] * args["height"] * args["width"] * 3
        _, frames = _map(args["shm"], size, args["slots"], args["height"], args["width"])
        writer = cv2.VideoWriter(args["path"], cv2.VideoWriter_fourcc(*args["fourcc"]),
                                 args["fps"], (args["width"], args["height"]))
        reply(f"opened {int(writer.isOpened())}")
        for line in sys.stdin:
            if line.strip() == "close":
                break
            slot = int(line)
            writer.write(frames[slot])
            reply(f"done {slot}")
        writer.release()
        reply("closed")
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        with contextlib.suppress(OSError):  # unless the parent is gone
            reply(f"error {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return 1


class ProcessVideoWriter:
    """cv2.VideoWriter's open / write / release, run by a child process.

    Started at construction (the child imports OpenCV while the caller gets ready); `open(path,
    fourcc, fps, height, width)` says whether OpenCV could open the file, `write(frame)` copies
    a BGR uint8 [height, width, 3] frame into a free slot and returns at once, `release()`
    waits until every frame is written, `kill()` stops the child without waiting.
    """

    def __init__(self, name: str = "video"):
        self.name = name
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([package_root, env.get("PYTHONPATH", "")])
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mrcnn_helpers.video_writer"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, bufsize=0)
        self._pending = b""
        self._map = self._frames = None
        self._free: list[int] = []

    def _stopped(self, detail: str = "") -> DataError:
        self.kill()
        return DataError(f"the encoder of {self.name} stopped{detail}; the video was not written")

    def _receive(self) -> tuple[str, str]:
        """The child's next reply line as (word, rest)."""
        waited = 0.0
        while b"\n" not in self._pending:
            ready, _, _ = select.select([self._process.stdout], [], [], 1.0)
            if not ready:
                waited += 1.0
                if self._process.poll() is not None or waited >= _TIMEOUT_S:
                    raise self._stopped(f" (exit code {self._process.poll()})")
                continue
            chunk = os.read(self._process.stdout.fileno(), 4096)
            if not chunk:
                raise self._stopped(f" (exit code {self._process.wait(timeout=5.0)})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        word, _, rest = line.decode(errors="replace").partition(" ")
        if word == "error":
            self.kill()
            raise DataError(f"could not write {self.name}: {rest}")
        return word, rest

    def _send(self, text: str) -> None:
        try:
            self._process.stdin.write(text.encode() + b"\n")
        except OSError:
            raise self._stopped(f" (exit code {self._process.poll()})") from None

    def open(self, path, fourcc: str, fps: float, height: int, width: int) -> bool:
        size = SLOTS * height * width * 3
        fd, shm = tempfile.mkstemp(prefix="mrcnn-frames-", dir=SHM_DIR)
        try:
            try:
                # Reserved now: a /dev/shm too small (Docker's default is 64 MB) fails here with
                # ENOSPC, not later with SIGBUS when a frame is copied in.
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                self.kill()
                raise DataError(f"no room for {SLOTS} frames of {width}x{height} in {SHM_DIR} "
                                f"({exc.strerror})") from None
            finally:
                os.close(fd)
            self._map, self._frames = _map(shm, size, SLOTS, height, width)
            self._send(json.dumps({"shm": shm, "slots": SLOTS, "height": height,
                                   "width": width, "path": str(path), "fourcc": fourcc,
                                   "fps": float(fps)}))
            word, opened = self._receive()  # the child has mapped the file by now
        finally:
            with contextlib.suppress(OSError):
                os.unlink(shm)
        self._free = list(range(SLOTS))[::-1]
        return word == "opened" and opened == "1"

    def write(self, frame: np.ndarray) -> None:
        if not self._free:
            _, slot = self._receive()
            self._free.append(int(slot))
        slot = self._free.pop()
        np.copyto(self._frames[slot], frame)
        self._send(str(slot))

    def release(self) -> None:
        """Wait for every frame sent to be written and the file closed; stop the child."""
        if self._process.poll() is None and self._frames is not None:
            self._send("close")
            while self._receive()[0] != "closed":
                pass
        self.kill()

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait(timeout=5.0)
        for stream in (self._process.stdin, self._process.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        self._frames = None
        if self._map is not None:
            self._map.close()
            self._map = None


if __name__ == "__main__":
    sys.exit(_child())
