"""Where the time of one training step goes: per stage (backbone, RPN, RoI heads, backward,
optimizer) and the top CUDA kernels, for the seed spec at 832x1344, batch 8, bf16; with --infer
the same for inference (score threshold 0: 100 detections per image, all masks pasted).

    python benchmarks/profile_train_step.py [--batch 8] [--objects 8] [--infer] [--shapes]
                                            [--height 832 --width 1344] [--where aten::add_,...]
                                            [--kernels]

--where lists, for each named operator, its calls grouped by input shapes (full shapes, self
CUDA ms per step) and the Python lines that called it (forward operators; a backward operator
shows the autograd engine, its shapes say which layer it belongs to).

--kernels lists the CUDA kernels by the operator that launched them and its input shapes (calls
and ms per step): which layer a generic kernel (an elementwise loop, a copy) belongs to.

Stages are marked with forward hooks on the model's top-level modules, so the model code carries
no profiling calls. Needs a CUDA GPU.
"""

import argparse

import torch
from bench_maskrcnn import SEED_SPEC, synthetic_batch
from torch.profiler import ProfilerActivity, profile, record_function

from mrcnn_helpers.model import build_model, paste_binary_masks, place_model
from mrcnn_helpers.spec import load_spec, replace_spec


def mark_stages(model):
    """Wrap backbone / rpn / roi_heads forwards in profiler ranges named after them."""
    ranges = {}
    for name in ("backbone", "rpn", "roi_heads"):
        module = getattr(model, name)

        def pre(mod, args, name=name):
            ranges[name] = record_function(f"stage::{name}")
            ranges[name].__enter__()

        def post(mod, args, out, name=name):
            ranges[name].__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--infer", action="store_true",
                    help="profile inference (100 detections/image, masks pasted) instead")
    ap.add_argument("--shapes", action="store_true",
                    help="also list the top operators grouped by input shapes")
    ap.add_argument("--where", default="",
                    help="comma-separated operators (e.g. aten::add_,aten::copy_) whose calls are "
                         "listed by input shape and by calling Python line")
    ap.add_argument("--kernels", action="store_true",
                    help="list the CUDA kernels by launching operator and its input shapes")
    ap.add_argument("--height", type=int, default=832)
    ap.add_argument("--width", type=int, default=1344)
    args = ap.parse_args()
    device = torch.device("cuda")
    spec = replace_spec(load_spec(SEED_SPEC), checkpoint="", **{
        "data_config.max_num_instances": 100, "maskrcnn_config.test_score_thresh": 0.0,
        "data_config.image_size": (args.height, args.width)})
    h, w = spec.data_config.image_size
    gen = torch.Generator().manual_seed(0)
    images, boxes, classes, rel_masks, _ = synthetic_batch(
        args.batch, h, w, args.objects, spec.maskrcnn_config.gt_mask_size, device, gen)
    pad = spec.data_config.max_num_instances - args.objects
    F = torch.nn.functional
    targets = {"boxes": F.pad(boxes, (0, 0, 0, pad)), "classes": F.pad(classes, (0, pad)),
               "masks": F.pad(rel_masks, (0, 0, 0, 0, 0, pad))}
    model = place_model(build_model(spec), device).train(not args.infer)
    mark_stages(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = model(images, targets)
        with record_function("stage::backward"):
            sum(losses.values()).backward()
        with record_function("stage::optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    def infer_step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images)
        with record_function("stage::paste"):
            for i in range(args.batch):
                paste_binary_masks(out["masks"][i], out["boxes"][i], h, w, 0.5)

    step = infer_step if args.infer else train_step

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    where = [op for op in args.where.split(",") if op]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 record_shapes=args.shapes or args.kernels or bool(where),
                 with_stack=bool(where)) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, "
          f"{h}x{w}, bf16, {'inference' if args.infer else 'training'}; times per step "
          "(3 steps profiled)")
    print("| stage | CPU ms (wall in range) | CUDA ms (kernels launched in range) |")
    print("|---|---|---|")
    for e in events:
        if e.key.startswith("stage::"):
            print(f"| {e.key[7:]} | {e.cpu_time_total / 3e3:.1f} | {e.device_time_total / 3e3:.1f} |")
    print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
    if args.shapes:
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by="self_device_time_total", row_limit=25,
                             max_name_column_width=30, max_shapes_column_width=70))
    for op in where:
        print_callers(prof, op)
    if args.kernels:
        print_kernels(prof)


def print_kernels(prof, rows: int = 40) -> None:
    """CUDA kernels grouped by (kernel, the operator that launched it, its input shapes)."""
    groups = {}
    for event in prof.events():
        for kernel in event.kernels:
            key = (kernel.name[:70], event.name, str(event.input_shapes)[:90])
            count, total = groups.get(key, (0, 0.0))
            groups[key] = count + 1, total + kernel.duration
    print("\nCUDA kernels by launching operator and its input shapes (per step)")
    print("| ms/step | calls/step | kernel | operator | input shapes |\n|---|---|---|---|---|")
    for (kernel, op, shapes), (count, total) in sorted(groups.items(), key=lambda kv: -kv[1][1])[
            :rows]:
        print(f"| {total / 3e3:.3f} | {count / 3:.0f} | {kernel} | {op} | {shapes} |")


def print_callers(prof, op: str, rows: int = 12) -> None:
    """`op`'s calls by input shapes, then by calling Python line, self CUDA ms per step."""
    by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == op]
    by_shape.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in by_shape) / 3e3
    print(f"\n{op}: {total:.2f} ms per step, by input shapes")
    print("| calls/step | self CUDA ms/step | input shapes |\n|---|---|---|")
    for e in by_shape[:rows]:
        print(f"| {e.count / 3:.0f} | {e.self_device_time_total / 3e3:.3f} | {e.input_shapes} |")
    by_stack = [e for e in prof.key_averages(group_by_stack_n=4) if e.key == op]
    by_stack.sort(key=lambda e: -e.self_device_time_total)
    print(f"{op} by calling lines")
    print("| calls/step | self CUDA ms/step | stack (innermost first) |\n|---|---|---|")
    for e in by_stack[:rows]:
        stack = " <- ".join(line.split("/")[-1] for line in e.stack[:4]) or "(autograd)"
        print(f"| {e.count / 3:.0f} | {e.self_device_time_total / 3e3:.3f} | {stack} |")


if __name__ == "__main__":
    main()
