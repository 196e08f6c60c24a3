"""`clt serve` (pipeline/serve/): every route, the annotations, and what it refuses, against a
real server on a free port of 127.0.0.1.

The site is built here (`make_site`): a graph folder, a packed features folder written with
`pipeline.featpack.encode_record`, and a web folder standing in for the one scripts/setup.sh
fetches (an index.html with the 0.5.0 page's CDN tags, and dummy npm files), so these tests
need neither the network nor `dvc repro`. tests/test_browser.py runs the real frontend.
"""

from __future__ import annotations

import gzip
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.cantor import cantor
from pipeline.featpack import encode_record
from pipeline.serve import (
    CDN,
    MAX_POST_BYTES,
    OWN_WEB,
    STALE_HEADER,
    VENDOR,
    Server,
    Site,
    localize_html,
    merge_annotations,
    normalize_qparams,
    split_stale,
)

ROOT = Path(__file__).resolve().parents[1]
SCAN = "./feature-data/tiny"
INDEX_HTML = (
    "<!DOCTYPE html>\n<link rel='stylesheet' href='./style.css'>\n"
    + "".join(f"<script src='{url}'></script>\n" for url in CDN)
    + "<script src='https://cdn.example.com/other.js'></script>\n"
    + "<link rel='stylesheet' href='https://fonts.example.com/font.css'>\n"
    + "<script src='./util.js'></script>\n<div class='cg'></div>\n"
)
"""A page like the 0.5.0 index.html: its CDN scripts, one unknown script and one stylesheet."""


def record(layer: int, f: int) -> dict:
    return {"index": f, "top_logits": [f" L{layer}F{f}"], "bottom_logits": [], "examples_quantiles": []}


def graph(slug: str) -> dict:
    """A graph in circuit-tracer's format: a token, two features, an error and a logit."""
    nodes = [
        {"node_id": "E_5_0", "feature": 0, "layer": "E", "feature_type": "embedding"},
        {"node_id": "0_1_1", "feature": cantor(0, 1), "layer": "0", "feature_type": "cross layer transcoder"},
        {"node_id": "1_2_1", "feature": cantor(1, 2), "layer": "1", "feature_type": "cross layer transcoder"},
        {"node_id": "0_0_1", "feature": -1, "layer": "0", "feature_type": "mlp reconstruction error"},
        {"node_id": "3_7_1", "feature": 7, "layer": "3", "feature_type": "logit"},
    ]
    return {
        "metadata": {"slug": slug, "scan": SCAN, "prompt_tokens": ["<bos>", "x"], "schema_version": 1},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": [{"source": "0_1_1", "target": "3_7_1", "weight": 0.5}],
    }


def make_site(tmp: Path, *, node_modules: Path | None = None, index_html: str = INDEX_HTML) -> Site:
    """Graphs `g1` and `g2`; packed features of 2 layers x 3 (layer 1's feature 0 dead);
    annotations in `tmp/annotations`; a web folder with `index_html` and `node_modules`
    (default: dummy npm files)."""
    graphs, features, web = tmp / "graphs", tmp / "features", tmp / "web"
    for folder in (graphs, features, web / "circuit-tracer"):
        folder.mkdir(parents=True)
    for slug in ("g1", "g2"):
        (graphs / f"{slug}.json").write_text(json.dumps(graph(slug)))
    (graphs / "graph-metadata.json").write_text(
        json.dumps({"graphs": [graph(s)["metadata"] for s in ("g1", "g2")]})
    )
    index = {}
    for layer in (0, 1):
        offsets, data = [0], b""
        for f in range(3):
            if (layer, f) != (1, 0):
                data += encode_record(record(layer, f), 6)
            offsets.append(len(data))
        (features / f"layer_{layer}.bin").write_bytes(data)
        index[str(layer)] = {"filename": f"layer_{layer}.bin", "offsets": offsets}
    (features / "index.json.gz").write_bytes(gzip.compress(json.dumps(index).encode()))
    (web / "circuit-tracer" / "index.html").write_text(index_html)
    (web / "circuit-tracer" / "util.js").write_text("window.util = {}\n")
    (web / "circuit-tracer" / "sub").mkdir()
    (web / "circuit-tracer" / "sub" / "page.html").write_text(INDEX_HTML)
    if node_modules is None:
        for name, path in VENDOR.items():
            (web / path).parent.mkdir(parents=True, exist_ok=True)
            (web / path).write_text(f"/* {name} */\n")
    else:
        (web / "node_modules").symlink_to(node_modules)
    (tmp / "secret.txt").write_text("SECRET")
    return Site(graphs=graphs, features=features, annotations=tmp / "annotations", web=web)


def start(site: Site) -> Server:
    server = Server(site, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture
def site(tmp_path):
    return make_site(tmp_path)


@pytest.fixture
def server(site):
    server = start(site)
    yield server
    server.shutdown()
    server.server_close()


def base(server: Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def fetch(server: Server, path: str, *, method: str = "GET", data=None, headers=None):
    """(status, headers, body) of a request with urllib (which sends the path as given)."""
    headers = {"Content-Type": "application/json", **(headers or {})} if data is not None else headers or {}
    request = urllib.request.Request(base(server) + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def raw(server: Server, method: str, path: str, *, body: bytes | None = None, headers=None):
    """(status, headers, body) of a request sent verbatim (http.client: no path clean-up)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
    for key, value in (headers or {}).items():
        conn.putheader(key, value)
    conn.endheaders(body)
    response = conn.getresponse()
    out = response.status, response.headers, response.read()
    conn.close()
    return out


def save(server: Server, slug: str, q: dict):
    return fetch(server, f"/save_graph/{slug}", method="POST", data=json.dumps({"qParams": q}).encode())


def error_of(body: bytes) -> str:
    return json.loads(body)["error"]


# --- routes ----------------------------------------------------------------------------


def test_index_loads_only_local_scripts(server):
    for path in ("/", "/index.html", "/sub/page.html"):
        status, headers, body = fetch(server, path)
        html = body.decode()
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        for local in (
            "/vendor/d3.min.js",
            "/vendor/jetpack-shim.js",
            "/vendor/dagre.min.js",
            "/vendor/pako.min.js",
        ):
            assert f"<script src='{local}'>" in html
        assert html.index("d3.min.js") < html.index("jetpack-shim.js") < html.index("./util.js")
        assert "src='http" not in html and "href='http" not in html
        assert "left out https://cdn.example.com/other.js" in html
    status, headers, body = fetch(server, "/index.html", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_vendor_and_static_files(server, site):
    for name in VENDOR:
        status, _, body = fetch(server, f"/vendor/{name}")
        assert status == 200 and body.decode() == f"/* {name} */\n"
    status, headers, body = fetch(server, "/vendor/jetpack-shim.js")
    assert status == 200 and body == (OWN_WEB / "jetpack-shim.js").read_bytes()
    assert "javascript" in headers["Content-Type"]
    assert fetch(server, "/util.js")[2] == b"window.util = {}\n"
    assert fetch(server, "/favicon.ico")[0] == 204
    for path in ("/vendor/other.js", "/missing.js", "/sub", "/vendor/node_modules/d3/dist/d3.min.js"):
        status, _, body = fetch(server, path)
        assert status == 404, path
        assert error_of(body)


def test_large_responses_are_gzipped_on_request(server):
    status, headers, body = raw(server, "GET", "/vendor/jetpack-shim.js", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == (OWN_WEB / "jetpack-shim.js").read_bytes()
    assert "Content-Encoding" not in raw(server, "GET", "/vendor/jetpack-shim.js")[1]


def test_graphs_and_metadata(server, site):
    status, _, body = fetch(server, "/data/graph-metadata.json")
    assert status == 200 and [g["slug"] for g in json.loads(body)["graphs"]] == ["g1", "g2"]
    status, headers, body = fetch(server, "/graph_data/g1.json")
    assert status == 200 and json.loads(body) == graph("g1")
    assert headers[STALE_HEADER] == "0" and headers["Cache-Control"] == "no-store"
    status, _, body = fetch(server, "/graph_data/nope.json")
    assert status == 404 and "no graph 'nope'" in error_of(body) and "g1, g2" in error_of(body)
    assert fetch(server, "/graph_data/g1")[0] == 404


def test_features_by_cantor_id(server):
    for layer, f in [(0, 0), (0, 2), (1, 2)]:
        status, headers, body = fetch(server, f"/feature-data/tiny/{cantor(layer, f)}.json")
        assert status == 200 and json.loads(body) == record(layer, f)
        assert headers["Content-Type"].startswith("application/json")
    cases = {
        f"/feature-data/tiny/{cantor(1, 0)}.json": "is dead",
        f"/feature-data/tiny/{cantor(0, 3)}.json": "has 3 features",
        f"/feature-data/tiny/{cantor(5, 0)}.json": "layer 5 is not in",
        "/feature-data/other/1.json": "no feature scan 'other'",
        "/feature-data/tiny/-1.json": "is not a feature id",
        "/feature-data/tiny/1e3.json": "is not a feature id",
        "/feature-data/tiny/1.bin": "nothing at",
    }
    for path, message in cases.items():
        status, _, body = fetch(server, path)
        assert status == 404 and message in error_of(body), (path, body)


# --- annotations -----------------------------------------------------------------------


def test_save_writes_annotations_and_serving_merges_them(server, site):
    q = {
        "pinnedIds": "0_1_1,3_7_1",
        "supernodes": json.dumps([["say x", "0_1_1", "1_2_1"]]),
        "clerps": json.dumps([[str(cantor(0, 1)), "a label"]]),
        "clickedId": "0_1_1",
        "linkType": None,
        "pruningThreshold": "0.5",
    }
    status, _, body = save(server, "g1", q)
    assert status == 200 and json.loads(body)["stale"] == []
    saved = json.loads((site.annotations / "g1.json").read_text())
    assert saved == {
        "slug": "g1",
        "qParams": {
            "clerps": [[str(cantor(0, 1)), "a label"]],
            "clickedId": "0_1_1",
            "pinnedIds": ["0_1_1", "3_7_1"],
            "pruningThreshold": "0.5",
            "supernodes": [["say x", "0_1_1", "1_2_1"]],
        },
    }
    assert (site.graphs / "g1.json").read_text() == json.dumps(graph("g1"))  # the DVC output is untouched
    served = json.loads(fetch(server, "/graph_data/g1.json")[2])
    assert served["qParams"]["pinnedIds"] == ["0_1_1", "3_7_1"]
    assert served["qParams"]["linkType"] == "both"  # not posted: the graph's own
    assert json.loads(served["qParams"]["clerps"]) == [
        [str(cantor(0, 1)), "a label"]
    ]  # as the page parses it
    assert served["annotations"]["stale"] == [] and served["nodes"] == graph("g1")["nodes"]
    # A later save: unset keys keep their values, labels merge by feature.
    save(
        server,
        "g1",
        {"pinnedIds": "1_2_1", "clerps": json.dumps([[str(cantor(1, 2)), "b"]]), "clickedId": None},
    )
    saved = json.loads((site.annotations / "g1.json").read_text())["qParams"]
    assert saved["pinnedIds"] == ["1_2_1"] and saved["clickedId"] == "0_1_1"
    assert saved["clerps"] == [[str(cantor(0, 1)), "a label"], [str(cantor(1, 2)), "b"]]


def test_stale_annotations_are_reported_and_kept(server, site):
    site.annotations.mkdir()
    saved = {
        "pinnedIds": ["0_1_1", "9_9_9"],
        "supernodes": [["half", "0_1_1", "8_8_8"], ["gone", "7_7_7"]],
        "clerps": [["123456", "old label"]],
        "clickedId": "6_6_6",
    }
    (site.annotations / "g1.json").write_text(json.dumps({"qParams": saved}))
    status, headers, body = fetch(server, "/graph_data/g1.json")
    served = json.loads(body)
    stale = served["annotations"]["stale"]
    assert status == 200 and headers[STALE_HEADER] == str(len(stale)) == "5"
    assert {(e["field"], e["id"]) for e in stale} == {
        ("pinnedIds", "9_9_9"),
        ("supernodes", "8_8_8"),
        ("supernodes", "7_7_7"),
        ("clerps", "123456"),
        ("clickedId", "6_6_6"),
    }
    assert served["qParams"]["pinnedIds"] == ["0_1_1"]
    assert served["qParams"]["supernodes"] == [["half", "0_1_1"]]
    assert served["qParams"]["clickedId"] == ""  # the graph's own
    # The page saves what it shows: the stale pins, labels and whole supernodes stay in the file.
    status, _, body = save(
        server, "g1", {"pinnedIds": "1_2_1", "supernodes": json.dumps([["half", "0_1_1"]])}
    )
    answer = json.loads(body)
    assert status == 200 and answer["dropped"] == [{"field": "supernodes", "id": "8_8_8", "label": "half"}]
    kept = json.loads((site.annotations / "g1.json").read_text())["qParams"]
    assert kept["pinnedIds"] == ["1_2_1", "9_9_9"]
    assert kept["supernodes"] == [["half", "0_1_1"], ["gone", "7_7_7"]]
    assert kept["clerps"] == [["123456", "old label"]]
    assert {(e["field"], e["id"]) for e in answer["stale"]} >= {("pinnedIds", "9_9_9"), ("clerps", "123456")}


def test_annotation_helpers():
    q = normalize_qparams({"pinnedIds": "", "supernodes": "", "clerps": '[[12, "x"]]', "sg_pos": "1 2"})
    assert q == {"pinnedIds": [], "supernodes": [], "clerps": [["12", "x"]], "sg_pos": "1 2"}
    for bad in ({"pinnedIds": 3}, {"supernodes": "[1]"}, {"supernodes": "{"}, {"clerps": "[[1]]"}):
        with pytest.raises(ValueError, match="qParams"):
            normalize_qparams(bad)
    live, stale = split_stale({"pinnedIds": ["0_1_1"], "clickedId": "supernode-0"}, graph("g"))
    assert live == {"pinnedIds": ["0_1_1"], "clickedId": "supernode-0"} and stale == []
    merged, lost = merge_annotations({"linkType": "both"}, {"sg_pos": "1 2"}, graph("g"))
    assert merged == {"linkType": "both", "sg_pos": "1 2"} and lost == []


def test_suggestion_decisions_are_saved_merged_and_served(server, site):
    """Accept / Reject of suggested supernodes (`metadata.supernode_suggestions`): posted by
    clt-serve.js as a JSON string, saved as a dict, merged by id, served in `qParams`."""
    status, _, _ = save(
        server,
        "g1",
        {"suggestions": json.dumps({"sg-a": "accepted", "sg-b": "rejected"}), "supernodes": json.dumps([])},
    )
    assert status == 200
    saved = json.loads((site.annotations / "g1.json").read_text())["qParams"]
    assert saved["suggestions"] == {"sg-a": "accepted", "sg-b": "rejected"}
    save(server, "g1", {"suggestions": json.dumps({"sg-b": "accepted", "sg-c": "rejected"})})
    saved = json.loads((site.annotations / "g1.json").read_text())["qParams"]
    assert saved["suggestions"] == {"sg-a": "accepted", "sg-b": "accepted", "sg-c": "rejected"}
    save(server, "g1", {"pinnedIds": "0_1_1"})  # the page's own save without ours: kept
    served = json.loads(fetch(server, "/graph_data/g1.json")[2])
    assert served["qParams"]["suggestions"] == {"sg-a": "accepted", "sg-b": "accepted", "sg-c": "rejected"}
    assert served["annotations"]["stale"] == []
    for bad in ({"sg-a": "maybe"}, ["sg-a"], "{"):
        status, _, body = save(
            server, "g1", {"suggestions": bad if isinstance(bad, str) else json.dumps(bad)}
        )
        assert status == 400 and "qParams.suggestions" in error_of(body)
    assert json.loads((site.annotations / "g1.json").read_text())["qParams"] == {
        **saved,
        "pinnedIds": ["0_1_1"],
    }


# --- what it refuses -------------------------------------------------------------------

TRAVERSALS = [
    "/../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E/%2e%2e/secret.txt",
    "/graph_data/..%2f..%2fsecret.txt",
    "/graph_data/%2e%2e%2fg1.json",
    "/data/..%2F..%2Fsecret.txt",
    "/vendor/..%2f..%2f..%2fsecret.txt",
    "/feature-data/tiny/..%2f..%2findex.json.gz",
    "/..\\..\\secret.txt",
    "/%5c..%5c..%5csecret.txt",
    "/sub/..%5c..%5csecret.txt",
    "//etc/passwd",
    "/%2fetc%2fpasswd",
    "/C:%5cWindows%5cwin.ini",
    "/./index.html",
    "/sub/%00page.html",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_path_traversal(server, path):
    status, _, body = raw(server, "GET", path)
    assert status in (400, 404), (path, status)
    assert b"SECRET" not in body and b"root:" not in body
    assert error_of(body)


def test_absolute_form_request_targets(server):
    status, _, body = raw(server, "GET", "http://127.0.0.1/../secret.txt")
    assert status == 400 and b"SECRET" not in body
    assert raw(server, "GET", "http://127.0.0.1/index.html")[0] == 200


def test_only_get_head_post_on_known_routes(server, site):
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"):
        status, headers, _ = raw(server, method, "/index.html")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
        assert raw(server, method, "/nowhere")[0] == 404
    status, headers, _ = fetch(server, "/save_graph/g1")
    assert status == 405 and headers["Allow"] == "POST"
    assert fetch(server, "/index.html", method="POST", data=b"{}")[0] == 405
    assert fetch(server, "/nowhere", method="POST", data=b"{}")[0] == 404
    assert raw(server, "BREW", "/index.html")[0] == 501
    assert not site.annotations.exists()


def raw_socket(server: Server, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_bad_posts_write_nothing_and_the_server_keeps_serving(server, site):
    q = json.dumps({"qParams": {"pinnedIds": "0_1_1"}}).encode()
    cases = [
        (b"not json", {}, 400, "not JSON"),
        (b"\xff\xfe", {}, 400, "not JSON"),
        (b"[1, 2]", {}, 400, "JSON object"),
        (b'{"qParams": "x"}', {}, 400, "JSON object"),
        (b'{"qParams": {"supernodes": "[[1]]"}}', {}, 400, "supernodes"),
        (q, {"Content-Type": "text/plain"}, 415, "application/json"),
        (q, {"Origin": "http://evil.example"}, 403, "not allowed"),
        (b"x" * (MAX_POST_BYTES + 1), {}, 413, "limit"),
    ]
    for body, headers, expected, message in cases:
        status, _, answer = fetch(server, "/save_graph/g1", method="POST", data=body, headers=headers)
        assert status == expected and message in error_of(answer), (body[:40], status, answer)
    status, _, answer = fetch(server, "/save_graph/nope", method="POST", data=q)
    assert status == 404 and "no graph 'nope'" in error_of(answer)
    status, _, answer = fetch(server, "/save_graph/..%2fg1", method="POST", data=q)
    assert status == 400
    no_length = b"POST /save_graph/g1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\r\n"
    assert raw_socket(server, no_length).startswith(b"HTTP/1.1 411")
    chunked = no_length.replace(b"\r\n\r\n", b'\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n0\r\n\r\n')
    assert raw_socket(server, chunked).startswith(b"HTTP/1.1 411")
    short = no_length.replace(b"\r\n\r\n", b"\r\nContent-Length: 100\r\n\r\n{}")
    assert raw_socket(server, short).startswith(b"HTTP/1.1 400")
    assert b"400" in raw_socket(server, b"GARBAGE\r\n\r\n")
    assert not site.annotations.exists()
    assert fetch(server, "/index.html")[0] == 200
    assert save(server, "g1", {"pinnedIds": "0_1_1"})[0] == 200


def test_requests_for_other_hosts_are_refused(server):
    status, _, body = raw(server, "GET", "/index.html", headers={"Host": "evil.example:80"})
    assert status == 403 and "not this server" in error_of(body)
    for host in ("localhost", "127.0.0.1:1234", "[::1]:8032"):
        assert raw(server, "GET", "/index.html", headers={"Host": host})[0] == 200


def test_site_needs_the_frontend_and_the_graphs(tmp_path):
    site = make_site(tmp_path)
    with pytest.raises(FileNotFoundError, match="dvc repro graphs"):
        Site(graphs=tmp_path / "none", features=site.features, annotations=site.annotations, web=site.web)
    (site.web / VENDOR["d3.min.js"]).unlink()
    with pytest.raises(FileNotFoundError, match="d3.min.js are missing; run `bash scripts/setup.sh`"):
        Site(graphs=site.graphs, features=site.features, annotations=site.annotations, web=site.web)


@pytest.mark.skipif(
    not (ROOT / ".web" / "circuit-tracer").is_dir(), reason="`bash scripts/setup.sh web` fetches it"
)
def test_the_real_pages_load_nothing_external():
    """circuit-tracer 0.5.0's own pages, as served: each CDN tag is one we know."""
    for page in ("index.html", "feature-view.html"):
        html = localize_html((ROOT / ".web" / "circuit-tracer" / page).read_text(), page)
        assert "left out" not in html and "https://" not in html.split("<script>")[0]
        assert (
            "<script src='/vendor/d3.min.js'></script><script src='/vendor/jetpack-shim.js'>"
            in html.replace("\n", "")
        )


def test_clt_serve_binds_loopback_warns_otherwise_and_stops_on_ctrl_c(tmp_path):
    site = make_site(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(f"paths:\n  graphs: {site.graphs}\n  features: {site.features}\n")
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):
        cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--port", "0", "--web", str(site.web)]
        cmd += ["--params", str(params)] + (["--host", host] if host != "127.0.0.1" else [])
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = [process.stdout.readline(), process.stdout.readline()]
        assert lines[1].startswith("Open http://"), (lines, process.stderr.read() if process.poll() else "")
        assert f"annotations in {tmp_path / 'annotations'}" in lines[0]
        url = lines[1].split()[1]
        if not warned:
            assert url.startswith("http://127.0.0.1:")
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.status == 200
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
        assert process.returncode == 0 and "Stopped." in out, err
        assert ("Warning: listening on 0.0.0.0" in err) == warned, err
