"""Masks composited on the model's device (deploy.overlay) draw exactly what
visualize.draw_instances draws on the host: the same instances, the same pixels."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn_helpers.deploy.overlay import composite_masks
from mrcnn_helpers.visualize import draw_boxes_and_labels, draw_instances

NAMES = ["background", "a", "b", "c"]


def _scene(duplicates: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w, n = 60, 80, 7
    frame = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    boxes = torch.zeros(n, 4)
    for i in range(n):
        x1, y1 = int(torch.randint(0, w - 20, (1,), generator=g)), int(
            torch.randint(0, h - 20, (1,), generator=g))
        bw, bh = int(torch.randint(5, 20, (1,), generator=g)), int(
            torch.randint(5, 20, (1,), generator=g))
        masks[i, y1:y1 + bh, x1:x1 + bw] = True
        boxes[i] = torch.tensor([x1, y1, x1 + bw, y1 + bh])
    if duplicates:  # instance 5 is instance 1 again (claimed twice), 6 an empty mask
        masks[5], boxes[5] = masks[1], boxes[1]
        masks[6] = False
    scores = torch.rand(n, generator=g)
    classes = torch.randint(1, 4, (n,), generator=g)
    return frame, masks, boxes, scores, classes


@pytest.mark.parametrize("duplicates", [False, True])
def test_composite_then_labels_equals_draw_instances(duplicates):
    frame, masks, boxes, scores, classes = _scene(duplicates)
    expected = np.asarray(draw_instances(frame.numpy(), boxes, scores, classes, NAMES,
                                         masks=masks))
    order = torch.argsort(-scores, stable=True)
    blended, drawn = composite_masks(frame, masks[order], classes[order])
    got = np.asarray(draw_boxes_and_labels(blended.numpy(), boxes, scores, classes, NAMES,
                                           order[drawn].numpy()))
    assert got.shape == expected.shape and np.array_equal(got, expected)
    if duplicates:  # the second drawing of instance 1 is left out, the empty mask is kept
        drawn_ids = set(order[drawn].tolist())
        assert (5 in drawn_ids) != (1 in drawn_ids) and 6 in drawn_ids


def test_composite_without_masks_or_overlap_check():
    frame, masks, _, _, classes = _scene(True)
    same, drawn = composite_masks(frame, masks[:0], classes[:0])
    assert same is frame and drawn.numel() == 0
    _, drawn = composite_masks(frame, masks, classes, overlap=None)
    assert drawn.tolist() == list(range(len(masks)))


def test_pipeline_draws_the_same_frames_either_way(tmp_path):
    """run_deploy with the masks composited by the model's device (the GPU path, run here on the
    CPU) writes the frames the host-drawing path writes."""
    from test_export import make_tiny_setup

    tiny = make_tiny_setup(tmp_path / "setup", num_val=3)
    written = _deploy_both_ways(tiny, tiny.paths["val_images"], tmp_path, frames=3)
    assert all(np.array_equal(a, b) for a, b in zip(written[False], written[True], strict=True))


def _deploy_both_ways(tiny, folder, tmp_path, frames: int) -> dict:
    """{draw_on_device: the annotated frames run_deploy wrote} for the host and device paths."""
    from mrcnn_helpers.deploy import open_sink, open_source, run_deploy
    from mrcnn_helpers.inference import Predictor

    written = {}
    for on_device in (False, True):
        out = tmp_path / f"out_{on_device}"
        stats = run_deploy(Predictor(tiny.model, tiny.spec, NAMES), open_source(folder),
                           open_sink(out), batch_size=2, threshold=0.0, progress=False,
                           draw_on_device=on_device)
        assert stats.frames == frames and stats.detections > 0
        assert stats.stage_ms_per_frame()["draw"] > 0
        written[on_device] = [np.asarray(Image.open(f)) for f in sorted(out.iterdir())]
    return written


def _dets(seed: int = 1):
    """A model's padded eval output for 3 images: unsorted scores, a background class, a box in
    the padding, a rank beyond num_detections."""
    g = torch.Generator().manual_seed(seed)
    b, d, r = 3, 6, 7
    xy = torch.rand(b, d, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(b, d, 2, generator=g) * 30], dim=-1)
    boxes[0, 2] = torch.tensor([200.0, 200.0, 220.0, 230.0])  # wholly in the padding
    classes = torch.randint(1, 4, (b, d), generator=g)
    classes[1, 1] = 0
    scores = torch.rand(b, d, generator=g)
    scores[2, 3] = scores[2, 4]  # a tie
    return {"boxes": boxes, "scores": scores, "classes": classes,
            "masks": torch.rand(b, d, r, r, generator=g),
            "num_detections": torch.tensor([6, 6, 4])}


def test_batch_postprocess_keeps_what_the_per_image_one_keeps():
    from mrcnn_helpers.inference.postprocess import (
        postprocess_batch_on_device,
        postprocess_detections,
    )

    dets, scales, size = _dets(), [0.8, 1.0, 1.25], (70, 90)
    post = postprocess_batch_on_device(dets, scales, size, 0.2, True)
    counts = post["counts"].tolist()
    assert post["masks"].shape == (3, max(counts), 70, 90)
    assert all(post["valid"][i, :n].all() and not post["valid"][i, n:].any()
               for i, n in enumerate(counts))
    for i, scale in enumerate(scales):
        want = postprocess_detections(dets, i, scale, size, 0.2, True)
        order = torch.argsort(-want["scores"], stable=True)
        n = counts[i]
        assert n == len(order) and n < 6  # something was dropped in every image
        assert torch.equal(post["scores"][i, :n], want["scores"][order])
        assert torch.equal(post["classes"][i, :n], want["classes"][order])
        assert torch.equal(post["boxes"][i, :n], want["boxes"][order])
        assert torch.equal(post["masks"][i, :n], want["masks"][order])


def test_frames_of_different_sizes_draw_the_same_either_way(tmp_path):
    """A folder of images of two sizes: the device path composites them one by one."""
    from test_export import make_tiny_setup

    tiny = make_tiny_setup(tmp_path / "setup", num_val=2)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for k, f in enumerate(sorted(Path(tiny.paths["val_images"]).iterdir())):
        image = Image.open(f)
        (image.resize((70, 50)) if k else image).save(folder / f"{k}.png")
    written = _deploy_both_ways(tiny, folder, tmp_path, frames=2)
    assert [a.shape for a in written[True]] == [(60, 90, 3), (50, 70, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(written[False], written[True], strict=True))
