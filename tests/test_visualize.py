"""draw_instances: masks blended where they are, boxes and labels in the class color, no more."""

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn_helpers.visualize import PALETTE, class_color, draw_instances

CLASS_NAMES = ["background", "cat", "dog"]


def _scene():
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    mask = np.zeros((1, 60, 80), dtype=bool)
    mask[0, 20:40, 30:60] = True
    boxes = np.array([[30.0, 20.0, 60.0, 40.0]])
    return image, boxes, mask


def test_mask_region_blended_and_far_pixels_untouched():
    image, boxes, mask = _scene()
    out = np.asarray(draw_instances(image, boxes, [0.93], [1], CLASS_NAMES, masks=mask,
                                    mask_alpha=0.5))
    assert out.shape == (60, 80, 3) and out.dtype == np.uint8
    color = np.array(class_color(1), dtype=np.float32)
    expected = np.rint(color * 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[30, 45], expected)  # inside the mask, away from edges
    np.testing.assert_array_equal(out[25:36, 35:56].reshape(-1, 3),
                                  np.broadcast_to(expected, (11 * 21, 3)))
    # Box outline in the class color.
    np.testing.assert_array_equal(out[30, 30], np.array(class_color(1), dtype=np.uint8))
    # Left of the box and below it nothing is drawn (the label sits above the box's left corner).
    assert not out[:, :28].any() and not out[43:].any()
    # The label background above the box is filled with the class color.
    assert (out[5:19, 31:40] == np.array(class_color(1), dtype=np.uint8)).all(axis=-1).any()


def test_input_kinds_and_input_left_unchanged():
    image, boxes, mask = _scene()
    original = image.copy()
    from_array = np.asarray(draw_instances(image, boxes, [0.9], [2], CLASS_NAMES, masks=mask))
    np.testing.assert_array_equal(image, original)  # drawing works on a copy
    from_pil = np.asarray(draw_instances(Image.fromarray(image), boxes, [0.9], [2], CLASS_NAMES,
                                         masks=torch.from_numpy(mask)))
    from_tensor = np.asarray(draw_instances(torch.from_numpy(image).permute(2, 0, 1),
                                            torch.from_numpy(boxes), torch.tensor([0.9]),
                                            torch.tensor([2]), CLASS_NAMES, masks=mask))
    np.testing.assert_array_equal(from_array, from_pil)
    np.testing.assert_array_equal(from_array, from_tensor)


def test_score_threshold_and_colors_per_class():
    image, boxes, mask = _scene()
    below = draw_instances(image, boxes, [0.4], [1], CLASS_NAMES, masks=mask, score_threshold=0.5)
    np.testing.assert_array_equal(np.asarray(below), image)
    assert class_color(1) == class_color(1 + len(PALETTE)) and class_color(1) != class_color(2)
    cat = np.asarray(draw_instances(image, boxes, [0.9], [1], CLASS_NAMES, masks=mask))
    dog = np.asarray(draw_instances(image, boxes, [0.9], [2], CLASS_NAMES, masks=mask))
    assert not np.array_equal(cat[30, 45], dog[30, 45])
    again = np.asarray(draw_instances(image, boxes, [0.9], [1], CLASS_NAMES, masks=mask))
    np.testing.assert_array_equal(cat, again)  # deterministic


def test_boxes_only_no_scores_and_unknown_label():
    image, boxes, _ = _scene()
    out = np.asarray(draw_instances(image, boxes, None, [7], CLASS_NAMES))
    assert not out[30, 45].any()  # no mask: the box interior stays black
    np.testing.assert_array_equal(out[30, 30], np.array(class_color(7), dtype=np.uint8))
    empty = draw_instances(image, np.zeros((0, 4)), [], [], CLASS_NAMES,
                           masks=np.zeros((0, 60, 80)))
    np.testing.assert_array_equal(np.asarray(empty), image)


def test_mask_shape_must_match_image():
    image, boxes, _ = _scene()
    with pytest.raises(ValueError, match="masks must be"):
        draw_instances(image, boxes, [0.9], [1], CLASS_NAMES, masks=np.zeros((1, 30, 40), bool))
    with pytest.raises(ValueError, match="uint8"):
        draw_instances(image.astype(np.float32), boxes, [0.9], [1], CLASS_NAMES)


def test_one_drawing_per_object_and_labels_inside_the_image():
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    masks = np.zeros((3, 60, 80), dtype=bool)
    masks[:2, 10:30, 50:79] = True   # one object claimed by two classes
    masks[2, 40:58, 2:20] = True
    boxes = np.array([[50.0, 10.0, 79.0, 30.0], [51.0, 10.0, 79.0, 30.0], [2.0, 40.0, 20.0, 58.0]])
    scores, classes = [0.6, 0.9, 0.8], [1, 2, 1]
    out = np.asarray(draw_instances(image, boxes, scores, classes, CLASS_NAMES, masks=masks))
    dog, cat = np.array(class_color(2), np.uint8), np.array(class_color(1), np.uint8)
    half_dog, half_cat = (np.rint(c.astype(np.float32) * 0.5).astype(np.uint8) for c in (dog, cat))
    np.testing.assert_array_equal(out[20, 65], half_dog)   # the better-scored class only
    np.testing.assert_array_equal(out[50, 10], half_cat)
    # The label of the box at the right edge is moved left to stay whole inside the image.
    label_rows = (out[:10] == dog).all(axis=-1)
    assert label_rows.any() and label_rows[:, -1].any() and label_rows[:, :50].any()
    both = np.asarray(draw_instances(image, boxes, scores, classes, CLASS_NAMES, masks=masks,
                                     duplicate_overlap=None))
    assert not np.array_equal(both[20, 65], half_dog)      # both drawn when asked
    # Without masks, boxes decide: IoU 0.97 is one object, a box beside it another.
    boxes_only = np.asarray(draw_instances(image, boxes, scores, classes, CLASS_NAMES))
    assert (boxes_only[10:31, 50] == cat).all(axis=-1).sum() == 0   # the cat box of IoU 0.97
    assert (boxes_only[40:59, 2] == cat).all(axis=-1).sum() >= 15   # the other cat's outline


def contrast_with_white(rgb) -> float:
    """WCAG 2 contrast ratio of an sRGB color against white."""
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
              for c in (v / 255.0 for v in rgb)]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return 1.05 / (luminance + 0.05)


def test_palette_reads_on_white_and_colors_differ():
    assert len(set(PALETTE)) == len(PALETTE) == 20
    assert all(contrast_with_white(c) >= 3.0 for c in PALETTE), \
        [c for c in PALETTE if contrast_with_white(c) < 3.0]
    assert [class_color(k) for k in (1, 2, 3)] == list(PALETTE[:3])


def test_mask_extents():
    from mrcnn_helpers.visualize import mask_extents

    masks = np.zeros((3, 6, 8), dtype=bool)
    masks[0, 1:3, 2:7] = True
    masks[1, 5, 0] = True  # empty masks[2]
    assert mask_extents(masks).tolist() == [[1, 3, 2, 7], [5, 6, 0, 1], [0, 0, 0, 0]]


def test_masks_read_within_their_extents_draw_what_full_frame_masks_draw():
    """draw_instances reads and blends each mask only inside its extent: the image equals the
    whole-frame computation (one drawing per object chosen over full masks, then each blended
    over the frame in float32), for masks anywhere, duplicated or empty."""
    from mrcnn_helpers.visualize import class_color, draw_boxes_and_labels

    rng = np.random.default_rng(3)
    names = ["background"] + [f"c{i}" for i in range(1, 12)]
    for trial in range(20):
        h, w, n = 40 + trial, 60, 8
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        masks = rng.random((n, h, w)) < 0.05
        masks[3:5] = False
        masks[3, 5:20, 10:30] = True
        masks[4] = masks[3]  # a second drawing of object 3
        masks[5] = False
        boxes = np.tile([5.0, 5.0, 30.0, 25.0], (n, 1))
        scores, classes = rng.uniform(0.3, 1, n), rng.integers(1, 12, n)
        order, covered = [], np.zeros((h, w), dtype=bool)
        for i in np.argsort(-scores, kind="stable"):
            area = int(masks[i].sum())
            if area and np.count_nonzero(masks[i] & covered) > 0.6 * area:
                continue
            covered |= masks[i]
            order.append(i)
        out = frame.astype(np.float32)
        for i in order[::-1]:
            color = np.array(class_color(classes[i]), dtype=np.float32)
            out[masks[i]] = out[masks[i]] * 0.5 + color * 0.5
        blended = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        want = np.asarray(draw_boxes_and_labels(blended, boxes, scores, classes, names,
                                                np.array(order)))
        got = np.asarray(draw_instances(frame, boxes, scores, classes, names, masks=masks))
        assert (3 in order) != (4 in order) and 5 in order
        assert np.array_equal(got, want), trial
