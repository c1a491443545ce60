"""INT8 calibration: the images, the activation ranges measured on them, and their cache file.

Calibration images go through exactly the preprocessing of training and evaluation: the
dataset's image reader (`load_image`), `resize_and_pad` to the exported image size, then the
normalization the exported graph expects (`normalize_input`). `collect_ranges` runs the ONNX
graph on them in ONNX Runtime (CPU, or CUDA where its provider is installed), reading the
tensors that are to be quantized as extra outputs, and turns what it saw into one `amax` per
tensor (the symmetric int8 range [-amax, amax], scale = amax / 127):

- "max": the largest |value| seen (no clipping; outliers widen the range);
- "percentile": the `percentile`-th percentile of |value| (99.99 by default);
- "entropy": the threshold whose 128-level quantization of the |value| histogram loses the
  least information (smallest KL divergence), the method of TensorRT's entropy calibrator.

The default is "max", chosen by measurement (docs/EXPORT.md, ONNX Runtime, mask AP against
PyTorch fp32): on the demo ResNet-10 max -0.12 points, percentile -0.34, entropy -2.96; on a
ResNet-50 trained on the H200 max +0.16, percentile -0.71 (entropy -0.27 on an earlier run of
the same spec). Entropy, TensorRT's and Model Optimizer's default, clips this model's
activations too tightly on the small model; per-tensor max keeps both within 1 point.

TLT's flags map as: --cal-image-dir DIR, --batches N, --cal-batch-size B (must equal the
graph's fixed batch), --cal-cache-file FILE. The cache is JSON: {tensor name: amax} plus the
fingerprint of the graph it was measured on and the method; a cache that fits the graph and
method is reused without reading an image, one for another graph is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from mrcnn_helpers.data.images import list_image_files, load_image
from mrcnn_helpers.data.transforms import resize_and_pad
from mrcnn_helpers.errors import DataError
from mrcnn_helpers.fileio import atomic_write_json
from mrcnn_helpers.inference.metadata import ExportError, ExportMetadata, normalize_input

METHODS = ("entropy", "percentile", "max")
DEFAULT_PERCENTILE = 99.99
CACHE_FORMAT = "mrcnn-int8-calibration"
CACHE_VERSION = 1
HISTOGRAM_BINS = 2048  # as TensorRT's entropy calibrator
QUANTIZED_BINS = 128  # int8 levels on one side of zero


class CalibrationError(ExportError):
    """Calibration images or cache cannot be used as given."""


class CalibrationBatches:
    """Iterable of `batches` float32 arrays [batch_size, 3, H, W] from the images of a directory.

    Images are taken in sorted file-name order (deterministic); the directory must hold at least
    batches * batch_size images (TLT's rule). Each pass re-reads the files.
    """

    def __init__(self, image_dir, meta: ExportMetadata, *, batch_size: int, batches: int):
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
        padded, _ = resize_and_pad(load_image(str(path)), self.meta.image_size)
        return normalize_input(padded.numpy()[None], self.meta)[0]

    def __iter__(self):
        for b in range(self.batches):
            chunk = self.files[b * self.batch_size:(b + 1) * self.batch_size]
            yield np.ascontiguousarray(np.stack([self.load(p) for p in chunk]))


# ---------------------------------------------------------------- ranges
class RangeCollector:
    """Running statistics of |x| for one tensor: the maximum and a histogram over [0, max].

    The histogram keeps HISTOGRAM_BINS bins over [0, top]; when a batch exceeds `top`, the
    counts so far are spread over the wider range (linear within a bin), as calibrators do.
    """

    def __init__(self, bins: int = HISTOGRAM_BINS):
        self.bins = int(bins)
        self.top = 0.0
        self.counts = np.zeros(self.bins, np.float64)

    def update(self, values: np.ndarray) -> None:
        magnitude = np.abs(np.asarray(values, np.float32)).ravel()
        magnitude = magnitude[np.isfinite(magnitude)]
        if magnitude.size == 0:
            return
        peak = float(magnitude.max())
        if peak > self.top:
            if self.counts.any():
                old_edges = np.linspace(0.0, self.top, self.bins + 1)
                cumulative = np.concatenate(([0.0], np.cumsum(self.counts)))
                new_edges = np.linspace(0.0, peak, self.bins + 1)
                self.counts = np.diff(np.interp(new_edges, old_edges, cumulative))
            self.top = peak
        if self.top > 0:
            self.counts += np.histogram(magnitude, bins=self.bins, range=(0.0, self.top))[0]
        else:
            self.counts[0] += magnitude.size

    def amax(self, method: str, percentile: float = DEFAULT_PERCENTILE) -> float:
        """The range [-amax, amax] by `method` (see the module docstring); 0 for all-zero data."""
        if self.top <= 0:
            return 0.0
        if method == "max":
            return self.top
        width = self.top / self.bins
        if method == "percentile":
            cumulative = np.cumsum(self.counts) / self.counts.sum()
            index = int(np.searchsorted(cumulative, float(percentile) / 100.0))
            return min(self.top, (index + 1) * width)
        return _entropy_threshold_bins(self.counts) * width


def _smooth(distribution: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Move a little mass onto the empty bins so that KL(p || q) stays finite."""
    zero = distribution == 0
    n_zero, n_nonzero = int(zero.sum()), int((~zero).sum())
    if n_nonzero == 0 or n_zero == 0:
        return distribution
    taken = eps * n_zero / n_nonzero
    return np.where(zero, eps, distribution - taken)


def _entropy_threshold_bins(counts: np.ndarray, levels: int = QUANTIZED_BINS) -> int:
    """The number of histogram bins i whose clipping at i minimises KL(reference || quantized).

    For each candidate i (from `levels` bins up): the reference P is the first i bins with all
    counts above folded into the last one; the candidate Q quantizes those i bins into `levels`
    groups and spreads each group's count evenly over its non-empty bins. This follows
    TensorRT's entropy calibration (Migacz, "8-bit inference with TensorRT", 2017). Bin 0 is
    given bin 1's count first: after a ReLU most values are exactly 0, and that spike would
    otherwise dominate the divergence and pull the threshold far down.
    """
    bins = len(counts)
    if bins <= levels:
        return bins
    counts = counts.astype(np.float64).copy()
    counts[0] = counts[1]
    best_kl, best = np.inf, bins
    for i in range(levels, bins + 1):
        head = counts[:i]
        reference = head.copy()
        reference[-1] += counts[i:].sum()
        if reference.sum() == 0:
            continue
        group = (np.arange(i) * levels) // i
        occupied = head > 0
        group_sum = np.bincount(group, weights=head, minlength=levels)
        group_size = np.bincount(group, weights=occupied, minlength=levels)
        candidate = np.where(occupied, group_sum[group] / np.maximum(group_size[group], 1), 0.0)
        if candidate.sum() == 0:
            continue
        p = _smooth(reference / reference.sum())
        q = _smooth(candidate / candidate.sum())
        keep = p > 0
        kl = float(np.sum(p[keep] * np.log(p[keep] / np.maximum(q[keep], 1e-12))))
        if kl < best_kl:
            best_kl, best = kl, i
    return best


def check_method(method: str, percentile: float = DEFAULT_PERCENTILE) -> None:
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r} (--cal-method); valid: "
                               f"{', '.join(METHODS)}")
    if method == "percentile" and not 50.0 < float(percentile) <= 100.0:
        raise CalibrationError(f"percentile {percentile} must be in (50, 100] "
                               "(--cal-percentile, e.g. 99.99)")


def collect_ranges(model_proto, tensors, batches, *, method: str = "max",
                   percentile: float = DEFAULT_PERCENTILE, input_name: str = "Input",
                   threads: int | None = None) -> tuple[dict[str, float], int]:
    """Run `model_proto` in ONNX Runtime on every batch and return ({tensor: amax}, images).

    tensors: names of float tensors of the graph whose ranges are wanted (they are added to the
    graph's outputs for this run only). batches: iterable of float32 arrays in the graph's input
    layout. Raises CalibrationError when `batches` yields nothing.
    """
    import onnx
    import onnxruntime as ort

    check_method(method, percentile)
    probe = onnx.ModelProto()
    probe.CopyFrom(model_proto)
    present = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in ort.get_available_providers()]
    session = ort.InferenceSession(probe.SerializeToString(), sess_options=options,
                                   providers=providers)
    collectors = {name: RangeCollector() for name in tensors}
    images = 0
    for batch in batches:
        values = session.run(list(tensors), {input_name: np.ascontiguousarray(batch, np.float32)})
        for name, value in zip(tensors, values, strict=True):
            collectors[name].update(value)
        images += int(batch.shape[0])
    if images == 0:
        raise CalibrationError("no calibration batches: pass --cal-image-dir with images like "
                               "the deployment's (and --batches >= 1)")
    return {name: c.amax(method, percentile) for name, c in collectors.items()}, images


# ---------------------------------------------------------------- the cache
def graph_fingerprint(model_proto) -> str:
    """sha256 of the graph (nodes, weights, inputs, outputs), not of the file's metadata."""
    return hashlib.sha256(model_proto.graph.SerializeToString()).hexdigest()


class CalibrationCache:
    """The --cal-cache-file: {tensor name: amax} for one graph and calibration method.

    read() returns None when there is nothing to reuse (no path, no file, an empty file left by
    a killed run) and raises CalibrationError for a file that cannot be reused as asked (another
    graph, another method, a TensorRT implicit-quantization cache, unreadable JSON). write() is
    atomic, so a reader never sees half a cache.
    """

    def __init__(self, path):
        self.path = Path(path) if path else None

    def read(self, *, graph: str, method: str, percentile: float = DEFAULT_PERCENTILE
             ) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        data = self.path.read_bytes()
        if not data.strip():
            return None
        if data.lstrip().startswith(b"TRT-"):
            raise CalibrationError(
                f"{self.path} is a TensorRT implicit-quantization calibration cache; TensorRT 10+ "
                "builds INT8 from the Q/DQ nodes in the ONNX file instead, calibrated here: pass "
                "a new --cal-cache-file (or delete this one)")
        try:
            entry = json.loads(data)
            amax = {str(k): float(v) for k, v in entry["amax"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CalibrationError(f"{self.path} is not a calibration cache written by this "
                                   f"toolkit ({exc}); pass another --cal-cache-file") from None
        if entry.get("format") != CACHE_FORMAT:
            raise CalibrationError(f"{self.path} is not a {CACHE_FORMAT} cache; pass another "
                                   "--cal-cache-file")
        if entry.get("graph") != graph:
            raise CalibrationError(
                f"{self.path} was calibrated on another graph (fingerprint "
                f"{str(entry.get('graph'))[:12]}, this graph {graph[:12]}; source "
                f"{entry.get('onnx', '?')}): re-exported or retrained models need new ranges; "
                "pass a new --cal-cache-file with --cal-image-dir")
        wanted = (method, float(percentile) if method == "percentile" else None)
        stored = (entry.get("method"), entry.get("percentile"))
        if stored != wanted:
            raise CalibrationError(
                f"{self.path} holds {stored[0]} ranges"
                + (f" (percentile {stored[1]})" if stored[1] is not None else "")
                + f", but --cal-method {method} was asked: use --cal-method {stored[0]} to reuse "
                "it, or a new --cal-cache-file")
        return dict(entry, amax=amax)

    def write(self, *, graph: str, method: str, percentile: float, amax: dict, images: int,
              batch_size: int, source: str = "") -> None:
        if self.path is None:
            return
        atomic_write_json(self.path, {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "graph": graph, "onnx": source,
            "method": method, "percentile": float(percentile) if method == "percentile" else None,
            "images": int(images), "batch_size": int(batch_size),
            "amax": {k: float(v) for k, v in sorted(amax.items())}},
            error=CalibrationError, what="calibration cache")
