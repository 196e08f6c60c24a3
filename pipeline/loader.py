"""Shuffled, prefetched batches of (MLP input, MLP output) rows from the activation store.

Per epoch, the store's shards are visited in a seeded random order, `buffer_shards` at a
time; the rows of such a group (BOS positions and the other split's documents excluded)
are shuffled together, and the epoch's batches are consecutive slices of the
concatenated shuffled groups. Batch `b` of epoch `e` is therefore a pure function of
(seed, e, b), so a resumed run can start at any batch without reading what it skips.
A background thread reads and shuffles the next group while the current one is used.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.store import ACTIVATIONS, ActivationStore


def split_mask(doc_ids: np.ndarray, positions: np.ndarray, split: str, val_fraction: float) -> np.ndarray:
    """Rows of `split` ("train" or "val"): documents split by a hash of their id; BOS excluded."""
    h = ((doc_ids.astype(np.uint64) + np.uint64(1)) * np.uint64(2654435761)) % np.uint64(2**32)
    is_val = h.astype(np.float64) / 2**32 < val_fraction
    keep = is_val if split == "val" else ~is_val
    return keep & (positions != 0)


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor  # (n_tokens, n_layers, d_model) MLP inputs, store dtype
    y: torch.Tensor  # (n_tokens, n_layers, d_model) MLP outputs, store dtype


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
    ):
        self.store = store
        self.batch_size = batch_size
        self.buffer_shards = buffer_shards
        self.seed = seed
        schema = store.schema
        n = schema.n_tokens if max_tokens is None else min(max_tokens, schema.n_tokens)
        mask = split_mask(store.array("doc_ids")[:], store.array("positions")[:], split, val_fraction)
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

    def _load_group(self, epoch: int, g: int, shards: list[int]) -> dict[str, np.ndarray]:
        """The kept rows of `shards`, concatenated in order and shuffled: row k of the result
        is row perm[k] of the concatenation. Each shard is scattered straight to its shuffled
        places, so memory peaks at the group plus one shard rather than several groups."""
        schema = self.store.schema
        n_rows = int(self.rows_per_shard[shards].sum())
        perm = np.random.default_rng([self.seed, epoch, g]).permutation(n_rows)
        destination = np.empty_like(perm)
        destination[perm] = np.arange(n_rows)  # where each concatenated row goes
        out = {n: None for n in ACTIVATIONS}
        offset = 0
        for s in shards:
            start, stop = schema.shard_rows(s)
            keep = np.flatnonzero(self.mask[start:stop])
            places = destination[offset : offset + len(keep)]
            for n in ACTIVATIONS:
                values = self.store.read_rows(n, start, stop)
                if out[n] is None:
                    out[n] = np.empty((n_rows, *values.shape[1:]), values.dtype)
                out[n][places] = values[keep]
            offset += len(keep)
        return out

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of `epoch` from `start_batch` on, read ahead in a background thread."""
        groups = self._groups(epoch)
        sizes = [int(self.rows_per_shard[s].sum()) for s in groups]
        skip_rows = start_batch * self.batch_size
        first = 0
        while first < len(groups) and skip_rows >= sizes[first]:
            skip_rows -= sizes[first]
            first += 1
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def produce():
            try:
                for g in range(first, len(groups)):
                    if stop.is_set():
                        return
                    q.put(self._load_group(epoch, g, groups[g]))
                q.put(None)
            except BaseException as e:  # re-raised in the consumer
                q.put(e)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        carry = None
        n_left = self.batches_per_epoch - start_batch
        try:
            while n_left > 0:
                item = q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                if skip_rows:
                    item = {n: v[skip_rows:] for n, v in item.items()}
                    skip_rows = 0
                if carry is not None:
                    item = {n: np.concatenate([carry[n], item[n]]) for n in ACTIVATIONS}
                n_full = len(item["mlp_out"]) // self.batch_size
                for b in range(min(n_full, n_left)):
                    rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
                    yield Batch(*(self.store.to_torch(item[n][rows]) for n in ACTIVATIONS))
                n_left -= min(n_full, n_left)
                carry = {n: v[n_full * self.batch_size :] for n, v in item.items()}
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
