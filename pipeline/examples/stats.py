"""Per-feature running statistics of the examples scan (`FeatureState`): firing count, sum
and minimum, a fine histogram on a power-of-two grid, and the three example sketches; and,
once the scan is done, the histogram, percentiles and interval samples interpolated from
that grid. Steps 3 to 5 of `pipeline.examples`.

The states of disjoint parts of the store merge exactly (`FeatureState.merge`): counts,
minima and histograms (brought to the larger grid) add up or reduce, the sketches are
ordered by (key, store row), and the sum is a pairwise sum over the scan's batches
(`PairwiseSum`), so a scan split over processes gives the bytes of one scan.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.config import ExamplesConfig
from pipeline.examples.sketch import Sketch

if TYPE_CHECKING:
    from pipeline.examples.scan import Chunk

FINE_BINS = 512
"""Bins of the internal per-feature histogram over [0, 2^e)."""
N_QUANTILES = 100
"""`quantile_values[i]` is the (i + 1)-th percentile of the firing activations: the
frontend reads it that way (`render-act-histogram.js`)."""
_UNSET = -(2**20)  # exponent of a feature that has not fired yet


def n_bands(n_intervals: int) -> int:
    """Activation bands per feature: the power of two >= 2 n_intervals, so that at least
    n_intervals bands lie below act_max (which is above half the grid's top)."""
    return 1 << math.ceil(math.log2(2 * n_intervals))


class PairwiseSum:
    """The sum of one value per batch (batches 0, 1, ... of a scan, each added once, in
    increasing order) as the pairwise sum over the aligned binary tree of batch indices,
    its root blocks added left to right: the same floating-point result however the
    batches are split into contiguous ranges whose sums are merged (`merge`). Keeps
    O(log n_batches) partial sums: complete aligned blocks (first batch, size, sum)."""

    def __init__(self):
        self.blocks: list[tuple[int, int, torch.Tensor]] = []

    def add(self, batch: int, value: torch.Tensor) -> None:
        self._push((batch, 1, value))

    def _push(self, block: tuple[int, int, torch.Tensor]) -> None:
        start, size, value = block
        while self.blocks:
            s, n, v = self.blocks[-1]
            if not (n == size and s + n == start and s % (2 * n) == 0):
                break
            self.blocks.pop()
            start, size, value = s, 2 * n, v + value
        self.blocks.append((start, size, value))

    @property
    def next_batch(self) -> int:
        return self.blocks[-1][0] + self.blocks[-1][1] if self.blocks else 0

    def merge(self, other: PairwiseSum) -> None:
        """Add the batches of `other`, a disjoint set of batches."""
        blocks, self.blocks = sorted(self.blocks + other.blocks, key=lambda b: b[0]), []
        for block in blocks:
            self._push(block)

    def total(self, like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like)
        for _, _, value in self.blocks:
            out = out + value
        return out

    def to(self, device) -> PairwiseSum:
        self.blocks = [(s, n, v.to(device)) for s, n, v in self.blocks]
        return self


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
        self.sum = PairwiseSum()  # of the firing activations, float64 (F,) per batch
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

    @property
    def total(self) -> torch.Tensor:
        """Sum of the firing activations per feature so far, float64."""
        return self.sum.total(self.min.double())

    def update(
        self, h: torch.Tensor, threshold: torch.Tensor, first_row: int, generator, batch: int | None = None
    ) -> None:
        """Add one batch: h (n_features, n_seq, context_len) pre-activations of whole sequences
        whose first token is store row `first_row` (h[:, :, 0], BOS, is overwritten), and the
        thresholds in h's dtype; `batch` is its index in the scan (default: the next).
        Feature-major, so that a sequence of one feature (a window, a maximum) is contiguous."""
        h[:, :, 0] = -math.inf  # BOS never fires and is never a context's max token
        seq_max = h.amax(dim=2)  # (n_features, n_seq): each sequence's max
        self._grow(seq_max.amax(dim=1).float(), threshold)
        self.update_tokens(h, threshold, batch)
        self.update_contexts(h, seq_max, threshold, first_row, generator)

    def _grow(self, batch_max: torch.Tensor, threshold: torch.Tensor) -> None:
        """Raise each feature's grid exponent so that the batch's activations lie below 2^e."""
        needed = torch.frexp(batch_max).exponent.to(torch.int32)  # batch_max < 2^needed
        self._rescale(torch.where(batch_max > threshold, torch.maximum(needed, self.exponent), self.exponent))

    def _rescale(self, exponent: torch.Tensor) -> None:
        """Move every feature to the grid [0, 2^exponent) (exponents only grow): its
        histogram and bands sum runs of adjacent bins; a feature that has not fired takes it."""
        grow = (self.exponent != _UNSET) & (exponent > self.exponent)
        if grow.any():
            features = grow.nonzero().squeeze(1)
            shift = (exponent - self.exponent)[features]
            for s in shift.unique().tolist():
                f = features[shift == s]
                self.hist[f] = _coarsen_histogram(self.hist[f], 1 << min(s, 30))
                self.bands.coarsen(f, 1 << min(s, 30))
        self.exponent = torch.maximum(exponent, self.exponent)

    def merge(self, other: FeatureState) -> None:
        """Add `other`, the state of the same features on other batches of the scan."""
        exponent = torch.maximum(self.exponent, other.exponent)
        self._rescale(exponent)
        other._rescale(exponent)
        self.hist += other.hist
        self.min = torch.minimum(self.min, other.min)
        self.sum.merge(other.sum)
        for mine, theirs in ((self.top, other.top), (self.bands, other.bands), (self.random, other.random)):
            mine.merge(theirs)

    def to(self, device) -> FeatureState:
        """This state with its tensors on `device` (in place)."""
        for name in ("offsets", "min", "exponent", "hist"):
            setattr(self, name, getattr(self, name).to(device))
        for part in (self.sum, self.top, self.bands, self.random):
            part.to(device)
        return self

    def _scale(self, n_bins: int) -> torch.Tensor:
        """n_bins / 2^e per feature: activation * scale is its bin on the grid."""
        return torch.exp2((math.log2(n_bins) - self.exponent).float())

    def update_tokens(self, h: torch.Tensor, threshold: torch.Tensor, batch: int | None = None) -> None:
        """Sum, minimum and fine histogram (so the count) of the firing activations of
        batch `batch` (default: the next)."""
        F, per_feature = h.shape[0], h[0].numel()
        flat = (h > threshold[:, None, None]).view(-1).nonzero().squeeze(1)
        f = flat.div(per_feature, rounding_mode="floor")
        v = h.view(-1)[flat].float()
        batch = self.sum.next_batch if batch is None else batch
        self.sum.add(batch, torch.zeros(F, device=v.device).index_add_(0, f, v).double())
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
            i, j, slots = sketch.admit(f, groups.gather(1, pick), keys, ties=first[pick])
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
        order = np.lexsort((columns["row"], -columns["activation"], columns["group"], columns["index"]))
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
        by_row = self.bands.rows.cpu().argsort(dim=1, stable=True)  # equal keys: the earlier row
        order = by_row.gather(1, composite.gather(1, by_row).argsort(dim=1, stable=True))
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
