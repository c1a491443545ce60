"""mrcnn_helpers.notebook without a kernel: tables, matching, COCO precision arrays, the training
monitor's history, figures and the instance viewer (driven by a fake predictor whose detections
are the ground truth with known errors added)."""

import json
import os

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

pytest.importorskip("matplotlib")
pytest.importorskip("ipywidgets")

from mrcnn_helpers import notebook as nb
from mrcnn_helpers.data import generate_synthetic_dataset, load_coco
from mrcnn_helpers.errors import CheckpointError
from mrcnn_helpers.evaluate import coco_evaluate, detections_to_coco_results
from mrcnn_helpers.notebook.analysis import coco_precision
from mrcnn_helpers.spec import load_spec, replace_spec

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_SPEC = os.path.join(REPO, "specs", "demo_synthetic.txt")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_dataset(out, num_train=8, num_val=6, image_size=(96, 96), seed=3)


def gt_detections(coco, image_id):
    """The ground truth of one image as a Predictor output (score 0.9), original pixels."""
    gt = nb.load_ground_truth(coco, image_id)
    keep = ~gt["crowd"]
    n = int(keep.sum())
    return {"boxes": torch.as_tensor(gt["boxes"][keep]), "scores": torch.full((n,), 0.9),
            "classes": torch.as_tensor(gt["classes"][keep]),
            "masks": torch.as_tensor(gt["masks"][keep])}


class FakePredictor:
    """Returns each image's ground truth, except: image ids in `drop` lose their first instance,
    and image ids in `extra` get one false positive (class 1, a 10x10 square at the top left,
    score 0.3)."""

    class_names = ("background", "circle", "triangle", "square")
    batch_size = 2

    def __init__(self, coco, image_dir, drop=(), extra=()):
        self.coco, self.by_path = coco, {}
        for image_id, info in coco.imgs.items():
            self.by_path[os.path.join(str(image_dir), info["file_name"])] = image_id
        self.drop, self.extra = set(drop), set(extra)
        self.calls = []

    def predict(self, paths, score_threshold=0.5):
        outputs = []
        for path in paths:
            image_id = self.by_path[str(path)]
            self.calls.append(image_id)
            out = gt_detections(self.coco, image_id)
            if image_id in self.drop:
                out = {k: v[1:] for k, v in out.items()}
            if image_id in self.extra:
                info = self.coco.imgs[image_id]
                mask = torch.zeros((1, info["height"], info["width"]), dtype=torch.bool)
                mask[0, :10, :10] = True
                out = {"boxes": torch.cat([out["boxes"], torch.tensor([[0.0, 0.0, 10.0, 10.0]])]),
                       "scores": torch.cat([out["scores"], torch.tensor([0.3])]),
                       "classes": torch.cat([out["classes"], torch.tensor([1])]),
                       "masks": torch.cat([out["masks"], mask])}
            keep = out["scores"] >= score_threshold
            outputs.append({k: v[keep] for k, v in out.items()})
        return outputs


# ----- tables -----------------------------------------------------------------------------

def test_table_renders_text_and_escaped_html():
    table = nb.Table(["name", "value"], [["a<b", 0.5], ["c", None]], title="T", bold={1},
                     sections={0: "block"})
    text = str(table)
    assert text.splitlines()[0] == "T"
    assert "[block]" in text and text.rstrip().endswith("*")  # the bold row is marked
    html = table._repr_html_()
    assert "a&lt;b" in html and "a<b" not in html
    assert "font-weight: bold" in html and "<caption" in html
    assert table.column("value") == [0.5, None]


def test_spec_table_marks_fields_that_differ_from_the_defaults():
    spec = load_spec(DEMO_SPEC)
    table = nb.spec_table(spec)
    fields = table.column("field")
    bold_fields = {fields[i] for i in table.bold}
    assert {"total_steps", "nlayers", "num_classes"} <= bold_fields
    assert "momentum" not in bold_fields  # 0.9 is TLT's default
    assert set(table.sections.values()) == {"experiment", "data_config", "maskrcnn_config"}
    row = fields.index("nlayers")
    assert table.rows[row][1:] == [spec.maskrcnn_config.nlayers, 50]
    assert spec.maskrcnn_config.nlayers != 50


def test_spec_changes_lists_exactly_the_changed_fields():
    spec = load_spec(DEMO_SPEC)
    changed = replace_spec(spec, total_steps=10, learning_rate_steps=(5,),
                           learning_rate_decay_levels=(0.1,),
                           **{"data_config.image_size": (192, 192)})
    table = nb.spec_changes(spec, changed)
    assert table.column("field") == ["learning_rate_steps", "learning_rate_decay_levels",
                                     "total_steps", "data_config.image_size"]
    assert table.rows[-1][1:] == [spec.data_config.image_size, (192, 192)]
    assert nb.spec_changes(spec, spec).rows == []


def test_metrics_table_columns_and_missing_values():
    metrics = {"AP": 0.51234, "AP50": 0.7, "APl": -1.0, "mask_AP": 0.4, "eval_images": 5,
               "eval_images_per_sec": 2.5}
    table = nb.metrics_table(metrics)
    assert list(table.columns) == ["metric", "box", "mask"]
    assert table.rows[0] == ["AP", 0.5123, 0.4]
    assert table.rows[5][0] == "APl" and table.rows[5][1] is None  # -1: no GT in that range
    assert "5 images" in table.title and "2.50 images/s" in table.title
    box_only = nb.metrics_table({"AP": 0.1})
    assert list(box_only.columns) == ["metric", "box"]
    assert nb.metrics_table(None).rows == [] and "no evaluation" in nb.metrics_table(None).title


def test_dataset_summary_counts_match_the_annotations(synthetic):
    coco = load_coco(synthetic["train_json"])
    table = nb.dataset_summary(synthetic["train_json"])
    assert table.column("class") == ["circle", "triangle", "square", "all"]
    anns = list(coco.anns.values())
    for row, cat_id in zip(table.rows[:3], sorted(coco.cats), strict=True):
        mine = [a for a in anns if a["category_id"] == cat_id]
        assert row[1] == len(mine)
        assert row[2] == len({a["image_id"] for a in mine})
        assert row[3] + row[4] + row[5] == row[1]
    assert table.rows[-1][1] == len(anns)
    assert table.title.startswith("8 images")


# ----- matching and COCO arrays -------------------------------------------------------------

def square(y, x, size=10, shape=(40, 40)):
    m = np.zeros(shape, dtype=bool)
    m[y:y + size, x:x + size] = True
    return m


def rles(*masks):
    return nb.masks_to_rles(np.stack(masks)) if masks else []


def test_match_instances_counts_missed_and_false_positives():
    gt = rles(square(0, 0), square(20, 20), square(0, 25))
    # d0 matches g0; d1 is the right place for g1 but the wrong class; d2 duplicates g0 with a
    # lower score; g2 is never found.
    dt = rles(square(0, 0), square(20, 20), square(1, 0))
    found = nb.match_instances(gt, [1, 2, 1], dt, [1, 3, 1], [0.9, 0.8, 0.7])
    assert found["matches"] == [(0, 0, 1.0)]
    assert found["false_positives"] == [1, 2]
    assert found["missed"] == [1, 2]
    assert found["ignored"] == []


def test_match_instances_prefers_the_higher_score_and_ignores_crowd():
    gt = rles(square(0, 0), square(20, 20, size=15))
    dt = rles(square(1, 0), square(0, 0), square(22, 22))
    found = nb.match_instances(gt, [1, 1], dt, [1, 1, 1], [0.5, 0.9, 0.8], gt_crowd=[False, True])
    assert found["matches"] == [(1, 0, 1.0)]  # the 0.9 detection takes g0 first
    assert found["false_positives"] == [0]
    assert found["ignored"] == [2]  # inside the crowd region: neither right nor wrong
    assert found["missed"] == []  # crowd instances are never "missed"


def test_match_instances_with_nothing_on_one_side():
    gt = rles(square(0, 0))
    assert nb.match_instances(gt, [1], [], [], [])["missed"] == [0]
    found = nb.match_instances([], [], rles(square(0, 0)), [2], [0.4])
    assert found["false_positives"] == [0] and found["missed"] == []


def test_coco_precision_matches_coco_evaluate(synthetic):
    coco = load_coco(synthetic["val_json"])
    results = []
    for image_id in sorted(coco.imgs)[:4]:
        out = gt_detections(coco, image_id)
        results += detections_to_coco_results(image_id, out["boxes"], out["scores"],
                                              out["classes"], out["masks"], sorted(coco.cats))
    ids = sorted(coco.imgs)[:4]
    metrics, precision, iou_thrs, rec_thrs = coco_precision(coco, results, ids)
    reference = coco_evaluate(coco, results, image_ids=ids)
    assert metrics == reference
    assert metrics["mask_AP"] == pytest.approx(1.0)  # detections are the ground truth
    assert precision["segm"].shape == (len(iou_thrs), len(rec_thrs), 3)
    present = precision["segm"][0] >= 0
    assert present.any() and np.all(precision["segm"][0][present] == pytest.approx(1.0))


def test_coco_precision_without_detections(synthetic):
    coco = load_coco(synthetic["val_json"])
    metrics, precision, _, _ = coco_precision(coco, [], sorted(coco.imgs))
    assert precision == {} and metrics["AP"] == 0.0


# ----- monitor --------------------------------------------------------------------------------

def train_record(step, loss=1.0, total=6):
    return {"event": "train", "step": step, "total_steps": total, "samples_per_sec": 4.0,
            "learning_rate": 0.01, "total_loss": loss, "mask_loss": loss / 2, "l2_loss": 0.1,
            "rpn_box_loss": float("nan")}


def test_monitor_keeps_history_across_reruns_and_drops_repeated_steps(tmp_path):
    monitor = nb.TrainingMonitor(tmp_path, show=False)
    for step in (2, 4):
        monitor(train_record(step))
    monitor({"event": "eval", "step": 4, "AP": 0.2, "mask_AP": 0.1})
    monitor(train_record(6))  # logged after the last checkpoint (step 4), then interrupted
    lines = (tmp_path / "notebook_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4, 4, 6]
    assert "rpn_box_loss" not in json.loads(lines[0])  # non-finite values are not kept

    resumed = nb.TrainingMonitor(tmp_path, show=False)  # re-running the cell
    assert [r["step"] for r in resumed.train_records] == [2, 4, 6]
    resumed(train_record(6, loss=0.5))  # the resumed run logs step 6 again
    assert [r["step"] for r in resumed.train_records] == [2, 4, 6]
    assert resumed.train_records[-1]["total_loss"] == 0.5
    assert [r["step"] for r in resumed.eval_records] == [4]
    again = nb.TrainingMonitor(tmp_path, show=False)
    assert [(r["step"], r["total_loss"]) for r in again.train_records] == [(2, 1.0), (4, 1.0),
                                                                          (6, 0.5)]
    resumed({"event": "other", "step": 1})  # not a train/eval record: ignored
    assert len(resumed.train_records) == 3


def test_monitor_figure_draws_losses_throughput_and_ap(tmp_path):
    monitor = nb.TrainingMonitor(None, show=False)
    empty = monitor.figure()
    assert "waiting" in empty.axes[0].texts[0].get_text()
    monitor(train_record(1, 2.0))
    monitor(train_record(2, 1.5))
    monitor({"event": "eval", "step": 2, "AP": 0.3, "mask_AP": 0.25})
    fig = monitor.figure()
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["mask", "l2", "total"]
    assert list(fig.axes[0].lines[-1].get_ydata()) == [2.0, 1.5]
    assert "0.250" in fig.axes[2].get_title()
    assert not (tmp_path / "notebook_log.jsonl").exists()


# ----- figures ----------------------------------------------------------------------------------

def test_figures_for_ground_truth_stats_ap_and_pr(synthetic, tmp_path):
    fig = nb.show_ground_truth(synthetic["train_json"], synthetic["train_images"], num_images=3)
    assert isinstance(fig, Figure) and len([a for a in fig.axes if a.images]) == 3
    assert fig.axes[0].get_title().startswith("000001.png")
    stats = nb.plot_dataset_stats(synthetic["train_json"])
    assert len(stats.axes) == 2
    per_class = {"circle": {"AP": 0.5, "mask_AP": 0.4}, "square": {"AP": None, "mask_AP": None}}
    ap = nb.plot_per_class_ap({"per_class": per_class})
    texts = [t.get_text() for t in ap.axes[0].texts]
    assert texts == ["0.500", "no GT", "0.400", "no GT"]
    precision = np.full((10, 101, 2), -1.0)
    precision[:, :, 0] = np.linspace(1.0, 0.0, 101)
    result = nb.EvalResult(metrics={}, results=[], image_ids=[], class_names=["circle", "square"],
                           iou_thresholds=np.linspace(0.5, 0.95, 10),
                           recall_thresholds=np.linspace(0, 1, 101),
                           precision={"bbox": precision, "segm": precision})
    pr = nb.plot_pr_curves(result)
    assert len(pr.axes) == 2
    assert [line.get_label() for line in pr.axes[0].lines] == ["circle @0.5 (AP 0.500)",
                                                               "circle @0.75 (AP 0.500)"]
    empty = nb.plot_pr_curves(nb.EvalResult({}, [], [], [], np.zeros(10), np.zeros(101)))
    assert "no detections" in empty.axes[0].texts[0].get_text()
    fig.savefig(tmp_path / "gt.png")
    assert (tmp_path / "gt.png").stat().st_size > 1000


def test_show_predictions_titles_count_detections(synthetic):
    coco = load_coco(synthetic["val_json"])
    predictor = FakePredictor(coco, synthetic["val_images"], extra={1})
    paths = [os.path.join(synthetic["val_images"], coco.imgs[i]["file_name"]) for i in (1, 2)]
    fig = nb.show_predictions(predictor, paths, score_threshold=0.2)
    expected = len(coco.getAnnIds(imgIds=[1], iscrowd=False)) + 1
    assert fig.axes[0].get_title() == f"000001.png: {expected} detections >= 0.2"


# ----- viewer ------------------------------------------------------------------------------------

def image_with_instances(coco, at_least=2, within=4):
    """The first of the first `within` images with at least `at_least` instances."""
    return next(i for i in sorted(coco.imgs)[:within]
                if len(coco.getAnnIds(imgIds=[i], iscrowd=False)) >= at_least)


def test_viewer_counts_errors_and_ranks_the_worst_images(synthetic):
    coco = load_coco(synthetic["val_json"])
    dropped = image_with_instances(coco)
    other = next(i for i in sorted(coco.imgs)[:6] if i != dropped)
    predictor = FakePredictor(coco, synthetic["val_images"], drop={dropped},
                              extra={dropped, other})
    viewer = nb.InstanceViewer(predictor, synthetic["val_json"], synthetic["val_images"],
                               max_images=6, score_threshold=0.5, progress=False)
    assert len(viewer) == 6 and predictor.calls == sorted(coco.imgs)[:6]
    index = sorted(coco.imgs).index(dropped)
    assert viewer.index == index  # opens on the worst image
    at_half = viewer.errors(index)
    assert len(at_half["missed"]) == 1 and at_half["false_positives"] == []  # 0.3 FP hidden
    low = viewer.errors(index, score_threshold=0.2)
    assert len(low["false_positives"]) == 1 and len(low["missed"]) == 1
    worst = viewer.worst_images(score_threshold=0.2)
    assert [(r["image_id"], r["missed"], r["false_positives"]) for r in worst] == [
        (dropped, 1, 1), (other, 0, 1)]
    assert [r["image_id"] for r in viewer.worst_images()] == [dropped]  # at 0.5
    table = viewer.worst_table()
    assert table.rows[0][2:4] == [1, 0]
    assert "1 missed, 0 false positives" in viewer.caption(index)


def test_viewer_renders_each_mode_and_reacts_to_the_widgets(synthetic):
    coco = load_coco(synthetic["val_json"])
    dropped = image_with_instances(coco)
    predictor = FakePredictor(coco, synthetic["val_images"], drop={dropped}, extra={dropped})
    viewer = nb.InstanceViewer(predictor, synthetic["val_json"], synthetic["val_images"],
                               max_images=4, progress=False, min_panel_width=200)
    single = viewer.render(0, mode="prediction")
    both = viewer.render(0, mode="both")
    assert single.width == 96 * 3  # 96 px images enlarged 3x, the least reaching 200 px
    assert both.width > 2 * single.width - 1 and both.height == single.height
    index = sorted(coco.imgs).index(dropped)
    opaque = np.asarray(viewer.render(index, mode="ground truth", mask_alpha=1.0))
    clear = np.asarray(viewer.render(index, mode="ground truth", mask_alpha=0.0))
    assert (opaque != clear).any()
    with pytest.raises(ValueError, match="mode must be one of"):
        viewer.render(0, mode="overlay")

    widget = viewer.widget
    assert widget is viewer.widget  # built once
    first = viewer._image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    other = (viewer.index + 1) % len(viewer)
    viewer._index_slider.value = other
    assert viewer.index == other and viewer._image.value != first
    viewer._index_slider.value = 1
    viewer._step(-2)  # wraps around
    assert viewer.index == len(viewer) - 1
    viewer._step(+1)
    assert viewer.index == 0
    viewer._mode_buttons.value = "ground truth"
    assert viewer.mode == "ground truth"
    viewer._score_slider.value = 0.2  # shows the 0.3 false positive: the worst list updates
    labels = [label for label, _ in viewer._worst.options]
    assert any("1 FP" in label for label in labels)
    viewer._worst.value = sorted(coco.imgs).index(dropped)
    assert viewer.index == sorted(coco.imgs).index(dropped)
    viewer._alpha_slider.value = 0.9
    assert viewer.mask_alpha == 0.9


def test_viewer_rejects_an_unknown_mode(synthetic):
    coco = load_coco(synthetic["val_json"])
    with pytest.raises(ValueError, match="mode must be one of"):
        nb.InstanceViewer(FakePredictor(coco, synthetic["val_images"]), synthetic["val_json"],
                          synthetic["val_images"], mode="side", progress=False)


# ----- paths and checkpoints ------------------------------------------------------------------

def test_use_repo_root_is_idempotent(tmp_path, monkeypatch):
    start = tmp_path / "repo" / "notebooks"
    start.mkdir(parents=True)
    monkeypatch.chdir(start)
    monkeypatch.setattr(nb, "_start_dir", None)
    assert nb.use_repo_root("..") == (tmp_path / "repo").resolve()
    assert nb.use_repo_root("..") == (tmp_path / "repo").resolve()  # not one level higher
    assert os.getcwd() == str((tmp_path / "repo").resolve())
    with pytest.raises(FileNotFoundError, match="not a directory"):
        nb.use_repo_root("missing")


def test_load_experiment_without_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint.*train first"):
        nb.load_experiment(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        nb.load_experiment(tmp_path / "absent")
