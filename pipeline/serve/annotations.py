"""The annotations of a graph, as the page posts them and as `annotations/<slug>.json` keeps
them: normalized (`normalize_qparams`), split into what the current graph still has and what
is stale (`split_stale`), merged on save (`merge_annotations`) and into a served graph
(`graph_with_annotations`)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.serve.site import Site

logger = logging.getLogger(__name__)


def _id_list(key: str, value) -> list[str]:
    """`pinnedIds` as the page posts it ("a,b") or as a list."""
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError(f"`qParams.{key}` must be a comma-separated string or a list of node ids")


def _json_list(key: str, value) -> list:
    """A list the page posts as a JSON string (`supernodes`, `clerps`)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value else []
        except json.JSONDecodeError as e:
            raise ValueError(f"`qParams.{key}` is not valid JSON: {e}") from None
    if not isinstance(value, list):
        raise ValueError(f"`qParams.{key}` must be a list, got {type(value).__name__}")
    return value


def normalize_qparams(q: dict) -> dict:
    """The page's `qParams` (URL-style strings) as the annotation file keeps them: `pinnedIds`
    a list of node ids, `supernodes` a list of `[label, node_id, ...]`, `clerps` a list of
    `[feature, label]`, `suggestions` a `{id: "accepted" | "rejected"}` dict; other values as
    posted. A value of None (not set in the page) is
    dropped. Raises ValueError for a malformed value."""
    out: dict[str, Any] = {}
    for key, value in q.items():
        if value is None:
            continue
        if key in ("pinnedIds", "hiddenIds"):
            out[key] = _id_list(key, value)
        elif key == "supernodes":
            supernodes = _json_list(key, value)
            if not all(isinstance(s, list) and s and all(isinstance(v, str) for v in s) for s in supernodes):
                raise ValueError("`qParams.supernodes` must be a list of [label, node_id, ...] lists")
            out[key] = supernodes
        elif key == "clerps":
            clerps = _json_list(key, value)
            if not all(
                isinstance(c, list) and len(c) == 2 and isinstance(c[0], (str, int)) and isinstance(c[1], str)
                for c in clerps
            ):
                raise ValueError("`qParams.clerps` must be a list of [feature, label] pairs")
            out[key] = [[str(f), label] for f, label in clerps]
        elif key == "suggestions":
            out[key] = _suggestions(value)
        else:
            out[key] = value
    return out


SUGGESTION_STATES = ("accepted", "rejected")


def _suggestions(value) -> dict[str, str]:
    """`suggestions`, the user's decision on each suggested supernode (`pipeline/supernodes.py`):
    `{id: "accepted" | "rejected"}`, posted as such or as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"`qParams.suggestions` is not valid JSON: {e}") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and v in SUGGESTION_STATES for k, v in value.items()
    ):
        raise ValueError('`qParams.suggestions` must map suggestion ids to "accepted" or "rejected"')
    return dict(sorted(value.items()))


def _graph_ids(graph: dict) -> tuple[set[str], set[str]]:
    """The node ids of a graph, and the `feature` of its transcoder features (what `clerps` name)."""
    nodes = graph.get("nodes", [])
    features = {str(n["feature"]) for n in nodes if n.get("feature_type") == "cross layer transcoder"}
    return {n["node_id"] for n in nodes}, features


def split_stale(q: dict, graph: dict) -> tuple[dict, list[dict]]:
    """(`q` without what names a node or feature `graph` lacks, the stale entries). An entry is
    `{"field", "id"}`, with the supernode's `label` or the feature's `label` where it has one."""
    node_ids, features = _graph_ids(graph)
    live, stale = dict(q), []
    for key in ("pinnedIds", "hiddenIds"):
        if key in q:
            live[key] = [i for i in q[key] if i in node_ids]
            stale += [{"field": key, "id": i} for i in q[key] if i not in node_ids]
    if "supernodes" in q:
        live["supernodes"] = []
        for label, *members in q["supernodes"]:
            stale += [{"field": "supernodes", "id": i, "label": label} for i in members if i not in node_ids]
            kept = [i for i in members if i in node_ids]
            if kept:
                live["supernodes"].append([label, *kept])
    if "clerps" in q:
        live["clerps"] = [c for c in q["clerps"] if c[0] in features]
        stale += [
            {"field": "clerps", "id": f, "label": label} for f, label in q["clerps"] if f not in features
        ]
    clicked = q.get("clickedId")
    if clicked and clicked not in node_ids and not clicked.startswith("supernode-"):
        live.pop("clickedId")
        stale.append({"field": "clickedId", "id": clicked})
    return live, stale


def merge_annotations(old: dict, posted: dict, graph: dict) -> tuple[dict, list[dict]]:
    """The annotations to save when the page posts `posted` over the saved `old` (both
    normalized), and the stale entries of `old` that could not be kept.

    A key the page did not set keeps its old value. `clerps` are merged by feature (the page
    posts only the labels it holds), the posted label winning; `suggestions` by id, so the
    decisions on suggestions a re-run no longer makes are kept. The page never sees stale
    entries (`split_stale`), so they are carried over from `old`: stale `pinnedIds` and
    `hiddenIds`, the `clerps` of absent features, and supernodes none of whose nodes are in
    the graph. Only a stale member of a supernode that still has live ones cannot be kept."""
    merged = {**old, **posted}
    if "clerps" in posted:
        relabelled = {f for f, _ in posted["clerps"]}
        merged["clerps"] = [*(c for c in old.get("clerps", []) if c[0] not in relabelled), *posted["clerps"]]
    if "suggestions" in posted:
        merged["suggestions"] = dict(sorted({**old.get("suggestions", {}), **posted["suggestions"]}.items()))
    _, old_stale = split_stale(old, graph)
    node_ids, _ = _graph_ids(graph)
    lost = []
    for key in ("pinnedIds", "hiddenIds"):
        if key in posted:
            carried = [e["id"] for e in old_stale if e["field"] == key and e["id"] not in posted[key]]
            merged[key] = [*posted[key], *carried]
    if "supernodes" in posted:
        for supernode in old.get("supernodes", []):
            if not any(i in node_ids for i in supernode[1:]):
                if supernode not in merged["supernodes"]:
                    merged["supernodes"] = [*merged["supernodes"], supernode]
            else:
                lost += [
                    {"field": "supernodes", "id": i, "label": supernode[0]}
                    for i in supernode[1:]
                    if i not in node_ids
                ]
    return merged, lost


def to_frontend(q: dict) -> dict:
    """Annotations as the page reads `qParams` (`clerps` is a JSON string it parses)."""
    out = dict(q)
    if "clerps" in out:
        out["clerps"] = json.dumps(out["clerps"], ensure_ascii=False)
    return out


def graph_with_annotations(site: Site, slug: str) -> tuple[dict, list[dict]]:
    """The graph `slug` with its saved annotations merged into `qParams` and listed, with
    the stale ones, under `annotations`; and the stale entries."""
    graph = json.loads((site.graphs / f"{slug}.json").read_text())
    saved = site.read_annotations(slug)
    if not saved:
        return graph, []
    live, stale = split_stale(saved, graph)
    graph["qParams"] = {**graph.get("qParams", {}), **to_frontend(live)}
    graph["annotations"] = {"file": str(site.annotation_path(slug)), "stale": stale}
    if stale:
        logger.warning(
            "%s names %d node(s) that graph %s no longer has (kept in the file, not shown): %s",
            site.annotation_path(slug),
            len(stale),
            slug,
            ", ".join(f"{e['field']} {e['id']}" for e in stale),
        )
    return graph, stale
