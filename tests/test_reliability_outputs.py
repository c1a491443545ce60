"""Commands that write: no output over an input, no partial file on a full disk, one line for a
read-only or unusable output, and arguments that would be silently wrong refused at parse time.

Every probe runs the `mrcnn` command line (in this process unless it says otherwise) and asserts
exit status 2 with one `error:` line naming the path, every input byte-identical afterwards and
no temporary file left. Real full disks and read-only mounts need a mount namespace (`unshare`):
those probes run where one can be made and are skipped elsewhere; the simulated ones (a file
object raising ENOSPC) always run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import synthetic_workdir
from PIL import Image
from test_pipeline import TINY_SPEC
from test_reliability_disk import _fill_disk_for, cli_error
from test_reliability_models import ROOT, digest, temporaries, tiny_files

from mrcnn_helpers.cli import main
from mrcnn_helpers.engine.lock import ResultsLock

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_files(tmp_path_factory.mktemp("outputs"))


@pytest.fixture(scope="module")
def trainable(tmp_path_factory):
    """A spec that trains (2 training images, 1 validation image) and its data."""
    root = synthetic_workdir(tmp_path_factory.mktemp("train"), TINY_SPEC, num_train=2,
                             num_val=1, seed=4)
    return {"root": root, "spec": root / "spec.txt", "train": root / "data" / "train",
            "val": root / "data" / "val",
            "train_json": root / "data" / "annotations" / "instances_train.json"}


def _refused(capsys, argv, inputs, *expected, absent=()):
    """`mrcnn ARGV` exits 2 with one line holding each of `expected`; the inputs are unchanged
    and nothing in `absent` exists afterwards."""
    before = digest(*inputs)
    line = cli_error(capsys, *map(str, argv))
    for text in expected:
        assert str(text) in line, (text, line)
    assert digest(*inputs) == before
    for path in absent:
        assert not Path(path).exists(), path
    return line


# ---------------------------------------------------------------------------------------------
# Arguments that would be silently wrong: refused when the command line is parsed


PARSE_FAULTS = [
    (["infer", "-t", "-1"], "argument -t/--threshold: must be a score between 0 and 1, got -1"),
    (["infer", "-t", "2"], "argument -t/--threshold: must be a score between 0 and 1, got 2"),
    (["infer", "-t", "nan"], "argument -t/--threshold: must be a score between 0 and 1, got nan"),
    (["infer", "-t", "inf"], "argument -t/--threshold: must be a score between 0 and 1, got inf"),
    (["infer", "-t", "half"], "argument -t/--threshold: invalid _probability value: 'half'"),
    (["infer", "--batch-size", "0"], "argument --batch-size/--batch_size: must be >= 1, got 0"),
    (["deploy", "--max-frames", "-1"], "argument --max-frames/--max_frames: must be >= 1, got -1"),
    (["deploy", "--max-frames", "0"], "argument --max-frames/--max_frames: must be >= 1, got 0"),
    (["deploy", "-t", "1.5"], "argument -t/--threshold: must be a score between 0 and 1, got 1.5"),
    (["evaluate", "--max-images", "0"], "argument --max-images/--max_images: must be >= 1, got 0"),
    (["evaluate", "--max-images", "-3"],
     "argument --max-images/--max_images: must be >= 1, got -3"),
    (["evaluate", "--batch-size", "0"], "argument --batch-size/--batch_size: must be >= 1, got 0"),
    (["export", "--batch-size", "0"], "argument --batch-size/--batch_size: must be >= 1, got 0"),
    (["export", "--batches", "0"], "argument --batches: must be >= 1, got 0"),
    (["train", "--max-steps", "0"], "argument --max-steps/--max_steps: must be >= 1, got 0"),
    (["train", "--gpus", "0"], "argument --gpus: must be >= 1, got 0"),
]


@pytest.mark.parametrize("argv,expected", PARSE_FAULTS, ids=[" ".join(a) for a, _ in PARSE_FAULTS])
def test_silently_wrong_arguments_are_refused_at_parse_time(files, tmp_path, capsys, argv,
                                                            expected):
    command = argv[0]
    required = {"infer": ["-m", files["checkpoint"], "-i", files["images"], "-o", tmp_path / "o"],
                "deploy": ["-m", files["checkpoint"], "-i", files["images"], "-o", tmp_path / "o"],
                "evaluate": ["-m", files["checkpoint"]],
                "export": ["-m", files["checkpoint"], "-o", tmp_path / "o.onnx"],
                "train": ["-e", files["spec"], "-r", tmp_path / "o"]}[command]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([command, *map(str, required), *argv[1:]])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"mrcnn {command}: error: {expected}" and "Traceback" not in "\n".join(err)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Outputs over inputs


def test_train_results_directory_over_inputs(trainable, tmp_path, capsys):
    spec, root = trainable["spec"], trainable["root"]
    inputs = [root]
    _refused(capsys, ["train", "-e", spec, "-r", trainable["train"]], inputs,
             f"results directory {trainable['train']} is the input {trainable['train']}")
    _refused(capsys, ["train", "-e", spec, "-r", trainable["val"] / "results"], inputs,
             f"results directory {trainable['val'] / 'results'} lies inside the input folder "
             f"{trainable['val']}", absent=[trainable["val"] / "results"])
    _refused(capsys, ["train", "-e", spec, "-r", trainable["train_json"]], inputs,
             f"results directory {trainable['train_json']} is the input")
    # A spec kept where training writes its spec.txt, edited by hand: refused, kept.
    results = tmp_path / "results"
    results.mkdir()
    own = results / "spec.txt"
    own.write_text(spec.read_text() + "\n# my notes\n")
    _refused(capsys, ["train", "-e", own, "-r", results], [own],
             f"{own} lies where training writes its spec.txt in the results directory "
             f"{results}: it would be overwritten")
    # A data file named like a metrics file of the results directory.
    data = json.loads(spec.read_text().split("train_json_file: ")[1].split("\n")[0])
    shutil.copy(data, results / "metrics_step-2.json")
    edited = tmp_path / "spec2.txt"
    edited.write_text(spec.read_text().replace(data, str(results / "metrics_step-2.json")))
    _refused(capsys, ["train", "-e", edited, "-r", results], [results, edited],
             "metrics_step-2.json lies where training writes its metrics_step-2.json")
    # A file as the results directory; the copy training wrote itself is allowed (no error).
    _refused(capsys, ["train", "-e", spec, "-r", edited], [edited],
             f"results directory {edited} is a file, not a folder")
    from mrcnn_helpers.commands.train import check_results_dir
    from mrcnn_helpers.spec import format_spec, load_spec

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "spec.txt").write_text(format_spec(load_spec(spec)))
    check_results_dir(copy, str(copy / "spec.txt"), load_spec(copy / "spec.txt"))
    assert temporaries(tmp_path) == [] and temporaries(root) == []


def test_infer_outputs_over_inputs(files, tmp_path, capsys):
    ckpt, images, spec = files["checkpoint"], files["images"], files["spec"]
    labels = tmp_path / "labels.txt"
    labels.write_text("circle\ntriangle\nsquare\n")
    inputs = [files["root"], labels]
    base = ["infer", "-m", ckpt, "-i", images]
    out = tmp_path / "out"
    _refused(capsys, base + ["-o", ckpt], inputs, f"output directory {ckpt} is the input {ckpt}")
    _refused(capsys, base + ["-o", files["results"]], inputs,
             f"output directory {files['results']} is a folder holding the input {ckpt}")
    _refused(capsys, base + ["-o", labels, "-l", labels], inputs,
             f"output directory {labels} is the input {labels}")
    notes = tmp_path / "notes.txt"
    notes.write_text("a file, not a folder")
    _refused(capsys, base + ["-o", notes], inputs + [notes],
             f"output directory {notes} is a file, not a folder")
    for target in (ckpt, spec, images, files["val_json"], labels):
        _refused(capsys, base + ["-o", out, "-e", spec, "-l", labels, "--json", target], inputs,
                 f"--json {target} ", absent=[out])
    # The validation JSON named only by the checkpoint's stored spec is an input too.
    _refused(capsys, base + ["-o", out, "--json", files["val_json"]], inputs,
             f"--json {files['val_json']} is the input {files['val_json']}", absent=[out])
    _refused(capsys, base + ["-o", out, "--json", out], inputs,
             f"--json {out} is the output directory", absent=[out])
    assert temporaries(files["root"]) == [] and temporaries(tmp_path) == []


def test_evaluate_json_over_inputs(files, tmp_path, capsys):
    inputs = [files["root"]]
    for target in (files["checkpoint"], files["val_json"], files["images"], files["spec"]):
        argv = ["evaluate", "-m", files["results"], "--json", target]
        if target == files["spec"]:
            argv += ["-e", files["spec"]]
        _refused(capsys, argv, inputs, f"--json {target} ")
    assert temporaries(files["root"]) == []


def test_outputs_beside_the_model_files_of_a_results_directory(files, capsys):
    """-m RESULTS is read for its model files (and spec copy), not as an input folder: metrics
    and annotated images may be written beside them, as demo.sh does, never over them."""
    from mrcnn_helpers.cli import main

    results = files["results"]
    before = digest(files["root"])
    metrics = results / "val_metrics.json"
    assert main(["evaluate", "-m", str(results), "--json", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["eval_images"] >= 1
    drawn = results / "infer"
    assert main(["infer", "-m", str(results), "-i", str(files["images"]), "-o", str(drawn)]) == 0
    assert sorted(p.name for p in drawn.iterdir()) == sorted(p.name for p in
                                                             files["images"].iterdir())
    capsys.readouterr()
    after = digest(files["root"])
    assert {k: v for k, v in after.items() if k in before} == before  # nothing read changed
    # evaluate's own files went to eval/ beside the model files, its default --save-dir.
    assert sorted(p.name for p in (results / "eval").iterdir()) == [
        "confusion_matrix.png", "metrics.json", "pr_curves.png", "predictions.png"]
    metrics.unlink()
    shutil.rmtree(drawn)
    shutil.rmtree(results / "eval")
    for model_file in sorted(results.glob("*.pth")):
        _refused(capsys, ["evaluate", "-m", results, "--json", model_file], [files["root"]],
                 f"--json {model_file} is the input {model_file}")


def test_deploy_outputs_over_inputs(files, tmp_path, capsys):
    pytest.importorskip("cv2")
    video = _video(tmp_path / "clip.avi", 3)
    inputs = [files["root"], video]
    model = files.get("onnx", files["checkpoint"])
    base = ["deploy", "-m", model]
    _refused(capsys, base + ["-i", video, "-o", video], inputs,
             f"output {video} is the input {video}")
    _refused(capsys, base + ["-i", files["images"], "-o", files["images"] / "annotated"], inputs,
             f"output {files['images'] / 'annotated'} lies inside the input folder")
    _refused(capsys, base + ["-i", video, "-o", model], inputs, f"output {model} is the input")
    for target in (video, model, files["val_json"]):
        _refused(capsys, base + ["-i", video, "-o", tmp_path / "out.avi", "--json", target],
                 inputs, f"--json {target} ", absent=[tmp_path / "out.avi"])
    _refused(capsys, base + ["-i", video, "-o", tmp_path / "out.avi", "--json",
                             tmp_path / "out.avi"], inputs,
             f"output {tmp_path / 'out.avi'} is also --json: one would overwrite the other")
    (tmp_path / "folder.avi").mkdir()
    _refused(capsys, base + ["-i", video, "-o", tmp_path / "folder.avi"], inputs,
             f"output {tmp_path / 'folder.avi'} is a folder: name a video file")
    assert temporaries(tmp_path) == []


def test_export_outputs_over_inputs(files, tmp_path, capsys):
    ckpt, spec = files["checkpoint"], files["spec"]
    named_labels = tmp_path / "specs" / "labels.txt"  # a spec that DeepStream's labels would hit
    named_labels.parent.mkdir()
    shutil.copy(spec, named_labels)
    inputs = [files["root"], named_labels]
    base = ["export", "-m", ckpt]
    out = tmp_path / "model.onnx"
    _refused(capsys, base + ["-o", spec, "-e", spec], inputs, f"--output {spec} is the input")
    _refused(capsys, base + ["-o", files["val_json"]], inputs,
             f"--output {files['val_json']} is the input {files['val_json']}")
    _refused(capsys, base + ["-o", tmp_path], inputs, f"--output {tmp_path} is a folder")
    _refused(capsys, base + ["-o", out, "--engine", out], inputs,
             f"--engine {out} is also --output", absent=[out])
    _refused(capsys, base + ["-o", out, "-e", spec, "--cal-cache-file", spec], inputs,
             f"--cal-cache-file {spec} is the input {spec}", absent=[out])
    _refused(capsys, base + ["-o", out, "--cal-image-dir", files["images"], "--cal-cache-file",
                             files["images"] / "cal.bin"], inputs,
             "lies inside the input folder", absent=[out])
    _refused(capsys, base + ["-o", out, "-e", named_labels, "--deepstream", named_labels.parent],
             inputs, f"--deepstream labels.txt {named_labels} is the input {named_labels}",
             absent=[out])
    _refused(capsys, base + ["-o", out, "--engine", tmp_path / "e.plan",
                             "--cal-cache-file", tmp_path / "e.plan.json"], inputs,
             "is also --engine's metadata", absent=[out])
    assert temporaries(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Full disks (simulated: a file object raising ENOSPC after some bytes)


def test_infer_on_a_full_disk_leaves_no_partial_image(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    second = sorted(p.name for p in files["images"].iterdir())[1]
    hit = _fill_disk_for(monkeypatch, f".{second}.", room=100)
    line = _refused(capsys, ["infer", "-m", files["checkpoint"], "-i", files["images"],
                             "-o", out, "--batch-size", "1"], [files["root"]],
                    f"could not write {out / second}: No space left on device (errno 28)")
    monkeypatch.undo()
    assert hit and line.endswith("the previous annotated image, if any, is unchanged")
    written = sorted(p.name for p in out.iterdir())
    assert written == [min(p.name for p in files["images"].iterdir())]
    Image.open(out / written[0]).load()  # the image before the failure is complete
    assert temporaries(tmp_path) == []


def test_deploy_on_a_full_disk_stops_in_one_line(files, tmp_path, monkeypatch, capsys):
    import threading

    out = tmp_path / "frames"
    second = sorted(p.name for p in files["images"].iterdir())[1]
    threads = threading.active_count()
    hit = _fill_disk_for(monkeypatch, f".{second}.", room=100)
    _refused(capsys, ["deploy", "-m", files["checkpoint"], "-i", files["images"], "-o", out,
                      "--batch-size", "1"], [files["root"]],
             f"could not write {out / second}: No space left on device (errno 28)")
    monkeypatch.undo()
    assert hit and not (out / second).exists() and temporaries(tmp_path) == []
    assert threading.active_count() == threads  # the decode and encode threads ended


def test_export_on_a_full_disk_keeps_the_previous_file(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    hit = _fill_disk_for(monkeypatch, ".model.onnx.", room=1 << 20)
    _refused(capsys, ["export", "-m", files["checkpoint"], "-o", out, "--verify-images", "0"],
             [files["root"]], f"could not write {out}: No space left on device (errno 28)")
    monkeypatch.undo()
    assert hit and out.read_bytes() == b"previous export" and temporaries(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Real full disks and read-only mounts, in a mount namespace


def _namespace_prefix() -> list[str] | None:
    """`unshare` arguments that give a private mount namespace here, or None."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-rm"], ["unshare", "-m"]):
        if subprocess.run(prefix + ["true"], capture_output=True, check=False).returncode == 0:
            return prefix
    return None


NAMESPACE = _namespace_prefix()
needs_namespace = pytest.mark.skipif(NAMESPACE is None, reason="no mount namespace (unshare) "
                                     "here: the simulated probes above cover these paths")

CHILD = """
import contextlib, io, json, sys
from mrcnn_helpers.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def _in_namespace(setup: str, runs: list[list]) -> list[dict]:
    """Run `setup` (shell: mounts) then each `mrcnn` argv in one Python child inside a private
    mount namespace; [{"code", "stderr"}] per run."""
    script = f"{setup} && exec {sys.executable} -c \"$0\" \"$1\""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run(NAMESPACE + ["sh", "-c", script, CHILD,
                                      json.dumps([[str(a) for a in r] for r in runs])],
                         capture_output=True, text=True, errors="replace", timeout=300, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _error_line(result: dict) -> str:
    lines = [x for x in result["stderr"].splitlines() if x.strip() and not x.startswith("warn")]
    assert result["code"] == 2 and "Traceback" not in result["stderr"], result
    assert len(lines) == 1 and lines[0].startswith("error: "), result
    return lines[0]


@needs_namespace
def test_real_full_disk_for_infer_and_deploy(files, tmp_path):
    pytest.importorskip("cv2")
    disk = tmp_path / "disk"
    disk.mkdir()
    (disk / "old.avi").write_bytes(b"an older video")
    before = digest(files["root"])
    model = files.get("onnx", files["checkpoint"])
    # A file system of 256 KiB, filled but for one page (4 KiB).
    setup = (f"mount -t tmpfs -o size=256k tmpfs {disk} && printf 'an older video' > "
             f"{disk}/old.avi && head -c {256 * 1024 - 8192} /dev/zero > {disk}/filler")
    runs = [["infer", "-m", model, "-i", files["images"], "-o", disk / "infer"],
            ["deploy", "-m", model, "-i", files["images"], "-o", disk / "frames"],
            ["deploy", "-m", model, "-i", files["images"], "-o", disk / "old.avi"]]
    infer, frames, video = _in_namespace(setup, runs)
    assert "No space left on device (errno 28)" in _error_line(infer)
    assert "No space left on device (errno 28)" in _error_line(frames)
    assert _error_line(video) == (
        f"error: could not write video {disk / 'old.avi'}: it holds 0 of the 2 frames written "
        "(disk full?); an older file there, if any, is unchanged")
    assert digest(files["root"]) == before


@needs_namespace
def test_real_read_only_mounts(trainable, files, tmp_path):
    results = tmp_path / "ro" / "results"
    results.mkdir(parents=True)
    (results / "notes.txt").write_text("kept")
    ro = tmp_path / "ro"
    setup = f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}"
    runs = [["train", "-e", trainable["spec"], "-r", results],
            ["train", "-e", trainable["spec"], "-r", ro / "new"],
            ["infer", "-m", files["checkpoint"], "-i", files["images"], "-o", ro / "annotated"],
            ["deploy", "-m", files["checkpoint"], "-i", files["images"], "-o", results]]
    train_old, train_new, infer, deploy = _in_namespace(setup, runs)
    assert _error_line(train_old) == (f"error: results directory folder {results} is not "
                                      "writable: Read-only file system (errno 30)")
    assert _error_line(train_new) == (f"error: cannot create results directory folder "
                                      f"{ro / 'new'}: Read-only file system (errno 30)")
    assert "Read-only file system (errno 30)" in _error_line(infer)
    assert "Read-only file system (errno 30)" in _error_line(deploy)
    assert sorted(p.name for p in ro.rglob("*")) == ["notes.txt", "results"]


def test_read_only_results_directory_simulated(trainable, tmp_path, monkeypatch, capsys):
    """Where no mount namespace can be made: the write check meets EROFS."""
    import errno
    import tempfile

    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == tmp_path / "results":
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    (tmp_path / "results").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    _refused(capsys, ["train", "-e", trainable["spec"], "-r", tmp_path / "results"],
             [trainable["root"]], f"results directory folder {tmp_path / 'results'} is not "
             "writable: Read-only file system (errno 30)")
    assert list((tmp_path / "results").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The results-directory lock


def test_a_locked_results_directory_is_one_line(trainable, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    with ResultsLock(results):
        line = _refused(capsys, ["train", "-e", trainable["spec"], "-r", results],
                        [trainable["root"]], f"{results} is in use by another training run "
                        f"(pid {os.getpid()} holds {results / '.lock'})")
    assert "use another results directory" in line
    assert sorted(p.name for p in results.iterdir()) == [".lock"]
    (results / ".lock").unlink()
    (results / ".lock").mkdir()  # a lock that cannot be opened
    _refused(capsys, ["train", "-e", trainable["spec"], "-r", results], [trainable["root"]],
             f"cannot open the lock file {results / '.lock'}: ")
    assert sorted(p.name for p in results.iterdir()) == [".lock"]


# ---------------------------------------------------------------------------------------------


def _video(path: Path, frames: int) -> Path:
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    for i in range(frames):
        writer.write(np.full((64, 96, 3), 40 * i, np.uint8))
    writer.release()
    return path

