""".npy headers checked against the bytes that follow them, before numpy allocates anything.

np.load trusts the header: one claiming shape (10**12, 263) makes it allocate terabytes before
it finds the data missing (MemoryError), and an object dtype means a pickle. Corpora and shards
come from other people, so the header is read first and the array is loaded only when its
dtype is plain and its shape accounts for exactly the bytes there are.

The check itself is the shard contract's (rehamot.data.schema.check_npy_header, which the
training reader's decode_motion runs too); this module applies it to source files. A shard
member held in memory is decoded by rehamot.data.schema.decode_motion itself.
"""
from __future__ import annotations

from typing import BinaryIO

import numpy as np

from rehamot.data.schema import NpyHeaderError, PickledNpy, check_npy_header

__all__ = ["NpyHeaderError", "PickledNpy", "check_npy_header", "load_checked"]


def load_checked(stream: BinaryIO, size: int) -> np.ndarray:
    """The array of a checked .npy (never unpickled); the stream starts at the .npy."""
    start = stream.tell()
    check_npy_header(stream, size)
    stream.seek(start)
    return np.load(stream, allow_pickle=False)
