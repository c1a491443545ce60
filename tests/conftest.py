"""Pieces several test modules share."""

import argparse

import pytest
import torch

from mrcnn_helpers.data import generate_synthetic_dataset


def synthetic_workdir(root, spec_text, *, num_train, num_val, seed):
    """`root` with a small synthetic dataset in root/data and root/spec.txt (DATA -> that path)."""
    generate_synthetic_dataset(root / "data", num_train=num_train, num_val=num_val,
                               image_size=(64, 64), seed=seed)
    (root / "spec.txt").write_text(spec_text.replace("DATA", str(root / "data")))
    return root


def run_data_cli(argv):
    """`mrcnn data ...` in process: parse argv with the data subcommands and run the command."""
    from mrcnn_helpers.data.commands import add_data_commands

    parser = argparse.ArgumentParser(prog="mrcnn")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: two busy threads on a 2-core runner are slower than one
    for small convolutions."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
