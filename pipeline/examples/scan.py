"""The streaming scan of the examples stage (steps 1 and 2 of `pipeline.examples`): which
stored tokens are read (`plan_scan`), which features are encoded together (`plan_chunks`),
their pre-activations (`pre_activations`), and the one pass over the store that feeds them
to the per-feature statistics (`collect_examples`).

Under `torchrun` each rank scans a contiguous range of the batches (`World.block`) and
rank 0 merges the states (`FeatureState.merge`). Each batch draws its random keys from its
own seed (`batch_seed`), so a batch gives the same candidates on whichever rank reads it,
and the merged state, so the tables, are the bytes of one process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pipeline.clt import CrossLayerTranscoder
from pipeline.config import ExamplesConfig
from pipeline.distributed import World, gather_objects, wait_for_ranks
from pipeline.examples.stats import FeatureState
from pipeline.prefetch import prefetch
from pipeline.runtime import torch_dtype
from pipeline.store import ActivationStore

logger = logging.getLogger(__name__)

CHUNK_FEATURES = 8192
"""Features encoded together (all layers of the default transcoder): a batch's
pre-activations take CHUNK_FEATURES x batch tokens x 2 bytes (134 MB at 8192 tokens)."""


def iter_batches(
    store: ActivationStore, n_rows: int, batch_rows: int, batches: range | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, stored `resid_mid` rows) of [0, n_rows) in batches of `batch_rows` (only
    the batches `batches`, if given), read ahead by one batch in a background thread
    (`prefetch`; file reads release the GIL)."""
    starts = range(0, n_rows, batch_rows)
    reads = (
        (start, store.read_rows("resid_mid", start, min(start + batch_rows, n_rows)))
        for start in (starts if batches is None else starts[batches.start : batches.stop])
    )
    return prefetch(reads, depth=1)


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch `batch`'s random keys, for `examples.seed` `seed`."""
    return seed * 2**32 + batch


@dataclass(frozen=True)
class Scan:
    """What `collect_examples` reads: the first `n_tokens` stored tokens, whole sequences."""

    n_tokens: int
    context_len: int
    batch_rows: int

    @property
    def n_sequences(self) -> int:
        return self.n_tokens // self.context_len

    @property
    def n_scanned(self) -> int:
        """Tokens whose activations count (BOS excluded)."""
        return self.n_sequences * (self.context_len - 1)


def plan_scan(store: ActivationStore, transcoder: CrossLayerTranscoder, cfg: ExamplesConfig) -> Scan:
    """Check that `transcoder` fits `store` and `cfg` fits the data; clear errors otherwise."""
    s = store.schema
    other = f"the activation store {store.path}"
    transcoder.check_fits(s.n_layers, s.d_model, where="(`paths.transcoder`)", other=other)
    C = s.context_len
    if s.n_tokens < C or C < 2:
        raise ValueError(
            f"the activation store {store.path} holds {s.n_tokens} tokens, not one whole sequence of "
            f"{C} tokens (BOS plus at least one token); dump more (`dump.n_tokens`) and re-run `dvc repro`"
        )
    if cfg.n_tokens > s.n_tokens:
        raise ValueError(
            f"`examples.n_tokens` is {cfg.n_tokens} but {store.path} holds {s.n_tokens} tokens; "
            "lower it, or set 0 to scan every stored token"
        )
    n = (cfg.n_tokens or s.n_tokens) // C * C
    if n == 0:
        raise ValueError(
            f"`examples.n_tokens` is {cfg.n_tokens}, less than one sequence ({C} tokens); raise it or set 0"
        )
    positions = store.array("positions")[:n].reshape(-1, C)
    if not (positions == np.arange(C)).all():
        raise ValueError(f"{store.path} does not hold whole sequences of {C} tokens; re-run `dvc repro dump`")
    if cfg.top_k > n // C:
        raise ValueError(
            f"`examples.top_k` is {cfg.top_k} but only {n // C} sequences are scanned, and each gives at "
            "most one example per feature; lower `examples.top_k` or scan more tokens"
        )
    if cfg.context_before + cfg.context_after + 1 > C - 1:
        logger.warning(
            "the example window (%d tokens) is longer than a sequence without BOS (%d): windows are cut "
            "at sequence boundaries",
            cfg.context_before + cfg.context_after + 1,
            C - 1,
        )
    rows = s.shard_tokens if s.shard_tokens % C == 0 else max(1, s.shard_tokens // C) * C
    return Scan(n_tokens=n, context_len=C, batch_rows=rows)


@dataclass(frozen=True)
class Chunk:
    """Features encoded and tracked together, in (layer, feature) order: `parts` are
    (layer, start, stop) ranges of consecutive features. Treating several layers' features
    as one set makes every step one large operation instead of one small one per layer."""

    parts: tuple[tuple[int, int, int], ...]

    @property
    def n_features(self) -> int:
        return sum(stop - start for _, start, stop in self.parts)

    @property
    def layers(self) -> np.ndarray:
        return np.concatenate([np.full(stop - start, l, np.int16) for l, start, stop in self.parts])

    @property
    def features(self) -> np.ndarray:
        return np.concatenate([np.arange(start, stop, dtype=np.int32) for _, start, stop in self.parts])


def plan_chunks(n_layers: int, d_transcoder: int, max_features: int = CHUNK_FEATURES) -> list[Chunk]:
    """Consecutive ranges of at most `max_features` features, whole layers where they fit."""
    chunks, parts, size = [], [], 0
    for l in range(n_layers):
        for start in range(0, d_transcoder, max_features):
            stop = min(start + max_features, d_transcoder)
            if size + stop - start > max_features:
                chunks.append(Chunk(tuple(parts)))
                parts, size = [], 0
            parts.append((l, start, stop))
            size += stop - start
    chunks.append(Chunk(tuple(parts)))
    return chunks


@dataclass(frozen=True)
class ChunkWeights:
    """A chunk's encoder in the matmul dtype (`examples.compute_dtype`; in bfloat16 the
    pre-activations and thresholds are compared in bfloat16): per part (layer, W_enc^T rows
    (n, d_model), b_enc (n, 1)), and the thresholds of all its features."""

    parts: list[tuple[int, torch.Tensor, torch.Tensor]]
    threshold: torch.Tensor


def chunk_weights(
    transcoder: CrossLayerTranscoder, chunk: Chunk, *, dtype: torch.dtype, device
) -> ChunkWeights:
    """The encoder of `chunk`'s features in `dtype` on `device`."""
    parts = [
        (
            l,
            transcoder.W_enc[l, :, start:stop].detach().t().to(device, dtype).contiguous(),
            transcoder.b_enc[l, start:stop].detach().to(device, dtype)[:, None],
        )
        for l, start, stop in chunk.parts
    ]
    threshold = torch.cat([transcoder.threshold[l, start:stop].detach() for l, start, stop in chunk.parts])
    return ChunkWeights(parts, threshold.to(device, dtype))


def pre_activations(x: torch.Tensor, weights: ChunkWeights, out: torch.Tensor) -> torch.Tensor:
    """h = (x W_enc + b_enc)^T of a chunk's features, feature-major: x (n_tokens, n_layers,
    d_model) -> out (n_features, n_tokens). Each matmul reads its layer of x transposed in place."""
    row = 0
    for l, W_t, b in weights.parts:
        torch.addmm(b, W_t, x[:, l].to(W_t.dtype).t(), out=out[row : row + len(W_t)])
        row += len(W_t)
    return out


@torch.inference_mode()
def collect_examples(
    store: ActivationStore,
    transcoder: CrossLayerTranscoder,
    cfg: ExamplesConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    world: World = World(),
) -> tuple[list[tuple[Chunk, FeatureState]] | None, Scan]:
    """Stream the store once; the finished `FeatureState` of every chunk of features (with
    several ranks: this rank's share of the batches, merged on rank 0; None on the others)."""
    scan = plan_scan(store, transcoder, cfg)
    chunks = plan_chunks(transcoder.shape.n_layers, transcoder.shape.d_transcoder)
    dtype = torch_dtype(cfg.compute_dtype)
    weights = [chunk_weights(transcoder, c, dtype=dtype, device=device) for c in chunks]
    states = [FeatureState(c.n_features, cfg, dtype, device) for c in chunks]
    buffer = torch.empty(max(c.n_features for c in chunks) * scan.batch_rows, dtype=dtype, device=device)
    generator = torch.Generator(device=device)
    C = scan.context_len
    mine = world.block(-(-scan.n_tokens // scan.batch_rows))
    bar = tqdm(
        total=min(mine.stop * scan.batch_rows, scan.n_tokens) - mine.start * scan.batch_rows,
        desc="examples",
        unit="tok",
        unit_scale=True,
        disable=not (progress and world.main),  # rank 0's share stands for all
    )
    with contextlib.closing(iter_batches(store, scan.n_tokens, scan.batch_rows, mine)) as batches:
        for start, values in batches:
            batch = start // scan.batch_rows
            generator.manual_seed(batch_seed(cfg.seed, batch))
            x = store.to_torch(values).to(device)  # (rows, n_layers, d_model)
            for chunk, w, state in zip(chunks, weights, states):
                h = pre_activations(x, w, buffer[: chunk.n_features * len(x)].view(chunk.n_features, len(x)))
                state.update(h.view(chunk.n_features, len(x) // C, C), w.threshold, start, generator, batch)
            bar.update(len(x))
    bar.close()
    if world.distributed:
        wait_for_ranks("examples: every batch scanned")
        parts = gather_objects([state.to("cpu") for state in states])
        if parts is None:
            return None, scan
        states = [state.to(device) for state in parts[0]]
        for part in parts[1:]:
            for state, other in zip(states, part):
                state.merge(other.to(device))
    return list(zip(chunks, states)), scan
