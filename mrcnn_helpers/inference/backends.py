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

from mrcnn_helpers.crypto import read_maybe_encrypted

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
    """

    backend = "exported"

    def __init__(self, meta: ExportMetadata, source: str):
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


def check_graph_matches_metadata(proto, meta: ExportMetadata, source: str) -> None:
    """ExportError when the graph's declared input / output shapes contradict its metadata
    (batch, image size, class count), e.g. metadata edited after export."""
    inputs = {i.name: _static_shape(i) for i in proto.graph.input}
    outputs = {o.name: _static_shape(o) for o in proto.graph.output}
    expected = {meta.input_name: (meta.batch_size, 3, *meta.image_size)}
    if meta.layout == "deepstream":
        expected["mask_fcn_logits/BiasAdd"] = (meta.batch_size, meta.detections_per_image,
                                               meta.num_classes, meta.mask_resolution,
                                               meta.mask_resolution)
    for name, want in expected.items():
        got = inputs.get(name, outputs.get(name))
        if got is None:
            raise ExportError(f"{source}: the graph has no tensor {name!r} that its metadata "
                              "names; re-export the model with `mrcnn export`")
        if len(got) != len(want) or any(g is not None and g != w for g, w in zip(got, want)):
            raise ExportError(f"{source}: tensor {name!r} has shape {list(got)} but the metadata "
                              f"describes {list(want)} (batch, image size, num_classes): the "
                              "metadata does not belong to this graph; re-export the model")


class OnnxRuntimeModel(ExportedModel):
    """An exported ONNX file run by ONNX Runtime (CUDA provider when available, else CPU).

    key: passphrase of an encrypted export. providers: ONNX Runtime provider names to try.
    """

    backend = "onnxruntime"

    def __init__(self, path, *, key: str | None = None, providers=None, threads: int | None = None):
        try:
            import onnx
            import onnxruntime as ort
        except ImportError:
            raise ExportError("running ONNX models needs onnx and onnxruntime: "
                              "pip install onnx onnxruntime (or onnxruntime-gpu)") from None
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"ONNX model not found: {path}")
        data = read_maybe_encrypted(path, key)
        try:
            proto = onnx.load_model_from_string(data)
        except Exception as exc:  # noqa: BLE001 - protobuf decode errors vary
            raise ExportError(f"{path} is not a readable ONNX model: {exc}") from None
        super().__init__(read_onnx_metadata(proto, str(path)), str(path))
        check_graph_matches_metadata(proto, self.meta, str(path))
        available = ort.get_available_providers()
        wanted = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        chosen = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(data, sess_options=options, providers=chosen)
        self.providers = self.session.get_providers()

    def _run(self, batch: np.ndarray) -> dict:
        names = [o.name for o in self.session.get_outputs()]
        values = self.session.run(names, {self.meta.input_name: batch})
        return dict(zip(names, values, strict=True))
