"""Video / stream deployment: decode -> batch -> infer -> draw -> encode, with FPS and latency.

    from mrcnn_helpers.deploy import deploy
    stats = deploy("model.onnx", "clip.mp4", "annotated.mp4")   # or a checkpoint / .plan
    print(stats.summary())
"""

from mrcnn_helpers.inference.loading import load_predictor

from .io import ImageDirSink, ImageDirSource, VideoSink, VideoSource, open_sink, open_source
from .pipeline import DeployStats, percentiles, run_deploy


def deploy(model_path, source, output, *, spec=None, key=None, device=None,
           precision: str = "fp32", **kwargs) -> DeployStats:
    """Load any model file (checkpoint, results dir, weights, .onnx, .plan) and run run_deploy
    from `source` (video, image directory, stream URL, webcam) to `output` (video file or
    directory). precision: fp32, or fp16 / bf16 autocast for PyTorch models on CUDA. kwargs go
    to run_deploy (batch_size, threshold, include_mask, max_frames, progress, ...)."""
    predictor = load_predictor(model_path, spec, device=device, key=key, precision=precision)
    frames = open_source(source)
    try:
        sink = open_sink(output, fps=frames.fps, inputs=frames.inputs + [model_path])
    except BaseException:
        frames.close()
        raise
    return run_deploy(predictor, frames, sink, **kwargs)


__all__ = ["DeployStats", "ImageDirSink", "ImageDirSource", "VideoSink", "VideoSource", "deploy",
           "open_sink", "open_source", "percentiles", "run_deploy"]
