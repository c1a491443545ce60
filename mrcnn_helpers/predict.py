"""Batched inference: images or paths -> per-image detections in original-image pixels.

Preprocessing is evaluation's: each image is resized (aspect ratio kept) and zero padded to
spec.data_config.image_size by `resize_and_pad`; the model sees uint8 [B, 3, H, W] and normalizes
itself. `postprocess_detections` maps one image's model output back to the original image; both
`Predictor` and `evaluate_model` use it, so evaluation scores exactly what inference returns.
"""

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mrcnn_helpers.errors import DataError, MrcnnError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
MASK_THRESHOLD = 0.5


def amp_dtype() -> torch.dtype:
    """Autocast dtype when spec.use_amp on CUDA, as in training: bf16 (fp32's range, so
    activations cannot overflow) where the GPU supports it, else fp16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_device(model: torch.nn.Module, device=None) -> torch.device:
    """`device` as a torch.device; None = the device of the model's first parameter (else CPU)."""
    if device is not None:
        return torch.device(device)
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def infer_batch(model: torch.nn.Module, images: torch.Tensor, *, use_amp: bool = False) -> dict:
    """Eval-mode forward of uint8 images [B, 3, H, W] (already on the model's device).

    Returns the model's detection dict (boxes, scores, classes, masks, num_detections).
    no_grad rather than inference_mode: tensors a model caches here (anchors) stay usable when
    training resumes. Autocast only on CUDA and only when use_amp.
    """
    autocast = (torch.autocast(device_type="cuda", dtype=amp_dtype())
                if use_amp and images.device.type == "cuda" else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        return model(images)


def postprocess_detections(dets: dict, index: int, scale: float, orig_size, score_threshold: float,
                           include_mask: bool, *, mask_threshold: float = MASK_THRESHOLD) -> dict:
    """One image's detections in original-image pixels.

    dets: the model's eval output for a batch (boxes [B, D, 4] in padded-input pixels, scores
    [B, D], classes [B, D], masks [B, D, R, R] probabilities, num_detections [B]); index: the image
    in the batch; scale: resized / original (from resize_and_pad); orig_size: (h, w).
    Keeps detections with score >= score_threshold and a foreground class. Boxes are divided by
    scale and clipped to the image; masks are pasted into the unclipped box (the mask covers the
    whole predicted box) at (h, w) and thresholded at mask_threshold.
    Returns CPU tensors: boxes float32 [N, 4] (x1, y1, x2, y2), scores float32 [N], classes int64
    [N], masks bool [N, h, w] or None (include_mask False or the model has no mask output).
    """
    h, w = int(orig_size[0]), int(orig_size[1])
    n = int(dets["num_detections"][index])
    boxes = dets["boxes"][index, :n].float() / float(scale)
    scores = dets["scores"][index, :n].float()
    classes = dets["classes"][index, :n].long()
    clipped = torch.stack((boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                           boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)), dim=1)
    # A box lying wholly in the padding clips to zero area: it shows nothing of the image.
    keep = ((scores >= score_threshold) & (classes > 0)
            & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]))
    masks = None
    if include_mask and dets.get("masks") is not None:
        from mrcnn_helpers.model import paste_masks_in_image

        probs = paste_masks_in_image(dets["masks"][index, :n][keep].float(), boxes[keep], h, w)
        masks = (probs >= mask_threshold).cpu()
    return {"boxes": clipped[keep].cpu(), "scores": scores[keep].cpu(),
            "classes": classes[keep].cpu(), "masks": masks}


def iter_image_files(directory) -> list[Path]:
    """Image files (.jpg, .jpeg, .png, .bmp, any case) directly in `directory`, sorted by name.

    Raises DataError naming the directory when it is missing, not a directory, or holds none.
    """
    directory = Path(directory)
    if not directory.exists():
        raise DataError(f"input directory not found: {directory}")
    if not directory.is_dir():
        raise DataError(f"input path is not a directory: {directory}")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {directory}")
    return files


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> uint8 Tensor[3, h, w] RGB."""
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def to_image_tensor(image) -> torch.Tensor:
    """A path, PIL image, uint8 HWC numpy array or uint8 CHW tensor -> uint8 Tensor[3, h, w]."""
    if isinstance(image, (str, os.PathLike)):
        # The dataset's reader: same colour conversions as training and evaluation, and a
        # DataError naming the path for a missing or corrupt file.
        from mrcnn_helpers.data import load_image

        return load_image(str(image))
    if isinstance(image, Image.Image):
        return pil_to_tensor(image)
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


class Predictor:
    """Runs a Mask R-CNN on images and returns detections in each image's own pixels.

    model: eval-mode output as mrcnn_helpers.model's (see postprocess_detections); spec: its
    ExperimentSpec (image_size, eval_batch_size, use_amp are used); class_names: name of each
    contiguous label with index 0 = "background" (the dataset's class_names); a list without the
    background entry (num_classes - 1 names) is accepted too. device: None = the model's device.
    """

    def __init__(self, model: torch.nn.Module, spec, class_names, *, device=None):
        self.device = resolve_device(model, device)
        self.model = model.to(self.device).eval()
        self.spec = spec
        self.image_size = tuple(int(s) for s in spec.data_config.image_size)
        self.batch_size = max(1, int(spec.eval_batch_size))
        names = list(class_names)
        if len(names) == spec.data_config.num_classes - 1:
            names = ["background"] + names
        self.class_names = names

    def _label(self, c: int) -> str:
        return self.class_names[c] if 0 <= c < len(self.class_names) else str(c)

    def predict(self, images, score_threshold: float = 0.5,
                include_mask: bool = True) -> list[dict]:
        """Detections of each image, in input order.

        images: a list of file paths, PIL images, uint8 HWC arrays or uint8 CHW tensors (a single
        one, or a uint8 [B, 3, h, w] tensor, is accepted too). Returns one dict per image: boxes
        float32 [N, 4] (x1, y1, x2, y2) original pixels, scores float32 [N] (descending), classes
        int64 [N], labels list[str], masks bool [N, h, w] or None.
        """
        from mrcnn_helpers.data import resize_and_pad

        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) or (
                isinstance(images, torch.Tensor) and images.ndim == 3):
            images = [images]
        images = list(images)
        include_mask = include_mask and bool(self.spec.maskrcnn_config.include_mask)
        outputs = []
        for start in range(0, len(images), self.batch_size):
            padded, scales, sizes = [], [], []
            for image in images[start:start + self.batch_size]:
                tensor = to_image_tensor(image)
                p, s = resize_and_pad(tensor, image_size=self.image_size)
                padded.append(p)
                scales.append(float(s))
                sizes.append((int(tensor.shape[1]), int(tensor.shape[2])))
            batch = torch.stack(padded).to(self.device, non_blocking=True)
            dets = infer_batch(self.model, batch, use_amp=self.spec.use_amp)
            for i in range(batch.shape[0]):
                out = postprocess_detections(dets, i, scales[i], sizes[i], score_threshold,
                                             include_mask)
                out["labels"] = [self._label(int(c)) for c in out["classes"]]
                outputs.append(out)
        return outputs


def _write_json_atomic(data, path: Path) -> None:
    """JSON via a temporary file and os.replace: a failed write (disk full) leaves no half file
    and raises MrcnnError naming the path."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MrcnnError(f"could not write {path}: {exc.strerror or exc}") from exc


def run_inference(model, spec, class_names, category_ids, input_dir, output_dir, *,
                  threshold: float = 0.5, include_mask: bool = True, json_path=None, device=None,
                  progress: bool = True) -> dict:
    """Annotate every image of input_dir (`mrcnn infer`).

    Writes each image with its detections drawn (boxes, labels, scores, masks when include_mask)
    to output_dir under the same file name. With json_path, also writes the detections as a COCO
    results list: image_id = the image's index in the sorted listing, plus a "file_name" key;
    category_id from category_ids (index i-1 for label i; None keeps the contiguous label).
    Returns {"images": count, "detections": count, "output_dir": str, "json_path": str | None}.
    """
    from tqdm.auto import tqdm

    from mrcnn_helpers.data import load_image
    from mrcnn_helpers.evaluate import detections_to_coco_results
    from mrcnn_helpers.visualize import draw_instances

    files = iter_image_files(input_dir)
    output_dir = Path(output_dir)
    if output_dir.resolve() == Path(input_dir).resolve():
        raise DataError(f"output directory {output_dir} is the input directory: annotated images "
                        f"would overwrite the originals; choose another one")
    output_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(model, spec, class_names, device=device)
    results, num_detections = [], 0
    for start in tqdm(range(0, len(files), predictor.batch_size), desc="infer", unit="batch",
                      disable=not progress, file=sys.stdout):
        chunk = files[start:start + predictor.batch_size]
        images = [load_image(str(f)) for f in chunk]
        outputs = predictor.predict(images, score_threshold=threshold, include_mask=include_mask)
        for offset, (path, image, out) in enumerate(zip(chunk, images, outputs, strict=True)):
            drawn = draw_instances(image.permute(1, 2, 0).numpy(), out["boxes"], out["scores"],
                                   out["classes"], predictor.class_names, masks=out["masks"])
            drawn.save(output_dir / path.name)
            num_detections += len(out["scores"])
            if json_path is not None:
                for r in detections_to_coco_results(start + offset, out["boxes"], out["scores"],
                                                    out["classes"], out["masks"], category_ids):
                    r["file_name"] = path.name
                    results.append(r)
    if json_path is not None:
        _write_json_atomic(results, Path(json_path))
    return {"images": len(files), "detections": num_detections, "output_dir": str(output_dir),
            "json_path": str(json_path) if json_path is not None else None}
