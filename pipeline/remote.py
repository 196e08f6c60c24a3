"""Activation stores on object storage: an fsspec URL (`s3://bucket/acts.zarr`,
`gs://...`, `memory://...`) in place of a local folder, and the manifest that stands for
such a store in DVC.

S3 has no rename, so a store on object storage is written in place, under its final
prefix, instead of in a staging folder that is moved into place: copying a store of
terabytes server-side would double its write time and its cost. Crash safety comes from
the order of the writes instead, each one object that S3 makes visible whole and at once
(strong read-after-write consistency):

1. the Zarr metadata and the small arrays, then the group attributes (schema, `complete:
   false`); a resumed run trusts a prefix only when these name the same schema;
2. each shard file as one object (`pipeline.shards.shard_parts`, the bytes of the local
   file), then its marker `progress/<shard>`, which holds the crc32c of the shard's
   objects; a marked shard is never written again;
3. `complete: true` in the group attributes, last; then the manifest, if any, and the
   markers are deleted. Readers refuse a store that is not complete, as for a local one.

A store is on object storage when `paths.activations` is a URL, or in the manifest
workflow when `dump.store_url` is set: then `paths.activations` is a small JSON file
(`write_manifest`) with the URL, the schema and the size and crc32c of every shard object,
which DVC caches and the downstream stages depend on instead of the store; opening it
(`pipeline.store.ActivationStore`) checks the store at the URL against it.

The endpoint and the credentials come from the environment, as for any AWS tool:
`AWS_ENDPOINT_URL` (an S3-compatible server: MinIO, Ceph, moto), `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`; fsspec's `FSSPEC_S3_<OPTION>` variables set any
other s3fs option. None of it is in `params.yaml` or in an artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec

from pipeline.atomic import write_json

MANIFEST_FORMAT = "clt-activation-store-manifest"
MANIFEST_VERSION = 1
_INSTALL = "install the object storage extra (`pip install -e '.[s3]'`, s3fs for s3://)"


class Prefix:
    """A store's prefix on an fsspec file system, with the few operations a store needs.

    Listings are read fresh each time: Zarr writes through a file system object of its own,
    so this one's listing cache would not see those writes."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as e:
            raise ImportError(f"activation store {self.url}: {e}; {_INSTALL}") from e

    def zarr_store(self, *, read_only: bool):
        """Zarr's own fsspec store on this prefix (metadata and the small arrays)."""
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, read_only=read_only)

    def key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def sizes(self) -> dict[str, int]:
        """`{path below the prefix: size}` of every object under it (one listing)."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        n = len(self.root) + 1
        return {name[n:]: info["size"] for name, info in found.items() if info.get("type") != "directory"}

    def names(self, rel: str) -> list[str]:
        """Names of the objects right below `rel`."""
        self.fs.invalidate_cache()
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.key(rel), detail=False)]
        except FileNotFoundError:
            return []

    def put(self, rel: str, data: bytes) -> None:
        """Write object `rel` whole (s3fs uploads it in parts above 100 MB: one object still)."""
        self.fs.pipe_file(self.key(rel), data)

    def get(self, rel: str, start: int | None = None, end: int | None = None) -> bytes:
        """Object `rel` (or bytes [start, end) of it) in one GET."""
        return self.fs.cat_file(self.key(rel), start=start, end=end)

    def get_many(self, rels: list[str]) -> list[bytes]:
        """Objects `rels`, in order, fetched concurrently (fsspec's batched `cat`)."""
        found = self.fs.cat([self.key(r) for r in rels])
        return [found[self.key(r)] for r in rels]

    def remove(self, rels: list[str]) -> None:
        if rels:
            self.fs.rm([self.key(r) for r in rels])

    def remove_all(self) -> None:
        """Delete every object under the prefix."""
        if self.sizes():
            self.fs.rm(self.root, recursive=True)


def write_manifest(path: str | Path, url: str, schema: dict, files: dict[str, tuple[int, int]]) -> None:
    """The manifest of the complete store at `url` with `schema` and shard objects `files`
    (`{path: (size, crc32c)}`), at local `path`: sorted, no local path or time stamp, so
    the same store gives the same bytes."""
    write_json(
        path,
        {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "url": url,
            "complete": True,
            "schema": schema,
            "files": {rel: {"size": size, "crc32c": crc} for rel, (size, crc) in sorted(files.items())},
        },
    )


def read_manifest(path: str | Path) -> dict:
    """The manifest at `path` (`write_manifest`); an error naming the fix if it is none."""
    fix = "re-run `dvc repro dump` (or `dvc pull` / `dvc checkout` to restore it)"
    try:
        manifest = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"activation store manifest {path} does not exist; {fix}") from None
    except ValueError as e:
        raise ValueError(f"activation store manifest {path} is not JSON ({e}); {fix}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{path} is not an activation store manifest (no `format: {MANIFEST_FORMAT}`); {fix}"
        )
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path} is a manifest of version {manifest.get('version')}, this code reads "
            f"{MANIFEST_VERSION}; {fix}"
        )
    return manifest
