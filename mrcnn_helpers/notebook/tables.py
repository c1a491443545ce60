"""Tables for notebooks: the spec, spec changes, COCO metrics and dataset statistics.

A `Table` renders as HTML in Jupyter (`_repr_html_`) and as aligned text anywhere else
(`str(table)`), so the same call reads well in a notebook, a terminal and a test.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mrcnn_helpers.data.coco import load_coco
from mrcnn_helpers.evaluate import IOU_TYPE_PREFIX, METRIC_NAMES
from mrcnn_helpers.spec import spec_table as spec_rows
from mrcnn_helpers.spec.schema import BLOCKS

# COCO's small / medium / large split of instance areas (pixels^2), as pycocotools uses it.
SMALL_AREA, LARGE_AREA = 32**2, 96**2


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.6g}"
    if value == "":
        return '""'
    if isinstance(value, tuple):
        return "(" + ", ".join(_cell(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


@dataclass
class Table:
    """Rows of cells under a header; `bold` lists row indices to emphasize, `sections` maps a row
    index to a heading shown above it (e.g. spec blocks)."""

    columns: Sequence[str]
    rows: list[list[Any]]
    title: str = ""
    bold: set[int] = field(default_factory=set)
    sections: dict[int, str] = field(default_factory=dict)

    def column(self, name: str) -> list[Any]:
        """The values of one column, in row order."""
        index = list(self.columns).index(name)
        return [row[index] for row in self.rows]

    def _repr_html_(self) -> str:
        parts = ['<table style="border-collapse: collapse; font-size: 0.9em">']
        if self.title:
            parts.append(f'<caption style="text-align: left; font-weight: bold">'
                         f"{html.escape(self.title)}</caption>")
        head = "".join(f'<th style="text-align: left; padding: 2px 10px">{html.escape(str(c))}</th>'
                       for c in self.columns)
        parts.append(f"<thead><tr>{head}</tr></thead><tbody>")
        for i, row in enumerate(self.rows):
            if i in self.sections:
                parts.append(f'<tr><td colspan="{len(self.columns)}" style="text-align: left; '
                             f'font-weight: bold; background: #eee">'
                             f"{html.escape(self.sections[i])}</td></tr>")
            style = "font-weight: bold" if i in self.bold else ""
            cells = "".join(f'<td style="text-align: left; padding: 2px 10px; {style}">'
                            f"{html.escape(_cell(v))}</td>" for v in row)
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</tbody></table>")
        return "".join(parts)

    def __str__(self) -> str:
        text_rows = [[_cell(v) for v in row] for row in self.rows]
        widths = [max([len(str(c))] + [len(r[i]) for r in text_rows])
                  for i, c in enumerate(self.columns)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(self.columns, widths)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
        for i, row in enumerate(text_rows):
            if i in self.sections:
                lines.append(f"[{self.sections[i]}]")
            mark = " *" if i in self.bold else ""
            lines.append(("  ".join(c.ljust(w) for c, w in zip(row, widths))).rstrip() + mark)
        return "\n".join(lines)

    __repr__ = __str__


def spec_table(spec) -> Table:
    """Every field of an ExperimentSpec, block by block, in spec-file order.

    Columns: field, value, default. Rows whose value differs from the default are bold (in text
    form marked with '*'), so what an experiment changes stands out among ~70 fields.
    """
    defaults = {block: BLOCKS[block]() for block in BLOCKS}
    rows, bold, sections = [], set(), {}
    last_block = None
    for block, name, value, is_default in spec_rows(spec):
        if block != last_block:
            sections[len(rows)] = block
            last_block = block
        default = getattr(defaults["" if block == "experiment" else block], name)
        if not is_default:
            bold.add(len(rows))
        rows.append([name, value, default])
    return Table(["field", "value", "default"], rows, title=f"Spec: {spec.source}", bold=bold,
                 sections=sections)


def spec_changes(before, after) -> Table:
    """The fields whose value differs between two specs: field (dotted), before, after."""
    rows = []
    for (block, name, old, _), (_, _, new, _) in zip(spec_rows(before), spec_rows(after),
                                                      strict=True):
        if old != new:
            rows.append([name if block == "experiment" else f"{block}.{name}", old, new])
    return Table(["field", "before", "after"], rows, title=f"{len(rows)} fields changed")


def metrics_table(metrics: dict | None, title: str = "COCO metrics") -> Table:
    """COCO metrics side by side: one row per metric name (AP, AP50, ..., ARl), one column per
    iou type present (box = no prefix, mask = "mask_"). -1 (no ground truth in that area range)
    is shown as '-'. Extra scalars (eval_images, eval_images_per_sec) go to the title.
    metrics None (e.g. training stopped before its first evaluation) gives an empty table
    saying so."""
    if metrics is None:
        return Table(["metric"], [], title=f"{title}: no evaluation yet")
    kinds = [(label, prefix) for label, prefix in (("box", IOU_TYPE_PREFIX["bbox"]),
                                                    ("mask", IOU_TYPE_PREFIX["segm"]))
             if prefix + "AP" in metrics]
    rows = []
    for name in METRIC_NAMES:
        cells = []
        for _, prefix in kinds:
            value = metrics.get(prefix + name)
            cells.append(None if value is None or value < 0 else round(float(value), 4))
        rows.append([name] + cells)
    extras = []
    if "eval_images" in metrics:
        extras.append(f"{int(metrics['eval_images'])} images")
    if "eval_images_per_sec" in metrics:
        extras.append(f"{float(metrics['eval_images_per_sec']):.2f} images/s")
    title = title + (f" ({', '.join(extras)})" if extras else "")
    return Table(["metric"] + [label for label, _ in kinds], rows, title=title)


def dataset_summary(coco) -> Table:
    """Per-category statistics of a COCO instances set (a pycocotools COCO or a JSON path).

    Columns: class, instances, images (containing it), small / medium / large (COCO's area
    ranges, by annotation area), crowd. A final "all" row sums them; the title gives image count,
    images without annotations, and instances per image (mean and max).
    """
    if not hasattr(coco, "imgs"):
        coco = load_coco(coco)
    cats = sorted(coco.cats.values(), key=lambda c: c["id"])
    rows = []
    totals = Counter()
    for cat in cats:
        anns = coco.loadAnns(coco.getAnnIds(catIds=[cat["id"]]))
        areas = [float(a.get("area", 0.0)) for a in anns if not a.get("iscrowd", 0)]
        counts = Counter(
            instances=len(areas), images=len({a["image_id"] for a in anns}),
            small=sum(a < SMALL_AREA for a in areas),
            medium=sum(SMALL_AREA <= a < LARGE_AREA for a in areas),
            large=sum(a >= LARGE_AREA for a in areas),
            crowd=sum(1 for a in anns if a.get("iscrowd", 0)))
        totals.update(counts)
        rows.append([cat["name"], counts["instances"], counts["images"], counts["small"],
                     counts["medium"], counts["large"], counts["crowd"]])
    per_image = [len(coco.getAnnIds(imgIds=[i], iscrowd=False)) for i in coco.imgs]
    images_with_any = len({a["image_id"] for a in coco.anns.values()})
    rows.append(["all", totals["instances"], images_with_any, totals["small"], totals["medium"],
                 totals["large"], totals["crowd"]])
    n = len(per_image)
    mean = sum(per_image) / n if n else 0.0
    title = (f"{n} images, {n - images_with_any} without annotations, "
             f"{mean:.1f} instances per image (max {max(per_image, default=0)})")
    return Table(["class", "instances", "images", "small", "medium", "large", "crowd"], rows,
                 title=title, bold={len(rows) - 1})
