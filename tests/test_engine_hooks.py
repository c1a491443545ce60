"""The loop and its hooks (CPU): the device-side loss meter and non-finite check, no host sync in a
step, hook order and life cycle, injected evaluation, and the engine's layering."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from test_engine import (
    FakeLoader,
    fake_spec_text,  # noqa: F401  (autouse fixture: a stand-in spec text)
    make_spec,
    new_model,
    run,
    weights,
)

from mrcnn_helpers.engine import HookBase, list_checkpoints, load_checkpoint, train
from mrcnn_helpers.engine.distributed import DistContext
from mrcnn_helpers.engine.loop import LossMeter, Trainer
from mrcnn_helpers.engine.optim import build_optimizer
from mrcnn_helpers.engine.resume import Resume
from mrcnn_helpers.engine.trainer import _batches
from mrcnn_helpers.errors import TrainingError

CPU = torch.device("cpu")


def _losses(a, b):
    return {"b_loss": torch.tensor(float(b)), "a_loss": torch.tensor(float(a))}


def test_loss_meter_averages_windows_and_keeps_the_first_bad_step():
    meter = LossMeter(CPU, start_step=10)
    meter.add(_losses(1.0, 4.0))
    meter.add(_losses(3.0, 8.0))
    assert meter.read_window(DistContext()) == ({"a_loss": 2.0, "b_loss": 6.0}, 2)
    assert meter.first_non_finite(DistContext()) is None
    meter.add(_losses(5.0, 1.0))  # step 13
    meter.add(_losses(float("inf"), 1.0))  # step 14: the first bad one
    meter.add(_losses(float("nan"), float("nan")))  # step 15
    averages, count = meter.read_window(DistContext())
    assert count == 3 and averages["b_loss"] != averages["b_loss"]  # NaN in this window
    step, terms = meter.first_non_finite(DistContext())
    assert step == 14 and terms == {"a_loss": math.inf, "b_loss": 1.0}
    with pytest.raises(TrainingError, match="the terms must not change"):
        meter.add({"a_loss": torch.tensor(1.0)})


def _trainer(spec, model, loader=None, stop_step=20):
    optimizer, _ = build_optimizer(model, spec)
    return Trainer(model=model, forward_model=model, optimizer=optimizer,
                   scaler=torch.amp.GradScaler("cpu", enabled=False),
                   batches=_batches(loader or FakeLoader(), 0, int(spec.seed)), spec=spec,
                   device=CPU, amp_dtype=None, ctx=DistContext(), resume=Resume(),
                   total_steps=int(spec.total_steps), stop_step=stop_step, metadata={})


def test_a_step_never_reads_a_tensor_on_the_host(monkeypatch):
    """run_step must not wait for the device (a CUDA graph will capture it): no .item(),
    .cpu(), .tolist(), bool()/float()/int() or .numpy() on a tensor, even with a NaN loss."""
    trainer = _trainer(make_spec(), new_model(nan_at_call=2))
    trainer.model.train()
    reads = []
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for _ in range(4):
        trainer.run_step()
    assert reads == [] and trainer.step == 4
    # The spies do see a read: the meter's, which happens at log steps only.
    trainer.meter.read_window(DistContext())
    assert "tolist" in reads


def test_nan_at_a_non_log_step_is_caught_before_the_next_checkpoint(tmp_path):
    # Logs only at step 20, checkpoints every 6 steps: the NaN of step 8 is found by the check
    # before the checkpoint of step 12, which is therefore never written.
    spec = make_spec(logging_frequency=100)
    with pytest.raises(TrainingError) as info:
        run(spec, tmp_path, model=new_model(nan_at_call=8))
    message = str(info.value)
    assert "non-finite loss at step 8 " in message and "mask_loss=nan" in message
    assert "Found by the check after step 12 (steps 7-12 since the previous check)" in message
    assert f"the last good checkpoint is {tmp_path / 'model.step-6.pth'}" in message
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6]
    assert not (tmp_path / "metrics_step-12.json").exists()
    assert all(torch.isfinite(t).all() for t in weights(tmp_path, 6).values())
    # Nothing non-finite reached any artefact either.
    assert load_checkpoint(tmp_path / "model.weights.pth")["step"] == 6
    assert "nan" not in (tmp_path / "results.csv").read_text().lower()
    assert "training stopped at step 12: TrainingError: non-finite loss at step 8" in \
        (tmp_path / "train.log").read_text()


def test_nan_is_reported_at_the_next_log_step(tmp_path):
    spec = make_spec(logging_frequency=3, num_steps_per_eval=10)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 4 .*check after step 6 "
                                            r"\(steps 4-6 since"):
        run(spec, tmp_path, model=new_model(nan_at_call=4))
    assert list_checkpoints(tmp_path) == []


class Recorder(HookBase):
    """Notes every call, with the step, and fails on request."""

    def __init__(self, calls, name, fail_at=None):
        self.calls, self.name, self.fail_at = calls, name, fail_at

    def before_train(self):
        self.calls.append((self.name, "before", self.trainer.step))

    def after_step(self):
        self.calls.append((self.name, "after_step", self.trainer.step))
        if self.trainer.step == self.fail_at:
            raise RuntimeError("hook failed")

    def after_train(self):
        self.calls.append((self.name, "after_train", self.trainer.step,
                           type(self.trainer.error).__name__))


def test_hooks_run_in_order_and_after_train_runs_on_failure():
    calls = []
    trainer = _trainer(make_spec(), new_model(), stop_step=2)
    trainer.register_hooks([Recorder(calls, "a"), Recorder(calls, "b")])
    trainer.train()
    assert calls == [("a", "before", 0), ("b", "before", 0),
                     ("a", "after_step", 1), ("b", "after_step", 1),
                     ("a", "after_step", 2), ("b", "after_step", 2),
                     ("a", "after_train", 2, "NoneType"), ("b", "after_train", 2, "NoneType")]

    calls.clear()
    trainer = _trainer(make_spec(), new_model(), stop_step=5)
    trainer.register_hooks([Recorder(calls, "a", fail_at=2), Recorder(calls, "b")])
    with pytest.raises(RuntimeError, match="hook failed"):
        trainer.train()
    assert calls[-2:] == [("a", "after_train", 2, "RuntimeError"),
                          ("b", "after_train", 2, "RuntimeError")]


class Listener(HookBase):
    def __init__(self):
        self.records = []

    def on_record(self, record):
        self.records.append(record)


def test_extra_hooks_and_on_log_hooks_see_the_records(tmp_path):
    listener, logged = Listener(), []
    result = run(make_spec(), tmp_path, hooks=[listener], on_log=logged.append, max_steps=12)
    events = [(r["event"], r["step"]) for r in listener.records if r["event"] != "message"]
    assert events == [("train", 5), ("checkpoint", 6), ("eval", 6), ("train", 10),
                      ("checkpoint", 12), ("eval", 12)]
    # A plain on_log callable gets train and eval records only (its documented contract).
    assert [(r["event"], r["step"]) for r in logged] == \
        [e for e in events if e[0] != "checkpoint"]
    assert result["metrics"]["AP"] == logged[-1]["AP"]
    # A hook given as on_log is registered as it is.
    as_hook = Listener()
    run(make_spec(), tmp_path / "hook", on_log=as_hook, max_steps=6)
    assert [r["event"] for r in as_hook.records if r["event"] != "message"] == \
        ["train", "checkpoint", "eval"]


def test_without_evaluate_fn_no_evaluation_runs(tmp_path, capsys):
    spec = make_spec()
    result = train(spec, tmp_path, device="cpu", model=new_model(), train_loader=FakeLoader(),
                   max_steps=12)
    assert result == {"step": 12, "checkpoint": str(tmp_path / "model.step-12.pth"),
                      "metrics": None}
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 12]
    assert list(tmp_path.glob("metrics_step-*.json")) == []
    assert not (tmp_path / "model.best.pth").exists() and not (tmp_path / "best.json").exists()
    # The inference weights follow the newest checkpoint.
    assert load_checkpoint(tmp_path / "model.weights.pth")["step"] == 12
    assert " eval: " not in capsys.readouterr().out
    # Resuming without evaluation never asks for the missing evaluations.
    assert train(spec, tmp_path, device="cpu", model=new_model(), train_loader=FakeLoader(),
                 max_steps=12)["step"] == 12


def test_bad_evaluation_result_is_an_error(tmp_path):
    with pytest.raises(TrainingError, match="returned list; expected a dict of metrics"):
        train(make_spec(), tmp_path, device="cpu", model=new_model(), train_loader=FakeLoader(),
              evaluate_fn=lambda model, spec, device=None: [0.5], max_steps=6)


def test_engine_imports_no_evaluation_inference_export_or_notebook_code():
    code = ("import sys, json, mrcnn_helpers.engine, mrcnn_helpers.engine.trainer; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mrcnn_helpers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = json.loads(out)
    assert "mrcnn_helpers.engine.trainer" in loaded
    for layer in ("evaluate", "predict", "inference", "export", "deploy", "notebook"):
        assert not any(m == f"mrcnn_helpers.{layer}" or m.startswith(f"mrcnn_helpers.{layer}.")
                       for m in loaded), layer


def test_graph_step_sgd_update_equals_torch_sgd():
    """The update the CUDA-graph step replays is torch.optim.SGD's (momentum, weight decay)."""
    from mrcnn_helpers.engine.graphed_step import sgd_update

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]

    def optimizer(params):
        return torch.optim.SGD([{"params": params[:1], "weight_decay": 1e-2},
                                {"params": params[1:], "weight_decay": 0.0}], lr=0.1,
                               momentum=0.9)

    mine, theirs = optimizer(ours), optimizer(ref)
    for step, lr in enumerate((0.1, 0.05, 0.02)):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        for group in theirs.param_groups:
            group["lr"] = lr
        theirs.step()
        sgd_update(mine, torch.tensor(lr))
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(mine.state[p]["momentum_buffer"],
                                       theirs.state[q]["momentum_buffer"])


def test_graph_step_falls_back_with_the_reason():
    from mrcnn_helpers.engine.graphed_step import unsupported_reason

    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert unsupported_reason(device=torch.device("cpu"), optimizer=sgd, scaler=off,
                              data_parallel=False) == "training on cpu"
    adam = torch.optim.Adam(params)
    cuda = torch.device("cuda")
    reason = unsupported_reason(device=cuda, optimizer=adam, scaler=off, data_parallel=False)
    assert reason  # no GPU here: the kernels are missing, or the optimizer is named


def test_a_step_that_cannot_be_captured_runs_eagerly_from_then_on():
    """A capture that fails (a model with a host sync, given to train()) is noted once and the
    step and every later one run eagerly, with the gradients of the failed capture dropped."""
    import torch

    from mrcnn_helpers.engine import graphed_step

    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    eager, notes = [], []
    step = graphed_step.GraphedTrainStep(
        model=None, amp_dtype=None, optimizer=optimizer, meter=None,
        eager_step=lambda images, targets, lr: eager.append(lr), device=torch.device("cpu"),
        note=notes.append)
    step.steps_seen = graphed_step.WARMUP_STEPS

    def capture(*args):
        param.grad = torch.ones(2)
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    step._capture = capture
    for lr in (0.1, 0.2):
        step(torch.zeros(1, 3, 4, 4), {"boxes": torch.zeros(1, 1, 4)}, lr)
    assert eager == [0.1, 0.2] and step.failed and step.graph is None and param.grad is None
    assert notes == [("note: the training step cannot be captured in a CUDA graph (operation not "
                      "permitted when stream is capturing); training runs eagerly")]


def test_a_step_that_synchronizes_with_the_host_is_never_captured(monkeypatch):
    """The last warm-up step runs under CUDA's sync debug mode; a host sync there (torchvision's
    Mask R-CNN indexes with boolean masks) means no capture is tried: eager, noted once."""
    import torch

    from mrcnn_helpers.engine import graphed_step

    watched = []

    def first_host_sync(fn):
        watched.append(len(eager))
        fn()
        return "called a synchronizing CUDA operation"

    monkeypatch.setattr(graphed_step, "first_host_sync", first_host_sync)
    eager, notes = [], []
    step = graphed_step.GraphedTrainStep(
        model=None, amp_dtype=None, optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(1))],
                                                              lr=0.1),
        meter=None, eager_step=lambda images, targets, lr: eager.append(lr),
        device=torch.device("cpu"), note=notes.append)
    step._on_side_stream = lambda fn: fn()
    step._capture = lambda *args: pytest.fail("a step that syncs must not be captured")
    for lr in range(graphed_step.WARMUP_STEPS + 2):
        step(torch.zeros(1, 3, 4, 4), {"boxes": torch.zeros(1, 1, 4)}, float(lr))
    assert eager == [float(lr) for lr in range(graphed_step.WARMUP_STEPS + 2)]
    assert watched == [graphed_step.WARMUP_STEPS - 1] and step.failed and step.graph is None
    assert notes == [("note: the training step cannot be captured in a CUDA graph (it "
                      "synchronizes with the host: called a synchronizing CUDA operation); "
                      "training runs eagerly")]


def test_the_sync_check_names_the_line_and_ignores_other_threads():
    """CUDA's sync debug mode is global: a sync warned by another thread (the loader's pin-memory
    thread) says nothing of the step and is dropped; the step's own is reported with its line;
    other warnings still reach the user."""
    import threading
    import warnings

    from mrcnn_helpers.engine.graphed_step import first_sync_warning

    sync = "called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:150.)"

    def elsewhere():
        worker = threading.Thread(target=lambda: warnings.warn(sync, UserWarning))
        worker.start()
        worker.join()

    assert first_sync_warning(elsewhere) == ""

    def step():
        elsewhere()
        warnings.warn("unrelated", DeprecationWarning)
        warnings.warn(sync, UserWarning)  # the line reported
        warnings.warn(sync, UserWarning)

    with pytest.warns(DeprecationWarning, match="unrelated"):
        found = first_sync_warning(step)
    line = step.__code__.co_firstlineno + 3
    assert found == f"called a synchronizing CUDA operation at {__file__}:{line}"
