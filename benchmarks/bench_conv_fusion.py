"""The R50-FPN backbone forward with cuDNN's fused convolution + bias + ReLU (+ residual), as
the model runs it at inference on CUDA, against convolutions with bias and separate ReLU / add
passes (MRCNN_FUSED_CONV=0).

    python benchmarks/bench_conv_fusion.py [--batch 8] [--height 832 --width 1344]

Both run replayed from a CUDA graph in bf16 channels_last, inference mode, so the table shows
kernel time, not launch overhead; the maximum difference of the FPN outputs is printed too.
Also: the same with torch.compile (inductor fuses bias + ReLU + add into one pass after each
convolution). Needs a CUDA GPU.
"""

import argparse
import datetime
import os

import torch

from mrcnn_helpers.model import build_model, fused_conv, place_model
from mrcnn_helpers.spec import load_spec, replace_spec

SEED_SPEC = os.path.join(os.path.dirname(__file__), "..", "specs", "maskrcnn_coco_resnet50.txt")


def graphed(fn, x):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(x)
    g.replay()  # capture only records: the outputs hold values after a replay
    torch.cuda.synchronize()
    return g, out


def time_graph(g, iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        g.replay()
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--height", type=int, default=832)
    ap.add_argument("--width", type=int, default=1344)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also torch.compile (slow to build)")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    spec = replace_spec(load_spec(SEED_SPEC), checkpoint="",
                        **{"data_config.image_size": (args.height, args.width)})
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = place_model(build_model(spec), device).eval()
    x = torch.randn(args.batch, 3, args.height, args.width, device=device)
    x = x.to(memory_format=torch.channels_last)
    rows = []

    def run(bb):
        def fn(inp):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return bb(inp)
        return fn

    fused_conv.ENABLED = False
    g, ref = graphed(run(model.backbone), x)
    rows.append(("backbone+FPN, conv with bias, separate ReLU/add", time_graph(g, args.iters), 0.0))
    ref = [r.float().clone() for r in ref]
    if args.compile:
        try:
            compiled = torch.compile(model.backbone)
            g, out = graphed(run(compiled), x)
            diff = max((o.float() - r).abs().max().item() for o, r in zip(out, ref))
            rows.append(("same, torch.compile", time_graph(g, args.iters), diff))
        except Exception as exc:  # noqa: BLE001 - an experiment: report and go on
            print("torch.compile failed:", repr(exc)[:300])
    fused_conv.ENABLED = True
    g, out = graphed(run(model.backbone), x)
    diff = max((o.float() - r).abs().max().item() for o, r in zip(out, ref))
    unfused = sum(m.__dict__.get("_no_fused_engine", False) for m in model.backbone.modules())
    name = f"cuDNN fused conv+bias+ReLU(+add) (the model's default), {unfused} convs unfused"
    rows.append((name, time_graph(g, args.iters), diff))
    scale = max(r.abs().max().item() for r in ref)
    print(f"{torch.cuda.get_device_name()}  {datetime.date.today()}  torch {torch.__version__}  "
          f"cudnn {torch.backends.cudnn.version()}  batch {args.batch}  "
          f"{args.height}x{args.width}  bf16 channels_last, CUDA graph replay")
    print(f"| variant | ms per batch | img/s | max abs diff (outputs up to {scale:.2f}) |")
    print("|---|---|---|---|")
    for name, ms, diff in rows:
        print(f"| {name} | {ms:.2f} | {args.batch * 1000 / ms:.1f} | {diff:.3g} |")


if __name__ == "__main__":
    main()
