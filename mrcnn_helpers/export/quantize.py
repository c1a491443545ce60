"""INT8 by explicit quantization: QuantizeLinear/DequantizeLinear (Q/DQ) nodes in the ONNX graph.

TensorRT 10 deprecated and TensorRT 11 removed implicit quantization (BuilderFlag.INT8 with a
calibrator); an INT8 engine is now built from a graph that says where int8 is used. This module
writes that graph from an fp32 export:

- symmetric int8 (zero point 0, scale = amax / 127); weights per output channel (max of |w|),
  stored as int8 initializers read through DequantizeLinear; activations per tensor, their amax
  measured on calibration images (calibration.collect_ranges: entropy, percentile or max);
- Q/DQ on the data inputs of Conv / Gemm / MatMul, and on the residual input of an Add that
  follows a convolution (the skip connection of a ResNet block, the upsampled top-down path of
  the FPN): TensorRT fuses Q/DQ -> Conv -> Add(+Q/DQ residual) -> ReLU into one int8 kernel, as
  its explicit-quantization placement guide recommends; outputs of the weighted layers are not
  quantized (the next layer's input Q/DQ does it where one follows);
- kept in float: RoiAlign, NonMaxSuppression, TopK and every node that depends on them (box
  decoding, the box and mask heads after RoiAlign, the output assembly), and any node excluded
  with `exclude` (--int8-exclude). A tensor read both by a quantized layer and by a float one
  (an FPN level feeds the RPN head and RoiAlign) gets the Q/DQ pair on the quantized edge only.

Why ONNX Runtime's calibration machinery and a pass of our own, and not a quantizer package:
ONNX Runtime (already a dependency, CPU) runs the graph to collect the ranges and then runs the
Q/DQ graph, so the int8 model's accuracy is measured on any machine. Its `quantize_static` was
not used for the placement because it quantizes outputs of every quantized op (the RPN logits
feeding TopK would be int8), puts int32 Q/DQ on biases (which TensorRT's int8 convolutions take
in float) and Q/DQ on both inputs of every Add, and it cannot reuse a range cache without
reading images. NVIDIA Model Optimizer (`nvidia-modelopt`, NVIDIA's recommendation) was checked
on the development machine (torch 2.14.1 CPU): `pip install nvidia-modelopt[onnx]` 0.47 would
downgrade onnx 1.23 -> 1.21 and install onnxruntime-gpu 1.24 next to onnxruntime 1.32 (two
packages owning one module), plus cupy-cuda12x and polygraphy. Its output is a Q/DQ ONNX model
too, so a graph made with it builds with build_engine in the same way; it is not needed here.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mrcnn_helpers.fileio import check_output_path
from mrcnn_helpers.inference.metadata import ExportError, read_onnx_metadata

from .calibration import (
    DEFAULT_PERCENTILE,
    CalibrationCache,
    CalibrationError,
    check_method,
    collect_ranges,
    graph_fingerprint,
)
from .precision import (
    downstream_of,
    ensure_node_names,
    graph_precision,
    load_export,
    save_export,
    set_precision_metadata,
)

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# Never below this amax: a scale of 0 is invalid, and a tensor that was 0 on every calibration
# image is reported instead (QuantizeReport.zero_range).
MIN_AMAX = 1e-8


@dataclass
class QuantPlan:
    """Where Q/DQ goes: activation edges (tensor, node name, input index), weights
    (initializer, axis, node name, input index), and the nodes involved."""

    activations: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    layers: list = field(default_factory=list)  # quantized Conv/Gemm/MatMul node names
    adds: list = field(default_factory=list)  # Adds whose residual input is quantized
    excluded: list = field(default_factory=list)
    float_nodes: int = 0  # RoiAlign, NMS, TopK and the nodes depending on them

    @property
    def tensors(self) -> list[str]:
        return sorted({t for t, _, _ in self.activations})


@dataclass
class QuantizeReport:
    """What quantize_int8 did."""

    output: str
    method: str
    percentile: float | None
    images: int
    cache_file: str | None
    cache_reused: bool
    layers: list
    adds: list
    excluded: list
    float_nodes: int
    zero_range: list

    def summary(self) -> str:
        source = ("ranges from the cache " + str(self.cache_file) if self.cache_reused
                  else f"calibrated on {self.images} images")
        text = (f"INT8 Q/DQ graph {self.output}: {len(self.layers)} layers and {len(self.adds)} "
                f"residual adds in int8, {self.float_nodes} nodes of RoiAlign, NMS, TopK and "
                f"after them in float"
                + (f", {len(self.excluded)} excluded" if self.excluded else "") + "; "
                f"{self.method} {source}")
        if self.zero_range:
            text += (f"; {len(self.zero_range)} tensors were 0 on every calibration image "
                     f"(e.g. {self.zero_range[0]}): calibrate on images like the deployment's")
        return text


def _weight_axis(node, initializer) -> int:
    """The output-channel axis of a weighted node's weight (per-channel scales run along it)."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return len(initializer.dims) - 1
    return 0  # Conv: [out, in / groups, kh, kw]


def plan_quantization(graph, exclude=()) -> QuantPlan:
    """The Q/DQ placement for `graph` (module docstring); `exclude`: node-name patterns.

    Raises ExportError for a pattern that matches no node that would be quantized.
    """
    initializers = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    kept_float = downstream_of(graph)
    depth: dict[str, int] = {}
    for node in graph.node:
        depth[node.name] = 1 + max((depth.get(producer[i].name, 0) for i in node.input
                                    if i in producer), default=0)
    patterns = [str(p) for p in exclude]
    matched = set()

    def excluded(node) -> bool:
        hits = [p for p in patterns if fnmatch.fnmatchcase(node.name, p)]
        matched.update(hits)
        return bool(hits)

    plan = QuantPlan(float_nodes=len(kept_float))
    for node in graph.node:
        if node.name in kept_float or node.op_type not in WEIGHTED_OPS + ("Add",):
            continue
        if node.op_type == "Add":
            _plan_add(node, plan, producer, initializers, depth, excluded)
            continue
        weight = _initializer_behind(node.input[1], producer, initializers) \
            if len(node.input) > 1 else ""
        if node.input[0] in initializers:
            continue  # a constant on the data input: nothing to calibrate
        if node.op_type != "MatMul" and weight not in initializers:
            continue  # weights computed in the graph: TensorRT's int8 kernels need constants
        if excluded(node):
            plan.excluded.append(node.name)
            continue
        plan.layers.append(node.name)
        plan.activations.append((node.input[0], node.name, 0))
        if weight in initializers:
            plan.weights.append((weight, _weight_axis(node, initializers[weight]), node.name, 1))
        elif weight:  # MatMul of two activations
            plan.activations.append((weight, node.name, 1))
    unused = [p for p in patterns if p not in matched]
    if unused:
        example = plan.layers[0] if plan.layers else "?"
        raise ExportError(f"--int8-exclude {unused[0]!r} matches no quantizable node (names look "
                          f"like {example!r}; shell-style patterns such as '*layer1*' work)")
    return plan


def _initializer_behind(name: str, producer: dict, initializers: dict) -> str:
    """The initializer an input reads, looking through Identity nodes (the exporter reads
    shared parameters through them); the name itself otherwise."""
    seen = 0
    while name not in initializers and name in producer and producer[name].op_type == "Identity" \
            and seen < 8:
        name, seen = producer[name].input[0], seen + 1
    return name


def _plan_add(node, plan, producer, initializers, depth, excluded) -> None:
    """Quantize the residual input of an Add fed by a Conv (the other input; of two Convs, the
    shallower one: the shortcut, while the Add fuses into the deeper branch's last Conv)."""
    inputs = [name for name in node.input if name]
    if len(inputs) != 2 or any(name in initializers for name in inputs):
        return
    sources = [producer.get(name) for name in inputs]
    from_conv = [s is not None and s.op_type == "Conv" for s in sources]
    if not any(from_conv):
        return
    if all(from_conv):
        index = min((0, 1), key=lambda i: depth[sources[i].name])
    else:
        index = from_conv.index(False)
    if excluded(node):
        plan.excluded.append(node.name)
        return
    plan.adds.append(node.name)
    plan.activations.append((inputs[index], node.name, list(node.input).index(inputs[index])))


def _scale_tensor(name: str, amax) -> tuple:
    from onnx import numpy_helper

    amax = np.maximum(np.asarray(amax, np.float32), MIN_AMAX)
    scale = numpy_helper.from_array((amax / 127.0).astype(np.float32), f"{name}/scale")
    zero = numpy_helper.from_array(np.zeros(amax.shape, np.int8), f"{name}/zero_point")
    return scale, zero


def insert_qdq(model_proto, plan: QuantPlan, amax: dict):
    """A copy of `model_proto` with the Q/DQ nodes of `plan` (activation ranges from `amax`)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    initializers = {i.name: i for i in graph.initializer}
    added_inits, added_nodes, done = [], {}, {}
    for tensor, node_name, index in plan.activations:
        if tensor not in done:
            scale, zero = _scale_tensor(tensor, amax[tensor])
            added_inits += [scale, zero]
            q = helper.make_node("QuantizeLinear", [tensor, scale.name, zero.name],
                                 [f"{tensor}/q"], name=f"{tensor}/QuantizeLinear")
            dq = helper.make_node("DequantizeLinear", [f"{tensor}/q", scale.name, zero.name],
                                  [f"{tensor}/dq"], name=f"{tensor}/DequantizeLinear")
            added_nodes[tensor] = (q, dq)
            done[tensor] = f"{tensor}/dq"
        nodes[node_name].input[index] = done[tensor]
    for weight, axis, node_name, index in plan.weights:
        if weight not in done:
            values = numpy_helper.to_array(initializers[weight]).astype(np.float32)
            reduce = tuple(a for a in range(values.ndim) if a != axis)
            channel_amax = np.maximum(np.abs(values).max(axis=reduce), MIN_AMAX)
            shape = [1] * values.ndim
            shape[axis] = -1
            scale = channel_amax / 127.0
            q = np.clip(np.round(values / scale.reshape(shape)), -127, 127).astype(np.int8)
            scale_t, zero_t = _scale_tensor(weight, channel_amax)
            added_inits += [numpy_helper.from_array(q, f"{weight}/int8"), scale_t, zero_t]
            dq = helper.make_node("DequantizeLinear", [f"{weight}/int8", scale_t.name,
                                                       zero_t.name],
                                  [f"{weight}/dq"], name=f"{weight}/DequantizeLinear", axis=axis)
            added_nodes[weight] = (dq,)
            done[weight] = f"{weight}/dq"
        nodes[node_name].input[index] = done[weight]
    _place_before_consumers(graph, added_nodes)
    graph.initializer.extend(added_inits)
    used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model


def _place_before_consumers(graph, added_nodes: dict) -> None:
    """Insert each Q/DQ group right before the first node that reads its output."""
    first_reader = {}
    for group in added_nodes.values():
        first_reader.setdefault(group[-1].output[0], group)
    ordered = []
    for node in graph.node:
        for name in node.input:
            group = first_reader.pop(name, None)
            if group is not None:
                ordered.extend(group)
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)


def quantize_int8(onnx_path, out_path, batches=None, *, method: str = "max",
                  percentile: float = DEFAULT_PERCENTILE, cache_file=None, exclude=(),
                  key: str | None = None, threads: int | None = None) -> QuantizeReport:
    """Write the INT8 Q/DQ variant of the fp32 export at `onnx_path` to `out_path`.

    batches: calibration data, an iterable of float32 arrays in the graph's input layout
    (calibration.CalibrationBatches over --cal-image-dir); None = the ranges must come from
    `cache_file`. method: entropy | percentile | max (--cal-method); percentile for
    "percentile". cache_file (--cal-cache-file): reused without reading an image when it was
    computed on this graph with this method, written after calibration otherwise; one for
    another graph is refused (CalibrationError). exclude: node-name patterns kept in float
    (--int8-exclude). key: passphrase of an encrypted export (the output is encrypted with it).
    The output has the inputs, outputs and metadata of the input (extra.precision = "int8").
    """
    check_method(method, percentile)
    check_output_path(out_path, [onnx_path, cache_file], option="output model")
    if cache_file:
        check_output_path(cache_file, [onnx_path], option="--cal-cache-file")
    proto, source = load_export(onnx_path, key)
    if graph_precision(proto) != "fp32":
        raise ExportError(f"{onnx_path} is already quantized ({graph_precision(proto)} graph); "
                          "quantize the fp32 export")
    ensure_node_names(proto.graph)
    meta = read_onnx_metadata(proto, source)
    candidates = plan_quantization(proto.graph)  # the ranges of every choice of --int8-exclude
    plan = plan_quantization(proto.graph, exclude)
    fingerprint = graph_fingerprint(proto)
    cache = CalibrationCache(cache_file)
    entry = cache.read(graph=fingerprint, method=method, percentile=percentile)
    if entry is not None:
        missing = [t for t in candidates.tensors if t not in entry["amax"]]
        if missing:
            raise CalibrationError(f"{cache_file} has no range for {missing[0]} (and "
                                   f"{len(missing) - 1} more): pass a new --cal-cache-file")
        amax, images = entry["amax"], int(entry.get("images", 0))
    else:
        if batches is None:
            raise CalibrationError("INT8 needs calibration: pass --cal-image-dir (images like "
                                   "the deployment's), or an existing --cal-cache-file")
        amax, images = collect_ranges(proto, candidates.tensors, batches, method=method,
                                      percentile=percentile, input_name=meta.input_name,
                                      threads=threads)
        cache.write(graph=fingerprint, method=method, percentile=percentile, amax=amax,
                    images=images, batch_size=meta.batch_size, source=Path(source).name)
    quantized = insert_qdq(proto, plan, amax)
    set_precision_metadata(quantized, "int8", source, int8={
        "method": method, "percentile": percentile if method == "percentile" else None,
        "calibration_images": images, "excluded": list(plan.excluded)})
    save_export(quantized, out_path, inputs=[onnx_path, cache_file], key=key)
    return QuantizeReport(
        output=str(out_path), method=method,
        percentile=float(percentile) if method == "percentile" else None, images=images,
        cache_file=str(cache_file) if cache_file else None, cache_reused=entry is not None,
        layers=list(plan.layers), adds=list(plan.adds), excluded=list(plan.excluded),
        float_nodes=plan.float_nodes, zero_range=sorted(t for t in plan.tensors if amax[t] <= 0.0))
