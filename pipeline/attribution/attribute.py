"""Attribution graphs: direct effects between the nodes of the local replacement model.

Algorithm (Ameisen et al. 2025, https://transformer-circuits.pub/2025/attribution-graphs/methods.html;
the same as circuit-tracer's `attribute`):

1. `tokenize_prompt`: BOS, then the prompt's tokens.
2. `run_replacement`: one forward pass of the local replacement model
   (`replacement.linearize`: attention patterns and norm denominators frozen, MLP outputs
   and the token embedding as leaves). The transcoder encodes every layer's MLP input;
   features at position 0 (BOS) are zeroed, as in circuit-tracer. Each layer's error node
   is its real MLP output minus the transcoder's reconstruction (0 at position 0).
3. `select_logit_targets`: the most likely next tokens at the last position, up to
   `max_n_logits` or until their probabilities add up to `desired_logit_prob`; each target
   is the logit minus the mean logit, i.e. the unembedding row minus the mean row.
4. `compute_rows`: for a batch of targets (a logit, or a feature's pre-activation = its
   encoder row read at its layer's MLP input), one batched backward pass
   (`torch.autograd.grad(..., is_grads_batched=True)`) gives the gradient at every write
   point; contracting with each source's output vector gives the direct effects: a feature
   writes a_s * W_dec_s into every layer it decodes to, an error its error vector, a token
   its embedding.
5. `attribute`: the rows of all logits first (`_add_logit_rows`); then features
   (`_add_feature_rows`) in order of their estimated influence on the logits
   (`_next_features` ranks them by `partial_influences`, re-estimated every
   `update_interval` batches) until `max_feature_nodes` features have rows.
6. `assemble_graph`: the adjacency matrix A[target, source] over nodes in circuit-tracer's
   order: [selected features, errors (layer-major), tokens, logits].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from pipeline.attribution.replacement import LinearizedRun, linearize
from pipeline.clt import CrossLayerTranscoder
from pipeline.model import bos_token_id

logger = logging.getLogger(__name__)


@dataclass
class Graph:
    """An unpruned attribution graph.

    Nodes, in order: `selected` features, errors (n_layers x n_pos, layer-major), tokens
    (n_pos), logits (n_logits). `adjacency[t, s]` is the direct effect of node s on node t.
    """

    prompt: str
    input_ids: torch.Tensor
    """(n_pos,) BOS first."""
    active_features: torch.Tensor
    """(n_active, 3) rows (layer, pos, feature), sorted."""
    activations: torch.Tensor
    """(n_active,) feature activations."""
    selected: torch.Tensor
    """(n_selected,) indices into `active_features` of the feature nodes, ascending."""
    logit_ids: torch.Tensor
    """(n_logits,) token ids of the logit nodes, most likely first."""
    logit_probs: torch.Tensor
    """(n_logits,) their probabilities."""
    adjacency: torch.Tensor
    """(n_nodes, n_nodes) float32."""
    n_layers: int

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)


@dataclass
class LayerPlan:
    """One layer's active features as a (n_pos, k_max) grid: feature `members[i]` sits at
    row `pos[i]`, column `slot[i]`; `grid` holds feature indices (padding: feature 0)."""

    members: torch.Tensor
    pos: torch.Tensor
    slot: torch.Tensor
    grid: torch.Tensor


def plan_layers(active_features: torch.Tensor, n_layers: int, n_pos: int) -> list[LayerPlan]:
    plans = []
    for l in range(n_layers):
        members = (active_features[:, 0] == l).nonzero().squeeze(1)
        pos = active_features[members, 1]
        counts = torch.bincount(pos, minlength=n_pos)
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(members), device=pos.device) - start[pos]  # members are sorted by position
        k_max = max(int(counts.max()), 1) if len(members) else 1
        grid = torch.zeros(n_pos, k_max, dtype=torch.long, device=active_features.device)
        grid[pos, slot] = active_features[members, 2]
        plans.append(LayerPlan(members, pos, slot, grid))
    return plans


@dataclass
class ReplacementState:
    """The prompt's forward pass and what the graph's nodes write."""

    run: LinearizedRun
    transcoder: CrossLayerTranscoder
    active_features: torch.Tensor
    """(n_active, 3) rows (layer, pos, feature), sorted."""
    activations: torch.Tensor
    """(n_active,) float32."""
    errors: torch.Tensor
    """(n_layers, n_pos, d_model) float32: real MLP output - reconstruction (0 at BOS)."""
    plan: list[LayerPlan]
    """Per layer, the active features laid out by position for `_feature_columns`."""

    @property
    def n_layers(self) -> int:
        return len(self.run.mlp_out)

    @property
    def n_pos(self) -> int:
        return self.run.embed.shape[1]


def tokenize_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """(n_pos,) token ids: BOS, then the prompt's tokens. As in circuit-tracer, nothing is
    prepended when the prompt already starts with a special token (e.g. written-out BOS)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if ids and ids[0] in tokenizer.all_special_ids:
        return torch.tensor(ids, dtype=torch.long)
    return torch.tensor([bos_token_id(tokenizer), *ids], dtype=torch.long)


@torch.no_grad()
def _features_and_errors(run: LinearizedRun, transcoder: CrossLayerTranscoder):
    n_layers = len(run.mlp_out)
    acts = []
    for l in range(n_layers):
        a = transcoder.encode_layer(run.mlp_in[l][0].detach().float(), l)  # (n_pos, d_tc)
        a[0] = 0  # BOS: circuit-tracer zeroes features (and errors) at position 0
        acts.append(a)
    dense = torch.stack(acts)  # (n_layers, n_pos, d_tc)
    mlp_out = torch.stack([out[0].detach().float() for out in run.mlp_out])  # (n_layers, n_pos, d_model)
    errors = mlp_out - transcoder.decode(dense).transpose(0, 1)
    errors[:, 0] = 0
    index = dense.nonzero()  # sorted by (layer, pos, feature)
    return index, dense[tuple(index.t())], errors


def run_replacement(
    model: nn.Module, transcoder: CrossLayerTranscoder, input_ids: torch.Tensor
) -> ReplacementState:
    """Step 2: the frozen forward pass, active features and error vectors."""
    run = linearize(model, input_ids)
    index, values, errors = _features_and_errors(run, transcoder)
    plan = plan_layers(index, len(run.mlp_out), run.embed.shape[1])
    return ReplacementState(run, transcoder, index, values, errors, plan)


def select_logit_targets(
    logits: torch.Tensor,
    unembed: torch.Tensor,
    *,
    max_n_logits: int,
    desired_logit_prob: float,
    token_ids: list[int] | None = None,
):
    """Step 3: `(ids, probs, vectors)` of the logit targets, from the last position's
    `logits` (d_vocab,) and the unembedding `unembed` (d_vocab, d_model). Given `token_ids`,
    exactly those are the targets."""
    probs = torch.softmax(logits.float(), dim=-1)
    if token_ids is None:
        top_p, top_idx = torch.topk(probs, max_n_logits)
        cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), desired_logit_prob)) + 1
        ids = top_idx[:cutoff]
    else:
        ids = torch.tensor(token_ids, dtype=torch.long)
    W_U = unembed.detach().float()
    vectors = W_U[ids] - W_U.mean(0, keepdim=True)
    return ids, probs[ids], vectors


def compute_rows(
    state: ReplacementState, layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor
) -> torch.Tensor:
    """Step 4: direct effects on a batch of targets, (batch, n_active + (n_layers + 1) * n_pos).

    Target i is `vectors[i]` read at position `positions[i]` of layer `layers[i]`'s MLP input
    (or of the unembedding's input when `layers[i] == n_layers`). Columns: every active
    feature, then errors (layer-major), then tokens.
    """
    run, n_layers, n_pos = state.run, state.n_layers, state.n_pos
    batch = len(layers)
    top = int(layers.max())  # write points at or above `top` cannot reach any target
    outputs, grad_outputs = [], []
    for layer in layers.unique().tolist():
        X = run.final if layer == n_layers else run.mlp_in[layer]
        sel = (layers == layer).nonzero().squeeze(1)
        g = X.new_zeros(batch, *X.shape)
        g[sel, 0, positions[sel]] = vectors[sel].to(X.dtype)
        outputs.append(X)
        grad_outputs.append(g)
    inputs = [run.embed, *run.mlp_out[:top]]
    grads = torch.autograd.grad(
        outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    grads = [g[:, 0].float() if g is not None else None for g in grads]  # (batch, n_pos, d_model)
    n_active = len(state.activations)
    rows = grads[0].new_zeros(batch, n_active + (n_layers + 1) * n_pos)
    token_start = n_active + n_layers * n_pos
    rows[:, token_start:] = torch.einsum("bpd,pd->bp", grads[0], run.embed[0].detach().float())
    if top == 0:
        return rows
    G = grads[0].new_zeros(n_pos, batch, top, grads[0].shape[-1])  # layout for `_feature_columns`
    for l, g in enumerate(grads[1:]):
        if g is not None:
            G[:, :, l] = g.transpose(0, 1)
    del grads
    error_block = torch.einsum("pbld,lpd->blp", G, state.errors[:top])
    rows[:, n_active : n_active + top * n_pos] = error_block.reshape(batch, top * n_pos)
    _feature_columns(state, G, rows)
    return rows


@torch.no_grad()
def _feature_columns(state: ReplacementState, G: torch.Tensor, rows: torch.Tensor) -> None:
    """rows[:, s] = a_s * sum_{l' < top} W_dec[l_s][f_s, l' - l_s] . G[pos_s, :, l'] for active s.

    One batched matmul per source layer: positions are the batch, each position's active
    features (padded to the layer's most at any position) the columns; a per-(layer,
    position) loop of small matmuls measured ~5x slower.
    """
    n_pos, batch, top, d_model = G.shape
    clt = state.transcoder.shape.kind == "clt"
    for l in range(top):
        plan = state.plan[l]
        if len(plan.members) == 0:
            continue
        n_out = (top - l) if clt else 1
        k_max = plan.grid.shape[1]
        W = state.transcoder.W_dec[l][plan.grid.flatten(), :n_out].reshape(n_pos, k_max, n_out * d_model)
        g = G[:, :, l : l + n_out].reshape(n_pos, batch, n_out * d_model)
        out = torch.bmm(g, W.transpose(1, 2))  # (n_pos, batch, k_max)
        rows[:, plan.members] = out[plan.pos, :, plan.slot].t() * state.activations[plan.members]


def partial_influences(
    rows: torch.Tensor, logit_probs: torch.Tensor, row_nodes: torch.Tensor, max_iter: int = 128
) -> torch.Tensor:
    """Influence of every column node on the logits, from the rows computed so far
    (`rows` (n_rows, n_cols); `row_nodes` maps each row to its node's column index, logits
    at the end). Power iteration on the row-normalised |A|, as circuit-tracer does."""
    A = rows.abs()
    A /= A.sum(dim=1, keepdim=True).clamp(min=1e-8)
    influence = torch.zeros(rows.shape[1])
    prod = torch.zeros(rows.shape[1])
    prod[-len(logit_probs) :] = logit_probs
    for _ in range(max_iter):
        prod = prod[row_nodes] @ A
        if not prod.any():
            return influence
        influence += prod
    raise RuntimeError("influence estimate did not converge")


@dataclass
class _Rows:
    """The rows computed so far: row i < `filled` of `edges` holds the direct effects on the
    node `row_nodes[i]` (a feature's index into `active_features`, or a logit's column)."""

    edges: torch.Tensor
    """(n_features + n_logits, n_active + (n_layers + 1) * n_pos + n_logits) float32, on CPU."""
    row_nodes: torch.Tensor
    """(n_features + n_logits,) long."""
    filled: int = 0

    def append(self, rows: torch.Tensor, nodes: torch.Tensor) -> None:
        """Add `rows` (batch, n_cols) from `compute_rows` as the rows of `nodes` (batch,)."""
        end = self.filled + len(nodes)
        self.edges[self.filled : end, : rows.shape[1]] = rows.cpu()
        self.row_nodes[self.filled : end] = nodes
        self.filled = end


def attribute(
    model: nn.Module,
    tokenizer,
    transcoder: CrossLayerTranscoder,
    prompt: str,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 256,
    max_feature_nodes: int | None = None,
    update_interval: int = 4,
    target_token_ids: list[int] | None = None,
    progress: bool = False,
) -> Graph:
    """Step 5: the attribution graph of `prompt` (the model, in eval mode with frozen
    parameters, and the raw-space `transcoder` on the same device)."""
    input_ids = tokenize_prompt(tokenizer, prompt).to(next(model.parameters()).device)
    state = run_replacement(model, transcoder, input_ids)
    logit_ids, logit_probs, logit_vectors = select_logit_targets(
        state.run.logits[-1],
        model.get_output_embeddings().weight,
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
        token_ids=target_token_ids,
    )
    n_active, n_logits = len(state.activations), len(logit_ids)
    n_features = min(max_feature_nodes if max_feature_nodes is not None else n_active, n_active)
    logger.info("%d active features; %d logit targets; rows for %d features", n_active, n_logits, n_features)

    logit_offset = n_active + (state.n_layers + 1) * state.n_pos
    rows = _Rows(
        edges=torch.zeros(n_features + n_logits, logit_offset + n_logits),
        row_nodes=torch.zeros(n_features + n_logits, dtype=torch.long),
    )
    _add_logit_rows(state, rows, logit_vectors, batch_size=batch_size)
    visited = _add_feature_rows(
        state,
        rows,
        logit_probs,
        n_features=n_features,
        batch_size=batch_size,
        update_interval=update_interval,
        progress=progress,
    )
    return assemble_graph(
        prompt, input_ids, state, visited, rows.edges, rows.row_nodes, logit_ids, logit_probs
    )


def _add_logit_rows(state: ReplacementState, rows: _Rows, logit_vectors: torch.Tensor, *, batch_size: int):
    """The rows of the logit targets `logit_vectors` (n_logits, d_model), read at the last
    position of the unembedding's input, in batches of `batch_size`."""
    n_logits = len(logit_vectors)
    logit_offset = len(state.activations) + (state.n_layers + 1) * state.n_pos
    for i in range(0, n_logits, batch_size):
        j = min(i + batch_size, n_logits)
        layers = torch.full((j - i,), state.n_layers)
        positions = torch.full((j - i,), state.n_pos - 1)
        rows.append(
            compute_rows(state, layers, positions, logit_vectors[i:j]), torch.arange(i, j) + logit_offset
        )


def _add_feature_rows(
    state: ReplacementState,
    rows: _Rows,
    logit_probs: torch.Tensor,
    *,
    n_features: int,
    batch_size: int,
    update_interval: int,
    progress: bool,
) -> torch.Tensor:
    """The rows of `n_features` features, queued by `_next_features`, in batches of
    `batch_size`; each feature's target is its encoder row read at its layer's MLP input.
    Returns `visited` (n_active,) bool: the features that have rows."""
    encoder_vectors = state.transcoder.W_enc.detach()  # (n_layers, d_model, d_tc)
    feats = state.active_features
    n_logits = len(logit_probs)
    visited = torch.zeros(len(state.activations), dtype=torch.bool)
    bar = tqdm(total=n_features, desc="attribution", unit="feature", disable=not progress, leave=False)
    while rows.filled - n_logits < n_features:
        queue = min(update_interval * batch_size, n_features - (rows.filled - n_logits))
        pending = _next_features(state, rows, logit_probs, visited, n_features=n_features, queue=queue)
        for start in range(0, len(pending), batch_size):
            idx = pending[start : start + batch_size]
            vectors = encoder_vectors[feats[idx, 0], :, feats[idx, 2]]
            rows.append(compute_rows(state, feats[idx, 0], feats[idx, 1], vectors), idx)
            visited[idx] = True
            bar.update(len(idx))
    bar.close()
    return visited


def _next_features(
    state: ReplacementState,
    rows: _Rows,
    logit_probs: torch.Tensor,
    visited: torch.Tensor,
    *,
    n_features: int,
    queue: int,
) -> torch.Tensor:
    """The features whose rows come next: all active features when every one gets a row;
    otherwise the `queue` unvisited ones of highest `partial_influences` on the logits
    (estimated from the rows so far), grouped by layer."""
    n_active = len(state.activations)
    if n_features == n_active:
        return torch.arange(n_active)
    influence = partial_influences(rows.edges[: rows.filled], logit_probs, rows.row_nodes[: rows.filled])
    order = torch.argsort(influence[:n_active], descending=True)
    pending = order[~visited[order]][:queue]
    # Same rows in any order; batches of similar layers stop their backward pass and
    # their feature columns early (a target at layer l only needs layers < l).
    return pending[torch.argsort(state.active_features[pending, 0].cpu(), stable=True)]


def assemble_graph(prompt, input_ids, state, visited, edges, row_nodes, logit_ids, logit_probs) -> Graph:
    """Step 6: the square adjacency matrix over the selected nodes, in circuit-tracer's order."""
    n_active = len(state.activations)
    selected = visited.nonzero().squeeze(1)
    n_features, n_logits = len(selected), len(logit_ids)
    columns = torch.cat([selected, torch.arange(n_active, edges.shape[1])])
    edges = edges[:, columns][row_nodes.argsort()]  # features ascending, then logits
    n_nodes = edges.shape[1]
    adjacency = torch.zeros(n_nodes, n_nodes)
    adjacency[:n_features] = edges[:n_features]
    adjacency[-n_logits:] = edges[n_features:]
    return Graph(
        prompt=prompt,
        input_ids=input_ids.cpu(),
        active_features=state.active_features.cpu(),
        activations=state.activations.cpu(),
        selected=selected,
        logit_ids=logit_ids.cpu(),
        logit_probs=logit_probs.cpu(),
        adjacency=adjacency,
        n_layers=state.n_layers,
    )
