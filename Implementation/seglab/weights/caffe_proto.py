"""Read a Caffe `.caffemodel` without Caffe: a small, defensive decoder of the protobuf wire format.

A `.caffemodel` is one serialized `NetParameter` message (caffe.proto). We only need, per layer,
its name, its type and its parameter blobs, so this decodes just these fields and skips the rest:

    NetParameter      name = 1, layers = 2 (V1LayerParameter, old files),
                      layer = 100 (LayerParameter)
    LayerParameter    name = 1, type = 2 (string), blobs = 7
    V1LayerParameter  name = 4, type = 5 (enum, only reported), blobs = 6
    BlobProto         num = 1, channels = 2, height = 3, width = 4 (legacy 4-D dims, int32),
                      data = 5 (float, packed or not), diff = 6 (skipped), shape = 7,
                      double_data = 8 (double, packed or not)
    BlobShape         dim = 1 (int64, packed or not)

Wire format: every field is a varint key (field_number << 3 | wire_type) followed by a varint
(type 0), 8 bytes (type 1), a varint length and that many bytes (type 2) or 4 bytes (type 5).
Groups (types 3/4) do not occur in caffe.proto and are rejected, as are types 6/7.

The input is untrusted: every length is checked against the bytes that remain before anything is
sliced, varints longer than 10 bytes are rejected, and nothing is ever allocated from a length
read from the file (data are numpy views of the file's own bytes, copied once they are checked).
Any defect raises `CaffeModelError` naming the byte offset and the layer being read.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
from tqdm import tqdm

# Wire types.
VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5
MAX_VARINT_BYTES = 10

# caffe.proto field numbers.
NET_NAME, NET_LAYERS_V1, NET_LAYER = 1, 2, 100
LAYER_NAME, LAYER_TYPE, LAYER_BLOBS = 1, 2, 7
V1_NAME, V1_TYPE, V1_BLOBS = 4, 5, 6
BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH = 1, 2, 3, 4
BLOB_DATA, BLOB_DIFF, BLOB_SHAPE, BLOB_DOUBLE_DATA = 5, 6, 7, 8
SHAPE_DIM = 1

ZIP_MAGIC = b"PK\x03\x04"  # torch.save files are zip archives


class CaffeModelError(ValueError):
    """A file that is not a well-formed .caffemodel (truncated, corrupted, or something else)."""


@dataclass
class Blob:
    """One parameter blob: float32 values in the blob's stated shape. `legacy` is True when the
    shape came from the old num/channels/height/width fields (Caffe padded vectors to 1x1x1xN)."""
    data: np.ndarray
    legacy: bool


@dataclass
class CaffeLayer:
    name: str
    type: str          # "Convolution", "BatchNorm", ... (V2) or "V1:<enum number>" (V1)
    blobs: list[Blob]
    version: int       # 2 for `layer` (field 100), 1 for `layers` (field 2)
    offset: int        # byte range of the layer message in the file
    end: int


class _Where:
    """Where the decoder is, for error messages: the source and the layer being read."""

    def __init__(self, source: str, what: str):
        self.source, self.what = source, what

    def __str__(self):
        return f"{self.source}, {self.what}"


def _fail(where, message: str):
    raise CaffeModelError(f"{where}: {message}. The file is truncated or corrupted (re-download "
                          "it; check its size), or is not a .caffemodel.")


def _varint(buf: bytes, pos: int, end: int, where) -> tuple[int, int]:
    """Decode one base-128 varint at `pos`; return (value, next position)."""
    result = shift = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= end:
            _fail(where, f"truncated at byte {end} inside a varint that starts at byte {pos}")
        b = buf[pos + i]
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if result >> 64:
                _fail(where, f"varint at byte {pos} overflows 64 bits")
            return result, pos + i + 1
        shift += 7
    _fail(where, f"varint at byte {pos} is longer than {MAX_VARINT_BYTES} bytes")


def _signed(value: int) -> int:
    """int32/int64 fields are two's-complement 64-bit varints."""
    return value - (1 << 64) if value >> 63 else value


def _run_length(buf: bytes, at: int, end: int, tag: bytes, stride: int) -> int:
    """How many records of `stride` bytes, each starting with `tag`, follow each other from `at`
    (an unpacked repeated fixed-size field), found with numpy in doubling windows."""
    n_max, count, window = (end - at) // stride, 0, 64
    while count < n_max:
        m = min(window, n_max - count)
        records = np.frombuffer(buf, np.uint8, m * stride, at + count * stride).reshape(m, stride)
        bad = np.flatnonzero((records[:, :len(tag)] != np.frombuffer(tag, np.uint8)).any(axis=1))
        if bad.size:
            return count + int(bad[0])
        count, window = count + m, window * 2
    return count


def _field(buf: bytes, pos: int, end: int, where) -> tuple[int, int, object, int]:
    """Decode the field starting at `pos`: (field_number, wire_type, value, next position).

    value: an int for varints; a (begin, end) byte range for length-delimited fields; for fixed
    32/64-bit fields a (begin, count, stride) run of consecutive records of that same field (an
    unpacked repeated float is read as one run, not value by value)."""
    at = pos
    key, pos = _varint(buf, pos, end, where)
    number, wire = key >> 3, key & 7
    if number == 0:
        _fail(where, f"field number 0 at byte {at}")
    if wire == VARINT:
        value, pos = _varint(buf, pos, end, where)
        return number, wire, value, pos
    if wire == LENGTH:
        length, pos = _varint(buf, pos, end, where)
        if length > end - pos:
            _fail(where, f"truncated at byte {end}: field {number} at byte {at} claims {length} "
                         f"bytes but only {end - pos} remain")
        return number, wire, (pos, pos + length), pos + length
    if wire in (FIXED32, FIXED64):
        size = 4 if wire == FIXED32 else 8
        if size > end - pos:
            _fail(where, f"truncated at byte {end} inside a {8 * size}-bit field at byte {at}")
        stride = pos - at + size
        count = _run_length(buf, at, end, bytes(buf[at:pos]), stride)
        return number, wire, (at, count, stride), at + count * stride
    if wire in (START_GROUP, END_GROUP):
        _fail(where, f"group field {number} at byte {at} (caffe.proto has no groups)")
    _fail(where, f"invalid wire type {wire} at byte {at}")


def _fields(buf: bytes, start: int, end: int, where):
    """Yield (field_number, wire_type, value, field_start) for the message in buf[start:end]."""
    pos = start
    while pos < end:
        at = pos
        number, wire, value, pos = _field(buf, pos, end, where)
        yield number, wire, value, at


def _expect(wire: int, wanted: int, number: int, at: int, where):
    if wire != wanted:
        _fail(where, f"field {number} at byte {at} has wire type {wire}, caffe.proto says {wanted}")


def _string(buf: bytes, span, at: int, where) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        _fail(where, f"string at byte {at} is not UTF-8")


def _numbers(buf: bytes, wire: int, value, fmt: str, packed_size: int, at: int,
             where) -> np.ndarray:
    """A packed (length-delimited) or unpacked run of little-endian floats/doubles, as a view."""
    if wire == LENGTH:
        begin, stop = value
        if (stop - begin) % packed_size:
            _fail(where, f"packed field at byte {at} holds {stop - begin} bytes, not a multiple "
                         f"of {packed_size}")
        return np.frombuffer(buf, fmt, (stop - begin) // packed_size, begin)
    if wire != (FIXED32 if packed_size == 4 else FIXED64):
        _fail(where, f"number field at byte {at} has wire type {wire}")
    begin, count, stride = value
    records = np.frombuffer(buf, np.uint8, count * stride, begin).reshape(count, stride)
    return records[:, stride - packed_size:].copy().view(fmt).ravel()


def _shape(buf: bytes, begin: int, stop: int, where) -> tuple[int, ...]:
    dims = []
    for number, wire, value, at in _fields(buf, begin, stop, where):
        if number != SHAPE_DIM:
            continue
        if wire == VARINT:
            dims.append(_signed(value))
        elif wire == LENGTH:  # packed varints
            pos, end = value
            while pos < end:
                dim, pos = _varint(buf, pos, end, where)
                dims.append(_signed(dim))
        else:
            _fail(where, f"BlobShape.dim at byte {at} has wire type {wire}")
    if any(d < 0 for d in dims):
        _fail(where, f"negative blob dimension {tuple(dims)}")
    return tuple(dims)


def _blob(buf: bytes, begin: int, stop: int, where) -> Blob:
    shape, legacy, chunks = None, {}, []
    for number, wire, value, at in _fields(buf, begin, stop, where):
        if number == BLOB_DATA:
            chunks.append(_numbers(buf, wire, value, "<f4", 4, at, where))
        elif number == BLOB_DOUBLE_DATA:
            chunks.append(_numbers(buf, wire, value, "<f8", 8, at, where))
        elif number == BLOB_SHAPE:
            _expect(wire, LENGTH, number, at, where)
            shape = _shape(buf, *value, where)
        elif number in (BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH):
            _expect(wire, VARINT, number, at, where)
            legacy[number] = _signed(value)
    count = sum(c.size for c in chunks)
    is_legacy = shape is None
    if is_legacy:  # Caffe's Blob::FromProto: (num, channels, height, width), unset = 0
        shape = (tuple(legacy.get(f, 0) for f in (BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH))
                 if legacy else (count,))
        if any(d < 0 for d in shape):
            _fail(where, f"negative blob dimension {shape}")
    if prod(shape) != count:  # checked before anything of that shape exists
        _fail(where, f"blob at byte {begin} declares shape {shape} ({prod(shape)} values) but "
                     f"holds {count} values")
    data = np.concatenate(chunks) if len(chunks) > 1 else (chunks[0] if chunks else np.zeros(0))
    return Blob(data.astype(np.float32).reshape(shape), is_legacy)


def _layer(buf: bytes, begin: int, stop: int, version: int, index: int, source: str) -> CaffeLayer:
    name_field, type_field, blobs_field = ((LAYER_NAME, LAYER_TYPE, LAYER_BLOBS) if version == 2
                                           else (V1_NAME, V1_TYPE, V1_BLOBS))
    where = _Where(source, f"layer #{index} at byte {begin} (name not read yet)")
    name, kind, blob_spans = None, "", []
    for number, wire, value, at in _fields(buf, begin, stop, where):
        if number == name_field:
            _expect(wire, LENGTH, number, at, where)
            name = _string(buf, value, at, where)
            where.what = f"in layer {name!r}"
        elif number == type_field:
            if version == 2:
                _expect(wire, LENGTH, number, at, where)
                kind = _string(buf, value, at, where)
            else:
                _expect(wire, VARINT, number, at, where)
                kind = f"V1:{value}"
        elif number == blobs_field:
            _expect(wire, LENGTH, number, at, where)
            blob_spans.append(value)
    if name is None:
        _fail(where, "layer without a name")
    blobs = [_blob(buf, b, e, where) for b, e in blob_spans]
    return CaffeLayer(name, kind, blobs, version, begin, stop)


def _partial_name(buf: bytes, begin: int, version: int) -> str | None:
    """The name of a layer whose message is cut off, if its name field survived."""
    name_field = LAYER_NAME if version == 2 else V1_NAME
    try:
        for number, wire, value, _ in _fields(buf, begin, len(buf), _Where("", "")):
            if number == name_field and wire == LENGTH:
                return bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
    except CaffeModelError:
        pass
    return None


def iter_layers(buf: bytes, source: str = "<bytes>"):
    """Yield the CaffeLayer of each `layer` (V2) and `layers` (V1) entry of a NetParameter, in
    file order."""
    where = _Where(source, "in the NetParameter")
    pos, end, index = 0, len(buf), 0
    while pos < end:
        at = pos
        key, payload = _varint(buf, pos, end, where)
        number, wire = key >> 3, key & 7
        if number in (NET_LAYER, NET_LAYERS_V1) and wire == LENGTH:
            version = 2 if number == NET_LAYER else 1
            length, payload = _varint(buf, payload, end, where)
            if length > end - payload:  # name the layer the file was cut in
                name = _partial_name(buf, payload, version)
                _fail(_Where(source, f"in layer {name!r}" if name else f"in layer #{index}"),
                      f"truncated at byte {end}: layer #{index} at byte {at} needs {length} "
                      f"bytes but only {end - payload} remain")
        number, wire, value, pos = _field(buf, at, end, where)
        if number in (NET_LAYER, NET_LAYERS_V1):
            _expect(wire, LENGTH, number, at, where)
            yield _layer(buf, *value, 2 if number == NET_LAYER else 1, index, source)
            index += 1
        elif number == NET_NAME:
            _expect(wire, LENGTH, number, at, where)


def read_caffemodel(path, progress: bool = False) -> list[CaffeLayer]:
    """All layers of a .caffemodel file (with or without blobs), in file order."""
    path = Path(path)
    if not path.is_file():
        raise CaffeModelError(f"{path}: no such file. Download the DeepLab v2 release (see "
                              "convert.py --help) and pass the path of its .caffemodel.")
    buf = path.read_bytes()
    if buf.startswith(ZIP_MAGIC):
        raise CaffeModelError(f"{path} is a zip archive (a PyTorch .pth file or the release zip), "
                              "not a .caffemodel: unzip the release, or use `convert.py pth`.")
    layers = []
    with tqdm(total=len(buf), unit="B", unit_scale=True, desc=f"reading {path.name}",
              disable=not progress) as bar:
        for layer in iter_layers(buf, str(path)):
            layers.append(layer)
            bar.update(layer.end - bar.n)
    if not layers:
        raise CaffeModelError(f"{path}: no layers found ({len(buf)} bytes). This is not a "
                              ".caffemodel (a .prototxt holds no weights).")
    return layers
