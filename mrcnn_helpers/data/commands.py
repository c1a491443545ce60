"""`mrcnn data ...` subcommands: thin wrappers over the data functions the notebooks call.

    mrcnn data synthetic OUT_DIR                      the embedded synthetic shapes dataset
    mrcnn data download-coco DIR                      COCO 2017, resumable and verified
    mrcnn data convert-labelme DIR OUT_JSON           LabelMe JSON folder -> COCO
    mrcnn data convert-voc VOC_ROOT OUT_JSON          VOC instance PNGs -> COCO
    mrcnn data convert-masks ROOT OUT_JSON            per-instance mask PNGs -> COCO
    mrcnn data coco-subset IN_JSON OUT_JSON -c a,b    keep some categories (ids 1..K)
    mrcnn data coco-merge OUT_JSON -i JSON IMAGES ... merge datasets, remapping ids
    mrcnn data check JSON --images DIR [--fix OUT]    the dataset doctor (exit 1 on errors)
    mrcnn data to-tfrecord JSON IMAGES OUT_PREFIX     TLT's sharded TFRecords

Bad input raises MrcnnError subclasses, which the CLI prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os


def _print_result(result: dict) -> None:
    for key, value in result.items():
        if key == "report":
            continue
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list, tuple)) else value}")


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def cmd_synthetic(args) -> int:
    from .synthetic import generate_synthetic_dataset

    h, w = args.image_size
    _print_result(generate_synthetic_dataset(args.out_dir, num_train=args.num_train,
                                             num_val=args.num_val, image_size=(h, w),
                                             seed=args.seed, style=args.style))
    return 0


def cmd_download_coco(args) -> int:
    from .download import DEFAULT_BASE_URL, download_coco, load_manifest

    manifest = load_manifest(args.manifest) if args.manifest else None
    _print_result(download_coco(args.out_dir, parts=tuple(args.parts), base_url=args.base_url or DEFAULT_BASE_URL,
                                manifest=manifest, keep_archives=not args.delete_archives,
                                progress=not args.no_progress))
    return 0


def cmd_convert_labelme(args) -> int:
    from .convert import read_label_list
    from .labelme import convert_labelme

    labels = read_label_list(args.labels) if args.labels else None
    _print_result(convert_labelme(args.labelme_dir, args.out_json, labels=labels,
                                  polygon_tolerance=args.polygon_tolerance,
                                  progress=not args.no_progress))
    return 0


def cmd_convert_voc(args) -> int:
    from .convert import VOC_CLASSES, convert_voc, read_name_list

    names = VOC_CLASSES
    if args.class_names:
        names = tuple(read_name_list(args.class_names, "class names file"))
    _print_result(convert_voc(args.voc_root, args.out_json, split=args.split, class_names=names,
                              polygon_tolerance=args.polygon_tolerance,
                              progress=not args.no_progress))
    return 0


def cmd_convert_masks(args) -> int:
    from .convert import convert_mask_folder

    _print_result(convert_mask_folder(args.root, args.out_json, categories=_names(args.categories),
                                      images_subdir=args.images_subdir,
                                      masks_subdir=args.masks_subdir,
                                      polygon_tolerance=args.polygon_tolerance,
                                      progress=not args.no_progress))
    return 0


def cmd_coco_subset(args) -> int:
    from .coco_edit import coco_subset

    _print_result(coco_subset(args.in_json, args.out_json, _names(args.categories),
                              keep_empty_images=args.keep_empty_images,
                              renumber=not args.keep_ids))
    return 0


def cmd_coco_merge(args) -> int:
    from .coco_edit import coco_merge

    _print_result(coco_merge([tuple(pair) for pair in args.inputs], args.out_json,
                             image_root=args.image_root))
    return 0


def _report_path(args) -> str:
    """Where `data check` writes its warnings JSON: --report, else <json stem>_warnings.json in
    the --fix folder, else beside the annotation file (never the current directory)."""
    from ..fileio import check_output_path

    stem = os.path.splitext(os.path.basename(args.json_file))[0]
    if args.report:
        check_output_path(args.report, [args.json_file, args.images], option="--report")
        return args.report
    folder = args.fix or os.path.dirname(os.path.abspath(args.json_file))
    return os.path.join(folder, f"{stem}_warnings.json")


def cmd_check(args) -> int:
    """Exit status: 0 when the dataset (with --fix: the fixed copy) has no error, else 1."""
    from ..errors import DataError
    from .doctor import check_dataset, fix_dataset

    if args.fix and args.images is None:
        raise DataError("--fix needs --images: missing and corrupt images must be left out")
    if args.workers < 1 or args.workers > 256:
        raise DataError(f"--workers {args.workers}: expected 1 to 256 threads")
    report_path = _report_path(args)
    progress = not args.no_progress
    report = check_dataset(args.json_file, args.images, decode_images=not args.quick,
                           workers=args.workers, progress=progress)
    print(report.format())
    if args.fix:
        fixed = fix_dataset(args.json_file, args.images, args.fix, copy_images=args.copy_images,
                            report=report, progress=progress)
        report.write_json(report_path)
        print(f"report: {report_path}")
        again = check_dataset(fixed["json"], fixed["images"], decode_images=not args.quick,
                              workers=args.workers, progress=progress)
        print(f"fixed copy: {fixed['json']} ({fixed['num_images']} images, "
              f"{fixed['num_annotations']} annotations), images in {fixed['images']}: "
              f"{again.num_errors} errors, {again.num_warnings} warnings")
        return 0 if again.ok else 1
    report.write_json(report_path)
    print(f"report: {report_path}")
    return 0 if report.ok else 1


def cmd_to_tfrecord(args) -> int:
    from .coco_tfrecord import write_coco_tfrecords

    result = write_coco_tfrecords(args.json_file, args.images, args.out_prefix, args.shards,
                                  include_masks=not args.no_masks, progress=not args.no_progress)
    result["files"] = f"{len(result['files'])} files: {result['files'][0]} ..."
    _print_result(result)
    return 0


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Add the `data` command and its subcommands to an argparse subparsers object.

    Each subcommand sets `func` (taking the parsed args, returning the exit status). One flat
    list of declarations, long on purpose: it reads top to bottom like the help it produces.
    """
    p = subparsers.add_parser("data", help="prepare, convert and check datasets")
    sub = p.add_subparsers(dest="data_command", required=True)

    s = sub.add_parser("synthetic", help="write the embedded synthetic COCO dataset")
    s.add_argument("out_dir", help="folder for train/, val/ and annotations/")
    s.add_argument("--num-train", type=int, default=400, help="training images")
    s.add_argument("--num-val", type=int, default=50, help="validation images")
    s.add_argument("--image-size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"),
                   help="height and width of every image")
    s.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    s.add_argument("--style", choices=("textured", "simple"), default="textured",
                   help="textured backgrounds and objects, or the CPU demo's simpler task")
    s.set_defaults(func=cmd_synthetic)

    s = sub.add_parser("download-coco", help="download and extract COCO 2017 (resumable)")
    s.add_argument("out_dir", help="folder for the archives and the extracted dataset")
    s.add_argument("--parts", nargs="+", default=["annotations", "val", "train"],
                   help="manifest parts to fetch (default: annotations val train)")
    s.add_argument("--base-url", default=None, help="mirror holding zips/ and annotations/")
    s.add_argument("--manifest", default=None,
                   help='JSON {part: {"path", "size", "md5"}} replacing the built-in COCO 2017 one')
    s.add_argument("--delete-archives", action="store_true", help="delete zips once extracted")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_download_coco)

    tolerance = {"type": float, "default": 0.0,
                 "help": "simplify polygons by this many px (0 = exact pixel outlines)"}
    quiet = {"action": "store_true", "help": "no progress bar (none is drawn off a terminal)"}
    s = sub.add_parser("convert-labelme", help="LabelMe JSON folder -> COCO instances JSON")
    s.add_argument("labelme_dir", help="folder of LabelMe .json files and their images")
    s.add_argument("out_json", help="COCO instances JSON to write")
    s.add_argument("--labels", default=None, help="class names file, one per line, in id order")
    s.add_argument("--polygon-tolerance", **tolerance)
    s.add_argument("--no-progress", **quiet)
    s.set_defaults(func=cmd_convert_labelme)

    s = sub.add_parser("convert-voc", help="VOC SegmentationObject/Class PNGs -> COCO")
    s.add_argument("voc_root", help="the VOC folder (JPEGImages/, SegmentationObject/, ...)")
    s.add_argument("out_json", help="COCO instances JSON to write")
    s.add_argument("--split", default=None, help="ImageSets/Segmentation/<split>.txt to use")
    s.add_argument("--class-names", default=None,
                   help="file of class names by index, background first (default: VOC's 20)")
    s.add_argument("--polygon-tolerance", **tolerance)
    s.add_argument("--no-progress", **quiet)
    s.set_defaults(func=cmd_convert_voc)

    s = sub.add_parser("convert-masks", help="ROOT/images + ROOT/masks/<image>/<class>_<k>.png "
                                             "-> COCO")
    s.add_argument("root", help="folder holding the images and masks subfolders")
    s.add_argument("out_json", help="COCO instances JSON to write")
    s.add_argument("--categories", default=None, help="comma-separated names in id order")
    s.add_argument("--images-subdir", default="images", help="images folder under ROOT")
    s.add_argument("--masks-subdir", default="masks", help="masks folder under ROOT")
    s.add_argument("--polygon-tolerance", **tolerance)
    s.add_argument("--no-progress", **quiet)
    s.set_defaults(func=cmd_convert_masks)

    s = sub.add_parser("coco-subset", help="keep some categories, renumbered 1..K")
    s.add_argument("in_json", help="COCO instances JSON to read")
    s.add_argument("out_json", help="COCO instances JSON to write")
    s.add_argument("-c", "--categories", required=True,
                   help="comma-separated names or ids, in the new id order")
    s.add_argument("--keep-empty-images", action="store_true",
                   help="keep images left without annotations")
    s.add_argument("--keep-ids", action="store_true", help="keep the original category ids")
    s.set_defaults(func=cmd_coco_subset)

    s = sub.add_parser("coco-merge", help="merge COCO datasets, remapping image / annotation / "
                                          "category ids")
    s.add_argument("out_json", help="merged COCO instances JSON to write")
    s.add_argument("-i", "--input", dest="inputs", nargs=2, action="append", required=True,
                   metavar=("JSON", "IMAGES"), help="a dataset to merge (repeat)")
    s.add_argument("--image-root", default=None,
                   help="folder file_name entries are relative to (default: common parent)")
    s.set_defaults(func=cmd_coco_merge)

    s = sub.add_parser("check", help="the dataset doctor: report problems, optionally fix a copy")
    s.add_argument("json_file", help="COCO instances JSON to check")
    s.add_argument("--images", default=None, help="image folder (omit to check the JSON only)")
    s.add_argument("--report", default=None,
                   help="warnings JSON path (default: <json stem>_warnings.json beside the "
                        "JSON, or in the --fix folder)")
    s.add_argument("--fix", default=None, metavar="OUT_DIR",
                   help="write a cleaned copy there (new or empty folder)")
    s.add_argument("--copy-images", action="store_true",
                   help="with --fix: copy images instead of linking them")
    s.add_argument("--quick", action="store_true",
                   help="read image headers only (misses truncated files)")
    s.add_argument("--workers", type=int, default=8, help="threads reading images")
    s.add_argument("--no-progress", **quiet)
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("to-tfrecord", help="COCO -> sharded TFRecords in TLT's schema")
    s.add_argument("json_file", help="COCO instances JSON")
    s.add_argument("images", help="its image folder")
    s.add_argument("out_prefix", help="files are OUT_PREFIX-00000-of-0000N.tfrecord")
    s.add_argument("--shards", type=int, default=1, help="number of output files")
    s.add_argument("--no-masks", action="store_true", help="leave out image/object/mask")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_to_tfrecord)
    return p
