"""What the first inference call of a process costs: the seed R50-FPN at 832x1344, batch 8,
bf16 on CUDA, its first call (kernel compilation, cuDNN plan building, CUDA-graph capture) and
the next. Run it several times to separate costs paid once per machine (Triton's on-disk
kernel cache) from those paid once per process, e.g.:

    python benchmarks/first_call.py                     # fused convolutions (the default)
    MRCNN_FUSED_CONV=0 python benchmarks/first_call.py  # without them
    MRCNN_CUDA_GRAPHS=0 python benchmarks/first_call.py      # eager, no graph capture
"""

import os
import time

import torch

from mrcnn_helpers.inference import Predictor
from mrcnn_helpers.model import build_model
from mrcnn_helpers.spec import load_spec, replace_spec

SEED_SPEC = os.path.join(os.path.dirname(__file__), "..", "specs", "maskrcnn_coco_resnet50.txt")


def main():
    t0 = time.perf_counter()
    spec = replace_spec(load_spec(SEED_SPEC), checkpoint="")
    torch.manual_seed(0)
    predictor = Predictor(build_model(spec), spec, device=torch.device("cuda"),
                          precision="bf16")
    images = torch.randint(0, 256, (8, 3, *spec.data_config.image_size), dtype=torch.uint8)
    torch.cuda.synchronize()
    t_built = time.perf_counter()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        predictor.forward(images)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    env = {k: os.environ[k] for k in ("MRCNN_FUSED_CONV", "MRCNN_CUDA_GRAPHS", "MRCNN_KERNELS")
           if k in os.environ}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, env {env}: model built "
          f"in {t_built - t0:.1f} s; first call {times[0]:.2f} s, then "
          f"{times[1] * 1000:.1f} and {times[2] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
