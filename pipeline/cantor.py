"""Cantor pairing of (layer, feature), circuit-tracer's id of a feature in graphs and packed
features. Standard library only: circuit-tracer's own environment imports it too."""

from __future__ import annotations

import math


def cantor(layer: int, feature: int) -> int:
    """The graph node's `feature` of (layer, feature): (l + f)(l + f + 1) / 2 + f."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def cantor_unpair(z: int) -> tuple[int, int]:
    """(layer, feature) of a node's `feature`, as the frontend's `util.cantorUnpair` (exactly,
    with an integer square root)."""
    w = (math.isqrt(8 * z + 1) - 1) // 2
    feature = z - w * (w + 1) // 2
    return w - feature, feature
