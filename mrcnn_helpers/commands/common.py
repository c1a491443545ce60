"""What several commands share: loading the model behind -m, reading a labels file, and the
check that no output lands on an input."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from pathlib import Path

from mrcnn_helpers.errors import MrcnnError
from mrcnn_helpers.fileio import check_output_path
from mrcnn_helpers.inference.loading import LoadedModel, load_model_file
from mrcnn_helpers.inference.metadata import sidecar_path
from mrcnn_helpers.inference.predictor import Predictor
from mrcnn_helpers.runtime import resolve_device
from mrcnn_helpers.spec import PATH_FIELDS, load_spec, replace_spec

# A labels file is a short text: more than this is no labels file (and is not read whole).
MAX_LABELS_BYTES = 16 << 20


@contextlib.contextmanager
def memory_errors_named(command: str):
    """Running out of memory inside `command` (torch's allocator, MemoryError, CUDA) as one
    MrcnnError line with what to change, instead of a traceback: under a memory limit
    (`ulimit -v`) or on a small machine this is the ordinary way a large batch fails."""
    try:
        yield
    except MrcnnError:
        raise
    except (MemoryError, RuntimeError) as exc:
        text = str(exc)
        # oneDNN says "could not create a primitive" when its buffers cannot be allocated.
        if not (isinstance(exc, MemoryError) or any(
                marker in text.lower() for marker in ("can't allocate memory", "out of memory",
                                                      "could not create a primitive"))):
            raise
        lines = [line for line in text.splitlines() if line.strip()]
        detail = lines[0] if lines else type(exc).__name__
        detail = detail.split("] ", 1)[-1]  # torch's "[enforce fail at alloc_cpu.cpp:127]"
        raise MrcnnError(f"{command} ran out of memory ({detail}); lower --batch-size, or free "
                         "memory / raise the process's memory limit (ulimit -v)") from None


def spec_inputs(spec) -> list[str]:
    """The files and folders `spec` names for reading (its PATH_FIELDS: data files and folders,
    the pretrained checkpoint; TFRecord patterns expanded to the files they match)."""
    found = []
    for field in sorted(PATH_FIELDS):
        block, _, name = field.rpartition(".")
        value = getattr(getattr(spec, block, None) if block else spec, name, None)
        if not isinstance(value, str) or not value or "://" in value:
            continue
        found += sorted(glob.glob(value)) if field.endswith("file_pattern") else [value]
    return found


def model_inputs(model: str | None) -> list[str]:
    """What -m makes a command read: the file itself, or for a results directory the model files
    and spec copy in it (every `*.pth`, `spec.txt`): the directory is where training writes its
    outputs, so metrics, annotated images or exports beside them are fine, only over them not."""
    if not model or not os.path.isdir(model):
        return [model] if model else []
    return [os.path.join(model, name) for name in sorted(os.listdir(model))
            if name.endswith(".pth") or name == "spec.txt"]


def command_inputs(args, loaded: LoadedModel | None = None, spec=None) -> list[str]:
    """Everything a command reads: -m (model_inputs; and the file it resolved to, an engine's
    sidecar JSON), -e, -i, -l, --ann, and the files the spec (`spec`, or the loaded model's)
    names."""
    paths = model_inputs(getattr(args, "model", None))
    paths += [getattr(args, name, None) for name in ("experiment_spec", "input", "labels", "ann",
                                                      "cal_image_dir")]
    if spec is not None:
        paths += spec_inputs(spec)
    if loaded is not None:
        paths.append(str(loaded.source))
        if loaded.kind == "tensorrt":
            paths.append(str(sidecar_path(loaded.source)))
        paths += spec_inputs(loaded.spec)
    return [p for p in paths if p]


def check_outputs(outputs: dict, inputs: list[str]) -> None:
    """Refuse (MrcnnError naming both) an output that is an input, lies in an input folder,
    is a folder holding one (fileio.check_output_path), or is another output of the command.
    outputs: {option: path or None}."""
    seen: dict[str, str] = {}
    for option, path in outputs.items():
        if not path:
            continue
        check_output_path(path, inputs, option=option)
        key = os.path.realpath(os.path.expanduser(os.fspath(path)))
        if key in seen:
            raise MrcnnError(f"{option} {path} is also {seen[key]}: one would overwrite the "
                             "other; give them different paths")
        seen[key] = option


def load_for_inference(args, *, precision: str | None = None,
                       outputs: dict | None = None) -> Predictor:
    """The model behind -m (with -e's spec when given, -k's key, --device, --batch-size) as a
    Predictor, once its outputs are known not to land on anything it reads.

    outputs: {option: path} the command writes; --json is always among them. They are checked
    (check_outputs) against command_inputs before the model is read, and again once the
    model's spec has named its data files.
    """
    outputs = {"--json": getattr(args, "json", None), **(outputs or {})}
    check_outputs(outputs, command_inputs(args))
    spec = load_spec(args.experiment_spec) if getattr(args, "experiment_spec", None) else None
    check_outputs(outputs, command_inputs(args, spec=spec))
    loaded = load_model_file(args.model, spec=spec, device=resolve_device(args.device),
                             key=args.key)
    check_outputs(outputs, command_inputs(args, loaded))
    spec = loaded.spec
    if getattr(args, "batch_size", None) and hasattr(spec, "eval_batch_size"):
        spec = replace_spec(spec, eval_batch_size=int(args.batch_size))
    return Predictor(loaded.model, spec, loaded.class_names, category_ids=loaded.category_ids,
                     precision=precision, source=str(loaded.source))


def read_labels(path: str, num_classes: int) -> list[str]:
    """Class names from a labels file: one name per line, or JSON (a list of names, an
    {id: name} object, or a COCO file's "categories"). Background may be included first.
    Raises MrcnnError naming the file when it cannot be read, is larger than a labels file can
    be, or the count does not fit."""
    try:
        if Path(path).is_dir():
            raise MrcnnError(f"labels file {path} is a folder: name a text or JSON file")
        size = Path(path).stat().st_size
        if size > MAX_LABELS_BYTES:
            raise MrcnnError(f"labels file {path} is {size} bytes, more than a labels file's "
                             f"{MAX_LABELS_BYTES}: name a text file with one class per line")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise MrcnnError(f"cannot read labels file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise MrcnnError(f"labels file {path} is not UTF-8 text: name a text file with one "
                         "class per line, or a JSON list") from None
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
    except (ValueError, RecursionError):
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
