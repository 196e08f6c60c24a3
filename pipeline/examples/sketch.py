"""Bottom-k sketches: per feature and group, the candidates with the smallest keys seen so far.

With the key -activation a sketch keeps a feature's top contexts; with a random key, a
uniform sample without replacement of every context offered (per activation band, a
uniform sample of each band). See step 4 of `pipeline.examples`.
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
