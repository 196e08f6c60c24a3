"""Every feature's activating contexts and activation statistics, from the activation store.

No model forward pass: features are computed from the stored MLP inputs (`resid_mid`) with
the exported, raw-space transcoder, in one streaming pass (`collect_examples`). The model
is only loaded for its unembedding (step 6).

1. `iter_batches` (`scan`): whole stored sequences, a shard at a time, read ahead in a
   background thread (`pipeline.prefetch`) so that disk reads overlap the compute. Under
   `torchrun` each rank reads a contiguous range of the batches, and rank 0 merges the
   ranks' states (`FeatureState.merge`) before step 5: the tables are the bytes of one
   process.
2. `pre_activations` (`scan`): the features of all layers are encoded together, in `Chunk`s
   of up to `CHUNK_FEATURES` (layer, feature) pairs, feature-major: h = (x W_enc + b_enc)^T
   of shape (n_features, n_seq, context_len), so that one feature's sequence is contiguous
   and every later step is one large operation rather than one small one per layer. The
   matmul is in `examples.compute_dtype` (in bfloat16, h and the thresholds are compared in
   bfloat16). A feature fires where h > threshold (JumpReLU, a = h (h > threshold)). BOS
   (position 0) is excluded everywhere, as in training and in circuit-tracer.
3. `FeatureState.update_tokens` (`stats`): per feature, the sum and the smallest firing
   activation, and a histogram of firing activations (so their count) on `FINE_BINS` bins
   over [0, 2^e), with 2^e the smallest power of two above every activation seen so far. A
   larger activation raises e and sums adjacent bins (`FeatureState._grow`): an exact merge,
   since the old grid's edges are edges of the new one.
4. `FeatureState.update_contexts` (`stats`, `sketch`): a context is a stored sequence; its
   candidate activation is the sequence's largest, at its max token. Three `Sketch`es keep
   the candidates with the smallest (key, store row) per group: `top` (key -activation, per feature:
   the top_k), `bands` (a random key, per feature and activation band of the same
   power-of-two grid: a uniform sample of each band) and `random` (a random key, per
   feature: a uniform sample of all firing contexts); each batch draws its random keys
   from its own seed (`batch_seed`). A candidate is first compared with
   its group's largest kept key, so after the first batches almost all are rejected at
   once; an admitted one takes the slot of the entry it evicts and keeps the per-token
   activations of its window immediately, so there is no second pass over the store.
5. `FeatureState.finalize` (`stats`): the bands that hold contexts are grouped into at most
   `n_intervals` contiguous intervals of whole bands, so the merged sample of an interval
   is exactly a uniform sample of its contexts; the histogram over [act_min, act_max] and
   the percentiles are interpolated from the fine grid (error below one fine bin,
   2^e / FINE_BINS <= 2 act_max / FINE_BINS).
6. `logit_lens` (`lens`): each feature's decoder directions through the final norm's gain
   and the unembedding (see its docstring for how a cross-layer decoder is reduced).

Memory depends on the number of features, not of tokens: per feature `FINE_BINS` counts
plus (top_k + n_bands(n_intervals) examples_per_interval + n_random) context slots of
`context_before + 1 + context_after` activations, and one batch's pre-activations of a chunk.

Outputs (`write_tables`, `tables`): `examples.parquet` (one row per example) and
`features.parquet` (one row per feature), sorted by (layer, feature), with explicit schemas
(`EXAMPLES_SCHEMA`, `FEATURES_SCHEMA`) and row groups of `ROW_GROUP_FEATURES` features, so
a reader that filters on (layer, feature) reads one small row group (`read_feature`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch

from pipeline.clt import CrossLayerTranscoder, load_transcoder
from pipeline.config import Params
from pipeline.distributed import local_device, world
from pipeline.examples.lens import logit_lens, unembedding
from pipeline.examples.scan import (
    CHUNK_FEATURES,
    Chunk,
    ChunkWeights,
    Scan,
    chunk_weights,
    collect_examples,
    iter_batches,
    plan_chunks,
    plan_scan,
    pre_activations,
)
from pipeline.examples.sketch import Sketch
from pipeline.examples.stats import FINE_BINS, N_QUANTILES, FeatureState, n_bands
from pipeline.examples.tables import (
    EXAMPLES_SCHEMA,
    FEATURES_SCHEMA,
    ROW_GROUP_FEATURES,
    example_table,
    feature_table,
    read_feature,
    write_tables,
)
from pipeline.model import get_layers, load_model
from pipeline.runtime import resolve_device
from pipeline.store import ActivationStore

__all__ = [
    "CHUNK_FEATURES",
    "EXAMPLES_SCHEMA",
    "FEATURES_SCHEMA",
    "FINE_BINS",
    "N_QUANTILES",
    "ROW_GROUP_FEATURES",
    "Chunk",
    "ChunkWeights",
    "FeatureState",
    "Scan",
    "Sketch",
    "chunk_weights",
    "collect_examples",
    "example_table",
    "feature_table",
    "iter_batches",
    "logit_lens",
    "n_bands",
    "plan_chunks",
    "plan_scan",
    "pre_activations",
    "read_feature",
    "run",
    "unembedding",
    "write_tables",
]

logger = logging.getLogger(__name__)


def load_inputs(params: Params) -> tuple[ActivationStore, CrossLayerTranscoder, torch.Tensor, torch.Tensor]:
    """The activation store, the exported transcoder (checked to fit the model), and the
    model's unembedding and final norm gain (`unembedding`), float32 on the CPU."""
    store = ActivationStore(params.paths.activations)
    transcoder = load_transcoder(params.paths.transcoder)
    transcoder.check_raw(params.paths.transcoder)
    model, _ = load_model(params.paths.model_dir, dtype=torch.float32, device=torch.device("cpu"))
    n_layers = len(get_layers(model))
    unembed, gain = unembedding(model)
    other = f"the model in {params.paths.model_dir}"
    transcoder.check_fits(n_layers, unembed.shape[1], where=params.paths.transcoder, other=other)
    return store, transcoder, unembed, gain


def run(params: Params, *, progress: bool = True) -> dict:
    """The `examples` stage: `examples.parquet` and `features.parquet` in `paths.examples`;
    under `torchrun` the ranks scan parts of the store and rank 0 writes (`collect_examples`),
    the same bytes as one process."""
    cfg = params.examples
    start = time.perf_counter()
    device = resolve_device(params.runtime.device)
    ranks = world(device)
    device = local_device(device)
    store, transcoder, unembed, gain = load_inputs(params)
    states, scan = collect_examples(store, transcoder, cfg, device=device, progress=progress, world=ranks)
    if not ranks.main:  # rank 0 merged this rank's share and writes the tables
        return {}
    lens = logit_lens(transcoder, unembed, gain, cfg.logit_k)
    metadata = {
        "model": store.schema.model,
        "n_tokens": scan.n_tokens,
        "n_scanned": scan.n_scanned,
        "context_len": scan.context_len,
        "activations": str(params.paths.activations),
        "transcoder": str(params.paths.transcoder),
        "examples": asdict(cfg),
        "fine_bins": FINE_BINS,
    }
    write_tables(params.paths.examples, states, lens, scan, cfg, store, metadata)
    n_features = sum(chunk.n_features for chunk, _ in states)
    n_dead = sum(int((state.count == 0).sum()) for _, state in states)
    seconds = time.perf_counter() - start
    logger.info(
        "examples of %d features (%d dead, %.1f%%) over %d tokens in %.1f s, written to %s",
        n_features,
        n_dead,
        100 * n_dead / n_features,
        scan.n_tokens,
        seconds,
        params.paths.examples,
    )
    return {"n_features": n_features, "n_dead": n_dead, "n_tokens": scan.n_tokens, "seconds": seconds}
