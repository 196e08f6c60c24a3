"""Shuffled, prefetched batches of (MLP input, MLP output) rows from the activation store.

Per epoch, the store's shards are visited in a seeded random order, `buffer_shards` at a
time; the rows of such a group (BOS positions and the other split's documents excluded)
are shuffled together, and the epoch's batches are consecutive slices of the
concatenated shuffled groups. Batch `b` of epoch `e` is therefore a pure function of
(seed, e, b), so a resumed run can start at any batch without reading what it skips.

A background thread (`pipeline.prefetch`) reads each group into one reused buffer and
gathers the batches from it (and decodes a float8 store's, unless the training device does
that: `Batch.on`), `prefetch_batches` ahead of the training loop and across
epoch boundaries, so the loop only receives ready tensors. Reusing the buffers matters: on this VM, writing
to freshly allocated memory costs ~2 ms per MB in page faults, several times the copy.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.codec import decode, storage_dtype, storage_view
from pipeline.prefetch import prefetch
from pipeline.store import ACTIVATIONS, NORMS, ActivationStore

logger = logging.getLogger(__name__)


def split_mask(doc_ids: np.ndarray, positions: np.ndarray, split: str, val_fraction: float) -> np.ndarray:
    """Rows of `split` ("train" or "val"): documents split by a hash of their id; BOS excluded."""
    h = ((doc_ids.astype(np.uint64) + np.uint64(1)) * np.uint64(2654435761)) % np.uint64(2**32)
    is_val = h.astype(np.float64) / 2**32 < val_fraction
    keep = is_val if split == "val" else ~is_val
    return keep & (positions != 0)


def massive_rows(store: ActivationStore, keep: np.ndarray, max_norm_ratio: float) -> np.ndarray:
    """Rows (a boolean mask over the store) whose MLP output norm at some layer exceeds
    `max_norm_ratio` times that layer's median norm over the first shard's `keep` rows
    ("massive activations": in SmolLM2-135M ~0.03% of tokens, all at position 1 or 2 of a
    sequence, with a layer-11 output norm up to ~500x the median). Reads the store's
    `mlp_out_norm` (one pass over `mlp_out` for a store without it)."""
    schema = store.schema
    out = np.zeros(schema.n_tokens, dtype=bool)
    if max_norm_ratio <= 0:
        return out
    median = None
    block = NORM_BLOCK_SHARDS * schema.shard_tokens
    for first in range(0, schema.n_tokens, block):
        if store.has_norms:  # one Zarr read of the block: its chunks are fetched concurrently
            norms = store.array(NORMS)[first : first + block]
        for start in range(first, min(first + block, schema.n_tokens), schema.shard_tokens):
            stop = min(start + schema.shard_tokens, schema.n_tokens)
            rows = np.flatnonzero(keep[start:stop])
            if not len(rows):
                continue
            if store.has_norms:
                shard_norms = torch.from_numpy(norms[start - first : stop - first][rows])
            else:
                stored = store.read_rows("mlp_out", start, stop, rows)
                shard_norms = store.to_torch(stored).float().norm(dim=-1)
            if median is None:  # from the first shard with kept rows: (n_layers,)
                median = shard_norms.median(dim=0).values.clamp_min(1e-6)
            out[start + rows] = (shard_norms > max_norm_ratio * median).any(dim=1).numpy()
    return out


NORM_BLOCK_SHARDS = 64
"""Shards of `mlp_out_norm` read at once by `massive_rows` (7.9 MB for SmolLM2 at 8192
tokens per shard): few round trips to object storage, bounded memory for any store."""


_MASSIVE_ROWS: weakref.WeakKeyDictionary[ActivationStore, dict[tuple, np.ndarray]] = (
    weakref.WeakKeyDictionary()
)
"""`massive_rows` per store object and (split, val_fraction, max_norm_ratio), found once: it
reads all of `mlp_out`. An entry goes when its store object does."""


def rows_mask(
    store: ActivationStore, split: str, val_fraction: float, max_norm_ratio: float = 0.0
) -> np.ndarray:
    """The rows of `split` (`split_mask`), without massive-activation rows (`massive_rows`,
    found once per store object and setting: it reads all of `mlp_out`)."""
    mask = split_mask(store.array("doc_ids")[:], store.array("positions")[:], split, val_fraction)
    if max_norm_ratio <= 0:
        return mask
    cache = _MASSIVE_ROWS.setdefault(store, {})
    key = (split, val_fraction, max_norm_ratio)
    if key not in cache:
        cache[key] = massive_rows(store, mask, max_norm_ratio)
    massive = cache[key]
    if massive.any():
        logger.info(
            "%s split: leaving out %d of %d tokens with an MLP output norm > %g x the layer median",
            split,
            massive.sum(),
            mask.sum(),
            max_norm_ratio,
        )
    return mask & ~massive


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor  # (n_tokens, n_layers, d_model) MLP inputs, store dtype
    y: torch.Tensor  # (n_tokens, n_layers, d_model) MLP outputs, store dtype
    stored: str | None = None
    """None when x and y are activations; else the logical dtype of a store whose layout
    they are still in (`pipeline.codec.encode`: float8 rows and their scales)."""

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """x and y on `device`, decoded there if still stored: a float8 batch crosses to a
        GPU at half of bfloat16's bytes and decodes at the GPU's memory bandwidth."""
        return tuple(
            t.to(device) if self.stored is None else decode(t.to(device), self.stored)
            for t in (self.x, self.y)
        )


class ActivationLoader:
    def __init__(
        self,
        store: ActivationStore,
        *,
        batch_size: int,
        split: str = "train",
        val_fraction: float = 0.05,
        buffer_shards: int = 4,
        seed: int = 0,
        max_tokens: int | None = None,
        prefetch_batches: int = 8,
        max_norm_ratio: float = 0.0,
        decode_on_host: bool = True,
    ):
        self.store = store
        self.decode_on_host = decode_on_host
        self.batch_size = batch_size
        self.prefetch_batches = prefetch_batches
        self.buffer_shards = buffer_shards
        self.seed = seed
        schema = store.schema
        n = schema.n_tokens if max_tokens is None else min(max_tokens, schema.n_tokens)
        mask = rows_mask(store, split, val_fraction, max_norm_ratio)
        mask[n:] = False
        self.mask = mask
        self.rows_per_shard = np.array(
            [mask[slice(*schema.shard_rows(s))].sum() for s in range(schema.n_shards)]
        )
        self.n_rows = int(self.rows_per_shard.sum())
        if self.n_rows < batch_size:
            n_docs = len(np.unique(store.array("doc_ids")[:n]))
            raise ValueError(
                f"the {split} split has {self.n_rows} tokens (of {n} stored, from {n_docs} documents; "
                f"`train.val_fraction` {val_fraction} of the documents are held out), fewer than one "
                f"batch of {batch_size}; lower the batch size, change `train.val_fraction`, or dump "
                "more tokens from more documents"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.n_rows // self.batch_size

    def _groups(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.store.schema.n_shards)
        return [sorted(order[i : i + self.buffer_shards]) for i in range(0, len(order), self.buffer_shards)]

    def _group_order(self, epoch: int, g: int, shards: list[int]) -> np.ndarray:
        """Rows of the group buffer (its shards' rows back to back) in shuffled order: row k
        of the shuffled group is row perm[k] of the concatenation of the shards' kept rows."""
        schema = self.store.schema
        kept = np.concatenate(
            [
                i * schema.shard_tokens + np.flatnonzero(self.mask[slice(*schema.shard_rows(s))])
                for i, s in enumerate(shards)
            ]
        )
        perm = np.random.default_rng([self.seed, epoch, g]).permutation(len(kept))
        return kept[perm]

    def _read_group(self, shards: list[int], buffers: dict[str, np.ndarray]) -> None:
        """Each shard's stored rows into its slot of the (reused) group buffers (several
        reads in flight on object storage: `ActivationStore.read_rows_many`)."""
        schema = self.store.schema
        reads = [(n, *schema.shard_rows(s)) for s in shards for n in ACTIVATIONS]
        firsts = [i * schema.shard_tokens for i in range(len(shards)) for _ in ACTIVATIONS]
        for (n, start, stop), first, values in zip(reads, firsts, self.store.read_rows_many(reads)):
            buffers[n][first : first + stop - start] = values

    def _produce(self, epoch: int, start_batch: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches (as stored arrays) from batch `start_batch` of `epoch` on, forever."""
        schema = self.store.schema
        bs = self.batch_size
        shape = (self.buffer_shards * schema.shard_tokens, *schema.row_shape)
        buffers = {n: np.empty(shape, storage_dtype(schema.dtype)) for n in ACTIVATIONS}
        for e in itertools.count(epoch):
            skip = (start_batch if e == epoch else 0) * bs  # rows of this epoch to skip
            n_left = self.batches_per_epoch * bs - skip  # rows of this epoch still to yield
            carry = None
            for g, shards in enumerate(self._groups(e)):
                size = int(self.rows_per_shard[shards].sum())
                if skip >= size:
                    skip -= size
                    continue
                if n_left == 0:
                    break
                self._read_group(shards, buffers)
                order = self._group_order(e, g, shards)[skip : skip + n_left]
                skip = 0
                n_left -= len(order)
                if carry is not None:
                    need = bs - len(carry["mlp_out"])
                    head, order = order[:need], order[need:]
                    carry = {n: np.concatenate([carry[n], buffers[n][head]]) for n in ACTIVATIONS}
                    if len(carry["mlp_out"]) < bs:
                        continue
                    yield carry
                    carry = None
                n_full = len(order) // bs
                for b in range(n_full):
                    rows = order[b * bs : (b + 1) * bs]
                    yield {n: np.take(buffers[n], rows, axis=0) for n in ACTIVATIONS}
                rest = order[n_full * bs :]
                if len(rest):
                    carry = {n: np.take(buffers[n], rest, axis=0) for n in ACTIVATIONS}

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Endless batches from global step `start` on (batch b of epoch e is step
        e * batches_per_epoch + b), gathered ahead in a background thread (`prefetch`)."""
        epoch, first = divmod(start, self.batches_per_epoch)
        with contextlib.closing(
            prefetch(map(self._batch, self._produce(epoch, first)), self.prefetch_batches)
        ) as items:
            yield from items

    def _batch(self, item: dict[str, np.ndarray]) -> Batch:
        """A batch of stored rows, decoded here (in the prefetch thread) when `decode_on_host`, else
        left in the store's layout for `Batch.on` to decode on the training device."""
        dtype = self.store.schema.dtype
        if self.decode_on_host:
            return Batch(*(self.store.to_torch(item[n]) for n in ACTIVATIONS))
        return Batch(*(storage_view(item[n], dtype) for n in ACTIVATIONS), stored=dtype)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` from `start_batch` on."""
        with contextlib.closing(self.batches(epoch * self.batches_per_epoch + start_batch)) as it:
            yield from itertools.islice(it, self.batches_per_epoch - start_batch)
