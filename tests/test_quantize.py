"""INT8 (Q/DQ) and FP16 graphs of a trained tiny model: where the Q/DQ nodes are, what stays
float, the accuracy against the fp32 graph in ONNX Runtime, the calibration cache (reused,
refused for another graph), the range estimators, and the accuracy table.

The model (ResNet-10, 64x64) is trained once for this module on the synthetic shapes dataset,
so its activations and scores are those of a real model rather than of random weights (whose
scores are all alike, so any quantization noise reorders them). Its scores are compared on the
images it was trained on, where it is confident; calibration uses the validation images.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mrcnn_helpers.errors import MrcnnError
from mrcnn_helpers.export import (
    export_onnx,
    read_config,
    read_export_metadata,
    write_deepstream_configs,
)
from mrcnn_helpers.export.accuracy import (
    AccuracyRow,
    AccuracyTable,
    _add_warnings,
    align_detections,
    measure_accuracy,
)
from mrcnn_helpers.export.calibration import (
    CalibrationBatches,
    CalibrationCache,
    CalibrationError,
    RangeCollector,
    graph_fingerprint,
)
from mrcnn_helpers.export.precision import (
    FLOAT32_OPS,
    convert_to_fp16,
    downstream_of,
    graph_precision,
)
from mrcnn_helpers.export.quantize import plan_quantization, quantize_int8
from mrcnn_helpers.export.verify import AccuracyWarning, compare_detections
from mrcnn_helpers.inference import ExportError, OnnxRuntimeModel

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TRAIN_STEPS = 100
SPEC_TEXT = """
use_amp: false
checkpoint: ""
total_steps: {steps}
train_batch_size: 4
eval_batch_size: 4
num_steps_per_eval: {steps}
logging_frequency: 1000
init_learning_rate: 0.02
warmup_steps: 20
warmup_learning_rate: 0.002
learning_rate_steps: "[80]"
learning_rate_decay_levels: "[0.1]"
data_config {{
  image_size: "(64, 64)"
  num_classes: 4
  max_num_instances: 8
  n_workers: 0
  train_json_file: "{data}/annotations/instances_train.json"
  train_image_dir: "{data}/train"
  val_json_file: "{data}/annotations/instances_train.json"
  val_image_dir: "{data}/train"
}}
maskrcnn_config {{
  nlayers: 10
  freeze_bn: false
  freeze_blocks: "[]"
  gt_mask_size: 16
  mrcnn_resolution: 8
  rpn_batch_size_per_im: 32
  batch_size_per_im: 16
  fast_rcnn_mlp_head_dim: 64
  train_rpn_pre_nms_topn: 200
  train_rpn_post_nms_topn: 50
  test_rpn_pre_nms_topn: 100
  test_rpn_post_nms_topn: 30
  test_detections_per_image: 10
  min_level: 3
  max_level: 5
  anchor_scale: 2
}}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """The trained tiny model, its spec (evaluation on its training images), the fp32 ONNX
    export (batch 2) and calibration batches from the validation images."""
    from mrcnn_helpers.data import generate_synthetic_dataset
    from mrcnn_helpers.engine import train
    from mrcnn_helpers.export.verify import load_validation_images
    from mrcnn_helpers.inference import load_model_file
    from mrcnn_helpers.spec import parse_spec

    root = tmp_path_factory.mktemp("trained")
    generate_synthetic_dataset(root / "data", num_train=24, num_val=8, image_size=(64, 64),
                               seed=3)
    spec = parse_spec(SPEC_TEXT.format(steps=TRAIN_STEPS, data=root / "data"), source="<tiny>")
    result = train(spec, root / "results", device="cpu", verbose=False,
                   evaluate_fn=lambda model, spec, device=None: {})
    model, spec, _, _ = load_model_file(str(result["checkpoint"]), device="cpu")
    fp32 = root / "model.onnx"
    meta = export_onnx(model.eval(), spec, fp32, batch_size=2)
    images = load_validation_images(spec, 8)
    batches = CalibrationBatches(root / "data" / "val", meta, batch_size=2, batches=4)
    return SimpleNamespace(root=root, spec=spec, model=model, fp32=fp32, meta=meta,
                           images=images, batches=batches)


@pytest.fixture(scope="module")
def int8(trained):
    cache = trained.root / "cal.json"
    report = quantize_int8(trained.fp32, trained.root / "model.int8.onnx", trained.batches,
                           method="percentile", cache_file=cache)
    return SimpleNamespace(path=Path(report.output), report=report, cache=cache,
                           proto=onnx.load(report.output))


@pytest.fixture(scope="module")
def fp32_detections(trained):
    return OnnxRuntimeModel(trained.fp32, threads=1)(trained.images)


def _iou(a, b):
    x1, y1 = torch.maximum(a[0], b[0]), torch.maximum(a[1], b[1])
    x2, y2 = torch.minimum(a[2], b[2]), torch.minimum(a[3], b[3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return float(inter / (area(a) + area(b) - inter))


def _confident_matches(reference, tested, min_score=0.3):
    """For each reference detection scoring >= min_score: (best IoU with a same-class tested
    detection, its score difference)."""
    out = []
    for i in range(reference["boxes"].shape[0]):
        for j in range(int(reference["num_detections"][i])):
            if float(reference["scores"][i, j]) < min_score:
                continue
            cls = int(reference["classes"][i, j])
            best = (0.0, math.inf)
            for k in range(int(tested["num_detections"][i])):
                if int(tested["classes"][i, k]) != cls:
                    continue
                iou = _iou(reference["boxes"][i, j], tested["boxes"][i, k])
                if iou > best[0]:
                    best = (iou, abs(float(tested["scores"][i, k] - reference["scores"][i, j])))
            out.append(best)
    return out


# ---------------------------------------------------------------- where Q/DQ goes
def test_int8_graph_holds_qdq_only_where_tensorrt_fuses_it(trained, int8):
    graph = int8.proto.graph
    nodes = {n.name: n for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    assert graph_precision(int8.proto) == "int8"
    meta = read_export_metadata(int8.path)
    assert meta.extra["precision"] == "int8" and meta.extra["int8"]["method"] == "percentile"
    assert meta.output_names == trained.meta.output_names
    prop = read_config(write_deepstream_configs(trained.root / "ds", meta, int8.path)[
        "infer_config"])["property"]
    assert prop["network-mode"] == "1" and "int8-calib-file" not in prop
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, "no Q/DQ node written"
    # Nothing quantized at or after RoiAlign / NMS / TopK, and no DQ feeds them.
    after = downstream_of(graph)
    assert not [n.name for n in qdq if n.name in after]
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for dq in (n for n in qdq if n.op_type == "DequantizeLinear"):
        readers = consumers[dq.output[0]]
        assert {r.op_type for r in readers} <= {"Conv", "Gemm", "MatMul", "Add"}, dq.name
        assert not {r.op_type for r in readers} & set(FLOAT32_OPS)
    # Every convolution before RoiAlign reads int8 data and per-channel int8 weights; the
    # heads after RoiAlign stay float.
    convs = [n for n in graph.node if n.op_type == "Conv"]
    before = [c for c in convs if c.name not in after]
    assert len(before) == len(int8.report.layers) > 20 and len(convs) > len(before)
    for conv in before:
        data, weight = producer[conv.input[0]], producer[conv.input[1]]
        assert data.op_type == weight.op_type == "DequantizeLinear", conv.name
        q, scale = inits[weight.input[0]], onnx.numpy_helper.to_array(inits[weight.input[1]])
        assert q.data_type == onnx.TensorProto.INT8 and scale.shape == (q.dims[0],), conv.name
        assert {a.name: a.i for a in weight.attribute}.get("axis") == 0
        values = onnx.numpy_helper.to_array(q)
        assert values.min() >= -127 and values.max() <= 127
        assert (scale > 0).all()
        if len(conv.input) > 2:  # biases stay float (TensorRT adds them in float)
            bias = producer.get(conv.input[2])
            assert bias is None or bias.op_type != "DequantizeLinear"
    for conv in (c for c in convs if c.name in after):
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear"
                   for i in conv.input), conv.name
    # Residual adds: the shortcut input is quantized, not the convolution's output it fuses with.
    add = nodes["/backbone/layer1/layer1.0/Add"]
    kinds = [producer[i].op_type for i in add.input]
    assert sorted(kinds) == ["Conv", "DequantizeLinear"]
    dq = producer[add.input[kinds.index("DequantizeLinear")]]
    assert producer[producer[dq.input[0]].input[0]].op_type == "MaxPool"
    add = nodes["/backbone/layer2/layer2.0/Add"]
    dq = [producer[i] for i in add.input if producer[i].op_type == "DequantizeLinear"]
    assert len(dq) == 1 and "downsample" in producer[producer[dq[0].input[0]].input[0]].name
    # The graph's contract is unchanged.
    fp32 = onnx.load(str(trained.fp32))
    assert [i.name for i in graph.input] == [i.name for i in fp32.graph.input]
    assert [(o.name, o.type.tensor_type.elem_type) for o in graph.output] == [
        (o.name, o.type.tensor_type.elem_type) for o in fp32.graph.output]


def test_int8_detections_stay_close_to_fp32(trained, int8, fp32_detections):
    tested = OnnxRuntimeModel(int8.path, threads=1)(trained.images)
    matches = _confident_matches(fp32_detections, tested)
    print("int8 matches (IoU, |score diff|):", [(round(a, 3), round(b, 3)) for a, b in matches])
    assert len(matches) >= 3, "the trained model should detect something confidently"
    ious = np.array([m[0] for m in matches])
    diffs = np.array([m[1] for m in matches])
    assert np.median(ious) > 0.9 and (ious > 0.6).mean() >= 0.8
    assert np.median(diffs[np.isfinite(diffs)]) < 0.05


def test_exclude_keeps_layers_float_and_names_bad_patterns(trained, int8, tmp_path):
    # The ranges come from the cache of the int8 fixture: no image is read.
    out = tmp_path / "excluded.onnx"
    report = quantize_int8(trained.fp32, out, None, method="percentile", cache_file=int8.cache,
                           exclude=["/backbone/conv1/*", "/rpn_head/*"])
    assert report.cache_reused and report.excluded
    producer = {o: n for n in onnx.load(str(out)).graph.node for o in n.output}
    graph = onnx.load(str(out)).graph
    for node in graph.node:
        if node.name.startswith(("/backbone/conv1/", "/rpn_head/")) and node.op_type == "Conv":
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear"
                       for i in node.input), node.name
    assert len(report.layers) == len(int8.report.layers) - 10  # conv1 + 3 levels x 3 RPN convs
    with pytest.raises(ExportError, match=r"--int8-exclude '\*nothing\*' matches no quantizable"):
        quantize_int8(trained.fp32, tmp_path / "x.onnx", None, method="percentile",
                      cache_file=int8.cache, exclude=["*nothing*"])
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------- the cache
class _NoImages:
    """Calibration data that must not be read."""

    def __iter__(self):
        raise AssertionError("calibration images were read although the cache is valid")


def test_cache_is_reused_without_reading_images(trained, int8, tmp_path):
    entry = json.loads(int8.cache.read_text())
    assert entry["format"] == "mrcnn-int8-calibration" and entry["method"] == "percentile"
    assert entry["graph"] == graph_fingerprint(onnx.load(str(trained.fp32)))
    assert entry["images"] == 8 and entry["batch_size"] == 2
    # A range for every tensor any --int8-exclude could quantize, so one cache serves them all.
    assert sorted(entry["amax"]) == plan_quantization(onnx.load(str(trained.fp32)).graph).tensors
    assert len(entry["amax"]) >= 20 and all(v > 0 for v in entry["amax"].values())
    before = int8.cache.read_bytes()
    report = quantize_int8(trained.fp32, tmp_path / "again.onnx", _NoImages(),
                           method="percentile", cache_file=int8.cache)
    assert report.cache_reused and report.images == 8
    assert int8.cache.read_bytes() == before
    again = onnx.load(str(tmp_path / "again.onnx"))
    assert again.graph.SerializeToString() == int8.proto.graph.SerializeToString()


def test_cache_of_another_graph_or_method_is_refused(trained, int8, tmp_path):
    other = tmp_path / "batch1.onnx"
    export_onnx(trained.model, trained.spec, other, batch_size=1)  # same weights, other graph
    before = int8.cache.read_bytes()
    with pytest.raises(CalibrationError, match="calibrated on another graph"):
        quantize_int8(other, tmp_path / "o.onnx", _NoImages(), method="percentile",
                      cache_file=int8.cache)
    with pytest.raises(CalibrationError, match="holds percentile ranges .* --cal-method max was "
                                               "asked"):
        quantize_int8(trained.fp32, tmp_path / "o.onnx", _NoImages(), method="max",
                      cache_file=int8.cache)
    assert int8.cache.read_bytes() == before and not (tmp_path / "o.onnx").exists()
    legacy = tmp_path / "trt.cache"
    legacy.write_bytes(b"TRT-8601-EntropyCalibration2\nInput: 3c010a14\n")
    with pytest.raises(CalibrationError, match="TensorRT implicit-quantization calibration cache"):
        quantize_int8(trained.fp32, tmp_path / "o.onnx", None, cache_file=legacy)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(CalibrationError, match="not a calibration cache written by this toolkit"):
        quantize_int8(trained.fp32, tmp_path / "o.onnx", None, cache_file=garbage)
    empty = tmp_path / "empty.json"
    empty.write_text("")  # a killed run: nothing to reuse, and no images given
    with pytest.raises(CalibrationError, match="INT8 needs calibration: pass --cal-image-dir"):
        quantize_int8(trained.fp32, tmp_path / "o.onnx", None, cache_file=empty)


def test_quantize_refuses_bad_requests(trained, int8, tmp_path):
    with pytest.raises(MrcnnError, match="is the input"):
        quantize_int8(trained.fp32, trained.fp32, trained.batches)
    with pytest.raises(ExportError, match=r"is already quantized \(int8 graph\); quantize the fp32"):
        quantize_int8(int8.path, tmp_path / "twice.onnx", trained.batches)
    with pytest.raises(CalibrationError, match="unknown calibration method 'kl'"):
        quantize_int8(trained.fp32, tmp_path / "m.onnx", trained.batches, method="kl")
    with pytest.raises(CalibrationError, match="no calibration batches"):
        quantize_int8(trained.fp32, tmp_path / "m.onnx", [], method="max")
    with pytest.raises(ExportError, match="ONNX model not found"):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "m.onnx", trained.batches)
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- range estimators
def test_range_estimators():
    rng = np.random.default_rng(0)
    values = rng.normal(0.0, 1.0, 200_000).astype(np.float32)
    collector = RangeCollector()
    collector.update(values[:1000] * 0.5)  # a smaller first batch: the range grows later
    collector.update(values[1000:])
    collector.update(np.array([50.0], np.float32))  # one outlier
    assert collector.counts.sum() == pytest.approx(200_001)
    assert collector.amax("max") == pytest.approx(50.0)
    p9999 = collector.amax("percentile", 99.99)
    assert 3.0 < p9999 < 5.0  # |N(0, 1)|: 99.99 % below ~3.9
    entropy = collector.amax("entropy")
    assert 2.0 < entropy < 10.0  # the outlier is clipped, the bulk is kept
    relu = RangeCollector()
    relu.update(np.maximum(values, 0.0))  # half exact zeros, as after a ReLU
    assert 2.0 < relu.amax("entropy") < 5.0
    empty = RangeCollector()
    empty.update(np.zeros(10, np.float32))
    assert empty.amax("entropy") == 0.0 and empty.amax("max") == 0.0


def test_cache_file_round_trip(tmp_path):
    cache = CalibrationCache(tmp_path / "sub" / "cal.json")
    assert cache.read(graph="g", method="max") is None
    cache.write(graph="g", method="max", percentile=99.0, amax={"a": 1.5}, images=4,
                batch_size=2, source="m.onnx")
    entry = cache.read(graph="g", method="max")
    assert entry["amax"] == {"a": 1.5} and entry["percentile"] is None
    assert not list((tmp_path / "sub").glob(".*tmp"))  # written atomically
    with pytest.raises(CalibrationError, match="another graph"):
        cache.read(graph="h", method="max")
    assert CalibrationCache(None).read(graph="g", method="max") is None


# ---------------------------------------------------------------- FP16
def test_fp16_graph_is_float16_where_dense_and_matches_fp32(trained, fp32_detections, tmp_path):
    path = Path(convert_to_fp16(trained.fp32, tmp_path / "model.fp16.onnx"))
    proto = onnx.load(str(path))
    assert graph_precision(proto) == "fp16"
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "ConvTranspose")]
    assert convs and all(inits[c.input[1]].data_type == onnx.TensorProto.FLOAT16 for c in convs)
    # RoiAlign, NMS and TopK read float32 tensors: from a Cast to float32 or a float32 node.
    typed = onnx.shape_inference.infer_shapes(proto).graph
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(typed.value_info) + list(typed.input) + list(typed.output)}
    for node in (n for n in graph.node if n.op_type in FLOAT32_OPS):
        data = node.input[0]
        assert types.get(data, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT, node.name
        assert producer.get(data) is None or producer[data].op_type != "Conv"
    assert [(o.name, o.type.tensor_type.elem_type) for o in graph.output] == [
        (o.name, onnx.TensorProto.FLOAT) for o in graph.output]
    tested = OnnxRuntimeModel(path, threads=1)(trained.images)
    # Paired by box, not rank: two detections whose scores differ by 4e-5 swapped places under
    # fp16 rounding (onnxruntime 1.32, 2026-12-03): the same detections in another order.
    report = compare_detections(fp32_detections, align_detections(fp32_detections, tested),
                                box_tolerance=0.25, score_tolerance=5e-3, mask_tolerance=2e-2)
    print("fp16 vs fp32:", report.summary())
    assert report.ok, report.summary()
    assert report.detections >= 20
    with pytest.raises(ExportError, match="--fp16-exclude '\\*nope\\*' matches no"):
        convert_to_fp16(trained.fp32, tmp_path / "x.onnx", exclude=["*nope*"])
    kept = Path(convert_to_fp16(trained.fp32, tmp_path / "kept.onnx", exclude=["/mask_head/*"]))
    kept_inits = {i.name: i for i in onnx.load(str(kept)).graph.initializer}
    mask_convs = [n for n in onnx.load(str(kept)).graph.node
                  if n.op_type == "Conv" and n.name.startswith("/mask_head/")]
    assert mask_convs and all(kept_inits[c.input[1]].data_type == onnx.TensorProto.FLOAT
                              for c in mask_convs)


# ---------------------------------------------------------------- the accuracy table
def test_accuracy_table_of_every_precision(trained, int8, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccuracyWarning)
        table = measure_accuracy(trained.model, trained.spec, tmp_path, onnx_path=trained.fp32,
                                 deviation_images=4, calibration=trained.batches,
                                 cal_method="percentile", cal_cache_file=int8.cache, threads=1)
    text = table.format()
    print(text)
    names = [r.name for r in table.rows]
    assert names == ["pytorch fp32", "onnx fp32", "onnx fp16", "onnx int8"]
    base, onnx32, fp16, q8 = table.rows
    assert table.eval_images == base.eval_images == 24 and table.deviation_images == 4
    assert base.box_ap > 0.02 and base.max_box_dev is None  # it detects (100 steps of training)
    assert onnx32.box_ap == pytest.approx(base.box_ap, abs=1e-6)
    assert onnx32.mask_ap == pytest.approx(base.mask_ap, abs=1e-6)
    assert onnx32.max_box_dev < 1e-2 and onnx32.count_diffs == 0
    assert fp16.max_box_dev < 0.25 and abs(fp16.mask_ap - base.mask_ap) < 0.01
    assert abs(q8.box_ap - base.box_ap) < 0.05
    assert "| variant" in text and "onnx int8" in text and "ranges from the cache" in text


def test_box_deviation_pairs_detections_not_ranks():
    def dets(boxes, scores, classes):
        n = len(boxes)
        return {"boxes": torch.tensor([boxes], dtype=torch.float32),
                "scores": torch.tensor([scores]), "classes": torch.tensor([classes]),
                "masks": torch.arange(n, dtype=torch.float32).view(1, n, 1, 1).expand(1, n, 2, 2)
                .clone(), "num_detections": torch.tensor([n])}

    reference = dets([[0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 9]], [0.5, 0.5, 0.4],
                     [1, 1, 2])
    # Equal scores in the other order: the same detections.
    swapped = dets([[20, 20, 30, 30], [0, 0, 10, 10], [40, 0, 50, 9]], [0.5, 0.5, 0.4],
                   [1, 1, 2])
    by_rank = compare_detections(reference, swapped, box_tolerance=math.inf)
    paired = compare_detections(reference, align_detections(reference, swapped),
                                box_tolerance=math.inf)
    assert by_rank.max_box_diff == 20 and paired.max_box_diff == 0
    assert align_detections(reference, swapped)["masks"][0, :, 0, 0].tolist() == [1, 0, 2]
    # A detection that moved by 3 px, and one that changed class: both show.
    moved = dets([[0, 0, 10, 10], [23, 20, 30, 30], [40, 0, 50, 9]], [0.5, 0.5, 0.4], [1, 1, 3])
    report = compare_detections(reference, align_detections(reference, moved),
                                box_tolerance=math.inf)
    assert report.max_box_diff == 3 and report.class_mismatches == 1


def test_accuracy_warnings_name_what_helps():
    def row(name, mask_ap):
        return AccuracyRow(name=name, box_ap=0.3, mask_ap=mask_ap, mask_ap50=0.5,
                           max_box_dev=0.1, count_diffs=0, images_per_sec=1.0)

    table = AccuracyTable(rows=[row("pytorch fp32", 0.300), row("onnx fp32", 0.300),
                                row("onnx fp16", 0.295), row("onnx int8", 0.280)])
    with pytest.warns(AccuracyWarning, match="onnx int8 loses 0.0200 mask AP"):
        _add_warnings(table, table.rows[0], 0.01, method="entropy", batches=10, images=10)
    assert len(table.warnings) == 1  # fp16 lost 0.005, within 1 point
    message = table.warnings[0]
    assert "--batches" in message and "--cal-method percentile, max" in message
    assert "--int8-exclude" in message
    table.rows[2] = row("onnx fp16", 0.25)
    table.warnings.clear()
    with pytest.warns(AccuracyWarning):
        _add_warnings(table, table.rows[0], 0.01, method="entropy", batches=10, images=10)
    assert any("onnx fp16 loses 0.0500" in w and "--fp16-exclude" in w for w in table.warnings)
