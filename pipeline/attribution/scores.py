"""Graph scores: how much of a graph's explanation runs through features rather than errors.

As circuit-tracer's `compute_graph_scores` (`circuit_tracer/graph.py`), on the unpruned
graph, with A the row-normalised |adjacency| and w the logit probabilities on the logit
nodes (`prune.normalize`, `prune.logit_weights`):

1. `influence`: every node's influence on the logits, w A + w A^2 + ...
2. replacement score: influence of the token nodes / (influence of the tokens + influence
   of the error nodes). Features pass influence on; tokens and errors are where it ends,
   so this is the share of the end-to-end explanation that reaches the input through
   features alone.
3. completeness score: sum over nodes n of (1 - A[n, errors].sum()) (influence_n + w_n),
   divided by the sum of (influence_n + w_n): the share of each node's direct input that
   is not error, weighted by how much the node matters.
4. logit error share (ours): sum over logits k of w_k A[k, errors].sum() / sum of w_k, the
   share of the target logits' direct input that comes from error nodes.
"""

from __future__ import annotations

import torch

from pipeline.attribution.attribute import Graph
from pipeline.attribution.prune import logit_weights, normalize, total_influence


def graph_scores(graph: Graph) -> dict[str, float]:
    """`replacement_score`, `completeness_score` and `logit_error_share` of `graph` (steps 1-4)."""
    n_features, n_logits = len(graph.selected), len(graph.logit_ids)
    errors = slice(n_features, n_features + graph.n_layers * graph.n_pos)
    tokens = slice(errors.stop, errors.stop + graph.n_pos)
    weights = logit_weights(graph)
    A = normalize(graph.adjacency)
    influence = total_influence(A, weights)
    token_influence, error_influence = influence[tokens].sum(), influence[errors].sum()
    error_input = A[:, errors].sum(dim=1)  # (n_nodes,)
    output_influence = influence + weights
    completeness = ((1 - error_input) * output_influence).sum() / output_influence.sum()
    probs = graph.logit_probs.to(A.dtype)
    return {
        "replacement_score": float(token_influence / (token_influence + error_influence)),
        "completeness_score": float(completeness),
        "logit_error_share": float((probs * error_input[-n_logits:]).sum() / probs.sum()),
    }


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each score over graphs."""
    return {key: float(torch.tensor([s[key] for s in scores]).mean()) for key in scores[0]} if scores else {}
