"""Tests of the training engine: schedule, checkpoints, logging and the training loop (CPU).

The loop is exercised with a tiny fake detector and loader, so these tests do not depend on the
real model, data or evaluation modules.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import mrcnn_helpers.engine.trainer as trainer_module
from mrcnn_helpers.engine import (
    CheckpointWarning,
    MetricLogger,
    build_optimizer,
    l2_loss_of,
    latest_checkpoint,
    learning_rate_at,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    train,
)
from mrcnn_helpers.engine.checkpoint import capture_rng_state, restore_rng_state
from mrcnn_helpers.errors import CheckpointError, TrainingError

# --------------------------------------------------------------------------------------------
# Fakes


def make_spec(**overrides):
    maskrcnn = SimpleNamespace(
        arch="resnet", nlayers=50, freeze_bn=True, freeze_blocks=(0, 1), include_mask=True,
        fast_rcnn_mlp_head_dim=1024, mrcnn_resolution=28, min_level=2, max_level=6,
        num_scales=1, aspect_ratios=((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)), anchor_scale=8.0)
    fields = dict(
        use_amp=False, warmup_steps=4, checkpoint="", learning_rate_steps=(12, 16),
        learning_rate_decay_levels=(0.1, 0.01), total_steps=20, train_batch_size=2,
        eval_batch_size=1, num_steps_per_eval=6, momentum=0.9, l2_weight_decay=1e-3,
        warmup_learning_rate=0.01, init_learning_rate=0.1, seed=7, logging_frequency=5,
        num_checkpoints_to_keep=2, data_config=SimpleNamespace(num_classes=3),
        maskrcnn_config=maskrcnn, source="<test>")
    fields.update(overrides)
    return SimpleNamespace(**fields)


class FakeDetector(nn.Module):
    """Computes the five loss terms of the real model from a few layers (with dropout, so the
    result depends on the torch RNG stream). `nan_at_call` makes that forward call non-finite."""

    def __init__(self, nan_at_call: int | None = None):
        super().__init__()
        self.backbone = nn.Linear(48, 16)
        self.norm = nn.LayerNorm(16)
        self.dropout = nn.Dropout(0.25)
        self.rpn = nn.Linear(16, 2)
        self.box_head = nn.Linear(16, 2)
        self.mask_head = nn.Linear(16, 1)
        self.calls = 0
        self.nan_at_call = nan_at_call

    def forward(self, images, targets):
        self.calls += 1
        assert images.dtype == torch.uint8 and self.training
        x = images.float().flatten(1) / 255.0
        h = self.dropout(torch.relu(self.norm(self.backbone(x))))
        goal = targets["boxes"][:, 0, :2] / 8.0
        rpn, box, mask = self.rpn(h), self.box_head(h), self.mask_head(h)[:, 0]
        losses = {
            "rpn_score_loss": (rpn[:, 0] - goal[:, 0]).pow(2).mean(),
            "rpn_box_loss": (rpn[:, 1] - goal[:, 1]).abs().mean(),
            "fast_rcnn_class_loss": (box[:, 0] - targets["classes"][:, 0].float()).pow(2).mean(),
            "fast_rcnn_box_loss": (box[:, 1] - goal.sum(1)).pow(2).mean(),
            "mask_loss": (mask - targets["masks"].float().mean((1, 2, 3)) / 255).pow(2).mean(),
        }
        if self.calls == self.nan_at_call:
            losses["mask_loss"] = losses["mask_loss"] * float("nan")
        return losses


class FakeLoader:
    """Deterministic batches per (epoch, index), like a sampler reseeded by set_epoch."""

    def __init__(self, num_batches=5, batch_size=2):
        self.num_batches, self.batch_size = num_batches, batch_size
        self.epoch = 0
        self.epochs_set = []
        self.dataset = SimpleNamespace(class_names=["background", "cat", "dog"],
                                       category_ids=[3, 7])

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.epochs_set.append(epoch)

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        for i in range(self.num_batches):
            g = torch.Generator().manual_seed(1000 * self.epoch + i)
            b = self.batch_size
            yield {
                "image": torch.randint(0, 256, (b, 3, 4, 4), generator=g, dtype=torch.uint8),
                "boxes": torch.rand(b, 2, 4, generator=g) * 8,
                "classes": torch.randint(0, 3, (b, 2), generator=g),
                "masks": torch.randint(0, 256, (b, 2, 2, 2), generator=g, dtype=torch.uint8),
                "num_instances": torch.full((b,), 2),
                "image_id": torch.arange(b),
            }


def fake_evaluate(model, spec, device=None):
    assert not model.training
    # Draws from every RNG: training after an evaluation must not depend on it.
    torch.rand(3), np.random.rand(), random.random()
    weight = model.backbone.weight.detach()
    return {"AP": float(weight.abs().mean()), "mask_AP": float(weight.mean()),
            "per_class": {"cat": 0.5}}


def new_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return FakeDetector(**kwargs)


def run(spec, results_dir, model=None, **kwargs):
    return train(spec, results_dir, device="cpu", model=model or new_model(),
                 train_loader=kwargs.pop("train_loader", None) or FakeLoader(),
                 evaluate_fn=kwargs.pop("evaluate_fn", fake_evaluate), **kwargs)


@pytest.fixture(autouse=True)
def fake_spec_text(monkeypatch):
    # The real format_spec needs a real ExperimentSpec; the stand-in has a stable text of its own.
    monkeypatch.setattr(trainer_module, "spec_text",
                        lambda spec: f"total_steps: {spec.total_steps}\nseed: {spec.seed}\n")


def weights(results_dir, step):
    return load_checkpoint(os.path.join(results_dir, f"model.step-{step}.pth"))["model"]


# --------------------------------------------------------------------------------------------
# Schedule


SEED_SCHEDULE = SimpleNamespace(
    warmup_steps=1000, warmup_learning_rate=0.0001, init_learning_rate=0.02,
    learning_rate_steps=(60000, 80000, 90000), learning_rate_decay_levels=(0.1, 0.01, 0.001))


@pytest.mark.parametrize("step, expected", [
    (0, 0.0001), (2, 0.0001398), (500, 0.01005), (999, 0.0199801), (1000, 0.02),
    (59999, 0.02), (60000, 0.002), (79999, 0.002), (80000, 0.0002), (89999, 0.0002),
    (90000, 0.00002), (100000, 0.00002),
])
def test_learning_rate_at_boundaries(step, expected):
    assert learning_rate_at(step, SEED_SCHEDULE) == pytest.approx(expected, rel=1e-12)


def test_learning_rate_edge_cases():
    no_warmup = SimpleNamespace(**{**vars(SEED_SCHEDULE), "warmup_steps": 0})
    assert learning_rate_at(0, no_warmup) == 0.02
    # A decay boundary inside the warmup wins over the warmup ramp, as in TLT.
    early = SimpleNamespace(**{**vars(SEED_SCHEDULE), "learning_rate_steps": (500,),
                               "learning_rate_decay_levels": (0.5,)})
    assert learning_rate_at(499, early) == pytest.approx(0.0001 + 0.0199 * 0.499)
    assert learning_rate_at(500, early) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="must pair up"):
        learning_rate_at(5, SimpleNamespace(**{**vars(SEED_SCHEDULE),
                                               "learning_rate_decay_levels": (0.1,)}))
    with pytest.raises(ValueError, match=">= 0"):
        learning_rate_at(-1, SEED_SCHEDULE)


# --------------------------------------------------------------------------------------------
# Checkpoint files


def test_save_load_round_trip_and_rng(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = {"format": "mrcnn-checkpoint", "version": 1, "step": 4,
             "model": {"w": torch.arange(6.0)}, "rng": capture_rng_state(),
             "spec_text": "seed: 3\n", "class_names": ["background", "cat"], "category_ids": [5]}
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    path = save_checkpoint(tmp_path / "model.step-4.pth", state)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 4 and loaded["class_names"] == ["background", "cat"]
    assert torch.equal(loaded["model"]["w"], torch.arange(6.0))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(loaded["rng"])
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(again[0], expected[0])
    assert np.array_equal(again[1], expected[1]) and again[2] == expected[2]
    assert sorted(os.listdir(tmp_path)) == ["model.step-4.pth"]


def _state(value):
    return {"format": "mrcnn-checkpoint", "version": 1, "step": 1, "model": {"w": value}}


@pytest.mark.parametrize("style", ["oserror", "wrapped"])
def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, style):
    path = tmp_path / "model.step-1.pth"
    save_checkpoint(path, _state(torch.zeros(3)))

    def failing_save(obj, handle):
        handle.write(b"PK\x03\x04 partial bytes")  # fail mid-way, after writing something
        disk_full = OSError(errno.ENOSPC, "No space left on device")
        if style == "oserror":
            raise disk_full
        try:  # how torch.save reports it: a RuntimeError raised while handling the OSError
            raise disk_full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        save_checkpoint(path, _state(torch.ones(3)))
    assert str(path) in str(info.value)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(3))
    assert os.listdir(tmp_path) == ["model.step-1.pth"]  # no temporary file left


def test_failed_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.step-1.pth"
    save_checkpoint(path, _state(torch.zeros(3)))

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(CheckpointError, match="Permission denied"):
        save_checkpoint(path, _state(torch.ones(3)))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(3))
    assert os.listdir(tmp_path) == ["model.step-1.pth"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_read_only_directory(tmp_path):
    path = tmp_path / "model.step-1.pth"
    save_checkpoint(path, _state(torch.zeros(3)))
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="model.step-1.pth"):
            save_checkpoint(path, _state(torch.ones(3)))
    finally:
        tmp_path.chmod(0o755)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(3))


def test_unsafe_state_is_refused_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match=r"state\['spec'\] is a types.SimpleNamespace"):
        save_checkpoint(tmp_path / "model.step-1.pth", {"spec": SimpleNamespace(a=1)})
    assert os.listdir(tmp_path) == []


class _Payload:
    """Unpickling this object calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_weights_only_refuses_code_execution(tmp_path, container):
    marker = str(tmp_path / "marker")
    path = tmp_path / "model.step-5.pth"
    state = {"format": "mrcnn-checkpoint", "version": 1, "step": 5, "model": _Payload(marker)}
    if container == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(state, handle, protocol=2)
    # The payload is live: a full unpickler runs it.
    if container == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as handle:
            pickle.load(handle)
    assert os.path.exists(marker)
    os.remove(marker)

    with pytest.raises(CheckpointError, match=r"refused: not a plain-weights checkpoint"):
        load_checkpoint(path)
    assert not os.path.exists(marker)


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    good = save_checkpoint(tmp_path / "good.pth", _state(torch.zeros(1000)))
    data = good.read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half.pth is unreadable \(corrupt or truncated\)"):
        load_checkpoint(tmp_path / "half.pth")
    torch.save({"backbone.weight": torch.zeros(2)}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "weights.pth")
    torch.save({**_state(torch.zeros(1)), "version": 2}, tmp_path / "future.pth")
    with pytest.raises(CheckpointError, match="format version 2"):
        load_checkpoint(tmp_path / "future.pth")


def test_latest_checkpoint_ignores_temporary_files_and_sorts_numerically(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 9, 10):
        save_checkpoint(tmp_path / f"model.step-{step}.pth", _state(torch.zeros(1)))
    for junk in (".model.step-12.pth.x1y2.tmp", "model.step-11.pth.tmp", "model.step-x.pth",
                 "notes.txt"):
        (tmp_path / junk).write_bytes(b"junk")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 9, 10]
    assert latest_checkpoint(tmp_path) == tmp_path / "model.step-10.pth"

    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [".model.step-12.pth.x1y2.tmp", "model.step-2.pth"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [9, 10]
    assert prune_checkpoints(tmp_path, keep=0) == []


# --------------------------------------------------------------------------------------------
# Optimizer, L2 loss and logging


def test_weight_decay_only_on_weights_and_l2_value():
    model = new_model()
    model.mask_head.weight.requires_grad_(False)  # frozen: not optimized at all
    optimizer, decayed = build_optimizer(model, make_spec())
    groups = {g["weight_decay"]: g["params"] for g in optimizer.param_groups}
    ids = lambda params: {id(p) for p in params}
    assert ids(groups[1e-3]) == ids([model.backbone.weight, model.rpn.weight,
                                     model.box_head.weight])
    assert ids(groups[0.0]) == ids([model.backbone.bias, model.norm.weight, model.norm.bias,
                                    model.rpn.bias, model.box_head.bias, model.mask_head.bias])
    assert optimizer.param_groups[0]["momentum"] == 0.9
    expected = 1e-3 * 0.5 * sum(float((p.detach() ** 2).sum()) for p in decayed)
    assert l2_loss_of(decayed, 1e-3) == pytest.approx(expected, rel=1e-6)


def test_metric_logger_block_line_and_callback(tmp_path, capsys):
    records = []
    logger = MetricLogger(total_steps=10, logging_frequency=2, batch_size=3, verbose=True,
                          on_log=records.append, tensorboard_dir=tmp_path / "tb")
    terms = {"fast_rcnn_box_loss": 0.2, "fast_rcnn_class_loss": 0.1, "mask_loss": 1.0,
             "rpn_box_loss": 0.05, "rpn_score_loss": 0.5}
    logger.update(terms)
    logger.update({k: 3 * v for k, v in terms.items()})
    assert logger.should_log(2) and not logger.should_log(3) and logger.should_log(10)
    record = logger.log(2, learning_rate=0.00014, l2_loss=0.8)
    logger.log_eval(2, {"AP": 0.25, "mask_AP": 0.125, "per_class": {"cat": 0.5}})
    logger.close()

    assert record["fast_rcnn_box_loss"] == pytest.approx(0.4)
    assert record["fast_rcnn_total_loss"] == pytest.approx(0.6)
    assert record["rpn_total_loss"] == pytest.approx(1.1)
    assert record["total_loss"] == pytest.approx(0.6 + 1.1 + 2.0 + 0.8)  # includes L2, as TLT
    assert record["samples_per_sec"] > 0
    out = capsys.readouterr().out
    labels = [line.split(":")[0] for line in out.splitlines()]
    block = labels[labels.index("FastRCNN box loss"):labels.index("Total loss") + 1]
    assert block == ["FastRCNN box loss", "FastRCNN class loss", "FastRCNN total loss",
                     "L2 loss", "Learning rate", "Mask loss", "RPN box loss", "RPN score loss",
                     "RPN total loss", "Total loss"]
    assert "Learning rate: 0.00014" in out and "Total loss: 4.5" in out
    assert "step 2/10 eval: AP 0.2500, mask_AP 0.1250" in out
    assert [r["event"] for r in records] == ["train", "eval"]
    assert records[1] == {"event": "eval", "step": 2, "AP": 0.25, "mask_AP": 0.125}
    line = MetricLogger.format_line(record)
    assert "\n" not in line and "loss 4.5000" in line and "lr 0.00014" in line
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


# --------------------------------------------------------------------------------------------
# Training loop


def test_train_writes_checkpoints_metrics_and_logs(tmp_path, capsys):
    records = []
    spec = make_spec(use_amp=True)
    result = run(spec, tmp_path, on_log=records.append, verbose=False)
    out = capsys.readouterr().out
    assert "use_amp ignored on cpu" in out
    assert result["step"] == 20
    assert result["checkpoint"] == str(tmp_path / "model.step-20.pth")
    # Evaluations at 6, 12, 18 and the last step; checkpoints pruned to the newest two.
    assert [s for s, _ in list_checkpoints(tmp_path)] == [18, 20]
    for step in (6, 12, 18, 20):
        assert (tmp_path / f"metrics_step-{step}.json").is_file()
    saved = json.loads((tmp_path / "metrics_step-20.json").read_text())
    assert saved == result["metrics"] and saved["per_class"] == {"cat": 0.5}
    assert (tmp_path / "spec.txt").read_text() == "total_steps: 20\nseed: 7\n"

    ckpt = load_checkpoint(tmp_path / "model.step-20.pth")
    assert ckpt["step"] == 20 and ckpt["class_names"] == ["background", "cat", "dog"]
    assert ckpt["category_ids"] == [3, 7] and ckpt["spec_text"] == "total_steps: 20\nseed: 7\n"
    assert ckpt["model_fields"]["maskrcnn_config.nlayers"] == 50

    train_logs = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_logs] == [5, 10, 15, 20]
    for r in train_logs:  # the rate of the last update before the log
        assert r["learning_rate"] == pytest.approx(learning_rate_at(r["step"] - 1, spec))
    assert [r["step"] for r in records if r["event"] == "eval"] == [6, 12, 18, 20]
    assert "step 20/20 | loss" in out


@pytest.mark.parametrize("kill_at, eval_every", [(10, 6), (15, 5)])
def test_killed_run_resumes_bit_exact(tmp_path, capsys, kill_at, eval_every):
    """Resumed at an epoch boundary (5 batches per epoch) the result equals an uninterrupted run.

    Killed at 10: a stop between evaluations. Killed at 15: a stop right after an evaluation,
    which draws random numbers the checkpoint must not depend on.
    """
    spec = make_spec(num_steps_per_eval=eval_every)
    run(spec, tmp_path / "whole")
    first = run(spec, tmp_path / "killed", max_steps=kill_at)
    assert first["step"] == kill_at
    assert first["checkpoint"] == str(tmp_path / "killed" / f"model.step-{kill_at}.pth")
    # Fresh objects, as in a new process: other initial weights, a loader at epoch 0.
    loader = FakeLoader()
    capsys.readouterr()
    second = run(spec, tmp_path / "killed", model=new_model(seed=123), train_loader=loader)
    assert f"Resuming from {tmp_path / 'killed'}/model.step-{kill_at}.pth at step {kill_at} of 20" \
        in capsys.readouterr().out
    assert second["step"] == 20 and loader.epochs_set[0] == kill_at // 5
    whole, resumed = weights(tmp_path / "whole", 20), weights(tmp_path / "killed", 20)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    expected_metrics = json.loads((tmp_path / "whole" / "metrics_step-20.json").read_text())
    assert second["metrics"] == expected_metrics


def test_resume_mid_epoch_restarts_that_epoch(tmp_path):
    spec = make_spec()
    run(spec, tmp_path, max_steps=7)
    loader = FakeLoader()
    result = run(spec, tmp_path, train_loader=loader)
    # Step 7 lies in epoch 1 (steps 5-9): that epoch restarts from its first batch (steps 7-11),
    # then epochs 2 (12-16) and 3 (17-19) follow.
    assert result["step"] == 20 and loader.epochs_set == [1, 2, 3]
    assert all(torch.isfinite(t).all() for t in weights(tmp_path, 20).values())


def test_finished_run_says_finished(tmp_path, capsys):
    spec = make_spec()
    done = run(spec, tmp_path)
    capsys.readouterr()
    # Nothing is built or trained: no model, loader or evaluation is needed.
    again = train(spec, tmp_path, device="cpu")
    assert "Training is finished" in capsys.readouterr().out
    assert again == {"step": 20, "checkpoint": str(tmp_path / "model.step-20.pth"),
                     "metrics": done["metrics"]}


def test_non_finite_loss_stops_with_last_checkpoint(tmp_path):
    spec = make_spec()
    with pytest.raises(TrainingError) as info:
        run(spec, tmp_path, model=new_model(nan_at_call=8))
    message = str(info.value)
    assert "non-finite loss at step 8" in message and "mask_loss=nan" in message
    assert str(tmp_path / "model.step-6.pth") in message
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6]
    assert not (tmp_path / "metrics_step-8.json").exists()

    with pytest.raises(TrainingError, match="no checkpoint was written yet"):
        run(spec, tmp_path / "early", model=new_model(nan_at_call=1))
    assert list_checkpoints(tmp_path / "early") == []


def test_resume_refuses_a_different_network(tmp_path):
    spec = make_spec()
    run(spec, tmp_path, max_steps=6)
    other = make_spec(maskrcnn_config=SimpleNamespace(**{**vars(spec.maskrcnn_config),
                                                         "nlayers": 18}))
    with pytest.raises(CheckpointError, match=r"maskrcnn_config.nlayers: checkpoint 50, spec 18"):
        run(other, tmp_path)
    # Schedule fields may change: training longer resumes fine.
    longer = make_spec(total_steps=24)
    assert run(longer, tmp_path)["step"] == 24
    assert (tmp_path / "spec.txt").read_text() == "total_steps: 24\nseed: 7\n"


def test_unreadable_newest_checkpoint_falls_back(tmp_path, capsys):
    spec = make_spec()
    run(spec, tmp_path, max_steps=6)
    run(spec, tmp_path, max_steps=8)
    newest = tmp_path / "model.step-8.pth"
    newest.write_bytes(newest.read_bytes()[:100])
    capsys.readouterr()
    with pytest.warns(CheckpointWarning, match="model.step-8.pth"):
        result = run(spec, tmp_path, max_steps=8)
    assert f"Resuming from {tmp_path / 'model.step-6.pth'} at step 6" in capsys.readouterr().out
    assert result["step"] == 8 and load_checkpoint(newest)["step"] == 8


def test_plain_data_loader_order_depends_on_epoch_only():
    data = list(range(12))
    first = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True,
                                        generator=torch.Generator().manual_seed(1))
    second = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(2))
    list(second)  # another position in its stream, as after a few epochs
    order = {}
    for name, loader in (("first", first), ("second", second)):
        for epoch in (3, 4):
            trainer_module.set_loader_epoch(loader, epoch, seed=7)
            order[name, epoch] = torch.cat(list(loader)).tolist()
    assert order["first", 3] == order["second", 3] and order["first", 4] == order["second", 4]
    assert order["first", 3] != order["first", 4]


def _fake_module(monkeypatch, name, **functions):
    module = ModuleType(name)
    module.__dict__.update(functions)
    monkeypatch.setitem(sys.modules, name, module)


def test_pretrained_weights_load_on_first_start_only(tmp_path, monkeypatch, capsys):
    calls = []

    def load_pretrained(model, checkpoint):
        calls.append(checkpoint)
        with torch.no_grad():
            model.backbone.bias.fill_(0.5)

    monkeypatch.setattr(trainer_module, "load_pretrained", load_pretrained)
    spec = make_spec(checkpoint="pretrained.pth", init_learning_rate=0.0,
                     warmup_learning_rate=0.0)
    run(spec, tmp_path, max_steps=3)
    assert calls == ["pretrained.pth"]
    assert "Loaded pretrained weights from pretrained.pth" in capsys.readouterr().out
    # With a zero learning rate the loaded bias survives training unchanged.
    assert torch.equal(weights(tmp_path, 3)["backbone.bias"], torch.full((16,), 0.5))
    run(spec, tmp_path, max_steps=5)  # resuming: the checkpoint's weights, not the pretrained
    assert calls == ["pretrained.pth"]


def test_the_training_batches_stop_the_loaders_workers_when_closed():
    """Closing the batch stream (the trainer does when training ends) stops the DataLoader's
    persistent workers then, not at the interpreter's exit (5 s per worker there)."""
    import time

    from torch.utils.data import DataLoader

    from mrcnn_helpers.engine.trainer import _batches

    loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
    batches = _batches(loader, start_step=0, seed=0)
    assert next(batches).tolist() == [0, 1]
    workers = list(loader._iterator._workers)
    assert all(w.is_alive() for w in workers)
    start = time.perf_counter()
    batches.close()
    assert loader._iterator is None
    assert not any(w.is_alive() for w in workers)
    assert time.perf_counter() - start < 4.0  # told to stop, not joined out by the 5 s timeout
