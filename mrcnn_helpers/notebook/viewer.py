"""An ipywidgets viewer of predictions against ground truth, with the worst images listed.

    viewer = InstanceViewer(predictor, val_json, val_image_dir, max_images=50)
    viewer            # in Jupyter: page through images, move the score threshold and the mask
                      # opacity, switch prediction / ground truth / both, pick the classes shown,
                      # jump to the worst images

Predictions are computed once, at the lowest threshold the slider offers, and kept as RLE masks,
so moving the sliders only redraws. Errors are counted per image at the current threshold by
`analysis.match_instances` (mask IoU >= iou_threshold, same class): missed instances (ground
truth without a match) and false positives (detections without one). The class filter keeps
the drawings, the counts and the worst-image list to the selected classes (matching is per
class, so the filter leaves each class's errors as they are). The predictor's labels and the
annotation file's categories must follow the same order (the model was trained on this set's
categories, the usual case).
"""

from __future__ import annotations

import html
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from mrcnn_helpers.data.coco import load_coco
from mrcnn_helpers.data.images import load_image
from mrcnn_helpers.visualize import draw_instances

from .analysis import masks_to_rles, match_instances
from .plots import load_ground_truth
from .tables import Table

MODES = ("prediction", "ground truth", "both")


class InstanceViewer:
    """Predictions of `predictor` on the images of a COCO set, next to their ground truth.

    predictor: mrcnn_helpers.inference.Predictor; json_file / image_dir: the COCO set (e.g. the
    spec's val_json_file / val_image_dir); image_ids: which images (default the first max_images
    by id). min_score: the lowest selectable score threshold (detections below it are dropped at
    prediction time). max_width: rendered images are scaled down to at most this many pixels wide;
    min_panel_width: images narrower than this are enlarged by the smallest whole factor (at most
    4) that reaches it. classes: the classes shown (names or contiguous labels; None: all), see
    select_classes. The viewer opens on the worst image (see worst_images).
    """

    def __init__(self, predictor, json_file, image_dir, *, max_images: int = 50, image_ids=None,
                 score_threshold: float = 0.5, mask_alpha: float = 0.5, mode: str = "both",
                 min_score: float = 0.05, iou_threshold: float = 0.5, max_width: int = 1000,
                 min_panel_width: int = 400, classes=None, progress: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.coco = load_coco(json_file) if not hasattr(json_file, "imgs") else json_file
        self.image_dir = Path(image_dir)
        ids = sorted(self.coco.imgs)[:max_images] if image_ids is None else list(image_ids)
        self.gt_names = ["background"] + [c["name"] for c in
                                          self.coco.loadCats(sorted(self.coco.getCatIds()))]
        self.class_names = list(predictor.class_names)
        # (name, label) of every class the predictor or the annotations name, label order.
        names = self.class_names + self.gt_names[len(self.class_names):]
        self.class_options = [(str(name), label) for label, name in enumerate(names) if label]
        self.classes: tuple[int, ...] = ()
        self.select_classes(classes)
        self.min_score = float(min_score)
        self.iou_threshold = float(iou_threshold)
        self.max_width = int(max_width)
        self.min_panel_width = int(min_panel_width)
        self.score_threshold = max(float(score_threshold), self.min_score)
        self.mask_alpha = float(mask_alpha)
        self.mode = mode
        self.index = 0
        self.items: list[dict] = []
        batch = max(1, int(getattr(predictor, "batch_size", 1)))
        for start in tqdm(range(0, len(ids), batch), desc="predict", unit="batch",
                          disable=not progress):
            chunk = ids[start:start + batch]
            paths = [str(self.image_dir / self.coco.imgs[i]["file_name"]) for i in chunk]
            outputs = predictor.predict(paths, score_threshold=self.min_score)
            for image_id, path, out in zip(chunk, paths, outputs, strict=True):
                gt = load_ground_truth(self.coco, image_id)
                self.items.append({
                    "image_id": image_id, "path": path,
                    "gt": {"boxes": gt["boxes"], "classes": gt["classes"], "crowd": gt["crowd"],
                           "rles": masks_to_rles(gt["masks"])},
                    "pred": {"boxes": out["boxes"].numpy(), "scores": out["scores"].numpy(),
                             "classes": out["classes"].numpy(),
                             "rles": (masks_to_rles(out["masks"]) if out["masks"] is not None
                                      else None)},
                })
        worst = self.worst_images(k=1)
        self.index = worst[0]["index"] if worst else 0
        self._widget = None

    def __len__(self) -> int:
        return len(self.items)

    def select_classes(self, classes=None) -> tuple[int, ...]:
        """Show only these classes: names or contiguous labels (None: every class; empty: none).
        Sets and returns `classes`, the selected labels in label order; unknown names or
        labels raise ValueError listing the classes there are."""
        known = dict(self.class_options)
        if classes is None:
            self.classes = tuple(known.values())
            return self.classes
        if isinstance(classes, (str, int)):
            classes = [classes]
        labels = set()
        for c in classes:
            label = known.get(c) if isinstance(c, str) else int(c)
            if label not in known.values():
                raise ValueError(f"unknown class {c!r}; the classes are "
                                 f"{', '.join(f'{n} ({v})' for n, v in self.class_options)}")
            labels.add(label)
        self.classes = tuple(sorted(labels))
        return self.classes

    def _classes_note(self) -> str:
        """"classes: a, b" when the filter hides some classes, else ""."""
        if len(self.classes) == len(self.class_options):
            return ""
        return "classes: " + (", ".join(name for name, label in self.class_options
                                        if label in self.classes) or "none")

    def _selected(self, labels, classes=None) -> np.ndarray:
        """bool [N]: which of these labels are among `classes` (default: the selected ones)."""
        chosen = self.classes if classes is None else classes
        return np.isin(np.asarray(labels, dtype=np.int64), np.asarray(chosen, dtype=np.int64))

    def errors(self, index: int, score_threshold: float | None = None, classes=None) -> dict:
        """Image `index`'s matching at a score threshold (default the current one): the dict of
        match_instances plus num_gt (non-crowd) and num_pred (detections >= threshold), all
        restricted to `classes` (labels; default the selected ones). Indices are into the
        image's full ground truth and detection lists. Without predicted masks, boxes are
        matched instead."""
        thr = self.score_threshold if score_threshold is None else float(score_threshold)
        item = self.items[index]
        gt, pred = item["gt"], item["pred"]
        keep = np.flatnonzero(pred["scores"] >= thr)
        if pred["rles"] is not None:
            gt_rles, dt_rles = gt["rles"], [pred["rles"][i] for i in keep]
        else:
            info = self.coco.imgs[item["image_id"]]
            gt_rles = _box_rles(gt["boxes"], info["height"], info["width"])
            dt_rles = _box_rles(pred["boxes"][keep], info["height"], info["width"])
        found = match_instances(gt_rles, gt["classes"], dt_rles, pred["classes"][keep],
                                pred["scores"][keep], gt_crowd=gt["crowd"],
                                iou_threshold=self.iou_threshold)
        # Indices back into the image's full detection list, of the selected classes only.
        dt_on = self._selected(pred["classes"], classes)
        gt_on = self._selected(gt["classes"], classes)
        found["matches"] = [(int(keep[d]), g, iou) for d, g, iou in found["matches"]
                            if dt_on[keep[d]]]
        found["false_positives"] = [int(keep[d]) for d in found["false_positives"]
                                    if dt_on[keep[d]]]
        found["ignored"] = [int(keep[d]) for d in found["ignored"] if dt_on[keep[d]]]
        found["missed"] = [g for g in found["missed"] if gt_on[g]]
        found["num_gt"] = int((~gt["crowd"] & gt_on).sum())
        found["num_pred"] = int(dt_on[keep].sum())
        return found

    def worst_images(self, k: int = 10, score_threshold: float | None = None) -> list[dict]:
        """The k images with the most errors (missed + false positives) at a score threshold,
        most first (ties: more missed first, then image order). Each: index, image_id,
        file_name, missed, false_positives, num_gt, num_pred. Images without errors are left
        out."""
        rows = []
        for index, item in enumerate(self.items):
            e = self.errors(index, score_threshold)
            if e["missed"] or e["false_positives"]:
                rows.append({"index": index, "image_id": item["image_id"],
                             "file_name": Path(item["path"]).name, "missed": len(e["missed"]),
                             "false_positives": len(e["false_positives"]),
                             "num_gt": e["num_gt"], "num_pred": e["num_pred"]})
        rows.sort(key=lambda r: (-(r["missed"] + r["false_positives"]), -r["missed"], r["index"]))
        return rows[:k]

    def worst_table(self, k: int = 10, score_threshold: float | None = None):
        """worst_images as a Table (index, file, missed, false positives, instances, detections)."""
        thr = self.score_threshold if score_threshold is None else float(score_threshold)
        rows = [[r["index"], r["file_name"], r["missed"], r["false_positives"], r["num_gt"],
                 r["num_pred"]] for r in self.worst_images(k, thr)]
        return Table(["index", "file", "missed", "false positives", "instances", "detections"],
                     rows, title=f"Worst {len(rows)} of {len(self)} images at score >= {thr:.2f}"
                     + (f" ({self._classes_note()})" if self._classes_note() else ""))

    def _decode(self, rles, keep, shape) -> np.ndarray:
        if rles is None:
            return None
        if not len(keep):
            return np.zeros((0,) + shape, dtype=bool)
        return mask_utils.decode([rles[i] for i in keep]).transpose(2, 0, 1).astype(bool)

    def render(self, index: int | None = None, *, mode: str | None = None,
               score_threshold: float | None = None, mask_alpha: float | None = None,
               classes=None):
        """PIL image of one image as the viewer shows it (defaults: the viewer's current state;
        classes: labels).

        "prediction": detections >= threshold, plus white boxes around missed instances;
        "ground truth": the annotations; "both": ground truth left, prediction right. Only
        instances and detections of the selected classes are drawn.
        """
        index = self.index if index is None else int(index)
        mode = self.mode if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        thr = self.score_threshold if score_threshold is None else float(score_threshold)
        alpha = self.mask_alpha if mask_alpha is None else float(mask_alpha)
        item = self.items[index]
        image = load_image(item["path"], item["image_id"])
        shape = (int(image.shape[1]), int(image.shape[2]))
        # Small images are enlarged by a whole factor before drawing, so labels stay legible
        # and mask edges stay sharp (pixels are repeated, not interpolated).
        f = max(1, min(4, -(-self.min_panel_width // max(shape[1], 1))))
        if f > 1:
            image = image.repeat_interleave(f, dim=1).repeat_interleave(f, dim=2)

        def enlarge(masks):
            return masks if masks is None or f == 1 else masks.repeat(f, 1).repeat(f, 2)

        panels = []
        if mode in ("ground truth", "both"):
            gt = item["gt"]
            shown = np.flatnonzero(self._selected(gt["classes"], classes))
            masks = self._decode(gt["rles"], shown, shape)
            panels.append(("ground truth", draw_instances(
                image, gt["boxes"][shown] * f, None, gt["classes"][shown], self.gt_names,
                masks=enlarge(masks), mask_alpha=alpha)))
        if mode in ("prediction", "both"):
            pred = item["pred"]
            keep = np.flatnonzero((pred["scores"] >= thr)
                                  & self._selected(pred["classes"], classes))
            drawn = draw_instances(image, pred["boxes"][keep] * f, pred["scores"][keep],
                                   pred["classes"][keep], self.class_names,
                                   masks=enlarge(self._decode(pred["rles"], keep, shape)),
                                   mask_alpha=alpha)
            missed = self.errors(index, thr, classes)["missed"]
            _mark_missed(drawn, item["gt"]["boxes"][missed] * f,
                         [self.gt_names[c] for c in item["gt"]["classes"][missed]])
            panels.append((f"prediction >= {thr:.2f}", drawn))
        return _side_by_side(panels, self.max_width)

    def caption(self, index: int | None = None) -> str:
        """One line describing image `index` at the current threshold (HTML-safe text)."""
        index = self.index if index is None else int(index)
        item = self.items[index]
        e = self.errors(index)
        shown = self._classes_note()
        return (f"{index + 1}/{len(self)}  {Path(item['path']).name} (id {item['image_id']}): "
                f"{e['num_gt']} instances, {e['num_pred']} detections >= "
                f"{self.score_threshold:.2f}, {len(e['matches'])} matched, "
                f"{len(e['missed'])} missed, {len(e['false_positives'])} false positives"
                + (f"; {shown}" if shown else ""))

    # ----- widgets -------------------------------------------------------------------------
    @property
    def widget(self):
        """The ipywidgets box (built on first use)."""
        if self._widget is None:
            self._widget = self._build_widget()
        return self._widget

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def _build_widget(self):
        import ipywidgets as w

        last = max(len(self) - 1, 0)
        self._index_slider = w.IntSlider(value=self.index, min=0, max=last, description="image",
                                         continuous_update=False)
        prev_button = w.Button(description="◀ previous", layout=w.Layout(width="110px"))
        next_button = w.Button(description="next ▶", layout=w.Layout(width="110px"))
        self._score_slider = w.FloatSlider(value=self.score_threshold, min=self.min_score,
                                           max=1.0, step=0.05, description="score ≥",
                                           continuous_update=False)
        self._alpha_slider = w.FloatSlider(value=self.mask_alpha, min=0.0, max=1.0, step=0.05,
                                           description="mask opacity", continuous_update=False)
        self._mode_buttons = w.ToggleButtons(options=list(MODES), value=self.mode)
        self._image = w.Image(format="png")
        self._caption = w.HTML()
        self._worst = w.Select(options=[], rows=12, layout=w.Layout(width="330px"))
        self._class_select = w.SelectMultiple(
            options=self.class_options, value=self.classes, description="classes",
            rows=min(max(len(self.class_options), 2), 8), layout=w.Layout(width="330px"))
        self._all_button = w.Button(description="all classes", layout=w.Layout(width="110px"))

        prev_button.on_click(lambda _: self._step(-1))
        next_button.on_click(lambda _: self._step(+1))
        self._index_slider.observe(self._on_index, names="value")
        self._score_slider.observe(self._on_score, names="value")
        self._alpha_slider.observe(self._on_alpha, names="value")
        self._mode_buttons.observe(self._on_mode, names="value")
        self._worst.observe(self._on_worst, names="value")
        self._class_select.observe(self._on_classes, names="value")
        self._all_button.on_click(lambda _: setattr(
            self._class_select, "value", tuple(label for _, label in self.class_options)))
        self._refresh_worst()
        self._refresh()
        controls = w.VBox([w.HBox([prev_button, next_button, self._index_slider]),
                           w.HBox([self._score_slider, self._alpha_slider]), self._mode_buttons])
        side = w.VBox([w.HTML("<b>Classes shown</b> (ctrl / shift click for several)"),
                       self._class_select, self._all_button,
                       w.HTML("<b>Worst images</b> (missed + false positives)"), self._worst])
        return w.HBox([w.VBox([controls, self._image, self._caption]), side])

    def _step(self, delta: int) -> None:
        if len(self):
            self._index_slider.value = (self.index + delta) % len(self)

    def _on_index(self, change) -> None:
        self.index = int(change["new"])
        self._refresh()

    def _on_score(self, change) -> None:
        self.score_threshold = float(change["new"])
        self._refresh_worst()
        self._refresh()

    def _on_alpha(self, change) -> None:
        self.mask_alpha = float(change["new"])
        self._refresh()

    def _on_mode(self, change) -> None:
        self.mode = change["new"]
        self._refresh()

    def _on_classes(self, change) -> None:
        self.select_classes(change["new"])
        self._refresh_worst()
        self._refresh()

    def _on_worst(self, change) -> None:
        if change["new"] is not None:
            self._index_slider.value = int(change["new"])

    def _refresh_worst(self) -> None:
        rows = self.worst_images(k=25)
        options = [(f"{r['file_name']}: {r['missed']} missed, {r['false_positives']} FP",
                    r["index"]) for r in rows]
        self._worst.options = options or [("no errors at this threshold", None)]
        self._worst.value = None

    def _refresh(self) -> None:
        if not len(self):
            self._caption.value = "no images"
            return
        buffer = io.BytesIO()
        self.render().save(buffer, format="PNG")
        self._image.value = buffer.getvalue()
        self._caption.value = html.escape(self.caption())


def _mark_missed(image: Image.Image, boxes, names) -> None:
    """Outline missed ground-truth boxes in white on `image` (in place), labelled "missed NAME"
    on a black tag at the box's bottom left."""
    draw = ImageDraw.Draw(image)
    for (x1, y1, x2, y2), name in zip(np.asarray(boxes).reshape(-1, 4).tolist(), names,
                                      strict=True):
        draw.rectangle((x1, y1, x2, y2), outline=(255, 255, 255), width=2)
        text = f"missed {name}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        ty = min(y2, image.height - (bottom - top) - 4)
        draw.rectangle((x1, ty, x1 + right - left + 4, ty + bottom - top + 4), fill=(0, 0, 0))
        draw.text((x1 + 2 - left, ty + 2 - top), text, fill=(255, 255, 255))


def _box_rles(boxes, height: int, width: int) -> list:
    """Boxes [N, 4] (x1, y1, x2, y2) as filled-rectangle RLEs, to match by box IoU."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        return []
    xywh = np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0],
                     boxes[:, 3] - boxes[:, 1]], axis=1)
    return mask_utils.frPyObjects(xywh, int(height), int(width))


def _side_by_side(panels, max_width: int) -> Image.Image:
    """Panels (title, PIL image) next to each other under their titles, scaled to max_width."""
    gap, header = 8, 22
    width = sum(p.width for _, p in panels) + gap * (len(panels) - 1)
    height = max(p.height for _, p in panels) + header
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=15)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    x = 0
    for title, panel in panels:
        canvas.paste(panel, (x, header))
        draw.text((x + 2, 2), title, fill=(0, 0, 0), font=font)
        x += panel.width + gap
    if width > max_width:
        canvas = canvas.resize((max_width, max(1, round(height * max_width / width))),
                               Image.LANCZOS)
    return canvas
