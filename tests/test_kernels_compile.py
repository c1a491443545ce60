"""Every Triton kernel compiles for the GPU the benchmarks run on (sm_90, Hopper), from a CPU.

Triton's interpreter (tests/test_kernels.py) checks what the kernels compute, but it accepts
code that the compiler rejects or builds differently. Here each kernel wrapper is called on
small CPU tensors with Triton's launch replaced by a recorder, so the launches are the real
ones (arguments, dtypes, constexprs, warps); each recorded launch is then compiled to a cubin
for sm_90 with the ptxas that ships with Triton, and must not spill registers (cuobjdump's
resource usage). Nothing runs on a GPU.
"""

import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from mrcnn_helpers.model.kernels.bias import (  # noqa: E402
    bias_act_triton,
    channel_sums,
    sum_2x2,
    top_down_triton,
)
from mrcnn_helpers.model.kernels.composite import composite_frames  # noqa: E402
from mrcnn_helpers.model.kernels.matching import match_rpn_anchors  # noqa: E402
from mrcnn_helpers.model.kernels.nms import bitmask_nms_rows, walk_nms_rows  # noqa: E402
from mrcnn_helpers.model.kernels.paste import paste_binary_masks  # noqa: E402
from mrcnn_helpers.model.kernels.pool import bias_relu_maxpool_triton  # noqa: E402
from mrcnn_helpers.model.kernels.residual import relu_grad_of_sum  # noqa: E402
from mrcnn_helpers.model.kernels import roi_align  # noqa: E402
from mrcnn_helpers.model.kernels.roi_align import multilevel_roi_align_sets_triton  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
           torch.int64: "*i64", torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8",
           torch.bool: "*i1"}


def _signature(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) of a launch; like a real launch, the pointers and
    the integers divisible by 16 are marked so (what lets Triton vectorize the loads)."""
    names = [p.name for p in fn.params]
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values[param.name]
        if isinstance(value, torch.Tensor) or (
                isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0):
            if not param.is_constexpr:
                attrs[(index,)] = [["tt.divisibility", 16]]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{param.name}: {type(value).__name__}")
    return signature, constexprs, attrs


@pytest.fixture()
def launches(monkeypatch):
    """The launches the code makes, recorded instead of run: (kernel, signature, constexprs,
    attributes, num_warps)."""
    seen = []

    def record(self, *args, grid, warmup, **kwargs):
        seen.append((self, *_signature(self, args, kwargs), kwargs.get("num_warps", 4)))

    monkeypatch.setattr(JITFunction, "run", record)
    return seen


def _resource_usage(cubin: bytes) -> str:
    """cuobjdump's resource line for a cubin (registers, stack, shared memory)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True).stdout
    return next((line.strip() for line in out.splitlines() if "REG:" in line), "")


def _every_kernel_launch():
    """Each wrapper once, on small CPU tensors laid out as on the GPU (bf16, channels_last),
    with the model's channel counts and row lengths (they set the kernels' block sizes)."""
    cl = torch.channels_last
    x = torch.randn(2, 8, 6, 4).to(torch.bfloat16).contiguous(memory_format=cl)
    bias = torch.randn(8)
    bias_act_triton(x, bias, True)
    bias_act_triton(x, bias, False)
    top_down_triton(torch.randn(2, 8, 6, 4).to(torch.bfloat16).contiguous(memory_format=cl),
                    bias, torch.randn(2, 8, 3, 2).to(torch.bfloat16).contiguous(
                        memory_format=cl))
    sum_2x2(x)
    small = torch.randn(1, 256, 4, 6).to(torch.bfloat16).contiguous(memory_format=cl)
    big = torch.randn(1, 256, 128, 128).to(torch.bfloat16).contiguous(memory_format=cl)
    for grad in (small, big):  # the small and the large maps' launch configurations
        channel_sums(grad, grad)
        channel_sums(grad, None)
    relu_grad_of_sum(x, x, x)
    composite_frames(torch.zeros(1, 5, 7, 3, dtype=torch.uint8),
                     torch.zeros(1, 2, 5, 7, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool),
                     torch.zeros(1, 2, 3), 0.5)
    paste_binary_masks(torch.rand(3, 28, 28), torch.tensor([[1.0, 1, 9, 9]] * 3), 20, 30, 0.5)
    match_rpn_anchors(torch.tensor([[0.0, 0, 10, 10]] * 5), torch.tensor([[[0.0, 0, 8, 8]]]),
                      torch.ones(1, 1, dtype=torch.bool), 0.7, 0.3)
    boxes = torch.tensor([[[0.0, 0, 10, 10]] * 2000])  # the RPN's rows in training
    groups = torch.zeros(1, 2000, dtype=torch.long)
    candidate = torch.ones(1, 2000, dtype=torch.bool)
    walk_nms_rows(boxes, groups, candidate, 0.5)
    bitmask_nms_rows(boxes, groups, candidate, 0.5)
    bias_relu_maxpool_triton(torch.randn(2, 64, 9, 8).to(torch.bfloat16).contiguous(
        memory_format=cl), torch.randn(64).to(torch.bfloat16))
    features = [torch.randn(2, 256, 16, 16).to(torch.bfloat16).contiguous(memory_format=cl)
                .requires_grad_(True), torch.randn(2, 256, 8, 8).to(torch.bfloat16).contiguous(
                    memory_format=cl).requires_grad_(True)]
    rois = torch.tensor([[0.0, 1, 1, 9, 9], [1.0, 2, 2, 30, 30]])
    levels = torch.tensor([0, 1], dtype=torch.int32)
    # the default, and the candidates of bench_roi_align.py (2 warps, the merged backward)
    for warps, merge in ((4, False), (2, False), (4, True), (2, True)):
        roi_align.FORWARD_WARPS = roi_align.BACKWARD_WARPS = warps
        roi_align.MERGE_BACKWARD = merge
        pooled = multilevel_roi_align_sets_triton(
            features, [(rois, levels, 7), (rois, levels, 14)], [0.25, 0.125], 2)
        torch.autograd.grad(sum(p.float().sum() for p in pooled), features)


def test_every_kernel_compiles_for_sm90(launches, monkeypatch):
    for name in ("FORWARD_WARPS", "BACKWARD_WARPS", "MERGE_BACKWARD"):  # restored afterwards
        monkeypatch.setattr(roi_align, name, getattr(roi_align, name))
    _every_kernel_launch()
    unique = {}
    for fn, signature, constexprs, attrs, num_warps in launches:
        key = (fn.__name__, tuple(signature.items()), tuple(constexprs.items()),
               tuple(attrs), num_warps)
        unique[key] = (fn, signature, constexprs, attrs, num_warps)
    names = {key[0] for key in unique}
    assert {"_bias_act", "_top_down", "_sum_2x2", "_masked_channel_sum", "_relu_grad_of_sum",
            "_composite", "_paste_binary", "_best_gt_pass", "_label_pass", "_greedy_nms_rows",
            "_suppression_bits", "_scan_bits", "_bias_relu_maxpool", "_roi_align_forward",
            "_roi_align_backward"} <= names, names
    failed = []
    for (name, *_), (fn, signature, constexprs, attrs, num_warps) in unique.items():
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature,
                                                constexprs=constexprs, attrs=attrs),
                                      target=TARGET, options={"num_warps": num_warps})
            assert compiled.asm["cubin"], name
            usage = _resource_usage(compiled.asm["cubin"])
            print(name, constexprs, num_warps, usage)
            # Registers spilled to the stack would make a memory-bound kernel slower still.
            assert "STACK:0 " in usage and "LOCAL:0 " in usage, usage
        except Exception as exc:  # noqa: BLE001 - report every kernel that fails, then fail
            failed.append(f"{name} {constexprs}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failed, "\n".join(failed)
