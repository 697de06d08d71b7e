"""A strict reader of the numeric arrays of a MATLAB 5 / 7 MAT-file (how SVHN's ``*_32x32.mat`` are saved).

scipy's reader trusts the sizes written in the file, and on a corrupted one can crash the interpreter (a segfault
inside its compiled code) rather than raise. This one checks every size against the bytes that are really there
before it reads, so a damaged file is always a ValueError naming it.

Layout (MathWorks, "MAT-File Format"): a 128-byte header (text; at 124 the version 0x0100; at 126 "IM" for a
little-endian file, "MI" for big-endian), then data elements, each an 8-byte tag (uint32 type, uint32 byte count)
and its bytes, padded to a multiple of 8. A tag whose upper 16 bits are not zero is a "small" element: type in the
low half, byte count (≤ 4) in the high half, the bytes in the tag's second word. Top-level elements are variables
(``miMATRIX``), or a zlib stream (``miCOMPRESSED``, not padded) that holds one. A variable's body holds, in order,
its flags (class in the low byte; complex: bit 11), its dimensions (int32), its name (int8) and its real part in a
numeric type that may be narrower than its class (a double array of small integers is stored as uint8, say),
column-major.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
import zlib
from pathlib import Path

import numpy as np

#: element types (``mi*``) of numeric data → numpy element type (byte order applied separately)
_ELEMENT_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MATRIX, _COMPRESSED = 14, 15
#: array classes (``mx*``) of numeric arrays → numpy element type of the array
_CLASSES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_COMPLEX_FLAG = 0x800


class _Reader:
    """Sequential reads from one buffer, each checked against the bytes left."""

    def __init__(self, data: bytes | memoryview, order: str, where: str):
        self.data, self.order, self.where, self.pos = memoryview(data), order, where, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> memoryview:
        if n > self.left():
            raise ValueError(f"{self.where}: truncated ({n} bytes needed, {self.left()} left)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def element(self) -> tuple[int, memoryview]:
        """(type, bytes) of the next data element (a view: nothing is copied)."""
        first, second = struct.unpack(self.order + "II", self.take(8))
        if first >> 16:  # small element: its (≤ 4) bytes are the tag's second word
            size, kind = first >> 16, first & 0xFFFF
            if size > 4:
                raise ValueError(f"{self.where}: a small data element claims {size} bytes (at most 4)")
            return kind, memoryview(struct.pack(self.order + "I", second)[:size])
        body = self.take(second)
        if first != _COMPRESSED and second % 8:  # padded to 8 bytes (the last element's padding may be cut off)
            self.take(min(8 - second % 8, self.left()))
        return first, body


def read_numeric_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The real numeric variables of a MAT-file (v5 or v7, compressed or not) by name; other variables (cells,
    structs, text, sparse or complex arrays) are skipped.

    Raises:
        ValueError: naming the file when it is not a MAT-file of this format (e.g. v4, or v7.3, which is HDF5) or
            any size or type in it disagrees with its contents.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 128:
            raise ValueError(f"{path}: not a MATLAB 5/7 MAT-file (only {size} bytes; the header alone takes 128)")
        # Mapped, not read: uncompressed arrays come back as views of the file, so their pages are read when used
        # (the first images of SVHN's 225 MB training set without the rest) and never copied.
        raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    order = {b"IM": "<", b"MI": ">"}.get(raw[126:128])
    if order is None or struct.unpack(order + "H", raw[124:126])[0] != 0x0100:
        hint = " (v7.3 files are HDF5: save with -v7)" if raw[:19] == b"MATLAB 7.3 MAT-file" else ""
        raise ValueError(f"{path}: not a MATLAB 5/7 MAT-file (header version or byte-order mark){hint}")
    top = _Reader(memoryview(raw)[128:], order, str(path))
    arrays = {}
    while top.left() >= 8:
        kind, body = top.element()
        if kind == _COMPRESSED:
            try:
                body = zlib.decompress(body)
            except zlib.error as err:
                raise ValueError(f"{path}: a compressed variable is damaged ({err})") from err
            kind, body = _Reader(body, order, str(path)).element()
        if kind == _MATRIX and body:
            found = _variable(_Reader(body, order, str(path)))
            if found is not None:
                arrays[found[0]] = found[1]
    return arrays


def _variable(r: _Reader) -> tuple[str, np.ndarray] | None:
    """(name, array) of one miMATRIX body, or None for a variable that is not a real numeric array."""
    kind, flags = r.element()
    if kind != 6 or len(flags) != 8:
        raise ValueError(f"{r.where}: a variable's flags must be 8 bytes of uint32")
    array_class = struct.unpack(r.order + "I", flags[:4])[0]
    kind, dims = r.element()
    if kind != 5 or not dims or len(dims) % 4:
        raise ValueError(f"{r.where}: a variable's dimensions must be int32")
    shape = tuple(int(d) for d in np.frombuffer(dims, r.order + "i4"))
    _, name = r.element()
    name = bytes(name).decode("latin-1")
    dtype = _CLASSES.get(array_class & 0xFF)
    if dtype is None or array_class & _COMPLEX_FLAG:
        return None
    if min(shape) < 0:
        raise ValueError(f"{r.where}: variable {name!r} has negative dimensions {shape}")
    kind, data = r.element()
    stored = _ELEMENT_TYPES.get(kind)
    if stored is None:
        raise ValueError(f"{r.where}: variable {name!r} holds data of unknown element type {kind}")
    count = math.prod(shape)  # exact: dimensions a corrupted file claims can overflow int64
    if len(data) != count * int(stored[1]):
        raise ValueError(f"{r.where}: variable {name!r} of shape {shape} needs {count} values of {stored}, the file "
                         f"holds {len(data)} bytes")
    values = np.frombuffer(data, r.order + stored).astype(dtype, copy=False)  # a view where the types agree
    return name, values.reshape(shape, order="F")
