"""Pruning an attribution graph to the nodes and edges that matter for the logits.

As circuit-tracer's `prune_graph` (same thresholds, same result):

1. `node_influence`: with A the row-normalised |adjacency|, the influence of every node on
   the logits weighted by their probabilities, w A + w A^2 + ... (A is nilpotent: the
   graph is acyclic).
2. Keep the nodes that make up `node_threshold` of the total influence, plus every token
   and logit.
3. Score each kept edge by its share of its target's influence and keep the edges that
   make up `edge_threshold` of the total score.
4. Repeatedly drop feature and error nodes left without outgoing edges and features left
   without incoming edges.
The cumulative influence fraction of each node (lower = more important) is returned too;
the graph JSON shows it as `influence`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pipeline.attribution.attribute import Graph


class Pruned(NamedTuple):
    node_mask: torch.Tensor
    """(n_nodes,) bool."""
    edge_mask: torch.Tensor
    """(n_nodes, n_nodes) bool, [target, source]."""
    cumulative_influence: torch.Tensor
    """(n_nodes,) cumulative influence fraction of each node, in order of influence."""


def normalize(A: torch.Tensor) -> torch.Tensor:
    """Row-normalised |A|: each node's inputs as fractions of its total absolute input."""
    A = A.abs()
    return A / A.sum(dim=1, keepdim=True).clamp(min=1e-10)


def total_influence(A: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """w A + w A^2 + ...: every node's influence on the nodes weighted by `weights`."""
    current = weights @ A
    total = current
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ A
        total = total + current
    raise RuntimeError(f"influence did not converge in {max_iter} iterations (is the graph acyclic?)")


def _threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The score above which the highest scores add up to `fraction` of the total."""
    ordered = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(ordered, dim=0) / ordered.sum()
    index = min(int(torch.searchsorted(cumulative, fraction)), len(cumulative) - 1)
    return ordered[index]


def logit_weights(graph: Graph) -> torch.Tensor:
    weights = torch.zeros(len(graph.adjacency))
    weights[-len(graph.logit_ids) :] = graph.logit_probs
    return weights


def node_influence(graph: Graph) -> torch.Tensor:
    """Step 1."""
    return total_influence(normalize(graph.adjacency), logit_weights(graph))


def prune(graph: Graph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Steps 1-4."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`graphs.{name}` must be in [0, 1], got {value}")
    n_logits, n_tokens, n_features = len(graph.logit_ids), graph.n_pos, len(graph.selected)
    weights = logit_weights(graph)
    influence = node_influence(graph)
    node_mask = influence >= _threshold(influence, node_threshold)
    node_mask[-n_logits - n_tokens :] = True

    A = graph.adjacency.clone()
    A[~node_mask] = 0
    A[:, ~node_mask] = 0
    normalized = normalize(A)
    edge_scores = normalized * (total_influence(normalized, weights) + weights)[:, None]
    edge_mask = edge_scores >= _threshold(edge_scores.flatten(), edge_threshold)

    sources = slice(0, len(node_mask) - n_logits - n_tokens)  # features and errors
    while True:
        before = node_mask.clone()
        node_mask[sources] &= edge_mask[:, sources].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        if torch.equal(before, node_mask):
            break

    ordered, order = torch.sort(influence, descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order] = torch.cumsum(ordered, dim=0) / ordered.sum()
    return Pruned(node_mask, edge_mask, cumulative)
