"""Shard files of the activation store in Zarr's `sharding_indexed` layout, read and written
directly: with uncompressed inner chunks spanning every non-token dimension, a shard is
its rows as raw bytes followed by an index of (offset, nbytes) per chunk and its crc32c.
`pipeline.store` uses these for whole shards, as local files or as objects on object
storage (the same bytes), and falls back to Zarr for anything else; `tests/test_store.py`
checks the bytes equal Zarr's.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import zarr
from numcodecs import CRC32C

_PAGE = 4096
_RAW = ([{"name": "bytes", "configuration": {"endian": "little"}}], [{"name": "bytes"}])
"""Codecs of raw little-endian chunks: Zarr names no endianness for 1-byte values (float8)."""


def fast_path_ok(array: zarr.Array) -> bool:
    """True when shards are raw little-endian chunks plus a crc32c-checked index at the end."""
    codecs = json.loads(json.dumps(array.metadata.to_dict()["codecs"]))  # tuples -> lists
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return False
    conf = codecs[0]["configuration"]
    return (
        conf["codecs"] in _RAW
        and conf["index_codecs"]
        == [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
        and conf.get("index_location", "end") == "end"
        and sys.byteorder == "little"
        and conf["chunk_shape"][1:] == list(array.shape[1:])
    )


def file_layout(array: zarr.Array) -> dict[str, tuple[int, int]] | None:
    """`{path inside the array's folder: (file size, index size)}` of every storage file of
    `array` in the uncompressed layouts `StoreWriter` writes; None for any other layout.

    A shard file holds its chunks that overlap the array (each padded to full size), then
    an index of 16 bytes per chunk of the shard and its 4-byte crc32c (index size 0: no
    index, for unsharded arrays).
    """
    codecs = json.loads(json.dumps(array.metadata.to_dict()["codecs"]))  # tuples -> lists
    chunk_bytes = int(np.prod(array.chunks)) * array.dtype.itemsize
    if array.shards is None:
        if codecs not in _RAW:
            return None
        grid = [-(-n // c) for n, c in zip(array.shape, array.chunks)]
        return {"c/" + "/".join(map(str, i)): (chunk_bytes, 0) for i in np.ndindex(*grid)}
    if not fast_path_ok(array):
        return None
    rows, chunk_rows, shard_rows = array.shape[0], array.chunks[0], array.shards[0]
    per_shard, n_chunks = shard_rows // chunk_rows, -(-rows // chunk_rows)
    tail = index_size(per_shard)
    return {
        f"c/{i}/0/0": (min(per_shard, n_chunks - i * per_shard) * chunk_bytes + tail, tail)
        for i in range(-(-rows // shard_rows))
    }


def file_problem(path: Path, size: int, index_size: int, *, read_index: bool) -> str | None:
    """What is wrong with storage file `path`, which should be `size` bytes and end with an
    index of `index_size` bytes, or None if nothing is; `read_index` also checks the index's
    crc32c (a read, where the size check is a stat)."""
    try:
        found = path.stat().st_size
    except FileNotFoundError:
        found = None
    problem = size_problem(found, size)
    if problem is None and read_index and index_size:
        with open(path, "rb") as f:
            f.seek(size - index_size)
            problem = index_problem(f.read(index_size))
    return problem


def size_problem(found: int | None, size: int) -> str | None:
    """What is wrong with a storage file of `found` bytes (None: missing) that should be `size`."""
    if found is None:
        return "is missing"
    return f"is {found} bytes, expected {size}" if found != size else None


def index_problem(index: bytes) -> str | None:
    """What is wrong with a shard's chunk index (its bytes, crc32c included), or None."""
    if bytes(CRC32C().encode(index[:-4])) != index:
        return "has a chunk index that fails its crc32c checksum"
    return None


def shard_parts(values: np.ndarray, chunk_rows: int) -> tuple[memoryview, bytes]:
    """The bytes of one full shard in Zarr's `sharding_indexed` layout, as two parts: the
    shard's rows as raw bytes (a view of `values`, no copy) and the index after them.

    With uncompressed inner chunks that span every non-token dimension, a shard is the
    rows chunk after chunk followed by an index of (offset, nbytes) per chunk and its
    crc32c. This is the one place that builds those bytes: a local file
    (`write_shard_file`) and an object on object storage (`pipeline.store.StoreWriter` on
    a URL) get the same.
    """
    values = np.ascontiguousarray(values)
    n_chunks = len(values) // chunk_rows
    index = _expected_index(n_chunks, values[:chunk_rows].nbytes)
    return memoryview(values.reshape(-1).view(np.uint8)), bytes(CRC32C().encode(index.tobytes()))


def _expected_index(n_chunks: int, chunk_bytes: int) -> np.ndarray:
    """(offset, nbytes) of each of `n_chunks` chunks of `chunk_bytes` stored back to back."""
    index = np.empty((n_chunks, 2), dtype="<u8")
    index[:, 0] = np.arange(n_chunks, dtype=np.uint64) * chunk_bytes
    index[:, 1] = chunk_bytes
    return index


def write_shard_file(path: Path, values: np.ndarray, chunk_rows: int) -> None:
    """Write one full shard (`shard_parts`) as a file, without Zarr's copies.

    Zarr's own encoder copies the data three times; this writes the buffer directly, with
    O_DIRECT where the file system and alignment allow so the kernel does not copy it into
    the page cache either. `tests/test_store.py` checks the bytes equal Zarr's.
    """
    data, tail = shard_parts(values, chunk_rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_direct(path, data)
    with open(path, "ab") as f:
        f.write(tail)


def read_shard_file(path: Path, shape: tuple[int, ...], dtype, chunk_rows: int) -> np.ndarray | None:
    """Read a shard written in the raw layout of `write_shard_file` as one file read.

    Returns None (the caller then reads through Zarr) unless the file's index, checked
    with its crc32c, says the chunks are stored back to back in order.
    """
    out = np.empty(shape, dtype)
    data = memoryview(out.reshape(-1).view(np.uint8))
    tail = index_size(shape[0] // chunk_rows)
    with open(path, "rb") as f:
        if f.readinto(data) != len(data):
            return None
        index_bytes = f.read(tail + 1)
    return out if _raw_index_ok(index_bytes, shape[0] // chunk_rows, len(data)) else None


def shard_from_bytes(buf: bytes, shape: tuple[int, ...], dtype, chunk_rows: int) -> np.ndarray | None:
    """`read_shard_file` for a shard fetched whole (one GET from object storage): its
    values (a writable copy), or None unless its index says the raw layout."""
    out = np.empty(shape, dtype)
    data = out.reshape(-1).view(np.uint8)
    if len(buf) < len(data) or not _raw_index_ok(buf[len(data) :], shape[0] // chunk_rows, len(data)):
        return None
    data[:] = np.frombuffer(buf, np.uint8, count=len(data))
    return out


def index_size(n_chunks: int) -> int:
    """Bytes of a shard's index: 16 per chunk and its 4-byte crc32c."""
    return n_chunks * 16 + 4


def _raw_index_ok(index_bytes: bytes, n_chunks: int, data_bytes: int) -> bool:
    """Whether `index_bytes` is a whole shard index, intact (crc32c), saying the chunks are
    stored back to back in order."""
    if len(index_bytes) != index_size(n_chunks):
        return False
    index = np.frombuffer(index_bytes[:-4], dtype="<u8").reshape(n_chunks, 2)
    return np.array_equal(index, _expected_index(n_chunks, data_bytes // n_chunks)) and not index_problem(
        index_bytes
    )


def _write_direct(path: Path, data: memoryview) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    aligned = (
        hasattr(os, "O_DIRECT")
        and len(data) % _PAGE == 0
        and np.frombuffer(data, np.uint8, count=1).ctypes.data % _PAGE == 0
    )
    if aligned:
        try:
            fd = os.open(path, flags | os.O_DIRECT)
        except OSError:  # e.g. tmpfs
            aligned = False
    if not aligned:
        fd = os.open(path, flags)
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written : written + (1 << 30)])
    finally:
        os.close(fd)


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array on page-aligned memory (anonymous mmap), pre-faulted."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(nbytes, 1))
    array = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
    array.view(np.uint8).reshape(-1)[::_PAGE] = 0  # touch every page now, not in the hot loop
    return array
