"""Everything around TensorRT that runs without it (calibration batches and preprocessing, the
cache file, output decoding, the accuracy check, the error when it is missing), plus engine
tests that run only where TensorRT and a GPU are installed (skipped otherwise)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mrcnn_helpers.export import (
    AccuracyWarning,
    CalibrationBatches,
    CalibrationCache,
    CalibrationError,
    check_ap_drop,
)
from mrcnn_helpers.export.graph import NET_SCALE_FACTOR
from mrcnn_helpers.export.tensorrt import build_engine, make_entropy_calibrator, network_mode
from mrcnn_helpers.inference import ExportedModel
from mrcnn_helpers.inference.metadata import ExportMetadata
from mrcnn_helpers.inference.tensorrt import TensorRTUnavailable, torch_dtype

IMAGE_SIZE = (64, 96)
MEAN = np.array([123.675, 116.28, 103.53], np.float32).reshape(1, 3, 1, 1)


def _meta(normalize_in_graph=False, batch_size=2, layout="compact"):
    names = (("boxes", "scores", "classes", "masks", "num_detections") if layout == "compact"
             else ("generate_detections", "mask_fcn_logits/BiasAdd"))
    return ExportMetadata(layout=layout, batch_size=batch_size, image_size=IMAGE_SIZE,
                          num_classes=4, detections_per_image=3, mask_resolution=2,
                          normalize_in_graph=normalize_in_graph,
                          net_scale_factor=NET_SCALE_FACTOR, offsets=(123.675, 116.28, 103.53),
                          input_name="Input", output_names=names)


@pytest.fixture(scope="module")
def val_setup(tmp_path_factory):
    from test_export import make_tiny_setup

    return make_tiny_setup(tmp_path_factory.mktemp("cal"), num_val=5)


def _have_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- calibration data
def test_calibration_batches_use_the_evaluation_preprocessing(val_setup):
    from mrcnn_helpers.data import build_eval_dataset

    batches = CalibrationBatches(val_setup.paths["val_images"], _meta(), batch_size=2, batches=2)
    arrays = list(batches)
    assert len(batches) == 2 and len(arrays) == 2
    assert all(a.shape == (2, 3, 64, 96) and a.dtype == np.float32 for a in arrays)
    assert batches.shape == (2, 3, 64, 96) and len(batches.files) == 4  # 5 images, 4 used
    # Image i of the sorted directory is COCO image i + 1 of the synthetic val split.
    dataset = build_eval_dataset(val_setup.spec)
    for i in range(4):
        pixels = dataset[i]["image"].numpy()[None].astype(np.float32)
        expected = (pixels - MEAN) * np.float32(NET_SCALE_FACTOR)
        np.testing.assert_allclose(arrays[i // 2][i % 2], expected[0], atol=1e-5)
    # A graph that normalizes itself takes the raw padded pixels.
    raw = next(iter(CalibrationBatches(val_setup.paths["val_images"], _meta(True), batch_size=2,
                                       batches=1)))
    assert np.array_equal(raw[0], dataset[0]["image"].numpy().astype(np.float32))


def test_calibration_batches_refuse_bad_requests(val_setup, tmp_path):
    images = val_setup.paths["val_images"]
    with pytest.raises(CalibrationError, match="has 5 images, but --batches 3 x "
                                               "--cal-batch-size 2 needs 6"):
        CalibrationBatches(images, _meta(), batch_size=2, batches=3)
    with pytest.raises(CalibrationError, match="differs from the exported graph's fixed batch 2"):
        CalibrationBatches(images, _meta(), batch_size=4, batches=1)
    with pytest.raises(CalibrationError, match="no images"):
        CalibrationBatches(tmp_path, _meta(), batch_size=2, batches=1)
    with pytest.raises(CalibrationError, match="not found"):
        CalibrationBatches(tmp_path / "missing", _meta(), batch_size=2, batches=1)


def test_calibration_cache_write_read(tmp_path):
    cache = CalibrationCache(tmp_path / "sub" / "cal.bin")
    assert cache.read() is None and not cache.exists()
    cache.write(memoryview(b"TRT-8601-EntropyCalibration2\nInput: 3c010a14\n"))
    assert cache.read().startswith(b"TRT-8601-EntropyCalibration2")
    assert CalibrationCache(tmp_path / "sub" / "cal.bin").exists()  # a new build reuses it
    (tmp_path / "sub" / "cal.bin").write_bytes(b"")  # a killed run: calibrate again
    assert cache.read() is None
    assert CalibrationCache(None).read() is None


# ---------------------------------------------------------------- decoding engine outputs
class FakeEngine(ExportedModel):
    """Returns, like TensorRTModel._run, torch tensors; one detection per image whose score is
    the image's mean input value, so batching and order can be checked."""

    def __init__(self, meta):
        super().__init__(meta, "fake.plan")
        self.calls = []

    def _run(self, batch):
        self.calls.append(batch.shape)
        b = batch.shape[0]
        value = torch.from_numpy(batch).mean(dim=(1, 2, 3))
        boxes = torch.zeros(b, 3, 4)
        boxes[:, 0] = torch.tensor([1.0, 2.0, 30.0, 40.0])
        classes = torch.zeros(b, 3, dtype=torch.int32)
        classes[:, 0] = 2
        scores = torch.zeros(b, 3)
        scores[:, 0] = value
        return {"boxes": boxes, "scores": scores, "classes": classes,
                "masks": torch.full((b, 3, 2, 2), 0.75), "num_detections": torch.ones(b)}


def test_engine_outputs_decode_in_image_order_with_padding():
    engine = FakeEngine(_meta(normalize_in_graph=True, batch_size=2))
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 3, *IMAGE_SIZE)
    out = engine(images)
    assert engine.calls == [(2, 3, 64, 96)] * 3  # 5 images in fixed batches of 2
    assert out["scores"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert out["num_detections"].tolist() == [1] * 5 and out["classes"].dtype == torch.int64
    assert out["boxes"][3, 0].tolist() == [1.0, 2.0, 30.0, 40.0]
    assert not out["boxes"][:, 1:].any() and out["masks"].shape == (5, 3, 2, 2)
    # Normalization left to the caller (DeepStream-style graph): applied before the engine.
    folded = FakeEngine(_meta(normalize_in_graph=False, batch_size=2))
    value = folded(torch.full((1, 3, *IMAGE_SIZE), 200, dtype=torch.uint8))["scores"][0, 0]
    expected = ((200 - MEAN.reshape(3)) * NET_SCALE_FACTOR).mean()
    assert value.item() == pytest.approx(float(expected), rel=1e-5)


def test_dtype_and_network_mode_mapping():
    assert torch_dtype(np.float32) == torch.float32 and torch_dtype(np.int64) == torch.int64
    assert torch_dtype(np.dtype("float16")) == torch.float16 and torch_dtype(np.int32) == \
        torch.int32
    with pytest.raises(Exception, match="not supported"):
        torch_dtype(np.complex64)
    assert [network_mode(t) for t in ("fp32", "int8", "fp16")] == [0, 1, 2]
    with pytest.raises(Exception, match="unknown data type 'int4'"):
        network_mode("int4")


def test_ap_drop_warning():
    pytorch = {"AP": 0.40, "mask_AP": 0.35}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_ap_drop(pytorch, {"AP": 0.395, "mask_AP": 0.36}, tolerance=0.01) == []
    with pytest.warns(AccuracyWarning, match="mask_AP 0.3000 is 0.0500 below PyTorch's 0.3500"):
        messages = check_ap_drop(pytorch, {"AP": 0.40, "mask_AP": 0.30}, tolerance=0.01,
                                 name="int8 engine")
    assert len(messages) == 1 and messages[0].startswith("int8 engine mask_AP")


# ---------------------------------------------------------------- without TensorRT
@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT is installed here")
def test_missing_tensorrt_says_how_to_get_it(tmp_path):
    from mrcnn_helpers.inference import TensorRTModel, load_model_file

    for call in (lambda: build_engine(tmp_path / "m.onnx", tmp_path / "m.plan"),
                 lambda: make_entropy_calibrator(None, tmp_path / "cal.bin"),
                 lambda: TensorRTModel(tmp_path / "m.plan"),
                 lambda: load_model_file(tmp_path / "m.plan")):
        with pytest.raises(TensorRTUnavailable, match=r"NGC containers .*nvcr.io/nvidia/tensorrt"):
            call()


@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT is installed here")
def test_export_command_with_engine_fails_fast_without_tensorrt(val_setup, tmp_path):
    import argparse

    from test_export import _write_checkpoint

    from mrcnn_helpers.cli import build_parser
    from mrcnn_helpers.commands import export as export_command

    _write_checkpoint(val_setup, tmp_path / "results")
    args = build_parser().parse_args(["export", "-m", str(tmp_path / "results"), "-o",
                                      str(tmp_path / "m.onnx"), "--engine",
                                      str(tmp_path / "m.plan"), "--data-type", "int8",
                                      "--cal-image-dir", val_setup.paths["val_images"]])
    with pytest.raises(TensorRTUnavailable):
        export_command.run(args)
    assert not (tmp_path / "m.onnx").exists()  # nothing half-done


# ---------------------------------------------------------------- with TensorRT (GPU machines)
@pytest.fixture(scope="module")
def onnx_file(val_setup):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    pytest.importorskip("onnxruntime")
    from mrcnn_helpers.export import export_onnx

    path = val_setup.dir / "model.onnx"
    meta = export_onnx(val_setup.model, val_setup.spec, path, batch_size=2,
                       layout="deepstream", normalize_in_graph=False)
    return path, meta


def test_fp32_engine_matches_onnxruntime(onnx_file, val_setup):
    from mrcnn_helpers.export import compare_detections
    from mrcnn_helpers.export.verify import load_validation_images
    from mrcnn_helpers.inference import OnnxRuntimeModel, TensorRTModel

    path, _ = onnx_file
    engine_path = build_engine(path, path.with_suffix(".plan"), data_type="fp32")
    images = load_validation_images(val_setup.spec, 4)
    reference, tested = OnnxRuntimeModel(path)(images), TensorRTModel(engine_path)(images)
    report = compare_detections(reference, tested, box_tolerance=0.1, score_tolerance=1e-3,
                                mask_tolerance=1e-2)
    assert report.ok, report.summary()


def test_int8_calibration_writes_then_reuses_the_cache(onnx_file, val_setup, tmp_path):
    path, meta = onnx_file
    batches = CalibrationBatches(val_setup.paths["val_images"], meta, batch_size=2, batches=2)
    cache = tmp_path / "cal.bin"
    build_engine(path, tmp_path / "a.plan", data_type="int8",
                 calibrator=make_entropy_calibrator(batches, cache))
    assert cache.is_file() and cache.stat().st_size > 0
    first = cache.read_bytes()
    calibrator = make_entropy_calibrator(None, cache)  # no images: the cache must suffice
    build_engine(path, tmp_path / "b.plan", data_type="int8", calibrator=calibrator)
    assert cache.read_bytes() == first and (tmp_path / "b.plan").is_file()
