"""The HTTP side of `clt serve`: the routes of a request path (`Handler._route`), what a request
must pass first (a path that cannot leave a folder, a local `Host` and `Origin` on a loopback
address, a bounded JSON body for a save), and the responses. Every refusal is an `HTTPError`,
answered as `{"error": message}`; the routes are listed in `pipeline/serve/__init__.py`."""

from __future__ import annotations

import gzip
import json
import logging
import mimetypes
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from pipeline.atomic import write_json
from pipeline.cantor import cantor_unpair
from pipeline.serve.annotations import (
    graph_with_annotations,
    merge_annotations,
    normalize_qparams,
    split_stale,
)
from pipeline.serve.page import localize_html
from pipeline.serve.site import OWN_SCRIPTS, OWN_WEB, SETUP_HINT, VENDOR, Site

if TYPE_CHECKING:
    from pipeline.serve.server import Server

logger = logging.getLogger(__name__)

SCAN_PREFIX = "./feature-data/"
MAX_POST_BYTES = 1 << 20
"""Largest body `POST /save_graph/<slug>` accepts."""
STALE_HEADER = "X-Clt-Stale-Annotations"


class HTTPError(Exception):
    """A request the server refuses: its status and a message for the client."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _slug(site: Site, name: str) -> str:
    """A slug of the graph folder's index, or 404."""
    slugs = {g["slug"] for g in site.graph_list()}
    if name not in slugs or not (site.graphs / f"{name}.json").is_file():
        raise HTTPError(
            HTTPStatus.NOT_FOUND, f"no graph {name!r} in {site.graphs} (graphs: {', '.join(sorted(slugs))})"
        )
    return name


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
