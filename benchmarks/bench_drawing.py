"""Drawing detections on a 1344x832 frame: ours against torchvision's drawing utilities.

    python benchmarks/bench_drawing.py [--detections 20,100] [--repeats 5] [--device cpu]

The frame and masks are what postprocessing hands over: N full-resolution bool masks (ellipses
filling boxes of 30-300 px) with scores and classes. Rows:
- visualize.draw_instances (the host path of `mrcnn infer`, the notebooks and deploys with an
  ONNX Runtime or TensorRT model): one drawing per object, masks blended at alpha 0.5, box
  outlines and labels;
- torchvision.utils.draw_segmentation_masks + draw_bounding_boxes with labels (the stock way;
  it draws every instance, no choice of one drawing per object);
- deploy.overlay.composite_masks + visualize.draw_boxes_and_labels on --device (the deploy
  pipeline's path for a PyTorch model; on CUDA the Triton blend).
And the step before drawing on the host: pasting the detections' 28x28 masks at full
resolution on the CPU, over the whole image (paste_masks_in_image, then the threshold) against
paste_binary_masks (over each box only). Prints ms per frame with the machine, date and versions.
"""

import argparse
import datetime
import os
import platform
import time

import numpy as np
import torch
import torchvision
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from mrcnn_helpers.deploy.overlay import composite_masks
from mrcnn_helpers.model.masks import paste_binary_masks, paste_masks_in_image
from mrcnn_helpers.visualize import class_color, draw_boxes_and_labels, draw_instances

H, W = 832, 1344


def scene(n: int, rng):
    frame = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    xy = rng.uniform(0, [W - 320, H - 320], (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(30, 300, (n, 2))], 1)
    ys, xs = np.ogrid[:H, :W]
    masks = np.zeros((n, H, W), dtype=bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i] = ((2 * xs + 1 - x1 - x2) / (x2 - x1)) ** 2 + \
            ((2 * ys + 1 - y1 - y2) / (y2 - y1)) ** 2 <= 1
    scores = np.sort(rng.uniform(0.5, 1, n))[::-1].copy()
    return frame, boxes, masks, scores, rng.integers(1, 91, n)


def timed(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats * 1000.0


def measure(n: int, rng, names, repeats: int, device, sync) -> tuple:
    """(n, draw_instances ms, torchvision ms, deploy path ms, whole-image paste ms, paste over
    the boxes ms) for one scene of n detections."""
    frame, boxes, masks, scores, classes = scene(n, rng)
    ours = timed(lambda: draw_instances(frame, boxes, scores, classes, names, masks=masks),
                 repeats)
    image, tmasks = torch.from_numpy(frame).permute(2, 0, 1), torch.from_numpy(masks)
    tboxes = torch.from_numpy(boxes).float()
    colors = [class_color(int(c)) for c in classes]
    labels = [f"{names[int(c)]} {s:.2f}" for c, s in zip(classes, scores, strict=True)]

    def stock():
        drawn = draw_segmentation_masks(image, tmasks, alpha=0.5, colors=colors)
        return draw_bounding_boxes(drawn, tboxes, labels=labels, colors=colors, width=4)

    dframe = torch.from_numpy(frame).to(device)
    dmasks, dclasses = torch.from_numpy(masks).to(device), torch.from_numpy(classes)

    def deploy_path():
        blended, drawn = composite_masks(dframe, dmasks, dclasses)
        return draw_boxes_and_labels(blended.cpu().numpy(), boxes, scores, classes, names,
                                     drawn.numpy())

    probs = torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(n))
    whole = timed(lambda: paste_masks_in_image(probs, tboxes, H, W) >= 0.5, repeats)
    in_boxes = timed(lambda: paste_binary_masks(probs, tboxes, H, W), repeats)
    return (n, ours, timed(stock, repeats), timed(deploy_path, repeats, sync), whole, in_boxes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--detections", default="20,100")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="where the deploy path composites")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = ["background"] + [f"class{i}" for i in range(1, 91)]
    rng = np.random.default_rng(0)
    rows = [measure(int(v), rng, names, args.repeats, device, sync)
            for v in args.detections.split(",")]
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else platform.processor() or platform.machine())
    print(f"{datetime.date.today()}, {os.cpu_count()} CPU cores, deploy path on {args.device} "
          f"({where}), torch {torch.__version__}, torchvision {torchvision.__version__}, frame "
          f"{W}x{H}, {args.repeats} repeats")
    print("| detections | draw_instances (host) ms | torchvision draw_segmentation_masks + "
          "draw_bounding_boxes ms | composite_masks + labels (deploy path) ms |")
    print("|---|---|---|---|")
    for n, ours, stock_ms, deploy_ms, _, _ in rows:
        print(f"| {n} | {ours:.1f} | {stock_ms:.1f} | {deploy_ms:.1f} |")
    print("\n| detections | paste on the CPU, whole image, ms | over the boxes, ms |")
    print("|---|---|---|")
    for n, *_, whole, in_boxes in rows:
        print(f"| {n} | {whole:.1f} | {in_boxes:.1f} |")


if __name__ == "__main__":
    main()
