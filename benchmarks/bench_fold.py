"""The folded weights of the seed spec's trainable ResNet convolutions (frozen-BN scale times
weight, in bf16) and their weight gradients, as the training step computes them: one
convolution at a time (two kernels forward, two backward, each) against all of a stage's
together (model/fused_stage.fold_weights: a concatenation and one multiplication each way),
replayed from a CUDA graph.

    python benchmarks/bench_fold.py [--iters 50]

Prints ms per step (forward + backward of the folding alone, layer2-4 of R50, freeze_blocks
0 and 1), the number of convolutions, and whether the two give the same values and gradients,
with device, date and versions. Needs a CUDA GPU.
"""

import argparse
import datetime

import torch
from bench_conv_fusion import SEED_SPEC, graphed, time_graph

from mrcnn_helpers.model import build_model, fused_stage, place_model
from mrcnn_helpers.spec import load_spec, replace_spec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    device = torch.device("cuda")
    model = place_model(build_model(replace_spec(load_spec(SEED_SPEC), checkpoint="")), device)
    body = model.backbone.body
    stages = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        convs = [conv for block in body[name] for conv in fused_stage.block_convs(block)
                 if conv.weight.requires_grad]
        if convs:
            stages[name] = convs
    params = [conv.weight for convs in stages.values() for conv in convs]
    x = torch.zeros(1, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    upstream = [torch.randn(p.shape, generator=g).to(device, torch.bfloat16) for p in params]

    def per_convolution(_):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            weights = [conv._weights(x)[0] for convs in stages.values() for conv in convs]
        return weights, torch.autograd.grad(weights, params, upstream)

    def batched(_):
        weights = [w for name, convs in stages.items()
                   for w in fused_stage.fold_weights(body[name], convs, torch.bfloat16)]
        return weights, torch.autograd.grad(weights, params, upstream)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, "
          f"{len(params)} trainable folded convolutions in {', '.join(stages)}, "
          f"{sum(p.numel() for p in params) / 1e6:.1f} M weights, CUDA graphs")
    print("| folding (forward + weight gradients) | ms per step | same as per convolution |")
    print("|---|---|---|")
    results = {}
    for label, fn in (("one convolution at a time", per_convolution),
                      ("a stage at a time (fold_weights)", batched)):
        graph, out = graphed(fn, x)
        ms = time_graph(graph, args.iters)
        results[label] = out
        reference = results["one convolution at a time"]
        same = all(torch.equal(a, b) for part in (0, 1) for a, b in zip(out[part], reference[part]))
        print(f"| {label} | {ms:.3f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
