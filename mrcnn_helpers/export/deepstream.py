"""DeepStream configuration for an exported model: nvinfer config, labels, deepstream-app config.

nvinfer builds the TensorRT engine from the ONNX file itself (or loads `model-engine-file`),
feeds it `net-scale-factor * (pixel - offsets[c])` RGB (model-color-format=0), letterboxed to the
network size with the image at the top-left (maintain-aspect-ratio=1, symmetric-padding=0, as
resize_and_pad does), and parses the two DeepStream-layout outputs with
NvDsInferParseCustomMrcnnTLTV2: `generate_detections` [B, D, 6] (y1, x1, y2, x2, class, score in
network pixels) and `mask_fcn_logits/BiasAdd` [B, D, C, R, R], from which it picks each
detection's mask with a stride of num-detected-classes (so that must be C, incl. background).

Precision follows the ONNX file (see export.precision): network-mode 0 for the fp32 graph, 2
for the fp16 graph, 1 for the INT8 Q/DQ graph. No int8-calib-file is written: the INT8 scales
are the graph's Q/DQ nodes (TensorRT 10+ explicit quantization), so there is no calibration
cache to point at. When nvinfer builds the engine itself it makes a weakly typed network, in
which TensorRT may also run the graph's float32 parts (box decoding, NMS inputs) in FP16; an
engine built by export.tensorrt.build_engine is strongly typed and keeps the graph's types, so
pointing model-engine-file at it is the way to deploy exactly what was measured.
"""

from __future__ import annotations

import os
from pathlib import Path

from mrcnn_helpers.fileio import atomic_write
from mrcnn_helpers.inference.metadata import ExportError, ExportMetadata

from .graph import DEEPSTREAM_OUTPUTS
from .tensorrt import check_data_type, how_to_make, network_mode

PARSER_FUNCTION = "NvDsInferParseCustomMrcnnTLTV2"
# The SDK's parser library; deepstream_tao_apps builds the same function into
# post_processor/libnvds_infercustomparser_tao.so, if the installed SDK's lacks it.
DEFAULT_CUSTOM_LIB = "/opt/nvidia/deepstream/deepstream/lib/libnvds_infercustomparser.so"
INFER_CONFIG = "config_infer_primary_mrcnn.txt"
APP_CONFIG = "deepstream_app_source1_mrcnn.txt"
LABELS_FILE = "labels.txt"


def _relative(path, directory: Path) -> str:
    """Paths in DeepStream configs are resolved against the config file's directory."""
    return os.path.relpath(Path(path).resolve(), directory.resolve())


def _format_number(value: float) -> str:
    return f"{float(value):.6g}"


def graph_precision_of(meta: ExportMetadata) -> str:
    """The precision recorded in the export metadata (fp32 when none was recorded)."""
    return str(meta.extra.get("precision", "fp32"))


def resolve_data_type(meta: ExportMetadata, data_type: str | None) -> str:
    """The config's precision: the graph's, or `data_type` where nvinfer can build it.

    fp16 from an fp32 graph stays possible (TensorRT 10's weakly typed FP16, which nvinfer
    still uses); int8 needs the Q/DQ graph and an fp16 or int8 graph is not built as fp32.
    """
    precision = graph_precision_of(meta)
    if data_type is None:
        return precision
    check_data_type(data_type)
    if data_type != precision and not (data_type == "fp16" and precision == "fp32"):
        raise ExportError(f"an {data_type.upper()} DeepStream config needs the {data_type} graph, "
                          f"but this is the {precision} graph: write it with "
                          f"{how_to_make(data_type)} and configure DeepStream with that file")
    return data_type


def _precision_lines(data_type: str, precision: str) -> list[str]:
    """network-mode and why, for a config of `data_type` over a graph of `precision`."""
    lines = ["# 0 = FP32, 1 = INT8, 2 = FP16"]
    if data_type == "int8":
        lines += ["# INT8 from the Q/DQ nodes of the ONNX file (explicit quantization): no",
                  "# int8-calib-file; layers without Q/DQ run in higher precision"]
    elif precision == "fp16":
        lines += ["# FP16 from the ONNX file's float16 layers; its box decoding stays FP32 in",
                  "# an engine built by `mrcnn export --engine` (strongly typed)"]
    elif data_type == "fp16":
        lines += ["# FP16 chosen by TensorRT from this fp32 graph (weakly typed, TensorRT 10);",
                  "# TensorRT 11 builds what the graph says: use the fp16 graph there"]
    return lines + [f"network-mode={network_mode(data_type)}"]


def infer_config_lines(meta: ExportMetadata, onnx_file: str, *, engine_file: str,
                       labels_file: str, data_type: str, custom_lib: str,
                       threshold: float) -> list[str]:
    """The nvinfer [property] / [class-attrs-all] lines for this export (paths as given)."""
    if meta.layout != "deepstream":
        raise ExportError(f"DeepStream needs the 'deepstream' output layout; this model was "
                          f"exported with {meta.layout!r} (re-export with --layout deepstream)")
    h, w = meta.image_size
    scale = 1.0 if meta.normalize_in_graph else meta.net_scale_factor
    lines = ["[property]", "gpu-id=0", f"net-scale-factor={_format_number(scale)}"]
    if not meta.normalize_in_graph:
        lines.append("offsets=" + ";".join(_format_number(v) for v in meta.offsets))
    lines += [
        "# 0 = RGB: the model was trained on RGB",
        "model-color-format=0",
        f"onnx-file={onnx_file}",
        f"model-engine-file={engine_file}",
        f"labelfile-path={labels_file}",
    ]
    lines += [f"infer-dims=3;{h};{w}", f"batch-size={meta.batch_size}"]
    lines += _precision_lines(data_type, graph_precision_of(meta))
    lines += [
        f"num-detected-classes={meta.num_classes}",
        "interval=0",
        "gie-unique-id=1",
        "# 3 = instance segmentation",
        "network-type=3",
        "output-instance-mask=1",
        "# 4 = no clustering: the model runs its own NMS",
        "cluster-mode=4",
        "# letterbox like training: keep the aspect ratio, image at the top-left",
        "maintain-aspect-ratio=1",
        "symmetric-padding=0",
        "output-blob-names=" + ";".join(DEEPSTREAM_OUTPUTS),
        f"parse-bbox-instance-mask-func-name={PARSER_FUNCTION}",
        f"custom-lib-path={custom_lib}",
        "",
        "[class-attrs-all]",
        f"pre-cluster-threshold={_format_number(threshold)}",
        "",
    ]
    return lines


def app_config_lines(meta: ExportMetadata, infer_config: str, *, video_uri: str,
                     output_file: str) -> list[str]:
    """deepstream-app config: one file source -> nvinfer -> OSD with masks -> an MP4 file."""
    h, w = meta.image_size
    return [
        "[application]", "enable-perf-measurement=1", "perf-measurement-interval-sec=5", "",
        "[tiled-display]", "enable=1", "rows=1", "columns=1", f"width={w}", f"height={h}", "",
        "[source0]", "enable=1", "# 3 = URI source", "type=3", f"uri={video_uri}",
        "num-sources=1", "gpu-id=0", "",
        "[streammux]", "gpu-id=0", "live-source=0", f"batch-size={meta.batch_size}",
        "batched-push-timeout=40000", f"width={w}", f"height={h}", "",
        "[primary-gie]", "enable=1", "gpu-id=0", f"batch-size={meta.batch_size}",
        "gie-unique-id=1", "interval=0", f"config-file={infer_config}", "",
        "[osd]", "enable=1", "gpu-id=0", "border-width=3", "text-size=15",
        "display-mask=1", "display-bbox=1", "display-text=1", "",
        "# 3 = file; container 1 = mp4; codec 1 = H.264",
        "[sink0]", "enable=1", "type=3", "container=1", "codec=1", "sync=0",
        "bitrate=4000000", f"output-file={output_file}", "",
        "[tests]", "file-loop=0", "",
    ]


def write_deepstream_configs(directory, meta: ExportMetadata, onnx_path, *, engine_path=None,
                             data_type: str | None = None, calib_file=None,
                             custom_lib: str = DEFAULT_CUSTOM_LIB, threshold: float = 0.5,
                             video_uri: str = "file:///opt/nvidia/deepstream/deepstream/samples/"
                                              "streams/sample_720p.mp4",
                             output_file: str = "out_mrcnn.mp4") -> dict:
    """Write the nvinfer config, labels file and deepstream-app config into `directory`.

    meta: the ExportMetadata of the ONNX file at `onnx_path` (its extra.precision says which
    graph it is). data_type: None = the graph's precision (see resolve_data_type).
    engine_path None = the file name nvinfer gives the engine it builds from the ONNX
    (`<onnx>_b<B>_gpu0_<type>.engine`, next to the ONNX file). calib_file: refused (INT8 comes
    from the Q/DQ graph; kept as a parameter so old callers get this explanation).
    Returns {"infer_config", "app_config", "labels"} paths.
    """
    if calib_file:
        raise ExportError(f"int8-calib-file {calib_file} is not used any more: INT8 comes from "
                          "the Q/DQ nodes of the ONNX file (quantize_int8); pass that file")
    data_type = resolve_data_type(meta, data_type)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = Path(onnx_path)
    if engine_path is None:
        engine_path = onnx_path.with_name(
            f"{onnx_path.name}_b{meta.batch_size}_gpu0_{data_type}.engine")
    names = list(meta.class_names) or ["background"] + [f"class_{i}"
                                                        for i in range(1, meta.num_classes)]
    labels = directory / LABELS_FILE
    # One label per class id, line 0 = background (the parser reports contiguous labels).
    atomic_write(labels, "\n".join(names) + "\n", error=ExportError, what="labels file")
    infer = directory / INFER_CONFIG
    lines = infer_config_lines(
        meta, _relative(onnx_path, directory), engine_file=_relative(engine_path, directory),
        labels_file=LABELS_FILE, data_type=data_type, custom_lib=custom_lib,
        threshold=threshold)
    atomic_write(infer, "\n".join(lines), error=ExportError, what="nvinfer config")
    app = directory / APP_CONFIG
    atomic_write(app, "\n".join(app_config_lines(meta, INFER_CONFIG, video_uri=video_uri,
                                                 output_file=output_file)),
                 error=ExportError, what="deepstream-app config")
    return {"infer_config": str(infer), "app_config": str(app), "labels": str(labels)}


def read_config(path) -> dict:
    """A DeepStream key=value config as {section: {key: value}} (comments and blanks skipped)."""
    sections, current = {}, None
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None or "=" not in line:
            raise ExportError(f"{path}: cannot read line {raw!r}")
        key, value = line.split("=", 1)
        current[key.strip()] = value.strip()
    return sections
