"""Video / stream deployment: decode -> batch -> infer -> draw -> encode, with FPS and latency.

    from mrcnn_helpers.deploy import deploy
    stats = deploy("model.onnx", "clip.mp4", "annotated.mp4")   # or a checkpoint / .plan
    print(stats.summary())
"""

from .io import ImageDirSink, ImageDirSource, VideoSink, VideoSource, open_sink, open_source
from .pipeline import DeployStats, make_runner, percentiles, run_deploy


def deploy(model_path, source, output, *, spec=None, key=None, device=None,
           **kwargs) -> DeployStats:
    """Load any model file (checkpoint, results dir, .onnx, .plan) and run run_deploy from
    `source` (video, image directory, stream URL, webcam) to `output` (video file or directory).
    kwargs go to run_deploy (batch_size, threshold, include_mask, precision, max_frames, ...)."""
    from mrcnn_helpers.inference.backends import load_inference_model

    model, spec, class_names, _ = load_inference_model(model_path, spec=spec, device=device,
                                                       key=key)
    frames = open_source(source)
    try:
        sink = open_sink(output, fps=frames.fps)
    except BaseException:
        frames.close()
        raise
    return run_deploy(model, spec, class_names, frames, sink, device=device, **kwargs)


__all__ = ["DeployStats", "ImageDirSink", "ImageDirSource", "VideoSink", "VideoSource", "deploy",
           "make_runner", "open_sink", "open_source", "percentiles", "run_deploy"]
