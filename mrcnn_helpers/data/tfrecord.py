"""TFRecord files and tf.train.Example messages without TensorFlow.

A TFRecord file is a sequence of records, each framed as
    uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
with masked_crc(c) = ((c >> 15 | c << 17) + 0xa282ead8) mod 2**32 and crc32c the Castagnoli CRC
(polynomial 0x1EDC6F41, reflected). The data of each record here is a serialized tf.train.Example,
whose schema (tensorflow/core/example/{example,feature}.proto) is rebuilt below with protobuf's
descriptor API, so files written here are read by tf.data and vice versa.

CRC32C comes from the `google-crc32c` package (a dependency: C, hardware accelerated; a
Python loop would take minutes per GB of COCO records).
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from collections.abc import Iterator

import google_crc32c
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from ..errors import DataError
from ..fileio import atomic_output, describe_os_error


class RecordCorruptError(DataError):
    """A TFRecord file is truncated or fails a CRC check (names the file and byte offset)."""


# ---------------------------------------------------------------------------------------- CRC32C

def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli) of `data` as an unsigned 32-bit int; crc32c(b"123456789") = 0xE3069283."""
    return google_crc32c.value(bytes(data))


def masked_crc32c(data: bytes) -> int:
    """The masked CRC32C TFRecord stores (a CRC of data containing CRCs is itself poorly mixed)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------- framing

def frame_record(data: bytes) -> bytes:
    """One TFRecord frame (header, data, footer) around `data`."""
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + bytes(data)
            + struct.pack("<I", masked_crc32c(data)))


class TFRecordWriter:
    """Appends records to a TFRecord file through fileio.atomic_output: the bytes go to a
    temporary file beside it, renamed over `path` on close, so an interrupted conversion never
    leaves a complete-looking shard, and a failure (a full disk) or an exception in the `with`
    block removes the temporary file. A failing write raises DataError naming the shard; other
    exceptions of the block propagate as they are."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._stack = contextlib.ExitStack()
        self._file = self._stack.enter_context(
            atomic_output(self.path, "wb", error=DataError, what="TFRecord shard"))
        self.num_records = 0

    def write(self, data: bytes) -> None:
        try:
            self._file.write(frame_record(data))
        except OSError as e:
            self.abort()
            raise DataError(f"could not write TFRecord shard {self.path}: {describe_os_error(e)}; "
                            f"nothing of it is left on disk") from e
        self.num_records += 1

    def close(self) -> None:
        """Finish the shard: flush, sync and rename it into place (DataError if that fails)."""
        self._stack.close()

    def abort(self) -> None:
        """Drop the shard: the temporary file is removed, `path` is left as it was."""
        with contextlib.suppress(Exception):  # atomic_output reports the abort as an error
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read_header(f, path: str, offset: int, file_size: int) -> int | None:
    """Length of the record at `offset` (header verified), or None at a clean end of file."""
    header = f.read(12)
    if not header:
        return None
    if len(header) < 12:
        raise RecordCorruptError(f"{path}: truncated record header at byte offset {offset} "
                                 f"(file is {file_size} bytes)")
    length_bytes, (crc,) = header[:8], struct.unpack("<I", header[8:])
    if crc != masked_crc32c(length_bytes):
        raise RecordCorruptError(f"{path}: record at byte offset {offset} has a corrupt length "
                                 f"(header CRC mismatch); not a TFRecord file or damaged")
    (length,) = struct.unpack("<Q", length_bytes)
    if offset + 12 + length + 4 > file_size:
        raise RecordCorruptError(f"{path}: record at byte offset {offset} claims {length} bytes, "
                                 f"past the end of the file ({file_size} bytes): truncated")
    return length


def index_tfrecord(path: str | os.PathLike) -> list[tuple[int, int]]:
    """(offset, length) of every record of a TFRecord file, reading only the headers.

    Header CRCs are verified; data CRCs are verified when each record is read (read_record).
    Raises RecordCorruptError naming the file and the byte offset of the bad record.
    """
    path = os.fspath(path)
    try:
        file_size = os.path.getsize(path)
        f = open(path, "rb")  # noqa: SIM115 - `with f` below; opened here to word the error
    except OSError as e:
        raise DataError(f"cannot read TFRecord file {path}: {e.strerror or e}") from e
    out, offset = [], 0
    with f:
        while True:
            length = _read_header(f, path, offset, file_size)
            if length is None:
                return out
            out.append((offset, length))
            offset += 12 + length + 4
            f.seek(offset)


def read_record(f, path: str, offset: int, length: int) -> bytes:
    """The data of the record at `offset` (as indexed) in open binary file `f`, CRC verified."""
    f.seek(offset + 12)
    data = f.read(length)
    footer = f.read(4)
    if len(data) != length or len(footer) != 4:
        raise RecordCorruptError(f"{path}: record at byte offset {offset} is truncated")
    if struct.unpack("<I", footer)[0] != masked_crc32c(data):
        raise RecordCorruptError(f"{path}: record at byte offset {offset} ({length} bytes) fails "
                                 f"its data CRC check: the file is damaged; rewrite it")
    return data


def iter_tfrecord(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of every record of a file in order, all CRCs verified."""
    path = os.fspath(path)
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            length = _read_header(f, path, offset, file_size)
            if length is None:
                return
            yield offset, read_record(f, path, offset, length)
            offset += 12 + length + 4


# ----------------------------------------------------------------------- tf.train.Example

@functools.cache
def example_class() -> type:
    """The protobuf message class of tf.train.Example (same wire format as TensorFlow's)."""
    F = descriptor_pb2.FieldDescriptorProto
    fp = descriptor_pb2.FileDescriptorProto(name="mrcnn_helpers/tf_example.proto",
                                            package="tensorflow", syntax="proto3")
    for name, kind in (("BytesList", F.TYPE_BYTES), ("FloatList", F.TYPE_FLOAT),
                       ("Int64List", F.TYPE_INT64)):
        msg = fp.message_type.add(name=name)
        field = msg.field.add(name="value", number=1, label=F.LABEL_REPEATED, type=kind)
        if kind != F.TYPE_BYTES:
            field.options.packed = True
    feature = fp.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate((("bytes_list", "BytesList"),
                                                ("float_list", "FloatList"),
                                                ("int64_list", "Int64List")), start=1):
        feature.field.add(name=name, number=number, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                          type_name=f".tensorflow.{type_name}", oneof_index=0)
    features = fp.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=".tensorflow.Feature")
    features.field.add(name="feature", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE,
                       type_name=".tensorflow.Features.FeatureEntry")
    example = fp.message_type.add(name="Example")
    example.field.add(name="features", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                      type_name=".tensorflow.Features")
    pool = descriptor_pool.DescriptorPool()  # private pool: no clash with TensorFlow's own
    pool.Add(fp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def encode_example(features: dict) -> bytes:
    """Serialize {name: list} as a tf.train.Example.

    Each value is a list (or a single value) of bytes/str (-> bytes_list; str as UTF-8), of
    float (-> float_list, stored as float32) or of int/bool (-> int64_list). An empty list needs
    a type: pass ("float", []), ("int", []) or ("bytes", []).
    """
    example = example_class()()
    fmap = example.features.feature
    for name, value in features.items():
        kind = None
        if isinstance(value, tuple) and len(value) == 2 and value[0] in ("float", "int", "bytes"):
            kind, value = value
        if not isinstance(value, (list, tuple)):
            value = [value]
        if kind is None:
            if not value:
                raise ValueError(f"feature {name!r}: an empty list needs a kind, e.g. ('float', [])")
            first = value[0]
            kind = ("bytes" if isinstance(first, (bytes, str)) else
                    "float" if isinstance(first, float) else "int")
        if kind == "bytes":
            fmap[name].bytes_list.value.extend(v.encode("utf-8") if isinstance(v, str) else bytes(v)
                                               for v in value)
        elif kind == "float":
            fmap[name].float_list.value.extend(float(v) for v in value)
        else:
            fmap[name].int64_list.value.extend(int(v) for v in value)
    return example.SerializeToString(deterministic=True)


def decode_example(data: bytes, where: str = "record") -> dict:
    """Parse a serialized tf.train.Example into {name: list of bytes | float | int}.

    Raises DataError naming `where` when the data is not an Example.
    """
    example = example_class()()
    try:
        example.ParseFromString(data)
    except DecodeError as e:
        raise DataError(f"{where}: not a tf.train.Example ({e})") from e
    out = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[name] = list(getattr(feature, kind).value) if kind else []
    return out
