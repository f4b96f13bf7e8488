"""A minimal protobuf *writer* for synthetic .caffemodel files (tests only).

Written independently of seglab/weights/caffe_proto.py (the reader): messages are built here
from caffe.proto's field numbers with `struct`, byte by byte, so a mistake in the reader is not
mirrored. It can write V2 `layer` (NetParameter field 100) and V1 `layers` (field 2) entries,
blobs with a `shape` or with the legacy num/channels/height/width, float data packed or one
field per value, double data, and unknown fields the reader has to skip.
"""
import struct

import numpy as np

# caffe.proto
NET_NAME, NET_LAYERS, NET_LAYER = 1, 2, 100
V2 = dict(name=1, type=2, bottom=3, top=4, blobs=7, phase=10)
V1 = dict(name=4, type=5, bottom=2, top=3, blobs=6)
V1_ENUM = {"Convolution": 4, "ReLU": 18, "Pooling": 17, "Eltwise": 25, "Data": 5}
BLOB = dict(num=1, channels=2, height=3, width=4, data=5, diff=6, shape=7, double_data=8)


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int32/int64 negatives: ten-byte two's complement
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def length_field(field: int, payload: bytes) -> bytes:
    return key(field, 2) + varint(len(payload)) + payload


def int_field(field: int, value: int) -> bytes:
    return key(field, 0) + varint(value)


def string_field(field: int, text: str) -> bytes:
    return length_field(field, text.encode("utf-8"))


def blob(values, shape=None, legacy=None, packed=True, double=False, packed_dims=True,
         with_diff=False) -> bytes:
    """A BlobProto. `shape` writes BlobShape; `legacy=(n, c, h, w)` writes the old dims instead."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    out = b""
    if legacy is not None:
        for name, dim in zip(("num", "channels", "height", "width"), legacy):
            out += int_field(BLOB[name], dim)
    field = BLOB["double_data"] if double else BLOB["data"]
    fmt, wire = ("<d", 1) if double else ("<f", 5)
    if packed:  # one array write: the ResNet-101 name set has ~10^6 values
        out += length_field(field, np.asarray(flat, dtype=fmt).tobytes())
    else:
        out += b"".join(key(field, wire) + struct.pack(fmt, float(v)) for v in flat)
    if with_diff:  # gradients: present in some files, must be ignored
        out += length_field(BLOB["diff"], struct.pack("<f", 1.5) * len(flat))
    if shape is not None:  # written after the data on purpose: field order is free
        dims = (length_field(1, b"".join(varint(d) for d in shape)) if packed_dims
                else b"".join(int_field(1, d) for d in shape))
        out += length_field(BLOB["shape"], dims)
    return out


def layer_v2(name: str, type_: str, blobs=(), extra=True) -> bytes:
    out = string_field(V2["name"], name) + string_field(V2["type"], type_)
    if extra:  # fields the reader must skip
        out += string_field(V2["bottom"], "in") + string_field(V2["top"], name)
        out += int_field(V2["phase"], 1)
        out += key(99, 1) + struct.pack("<d", 3.25)  # an unknown 64-bit field
        out += key(98, 5) + struct.pack("<f", 2.0)  # an unknown 32-bit field
    return out + b"".join(length_field(V2["blobs"], b) for b in blobs)


def layer_v1(name: str, type_: str, blobs=(), extra=True) -> bytes:
    out = b""
    if extra:
        out += string_field(V1["bottom"], "in") + string_field(V1["top"], name)
    out += string_field(V1["name"], name) + int_field(V1["type"], V1_ENUM.get(type_, 0))
    return out + b"".join(length_field(V1["blobs"], b) for b in blobs)


def net(layers, name="synthetic") -> bytes:
    """NetParameter from (version, encoded layer) pairs, version 2 -> `layer`, 1 -> `layers`."""
    out = string_field(NET_NAME, name) + string_field(3, "data")  # 3 = input (unknown to us)
    for version, payload in layers:
        out += length_field(NET_LAYER if version == 2 else NET_LAYERS, payload)
    return out
