"""Fault injection: bad input of every kind, each met with a clear error or a counted skip.

A clear error is an MrcnnError subclass whose message is one line naming the file, field or id
(at the CLI: exit status 2, one `error:` line, no traceback). A counted skip is input the
loader leaves out and counts. Never a raw traceback, never an output written from bad input.
Images and annotations are hand-made variants of a small synthetic dataset.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import pickle
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import TINY_SPEC
from test_reliability_disk import cli_error

from mrcnn_helpers.cli import main
from mrcnn_helpers.data import CocoInstanceDataset, generate_synthetic_dataset
from mrcnn_helpers.engine import CheckpointWarning
from mrcnn_helpers.errors import DataError, MrcnnError

SPEC = (TINY_SPEC.replace("total_steps: 6", "total_steps: 2")
        .replace("num_steps_per_eval: 3", "num_steps_per_eval: 2")
        .replace('learning_rate_steps: "[5]"', 'learning_rate_steps: "[1]"'))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Synthetic data (2 train, 1 val image of 64x64), its spec, and a checkpoint trained on it."""
    root = tmp_path_factory.mktemp("inputs")
    paths = generate_synthetic_dataset(root / "data", num_train=2, num_val=1,
                                       image_size=(64, 64), seed=2)
    (root / "spec.txt").write_text(SPEC.replace("DATA", str(root / "data")))
    assert main(["train", "-e", str(root / "spec.txt"), "-r", str(root / "results")]) == 0
    return {"root": root, "json": Path(paths["train_json"]), "images": Path(paths["train_images"]),
            "coco": json.loads(Path(paths["train_json"]).read_text()),
            "checkpoint": root / "results" / "model.step-2.pth"}


def _dataset(json_file, image_dir) -> CocoInstanceDataset:
    return CocoInstanceDataset(json_file, image_dir, image_size=(64, 64), train=False,
                               gt_mask_size=16, max_num_instances=8)


def _clear(exc: BaseException, *names: str) -> str:
    """The message of a clear error: one line, naming each of `names`."""
    text = str(exc)
    assert isinstance(exc, MrcnnError) and "\n" not in text, text
    for name in names:
        assert name in text, (name, text)
    return text


def _digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------------------------------
# Images


def _first_image(base, tmp_path, write) -> tuple[Path, Path]:
    """A copy of the training set whose first image file is replaced by `write(path, rgb)`.

    Returns (json file, image dir). `write` may return another file name (e.g. a .jpg).
    """
    images = tmp_path / "images"
    shutil.copytree(base["images"], images)
    data = copy.deepcopy(base["coco"])
    info = data["images"][0]
    rgb = np.asarray(Image.open(images / info["file_name"]).convert("RGB"))
    (images / info["file_name"]).unlink()
    info["file_name"] = write(images / info["file_name"], rgb) or info["file_name"]
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(data))
    return json_file, images


def _truncated_jpeg(path, rgb):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    path.with_suffix(".jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    return path.with_suffix(".jpg").name


def _corrupt_png(path, rgb):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 8
    data[start:start + 40] = b"\xff" * 40  # garbage inside the compressed pixel data
    path.write_bytes(bytes(data))


BAD_IMAGES = {
    "truncated JPEG": (_truncated_jpeg, "cannot read image"),
    "corrupt PNG": (_corrupt_png, "cannot read image"),
    "zero-size file": (lambda path, rgb: path.touch(), "cannot read image"),
    "text file named .png": (lambda path, rgb: path.write_text("hello") and None,
                             "cannot read image"),
    "image smaller than the JSON says": (
        lambda path, rgb: Image.fromarray(rgb[:32]).save(path), "is 32x64 (h x w) but"),
}


@pytest.mark.parametrize("fault", list(BAD_IMAGES))
def test_unreadable_images_name_the_file_and_image_id(base, tmp_path, fault):
    write, expected = BAD_IMAGES[fault]
    json_file, images = _first_image(base, tmp_path, write)
    name = json.loads(json_file.read_text())["images"][0]["file_name"]
    ds = _dataset(json_file, images)
    with pytest.raises(DataError) as info:
        ds[0]
    _clear(info.value, name, "image id 1", expected)
    assert ds[1]["num_instances"] > 0  # the other images are unaffected


def test_missing_images(base, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(base["images"], images)
    second = base["coco"]["images"][1]["file_name"]
    (images / second).unlink()
    with pytest.raises(DataError) as info:  # read when its sample is
        _dataset(base["json"], images)[1]
    _clear(info.value, "image file not found", f"{images / second} (image id 2)")
    (images / base["coco"]["images"][0]["file_name"]).unlink()
    with pytest.raises(DataError) as info:  # the first image is looked for at once
        _dataset(base["json"], images)
    _clear(info.value, "image file not found", "(image id 1", "check the image directory")


def _gray(rgb):
    return np.asarray(Image.fromarray(rgb).convert("L"))


CONVERTED_IMAGES = {
    # fault: (write the file, the RGB image the sample must equal)
    "PNG with alpha": (lambda path, rgb: Image.fromarray(
        np.dstack([rgb, np.arange(rgb.size // 3, dtype=np.uint8).reshape(rgb.shape[:2])])
    ).save(path), lambda rgb: rgb),
    "grayscale PNG": (lambda path, rgb: Image.fromarray(_gray(rgb)).save(path),
                      lambda rgb: np.repeat(_gray(rgb)[..., None], 3, 2)),
    "16-bit PNG": (lambda path, rgb: Image.fromarray(_gray(rgb).astype(np.uint16) * 257).save(path),
                   lambda rgb: np.repeat(_gray(rgb)[..., None], 3, 2)),
    "palette PNG": (lambda path, rgb: Image.fromarray(rgb).quantize(256, dither=0).save(path),
                    lambda rgb: np.asarray(Image.fromarray(rgb).quantize(256, dither=0)
                                           .convert("RGB"))),
}


@pytest.mark.parametrize("fault", list(CONVERTED_IMAGES))
def test_other_image_modes_become_the_same_rgb_sample(base, tmp_path, fault):
    write, expected = CONVERTED_IMAGES[fault]
    json_file, images = _first_image(base, tmp_path, write)
    mode = Image.open(images / json.loads(json_file.read_text())["images"][0]["file_name"]).mode
    assert mode in {"PNG with alpha": ("RGBA",), "grayscale PNG": ("L",),
                    "16-bit PNG": ("I;16", "I"), "palette PNG": ("P",)}[fault]
    sample = _dataset(json_file, images)[0]
    rgb = np.asarray(Image.open(base["images"] / base["coco"]["images"][0]["file_name"])
                     .convert("RGB"))
    (tmp_path / "reference").mkdir()
    Image.fromarray(np.ascontiguousarray(expected(rgb))).save(tmp_path / "reference" / "ref.png")
    reference = copy.deepcopy(base["coco"])
    reference["images"][0]["file_name"] = "../reference/ref.png"
    (tmp_path / "reference.json").write_text(json.dumps(reference))
    wanted = _dataset(tmp_path / "reference.json", images)[0]
    assert sample["image"].shape == (3, 64, 64)
    assert torch.equal(sample["image"], wanted["image"])
    assert torch.equal(sample["boxes"], wanted["boxes"]) and sample["num_instances"] > 0


# ---------------------------------------------------------------------------------------------
# Annotation files


def _edit(coco: dict, fault: str):
    """The COCO dict (or raw text) with one kind of defect; see JSON_FAULTS."""
    data = copy.deepcopy(coco)
    ann = data["annotations"][0]
    if fault == "not JSON":
        return '{"images": [{"id": 1,, }]}'
    if fault == "JSON list, not COCO":
        return json.dumps([1, 2, 3])
    if fault == "COCO keys missing":
        return json.dumps({"images": data["images"]})
    if fault == "entry without its id":
        del ann["id"]
    elif fault == "undeclared category":
        ann["category_id"] = 42
    elif fault == "annotation of an unknown image":
        ann["image_id"] = 77
    elif fault == "duplicate image id":
        data["images"].append(dict(data["images"][0], file_name="again.png"))
    elif fault == "duplicate annotation id":
        data["annotations"][1]["id"] = ann["id"]
    elif fault == "NaN in bbox":
        ann["bbox"][0] = float("nan")
    elif fault == "infinity in bbox":
        ann["bbox"][2] = float("inf")
    elif fault == "segmentation neither polygons nor RLE":
        ann["segmentation"] = "a string"
    elif fault == "bbox not 4 numbers":
        ann["bbox"] = ["x", 1, 2, 3]
    elif fault == "file_name not a string":
        data["images"][0]["file_name"] = 5
    elif fault == "image width a string":
        data["images"][0]["width"] = "64"
    return json.dumps(data)


JSON_FAULTS = {
    # fault: what the one-line message must say besides the file name
    "not JSON": "not valid JSON (line 1, column 22",
    "JSON list, not COCO": "not a COCO instances file",
    "COCO keys missing": "missing or non-list keys ['annotations', 'categories']",
    "entry without its id": "annotations[0] lacks ['id']",
    "undeclared category": "has category_id 42, not one of the categories [1, 2, 3]",
    "annotation of an unknown image": "refers to image id 77",
    "duplicate image id": "1 duplicate id(s) in 'images'",
    "duplicate annotation id": "1 duplicate id(s) in 'annotations'",
    "NaN in bbox": "annotation 1 has a NaN or infinite number in its bbox",
    "infinity in bbox": "annotation 1 has a NaN or infinite number in its bbox",
    "segmentation neither polygons nor RLE": "annotation 1 has a segmentation that is neither",
    "bbox not 4 numbers": "annotation 1 has bbox ['x', 1, 2, 3]",
    "file_name not a string": "images[0] has file_name 5; expected a string",
    "image width a string": "images[0] has width '64'; expected an integer > 0",
}


@pytest.mark.parametrize("fault", list(JSON_FAULTS))
def test_bad_annotation_files_are_refused_naming_the_file(base, tmp_path, fault):
    json_file = tmp_path / "instances.json"
    json_file.write_text(_edit(base["coco"], fault))
    with pytest.raises(DataError) as info:
        _dataset(json_file, base["images"])
    _clear(info.value, str(json_file), JSON_FAULTS[fault])


def test_nan_polygon_is_refused_before_rasterizing(base, tmp_path):
    """A NaN vertex made pycocotools allocate without bound (the OOM killer ended the process);
    run under a 4 GiB address-space limit so a regression fails here instead of the machine."""
    data = copy.deepcopy(base["coco"])
    data["annotations"][0]["segmentation"][0][3] = float("nan")
    json_file = tmp_path / "nan.json"
    json_file.write_text(json.dumps(data))
    code = ("from mrcnn_helpers.data import CocoInstanceDataset as D\n"
            "from mrcnn_helpers.errors import DataError\n"
            f"try:\n    D({str(json_file)!r}, {str(base['images'])!r}, image_size=(64, 64))[0]\n"
            "except DataError as e:\n    print(e)\n")

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY))

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         preexec_fn=limit_memory, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith(
        f"{json_file}: annotation 1 has a NaN or infinite number in its segmentation")


def test_rle_of_the_wrong_size(base, tmp_path):
    data = copy.deepcopy(base["coco"])
    data["annotations"][0]["segmentation"] = {"size": [10, 10], "counts": [0, 100]}
    json_file = tmp_path / "rle.json"
    json_file.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        _dataset(json_file, base["images"])[0]
    _clear(info.value, str(json_file), "annotation 1 has an RLE of size [10, 10]")


def test_unusable_annotations_are_skipped_and_counted(base, tmp_path):
    data = copy.deepcopy(base["coco"])
    first = [a for a in data["annotations"] if a["image_id"] == 1]
    kept = _dataset(base["json"], base["images"])[0]
    first[0]["segmentation"] = [[1, 1, 5, 5]]  # a polygon of 2 points
    first[1]["bbox"] = [100, 100, 5, 5]  # wholly outside the 64x64 image
    x, y, _, h = first[2]["bbox"]
    first[2]["bbox"] = [x, y, 500, h]  # partly outside: clipped to the image
    json_file = tmp_path / "some_bad.json"
    json_file.write_text(json.dumps(data))
    ds = _dataset(json_file, base["images"])
    assert ds.num_dropped_annotations == 2
    sample = ds[0]
    assert sample["num_instances"] == kept["num_instances"] - 2
    clipped = sample["boxes"][: sample["num_instances"]]
    assert clipped[:, 2].max() <= 64 and (clipped[:, 2] == 64).any()


def test_category_id_zero_is_an_ordinary_id(base, tmp_path):
    """TLT reserves label 0 for the background; COCO ids are mapped to labels 1..K in sorted
    order, so a category with id 0 simply gets label 1 and its detections report id 0."""
    from mrcnn_helpers.evaluate import detections_to_coco_results

    data = copy.deepcopy(base["coco"])
    for entry in data["categories"]:
        entry["id"] -= 1
    for ann in data["annotations"]:
        ann["category_id"] -= 1
    json_file = tmp_path / "zero.json"
    json_file.write_text(json.dumps(data))
    ds, same = _dataset(json_file, base["images"]), _dataset(base["json"], base["images"])
    assert ds.category_ids == [0, 1, 2] and ds.class_names == same.class_names
    assert torch.equal(ds[0]["classes"], same[0]["classes"])  # labels 1..3 as before
    result = detections_to_coco_results(1, torch.tensor([[1.0, 2.0, 5.0, 6.0]]),
                                        torch.tensor([0.9]), torch.tensor([1]), None,
                                        ds.category_ids)
    assert result[0]["category_id"] == 0


# ---------------------------------------------------------------------------------------------
# Spec files (through the CLI)


SPEC_FAULTS = {
    # fault: (edit of the spec text, what the error line must say)
    "typo in a field name": (lambda t: t.replace("init_learning_rate", "init_learning_rat"),
                             ("unknown field 'init_learning_rat' in the top level; did you mean "
                              "'init_learning_rate'?")),
    "wrong type": (lambda t: t.replace("total_steps: 2", 'total_steps: "two"'),
                   'total_steps = "two": expected a non-negative integer'),
    "fraction for an integer": (lambda t: t.replace("total_steps: 2", "total_steps: 2.5"),
                                "total_steps = 2.5: expected a non-negative integer"),
    "negative learning rate": (lambda t: t.replace("init_learning_rate: 0.01",
                                                   "init_learning_rate: -0.01"),
                               "init_learning_rate = -0.01: must be > 0"),
    "image size not a multiple of 2^max_level": (
        lambda t: t.replace('image_size: "(64, 64)"', 'image_size: "(60, 64)"'),
        "must be positive multiples of 2^max_level = 32"),
    "code in a list string": (
        lambda t: t.replace('learning_rate_steps: "[1]"',
                            'learning_rate_steps: "[__import__(\'os\').system(\'touch MARK\')]"'),
        "not a literal list or tuple of numbers (only literals are read, nothing is evaluated)"),
    "binary file": (lambda t: "\x00\udcff garbage", "not a UTF-8 text file"),
    "unbalanced braces": (lambda t: t.rstrip().rstrip("}"), "spec.txt:"),
}


@pytest.mark.parametrize("fault", list(SPEC_FAULTS))
def test_bad_specs_give_one_line_naming_the_field(base, tmp_path, capsys, monkeypatch, fault):
    edit, expected = SPEC_FAULTS[fault]
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.txt"
    spec.write_bytes(edit((base["root"] / "spec.txt").read_text())
                     .encode("utf-8", "surrogateescape"))
    line = cli_error(capsys, "spec", "validate", str(spec))
    assert line.startswith(f"error: {spec}") and expected in line
    assert list(tmp_path.iterdir()) == [spec]  # nothing ran: no MARK file
    line = cli_error(capsys, "train", "-e", str(spec), "-r", str(tmp_path / "results"))
    assert expected in line and list(tmp_path.iterdir()) == [spec]  # no results, no MARK


def test_missing_spec_file(tmp_path, capsys):
    line = cli_error(capsys, "train", "-e", str(tmp_path / "nope.txt"), "-r", str(tmp_path))
    assert line == (f"error: {tmp_path / 'nope.txt'}: spec file not found (relative paths are "
                    f"taken from the current directory, {Path.cwd()})")


def test_num_classes_smaller_than_the_dataset(base, tmp_path, capsys):
    spec = tmp_path / "spec.txt"
    spec.write_text((base["root"] / "spec.txt").read_text().replace("num_classes: 4",
                                                                    "num_classes: 3"))
    line = cli_error(capsys, "train", "-e", str(spec), "-r", str(tmp_path / "results"))
    assert line == (f"error: data_config.num_classes = 3, but {base['json']} has 3 categories; "
                    "num_classes must be at least 4 (categories + background)")
    assert not list((tmp_path / "results").glob("model.step-*"))


def test_bad_image_in_a_worker_process_is_one_line(base, tmp_path, capsys):
    """The DataLoader re-raises a worker's error with the worker's traceback in its message;
    the CLI prints the error's own line only."""
    json_file, images = _first_image(base, tmp_path, _truncated_jpeg)
    spec = tmp_path / "spec.txt"
    spec.write_text((base["root"] / "spec.txt").read_text()
                    .replace(str(base["json"]), str(json_file))
                    .replace(f'train_image_dir: "{base["images"]}"', f'train_image_dir: "{images}"')
                    .replace("n_workers: 0", "n_workers: 1"))
    line = cli_error(capsys, "train", "-e", str(spec), "-r", str(tmp_path / "results"))
    assert line.startswith(f"error: cannot read image {images / '000001.jpg'} (image id 1)")
    assert not list((tmp_path / "results").glob("model.step-*"))


# ---------------------------------------------------------------------------------------------
# Training


def test_non_finite_loss_stops_without_writing(base, tmp_path, capsys):
    spec = tmp_path / "spec.txt"
    spec.write_text((base["root"] / "spec.txt").read_text()
                    .replace("total_steps: 2", "total_steps: 8")
                    .replace("num_steps_per_eval: 2", "num_steps_per_eval: 8")
                    .replace("init_learning_rate: 0.01", "init_learning_rate: 1000000.0")
                    .replace("warmup_learning_rate: 0.001", "warmup_learning_rate: 1000000.0"))
    line = cli_error(capsys, "train", "-e", str(spec), "-r", str(tmp_path / "results"))
    assert re.match(r"error: non-finite loss at step [1-8] \(lr [0-9.e+]+\): .*=(nan|inf)", line)
    assert "no checkpoint was written yet" in line
    assert not list((tmp_path / "results").glob("model.step-*"))


# ---------------------------------------------------------------------------------------------
# Checkpoints


class Payload:
    """Unpickling this calls open(marker, "w"): stands for any code a crafted file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_never_runs(base, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"format": "mrcnn-checkpoint", "version": 1, "step": 2,
                "model": {"backbone.body.conv1.weight": Payload(marker)}}, evil)
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is live: a full unpickler runs it
    assert marker.exists()
    marker.unlink()

    refused = f"error: checkpoint {evil} refused: not a plain-weights checkpoint (weights_only)"
    assert cli_error(capsys, "evaluate", "-m", str(evil)).startswith(refused)
    assert cli_error(capsys, "infer", "-m", str(evil), "-i", str(base["images"]),
                     "-o", str(tmp_path / "out")).startswith(refused)
    assert not (tmp_path / "out").exists()
    # As pretrained weights in the spec's `checkpoint` field.
    spec = tmp_path / "spec.txt"
    spec.write_text((base["root"] / "spec.txt").read_text()
                    .replace('checkpoint: ""', f'checkpoint: "{evil}"'))
    line = cli_error(capsys, "train", "-e", str(spec), "-r", str(tmp_path / "results"))
    assert line.startswith(f"error: {evil} refused: it holds pickled objects other than tensors")
    # As the only checkpoint of a results directory being resumed (the message lists each file
    # it tried, one per line).
    (tmp_path / "resumed").mkdir()
    shutil.copy(evil, tmp_path / "resumed" / "model.step-2.pth")
    capsys.readouterr()
    with pytest.warns(CheckpointWarning, match="skipping .*model.step-2.pth: .* refused"):
        assert main(["train", "-e", str(base["root"] / "spec.txt"), "-r",
                     str(tmp_path / "resumed")]) == 2
    err = capsys.readouterr().err
    assert f"error: no readable checkpoint in {tmp_path / 'resumed'}" in err
    assert "refused" in err and "Traceback" not in err
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints(base, tmp_path, capsys):
    data = base["checkpoint"].read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 3])
    line = cli_error(capsys, "evaluate", "-m", str(truncated))
    assert line.startswith(f"error: checkpoint {truncated} is unreadable (corrupt or truncated)")
    foreign = tmp_path / "weights.pth"
    torch.save({"backbone.weight": torch.zeros(2)}, foreign)
    line = cli_error(capsys, "infer", "-m", str(foreign), "-i", str(base["images"]),
                     "-o", str(tmp_path / "out"))
    assert line.startswith(f"error: {foreign} is not a training checkpoint of this toolkit")
    empty = tmp_path / "empty"
    empty.mkdir()
    line = cli_error(capsys, "evaluate", "-m", str(empty))
    assert line == f"error: {empty}: no checkpoint (model.step-N.pth) in this directory"


def test_checkpoint_of_another_num_classes(base, tmp_path, capsys):
    spec = tmp_path / "spec.txt"
    spec.write_text((base["root"] / "spec.txt").read_text().replace("num_classes: 4",
                                                                    "num_classes: 5"))
    expected = (f"error: checkpoint {base['checkpoint']} does not fit the model built from the "
                "spec; network fields that differ: data_config.num_classes: checkpoint 4, spec 5")
    assert cli_error(capsys, "evaluate", "-e", str(spec), "-m", str(base["checkpoint"])) == expected
    assert cli_error(capsys, "infer", "-e", str(spec), "-m", str(base["checkpoint"]),
                     "-i", str(base["images"]), "-o", str(tmp_path / "out")) == expected
    assert not (tmp_path / "out").exists()
    # Resuming training with it is refused too, listing the fields (one per line).
    capsys.readouterr()
    assert main(["train", "-e", str(spec), "-r", str(base["checkpoint"].parent)]) == 2
    err = capsys.readouterr().err
    assert "error: cannot resume from" in err and "data_config.num_classes: checkpoint 4, " \
        "spec 5" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Inference


def test_infer_input_faults(base, tmp_path, capsys):
    checkpoint = str(base["checkpoint"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert cli_error(capsys, "infer", "-m", checkpoint, "-i", str(empty), "-o",
                     str(tmp_path / "out")) == \
        f"error: no images (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp) in {empty}"
    assert not (tmp_path / "out").exists()

    images = tmp_path / "images"
    shutil.copytree(base["images"], images)
    before = _digest(images)
    (tmp_path / "link").symlink_to(images)
    for output in (str(images), f"{images}/./", str(tmp_path / "link")):
        line = cli_error(capsys, "infer", "-m", checkpoint, "-i", str(images), "-o", output)
        assert line.startswith(f"error: output directory {Path(output)} is the input directory")
    assert _digest(images) == before  # the originals are untouched

    (images / "000000_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    line = cli_error(capsys, "infer", "-m", checkpoint, "-i", str(images), "-o",
                     str(tmp_path / "annotated"))
    assert line.startswith(f"error: cannot read image {images / '000000_broken.png'}")
    assert not (tmp_path / "annotated").exists() or not any((tmp_path / "annotated").iterdir())
