""".npy headers checked against the bytes that follow them, before numpy allocates anything.

np.load trusts the header: one claiming shape (10**12, 263) makes it allocate terabytes before
it finds the data missing (MemoryError), and an object dtype means a pickle. Corpora and shards
come from other people, so the header is read first and the array is loaded only when its
dtype is plain and its shape accounts for exactly the bytes there are.
"""
from __future__ import annotations

import io
import math
from typing import BinaryIO

import numpy as np

_FORMAT = np.lib.format


class NpyHeaderError(ValueError):
    """The header is unreadable, or claims other data than the file holds."""


class PickledNpy(NpyHeaderError):
    """The header declares Python objects: loading it would need pickle."""


def check_npy_header(stream: BinaryIO, size: int) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the .npy of `size` bytes that starts at the stream's position.

    Leaves the stream just after the header. Raises PickledNpy for object dtypes and
    NpyHeaderError for anything else that np.load should not be given.
    """
    start = stream.tell()
    try:
        version = _FORMAT.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = _FORMAT.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = _FORMAT.read_array_header_2_0(stream)
        else:  # 3.0 only exists for structured dtypes with non-latin-1 field names
            raise NpyHeaderError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except NpyHeaderError:
        raise
    except (ValueError, TypeError, EOFError, OverflowError) as err:
        raise NpyHeaderError(f"unreadable .npy header ({err})") from err
    if dtype.hasobject:
        raise PickledNpy(f"header declares dtype {dtype} (Python objects, would need pickle)")
    if any(d < 0 for d in shape):
        raise NpyHeaderError(f"header claims a negative shape {shape}")
    claimed = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    held = size - (stream.tell() - start)
    if claimed != held:
        raise NpyHeaderError(f"header claims shape {shape} of {dtype} ({claimed} bytes), "
                             f"the data is {held} bytes")
    return tuple(shape), dtype


def load_checked(stream: BinaryIO, size: int) -> np.ndarray:
    """The array of a checked .npy (never unpickled); the stream starts at the .npy."""
    start = stream.tell()
    check_npy_header(stream, size)
    stream.seek(start)
    return np.load(stream, allow_pickle=False)


def decode_checked(data: bytes) -> np.ndarray:
    """The array of an .npy held in memory (a shard member), checked before it is decoded."""
    return load_checked(io.BytesIO(data), len(data))
