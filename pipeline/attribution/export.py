"""Writing graphs: pruned ones as circuit-tracer graph JSON (docs/formats.md, "Graphs"),
unpruned ones as a cache file pair to prune again later. Their PNG pictures are drawn from
the JSON by `pipeline/attribution/figure.py`.

The JSON matches circuit-tracer's `create_graph_files`: the same node ids and fields (in
the field order of its pydantic `Node`), links `{source, target, weight}` for kept edges
between kept nodes, only nodes that have a link (tokens and logits always), and
`graph-metadata.json` listing every graph of the folder.

An unpruned `Graph` is saved as `{name}.safetensors` (its tensors; of the adjacency only
the rows of features and logits and the columns of non-logits, the only entries that can
be non-zero) plus `{name}.json` (the rest, and the caller's `key`). The JSON is removed
first and written last, so a pair whose JSON exists is complete; never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.atomic import staged, write_json
from pipeline.attribution.attribute import Graph
from pipeline.attribution.prune import Pruned
from pipeline.cantor import cantor


def _node(node_id, feature, layer, ctx_idx, feature_type, js_node_id, **extra) -> dict:
    node = {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": ctx_idx,
        "feature_type": feature_type,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js_node_id,
        "clerp": "",
        "influence": None,
        "activation": None,
    }
    node.update(extra)
    return node


def graph_nodes(graph: Graph, pruned: Pruned, tokens: list[str]) -> dict[int, dict]:
    """Node index -> JSON node, for the nodes kept by pruning."""
    n_features, n_pos, n_layers = len(graph.selected), graph.n_pos, graph.n_layers
    error_end = n_features + n_layers * n_pos
    token_end = error_end + n_pos
    influence = pruned.cumulative_influence.tolist()
    nodes = {}
    for i in pruned.node_mask.nonzero().squeeze(1).tolist():
        if i < n_features:
            s = int(graph.selected[i])
            l, p, f = graph.active_features[s].tolist()
            nodes[i] = _node(
                f"{l}_{f}_{p}",
                cantor(l, f),
                str(l),
                p,
                "cross layer transcoder",
                f"{l}_{f}-0",
                influence=influence[i],
                activation=float(graph.activations[s]),
            )
        elif i < error_end:
            l, p = divmod(i - n_features, n_pos)
            nodes[i] = _node(
                f"0_{l}_{p}", -1, str(l), p, "mlp reconstruction error", f"{l}_{p}-0", influence=influence[i]
            )
        elif i < token_end:
            p = i - error_end
            t = int(graph.input_ids[p])
            nodes[i] = _node(f"E_{t}_{p}", p, "E", p, "embedding", f"E_{t}-{p}", influence=influence[i])
        else:
            k = i - token_end
            t, prob = int(graph.logit_ids[k]), float(graph.logit_probs[k])
            layer = str(n_layers + 1)
            nodes[i] = _node(
                f"{layer}_{t}_{n_pos - 1}",
                t,
                layer,
                n_pos - 1,
                "logit",
                f"L_{t}-{n_pos - 1}",
                token_prob=prob,
                is_target_logit=k == 0,
                clerp=f'Output "{tokens[k]}" (p={prob:.3f})',
            )
    return nodes


def graph_json(
    graph: Graph,
    pruned: Pruned,
    tokenizer,
    *,
    slug: str,
    scan: str,
    node_threshold: float,
) -> dict:
    """The circuit-tracer graph JSON of a pruned graph."""
    logit_tokens = [tokenizer.decode([int(t)]) for t in graph.logit_ids]
    nodes = graph_nodes(graph, pruned, logit_tokens)
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights)
        if s in nodes and t in nodes
    ]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    used = [
        n for n in nodes.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")
    ]
    metadata = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": [],
        "prompt_tokens": [tokenizer.decode([int(t)]) for t in graph.input_ids],
        "prompt": tokenizer.decode(graph.input_ids.tolist()),
        "node_threshold": node_threshold,
        "schema_version": 1,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


GRAPH_FORMAT = 1
"""Version of the `save_graph` files; `load_graph` reads only this one."""


def save_graph(graph: Graph, folder: Path, name: str, *, key: str) -> None:
    """Write `graph` as `folder/{name}.safetensors` + `folder/{name}.json` (see the module
    docstring), recording `key`, which `load_graph` must be given back."""
    from safetensors.torch import save_file

    n_features, n_logits = len(graph.selected), len(graph.logit_ids)
    A = graph.adjacency
    assert not A[n_features:-n_logits].any() and not A[:, -n_logits:].any()  # errors, tokens: no inputs
    rows = torch.cat([A[:n_features], A[-n_logits:]])[
        :, :-n_logits
    ]  # (n_features + n_logits, n_nodes - n_logits)
    tensors = {
        "input_ids": graph.input_ids,
        "active_features": graph.active_features.int(),
        "activations": graph.activations,
        "selected": graph.selected,
        "logit_ids": graph.logit_ids,
        "logit_probs": graph.logit_probs,
        "rows": rows,
    }
    meta = {"format": GRAPH_FORMAT, "key": key, "prompt": graph.prompt, "n_layers": graph.n_layers}
    (folder / f"{name}.json").unlink(missing_ok=True)
    with staged(folder / f"{name}.safetensors", suffix=".tmp") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    write_json(folder / f"{name}.json", meta)


def load_graph(folder: Path, name: str, *, key: str) -> Graph | None:
    """The graph `save_graph` wrote with the same `key`, or None if there is none."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    tensors = folder / f"{name}.safetensors"
    if meta.get("format") != GRAPH_FORMAT or meta.get("key") != key or not tensors.is_file():
        return None
    t = load_file(tensors)
    n_features, n_logits = len(t["selected"]), len(t["logit_ids"])
    n_nodes = t["rows"].shape[1] + n_logits
    adjacency = torch.zeros(n_nodes, n_nodes)
    adjacency[:n_features, :-n_logits] = t["rows"][:n_features]
    adjacency[-n_logits:, :-n_logits] = t["rows"][n_features:]
    return Graph(
        prompt=meta["prompt"],
        input_ids=t["input_ids"],
        active_features=t["active_features"].long(),
        activations=t["activations"],
        selected=t["selected"],
        logit_ids=t["logit_ids"],
        logit_probs=t["logit_probs"],
        adjacency=adjacency,
        n_layers=meta["n_layers"],
    )


def write_graph_metadata(folder: Path, slugs: list[str]) -> None:
    """`graph-metadata.json`: the metadata of the graphs `{slug}.json` in `folder`."""
    graphs = [json.loads((folder / f"{slug}.json").read_text())["metadata"] for slug in sorted(slugs)]
    write_json(folder / "graph-metadata.json", {"graphs": graphs})
