"""Precision expressed in the ONNX graph itself: the FP16 graph, and which precision a graph has.

TensorRT 10 networks can be strongly typed and TensorRT 11 networks always are: each layer runs
in the type its tensors have in the graph (no builder flag picks FP16 or INT8 any more). So the
precision of an engine is chosen when its ONNX file is written:

- fp32: the graph as export_onnx writes it;
- fp16: `convert_to_fp16` below: the dense layers (the convolutions, fully connected layers,
  ReLU, max-pool, resize and the adds between them) compute in float16, with Casts where their
  tensors meet the rest; the proposal and detection logic stays float32 (`FLOAT32_OPS` and
  everything that only moves, decodes or compares boxes and scores: box coordinates up to
  ~1344 px have a 1 px step in float16, and ranking ties would reorder detections);
- int8: quantize.quantize_int8 (Q/DQ nodes around the convolutions of the backbone, FPN and RPN
  head).

The graph's inputs and outputs keep their float32 types in every variant, so the same feeding
and decoding code (inference.backends) runs all three, in ONNX Runtime and in TensorRT.
"""

from __future__ import annotations

import fnmatch
import heapq
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from mrcnn_helpers.crypto import read_maybe_encrypted, write_encrypted
from mrcnn_helpers.fileio import atomic_write, check_output_path
from mrcnn_helpers.inference.metadata import METADATA_KEY, ExportError, read_onnx_metadata

PRECISIONS = ("fp32", "fp16", "int8")
# Selection and RoI pooling: TensorRT runs RoiAlign in FP32/FP16 only, NMS and TopK rank scores.
FLOAT32_OPS = ("RoiAlign", "NonMaxSuppression", "TopK")
# The dense ops that run in float16, and their inputs that become float16 (the others, e.g.
# Resize's scales, keep their types).
FP16_OPS = {"Conv": None, "ConvTranspose": None, "Gemm": None, "MatMul": None, "Relu": None,
            "MaxPool": (0,), "Resize": (0,), "BatchNormalization": None, "Add": None}
FP16_SUFFIX = "/fp16"


def ensure_node_names(graph) -> None:
    """Give every unnamed node a unique name (placement and exclusion refer to nodes by name)."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def consumers_of(graph) -> dict[str, list]:
    """{tensor name: [nodes that read it]}."""
    out = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                out[name].append(node)
    return out


def downstream_of(graph, op_types=FLOAT32_OPS) -> set[str]:
    """Names of the nodes of type `op_types` and of every node that depends on one of them."""
    consumers = consumers_of(graph)
    seen, todo = set(), [n for n in graph.node if n.op_type in op_types]
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        for name in node.output:
            todo.extend(consumers.get(name, ()))
    return seen


def graph_precision(model_proto) -> str:
    """'int8' when the graph holds Q/DQ nodes, 'fp16' when it computes in float16, else 'fp32'."""
    import onnx

    ops = {n.op_type for n in model_proto.graph.node}
    if {"QuantizeLinear", "DequantizeLinear"} & ops:
        return "int8"
    half = onnx.TensorProto.FLOAT16
    if any(t.data_type == half for t in model_proto.graph.initializer) or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute)
            for n in model_proto.graph.node):
        return "fp16"
    return "fp32"


def fp16_nodes(graph, exclude=()) -> set[str]:
    """Names of the nodes convert_to_fp16 runs in float16 (see the module docstring).

    Every convolution, fully connected layer, ReLU, max-pool and resize qualifies (the box and
    mask heads too: they are dense again after RoiAlign); an Add only when each of its
    non-constant inputs comes from a float16 node (the residual and FPN adds), so the Adds of
    the box decoding (anchors + deltas) stay float32. exclude: node-name patterns (shell-style)
    kept float32; ExportError for a pattern that matches no candidate.
    """
    initializers = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    chosen: set[str] = set()
    patterns, matched = [str(p) for p in exclude], set()
    for node in graph.node:  # ONNX nodes are topologically sorted
        if node.op_type not in FP16_OPS:
            continue
        hits = [p for p in patterns if fnmatch.fnmatchcase(node.name, p)]
        if hits:
            matched.update(hits)
            continue
        if node.op_type == "Add":
            sources = [producer.get(name) for name in node.input if name not in initializers]
            if not sources or not all(s is not None and s.name in chosen for s in sources):
                continue
        chosen.add(node.name)
    unused = [p for p in patterns if p not in matched]
    if unused:
        raise ExportError(f"--fp16-exclude {unused[0]!r} matches no convolution, fully connected "
                          "or other float16 node (names look like '/backbone/conv1/Conv'; "
                          "shell-style patterns such as '*mask_head*' work)")
    return chosen


def _fp16_initializer(tensor):
    from onnx import numpy_helper

    values = numpy_helper.to_array(tensor).astype(np.float32)
    finite = np.finfo(np.float16).max
    if np.abs(values).max(initial=0.0) > finite:
        raise ExportError(f"weight {tensor.name} exceeds float16's range ({finite}): export "
                          "fp32 (or int8) instead")
    return numpy_helper.from_array(values.astype(np.float16), tensor.name + FP16_SUFFIX)


def to_fp16_graph(model_proto, exclude=()):
    """A float16 copy of `model_proto` (see the module docstring); the input is not modified.

    Each float16 node's float inputs become float16: initializers are converted (a copy named
    `<name>/fp16`), other tensors are cast once. Each of its outputs `t` is renamed
    `t/fp16`; where a float32 node or a graph output reads `t`, a Cast back to float32 produces
    `t` again, so the names the rest of the graph (and the deployment) uses are unchanged.
    """
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    graph = model.graph
    ensure_node_names(graph)
    chosen = fp16_nodes(graph, exclude)
    if not chosen:
        raise ExportError("the graph has no convolution or fully connected layer to run in fp16")
    initializers = {i.name: i for i in graph.initializer}
    half_of: dict[str, str] = {}  # float32 tensor -> its float16 twin
    new_inits, casts_in = [], []
    for node in graph.node:
        if node.name not in chosen:
            continue
        which = FP16_OPS[node.op_type]
        for index, name in enumerate(node.input):
            if not name or (which is not None and index not in which):
                continue
            if name not in half_of:
                if name in initializers:
                    if initializers[name].data_type != onnx.TensorProto.FLOAT:
                        continue
                    new_inits.append(_fp16_initializer(initializers[name]))
                    half_of[name] = name + FP16_SUFFIX
                else:
                    half_of[name] = name + FP16_SUFFIX
                    casts_in.append(onnx.helper.make_node(
                        "Cast", [name], [half_of[name]], to=onnx.TensorProto.FLOAT16,
                        name=f"{name}/cast_fp16"))
            node.input[index] = half_of[name]
        for index, name in enumerate(node.output):
            half_of[name] = name + FP16_SUFFIX
            node.output[index] = half_of[name]
    graph.initializer.extend(new_inits)
    _cast_back(graph, chosen, half_of, casts_in)
    _drop_unused_initializers(graph)
    del graph.value_info[:]  # stale float32 types; consumers infer the new ones
    return model


def _cast_back(graph, chosen, half_of, casts_in) -> None:
    """Float32 readers of float16 outputs get Casts; nodes are re-sorted topologically."""
    import onnx

    half_outputs = {o for n in graph.node if n.name in chosen for o in n.output}
    readers = [name for n in graph.node if n.name not in chosen for name in n.input]
    readers += [o.name for o in graph.output]
    needs_back = sorted({name for name in readers if half_of.get(name) in half_outputs})
    casts_out = [onnx.helper.make_node("Cast", [half_of[name]], [name], to=onnx.TensorProto.FLOAT,
                                       name=f"{name}/cast_fp32") for name in needs_back]
    _topological_rebuild(graph, list(graph.node) + casts_in + casts_out)


def _topological_rebuild(graph, nodes) -> None:
    """Replace graph.node by `nodes` in a topological order that keeps the given order where
    it can (Kahn's algorithm, lowest index first)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    readers = defaultdict(list)
    waiting = []
    for i, node in enumerate(nodes):
        deps = {producer[name] for name in node.input if name in producer} - {i}
        waiting.append(len(deps))
        for d in deps:
            readers[d].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(nodes[i])
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(ordered) != len(nodes):
        raise ExportError("internal error: the converted graph has a cycle")
    del graph.node[:]
    graph.node.extend(ordered)


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def set_precision_metadata(model_proto, precision: str, source: str, **details) -> None:
    """Record `precision` (and details) in the export metadata's `extra` of `model_proto`."""
    import onnx

    meta = read_onnx_metadata(model_proto, source)
    extra = dict(meta.extra, precision=precision, **details)
    props = {p.key: p.value for p in model_proto.metadata_props}
    props[METADATA_KEY] = replace(meta, extra=extra).to_json()
    del model_proto.metadata_props[:]
    onnx.helper.set_model_props(model_proto, props)


def convert_to_fp16(onnx_path, out_path, *, exclude=(), key: str | None = None) -> str:
    """Write the float16 variant of the exported graph at `onnx_path` to `out_path`.

    The result has the same inputs and outputs (float32), runs in ONNX Runtime and builds as is
    in a strongly typed TensorRT network. exclude: node-name patterns kept float32
    (--fp16-exclude). key: passphrase of an encrypted input; the output is then encrypted with
    it too. Returns the output path. Refuses to write over the input.
    """
    proto, source = load_export(onnx_path, key)
    if graph_precision(proto) != "fp32":
        raise ExportError(f"{onnx_path} is already converted ({graph_precision(proto)} graph); "
                          "convert the fp32 export")
    converted = to_fp16_graph(proto, exclude)
    set_precision_metadata(converted, "fp16", source, fp16_excluded=list(exclude))
    return save_export(converted, out_path, inputs=[onnx_path], key=key)


def load_export(path, key: str | None = None):
    """(ModelProto, source name) of an exported ONNX file (plain or encrypted)."""
    import onnx

    if not Path(path).is_file():
        raise ExportError(f"ONNX model not found: {path}")
    data = read_maybe_encrypted(path, key)
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors vary
        raise ExportError(f"{path} is not a readable ONNX model: {exc}") from None
    read_onnx_metadata(proto, str(path))  # only our exports: their contract is known
    return proto, str(path)


def read_export_metadata(path, key: str | None = None):
    """The ExportMetadata of an exported ONNX file (extra.precision tells fp16 / int8 graphs),
    e.g. for write_deepstream_configs of a converted file."""
    proto, source = load_export(path, key)
    return read_onnx_metadata(proto, source)


def save_export(proto, out_path, *, inputs, key: str | None = None) -> str:
    """Check and write `proto` atomically (encrypted with `key` when given); returns the path."""
    import onnx

    check_output_path(out_path, inputs, option="output model")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"internal error: the converted graph is not valid ONNX: {exc}") from None
    data = proto.SerializeToString()
    if key:
        write_encrypted(out_path, data, key)
    else:
        atomic_write(out_path, data, error=ExportError, what="ONNX model")
    return str(out_path)
