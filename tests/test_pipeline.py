"""End to end through the `mrcnn` command line with the real model on a tiny synthetic dataset:
train -> checkpoint -> SIGKILL -> resume -> evaluate -> infer, plus the CLI's error contract."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import synthetic_workdir

TINY_SPEC = """
use_amp: false
checkpoint: ""
total_steps: 6
train_batch_size: 2
eval_batch_size: 2
num_steps_per_eval: 3
logging_frequency: 1
init_learning_rate: 0.01
warmup_steps: 2
warmup_learning_rate: 0.001
learning_rate_steps: "[5]"
learning_rate_decay_levels: "[0.1]"
data_config {
  image_size: "(64, 64)"
  num_classes: 4
  max_num_instances: 8
  n_workers: 0
  train_json_file: "DATA/annotations/instances_train.json"
  train_image_dir: "DATA/train"
  val_json_file: "DATA/annotations/instances_val.json"
  val_image_dir: "DATA/val"
}
maskrcnn_config {
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
  test_score_thresh: 0.0
}
"""


def mrcnn(*args, cwd, check=True, **kwargs):
    proc = subprocess.run([sys.executable, "-m", "mrcnn_helpers", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"mrcnn {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return synthetic_workdir(tmp_path_factory.mktemp("pipeline"), TINY_SPEC, num_train=8,
                             num_val=4, seed=1)


def test_train_kill_resume_evaluate_infer(workdir):
    results = workdir / "results"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Start training and SIGKILL it as soon as the first checkpoint (step 3) is on disk.
    proc = subprocess.Popen([sys.executable, "-m", "mrcnn_helpers", "train", "-e", "spec.txt",
                             "-r", str(results)], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (results / "model.step-3.pth").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = torch.load(results / "model.step-3.pth", weights_only=True)
    assert first["step"] == 3

    out = mrcnn("train", "-e", "spec.txt", "-r", str(results), cwd=workdir)
    text = out.stdout + out.stderr
    assert "Resuming" in text and "step 3" in text
    final = torch.load(results / "model.step-6.pth", weights_only=True)
    assert final["step"] == 6
    assert not list(results.glob("*.tmp"))
    metrics = json.loads((results / "metrics_step-6.json").read_text())
    assert 0.0 <= metrics["mask_AP"] <= 1.0 and "AP50" in metrics

    again = mrcnn("train", "-e", "spec.txt", "-r", str(results), cwd=workdir)
    assert "finished" in (again.stdout + again.stderr).lower()

    out = mrcnn("evaluate", "-e", "spec.txt", "-m", str(results), "--json", "m.json", cwd=workdir)
    evaluated = json.loads((workdir / "m.json").read_text())
    table = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()
             if line.startswith(("box ", "mask "))}  # format_summary's rows: AP first
    assert float(table["mask"][0]) == pytest.approx(evaluated["mask_AP"], abs=5e-4)
    assert evaluated["mask_AP"] == pytest.approx(metrics["mask_AP"], abs=1e-6)

    out = mrcnn("infer", "-m", str(results / "model.step-6.pth"), "-i", "data/val", "-o", "annotated",
                "-t", "0.0", "--include-mask", "--json", "res.json", cwd=workdir)
    annotated = sorted(p.name for p in (workdir / "annotated").iterdir())
    assert annotated == sorted(p.name for p in (workdir / "data" / "val").iterdir())
    detections = json.loads((workdir / "res.json").read_text())
    assert detections and {"bbox", "score", "category_id", "segmentation"} <= set(detections[0])


def test_cli_reports_bad_input_in_one_line(workdir):
    bad = workdir / "typo.txt"
    bad.write_text(TINY_SPEC.replace("init_learning_rate", "init_learning_rat"))
    out = mrcnn("spec", "validate", str(bad), cwd=workdir, check=False)
    assert out.returncode == 2
    assert "typo.txt:" in out.stderr and "init_learning_rate" in out.stderr
    assert "Traceback" not in out.stderr

    out = mrcnn("evaluate", "-m", str(workdir / "nowhere.pth"), cwd=workdir, check=False)
    assert out.returncode == 2 and "nowhere.pth" in out.stderr and "Traceback" not in out.stderr

    out = mrcnn("spec", "show", str(workdir / "spec.txt"), cwd=workdir)
    assert "rpn_positive_overlap: 0.7" in out.stdout  # defaults are resolved and shown


def test_worker_errors_are_reported_without_their_traceback():
    from mrcnn_helpers.cli import _one_line
    from mrcnn_helpers.errors import DataError

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback "
                        "(most recent call last):\n  File \"x.py\", line 1, in f\n"
                        "mrcnn_helpers.errors.DataError: data/a.png: cannot read image 3")
    assert _one_line(wrapped) == "data/a.png: cannot read image 3"
    assert _one_line(DataError("plain message")) == "plain message"
