"""Hostile input to every data reader and data command: a one-line error or a counted skip.

Never a crash (the probes that used to end pycocotools with SIGSEGV run in a child process under
a 4 GiB address-space limit), never a raw traceback, never an output written over an input, and
the dataset doctor and the training readers agree on every annotation: what the doctor passes
trains, what it flags is refused or dropped by training exactly as its report says.
"""

from __future__ import annotations

import base64
import copy
import errno
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_data_cli
from PIL import Image, ImageOps
from test_download import _Server, _zip
from test_reliability_disk import _fill_disk_for, cli_error

import mrcnn_helpers.data.download as dl
from mrcnn_helpers.cli import main
from mrcnn_helpers.data import (
    CocoInstanceDataset,
    TfRecordInstanceDataset,
    check_dataset,
    coco_merge,
    coco_subset,
    convert_labelme,
    convert_mask_folder,
    generate_synthetic_dataset,
    load_coco,
    load_image,
    write_coco_tfrecords,
)
from mrcnn_helpers.data import tfrecord as tfr
from mrcnn_helpers.data.annotations import KIND, REFUSED, decode_rle_counts
from mrcnn_helpers.data.annotations import PROBLEMS as ANNOTATION_PROBLEMS
from mrcnn_helpers.data.contours import encode_rle, polygons_to_mask, trace_boundaries
from mrcnn_helpers.data.images import PIXEL_LIMIT_ENV, ImageTooLargeError, decode_mask
from mrcnn_helpers.errors import DataError, MrcnnError

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools"),
              # images.py silences PIL's warning for the images it refuses; pytest resets filters
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A synthetic dataset of 2 images of 64x64 (3 categories) and its COCO dict."""
    root = tmp_path_factory.mktemp("data")
    paths = generate_synthetic_dataset(root / "syn", num_train=2, num_val=0, image_size=(64, 64),
                                       seed=2)
    coco = json.loads(Path(paths["train_json"]).read_text())
    assert [a["image_id"] for a in coco["annotations"]][:1] == [1]
    return {"json": Path(paths["train_json"]), "images": Path(paths["train_images"]),
            "coco": coco}


def _clear(exc: BaseException, *names: str) -> str:
    """The message of a clear error: an MrcnnError of one line naming each of `names`."""
    text = str(exc)
    assert isinstance(exc, MrcnnError) and "\n" not in text, text
    for name in names:
        assert name in text, (name, text)
    return text


def _limit_memory():
    """At most 4 GiB of address space (less if the parent already has a lower hard limit)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = 4 << 30 if hard == resource.RLIM_INFINITY else min(4 << 30, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _mrcnn(*argv, env=None) -> subprocess.CompletedProcess:
    """`python -m mrcnn_helpers ARGV` in a child process limited to 4 GiB of address space."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "mrcnn_helpers", *argv], capture_output=True,
                          text=True, preexec_fn=_limit_memory, timeout=300, env=environment,
                          check=False)


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    """The child ended with exit status 2 and a single `error:` line on stderr."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# COCO annotations: one judgement for the doctor, the datasets and the TFRecord writer

def _first(data):
    return data["annotations"][0]


def _set(**fields):
    return lambda data: _first(data).update(fields)


ANNOTATION_FAULTS = {
    # fault: (edit of the COCO dict, the doctor's code, what the message / count must say)
    "polygon vertex at 1e9": (_set(segmentation=[[0, 0, 1e9, 0, 1e9, 1e9]]),
                              "invalid_segmentation", "segmentation coordinate 1e+09 outside"),
    "polygon vertex at -1e9": (_set(segmentation=[[0, 0, -1e9, 0, 5, 5]]),
                               "invalid_segmentation", "coordinate -1e+09 outside"),
    "polygon vertex at 1e308": (_set(segmentation=[[0, 0, 1e308, 0, 5, 5]]),
                                "invalid_segmentation", "outside"),
    "polygon outline of 4.8e6 px": (
        _set(segmentation=[[v for _ in range(2000) for v in (0, 0, 1200, 1200)]]),
        "invalid_segmentation", "4800000 px long, more than the 4194304 px"),
    "odd coordinate count": (_set(segmentation=[[1, 1, 20, 1, 20, 20, 5]]), "invalid_segmentation",
                             "odd number of coordinates (7)"),
    "polygon of [x, y] pairs": (_set(segmentation=[[[1, 1], [20, 1], [20, 20]]]),
                                "invalid_segmentation", "not a flat list of numbers"),
    "polygon of strings": (_set(segmentation=[["1", "1", "20", "1", "20", "20"]]),
                           "invalid_segmentation", "not a flat list of numbers"),
    "NaN vertex": (_set(segmentation=[[1, 1, float("nan"), 1, 20, 20]]), "invalid_segmentation",
                   "a NaN or infinite number in its segmentation"),
    "segmentation a string": (_set(segmentation="x"), "invalid_segmentation", "neither"),
    "RLE counts garbage": (_set(segmentation={"size": [64, 64], "counts": "!!~~garbage"}),
                           "invalid_segmentation", "not in the COCO RLE alphabet"),
    "RLE counts past the image": (_set(segmentation={"size": [64, 64], "counts": [0, 4096000]}),
                                  "invalid_segmentation", "summing to 4096000, but the 64x64"),
    "RLE counts short of the image": (_set(segmentation={"size": [64, 64], "counts": [0, 10]}),
                                      "invalid_segmentation", "summing to 10"),
    "RLE string past the image": (_set(segmentation=dict(encode_rle(np.ones((64, 64), bool)),
                                                         counts="0" + "o" * 12 + "0")),
                                  "invalid_segmentation", "RLE"),
    "RLE negative run": (_set(segmentation={"size": [64, 64], "counts": [5000, -904]}),
                         "invalid_segmentation", "negative run length"),
    "RLE counts of floats": (_set(segmentation={"size": [64, 64], "counts": [0.5, 4095.5]}),
                             "invalid_segmentation", "not a list of whole run lengths"),
    "RLE size null": (_set(segmentation={"size": None, "counts": [0, 4096]}),
                      "invalid_segmentation", "an RLE of size None"),
    "RLE size of strings": (_set(segmentation={"size": ["64", "64"], "counts": [0, 4096]}),
                            "invalid_segmentation", "an RLE of size ['64', '64']"),
    "bbox of strings": (_set(bbox=["a", "b", "c", "d"]), "invalid_bbox", "has bbox ['a', 'b'"),
    "bbox of 3 numbers": (_set(bbox=[1, 2, 3]), "invalid_bbox", "has bbox [1, 2, 3]"),
    "bbox 1e308": (_set(bbox=[1e308, 0, 5, 5]), "invalid_bbox", "with a number outside"),
    "bbox infinite": (_set(bbox=[0, 0, float("inf"), 5]), "invalid_bbox", "NaN or infinite"),
    "area a string": (_set(area="big"), "invalid_area", "has area 'big'"),
    "area NaN": (_set(area=float("nan")), "invalid_area", "has area nan"),
    "area negative": (_set(area=-4), "invalid_area", "has area -4"),
    "iscrowd 2": (_set(iscrowd=2), "invalid_iscrowd", "has iscrowd 2"),
    "iscrowd 'no'": (_set(iscrowd="no"), "invalid_iscrowd", "has iscrowd 'no'"),
    # dropped and counted
    "polygon entirely outside the image": (_set(segmentation=[[100, 100, 110, 100, 110, 110]]),
                                           "empty_mask", None),
    "no polygon of 3 points": (_set(segmentation=[[1, 1, 5, 5]]), "empty_mask", None),
    "empty RLE": (_set(segmentation={"size": [64, 64], "counts": [4096]}), "empty_mask", None),
    "bbox of zero width": (_set(bbox=[3, 3, 0, 5]), "degenerate_box", None),
    "bbox outside the image": (_set(bbox=[500, 500, 5, 5]), "box_outside_image", None),
}


def _faulty(base, tmp_path, edit) -> Path:
    data = copy.deepcopy(base["coco"])
    edit(data)
    json_file = tmp_path / "faulty.json"
    json_file.write_text(json.dumps(data))
    return json_file


def test_every_annotation_problem_has_a_probe():
    probed = {code for _, code, _ in ANNOTATION_FAULTS.values()}
    skipped_or_refused = {c for c, p in ANNOTATION_PROBLEMS.items() if p[0] == "error"}
    assert skipped_or_refused <= probed, skipped_or_refused - probed


@pytest.mark.parametrize("fault", list(ANNOTATION_FAULTS))
def test_doctor_and_training_judge_each_annotation_alike(base, tmp_path, fault):
    edit, code, message = ANNOTATION_FAULTS[fault]
    json_file = _faulty(base, tmp_path, edit)
    report = check_dataset(json_file, base["images"], workers=1)
    assert report.counts.get(code) == 1 and not report.ok, report.counts
    assert 1 in report.per_image["1"][KIND[code]]
    refused = ANNOTATION_PROBLEMS[code][3] == REFUSED
    if refused:
        assert message in report.examples[code][0]
        for read in (lambda: load_coco(json_file),
                     lambda: CocoInstanceDataset(json_file, base["images"], image_size=(64, 64)),
                     lambda: write_coco_tfrecords(json_file, base["images"], tmp_path / "r",
                                                  progress=False)):
            with pytest.raises(DataError) as info:
                read()
            _clear(info.value, str(json_file), "annotation 1 has", message, "mrcnn data check")
        assert not list(tmp_path.glob("r*"))
    else:
        dataset = CocoInstanceDataset(json_file, base["images"], image_size=(64, 64))
        assert dataset.dropped_by_problem == {code: 1} and dataset.num_dropped_annotations == 1
        result = write_coco_tfrecords(json_file, base["images"], tmp_path / "r", progress=False)
        assert result["num_dropped"] == 1
        warnings = json.loads(Path(result["warnings_json"]).read_text())
        assert warnings["1"][KIND[code]] == [1]
    # The doctor's fixed copy has no problem left and trains without a drop.
    fixed = tmp_path / "fixed"
    assert run_data_cli(["data", "check", str(json_file), "--images", str(base["images"]),
                         "--fix", str(fixed), "--workers", "1"]) == 0
    dataset = CocoInstanceDataset(fixed / "annotations" / "faulty.json", fixed / "images",
                                  image_size=(64, 64))
    assert dataset.num_dropped_annotations == 0


def test_clean_dataset_passes_the_doctor_and_trains_without_a_drop(base):
    report = check_dataset(base["json"], base["images"], workers=1)
    assert report.ok and report.num_warnings == 0
    dataset = CocoInstanceDataset(base["json"], base["images"], image_size=(64, 64))
    assert dataset.num_dropped_annotations == 0
    assert sum(dataset[i]["num_instances"] for i in range(len(dataset))) == len(
        base["coco"]["annotations"])


def test_rle_string_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    for height, width in ((1, 1), (7, 5), (64, 48), (300, 200)):
        for fill in (0.0, 0.02, 0.5, 0.98, 1.0):
            mask = rng.random((height, width)) < fill
            flat = mask.flatten(order="F")
            bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
            runs = ([0] if flat[0] else []) + np.diff(bounds).tolist()   # runs start with 0s
            assert decode_rle_counts(encode_rle(mask)["counts"]) == runs
    with pytest.raises(ValueError, match="ends inside a run"):
        decode_rle_counts("0o")
    with pytest.raises(ValueError, match="more than 64 bits"):
        decode_rle_counts("o" * 20)


CRASHERS = {
    # fault: edit of the COCO dict that made pycocotools end the process (SIGSEGV or OOM)
    "polygon vertex at 1e9": _set(segmentation=[[0, 0, 1e9, 0, 1e9, 1e9]]),
    "RLE counts past the image": _set(segmentation={"size": [64, 64], "counts": [0, 4096000]}),
}
_CHILD = """
import contextlib, io, json, sys
from mrcnn_helpers.cli import main
from mrcnn_helpers.data import CocoInstanceDataset
from mrcnn_helpers.errors import DataError
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as printed:
        status = main(argv)
    out.append([status, err.getvalue(), printed.getvalue()])
for json_file, images in json.loads(sys.argv[2]):
    try:
        CocoInstanceDataset(json_file, images, image_size=(64, 64))
        out.append([0, "", ""])
    except DataError as e:
        out.append([2, str(e), ""])
print(json.dumps(out))
"""


def test_pycocotools_crashers_end_in_one_line_not_a_signal(base, tmp_path):
    """Every input that used to kill the process (rc 139), in one child under 4 GiB."""
    commands, datasets = [], []
    for k, edit in enumerate(CRASHERS.values()):
        (tmp_path / str(k)).mkdir()
        json_file = _faulty(base, tmp_path / str(k), edit)
        commands += [["data", "check", str(json_file), "--images", str(base["images"])],
                     ["data", "to-tfrecord", str(json_file), str(base["images"]),
                      str(tmp_path / str(k) / "r")]]
        datasets.append([str(json_file), str(base["images"])])
    folder = _labelme_folder(tmp_path, [_polygon([[0, 0], [1e9, 0], [1e9, 1e9]])])
    nan = tmp_path / "nan"
    shutil.copytree(folder, nan)
    (nan / "a.json").write_text((nan / "a.json").read_text().replace("1000000000.0", "NaN"))
    commands += [["data", "convert-labelme", str(f), str(tmp_path / "o.json")]
                 for f in (folder, nan)]
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(commands),
                          json.dumps(datasets)], capture_output=True, text=True,
                         preexec_fn=_limit_memory, timeout=300, check=False,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-3000:]               # no signal, no traceback
    results = json.loads(out.stdout.strip().splitlines()[-1])
    checks, tfrecords = results[0:4:2], results[1:4:2]
    for status, err, printed in checks:                         # the doctor's FAILED
        assert status == 1 and "invalid_segmentation (1)" in printed and err == "", err
    for status, err, _ in tfrecords + results[4:6]:
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "annotation 1 has" in tfrecords[0][1] and "a.json: shapes[0]" in results[4][1]
    assert "NaN or infinite" in results[5][1]
    for (status, message, _), (json_file, _) in zip(results[6:], datasets):
        assert status == 2 and message.startswith(f"{json_file}: annotation 1 has")
    assert not list(tmp_path.glob("*/r-*")) and not (tmp_path / "o.json").exists()


def test_json_declaring_a_huge_image_is_refused(base, tmp_path):
    data = copy.deepcopy(base["coco"])
    data["images"][0].update(width=200000, height=200000)
    json_file = tmp_path / "huge.json"
    json_file.write_text(json.dumps(data))
    with pytest.raises(ImageTooLargeError) as info:
        load_coco(json_file)
    _clear(info.value, "000001.png", "200000x200000", "limit of 268435456 pixels", PIXEL_LIMIT_ENV)
    report = check_dataset(json_file)
    assert report.counts["image_too_large"] == 1


# ---------------------------------------------------------------------------------------------
# Images over the pixel limit


def _fake_png_bytes(width: int, height: int) -> bytes:
    """A grayscale PNG whose header says width x height, in a few bytes (the pixels are not
    there: readers must refuse it from the header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _fake_png(path: Path, width: int, height: int) -> Path:
    path.write_bytes(_fake_png_bytes(width, height))
    return path


def test_20000_pixel_png_is_refused_by_every_reader(base, tmp_path, monkeypatch):
    bomb = _fake_png(tmp_path / "bomb.png", 20000, 20000)
    expected = ("bomb.png", "20000x20000 (w x h) = 400000000 pixels", "268435456", PIXEL_LIMIT_ENV)
    with pytest.raises(ImageTooLargeError) as info:
        load_image(bomb)
    _clear(info.value, *expected)
    # As a dataset image (the JSON says so too): refused when the JSON is read.
    data = copy.deepcopy(base["coco"])
    data["images"][0].update(file_name=str(bomb), width=20000, height=20000)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1]
    (tmp_path / "bomb.json").write_text(json.dumps(data))
    report = check_dataset(tmp_path / "bomb.json", base["images"], workers=1)
    assert report.counts["image_too_large"] == 1
    # A JSON that lies about the size: the file is refused when its sample is read.
    data["images"][0].update(width=64, height=64)
    (tmp_path / "liar.json").write_text(json.dumps(data))
    report = check_dataset(tmp_path / "liar.json", base["images"], workers=1)
    assert report.counts["image_too_large"] == 1 and "bomb.png" in str(report.examples)
    dataset = CocoInstanceDataset(tmp_path / "liar.json", base["images"], image_size=(64, 64))
    with pytest.raises(DataError) as info:
        dataset[0]
    _clear(info.value, *expected)
    with pytest.raises(DataError) as info:
        write_coco_tfrecords(tmp_path / "liar.json", base["images"], tmp_path / "r",
                             progress=False)
    _clear(info.value, "bomb.png", "400000000 pixels")
    # Converters read sizes from headers through the same reader.
    (tmp_path / "masks" / "images").mkdir(parents=True)
    shutil.copy(bomb, tmp_path / "masks" / "images" / "a.png")
    (tmp_path / "masks" / "masks").mkdir()
    with pytest.raises(ImageTooLargeError):
        convert_mask_folder(tmp_path / "masks", tmp_path / "out.json")
    # The limit can be raised: the same file then fails only where its pixels are missing.
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "400000000")
    with pytest.raises(DataError) as info:
        load_image(bomb)
    assert not isinstance(info.value, ImageTooLargeError)
    _clear(info.value, "cannot read image", "bomb.png")
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "lots")
    with pytest.raises(DataError) as info:
        load_image(bomb)
    _clear(info.value, PIXEL_LIMIT_ENV, "'lots'", "2147483648")


def test_pixel_limit_through_the_cli(tmp_path, capsys, monkeypatch):
    bomb = _fake_png(tmp_path / "bomb.png", 20000, 20000)
    folder = tmp_path / "lm"
    folder.mkdir()
    shutil.copy(bomb, folder / "a.png")
    (folder / "a.json").write_text(json.dumps({"shapes": [], "imagePath": "a.png"}))
    line = cli_error(capsys, "data", "convert-labelme", str(folder), str(tmp_path / "o.json"))
    assert "a.png is 20000x20000 (w x h)" in line and PIXEL_LIMIT_ENV in line
    # Raised by the environment: the header passes, the pixels are never read by the converter.
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "400000000")
    assert main(["data", "convert-labelme", str(folder), str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["images"][0]["width"] == 20000


# ---------------------------------------------------------------------------------------------
# LabelMe


def _labelme_folder(tmp_path, shapes, size=(40, 30), **doc) -> Path:
    folder = tmp_path / "labelme"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", size).save(folder / "a.png")
    (folder / "a.json").write_text(json.dumps(
        {"shapes": shapes, "imagePath": "a.png", "imageWidth": size[0],
         "imageHeight": size[1], **doc}))
    return folder


def _polygon(points, **extra):
    return {"label": "thing", "points": points, "shape_type": "polygon", "group_id": None,
            **extra}


LABELME_FAULTS = {
    # fault: (shapes, what the one-line error says)
    "NaN point": ([_polygon([[1, 1], [float("nan"), 1], [5, 5]])], "NaN or infinite"),
    "infinite point": ([_polygon([[1, 1], [float("inf"), 1], [5, 5]])], "NaN or infinite"),
    "point at 1e9": ([_polygon([[1, 1], [1e9, 1], [5, 5]])], "1e+09 lies outside"),
    "rectangle corner at 1e9": ([dict(_polygon([[1, 1], [1e9, 1e9]]), shape_type="rectangle")],
                                "lies outside"),
    "string points": ([_polygon([["1", "1"], ["9", "1"], ["5", "5"]])], "pairs of numbers"),
    "ragged points": ([_polygon([[1, 1], [9], [5, 5, 5]])], "pairs of numbers"),
    "points a string": ([_polygon("1,1 2,2")], "pairs of numbers"),
    "group_id a list": ([_polygon([[1, 1], [9, 1], [5, 5]], group_id=[1])],
                        "group_id [1]; expected an integer or null"),
    "circle of radius 1e9": ([dict(_polygon([[10, 10], [10, 1e9 - 1]]), shape_type="circle")],
                             "lies outside"),
    "circle of radius 3111 from in-range points": (
        [dict(_polygon([[-1100, -1100], [1100, 1100]]), shape_type="circle")],
        "a circle of radius 3111.27 px, more than 1184"),
    "label missing": ([{"points": [[1, 1], [9, 1], [5, 5]], "shape_type": "polygon"}],
                      "label None; expected a string"),
    "shape a string": (["polygon"], "shapes[0] is not an object"),
    "mask shape of garbage": ([{"label": "thing", "points": [[1, 1], [5, 5]],
                                "shape_type": "mask", "mask": "bm90IGEgcG5n"}],
                              "cannot read image"),
}


@pytest.mark.parametrize("fault", list(LABELME_FAULTS))
def test_malformed_labelme_shapes_give_one_line(tmp_path, fault):
    shapes, expected = LABELME_FAULTS[fault]
    folder = _labelme_folder(tmp_path, shapes)
    with pytest.raises(DataError) as info:
        convert_labelme(folder, tmp_path / "out.json")
    _clear(info.value, "a.json", expected)
    assert not (tmp_path / "out.json").exists()


def test_labelme_mask_shape_over_the_pixel_limit(tmp_path):
    bomb = _fake_png(tmp_path / "bomb.png", 30000, 30000).read_bytes()
    folder = _labelme_folder(tmp_path, [{"label": "thing", "points": [[1, 1], [5, 5]],
                                         "shape_type": "mask",
                                         "mask": base64.b64encode(bomb).decode()}])
    with pytest.raises(ImageTooLargeError) as info:
        convert_labelme(folder, tmp_path / "out.json")
    _clear(info.value, "a.json: shapes[0]", "has 900000000 pixels, more than the limit")


def test_labelme_crasher_through_python_m(tmp_path):
    """The real entry point, `python -m mrcnn_helpers`, in a child limited to 4 GiB."""
    folder = _labelme_folder(tmp_path, [_polygon([[0, 0], [1e9, 0], [1e9, 1e9]]),
                                        dict(_polygon([[10, 10], [10, 1e9]]), shape_type="circle")])
    line = _one_error_line(_mrcnn("data", "convert-labelme", str(folder), str(tmp_path / "o.json")))
    assert "a.json: shapes[0]" in line and "lies outside" in line


def _object_mask(width, height):
    """An asymmetric object (an L with a stub, no hole) in a width x height stored image."""
    mask = np.zeros((height, width), bool)
    mask[3:20, 4:11] = True
    mask[14:20, 4:30] = True
    mask[16:18, 30:33] = True
    return mask


@pytest.mark.parametrize("orientation", range(1, 9))
def test_labelme_on_exif_rotated_jpegs_lands_on_the_object(tmp_path, orientation):
    """LabelMe draws on the EXIF-rotated view; the COCO annotation must cover the object in the
    stored pixels, which is what every reader of the toolkit uses."""
    width, height = 48, 32
    stored = _object_mask(width, height)
    folder = tmp_path / "lm"
    folder.mkdir()
    image = Image.fromarray(np.where(stored, 255, 0).astype(np.uint8)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(folder / "photo.jpg", exif=exif.tobytes())
    view = Image.fromarray(stored.astype(np.uint8) * 255)
    view.getexif()[0x0112] = orientation
    shown = np.asarray(ImageOps.exif_transpose(view)) > 0          # what LabelMe shows
    shapes = [{"label": "thing", "points": loop.tolist(), "group_id": 1, "shape_type": "polygon"}
              for loop in trace_boundaries(shown)]
    # A rectangle and a mask shape, drawn on the shown image too, in a second instance.
    ys, xs = np.nonzero(shown)
    box = [[int(xs.min()), int(ys.min())], [int(xs.max()) + 1, int(ys.max()) + 1]]
    crop = shown[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    png = io.BytesIO()
    Image.fromarray(crop.astype(np.uint8) * 255).save(png, format="PNG")
    shapes += [{"label": "box", "points": box, "group_id": None, "shape_type": "rectangle"},
               {"label": "masked", "points": box, "group_id": None, "shape_type": "mask",
                "mask": base64.b64encode(png.getvalue()).decode()}]
    size = Image.open(folder / "photo.jpg").size if orientation < 5 else (height, width)
    (folder / "photo.json").write_text(json.dumps(
        {"shapes": shapes, "imagePath": "photo.jpg", "imageWidth": size[0],
         "imageHeight": size[1]}))
    convert_labelme(folder, tmp_path / "out.json")
    data = json.loads((tmp_path / "out.json").read_text())
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (width, height)
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_name = {names[a["category_id"]]: a for a in data["annotations"]}
    polygon = polygons_to_mask(by_name["thing"]["segmentation"], height, width).astype(bool)
    assert np.array_equal(polygon, stored)
    x, y, w, h = by_name["thing"]["bbox"]
    sy, sx = np.nonzero(stored)
    assert [x, y, w, h] == [sx.min(), sy.min(), sx.max() + 1 - sx.min(), sy.max() + 1 - sy.min()]
    masked = by_name["masked"]["segmentation"]
    assert np.array_equal(polygons_to_mask(masked, height, width).astype(bool), stored)
    assert by_name["box"]["bbox"] == by_name["thing"]["bbox"]
    # The converted file trains on the stored pixels: the instance's box is the object's.
    dataset = CocoInstanceDataset(tmp_path / "out.json", folder, image_size=(32, 48),
                                  train=False)
    sample = dataset[0]
    assert sample["orig_size"] == (height, width) and sample["num_instances"] == 3


def test_labelme_output_over_an_input_is_refused(tmp_path):
    folder = _labelme_folder(tmp_path, [_polygon([[1, 1], [9, 1], [5, 5]])])
    before = (folder / "a.json").read_bytes()
    for target in (folder / "a.json", folder / "a.png"):
        with pytest.raises(MrcnnError) as info:
            convert_labelme(folder, target)
        _clear(info.value, str(target), "is the input")
    assert (folder / "a.json").read_bytes() == before
    # A new file inside the folder is fine, and the next run skips it.
    result = convert_labelme(folder, folder / "coco.json")
    assert result["num_annotations"] == 1
    assert convert_labelme(folder, folder / "coco.json")["skipped"]["not_labelme_files"] == 0


# ---------------------------------------------------------------------------------------------
# Outputs over inputs


def test_data_check_report_never_lands_on_the_json_or_in_the_cwd(base, tmp_path, monkeypatch):
    json_file = tmp_path / "ann.json"
    shutil.copy(base["json"], json_file)
    before = json_file.read_bytes()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for report in (json_file, tmp_path / "cwd" / ".." / "ann.json"):
        with pytest.raises(MrcnnError) as info:
            run_data_cli(["data", "check", str(json_file), "--report", str(report)])
        _clear(info.value, "--report", str(report), str(json_file))
    assert json_file.read_bytes() == before
    assert run_data_cli(["data", "check", str(json_file), "--images", str(base["images"])]) == 0
    assert list((tmp_path / "cwd").iterdir()) == []               # nothing in the cwd
    assert json.loads((tmp_path / "ann_warnings.json").read_text())["errors"] == 0


def test_subset_merge_tfrecord_and_converters_refuse_their_inputs(base, tmp_path):
    json_file = tmp_path / "ann_warnings.json"
    shutil.copy(base["json"], json_file)
    before = json_file.read_bytes()
    attempts = [
        lambda: coco_subset(json_file, json_file, ["circle"]),
        lambda: coco_merge([(json_file, base["images"])], json_file),
        # TAO's warnings file of prefix "ann" would be the input itself.
        lambda: write_coco_tfrecords(json_file, base["images"], tmp_path / "ann", progress=False),
        lambda: write_coco_tfrecords(json_file, base["images"], base["images"] / "x",
                                     progress=False),
    ]
    for attempt in attempts:
        with pytest.raises(MrcnnError) as info:
            attempt()
        _clear(info.value, "output")
    assert json_file.read_bytes() == before and not list(tmp_path.glob("ann-*"))
    # Mask folders: the output may not be a mask or an image.
    (tmp_path / "m" / "images").mkdir(parents=True)
    Image.new("RGB", (10, 8)).save(tmp_path / "m" / "images" / "a.png")
    (tmp_path / "m" / "masks" / "a").mkdir(parents=True)
    Image.new("L", (10, 8), 255).save(tmp_path / "m" / "masks" / "a" / "cat_0.png")
    for target in (tmp_path / "m" / "masks" / "a" / "cat_0.png", tmp_path / "m" / "images" / "a.png"):
        with pytest.raises(MrcnnError, match="is the input"):
            convert_mask_folder(tmp_path / "m", target)
    assert Image.open(tmp_path / "m" / "masks" / "a" / "cat_0.png").size == (10, 8)


def test_coco_subset_with_a_shared_category_name(base, tmp_path):
    data = copy.deepcopy(base["coco"])
    data["categories"][2]["name"] = "circle"                     # ids 1 and 3 both "circle"
    json_file = tmp_path / "twins.json"
    json_file.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        coco_subset(json_file, tmp_path / "out.json", ["circle"])
    _clear(info.value, "categories [1, 3] are all named 'circle'", "-c 1,3")
    result = coco_subset(json_file, tmp_path / "out.json", ["1", "3"])
    assert [(new, old) for new, _, old in result["categories"]] == [(1, 1), (2, 3)]
    kept = json.loads((tmp_path / "out.json").read_text())["annotations"]
    assert len(kept) == sum(a["category_id"] in (1, 3) for a in data["annotations"])
    with pytest.raises(DataError, match=r"categories \[1, 3\] are all named 'circle'"):
        coco_merge([(json_file, base["images"])], tmp_path / "m.json")


def test_synthetic_refuses_bad_arguments_and_foreign_folders(tmp_path, monkeypatch):
    bad = {
        "negative count": ({"num_train": -1}, "num_train = -1: must be a whole number from 0"),
        "count not a number": ({"num_val": 2.5}, "num_val = 2.5: must be a whole number"),
        "image size 0": ({"image_size": (0, 64)}, "from 32 to 4096 px"),
        "huge image size": ({"image_size": (64, 1000000)}, "from 32 to 4096 px"),
        "negative seed": ({"seed": -3}, "seed = -3"),
    }
    for case, (kwargs, expected) in bad.items():
        with pytest.raises(DataError) as info:
            generate_synthetic_dataset(tmp_path / case, **{"num_train": 1, "num_val": 0, **kwargs})
        _clear(info.value, expected)
        assert not (tmp_path / case).exists()
    user = tmp_path / "mine"
    (user / "annotations").mkdir(parents=True)
    (user / "annotations" / "instances_train.json").write_text('{"info": {"description": "x"}}')
    with pytest.raises(DataError, match="is not a synthetic dataset"):
        generate_synthetic_dataset(user, num_train=1, num_val=0, image_size=(32, 32))
    (tmp_path / "photos" / "train").mkdir(parents=True)
    (tmp_path / "photos" / "train" / "000001.png").write_bytes(b"mine")
    with pytest.raises(DataError, match="holds files but no synthetic dataset"):
        generate_synthetic_dataset(tmp_path / "photos", num_train=1, num_val=0,
                                   image_size=(32, 32))
    assert (tmp_path / "photos" / "train" / "000001.png").read_bytes() == b"mine"
    # A synthetic dataset may be written again over itself.
    generate_synthetic_dataset(tmp_path / "again", num_train=1, num_val=0, image_size=(32, 32))
    generate_synthetic_dataset(tmp_path / "again", num_train=1, num_val=0, image_size=(32, 32))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 5))
    with pytest.raises(DataError, match=r"needs about .* GiB, only 0.00 GiB free"):
        generate_synthetic_dataset(tmp_path / "full", num_train=10, num_val=0)


def test_synthetic_cli_bad_arguments_are_one_line(tmp_path, capsys):
    for argv, expected in ((["--num-train", "-5"], "num_train = -5"),
                           (["--image-size", "0", "64"], "from 32 to 4096 px"),
                           (["--image-size", "64", "100000"], "from 32 to 4096 px")):
        line = cli_error(capsys, "data", "synthetic", str(tmp_path / "s"), *argv)
        assert expected in line
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------
# TFRecords


@pytest.fixture(scope="module")
def records(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "train"
    write_coco_tfrecords(base["json"], base["images"], out, progress=False)
    path = f"{out}-00000-of-00001.tfrecord"
    return [tfr.decode_example(data) for _, data in tfr.iter_tfrecord(path)]


def _record_file(path: Path, features: dict) -> Path:
    with tfr.TFRecordWriter(path) as writer:
        writer.write(tfr.encode_example(features))
    return path


def _as_features(decoded: dict) -> dict:
    out = {}
    for key, values in decoded.items():
        kind = ("bytes" if values and isinstance(values[0], bytes) else
                "float" if values and isinstance(values[0], float) else "int")
        if key.startswith("image/object/bbox/") or key == "image/object/area":
            kind = "float"
        out[key] = (kind, list(values))
    return out


TFRECORD_FAULTS = {
    # fault: (change of the features, what the one-line error says)
    "NaN box edge": (lambda f: f["image/object/bbox/xmin"][1].__setitem__(0, float("nan")),
                     "object 0 has image/object/bbox/xmin nan"),
    "infinite box edge": (lambda f: f["image/object/bbox/ymax"][1].__setitem__(0, float("inf")),
                          "image/object/bbox/ymax inf"),
    "box edge at 1e9 (normalized)": (
        lambda f: f["image/object/bbox/xmax"][1].__setitem__(0, 1e9), "must be finite and within"),
    "area NaN": (lambda f: f["image/object/area"][1].__setitem__(0, float("nan")),
                 "image/object/area nan"),
    "is_crowd 7": (lambda f: f["image/object/is_crowd"][1].__setitem__(0, 7),
                   "image/object/is_crowd 7"),
    "height as bytes": (lambda f: f.__setitem__("image/height", ("bytes", [b"64"])),
                        "feature 'image/height' is b'64'"),
    "image bytes over the pixel limit": (
        lambda f: f.__setitem__("image/encoded", ("bytes", [_fake_png_bytes(20000, 20000)])),
        "400000000 pixels"),
    "declared size over the pixel limit": (
        lambda f: f.update({"image/height": ("int", [30000]), "image/width": ("int", [30000])}),
        "30000x30000"),
    "mask over the pixel limit": (
        lambda f: f["image/object/mask"][1].__setitem__(0, _fake_png_bytes(30000, 30000)),
        "image/object/mask 0"),
    "mask of the wrong size": (
        lambda f: f["image/object/mask"][1].__setitem__(0, _png_bytes(np.zeros((8, 8)))),
        "image/object/mask 0 is 8x8 (h x w), the image 64x64"),
}


def _png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("fault", list(TFRECORD_FAULTS))
def test_tfrecord_reader_refuses_bad_records_in_one_line(records, tmp_path, fault):
    change, expected = TFRECORD_FAULTS[fault]
    features = _as_features(records[0])
    assert len(features["image/object/class/label"][1]) > 0
    change(features)
    path = _record_file(tmp_path / "bad.tfrecord", features)
    dataset = TfRecordInstanceDataset([str(path)], categories=[
        {"id": i, "name": str(i)} for i in (1, 2, 3)], image_size=(64, 64), gt_mask_size=8)
    with pytest.raises(DataError) as info:
        dataset[0]
    _clear(info.value, "bad.tfrecord (record at byte offset 0)", expected)


def test_to_tfrecord_on_a_full_disk_leaves_nothing(base, tmp_path, monkeypatch):
    hit = _fill_disk_for(monkeypatch, ".out-00001", room=2000)
    with pytest.raises(DataError) as info:
        write_coco_tfrecords(base["json"], base["images"], tmp_path / "out", 2, progress=False)
    _clear(info.value, "out-00001-of-00002.tfrecord", "No space left on device")
    assert hit and list(tmp_path.iterdir()) == []                # no shard, no .tmp
    monkeypatch.undo()
    result = write_coco_tfrecords(base["json"], base["images"], tmp_path / "out", 2,
                                  progress=False)
    assert result["num_images"] == 2 and len(list(tmp_path.glob("out-*.tfrecord"))) == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_converter_output_on_a_full_disk_is_one_line(base, tmp_path, monkeypatch):
    (tmp_path / "old.json").write_text("old")
    _fill_disk_for(monkeypatch, ".old.json", room=100)
    with pytest.raises(DataError) as info:
        coco_subset(base["json"], tmp_path / "old.json", ["circle"])
    _clear(info.value, "old.json", "No space left on device", "unchanged")
    assert (tmp_path / "old.json").read_text() == "old" and not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# Download


@pytest.fixture()
def server():
    s = _Server()
    yield s
    s.close()


def test_full_disk_with_a_server_ignoring_range_stops_at_once(server, tmp_path, monkeypatch):
    data = os.urandom(50_000)
    server.files["zips/val2017.zip"] = data
    server.ignore_range = True
    (tmp_path / "val2017.zip.part").write_bytes(data[:1000])        # resume asked, not granted
    _fill_disk_for(monkeypatch, "val2017.zip.part", room=20_000)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(
        10**9, 10**9 - 20_000, 20_000))
    with pytest.raises(dl.DownloadError) as info:
        dl.download_file(server.url + "zips/val2017.zip", tmp_path / "val2017.zip",
                         size=len(data), progress=False, retries=3)
    _clear(info.value, "val2017.zip.part", "No space left on device",
           "more are needed", "free in", "re-run to resume")
    assert len(server.requests) == 1                              # reported once, no loop


def test_server_ignoring_range_that_keeps_dropping_gives_up(server, tmp_path):
    data = os.urandom(20_000)
    server.files["zips/val2017.zip"] = data
    server.ignore_range = True
    server.cut_after["zips/val2017.zip"] = [5000] * 100
    with pytest.raises(dl.DownloadError) as info:
        dl.download_file(server.url + "zips/val2017.zip", tmp_path / "v.zip", size=len(data),
                         progress=False, retries=3)
    _clear(info.value, "keeps closing the connection early", "re-run to resume")
    assert len(server.requests) == 5                              # 1 + 4 without progress


def test_extraction_merges_and_never_removes_user_files(tmp_path):
    archive = tmp_path / "annotations_trainval2017.zip"
    archive.write_bytes(_zip({"annotations/instances_val2017.json": b"{}",
                              "annotations/captions_val2017.json": b"[]"}))
    out = tmp_path / "coco"
    (out / "annotations").mkdir(parents=True)
    (out / "annotations" / "my_labels.json").write_text("mine")
    assert dl.extract_zip(archive, out) == ["annotations"]
    assert (out / "annotations" / "my_labels.json").read_text() == "mine"
    assert (out / "annotations" / "instances_val2017.json").read_bytes() == b"{}"
    # A different file where a member goes is refused, naming it; nothing moves.
    second = tmp_path / "other.zip"
    second.write_bytes(_zip({"annotations/my_labels.json": b"theirs", "annotations/new.json": b"1"}))
    with pytest.raises(DataError) as info:
        dl.extract_zip(second, out)
    _clear(info.value, str(out / "annotations" / "my_labels.json"), "did not create")
    assert (out / "annotations" / "my_labels.json").read_text() == "mine"
    assert not (out / "annotations" / "new.json").exists() and not dl.is_extracted("other.zip", out)


def test_extraction_on_a_full_disk_leaves_no_staging(tmp_path, monkeypatch):
    archive = tmp_path / "val2017.zip"
    archive.write_bytes(_zip({"val2017/a.jpg": os.urandom(5000)}))

    def full(self, member, path=None, pwd=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "extract", full)
    with pytest.raises(DataError) as info:
        dl.extract_zip(archive, tmp_path / "coco")
    _clear(info.value, "val2017.zip", "No space left on device")
    assert sorted(p.name for p in (tmp_path / "coco").iterdir()) == []


MANIFEST_FAULTS = {
    "size a string": ({"val": {"path": "zips/v.zip", "size": "big"}}, "size 'big'"),
    "negative size": ({"val": {"path": "zips/v.zip", "size": -1}}, "size -1"),
    "md5 a number": ({"val": {"path": "zips/v.zip", "md5": 123}}, "md5 123"),
    "path climbing out": ({"val": {"path": "../../etc/passwd"}}, "without '..'"),
    "absolute URL path": ({"val": {"path": "http://elsewhere/x.zip"}}, "relative to the base"),
    "no path": ({"val": {"size": 3}}, "needs a \"path\" string"),
    "a list": ([1, 2], "expected a non-empty object"),
    "not JSON": ("{", "cannot read manifest"),
}


@pytest.mark.parametrize("fault", list(MANIFEST_FAULTS))
def test_bad_download_manifests(tmp_path, fault):
    content, expected = MANIFEST_FAULTS[fault]
    path = tmp_path / "manifest.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError) as info:
        dl.load_manifest(path)
    _clear(info.value, "cannot read manifest", str(path), expected)


def test_bad_manifest_and_base_url_through_the_cli(tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps({"val": {"path": "v.zip", "size": "big"}}))
    line = cli_error(capsys, "data", "download-coco", str(tmp_path / "c"), "--manifest",
                     str(tmp_path / "m.json"))
    assert "size 'big'" in line
    (tmp_path / "ok.json").write_text(json.dumps({"val": {"path": "v.zip"}}))
    line = cli_error(capsys, "data", "download-coco", str(tmp_path / "c"), "--parts", "val",
                     "--base-url", "gopher://x", "--manifest", str(tmp_path / "ok.json"))
    assert "expected an http" in line
    with pytest.raises(DataError, match="expected an http"):
        dl.download_coco(tmp_path / "c", ("val",), base_url="ftp://x",
                         manifest={"val": dl.RemoteFile("v.zip", 3)})


# ---------------------------------------------------------------------------------------------
# Odds and ends


def test_decode_mask_checks_the_size_before_decoding():
    png = _png_bytes(np.ones((8, 8)) * 255)
    assert decode_mask(png, "m", size=(8, 8)).sum() == 64 * 255
    with pytest.raises(DataError, match=r"m is 8x8 \(h x w\), the image 9x8"):
        decode_mask(png, "m", size=(8, 9))
    with pytest.raises(DataError, match="expected PNG bytes"):
        decode_mask(3.5, "m")


def test_voc_index_pngs_with_impossible_values(tmp_path):
    from mrcnn_helpers.data import convert_voc

    root = tmp_path / "VOC"
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(root / "JPEGImages" / "a.jpg")
    # A 16-bit "index" PNG: values past 255 are no VOC instance (and a distinct value per pixel
    # of a large image would make one full-size mask per pixel).
    Image.fromarray((np.arange(48).reshape(6, 8) * 1000).astype(np.uint16)).save(
        root / "SegmentationObject" / "a.png")
    Image.new("L", (8, 6), 1).save(root / "SegmentationClass" / "a.png")
    with pytest.raises(DataError) as info:
        convert_voc(root, tmp_path / "out.json")
    _clear(info.value, "SegmentationObject/a.png has value 47000", "1..254")
    Image.new("L", (8, 6), 1).save(root / "SegmentationObject" / "a.png")
    Image.fromarray(np.full((6, 8), 60000, np.uint16)).save(root / "SegmentationClass" / "a.png")
    with pytest.raises(DataError) as info:
        convert_voc(root, tmp_path / "out.json")
    _clear(info.value, "SegmentationClass/a.png has class index 60000", "21 class names")
    assert not (tmp_path / "out.json").exists()


def test_deeply_nested_json_is_one_line(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DataError) as info:
        load_coco(tmp_path / "deep.json")
    _clear(info.value, "deep.json")
    folder = _labelme_folder(tmp_path, [])
    (folder / "b.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DataError, match="cannot read LabelMe file .*b.json"):
        convert_labelme(folder, tmp_path / "o.json")


def test_server_sending_more_than_expected(server, tmp_path, monkeypatch):
    data = os.urandom(30_000)
    server.files["zips/val2017.zip"] = data
    with pytest.raises(dl.DownloadError, match="announces 30000 bytes, the manifest expects 100"):
        dl.download_file(server.url + "zips/val2017.zip", tmp_path / "v.zip", size=100,
                         progress=False)
    # No size anywhere (no manifest size, no Content-Length): the body is capped all the same.
    monkeypatch.setattr(dl, "MAX_ARCHIVE_BYTES", 10_000)
    monkeypatch.setattr(dl, "_total_from", lambda response, start: (0, None))
    with pytest.raises(dl.DownloadError) as info:
        dl.download_file(server.url + "zips/val2017.zip", tmp_path / "w.zip", progress=False)
    _clear(info.value, "sends more than the 10000 bytes expected")
    assert not (tmp_path / "v.zip").exists() and not (tmp_path / "w.zip").exists()


def test_unwritable_output_folders_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MrcnnError) as info:
        dl.download_coco(tmp_path / "file", ("val",), manifest={"val": dl.RemoteFile("v.zip")})
    _clear(info.value, "download folder", "file")
    with pytest.raises(DataError) as info:
        generate_synthetic_dataset(tmp_path / "file", num_train=1, num_val=0)
    _clear(info.value, "is a file")
    assert (tmp_path / "file").read_text() == "x"


def test_images_with_hundreds_of_annotations(base, tmp_path):
    """pycocotools' area() of a list overflows past 255 RLEs: an image of 300 instances reads."""
    data = copy.deepcopy(base["coco"])
    data["annotations"] = [{"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                            "segmentation": [[k % 60, 0, k % 60 + 4, 0, k % 60 + 4, 4]],
                            "bbox": [k % 60, 0, 4, 4]} for k in range(300)]
    json_file = tmp_path / "many.json"
    json_file.write_text(json.dumps(data))
    dataset = CocoInstanceDataset(json_file, base["images"], image_size=(64, 64),
                                  max_num_instances=300)
    assert dataset.num_dropped_annotations == 0 and len(dataset._instances[1]) == 300
    assert check_dataset(json_file).counts.get("empty_mask") is None
