"""Suggested supernodes: groups of a graph's feature nodes that seem to play one role, for
the user to accept, edit or reject in `clt serve` (pipeline/web/clt-serve.js).

The rule (`suggest_supernodes`), on the pruned graph JSON and the transcoder's decoders:

1. each feature node gets two profiles: its decoder direction, the sum over output layers of
   its decoder rows `W_dec[l][f]` (what it adds to the final residual stream, the direction
   its logit lens reads), and its edge profile, its signed link weights in the pruned graph,
   incoming ones keyed by source node and outgoing ones keyed by target node;
2. the similarity of two features is the mean of the cosine similarities of both profiles,
   and minus infinity (never grouped) when their positions differ by more than
   `MAX_POS_GAP`;
3. average-linkage agglomerative grouping: merge the two most similar groups while their
   mean pairwise similarity is at least `THRESHOLD` (ties go to the first pair in node
   order, so the result is deterministic); a pair that may never be grouped keeps the
   groups apart;
4. groups of at least two features become suggestions, most influential first, each named
   from its members' labels (`name_group`) and identified by a hash of its members
   (`suggestion_id`), so a re-run that finds the same group gives the same id and the
   user's decision on it still applies.

The `graphs` stage writes them to `metadata.supernode_suggestions` of each graph JSON as
`{"id", "name", "members": [node_id, ...], "similarity"}` (circuit-tracer's pydantic
`Metadata` ignores extra fields, so the JSON still validates). `clt serve` lists them; Accept
adds `[name, *members]` to `qParams.supernodes`, Reject hides it, and Save keeps each decision
in `annotations/{slug}.json` under `qParams.suggestions` (`{id: "accepted" | "rejected"}`).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np
import torch

FEATURE_TYPE = "cross layer transcoder"
THRESHOLD = 0.6
"""Least mean pairwise similarity (step 2, in [-1, 1]) of a suggested group."""
MAX_POS_GAP = 1
"""Most positions between two features of one group."""
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"')


def decoder_directions(W_dec: list[torch.Tensor], features: list[tuple[int, int]]) -> np.ndarray:
    """(n, d_model) summed decoder rows of `features` ((layer, index) pairs); `W_dec[l]` is
    `(d_transcoder, n_out, d_model)` as `CrossLayerTranscoder.W_dec` holds it."""
    if not features:
        return np.zeros((0, W_dec[0].shape[-1]))
    with torch.no_grad():
        rows = [W_dec[l][f].float().sum(0) for l, f in features]
    return torch.stack(rows).double().numpy()


def edge_profiles(data: dict, node_ids: list[str]) -> np.ndarray:
    """(n, n_keys) signed link weights of `node_ids` in the graph JSON `data` (step 1)."""
    row = {n: i for i, n in enumerate(node_ids)}
    keys: dict[tuple[str, str], int] = {}
    entries = []
    for link in data["links"]:
        for node, key in (
            (link["target"], ("in", link["source"])),
            (link["source"], ("out", link["target"])),
        ):
            if node in row:
                entries.append((row[node], keys.setdefault(key, len(keys)), link["weight"]))
    profiles = np.zeros((len(node_ids), len(keys)))
    for i, k, w in entries:
        profiles[i, k] += w
    return profiles


def _cosine(x: np.ndarray) -> np.ndarray:
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T


def similarity(
    directions: np.ndarray, profiles: np.ndarray, positions: list[int], *, max_pos_gap: int = MAX_POS_GAP
) -> np.ndarray:
    """(n, n) step 2's similarity, -inf where two features may not be grouped."""
    S = (_cosine(directions) + _cosine(profiles)) / 2
    pos = np.asarray(positions)
    S[np.abs(pos[:, None] - pos[None, :]) > max_pos_gap] = -np.inf
    return S


def group(S: np.ndarray, *, threshold: float = THRESHOLD) -> list[list[int]]:
    """Step 3: average-linkage groups of the (n, n) similarity `S`, each sorted, in order of
    their first member; singletons included."""
    n = len(S)
    groups = [[i] for i in range(n)]
    total = S.copy()  # sum of pairwise similarities between groups
    np.fill_diagonal(total, -np.inf)
    size = np.ones(n)
    alive = np.ones(n, dtype=bool)
    while alive.sum() > 1:
        mean = total / np.outer(size, size)
        mean[~alive] = -np.inf
        mean[:, ~alive] = -np.inf
        i, j = divmod(int(np.argmax(mean)), n)  # the first maximum in row-major order
        if not mean[i, j] >= threshold:
            break
        i, j = min(i, j), max(i, j)
        groups[i] += groups[j]
        total[i] += total[j]
        total[:, i] = total[i]
        total[i, i] = -np.inf
        size[i] += size[j]
        alive[j] = False
    return [sorted(groups[i]) for i in range(n) if alive[i]]


def _tokens(label: str) -> tuple[list[str], list[str]]:
    """The quoted input and output tokens of a `pipeline/labels.py` label."""
    inputs, _, outputs = label.partition("→")
    return _TOKEN.findall(inputs), _TOKEN.findall(outputs)


def name_group(labels: list[str]) -> str:
    """A group's name from its members' labels (most influential first): the output token
    most of them share (`→ " Paris"`), else the input token most share (`" Paris" →`), else
    the first non-empty label, else `supernode`. A token counts once per member; ties go to
    the token seen first."""
    for side in (1, 0):
        counts = Counter(t for label in labels for t in dict.fromkeys(_tokens(label)[side]))
        if counts:
            token, n = counts.most_common(1)[0]
            if n >= 2:
                return f'→ "{token}"' if side else f'"{token}" →'
    return next((label for label in labels if label), "supernode")


def suggestion_id(members: list[str]) -> str:
    """A short id that depends only on the set of member node ids."""
    return "sg-" + hashlib.sha256(",".join(sorted(members)).encode()).hexdigest()[:10]


def suggest_supernodes(
    data: dict,
    W_dec: list[torch.Tensor],
    *,
    threshold: float = THRESHOLD,
    max_pos_gap: int = MAX_POS_GAP,
) -> list[dict]:
    """Steps 1-4 on the graph JSON `data` (its feature nodes' ids are `{l}_{f}_{pos}`)."""
    nodes = [n for n in data["nodes"] if n["feature_type"] == FEATURE_TYPE]
    if len(nodes) < 2:
        return []
    ids = [n["node_id"] for n in nodes]
    features = [tuple(int(v) for v in i.split("_")[:2]) for i in ids]
    S = similarity(
        decoder_directions(W_dec, features),
        edge_profiles(data, ids),
        [n["ctx_idx"] for n in nodes],
        max_pos_gap=max_pos_gap,
    )
    influence = [n["influence"] if n["influence"] is not None else 1.0 for n in nodes]
    suggestions = []
    for members in group(S, threshold=threshold):
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda i: (influence[i], i))
        pairs = S[np.ix_(members, members)][~np.eye(len(members), dtype=bool)]
        suggestions.append(
            {
                "id": suggestion_id([ids[i] for i in members]),
                "name": name_group([nodes[i]["clerp"] for i in members]),
                "members": [ids[i] for i in members],
                "similarity": round(float(pairs.mean()), 4),
                "_rank": influence[members[0]],
            }
        )
    suggestions.sort(key=lambda s: (s["_rank"], s["id"]))
    return [{k: v for k, v in s.items() if k != "_rank"} for s in suggestions]
