#!/usr/bin/env python3
"""TensorRT Python API names, per version: generate the vendored lists, check code against them.

TensorRT cannot run on this project's machines, but its Python bindings can be read there: the
`tensorrt-cu12-bindings` (10.x) and `tensorrt-cu13-bindings` (11.x) wheels on PyPI are ~1.3 MB
and hold `tensorrt_bindings/tensorrt.so`, a pybind11 module. That module imports only a handful
of functions from libnvinfer / libnvinfer_plugin / libnvonnxparser (the factories
createInferBuilder_INTERNAL, createNvOnnxParser_INTERNAL, ...), and its import registers every
class, method and enum value without calling them. So `generate` builds empty stand-ins for
those libraries (C functions that return 0, compiled with the system's `cc`), imports the
bindings against them in a subprocess and writes what `dir()` shows, one name a line:

    Builder                      a module attribute (class, function, constant)
    Builder.create_network       an attribute of a class (method, property, enum member)
    ILogger.Severity.WARNING     one level deeper, for nested classes

Names come from the compiled module, so they are exact per class (a plain `strings` over the
.so cannot tell BuilderFlag.INT8 from DataType.INT8, and the linker stores short names inside
longer ones, e.g. "INT8" only as the tail of "UINT8"). The stand-ins are never executed
beyond the module's own initialisation.

    python tools/trt_api_names.py generate 10.8.0.43 10.16.1.11 11.4.0.106   # downloads wheels
    python tools/trt_api_names.py generate --wheel path/to/tensorrt_cu13_bindings-....whl
    python tools/trt_api_names.py check      # the project's TensorRT code against every list

`check` (and tests/test_tensorrt.py) read the project's TensorRT modules with `ast`: chains on
the `trt` module (`trt.BuilderFlag.FP16`), and attributes of objects whose TensorRT type is known
from how they were made (`builder = trt.Builder(...)`, `network = builder.create_network(...)`,
`self.context = self.engine.create_execution_context()`). Names probed with
`hasattr(obj, "NAME")` are version switches: each must exist in at least one vendored version.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST_DIR = Path(__file__).resolve().parent / "trt_api"
# The project's modules that call TensorRT (as `trt = import_tensorrt()`).
PROJECT_MODULES = ("mrcnn_helpers/export/tensorrt.py", "mrcnn_helpers/inference/tensorrt.py")
# Object types that TensorRT calls return: (type of the receiver, method) -> type of the result.
RETURNS = {
    ("Builder", "create_network"): "INetworkDefinition",
    ("Builder", "create_builder_config"): "IBuilderConfig",
    ("Builder", "build_serialized_network"): "IHostMemory",
    ("Runtime", "deserialize_cuda_engine"): "ICudaEngine",
    ("ICudaEngine", "create_execution_context"): "IExecutionContext",
    ("OnnxParser", "get_error"): "ParserError",
    ("INetworkDefinition", "get_input"): "ITensor",
    ("INetworkDefinition", "get_output"): "ITensor",
    ("INetworkDefinition", "get_layer"): "ILayer",
}
UNDEFINED_SKIP = re.compile(r"^(_?Py|_ITM_|__gmon_start__|__cxa_|__pthread_|pthread_|dl)")


# ---------------------------------------------------------------- reading the bindings
def _wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def download_wheel(version: str, directory: Path) -> Path:
    """pip download the bindings wheel of `version` (10.x: cu12, 11.x: cu13) for this Python."""
    package = "tensorrt-cu13-bindings" if int(version.split(".")[0]) >= 11 else \
        "tensorrt-cu12-bindings"
    tag = f"{sys.version_info.major}{sys.version_info.minor}"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", tag, "--platform", "manylinux_2_28_x86_64",
                    "-d", str(directory), f"{package}=={version}"], check=True)
    found = sorted(directory.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip did not leave a {package} {version} wheel in {directory}")
    return found[0]


def _stub_libraries(so: Path, directory: Path) -> None:
    """Empty stand-ins for the NVIDIA libraries `so` links against, in `directory`."""
    dynamic = subprocess.run(["readelf", "-d", str(so)], check=True, capture_output=True,
                             text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(libnv[^\]]+)\]", dynamic)
    symbols = subprocess.run(["nm", "-D", "--undefined-only", str(so)], check=True,
                             capture_output=True, text=True).stdout
    names = sorted({line.split()[-1] for line in symbols.splitlines()
                    if line.split() and line.split()[0] == "U" and "@" not in line.split()[-1]
                    and not UNDEFINED_SKIP.match(line.split()[-1])})
    source = directory / "stub.c"
    source.write_text("".join(f"void *{name}(void) {{ return 0; }}\n" for name in names))
    for lib in needed:
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(directory / lib), str(source)],
                       check=True)


# Runs in a subprocess against the stand-ins: prints the sorted names as JSON.
_WALK = r"""
import inspect, json, sys
sys.path.insert(0, sys.argv[1])
import tensorrt_bindings as trt
names = set()
def public(obj):
    return [n for n in dir(obj) if not n.startswith("_")]
for name in public(trt) + ["__version__"]:
    names.add(name)
    value = getattr(trt, name)
    if not inspect.isclass(value):
        continue
    for attr in public(value):
        names.add(f"{name}.{attr}")
        inner = getattr(value, attr, None)
        if inspect.isclass(inner) and inner is not value:
            names.update(f"{name}.{attr}.{a}" for a in public(inner))
print(json.dumps({"version": trt.__version__, "names": sorted(names)}))
"""


def read_wheel(wheel: Path) -> tuple[str, list[str]]:
    """(version, names) of a bindings wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tmp / "site")
        so = next((tmp / "site" / "tensorrt_bindings").glob("tensorrt*.so"))
        (tmp / "stubs").mkdir()
        _stub_libraries(so, tmp / "stubs")
        env = dict(os.environ, LD_LIBRARY_PATH=str(tmp / "stubs"))
        out = subprocess.run([sys.executable, "-c", _WALK, str(tmp / "site")], check=True,
                             capture_output=True, text=True, env=env).stdout
    data = json.loads(out)
    return data["version"], data["names"]


def write_list(version: str, names: list[str], source: str) -> Path:
    LIST_DIR.mkdir(parents=True, exist_ok=True)
    path = LIST_DIR / f"tensorrt-{version}.txt"
    header = (f"# TensorRT {version} Python API names, generated by tools/trt_api_names.py from "
              f"{source}.\n# One name a line: module attribute, Class.attribute, "
              "Class.Nested.attribute.\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + "\n".join(names) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_lists(directory: Path = LIST_DIR) -> dict[str, set[str]]:
    """{version: names} of every vendored list."""
    lists = {}
    for path in sorted(directory.glob("tensorrt-*.txt")):
        version = path.stem.split("-", 1)[1]
        lists[version] = {line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                          if line.strip() and not line.startswith("#")}
    return lists


# ---------------------------------------------------------------- reading the project's code
def _chain(node) -> list[str] | None:
    """['trt', 'BuilderFlag', 'FP16'] for trt.BuilderFlag.FP16; None if not a Name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id] + parts[::-1]
    return None


def _target_key(node) -> str | None:
    """'builder' or 'self.engine' for an assignment target or a receiver."""
    chain = _chain(node)
    return ".".join(chain) if chain and len(chain) <= 2 else None


class _Collector(ast.NodeVisitor):
    """Uses of TensorRT in one module: `used` must exist in every version, `probed` in one."""

    def __init__(self, module_name: str = "trt"):
        self.module = module_name
        self.types: dict[str, str] = {}  # 'builder' -> 'Builder'
        self.used: set[str] = set()
        self.probed: set[str] = set()

    def type_of(self, node) -> str | None:
        """The TensorRT type an expression evaluates to, where known."""
        if isinstance(node, ast.Call):
            chain = _chain(node.func)
            if chain and chain[0] == self.module and len(chain) == 2:
                return chain[1]  # trt.Builder(...) -> Builder
            if isinstance(node.func, ast.Attribute):
                receiver = self.type_of(node.func.value)
                return RETURNS.get((receiver, node.func.attr)) if receiver else None
            return None
        key = _target_key(node)
        return self.types.get(key) if key else None

    def visit_Assign(self, node):
        self.generic_visit(node)
        kind = self.type_of(node.value)
        for target in node.targets:
            key = _target_key(target)
            if key and kind:
                self.types[key] = kind

    def visit_Call(self, node):
        chain = _chain(node.func)
        if chain in (["hasattr"], ["getattr"]) and len(node.args) >= 2 and isinstance(
                node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            owner = self._owner(node.args[0])
            if owner is not None:
                self.probed.add(f"{owner}.{node.args[1].value}" if owner else node.args[1].value)
                self._record(node.args[0])
                for arg in node.args[2:]:
                    self.visit(arg)
                return
        self.generic_visit(node)

    def _owner(self, node) -> str | None:
        """'' for the trt module, 'BuilderFlag' for trt.BuilderFlag, 'IBuilderConfig' for
        config; None when the object is not TensorRT's."""
        chain = _chain(node)
        if chain and chain[0] == self.module:
            return ".".join(chain[1:])
        return self.type_of(node)

    def _record(self, node):
        chain = _chain(node)
        if chain and chain[0] == self.module and len(chain) > 1:
            self.used.add(".".join(chain[1:]))
        elif isinstance(node, ast.Attribute):
            receiver = self.type_of(node.value)
            if receiver:
                self.used.add(f"{receiver}.{node.attr}")
            self.visit(node.value)

    def visit_Attribute(self, node):
        chain = _chain(node)
        if chain and chain[0] == self.module:
            self.used.add(".".join(chain[1:]))
            return
        receiver = self.type_of(node.value)
        if receiver:
            self.used.add(f"{receiver}.{node.attr}")
        self.generic_visit(node)


def used_names(source: str) -> tuple[set[str], set[str]]:
    """(names used unconditionally, names probed with hasattr/getattr) in one module's code."""
    tree = ast.parse(source)
    collector = _Collector()
    # Two passes: the first learns the types of names assigned anywhere in the module.
    collector.visit(tree)
    collector.used.clear()
    collector.probed.clear()
    collector.visit(tree)
    return collector.used, collector.probed


def problems(sources: dict[str, str], lists: dict[str, set[str]]) -> list[str]:
    """One line per TensorRT name in `sources` ({file: code}) missing from a version."""
    lines = []
    for file, source in sources.items():
        used, probed = used_names(source)
        for name in sorted(used - probed):
            missing = [v for v, names in lists.items() if name not in names]
            if missing:
                lines.append(f"{file}: trt {name} is not in TensorRT {', '.join(missing)}")
        for name in sorted(probed):
            if not any(name in names for names in lists.values()):
                lines.append(f"{file}: trt {name} (probed with hasattr) is in no TensorRT "
                             f"version ({', '.join(lists)})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write tools/trt_api/tensorrt-<version>.txt")
    gen.add_argument("versions", nargs="*", help="bindings versions to download")
    gen.add_argument("--wheel", action="append", default=[], help="a downloaded bindings wheel")
    sub.add_parser("check", help="check the project's TensorRT code against every list")
    args = parser.parse_args(argv)
    if args.command == "check":
        lists = load_lists()
        sources = {m: (ROOT / m).read_text(encoding="utf-8") for m in PROJECT_MODULES}
        found = problems(sources, lists)
        print("\n".join(found) or f"OK: TensorRT {', '.join(lists)}")
        return 1 if found else 0
    with tempfile.TemporaryDirectory() as tmp:
        wheels = [Path(w) for w in args.wheel]
        wheels += [download_wheel(v, Path(tmp)) for v in args.versions]
        for wheel in wheels:
            version, names = read_wheel(wheel)
            print(f"{write_list(version, names, wheel.name)}: {len(names)} names")
    return 0


if __name__ == "__main__":
    sys.exit(main())
