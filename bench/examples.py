"""`examples` throughput vs. the bare encoder over the same tokens, side by side in one run.

    python -m bench.examples [--n-tokens 32768] [--rounds 3]

Both read the first `--n-tokens` stored tokens of `paths.activations` with the same shard
reader (`iter_batches`, read ahead in a background thread) and encode every layer with
the transcoder of `paths.transcoder` in `examples.compute_dtype` (bfloat16 or float32):

1. bare: the encoder matmul and JumpReLU (in place: h where h > threshold, else 0),
   nothing else: the least any pass over the stored tokens has to do;
2. examples: `collect_examples`, i.e. the same plus every statistic and sketch of the stage
   (the finishing steps, Parquet and logit lens, are timed once, separately).

Rounds alternate (bare, examples, bare, ...); the first read of the store warms the page
cache and is not timed. Prints tokens/s of each, and the ratio examples / bare per round
and its median (goal >= 0.7). `--in-memory` times the compute alone on one shard already
in memory (no reads at all).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

from pipeline.clt import load_transcoder
from pipeline.config import load_params
from pipeline.examples import (
    FeatureState,
    chunk_weights,
    collect_examples,
    iter_batches,
    logit_lens,
    plan_chunks,
    plan_scan,
    pre_activations,
    unembedding,
    write_tables,
)
from pipeline.model import load_model
from pipeline.runtime import torch_dtype
from pipeline.store import ActivationStore


def _chunks(store, transcoder, cfg):
    scan = plan_scan(store, transcoder, cfg)
    chunks = plan_chunks(transcoder.shape.n_layers, transcoder.shape.d_transcoder)
    weights = [
        chunk_weights(transcoder, c, dtype=torch_dtype(cfg.compute_dtype), device="cpu") for c in chunks
    ]
    buffer = torch.empty(
        max(c.n_features for c in chunks) * scan.batch_rows, dtype=weights[0].threshold.dtype
    )
    return scan, chunks, weights, buffer


@torch.inference_mode()
def bare_encoder(store, transcoder, cfg) -> float:
    """Seconds to read the scanned tokens and encode every feature (matmul + JumpReLU)."""
    scan, chunks, weights, buffer = _chunks(store, transcoder, cfg)
    start = time.perf_counter()
    for _, values in iter_batches(store, scan.n_tokens, scan.batch_rows):
        x = store.to_torch(values)
        for chunk, w in zip(chunks, weights):
            h = pre_activations(x, w, buffer[: chunk.n_features * len(x)].view(chunk.n_features, len(x)))
            h.masked_fill_(h <= w.threshold[:, None], 0)
    return time.perf_counter() - start


def examples_pass(store, transcoder, cfg) -> float:
    start = time.perf_counter()
    collect_examples(store, transcoder, cfg, progress=False)
    return time.perf_counter() - start


@torch.inference_mode()
def in_memory(store, transcoder, cfg) -> tuple[float, float]:
    """Seconds of (bare, examples) compute on the first batch, already in memory."""
    scan, chunks, weights, buffer = _chunks(store, transcoder, cfg)
    x = store.to_torch(store.read_rows("resid_mid", 0, scan.batch_rows))
    start = time.perf_counter()
    for chunk, w in zip(chunks, weights):
        h = pre_activations(x, w, buffer[: chunk.n_features * len(x)].view(chunk.n_features, len(x)))
        h.masked_fill_(h <= w.threshold[:, None], 0)
    bare = time.perf_counter() - start
    states = [FeatureState(c.n_features, cfg, weights[0].threshold.dtype, "cpu") for c in chunks]
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for chunk, w, state in zip(chunks, weights, states):
        h = pre_activations(x, w, buffer[: chunk.n_features * len(x)].view(chunk.n_features, len(x)))
        state.update(h.view(chunk.n_features, -1, scan.context_len), w.threshold, 0, generator)
    return bare, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-tokens", type=int, default=32768, help="stored tokens to scan (0: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-memory", action="store_true", help="also time one in-memory shard")
    parser.add_argument("--finish", action="store_true", help="also time finalize + Parquet + logit lens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params()
    cfg = dataclasses.replace(params.examples, n_tokens=args.n_tokens)
    store = ActivationStore(params.paths.activations)
    transcoder = load_transcoder(params.paths.transcoder)
    n = plan_scan(store, transcoder, cfg).n_tokens
    print(
        f"{n} tokens x {transcoder.shape.n_layers} layers x {transcoder.shape.d_transcoder} features, "
        f"compute_dtype={cfg.compute_dtype}, {torch.get_num_threads()} threads"
    )
    bare_encoder(store, transcoder, cfg)  # warm the page cache
    ratios = []
    for r in range(args.rounds):
        t_bare = bare_encoder(store, transcoder, cfg)
        t_examples = examples_pass(store, transcoder, cfg)
        ratios.append(t_bare / t_examples)
        print(
            f"round {r}: bare encoder {n / t_bare:9,.0f} tok/s   examples {n / t_examples:9,.0f} tok/s   "
            f"ratio {ratios[-1]:.2f}"
        )
    print(f"examples / bare encoder throughput: median {statistics.median(ratios):.2f} (goal >= 0.7)")
    if args.in_memory:
        bare, full = in_memory(store, transcoder, cfg)
        print(f"one shard in memory: bare {bare:.2f} s, examples {full:.2f} s, ratio {bare / full:.2f}")
    if args.finish:
        states, scan = collect_examples(store, transcoder, cfg, progress=False)
        model, _ = load_model(params.paths.model_dir, dtype=torch.float32, device=torch.device("cpu"))
        unembed, gain = unembedding(model)
        start = time.perf_counter()
        lens = logit_lens(transcoder, unembed, gain, cfg.logit_k)
        t_lens = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_tables(f"{tmp}/examples", states, lens, scan, cfg, store, {})
            t_write = time.perf_counter() - start
        print(f"logit lens {t_lens:.1f} s; finalize + Parquet {t_write:.1f} s")


if __name__ == "__main__":
    main()
