"""Editing COCO instances files: keep a subset of categories, merge several datasets.

Both write a new JSON (atomically) and refuse an output that is one of their inputs. Category
ids of the output run 1..K, as the toolkit's labels and TLT's num_classes (= K + 1) expect.
Categories are named by their names, so a file where two categories share a name is refused
where a name would pick one of them silently (select those by id).
"""

from __future__ import annotations

import os

from ..errors import DataError
from ..fileio import check_output_path
from .coco import load_coco
from .convert import write_coco_json


def _shared_names(cats: list[dict]) -> dict[str, list[int]]:
    """{name: [ids]} of the category names that more than one category has."""
    ids: dict[str, list[int]] = {}
    for cat in cats:
        ids.setdefault(str(cat["name"]), []).append(cat["id"])
    return {name: found for name, found in ids.items() if len(found) > 1}


def _select_categories(cats: list[dict], wanted, source: str) -> list[dict]:
    """The category dicts named by `wanted` (names, or ids as int / digit strings), in its order."""
    by_name = {str(c["name"]): c for c in cats}
    by_id = {int(c["id"]): c for c in cats}
    shared = _shared_names(cats)
    out = []
    for item in wanted:
        if str(item) in shared:
            raise DataError(f"{source}: categories {shared[str(item)]} are all named "
                            f"{str(item)!r}; select them by id (e.g. -c "
                            f"{','.join(map(str, shared[str(item)]))})")
        cat = by_name.get(str(item))
        if cat is None and str(item).strip().lstrip("-").isdigit():
            cat = by_id.get(int(item))
        if cat is None:
            raise DataError(f"{source}: no category named or numbered {item!r}; it has "
                            f"{[(c['id'], c['name']) for c in cats][:20]}")
        if cat in out:
            raise DataError(f"category {item!r} selected twice")
        out.append(cat)
    if not out:
        raise DataError("select at least one category")
    return out


def coco_subset(json_file: str | os.PathLike, out_json: str | os.PathLike, categories, *,
                keep_empty_images: bool = False, renumber: bool = True) -> dict:
    """Keep only some categories of a COCO instances file.

    categories: names or ids, in the order that gives the new ids (1..K when renumber; original
    ids kept otherwise); a name two categories share is refused (give their ids). Annotations of other categories are dropped; images left without
    annotations are dropped unless keep_empty_images. Image and annotation ids are unchanged,
    so results still match the original images. Returns dict(json, num_images,
    num_annotations, categories=[(new id, name, old id)]).
    """
    source = os.fspath(json_file)
    check_output_path(out_json, [source], option="output JSON")
    coco = load_coco(source)
    data = coco.dataset
    chosen = _select_categories(data["categories"], categories, source)
    new_id = {c["id"]: (i if renumber else c["id"]) for i, c in enumerate(chosen, start=1)}
    annotations = [dict(a, category_id=new_id[a["category_id"]]) for a in data["annotations"]
                   if a["category_id"] in new_id]
    used = {a["image_id"] for a in annotations}
    images = [img for img in data["images"] if keep_empty_images or img["id"] in used]
    out = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    out.update(images=images, annotations=annotations,
               categories=[dict(c, id=new_id[c["id"]]) for c in chosen])
    return {"json": write_coco_json(out, out_json), "num_images": len(images),
            "num_annotations": len(annotations),
            "categories": [(new_id[c["id"]], c["name"], c["id"]) for c in chosen]}


def coco_merge(sources, out_json: str | os.PathLike, *, image_root: str | os.PathLike | None = None
               ) -> dict:
    """Merge COCO instances datasets into one, remapping every id.

    sources: list of (json_file, image_dir). Categories are matched by name (first spelling and
    supercategory kept) and numbered 1..K in order of first appearance. Images are matched by
    their real file path: the same file in two inputs becomes one image carrying the
    annotations of both (e.g. separate annotation files per class over one image folder); it
    must have the same size in both. Image ids become 1..N, annotation ids 1..M. file_name
    entries are relative to image_root (default: the deepest folder containing every input's
    images). Returns dict(json, images=image_root, num_images, num_annotations, categories).
    """
    sources = [(os.fspath(j), os.fspath(d)) for j, d in sources]
    if not sources:
        raise DataError("coco_merge needs at least one (json, image_dir) input")
    check_output_path(out_json, [j for j, _ in sources], option="output JSON")
    dirs = [os.path.realpath(d) for _, d in sources]
    root = os.path.realpath(os.fspath(image_root)) if image_root else os.path.commonpath(dirs)
    categories: dict[str, dict] = {}
    images: dict[str, dict] = {}
    annotations = []
    for (json_file, _), image_dir in zip(sources, dirs):
        data = load_coco(json_file).dataset
        shared = _shared_names(data["categories"])
        if shared:
            name, ids = next(iter(shared.items()))
            raise DataError(f"{json_file}: categories {ids} are all named {name!r}; merging matches "
                            f"categories by name, so rename them or keep one "
                            f"(`mrcnn data coco-subset`) first")
        cat_map = {}
        for cat in data["categories"]:
            name = str(cat["name"])
            if name not in categories:
                categories[name] = dict(cat, id=len(categories) + 1)
            cat_map[cat["id"]] = categories[name]["id"]
        image_map = {}
        for img in data["images"]:
            path = os.path.realpath(os.path.join(image_dir, img["file_name"]))
            known = images.get(path)
            if known is None:
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                known = images[path] = dict(img, id=len(images) + 1, file_name=rel)
            elif (known["width"], known["height"]) != (img["width"], img["height"]):
                raise DataError(f"{json_file}: image {img['file_name']} is {img['width']}x"
                                f"{img['height']} (w x h) here but {known['width']}x"
                                f"{known['height']} in an earlier input")
            image_map[img["id"]] = known["id"]
        for ann in data["annotations"]:
            annotations.append(dict(ann, id=len(annotations) + 1, image_id=image_map[ann["image_id"]],
                                    category_id=cat_map[ann["category_id"]]))
    out = {"info": {"description": "merged from " + ", ".join(j for j, _ in sources)},
           "images": list(images.values()), "annotations": annotations,
           "categories": list(categories.values())}
    return {"json": write_coco_json(out, out_json), "images": root, "num_images": len(images),
            "num_annotations": len(annotations), "categories": list(categories)}
