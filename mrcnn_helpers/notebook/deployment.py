"""Notebook views of export and deployment (notebooks 06 and 07): the exported graph's inputs and
outputs, PyTorch-vs-exported parity and AP side by side, INT8 calibration images, whether
TensorRT / OpenCV can be used here, a short test video, deploy statistics and annotated frames.

The work itself is done by mrcnn_helpers.export and mrcnn_helpers.deploy (the functions the CLI
calls); these helpers only arrange their results as Tables and Figures.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from mrcnn_helpers.deploy import ImageDirSource, VideoSink, open_source, percentiles
from mrcnn_helpers.export.verify import AP_KEYS, verify_export
from mrcnn_helpers.inference.metadata import ExportError
from mrcnn_helpers.inference.tensorrt import TensorRTUnavailable, import_tensorrt

from .plots import FIGURE_DPI, image_grid
from .tables import Table

# What each tensor of the two export layouts holds (graph.ExportableMaskRCNN's contract);
# B = batch, D = test_detections_per_image, C = classes incl. background, R = mrcnn_resolution.
TENSOR_MEANING = {
    "Input": "RGB image as resize_and_pad makes it (0..255, or DeepStream-normalized)",
    "generate_detections": "per detection: y1, x1, y2, x2, class, score (input pixels)",
    "mask_fcn_logits/BiasAdd": "mask logits of every class, R x R per detection",
    "boxes": "x1, y1, x2, y2 in input pixels",
    "scores": "detection score, rows sorted by score",
    "classes": "class label, 0 = padding row",
    "masks": "mask probability of the predicted class, R x R",
    "num_detections": "detections per image (rows past it are zero)",
}
TENSORRT_CHOICES = ("auto", True, False)


def onnx_io_table(path) -> Table:
    """The inputs and outputs of an ONNX file: kind, name, dtype, shape [dims], meaning.

    Read from the graph itself (not from the export metadata), so it shows what TensorRT,
    DeepStream and ONNX Runtime will see.
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    rows = []
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in tensor.shape.dim]
            dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
            rows.append([kind, value.name, dtype, "[" + ", ".join(map(str, dims)) + "]",
                         TENSOR_MEANING.get(value.name, "")])
    return Table(["kind", "name", "dtype", "shape", "meaning"], rows,
                 title=f"{Path(path).name}: {len(graph.node)} nodes, opset "
                       f"{max((o.version for o in proto.opset_import), default=0)}")


def parity_table(model, exported, images, name: str = "onnx") -> Table:
    """PyTorch `model` vs an exported backend (export.verify_export), image by image.

    images: uint8 [N, 3, H, W], already resize_and_pad'ed (export.verify.load_validation_images).
    One row per image: detections of each model, largest |difference| of boxes (input pixels),
    scores and mask probabilities over detections matched by order; a bold last row holds the
    maxima and the tolerances; the title says whether all are within them.
    """
    rows, ok, tolerances = [], True, ()
    for i in range(images.shape[0]):
        report = verify_export(model, exported, images[i:i + 1], batch_size=1)
        ok = ok and report.ok
        tolerances = (report.box_tolerance, report.score_tolerance, report.mask_tolerance)
        n_ref, n_test = (report.count_mismatches[0][1:] if report.count_mismatches
                         else (report.detections, report.detections))
        rows.append([i, n_ref, n_test, report.max_box_diff, report.max_score_diff,
                     report.max_mask_diff])
    if rows:
        maxima = [max(row[k] for row in rows) for k in (3, 4, 5)]
        rows.append(["max (tolerance)", sum(row[1] for row in rows), sum(row[2] for row in rows)]
                    + [f"{m:.3g} ({t:.3g})" for m, t in zip(maxima, tolerances, strict=True)])
    return Table(["image", "pytorch dets", f"{name} dets", "max |box| px", "max |score|",
                  "max |mask prob|"], rows, bold={len(rows) - 1},
                 title=f"PyTorch vs {name} on {images.shape[0]} validation images: "
                       + ("all within tolerance" if ok else "MISMATCH"))


def ap_table(results: dict, keys=None) -> Table:
    """COCO metrics of several models side by side (export.compare_ap's result): one row per
    metric, one column per model, then each other model's difference from the first."""
    names = list(results)
    keys = [k for k in (keys or AP_KEYS) if any(k in m for m in results.values())]
    rows = []
    for key in keys:
        values = [results[n].get(key) for n in names]
        base = values[0]
        deltas = [None if v is None or base is None else round(float(v) - float(base), 4)
                  for v in values[1:]]
        rows.append([key] + [None if v is None else round(float(v), 4) for v in values] + deltas)
    columns = ["metric"] + names + [f"{n} - {names[0]}" for n in names[1:]]
    images = next((int(m["eval_images"]) for m in results.values() if "eval_images" in m), None)
    return Table(columns, rows, title="COCO AP side by side"
                 + (f" ({images} validation images)" if images is not None else ""))


def show_calibration_image(batches, batch: int = 0, index: int = 0) -> Figure:
    """One image of INT8 calibration batch `batch` (export.CalibrationBatches) as TensorRT's
    calibrator receives it, turned back into pixels; the title names the file, the array shape
    and its value range."""
    meta = batches.meta
    array = next(b for i, b in enumerate(batches) if i == batch)[index]  # float32 [3, H, W]
    pixels = array if meta.normalize_in_graph else (
        array / meta.net_scale_factor + np.asarray(meta.offsets, np.float32)[:, None, None])
    image = np.clip(pixels.transpose(1, 2, 0), 0, 255).astype(np.uint8)
    path = batches.files[batch * batches.batch_size + index]
    title = (f"{Path(path).name}: float32 {list(array.shape)}, values "
             f"{array.min():.3g}..{array.max():.3g}")
    return image_grid([image], [title], cols=1, width=4.0)


def tensorrt_choice(choice="auto", engine_path=None) -> tuple[bool, str]:
    """Whether to build / run a TensorRT engine here, and why, for a notebook parameter.

    choice: "auto" (use it when TensorRT imports, a CUDA GPU is present and engine_path, if
    given, exists), True (required: raises TensorRTUnavailable / ExportError naming what is
    missing) or False. engine_path: an engine that must exist (to run one, not build it).
    Returns (use, message); the message says how to get TensorRT when it is absent.
    """
    if choice not in TENSORRT_CHOICES or not isinstance(choice, (str, bool)):
        raise ValueError(f"TensorRT choice {choice!r}: use one of \"auto\", True, False")
    if choice is False:
        return False, "TensorRT skipped (the parameter is False)."
    try:
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise TensorRTUnavailable(f"TensorRT {trt.__version__} is installed but no CUDA GPU "
                                      "is visible: engines are built and run on a GPU.")
        if engine_path is not None and not Path(engine_path).is_file():
            raise ExportError(f"no TensorRT engine at {engine_path}: build it in notebook 06 "
                              "(build_engine) or with `mrcnn export ... --engine`.")
    except ExportError as exc:  # TensorRTUnavailable is one
        if choice is True:
            raise
        return False, f"TensorRT is not used: {exc}"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}."


def opencv_available() -> bool:
    """True when OpenCV (cv2) can be imported: video files need it, image folders do not."""
    return importlib.util.find_spec("cv2") is not None


def write_video(image_dir, path, *, fps: float = 5.0, max_frames: int | None = None) -> Path:
    """A video file made of the images of a folder (file-name order), for trying the video path
    of the deploy pipeline; frames of another size are resized to the first one's. Needs
    OpenCV. Returns the path."""
    sink = VideoSink(path, fps=fps)
    try:
        for i, (name, frame) in enumerate(ImageDirSource(image_dir)):
            if max_frames is not None and i >= max_frames:
                break
            sink.write(name, frame)
    finally:
        sink.close()
    return Path(path)


def deploy_stats_table(runs: dict) -> Table:
    """deploy.DeployStats of several runs side by side: {run name: stats} -> one row per run with
    frames, FPS, frame latency p50 / p90 (decode to written, ms), inference ms per batch (p50),
    detections drawn and the busiest thread (what to speed up first) with its ms per frame."""
    rows = []
    for name, stats in runs.items():
        latency, infer = percentiles(stats.frame_latency_ms), percentiles(stats.infer_latency_ms)
        thread, ms = stats.busiest_thread()
        rows.append([name, stats.backend, stats.batch_size, stats.frames, round(stats.fps, 2),
                     round(latency["p50"], 1), round(latency["p90"], 1), round(infer["p50"], 1),
                     stats.detections, f"{thread} {ms:.1f} ms" if ms else ""])
    return Table(["run", "backend", "batch", "frames", "FPS", "latency p50 ms", "latency p90 ms",
                  "infer ms/batch p50", "detections", "busiest thread"], rows,
                 title="Deploy throughput and latency")


def show_frames(source, num_frames: int = 4, cols: int = 4) -> Figure:
    """The first frames of a deploy output or input (a folder of images or a video file, as
    deploy.open_source reads it) in a grid, titled by frame name."""
    frames = open_source(str(source))
    try:
        shown = []
        for name, frame in frames:
            if len(shown) >= num_frames:
                break
            shown.append((name, frame))
    finally:
        frames.close()
    return image_grid([frame for _, frame in shown], [name for name, _ in shown], cols=cols)


def accuracy_table(table) -> Table:
    """export.accuracy's table of every precision (what `mrcnn export` prints) as a Table."""
    rows = [[r.name, r.box_ap, r.mask_ap, r.mask_ap50,
             "ref" if r.max_box_dev is None else round(r.max_box_dev, 3),
             "ref" if r.count_diffs is None else r.count_diffs, round(r.images_per_sec, 1)]
            for r in table.rows]
    return Table(["variant", "box AP", "mask AP", "mask AP50", "max box dev px", "count diffs",
                  "img/s"], rows, title=f"Accuracy of every precision on {table.eval_images} "
                                        "validation images" + "".join(
                                            f"; WARNING: {w}" for w in table.warnings))


def plot_per_class_precision(table, key: str = "mask_AP") -> Figure:
    """Per-class AP (mask AP by default) of each precision of export.accuracy's table, grouped
    bars: where a class loses accuracy after FP16 / INT8 export."""
    rows = [r for r in table.rows if r.per_class]
    classes = list(rows[0].per_class) if rows else []
    fig = Figure(figsize=(max(6.0, 1.2 * len(classes) + 2), 4.0), dpi=FIGURE_DPI)
    ax = fig.subplots()
    width = 0.8 / max(1, len(rows))
    for k, row in enumerate(rows):
        values = [row.per_class[c].get(key) or 0.0 for c in classes]
        ax.bar(np.arange(len(classes)) + k * width, values, width, label=row.name)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, fontsize=11)
    ax.set_ylabel(key.replace("_", " "), fontsize=11)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=10)
    ax.set_title(f"Per-class {key.replace('_', ' ')} by precision", fontsize=12)
    fig.tight_layout()
    return fig
