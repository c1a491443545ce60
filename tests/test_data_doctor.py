"""The dataset doctor: every planted defect is found and counted, --fix writes a copy that passes,
the original is never touched, and training refuses datasets the pipeline cannot trust."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_data_cli
from PIL import Image

from mrcnn_helpers.data import (
    CocoInstanceDataset,
    check_dataset,
    fix_dataset,
    generate_synthetic_dataset,
)
from mrcnn_helpers.data.doctor import PROBLEMS
from mrcnn_helpers.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


_cli = run_data_cli


def _tree_digest(folder):
    """{relative path: sha256} of every file under folder (links followed)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def _rect(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture()
def sick(tmp_path):
    """A small synthetic dataset with one of each defect planted (see EXPECTED)."""
    paths = generate_synthetic_dataset(tmp_path / "clean", num_train=6, num_val=0,
                                       image_size=(64, 80), seed=3)
    data = json.loads(Path(paths["train_json"]).read_text())
    images_dir = Path(paths["train_images"])
    anns = data["annotations"]
    assert len(data["images"]) == 6 and len(anns) >= 8
    # Image files: one missing, one truncated, one of the wrong size, one empty image.
    data["images"].append({"id": 7, "file_name": "missing.png", "width": 80, "height": 64})
    png = (images_dir / "000001.png").read_bytes()
    (images_dir / "truncated.png").write_bytes(png[:len(png) // 2])
    data["images"].append({"id": 8, "file_name": "truncated.png", "width": 80, "height": 64})
    Image.new("RGB", (81, 64)).save(images_dir / "wide.png")
    data["images"].append({"id": 9, "file_name": "wide.png", "width": 80, "height": 64})
    Image.new("RGB", (80, 64), (40, 50, 60)).save(images_dir / "blank.png")
    data["images"].append({"id": 10, "file_name": "blank.png", "width": 80, "height": 64})
    data["images"].append({"id": 3, "file_name": "blank.png", "width": 80, "height": 64})  # dup id
    # Annotations on image 7 and 8 go with their images (not separately reported).
    base = {"iscrowd": 0, "image_id": 1, "category_id": 1}
    planted = [
        dict(base, id=101, image_id=7, segmentation=_rect(1, 1, 5, 5), bbox=[1, 1, 5, 5], area=25),
        dict(base, id=102, segmentation=_rect(10, 10, 6, 6), bbox=[10, 10, 0, 6], area=36),
        dict(base, id=103, segmentation=_rect(10, 10, 6, 6), bbox=[500, 500, 6, 6], area=36),
        dict(base, id=104, segmentation=_rect(70, 50, 10, 14), bbox=[70, 50, 12, 16], area=140),
        dict(base, id=105, segmentation=_rect(2, 40, 6, 6) + [[1, 1, 2, 2]], bbox=[2, 40, 6, 6],
             area=36),
        dict(base, id=106, segmentation=[[3, 3, 4, 4]], bbox=[3, 3, 1, 1], area=1),
        dict(base, id=107, segmentation=_rect(20, 20, 20, 20), bbox=[20, 20, 5, 5], area=400),
        dict(base, id=102, segmentation=_rect(30, 5, 4, 4), bbox=[30, 5, 4, 4], area=16),  # dup
        dict(base, id=108, image_id=999, segmentation=_rect(1, 1, 4, 4), bbox=[1, 1, 4, 4]),
        dict(base, id=109, category_id=77, segmentation=_rect(1, 1, 4, 4), bbox=[1, 1, 4, 4]),
        dict(base, id=110, category_id=0, segmentation=_rect(40, 2, 8, 8), bbox=[40, 2, 8, 8]),
        dict(base, id=111, segmentation={"size": [10, 10], "counts": [0, 100]}, bbox=[0, 0, 9, 9]),
        {"id": 112, "image_id": 2, "category_id": 2, "segmentation": _rect(50, 30, 7, 7),
         "iscrowd": 0},
    ]
    anns.extend(planted)
    data["categories"].append({"id": 0, "name": "zero"})
    json_file = tmp_path / "sick.json"
    json_file.write_text(json.dumps(data))
    return json_file, images_dir, data


EXPECTED = {
    "missing_image": 1, "unreadable_image": 1, "image_size_mismatch": 1, "duplicate_image_id": 1,
    "duplicate_annotation_id": 1, "unknown_image": 1, "unknown_category": 1,
    "category_id_zero": 1, "invalid_segmentation": 1, "empty_mask": 1, "degenerate_box": 1,
    "box_outside_image": 1, "box_partly_outside": 1, "polygon_too_few_points": 2,
    "missing_bbox": 1, "mask_outside_box": 1,
}


def test_doctor_finds_every_planted_defect(sick):
    json_file, images_dir, _ = sick
    report = check_dataset(json_file, images_dir, workers=2)
    empty = report.counts.pop("empty_image")
    assert report.counts == EXPECTED
    assert empty >= 1 and any("blank.png" in e for e in report.examples["empty_image"])
    assert report.num_errors == sum(n for c, n in EXPECTED.items() if PROBLEMS[c][0] == "error")
    assert report.num_warnings == 5 and not report.ok
    ex = report.examples
    assert "missing.png" in ex["missing_image"][0] and "truncated.png" in ex["unreadable_image"][0]
    assert "is 64x81 (h x w), the JSON says 64x80" in ex["image_size_mismatch"][0]
    assert "annotation 108" in ex["unknown_image"][0]
    assert "category_id 77 not in [0, 1, 2, 3]" in ex["unknown_category"][0]
    assert "annotation id 102 used again by annotations[" in ex["duplicate_annotation_id"][0]
    assert "annotation 106" in ex["empty_mask"][0] and "annotation 111" in ex["invalid_segmentation"][0]
    # TAO's per-image form: annotation ids with box problems and with mask problems.
    assert report.per_image["1"]["box"] == [102, 103, 104]
    assert report.per_image["1"]["mask"] == [105, 106, 107, 111]
    assert report.per_image["2"] == {"box": [112], "mask": []}
    text = report.format()
    assert "FAILED" in text and "box_outside_image (1)" in text and "--fix" in text
    saved = json.loads(Path(report.write_json(json_file.parent / "r.json")).read_text())
    assert saved["errors"] == report.num_errors and saved["problems"]["missing_image"]["count"] == 1
    assert saved["problems"]["category_id_zero"]["severity"] == "error"


def test_fix_writes_a_copy_that_passes(sick, tmp_path):
    json_file, images_dir, data = sick  # data: the JSON as planted
    before_json, before_images = json_file.read_bytes(), _tree_digest(images_dir)
    out = tmp_path / "fixed"
    assert _cli(["data", "check", str(json_file), "--images", str(images_dir), "--workers", "2",
                 "--report", str(tmp_path / "rep.json")]) == 1
    assert json.loads((tmp_path / "rep.json").read_text())["problems"]["empty_mask"]["count"] == 1
    assert _cli(["data", "check", str(json_file), "--images", str(images_dir), "--fix", str(out)]) == 0
    assert json_file.read_bytes() == before_json and _tree_digest(images_dir) == before_images
    assert (out / "sick_warnings.json").is_file()

    fixed_json = out / "annotations" / "sick.json"
    again = check_dataset(fixed_json, out / "images")
    assert again.ok and again.num_warnings == 0 and set(again.counts) <= {"empty_image"}
    fixed = json.loads(fixed_json.read_text())
    ids = [img["id"] for img in fixed["images"]]
    assert ids == [1, 2, 3, 4, 5, 6, 10]                     # bad files and the duplicate dropped
    assert os.path.islink(out / "images" / "000001.png")
    assert {c["id"]: c["name"] for c in fixed["categories"]}[4] == "zero"   # 0 -> max id + 1
    anns = {a["id"]: a for a in fixed["annotations"]}
    assert 101 not in anns and 106 not in anns and 108 not in anns and 109 not in anns
    assert 111 not in anns and anns[110]["category_id"] == 4
    assert anns[102]["bbox"] == [10, 10, 6, 6]               # degenerate: the mask's box
    assert anns[103]["bbox"] == [10, 10, 6, 6]               # outside: the mask's box
    assert anns[104]["bbox"] == [70, 50, 10, 14]             # clipped to the image
    assert anns[105]["segmentation"] == _rect(2, 40, 6, 6)   # short polygon removed
    assert anns[107]["bbox"] == [20, 20, 20, 20]             # grown to cover the mask
    assert anns[112]["bbox"] == [50, 30, 7, 7] and anns[112]["area"] == 49
    renumbered = [a for a in fixed["annotations"] if a["segmentation"] == _rect(30, 5, 4, 4)]
    assert len(renumbered) == 1 and renumbered[0]["id"] not in {a["id"] for a in data["annotations"]}
    # The fixed copy trains: every sample reads.
    ds = CocoInstanceDataset(fixed_json, out / "images", image_size=(64, 80), gt_mask_size=8,
                             max_num_instances=20)
    assert sum(ds[i]["num_instances"] for i in range(len(ds))) == sum(
        1 for a in fixed["annotations"])


def test_fix_refuses_unsafe_outputs(sick, tmp_path):
    json_file, images_dir, _ = sick
    with pytest.raises(DataError, match="inside the image folder"):
        fix_dataset(json_file, images_dir, images_dir / "fixed")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(DataError, match="not an empty folder"):
        fix_dataset(json_file, images_dir, tmp_path / "busy")
    with pytest.raises(DataError, match="--fix needs --images"):
        _cli(["data", "check", str(json_file), "--fix", str(tmp_path / "new")])


def test_clean_dataset_and_json_only_check(tmp_path):
    paths = generate_synthetic_dataset(tmp_path, num_train=5, num_val=0, image_size=(64, 64), seed=1)
    report = check_dataset(paths["train_json"], paths["train_images"], workers=1)
    assert report.ok and report.num_warnings == 0 and set(report.counts) <= {"empty_image"}
    assert "OK: 0 errors, 0 warnings" in report.format()
    json_only = check_dataset(paths["train_json"])
    assert json_only.ok and json_only.image_dir is None and "not checked" in json_only.format()
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="not a COCO instances file"):
        check_dataset(tmp_path / "list.json")


def test_training_refuses_duplicate_ids_with_the_doctors_advice(sick, tmp_path):
    _, images_dir, data = sick
    clean = dict(data)
    clean["images"] = data["images"][:6]
    clean["annotations"] = [a for a in data["annotations"] if a["id"] < 100]
    clean["categories"] = [c for c in data["categories"] if c["id"] > 0]
    dup = dict(clean, annotations=clean["annotations"] + [dict(clean["annotations"][0])])
    (tmp_path / "dup.json").write_text(json.dumps(dup))
    with pytest.raises(DataError, match=r"duplicate id.*annotations.*mrcnn data check"):
        CocoInstanceDataset(tmp_path / "dup.json", images_dir)
    dup = dict(clean, images=clean["images"] + [dict(clean["images"][0], file_name="x.png")])
    (tmp_path / "dup.json").write_text(json.dumps(dup))
    with pytest.raises(DataError, match=r"1 duplicate id\(s\) in 'images' \(e.g. \[1\]\)"):
        CocoInstanceDataset(tmp_path / "dup.json", images_dir)
    # Corrupt images are named with the advice when read; skippable defects are counted.
    bad = dict(clean, images=clean["images"] + [{"id": 8, "file_name": "truncated.png",
                                                 "width": 80, "height": 64}],
               annotations=clean["annotations"] + [
                   {"id": 200, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 2, 2]],
                    "bbox": [1, 1, 1, 1], "iscrowd": 0}])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    ds = CocoInstanceDataset(tmp_path / "bad.json", images_dir, image_size=(64, 80))
    assert ds.num_dropped_annotations == 1
    with pytest.raises(DataError, match=r"truncated.png \(image id 8\).*mrcnn data check"):
        ds[len(ds) - 1]
    assert np.array_equal(ds[0]["image"].shape, (3, 64, 80))
