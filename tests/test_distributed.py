"""Data-parallel training on CPU with the gloo backend: 2 processes == 1 process with the same
global batch, and a run resumes with a different number of processes."""

import os
import socket

import torch
import torch.multiprocessing as mp
from test_pipeline import TINY_SPEC, mrcnn  # the tiny spec and CLI runner of the pipeline test
from torch import nn

from mrcnn_helpers.commands.train import without_option as _without_option
from mrcnn_helpers.data import generate_synthetic_dataset
from mrcnn_helpers.engine import train


class Regression(nn.Module):
    """Deterministic stand-in for the detector: a linear model with a mean-squared loss."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, images, targets):
        x = images.float().flatten(1)[:, :4]
        return {"mse": ((self.layer(x) - targets["boxes"][:, 0, :3]) ** 2).mean()}


class Loader:
    """Fixed batches: sample i of step s is row (s * stride + offset + i) of a fixed table."""

    def __init__(self, batch, offset, stride, steps=8):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 3, 2, 2, generator=g)
        self.y = torch.randn(64, 1, 4, generator=g)
        self.batch, self.offset, self.stride, self.steps = batch, offset, stride, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        for s in range(self.steps):
            rows = [s * self.stride + self.offset + i for i in range(self.batch)]
            yield {"image": self.x[rows], "boxes": self.y[rows]}


def spec_for(batch):
    from mrcnn_helpers.spec import parse_spec, replace_spec

    return replace_spec(parse_spec(TINY_SPEC), train_batch_size=batch, l2_weight_decay=0.0,
                        logging_frequency=2)


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.manual_seed(0)
    train(spec_for(2), results, device="cpu", model=Regression(),
          train_loader=Loader(2, offset=2 * rank, stride=4), evaluate_fn=lambda *a, **k: {},
          verbose=False)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_weights(results):
    ckpt = torch.load(os.path.join(results, "model.step-6.pth"), weights_only=True)
    return ckpt["model"]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    torch.manual_seed(0)
    train(spec_for(4), tmp_path / "single", device="cpu", model=Regression(),
          train_loader=Loader(4, offset=0, stride=4), evaluate_fn=lambda *a, **k: {},
          verbose=False)
    ddp, single = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single")
    assert set(ddp) == {"layer.weight", "layer.bias"}  # plain model, no DDP "module." prefix
    for key in ddp:
        assert torch.allclose(ddp[key], single[key], atol=1e-6), key
    assert not torch.equal(ddp["layer.weight"], Regression().layer.weight)  # it did train


def test_launcher_strips_its_own_option():
    assert _without_option(["train", "--gpus", "2", "-e", "s"], "--gpus") == ["train", "-e", "s"]
    assert _without_option(["train", "--gpus=2", "-r", "x"], "--gpus") == ["train", "-r", "x"]


def test_real_model_two_processes_then_resume_on_one(tmp_path):
    generate_synthetic_dataset(tmp_path / "data", num_train=8, num_val=4, image_size=(64, 64),
                               seed=1)
    (tmp_path / "spec.txt").write_text(TINY_SPEC.replace("DATA", str(tmp_path / "data")))
    out = mrcnn("train", "-e", "spec.txt", "-r", "res", "--gpus", "2", "--device", "cpu",
                "--max-steps", "3", cwd=tmp_path)
    text = out.stdout + out.stderr
    assert "2 processes" in text
    assert text.count("Data-parallel training") == 1  # one logger: rank 0
    assert (tmp_path / "res" / "model.step-3.pth").exists()
    out = mrcnn("train", "-e", "spec.txt", "-r", "res", "--device", "cpu", cwd=tmp_path)
    assert "Resuming" in out.stdout and (tmp_path / "res" / "model.step-6.pth").exists()
