"""Exported models behind the model interface: `backend(images_uint8)` -> the model's eval dict.

A Predictor (inference.predictor) calls its model as `model(images)` on uint8 [N, 3, H, W] and
reads {boxes, scores, classes, masks, num_detections} (see mrcnn_helpers.model.MaskRCNN).
`ExportedModel` gives an ONNX Runtime session or a TensorRT engine exactly that interface, so
PyTorch, ONNX and TensorRT are evaluated by the same code and their AP can be compared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mrcnn_helpers.crypto import ENCRYPTION_OVERHEAD, read_maybe_encrypted

from .metadata import ExportError, ExportMetadata, normalize_input, read_onnx_metadata


def decode_outputs(meta: ExportMetadata, outputs: dict) -> dict:
    """The model's eval dict from the graph's outputs (numpy arrays or tensors, by name).

    Returns CPU tensors: boxes float32 [B, D, 4] (x1, y1, x2, y2) input pixels, scores [B, D],
    classes int64 [B, D] (0 = padding), masks float32 [B, D, R, R] probabilities of the predicted
    class (0 for padding rows), num_detections int64 [B].
    """
    def tensor(name):
        if name not in outputs:
            raise ExportError(f"the exported model has no output {name!r} (outputs: "
                              f"{sorted(outputs)}); layout {meta.layout!r} expects "
                              f"{list(meta.output_names)}")
        value = outputs[name]
        return value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(
            np.asarray(value))

    if meta.layout == "deepstream":
        det = tensor("generate_detections").float()
        logits = tensor("mask_fcn_logits/BiasAdd").float()
        boxes = det[..., [1, 0, 3, 2]].contiguous()
        classes = det[..., 4].round().long()
        scores = det[..., 5].contiguous()
        found = classes > 0
        r = logits.shape[-1]
        index = classes.clamp(0, logits.shape[2] - 1)[:, :, None, None, None].expand(
            -1, -1, 1, r, r)
        masks = logits.gather(2, index)[:, :, 0].sigmoid() * found[:, :, None, None]
    elif meta.layout == "compact":
        boxes = tensor("boxes").float()
        scores = tensor("scores").float()
        classes = tensor("classes").long()
        masks = tensor("masks").float()
        found = classes > 0
    else:
        raise ExportError(f"unknown output layout {meta.layout!r} in the model's metadata")
    return {"boxes": boxes * found[..., None], "scores": scores * found, "classes": classes,
            "masks": masks, "num_detections": found.sum(dim=1)}


class ExportedModel:
    """Base of the ONNX Runtime and TensorRT backends: batching, preprocessing, decoding.

    Call with uint8 (or 0..255 float) images [N, 3, H, W], (H, W) = meta.image_size; any N:
    images are run in chunks of meta.batch_size, the last chunk zero-padded. Subclasses
    implement `_run(batch float32 numpy [B, 3, H, W]) -> {output name: array or tensor}`.
    The metadata is checked first (check_metadata: ExportError naming the field).
    """

    backend = "exported"

    def __init__(self, meta: ExportMetadata, source: str):
        check_metadata(meta, source)
        self.meta = meta
        self.source = source
        self.num_classes = meta.num_classes

    def preprocess(self, images) -> np.ndarray:
        """images [N, 3, H, W] -> float32 numpy with the graph's input normalization applied."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = np.asarray(images)
        h, w = self.meta.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (h, w):
            raise ExportError(f"{self.source} takes images [N, 3, {h}, {w}] (the exported "
                              f"image_size); got {list(images.shape)}: resize_and_pad them to "
                              f"({h}, {w}) first")
        return normalize_input(images, self.meta)

    def _run(self, batch: np.ndarray) -> dict:
        raise NotImplementedError

    def __call__(self, images) -> dict:
        x = self.preprocess(images)
        n, b = x.shape[0], self.meta.batch_size
        parts = []
        for start in range(0, n, b):
            chunk = x[start:start + b]
            if chunk.shape[0] < b:  # fixed batch: pad with black images, drop their results
                pad = np.zeros((b - chunk.shape[0], *chunk.shape[1:]), np.float32)
                if not self.meta.normalize_in_graph:
                    pad[:] = self.preprocess(np.zeros((1, *chunk.shape[1:]), np.uint8))
                chunk = np.concatenate((chunk, pad))
            out = decode_outputs(self.meta, self._run(chunk))
            parts.append({k: v[:min(b, n - start)] for k, v in out.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _static_shape(value_info) -> tuple:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def _is_count(value, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_metadata(meta: ExportMetadata, source: str) -> None:
    """ExportError naming the field when an export's metadata (ONNX metadata_props or an
    engine's sidecar JSON) holds a value no export writes: an unknown layout, a count that is
    not a positive integer, an image size that is not two, non-finite normalization, class
    names or ids that do not fit num_classes."""
    problems = []
    if meta.layout not in ("deepstream", "compact"):
        problems.append(f"layout {meta.layout!r} (expected 'deepstream' or 'compact')")
    for name, minimum in (("batch_size", 1), ("num_classes", 2), ("detections_per_image", 1),
                          ("mask_resolution", 1)):
        if not _is_count(getattr(meta, name), minimum):
            problems.append(f"{name} {getattr(meta, name)!r} (expected an integer >= {minimum})")
    if len(meta.image_size) != 2 or not all(_is_count(v) for v in meta.image_size):
        problems.append(f"image_size {list(meta.image_size)} (expected [height, width] > 0)")
    numbers = (meta.net_scale_factor, *meta.offsets)
    if len(meta.offsets) != 3 or not all(isinstance(v, (int, float)) and np.isfinite(v)
                                         for v in numbers):
        problems.append(f"net_scale_factor {meta.net_scale_factor!r} / offsets "
                        f"{list(meta.offsets)} (expected finite numbers, 3 offsets)")
    if not isinstance(meta.normalize_in_graph, bool):
        problems.append(f"normalize_in_graph {meta.normalize_in_graph!r} (expected true/false)")
    if not isinstance(meta.input_name, str):
        problems.append(f"input_name {meta.input_name!r} (expected a tensor name)")
    if _is_count(meta.num_classes, 2):
        if meta.class_names and len(meta.class_names) not in (meta.num_classes,
                                                              meta.num_classes - 1):
            problems.append(f"{len(meta.class_names)} class_names for num_classes "
                            f"{meta.num_classes}")
        if meta.category_ids and len(meta.category_ids) != meta.num_classes - 1:
            problems.append(f"{len(meta.category_ids)} category_ids for num_classes "
                            f"{meta.num_classes} (expected {meta.num_classes - 1})")
    if problems:
        raise ExportError(f"{source}: its export metadata has " + "; ".join(problems)
                          + ": the file was edited or damaged; re-export the model")


def _expected_shapes(meta: ExportMetadata) -> dict[str, tuple]:
    """Static shapes the graph's input and outputs must declare, from its metadata."""
    b, d, r = meta.batch_size, meta.detections_per_image, meta.mask_resolution
    shapes = {meta.input_name: (b, 3, *meta.image_size)}
    if meta.layout == "deepstream":
        shapes.update({"generate_detections": (b, d, 6),
                       "mask_fcn_logits/BiasAdd": (b, d, meta.num_classes, r, r)})
    else:
        shapes.update({"boxes": (b, d, 4), "scores": (b, d), "classes": (b, d),
                       "masks": (b, d, r, r)})
    return shapes


# The class-score layer of the box head, where an exported graph keeps it: its rows are the
# classes (a compact graph's outputs do not show num_classes otherwise).
CLASS_SCORE_WEIGHT = "box_predictor.cls_score.weight"


def check_graph_matches_metadata(proto, meta: ExportMetadata, source: str) -> None:
    """ExportError when the graph's declared input / output shapes contradict its metadata
    (batch, image size, detections, mask resolution, class count), e.g. metadata edited after
    export; the metadata's own values are checked first (check_metadata)."""
    check_metadata(meta, source)
    inputs = {i.name: _static_shape(i) for i in proto.graph.input}
    outputs = {o.name: _static_shape(o) for o in proto.graph.output}
    for name, want in _expected_shapes(meta).items():
        got = inputs.get(name, outputs.get(name))
        if got is None:
            raise ExportError(f"{source}: the graph has no tensor {name!r} that its metadata "
                              f"(layout {meta.layout!r}) names; re-export the model with "
                              "`mrcnn export`")
        if len(got) != len(want) or any(g is not None and g != w for g, w in zip(got, want)):
            raise ExportError(f"{source}: tensor {name!r} has shape {list(got)} but the metadata "
                              f"describes {list(want)} (batch, image size, detections, "
                              "num_classes, mask resolution): the metadata does not belong to "
                              "this graph; re-export the model")
    for tensor in proto.graph.initializer:
        if tensor.name == CLASS_SCORE_WEIGHT and tensor.dims and \
                tensor.dims[0] != meta.num_classes:
            raise ExportError(f"{source}: the graph scores {tensor.dims[0]} classes but its "
                              f"metadata says num_classes {meta.num_classes}: the metadata "
                              "does not belong to this graph; re-export the model")


# Protobuf parses no message of 2 GiB or more, so no self-contained ONNX file is larger.
MAX_ONNX_BYTES = 2 ** 31 - 1
_ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8,
               14: 8, 15: 16, 16: 2}  # onnx.TensorProto.DataType -> bytes per element


def _tensors_in(graph, where: str = "graph"):
    """(where, TensorProto) of every tensor stored in `graph`: initializers, sparse
    initializers, node attributes (Constant values), and those of subgraphs (If, Loop)."""
    for tensor in graph.initializer:
        yield f"{where} initializer", tensor
    for sparse in graph.sparse_initializer:
        yield f"{where} sparse initializer", sparse.values
        yield f"{where} sparse initializer", sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            here = f"node {node.name or node.op_type!r} attribute {attr.name!r}"
            if attr.HasField("t"):
                yield here, attr.t
            yield from ((here, t) for t in attr.tensors)
            if attr.HasField("sparse_tensor"):
                yield here, attr.sparse_tensor.values
            if attr.HasField("g"):
                yield from _tensors_in(attr.g, f"{here} subgraph")
            for sub in attr.graphs:
                yield from _tensors_in(sub, f"{here} subgraph")


def check_onnx_sizes(proto, source: str, file_size: int) -> None:
    """ExportError when a tensor of the graph keeps its data in an external file (`mrcnn
    export` writes self-contained files, and an external location may name any file), has a
    negative dimension, or declares more bytes than the whole file holds (an absurd shape on a
    few bytes: ONNX Runtime would size buffers by it)."""
    for where, tensor in _tensors_in(proto.graph):
        name = tensor.name or "(unnamed)"
        if tensor.data_location == 1:  # onnx.TensorProto.EXTERNAL
            location = {e.key: e.value for e in tensor.external_data}.get("location", "?")
            raise ExportError(f"{source}: tensor {name!r} ({where}) keeps its data in the "
                              f"external file {location!r}; `mrcnn export` writes "
                              "self-contained ONNX files: re-export the model")
        dims = list(tensor.dims)
        if any(d < 0 for d in dims):
            raise ExportError(f"{source}: tensor {name!r} ({where}) has shape {dims}")
        nbytes = int(np.prod(dims, dtype=object)) * _ITEM_BYTES.get(tensor.data_type, 1)
        if nbytes > file_size:
            raise ExportError(f"{source}: tensor {name!r} ({where}) declares shape {dims}, "
                              f"{nbytes} bytes, more than the file's {file_size} bytes: the "
                              "file is damaged or crafted")


def read_onnx_file(path: Path, key: str | None = None):
    """(bytes, onnx.ModelProto) of an exported ONNX file (decrypted with `key` when it is
    encrypted), refused with ExportError before parsing when larger than protobuf can hold and
    after parsing when check_onnx_sizes objects."""
    import onnx

    size = path.stat().st_size
    if size > MAX_ONNX_BYTES + ENCRYPTION_OVERHEAD:
        raise ExportError(f"{path} is {size} bytes; an ONNX file holds at most {MAX_ONNX_BYTES} "
                          "(protobuf's limit), so this is no ONNX model `mrcnn export` wrote")
    data = read_maybe_encrypted(path, key)
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors vary
        raise ExportError(f"{path} is not a readable ONNX model: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                          ) from None
    check_onnx_sizes(proto, str(path), len(data))
    return data, proto


def _runtime_error(exc: Exception, doing: str) -> ExportError:
    """ONNX Runtime's exception (Fail, InvalidArgument, ...) as one line; running out of memory
    is said so."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if "bad_alloc" in text or "Failed to allocate" in text:
        return ExportError(f"ONNX Runtime ran out of memory {doing} ({text}); free memory, or "
                           "raise the process's memory limit (ulimit -v)")
    return ExportError(f"ONNX Runtime failed {doing}: {text}")


class OnnxRuntimeModel(ExportedModel):
    """An exported ONNX file run by ONNX Runtime (CUDA provider when available, else CPU).

    key: passphrase of an encrypted export. providers: ONNX Runtime provider names to try.
    The file is read within bounds (read_onnx_file) and its metadata checked against the graph
    before a session is made; ONNX Runtime's own errors become ExportError.
    """

    backend = "onnxruntime"

    def __init__(self, path, *, key: str | None = None, providers=None, threads: int | None = None):
        try:
            import onnx  # noqa: F401 - read_onnx_file parses with it
            import onnxruntime as ort
        except ImportError:
            raise ExportError("running ONNX models needs onnx and onnxruntime: "
                              "pip install onnx onnxruntime (or onnxruntime-gpu)") from None
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"ONNX model not found: {path}")
        data, proto = read_onnx_file(path, key)
        super().__init__(read_onnx_metadata(proto, str(path)), str(path))
        check_graph_matches_metadata(proto, self.meta, str(path))
        del proto
        available = ort.get_available_providers()
        wanted = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        chosen = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=chosen)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
            raise _runtime_error(exc, f"to load {path}") from None
        self.providers = self.session.get_providers()

    def _run(self, batch: np.ndarray) -> dict:
        names = [o.name for o in self.session.get_outputs()]
        try:
            values = self.session.run(names, {self.meta.input_name: batch})
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
            raise _runtime_error(exc, f"running {self.source}") from None
        return dict(zip(names, values, strict=True))
