"""Read throughput of whole shards: a local store vs. the same store on S3, one GET at a
time vs. several in flight, measured side by side.

    python -m bench.s3 [--shards 8] [--shard-tokens 2048] [--n-layers 12] [--d-model 576]
                       [--reads 8] [--rounds 2] [--url s3://bucket/bench.zarr]

The same random bfloat16 store (both activation arrays, `--shards` shards of
`--shard-tokens` x `--n-layers` x `--d-model`) is written with `StoreWriter` to a local
folder and to `--url` (default: moto's S3 server on 127.0.0.1, started here as a process of
its own, `tests/s3_server.py`; a real bucket takes the endpoint and credentials from the
environment). Every round reads every shard of both arrays as the loader does, through
`ActivationStore.read_rows_many`: from the local store, from S3 with `max_reads=1`
(sequential GETs) and with `max_reads=--reads` (concurrent). Prints MB/s of each, the
median over rounds, and the ratios to the local store and to sequential S3.

The local store is read warm (the page cache holds it after writing) and moto keeps the
objects on the same machine, sharing its CPUs with the reader: there the S3 numbers are
bound by moto's and the client's CPU (HTTP in Python, one copy per shard), not by latency,
which is what concurrent GETs hide; measure a real bucket with `--url`.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.store import ACTIVATIONS, ActivationStore, StoreSchema, StoreWriter


def write_store(where: str | Path, schema: StoreSchema, values: dict[str, np.ndarray]) -> None:
    """A complete store at `where` whose every shard holds `values`."""
    ids = np.zeros(schema.n_tokens, np.int32)
    writer = StoreWriter(where, schema, ids, ids, ids)
    for shard in writer.shards_todo:
        writer.write_shard(shard, values)
    writer.finalize()


def read_mb_s(store: ActivationStore) -> float:
    """MB/s of reading every shard of both activation arrays, in the loader's order."""
    s = store.schema
    reads = [(n, *s.shard_rows(u)) for u in range(s.n_shards) for n in ACTIVATIONS]
    start = time.perf_counter()
    nbytes = sum(values.nbytes for values in store.read_rows_many(reads))
    return nbytes / 1e6 / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-tokens", type=int, default=2048)
    ap.add_argument("--n-layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--reads", type=int, default=8, help="GETs in flight when concurrent")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--url", default=None, help="an s3:// (fsspec) URL instead of moto on 127.0.0.1")
    args = ap.parse_args()
    schema = StoreSchema(
        model="bench",
        architecture="none",
        n_layers=args.n_layers,
        d_model=args.d_model,
        context_len=args.shard_tokens,
        n_tokens=args.shards * args.shard_tokens,
        shard_tokens=args.shard_tokens,
        chunk_tokens=min(512, args.shard_tokens),
        dtype="bfloat16",
        corpus_sha256="bench",
    )
    shape = (args.shard_tokens, args.n_layers, args.d_model)
    rng = np.random.default_rng(0)
    # bf16 bit patterns of 1.0 to 2.0: finite, as `StoreWriter` requires
    values = {n: rng.integers(0x3F80, 0x4000, size=shape, dtype=np.uint16) for n in ACTIVATIONS}
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            from tests.s3_server import BUCKET, s3_server

            stack.enter_context(s3_server(own_process=True))
            url = f"s3://{BUCKET}/bench.zarr"
        local = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "bench.zarr"
        write_store(local, schema, values)
        write_store(url, schema, values)
        stores = {
            "local": ActivationStore(local),
            "s3, sequential": ActivationStore(url, max_reads=1),
            f"s3, {args.reads} concurrent": ActivationStore(url, max_reads=args.reads),
        }
        shard_mb = 2 * values["mlp_out"].nbytes / 1e6
        print(f"{args.shards} shards x 2 arrays of {shard_mb / 2:.1f} MB, {url}")
        runs: dict[str, list[float]] = {name: [] for name in stores}
        for r in range(args.rounds):
            for name, store in stores.items():
                runs[name].append(read_mb_s(store))
            print(f"round {r}: " + ", ".join(f"{name} {mb[-1]:.0f} MB/s" for name, mb in runs.items()))
    median = {name: statistics.median(mb) for name, mb in runs.items()}
    sequential = median["s3, sequential"]
    print(f"{'':24s} {'MB/s':>8s} {'/ local':>8s} {'/ s3 seq':>9s}")
    for name, mb in median.items():
        print(f"{name:24s} {mb:8.0f} {mb / median['local']:8.2f} {mb / sequential:9.2f}")


if __name__ == "__main__":
    main()
