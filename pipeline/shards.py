"""Shard files of the activation store in Zarr's `sharding_indexed` layout, read and written
directly: with uncompressed inner chunks spanning every non-token dimension, a shard is
its rows as raw bytes followed by an index of (offset, nbytes) per chunk and its crc32c.
`pipeline.store` uses these for whole shards and falls back to Zarr for anything else;
`tests/test_store.py` checks the bytes equal Zarr's.
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


def fast_path_ok(array: zarr.Array) -> bool:
    """True when shards are raw little-endian chunks plus a crc32c-checked index at the end."""
    codecs = json.loads(json.dumps(array.metadata.to_dict()["codecs"]))  # tuples -> lists
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return False
    conf = codecs[0]["configuration"]
    return (
        conf["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}]
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
        if codecs != [{"name": "bytes", "configuration": {"endian": "little"}}]:
            return None
        grid = [-(-n // c) for n, c in zip(array.shape, array.chunks)]
        return {"c/" + "/".join(map(str, i)): (chunk_bytes, 0) for i in np.ndindex(*grid)}
    if not fast_path_ok(array):
        return None
    rows, chunk_rows, shard_rows = array.shape[0], array.chunks[0], array.shards[0]
    per_shard, n_chunks = shard_rows // chunk_rows, -(-rows // chunk_rows)
    tail = per_shard * 16 + 4
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
        return "is missing"
    if found != size:
        return f"is {found} bytes, expected {size}"
    if read_index and index_size:
        with open(path, "rb") as f:
            f.seek(size - index_size)
            index = f.read(index_size)
        if bytes(CRC32C().encode(index[:-4])) != index:
            return "has a chunk index that fails its crc32c checksum"
    return None


def write_shard_file(path: Path, values: np.ndarray, chunk_rows: int) -> None:
    """Write one full shard in Zarr's `sharding_indexed` layout, without Zarr's copies.

    With uncompressed inner chunks that span every non-token dimension, a shard is the
    shard's rows as raw bytes (chunk after chunk) followed by an index of (offset, nbytes)
    per chunk and its crc32c. Zarr's own encoder copies the data three times; this writes
    the buffer directly, with O_DIRECT where the file system and alignment allow so the
    kernel does not copy it into the page cache either. `tests/test_store.py` checks the
    bytes equal Zarr's.
    """
    values = np.ascontiguousarray(values)
    n_chunks = len(values) // chunk_rows
    chunk_bytes = values[:chunk_rows].nbytes
    index = np.empty((n_chunks, 2), dtype="<u8")
    index[:, 0] = np.arange(n_chunks, dtype=np.uint64) * chunk_bytes
    index[:, 1] = chunk_bytes
    tail = bytes(CRC32C().encode(index.tobytes()))
    path.parent.mkdir(parents=True, exist_ok=True)
    data = memoryview(values.reshape(-1).view(np.uint8))
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
    n_chunks = shape[0] // chunk_rows
    tail = n_chunks * 16 + 4
    with open(path, "rb") as f:
        if f.readinto(data) != len(data):
            return None
        index_bytes = f.read(tail + 1)
    if len(index_bytes) != tail:
        return None
    index = np.frombuffer(index_bytes[:-4], dtype="<u8").reshape(n_chunks, 2)
    chunk_bytes = len(data) // n_chunks
    expected = np.stack(
        [np.arange(n_chunks, dtype=np.uint64) * chunk_bytes, np.full(n_chunks, chunk_bytes)], 1
    )
    if not np.array_equal(index, expected) or bytes(CRC32C().encode(index_bytes[:-4])) != index_bytes:
        return None
    return out


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
