"""The package's shape: layers read one way, no import cycles, imports at the top, a fast CLI.

The import graph is read from the source with `ast` (every `import` statement, at module level or
inside functions), so a cycle hidden behind a function-level import is found too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mrcnn_helpers"

# Lower layers never import higher ones: spec -> data / model -> engine (train) -> inference ->
# evaluate -> export / deploy -> workflow, commands, cli, notebook.
LAYERS = {
    "errors": 0, "fileio": 0, "runtime": 0, "crypto": 0, "visualize": 0, "plotting": 0,
    "video_writer": 0,
    "spec": 1,
    "data": 2, "model": 2,
    "engine": 3,
    "inference": 4,
    "evaluate": 5,
    "export": 6, "deploy": 6,
    "workflow": 7, "commands": 7, "cli": 7, "notebook": 7, "__main__": 7, "__init__": 7,
}
# Imports that may stay inside functions: optional dependencies, and what a command line must
# not pay for at start-up.
OPTIONAL = {"onnx", "onnxruntime", "tensorrt", "cv2", "matplotlib", "IPython", "ipywidgets",
            "cryptography", "tensorboard", "torch.utils.tensorboard", "importlib.metadata",
            "google_crc32c", "papermill", "modelopt",
            "faster_coco_eval"}  # a dependency; evaluation falls back to pycocotools without it


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, modules: dict) -> list[tuple[str, int, bool]]:
    """(imported module of the package, line, at module level) for each import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    # Module level: the body, and blocks directly in it (`if TYPE_CHECKING:`, `try:`).
    top_level = set()
    for node in tree.body:
        top_level.add(id(node))
        for child in ast.iter_child_nodes(node):
            if isinstance(node, (ast.If, ast.Try)):
                top_level.add(id(child))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        found += [(target, node.lineno, id(node) in top_level) for target in targets]
    return found


def _graph():
    modules = _modules()
    graph = {name: set() for name in modules}
    inner = []  # (module, imported, line) for imports inside functions
    for name, path in modules.items():
        for target, line, top in _imports(path, name, modules):
            if target in modules and target != name:
                graph[name].add(target)
            if not top:
                inner.append((name, target, line))
    return graph, inner


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> tuple[str, int]:
    return _top(module), LAYERS[_top(module)]


def test_every_module_has_a_layer():
    assert sorted({_top(m) for m in _modules()} - set(LAYERS)) == []


def test_layers_read_one_way():
    graph, _ = _graph()
    wrong = []
    for module, targets in graph.items():
        home, rank = _layer(module)
        for target in targets:
            other, other_rank = _layer(target)
            # Siblings of one layer stay apart (deploy never reaches into export), except the
            # utilities at the bottom and the entry points at the top.
            sibling = other_rank == rank and rank not in (0, max(LAYERS.values()))
            if other != home and (other_rank > rank or sibling):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_import_cycles():
    graph, _ = _graph()
    # Package __init__ files re-export their submodules: an edge pkg -> pkg.sub is not a cycle
    # back into the package, so drop parent -> child edges before looking.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_imports_inside_functions_are_optional_dependencies_only():
    _, inner = _graph()
    allowed = [(m, t, line) for m, t, line in inner
               if t.split(".")[0] in OPTIONAL or t in OPTIONAL
               # The data commands import their module when they run, so that `mrcnn --help`
               # does not import torch (see cli.py).
               or m == "mrcnn_helpers.data.commands"]
    assert sorted(set(inner) - set(allowed)) == []


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["--version"]])
def test_cli_answers_without_importing_torch(argv):
    code = ("import sys\nfrom mrcnn_helpers.cli import main\n"
            "try:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')" % (argv,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip().endswith("NO-TORCH")
    assert "usage: mrcnn" in out or "mrcnn " in out


def test_tlt_spellings_are_accepted_and_help_lists_each_option_once(capsys):
    from mrcnn_helpers.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["infer", "-m", "m", "-i", "in", "-o", "out", "--include_mask",
                              "-k", "KEY", "-e", "spec.txt", "-l", "labels.json", "-t", "0.5"])
    assert args.include_mask and args.key == "KEY"
    args = parser.parse_args(["export", "-m", "m", "-o", "x.onnx", "-k", "K", "--data_type",
                              "int8", "--cal_image_dir", "d", "--batch_size", "2", "--batches",
                              "3", "--cal_cache_file", "c.json", "--cal_data_file", "c.bin",
                              "--gen_ds_config"])
    assert (args.data_type, args.cal_image_dir, args.batch_size, args.cal_cache_file) == (
        "int8", "d", 2, "c.json") and args.gen_ds_config
    args = parser.parse_args(["train", "-e", "s", "-r", "r", "-k", "K", "--gpus", "2"])
    assert args.gpus == 2 and args.key == "K"
    with pytest.raises(SystemExit):
        parser.parse_args(["infer", "--help"])
    text = capsys.readouterr().out
    assert "--include-mask" in text and "--include_mask" not in text
    assert "(default: 0.5)" in text


# The command lines of the TLT Mask R-CNN post, as printed there.
TLT_POST_LINES = [
    "tlt-train mask_rcnn -e $spec_file_path -r $experiment_dir -k $KEY --gpus N",
    "tlt-evaluate mask_rcnn -e $spec_file_path -m $model_path -k $KEY",
    "tlt-infer mask_rcnn  -i $input_images_dir  -o $annotated_images_dir -e $spec_file "
    "-m $tlt_model -l $json_label -t $threshold  --include_mask ",
    "tlt-export mask_rcnn -m $model_path -o $int8_etlt_file -e $spec_file -k $KEY "
    "--cal_image_dir $calibration_image_dir --batch_size N  --batches $num_cal_batches "
    "--cal_cache_file $calibration_table --cal_data_file $calibration_data_cache --data_type int8",
]


def test_tlt_post_command_lines_parse_with_only_the_program_changed():
    import shlex

    from mrcnn_helpers.cli import build_parser

    values = {"N": "2", "threshold": "0.5", "num_cal_batches": "10"}
    parser = build_parser()
    for line in TLT_POST_LINES:
        words = shlex.split(line)
        assert words[0].startswith("tlt-") and words[1] == "mask_rcnn"
        command = words[0][len("tlt-"):]
        argv = [command] + [values.get(w.lstrip("$"), w.lstrip("$").replace("_", "-") + ".x")
                            if w.startswith("$") or w == "N" else w for w in words[2:]]
        args = parser.parse_args(argv)
        assert args.command == command
        if command != "infer":
            assert args.key == "KEY.x"
    export = parser.parse_args(["export"] + [values.get(w.lstrip("$"), w) for w in
                                             shlex.split(TLT_POST_LINES[3])[2:]])
    assert (export.data_type, export.batch_size, export.batches) == ("int8", 2, 10)
    assert export.cal_cache_file == "$calibration_table" and export.key == "$KEY"


def test_every_argument_of_every_command_has_help():
    import argparse

    from mrcnn_helpers.cli import build_parser

    missing, seen = [], 0

    def walk(parser, path):
        nonlocal seen
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif not isinstance(action, argparse._HelpAction):
                seen += 1
                if not action.help:
                    missing.append(" ".join(path + [action.dest]))

    walk(build_parser(), ["mrcnn"])
    assert seen > 100 and missing == []


def test_unknown_option_names_the_subcommand(capsys):
    from mrcnn_helpers.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "-m", "m", "--no-such-flag"])
    err = capsys.readouterr().err
    assert err.startswith("usage: mrcnn evaluate") and "--no-such-flag" in err


@pytest.mark.parametrize("argv, message", [
    (["infer", "-m", "m", "-i", "i", "-o", "o", "-t", "2"], "between 0 and 1"),
    (["infer", "-m", "m", "-i", "i", "-o", "o", "-t", "nan"], "between 0 and 1"),
    (["deploy", "-m", "m", "-i", "i", "-o", "o", "--max-frames", "-1"], "must be >= 1"),
    (["evaluate", "-m", "m", "--max-images", "0"], "must be >= 1"),
])
def test_out_of_range_values_are_refused(argv, message, capsys):
    from mrcnn_helpers.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
