"""Tests of mrcnn_helpers.data: synthetic generator, COCO dataset, transforms, batching, loaders."""

import colorsys
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image, ImageDraw

from mrcnn_helpers.data import (
    CocoInstanceDataset,
    build_eval_loader,
    build_train_loader,
    collate_batch,
    crop_and_resize_mask,
    flip_boxes,
    flip_masks,
    generate_synthetic_dataset,
    load_image,
    resize_and_pad,
)
from mrcnn_helpers.data.contours import mask_iou, mask_to_segmentation, polygons_to_mask
from mrcnn_helpers.data.synthetic import _CLASS_HUES, image_rng, render_image
from mrcnn_helpers.errors import DataError

# pycocotools calls np.array(copy=False)-style __array__ on numpy 2; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


def decode_segmentation(segm, height, width):
    if isinstance(segm, list):
        return polygons_to_mask(segm, height, width)
    return mask_utils.decode(segm)


def uncompressed_rle(mask):
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def rect_poly(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


# ---------------------------------------------------------------- synthetic generator

def test_synthetic_is_deterministic(tmp_path):
    a = generate_synthetic_dataset(tmp_path / "a", num_train=5, num_val=2, image_size=(96, 128), seed=4)
    b = generate_synthetic_dataset(tmp_path / "b", num_train=5, num_val=2, image_size=(96, 128), seed=4)
    c = generate_synthetic_dataset(tmp_path / "c", num_train=5, num_val=2, image_size=(96, 128), seed=5)
    for key in ("train_json", "val_json"):
        assert Path(a[key]).read_bytes() == Path(b[key]).read_bytes()
        assert Path(a[key]).read_bytes() != Path(c[key]).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == [
        f"{i:06d}.png" for i in range(1, 6)]
    for i in range(1, 6):
        pa = np.asarray(Image.open(tmp_path / "a" / "train" / f"{i:06d}.png"))
        pb = np.asarray(Image.open(tmp_path / "b" / "train" / f"{i:06d}.png"))
        assert pa.shape == (96, 128, 3) and np.array_equal(pa, pb)
    assert a["val_json"].endswith("annotations/instances_val.json")


def test_synthetic_annotations_round_trip(tmp_path):
    """Every annotation decodes (pycocotools) to the rendered visible mask; boxes/areas match."""
    height, width, seed = 160, 192, 2
    paths = generate_synthetic_dataset(tmp_path, num_train=14, num_val=3, image_size=(height, width),
                                       seed=seed)
    for split in ("train", "val"):
        data = json.loads(Path(paths[f"{split}_json"]).read_text())
        assert [(c["id"], c["name"]) for c in data["categories"]] == [
            (1, "circle"), (2, "triangle"), (3, "square")]
        by_image = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        for index, info in enumerate(data["images"]):
            assert (info["id"], info["width"], info["height"]) == (index + 1, width, height)
            pixels, instances = render_image(image_rng(seed, split, index), height, width)
            stored = np.asarray(Image.open(f"{paths[f'{split}_images']}/{info['file_name']}"))
            assert np.array_equal(stored, pixels)
            anns = by_image.get(info["id"], [])
            assert len(anns) == len(instances)
            for ann, (label, visible) in zip(anns, instances):
                decoded = decode_segmentation(ann["segmentation"], height, width)
                assert mask_iou(decoded, visible) >= 0.97
                ys, xs = np.nonzero(visible)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                assert ann["area"] == xs.size and ann["iscrowd"] == 0 and ann["category_id"] == label


def test_synthetic_content_statistics():
    empty, kinds, sizes, occluded, counts = 0, [], [], 0, []
    for index in range(60):
        _, instances = render_image(image_rng(3, "train", index), 256, 256)
        empty += not instances
        counts.append(len(instances))
        for _, visible in instances:
            ys, xs = np.nonzero(visible)
            sizes.append(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
            kinds.append(mask_to_segmentation(visible)[1])
            box_area = sizes[-1] ** 2
            occluded += xs.size < 0.3 * box_area  # clearly not a whole convex shape
    assert empty >= 1 and max(counts) >= 5
    assert kinds.count("polygon") >= 0.9 * len(kinds)
    assert min(sizes) <= 14 and max(sizes) >= 90


def test_simple_style_is_the_easier_task(tmp_path):
    """The demo's style: solid objects in their class's hue on muted backgrounds, 20-90 px."""
    sizes, gaps = [], []
    for index in range(40):
        pixels, instances = render_image(image_rng(3, "train", index), 256, 256, "simple")
        assert len(instances) <= 5
        background = np.ones((256, 256), bool)
        for label, visible in instances:
            ys, xs = np.nonzero(visible)
            sizes.append(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
            background &= ~visible
            hue = colorsys.rgb_to_hsv(*(pixels[visible].mean(0) / 255.0))[0]
            gaps.append(min(abs(hue - _CLASS_HUES[label - 1]) % 1.0,
                            1.0 - abs(hue - _CLASS_HUES[label - 1]) % 1.0))
        objects = ~background
        if objects.any():  # objects are brighter than the background around them
            assert pixels[objects].max(1).mean() > pixels[background].max(1).mean() + 40
    assert max(gaps) < 0.1 and min(sizes) >= 14 and max(sizes) <= 95
    paths = generate_synthetic_dataset(tmp_path, num_train=2, num_val=1, image_size=(64, 64),
                                       style="simple")
    info = json.loads(Path(paths["train_json"]).read_text())["info"]
    assert info["description"].endswith("style simple")
    with pytest.raises(DataError, match="style = 'fancy': must be one of textured, simple"):
        generate_synthetic_dataset(tmp_path / "x", num_train=1, num_val=1, style="fancy")


def test_mask_to_segmentation_holes_and_parts():
    mask = np.zeros((20, 20), bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False                       # a hole: polygons cannot express it
    segm, kind = mask_to_segmentation(mask)
    assert kind == "rle" and np.array_equal(mask_utils.decode(segm), mask)
    mask[5:8, 5:8] = True
    mask[14:18, 14:19] = True                    # a second part touching the first only at a corner
    mask[12, 12] = True
    segm, kind = mask_to_segmentation(mask)
    assert kind == "polygon" and len(segm) == 3
    assert np.array_equal(polygons_to_mask(segm, 20, 20), mask)


# ---------------------------------------------------------------- transforms

def test_resize_and_pad_values():
    image = torch.full((3, 40, 60), 200, dtype=torch.uint8)
    padded, scale = resize_and_pad(image, (80, 80))
    assert padded.shape == (3, 80, 80) and padded.dtype == torch.uint8
    assert scale == pytest.approx(4 / 3)
    assert (padded[:, :53, :] == 200).all() and (padded[:, 53:, :] == 0).all()
    small, scale = resize_and_pad(torch.full((3, 100, 50), 7, dtype=torch.uint8), (40, 40))
    assert scale == pytest.approx(0.4)
    assert (small[:, :, :20] == 7).all() and (small[:, :, 20:] == 0).all()


def test_crop_and_resize_mask_rectangle_and_fractions():
    mask = np.zeros((30, 40), bool)
    mask[5:25, 10:30] = True
    assert (crop_and_resize_mask(mask, (10, 5, 30, 25), 28) == 255).all()
    # The box is twice as wide as the mask: left half full, right half empty.
    out = crop_and_resize_mask(mask, (10, 5, 50, 25), 8)
    assert (out[:, :4] == 255).all() and (out[:, 4:] == 0).all()
    # A bin half covered gives 128; pixels outside the array count as background.
    out = crop_and_resize_mask(mask, (9, 5, 11, 25), 2)
    assert (out[:, 0] == 0).all() and (out[:, 1] == 255).all()
    out = crop_and_resize_mask(mask, (9.5, 5, 10.5, 25), 1)
    assert out[0, 0] == 128
    # A crop with its origin gives the same as the full mask.
    crop = mask[3:27, 8:33]
    np.testing.assert_array_equal(crop_and_resize_mask(crop, (7.3, 4.1, 31.7, 22.9), 16, origin=(8, 3)),
                                  crop_and_resize_mask(mask, (7.3, 4.1, 31.7, 22.9), 16))
    with pytest.raises(ValueError):
        crop_and_resize_mask(mask, (10, 5, 10, 25), 4)


def test_flip_consistency():
    mask = np.zeros((30, 50), bool)
    mask[4:20, 6:12] = True                      # an asymmetric L shape
    mask[14:20, 6:30] = True
    ys, xs = np.nonzero(mask)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    flipped_box = flip_boxes(box, 50)
    torch.testing.assert_close(flip_boxes(flipped_box, 50), box)
    assert flipped_box.tolist() == [[50 - 30, 4, 50 - 6, 20]]
    flipped = mask[:, ::-1]
    fys, fxs = np.nonzero(flipped)
    assert flipped_box.tolist() == [[fxs.min(), fys.min(), fxs.max() + 1, fys.max() + 1]]
    m = torch.from_numpy(crop_and_resize_mask(mask, box[0].tolist(), 12))
    mf = torch.from_numpy(crop_and_resize_mask(flipped, flipped_box[0].tolist(), 12))
    assert torch.equal(flip_masks(m), mf) and torch.equal(flip_masks(flip_masks(m)), m)


# ---------------------------------------------------------------- hand-made COCO dataset

def _l_shape():
    mask = np.zeros((40, 60), bool)
    mask[20:36, 40:56] = True
    mask[28:36, 48:56] = False
    return mask


@pytest.fixture()
def tiny_coco(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    Image.new("RGB", (60, 40), (100, 150, 200)).save(images_dir / "rgb.png")
    Image.new("L", (30, 30), 90).save(images_dir / "gray.png")
    Image.new("RGBA", (50, 50), (10, 20, 30, 0)).save(images_dir / "rgba.png")
    sixteen = np.full((20, 100), 65535, np.uint16)
    sixteen[:, 50:] = 257 * 100
    Image.fromarray(sixteen).save(images_dir / "gray16.png")
    Image.new("P", (20, 20), 3).save(images_dir / "palette.png")

    small_rect = np.zeros((40, 60), bool)
    small_rect[30:38, 0:8] = True
    crowd = np.zeros((40, 60), bool)
    crowd[0:4, 50:60] = True
    anns = [
        {"id": 1, "image_id": 11, "category_id": 7, "segmentation": rect_poly(10, 5, 20, 20),
         "bbox": [10, 5, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 11, "category_id": 3, "segmentation": uncompressed_rle(small_rect),
         "bbox": [0, 30, 8, 8], "area": 64, "iscrowd": 0},
        {"id": 3, "image_id": 11, "category_id": 9, "segmentation": compressed_rle(_l_shape()),
         "bbox": [40, 20, 16, 16], "area": 192, "iscrowd": 0},
        {"id": 4, "image_id": 11, "category_id": 3, "segmentation": compressed_rle(crowd),
         "bbox": [50, 0, 10, 4], "area": 40, "iscrowd": 1},
    ]
    # Image 13: five squares, sides 4, 10, 2, 8, 6; with M = 3 the three largest stay.
    for k, (side, x, y) in enumerate([(4, 1, 1), (10, 7, 1), (2, 19, 1), (8, 23, 20), (6, 33, 20)]):
        anns.append({"id": 10 + k, "image_id": 13, "category_id": 9,
                     "segmentation": rect_poly(x, y, side, side), "bbox": [x, y, side, side],
                     "area": side * side, "iscrowd": 0})
    # Image 14 (scale 0.8): a 1 px wide box (0.8 px after resize: dropped) and a 5 px square.
    anns.append({"id": 20, "image_id": 14, "category_id": 3, "segmentation": rect_poly(10, 2, 1, 10),
                 "bbox": [10, 2, 1, 10], "area": 10, "iscrowd": 0})
    anns.append({"id": 21, "image_id": 14, "category_id": 7, "segmentation": rect_poly(50, 5, 5, 5),
                 "bbox": [50, 5, 5, 5], "area": 25, "iscrowd": 0})
    data = {
        "images": [{"id": 11, "file_name": "rgb.png", "width": 60, "height": 40},
                   {"id": 12, "file_name": "gray.png", "width": 30, "height": 30},
                   {"id": 13, "file_name": "rgba.png", "width": 50, "height": 50},
                   {"id": 14, "file_name": "gray16.png", "width": 100, "height": 20},
                   {"id": 15, "file_name": "palette.png", "width": 20, "height": 20}],
        "annotations": anns,
        "categories": [{"id": 9, "name": "nine"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
    }
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(data))
    return json_file, images_dir, data


def _dataset(json_file, images_dir, **kwargs):
    args = {"image_size": (80, 80), "train": True, "augment": False, "skip_crowd": True,
            "gt_mask_size": 8, "max_num_instances": 3}
    args.update(kwargs)
    return CocoInstanceDataset(json_file, images_dir, **args)


def test_coco_dataset_samples(tiny_coco):
    json_file, images_dir, _ = tiny_coco
    ds = _dataset(json_file, images_dir)
    assert len(ds) == 5
    assert ds.class_names == ["background", "three", "seven", "nine"]
    assert ds.category_ids == [3, 7, 9]
    assert ds.truncated_image_ids == [13]

    s = ds[0]
    assert s["image_id"] == 11 and s["orig_size"] == (40, 60) and s["scale"] == pytest.approx(4 / 3)
    assert s["image"].shape == (3, 80, 80) and s["image"].dtype == torch.uint8
    assert s["boxes"].shape == (3, 4) and s["masks"].shape == (3, 8, 8)
    assert s["num_instances"] == 3                      # crowd skipped
    f = 4 / 3
    torch.testing.assert_close(s["boxes"], torch.tensor(
        [[10 * f, 5 * f, 30 * f, 25 * f], [0, 30 * f, 8 * f, 38 * f], [40 * f, 20 * f, 56 * f, 36 * f]]))
    assert s["classes"].tolist() == [2, 1, 3]
    assert (s["masks"][0] == 255).all() and (s["masks"][1] == 255).all()
    l_mask = s["masks"][2]
    assert (l_mask[4:, 4:] == 0).all() and (l_mask[:4] == 255).all() and (l_mask[:, :4] == 255).all()
    assert s["image"][:, 0, 0].tolist() == [100, 150, 200] and (s["image"][:, 53:] == 0).all()

    empty = ds[1]
    assert empty["num_instances"] == 0 and not empty["boxes"].any() and not empty["classes"].any()
    assert not empty["masks"].any() and (empty["image"][:, :80, :80] == 90).all()

    capped = ds[2]
    assert capped["num_instances"] == 3
    torch.testing.assert_close(capped["boxes"] / 1.6, torch.tensor(
        [[7.0, 1, 17, 11], [23, 20, 31, 28], [33, 20, 39, 26]]))

    thin = ds[3]
    assert thin["scale"] == pytest.approx(0.8) and thin["num_instances"] == 1
    torch.testing.assert_close(thin["boxes"][0], torch.tensor([40.0, 4, 44, 8]))
    assert thin["classes"].tolist() == [2, 0, 0]
    assert ds[4]["image"].shape == (3, 80, 80)


def test_coco_dataset_crowd_and_eval_mode(tiny_coco):
    json_file, images_dir, _ = tiny_coco
    with_crowd = _dataset(json_file, images_dir, skip_crowd=False, max_num_instances=4)
    assert with_crowd[0]["num_instances"] == 4 and with_crowd[0]["classes"].tolist() == [2, 1, 3, 1]
    eval_ds = _dataset(json_file, images_dir, train=False, skip_crowd=False, max_num_instances=4)
    assert eval_ds[0]["num_instances"] == 3
    assert len(_dataset(json_file, images_dir, max_images=2)) == 2


def test_image_modes_become_rgb(tiny_coco):
    _, images_dir, _ = tiny_coco
    gray16 = load_image(str(images_dir / "gray16.png"))
    assert gray16.shape == (3, 20, 100) and gray16.dtype == torch.uint8
    assert (gray16[:, :, :50] == 255).all() and (gray16[:, :, 50:] == 100).all()
    assert (load_image(str(images_dir / "gray.png")) == 90).all()
    assert load_image(str(images_dir / "rgba.png"))[:, 0, 0].tolist() == [10, 20, 30]
    assert load_image(str(images_dir / "palette.png")).shape == (3, 20, 20)


def test_bad_inputs_give_clear_errors(tiny_coco, tmp_path):
    json_file, images_dir, data = tiny_coco
    with pytest.raises(DataError, match="nope.json"):
        _dataset(tmp_path / "nope.json", images_dir)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"bad.json.*line 1"):
        _dataset(bad, images_dir)
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(DataError, match=r"bad.json.*annotations"):
        _dataset(bad, images_dir)
    broken = dict(data, annotations=data["annotations"] + [dict(data["annotations"][0], id=99,
                                                                 category_id=5)])
    bad.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"annotation 99 has category_id 5"):
        _dataset(bad, images_dir)
    # An image whose size differs from the JSON's would misplace every mask.
    images = [dict(img, width=21) if img["id"] == 15 else img for img in data["images"]]
    bad.write_text(json.dumps(dict(data, images=images)))
    with pytest.raises(DataError, match=r"palette.png \(image id 15\) is 20x20.*says 20x21"):
        _dataset(bad, images_dir)[4]
    # A wrong image directory is reported at construction, naming the path.
    with pytest.raises(DataError, match=r"elsewhere.*rgb.png"):
        _dataset(json_file, tmp_path / "elsewhere")
    # A missing or corrupt image later on names the file and the image id.
    (images_dir / "rgba.png").unlink()
    (images_dir / "gray.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = _dataset(json_file, images_dir)
    with pytest.raises(DataError, match=r"gray.png \(image id 12\)"):
        ds[1]
    with pytest.raises(DataError, match=r"not found.*rgba.png \(image id 13\)"):
        ds[2]


# ---------------------------------------------------------------- augmentation

def _white_shapes_dataset(tmp_path):
    """Images with white shapes on black, so the augmented image itself shows the true masks."""
    images, anns = [], []
    for image_id, (width, height) in enumerate([(96, 64), (64, 96), (80, 80)], start=1):
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        shapes = [[(8, 6), (40, 12), (14, 44)], [(50, 30), (62, 30), (62, 60), (56, 60), (56, 40)]]
        for k, poly in enumerate(shapes):
            single = Image.new("L", (width, height), 0)
            ImageDraw.Draw(single).polygon(poly, fill=1)
            draw.polygon(poly, fill=255)
            segm, _ = mask_to_segmentation(np.asarray(single, bool))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1 + k,
                         "segmentation": segm, "area": int(np.asarray(single).sum()), "iscrowd": 0})
        canvas.convert("RGB").save(tmp_path / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (tmp_path / "shapes.json").write_text(json.dumps(data))
    return tmp_path / "shapes.json"


def _paste(mask, box, height, width):
    """Nearest-neighbour paste of an S x S box-relative mask into an image of (height, width)."""
    out = np.zeros((height, width), bool)
    x1, y1, x2, y2 = box.tolist()
    size = mask.shape[-1]
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    inside = (xs > x1) & (xs < x2) & (ys > y1) & (ys < y2)
    u = np.clip(((xs - x1) / (x2 - x1) * size).astype(int), 0, size - 1)
    v = np.clip(((ys - y1) / (y2 - y1) * size).astype(int), 0, size - 1)
    out[inside] = mask.numpy()[v[inside], u[inside]] > 127
    return out


def test_augmentation_keeps_boxes_and_masks_consistent(tmp_path):
    json_file = _white_shapes_dataset(tmp_path)
    ds = CocoInstanceDataset(json_file, tmp_path, image_size=(64, 64), train=True, augment=True,
                             gt_mask_size=28, max_num_instances=4, scale_range=(0.7, 1.6))
    scales = set()
    for seed in range(12):
        torch.manual_seed(seed)
        for index in range(len(ds)):
            s = ds[index]
            scales.add(round(s["scale"], 3))
            truth = s["image"][0].numpy() > 127
            pasted = np.zeros_like(truth)
            for k in range(s["num_instances"]):
                pasted |= _paste(s["masks"][k], s["boxes"][k], 64, 64)
            assert mask_iou(pasted, truth) > 0.85, (seed, index)
            if s["num_instances"]:
                # The boxes' hull lies between the extent of the clearly-inside pixels and that of
                # all touched pixels (thin tips fade under antialiased resizing).
                boxes = s["boxes"][:s["num_instances"]].numpy()
                hull = np.array([boxes[:, 0].min(), boxes[:, 1].min(), -boxes[:, 2].max(),
                                 -boxes[:, 3].max()])
                ys, xs = np.nonzero(truth)
                inner = np.array([xs.min(), ys.min(), -(xs.max() + 1), -(ys.max() + 1)])
                ys, xs = np.nonzero(s["image"][0].numpy() > 0)
                outer = np.array([xs.min(), ys.min(), -(xs.max() + 1), -(ys.max() + 1)])
                assert (hull <= inner + 1).all() and (hull >= outer - 1).all(), (seed, index)
    assert len(scales) > 10


# ---------------------------------------------------------------- batching and loaders

@pytest.fixture(scope="module")
def synthetic_small(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_train=10, num_val=5,
                                      image_size=(96, 96), seed=1)


def _spec(paths, **data_overrides):
    data = {"image_size": (96, 96), "augment_input_data": True, "eval_samples": 0,
            "training_file_pattern": "", "validation_file_pattern": "", "num_classes": 4,
            "val_json_file": paths["val_json"], "val_image_dir": paths["val_images"],
            "train_json_file": paths["train_json"], "train_image_dir": paths["train_images"],
            "skip_crowd_during_training": True, "max_num_instances": 10, "n_workers": 0,
            "aug_scale_min": 0.8, "aug_scale_max": 1.25}
    data.update(data_overrides)
    return SimpleNamespace(data_config=SimpleNamespace(**data),
                           maskrcnn_config=SimpleNamespace(gt_mask_size=28),
                           train_batch_size=2, eval_batch_size=3, seed=5)


def test_collate_shapes(synthetic_small):
    batch = next(iter(build_train_loader(_spec(synthetic_small))))
    assert batch["image"].shape == (2, 3, 96, 96) and batch["image"].dtype == torch.uint8
    assert batch["boxes"].shape == (2, 10, 4) and batch["boxes"].dtype == torch.float32
    assert batch["classes"].shape == (2, 10) and batch["classes"].dtype == torch.int64
    assert batch["masks"].shape == (2, 10, 28, 28) and batch["masks"].dtype == torch.uint8
    for key in ("num_instances", "image_id", "scale"):
        assert batch[key].shape == (2,)
    assert batch["orig_size"] == [(96, 96), (96, 96)]
    for b in range(2):  # padding rows are empty, real rows have labels
        n = int(batch["num_instances"][b])
        assert (batch["classes"][b, :n] > 0).all() and not batch["classes"][b, n:].any()
    with pytest.raises(ValueError):
        collate_batch([])


def _epochs(sampler, count):
    """The first `count` epochs of a streaming sampler's indices, one list per epoch."""
    stream = iter(sampler)
    return [list(itertools.islice(stream, len(sampler))) for _ in range(count)]


def test_train_loader_shards_and_reshuffles(synthetic_small):
    spec = _spec(synthetic_small, augment_input_data=False)
    ids = []
    for rank in range(2):
        loader = build_train_loader(spec, rank=rank, world_size=2)
        assert len(loader) == 2                        # 5 per rank, 2 full batches of 2
        ids.append([int(i) for batch in itertools.islice(loader, len(loader))
                    for i in batch["image_id"]])
        assert len(ids[-1]) == 4
    assert not set(ids[0]) & set(ids[1])
    shards = [_epochs(build_train_loader(spec, rank=r, world_size=2).sampler, 1)[0]
              for r in range(2)]
    assert len(set(shards[0] + shards[1])) == 8 and not set(shards[0]) & set(shards[1])
    single = build_train_loader(spec)
    first, second = _epochs(single.sampler, 2)     # the stream reshuffles every epoch
    assert sorted(first) == list(range(10)) and first != second
    assert _epochs(build_train_loader(spec).sampler, 1)[0] == first  # seeded from spec.seed
    resumed = build_train_loader(spec).sampler
    resumed.set_epoch(1)                           # a resume at epoch 1 sees epoch 1's order
    assert _epochs(resumed, 1)[0] == second


def test_eval_loader_caps_and_orders(synthetic_small):
    loader = build_eval_loader(_spec(synthetic_small, eval_samples=4, n_workers=1))
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [3, 1]
    assert [int(i) for b in batches for i in b["image_id"]] == [1, 2, 3, 4]
    assert len(build_eval_loader(_spec(synthetic_small, eval_samples=4), max_images=2).dataset) == 2
    assert len(build_eval_loader(_spec(synthetic_small)).dataset) == 5


def test_loader_config_errors(synthetic_small):
    with pytest.raises(DataError, match="TFRecord"):
        build_train_loader(_spec(synthetic_small, train_json_file="",
                                 training_file_pattern="data/train-*.tfrecord"))
    with pytest.raises(DataError, match="train_json_file is empty"):
        build_train_loader(_spec(synthetic_small, train_json_file=""))
    with pytest.raises(DataError, match="num_classes = 3"):
        build_eval_loader(_spec(synthetic_small, num_classes=3))
