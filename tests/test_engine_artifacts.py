"""Run artefacts (CPU): results.csv, model.best.pth + best.json, model.weights.pth."""

from __future__ import annotations

import csv
import errno
import json
import os

import numpy as np
import pytest
import torch
from test_engine import (
    FakeLoader,
    fake_spec_text,  # noqa: F401  (autouse fixture: a stand-in spec text)
    make_spec,
    new_model,
    run,
)

from mrcnn_helpers.engine import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_inference_weights,
    train,
)
from mrcnn_helpers.engine.artifacts import BASE_COLUMNS, score_of
from mrcnn_helpers.errors import CheckpointError


def scripted_evaluation(scores, key="mask_AP"):
    """An evaluate_fn whose successive calls return `scores` (by step, in step order) as `key`;
    AP is 0.1 unless it is the key."""
    steps = iter(sorted(scores))

    def evaluate(model, spec, device=None):
        metrics = {"AP": 0.1, "APs": -1.0, "eval_images": 4,
                   "per_class": {"cat": {"AP": 0.5, "mask_AP": -1.0}}}
        metrics[key] = scores[next(steps)]
        return metrics

    return evaluate


def rows(results_dir):
    with open(results_dir / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_results_csv_has_a_row_per_log_and_evaluation(tmp_path):
    records = []
    run(make_spec(), tmp_path, on_log=records.append,
        evaluate_fn=scripted_evaluation({6: 0.2, 12: 0.5, 18: 0.4, 20: 0.45}))
    table = rows(tmp_path)
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header == list(BASE_COLUMNS)  # the fake's loss terms are all standard ones
    assert [(r["step"], r["event"]) for r in table] == [(str(r["step"]), r["event"])
                                                       for r in records]
    for row, record in zip(table, records, strict=True):
        if record["event"] == "train":
            assert float(row["total_loss"]) == record["total_loss"]
            assert float(row["learning_rate"]) == record["learning_rate"]
            assert float(row["samples_per_sec"]) == record["samples_per_sec"] > 0
            assert row["AP"] == ""
        else:
            assert float(row["mask_AP"]) == record["mask_AP"] and row["AP"] == "0.1"
            assert row["APs"] == ""  # pycocotools' -1: no value, not -1
            assert row["total_loss"] == ""


def test_resume_drops_the_rows_of_the_killed_stretch(tmp_path):
    # Checkpoints and logs every 5 steps = one epoch of FakeLoader: the resumed run is bit-exact,
    # so its rows can be compared with an uninterrupted run's.
    spec = make_spec(num_steps_per_eval=5)
    evaluation = {5: 0.2, 10: 0.5, 15: 0.4, 20: 0.45}
    run(spec, tmp_path / "whole", evaluate_fn=scripted_evaluation(evaluation))
    killed = tmp_path / "killed"
    run(spec, killed, max_steps=10, evaluate_fn=scripted_evaluation(evaluation))
    # What a run killed after step 10's checkpoint leaves: step 10 not evaluated (its metrics
    # file missing), rows of later logs, and a row cut short.
    (killed / "metrics_step-10.json").unlink()
    with open(killed / "results.csv", "a") as handle:
        handle.write("15,train,2026-01-01T00:00:00" + "," * (len(BASE_COLUMNS) - 3) + "\n")
        handle.write("16,train,2026-01-0")
    run(spec, killed, evaluate_fn=scripted_evaluation({k: v for k, v in evaluation.items()
                                                       if k >= 10}))

    def comparable(table):
        return [{k: v for k, v in r.items() if k not in ("time", "samples_per_sec")}
                for r in table]

    assert comparable(rows(killed)) == comparable(rows(tmp_path / "whole"))
    assert [(r["step"], r["event"]) for r in rows(killed)] == [
        (str(step), event) for step in (5, 10, 15, 20) for event in ("train", "eval")]


def test_best_checkpoint_best_json_and_inference_weights(tmp_path):
    spec = make_spec(num_checkpoints_to_keep=0)  # keep all, to compare with each checkpoint
    run(spec, tmp_path, evaluate_fn=scripted_evaluation({6: 0.2, 12: 0.5, 18: 0.4, 20: 0.45}))
    assert os.path.samefile(tmp_path / "model.best.pth", tmp_path / "model.step-12.pth")
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["step"] == 12 and best["checkpoint"] == "model.step-12.pth"
    assert best["metric"] == "mask_AP" and best["value"] == 0.5
    assert best["metrics"]["eval_images"] == 4 and best["metrics"]["per_class"]["cat"]["AP"] == 0.5

    weights = load_checkpoint(tmp_path / "model.weights.pth")
    full = load_checkpoint(tmp_path / "model.step-12.pth")
    assert weights["format"] == "mrcnn-weights" and weights["version"] == 1
    assert set(weights) == {"format", "version", "step", "model", "spec_text", "model_fields",
                            "class_names", "category_ids"}
    assert weights["step"] == 12 and weights["class_names"] == ["background", "cat", "dog"]
    assert weights["category_ids"] == [3, 7] and weights["spec_text"] == full["spec_text"]
    assert weights["model_fields"] == full["model_fields"]
    assert weights["model"].keys() == full["model"].keys()
    for name, tensor in full["model"].items():
        assert weights["model"][name].dtype == torch.float16, name
        assert torch.equal(weights["model"][name], tensor.half()), name
    size, full_size = (os.path.getsize(tmp_path / n) for n in ("model.weights.pth",
                                                               "model.step-12.pth"))
    assert size < 0.35 * full_size
    # Neither name is a step checkpoint: discovery and pruning leave them alone.
    assert latest_checkpoint(tmp_path) == tmp_path / "model.step-20.pth"
    prune_checkpoints(tmp_path, keep=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20]
    assert load_checkpoint(tmp_path / "model.best.pth")["step"] == 12  # outlives its checkpoint


def test_best_survives_a_resume_and_ranks_by_ap_without_masks(tmp_path):
    spec = make_spec()
    run(spec, tmp_path, max_steps=12, evaluate_fn=scripted_evaluation({6: 0.2, 12: 0.5}))
    run(spec, tmp_path, evaluate_fn=scripted_evaluation({18: 0.4, 20: 0.45}))
    assert load_checkpoint(tmp_path / "model.best.pth")["step"] == 12
    assert load_checkpoint(tmp_path / "model.weights.pth")["step"] == 12
    # No mask metrics: AP ranks; a later, better evaluation takes over.
    run(spec, tmp_path / "boxes", evaluate_fn=scripted_evaluation(
        {6: 0.3, 12: 0.2, 18: 0.6, 20: 0.1}, key="AP"))
    best = json.loads((tmp_path / "boxes" / "best.json").read_text())
    assert (best["step"], best["metric"], best["value"]) == (18, "AP", 0.6)
    assert load_checkpoint(tmp_path / "boxes" / "model.best.pth")["step"] == 18
    assert score_of({"AP": 0.25}) == ("AP", 0.25) and score_of({"mask_AP": -1.0})[1] is None
    assert score_of({"mask_AP": float("nan"), "AP": 0.5})[1] is None


def test_best_is_copied_where_hard_links_fail(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    run(make_spec(), tmp_path, max_steps=6, evaluate_fn=scripted_evaluation({6: 0.2}))
    best, step6 = tmp_path / "model.best.pth", tmp_path / "model.step-6.pth"
    assert not os.path.samefile(best, step6) and best.read_bytes() == step6.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_weights_file_cannot_resume_training(tmp_path):
    run(make_spec(), tmp_path / "a", max_steps=6)
    results = tmp_path / "b"
    results.mkdir()
    # A weights file where a step checkpoint is expected (renamed by hand).
    save_inference_weights(results / "model.step-6.pth", load_checkpoint(tmp_path / "a" /
                                                                           "model.step-6.pth"))
    with pytest.raises(CheckpointError, match=r"model.step-6.pth is an inference weights file"):
        train(make_spec(), results, device="cpu", model=new_model(), train_loader=FakeLoader())


def test_weights_keep_tensors_that_would_overflow_fp16_and_non_float_ones(tmp_path):
    state = {"format": "mrcnn-checkpoint", "version": 1, "step": 3,
             "model": {"w": torch.tensor([1.0, 2.5]), "big": torch.tensor([1e6]),
                       "count": torch.tensor(7)}}
    path = save_inference_weights(tmp_path / "w.pth", state)
    loaded = load_checkpoint(path)["model"]
    assert loaded["w"].dtype == torch.float16 and loaded["big"].dtype == torch.float32
    assert loaded["count"].dtype == torch.int64 and int(loaded["count"]) == 7
    future = save_checkpoint(tmp_path / "f.pth", {**load_checkpoint(path), "version": 2})
    with pytest.raises(CheckpointError, match="format version 2; this version reads up to 1"):
        load_checkpoint(future)


# ---------------------------------------------------------------- results.png


def _drawing_spy(monkeypatch):
    """Record (last evaluated step, train rows) of results.csv at each drawing of results.png."""
    from mrcnn_helpers.engine import results_plot

    drawn, real = [], results_plot.write_results_png

    def spy(csv_path, png_path):
        table = results_plot.read_results_csv(csv_path)
        drawn.append((table.get("eval", {}).get("step", [None])[-1], len(table["train"]["step"])))
        return real(csv_path, png_path)

    monkeypatch.setattr(results_plot, "write_results_png", spy)
    return drawn


def test_results_png_is_drawn_at_each_evaluation_from_results_csv(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from mrcnn_helpers.engine import results_plot

    monkeypatch.setattr(results_plot, "MIN_INTERVAL", 0.0)
    drawn = _drawing_spy(monkeypatch)
    scores = {6: 0.2, 12: 0.5, 18: 0.4, 20: 0.45}
    run(make_spec(), tmp_path, max_steps=12, evaluate_fn=scripted_evaluation(scores))
    run(make_spec(), tmp_path, evaluate_fn=scripted_evaluation({18: 0.4, 20: 0.45}))
    # Logs every 5 steps, evaluations at 6, 12, 18, 20: each drawing after an evaluation holds
    # the rows written so far; the resumed run draws the whole run.
    assert drawn == [(6, 1), (12, 2), (18, 3), (20, 4)]
    table = results_plot.read_results_csv(tmp_path / "results.csv")
    assert table["eval"]["step"] == [6, 12, 18, 20]
    assert table["eval"]["mask_AP"] == [0.2, 0.5, 0.4, 0.45] and table["eval"]["AP"] == [0.1] * 4
    assert table["eval"]["APs"] == [None] * 4  # pycocotools' -1: no value
    assert table["train"]["step"] == [5, 10, 15, 20]
    assert table["train"]["total_loss"] == [float(r["total_loss"]) for r in rows(tmp_path)
                                            if r["event"] == "train"]
    with Image.open(tmp_path / "results.png") as image:
        assert image.format == "PNG" and image.size == (1800, 900)  # 15 x 7.5 in at 120 dpi
        assert np.asarray(image.convert("L")).std() > 10  # drawn, not blank
    assert not list(tmp_path.glob(".*.tmp"))


def test_results_png_waits_between_drawings_but_not_at_the_stop(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from mrcnn_helpers.engine import results_plot

    monkeypatch.setattr(results_plot, "MIN_INTERVAL", 1e9)
    drawn = _drawing_spy(monkeypatch)
    run(make_spec(), tmp_path, evaluate_fn=scripted_evaluation({6: 0.2, 12: 0.5, 18: 0.4,
                                                                20: 0.45}))
    assert drawn == [(20, 4)]
    run(make_spec(), tmp_path / "no-eval", max_steps=6, evaluate_fn=None)
    assert drawn[1:] == [(None, 1)]  # no evaluation: drawn where training stops
    assert (tmp_path / "no-eval" / "results.png").stat().st_size > 0


def test_a_failing_results_png_is_one_note_and_training_goes_on(tmp_path, monkeypatch, capsys):
    from mrcnn_helpers.engine import results_plot

    def broken(csv_path, png_path):
        raise RuntimeError("no canvas\nmore details")

    monkeypatch.setattr(results_plot, "MIN_INTERVAL", 0.0)
    monkeypatch.setattr(results_plot, "write_results_png", broken)
    result = run(make_spec(), tmp_path, evaluate_fn=scripted_evaluation({6: 0.2, 12: 0.5,
                                                                         18: 0.4, 20: 0.45}))
    assert result["step"] == 20 and result["metrics"]["mask_AP"] == 0.45
    note = f"note: {tmp_path / 'results.png'} not updated: RuntimeError: no canvas"
    out = capsys.readouterr().out.splitlines()
    assert out.count(note) == 4 and "more details" not in "\n".join(out)  # one line each
    assert (tmp_path / "train.log").read_text().count(note + "\n") == 4
    assert not (tmp_path / "results.png").exists()
    # Without matplotlib: one note for the whole run, no picture.
    monkeypatch.setattr(results_plot, "matplotlib_missing", lambda: "matplotlib is not installed")
    run(make_spec(), tmp_path / "bare", evaluate_fn=scripted_evaluation({6: 0.2, 12: 0.5,
                                                                         18: 0.4, 20: 0.45}))
    log = (tmp_path / "bare" / "train.log").read_text()
    assert log.count("note: results.png not drawn: matplotlib is not installed\n") == 1
    assert not (tmp_path / "bare" / "results.png").exists()
