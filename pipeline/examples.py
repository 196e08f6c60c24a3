"""Every feature's activating contexts and activation statistics, from the activation store.

No model forward pass: features are computed from the stored MLP inputs (`resid_mid`) with
the exported, raw-space transcoder, in one streaming pass (`collect_examples`):

1. `iter_batches`: whole stored sequences, a shard at a time, read ahead in a background
   thread so that disk reads overlap the compute.
2. `pre_activations`: the features of all layers are encoded together, in `Chunk`s of up
   to `CHUNK_FEATURES` (layer, feature) pairs, feature-major: h = (x W_enc + b_enc)^T of
   shape (n_features, n_seq, context_len), so that one feature's sequence is contiguous
   and every later step is one large operation rather than one small one per layer. The
   matmul is bf16 with `examples.autocast` (then h and the thresholds are compared in
   bf16). A feature fires where h > threshold (JumpReLU, a = h (h > threshold)). BOS
   (position 0) is excluded everywhere, as in training and in circuit-tracer.
3. `FeatureState.update_tokens`: per feature, the sum and the smallest firing activation,
   and a histogram of firing activations (so their count) on `FINE_BINS` bins over
   [0, 2^e), with 2^e the smallest power of two above every activation seen so far. A
   larger activation raises e and sums adjacent bins (`_grow`): an exact merge, since the
   old grid's edges are edges of the new one.
4. `FeatureState.update_contexts`: a context is a stored sequence; its candidate activation
   is the sequence's largest, at its max token. Three `Sketch`es keep the candidates with the
   smallest keys per group: `top` (key -activation, per feature: the top_k), `bands` (a random
   key, per feature and activation band of the same power-of-two grid: a uniform sample of
   each band) and `random` (a random key, per feature: a uniform sample of all firing
   contexts). A candidate is first compared with its group's largest kept key, so after the
   first batches almost all are rejected at once; an admitted one takes the slot of the
   entry it evicts and keeps the per-token activations of its window immediately, so there
   is no second pass over the store.
5. `FeatureState.finalize`: the bands that hold contexts are grouped into at most
   `n_intervals` contiguous intervals of whole bands, so the merged sample of an interval
   is exactly a uniform sample of its contexts; the histogram over [act_min, act_max] and
   the percentiles are interpolated from the fine grid (error below one fine bin,
   2^e / FINE_BINS <= 2 act_max / FINE_BINS).
6. `logit_lens`: each feature's decoder directions through the final norm's gain and the
   unembedding (see its docstring for how a cross-layer decoder is reduced).

Memory depends on the number of features, not of tokens: per feature `FINE_BINS` counts
plus (top_k + n_bands(n_intervals) examples_per_interval + n_random) context slots of
`context_before + 1 + context_after` activations, and one batch's pre-activations of a chunk.

Outputs (`write_tables`): `examples.parquet` (one row per example) and `features.parquet`
(one row per feature), sorted by (layer, feature), with explicit schemas (`EXAMPLES_SCHEMA`,
`FEATURES_SCHEMA`) and row groups of `ROW_GROUP_FEATURES` features, so a reader that filters
on (layer, feature) reads one small row group.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline.clt import CrossLayerTranscoder, load_transcoder
from pipeline.config import ExamplesConfig, Params
from pipeline.model import bos_token_id, get_architecture, get_layers, get_trunk, load_model, resolve_device
from pipeline.store import ActivationStore

logger = logging.getLogger(__name__)

FINE_BINS = 512
"""Bins of the internal per-feature histogram over [0, 2^e)."""
N_QUANTILES = 100
"""`quantile_values[i]` is the (i + 1)-th percentile of the firing activations: the
frontend reads it that way (`render-act-histogram.js`)."""
ROW_GROUP_FEATURES = 32
"""Features per Parquet row group of the examples table (1024 for the features table)."""
CHUNK_FEATURES = 8192
"""Features encoded together (all layers of the default transcoder): a batch's
pre-activations take CHUNK_FEATURES x batch tokens x 2 bytes (134 MB at 8192 tokens)."""
_UNSET = -(2**20)  # exponent of a feature that has not fired yet

EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("group", pa.string(), nullable=False),  # top | interval_{i} (0 = highest) | random
        pa.field("rank", pa.int16(), nullable=False),  # order within the group, by activation
        pa.field("activation", pa.float32(), nullable=False),  # at the max token
        pa.field("token_index", pa.int64(), nullable=False),  # row of the max token in the store
        pa.field("doc_id", pa.int32(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),  # of the max token in its sequence
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),  # the window
        pa.field("token_acts", pa.list_(pa.float32()), nullable=False),  # per window token
        pa.field("max_index", pa.int16(), nullable=False),  # of the max token in the window
    ]
)
FEATURES_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("dead", pa.bool_(), nullable=False),  # never fired on the scanned tokens
        pa.field("n_firing", pa.int64(), nullable=False),  # tokens where it fires
        pa.field("frequency", pa.float64(), nullable=False),  # n_firing / scanned tokens (no BOS)
        pa.field("act_min", pa.float32(), nullable=False),  # smallest firing activation (0 if dead)
        pa.field("act_max", pa.float32(), nullable=False),
        pa.field("act_mean", pa.float32(), nullable=False),  # over firing tokens
        pa.field("quantile_values", pa.list_(pa.float32()), nullable=False),  # percentiles 1..100
        pa.field("histogram", pa.list_(pa.int64()), nullable=False),  # bins over [act_min, act_max]
        pa.field("interval_edges", pa.list_(pa.float32()), nullable=False),  # ascending; interval_0 last
        pa.field("top_logit_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("top_logit_values", pa.list_(pa.float32()), nullable=False),
        pa.field("bottom_logit_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("bottom_logit_values", pa.list_(pa.float32()), nullable=False),
    ]
)


def n_bands(n_intervals: int) -> int:
    """Activation bands per feature: the power of two >= 2 n_intervals, so that at least
    n_intervals bands lie below act_max (which is above half the grid's top)."""
    return 1 << math.ceil(math.log2(2 * n_intervals))


class Sketch:
    """Per feature and group (activation band, or a single group), the `capacity` candidates
    with the smallest keys seen so far, with their token row, activation and window of
    per-token activations: a bottom-k sketch, so with random keys a uniform sample without
    replacement of everything offered. Slots (n_features, n_groups * capacity): group g of a
    feature owns slots [g capacity, (g + 1) capacity), in no particular order; a new
    candidate takes the slot of one it evicts (or an empty one, key inf), so admitting
    candidates writes only their own windows."""

    def __init__(self, n_features: int, n_groups: int, capacity: int, width: int, dtype, device):
        self.n_groups, self.capacity = n_groups, capacity
        slots = (n_features, n_groups * capacity)
        self.keys = torch.full(slots, math.inf, device=device)
        self.rows = torch.full(slots, -1, dtype=torch.int64, device=device)
        self.values = torch.zeros(slots, device=device)
        self.windows = torch.zeros(*slots, width, dtype=dtype, device=device)

    def threshold(self, groups: torch.Tensor) -> torch.Tensor:
        """The largest kept key of each feature's group `groups` (n_features, n_candidates): a
        candidate with a smaller key gets in."""
        if self.capacity == 0:
            return torch.full(groups.shape, -math.inf, device=groups.device)
        largest = self.keys.view(len(self.keys), self.n_groups, self.capacity).amax(
            -1
        )  # (n_features, n_groups)
        return largest.gather(1, groups)

    def admit(self, features, groups, keys) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which candidates of `features` (n',) get in, given their groups and keys (n',
        n; key inf: no candidate; with several groups, keys must lie in [0, 1)): (i, j, slot)
        of each, candidate [i, j] of feature features[i] going to slot `slot`, the slot of an
        evicted or empty entry."""
        G, m = self.n_groups, self.capacity
        n, device = len(features), keys.device
        own = torch.arange(G, device=device).repeat_interleave(m).expand(n, -1)
        K = torch.cat([self.keys[features], keys], 1)  # (n', G m + n): kept ones, then new
        group = torch.cat([own, groups], 1)
        # by group, then key (inf last): one sort, as keys are in [0, 1) if there are several groups
        composite = K if G == 1 else 2 * group + torch.where(torch.isfinite(K), K, 1.5).double()
        order = composite.argsort(dim=1, stable=True)
        sorted_group = group.gather(1, order).contiguous()
        start = torch.searchsorted(sorted_group, sorted_group)  # where each entry's group starts
        rank = torch.arange(order.shape[1], device=device) - start
        kept = (rank < m) & torch.isfinite(K.gather(1, order))  # in sorted order
        new = kept & (order >= G * m)
        # the k-th new entry of a group (by key) takes the k-th free slot of that group
        count = new.cumsum(1)
        k = count - 1 - torch.where(start > 0, count.gather(1, (start - 1).clamp(min=0)), 0)
        free = torch.ones(n, G * m + 1, dtype=torch.bool, device=device)
        free.scatter_(1, torch.where(kept & ~new, order, G * m), False)
        free = free[:, : G * m].view(n, G, m)  # evicted or empty slots
        nth_free = torch.full((n, G, m + 1), m, dtype=torch.int64, device=device)
        nth_free.scatter_(
            2, torch.where(free, free.cumsum(-1) - 1, m), torch.arange(m, device=device).expand(n, G, m)
        )
        i, pos = new.nonzero(as_tuple=True)
        g = sorted_group[i, pos]
        return i, order[i, pos] - G * m, g * m + nth_free[i, g, k[i, pos]]

    def write(self, features, slots, keys, rows, values, windows) -> None:
        """Put admitted candidates (one per (feature, slot) pair) in their slots."""
        self.keys[features, slots] = keys
        self.rows[features, slots] = rows
        self.values[features, slots] = values
        self.windows[features, slots] = windows.to(self.windows.dtype)

    def coarsen(self, features: torch.Tensor, factor: int) -> None:
        """Merge each run of `factor` adjacent groups of `features` into one, keeping the
        smallest keys (their band grid doubled its scale log2(factor) times)."""
        G, m, n = self.n_groups, self.capacity, len(features)
        if m == 0 or n == 0:
            return
        factor = min(factor, G)
        K = self.keys[features].view(n, G // factor, factor * m)
        keep = K.argsort(dim=-1, stable=True)[..., :m]  # (n, G // factor, m)
        i = torch.arange(n, device=K.device)[:, None, None]
        j = torch.arange(G // factor, device=K.device)[None, :, None]

        def merged(t: torch.Tensor, fill) -> torch.Tensor:
            tail = t.shape[2:]
            src = t[features].view(n, G // factor, factor * m, *tail)
            out = torch.full((n, G, m, *tail), fill, dtype=t.dtype, device=t.device)
            out[:, : G // factor] = src[i, j, keep]
            return out.view(n, G * m, *tail)

        self.keys[features] = merged(self.keys, math.inf)
        self.rows[features] = merged(self.rows, -1)
        self.values[features] = merged(self.values, 0)
        self.windows[features] = merged(self.windows, 0)


def _coarsen_histogram(hist: torch.Tensor, factor: int) -> torch.Tensor:
    """Sum runs of `factor` adjacent bins into the first len/factor bins: hist (n, bins)."""
    n, bins = hist.shape
    factor = min(factor, bins)
    out = torch.zeros_like(hist)
    out[:, : bins // factor] = hist.view(n, bins // factor, factor).sum(-1)
    return out


class FeatureState:
    """Running statistics and example sketches of a set of `n_features` features (a `Chunk`:
    consecutive (layer, feature) pairs, possibly of several layers)."""

    def __init__(self, n_features: int, cfg: ExamplesConfig, dtype: torch.dtype, device):
        F = n_features
        self.cfg = cfg
        self.n_bands = n_bands(cfg.n_intervals)
        self.offsets = torch.arange(-cfg.context_before, cfg.context_after + 1, device=device)
        width = len(self.offsets)
        self.total = torch.zeros(F, dtype=torch.float64, device=device)
        self.min = torch.full((F,), math.inf, device=device)
        self.exponent = torch.full((F,), _UNSET, dtype=torch.int32, device=device)  # grid [0, 2^e)
        self.hist = torch.zeros(F, FINE_BINS, dtype=torch.int32, device=device)
        self.top = Sketch(F, 1, cfg.top_k, width, dtype, device)  # key -activation
        self.bands = Sketch(F, self.n_bands, cfg.examples_per_interval, width, dtype, device)
        self.random = Sketch(F, 1, cfg.n_random, width, dtype, device)

    @property
    def count(self) -> torch.Tensor:
        """Firing tokens per feature so far (the histogram's total)."""
        return self.hist.sum(1, dtype=torch.int64)

    def update(self, h: torch.Tensor, threshold: torch.Tensor, first_row: int, generator) -> None:
        """Add one batch: h (n_features, n_seq, context_len) pre-activations of whole sequences
        whose first token is store row `first_row` (h[:, :, 0], BOS, is overwritten), and the
        thresholds in h's dtype. Feature-major, so that a sequence of one feature (a window,
        a maximum) is contiguous."""
        h[:, :, 0] = -math.inf  # BOS never fires and is never a context's max token
        seq_max = h.amax(dim=2)  # (n_features, n_seq): each sequence's max
        self._grow(seq_max.amax(dim=1).float(), threshold)
        self.update_tokens(h, threshold)
        self.update_contexts(h, seq_max, threshold, first_row, generator)

    def _grow(self, batch_max: torch.Tensor, threshold: torch.Tensor) -> None:
        """Raise each feature's grid exponent so that the batch's activations lie below 2^e."""
        fires = batch_max > threshold
        needed = torch.frexp(batch_max).exponent.to(torch.int32)  # batch_max < 2^needed
        unset = self.exponent == _UNSET
        grow = fires & ~unset & (needed > self.exponent)
        if grow.any():
            features = grow.nonzero().squeeze(1)
            shift = (needed - self.exponent)[features]
            for s in shift.unique().tolist():
                f = features[shift == s]
                self.hist[f] = _coarsen_histogram(self.hist[f], 1 << min(s, 30))
                self.bands.coarsen(f, 1 << min(s, 30))
        self.exponent = torch.where(fires & (unset | grow), needed, self.exponent)

    def _scale(self, n_bins: int) -> torch.Tensor:
        """n_bins / 2^e per feature: activation * scale is its bin on the grid."""
        return torch.exp2((math.log2(n_bins) - self.exponent).float())

    def update_tokens(self, h: torch.Tensor, threshold: torch.Tensor) -> None:
        """Sum, minimum and fine histogram (so the count) of the firing activations."""
        F, per_feature = h.shape[0], h[0].numel()
        flat = (h > threshold[:, None, None]).view(-1).nonzero().squeeze(1)
        f = flat.div(per_feature, rounding_mode="floor")
        v = h.view(-1)[flat].float()
        self.total += torch.zeros(F, device=v.device).index_add_(0, f, v).double()
        self.min.scatter_reduce_(0, f, v, "amin")
        bins = (v * self._scale(FINE_BINS)[f]).long()
        self.hist.view(-1).index_add_(0, f * FINE_BINS + bins, torch.ones_like(bins, dtype=torch.int32))

    def update_contexts(self, h, seq_max, threshold, first_row: int, generator) -> None:
        """Offer every firing (feature, sequence) to the three sketches; per sketch, only the
        features for which some candidate gets in are looked at, and only the candidates that
        get in have their windows computed."""
        fires = seq_max > threshold[:, None]  # (n_features, n_seq)
        v = seq_max.float()
        u = torch.rand(2, *v.shape, generator=generator, device=v.device)
        band = torch.where(
            fires, (v * self._scale(self.n_bands)[:, None]).long().clamp(0, self.n_bands - 1), 0
        )
        one = torch.zeros_like(band)
        offers = [
            (self.top, one, torch.where(fires, -v, math.inf)),
            (self.bands, band, torch.where(fires, u[0], math.inf)),
            (self.random, one, torch.where(fires, u[1], math.inf)),
        ]
        C = h.shape[2]
        first = first_row + torch.arange(v.shape[1], device=v.device) * C  # (n_seq,)
        for sketch, groups, keys in offers:
            ok = keys < sketch.threshold(groups)
            f = ok.any(1).nonzero().squeeze(1)
            if len(f) == 0:
                continue
            ok, keys, groups = ok[f], keys[f], groups[f]  # (n', n_seq)
            n = int(ok.sum(1).max())
            pick = torch.where(ok, keys, math.inf).topk(n, dim=1, largest=False).indices  # sequences
            keys = torch.where(ok.gather(1, pick), keys.gather(1, pick), math.inf)
            i, j, slots = sketch.admit(f, groups.gather(1, pick), keys)
            seq, ff = pick[i, j], f[i]
            position, windows = self._windows(h, ff, seq, threshold)
            sketch.write(ff, slots, keys[i, j], first[seq] + position, v[ff, seq], windows)

    def _windows(self, h, f, s, threshold) -> tuple[torch.Tensor, torch.Tensor]:
        """Position of the max token of features `f` in sequences `s` (the first, on ties),
        and the activations (n, width) around it; 0 outside the sequence and at BOS."""
        F, S, C = h.shape
        sequence = (f * S + s) * C  # where each (feature, sequence) starts in h, flat
        position = h.view(F * S, C).index_select(0, f * S + s).argmax(dim=1)
        index = position[:, None] + self.offsets
        valid = (index >= 1) & (index < C)
        window = h.view(-1)[sequence[:, None] + index.clamp(0, C - 1)]
        return position, torch.where(valid & (window > threshold[f, None]), window, 0)

    def finalize(self, chunk: Chunk, n_scanned: int) -> tuple[dict, dict]:
        """Columns (numpy) of the chunk's rows of the examples table (its windows still as
        store rows and activations, see `example_table`) and of the features table."""
        cfg = self.cfg
        count = self.count.cpu().numpy()
        dead = count == 0
        act_min = np.where(dead, 0.0, self.min.cpu().numpy()).astype(np.float32)
        act_max = np.where(dead, 0.0, self.top.values.amax(1).cpu().numpy()).astype(np.float32)
        lo, hi = torch.from_numpy(act_min), torch.from_numpy(act_max)
        exponent = torch.where(torch.from_numpy(dead), 0, self.exponent.cpu())
        hist = self.hist.cpu()
        features = {
            "layer": chunk.layers,
            "feature": chunk.features,
            "dead": dead,
            "n_firing": count,
            "frequency": count / n_scanned,
            "act_min": act_min,
            "act_max": act_max,
            "act_mean": (self.total.cpu().numpy() / np.maximum(count, 1)).astype(np.float32),
            "quantile_values": _quantiles(hist, exponent, lo, hi, N_QUANTILES).numpy(),
            "histogram": _rebin(hist, exponent, lo, hi, cfg.histogram_bins).numpy(),
        }
        examples = [self._sketch_rows(self.top, 0)]
        intervals, features["interval_edges"] = self._intervals(exponent, lo, hi, dead)
        examples.append(intervals)
        examples.append(self._sketch_rows(self.random, cfg.n_intervals + 1))
        columns = {k: np.concatenate([e[k] for e in examples]) for k in examples[0]}
        order = np.lexsort((-columns["activation"], columns["group"], columns["index"]))
        columns = {k: v[order] for k, v in columns.items()}
        group_key = torch.from_numpy(columns["index"].astype(np.int64) * 1024 + columns["group"])
        columns["rank"] = _rank_within(group_key).numpy().astype(np.int16)
        columns["layer"], columns["feature"] = (
            chunk.layers[columns["index"]],
            chunk.features[columns["index"]],
        )
        return columns, features

    @staticmethod
    def _sketch_rows(sketch: Sketch, group: int) -> dict:
        """Filled slots of a per-feature sketch as example rows of group code `group`."""
        rows = sketch.rows.cpu()
        feature, slot = (rows >= 0).nonzero(as_tuple=True)
        return {
            "index": feature.numpy(),
            "group": np.full(len(feature), group, np.int16),
            "activation": sketch.values.cpu()[feature, slot].numpy(),
            "row": rows[feature, slot].numpy(),
            "window": sketch.windows.cpu()[feature, slot].float().numpy(),
        }

    def _intervals(self, exponent, lo, hi, dead) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
        """Group each feature's bands that hold contexts into at most n_intervals runs of
        consecutive such bands (a run also owns the empty bands up to the next run, so runs
        are contiguous intervals of whole bands); per run, the `examples_per_interval`
        smallest keys of its bands' sketches: a uniform sample of the run's contexts."""
        cfg, B, m = self.cfg, self.n_bands, self.cfg.examples_per_interval
        F = len(lo)
        keys = self.bands.keys.cpu().view(F, B, m)
        filled = torch.isfinite(keys).any(-1)  # (F, B): the band holds a context
        n_filled = filled.sum(1)
        n_groups = torch.clamp(n_filled, max=cfg.n_intervals)
        rank = filled.cumsum(1) - 1
        run = (rank * n_groups[:, None]).div(n_filled.clamp(min=1)[:, None], rounding_mode="floor")
        run = torch.where(filled, run, cfg.n_intervals)
        # edges, ascending: act_min, the first band of each run after the first, act_max
        g = torch.arange(1, cfg.n_intervals)
        first_rank = (g[None] * n_filled[:, None] + n_groups[:, None] - 1).div(
            n_groups[:, None].clamp(min=1), rounding_mode="floor"
        )
        filled_bands = torch.where(filled, torch.arange(B), B).sort(dim=1).values
        first = filled_bands.gather(1, first_rank.clamp(0, B - 1))
        scale = torch.exp2((math.log2(B) - exponent).double())
        edges = torch.cat([lo.double()[:, None], first.double() / scale[:, None], hi.double()[:, None]], 1)
        ones = torch.ones(F, 1, dtype=torch.bool)
        valid = torch.cat([ones, g[None] < n_groups[:, None], ones], 1) & ~torch.from_numpy(dead)[:, None]
        edge_lists = (edges[valid].float().numpy(), valid.sum(1).numpy())
        entry_run = run[:, :, None].expand(F, B, m).reshape(F, B * m)
        composite = entry_run.double() + keys.reshape(F, B * m).double()  # key in [0, 1)
        composite[~torch.isfinite(keys.reshape(F, B * m))] = math.inf
        order = composite.argsort(dim=1, stable=True)
        sorted_run = entry_run.gather(1, order)
        finite = torch.isfinite(composite.gather(1, order))
        position = torch.arange(B * m).expand(F, -1)
        start = torch.searchsorted(composite.gather(1, order).contiguous(), sorted_run.double().contiguous())
        keep = finite & (position - start < m) & (sorted_run < cfg.n_intervals)
        feature, k = keep.nonzero(as_tuple=True)
        entry = order[feature, k]
        group = 1 + (n_groups[feature] - 1 - sorted_run[feature, k])  # interval_0 is the highest
        columns = {
            "index": feature.numpy(),
            "group": group.numpy().astype(np.int16),
            "activation": self.bands.values.cpu()[feature, entry].numpy(),
            "row": self.bands.rows.cpu()[feature, entry].numpy(),
            "window": self.bands.windows.cpu()[feature, entry].float().numpy(),
        }
        return columns, edge_lists


def _rank_within(keys: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... within each run of equal consecutive `keys`."""
    if len(keys) == 0:
        return torch.zeros(0, dtype=torch.int64, device=keys.device)
    change = torch.ones(len(keys), dtype=torch.bool, device=keys.device)
    change[1:] = keys[1:] != keys[:-1]
    starts = change.nonzero().squeeze(1)
    lengths = torch.diff(starts, append=torch.tensor([len(keys)], device=keys.device))
    return torch.arange(len(keys), device=keys.device) - torch.repeat_interleave(starts, lengths)


def _effective_bins(exponent, lo, hi, n_fine):
    """Per feature and fine bin, the part [a, b] of the bin inside [act_min, act_max]: its
    counts are spread uniformly there. exponent, lo, hi (F,) -> a, b (F, n_fine)."""
    width = torch.exp2(exponent.double()) / n_fine
    edges = torch.arange(n_fine + 1, dtype=torch.float64)[None] * width[:, None]
    a = torch.maximum(edges[:, :-1], lo.double()[:, None])
    b = torch.minimum(edges[:, 1:], hi.double()[:, None])
    return a, torch.maximum(a, b)


def _rebin(hist, exponent, lo, hi, n_out: int) -> torch.Tensor:
    """Counts (F, n_out) over [act_min, act_max] from the fine histogram (F, FINE_BINS) on
    [0, 2^e), each fine bin's counts spread uniformly over its part inside [act_min, act_max]:
    the cumulative count at each output edge x is the count of the fine bins below x plus
    the fraction of x's own bin below it."""
    n_fine = hist.shape[1]
    width = (torch.exp2(exponent.double()) / n_fine)[:, None]
    lo, hi = lo.double()[:, None], hi.double()[:, None]
    x = lo + (hi - lo) * torch.linspace(0, 1, n_out + 1, dtype=torch.float64)  # (F, n_out + 1)
    i = (x / width).floor().long().clamp(0, n_fine - 1)  # the fine bin holding each edge
    counts = hist.double()
    cum = counts.cumsum(1)
    below = torch.where(i > 0, cum.gather(1, (i - 1).clamp(min=0)), 0)
    a = torch.maximum(i * width, lo)
    span = torch.maximum(a, torch.minimum((i + 1) * width, hi)) - a
    frac = torch.where(span > 0, ((x - a) / torch.where(span > 0, span, 1)).clamp(0, 1), (x >= a).double())
    cdf = below + counts.gather(1, i) * frac
    cdf[:, 0], cdf[:, -1] = 0, cum[:, -1]  # nothing below act_min, everything up to act_max
    return cdf.round().long().diff(dim=1)  # rounding the cumulative counts keeps the total


def _quantiles(hist, exponent, lo, hi, n: int) -> torch.Tensor:
    """Percentiles 1..n of the firing activations, interpolated on the fine grid: (F, n)."""
    a, b = _effective_bins(exponent, lo, hi, hist.shape[1])
    cum = hist.double().cumsum(1)
    total = cum[:, -1:]
    target = total * torch.arange(1, n + 1, dtype=torch.float64)[None] / n
    i = torch.searchsorted(cum.contiguous(), target.contiguous()).clamp(max=hist.shape[1] - 1)
    before = torch.where(i > 0, cum.gather(1, (i - 1).clamp(min=0)), 0)
    inside = hist.double().gather(1, i)
    frac = torch.where(inside > 0, (target - before) / torch.where(inside > 0, inside, 1), 1).clamp(0, 1)
    q = a.gather(1, i) + frac * (b.gather(1, i) - a.gather(1, i))
    q = torch.minimum(torch.maximum(q, lo.double()[:, None]), hi.double()[:, None])
    q[:, -1] = hi.double()
    return q.float()


def iter_batches(store: ActivationStore, n_rows: int, batch_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, stored `resid_mid` rows) of [0, n_rows) in batches of `batch_rows`, read
    ahead by one batch in a background thread (file reads release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce():
        try:
            for start in range(0, n_rows, batch_rows):
                if stop.is_set():
                    return
                q.put((start, store.read_rows("resid_mid", start, min(start + batch_rows, n_rows))))
            q.put(None)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


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
    s, shape = store.schema, transcoder.shape
    if (s.n_layers, s.d_model) != (shape.n_layers, shape.d_model):
        raise ValueError(
            f"the transcoder has n_layers={shape.n_layers}, d_model={shape.d_model}, but the activation "
            f"store {store.path} was dumped from a model with n_layers={s.n_layers}, d_model={s.d_model}; "
            "re-run `dvc repro train` on this store, or point `paths.transcoder` / `paths.activations` "
            "at a matching pair"
        )
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
    """A chunk's encoder in the matmul dtype (bf16 under autocast, where pre-activations and
    thresholds are compared in bf16): per part (layer, W_enc^T rows (n, d_model), b_enc
    (n, 1)), and the thresholds of all its features."""

    parts: list[tuple[int, torch.Tensor, torch.Tensor]]
    threshold: torch.Tensor


def chunk_weights(transcoder: CrossLayerTranscoder, chunk: Chunk, *, autocast: bool, device) -> ChunkWeights:
    dtype = torch.bfloat16 if autocast else torch.float32
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
) -> tuple[list[tuple[Chunk, FeatureState]], Scan]:
    """Stream the store once; the finished `FeatureState` of every chunk of features."""
    scan = plan_scan(store, transcoder, cfg)
    chunks = plan_chunks(transcoder.shape.n_layers, transcoder.shape.d_transcoder)
    weights = [chunk_weights(transcoder, c, autocast=cfg.autocast, device=device) for c in chunks]
    dtype = weights[0].threshold.dtype
    states = [FeatureState(c.n_features, cfg, dtype, device) for c in chunks]
    buffer = torch.empty(max(c.n_features for c in chunks) * scan.batch_rows, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    C = scan.context_len
    bar = tqdm(total=scan.n_tokens, desc="examples", unit="tok", unit_scale=True, disable=not progress)
    for start, values in iter_batches(store, scan.n_tokens, scan.batch_rows):
        x = store.to_torch(values).to(device)  # (rows, n_layers, d_model)
        for chunk, w, state in zip(chunks, weights, states):
            h = pre_activations(x, w, buffer[: chunk.n_features * len(x)].view(chunk.n_features, len(x)))
            state.update(h.view(chunk.n_features, len(x) // C, C), w.threshold, start, generator)
        bar.update(len(x))
    bar.close()
    return list(zip(chunks, states)), scan


@torch.inference_mode()
def logit_lens(
    transcoder: CrossLayerTranscoder, unembed: torch.Tensor, gain: torch.Tensor, k: int, chunk: int = 1024
) -> list[dict[str, np.ndarray]]:
    """Top and bottom `k` output tokens of each feature's direct effect on the logits.

    A feature of layer l writes W_dec_l[f, j] to the MLP output of every layer l + j; all of
    them add into the residual stream, which reaches the unembedding through the final norm.
    So the decoder is reduced to the sum over its output layers, sum_j W_dec_l[f, j]: the
    feature's total direct contribution to the final residual stream (for a per-layer
    transcoder, its one slice). That direction, times the final norm's elementwise gain
    (`gain`; the norm's division by the RMS is positive, so it does not change the ranking),
    goes through the unembedding `unembed` (vocab, d_model). Effects through later attention
    and MLPs are ignored, as in any logit lens.
    """
    out = []
    for W in transcoder.W_dec:  # (d_tc, n_out, d_model)
        direction = W.detach().float().sum(1) * gain  # (d_tc, d_model)
        parts: dict[str, list] = {"top_ids": [], "top_values": [], "bottom_ids": [], "bottom_values": []}
        for c in range(0, len(direction), chunk):
            logits = direction[c : c + chunk] @ unembed.t()  # (chunk, vocab)
            top = logits.topk(k, dim=1)
            bottom = logits.topk(k, dim=1, largest=False)
            parts["top_ids"].append(top.indices)
            parts["top_values"].append(top.values)
            parts["bottom_ids"].append(bottom.indices)
            parts["bottom_values"].append(bottom.values)
        out.append({name: torch.cat(v).cpu().numpy() for name, v in parts.items()})
    return out


def unembedding(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's unembedding (vocab, d_model) and its final norm's elementwise gain
    (d_model,), float32. Gemma's RMSNorm multiplies by (1 + weight)."""
    norm = getattr(get_trunk(model), get_architecture(model).final_norm)
    gain = norm.weight.detach().float()
    if type(norm).__name__.startswith("Gemma"):
        gain = 1 + gain
    return model.get_output_embeddings().weight.detach().float(), gain


def _list_array(values: np.ndarray, lengths: np.ndarray, type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type_))


def _fixed_lists(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """(n, k) -> n lists of k."""
    n, k = values.shape
    return _list_array(values.reshape(-1), np.full(n, k), type_)


def example_table(
    columns: dict, cfg: ExamplesConfig, store_ids: dict[str, np.ndarray], context_len: int
) -> pa.Table:
    """Examples table rows from `FeatureState.finalize` columns: windows cut to their
    sequence, token ids and document ids looked up in the store's arrays."""
    n_intervals = cfg.n_intervals
    names = np.array(["top", *[f"interval_{i}" for i in range(n_intervals)], "random"], dtype=object)
    rows = columns["row"]
    offsets = np.arange(-cfg.context_before, cfg.context_after + 1)
    position = rows % context_len
    index = position[:, None] + offsets
    valid = (index >= 1) & (index < context_len)
    token_rows = (rows[:, None] + offsets)[valid]
    return pa.table(
        {
            "layer": columns["layer"],
            "feature": columns["feature"],
            "group": names[columns["group"]].tolist(),
            "rank": columns["rank"],
            "activation": columns["activation"].astype(np.float32),
            "token_index": rows,
            "doc_id": store_ids["doc_ids"][rows],
            "position": position.astype(np.int32),
            "token_ids": _list_array(store_ids["token_ids"][token_rows], valid.sum(1), pa.int32()),
            "token_acts": _list_array(
                columns["window"][valid].astype(np.float32), valid.sum(1), pa.float32()
            ),
            "max_index": (valid[:, : cfg.context_before]).sum(1).astype(np.int16),
        },
        schema=EXAMPLES_SCHEMA,
    )


def feature_table(features: dict, lens: list[dict[str, np.ndarray]], chunk: Chunk) -> pa.Table:
    """Features table rows of a chunk from `FeatureState.finalize`, with the logit lens of
    each layer (`logit_lens`)."""
    lens = {k: np.concatenate([lens[l][k][start:stop] for l, start, stop in chunk.parts]) for k in lens[0]}
    return pa.table(
        {
            **{k: features[k] for k in ("layer", "feature", "dead", "n_firing", "frequency")},
            **{k: features[k] for k in ("act_min", "act_max", "act_mean")},
            "quantile_values": _fixed_lists(features["quantile_values"], pa.float32()),
            "histogram": _fixed_lists(features["histogram"], pa.int64()),
            "interval_edges": _list_array(*features["interval_edges"], pa.float32()),
            "top_logit_ids": _fixed_lists(lens["top_ids"].astype(np.int32), pa.int32()),
            "top_logit_values": _fixed_lists(lens["top_values"], pa.float32()),
            "bottom_logit_ids": _fixed_lists(lens["bottom_ids"].astype(np.int32), pa.int32()),
            "bottom_logit_values": _fixed_lists(lens["bottom_values"], pa.float32()),
        },
        schema=FEATURES_SCHEMA,
    )


def _writer(path: Path, schema: pa.Schema, metadata: dict) -> pq.ParquetWriter:
    schema = schema.with_metadata({"clt_examples": json.dumps(metadata)})
    return pq.ParquetWriter(
        path,
        schema,
        compression="zstd",
        sorting_columns=[pq.SortingColumn(0), pq.SortingColumn(1)],
        write_page_index=True,
    )


def write_tables(
    out: str | Path,
    states: list[tuple[Chunk, FeatureState]],
    lens: list[dict[str, np.ndarray]],
    scan: Scan,
    cfg: ExamplesConfig,
    store: ActivationStore,
    metadata: dict,
) -> Path:
    """`examples.parquet` and `features.parquet` in folder `out`, written atomically."""
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    store_ids = {name: store.array(name)[: scan.n_tokens] for name in ("token_ids", "doc_ids")}
    per_feature = cfg.top_k + cfg.n_intervals * cfg.examples_per_interval + cfg.n_random
    examples = _writer(staging / "examples.parquet", EXAMPLES_SCHEMA, metadata)
    features = _writer(staging / "features.parquet", FEATURES_SCHEMA, metadata)
    try:
        for chunk, state in states:
            columns, stats = state.finalize(chunk, scan.n_scanned)
            examples.write_table(
                example_table(columns, cfg, store_ids, scan.context_len),
                row_group_size=ROW_GROUP_FEATURES * per_feature,
            )
            features.write_table(feature_table(stats, lens, chunk), row_group_size=1024)
    finally:
        examples.close()
        features.close()
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def read_feature(folder: str | Path, layer: int, feature: int) -> tuple[dict, list[dict]]:
    """A feature's row of `features.parquet` and its rows of `examples.parquet` (in table
    order: top, intervals from the highest, random), read through the row-group statistics
    so only the row groups that hold the feature are read."""
    folder = Path(folder)
    for name in ("features", "examples"):
        if not (folder / f"{name}.parquet").is_file():
            raise FileNotFoundError(f"{folder}/{name}.parquet does not exist; run `dvc repro examples` first")
    filters = [("layer", "==", layer), ("feature", "==", feature)]
    stats = pq.read_table(folder / "features.parquet", filters=filters).to_pylist()
    if not stats:
        table = pq.read_table(folder / "features.parquet", columns=["layer", "feature"])
        n_layers = pa.compute.max(table["layer"]).as_py() + 1
        n_features = pa.compute.max(table["feature"]).as_py() + 1
        raise ValueError(
            f"{folder} has no layer {layer} feature {feature}: layers are 0..{n_layers - 1}, "
            f"features 0..{n_features - 1}"
        )
    return stats[0], pq.read_table(folder / "examples.parquet", filters=filters).to_pylist()


@torch.inference_mode()
def feature_activations(model, transcoder: CrossLayerTranscoder, ids: list[int], layer: int, feature: int):
    """A feature's activation (float32) at every position of the sequence `ids` (BOS first;
    0 there, as everywhere in this pipeline). The model's MLP input at `layer` is captured by
    a forward pre-hook, as the `dump` stage stores it."""
    if not 0 <= layer < transcoder.shape.n_layers or not 0 <= feature < transcoder.shape.d_transcoder:
        raise ValueError(
            f"no layer {layer} feature {feature}: the transcoder has layers "
            f"0..{transcoder.shape.n_layers - 1} and features 0..{transcoder.shape.d_transcoder - 1}"
        )
    captured = {}

    def hook(module, args, kwargs):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).float()

    block = get_layers(model)[layer].get_submodule(get_architecture(model).mlp_input)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=torch.tensor([ids], device=next(model.parameters()).device), use_cache=False)
    finally:
        handle.remove()
    x = captured["x"][0].cpu()  # (n_tokens, d_model)
    h = x @ transcoder.W_enc[layer, :, feature] + transcoder.b_enc[layer, feature]
    acts = h * (h > transcoder.threshold[layer, feature])
    acts[0] = 0
    return acts.numpy()


def activations_on_text(
    model, tokenizer, transcoder: CrossLayerTranscoder, text: str, layer: int, feature: int
):
    """Token ids of `text` and the feature's activation at each (BOS prepended, then dropped)."""
    ids = [bos_token_id(tokenizer), *tokenizer(text, add_special_tokens=False)["input_ids"]]
    return ids[1:], feature_activations(model, transcoder, ids, layer, feature)[1:]


def render_heatmap(
    tokens: list[str], acts: np.ndarray, path: str | Path, *, title: str, vmax: float | None = None
):
    """A PNG of `tokens` laid out in rows, each cell coloured by its activation (palest: 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_row = 12
    n_rows = max(1, math.ceil(len(tokens) / per_row))
    grid = np.full(n_rows * per_row, np.nan)
    grid[: len(acts)] = acts
    top = vmax if vmax is not None and vmax > 0 else max(float(np.max(acts, initial=0)), 1e-6)
    fig, ax = plt.subplots(figsize=(per_row * 1.1, 0.55 * n_rows + 1.2))
    cmap = plt.get_cmap("Oranges").with_extremes(bad="white")
    image = ax.imshow(
        np.ma.masked_invalid(grid.reshape(n_rows, per_row)), cmap=cmap, vmin=0, vmax=top, aspect="auto"
    )
    for i, (token, act) in enumerate(zip(tokens, acts)):
        row, col = divmod(i, per_row)
        label = token.replace("\n", "\\n").replace("\t", "\\t")
        ax.text(col, row - 0.12, label, ha="center", va="center", fontsize=8)
        ax.text(
            col,
            row + 0.25,
            f"{act:.2f}" if act else "",
            ha="center",
            va="center",
            fontsize=6,
            color="dimgray",
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="activation", fraction=0.03)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def run(params: Params, *, progress: bool = True) -> dict:
    """The `examples` stage: `examples.parquet` and `features.parquet` in `paths.examples`."""
    cfg = params.examples
    start = time.perf_counter()
    store = ActivationStore(params.paths.activations)
    transcoder = load_transcoder(params.paths.transcoder)
    model, _ = load_model(params.paths.model_dir, dtype=torch.float32, device=torch.device("cpu"))
    unembed, gain = unembedding(model)
    del model
    if unembed.shape[1] != transcoder.shape.d_model:
        raise ValueError(
            f"the model in {params.paths.model_dir} has d_model={unembed.shape[1]}, the transcoder in "
            f"{params.paths.transcoder} d_model={transcoder.shape.d_model}; they belong to different models"
        )
    device = resolve_device(params.runtime.device)
    states, scan = collect_examples(store, transcoder, cfg, device=device, progress=progress)
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
