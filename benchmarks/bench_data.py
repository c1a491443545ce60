"""Throughput of the training input pipeline and the cost of COCO evaluation; needs no GPU.

    python benchmarks/bench_data.py [--workers 4,8,16] [--train-images 400] [--eval-images 5000]
    python benchmarks/bench_data.py --train-images 32 --workers 2 --eval-images 50   # quick check
    --only loader / --only eval runs one part (5000-image evaluation takes minutes on one core).

1. Training loader: `build_train_loader(spec)` exactly as the trainer builds it, with the seed
   spec (`specs/maskrcnn_coco_resnet50.txt`) changed only in image_size (default 832x1344), the
   data paths, num_classes, train_batch_size (8), n_workers and augment_input_data (on). The data
   is the synthetic shapes set (`generate_synthetic_dataset`) drawn at 640x480 like most COCO
   images and re-saved as JPEG, so each sample costs what a COCO one does: JPEG decode, scale
   jitter + flip + resize + crop/pad to image_size, per-instance mask crops resized to
   gt_mask_size, then collation (and pinning, when CUDA is present). The synthetic images average
   fewer instances than COCO's ~7 (printed), so mask-target work is somewhat understated. The set
   is written once to --data-dir and reused. images/s is counted over --batches batches after
   --warmup batches (worker start-up excluded); the main process only consumes batches, so this
   is the loader's ceiling, not what a training step leaves it.
2. COCO evaluation of --eval-images images: an in-memory COCO ground truth (640x480-ish images,
   ~7 polygon instances each, COCO's 80 category ids) and 100 detections per image with full-
   resolution bool masks, as `postprocess_detections` hands them over. Timed separately:
   `detections_to_coco_results` (mask RLE encoding + result dicts, done during prediction) and
   `coco_evaluate` for bbox and for segm (loadRes, COCOeval evaluate/accumulate/summarize,
   per-class AP). Making the synthetic masks is not timed. --eval-device cuda makes the masks on
   the GPU and times the GPU path: the run boundaries found there (`mask_runs`), then the
   compression and result dicts on the CPU.

Prints a markdown table with the date, CPU model and cores, GPU (if any) and library versions.
"""

import argparse
import datetime
import importlib.metadata
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mrcnn_helpers.data import build_train_loader, generate_synthetic_dataset
from mrcnn_helpers.data.coco import coco_from_dict
from mrcnn_helpers.evaluate import coco_evaluate, detections_to_coco_results
from mrcnn_helpers.inference.coco_results import mask_runs
from mrcnn_helpers.spec import load_spec, replace_spec

SEED_SPEC = os.path.join(os.path.dirname(__file__), "..", "specs", "maskrcnn_coco_resnet50.txt")
TARGET_IMG_S = 250  # training loader, on the GPU machine (16 CPU cores)
COCO_CAT_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
COCO_SIZES = ((480, 640), (640, 480), (427, 640), (640, 427), (480, 640), (512, 640))  # (h, w), 480x640 twice


def jpeg_train_set(data_dir, num_images, height, width, quality):
    """(json, image dir, instances/image, mean KiB) of the synthetic train split as JPEG files."""
    json_path = os.path.join(data_dir, "train_jpeg.json")
    image_dir = os.path.join(data_dir, "train_jpeg")
    made = [num_images, height, width, quality]
    coco = json.loads(Path(json_path).read_text()) if os.path.isfile(json_path) else None
    if coco is None or coco["info"].get("bench") != made:
        print(f"writing {num_images} {height}x{width} JPEGs to {data_dir} ...", flush=True)
        paths = generate_synthetic_dataset(data_dir, num_train=num_images, num_val=0,
                                           image_size=(height, width))
        coco = json.loads(Path(paths["train_json"]).read_text())
        os.makedirs(image_dir, exist_ok=True)
        for image in coco["images"]:
            png = os.path.join(paths["train_images"], image["file_name"])
            image["file_name"] = image["file_name"].rsplit(".", 1)[0] + ".jpg"
            Image.open(png).save(os.path.join(image_dir, image["file_name"]), quality=quality)
            os.remove(png)
        coco["info"]["bench"] = made
        Path(json_path).write_text(json.dumps(coco))
    sizes = [os.path.getsize(os.path.join(image_dir, im["file_name"])) for im in coco["images"]]
    return json_path, image_dir, len(coco["annotations"]) / len(sizes), np.mean(sizes) / 1024


def loader_throughput(spec, batches, warmup):
    """(images, seconds) of `batches` batches from the project's training loader, after `warmup`
    batches; the loader (and its persistent workers) is released on return."""
    stream = itertools.chain.from_iterable(itertools.repeat(build_train_loader(spec)))
    for _ in range(warmup):
        next(stream)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += next(stream)["image"].shape[0]
    return images, time.perf_counter() - start


def random_polygon(rng, h, w):
    """A star-shaped polygon of COCO-like size: (flat x,y list, area, [x, y, w, h])."""
    side = float(np.exp(rng.uniform(np.log(10), np.log(min(h, w) * 0.6))))
    aspect = float(np.exp(rng.uniform(-0.7, 0.7)))
    rx, ry = side * aspect ** 0.5 / 2, side / aspect ** 0.5 / 2
    cx, cy = rng.uniform(rx, w - rx), rng.uniform(ry, h - ry)
    theta = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(8, 33))))
    radius = rng.uniform(0.6, 1.0, theta.size)
    xs, ys = cx + rx * radius * np.cos(theta), cy + ry * radius * np.sin(theta)
    area = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
    box = [float(v) for v in (xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min())]
    return np.stack((xs, ys), 1).round(2).ravel().tolist(), float(area), box


def synthetic_ground_truth(num_images, per_image, rng):
    images, anns = [], []
    for image_id in range(1, num_images + 1):
        h, w = COCO_SIZES[int(rng.integers(len(COCO_SIZES)))]
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": h, "width": w})
        for _ in range(int(rng.poisson(per_image))):
            poly, area, box = random_polygon(rng, h, w)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "iscrowd": 0, "area": area,
                         "category_id": COCO_CAT_IDS[int(rng.integers(80))], "bbox": box,
                         "segmentation": [poly]})
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in COCO_CAT_IDS]
    return coco_from_dict({"images": images, "annotations": anns, "categories": cats})


def synthetic_detections(gt, image_id, dets, rng, device=None):
    """`dets` predictor-like detections: three jittered copies of each ground-truth box, the rest
    random; (boxes x1y1x2y2, scores, labels 1..80, bool masks [N, h, w]) as tensors, the masks
    made on `device` (None: with numpy on the CPU)."""
    info = gt.imgs[image_id]
    h, w = info["height"], info["width"]
    label_of = {c: i + 1 for i, c in enumerate(COCO_CAT_IDS)}
    gts = gt.imgToAnns.get(image_id, [])
    boxes, labels = np.zeros((dets, 4)), rng.integers(1, 81, dets)
    for i in range(dets):
        if gts and i < 3 * len(gts):  # mostly of the right class
            ann = gts[i % len(gts)]
            x, y, bw, bh = ann["bbox"]
            boxes[i] = np.array([x, y, x + bw, y + bh]) + rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
            if rng.random() < 0.8:
                labels[i] = label_of[ann["category_id"]]
        else:
            _, _, (x, y, bw, bh) = random_polygon(rng, h, w)
            boxes[i] = [x, y, x + bw, y + bh]
    boxes = np.clip(boxes, 0, [w, h, w, h])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    scores = np.sort(rng.random(dets))[::-1].copy()
    masks = ellipse_masks(boxes, h, w, device)
    return torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(), \
        torch.from_numpy(labels), masks


def ellipse_masks(boxes: np.ndarray, h: int, w: int, device=None) -> torch.Tensor:
    """bool [N, h, w]: an ellipse filling each box, as a pasted mask (pixel centres inside)."""
    if device is not None:
        b = torch.as_tensor(boxes, dtype=torch.float64, device=device)[:, :, None, None]
        xs = torch.arange(w, device=device, dtype=torch.float64)[None, None, :]
        ys = torch.arange(h, device=device, dtype=torch.float64)[None, :, None]
        x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
        return ((2 * xs + 1 - x1 - x2) / (x2 - x1)) ** 2 + \
            ((2 * ys + 1 - y1 - y2) / (y2 - y1)) ** 2 <= 1
    masks = np.zeros((len(boxes), h, w), dtype=bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        rows, cols = slice(int(y1), int(np.ceil(y2))), slice(int(x1), int(np.ceil(x2)))
        ys, xs = np.ogrid[rows, cols]
        masks[i, rows, cols] = ((2 * xs + 1 - x1 - x2) / (x2 - x1)) ** 2 + \
            ((2 * ys + 1 - y1 - y2) / (y2 - y1)) ** 2 <= 1
    return torch.from_numpy(masks)


def eval_timings(num_images, per_image, dets, device=None):
    """(notes line, table rows) of RLE encoding and coco_evaluate over synthetic data. device
    "cuda": the masks are made on the GPU and encoded as evaluation does there (mask_runs on
    the GPU, then compression and result dicts on the CPU; evaluation overlaps the two with
    the next batch's forward, here they are timed one after the other)."""
    rng = np.random.default_rng(0)
    gt = synthetic_ground_truth(num_images, per_image, rng)
    results, t_runs, t_rle = [], 0.0, 0.0
    for image_id in sorted(gt.imgs):
        boxes, scores, labels, masks = synthetic_detections(gt, image_id, dets, rng, device)
        if device is not None:
            torch.cuda.synchronize()
            start = time.perf_counter()
            masks = mask_runs(masks)
            t_runs += time.perf_counter() - start
        start = time.perf_counter()
        results += detections_to_coco_results(image_id, boxes, scores, labels, masks, COCO_CAT_IDS)
        t_rle += time.perf_counter() - start
    rows = []
    if device is not None:
        rows.append(("RLE run boundaries on the GPU (mask_runs)", num_images, t_runs, ""))
        rows.append(("RLE compress + result dicts (detections_to_coco_results)", num_images,
                     t_rle, ""))
    else:
        rows.append(("RLE encode + result dicts (detections_to_coco_results)", num_images, t_rle,
                     ""))
    for iou_type, key in (("bbox", "AP"), ("segm", "mask_AP")):
        start = time.perf_counter()
        ap = coco_evaluate(gt, results, (iou_type,))[key]
        rows.append((f"coco_evaluate {iou_type} (AP {ap:.3f})", num_images,
                     time.perf_counter() - start, ""))
    rows.append(("evaluation total (RLE + bbox + segm)", num_images, sum(r[2] for r in rows),
                 "<= 60 s for 5000"))
    where = "GPU" if device is not None else "CPU"
    return (f"eval: {num_images} images, {len(gt.anns) / num_images:.1f} gt polygons/image, "
            f"80 categories, {len(results)} detections with full-resolution masks on the "
            f"{where}"), rows


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="4,8,16", help="comma-separated n_workers to sweep")
    ap.add_argument("--train-images", type=int, default=400)
    ap.add_argument("--source-size", default="480x640", help="synthetic image HxW (COCO-like)")
    ap.add_argument("--image-size", default="832x1344", help="network input HxW (data_config)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=60, help="timed batches per worker count")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the synthetic images")
    ap.add_argument("--data-dir", default=None, help="default: a folder in the system temp dir")
    ap.add_argument("--eval-images", type=int, default=5000)
    ap.add_argument("--gt-per-image", type=float, default=7.0)
    ap.add_argument("--dets-per-image", type=int, default=100)
    ap.add_argument("--only", choices=["loader", "eval"], default=None)
    ap.add_argument("--eval-device", default=None,
                    help="cuda: masks on the GPU, encoded as evaluation does there")
    args = ap.parse_args()
    src_h, src_w = (int(v) for v in args.source_size.lower().split("x"))
    net_h, net_w = (int(v) for v in args.image_size.lower().split("x"))
    rows, notes = [], []

    if args.only in (None, "loader"):
        data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), (
            f"mrcnn_bench_data_{args.train_images}_{src_h}x{src_w}_q{args.quality}"))
        json_path, image_dir, inst, kib = jpeg_train_set(data_dir, args.train_images, src_h, src_w,
                                                         args.quality)
        base = replace_spec(load_spec(SEED_SPEC), train_batch_size=args.batch, **{
            "data_config.image_size": (net_h, net_w), "data_config.train_json_file": json_path,
            "data_config.train_image_dir": image_dir, "data_config.num_classes": 4,
            "data_config.augment_input_data": True})
        dc, mc = base.data_config, base.maskrcnn_config
        notes.append(f"loader: {args.train_images} synthetic {src_h}x{src_w} JPEGs, quality "
                     f"{args.quality}, mean {kib:.0f} KiB, {inst:.1f} instances/image -> "
                     f"{net_h}x{net_w}, augment on, max_num_instances {dc.max_num_instances}, "
                     f"gt_mask_size {mc.gt_mask_size}, {args.warmup} warm-up + {args.batches} "
                     f"timed batches per worker count")
        for workers in (int(v) for v in args.workers.split(",")):
            spec = replace_spec(base, **{"data_config.n_workers": workers})
            images, seconds = loader_throughput(spec, args.batches, args.warmup)
            rows.append((f"train loader, {workers} workers, batch {args.batch}", images, seconds,
                         f">= {TARGET_IMG_S} img/s"))
            print(f"  {workers} workers: {images / seconds:.1f} img/s", flush=True)

    if args.only in (None, "eval"):
        print(f"building {args.eval_images} images of ground truth and detections ...", flush=True)
        note, eval_rows = eval_timings(args.eval_images, args.gt_per_image, args.dets_per_image,
                                       args.eval_device)
        notes.append(note)
        rows += eval_rows

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"\n{datetime.date.today()}, CPU {cpu_model()} ({os.cpu_count()} cores, "
          f"{len(os.sched_getaffinity(0))} usable), {gpu}, torch {torch.__version__}, torchvision "
          f"{importlib.metadata.version('torchvision')}, pycocotools "
          f"{importlib.metadata.version('pycocotools')}")
    for note in notes:
        print(note)
    print(f"\n| {'job':<60} | images | seconds |   img/s | target          |")
    print(f"|{'-' * 62}|--------|---------|---------|-----------------|")
    for job, images, seconds, target in rows:
        print(f"| {job:<60} | {images:>6} | {seconds:>7.2f} | {images / seconds:>7.1f} "
              f"| {target:<15} |")


if __name__ == "__main__":
    main()
