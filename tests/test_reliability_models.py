"""Hostile model files: every reader of checkpoints, weights, ONNX files and export metadata
refuses, in one line naming the file and the sizes, what would expand beyond the file in memory,
reach outside it, or contradict the graph it describes.

A torch.save file is a zip archive of stored (uncompressed) entries; torch.load inflates
compressed ones, so a 66 KB file can become 64 MiB (shown live below before it is refused).
The probes that could exhaust memory also run in a child process under a 4 GiB address-space
limit. Inputs are byte-identical afterwards and no temporary file is left.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from test_reliability_disk import cli_error

from mrcnn_helpers.cli import main
from mrcnn_helpers.engine import CheckpointWarning, load_checkpoint, load_latest_checkpoint
from mrcnn_helpers.errors import CheckpointError, MrcnnError
from mrcnn_helpers.fileio import check_torch_file

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["background", "circle", "triangle", "square"]
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Shared by the test_reliability_* modules of the non-data commands.


def digest(*paths) -> dict:
    """sha256 of every file under `paths` (files or folders), by path."""
    found = {}
    for root in map(Path, paths):
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def temporaries(root) -> list[str]:
    """Files under `root` that look like an atomic write's leftovers (`.name.*.tmp*`)."""
    return sorted(str(p) for p in Path(root).rglob("*") if ".tmp" in p.name)


def limit_memory():
    """At most 4 GiB of address space (less if the hard limit is lower)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = 4 << 30 if hard == resource.RLIM_INFINITY else min(4 << 30, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def mrcnn_capped(*argv, cwd=None) -> subprocess.CompletedProcess:
    """`python -m mrcnn_helpers ARGV` in a child limited to 4 GiB of address space."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mrcnn_helpers", *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, preexec_fn=limit_memory, timeout=300,
                          env=env, check=False)


def one_error_line(out: subprocess.CompletedProcess) -> str:
    """The child ended with exit status 2 and one `error:` line, no traceback."""
    lines = [line for line in out.stderr.splitlines()
             if line.strip() and not line.startswith("warning:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    return lines[0]


def tiny_files(root: Path) -> dict:
    """A tiny model (ResNet-10, 64x96) saved as a checkpoint in root/results, its spec, a
    compact ONNX export of batch 1 and the validation images."""
    from test_export import make_tiny_setup

    from mrcnn_helpers.engine.checkpoint import save_checkpoint
    from mrcnn_helpers.spec import format_spec

    tiny = make_tiny_setup(root, num_val=2)
    (root / "results").mkdir()
    checkpoint = save_checkpoint(root / "results" / "model.step-5.pth", {
        "format": "mrcnn-checkpoint", "version": 1, "step": 5, "model": tiny.model.state_dict(),
        "spec_text": format_spec(tiny.spec), "class_names": CLASS_NAMES,
        "category_ids": [1, 2, 3]})
    (root / "spec.txt").write_text(format_spec(tiny.spec))
    files = {"tiny": tiny, "root": root, "checkpoint": checkpoint, "spec": root / "spec.txt",
             "results": root / "results", "images": Path(tiny.paths["val_images"]),
             "val_json": Path(tiny.paths["val_json"])}
    if _has_onnx():
        from mrcnn_helpers.export import export_onnx

        files["onnx"] = root / "model.onnx"
        export_onnx(tiny.model, tiny.spec, files["onnx"], batch_size=1, layout="compact",
                    class_names=CLASS_NAMES, category_ids=[1, 2, 3])
    return files


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Crafted torch.save files


def zip_bomb(path: Path, numel: int = 16 << 20) -> Path:
    """A checkpoint holding `numel` zero floats (64 MiB by default), its zip entries deflated:
    66 KB on disk."""
    buffer = io.BytesIO()
    torch.save({"format": "mrcnn-checkpoint", "version": 1, "step": 1,
                "model": {"w": torch.zeros(numel)}}, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    return path


def _stored_copy(data: bytes) -> bytes:
    """The torch.save archive `data` rewritten by zipfile, entries stored (no zip64 records)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def _central_directory(data: bytes) -> tuple[int, int, int]:
    """(offset of the end record, offset of the central directory, its entry count)."""
    end = data.rindex(b"PK\x05\x06")
    count, _, offset = struct.unpack("<HII", data[end + 10:end + 20])
    return end, offset, count


def overlapping_entries(path: Path, copies: int = 40) -> Path:
    """A stored checkpoint whose central directory lists its 1 MiB tensor entry `copies` more
    times under other names, all pointing at the same bytes (a non-recursive zip bomb)."""
    buffer = io.BytesIO()
    torch.save({"format": "mrcnn-checkpoint", "version": 1, "step": 1,
                "model": {"w": torch.zeros(1 << 18)}}, buffer)
    data = _stored_copy(buffer.getvalue())
    _, offset, count = _central_directory(data)
    records, position, big = [], offset, None
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[position + 28:position + 34])
        size = 46 + name_len + extra_len + comment_len
        record = data[position:position + size]
        records.append(record)
        if struct.unpack("<I", record[24:28])[0] >= 1 << 20:
            big = record
        position += size
    clones = []
    for i in range(copies):  # same name length: 'data/0' -> 'data/<letter>' etc.
        name = bytearray(big[46:46 + struct.unpack("<H", big[28:30])[0]])
        name[-1:] = bytes([ord("a") + i % 26])
        name[-2:-1] = bytes([ord("A") + i // 26]) if len(name) > 1 else b""
        clones.append(big[:46] + bytes(name) + big[46 + len(name):])
    directory = b"".join(records + clones)
    tail = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count + copies, count + copies,
                       len(directory), offset, 0)
    path.write_bytes(data[:offset] + directory + tail)
    return path


def size_mismatch(path: Path) -> Path:
    """A stored checkpoint whose tensor entry declares 4 GiB uncompressed."""
    buffer = io.BytesIO()
    torch.save({"format": "mrcnn-checkpoint", "version": 1, "step": 1,
                "model": {"w": torch.zeros(1 << 10)}}, buffer)
    data = bytearray(_stored_copy(buffer.getvalue()))
    _, position, count = _central_directory(bytes(data))
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[position + 28:position + 34])
        if struct.unpack("<I", data[position + 20:position + 24])[0] == 4 << 10:
            data[position + 24:position + 28] = struct.pack("<I", (1 << 32) - 1)
        position += 46 + name_len + extra_len + comment_len
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_files(tmp_path_factory.mktemp("models"))


def test_zip_bomb_is_live_then_refused_by_every_checkpoint_reader(files, tmp_path, capsys):
    bomb = zip_bomb(tmp_path / "bomb.pth")
    assert bomb.stat().st_size < 100_000
    # The attack is live: torch.load alone inflates the 66 KB file to 64 MiB.
    assert torch.load(bomb, weights_only=True)["model"]["w"].numel() == 16 << 20
    refused = (f"{bomb} refused: 7 of its 7 zip entries are compressed (e.g. ",
               f"), and the file's {bomb.stat().st_size} bytes would inflate to ", " in memory")
    for reader in (lambda: check_torch_file(bomb), lambda: load_checkpoint(bomb),
                   lambda: load_checkpoint(bomb.read_bytes(), name=str(bomb)),
                   lambda: load_checkpoint(io.BytesIO(bomb.read_bytes()), name=str(bomb))):
        with pytest.raises(MrcnnError) as info:
            reader()
        assert all(part in str(info.value) for part in refused) and "\n" not in str(info.value)
    before = digest(bomb, files["images"], files["spec"])
    for argv in (["evaluate", "-m", bomb], ["evaluate", "-m", bomb, "-e", files["spec"]],
                 ["infer", "-m", bomb, "-i", files["images"], "-o", tmp_path / "out"],
                 ["export", "-m", bomb, "-o", tmp_path / "m.onnx"],
                 ["deploy", "-m", bomb, "-i", files["images"], "-o", tmp_path / "d"]):
        line = cli_error(capsys, *map(str, argv))
        assert line.startswith(f"error: {bomb} refused: 7 of its 7 zip entries are compressed")
    assert digest(bomb, files["images"], files["spec"]) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()
    assert not (tmp_path / "d").exists() and temporaries(tmp_path) == []


def test_zip_bomb_as_the_newest_checkpoint_of_a_results_directory(files, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(files["results"], results)
    zip_bomb(results / "model.step-9.pth")
    with pytest.warns(CheckpointWarning, match="skipping .*model.step-9.pth: .* refused: 7 of"):
        path, state = load_latest_checkpoint(results)
    assert path.name == "model.step-5.pth" and state["step"] == 5
    (results / "model.step-5.pth").unlink()  # the bomb alone: training refuses to start
    before = digest(results)
    capsys.readouterr()
    with pytest.warns(CheckpointWarning):
        assert main(["train", "-e", str(files["spec"]), "-r", str(results)]) == 2
    err = capsys.readouterr().err
    assert f"error: no readable checkpoint in {results}" in err and "Traceback" not in err
    after = digest(results)
    assert after.pop(str(results / ".lock")) and after == before  # the run's lock file only


@pytest.mark.parametrize("craft", ["overlapping entries", "declared size"])
def test_crafted_zip_directories_are_refused(files, tmp_path, capsys, craft):
    if craft == "overlapping entries":
        path = overlapping_entries(tmp_path / "overlap.pth")
        with zipfile.ZipFile(path) as archive:  # the directory really lists 41 MiB
            assert sum(i.file_size for i in archive.infolist()) > 40 << 20
        expected = f"{path} refused: its 47 zip entries add up to "
    else:
        path = size_mismatch(tmp_path / "declared.pth")
        expected = f"{path} refused: its entry "
    assert path.stat().st_size < 2 << 20
    with pytest.raises(CheckpointError, match="refused") as info:
        load_checkpoint(path)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)
    if craft == "overlapping entries":
        assert f"more than the file's {path.stat().st_size} bytes" in str(info.value)
    else:
        assert "declares 4294967295 bytes but stores 4096" in str(info.value)
    assert cli_error(capsys, "evaluate", "-m", str(path)).startswith(f"error: {expected}")


def test_damaged_zip_directory_is_one_line(tmp_path):
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buffer)
    data = bytearray(buffer.getvalue())
    end = data.rindex(b"PK\x05\x06")
    data[end + 16:end + 20] = struct.pack("<I", len(data) * 3)  # directory offset past the end
    path = tmp_path / "damaged.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_bomb_under_a_4_gib_address_space_limit(files, tmp_path):
    """The brief's case through real processes under `ulimit -v 4194304`: refused, exit 2."""
    bomb = zip_bomb(tmp_path / "bomb.pth")
    out = mrcnn_capped("infer", "-m", bomb, "-e", files["spec"], "-i", files["images"],
                       "-o", tmp_path / "out")
    assert one_error_line(out).startswith(f"error: {bomb} refused: 7 of its 7 zip entries")
    assert not (tmp_path / "out").exists()


def test_zip_bomb_as_pretrained_weights(tmp_path):
    from mrcnn_helpers.model.weights import read_state_dict

    bomb = zip_bomb(tmp_path / "bomb.pth")
    with pytest.raises(CheckpointError, match="refused: 7 of its 7 zip entries"):
        read_state_dict(str(bomb))


def test_legacy_torch_format_still_loads(tmp_path):
    """torch's pre-zip format (older torchvision weight files) is no zip archive: it passes the
    bound, and a legacy file declaring more bytes than it holds is one line."""
    legacy = tmp_path / "legacy.pth"
    torch.save({"format": "mrcnn-checkpoint", "version": 1, "step": 3,
                "model": {"w": torch.arange(4.0)}}, legacy, _use_new_zipfile_serialization=False)
    assert check_torch_file(legacy) == 0
    assert torch.equal(load_checkpoint(legacy)["model"]["w"], torch.arange(4.0))
    data = legacy.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match=f"checkpoint {cut} is unreadable"):
        load_checkpoint(cut)


# ---------------------------------------------------------------------------------------------
# Encrypted files: decrypted in memory


def _encrypt(src: Path, dst: Path, key: str = "k3y") -> Path:
    pytest.importorskip("cryptography")
    from mrcnn_helpers.crypto import encrypt_file

    return encrypt_file(src, dst, key)


def test_encrypted_checkpoint_is_decrypted_in_memory(files, tmp_path, monkeypatch):
    from mrcnn_helpers.inference.loading import load_model_file

    secret = _encrypt(files["checkpoint"], tmp_path / "secret.pth")

    def no_temporary(*args, **kwargs):
        raise AssertionError("a temporary file was made for the decrypted model")

    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryDirectory"):
        monkeypatch.setattr(tempfile, name, no_temporary)
    loaded = load_model_file(secret, key="k3y", device="cpu")
    monkeypatch.undo()
    assert loaded.source == secret and loaded.class_names == CLASS_NAMES
    reference = files["tiny"].model.state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in reference.items())
    # A plain state dict, encrypted, loads with its spec (read once, in memory).
    plain = tmp_path / "plain.pth"
    torch.save(files["tiny"].model.state_dict(), plain)
    loaded = load_model_file(_encrypt(plain, tmp_path / "plain.enc.pth"), spec=files["tiny"].spec,
                             key="k3y", device="cpu")
    assert loaded.kind == "state_dict"
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in reference.items())


@pytest.mark.parametrize("fault", ["truncated", "one byte flipped", "wrong key", "no key",
                                   "encrypted zip bomb", "encrypted file of 3 GiB"])
def test_encrypted_model_faults(files, tmp_path, capsys, fault):
    secret = _encrypt(files["checkpoint"], tmp_path / "secret.pth")
    key = "k3y"
    if fault == "truncated":
        secret.write_bytes(secret.read_bytes()[:1000])
        expected = f"error: cannot decrypt {secret}: wrong key, or the file was modified"
    elif fault == "one byte flipped":
        data = bytearray(secret.read_bytes())
        data[len(data) // 2] ^= 1
        secret.write_bytes(bytes(data))
        expected = f"error: cannot decrypt {secret}: wrong key, or the file was modified"
    elif fault == "wrong key":
        key = "guess"
        expected = f"error: cannot decrypt {secret}: wrong key"
    elif fault == "no key":
        key = None
        expected = f"error: {secret} is encrypted: pass its key (--key)"
    elif fault == "encrypted zip bomb":
        secret = _encrypt(zip_bomb(tmp_path / "bomb.pth"), tmp_path / "bomb.enc.pth")
        expected = f"error: {secret} refused: 7 of its 7 zip entries are compressed"
    else:  # a sparse file: its size is refused before a byte is read
        with open(secret, "r+b") as handle:
            handle.truncate(3 << 30)
        expected = f"error: {secret} is {3 << 30} bytes, more than an encrypted file of this"
    with open(secret, "rb") as handle:  # its size and first MiB (the sparse one is 3 GiB)
        before = (secret.stat().st_size, handle.read(1 << 20))
    argv = ["evaluate", "-m", str(secret)] + (["-k", key] if key else [])
    assert cli_error(capsys, *argv).startswith(expected)
    with open(secret, "rb") as handle:
        assert (secret.stat().st_size, handle.read(1 << 20)) == before
    assert temporaries(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# ONNX files and export metadata


def _onnx(files):
    if "onnx" not in files:
        pytest.skip("needs onnx and onnxruntime")
    import onnx

    return onnx


def _edited(files, tmp_path, edit, name="edited.onnx") -> Path:
    """A copy of the exported ONNX file with `edit(proto, metadata dict)` applied."""
    onnx = _onnx(files)
    from mrcnn_helpers.inference.metadata import METADATA_KEY

    proto = onnx.load(files["onnx"])
    prop = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(prop.value)
    text = edit(proto, meta)
    prop.value = text if isinstance(text, str) else json.dumps(meta)
    path = tmp_path / name
    path.write_bytes(proto.SerializeToString())
    return path


def _set(key, value):
    def edit(proto, meta):
        meta[key] = value
    return edit


METADATA_FAULTS = {
    # fault: (edit, what the one line says after the file name)
    "num_classes edited (5)": (_set("num_classes", 5),
                               "its export metadata has 3 category_ids for num_classes 5"),
    "num_classes edited with matching names": (
        lambda proto, meta: meta.update(num_classes=3, class_names=CLASS_NAMES[:3],
                                        category_ids=[1, 2]),
        "the graph scores 4 classes but its metadata says num_classes 3"),
    "image_size edited": (_set("image_size", [128, 96]),
                          ("tensor 'Input' has shape [1, 3, 64, 96] but the metadata describes "
                           "[1, 3, 128, 96]")),
    "batch_size edited": (_set("batch_size", 4),
                          ("tensor 'Input' has shape [1, 3, 64, 96] but the metadata describes "
                           "[4, 3, 64, 96]")),
    "detections_per_image edited": (_set("detections_per_image", 100),
                                    ("tensor 'boxes' has shape [1, 10, 4] but the metadata "
                                     "describes [1, 100, 4]")),
    "layout edited to deepstream": (_set("layout", "deepstream"),
                                    "the graph has no tensor 'generate_detections'"),
    "unknown layout": (_set("layout", "tlt"), "layout 'tlt' (expected 'deepstream' or 'compact')"),
    "batch_size 0": (_set("batch_size", 0), "batch_size 0 (expected an integer >= 1)"),
    "num_classes a string": (_set("num_classes", "four"),
                             "num_classes 'four' (expected an integer >= 2)"),
    "offsets NaN": (_set("net_scale_factor", float("nan")), "net_scale_factor nan"),
    "class_names of another count": (_set("class_names", ["a", "b"]),
                                     "2 class_names for num_classes 4"),
    "metadata not JSON": (lambda proto, meta: '{"layout": "compact",,}',
                          "export metadata is unreadable"),
    "metadata a JSON list": (lambda proto, meta: "[1, 2, 3]", "export metadata is unreadable"),
    "metadata missing a field": (lambda proto, meta: meta.pop("input_name") and None,
                                 "export metadata is unreadable"),
    "no metadata": (lambda proto, meta: proto.ClearField("metadata_props") or "",
                    "not exported by `mrcnn export`"),
}


@pytest.mark.parametrize("fault", list(METADATA_FAULTS))
def test_edited_onnx_metadata_is_refused(files, tmp_path, capsys, fault):
    edit, expected = METADATA_FAULTS[fault]
    path = _edited(files, tmp_path, edit)
    if fault == "no metadata":
        proto = _onnx(files).load(path)
        proto.ClearField("metadata_props")
        path.write_bytes(proto.SerializeToString())
    before = digest(path, files["images"])
    line = cli_error(capsys, "infer", "-m", str(path), "-i", str(files["images"]),
                     "-o", str(tmp_path / "out"), "-e", str(files["spec"]))
    assert line.startswith(f"error: {path}") and expected in line, line
    assert digest(path, files["images"]) == before and not (tmp_path / "out").exists()


def test_edited_num_classes_of_a_deepstream_graph(files, tmp_path, capsys):
    """DeepStream's layout declares the class count in the mask logits' shape."""
    onnx = _onnx(files)
    from mrcnn_helpers.export import export_onnx
    from mrcnn_helpers.inference.metadata import METADATA_KEY

    path = tmp_path / "ds.onnx"
    export_onnx(files["tiny"].model, files["tiny"].spec, path, batch_size=1,
                layout="deepstream", class_names=CLASS_NAMES, category_ids=[1, 2, 3])
    proto = onnx.load(path)
    prop = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    prop.value = json.dumps({**json.loads(prop.value), "num_classes": 5, "category_ids": [1, 2, 3, 4],
                             "class_names": CLASS_NAMES + ["extra"]})
    path.write_bytes(proto.SerializeToString())
    assert cli_error(capsys, "evaluate", "-m", str(path)) == (
        f"error: {path}: tensor 'mask_fcn_logits/BiasAdd' has shape [1, 10, 4, 8, 8] but the "
        "metadata describes [1, 10, 5, 8, 8] (batch, image size, detections, num_classes, mask "
        "resolution): the metadata does not belong to this graph; re-export the model")


def test_the_unedited_export_still_runs(files, tmp_path):
    """The probes above start from a file that works: its untouched copy infers."""
    _onnx(files)
    path = _edited(files, tmp_path, lambda proto, meta: None)
    assert main(["infer", "-m", str(path), "-i", str(files["images"]), "-o",
                 str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in files["images"].iterdir())


def _initializer_edit(kind):
    def edit(proto, meta):
        tensor = next(t for t in proto.graph.initializer if t.name.endswith("cls_score.weight"))
        if kind == "external":
            tensor.ClearField("raw_data")
            tensor.data_location = 1
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", "/etc/passwd"
        elif kind == "absurd":
            tensor.ClearField("dims")
            tensor.dims.extend([1 << 20, 1 << 20])
        else:
            tensor.ClearField("dims")
            tensor.dims.extend([4, -64])
    return edit


@pytest.mark.parametrize("kind", ["external", "absurd", "negative"])
def test_onnx_tensors_out_of_bounds(files, tmp_path, capsys, kind):
    path = _edited(files, tmp_path, _initializer_edit(kind))
    expected = {"external": "keeps its data in the external file '/etc/passwd'",
                "absurd": ("declares shape [1048576, 1048576], 4398046511104 bytes, more than "
                           f"the file's {path.stat().st_size} bytes"),
                "negative": "has shape [4, -64]"}[kind]
    line = cli_error(capsys, "evaluate", "-m", str(path))
    assert line.startswith(f"error: {path}: tensor 'box_predictor.cls_score.weight' ")
    assert expected in line


def test_onnx_files_that_are_not_onnx(files, tmp_path, capsys):
    _onnx(files)
    text = tmp_path / "notes.onnx"
    text.write_text("not a protobuf at all " * 50)
    assert cli_error(capsys, "evaluate", "-m", str(text)).startswith(
        f"error: {text} is not a readable ONNX model")
    huge = tmp_path / "huge.onnx"
    with open(huge, "wb") as handle:  # sparse: 3 GiB of size, no bytes read
        handle.truncate(3 << 30)
    assert cli_error(capsys, "evaluate", "-m", str(huge)) == (
        f"error: {huge} is {3 << 30} bytes; an ONNX file holds at most {2 ** 31 - 1} "
        "(protobuf's limit), so this is no ONNX model `mrcnn export` wrote")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(files["onnx"].read_bytes()[:100_000])
    assert cli_error(capsys, "evaluate", "-m", str(truncated)).startswith(f"error: {truncated}")


def test_onnx_runtime_failures_are_one_line(files, tmp_path, capsys):
    """A graph ONNX Runtime cannot load (an operator of an unknown domain) and one that fails
    while running: ExportError, not onnxruntime's own exception types."""
    onnx = _onnx(files)
    from mrcnn_helpers.inference import ExportError, OnnxRuntimeModel

    def unknown_op(proto, meta):
        node = next(n for n in proto.graph.node if n.op_type == "Relu")
        node.domain = "com.example"
        proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))

    path = _edited(files, tmp_path, unknown_op)
    line = cli_error(capsys, "evaluate", "-m", str(path))
    assert line.startswith(f"error: ONNX Runtime failed to load {path}: ")
    model = OnnxRuntimeModel(files["onnx"], threads=1)
    model.meta = type(model.meta)(**{**model.meta.__dict__, "input_name": "NotTheInput"})
    with pytest.raises(ExportError, match=f"ONNX Runtime failed running {files['onnx']}: "):
        model(torch.zeros(1, 3, 64, 96, dtype=torch.uint8))


@pytest.mark.parametrize("fault", ["missing", "not JSON", "a JSON list", "num_classes edited",
                                   "a folder"])
def test_engine_sidecar_faults(files, tmp_path, fault):
    """A TensorRT engine's metadata file (<engine>.json): read_sidecar and the metadata check
    that TensorRTModel applies (no TensorRT needed to read it)."""
    _onnx(files)
    from mrcnn_helpers.inference import ExportError, OnnxRuntimeModel
    from mrcnn_helpers.inference.backends import check_metadata
    from mrcnn_helpers.inference.metadata import read_sidecar, sidecar_path, write_sidecar

    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine bytes")
    meta = OnnxRuntimeModel(files["onnx"], threads=1).meta
    write_sidecar(engine, meta)
    sidecar = sidecar_path(engine)
    assert read_sidecar(engine) == meta and temporaries(tmp_path) == []
    if fault == "missing":
        sidecar.unlink()
        expected = f"{engine}: its metadata file {sidecar} is missing"
    elif fault == "not JSON":
        sidecar.write_text("{broken")
        expected = f"{sidecar}: export metadata is unreadable"
    elif fault == "a JSON list":
        sidecar.write_text("[]")
        expected = f"{sidecar}: export metadata is unreadable"
    elif fault == "a folder":
        sidecar.unlink()
        sidecar.mkdir()
        expected = f"{engine}: its metadata file {sidecar} is missing"
    else:
        sidecar.write_text(json.dumps({**json.loads(meta.to_json()), "num_classes": 0}))
        expected = f"{sidecar}: its export metadata has num_classes 0"
    with pytest.raises(ExportError) as info:
        check_metadata(read_sidecar(engine), str(sidecar))
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)
