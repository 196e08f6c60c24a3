"""`clt serve`: circuit-tracer 0.5.0's graph frontend on our graphs, packed features and
annotations, from one local server (`http.server`, standard library only).

The frontend's files are not ours and not in the repository: `scripts/setup.sh` unpacks the
`frontend/assets/` folder of circuit-tracer's wheel into `.web/circuit-tracer/` and installs the
JavaScript libraries its pages load from CDNs into `.web/node_modules/`. Its pages' CDN
`<script>` tags are rewritten as they are served (`localize_html`), so a browser loads nothing
from outside this server; the d3-jetpack fork the page expects is replaced by our own shim
(`pipeline/web/jetpack-shim.js`).

Routes (GET and HEAD unless marked; any other path is 404, any other method 405):

    /, /index.html, /<file>          the frontend's files, HTML with its CDN tags rewritten
    /vendor/<name>                   d3, dagre, pako (node_modules) and our own scripts
    /data/graph-metadata.json        the graph folder's index (`paths.graphs`)
    /graph_data/<slug>.json          a graph, with its annotations merged into `qParams`
    /feature-data/<name>/<z>.json    feature cantor_unpair(z) of the packed folder (`paths.features`),
                                     the URL the frontend builds from `metadata.scan: ./feature-data/<name>`
    POST /save_graph/<slug>          what the page's Save button posts: `{"qParams": {...}}`

Saving writes `annotations/<slug>.json` (git-tracked, beside params.yaml) and never a DVC
output, so annotations survive `dvc repro`. They name graph nodes by `node_id`
(`{layer}_{feature}_{pos}`, ...), which a re-run keeps. An annotation naming a node the
current graph lacks is stale: it is logged, listed in the served graph's `annotations.stale`
(and counted in the `X-Clt-Stale-Annotations` header, which the page shows), left out of
the page's `qParams`, and kept in the file when the page saves (`merge_annotations`).
"""

from __future__ import annotations

import errno
import gzip
import ipaddress
import json
import logging
import mimetypes
import re
import socket
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pipeline.atomic import write_json
from pipeline.cantor import cantor_unpair
from pipeline.featpack import FeatureReader

if TYPE_CHECKING:
    from pipeline.config import Params

logger = logging.getLogger(__name__)

FRONTEND_DIR = "circuit-tracer"
"""Folder of the web folder holding circuit-tracer's `frontend/assets/` (scripts/setup.sh)."""
OWN_WEB = Path(__file__).with_name("web")
"""Our own static files: the jetpack shim and the page's helper."""
VENDOR = {
    "d3.min.js": "node_modules/d3/dist/d3.min.js",
    "dagre.min.js": "node_modules/dagre/dist/dagre.min.js",
    "pako.min.js": "node_modules/pako/dist/pako.min.js",
}
"""`/vendor/<name>` of each npm file, under the web folder."""
OWN_SCRIPTS = ("jetpack-shim.js", "clt-serve.js")
"""`/vendor/<name>` of each of our own scripts, in `OWN_WEB`."""
_LIB = "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/"
CDN = {
    _LIB + "d3.js": ["/vendor/d3.min.js"],
    _LIB + "jetpack_2024-07-20.js": ["/vendor/jetpack-shim.js", "/vendor/clt-serve.js"],
    "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": ["/vendor/dagre.min.js"],
    "https://unpkg.com/pako@2.1.0/dist/pako.min.js": ["/vendor/pako.min.js"],
    _LIB + "npy_v0.js": [],  # npyjs: only the addition/ pages read .npy files
    _LIB + "hotserver-client-ws.js": [],  # live reload for the frontend's own developers
}
"""What each CDN script of the 0.5.0 pages becomes: local scripts, or nothing. Any other
external script or stylesheet is left out (with a warning)."""
SCAN_PREFIX = "./feature-data/"
MAX_POST_BYTES = 1 << 20
"""Largest body `POST /save_graph/<slug>` accepts."""
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
STALE_HEADER = "X-Clt-Stale-Annotations"
SETUP_HINT = "run `bash scripts/setup.sh` (it fetches circuit-tracer's frontend and d3, dagre and pako)"


class HTTPError(Exception):
    """A request the server refuses: its status and a message for the client."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# --- annotations -----------------------------------------------------------------------


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
    `[feature, label]`; other values as posted. A value of None (not set in the page) is
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
        else:
            out[key] = value
    return out


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
    posts only the labels it holds), the posted label winning. The page never sees stale
    entries (`split_stale`), so they are carried over from `old`: stale `pinnedIds` and
    `hiddenIds`, the `clerps` of absent features, and supernodes none of whose nodes are in
    the graph. Only a stale member of a supernode that still has live ones cannot be kept."""
    merged = {**old, **posted}
    if "clerps" in posted:
        relabelled = {f for f, _ in posted["clerps"]}
        merged["clerps"] = [*(c for c in old.get("clerps", []) if c[0] not in relabelled), *posted["clerps"]]
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


# --- pages -----------------------------------------------------------------------------

_EXTERNAL_TAG = re.compile(
    r"<script\b[^>]*?\bsrc\s*=\s*(['\"])(?P<src>[^'\"]*)\1[^>]*>\s*</script>"
    r"|<link\b[^>]*?\bhref\s*=\s*(['\"])(?P<href>[^'\"]*)\3[^>]*>",
    re.IGNORECASE,
)


def _is_external(url: str) -> bool:
    return url.lower().startswith(("http:", "https:", "//"))


def localize_html(html: str, page: str = "page") -> str:
    """`html` with each external `<script src>` replaced as `CDN` says and any other external
    script or stylesheet left out, so the page loads nothing from outside this server."""

    def replace(m: re.Match) -> str:
        url = m.group("src") or m.group("href") or ""
        if not _is_external(url):
            return m.group(0)
        if m.group("src") is not None and url in CDN:
            return "".join(f"<script src='{local}'></script>" for local in CDN[url])
        logger.warning("%s loads %s, which has no local copy; left out", page, url)
        return f"<!-- clt serve: left out {url} -->"

    return _EXTERNAL_TAG.sub(replace, html)


# --- the site --------------------------------------------------------------------------


@dataclass
class Site:
    """What the server serves: the graph folder, the packed features, the annotations folder
    (created on the first save) and the web folder of scripts/setup.sh."""

    graphs: Path
    features: Path
    annotations: Path
    web: Path
    _reader: tuple[int, FeatureReader] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        missing = [p for p in self.frontend_files() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"the frontend files {', '.join(map(str, missing))} are missing; {SETUP_HINT}"
            )
        if not (self.graphs / "graph-metadata.json").is_file():
            raise FileNotFoundError(
                f"{self.graphs}/graph-metadata.json does not exist; run `dvc repro graphs` to draw the graphs"
            )
        if not (self.features / "index.json.gz").is_file():
            logger.warning(
                "%s has no packed features (`dvc repro pack`): nodes will show no examples", self.features
            )

    @property
    def frontend(self) -> Path:
        return self.web / FRONTEND_DIR

    def frontend_files(self) -> list[Path]:
        return [self.frontend / "index.html", *(self.web / p for p in VENDOR.values())]

    def graph_list(self) -> list[dict]:
        return json.loads((self.graphs / "graph-metadata.json").read_text())["graphs"]

    def feature_reader(self) -> FeatureReader:
        """The packed folder's reader, renewed when `dvc repro` replaces the folder."""
        stamp = (self.features / "index.json.gz").stat().st_mtime_ns
        if self._reader is None or self._reader[0] != stamp:
            self._reader = (stamp, FeatureReader(self.features))
        return self._reader[1]

    def annotation_path(self, slug: str) -> Path:
        return self.annotations / f"{slug}.json"

    def read_annotations(self, slug: str) -> dict:
        """The saved `qParams` of a graph ({} if none)."""
        path = self.annotation_path(slug)
        if not path.is_file():
            return {}
        try:
            return normalize_qparams(json.loads(path.read_text())["qParams"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not an annotations file ({e}); fix or delete it") from None


def site_for(
    params: Params,
    params_path: str | Path,
    *,
    annotations: str | Path | None = None,
    web: str | Path | None = None,
) -> Site:
    """The site of a checkout: `paths.graphs` and `paths.features` (relative ones from the folder
    of `params_path`, as DVC reads them), the annotations folder (default `annotations/` there)
    and the web folder (default `.web/` there, else the one of the checkout this package is in)."""
    root = Path(params_path).resolve().parent
    if web is None:
        web = root / ".web"
        if not web.is_dir() and (OWN_WEB.parents[1] / ".web").is_dir():
            web = OWN_WEB.parents[1] / ".web"
    return Site(
        graphs=root / params.paths.graphs,
        features=root / params.paths.features,
        annotations=Path(annotations) if annotations is not None else root / "annotations",
        web=Path(web),
    )


def _slug(site: Site, name: str) -> str:
    """A slug of the graph folder's index, or 404."""
    slugs = {g["slug"] for g in site.graph_list()}
    if name not in slugs or not (site.graphs / f"{name}.json").is_file():
        raise HTTPError(
            HTTPStatus.NOT_FOUND, f"no graph {name!r} in {site.graphs} (graphs: {', '.join(sorted(slugs))})"
        )
    return name


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


def feature_json(site: Site, scan_name: str, z: str) -> dict:
    """The feature record of graph node feature `z` (cantor(layer, f)), or 404."""
    scans = {g["scan"][len(SCAN_PREFIX) :] for g in site.graph_list() if g["scan"].startswith(SCAN_PREFIX)}
    if scan_name not in scans:
        raise HTTPError(
            HTTPStatus.NOT_FOUND,
            f"no feature scan {scan_name!r} (the graphs' scans: {', '.join(sorted(scans))})",
        )
    if not z.isdigit() or len(z) > 18:
        raise HTTPError(HTTPStatus.NOT_FOUND, f"{z!r} is not a feature id (cantor(layer, feature), digits)")
    layer, index = cantor_unpair(int(z))
    try:
        record = site.feature_reader().layer_feature(layer, index)
    except (KeyError, FileNotFoundError) as e:
        raise HTTPError(
            HTTPStatus.NOT_FOUND, f"feature {z} (layer {layer}, index {index}): {e.args[0]}"
        ) from None
    if record is None:
        raise HTTPError(
            HTTPStatus.NOT_FOUND, f"feature {z} (layer {layer}, index {index}) is dead: no examples"
        )
    return record


# --- HTTP ------------------------------------------------------------------------------


def _segments(raw_path: str) -> list[str]:
    """The decoded segments of a request path; 400 for anything that could leave a folder
    (`..`, `.`, empty segments, backslashes, NUL), however it is encoded."""
    absolute_form = raw_path.lower().startswith(("http://", "https://"))
    path = urlsplit(raw_path).path if absolute_form else raw_path.split("?", 1)[0].split("#", 1)[0]
    decoded = unquote(path)
    if not decoded.startswith("/") or "\\" in decoded or "\x00" in decoded:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"bad path {raw_path!r}")
    parts = decoded[1:].split("/")
    if parts == [""]:
        return []
    if any(p in ("", ".", "..") or ":" in p for p in parts):
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"bad path {raw_path!r}: no empty, '.', '..' or ':' segments")
    return parts


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host.lower() in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    """Routes a request to the site (`self.server.site`); every refusal is an `HTTPError`."""

    server: Server
    server_version = "clt-serve"
    protocol_version = "HTTP/1.1"  # keep-alive: the page loads ~30 files
    timeout = 30  # seconds a client may take to send its request

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_OPTIONS(self):
        self._handle("OPTIONS")

    def do_TRACE(self):
        self._handle("TRACE")

    def log_message(self, format, *args):
        logger.debug("%s %s", self.address_string(), format % args)

    def _handle(self, method: str) -> None:
        try:
            self._check_host()
            parts = _segments(self.path)
            allowed, respond = self._route(parts)
            if method not in allowed:
                raise HTTPError(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    f"{method} is not allowed here",
                    {"Allow": ", ".join(allowed)},
                )
            respond(method)
        except HTTPError as e:
            logger.warning("%s %s: %d %s", method, self.path, e.status, e.message)
            if method == "POST":  # an unread body must not be parsed as the next request
                self.close_connection = True
            self._send_json(e.status, {"error": e.message}, method, e.headers)
        except Exception as e:  # a bug, or a broken file: say so, keep serving
            logger.exception("%s %s failed", method, self.path)
            self.close_connection = True
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"}, method)

    def _check_host(self) -> None:
        """On a loopback address, only requests for a local host name (no DNS rebinding), and
        POSTs from no other origin."""
        if not self.server.loopback:
            return
        host = _host_name(self.headers.get("Host", "localhost"))
        if host not in self.server.local_hosts:
            raise HTTPError(HTTPStatus.FORBIDDEN, f"Host {host!r} is not this server")
        origin = self.headers.get("Origin")
        if origin and _host_name(urlsplit(origin).netloc) not in self.server.local_hosts:
            raise HTTPError(HTTPStatus.FORBIDDEN, f"requests from {origin} are not allowed")

    def _route(self, parts: list[str]):
        """(allowed methods, responder) of a path; 404 for an unknown one."""
        site = self.server.site
        get = ("GET", "HEAD")
        match parts:
            case [] | ["index.html"]:
                return get, lambda m: self._send_page(site.frontend / "index.html", m)
            case ["favicon.ico"]:  # there is none; saying so keeps the page's console clean
                return get, lambda m: self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon", m)
            case ["vendor", name] if name in VENDOR:
                return get, lambda m: self._send_file(site.web / VENDOR[name], m)
            case ["vendor", name] if name in OWN_SCRIPTS:
                return get, lambda m: self._send_file(OWN_WEB / name, m)
            case ["data", "graph-metadata.json"]:
                return get, lambda m: self._send_file(site.graphs / "graph-metadata.json", m)
            case ["graph_data", name] if name.endswith(".json"):
                return get, lambda m: self._send_graph(_slug(site, name.removesuffix(".json")), m)
            case ["feature-data", scan_name, name] if name.endswith(".json"):
                return get, lambda m: self._send_json(200, feature_json(site, scan_name, name[:-5]), m)
            case ["save_graph", slug]:
                return ("POST",), lambda m: self._save(_slug(site, slug))
        path = site.frontend.joinpath(*parts)
        if parts[0] != "vendor" and path.resolve().is_relative_to(site.frontend.resolve()) and path.is_file():
            if path.suffix == ".html":
                return get, lambda m: self._send_page(path, m)
            return get, lambda m: self._send_file(path, m)
        raise HTTPError(HTTPStatus.NOT_FOUND, f"nothing at {'/' + '/'.join(parts)}")

    # responses

    def _send(self, status: int, body: bytes, content_type: str, method: str, headers=None) -> None:
        if len(body) > 1024 and "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=5, mtime=0)
            headers = {**(headers or {}), "Content-Encoding": "gzip"}
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # graphs and annotations change under the page
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, data, method: str, headers=None) -> None:
        body = json.dumps(data, ensure_ascii=False).encode()
        self._send(status, body, "application/json; charset=utf-8", method, headers)

    def _send_file(self, path: Path, method: str) -> None:
        if not path.is_file():
            raise HTTPError(HTTPStatus.NOT_FOUND, f"{path} is missing; {SETUP_HINT}")
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith(("javascript", "json")):
            content_type += "; charset=utf-8"
        self._send(200, path.read_bytes(), content_type, method)

    def _send_page(self, path: Path, method: str) -> None:
        html = localize_html(path.read_text(encoding="utf-8"), path.name)
        self._send(200, html.encode(), "text/html; charset=utf-8", method)

    def _send_graph(self, slug: str, method: str) -> None:
        graph, stale = graph_with_annotations(self.server.site, slug)
        self._send_json(200, graph, method, {STALE_HEADER: str(len(stale))})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if not length.strip().isdigit():
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}")
        if int(length) > MAX_POST_BYTES:
            self._discard(int(length))
            raise HTTPError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body is {int(length)} bytes; the limit is {MAX_POST_BYTES}",
            )
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise HTTPError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"the body must be application/json, not {content_type!r}"
            )
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of {length} bytes")
        return body

    def _discard(self, n_bytes: int) -> None:
        """Read and drop a refused body (up to 16 MB; past that the connection is just closed),
        so that the client, still sending, gets the answer rather than a reset connection."""
        if n_bytes <= 16 * MAX_POST_BYTES:
            while n_bytes > 0 and (chunk := self.rfile.read(min(n_bytes, 1 << 16))):
                n_bytes -= len(chunk)

    def _save(self, slug: str) -> None:
        """`POST /save_graph/<slug>`: the posted `qParams`, normalized and merged with the saved
        ones (`merge_annotations`), to `annotations/<slug>.json`; nothing is written on an error."""
        site = self.server.site
        try:
            data = json.loads(self._read_body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("qParams"), dict):
            raise HTTPError(HTTPStatus.BAD_REQUEST, 'the body must be a JSON object {"qParams": {...}}')
        try:
            posted = normalize_qparams(data["qParams"])
        except ValueError as e:
            raise HTTPError(HTTPStatus.BAD_REQUEST, str(e)) from None
        graph = json.loads((site.graphs / f"{slug}.json").read_text())
        path = site.annotation_path(slug)
        with self.server.save_lock:
            merged, lost = merge_annotations(site.read_annotations(slug), posted, graph)
            site.annotations.mkdir(parents=True, exist_ok=True)
            write_json(path, {"slug": slug, "qParams": dict(sorted(merged.items()))})
        _, stale = split_stale(merged, graph)
        if lost:
            logger.warning("saving %s dropped stale supernode members: %s", path, lost)
        logger.info("saved %s (%d stale entries kept)", path, len(stale))
        self._send_json(200, {"saved": str(path), "stale": stale, "dropped": lost}, "POST")


class Server(ThreadingHTTPServer):
    """A threading HTTP server for one `Site`."""

    daemon_threads = True  # Ctrl-C does not wait for open connections

    def __init__(self, site: Site, host: str = "127.0.0.1", port: int = 8032):
        self.site = site
        self.loopback = is_loopback(host)
        self.local_hosts = LOCAL_HOSTS | {host.lower()}
        self.save_lock = threading.Lock()
        if ":" in host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise OSError(
                f"port {port} of {host} is in use (another `clt serve`?); pick another with --port"
            ) from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/index.html"
