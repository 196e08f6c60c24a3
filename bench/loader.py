"""Can the loader feed a GPU? Store reads and the loader's batches, against what training
on GPUs consumes.

    python -m bench.loader [--store PATH ...] [--batch-size 4096] [--batches 24]

For each store (default `paths.activations`; give a bfloat16 and a float8 dump of the same
tokens to compare them), in one run:
1. shard reads: every shard of both activation arrays read once in store order, as the
   loader reads them (`read_rows`: one file read per shard): stored MB/s and tokens/s. The
   page cache may serve them (the store's size and the free memory are printed).
2. gather + decode: the loader's batch gather (`np.take` of shuffled rows from a group
   already in memory) and the decode to the tensor training gets (a view for bfloat16,
   float8 -> bfloat16): tokens/s, no reads.
3. end to end: `ActivationLoader.batches` (its background thread reads the shard groups,
   shuffles, gathers and decodes) consumed by a loop that does nothing else: tokens/s and
   the stored bytes/s behind them; the first batch (the first group's read) is left out.
   Then again without the decode (`decode_on_host=False`: a training GPU decodes float8).
Then `bench.scale`'s paper model gives the tokens/s of feature-parallel training on H100s
and the store bandwidth it needs in each dtype (every rank reads the whole batch, so N GPUs
read N times the tokens/s).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np

from bench.scale import MODELS, Hardware, scale_row
from pipeline.config import load_params
from pipeline.loader import ActivationLoader
from pipeline.store import ACTIVATIONS, ActivationStore


def store_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def shard_reads(store: ActivationStore) -> tuple[float, float]:
    """(stored MB/s, tokens/s) of reading every shard of both arrays once."""
    s, nbytes = store.schema, 0
    start = time.perf_counter()
    for shard in range(s.n_shards):
        for name in ACTIVATIONS:
            nbytes += store.read_rows(name, *s.shard_rows(shard)).nbytes
    seconds = time.perf_counter() - start
    return nbytes / seconds / 1e6, s.n_tokens / seconds


def gather_decode(store: ActivationStore, batch_size: int, reps: int) -> float:
    """Tokens/s of the loader's gather of shuffled rows and its decode, from memory."""
    s = store.schema
    group = {n: store.read_rows(n, *s.shard_rows(0)) for n in ACTIVATIONS}
    rng = np.random.default_rng(0)
    rows = [rng.permutation(len(group["mlp_out"]))[:batch_size] for _ in range(reps)]
    start = time.perf_counter()
    for r in rows:
        for n in ACTIVATIONS:
            store.to_torch(np.take(group[n], r, axis=0))
    return reps * len(rows[0]) / (time.perf_counter() - start)


def end_to_end(store: ActivationStore, batch_size: int, n_batches: int, decode_on_host: bool) -> float:
    """Tokens/s of `ActivationLoader.batches` after its first batch."""
    loader = ActivationLoader(
        store, batch_size=batch_size, buffer_shards=2, val_fraction=0.05, decode_on_host=decode_on_host
    )
    it = loader.batches()
    next(it)
    start = time.perf_counter()
    for _ in itertools.islice(it, n_batches):
        pass
    seconds = time.perf_counter() - start
    it.close()
    return n_batches * batch_size / seconds


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--store", action="append", help="a store's path (repeat to compare)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=24)
    args = parser.parse_args()
    paths = args.store or [load_params(args.params).paths.activations]
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    print(f"batch {args.batch_size} tokens; free memory {free / 1e9:.1f} GB\n")
    print(
        "store | dtype | tokens | GB | bytes/token | shard reads MB/s | shard reads tok/s "
        "| gather+decode tok/s | loader tok/s | loader stored MB/s | loader tok/s, GPU decodes"
    )
    measured = {}
    for path in paths:
        store = ActivationStore(path)
        s = store.schema
        per_token = sum(store.array(n).nbytes for n in ACTIVATIONS) / s.n_tokens
        read_mb, read_tok = shard_reads(store)
        gather = gather_decode(store, args.batch_size, reps=8)
        loader = end_to_end(store, args.batch_size, args.batches, decode_on_host=True)
        raw = end_to_end(store, args.batch_size, args.batches, decode_on_host=False)
        measured[s.dtype] = max(loader, raw)
        print(
            f"{path} | {s.dtype} | {s.n_tokens} | {store_bytes(path) / 1e9:.2f} | {per_token:.0f} | "
            f"{read_mb:.0f} | {read_tok:.3g} | {gather:.3g} | {loader:.3g} | "
            f"{loader * per_token / 1e6:.0f} | {raw:.3g}"
        )
    hw = Hardware()
    print(
        f"\nWhat GPU training needs (bench.scale: H100 bf16 at {hw.mfu:.0%} MFU, batch "
        f"{args.batch_size}; every rank reads the whole batch):"
    )
    print("model | F/layer | gpus | tokens/s | bf16 GB/s | float8 GB/s")
    for m in MODELS:
        for n in (1, 8):
            row = scale_row(m, n, args.batch_size, hw)
            tok = row["tokens/s"] * n  # token reads per second over all ranks
            bf16, fp8 = 2 * m.n_layers * m.d_model * 2, 2 * m.n_layers * (m.d_model + 4)
            print(
                f"{m.name} | {m.d_transcoder} | {n} | {row['tokens/s']:.3g} | {tok * bf16 / 1e9:.3g} | "
                f"{tok * fp8 / 1e9:.3g}"
            )
    for dtype, tok in measured.items():
        print(f"\nthis machine's loader ({dtype}, the faster way): {tok:.3g} tokens/s per process")


if __name__ == "__main__":
    main()
