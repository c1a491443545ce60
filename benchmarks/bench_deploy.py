"""`mrcnn deploy`'s pipeline on a 1344x832 video: decode, batch, infer, draw, encode, end to end.

    python benchmarks/bench_deploy.py [--frames 400] [--batch 8]

The test video is made here with OpenCV (moving shapes, mp4v). The model is the seed spec's
ResNet-50-FPN (91 classes) at 832x1344 with random weights, PyTorch backend, bf16, CUDA graphs,
as `mrcnn deploy -m model.pth` runs it; its score threshold is 0, so every frame has
`--detections` detections (the model's fixed output) and all of them are drawn except second
drawings of an object. Rows: masks composited on the GPU (the default on a GPU) with 100 and 20
detections per frame into an .avi (Motion JPEG, frames encoded by the drawing threads), 20 into
an .mp4 (mp4v, one encoder), and the host drawing path for comparison (fewer frames: it is
slow).
Prints FPS, frame latency and inference time per batch, and where each frame's time goes by
stage (decode, preprocess, model, masks postprocessed and composited, copy to the host,
drawing boxes and labels, encoding; deploy.pipeline.STAGES names the thread of each), with
device, date and versions. cuDNN's autotuner stays off unless --cudnn-benchmark (the toolkit
does not turn it on).
"""

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mrcnn_helpers.deploy import VideoSink, open_sink, open_source, run_deploy
from mrcnn_helpers.deploy.pipeline import STAGES
from mrcnn_helpers.inference import Predictor
from mrcnn_helpers.model import build_model
from mrcnn_helpers.spec import load_spec, replace_spec

SEED_SPEC = os.path.join(os.path.dirname(__file__), "..", "specs", "maskrcnn_coco_resnet50.txt")


def make_video(path: Path, frames: int, width: int, height: int, fps: float = 30.0) -> None:
    """Moving filled circles and rectangles on a gradient, written with OpenCV."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    rng = np.random.default_rng(0)
    base = np.linspace(40, 200, width, dtype=np.uint8)[None, :, None].repeat(height, 0)
    base = np.repeat(base, 3, 2)
    objects = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-6, 6),
                rng.uniform(-6, 6), int(rng.integers(30, 120)),
                tuple(int(c) for c in rng.integers(0, 256, 3))) for _ in range(12)]
    for t in range(frames):
        frame = base.copy()
        for k, (x, y, vx, vy, r, color) in enumerate(objects):
            cx, cy = int((x + vx * t) % width), int((y + vy * t) % height)
            if k % 2:
                cv2.circle(frame, (cx, cy), r, color, -1)
            else:
                cv2.rectangle(frame, (cx - r, cy - r // 2), (cx + r, cy + r // 2), color, -1)
        writer.write(frame)
    writer.release()


def run_row(model, spec, video, out_dir, batch, frames, on_device, device, threads=None,
            suffix=".avi"):
    precision = "bf16" if device.type == "cuda" else "fp32"
    predictor = Predictor(model, spec, device=device, precision=precision)
    source = open_source(str(video))
    sink = open_sink(out_dir / f"out_{on_device}_{spec.maskrcnn_config.test_detections_per_image}"
                     f"{suffix}", fps=source.fps)
    return run_deploy(predictor, source, sink, batch_size=batch, threshold=0.0,
                      max_frames=frames, progress=False, draw_on_device=on_device,
                      draw_threads=threads)


def encode_only(video: Path, work: Path, frames: int, suffix: str) -> float:
    """Milliseconds per frame the video sink needs for `frames` decoded frames, alone (one
    thread)."""
    source = open_source(str(video))
    decoded = [frame for _, (_, frame) in zip(range(frames), source, strict=False)]
    source.close()
    sink = VideoSink(work / f"encode_only{suffix}", 30.0, encoder_process=False)
    t0 = time.perf_counter()
    for i, frame in enumerate(decoded):
        sink.write(f"frame_{i:06d}", frame)
    seconds = time.perf_counter() - t0
    sink.close()
    return seconds / max(len(decoded), 1) * 1000.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--host-frames", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=1344)
    ap.add_argument("--height", type=int, default=832)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--rows", default="100:auto,20:auto,20:auto:mp4",
                    help="GPU-drawing rows, comma-separated detections:drawing threads "
                         "(auto: the toolkit's choice)[:avi|mp4, the output video (avi by "
                         "default: Motion JPEG, encoded by the drawing threads; mp4: mp4v, "
                         "one encoder)][:process|thread, who encodes an mp4: the toolkit's "
                         "choice by default]")
    ap.add_argument("--encode-only", type=int, default=100,
                    help="frames for the encoder-alone row (0: none)")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_deploy_"))
    video = work / "test.mp4"
    make_video(video, args.frames + 16, args.width, args.height)
    rows = []
    cases = []
    for row in args.rows.split(","):
        d, t, *extra = row.split(":")
        suffix = next((f".{x}" for x in extra if x in ("avi", "mp4")), ".avi")
        encoder = next((x for x in extra if x in ("process", "thread")), "")
        cases.append((int(d), True, args.frames, None if t == "auto" else int(t), encoder,
                      suffix))
    if args.host_frames:
        cases.append((20, False, args.host_frames, None, "", ".avi"))
    models = {}
    for detections, on_device, frames, n_threads, encoder, suffix in cases:
        # VideoSink reads it when the row opens its output
        os.environ["MRCNN_ENCODER_PROCESS"] = {"process": "1", "thread": "0"}.get(encoder, "")
        spec = replace_spec(load_spec(SEED_SPEC), checkpoint="", **{
            "data_config.image_size": (args.height, args.width),
            "maskrcnn_config.test_score_thresh": 0.0,
            "maskrcnn_config.test_detections_per_image": detections})
        torch.manual_seed(0)
        model = models.setdefault(detections, build_model(spec))
        # Warm-up: graph capture and cuDNN's algorithm search happen outside the timed run.
        t0 = time.perf_counter()
        run_row(model, spec, video, work, args.batch, 2 * args.batch, on_device, device)
        print(f"warm-up ({detections} detections, {2 * args.batch} frames, graph capture "
              f"included): {time.perf_counter() - t0:.1f} s", flush=True)
        stats = run_row(model, spec, video, work, args.batch, frames, on_device, device,
                        n_threads, suffix)
        d = stats.as_dict()
        label = (f"masks composited on the {device.type.upper()}, {d['draw_threads']} drawing threads"
                 if on_device else "masks drawn on the host")
        label += (", .avi (Motion JPEG)" if suffix == ".avi"
                  else f", {suffix} (mp4v), encoder {encoder or 'default'}")
        rows.append((label, detections, stats.detections / max(stats.frames, 1), d,
                     stats.busiest_thread()))
    for suffix in (".avi", ".mp4") if args.encode_only else ():
        ms = encode_only(video, work, args.encode_only, suffix)
        print(f"encoder alone, {suffix}: {ms:.2f} ms per frame (decoded frames converted to BGR, "
              "encoded and written by the video sink, one thread)")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {datetime.date.today()}, "
          f"{os.cpu_count()} CPU cores, video {args.width}x{args.height} mp4v, R50-FPN seed "
          f"spec, random weights, bf16, batch {args.batch}, cudnn.benchmark "
          f"{args.cudnn_benchmark}")
    print("| drawing | detections/frame | above threshold/frame | frames | FPS | latency p50 ms | "
          "p99 ms | inference ms/batch p50 |")
    print("|---|---|---|---|---|---|---|---|")
    for label, dets, drawn, d, _ in rows:
        print(f"| {label} | {dets} | {drawn:.1f} | {d['frames']} | {d['fps']:.1f} | "
              f"{d['latency_ms']['p50']:.1f} | {d['latency_ms']['p99']:.1f} | "
              f"{d['infer_ms_per_batch']['p50']:.1f} |")
    stages = list(STAGES)
    print("\nms per frame by stage (thread: " + ", ".join(f"{k} {v}" for k, v in STAGES.items())
          + "; the drawing pool's time summed over its threads)")
    print("| drawing | detections/frame | " + " | ".join(stages) + " | busiest thread |")
    print("|---|---|" + "---|" * len(stages) + "---|")
    for label, dets, _, d, (thread, ms) in rows:
        per = d["stage_ms_per_frame"]
        print(f"| {label} | {dets} | " + " | ".join(f"{per[k]:.2f}" for k in stages)
              + f" | {thread} {ms:.2f} ms |")


if __name__ == "__main__":
    main()
