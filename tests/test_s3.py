"""Activation stores on object storage, against an S3-compatible server on 127.0.0.1
(moto, `tests/s3_server.py`): a dump killed mid-way resumes to the bytes of a local dump
and trains the same transcoder; readers refuse an incomplete store or one that does not
match its manifest; the manifest workflow under `dvc repro` keeps only the manifest in
DVC's cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import yaml

from pipeline.config import parse_params
from pipeline.dump import run as dump
from pipeline.store import ActivationStore, StoreSchema, StoreWriter
from pipeline.train import run as train
from tests.dvc_repo import ROOT, lock_outs, make_tiny_repo, run, tiny_params, write_tiny_corpus

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3():
    """The endpoint of a moto server with bucket `BUCKET`, for this module's tests."""
    from tests.s3_server import s3_server

    with s3_server() as endpoint:
        yield endpoint


def _url(tmp_path: Path, name: str = "acts.zarr") -> str:
    from tests.s3_server import BUCKET

    return f"s3://{BUCKET}/{tmp_path.name}/{name}"


def _raw(tmp_path: Path, model_dir: Path, **paths) -> dict:
    """The tiny configuration (`tests.dvc_repo.tiny_params`, 4 shards of 128 tokens) with
    the model at `model_dir` and every other path under `tmp_path`, `paths` overriding them."""
    raw = tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()), model_dir)
    write_tiny_corpus(tmp_path)
    raw["corpus"]["path"] = str(tmp_path / raw["corpus"]["path"])
    raw["paths"] = {k: str(tmp_path / v) for k, v in raw["paths"].items()} | paths
    raw["paths"]["model_dir"] = str(model_dir)
    return raw


def _local_files(path) -> dict[str, bytes]:
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _objects(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {name[len(root) + 1 :]: fs.cat_file(name) for name in sorted(fs.find(root))}


def test_killed_s3_dump_resumes_to_local_bytes_and_trains_the_same(s3, tiny_model_dir, tmp_path, monkeypatch):
    model_dir = tiny_model_dir("llama")
    local = parse_params(_raw(tmp_path / "local", model_dir))
    raw = _raw(tmp_path / "s3", model_dir, activations=_url(tmp_path))
    remote = parse_params(raw)
    dump(local, progress=False)

    (tmp_path / "s3" / "params.yaml").write_text(yaml.safe_dump(raw))
    killed = subprocess.run(  # SIGKILLed right after shard 1's marker (`pipeline.distributed.fault`)
        [sys.executable, "-m", "stages.dump"],
        cwd=tmp_path / "s3",
        env={**os.environ, "PYTHONPATH": str(ROOT), "CLT_FAULT": "dump-shard-1@0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    objects = _objects(remote.paths.activations)
    done = {int(k.split("/")[1]) for k in objects if k.startswith("progress/")}
    assert {0, 1} <= done and 3 not in done
    with pytest.raises(ValueError, match=r"acts.zarr is incomplete \(the dump did not finish\); re-run"):
        ActivationStore(remote.paths.activations)

    calls = []
    original = StoreWriter.write_shard
    monkeypatch.setattr(
        StoreWriter, "write_shard", lambda self, s, a: (calls.append(s), original(self, s, a))
    )
    dump(remote, progress=False)
    assert calls == [s for s in range(4) if s not in done]  # finished shards are never rewritten
    assert _objects(remote.paths.activations) == _local_files(local.paths.activations)  # no markers left

    train(local, progress=False)
    train(remote, progress=False)
    assert _local_files(remote.paths.transcoder) == _local_files(local.paths.transcoder)


def test_manifest_stands_for_the_store_and_catches_a_rewrite(s3, tiny_model_dir, tmp_path):
    raw = _raw(tmp_path, tiny_model_dir("llama"), activations=str(tmp_path / "acts.json"))
    raw["dump"]["store_url"] = url = _url(tmp_path)
    params = parse_params(raw)
    assert dump(params, progress=False) == tmp_path / "acts.json"
    text = (tmp_path / "acts.json").read_text()
    manifest = json.loads(text)
    assert manifest["url"] == url and manifest["complete"] is True and str(tmp_path) not in text
    assert sorted(manifest["files"]) == [f"{n}/c/{s}/0/0" for n in ("mlp_out", "resid_mid") for s in range(4)]
    store = ActivationStore(tmp_path / "acts.json")
    intact = store.read_rows("mlp_out", 128, 256)
    assert list(store.read_rows_many([("resid_mid", 0, 128), ("mlp_out", 128, 256)]))[1].tobytes() == (
        intact.tobytes()
    )

    fs, root = fsspec.core.url_to_fs(url)
    shard = f"{root}/mlp_out/c/1/0/0"
    data = bytearray(fs.cat_file(shard))
    data[0] ^= 0xFF  # another dump's values, same size and index
    fs.pipe_file(shard, bytes(data))
    with pytest.raises(ValueError, match=r"mlp_out/c/1/0/0 of the activation store at .* \(crc32c differs\)"):
        ActivationStore(tmp_path / "acts.json").read_rows("mlp_out", 128, 256)

    manifest["schema"]["n_tokens"] = 1024
    (tmp_path / "other.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"does not match its manifest .*other settings \(n_tokens\)"):
        ActivationStore(tmp_path / "other.json")


def _schema(**changes) -> StoreSchema:
    fields = dict(model="m", architecture="A", n_layers=1, d_model=4, context_len=4, n_tokens=8)
    fields |= dict(shard_tokens=4, chunk_tokens=4, dtype="float32", corpus_sha256="0")
    return StoreSchema(**(fields | changes))


def test_missing_or_incomplete_remote_store_is_refused():
    url = "memory://refused/acts.zarr"
    with pytest.raises(
        FileNotFoundError, match=f"activation store {url} does not exist; run `dvc repro dump`"
    ):
        ActivationStore(url)
    StoreWriter(url, _schema(), np.zeros(8), np.zeros(8), np.zeros(8))
    with pytest.raises(ValueError, match=f"{url} is incomplete .*; re-run `dvc repro dump`"):
        ActivationStore(url)


def test_damaged_remote_shard_is_named():
    """The object-storage versions of test_store.py's damage checks: a short object when
    the store opens (from the listing), a bad index when a shard is read."""
    url, schema = "memory://damaged/acts.zarr", _schema()
    writer = StoreWriter(url, schema, np.zeros(8), np.zeros(8), np.zeros(8))
    for shard in writer.shards_todo:
        writer.write_shard(shard, {n: np.ones((4, 1, 4), np.float32) for n in ("resid_mid", "mlp_out")})
    writer.finalize()
    fs = fsspec.filesystem("memory")
    shard = "/damaged/acts.zarr/mlp_out/c/1/0/0"
    intact = fs.cat_file(shard)
    fs.pipe_file(shard, intact[:-1])
    fix = "(a corrupted or truncated copy); run `dvc repro dump` to rebuild the store"
    expected = (
        f"activation store {url}: shard file mlp_out/c/1/0/0 of array 'mlp_out' is 83 bytes, expected 84"
    )
    with pytest.raises(ValueError, match=re.escape(f"{expected} {fix}")):
        ActivationStore(url)
    fs.pipe_file(shard, intact[:-10] + bytes([intact[-10] ^ 0xFF]) + intact[-9:])
    store = ActivationStore(url)
    with pytest.raises(ValueError, match="mlp_out/c/1/0/0 of array 'mlp_out' has a chunk index that fails"):
        store.read_rows("mlp_out", 4, 8)


def test_writer_never_deletes_what_is_not_a_store():
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/foreign/acts.zarr/notes.txt", b"mine")
    with pytest.raises(
        ValueError, match="holds objects that are not part of an activation store .notes.txt."
    ):
        StoreWriter("memory://foreign/acts.zarr", _schema(), np.zeros(8), np.zeros(8), np.zeros(8))
    assert fs.cat_file("/foreign/acts.zarr/notes.txt") == b"mine"


@pytest.mark.slow
def test_dvc_manifest_workflow(s3, tiny_model_dir, tmp_path):
    """`dvc repro` with `dump.store_url`: the shards go to the bucket, every stage reads
    them through the manifest, DVC caches and hashes only the manifest, and `dvc status`
    is clean afterwards."""

    def on_s3(params):
        params["paths"]["activations"] = "data/activations.json"
        params["dump"]["store_url"] = _url(tmp_path)

    repo, env = make_tiny_repo(tmp_path / "repo", tiny_model_dir("llama"), extra_params=on_s3)
    start = time.monotonic()
    run(["dvc", "repro"], repo, env)
    print(f"dvc repro: {time.monotonic() - start:.1f} s")
    assert "up to date" in run(["dvc", "status"], repo, env).lower()
    (out,) = lock_outs(repo)["dump"].items()
    assert out[0] == "data/activations.json" and not out[1].endswith(".dir")  # a file, not a folder
    cached = {p.read_bytes() for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()}
    objects = _objects(_url(tmp_path))
    shards = json.loads((repo / "data" / "activations.json").read_text())["files"]
    assert len(shards) == 8 and set(shards) < set(objects)  # 4 shards x 2 arrays, and metadata
    assert not cached & set(objects.values())  # the store is on S3 only
    assert (repo / "data" / "activations.json").read_bytes() in cached
