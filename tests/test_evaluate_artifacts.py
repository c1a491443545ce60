"""The files of `mrcnn evaluate --save-dir`: confusion matrix counts, precision/recall curves taken
from COCOeval, metrics.json, the PNGs, and the folder checked against the inputs.

Ground truth as in test_evaluate: image 10 holds a cat, image 20 a cat and a dog, no bird
(categories 1, 3, 7 = contiguous labels 1, 2, 3).
"""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from test_evaluate import (
    CATEGORY_IDS,
    OBJECTS,
    RECTANGLES,
    BoxModel,
    H,
    W,
    _gt_detections,
    _spec,
    _write_images,
    perfect_results,
    write_gt,
)
from test_pipeline import TINY_SPEC

from mrcnn_helpers.cli import main
from mrcnn_helpers.commands import evaluate as evaluate_command
from mrcnn_helpers.evaluate import (
    coco_evaluate,
    detections_to_coco_results,
    evaluate_model,
    run_cocoeval,
    run_evaluation,
)
from mrcnn_helpers.evaluate.analysis import confusion_matrix, pr_curves
from mrcnn_helpers.evaluate.artifacts import write_evaluation_artifacts
from mrcnn_helpers.fileio import json_safe
from mrcnn_helpers.inference import Predictor

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
pytest.importorskip("matplotlib")

NAMES = ["background", "cat", "dog", "bird"]


@pytest.fixture
def gt(tmp_path):
    """test_evaluate's ground truth (a pentagon cat in image 10), as a pycocotools COCO."""
    return COCO(str(write_gt(tmp_path / "gt.json", OBJECTS)))


@pytest.fixture
def rect(tmp_path):
    """Box-shaped ground truth and its images (test_evaluate's rect_data)."""
    gt_json = write_gt(tmp_path / "rect.json", RECTANGLES)
    return gt_json, _write_images(tmp_path / "images"), COCO(str(gt_json))


def _result(coco, ann_id, label, score):
    """A result with the mask and box of annotation `ann_id`, claimed as `label` at `score`."""
    ann = coco.loadAnns([ann_id])[0]
    x, y, w, h = ann["bbox"]
    return detections_to_coco_results(ann["image_id"], np.array([[x, y, x + w, y + h]]), [score],
                                      [label], coco.annToMask(ann)[None].astype(bool),
                                      CATEGORY_IDS)[0]


def _empty_spot(image_id, score, label):
    """A 20 x 20 detection where image `image_id` has no object."""
    mask = np.zeros((1, H, W), dtype=bool)
    mask[0, 55:75, 60:80] = True
    return detections_to_coco_results(image_id, np.array([[60.0, 55.0, 80.0, 75.0]]), [score],
                                      [label], mask, CATEGORY_IDS)[0]


# Rows: the ground truth (cat, dog, bird, background); columns: the prediction.
HAND_MADE = np.array([[1, 1, 0, 0],   # cat found in image 10; image 20's cat taken for a dog
                      [0, 0, 0, 1],   # the dog missed (its only detection scores 0.3)
                      [0, 0, 0, 0],
                      [2, 0, 0, 0]])  # a second detection of image 10's cat, a cat on nothing


def _hand_made(coco):
    return [_result(coco, 1, 1, 0.9),      # image 10: the cat
            _result(coco, 1, 1, 0.6),      # image 10: the same cat again (one to one: unpaired)
            _result(coco, 2, 2, 0.8),      # image 20: its cat, called a dog
            _result(coco, 3, 2, 0.3),      # image 20: the dog, below the threshold
            _empty_spot(20, 0.7, 1)]       # image 20: a cat where there is nothing


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_confusion_matrix_counts_matches_misses_and_false_positives(gt, iou_type):
    results = _hand_made(gt)
    counts = confusion_matrix(gt, results, [10, 20], CATEGORY_IDS, iou_type=iou_type)
    assert counts.dtype == np.int64 and counts.tolist() == HAND_MADE.tolist()
    # A lower threshold lets the dog's detection in: found, no longer missed.
    low = confusion_matrix(gt, results, [10, 20], CATEGORY_IDS, score_threshold=0.2,
                           iou_type=iou_type)
    assert low[1].tolist() == [0, 1, 0, 0]
    assert (low - counts).sum() == 0  # one count moved from [dog, background] to [dog, dog]
    # Only image 10: its cat and the duplicate.
    only_10 = confusion_matrix(gt, results, [10], CATEGORY_IDS, iou_type=iou_type)
    assert only_10.tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]


def test_confusion_matrix_pairs_by_iou_threshold(gt):
    # Boxes moved right by 20 % of their width: IoU 2/3 is a pair at 0.5, none at 0.7.
    results = perfect_results(gt, shift=0.2, with_masks=False)
    paired = confusion_matrix(gt, results, [10, 20], CATEGORY_IDS, iou_type="bbox")
    assert np.diag(paired).tolist() == [2, 1, 0, 0] and paired.sum() == 3
    apart = confusion_matrix(gt, results, [10, 20], CATEGORY_IDS, iou_type="bbox",
                             iou_threshold=0.7)
    assert apart[:3, 3].tolist() == [2, 1, 0] and apart[3, :3].tolist() == [2, 1, 0]
    assert np.trace(apart) == 0


def test_pr_curves_are_cocoeval_precision(gt):
    # Image 20's cat missed: cat recall 1/2 at precision 1, so its curve is 1 up to recall 0.50
    # (51 of COCO's 101 recall points) and 0 beyond; the dog's is 1 throughout; no bird.
    results = perfect_results(gt, drop={2})
    coco_eval = run_cocoeval(gt, results, "segm", [10, 20])
    curves = pr_curves(coco_eval)
    assert np.array_equal(curves["recall"], np.linspace(0.0, 1.0, 101))
    assert curves["category_ids"] == CATEGORY_IDS
    cat = np.r_[np.ones(51), np.zeros(50)]
    for key in ("precision50", "precision"):
        assert curves[key].shape == (3, 101)
        # pycocotools' precision is tp / (tp + fp + eps): 1 within a few ulps.
        assert np.allclose(curves[key][0], cat, rtol=0, atol=1e-12)
        assert np.allclose(curves[key][1], 1.0, rtol=0, atol=1e-12)
        assert np.isnan(curves[key][2]).all()
    # Taken as they are from pycocotools' array (IoU 0.50, area all, 100 detections).
    raw = coco_eval.eval["precision"]  # [T, R, K, A, M]
    assert np.array_equal(curves["precision50"][:2], raw[0, :, :2, 0, 2].T)
    assert np.array_equal(curves["precision"][:2], raw[:, :, :2, 0, 2].mean(axis=0).T)
    assert (raw[:, :, 2] == -1).all()  # no bird: pycocotools' -1, NaN here
    per_class = coco_evaluate(gt, results, ("segm",))["per_class"]
    assert curves["ap"] == [pytest.approx(51 / 101), pytest.approx(1.0), None]
    assert curves["ap"][:2] == pytest.approx([per_class["cat"]["mask_AP"],
                                              per_class["dog"]["mask_AP"]], abs=1e-12)
    assert curves["ap50"] == curves["ap"]


def test_pr_curves_average_the_iou_thresholds(gt):
    # IoU 2/3 everywhere: a match at 4 of the 10 IoU thresholds, so precision 1 at IoU 0.50 and
    # 0.4 averaged over 0.50:0.95, at every recall point.
    results = perfect_results(gt, shift=0.2, with_masks=False)
    curves = pr_curves(run_cocoeval(gt, results, "bbox", [10, 20]))
    assert np.allclose(curves["precision50"][:2], 1.0)
    assert np.allclose(curves["precision"][:2], 0.4)
    per_class = coco_evaluate(gt, results, ("bbox",))["per_class"]
    assert curves["ap"][0] == pytest.approx(per_class["cat"]["AP"]) == pytest.approx(0.4)
    assert curves["ap50"][:2] == [pytest.approx(1.0)] * 2


def _model(coco):
    """The fake model: every object found, plus a dog at an empty spot of image 10."""
    per_image = _gt_detections(coco)
    per_image[10].append(([3.0, 3.0, 13.0, 13.0], 0.8, 2))
    return per_image


def _png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size, np.asarray(image.convert("RGB"))


def test_evaluate_save_dir_writes_metrics_and_plots(rect, tmp_path, monkeypatch, capsys):
    gt_json, image_dir, coco = rect
    spec = _spec(gt_json, image_dir)

    def loaded(args, outputs=None):  # the fake model in place of a model file
        assert outputs == {"--save-dir": str(tmp_path / "eval")}
        return Predictor(BoxModel(_model(coco)), spec, NAMES, category_ids=CATEGORY_IDS)

    monkeypatch.setattr(evaluate_command, "load_for_inference", loaded)
    capsys.readouterr()
    assert main(["evaluate", "-m", str(tmp_path / "model.pth"), "--save-dir",
                 str(tmp_path / "eval"), "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert f"evaluation files written to {tmp_path / 'eval'}" in out
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == json.loads((tmp_path / "m.json").read_text())
    again = json_safe(evaluate_model(BoxModel(_model(coco)), spec, progress=False))
    assert saved.pop("eval_images_per_sec") > 0 and again.pop("eval_images_per_sec") > 0
    assert saved == again and saved["eval_images"] == 2
    assert saved["per_class"]["bird"] == {"AP": None, "mask_AP": None}
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "confusion_matrix.png", "metrics.json", "pr_curves.png", "predictions.png"]
    # Sizes at 120 dpi: 13 x 5 in; 7.5 x 6 in (4 rows and columns); two rows of two 6 in panels
    # of the 100 x 80 images (6 x 4.8 in) under 0.4 in of title.
    expected = {"pr_curves.png": (1560, 600), "confusion_matrix.png": (900, 720),
                "predictions.png": (1440, 1248)}
    for name, size in expected.items():
        got, pixels = _png(tmp_path / "eval" / name)
        assert got == size, name
        assert pixels.std() > 10, name  # drawn, not blank


def test_artifacts_of_one_evaluation_and_its_confusion_matrix(rect, tmp_path, monkeypatch):
    gt_json, image_dir, coco = rect
    spec = _spec(gt_json, image_dir)
    evaluation = run_evaluation(BoxModel(_model(coco)), spec, progress=False)
    assert set(evaluation.coco_evals) == {"bbox", "segm"} and evaluation.image_ids == [10, 20]
    counts = confusion_matrix(coco, evaluation.results, evaluation.image_ids, CATEGORY_IDS)
    assert counts.tolist() == [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    curves = pr_curves(evaluation.coco_evals["segm"])
    assert curves["ap"][:2] == pytest.approx(
        [evaluation.metrics["per_class"][n]["mask_AP"] for n in ("cat", "dog")], abs=1e-12)
    # Without matplotlib: metrics.json alone, and one note.
    notes = []
    monkeypatch.setattr("mrcnn_helpers.evaluate.artifacts.matplotlib_missing",
                        lambda: "matplotlib is not installed")
    written = write_evaluation_artifacts(evaluation, tmp_path / "bare", note=notes.append)
    assert [p.name for p in written] == ["metrics.json"]
    assert notes == ["note: plots not written: matplotlib is not installed"]
    assert json.loads(written[0].read_text()) == json_safe(evaluation.metrics)
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["metrics.json"]


def test_default_save_dir_is_eval_in_the_results_directory(tmp_path):
    (tmp_path / "results").mkdir()
    assert evaluate_command.default_save_dir(str(tmp_path / "results")) == (
        tmp_path / "results" / "eval")
    assert evaluate_command.default_save_dir(str(tmp_path / "results" / "model.step-6.pth")) == (
        tmp_path / "results" / "eval")


def _cli_error(capsys, *argv):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_save_dir_over_an_input_is_refused_in_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    spec = tmp_path / "spec.txt"
    spec.write_text(TINY_SPEC.replace("DATA", str(data)))
    model = tmp_path / "model.pth"
    model.write_bytes(b"never read")
    inside = data / "val" / "eval"
    line = _cli_error(capsys, "evaluate", "-e", spec, "-m", model, "--save-dir", inside)
    assert line == (f"error: --save-dir {inside} lies inside the input folder {data / 'val'}: "
                    "writing there could replace what is read; choose a path outside it")
    line = _cli_error(capsys, "evaluate", "-m", model, "--save-dir", tmp_path)
    assert line.startswith(f"error: --save-dir {tmp_path} is a folder holding the input {model}")
    line = _cli_error(capsys, "evaluate", "-m", model, "--save-dir", model, "-e", spec)
    assert line.startswith(f"error: --save-dir {model} is the input {model}")
    # The default (eval/ beside the model) is checked the same way.
    (data / "val" / "model.pth").write_bytes(b"never read")
    line = _cli_error(capsys, "evaluate", "-e", spec, "-m", data / "val" / "model.pth")
    assert line.startswith(f"error: the default --save-dir {data / 'val' / 'eval'} lies inside "
                           f"the input folder {data / 'val'}")
    assert not inside.exists() and model.read_bytes() == b"never read"
    assert sorted(p.name for p in (data / "val").iterdir()) == ["model.pth"]


def test_every_figure_writes_text_of_10_points_or_more_at_120_dpi(rect, tmp_path):
    """Under rc defaults of 6 points, every text of every figure (legends, ticks, labels, cell
    counts, colorbar) is still drawn at 10 points or more, and the PNGs say 120 dpi."""
    import matplotlib
    from matplotlib.text import Text

    from mrcnn_helpers.engine.results_plot import read_results_csv, results_figure
    from mrcnn_helpers.evaluate.artifacts import prediction_panels
    from mrcnn_helpers.evaluate.plots import (
        confusion_matrix_figure,
        pr_curves_figure,
        predictions_figure,
    )
    from mrcnn_helpers.plotting import figure_png

    gt_json, image_dir, coco = rect
    evaluation = run_evaluation(BoxModel(_model(coco)), _spec(gt_json, image_dir), progress=False)
    csv_path = tmp_path / "results.csv"
    csv_path.write_text("step,event,time,total_loss,learning_rate,samples_per_sec,AP,mask_AP\n"
                        "5,train,t,2.5,0.0001,40.0,,\n6,eval,t,,,,0.25,0.125\n"
                        "10,train,t,1.5,0.00001,42.0,,\n")
    small = {"font.size": 6, "legend.fontsize": 6, "xtick.labelsize": 6, "ytick.labelsize": 6,
             "axes.labelsize": 6, "axes.titlesize": 6, "legend.title_fontsize": 6}
    with matplotlib.rc_context(small):
        figures = {
            "pr": pr_curves_figure(pr_curves(evaluation.coco_evals["segm"]), NAMES[1:]),
            "confusion": confusion_matrix_figure(confusion_matrix(
                coco, evaluation.results, [10, 20], CATEGORY_IDS), NAMES[1:], "score >= 0.5"),
            "predictions": predictions_figure(prediction_panels(evaluation,
                                                                score_threshold=0.5)),
            "results": results_figure(read_results_csv(csv_path)),
        }
        for name, fig in figures.items():
            png = figure_png(fig)  # drawn: tick labels and offsets exist now
            texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
            assert len(texts) >= (4 if name == "predictions" else 10), name
            small_ones = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 10]
            assert small_ones == [], name
            path = tmp_path / f"{name}.png"
            path.write_bytes(png)
            with Image.open(path) as image:
                assert [round(v) for v in image.info["dpi"]] == [120, 120], name


def test_confusion_matrix_ignores_detections_on_crowd_regions(tmp_path):
    # A crowd of cats in image 10 (x 60..90, y 50..75): a detection on it is no false positive
    # (COCOeval ignores it too); the crowd is nobody's missed instance.
    path = write_gt(tmp_path / "gt.json", OBJECTS)
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 9, "image_id": 10, "category_id": 1, "iscrowd": 1,
                                "segmentation": [[60, 50, 90, 50, 90, 75, 60, 75]],
                                "area": 750.0, "bbox": [60, 50, 30, 25]})
    path.write_text(json.dumps(data))
    coco = COCO(str(path))
    on_crowd = _empty_spot(10, 0.9, 1)  # x 60..80, y 55..75: inside the crowd
    counts = confusion_matrix(coco, [_result(coco, 1, 1, 0.9), on_crowd], [10], CATEGORY_IDS)
    assert counts.tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # The same detection without the crowd is a false positive.
    plain = COCO(str(write_gt(tmp_path / "plain.json", OBJECTS)))
    counts = confusion_matrix(plain, [_result(plain, 1, 1, 0.9), on_crowd], [10], CATEGORY_IDS)
    assert counts[3].tolist() == [1, 0, 0, 0]
