"""Bottom-k sketches: per feature and group, the candidates with the smallest keys seen so far.

With the key -activation a sketch keeps a feature's top contexts; with a random key, a
uniform sample without replacement of every context offered (per activation band, a
uniform sample of each band). See step 4 of `pipeline.examples`.

Candidates are ordered by (key, store row): equal keys keep the earlier context. With
this total order what a sketch holds does not depend on the order candidates came in, so
the sketches of several parts of the store merge (`Sketch.merge`) into exactly the one
sketch of the whole store.
"""

from __future__ import annotations

import math

import torch


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

    def admit(self, features, groups, keys, ties=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Which candidates of `features` (n',) get in, given their groups and keys (n',
        n; key inf: no candidate; with several groups, keys must lie in [0, 1)) and `ties`
        (n', n), which order equal keys: values in the order of the candidates' store rows,
        above every kept row (the rows of their sequences' first tokens; default: the
        candidates' order). Returns (i, j, slot) of each, candidate [i, j] of feature
        features[i] going to slot `slot`, the slot of an evicted or empty entry."""
        G, m = self.n_groups, self.capacity
        n, device = len(features), keys.device
        if ties is None:
            ties = torch.arange(keys.shape[1], device=device).expand_as(keys) + int(self.rows.max()) + 1
        own = torch.arange(G, device=device).repeat_interleave(m).expand(n, -1)
        K = torch.cat([self.keys[features], keys], 1)  # (n', G m + n): kept ones, then new
        group = torch.cat([own, groups], 1)
        order = _sort(K, group, torch.cat([self.rows[features], ties], 1), G)
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
        by_row = self.rows[features].view(n, G // factor, factor * m).argsort(dim=-1, stable=True)
        keep = by_row.gather(-1, K.gather(-1, by_row).argsort(dim=-1, stable=True))[
            ..., :m
        ]  # (n, G // factor, m)
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

    def merge(self, other: Sketch) -> None:
        """Keep, per feature and group, the `capacity` smallest (key, row) of this sketch
        and `other` (of the same features and groups, from other store rows)."""
        G, m = self.n_groups, self.capacity
        if m == 0:
            return
        F = len(self.keys)
        K = torch.cat([self.keys, other.keys], 1)  # (F, 2 G m)
        group = torch.arange(G, device=K.device).repeat_interleave(m).repeat(2).expand(F, -1)
        order = _sort(K, group, torch.cat([self.rows, other.rows], 1), G)
        # each group has 2 m entries, so its first m in sorted order fill its m slots
        rank = torch.arange(2 * G * m, device=K.device) - torch.searchsorted(
            group.gather(1, order).contiguous(), group.gather(1, order).contiguous()
        )
        src = order[rank < m].view(F, G * m)
        self.keys = K.gather(1, src)
        self.rows = torch.cat([self.rows, other.rows], 1).gather(1, src)
        self.values = torch.cat([self.values, other.values], 1).gather(1, src)
        windows = torch.cat([self.windows, other.windows], 1)
        self.windows = windows.gather(1, src[:, :, None].expand(-1, -1, windows.shape[2]))

    def to(self, device) -> Sketch:
        """This sketch with its tensors on `device` (in place)."""
        for name in ("keys", "rows", "values", "windows"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def _sort(keys: torch.Tensor, groups: torch.Tensor, rows: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per feature (row of the inputs), the order of its entries by (group, key, row), inf
    keys last in their group: `rows` first (stable sorts), then group and key in one sort,
    as keys lie in [0, 1) if there are several groups."""
    by_row = rows.argsort(dim=1, stable=True)
    composite = keys if n_groups == 1 else 2 * groups + torch.where(torch.isfinite(keys), keys, 1.5).double()
    return by_row.gather(1, composite.gather(1, by_row).argsort(dim=1, stable=True))
