"""Speed and memory of our Mask R-CNN against stock torchvision, configured identically, in one run.

    python benchmarks/bench_maskrcnn.py [--batch 8] [--iters 10] [--height 832 --width 1344]

Both models: ResNet-50-FPN, 91 classes, freeze_blocks [0, 1] (torchvision: trainable_layers=3),
frozen BatchNorm, the seed spec's RPN/RoI settings, bf16 autocast, synthetic images of the given
size with `--objects` instances each (random boxes with filled masks). Random weights: training
uses learning rate 0 so the measured work stays constant (a random-init model with a learning
rate diverges within a few steps and silently does less work); inference uses score threshold 0,
so both produce exactly `test_detections_per_image` (100) detections per image and paste all
masks at full resolution. Prints a table (img/s, ms per step, peak GPU memory, ratio to stock)
with device, date and versions. Needs a CUDA GPU.

Ours runs as the trainer and the Predictor run it: the training step replayed from a CUDA graph
(engine.graphed_step, after its eager warm-up) and the inference forward from CUDA graphs
(inference.graphs); --eager runs both eagerly (MRCNN_KERNELS=0 in the environment also turns
the Triton kernels off, for the history table). Batch-1 inference also reports p50 / p99
latency over --latency-calls calls.
"""

import argparse
import datetime
import os
import time

import torch
from train_step import make_train_step

from mrcnn_helpers.engine.distributed import DistContext
from mrcnn_helpers.model import build_model, paste_binary_masks, place_model
from mrcnn_helpers.spec import load_spec, replace_spec

SEED_SPEC = os.path.join(os.path.dirname(__file__), "..", "specs", "maskrcnn_coco_resnet50.txt")


def synthetic_batch(batch, height, width, objects, mask_size, device, gen):
    """uint8 images [B,3,H,W]; boxes [B,M,4]; classes [B,M]; box-relative masks [B,M,S,S];
    plus full-resolution masks [B,M,H,W] for torchvision."""
    images = torch.randint(0, 256, (batch, 3, height, width), generator=gen, dtype=torch.uint8)
    wh = torch.rand(batch, objects, 2, generator=gen) * torch.tensor([width, height]) * 0.4 + 16
    xy = torch.rand(batch, objects, 2, generator=gen) * (torch.tensor([width, height]) - wh)
    boxes = torch.cat((xy, xy + wh), dim=-1).floor()
    classes = torch.randint(1, 91, (batch, objects), generator=gen)
    rel_masks = torch.full((batch, objects, mask_size, mask_size), 255, dtype=torch.uint8)
    full = torch.zeros(batch, objects, height, width, dtype=torch.uint8)
    for b in range(batch):
        for i in range(objects):
            x1, y1, x2, y2 = boxes[b, i].long().tolist()
            full[b, i, y1:y2, x1:x2] = 1
    to = dict(device=device)
    return images.to(**to), boxes.to(**to), classes.to(**to), rel_masks.to(**to), full.to(**to)


def build_stock(spec, device):
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    cfg = spec.maskrcnn_config
    h, w = spec.data_config.image_size
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), trainable_layers=3)
    model = MaskRCNN(
        backbone, num_classes=spec.data_config.num_classes, min_size=min(h, w), max_size=max(h, w),
        rpn_pre_nms_top_n_train=cfg.train_rpn_pre_nms_topn,
        rpn_post_nms_top_n_train=cfg.train_rpn_post_nms_topn,
        rpn_pre_nms_top_n_test=cfg.test_rpn_pre_nms_topn,
        rpn_post_nms_top_n_test=cfg.test_rpn_post_nms_topn,
        rpn_nms_thresh=cfg.train_rpn_nms_threshold, rpn_fg_iou_thresh=cfg.rpn_positive_overlap,
        rpn_bg_iou_thresh=cfg.rpn_negative_overlap, rpn_batch_size_per_image=cfg.rpn_batch_size_per_im,
        box_score_thresh=0.0, box_nms_thresh=cfg.test_nms,
        box_detections_per_img=cfg.test_detections_per_image,
        box_batch_size_per_image=cfg.batch_size_per_im, box_positive_fraction=cfg.fg_fraction)
    return model.to(device)


def timed(fn, iters, warmup=3):
    """(seconds per call, GiB the calls took): peak reserved memory above what was reserved
    before the first call (weights excluded; gradients, optimizer state, activations and a CUDA
    graph's private pool, which counts as reserved, included)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    return seconds, (torch.cuda.max_memory_reserved() - base) / 2**30


def bench_train_ours(model, images, targets, iters, *, eager: bool):
    """Our step as the trainer runs it (train_step.make_train_step), at learning rate 0."""
    model.train()
    step, meter = make_train_step(model, images.device, graphs=not eager)
    result = timed(lambda: step(images, targets, 0.0), iters, warmup=6)
    terms, _ = meter.read_window(DistContext())
    return result, {k: round(v, 3) for k, v in terms.items()}


def latency_ms(fn, calls: int) -> tuple[float, float]:
    """(p50, p99) wall milliseconds of `calls` synchronized calls."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(0.99 * len(times)))]


def bench_train(model, step_fn, iters):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)
    model.train()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = step_fn()
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return losses

    losses = step()
    return timed(step, iters), {k: round(float(v), 3) for k, v in losses.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--height", type=int, default=832)
    ap.add_argument("--width", type=int, default=1344)
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--only", choices=["train", "infer"], default=None)
    ap.add_argument("--ours-only", action="store_true", help="skip stock torchvision")
    ap.add_argument("--nchw", action="store_true", help="ours without channels_last")
    ap.add_argument("--compile", action="store_true",
                    help="experiment: ours with torch.compile over backbone + FPN and the RPN head")
    ap.add_argument("--eager", action="store_true",
                    help="ours without CUDA graphs (training step and inference forward)")
    ap.add_argument("--latency-calls", type=int, default=200,
                    help="batch-1 inference calls for the p50 / p99 latency")
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True

    spec = replace_spec(load_spec(SEED_SPEC), checkpoint="", **{
        "data_config.image_size": (args.height, args.width), "data_config.max_num_instances": 100,
        "maskrcnn_config.test_score_thresh": 0.0})
    cfg = spec.maskrcnn_config
    gen = torch.Generator().manual_seed(0)
    images, boxes, classes, rel_masks, full_masks = synthetic_batch(
        args.batch, args.height, args.width, args.objects, cfg.gt_mask_size, device, gen)
    pad = spec.data_config.max_num_instances - args.objects
    targets = {"boxes": torch.nn.functional.pad(boxes, (0, 0, 0, pad)),
               "classes": torch.nn.functional.pad(classes, (0, pad)),
               "masks": torch.nn.functional.pad(rel_masks, (0, 0, 0, 0, 0, pad))}
    stock_images = [im.float() / 255 for im in images]
    stock_targets = [{"boxes": boxes[b], "labels": classes[b], "masks": full_masks[b]}
                     for b in range(args.batch)]

    torch.manual_seed(0)
    ours = place_model(build_model(spec), device)
    ours.channels_last_on_cuda = not args.nchw
    if args.compile:
        ours.backbone = torch.compile(ours.backbone)
        ours.rpn.head = torch.compile(ours.rpn.head)
    stock = None if args.ours_only else build_stock(spec, device)
    nothing = (float("nan"), float("nan"))
    rows = []

    if args.only in (None, "train"):
        (t_ours, m_ours), l_ours = bench_train_ours(ours, images, targets, args.iters,
                                                    eager=args.eager)
        (t_stock, m_stock), l_stock = nothing, {}
        if stock is not None:
            (t_stock, m_stock), l_stock = bench_train(
                stock, lambda: stock(stock_images, stock_targets), args.iters)
        print("losses ours:", l_ours, "\nlosses stock:", l_stock, flush=True)
        rows.append(("train step", args.batch, t_ours, m_ours, t_stock, m_stock))

    if args.only in (None, "infer"):
        from mrcnn_helpers.inference.graphs import GraphedForward

        ours.eval()
        h, w = args.height, args.width
        graphed = GraphedForward(ours, torch.bfloat16)

        def ours_infer(n):
            if args.eager:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    out = ours(images[:n])
            else:
                out = graphed(images[:n])
            # The Predictor's paste (postprocess_detections): bool masks at full resolution.
            pasted = [paste_binary_masks(out["masks"][i], out["boxes"][i], h, w, 0.5)
                      for i in range(n)]
            return out, pasted

        def stock_infer(n):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return stock(stock_images[:n])

        for n in sorted({1, args.batch}):
            (t_o, m_o) = timed(lambda: ours_infer(n), args.iters)
            dets_o = int(ours_infer(n)[0]["num_detections"].float().mean())
            (t_s, m_s), dets_s = nothing, "-"
            if stock is not None:
                stock.eval()
                (t_s, m_s) = timed(lambda: stock_infer(n), args.iters)
                dets_s = sum(len(r["boxes"]) for r in stock_infer(n)) // n
            rows.append((f"inference ({dets_o}/{dets_s} dets/img, masks pasted)", n, t_o, m_o,
                         t_s, m_s))
            if n == 1 and args.latency_calls:
                p50, p99 = latency_ms(lambda: ours_infer(1), args.latency_calls)
                latency = (p50, p99)
        if args.latency_calls:
            print(f"batch-1 latency over {args.latency_calls} calls, ours: p50 {latency[0]:.2f} "
                  f"ms, p99 {latency[1]:.2f} ms", flush=True)

    props = torch.cuda.get_device_properties(device)
    print(f"\n{props.name}, torch {torch.__version__}, torchvision "
          f"{__import__('torchvision').__version__}, {datetime.date.today()}, "
          f"{args.height}x{args.width}, {args.objects} objects/image, bf16 autocast, ours "
          f"{'NCHW' if args.nchw else 'channels_last'}{', compiled' if args.compile else ''}"
          f"{', eager' if args.eager else ', CUDA graphs'}, Triton kernels "
          f"{'off' if os.environ.get('MRCNN_KERNELS') == '0' else 'on'}")
    head = f"| {'job':<46} | batch | ours img/s | ours ms | ours GiB | stock img/s | stock ms | stock GiB | ours/stock |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for job, n, t_o, m_o, t_s, m_s in rows:
        print(f"| {job:<46} | {n:>5} | {n / t_o:>10.1f} | {t_o * 1e3:>7.1f} | {m_o:>8.1f} | "
              f"{n / t_s:>11.1f} | {t_s * 1e3:>8.1f} | {m_s:>9.1f} | {t_s / t_o:>9.2f}x |")


if __name__ == "__main__":
    main()
