"""TFRecord framing, tf.train.Example encoding, COCO -> TFRecord -> sample round trips, loaders."""

import argparse
import io
import itertools
import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from mrcnn_helpers.data import (
    CocoInstanceDataset,
    TfRecordInstanceDataset,
    build_eval_loader,
    build_train_loader,
    generate_synthetic_dataset,
    write_coco_tfrecords,
)
from mrcnn_helpers.data import tfrecord as tfr
from mrcnn_helpers.data.coco import load_coco
from mrcnn_helpers.data.commands import add_data_commands
from mrcnn_helpers.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


# ------------------------------------------------------------------------ CRC32C and framing

def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """Bit-by-bit CRC32C (reflected polynomial 0x82F63B78): the definition, for comparison."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_values():
    # RFC 3720 (iSCSI) B.4 test vectors and the usual check value.
    assert tfr.crc32c(b"123456789") == 0xE3069283
    assert tfr.crc32c(bytes(32)) == 0x8A9136AA
    assert tfr.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tfr.crc32c(bytes(range(32))) == 0x46DD794E
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert crc32c_reference(data) == tfr.crc32c(data)
    assert crc32c_reference(data[1000:], crc32c_reference(data[:1000])) == tfr.crc32c(data)
    crc = tfr.crc32c(b"123456789")
    assert tfr.masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_framing_and_corruption(tmp_path):
    path = tmp_path / "x.tfrecord"
    payloads = [b"first", b"", b"third record" * 100]
    with tfr.TFRecordWriter(path) as writer:
        for p in payloads:
            writer.write(p)
    raw = path.read_bytes()
    assert len(raw) == sum(16 + len(p) for p in payloads)
    assert struct.unpack("<Q", raw[:8])[0] == 5
    assert struct.unpack("<I", raw[8:12])[0] == tfr.masked_crc32c(raw[:8])
    assert struct.unpack("<I", raw[17:21])[0] == tfr.masked_crc32c(b"first")
    index = tfr.index_tfrecord(path)
    assert index == [(0, 5), (21, 0), (37, 1200)]
    assert [d for _, d in tfr.iter_tfrecord(path)] == payloads

    damaged = bytearray(raw)
    damaged[37 + 12 + 50] ^= 0x01                        # one bit of record 3's data
    (tmp_path / "bad.tfrecord").write_bytes(bytes(damaged))
    with pytest.raises(tfr.RecordCorruptError, match=r"bad.tfrecord: record at byte offset 37 .*CRC"):
        list(tfr.iter_tfrecord(tmp_path / "bad.tfrecord"))
    damaged = bytearray(raw)
    damaged[22] ^= 0x01                                  # record 2's length
    (tmp_path / "bad.tfrecord").write_bytes(bytes(damaged))
    with pytest.raises(tfr.RecordCorruptError, match="offset 21 has a corrupt length"):
        tfr.index_tfrecord(tmp_path / "bad.tfrecord")
    (tmp_path / "short.tfrecord").write_bytes(raw[:-10])
    with pytest.raises(DataError, match=r"short.tfrecord: record at byte offset 37 claims 1200 bytes"):
        tfr.index_tfrecord(tmp_path / "short.tfrecord")
    # A writer interrupted by an exception leaves nothing that looks like a shard.
    with pytest.raises(RuntimeError), tfr.TFRecordWriter(tmp_path / "partial.tfrecord") as writer:
        writer.write(b"data")
        raise RuntimeError("killed")
    assert not list(tmp_path.glob("partial*"))


def test_example_wire_format():
    # Hand-encoded tf.train.Example {"a": Int64List [1]}: Example.features (1) > Features.feature
    # map entry (1) > key (1) "a", value (2) > Feature.int64_list (3) > packed value (1) [1].
    assert tfr.encode_example({"a": [1]}) == bytes.fromhex("0a0c0a0a0a016112051a030a0101")
    data = tfr.encode_example({"b": [b"x", "é"], "f": [0.5, 1.25], "i": [3, -4], "e": ("float", [])})
    assert tfr.decode_example(data) == {"b": [b"x", "é".encode()], "f": [0.5, 1.25], "i": [3, -4],
                                        "e": []}
    assert tfr.decode_example(tfr.encode_example({"v": 7}))["v"] == [7]
    with pytest.raises(DataError, match="rec 9: not a tf.train.Example"):
        tfr.decode_example(b"\xff\xff\xff", "rec 9")
    with pytest.raises(ValueError, match="needs a kind"):
        tfr.encode_example({"x": []})


# ------------------------------------------------------------------ COCO -> TFRecord -> sample

def _l_shape(height, width):
    mask = np.zeros((height, width), np.uint8)
    mask[20:40, 30:50] = 1
    mask[28:34, 36:44] = 0                               # a hole: RLE
    return mask


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """Synthetic shapes plus what real data has: fractional polygons, RLE with holes, crowd,
    an image with more instances than max_num_instances, a dropped degenerate annotation."""
    root = tmp_path_factory.mktemp("tfr")
    paths = generate_synthetic_dataset(root, num_train=7, num_val=3, image_size=(72, 96), seed=5)
    data = json.loads(Path(paths["train_json"]).read_text())
    rng = np.random.default_rng(0)
    for ann in data["annotations"][::2]:
        if isinstance(ann["segmentation"], list):
            ann["segmentation"] = [[round(v + rng.uniform(-0.4, 0.4), 2) for v in p]
                                   for p in ann["segmentation"]]
            xs = [v for p in ann["segmentation"] for v in p[0::2]]
            ys = [v for p in ann["segmentation"] for v in p[1::2]]
            ann["bbox"] = [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2),
                           round(max(ys) - min(ys), 2)]
    rle = mask_utils.encode(np.asfortranarray(_l_shape(72, 96)))
    extra = [{"segmentation": {"size": [72, 96], "counts": rle["counts"].decode()},
              "bbox": [30, 20, 20, 20], "area": 352, "iscrowd": 0},
             {"segmentation": [[0, 0, 30, 0, 30, 10, 0, 10]], "bbox": [0, 0, 30, 10],
              "area": 300, "iscrowd": 1},
             {"segmentation": [[5, 5, 6, 6]], "bbox": [5, 5, 1, 1], "area": 1, "iscrowd": 0}]
    extra += [{"segmentation": [[x, 60, x + 4, 60, x + 4, 64, x, 64]], "bbox": [x, 60, 4, 4],
               "area": 16, "iscrowd": 0} for x in range(50, 90, 6)]
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for k, ann in enumerate(extra):
        data["annotations"].append(dict(ann, id=next_id + k, image_id=2, category_id=1 + k % 3))
    json_file = root / "train.json"
    json_file.write_text(json.dumps(data))
    result = write_coco_tfrecords(json_file, paths["train_images"], root / "rec" / "train", 3,
                                  progress=False)
    return SimpleNamespace(root=root, json=json_file, images=paths["train_images"], paths=paths,
                           result=result, data=data)


def test_writer_schema(coco_set):
    r = coco_set.result
    assert [os.path.basename(f) for f in r["files"]] == [
        f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert r["num_images"] == 7 and r["num_dropped"] == 1
    assert json.loads(Path(r["warnings_json"]).read_text()) == {
        "2": {"box": [], "mask": [coco_set.data["annotations"][-8]["id"]]}}
    # Image k of the id order goes to shard k mod 3.
    records = [[tfr.decode_example(d) for _, d in tfr.iter_tfrecord(f)] for f in r["files"]]
    assert [[int(e["image/source_id"][0]) for e in shard] for shard in records] == [
        [1, 4, 7], [2, 5], [3, 6]]
    coco = load_coco(coco_set.json)
    ex = records[1][0]                                   # image 2
    info = coco.imgs[2]
    assert ex["image/encoded"][0] == (Path(coco_set.images) / info["file_name"]).read_bytes()
    assert ex["image/format"] == [b"png"] and ex["image/filename"] == [info["file_name"].encode()]
    assert ex["image/height"] == [72] and ex["image/width"] == [96]
    anns = [a for a in coco.imgToAnns[2] if a["area"] > 1]
    assert len(ex["image/object/class/label"]) == len(anns)
    assert ex["image/object/class/label"] == [a["category_id"] for a in anns]
    names = {c["id"]: c["name"].encode() for c in coco.dataset["categories"]}
    assert ex["image/object/class/text"] == [names[a["category_id"]] for a in anns]
    assert ex["image/object/is_crowd"] == [a["iscrowd"] for a in anns]
    for k, ann in enumerate(anns):
        x, y, w, h = ann["bbox"]
        np.testing.assert_allclose([ex[f"image/object/bbox/{n}"][k] for n in
                                    ("xmin", "ymin", "xmax", "ymax")],
                                   [max(0, x) / 96, max(0, y) / 72, min(96, x + w) / 96,
                                    min(72, y + h) / 72],
                                   rtol=1e-6)
        with Image.open(io.BytesIO(ex["image/object/mask"][k])) as im:
            assert im.mode == "L" and im.size == (96, 72)
            assert np.array_equal(np.asarray(im), coco.annToMask(ann))


def _assert_same_sample(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("train,augment", [(True, False), (True, True), (False, False)])
def test_round_trip_gives_identical_samples(coco_set, train, augment):
    opts = {"image_size": (80, 80), "train": train, "augment": augment, "skip_crowd": False,
            "gt_mask_size": 16, "max_num_instances": 6}
    ref = CocoInstanceDataset(coco_set.json, coco_set.images, **opts)
    rec = TfRecordInstanceDataset(str(coco_set.root / "rec" / "train*.tfrecord"),
                                  categories=ref.coco.dataset["categories"], **opts)
    assert len(rec) == len(ref) == 7 and rec.class_names == ref.class_names
    assert 2 in ref.truncated_image_ids
    seen = 0
    for index in range(len(rec)):
        torch.manual_seed(index)
        got = rec[index]
        torch.manual_seed(index)
        want = ref[ref.image_ids.index(got["image_id"])]
        _assert_same_sample(want, got)                   # every box, mask, label: exactly
        seen += got["num_instances"]
    assert seen > 20


def test_categories_from_records_and_errors(coco_set, tmp_path):
    files = coco_set.result["files"]
    scanned = TfRecordInstanceDataset(files, image_size=(80, 80))
    assert scanned.category_ids == [1, 2, 3]
    assert scanned.class_names == ["background", "circle", "triangle", "square"]
    ds = TfRecordInstanceDataset(files, categories=[{"id": 9, "name": "x"}], image_size=(80, 80))
    with pytest.raises(DataError, match=r"object 0 has image/object/class/label \d, not one of"):
        [ds[i] for i in range(len(ds))]
    other = load_coco(coco_set.paths["val_json"])        # image ids 1..3 only
    ds = TfRecordInstanceDataset(files, categories=other.dataset["categories"], coco=other,
                                 image_size=(80, 80))
    with pytest.raises(DataError, match=r"train-00000-of-00003.tfrecord \(record at byte offset "
                                        r"\d+\): image id 4 is not in the ground truth"):
        ds[1]
    # A damaged shard names the file and the record.
    raw = bytearray(Path(files[1]).read_bytes())
    offset = tfr.index_tfrecord(files[1])[1][0]
    raw[offset + 40] ^= 0xFF
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes(bytes(raw))
    ds = TfRecordInstanceDataset([str(bad)], categories=other.dataset["categories"],
                                 image_size=(80, 80))
    ds[0]
    with pytest.raises(DataError, match=rf"bad.tfrecord: record at byte offset {offset} .*CRC"):
        ds[1]
    # Records without masks cannot train Mask R-CNN.
    write_coco_tfrecords(coco_set.json, coco_set.images, tmp_path / "nomask", 1, include_masks=False,
                         progress=False)
    ds = TfRecordInstanceDataset(str(tmp_path / "nomask*.tfrecord"), categories=[
        {"id": i, "name": str(i)} for i in (1, 2, 3)], image_size=(80, 80))
    with pytest.raises(DataError, match=r"nomask-00000-of-00001.tfrecord \(record at byte offset "
                                        r"\d+\): \d+ objects but 0 image/object/mask"):
        [ds[i] for i in range(len(ds))]
    with pytest.raises(DataError, match="matches no TFRecord file"):
        TfRecordInstanceDataset(str(tmp_path / "none-*.tfrecord"))


def test_writer_refuses_bad_input(coco_set, tmp_path):
    data = json.loads(coco_set.json.read_text())
    data["images"][0] = dict(data["images"][0], width=95)
    (tmp_path / "wrong.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"\(image id 1\) is 72x96 .* says 72x95.*mrcnn data check"):
        write_coco_tfrecords(tmp_path / "wrong.json", coco_set.images, tmp_path / "w", 2,
                             progress=False)
    assert not list(tmp_path.glob("w-*"))                # no partial shards left
    data = json.loads(coco_set.json.read_text())
    data["categories"].append({"id": 0, "name": "zero"})
    (tmp_path / "zero.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="category id 0"):
        write_coco_tfrecords(tmp_path / "zero.json", coco_set.images, tmp_path / "z", 1)


# ------------------------------------------------------------------------------- loaders

def _spec(**data):
    dc = {"image_size": (80, 80), "augment_input_data": False, "eval_samples": 0,
          "training_file_pattern": "", "validation_file_pattern": "", "num_classes": 4,
          "val_json_file": "", "val_image_dir": "", "train_json_file": "", "train_image_dir": "",
          "skip_crowd_during_training": True, "max_num_instances": 8, "n_workers": 0,
          "aug_scale_min": 0.8, "aug_scale_max": 1.25}
    dc.update(data)
    return SimpleNamespace(data_config=SimpleNamespace(**dc),
                           maskrcnn_config=SimpleNamespace(gt_mask_size=16),
                           train_batch_size=1, eval_batch_size=2, seed=3)


def one_epoch(loader):
    """The batches of one epoch of a training loader (which streams epochs without end)."""
    return itertools.islice(loader, len(loader))


def test_train_loader_from_tfrecords_shards_across_ranks(coco_set, tmp_path):
    pattern = str(coco_set.root / "rec" / "train-*.tfrecord")
    spec = _spec(training_file_pattern=pattern, val_json_file=str(coco_set.json))
    single = build_train_loader(spec)
    assert isinstance(single.dataset, TfRecordInstanceDataset)
    assert sorted(int(i) for b in one_epoch(single) for i in b["image_id"]) == list(range(1, 8))
    # 3 files over 2 ranks: whole files per rank (rank 0: shards 0 and 2, rank 1: shard 1).
    ids = [sorted(int(i) for b in one_epoch(build_train_loader(spec, rank=r, world_size=2))
                  for i in b["image_id"]) for r in range(2)]
    assert ids == [[1, 3, 4, 6, 7], [2, 5]]
    # One file over 2 ranks: records are split instead, still disjoint.
    write_coco_tfrecords(coco_set.json, coco_set.images, tmp_path / "one", 1, progress=False)
    spec = _spec(training_file_pattern=str(tmp_path / "one-*.tfrecord"))
    ids = [{int(i) for b in one_epoch(build_train_loader(spec, rank=r, world_size=2))
            for i in b["image_id"]} for r in range(2)]
    assert not ids[0] & ids[1] and len(ids[0]) == len(ids[1]) == 3
    with pytest.raises(DataError, match="training_file_pattern '.*nothing-\\*' matches no TFRecord"):
        build_train_loader(_spec(training_file_pattern=str(tmp_path / "nothing-*")))


def test_eval_loader_from_tfrecords_uses_val_json_as_ground_truth(coco_set, tmp_path):
    paths = coco_set.paths
    write_coco_tfrecords(paths["val_json"], paths["val_images"], tmp_path / "val", 2, progress=False)
    spec = _spec(validation_file_pattern=str(tmp_path / "val*.tfrecord"),
                 val_json_file=paths["val_json"], eval_samples=2)
    loader = build_eval_loader(spec)
    assert isinstance(loader.dataset, TfRecordInstanceDataset) and loader.dataset.coco is not None
    assert loader.dataset.category_ids == [1, 2, 3]
    assert [int(i) for b in loader for i in b["image_id"]] == [1, 3]     # record order, capped
    ref = CocoInstanceDataset(paths["val_json"], paths["val_images"], image_size=(80, 80),
                              train=False, gt_mask_size=16, max_num_instances=8)
    _assert_same_sample(ref[0], loader.dataset[0])
    with pytest.raises(DataError, match="needs data_config.val_json_file"):
        build_eval_loader(_spec(validation_file_pattern=str(tmp_path / "val*.tfrecord")))
    with pytest.raises(DataError, match="num_classes = 3"):
        build_eval_loader(_spec(validation_file_pattern=str(tmp_path / "val*.tfrecord"),
                                val_json_file=paths["val_json"], num_classes=3))


def test_to_tfrecord_cli(coco_set, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mrcnn")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "to-tfrecord", coco_set.paths["val_json"],
                              coco_set.paths["val_images"], str(tmp_path / "out" / "val"),
                              "--shards", "2", "--no-progress"])
    assert args.func(args) == 0
    assert "num_images: 3" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "val-00000-of-00002.tfrecord", "val-00001-of-00002.tfrecord", "val_warnings.json"]
