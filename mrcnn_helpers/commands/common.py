"""What several commands share: loading the model behind -m, reading a labels file."""

from __future__ import annotations

import json

from mrcnn_helpers.errors import MrcnnError
from mrcnn_helpers.inference.loading import load_model_file
from mrcnn_helpers.inference.predictor import Predictor
from mrcnn_helpers.runtime import resolve_device
from mrcnn_helpers.spec import load_spec, replace_spec


def load_for_inference(args, *, precision: str | None = None) -> Predictor:
    """The model behind -m (with -e's spec when given, -k's key, --device, --batch-size) as a
    Predictor."""
    spec = load_spec(args.experiment_spec) if getattr(args, "experiment_spec", None) else None
    loaded = load_model_file(args.model, spec=spec, device=resolve_device(args.device),
                             key=args.key)
    spec = loaded.spec
    if getattr(args, "batch_size", None) and hasattr(spec, "eval_batch_size"):
        spec = replace_spec(spec, eval_batch_size=int(args.batch_size))
    return Predictor(loaded.model, spec, loaded.class_names, category_ids=loaded.category_ids,
                     precision=precision, source=str(loaded.source))


def read_labels(path: str, num_classes: int) -> list[str]:
    """Class names from a labels file: one name per line, or JSON (a list of names, an
    {id: name} object, or a COCO file's "categories"). Background may be included first.
    Raises MrcnnError naming the file when it cannot be read or the count does not fit."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise MrcnnError(f"cannot read labels file {path}: {exc}") from None
    names = _json_names(text)
    if names is None:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) == num_classes - 1:
        names = ["background"] + names
    if len(names) != num_classes:
        raise MrcnnError(f"{path}: {len(names)} labels, but the model has {num_classes - 1} "
                         "classes (one label per line, no background)")
    return names


def _json_names(text: str) -> list[str] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("categories"), list):
        data = {c.get("id"): c.get("name") for c in data["categories"] if isinstance(c, dict)}
    if isinstance(data, dict):
        try:
            return [str(data[k]) for k in sorted(data, key=lambda k: int(k))]
        except (TypeError, ValueError):
            return None
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        return list(data)
    return None
