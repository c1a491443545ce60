"""Predictor and annotate_images (`mrcnn infer`) with a fake model whose detections are known in padded-input pixels.

A 100 x 50 (w x h) image resized into 64 x 64 gets scale min(64/50, 64/100) = 0.64: it fills the
top-left 64 x 32 and the rest is padding. A detection at (6.4, 3.2, 32, 16) in padded pixels is
(10, 5, 50, 25) in the original image.
"""

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn_helpers.data.images import list_image_files
from mrcnn_helpers.errors import DataError
from mrcnn_helpers.inference import Predictor, annotate_images, postprocess_detections

IMAGE_SIZE = (64, 64)
CLASS_NAMES = ["background", "cat", "dog"]
CATEGORY_IDS = [4, 9]


class FixedModel(torch.nn.Module):
    """Eval forward: the same detections for every image of the batch; records its inputs."""

    def __init__(self, boxes, scores, classes, r=14, d=5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.boxes, self.scores, self.classes, self.r, self.d = boxes, scores, classes, r, d
        self.inputs = []

    def forward(self, images):
        assert not self.training
        self.inputs.append(images.clone())
        b, n = images.shape[0], len(self.scores)
        out = {"boxes": torch.zeros(b, self.d, 4), "scores": torch.zeros(b, self.d),
               "classes": torch.zeros(b, self.d, dtype=torch.int64),
               "masks": torch.ones(b, self.d, self.r, self.r),
               "num_detections": torch.full((b,), n, dtype=torch.int64)}
        out["boxes"][:, :n] = torch.tensor(self.boxes)
        out["scores"][:, :n] = torch.tensor(self.scores)
        out["classes"][:, :n] = torch.tensor(self.classes)
        return out


def _spec(batch_size=2, include_mask=True):
    return types.SimpleNamespace(
        eval_batch_size=batch_size, use_amp=False,
        data_config=types.SimpleNamespace(image_size=IMAGE_SIZE, num_classes=3),
        maskrcnn_config=types.SimpleNamespace(include_mask=include_mask))


def _model():
    return FixedModel(
        boxes=[[6.4, 3.2, 32.0, 16.0],   # -> (10, 5, 50, 25)
               [0.0, 0.0, 70.0, 40.0],   # -> (0, 0, 109.375, 62.5), clipped to (0, 0, 100, 50)
               [1.0, 1.0, 20.0, 20.0],   # below the 0.5 threshold
               [10.0, 40.0, 20.0, 60.0]],  # wholly in the bottom padding: zero area once clipped
        scores=[0.9, 0.8, 0.3, 0.7], classes=[1, 2, 1, 2])


def _image(value=200):
    return np.full((50, 100, 3), value, dtype=np.uint8)


def test_boxes_and_masks_map_back_to_original_pixels():
    model = _model()
    image = torch.from_numpy(_image()).permute(2, 0, 1)
    out = Predictor(model, _spec(), CLASS_NAMES).predict([image])
    assert len(out) == 1
    det = out[0]
    torch.testing.assert_close(det["boxes"], torch.tensor([[10.0, 5.0, 50.0, 25.0],
                                                           [0.0, 0.0, 100.0, 50.0]]))
    torch.testing.assert_close(det["scores"], torch.tensor([0.9, 0.8]))
    assert det["classes"].dtype == torch.int64 and det["classes"].tolist() == [1, 2]
    assert det["labels"] == ["cat", "dog"]
    masks = det["masks"]
    assert masks.dtype == torch.bool and masks.shape == (2, 50, 100)
    # An all-ones mask pasted into (10, 5, 50, 25) covers pixel columns 10..49, rows 5..24.
    expected = torch.zeros(50, 100, dtype=torch.bool)
    expected[5:25, 10:50] = True
    assert torch.equal(masks[0], expected)
    # The second box extends past the image: its mask fills the image, except a few pixels at
    # the top-left corner, where the bilinear sample fades towards the mask's outer edge.
    assert bool(masks[1][3:, 3:].all()) and bool(masks[1][:, -3:].all())
    assert masks[1].sum() > 50 * 100 - 10
    # Preprocessing: the image fills the top-left 64 x 32 of the input, the rest is zero padding.
    seen = model.inputs[0][0]
    assert seen.dtype == torch.uint8 and seen.shape == (3, 64, 64)
    assert bool((seen[:, :32, :64] == 200).all()) and int(seen[:, 32:].sum()) == 0


def test_input_kinds_batching_and_thresholds(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(_image(100)).save(path)
    model = _model()
    predictor = Predictor(model, _spec(batch_size=2), ["cat", "dog"])  # names without background
    out = predictor.predict([path, str(path), Image.fromarray(_image()),
                             torch.from_numpy(_image()).permute(2, 0, 1)],
                            score_threshold=0.0, include_mask=False)
    assert [len(model_input) for model_input in model.inputs] == [2, 2]
    assert len(out) == 4
    for det in out:
        assert det["masks"] is None
        assert det["labels"] == ["cat", "dog", "cat"]  # the padding-only box is dropped
        torch.testing.assert_close(det["boxes"][2], torch.tensor([1.0, 1.0, 20.0, 20.0]) / 0.64)
    single = predictor.predict(Image.fromarray(_image()))  # one image, not a list
    assert len(single) == 1 and len(single[0]["scores"]) == 2


def test_model_without_masks():
    model = _model()
    predictor = Predictor(model, _spec(include_mask=False), CLASS_NAMES)
    assert predictor.predict([Image.fromarray(_image())])[0]["masks"] is None


def test_postprocess_empty_detections():
    dets = {"boxes": torch.zeros(1, 3, 4), "scores": torch.zeros(1, 3),
            "classes": torch.zeros(1, 3, dtype=torch.int64), "masks": torch.zeros(1, 3, 14, 14),
            "num_detections": torch.zeros(1, dtype=torch.int64)}
    out = postprocess_detections(dets, 0, 0.5, (30, 40), score_threshold=0.0, include_mask=True)
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,)
    assert out["masks"].shape == (0, 30, 40) and out["masks"].dtype == torch.bool


def test_list_image_files(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.jpeg", "d.bmp", "e.TIF", "f.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    # The one extension list: what the converters accept, infer and deploy read too.
    assert [p.name for p in list_image_files(tmp_path)] == ["a.jpg", "b.PNG", "c.jpeg", "d.bmp",
                                                            "e.TIF", "f.webp"]


def test_bad_inputs_name_the_path(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DataError, match="no_such_dir"):
        list_image_files(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images .* in .*empty"):
        list_image_files(empty)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    predictor = Predictor(_model(), _spec(), CLASS_NAMES)
    with pytest.raises(DataError, match="broken.jpg"):
        predictor.predict([bad])
    with pytest.raises(DataError, match="uint8"):
        predictor.predict([torch.zeros(3, 10, 10)])


def test_run_inference_writes_images_and_json(tmp_path):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    Image.fromarray(_image(30)).save(in_dir / "first.png")
    Image.fromarray(_image(30)).save(in_dir / "second.jpg", quality=100)
    json_path = tmp_path / "res" / "results.json"
    predictor = Predictor(_model(), _spec(batch_size=1), CLASS_NAMES, category_ids=CATEGORY_IDS)
    summary = annotate_images(predictor, in_dir, out_dir, threshold=0.5, include_mask=True,
                              json_path=json_path, progress=False)
    assert summary["images"] == 2 and summary["detections"] == 4
    assert sorted(p.name for p in out_dir.iterdir()) == ["first.png", "second.jpg"]
    drawn = np.asarray(Image.open(out_dir / "first.png"))
    assert drawn.shape == (50, 100, 3)
    assert not np.array_equal(drawn[15], _image(30)[15])  # inside the first mask: colored

    results = json.loads(json_path.read_text())
    assert len(results) == 4
    assert [(r["image_id"], r["file_name"]) for r in results] == [
        (0, "first.png"), (0, "first.png"), (1, "second.jpg"), (1, "second.jpg")]
    assert [r["category_id"] for r in results[:2]] == [4, 9]
    assert results[0]["bbox"] == pytest.approx([10.0, 5.0, 40.0, 20.0])
    assert results[0]["segmentation"]["size"] == [50, 100]

    with pytest.raises(DataError, match="overwrite"):
        annotate_images(Predictor(_model(), _spec(), CLASS_NAMES, category_ids=CATEGORY_IDS),
                        in_dir, in_dir, threshold=0.5, include_mask=False, progress=False)


def test_load_model_file_rebuilds_the_checkpoint_network(tmp_path, monkeypatch):
    from test_engine import FakeDetector, make_spec, new_model, run
    from torch import nn

    import mrcnn_helpers.engine.trainer as trainer_module
    from mrcnn_helpers.engine import load_checkpoint
    from mrcnn_helpers.errors import CheckpointError
    from mrcnn_helpers.inference import loading

    monkeypatch.setattr(trainer_module, "spec_text",
                        lambda spec: f"total_steps: {spec.total_steps}\nseed: {spec.seed}\n")
    spec = make_spec()
    run(spec, tmp_path, max_steps=6)
    texts = []
    monkeypatch.setattr(loading, "parse_spec",
                        lambda text, source: texts.append((text, source)) or spec)
    monkeypatch.setattr(loading, "build_model", lambda spec: new_model(seed=9))
    path = tmp_path / "model.step-6.pth"
    model, got_spec, names, ids = loading.load_model_file(path, device="cpu")
    assert got_spec is spec and texts == [("total_steps: 20\nseed: 7\n", f"{path} (stored spec)")]
    assert names == ["background", "cat", "dog"] and ids == [3, 7] and not model.training
    for key, value in load_checkpoint(path)["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    # A results directory means its newest checkpoint.
    assert loading.load_model_file(tmp_path, device="cpu").source == path

    class Wider(FakeDetector):
        def __init__(self):
            super().__init__()
            self.rpn = nn.Linear(16, 4)

    monkeypatch.setattr(loading, "build_model", lambda spec: Wider())
    with pytest.raises(CheckpointError, match=r"model.step-6.pth does not fit the model"):
        loading.load_model_file(path, spec=spec, device="cpu")


def test_weights_file_loads_for_inference(tmp_path, monkeypatch):
    """model.weights.pth (fp16, weights only) serves infer / export / deploy like a checkpoint."""
    from test_engine import make_spec, new_model, run

    import mrcnn_helpers.engine.trainer as trainer_module
    from mrcnn_helpers.engine import load_checkpoint
    from mrcnn_helpers.inference import loading

    monkeypatch.setattr(trainer_module, "spec_text",
                        lambda spec: f"total_steps: {spec.total_steps}\nseed: {spec.seed}\n")
    spec = make_spec()
    run(spec, tmp_path, max_steps=6, evaluate_fn=None)
    monkeypatch.setattr(loading, "build_model", lambda spec: new_model(seed=9))
    model, _, names, ids = loading.load_model_file(tmp_path / "model.weights.pth", spec=spec,
                                                   device="cpu")
    assert names == ["background", "cat", "dog"] and ids == [3, 7]
    full = load_checkpoint(tmp_path / "model.step-6.pth")["model"]
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, full[key].half().float()), key
