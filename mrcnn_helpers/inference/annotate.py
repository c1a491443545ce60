"""`mrcnn infer`: annotate a folder of images and write their detections as COCO results."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from mrcnn_helpers.data.coco import read_coco_json
from mrcnn_helpers.data.images import list_image_files, load_image
from mrcnn_helpers.errors import DataError
from mrcnn_helpers.fileio import (
    atomic_output,
    atomic_write_json,
    check_output_path,
    check_writable_dir,
)
from mrcnn_helpers.visualize import draw_instances

from .coco_results import detections_to_coco_results
from .predictor import Predictor

# How image_id is chosen in --json results without an annotation file (said in the README).
POSITION_IDS = "position"


def image_ids_from_coco(json_file) -> dict[str, int]:
    """{file name: image id} of a COCO instances JSON (the names as its `file_name`s give them;
    their last path component too, so 'val/0001.png' matches the file 0001.png)."""
    data = read_coco_json(json_file)
    ids: dict[str, int] = {}
    for info in data["images"]:
        name = str(info.get("file_name", ""))
        if not name:
            continue
        ids[name] = int(info["id"])
        ids.setdefault(Path(name).name, int(info["id"]))
    return ids


def _ids_for(files: list[Path], image_ids: dict[str, int] | None, source) -> list[int]:
    if image_ids is None:
        return list(range(len(files)))
    missing = [f.name for f in files if f.name not in image_ids]
    if missing:
        raise DataError(f"{len(missing)} images of the input folder are not in {source} (e.g. "
                        f"{missing[0]}): their image ids are unknown; infer a folder of that "
                        "dataset's images, or drop --ann")
    return [image_ids[f.name] for f in files]


def check_annotation_outputs(input_dir, output_dir, *, json_path=None, ann_file=None,
                             inputs=()) -> None:
    """Refuse (MrcnnError naming both paths) outputs of annotate_images that would land on what
    it reads: the output folder may not be the input folder, lie inside it or inside another
    input, or be a file; --json may not be an input, lie in an input folder or be the output
    folder (it may lie inside that). inputs: other
    files the run reads (the model, the spec, its data, a labels file)."""
    output_dir = Path(output_dir)
    if output_dir.resolve() == Path(input_dir).resolve():
        raise DataError(f"output directory {output_dir} is the input directory: annotated images "
                        f"would overwrite the originals; choose another one")
    sources = [input_dir, ann_file, *inputs]
    check_output_path(output_dir, sources, option="output directory")
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"output directory {output_dir} is a file, not a folder: name a folder "
                        "for the annotated images")
    if json_path is not None:
        check_output_path(json_path, sources, option="--json")
        if Path(json_path).resolve() == output_dir.resolve():
            raise DataError(f"--json {json_path} is the output directory: name a JSON file")


def annotate_images(predictor: Predictor, input_dir, output_dir, *, threshold: float = 0.5,
                    include_mask: bool = True, json_path=None, ann_file=None,
                    progress: bool = True, inputs=()) -> dict:
    """Annotate every image of input_dir (`mrcnn infer`).

    Writes each image with its detections drawn (boxes, labels, scores, masks when include_mask)
    to output_dir under the same file name, each atomically (fileio: a full disk leaves no
    partial image). With json_path, also writes the detections as a COCO results list (each
    result also has "file_name"); category_id is the dataset's COCO id
    (predictor.category_ids). image_id: the dataset's id of the file when `ann_file` (a COCO
    JSON listing the images) is given, so the results can be scored against it; otherwise the
    image's position (0, 1, ...) in the sorted listing. Neither output may land on what the run
    reads (check_annotation_outputs; inputs: the model, spec and other files read). Returns
    {"images", "detections", "output_dir", "json_path", "image_ids"}.
    """
    files = list_image_files(input_dir)
    output_dir = Path(output_dir)
    check_annotation_outputs(input_dir, output_dir, json_path=json_path, ann_file=ann_file,
                             inputs=inputs)
    ids = _ids_for(files, image_ids_from_coco(ann_file) if ann_file else None, ann_file)
    check_writable_dir(output_dir, option="output directory")
    results, num_detections = [], 0
    for start in tqdm(range(0, len(files), predictor.batch_size), desc="infer", unit="batch",
                      disable=not progress, file=sys.stdout):
        chunk = files[start:start + predictor.batch_size]
        images = [load_image(f) for f in chunk]
        outputs = predictor.predict(images, score_threshold=threshold, include_mask=include_mask)
        for offset, (path, image, out) in enumerate(zip(chunk, images, outputs, strict=True)):
            drawn = draw_instances(image.permute(1, 2, 0).numpy(), out["boxes"], out["scores"],
                                   out["classes"], predictor.class_names, masks=out["masks"])
            with atomic_output(output_dir / path.name, "wb", what="annotated image") as f:
                drawn.save(f, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
            num_detections += len(out["scores"])
            if json_path is not None:
                for r in detections_to_coco_results(ids[start + offset], out["boxes"],
                                                    out["scores"], out["classes"], out["masks"],
                                                    predictor.category_ids):
                    r["file_name"] = path.name
                    results.append(r)
    if json_path is not None:
        atomic_write_json(json_path, results, indent=None, what="COCO results")
    return {"images": len(files), "detections": num_detections, "output_dir": str(output_dir),
            "json_path": str(json_path) if json_path is not None else None,
            "image_ids": "dataset" if ann_file else POSITION_IDS}
