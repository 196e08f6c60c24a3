"""Training throughput from the Zarr store vs. from memory, and sparse vs. dense decoding.

    python -m bench.train [--steps 10] [--d-transcoder-big 4096]

1. The same optimisation steps (config from params.yaml `train:`), once fed by the
   `ActivationLoader` (shards read, shuffled and prefetched in a background thread) and
   once from batches already in memory; rounds alternate; prints tokens/s and the ratio.
2. The decoder's forward + backward at L0 = 64 per layer, dense vs. sparse (features
   active somewhere in the batch only), at `train.d_transcoder` and at a larger
   dictionary, where sparsity can pay.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time

import torch

from pipeline.clt import CLTShape, CrossLayerTranscoder
from pipeline.config import load_params
from pipeline.loader import ActivationLoader
from pipeline.store import ActivationStore
from pipeline.train import build_transcoder, fit_scales, init_encoder, loss_terms, normalise, sample_rows


def steps_per_second(model, batches, cfg, bandwidth: float) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start = time.perf_counter()
    n = 0
    for batch in batches:
        x, y = normalise(model, batch.x, batch.y)
        terms = loss_terms(model, x, y, lam=cfg.sparsity_coef, cfg=cfg, bandwidth=bandwidth)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        n += 1
    return n / (time.perf_counter() - start)


def decode_seconds(
    d_transcoder: int, n_layers: int, d_model: int, n_tokens: int, l0: int, sparse: bool
) -> float:
    model = CrossLayerTranscoder(CLTShape(n_layers, d_model, d_transcoder))
    mask = torch.rand(n_layers, n_tokens, d_transcoder).argsort(-1) < l0  # exactly l0 per token
    acts = (torch.rand(n_layers, n_tokens, d_transcoder) * mask).bfloat16().requires_grad_()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model.decode(acts, sparse=sparse).float().pow(2).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--d-transcoder-big", type=int, default=4096)
    args = parser.parse_args()

    params = load_params(args.params)
    cfg = params.train
    store = ActivationStore(params.paths.activations)
    loader = ActivationLoader(
        store,
        batch_size=cfg.batch_size,
        val_fraction=cfg.val_fraction,
        buffer_shards=cfg.buffer_shards,
        seed=0,
    )
    model = build_transcoder(store, cfg)
    sample = sample_rows(store, "train", cfg.val_fraction, 2048)
    fit_scales(model, sample)
    bandwidth = init_encoder(model, normalise(model, sample["resid_mid"], sample["mlp_out"])[0], cfg)
    in_memory = [dataclasses.replace(b) for b in itertools.islice(loader.epoch(1), args.steps)]
    print(
        f"store {store.n_tokens} tokens; transcoder {cfg.kind} d_transcoder={cfg.d_transcoder}, "
        f"batch {cfg.batch_size}"
    )
    ratios = []
    for r in range(args.rounds):
        mem = steps_per_second(model, in_memory, cfg, bandwidth)
        # a fresh epoch each round, so the loader reads and shuffles shards for real
        zarr_ = steps_per_second(model, itertools.islice(loader.epoch(2 + r), args.steps), cfg, bandwidth)
        ratios.append(zarr_ / mem)
        print(
            f"round {r}: from memory {mem * cfg.batch_size:.0f} tok/s, "
            f"from Zarr {zarr_ * cfg.batch_size:.0f} tok/s, ratio {zarr_ / mem:.3f}"
        )
    print(f"training from Zarr / from memory (median of {args.rounds}): {statistics.median(ratios):.3f}")

    s = store.schema
    for d_tc in (cfg.d_transcoder, args.d_transcoder_big):
        dense = decode_seconds(d_tc, s.n_layers, s.d_model, cfg.batch_size, 64, sparse=False)
        sparse = decode_seconds(d_tc, s.n_layers, s.d_model, cfg.batch_size, 64, sparse=True)
        print(
            f"decoder fwd+bwd, d_transcoder={d_tc}, L0=64, {cfg.batch_size} tokens: dense {dense:.2f} s, "
            f"sparse {sparse:.2f} s, dense/sparse {dense / sparse:.2f}x"
        )


if __name__ == "__main__":
    main()
