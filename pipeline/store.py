"""The activation store: a Zarr v3 group of sharded, uncompressed arrays.

Layout (`n_tokens` rows, one per token, in corpus order):

    resid_mid  (n_tokens, n_layers, d_model)  MLP input of every layer (hook_resid_mid)
    mlp_out    (n_tokens, n_layers, d_model)  MLP block output of every layer (hook_mlp_out)
    token_ids  (n_tokens,) int32
    doc_ids    (n_tokens,) int32              document index in the corpus
    positions  (n_tokens,) int32              position in its sequence (0 = BOS)
    mlp_out_norm (n_tokens, n_layers) float32 L2 norm of each stored `mlp_out` row, one
                                              chunk per shard (stores from before it lack it)

The two activation arrays are sharded along tokens (`shard_tokens` rows per file) with
inner chunks of `chunk_tokens` rows, and no compressor (zstd was measured to halve read
speed for ~7% space). How a row's values are stored (bfloat16 as uint16, float8 as scaled
e4m3 bytes and a scale, decoded to bfloat16 for every reader) is `pipeline.codec`.

Writing is crash-safe: a `StoreWriter` works in a staging folder (`<path>.partial`),
writes whole shards only, marks each finished shard with an empty file
`progress/<shard>`, writes only the unmarked shards when started again with the same
schema, and finally marks the group `complete` and renames it into place. Under
`torchrun` (`pipeline.distributed`) rank 0 creates the store, each rank writes the shards
it owns (shard u on rank u mod N), and rank 0 finalizes it once every rank is done; the
markers let a killed run resume with any number of processes, and the bytes do not
depend on it. `ActivationStore` refuses a
store that is not complete, has missing chunks or a file of the wrong size, so a reader
never sees fill values; a read that fails Zarr's checksum names the damaged file. Whole
shards are read and written as single files, without Zarr's copies (`pipeline.shards`).

A store may also live on object storage: `path` an fsspec URL (`s3://bucket/acts.zarr`),
written in place with the same crash safety (no rename there: `pipeline.remote`), or a
manifest file (`*.json`) that names such a URL and what the store there must hold. Its
objects are the bytes of the local files; whole shards are one PUT and one GET, and
`read_rows_many` issues several GETs at once to keep training fed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr

from pipeline.atomic import move_into_place
from pipeline.codec import (
    FP8,
    SCALE_BYTES,
    encoding_attributes,
    nonfinite_layers,
    nonfinite_rows,
    row_norms,
    storage_dtype,
    to_torch,
)
from pipeline.config import is_url
from pipeline.distributed import World, barrier, fault, wait_for_ranks
from pipeline.remote import Prefix, read_manifest, write_manifest
from pipeline.shards import (
    fast_path_ok,
    file_layout,
    file_problem,
    index_problem,
    read_shard_file,
    shard_from_bytes,
    shard_parts,
    size_problem,
    write_shard_file,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ACTIVATIONS = ("resid_mid", "mlp_out")
SMALL_ARRAYS = ("token_ids", "doc_ids", "positions")
NORMS = "mlp_out_norm"
"""Per (token, layer) norms of the stored `mlp_out`, written by the dump so that finding
massive-activation rows (`pipeline.loader.massive_rows`) reads 120 bytes per token, not the
whole `mlp_out` array: training then reads each stored activation once."""
HOOKS = {"resid_mid": "hook_resid_mid", "mlp_out": "hook_mlp_out"}
# Write chunks even when they equal the fill value, so "every chunk exists" is the test
# of a complete store (zarr skips such chunks by default).
_ALWAYS_WRITE = {"write_empty_chunks": True}
REMOTE_READS = 8
"""GETs in flight at once in `ActivationStore.read_rows_many` on object storage: one
connection to S3 carries a fraction of a machine's bandwidth, and AWS's performance
guidelines scale throughput with concurrent requests (`bench/s3.py` measures it)."""


def crc32c(*parts) -> int:
    """crc32c of the concatenated buffers `parts` (bytes or contiguous arrays)."""
    value = 0
    for part in parts:
        view = np.frombuffer(part, np.uint8)
        view.flags.writeable = False  # google_crc32c takes read-only buffers only
        value = google_crc32c.extend(value, view)
    return value


def shard_file(name: str, shard: int) -> str:
    """The storage file of shard `shard` of activation array `name`, inside the store."""
    return f"{name}/c/{shard}/0/0"


def _open_group(where: Path | Prefix, mode: str) -> zarr.Group:
    """The store's Zarr group at a local folder or (through Zarr's fsspec store) a prefix."""
    if isinstance(where, Prefix):
        return zarr.open_group(where.zarr_store(read_only=mode == "r"), mode=mode)
    return zarr.open_group(str(where), mode=mode)


@dataclass(frozen=True)
class StoreSchema:
    """Everything that determines a store's bytes, recorded in its attributes."""

    model: str
    architecture: str
    n_layers: int
    d_model: int
    context_len: int
    n_tokens: int
    shard_tokens: int
    chunk_tokens: int
    dtype: str
    corpus_sha256: str
    """Hash of the packed token and document ids: a resumed run must see the same tokens."""
    compute_dtype: str = ""
    """The dtype the model ran in (`model.dtype` resolved): a resumed run must not mix
    shards computed in another. Empty in stores from before it was recorded."""

    @property
    def n_shards(self) -> int:
        return -(-self.n_tokens // self.shard_tokens)

    @property
    def row_shape(self) -> tuple[int, int]:
        """The stored shape of one token's activations: (n_layers, d_model), plus the
        scale's bytes per layer for float8."""
        return self.n_layers, self.d_model + (SCALE_BYTES if self.dtype == FP8 else 0)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_tokens
        return start, min(start + self.shard_tokens, self.n_tokens)


def hash_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class StoreWriter:
    """Creates (or resumes) a store in `<path>.partial` and writes it one shard at a time;
    a `path` that is a URL is written in place (`pipeline.remote`), and with `manifest`
    (a local `.json` path) `finalize` also writes the store's manifest there.

    With a `world` of several ranks, every rank constructs one (rank 0 creates or resumes
    the store, the others open it after a barrier) and writes the shards of `shards_todo`
    (those it owns that are not marked done); `finalize` then waits for every rank."""

    def __init__(
        self,
        path: str | Path,
        schema: StoreSchema,
        token_ids,
        doc_ids,
        positions,
        *,
        world: World = World(),
        manifest: str | Path | None = None,
    ):
        self.remote = Prefix(path) if is_url(path) else None
        if self.remote is None:
            assert manifest is None, "a manifest stands for a store on object storage"
            self.path = Path(path)
            self.staging = self.path.with_name(self.path.name + ".partial")
            self._progress = self.staging / "progress"
        else:
            self.path = self.staging = self.remote.url
        self.manifest = manifest
        self.schema = schema
        self.world = world
        where = self.remote or self.staging
        if world.main:
            if self._resumable():
                self.group = _open_group(where, "r+")
            else:
                self._create(token_ids, doc_ids, positions)
        barrier("dump: store created")
        if not world.main:
            self.group = _open_group(where, "r+")
        done = self.finished()
        if world.main and done:
            logger.info("resuming %s with %d/%d shards done", self.staging, len(done), schema.n_shards)
        self.shards_todo = [u for u in range(schema.n_shards) if world.owns(u) and u not in done]
        self._fast = {n: fast_path_ok(self.group[n]) for n in ACTIVATIONS}

    def finished(self) -> set[int]:
        """The shards marked done."""
        if self.remote is not None:
            return {int(name) for name in self.remote.names("progress") if name.isdigit()}
        return {int(p.name) for p in self._progress.iterdir() if p.name.isdigit()}

    def _resumable(self) -> bool:
        """Whether the staging folder (or the prefix) holds an unfinished store of this
        schema. A complete store on object storage is a finished dump (its markers are
        gone) that a new run replaces, unless its markers show the run died finalizing."""
        if self.remote is None:
            legacy = self.staging / "progress.json"  # {"shards_done": n}: shards [0, n) are done
            if not (self._progress.is_dir() or legacy.is_file()):
                return False
        try:
            attrs = _open_group(self.remote or self.staging, "r").attrs.asdict()
        except Exception:  # unreadable leftovers are rebuilt, never trusted
            return False
        same = attrs.get("schema") == asdict(self.schema)
        if not same:
            logger.warning("discarding %s: it was written with other settings", self.staging)
        elif self.remote is not None:
            return attrs.get("complete") is not True or bool(self.finished())
        elif legacy.is_file():
            self._progress.mkdir(exist_ok=True)
            for shard in range(json.loads(legacy.read_text())["shards_done"]):
                (self._progress / str(shard)).touch()
            legacy.unlink()
        return same

    def _create(self, token_ids, doc_ids, positions) -> None:
        s = self.schema
        if self.remote is None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.group = zarr.open_group(str(self.staging), mode="w")
        else:
            self._clear_prefix()
            self.group = _open_group(self.remote, "w")
        for name in ACTIVATIONS:
            self.group.create_array(
                name,
                shape=(s.n_tokens, *s.row_shape),
                chunks=(s.chunk_tokens, *s.row_shape),
                shards=(s.shard_tokens, *s.row_shape),
                dtype=storage_dtype(s.dtype),
                compressors=None,
                fill_value=0,
                config=_ALWAYS_WRITE,
                attributes={"logical_dtype": s.dtype, "hook": HOOKS[name], **encoding_attributes(s.dtype)},
            )
        for name, values in (
            ("token_ids", token_ids),
            ("doc_ids", doc_ids),
            ("positions", positions),
        ):
            values = np.asarray(values, dtype=np.int32).reshape(-1)
            assert values.shape == (s.n_tokens,), (name, values.shape)
            arr = self.group.create_array(
                name,
                shape=values.shape,
                chunks=values.shape,
                dtype="int32",
                compressors=None,
                fill_value=0,
                config=_ALWAYS_WRITE,
            )
            arr[:] = values
        self.group.create_array(
            NORMS,
            shape=(s.n_tokens, s.n_layers),
            chunks=(s.shard_tokens, s.n_layers),
            dtype="float32",
            compressors=None,
            fill_value=0,
            config=_ALWAYS_WRITE,
        )
        self.group.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "complete": False,
                "schema": asdict(s),
                "hooks": HOOKS,
                "model": s.model,
                "dtype": s.dtype,
                "context_len": s.context_len,
                "n_tokens": s.n_tokens,
            }
        )
        if self.remote is None:
            self._progress.mkdir()

    def _clear_prefix(self) -> None:
        """Delete what an earlier store left under the prefix, refusing anything else."""
        known = {"zarr.json", "progress", *ACTIVATIONS, *SMALL_ARRAYS, NORMS}
        foreign = sorted({rel.split("/")[0] for rel in self.remote.sizes()} - known)
        if foreign:
            raise ValueError(
                f"{self.path} holds objects that are not part of an activation store "
                f"({', '.join(foreign[:3])}); name an empty prefix, or delete them"
            )
        self.remote.remove_all()

    def write_shard(self, shard: int, activations: dict[str, np.ndarray]) -> None:
        """Write shard `shard` of every activation array, then mark it done.

        Values must be finite: a NaN/inf raises a `ValueError` naming the array, layer and row.
        """
        if not 0 <= shard < self.schema.n_shards:
            raise ValueError(f"shard {shard} is outside the store's {self.schema.n_shards} shards")
        start, stop = self.schema.shard_rows(shard)
        for name in ACTIVATIONS:
            if activations[name].shape[0] != stop - start:
                raise ValueError(
                    f"write to {name} rows [{start}, {stop}) is not aligned to its shard "
                    f"(shard {shard} has {stop - start} rows, got {activations[name].shape[0]})"
                )
        self._check_finite(activations, start)
        crcs = {}
        for name in ACTIVATIONS:
            values = activations[name]
            rel = shard_file(name, shard)
            if stop - start == self.schema.shard_tokens and self._fast[name]:
                if self.remote is None:
                    write_shard_file(self.staging / rel, values, self.schema.chunk_tokens)
                else:
                    parts = shard_parts(values, self.schema.chunk_tokens)
                    self.remote.put(rel, b"".join(parts))  # one object: the local file's bytes
                    crcs[rel] = crc32c(*parts)
            else:
                self.group[name][start:stop] = values
                if self.remote is not None:
                    crcs[rel] = crc32c(self.remote.get(rel))  # a partial last shard: read back
        self.group[NORMS][start:stop] = row_norms(activations["mlp_out"], self.schema.dtype)
        if self.remote is None:
            (self._progress / str(shard)).touch()
        else:
            self.remote.put(f"progress/{shard}", json.dumps(crcs, sort_keys=True).encode())
        fault(f"dump-shard-{shard}")

    def _check_finite(self, activations: dict[str, np.ndarray], first_row: int) -> None:
        """Refuse NaN/inf, naming the earliest layer (where the problem starts) and a token."""
        bad = {n: nonfinite_layers(activations[n], self.schema.dtype) for n in ACTIVATIONS}
        layers = [(int(np.argmax(b)), i, n) for i, (n, b) in enumerate(bad.items()) if b.any()]
        if not layers:
            return
        layer, _, name = min(layers)
        row = int(np.argmax(nonfinite_rows(activations[name][:, layer : layer + 1], self.schema.dtype)))
        raise ValueError(
            f"{name} of layer {layer} has NaN/inf values at stored token {first_row + row}; "
            "if this is float16 overflow set `dump.dtype: bfloat16`, otherwise try "
            "`model.dtype: float32`"
        )

    def finalize(self) -> Path | str:
        """Once every rank has written its shards, mark the store complete and move it
        into place (rank 0); on object storage mark it complete where it is, write the
        manifest (if any) and delete the markers. Returns the manifest or the store."""
        wait_for_ranks("dump: shards written")
        if self.world.main:
            missing = sorted(set(range(self.schema.n_shards)) - self.finished())
            if missing:
                raise RuntimeError(f"finalize with shards {missing} of {self.staging} not written")
            if self.remote is None:
                self.group.attrs["complete"] = True
                shutil.rmtree(self._progress)
                move_into_place(self.staging, self.path)
            else:
                self._publish()
        barrier("dump: store complete")
        return self.path if self.manifest is None else Path(self.manifest)

    def _publish(self) -> None:
        """Complete a store on object storage: `complete: true` is written after every
        shard, the manifest after that, and the markers go last (a run that dies before
        then finalizes again from them)."""
        markers = [f"progress/{u}" for u in range(self.schema.n_shards)]
        crcs = {}
        for blob in self.remote.get_many(markers):
            crcs.update(json.loads(blob))
        self.group.attrs["complete"] = True
        if self.manifest is not None:
            files = {
                f"{name}/{rel}": (size, crcs[f"{name}/{rel}"])
                for name in ACTIVATIONS
                for rel, (size, _) in file_layout(self.group[name]).items()
            }
            write_manifest(self.manifest, self.path, asdict(self.schema), files)
        self.remote.remove(markers)


class ActivationStore:
    """Read access to a complete store: a local folder, a URL (`pipeline.remote`), or a
    manifest file (`*.json`) naming a URL, whose store must match it: the same schema
    and shard sizes when it opens, the same crc32c when a whole shard is read."""

    def __init__(self, path: str | Path, *, max_reads: int = REMOTE_READS):
        self.manifest = self.manifest_path = None
        if not is_url(path) and str(path).endswith(".json"):
            self.manifest_path, self.manifest = path, read_manifest(path)
            path = self.manifest["url"]
        self.remote = Prefix(path) if is_url(path) else None
        self.path = Path(path) if self.remote is None else self.remote.url
        self.max_reads = max_reads
        self._fix = "run `dvc pull` to restore it, or `dvc repro dump` to rebuild the store"
        if self.remote is not None:
            self._fix = "run `dvc repro dump` to rebuild the store"
        found = None if self.remote is None else self.remote.sizes()  # one listing for every check
        if not (self.path.exists() if self.remote is None else "zarr.json" in found):
            raise FileNotFoundError(
                f"activation store {self.path} does not exist{self._hint()}; run `dvc repro dump`"
            )
        try:
            self.group = _open_group(self.remote or self.path, "r")
            attrs = self.group.attrs.asdict()
        except Exception as e:
            raise ValueError(
                f"{self.path} is not a readable Zarr store ({e}); re-run `dvc repro dump`"
            ) from e
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"{self.path} has schema version {attrs.get('schema_version')}, this code reads "
                f"{SCHEMA_VERSION}; re-run `dvc repro dump`"
            )
        if attrs.get("complete") is not True:
            raise ValueError(f"{self.path} is incomplete (the dump did not finish); re-run `dvc repro dump`")
        self.schema = StoreSchema(**attrs["schema"])
        self._fast: dict[str, bool] = {}
        self.has_norms = NORMS in self.group
        for name in (*ACTIVATIONS, *SMALL_ARRAYS, *[NORMS] * self.has_norms):
            if name not in self.group:
                raise ValueError(f"{self.path} has no array {name!r}; re-run `dvc repro dump`")
            arr = self.group[name]
            if arr.nchunks_initialized != arr.nchunks:
                raise ValueError(
                    f"{self.path}/{name} is missing {arr.nchunks - arr.nchunks_initialized} of "
                    f"{arr.nchunks} chunks (a corrupted or partial copy); "
                    "re-run `dvc repro dump` or `dvc pull`"
                )
            problem = self._damage(name, read_index=False, found=found)  # a stat per file, or the listing
            if problem is not None:
                raise ValueError(problem)
        if self.manifest is not None:
            self._check_manifest()

    def _hint(self) -> str:
        """Where an interrupted dump of a missing local store is, if it is."""
        if self.remote is not None:
            return ""
        partial = self.path.with_name(self.path.name + ".partial")
        return " (an interrupted dump is at " + str(partial) + ")" if partial.exists() else ""

    def _check_manifest(self) -> None:
        """Refuse a store that is not the one the manifest describes (rewritten by another
        dump, or changed since): its schema and shard files must be the manifest's."""
        m, fix = self.manifest, "run `dvc repro dump` to rebuild it (the stages after it re-run)"
        where = f"the activation store at {self.path} does not match its manifest {self.manifest_path}"
        if m.get("schema") != asdict(self.schema):
            changed = sorted(k for k, v in asdict(self.schema).items() if (m.get("schema") or {}).get(k) != v)
            raise ValueError(f"{where}: it was dumped with other settings ({', '.join(changed)}); {fix}")
        sizes = {
            f"{n}/{rel}": size for n in ACTIVATIONS for rel, (size, _) in file_layout(self.group[n]).items()
        }
        if sizes != {rel: f["size"] for rel, f in m["files"].items()}:
            raise ValueError(f"{where}: its shard files differ in number or size; {fix}")

    def _damage(self, name: str, *, read_index: bool, found: dict[str, int] | None = None) -> str | None:
        """The error message for the first damaged storage file of array `name`, or None
        when every file has its expected size (and, with `read_index`, a valid index).
        On object storage the sizes come from a listing (`found`, else a fresh one)."""
        layout = file_layout(self.group[name])
        if self.remote is not None and found is None:
            found = self.remote.sizes()
        for rel, (size, index_size) in (layout or {}).items():
            if self.remote is None:
                problem = file_problem(self.path / name / rel, size, index_size, read_index=read_index)
            else:
                problem = size_problem(found.get(f"{name}/{rel}"), size)
                if problem is None and read_index and index_size:
                    problem = index_problem(self.remote.get(f"{name}/{rel}", size - index_size, size))
            if problem is not None:
                return (
                    f"activation store {self.path}: {'shard ' if index_size else ''}file {name}/{rel} "
                    f"of array {name!r} {problem} (a corrupted or truncated copy); {self._fix}"
                )
        return None

    @contextlib.contextmanager
    def _reading(self, name: str) -> Iterator[None]:
        """Turn Zarr's error for a damaged file of array `name` (a `ValueError`: a failed
        checksum, a short chunk) into one naming the file and the fix; any other error, or
        one where every file of the array is intact, propagates unchanged."""
        try:
            yield
        except ValueError as e:
            problem = self._damage(name, read_index=True)
            if problem is None:
                raise
            raise ValueError(problem) from e

    @property
    def n_tokens(self) -> int:
        return self.schema.n_tokens

    def array(self, name: str) -> CheckedArray:
        """Array `name`; reading a damaged file of it raises an error naming the file."""
        return CheckedArray(self, name)

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `[start, stop)` of an array as a torch tensor in its logical dtype."""
        with self._reading(name):
            values = self.group[name][start:stop]
        return to_torch(values, self.schema.dtype) if name in ACTIVATIONS else torch.from_numpy(values)

    def to_torch(self, values: np.ndarray) -> torch.Tensor:
        """Stored activation values as a torch tensor of the logical dtype (no copy)."""
        return to_torch(values, self.schema.dtype)

    def read_rows(self, name: str, start: int, stop: int, keep: np.ndarray | None = None) -> np.ndarray:
        """Stored values of rows `[start, stop)` (a whole shard is read as one file), optionally
        only the rows `keep` (indices relative to `start`)."""
        values = None
        s = self.schema
        if (
            name in ACTIVATIONS
            and start % s.shard_tokens == 0
            and stop - start == s.shard_tokens
            and self._fast.setdefault(name, fast_path_ok(self.group[name]))
        ):
            rel = shard_file(name, start // s.shard_tokens)
            shape = (s.shard_tokens, *s.row_shape)
            if self.remote is None:
                values = read_shard_file(self.path / rel, shape, storage_dtype(s.dtype), s.chunk_tokens)
            else:
                values = shard_from_bytes(self._get_shard(rel), shape, storage_dtype(s.dtype), s.chunk_tokens)
        if values is None:  # not the raw layout, or a damaged file: Zarr reads (or reports) it
            with self._reading(name):
                values = self.group[name][start:stop]
        return values if keep is None else values[keep]

    def _get_shard(self, rel: str) -> bytes:
        """Shard object `rel` in one GET; with a manifest, refuse bytes other than those it
        describes (the store at the URL was rewritten with the same settings)."""
        data = self.remote.get(rel)
        if self.manifest is not None and crc32c(data) != self.manifest["files"][rel]["crc32c"]:
            raise ValueError(
                f"shard file {rel} of the activation store at {self.path} is not the one its manifest "
                f"{self.manifest_path} describes (crc32c differs): the store was rewritten since; "
                "run `dvc repro dump` to rebuild it (the stages after it re-run)"
            )
        return data

    def read_rows_many(self, reads: Iterable[tuple]) -> Iterator[np.ndarray]:
        """`read_rows(*args)` for each args tuple of `reads`, in order. On object storage up
        to `max_reads` are in flight at once, so that one GET's latency overlaps the others'
        transfers (and at most that many shards wait in memory); a local store reads them
        one after another, as before."""
        if self.remote is None or self.max_reads <= 1:
            yield from (self.read_rows(*args) for args in reads)
            return
        with ThreadPoolExecutor(self.max_reads, thread_name_prefix="store-read") as pool:
            pending: deque = deque()
            try:
                for args in reads:
                    pending.append(pool.submit(self.read_rows, *args))
                    if len(pending) == self.max_reads:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()


class CheckedArray:
    """A store's Zarr array whose reads name the damaged file, if any, in their error;
    everything else (`shape`, `attrs`, ...) is the Zarr array's."""

    def __init__(self, store: ActivationStore, name: str):
        self._store, self._name = store, name
        self._array = store.group[name]

    def __getitem__(self, key) -> np.ndarray:
        with self._store._reading(self._name):
            return self._array[key]

    def __len__(self) -> int:
        return len(self._array)

    def __getattr__(self, attr: str):
        return getattr(self._array, attr)
