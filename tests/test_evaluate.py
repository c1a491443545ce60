"""COCO metrics through pycocotools on a hand-made ground truth; evaluate_model with a fake model.

Ground truth: image 10 (100 x 80) holds a "cat"; image 20 holds a "cat" and a "dog"; "bird" has no
instance. COCO ids 1, 3, 7 map to contiguous labels 1, 2, 3. Every object is 40 x 30 px
(area 1200: "medium"), so APs / APl are -1 (no ground truth in those ranges).
"""

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn_helpers.errors import DataError
from mrcnn_helpers.evaluate import (
    METRIC_NAMES,
    coco_evaluate,
    detections_to_coco_results,
    evaluate_model,
    format_metrics,
    format_per_class_table,
    write_metrics_json,
)

# pycocotools' decode trips a numpy 2 deprecation (its own code, harmless here).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CATEGORY_IDS = [1, 3, 7]  # contiguous label i -> CATEGORY_IDS[i - 1]
H, W = 80, 100
# (image_id, COCO category id, polygon); a pentagon for the cat of image 10 so masks are not boxes.
OBJECTS = [
    (10, 1, [10, 10, 50, 10, 50, 40, 30, 40, 10, 25]),
    (20, 1, [5, 5, 45, 5, 45, 35, 5, 35]),
    (20, 3, [50, 20, 90, 20, 90, 50, 50, 50]),
]
RECTANGLES = [  # box-shaped objects, for the end-to-end test where masks are pasted boxes
    (10, 1, [10, 10, 50, 10, 50, 40, 10, 40]),
    (20, 1, [5, 5, 45, 5, 45, 35, 5, 35]),
    (20, 3, [50, 20, 90, 20, 90, 50, 50, 50]),
]


def write_gt(path, objects):
    anns = []
    for k, (image_id, cat, poly) in enumerate(objects, start=1):
        rle = mask_utils.merge(mask_utils.frPyObjects([poly], H, W))
        xs, ys = poly[0::2], poly[1::2]
        anns.append({"id": k, "image_id": image_id, "category_id": cat, "segmentation": [poly],
                     "area": float(mask_utils.area(rle)), "iscrowd": 0,
                     "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
    gt = {"images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (10, 20)],
          "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"},
                         {"id": 7, "name": "bird"}],
          "annotations": anns}
    path.write_text(json.dumps(gt))
    return path


@pytest.fixture
def coco_gt(tmp_path):
    return COCO(str(write_gt(tmp_path / "gt.json", OBJECTS)))


def perfect_results(coco, drop=(), shift=0.0, with_masks=True):
    """Results equal to the ground truth (anns in `drop` left out; boxes moved right by shift*w)."""
    results = []
    for ann in coco.loadAnns(coco.getAnnIds()):
        if ann["id"] in drop:
            continue
        x, y, w, h = ann["bbox"]
        box = np.array([[x + shift * w, y, x + w + shift * w, y + h]])
        masks = coco.annToMask(ann)[None].astype(bool) if with_masks else None
        label = CATEGORY_IDS.index(ann["category_id"]) + 1
        results += detections_to_coco_results(ann["image_id"], box, [0.9], [label], masks,
                                              CATEGORY_IDS)
    return results


def test_perfect_predictions_give_ap_one(coco_gt):
    m = coco_evaluate(coco_gt, perfect_results(coco_gt))
    for prefix in ("", "mask_"):
        for name in ("AP", "AP50", "AP75", "APm", "ARmax1", "ARmax10", "ARmax100", "ARm"):
            assert m[prefix + name] == pytest.approx(1.0), prefix + name
        for name in ("APs", "APl", "ARs", "ARl"):  # no ground truth that small or that large
            assert m[prefix + name] == -1.0
    assert m["per_class"]["cat"] == {"AP": pytest.approx(1.0), "mask_AP": pytest.approx(1.0)}
    assert m["per_class"]["dog"] == {"AP": pytest.approx(1.0), "mask_AP": pytest.approx(1.0)}
    assert m["per_class"]["bird"] == {"AP": None, "mask_AP": None}


def test_missing_object_halves_class_recall(coco_gt):
    # Drop the cat of image 20: cat recall 1/2 with precision 1, so its precision is 1 at the
    # recall thresholds 0.00..0.50 (51 of 101) and 0 beyond; dog stays perfect.
    m = coco_evaluate(coco_gt, perfect_results(coco_gt, drop={2}))
    cat_ap = 51 / 101
    for prefix in ("", "mask_"):
        assert m["per_class"]["cat"][prefix + "AP"] == pytest.approx(cat_ap)
        assert m["per_class"]["dog"][prefix + "AP"] == pytest.approx(1.0)
        assert m[prefix + "AP"] == pytest.approx((cat_ap + 1.0) / 2)
        assert m[prefix + "AP50"] == pytest.approx((cat_ap + 1.0) / 2)
        assert m[prefix + "ARmax1"] == pytest.approx(0.75)
        assert m[prefix + "ARmax100"] == pytest.approx(0.75)


def test_shifted_boxes_match_only_low_iou_thresholds(coco_gt):
    # Every box moved right by 20% of its width: IoU = 0.8 / 1.2 = 2/3, a match at IoU
    # 0.50, 0.55, 0.60, 0.65 (4 of the 10 thresholds) and a miss above.
    m = coco_evaluate(coco_gt, perfect_results(coco_gt, shift=0.2, with_masks=False),
                      iou_types=("bbox",))
    assert m["AP"] == pytest.approx(0.4)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)
    assert m["ARmax100"] == pytest.approx(0.4)
    assert not any(k.startswith("mask_") for k in m)
    assert m["per_class"]["cat"] == {"AP": pytest.approx(0.4)}


def test_empty_results_give_zero(coco_gt):
    m = coco_evaluate(coco_gt, [])
    for prefix in ("", "mask_"):
        for name in METRIC_NAMES:
            assert m[prefix + name] == 0.0
    assert m["per_class"]["cat"] == {"AP": 0.0, "mask_AP": 0.0}
    assert m["per_class"]["bird"] == {"AP": None, "mask_AP": None}


def test_image_ids_restrict_the_evaluation(coco_gt):
    only_10 = [r for r in perfect_results(coco_gt) if r["image_id"] == 10]
    m = coco_evaluate(coco_gt, only_10, image_ids=[10])
    assert m["AP"] == pytest.approx(1.0) and m["mask_AP"] == pytest.approx(1.0)
    assert m["per_class"]["dog"]["AP"] is None  # no dog in image 10
    # The same results over both images miss two objects.
    assert coco_evaluate(coco_gt, only_10)["ARmax100"] == pytest.approx(0.25)


def test_bad_inputs_are_named(coco_gt):
    boxes_only = perfect_results(coco_gt, with_masks=False)
    with pytest.raises(ValueError, match="segmentation"):
        coco_evaluate(coco_gt, boxes_only, iou_types=("bbox", "segm"))
    with pytest.raises(ValueError, match="unknown iou type"):
        coco_evaluate(coco_gt, boxes_only, iou_types=("keypoints",))
    stray = dict(boxes_only[0], image_id=999)
    with pytest.raises(ValueError, match="999"):
        coco_evaluate(coco_gt, [stray], iou_types=("bbox",))


def test_pycocotools_output_only_when_verbose(coco_gt, capsys):
    coco_evaluate(coco_gt, perfect_results(coco_gt))
    assert capsys.readouterr().out == ""
    coco_evaluate(coco_gt, perfect_results(coco_gt), verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_detections_to_coco_results_roundtrip():
    rng = np.random.default_rng(0)
    masks = rng.random((2, 7, 9)) > 0.5
    boxes = torch.tensor([[1.0, 2.0, 5.5, 6.0], [0.0, 0.0, 9.0, 7.0]])
    results = detections_to_coco_results(5, boxes, torch.tensor([0.9, 0.3]),
                                         torch.tensor([2, 1]), torch.from_numpy(masks),
                                         CATEGORY_IDS)
    assert [r["category_id"] for r in results] == [3, 1]
    assert results[0]["bbox"] == pytest.approx([1.0, 2.0, 4.5, 4.0])
    assert results[1]["score"] == pytest.approx(0.3)
    json.dumps(results)  # counts are str, everything is JSON
    for r, m in zip(results, masks, strict=True):
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [7, 9]
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]).astype(bool), m)
    no_masks = detections_to_coco_results(5, boxes, [0.9, 0.3], [2, 1], None, None)
    assert "segmentation" not in no_masks[0] and no_masks[0]["category_id"] == 2
    assert detections_to_coco_results(5, np.zeros((0, 4)), [], [], np.zeros((0, 7, 9)),
                                      CATEGORY_IDS) == []
    with pytest.raises(ValueError, match="label 4"):
        detections_to_coco_results(5, boxes, [0.9, 0.3], [4, 1], None, CATEGORY_IDS)


def test_format_metrics_follows_seed_order(coco_gt):
    m = coco_evaluate(coco_gt, perfect_results(coco_gt, drop={2}))
    m["eval_images_per_sec"] = 12.5
    lines = format_metrics(m).splitlines()
    assert lines[0] == "=========== Metrics ==========="
    names = [line.split(":")[0] for line in lines[1:]]
    seed = ["AP", "AP50", "AP75", "APl", "APm", "APs", "ARl", "ARm", "ARmax1", "ARmax10",
            "ARmax100", "ARs"]
    assert names == seed + ["mask_" + n for n in seed] + ["eval_images_per_sec"]
    assert lines[1] == f"AP: {(51 / 101 + 1) / 2:.9f}"
    assert "APl: -1.000000000" in lines


def test_per_class_table(coco_gt):
    m = coco_evaluate(coco_gt, perfect_results(coco_gt, drop={2}))
    rows = format_per_class_table(m).splitlines()
    assert rows[0].split() == ["class", "AP", "mask_AP"]
    assert rows[2].split() == ["cat", "0.5050", "0.5050"]
    assert rows[3].split() == ["dog", "1.0000", "1.0000"]
    assert rows[4].split() == ["bird", "-", "-"]
    assert len({len(r) for r in rows}) == 1  # aligned columns


def test_write_metrics_json_atomic(tmp_path, coco_gt):
    m = coco_evaluate(coco_gt, [])
    m["nan_value"] = float("nan")
    path = write_metrics_json(m, tmp_path / "sub" / "metrics.json")
    loaded = json.loads(path.read_text())
    assert loaded["AP"] == 0.0 and loaded["per_class"]["bird"]["AP"] is None
    assert loaded["nan_value"] is None
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left


# ---------------------------------------------------------------- evaluate_model, end to end

IMAGE_SIZE = (64, 64)
SCALE = 0.64  # min(64 / 80, 64 / 100)


def _write_images(image_dir):
    """Each image is one flat grey whose value is its id: it survives resizing unchanged, so the
    fake model can tell which image it is looking at."""
    image_dir.mkdir()
    for image_id in (10, 20):
        Image.fromarray(np.full((H, W, 3), image_id, np.uint8)).save(image_dir / f"{image_id}.png")
    return image_dir


class BoxModel(torch.nn.Module):
    """Eval forward returns, for the image whose pixel value is its id, the given detections in
    padded-input pixels, padded to D rows; masks are all ones (pasted = the box)."""

    def __init__(self, per_image, d=4, r=14):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.per_image, self.d, self.r = per_image, d, r
        self.calls = 0

    def forward(self, images):
        assert not self.training and images.dtype == torch.uint8
        self.calls += 1
        b = images.shape[0]
        out = {"boxes": torch.zeros(b, self.d, 4), "scores": torch.zeros(b, self.d),
               "classes": torch.zeros(b, self.d, dtype=torch.int64),
               "masks": torch.ones(b, self.d, self.r, self.r),
               "num_detections": torch.zeros(b, dtype=torch.int64)}
        for j in range(b):
            dets = self.per_image[int(images[j, 0, 0, 0])]
            for k, (box, score, label) in enumerate(dets):
                out["boxes"][j, k] = torch.tensor(box)
                out["scores"][j, k] = score
                out["classes"][j, k] = label
            out["num_detections"][j] = len(dets)
        return out


def _spec(gt_json, image_dir, include_mask=True, eval_samples=0):
    """The spec fields evaluation reads (data loader and model output options)."""
    data_config = types.SimpleNamespace(
        image_size=IMAGE_SIZE, num_classes=4, val_json_file=str(gt_json),
        val_image_dir=str(image_dir), validation_file_pattern="", eval_samples=eval_samples,
        max_num_instances=10, n_workers=0)
    return types.SimpleNamespace(
        eval_batch_size=2, use_amp=False, data_config=data_config,
        maskrcnn_config=types.SimpleNamespace(include_mask=include_mask, gt_mask_size=28))


def _gt_detections(coco):
    """Perfect detections of every image, keyed by image id, in padded-input pixels."""
    per_image = {}
    for image_id in coco.getImgIds():
        dets = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            x, y, w, h = ann["bbox"]
            box = [v * SCALE for v in (x, y, x + w, y + h)]
            dets.append((box, 0.9, CATEGORY_IDS.index(ann["category_id"]) + 1))
        per_image[image_id] = dets
    return per_image


@pytest.fixture
def rect_data(tmp_path):
    gt_json = write_gt(tmp_path / "rect.json", RECTANGLES)
    return gt_json, _write_images(tmp_path / "images"), COCO(str(gt_json))


def test_evaluate_model_perfect_fake_model(rect_data):
    gt_json, image_dir, coco = rect_data
    model = BoxModel(_gt_detections(coco))
    model.train()
    m = evaluate_model(model, _spec(gt_json, image_dir), progress=False)
    # Box-shaped ground truth and all-ones masks pasted into the same boxes: identical masks.
    assert m["AP"] == pytest.approx(1.0) and m["mask_AP"] == pytest.approx(1.0)
    assert m["ARmax100"] == pytest.approx(1.0) and m["mask_ARmax100"] == pytest.approx(1.0)
    assert m["per_class"]["bird"] == {"AP": None, "mask_AP": None}
    assert m["eval_images"] == 2 and m["eval_images_per_sec"] > 0
    assert model.training  # mode restored


def test_evaluate_model_max_images_and_box_only(rect_data):
    gt_json, image_dir, coco = rect_data
    model = BoxModel(_gt_detections(coco))
    m = evaluate_model(model, _spec(gt_json, image_dir, include_mask=False), max_images=1,
                       progress=False)
    assert m["eval_images"] == 1 and model.calls == 1
    assert m["AP"] == pytest.approx(1.0)  # image 10 only: its cat is found
    assert m["per_class"]["dog"] == {"AP": None}
    assert "mask_AP" not in m


def test_evaluate_model_on_a_given_dataset(rect_data):
    from mrcnn_helpers.data import CocoInstanceDataset

    gt_json, image_dir, coco = rect_data
    per_image = _gt_detections(coco)
    per_image[20] = per_image[20][1:]  # miss the cat of image 20
    dataset = CocoInstanceDataset(gt_json, image_dir, image_size=IMAGE_SIZE, train=False,
                                  gt_mask_size=28)
    m = evaluate_model(BoxModel(per_image), _spec(gt_json, image_dir),
                       dataset=torch.utils.data.Subset(dataset, [0, 1]), progress=False)
    assert m["per_class"]["cat"]["AP"] == pytest.approx(51 / 101)
    assert m["mask_ARmax100"] == pytest.approx(0.75)


def test_evaluate_model_needs_coco_ground_truth(rect_data):
    gt_json, image_dir, _ = rect_data

    class NoCoco(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {}

    with pytest.raises(DataError, match="NoCoco"):
        evaluate_model(BoxModel({}), _spec(gt_json, image_dir), dataset=NoCoco(), progress=False)


def test_infer_json_scored_by_pycocotools_gives_evaluate_ap(rect_data, tmp_path):
    """`mrcnn infer --json` with the dataset's JSON (--ann) carries the dataset's image ids, so
    pycocotools scoring that file against the ground truth gives evaluate_model's AP."""
    from pycocotools.cocoeval import COCOeval

    from mrcnn_helpers.inference import Predictor
    from mrcnn_helpers.inference.annotate import annotate_images

    gt_json, image_dir, coco = rect_data
    per_image = _gt_detections(coco)
    box, score, label = per_image[20][1]
    per_image[20][1] = ([box[0] + 6, box[1], box[2] + 6, box[3]], 0.7, label)  # a shifted dog
    per_image[10].append(([5.0, 5.0, 20.0, 20.0], 0.8, 2))                      # a false dog
    spec = _spec(gt_json, image_dir)
    names = ["background", "cat", "dog", "bird"]
    metrics = evaluate_model(Predictor(BoxModel(per_image), spec, names,
                                       category_ids=CATEGORY_IDS), spec, progress=False)
    summary = annotate_images(Predictor(BoxModel(per_image), spec, names,
                                        category_ids=CATEGORY_IDS),
                              image_dir, tmp_path / "drawn", threshold=0.0, include_mask=True,
                              json_path=tmp_path / "results.json", ann_file=gt_json,
                              progress=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted({r["image_id"] for r in results}) == [10, 20] and summary["image_ids"] == "dataset"
    scored = {}
    for iou_type, prefix in (("bbox", ""), ("segm", "mask_")):
        kept = [{k: v for k, v in r.items() if k != ("segmentation" if iou_type == "bbox"
                                                      else "bbox")} for r in results]
        run = COCOeval(coco, coco.loadRes(kept), iou_type)
        run.evaluate()
        run.accumulate()
        run.summarize()
        scored[prefix + "AP"], scored[prefix + "AP50"] = run.stats[0], run.stats[1]
    assert 0.2 < metrics["AP"] < 0.95  # neither trivial nor perfect
    for name, value in scored.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name


def test_faster_coco_eval_gives_pycocotools_numbers(coco_gt, monkeypatch):
    """The C++ COCOeval (faster-coco-eval) and the pycocotools reference agree on every metric
    of noisy, partly wrong detections, boxes and masks, per class too."""
    pytest.importorskip("faster_coco_eval")
    from mrcnn_helpers.evaluate import cocoeval_class

    rng = np.random.default_rng(0)
    results = []
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds()):
        x, y, w, h = ann["bbox"]
        mask = coco_gt.annToMask(ann).astype(bool)
        for k in range(4):
            dx, dy = rng.integers(-6, 7, 2)
            box = np.array([[x + dx, y + dy, x + w + dx, y + h + dy]], dtype=float)
            shifted = np.roll(mask, (int(dy), int(dx)), axis=(0, 1))[None]
            label = int(rng.integers(1, 4)) if k else CATEGORY_IDS.index(ann["category_id"]) + 1
            results += detections_to_coco_results(ann["image_id"], box, [float(rng.random())],
                                                  [label], shifted, CATEGORY_IDS)
    assert cocoeval_class().__module__.startswith("faster_coco_eval")
    fast = coco_evaluate(coco_gt, results)
    monkeypatch.setenv("MRCNN_COCOEVAL", "pycocotools")
    assert cocoeval_class().__module__.startswith("pycocotools")
    reference = coco_evaluate(coco_gt, results)
    assert 0.05 < reference["AP"] < 0.95 and 0.05 < reference["mask_AP"] < 0.95
    for name, value in reference.items():
        if name != "per_class":
            assert fast[name] == pytest.approx(value, abs=1e-12), name
    for name, values in reference["per_class"].items():
        assert fast["per_class"][name] == pytest.approx(values), name


def test_rle_from_the_occupied_region_equals_pycocotools_encode():
    """encode_masks reads only the region each mask occupies; its RLE must be byte-identical to
    pycocotools' encoding of the full mask: random, full, empty, edge-touching and full-height
    masks (where runs continue from one column into the next), arrays and tensors; and so must
    the runs found by comparing the whole stack with itself (mask_runs, the GPU path)."""
    from mrcnn_helpers.inference.coco_results import encode_masks, mask_runs

    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        masks = np.zeros((5, h, w), dtype=bool)
        masks[0] = rng.random((h, w)) < 0.5
        masks[1] = True
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        masks[2, y0:, x0:] = rng.random((h - y0, w - x0)) < 0.8
        masks[3, :, x0:] = True                       # empty masks[4]
        expected = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
        for given in (masks, torch.from_numpy(masks), mask_runs(torch.from_numpy(masks))):
            got = encode_masks(given)
            assert [g["counts"] for g in got] == [e["counts"] for e in expected]
            assert [list(g["size"]) for g in got] == [[h, w]] * 5


def test_format_summary_is_short_and_says_n_a(coco_gt):
    from mrcnn_helpers.evaluate import format_summary

    m = coco_evaluate(coco_gt, perfect_results(coco_gt, drop=(2,)))
    m.update(eval_images=2, eval_images_per_sec=12.345)
    lines = format_summary(m).splitlines()
    assert lines[0].split() == ["AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax100"]
    box, mask = lines[1].split(), lines[2].split()
    assert box[0] == "box" and mask[0] == "mask" and len(box) == 8
    assert box[1] == f"{m['AP']:.3f}" and mask[7] == f"{m['mask_ARmax100']:.3f}"
    assert box[4] == "n/a" and box[6] == "n/a"    # no small or large ground truth: -1 in COCO
    assert lines[3] == "2 images, 12.3 img/s" and "-1" not in format_summary(m)
    box_only = {k: v for k, v in m.items() if not k.startswith("mask_")}
    assert len(format_summary(box_only).splitlines()) == 3
