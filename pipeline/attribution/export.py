"""Writing graphs: pruned ones as circuit-tracer graph JSON (docs/formats.md, "Graphs") and as PNG
pictures, unpruned ones as a cache file pair to prune again later.

The JSON matches circuit-tracer's `create_graph_files`: the same node ids and fields (in
the field order of its pydantic `Node`), links `{source, target, weight}` for kept edges
between kept nodes, only nodes that have a link (tokens and logits always), and
`graph-metadata.json` listing every graph of the folder.

The PNG (`draw_graph`) is drawn from the JSON alone, like the Circuit Tracing paper's
figures: the ~36 most influential nodes with their labels (a feature's `clerp`, see
`pipeline/labels.py`), layers bottom to top, positions left to right, and each node's
strongest incoming edges among them; texts are measured before they are placed, so none
overlap (`graph_figure`).

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
from pipeline.labels import quote


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


DRAWING = dict(max_nodes=36, max_logits=5, max_tokens=10, max_errors=4, edge_fraction=0.8, max_in_edges=3)
"""`draw_graph`'s defaults (the PNG is an output of the `graphs` stage: they are in its
output key through this module's code)."""
DPI = 150
FONT = 7
"""Points, node labels; tokens and titles are a little larger."""
WRAP = 32
"""Characters per line of a node's label."""
MAX_LINES = 3
PAD = 0.3
"""Box padding, in units of the font size (matplotlib's `boxstyle` pad)."""
CELL_WIDTH = 6.0
"""Inches: the nodes of one (layer, position) cell go side by side up to this width, then
on another line."""
GAP = 0.08
"""Inches between two boxes of a cell."""
ROW_GAP = 0.3
MAX_BOW = 0.5
"""Inches: how far an edge between boxes of one column bows sideways at most."""
COLUMN_GAP = 0.2
MARGIN = 0.15
COLOURS = {
    "cross layer transcoder": ("#fbe7c6", "#b7862e"),
    "mlp reconstruction error": ("#e6e6e6", "#8c8c8c"),
    "embedding": ("#d9efd9", "#4f9a4f"),
    "logit": ("#f8d4dc", "#b5536b"),
}
"""Node box (face, edge) colour by `feature_type`."""
EDGE_COLOURS = {True: "#2f6db5", False: "#e0602a"}
"""Edge colour by sign: positive blue, negative orange."""


def select_nodes(
    data: dict, *, max_nodes: int, max_logits: int, max_tokens: int, max_errors: int
) -> list[dict]:
    """The nodes to draw, at most `max_nodes`: the `max_logits` most likely logits, the
    `max_tokens` most influential tokens (they label the positions), then features and
    errors in pruning's influence order (lowest cumulative influence first), at most
    `max_errors` errors: a poorly fitting transcoder has errors at the top of that order,
    and a figure of errors says nothing about the circuit."""

    def influence(n: dict) -> tuple:
        return (float("inf") if n["influence"] is None else n["influence"], n["node_id"])

    def of(kind: str) -> list[dict]:
        return [n for n in data["nodes"] if n["feature_type"] == kind]

    logits = sorted(of("logit"), key=lambda n: (-n["token_prob"], n["node_id"]))[:max_logits]
    tokens = sorted(of("embedding"), key=influence)[:max_tokens]
    errors = {n["node_id"] for n in sorted(of("mlp reconstruction error"), key=influence)[:max_errors]}
    inner = [
        n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder" or n["node_id"] in errors
    ]
    chosen = logits + tokens
    return chosen + sorted(inner, key=influence)[: max(max_nodes - len(chosen), 0)]


def select_links(data: dict, ids: set[str], *, fraction: float, max_in: int) -> list[tuple[dict, float]]:
    """The edges to draw between nodes `ids`, each with its share of its target's input
    (|weight| over the sum of |weight| of the target's links from `ids`): for each target,
    its strongest such edges until they cover `fraction` of that input, `max_in` at most."""
    incoming: dict[str, list[dict]] = {}
    for link in data["links"]:
        if link["source"] in ids and link["target"] in ids and link["weight"] != 0:
            incoming.setdefault(link["target"], []).append(link)
    chosen = []
    for target in sorted(incoming):
        links = sorted(incoming[target], key=lambda e: (-abs(e["weight"]), e["source"]))
        total = sum(abs(e["weight"]) for e in links)
        covered = 0.0
        for link in links[:max_in]:
            if covered >= fraction * total:
                break
            chosen.append((link, abs(link["weight"]) / total))
            covered += abs(link["weight"])
    return chosen


def wrap_label(text: str, *, width: int = WRAP, max_lines: int = MAX_LINES) -> list[str]:
    """`text` in lines of about `width` characters: one line if it fits, else broken between
    quoted tokens and words (never inside a quoted token) and before `→`; at most
    `max_lines`, the last ending in `…` when some is left out."""
    import re

    if len(text) <= width:
        return [text] if text else []
    chunks = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', text)
    lines: list[str] = []
    for chunk in chunks:
        chunk = chunk if len(chunk) <= width else chunk[: width - 1] + "…"
        if lines and chunk != "→" and len(lines[-1]) + 1 + len(chunk) <= width:
            lines[-1] += " " + chunk
        else:
            lines.append(chunk)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        lines = lines[: max_lines - 1] + [(last if len(last) < width else last[: width - 1]) + "…"]
    return lines


def node_text(node: dict, prompt_tokens: list[str]) -> str:
    """What a node's box says: a feature's label and `L{layer} #{index}`, an error's layer,
    a token, a logit's token and probability."""
    kind, layer = node["feature_type"], node["layer"]
    if kind == "cross layer transcoder":
        index = node["node_id"].split("_")[1]
        return "\n".join([*wrap_label(node["clerp"]), f"L{layer} #{index}"])
    if kind == "mlp reconstruction error":
        return f"error L{layer}"
    if kind == "embedding":
        return quote(prompt_tokens[node["ctx_idx"]])
    clerp = node["clerp"]
    token = clerp[len('Output "') : clerp.rindex('" (p=')] if '" (p=' in clerp else clerp
    return f"{quote(token)}\np={node['token_prob']:.3f}"


def edge_path(start: tuple[float, float], end: tuple[float, float], *, side: float = 1.0):
    """A line from `start` (the top of a box) up to `end` (the bottom of another); one
    between boxes of one column bows sideways (right for `side` 1, left for -1) by a tenth
    of its height, at most `MAX_BOW` inches, so that it does not run through the boxes
    between them."""
    from matplotlib.path import Path as Curve

    (x0, y0), (x1, y1) = start, end
    if abs(x1 - x0) >= 0.5:
        return Curve([start, end], [Curve.MOVETO, Curve.LINETO])
    bow = side * min(0.1 * (y1 - y0), MAX_BOW)
    control = ((x0 + x1) / 2 + 2 * bow, (y0 + y1) / 2)  # a quadratic Bezier's middle is half way
    return Curve([start, control, end], [Curve.MOVETO, Curve.CURVE3, Curve.CURVE3])


def row_name(row: int, n_layers: int) -> str:
    return "Emb" if row < 0 else "Logit" if row > n_layers else f"L{row}"


def graph_figure(
    data: dict,
    *,
    max_nodes: int = DRAWING["max_nodes"],
    max_logits: int = DRAWING["max_logits"],
    max_tokens: int = DRAWING["max_tokens"],
    max_errors: int = DRAWING["max_errors"],
    edge_fraction: float = DRAWING["edge_fraction"],
    max_in_edges: int = DRAWING["max_in_edges"],
):
    """The matplotlib `Figure` of `draw_graph`. Every text is measured by the renderer and
    then placed in inches (the axes' data coordinates are inches from the lower left
    corner), so no two texts overlap:

    1. `select_nodes` and `select_links`;
    2. one box per node (its `node_text`), measured; the prompt's tokens along the bottom
       row, a token drawn as a node being its own label (a token at a position without
       drawn nodes is written upright to save width);
    3. rows: the tokens at the bottom, then each layer that has a drawn node, the logits on
       top; columns: one per position, as wide as its widest cell; the nodes of a cell side
       by side (most influential first), on more lines when wider than `CELL_WIDTH`;
    4. edges from the top of the source's box to the bottom of the target's, behind the
       boxes (`edge_path`, bowing towards the middle of the figure); colour by sign, width
       by share of the target's input (`select_links`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import PathPatch

    drawn = select_nodes(
        data, max_nodes=max_nodes, max_logits=max_logits, max_tokens=max_tokens, max_errors=max_errors
    )
    links = select_links(data, {n["node_id"] for n in drawn}, fraction=edge_fraction, max_in=max_in_edges)
    meta = data["metadata"]
    tokens = meta["prompt_tokens"]
    n_layers = max(int(n["layer"]) for n in data["nodes"] if n["layer"] != "E") - 1

    fig = Figure(dpi=DPI)
    FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    items = {}  # key -> (text, width, height), inches

    def add(key: str, text: str, **style):
        t = ax.text(0, 0, text, **{"ha": "center", "va": "center", **style})
        extent = t.get_window_extent(renderer)
        pad = 2 * PAD * t.get_fontsize() / 72 if t.get_bbox_patch() else 0.0
        items[key] = (t, extent.width / DPI + pad, extent.height / DPI + pad)
        return t

    # 2. boxes and token labels, by (row, position) cell
    cells: dict[tuple[int, int], list[str]] = {}
    for node in drawn:
        face, edge = COLOURS[node["feature_type"]]
        box = dict(boxstyle=f"round,pad={PAD}", fc=face, ec=edge, lw=0.6)
        add(node["node_id"], node_text(node, tokens), fontsize=FONT, zorder=3, gid=node["node_id"], bbox=box)
        row = -1 if node["layer"] == "E" else int(node["layer"])
        cells.setdefault((row, node["ctx_idx"]), []).append(node["node_id"])
    used = {pos for _, pos in cells}
    for pos, token in enumerate(tokens):
        if (-1, pos) not in cells:
            rotation = 0 if pos in used else 90
            add(f"token {pos}", quote(token), fontsize=FONT + 1, color="#555555", rotation=rotation)
            cells[(-1, pos)] = [f"token {pos}"]

    # 3. layout: lines of each cell, column widths, row heights, all in inches
    def width(line: list[str]) -> float:
        return sum(items[k][1] for k in line) + GAP * (len(line) - 1)

    def height(line: list[str]) -> float:
        return max(items[k][2] for k in line)

    lines = {}
    for cell, keys in cells.items():
        lines[cell] = [[keys[0]]]
        for key in keys[1:]:
            if width([*lines[cell][-1], key]) > CELL_WIDTH:
                lines[cell].append([])
            lines[cell][-1].append(key)
    cell_height = {c: sum(map(height, ls)) + GAP * (len(ls) - 1) for c, ls in lines.items()}
    rows = sorted({row for row, _ in cells} | {n_layers + 1})
    names = {row: add(f"row {row}", row_name(row, n_layers), fontsize=FONT + 1, ha="right") for row in rows}
    columns = [
        max(max(map(width, ls)) for (_, p), ls in lines.items() if p == pos) for pos in range(len(tokens))
    ]
    heights = {row: max([0.2, *(h for (r, _), h in cell_height.items() if r == row)]) for row in rows}
    shown = f"{len(drawn)} of {len(data['nodes']):,} nodes, {len(links)} of {len(data['links']):,} links"
    prompt = meta["prompt"] if len(meta["prompt"]) <= 100 else meta["prompt"][:99] + "…"
    title = add("title", f"{meta['slug']}: {prompt!r}", fontsize=FONT + 2, ha="left", va="top")
    subtitle = add(
        "subtitle",
        f"the most influential {shown}; edge colour: blue +, orange −; width: share of the target's input",
        fontsize=FONT,
        ha="left",
        va="top",
        color="#555555",
    )
    left = MARGIN + max(items[f"row {row}"][1] for row in rows) + COLUMN_GAP
    centres, x = [], left
    for w in columns:
        centres.append(x + w / 2)
        x += w + COLUMN_GAP
    tops, y = {}, MARGIN
    for row in rows:
        y += heights[row]
        tops[row] = y
        y += ROW_GAP
    fig_width = max(x - COLUMN_GAP, MARGIN + max(items["title"][1], items["subtitle"][1])) + MARGIN
    fig_height = y - ROW_GAP + COLUMN_GAP + items["title"][2] + GAP / 2 + items["subtitle"][2] + MARGIN
    fig.set_size_inches(fig_width, fig_height)
    ax.set_xlim(0, fig_width)
    ax.set_ylim(0, fig_height)

    xy = {}  # node id -> (x, y, box height)
    for (row, pos), cell in lines.items():
        # the token row hangs from its top (upright tokens are tall); other cells are centred
        top = tops[row] - (0 if row < 0 else (heights[row] - cell_height[(row, pos)]) / 2)
        for line in cell:
            x = centres[pos] - width(line) / 2
            for key in line:
                text, w, h = items[key]
                text.set_position((x + w / 2, top - h / 2))
                xy[key] = (x + w / 2, top - h / 2, h)
                x += w + GAP
            top -= height(line) + GAP
    for row, text in names.items():
        text.set_position((left - COLUMN_GAP, tops[row] - heights[row] / 2))
    title.set_position((MARGIN, fig_height - MARGIN))
    subtitle.set_position((MARGIN, fig_height - MARGIN - items["title"][2] - GAP / 2))

    # 4. edges, weakest first so that the strong ones are on top
    for link, share in sorted(links, key=lambda e: (e[1], e[0]["source"], e[0]["target"])):
        x0, y0, h0 = xy[link["source"]]
        x1, y1, h1 = xy[link["target"]]
        ax.add_patch(
            PathPatch(
                edge_path((x0, y0 + h0 / 2), (x1, y1 - h1 / 2), side=1.0 if x0 < fig_width / 2 else -1.0),
                fc="none",
                ec=EDGE_COLOURS[link["weight"] > 0],
                lw=0.4 + 3.2 * share,
                alpha=0.75,
                capstyle="round",
                zorder=1,
            )
        )
    return fig


def draw_graph(data: dict, path: Path, **options) -> None:
    """A PNG of a pruned graph JSON, readable without clicking, as the Circuit Tracing
    paper's figures: the most influential nodes with their labels (`clerp`) and the strongest
    edges between them (`graph_figure`, whose keyword `options` it takes). The same data
    gives the same bytes (no software version or time stamp in the file)."""
    fig = graph_figure(data, **options)
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
