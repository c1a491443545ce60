"""Everything around TensorRT that runs without it (calibration batches and preprocessing,
output decoding, the accuracy check, precision checks, the error when it is missing), the
TensorRT API names the code uses checked against the vendored 10.x and 11.x name lists, plus
engine tests that run only where TensorRT and a GPU are installed (skipped otherwise)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mrcnn_helpers.export import (
    AccuracyWarning,
    CalibrationBatches,
    CalibrationError,
    check_ap_drop,
)
from mrcnn_helpers.export.graph import NET_SCALE_FACTOR
from mrcnn_helpers.export.tensorrt import build_engine, check_precision, network_mode
from mrcnn_helpers.inference import ExportedModel, ExportError
from mrcnn_helpers.inference.metadata import ExportMetadata
from mrcnn_helpers.inference.tensorrt import TensorRTUnavailable, torch_dtype, torch_dtype_of

ROOT = Path(__file__).resolve().parent.parent

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

    class DataType:  # stands in for trt.DataType members, which carry their name
        def __init__(self, name):
            self.name = name

    assert torch_dtype_of(DataType("HALF")) == torch.float16
    assert torch_dtype_of(DataType("BF16")) == torch.bfloat16
    assert torch_dtype_of(DataType("INT32")) == torch.int32
    with pytest.raises(ExportError, match="engine tensor type FP8 is not supported"):
        torch_dtype_of(DataType("FP8"))
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
                 lambda: TensorRTModel(tmp_path / "m.plan"),
                 lambda: load_model_file(tmp_path / "m.plan")):
        with pytest.raises(TensorRTUnavailable, match=r"NGC containers .*nvcr.io/nvidia/tensorrt"):
            call()


@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT is installed here")
def test_export_command_with_engine_fails_fast_without_tensorrt(val_setup, tmp_path):

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


# ---------------------------------------------------------------- the precision is the graph's
def test_engine_precision_comes_from_the_graph(val_setup, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from mrcnn_helpers.export import convert_to_fp16, export_onnx

    path = tmp_path / "m.onnx"
    export_onnx(val_setup.model, val_setup.spec, path, batch_size=1)
    fp32 = onnx.load(str(path))
    assert check_precision(fp32, None, "m.onnx") == check_precision(fp32, "fp32", "m") == "fp32"
    with pytest.raises(ExportError, match="holds the fp32 graph, but an engine in int8 was "
                                          "asked for.*quantize_int8 with calibration images"):
        check_precision(fp32, "int8", "m.onnx")
    half = onnx.load(convert_to_fp16(path, tmp_path / "m16.onnx"))
    assert check_precision(half, "fp16", "m16.onnx") == "fp16"
    with pytest.raises(ExportError, match="convert_to_fp16"):
        check_precision(fp32, "fp16", "m.onnx")
    with pytest.raises(ExportError, match="unknown data type 'int4'"):
        check_precision(fp32, "int4", "m.onnx")


# ---------------------------------------------------------------- TensorRT API names
def _api_tool():
    spec = importlib.util.spec_from_file_location("trt_api_names",
                                                  ROOT / "tools" / "trt_api_names.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _project_sources(tool):
    return {m: (ROOT / m).read_text(encoding="utf-8") for m in tool.PROJECT_MODULES}


def test_tensorrt_names_exist_in_tensorrt_10_and_11():
    """Every TensorRT attribute the engine code uses exists in each vendored release (the
    lists are generated from the tensorrt-cu12/cu13-bindings wheels by tools/trt_api_names.py)."""
    tool = _api_tool()
    lists = tool.load_lists()
    majors = {v.split(".")[0] for v in lists}
    assert {"10", "11"} <= majors, sorted(lists)
    assert "11.4.0.106" in lists
    # The lists are what they claim: 11.x lost implicit quantization, 10.x still had it.
    for version, names in lists.items():
        assert {"NetworkDefinitionCreationFlag.STRONGLY_TYPED", "OnnxParser",
                "IExecutionContext.execute_async_v3",
                "IExecutionContext.set_tensor_address"} <= names, version
        removed = {"IInt8EntropyCalibrator2", "IBuilderConfig.int8_calibrator",
                   "BuilderFlag.INT8", "BuilderFlag.FP16"}
        assert (removed & names == set()) == version.startswith("11."), version
    sources = _project_sources(tool)
    used = set()
    for source in sources.values():
        used |= tool.used_names(source)[0]
    # The reader attributes what the code calls (not a vacuous pass).
    assert {"Builder.create_network", "Builder.create_builder_config", "OnnxParser.parse",
            "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "IBuilderConfig.set_memory_pool_limit",
            "Builder.build_serialized_network", "Runtime.deserialize_cuda_engine",
            "ICudaEngine.create_execution_context", "ICudaEngine.get_tensor_dtype",
            "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3",
            "TensorIOMode.OUTPUT"} <= used
    assert tool.problems(sources, lists) == []


def test_api_check_catches_removed_and_misspelled_names():
    tool = _api_tool()
    lists = tool.load_lists()
    source = (ROOT / "mrcnn_helpers/export/tensorrt.py").read_text(encoding="utf-8")
    planted = source + """

def _legacy_int8(trt, builder, calibrator):
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)
    config.int8_calibrator = calibrator
    base = trt.IInt8EntropyCalibrator2
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCHES"):
        pass
    return base
"""
    found = "\n".join(tool.problems({"copy.py": planted}, lists))
    print(found)
    for name in ("IInt8EntropyCalibrator2", "IBuilderConfig.int8_calibrator", "BuilderFlag.INT8"):
        assert f"trt {name} is not in TensorRT 11.0.0.114, 11.4.0.106" in found, name
    assert "NetworkDefinitionCreationFlag.EXPLICIT_BATCHES (probed with hasattr) is in no" in found
    assert tool.problems({"copy.py": source}, lists) == []


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


def _engine_matches_onnxruntime(path, val_setup, **tolerances):
    from mrcnn_helpers.export import compare_detections
    from mrcnn_helpers.export.verify import load_validation_images
    from mrcnn_helpers.inference import OnnxRuntimeModel, TensorRTModel

    engine_path = build_engine(path, path.with_suffix(".plan"))
    images = load_validation_images(val_setup.spec, 4)
    reference, tested = OnnxRuntimeModel(path)(images), TensorRTModel(engine_path)(images)
    return compare_detections(reference, tested, **tolerances), engine_path


def test_fp32_engine_matches_onnxruntime(onnx_file, val_setup):
    path, _ = onnx_file
    report, engine_path = _engine_matches_onnxruntime(path, val_setup, box_tolerance=0.1,
                                                      score_tolerance=1e-3, mask_tolerance=1e-2)
    assert report.ok, report.summary()
    from mrcnn_helpers.inference.metadata import read_sidecar

    assert read_sidecar(engine_path).extra["data_type"] == "fp32"


def test_fp16_and_int8_engines_build_from_their_graphs(onnx_file, val_setup, tmp_path):
    from mrcnn_helpers.export import convert_to_fp16, quantize_int8
    from mrcnn_helpers.inference.metadata import read_sidecar

    path, meta = onnx_file
    half = tmp_path / "m16.onnx"
    convert_to_fp16(path, half)
    report, engine = _engine_matches_onnxruntime(half, val_setup, box_tolerance=0.5,
                                                 score_tolerance=1e-2, mask_tolerance=5e-2)
    assert read_sidecar(engine).extra["data_type"] == "fp16"
    print("fp16 engine vs ONNX Runtime fp16:", report.summary())
    batches = CalibrationBatches(val_setup.paths["val_images"], meta, batch_size=2, batches=2)
    quantized = tmp_path / "m8.onnx"
    quantize_int8(path, quantized, batches, method="max", cache_file=tmp_path / "cal.json")
    report, engine = _engine_matches_onnxruntime(quantized, val_setup, box_tolerance=2.0,
                                                 score_tolerance=5e-2, mask_tolerance=0.2)
    assert read_sidecar(engine).extra["data_type"] == "int8"
    print("int8 engine vs ONNX Runtime int8:", report.summary())
    with pytest.raises(ExportError, match="holds the int8 graph, but an engine in fp16"):
        build_engine(quantized, tmp_path / "x.plan", data_type="fp16")
