"""Exported models behind the model interface: `backend(images_uint8)` -> the model's eval dict.

`evaluate_model`, `Predictor`, `run_inference` and the deploy pipeline call a model as
`model(images)` on uint8 [N, 3, H, W] and read {boxes, scores, classes, masks, num_detections}
(see mrcnn_helpers.model.MaskRCNN). `ExportedModel` gives an ONNX Runtime session or a TensorRT
engine exactly that interface (plus the no-op `.eval()`, `.train(False)`, `.to()` and an empty
`.parameters()` those functions call), so PyTorch, ONNX and TensorRT are evaluated by the same
code and their AP can be compared.

    model, spec, class_names, category_ids = load_inference_model("model.onnx")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .metadata import ExportError, ExportMetadata, normalize_input, read_onnx_metadata

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


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

    training = False

    def __init__(self, meta: ExportMetadata, source: str):
        self.meta = meta
        self.source = source
        self.num_classes = meta.num_classes
        self.device = torch.device("cpu")

    # The parts of nn.Module that evaluate_model / Predictor use.
    def parameters(self):
        return iter(())

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise ExportError(f"{self.source} is an exported model: it can run inference only")
        return self

    def to(self, device=None, *args, **kwargs):
        return self  # inputs are read back to the host; the backend keeps its own device

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


class OnnxRuntimeModel(ExportedModel):
    """An exported ONNX file run by ONNX Runtime (CUDA provider when available, else CPU).

    key: passphrase of an encrypted export. providers: ONNX Runtime provider names to try.
    """

    def __init__(self, path, *, key: str | None = None, providers=None, threads: int | None = None):
        try:
            import onnx
            import onnxruntime as ort
        except ImportError:
            raise ExportError("running ONNX models needs onnx and onnxruntime: "
                              "pip install onnx onnxruntime (or onnxruntime-gpu)") from None
        from mrcnn_helpers.crypto import read_maybe_encrypted

        path = Path(path)
        if not path.is_file():
            raise ExportError(f"ONNX model not found: {path}")
        data = read_maybe_encrypted(path, key)
        try:
            proto = onnx.load_model_from_string(data)
        except Exception as exc:  # noqa: BLE001 - protobuf decode errors vary
            raise ExportError(f"{path} is not a readable ONNX model: {exc}") from None
        super().__init__(read_onnx_metadata(proto, str(path)), str(path))
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


def _spec_for(meta: ExportMetadata, spec, source: str):
    """The spec to evaluate with: the given one (checked against the graph) or the stored one."""
    if spec is None:
        if not meta.spec_text:
            raise ExportError(f"{source} stores no spec: pass the spec (-e SPEC)")
        from mrcnn_helpers.spec import parse_spec

        return parse_spec(meta.spec_text, source=f"{source} (stored spec)")
    image_size = tuple(int(v) for v in spec.data_config.image_size)
    num_classes = int(spec.data_config.num_classes)
    if image_size != tuple(meta.image_size) or num_classes != meta.num_classes:
        raise ExportError(
            f"{source} was exported for image_size {tuple(meta.image_size)} and num_classes "
            f"{meta.num_classes}, but the spec has {image_size} and "
            f"{spec.data_config.num_classes}; use the spec it was exported with, or re-export")
    return spec


def load_inference_model(path, spec=None, device=None, key: str | None = None):
    """Any model file -> (model, spec, class_names, category_ids) for evaluate / infer / deploy.

    path: a training checkpoint or a results directory (its latest checkpoint), an exported
    `.onnx` (ONNX Runtime) or a TensorRT engine `.plan` / `.engine` / `.trt` (with its `.json`
    metadata next to it). spec: None = the one stored in the file; with exported models the
    spec's image_size and num_classes must match the graph (its inference thresholds are baked
    into the graph).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES or suffix in ENGINE_SUFFIXES:
        if suffix in ONNX_SUFFIXES:
            model = OnnxRuntimeModel(path, key=key)
        else:
            from .tensorrt import TensorRTModel

            model = TensorRTModel(path, device=device)
        meta = model.meta
        spec = _spec_for(meta, spec, str(path))
        num = meta.num_classes
        names = list(meta.class_names) or ["background"] + [f"class_{i}" for i in range(1, num)]
        ids = list(meta.category_ids) or list(range(1, num))
        return model, spec, names, ids

    from mrcnn_helpers.engine import load_model_for_inference
    from mrcnn_helpers.engine.checkpoint import latest_checkpoint

    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ExportError(f"{path}: no checkpoint (model.step-N.pth) in this directory")
        path = found
    from mrcnn_helpers.crypto import is_encrypted

    if path.is_file() and is_encrypted(path):  # a checkpoint encrypted with encrypt_file / --key
        return _load_encrypted_checkpoint(path, spec, device, key)
    return load_model_for_inference(os.fspath(path), spec=spec, device=device)


def _load_encrypted_checkpoint(path, spec, device, key):
    """load_model_for_inference for an encrypted checkpoint: decrypt to a private temp file."""
    import tempfile

    from mrcnn_helpers.engine import load_model_for_inference

    from mrcnn_helpers.crypto import read_maybe_encrypted

    data = read_maybe_encrypted(path, key)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / Path(path).name
        plain.write_bytes(data)
        return load_model_for_inference(plain, spec=spec, device=device)
