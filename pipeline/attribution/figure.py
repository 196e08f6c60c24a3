"""PNG pictures of pruned graphs, drawn from the graph JSON alone (`draw_graph`), like the
Circuit Tracing paper's figures: the ~36 most influential nodes with their labels (a
feature's `clerp`, see `pipeline/labels.py`), layers bottom to top, positions left to right,
and each node's strongest incoming edges among them; texts are measured before they are
placed, so none overlap (`graph_figure`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.labels import quote

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


class Sheet:
    """A figure of `DPI` whose axes fill it, with data coordinates to be set to inches from
    its lower left corner, and its texts, each measured by the renderer as it is added
    (`items`: key -> (text, width, height), inches, the box's padding included)."""

    def __init__(self):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.fig = Figure(dpi=DPI)
        FigureCanvasAgg(self.fig)
        self.renderer = self.fig.canvas.get_renderer()
        self.ax = self.fig.add_axes((0, 0, 1, 1))
        self.ax.set_axis_off()
        self.items: dict[str, tuple] = {}

    def add(self, key: str, text: str, **style):
        """Add `text` under `key`, centred on its position unless `style` says otherwise."""
        t = self.ax.text(0, 0, text, **{"ha": "center", "va": "center", **style})
        extent = t.get_window_extent(self.renderer)
        pad = 2 * PAD * t.get_fontsize() / 72 if t.get_bbox_patch() else 0.0
        self.items[key] = (t, extent.width / DPI + pad, extent.height / DPI + pad)
        return t

    def width(self, line: list[str]) -> float:
        """Inches: the texts `line` side by side, `GAP` apart."""
        return sum(self.items[k][1] for k in line) + GAP * (len(line) - 1)

    def height(self, line: list[str]) -> float:
        return max(self.items[k][2] for k in line)


def add_nodes(sheet: Sheet, drawn: list[dict], tokens: list[str]) -> dict[tuple[int, int], list[str]]:
    """Add a box per node (its `node_text`) and a label per prompt token that is not drawn
    as a node (upright at a position without drawn nodes, to save width); return the keys
    of each (row, position) cell, row -1 being the tokens'."""
    cells: dict[tuple[int, int], list[str]] = {}
    for node in drawn:
        face, edge = COLOURS[node["feature_type"]]
        box = dict(boxstyle=f"round,pad={PAD}", fc=face, ec=edge, lw=0.6)
        sheet.add(
            node["node_id"], node_text(node, tokens), fontsize=FONT, zorder=3, gid=node["node_id"], bbox=box
        )
        row = -1 if node["layer"] == "E" else int(node["layer"])
        cells.setdefault((row, node["ctx_idx"]), []).append(node["node_id"])
    used = {pos for _, pos in cells}
    for pos, token in enumerate(tokens):
        if (-1, pos) not in cells:
            rotation = 0 if pos in used else 90
            sheet.add(f"token {pos}", quote(token), fontsize=FONT + 1, color="#555555", rotation=rotation)
            cells[(-1, pos)] = [f"token {pos}"]
    return cells


def cell_lines(sheet: Sheet, keys: list[str]) -> list[list[str]]:
    """The texts `keys` of one cell in lines, side by side up to `CELL_WIDTH`."""
    lines = [[keys[0]]]
    for key in keys[1:]:
        if sheet.width([*lines[-1], key]) > CELL_WIDTH:
            lines.append([])
        lines[-1].append(key)
    return lines


def add_titles(sheet: Sheet, data: dict, n_drawn: int, n_links: int) -> None:
    """Add the title (slug and prompt) and the subtitle (what is shown, the edges' key)."""
    meta = data["metadata"]
    shown = f"{n_drawn} of {len(data['nodes']):,} nodes, {n_links} of {len(data['links']):,} links"
    prompt = meta["prompt"] if len(meta["prompt"]) <= 100 else meta["prompt"][:99] + "…"
    sheet.add("title", f"{meta['slug']}: {prompt!r}", fontsize=FONT + 2, ha="left", va="top")
    sheet.add(
        "subtitle",
        f"the most influential {shown}; edge colour: blue +, orange −; width: share of the target's input",
        fontsize=FONT,
        ha="left",
        va="top",
        color="#555555",
    )


@dataclass(frozen=True)
class Grid:
    """Where rows and columns go, in inches."""

    left: float
    """The left edge of the first column (the row names end `COLUMN_GAP` before it)."""
    centres: list[float]
    """By position: its column's centre."""
    tops: dict[int, float]
    """By row: its top."""
    heights: dict[int, float]
    """By row: its height, its tallest cell's (0.2 at least)."""
    cell_height: dict[tuple[int, int], float]
    size: tuple[float, float]
    """The figure's width and height."""


def measure_grid(
    sheet: Sheet, lines: dict[tuple[int, int], list[list[str]]], rows: list[int], n_pos: int
) -> Grid:
    """Columns (one per position, `n_pos`) as wide as their widest cell, left to right,
    and rows as tall as their tallest cell, bottom to top; the figure around them, with
    the row names on the left and the titles on top."""
    cell_height = {c: sum(map(sheet.height, ls)) + GAP * (len(ls) - 1) for c, ls in lines.items()}
    columns = [
        max(max(map(sheet.width, ls)) for (_, p), ls in lines.items() if p == pos) for pos in range(n_pos)
    ]
    heights = {row: max([0.2, *(h for (r, _), h in cell_height.items() if r == row)]) for row in rows}
    left = MARGIN + max(sheet.items[f"row {row}"][1] for row in rows) + COLUMN_GAP
    centres, x = [], left
    for w in columns:
        centres.append(x + w / 2)
        x += w + COLUMN_GAP
    tops, y = {}, MARGIN
    for row in rows:
        y += heights[row]
        tops[row] = y
        y += ROW_GAP
    _, title_width, title_height = sheet.items["title"]
    _, subtitle_width, subtitle_height = sheet.items["subtitle"]
    width = max(x - COLUMN_GAP, MARGIN + max(title_width, subtitle_width)) + MARGIN
    height = y - ROW_GAP + COLUMN_GAP + title_height + GAP / 2 + subtitle_height + MARGIN
    return Grid(left, centres, tops, heights, cell_height, (width, height))


def place_texts(sheet: Sheet, lines: dict[tuple[int, int], list[list[str]]], grid: Grid) -> dict[str, tuple]:
    """Size the figure and move every text to its place; return node id -> (x, y, box
    height) of the boxes' centres."""
    fig_width, fig_height = grid.size
    sheet.fig.set_size_inches(fig_width, fig_height)
    sheet.ax.set_xlim(0, fig_width)
    sheet.ax.set_ylim(0, fig_height)
    xy = {}
    for (row, pos), cell in lines.items():
        # the token row hangs from its top (upright tokens are tall); other cells are centred
        top = grid.tops[row] - (0 if row < 0 else (grid.heights[row] - grid.cell_height[(row, pos)]) / 2)
        for line in cell:
            x = grid.centres[pos] - sheet.width(line) / 2
            for key in line:
                text, w, h = sheet.items[key]
                text.set_position((x + w / 2, top - h / 2))
                xy[key] = (x + w / 2, top - h / 2, h)
                x += w + GAP
            top -= sheet.height(line) + GAP
    for row in grid.tops:
        sheet.items[f"row {row}"][0].set_position(
            (grid.left - COLUMN_GAP, grid.tops[row] - grid.heights[row] / 2)
        )
    sheet.items["title"][0].set_position((MARGIN, fig_height - MARGIN))
    sheet.items["subtitle"][0].set_position((MARGIN, fig_height - MARGIN - sheet.items["title"][2] - GAP / 2))
    return xy


def draw_edges(sheet: Sheet, links: list[tuple[dict, float]], xy: dict[str, tuple], *, middle: float) -> None:
    """Draw `links` between the boxes at `xy` (`place_texts`), behind them, weakest first so
    that the strong ones are on top (`edge_path`, bowing towards `middle`, the figure's
    middle in inches); colour by sign, width by share of the target's input."""
    from matplotlib.patches import PathPatch

    for link, share in sorted(links, key=lambda e: (e[1], e[0]["source"], e[0]["target"])):
        x0, y0, h0 = xy[link["source"]]
        x1, y1, h1 = xy[link["target"]]
        sheet.ax.add_patch(
            PathPatch(
                edge_path((x0, y0 + h0 / 2), (x1, y1 - h1 / 2), side=1.0 if x0 < middle else -1.0),
                fc="none",
                ec=EDGE_COLOURS[link["weight"] > 0],
                lw=0.4 + 3.2 * share,
                alpha=0.75,
                capstyle="round",
                zorder=1,
            )
        )


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
    corner, `Sheet`), so no two texts overlap:

    1. `select_nodes` and `select_links`;
    2. `add_nodes`: one box per node (its `node_text`), measured; the prompt's tokens along
       the bottom row, a token drawn as a node being its own label (a token at a position
       without drawn nodes is written upright to save width); then the row names and
       `add_titles`;
    3. `measure_grid`: rows: the tokens at the bottom, then each layer that has a drawn
       node, the logits on top; columns: one per position, as wide as its widest cell; the
       nodes of a cell side by side (most influential first), on more lines when wider
       than `CELL_WIDTH` (`cell_lines`); `place_texts` puts them there;
    4. `draw_edges`: from the top of the source's box to the bottom of the target's, behind
       the boxes (`edge_path`, bowing towards the middle of the figure); colour by sign,
       width by share of the target's input (`select_links`).
    """
    drawn = select_nodes(
        data, max_nodes=max_nodes, max_logits=max_logits, max_tokens=max_tokens, max_errors=max_errors
    )
    links = select_links(data, {n["node_id"] for n in drawn}, fraction=edge_fraction, max_in=max_in_edges)
    n_layers = max(int(n["layer"]) for n in data["nodes"] if n["layer"] != "E") - 1
    tokens = data["metadata"]["prompt_tokens"]
    sheet = Sheet()
    cells = add_nodes(sheet, drawn, tokens)
    lines = {cell: cell_lines(sheet, keys) for cell, keys in cells.items()}
    rows = sorted({row for row, _ in cells} | {n_layers + 1})
    for row in rows:
        sheet.add(f"row {row}", row_name(row, n_layers), fontsize=FONT + 1, ha="right")
    add_titles(sheet, data, len(drawn), len(links))
    grid = measure_grid(sheet, lines, rows, len(tokens))
    xy = place_texts(sheet, lines, grid)
    draw_edges(sheet, links, xy, middle=grid.size[0] / 2)
    return sheet.fig


def draw_graph(data: dict, path: Path, **options) -> None:
    """A PNG of a pruned graph JSON, readable without clicking, as the Circuit Tracing
    paper's figures: the most influential nodes with their labels (`clerp`) and the strongest
    edges between them (`graph_figure`, whose keyword `options` it takes). The same data
    gives the same bytes (no software version or time stamp in the file)."""
    fig = graph_figure(data, **options)
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
