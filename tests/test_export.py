"""Export to ONNX: PyTorch / ONNX Runtime parity, AP parity, empty images, normalization folding,
DeepStream configs checked against the exported graph, encryption, and the `export` command.

A tiny random-weight model (ResNet-10, 64x96 input, 10 detections per image) is made to detect
things: test_score_thresh 0 keeps every candidate, and larger class / mask weights spread the
scores and masks so that differences would show.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mrcnn_helpers.crypto import EncryptionError
from mrcnn_helpers.export import (
    ExportableMaskRCNN,
    compare_ap,
    export_onnx,
    fold_input_scale,
    read_config,
    verify_export,
    write_deepstream_configs,
)
from mrcnn_helpers.export.graph import NET_SCALE_FACTOR
from mrcnn_helpers.export.verify import load_validation_images
from mrcnn_helpers.inference import (
    ExportError,
    OnnxRuntimeModel,
    Predictor,
    decode_outputs,
    load_model_file,
)
from mrcnn_helpers.inference.metadata import ExportMetadata, read_onnx_metadata

IMAGE_SIZE = (64, 96)
NUM_CLASSES = 4
DETECTIONS = 10
RESOLUTION = 8
CLASS_NAMES = ["background", "circle", "triangle", "square"]

SPEC_TEXT = """
checkpoint: ""
eval_batch_size: 3
data_config {{
  image_size: "(64, 96)"
  num_classes: 4
  max_num_instances: 8
  val_json_file: "{val_json}"
  val_image_dir: "{val_images}"
  n_workers: 0
}}
maskrcnn_config {{
  nlayers: 10
  freeze_bn: {freeze_bn}
  freeze_blocks: "[]"
  gt_mask_size: 28
  mrcnn_resolution: 8
  fast_rcnn_mlp_head_dim: 64
  test_rpn_pre_nms_topn: 100
  test_rpn_post_nms_topn: 30
  test_detections_per_image: 10
  test_score_thresh: {score_thresh}
  min_level: 3
  max_level: 5
  anchor_scale: 2
}}
"""


def make_tiny_setup(directory: Path, score_thresh: float = 0.0, num_val: int = 8,
                    freeze_bn: bool = False):
    """Synthetic val images, a spec and a seeded tiny model that detects (see module doc)."""
    from mrcnn_helpers.data import generate_synthetic_dataset
    from mrcnn_helpers.model import build_model
    from mrcnn_helpers.spec import parse_spec

    paths = generate_synthetic_dataset(directory / "data", num_train=0, num_val=num_val,
                                       image_size=(60, 90), seed=0)
    spec = parse_spec(SPEC_TEXT.format(val_json=paths["val_json"], val_images=paths["val_images"],
                                       score_thresh=score_thresh,
                                       freeze_bn=str(freeze_bn).lower()), source="<tiny spec>")
    torch.manual_seed(0)
    model = build_model(spec).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.3)
        torch.nn.init.normal_(model.roi_heads.mask_predictor.mask_fcn_logits.weight, std=0.3)
    return SimpleNamespace(spec=spec, model=model, paths=paths, dir=directory)


@pytest.fixture(autouse=True)
def onnx():
    """The onnx module; tests here skip without onnx and onnxruntime (make_tiny_setup, used by
    the deploy and TensorRT tests too, needs neither)."""
    pytest.importorskip("onnxruntime")
    return pytest.importorskip("onnx")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    setup = make_tiny_setup(tmp_path_factory.mktemp("tiny"))
    setup.images = load_validation_images(setup.spec, 8)
    return setup


@pytest.fixture(scope="module")
def deepstream_onnx(tiny):
    path = tiny.dir / "model_ds.onnx"
    meta = export_onnx(tiny.model, tiny.spec, path, batch_size=2, layout="deepstream",
                       class_names=CLASS_NAMES, category_ids=[1, 2, 3])
    return path, meta


# ---------------------------------------------------------------- the graph
def test_wrapper_reproduces_model_exactly_in_pytorch(tiny):
    images = tiny.images[:2]
    with torch.no_grad():
        ref = tiny.model(images)
        boxes, scores, classes, masks, count = ExportableMaskRCNN(
            tiny.model, IMAGE_SIZE, batch_size=2, layout="compact")(images.float())
    assert ref["num_detections"].tolist() == count.tolist() == [DETECTIONS, DETECTIONS]
    assert torch.equal(boxes, ref["boxes"]) and torch.equal(scores, ref["scores"])
    assert torch.equal(classes.long(), ref["classes"]) and torch.equal(masks, ref["masks"])


def test_graph_is_static_and_standard(deepstream_onnx, onnx):
    path, meta = deepstream_onnx
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert {"NonMaxSuppression", "RoiAlign", "TopK", "ScatterElements"} <= ops
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(proto.graph.input) + list(proto.graph.output)}
    assert dims == {"Input": [2, 3, 64, 96], "generate_detections": [2, DETECTIONS, 6],
                    "mask_fcn_logits/BiasAdd": [2, DETECTIONS, NUM_CLASSES, RESOLUTION,
                                                RESOLUTION]}
    stored = read_onnx_metadata(proto, str(path))
    assert stored == meta and stored.class_names == tuple(CLASS_NAMES)
    assert stored.category_ids == (1, 2, 3) and "nlayers: 10" in stored.spec_text


def test_onnxruntime_matches_pytorch(deepstream_onnx, tiny):
    report = verify_export(tiny.model, OnnxRuntimeModel(deepstream_onnx[0], threads=1),
                           tiny.images, batch_size=3)  # 3 per call: exercises chunk padding
    print(report.summary())
    assert report.ok, report.summary()
    assert report.images == 8 and report.detections == 8 * DETECTIONS
    assert report.max_box_diff < 1e-3 and report.max_score_diff < 1e-5
    assert report.max_mask_diff < 1e-4


def test_normalization_folded_into_conv1(tiny):
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.rand(1, 3, 5, 5) * 255
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    expected = conv((x - mean) / std)
    fold_input_scale(conv, NET_SCALE_FACTOR)
    assert torch.allclose(conv((x - mean) * NET_SCALE_FACTOR), expected, atol=1e-5)

    path = tiny.dir / "folded.onnx"
    meta = export_onnx(tiny.model, tiny.spec, path, batch_size=2, layout="compact",
                       normalize_in_graph=False)
    assert not meta.normalize_in_graph and meta.net_scale_factor == pytest.approx(0.017507, 1e-4)
    report = verify_export(tiny.model, OnnxRuntimeModel(path, threads=1), tiny.images[:4])
    assert report.ok and report.detections == 4 * DETECTIONS, report.summary()
    # The model itself was not touched by the folding.
    assert tiny.model.backbone.body["conv1"].weight.abs().max() < 5


def test_frozen_bn_folded_convolutions_export(tmp_path):
    """freeze_bn models run each frozen BN inside its convolution; the export (with the input
    normalization folded into conv1 as well) still matches PyTorch."""
    setup = make_tiny_setup(tmp_path, freeze_bn=True)
    with torch.no_grad():  # BN statistics that are not the identity, so the folding matters
        for name, buf in setup.model.backbone.body.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buf.uniform_(-0.1, 0.1)
    images = load_validation_images(setup.spec, 4)
    path = tmp_path / "frozen_bn.onnx"
    export_onnx(setup.model, setup.spec, path, batch_size=2, layout="compact",
                normalize_in_graph=False)
    report = verify_export(setup.model, OnnxRuntimeModel(path, threads=1), images)
    assert report.ok and report.detections == 4 * DETECTIONS, report.summary()
    assert report.max_box_diff < 1e-3 and report.max_score_diff < 1e-5


def test_image_without_detections_gives_zero_outputs(tmp_path):
    setup = make_tiny_setup(tmp_path, score_thresh=1.0, num_val=1)  # nothing scores > 1
    for layout in ("deepstream", "compact"):
        path = tmp_path / f"{layout}.onnx"
        export_onnx(setup.model, setup.spec, path, layout=layout)
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        image = np.random.default_rng(0).uniform(0, 255, (1, 3, *IMAGE_SIZE)).astype(np.float32)
        outputs = session.run(None, {"Input": image})
        for array in outputs:
            assert np.isfinite(array).all() and not array.any(), layout
        decoded = OnnxRuntimeModel(path, threads=1)(torch.from_numpy(image).to(torch.uint8))
        assert decoded["num_detections"].tolist() == [0]
        assert decoded["boxes"].shape == (1, DETECTIONS, 4)


def test_decode_outputs_both_layouts():
    meta = ExportMetadata(layout="deepstream", batch_size=1, image_size=IMAGE_SIZE,
                          num_classes=3, detections_per_image=2, mask_resolution=2,
                          normalize_in_graph=True, net_scale_factor=1.0, offsets=(0, 0, 0),
                          input_name="Input", output_names=("generate_detections",
                                                            "mask_fcn_logits/BiasAdd"))
    det = np.array([[[1, 2, 3, 4, 2, 0.9], [0, 0, 0, 0, 0, 0]]], np.float32)
    logits = np.zeros((1, 2, 3, 2, 2), np.float32)
    logits[0, 0, 2] = [[0.0, 10.0], [-10.0, 0.0]]
    logits[0, 0, 1] = 5.0  # another class's mask: must not be picked
    out = decode_outputs(meta, {"generate_detections": det, "mask_fcn_logits/BiasAdd": logits})
    assert out["boxes"].tolist() == [[[2, 1, 4, 3], [0, 0, 0, 0]]]  # y1x1y2x2 -> x1y1x2y2
    assert out["classes"].tolist() == [[2, 0]] and out["num_detections"].tolist() == [1]
    assert out["scores"][0, 0].item() == pytest.approx(0.9)
    assert torch.allclose(out["masks"][0, 0], torch.tensor([[0.5, 1.0], [0.0, 0.5]]), atol=1e-4)
    assert not out["masks"][0, 1].any()  # padding row
    with pytest.raises(ExportError, match="no output 'mask_fcn_logits/BiasAdd'"):
        decode_outputs(meta, {"generate_detections": det})


# ---------------------------------------------------------------- evaluation
def _self_consistent_ground_truth(tiny, path):
    """COCO ground truth made of the PyTorch model's own detections (score >= 0.3) on the val
    images, so its AP is high and any drift of the exported model lowers the ONNX AP."""
    from mrcnn_helpers.data import build_eval_dataset
    from mrcnn_helpers.inference import postprocess_detections

    dataset = build_eval_dataset(tiny.spec)
    gt = json.loads(Path(tiny.paths["val_json"]).read_text())
    gt["annotations"] = []
    with torch.no_grad():
        dets = tiny.model(tiny.images)
    for i in range(len(dataset)):
        sample = dataset[i]
        out = postprocess_detections(dets, i, sample["scale"], sample["orig_size"], 0.3, False)
        for box, label in zip(out["boxes"].tolist(), out["classes"].tolist()):
            x1, y1, x2, y2 = box
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": int(sample["image_id"]),
                "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
    path.write_text(json.dumps(gt))
    return len(gt["annotations"])


def test_coco_ap_of_onnx_equals_pytorch(deepstream_onnx, tiny):
    from mrcnn_helpers.spec import replace_spec

    gt_json = tiny.dir / "self_gt.json"
    assert _self_consistent_ground_truth(tiny, gt_json) >= 8
    spec = replace_spec(tiny.spec, **{"data_config.val_json_file": str(gt_json)})
    onnx_model, onnx_spec, names, ids = load_model_file(deepstream_onnx[0], spec=spec)
    assert names == CLASS_NAMES and ids == [1, 2, 3] and onnx_spec is spec
    results = compare_ap({"pytorch": tiny.model, "onnx": onnx_model}, spec)
    print({k: (results["pytorch"][k], results["onnx"][k]) for k in ("AP", "AP50", "mask_AP")})
    assert results["pytorch"]["AP50"] > 0.5
    for key in ("AP", "AP50", "AP75", "mask_AP", "mask_AP50", "ARmax100"):
        assert results["onnx"][key] == pytest.approx(results["pytorch"][key], abs=1e-6), key


def test_load_model_file_checks_the_spec(deepstream_onnx, tiny):
    model, spec, _, _ = load_model_file(deepstream_onnx[0])  # the stored spec
    assert tuple(spec.data_config.image_size) == IMAGE_SIZE and model.meta.batch_size == 2
    from mrcnn_helpers.spec import replace_spec

    other = replace_spec(tiny.spec, **{"data_config.image_size": (96, 96)})
    with pytest.raises(ExportError, match=r"exported for image_size \(64, 96\)"):
        load_model_file(deepstream_onnx[0], spec=other)
    with pytest.raises(ExportError, match=r"takes images \[N, 3, 64, 96\]"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    predictor = Predictor(model, spec)
    assert predictor.backend == "onnxruntime" and predictor.precision == "fp32"


def test_export_rejects_bad_arguments(tiny, tmp_path):
    from mrcnn_helpers.spec import replace_spec

    with pytest.raises(ExportError, match="opset 15 is too old"):
        export_onnx(tiny.model, tiny.spec, tmp_path / "a.onnx", opset=15)
    with pytest.raises(ValueError, match="unknown layout 'tlt'"):
        export_onnx(tiny.model, tiny.spec, tmp_path / "a.onnx", layout="tlt")
    with pytest.raises(ExportError, match="batch size must be >= 1"):
        export_onnx(tiny.model, tiny.spec, tmp_path / "a.onnx", batch_size=0)
    other = replace_spec(tiny.spec, **{"maskrcnn_config.anchor_scale": 4.0})
    with pytest.raises(ExportError, match="anchor_scale: model 2.0, spec 4.0"):
        export_onnx(tiny.model, other, tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="2 class names given"):
        export_onnx(tiny.model, tiny.spec, tmp_path / "a.onnx", class_names=["a", "b"])
    assert not (tmp_path / "a.onnx").exists()


# ---------------------------------------------------------------- DeepStream
def test_deepstream_config_matches_the_exported_graph(deepstream_onnx, tmp_path, onnx):
    path, meta = deepstream_onnx
    files = write_deepstream_configs(tmp_path / "ds", meta, path, data_type="fp16")
    prop = read_config(files["infer_config"])["property"]
    proto = onnx.load(str(path))
    outputs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim]
               for o in proto.graph.output}
    assert prop["output-blob-names"].split(";") == list(outputs)
    assert outputs["generate_detections"][2] == 6
    # The parser strides masks by num-detected-classes: it must be the mask output's C.
    assert int(prop["num-detected-classes"]) == outputs["mask_fcn_logits/BiasAdd"][2] == 4
    assert prop["infer-dims"] == "3;64;96" and int(prop["batch-size"]) == outputs[
        "generate_detections"][0]
    input_dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert prop["infer-dims"].split(";") == [str(v) for v in input_dims[1:]]
    assert (prop["network-type"], prop["output-instance-mask"], prop["cluster-mode"]) == (
        "3", "1", "4")
    assert prop["parse-bbox-instance-mask-func-name"] == "NvDsInferParseCustomMrcnnTLTV2"
    assert prop["network-mode"] == "2" and "int8-calib-file" not in prop
    # Normalization in the graph: DeepStream must feed raw pixels.
    assert float(prop["net-scale-factor"]) == 1.0 and "offsets" not in prop
    ds_dir = Path(files["infer_config"]).parent
    assert (ds_dir / prop["onnx-file"]).resolve() == path.resolve()
    labels = (ds_dir / prop["labelfile-path"]).read_text().splitlines()
    assert labels == CLASS_NAMES
    app = read_config(files["app_config"])
    assert app["primary-gie"]["config-file"] == Path(files["infer_config"]).name
    assert app["osd"]["display-mask"] == "1" and app["streammux"]["width"] == "96"


def test_deepstream_config_for_folded_int8_and_refusals(tmp_path):
    from dataclasses import replace

    fp32 = ExportMetadata(layout="deepstream", batch_size=4, image_size=(832, 1344),
                          num_classes=91, detections_per_image=100, mask_resolution=28,
                          normalize_in_graph=False, net_scale_factor=NET_SCALE_FACTOR,
                          offsets=(123.675, 116.28, 103.53), input_name="Input",
                          output_names=("generate_detections", "mask_fcn_logits/BiasAdd"))
    meta = replace(fp32, extra={"precision": "int8"})  # as quantize_int8 records it
    onnx_file = tmp_path / "m.int8.onnx"
    files = write_deepstream_configs(tmp_path / "ds", meta, onnx_file)
    prop = read_config(files["infer_config"])["property"]
    assert float(prop["net-scale-factor"]) == pytest.approx(0.017507, abs=1e-6)
    assert prop["offsets"] == "123.675;116.28;103.53" and prop["network-mode"] == "1"
    # INT8 comes from the graph's Q/DQ nodes: no calibration file, and the config says why.
    assert "int8-calib-file" not in prop and prop["num-detected-classes"] == "91"
    text = Path(files["infer_config"]).read_text()
    assert "Q/DQ nodes of the ONNX file" in text and "no\n# int8-calib-file" in text
    assert prop["model-engine-file"] == "../m.int8.onnx_b4_gpu0_int8.engine"
    assert len((tmp_path / "ds" / "labels.txt").read_text().splitlines()) == 91
    half = read_config(write_deepstream_configs(
        tmp_path / "ds16", replace(fp32, extra={"precision": "fp16"}), tmp_path / "m.fp16.onnx")[
        "infer_config"])["property"]
    assert half["network-mode"] == "2" and "int8-calib-file" not in half
    assert read_config(write_deepstream_configs(tmp_path / "ds32", fp32, tmp_path / "m.onnx")[
        "infer_config"])["property"]["network-mode"] == "0"
    with pytest.raises(ExportError, match="an INT8 DeepStream config needs the int8 graph.*"
                                          "quantize_int8"):
        write_deepstream_configs(tmp_path / "ds2", fp32, tmp_path / "m.onnx", data_type="int8")
    with pytest.raises(ExportError, match="int8-calib-file .* is not used any more"):
        write_deepstream_configs(tmp_path / "ds2", meta, onnx_file, calib_file=tmp_path / "c.bin")
    assert not (tmp_path / "ds2").exists()
    with pytest.raises(ExportError, match="'deepstream' output layout"):
        write_deepstream_configs(tmp_path / "ds3", replace(meta, layout="compact"), onnx_file)


# ---------------------------------------------------------------- encryption and the CLI
def test_encrypted_export_round_trip_and_wrong_key(tiny, tmp_path):
    pytest.importorskip("cryptography")
    from mrcnn_helpers.crypto import decrypt_bytes, encrypt_bytes, is_encrypted

    blob = encrypt_bytes(b"weights", "s3cret")
    assert is_encrypted(blob) and b"weights" not in blob
    assert decrypt_bytes(blob, "s3cret") == b"weights"
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(EncryptionError, match="wrong key, or the file was modified"):
        decrypt_bytes(tampered, "s3cret")

    path = tmp_path / "secret.onnx"
    export_onnx(tiny.model, tiny.spec, path, layout="compact", key="s3cret")
    assert is_encrypted(path)
    with pytest.raises(EncryptionError, match="is encrypted: pass its key"):
        OnnxRuntimeModel(path)
    with pytest.raises(EncryptionError, match="cannot decrypt .*secret.onnx: wrong key"):
        OnnxRuntimeModel(path, key="guess")
    report = verify_export(tiny.model, OnnxRuntimeModel(path, key="s3cret", threads=1),
                           tiny.images[:1])
    assert report.ok and report.detections == DETECTIONS


def _write_checkpoint(tiny, results):
    from mrcnn_helpers.engine.checkpoint import save_checkpoint
    from mrcnn_helpers.spec import format_spec

    results.mkdir()
    return save_checkpoint(results / "model.step-5.pth", {
        "format": "mrcnn-checkpoint", "version": 1, "step": 5,
        "model": tiny.model.state_dict(), "spec_text": format_spec(tiny.spec),
        "class_names": CLASS_NAMES, "category_ids": [1, 2, 3]})


def test_encrypted_checkpoint_loads_only_with_its_key(tiny, tmp_path):
    pytest.importorskip("cryptography")
    from mrcnn_helpers.crypto import encrypt_file

    plain = _write_checkpoint(tiny, tmp_path / "results")
    (tmp_path / "secret").mkdir()
    secret = encrypt_file(plain, tmp_path / "secret" / "model.step-5.pth", "k3y")
    model, spec, names, _ = load_model_file(secret.parent, key="k3y", device="cpu")
    assert names == CLASS_NAMES and tuple(spec.data_config.image_size) == IMAGE_SIZE
    for name, value in tiny.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(EncryptionError, match="is encrypted: pass its key"):
        load_model_file(secret)
    with pytest.raises(EncryptionError, match="wrong key"):
        load_model_file(secret, key="guess")


def test_export_command_end_to_end(tiny, tmp_path, capsys):
    from mrcnn_helpers.cli import main

    results = tmp_path / "results"
    _write_checkpoint(tiny, results)
    out = tmp_path / "export" / "model.onnx"
    assert main(["export", "-m", str(results), "-o", str(out), "--verify-images", "2",
                 "--deepstream", str(tmp_path / "ds"), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "parity pytorch vs onnx: OK: 2 images, 20 detections" in text
    assert "mask AP" in text and "onnx fp16" in text and "DeepStream:" in text
    prop = read_config(tmp_path / "ds" / "config_infer_primary_mrcnn.txt")["property"]
    assert prop["onnx-file"] == "../export/model.onnx"

    assert main(["export", "-m", str(out), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "starts from a training checkpoint" in capsys.readouterr().err
    assert main(["export", "-m", str(results), "-o", str(tmp_path / "y.onnx"), "--key", "k",
                 "--deepstream", str(tmp_path / "d2")]) == 2
    assert "DeepStream cannot read files encrypted" in capsys.readouterr().err
