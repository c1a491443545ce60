"""One interface for every kind of model: `Predictor`.

A Predictor holds a model that maps uint8 images [B, 3, H, W] (resized and padded to the spec's
image_size) to the detection dict of mrcnn_helpers.model.MaskRCNN's eval forward, plus what is
needed to use it: the spec (image size, batch size, inference settings), class names, the
dataset's category ids, the device and the precision. The model is a PyTorch `MaskRCNN` or an
exported backend (ONNX Runtime, TensorRT: inference.backends / inference.tensorrt), so evaluation,
`mrcnn infer`, export verification and deployment run every kind through the same two calls:

    dets = predictor.forward(images)                 # batched, model space (padded pixels)
    per_image = predictor.predict(list_of_images)    # original pixels, thresholded, labelled

Preprocessing is evaluation's: `resize_and_pad` (aspect ratio kept, zero padding); the model
normalizes itself. Detections are mapped back by `postprocess_detections`.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from PIL import Image

from mrcnn_helpers.data.images import load_image
from mrcnn_helpers.data.transforms import resize_and_pad
from mrcnn_helpers.errors import DataError
from mrcnn_helpers.model import kernels
from mrcnn_helpers.model.maskrcnn import place_model
from mrcnn_helpers.runtime import amp_dtype, autocast, device_of, precision_dtype
from mrcnn_helpers.spec.network import class_names_with_background

from . import graphs
from .graphs import GraphedForward
from .postprocess import postprocess_detections


def to_image_tensor(image) -> torch.Tensor:
    """A path, PIL image, uint8 HWC numpy array or uint8 CHW tensor -> uint8 Tensor[3, h, w]."""
    if isinstance(image, (str, os.PathLike)):
        # The dataset's reader: same colour conversions as training and evaluation, and a
        # DataError naming the path for a missing or corrupt file.
        return load_image(image)
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
            raise DataError(f"numpy images must be uint8 [h, w, 3], got {image.dtype} "
                            f"{tuple(image.shape)}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
            raise DataError(f"tensor images must be uint8 [3, h, w], got {image.dtype} "
                            f"{tuple(image.shape)}")
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image
    raise DataError(f"cannot use {type(image).__name__} as an image: pass a file path, a PIL "
                    f"image or a uint8 tensor [3, h, w]")


def backend_name(model) -> str:
    """"pytorch" for an nn.Module, else the exported backend's `backend` name."""
    if isinstance(model, torch.nn.Module):
        return "pytorch"
    return str(getattr(model, "backend", type(model).__name__))


class Predictor:
    """A model with everything needed to run it on images.

    model: a PyTorch Mask R-CNN (eval output as mrcnn_helpers.model.MaskRCNN) or an exported
    backend (callable on uint8 [N, 3, H, W], returning the same dict on the CPU).
    spec: its ExperimentSpec (image_size, eval_batch_size, use_amp, include_mask are used).
    class_names: names of the contiguous labels (with or without "background" first; None =
    generic names); category_ids: COCO id of label i at index i-1 (None = 1..K).
    device: PyTorch models are moved there (None = where their parameters are); exported backends
    keep their own device. precision: "fp32", "fp16", "bf16" autocast for PyTorch models on CUDA;
    None = the spec's use_amp (bf16 where supported). Exported backends run at the precision they
    were exported / built with. cuda_graphs: replay the forward of a PyTorch model on CUDA from
    CUDA graphs (inference.graphs); None = where the model's sync-free GPU kernels run.
    """

    def __init__(self, model, spec, class_names=None, *, category_ids=None, device=None,
                 precision: str | None = None, source: str = "",
                 cuda_graphs: bool | None = None):
        self.model = model
        self.spec = spec
        self.source = source
        self.backend = backend_name(model)
        num_classes = int(spec.data_config.num_classes)
        self.class_names = class_names_with_background(class_names, num_classes)
        self.category_ids = (list(category_ids) if category_ids
                             else list(range(1, num_classes)))
        self.image_size = tuple(int(s) for s in spec.data_config.image_size)
        self.batch_size = max(1, int(spec.eval_batch_size))
        self.include_mask = bool(spec.maskrcnn_config.include_mask)
        if self.backend == "pytorch":
            if device is not None:
                place_model(model, device)
            self.device = device_of(model)
            self.dtype = (amp_dtype(bool(spec.use_amp), self.device) if precision is None
                          else precision_dtype(precision, self.device))
            if cuda_graphs is None:
                cuda_graphs = (graphs.ENABLED and self.device.type == "cuda"
                               and kernels.available(self.device))
            self._graphed = GraphedForward(model, self.dtype) if cuda_graphs else None
        else:
            if precision not in (None, "fp32"):
                raise DataError(f"precision {precision} applies to PyTorch models; an exported "
                                "model runs at the precision it was exported / built with")
            self.device = torch.device("cpu")  # inputs go to the backend through the host
            self.dtype = None
            self._graphed = None

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def label(self, c: int) -> str:
        return self.class_names[c] if 0 <= c < len(self.class_names) else str(c)

    @contextlib.contextmanager
    def _eval_mode(self):
        """Eval mode for the call, the previous mode restored after (a model evaluated during
        training goes on training). no_grad rather than inference_mode: tensors a model caches
        here (anchors) stay usable when training resumes."""
        module = self.model if self.backend == "pytorch" else None
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.dtype):
                yield
        finally:
            if was_training:
                module.train()

    def forward(self, images: torch.Tensor) -> dict:
        """Detections of uint8 images [B, 3, H, W] (already resize_and_pad'ed): the model's dict
        (boxes [B, D, 4] padded-input pixels, scores, classes, masks [B, D, R, R], num_detections)
        on the model's device (PyTorch) or the CPU (exported)."""
        with self._eval_mode():
            images = images.to(self.device, non_blocking=True)
            if self._graphed is not None:
                return self._graphed(images)
            return self.model(images)

    def preprocess(self, images) -> tuple[torch.Tensor, list[float], list[tuple[int, int]]]:
        """Images of any accepted kind -> (uint8 batch [B, 3, H, W], scales, original (h, w))."""
        padded, scales, sizes = [], [], []
        for image in images:
            tensor = to_image_tensor(image)
            p, s = resize_and_pad(tensor, image_size=self.image_size)
            padded.append(p)
            scales.append(float(s))
            sizes.append((int(tensor.shape[1]), int(tensor.shape[2])))
        return torch.stack(padded), scales, sizes

    def postprocess(self, dets: dict, scales, sizes, score_threshold: float,
                    include_mask: bool, masks_on_device: bool = False) -> list[dict]:
        """Per-image detections in original pixels (see postprocess_detections) with labels."""
        outputs = []
        for i, (scale, size) in enumerate(zip(scales, sizes, strict=True)):
            out = postprocess_detections(dets, i, scale, size, score_threshold,
                                         include_mask and self.include_mask,
                                         masks_on_device=masks_on_device)
            out["labels"] = [self.label(int(c)) for c in out["classes"]]
            outputs.append(out)
        return outputs

    def predict(self, images, score_threshold: float = 0.5,
                include_mask: bool = True) -> list[dict]:
        """Detections of each image, in input order.

        images: a list of file paths, PIL images, uint8 HWC arrays or uint8 CHW tensors (a single
        one, or a uint8 [B, 3, h, w] tensor, is accepted too). Returns one dict per image: boxes
        float32 [N, 4] (x1, y1, x2, y2) original pixels, scores float32 [N] (descending), classes
        int64 [N], labels list[str], masks bool [N, h, w] or None.
        """
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) or (
                isinstance(images, torch.Tensor) and images.ndim == 3):
            images = [images]
        images = list(images)
        outputs = []
        for start in range(0, len(images), self.batch_size):
            batch, scales, sizes = self.preprocess(images[start:start + self.batch_size])
            outputs += self.postprocess(self.forward(batch), scales, sizes, score_threshold,
                                        include_mask)
        return outputs


def as_predictor(model, spec, *, device=None, **kwargs) -> Predictor:
    """`model` if it is a Predictor already, else Predictor(model, spec, device=device, ...)."""
    if isinstance(model, Predictor):
        return model
    return Predictor(model, spec, device=device, **kwargs)
