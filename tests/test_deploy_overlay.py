"""Masks composited on the model's device (deploy.overlay) draw exactly what
visualize.draw_instances draws on the host: the same instances, the same pixels."""

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

    from mrcnn_helpers.deploy import open_sink, open_source, run_deploy
    from mrcnn_helpers.inference import Predictor

    tiny = make_tiny_setup(tmp_path / "setup", num_val=3)
    frames = tiny.paths["val_images"]
    written = {}
    for on_device in (False, True):
        out = tmp_path / f"out_{on_device}"
        stats = run_deploy(Predictor(tiny.model, tiny.spec, NAMES), open_source(frames),
                           open_sink(out), batch_size=2, threshold=0.0, progress=False,
                           draw_on_device=on_device)
        assert stats.frames == 3 and stats.detections > 0
        written[on_device] = [np.asarray(Image.open(f))
                              for f in sorted(out.iterdir())]
    assert all(np.array_equal(a, b) for a, b in zip(written[False], written[True], strict=True))
