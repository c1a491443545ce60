"""The deploy pipeline on CPU: image folder and (with OpenCV) a tiny generated video, PyTorch and
ONNX Runtime backends, statistics, the `deploy` command and its errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from mrcnn_helpers.deploy import deploy, open_sink, open_source, percentiles, run_deploy
from mrcnn_helpers.errors import DataError, MrcnnError
from mrcnn_helpers.inference import OnnxRuntimeModel, Predictor

CLASS_NAMES = ["background", "circle", "triangle", "square"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_export import make_tiny_setup

    return make_tiny_setup(tmp_path_factory.mktemp("deploy"), num_val=5)


@pytest.fixture(scope="module")
def onnx_path(tiny):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from mrcnn_helpers.export import export_onnx

    path = tiny.dir / "model.onnx"
    export_onnx(tiny.model, tiny.spec, path, batch_size=2, layout="compact",
                class_names=CLASS_NAMES)
    return path


def test_image_folder_with_pytorch_draws_what_predict_returns(tiny, tmp_path):
    frames = tiny.paths["val_images"]
    out_dir = tmp_path / "annotated"
    stats = run_deploy(Predictor(tiny.model, tiny.spec, CLASS_NAMES), open_source(frames),
                       open_sink(out_dir), batch_size=2, threshold=0.0, progress=False)
    files = sorted(out_dir.iterdir())
    # The annotated folder mirrors the input folder's file names.
    assert [f.name for f in files] == [f.name for f in open_source(frames).files]
    assert stats.frames == 5 and len(files) == 5 and len(stats.infer_latency_ms) == 3
    predicted = Predictor(tiny.model, tiny.spec, CLASS_NAMES).predict(
        open_source(frames).files, score_threshold=0.0)
    assert stats.detections == sum(len(p["scores"]) for p in predicted) > 0
    source_files = open_source(frames).files
    for written, original in zip(files, source_files):
        drawn = np.asarray(Image.open(written))
        plain = np.asarray(Image.open(original).convert("RGB"))
        assert drawn.shape == plain.shape and (drawn != plain).any()
    summary = stats.as_dict()
    assert summary["fps"] > 0 and set(summary["latency_ms"]) == {"p50", "p90", "p99"}
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
    assert "FPS" in stats.summary() and "p99" in stats.summary()


@pytest.mark.parametrize("output", ["annotated.mp4", "annotated.avi"])  # mp4v; Motion JPEG
def test_video_file_with_onnxruntime(onnx_path, tiny, tmp_path, output):
    cv2 = pytest.importorskip("cv2")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (96, 64))
    rng = np.random.default_rng(0)
    for _ in range(6):
        writer.write(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    writer.release()
    out = tmp_path / output
    stats = deploy(onnx_path, video, out, threshold=0.0, progress=False)
    assert stats.frames == 6 and stats.backend == "onnxruntime" and stats.batch_size == 2
    capture = cv2.VideoCapture(str(out))
    count = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        assert frame.shape == (64, 96, 3)
        count += 1
    capture.release()
    assert count == 6


def test_max_frames_and_image_folder_without_opencv(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails
    stats = run_deploy(Predictor(tiny.model, tiny.spec, CLASS_NAMES),
                       open_source(tiny.paths["val_images"]), open_sink(tmp_path / "out"),
                       batch_size=4, max_frames=3, progress=False)
    assert stats.frames == 3 and len(list((tmp_path / "out").iterdir())) == 3
    with pytest.raises(DataError, match="needs OpenCV: pip install opencv-python-headless"):
        open_sink(tmp_path / "out.mp4")


def test_deploy_command_prints_fps_and_latency(onnx_path, tiny, tmp_path, capsys):
    from mrcnn_helpers.cli import main

    stats_file = tmp_path / "stats.json"
    assert main(["deploy", "-m", str(onnx_path), "-i", tiny.paths["val_images"],
                 "-o", str(tmp_path / "frames"), "--json", str(stats_file),
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "5 frames in" in text and "FPS" in text and "p50" in text and "p99" in text
    stats = json.loads(stats_file.read_text())
    assert stats["frames"] == 5 and stats["batch_size"] == 2 and stats["fps"] > 0


def test_errors_are_named(tiny, onnx_path, tmp_path):
    with pytest.raises(DataError, match="input not found: .*nope.mp4"):
        open_source(tmp_path / "nope.mp4")
    with pytest.raises(DataError, match="give a video file"):
        open_sink(tmp_path / "out.txt")
    with pytest.raises(MrcnnError, match="fp16 needs a CUDA device"):
        Predictor(tiny.model, tiny.spec, precision="fp16", device="cpu")
    with pytest.raises(MrcnnError, match="applies to PyTorch models"):
        Predictor(OnnxRuntimeModel(onnx_path), tiny.spec, precision="bf16")
    with pytest.raises(MrcnnError, match="unknown precision 'int8'"):
        Predictor(tiny.model, tiny.spec, precision="int8")
    # No command writes over what it reads: the output may not be the input folder.
    with pytest.raises(MrcnnError, match="is the input"):
        open_sink(tiny.paths["val_images"], inputs=[tiny.paths["val_images"]])
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a video")
    with pytest.raises(DataError, match="is not a video file"):
        open_source(text_file)


def test_drawing_threads_follow_the_cores_and_the_encoding():
    from mrcnn_helpers.deploy.pipeline import draw_threads_for

    assert [draw_threads_for(n) for n in (2, 4, 16)] == [1, 2, 2]
    assert [draw_threads_for(n, encodes=True) for n in (2, 4, 16)] == [1, 2, 4]


def test_percentiles():
    values = list(range(1, 101))
    assert percentiles(values) == {"p50": 50.5, "p90": pytest.approx(90.1),
                                   "p99": pytest.approx(99.01)}
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_summary_names_the_busiest_thread():
    from mrcnn_helpers.deploy import DeployStats

    stats = DeployStats(backend="pytorch", batch_size=8, frames=100, seconds=1.0, draw_threads=2)
    for stage, seconds in {"decode": 0.2, "preprocess": 0.1, "model": 0.3, "masks": 0.1,
                           "to_host": 0.05, "draw": 1.4, "encode": 0.6}.items():
        stats.add_time(stage, seconds)
    busy = stats.thread_ms_per_frame()
    assert busy == pytest.approx({"decoder": 2.0, "inference": 5.5, "drawing pool": 7.0,
                                  "writer": 6.0})
    assert stats.summary().splitlines()[-1] == (
        "busiest thread: drawing pool, 7.00 ms per frame (at most 143 FPS from it)")
    assert stats.as_dict()["thread_ms_per_frame"] == busy
    assert "busiest" not in DeployStats(backend="onnx", batch_size=1).summary()
