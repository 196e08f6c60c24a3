"""`clt serve` in a real browser: headless Chromium (Debian's `chromium`), driven over the
DevTools protocol, with every host but this machine unreachable.

On a tiny run (`tests.dvc_repo.make_tiny_repo` with `graphs.node_threshold: 1`, so that its
graphs keep some feature nodes; pruned at 0.8 they have none): the page draws the largest
graph (its load time is printed), a real click on a feature node shows that feature's top
examples and top logits as the packed features have them, a Ctrl-click pins the node and the
page's Save button writes `annotations/{slug}.json`, which a reload shows again; an
annotation naming a node the graph lacks shows the page's stale banner. Every request the
page makes goes to the server, and the page throws no error. A screenshot is written to the
test's tmp folder (its path is printed) and copied to /tmp/serve_screenshot.png.

Chromium is installed with apt when missing and we are root; otherwise the test skips.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.featpack import FeatureReader
from pipeline.serve import CDN
from tests.dvc_repo import make_tiny_repo, run

websocket = pytest.importorskip("websocket", reason="websocket-client is in the `dev` extra")

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / ".web"
SCREENSHOT_COPY = Path("/tmp/serve_screenshot.png")


def chromium_binary() -> str:
    """Debian's chromium, installed with apt if missing (as root); skips when impossible."""
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and we are not root to `apt-get install chromium`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"`{' '.join(cmd)}` failed, so there is no chromium: {result.stderr.strip()[-300:]}")
    return shutil.which("chromium") or pytest.skip("apt installed chromium but it is not on PATH")


def frontend_dir() -> Path:
    """The web folder of scripts/setup.sh, fetched (`setup.sh web`) if missing; skips offline."""
    if not (WEB / "circuit-tracer" / "index.html").is_file() or not (WEB / "node_modules" / "d3").is_dir():
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "setup.sh"), "web"], capture_output=True, text=True
        )
        if result.returncode != 0 or not (WEB / "circuit-tracer" / "index.html").is_file():
            pytest.skip(f"the frontend files are missing and `setup.sh web` failed: {result.stderr[-300:]}")
    return WEB


class DevTools:
    """One page of a headless Chromium, over the DevTools protocol; keeps every event."""

    def __init__(self, binary: str, profile: Path):
        self.process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",  # we may be root
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1400,1000",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                # only this machine is reachable: names do not resolve, and what does not go
                # to a loopback address goes to a proxy that is not there
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
                "--proxy-server=127.0.0.1:9",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.events: list[dict] = []
        self._id = 0
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20):
        """The value of `expression` once it is truthy."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            time.sleep(0.05)
        return value

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def click(self, x: float, y: float, *, ctrl: bool = False) -> None:
        """A real mouse click at page coordinates (x, y)."""
        modifiers = 2 if ctrl else 0
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, modifiers=modifiers)
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                type=kind,
                x=x,
                y=y,
                button="left",
                clickCount=1,
                modifiers=modifiers,
            )

    def center(self, js_element: str) -> tuple[float, float]:
        box = self.wait_for(
            f"(() => {{ var e = {js_element}; if (!e) return null; var b = e.getBoundingClientRect();"
            " return [b.x + b.width / 2, b.y + b.height / 2] })()"
        )
        return box[0], box[1]

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture
def tiny_run(tiny_model_dir, tmp_path) -> Path:
    """The tiny run, `dvc repro`ed, with every graph node kept."""

    def keep_all_nodes(params):
        params["graphs"]["node_threshold"] = 1.0

    repo, env = make_tiny_repo(tmp_path / "repo", tiny_model_dir("llama"), extra_params=keep_all_nodes)
    run(["dvc", "repro"], repo, env)
    return repo


@pytest.fixture
def server(tiny_run, tmp_path):
    """`clt serve` on a free port of 127.0.0.1, annotations in tmp; yields (url, annotations)."""
    web = frontend_dir()
    annotations = tmp_path / "annotations"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--port", "0", "--annotations", str(annotations)]
        + ["--web", str(web), "--params", str(tiny_run / "params.yaml")],
        cwd=tiny_run,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = ""
    while process.poll() is None and not line.startswith("Open "):
        line = process.stdout.readline()
    assert line.startswith("Open "), f"clt serve did not start: {process.stderr.read()}"
    url = line.split()[1].removesuffix("/index.html")
    yield url, annotations
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 0 and "Stopped." in out, err


@pytest.fixture
def browser(tmp_path):
    chrome = DevTools(chromium_binary(), tmp_path / "profile")
    yield chrome
    chrome.close()


def live_feature_node(graph: dict, reader: FeatureReader) -> tuple[dict, dict]:
    """The most influential feature node whose feature has examples, and its record."""
    nodes = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    for node in sorted(nodes, key=lambda n: n["influence"]):
        if (record := reader.feature(node["feature"])) is not None:
            return node, record
    raise AssertionError("no feature node of the graph has examples")


NODE_OF = "d3.selectAll('.link-graph text.node').filter(d => d.nodeId == {!r}).node()"


def test_graph_renders_clicks_and_saves_in_chromium(server, browser, tiny_run, tmp_path):
    url, annotations = server
    graphs = tiny_run / "data" / "graphs"
    slugs = [g["slug"] for g in json.loads((graphs / "graph-metadata.json").read_text())["graphs"]]
    largest = max(slugs, key=lambda s: (graphs / f"{s}.json").stat().st_size)
    graph = json.loads((graphs / f"{largest}.json").read_text())
    node, record = live_feature_node(graph, FeatureReader(tiny_run / "data" / "features"))

    # The largest graph draws: every node of its link graph is on the page.
    start = time.perf_counter()
    browser.navigate(f"{url}/index.html?slug={largest}")
    n_drawn = browser.wait_for("document.querySelectorAll('.link-graph text.node').length")
    load_seconds = time.perf_counter() - start
    print(
        f"\nlargest graph {largest!r} ({len(graph['nodes'])} nodes, {len(graph['links'])} links) drawn in "
        f"{load_seconds:.2f} s"
    )
    assert n_drawn == len(graph["nodes"])

    # A real click on the feature node shows its examples and logits, as packed.
    browser.click(*browser.center(NODE_OF.format(node["node_id"])))
    browser.wait_for("document.querySelectorAll('.feature-example-list .token').length")
    logits = browser.wait_for(
        "[...document.querySelectorAll('.feature-example-logits .ctx-container')]"
        ".map(row => [...row.querySelectorAll('.token')].map(t => t.textContent))"
    )
    assert logits[0] == record["top_logits"]
    assert logits[1] == record["bottom_logits"]
    shown = browser.evaluate(
        "[...document.querySelectorAll('.feature-example-list .text-wrapper')].map(e => e.textContent)"
    )
    top_example = "".join(record["examples_quantiles"][0]["examples"][0]["tokens"])
    assert top_example in shown

    # Ctrl-click pins the node; Save writes the annotations file, and a reload shows the pin
    # and, clicked again (the saved clickedId), the node's examples.
    browser.click(*browser.center(NODE_OF.format(node["node_id"])), ctrl=True)
    browser.wait_for("new URL(location).searchParams.get('pinnedIds')")
    browser.click(*browser.center("document.querySelector('button.save-button')"))
    browser.wait_for("document.querySelector('button.save-button').textContent == 'Saved!'")
    saved = json.loads((annotations / f"{largest}.json").read_text())
    assert saved["qParams"]["pinnedIds"] == [node["node_id"]]
    browser.navigate(f"{url}/index.html?slug={largest}")
    pinned = browser.wait_for(
        "[...document.querySelectorAll('.link-graph text.node.pinned')].map(e => d3.select(e).datum().nodeId)"
    )
    assert pinned == [node["node_id"]]
    assert not browser.evaluate("document.querySelector('.clt-stale')")
    browser.wait_for("document.querySelectorAll('.feature-example-list .token').length")
    browser.wait_for("document.querySelectorAll('.subgraph .supernode-container, .subgraph .node').length")
    screenshot = browser.screenshot(tmp_path / "serve_screenshot.png")
    shutil.copy(screenshot, SCREENSHOT_COPY)
    print(f"screenshot: {screenshot} (copied to {SCREENSHOT_COPY})")

    # An annotation naming a node the graph lacks: the page says so.
    other = next((s for s in slugs if s != largest), largest)
    (annotations / f"{other}.json").write_text(json.dumps({"qParams": {"pinnedIds": ["9_999_9"]}}))
    browser.navigate(f"{url}/index.html?slug={other}")
    banner = browser.wait_for("document.querySelector('.clt-stale')?.textContent")
    assert "9_999_9" in banner

    # Every request went to the server, and nothing failed or threw.
    requests = [
        e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"
    ]
    assert requests and all(u.startswith(url + "/") or u.startswith(("data:", "about:")) for u in requests), (
        requests
    )
    assert any("/feature-data/" in u for u in requests)
    errors = [e["params"] for e in browser.events if e["method"] == "Runtime.exceptionThrown"]
    errors += [
        e["params"]["entry"]
        for e in browser.events
        if e["method"] == "Log.entryAdded"
        and e["params"]["entry"]["level"] == "error"
        and "favicon.ico" not in e["params"]["entry"].get("url", "")
    ]
    assert not errors, errors


SHIM_CHECKS = """(() => {
  var out = {}, body = d3.select('body')
  var div = body.append('div.a.b#c')
  out.append = [div.node().tagName, div.attr('class'), div.attr('id')]
  var svg = body.append('svg'), g = svg.append('g.x')
  out.svgNamespace = g.node().namespaceURI
  var many = body.append('div#m').appendMany('span.s', [1, 2, 3])
  out.appendMany = [many.size(), many.attr('class'), many.data()]
  var rect = svg.append('rect').at({strokeWidth: 2, viewBox: '0 0 1 1', fillOpacity: d => 0.5})
  out.at = [rect.attr('stroke-width'), rect.attr('viewBox'), rect.attr('fill-opacity'),
    rect.at('stroke-width')]
  div.st({marginTop: 5, opacity: 0.5, zIndex: 3, width: () => 10, height: '2em', lineHeight: 4})
  out.st = ['margin-top', 'opacity', 'z-index', 'width', 'height', 'line-height'].map(k => div.style(k))
  out.translate = [g.translate([1, 2]).attr('transform'), g.translate(-16, 1).attr('transform'),
    g.translate(7, 0).attr('transform'), g.translate(() => [3, 4]).attr('transform'),
    div.translate([3, 4]).style('transform')]
  out.parent = [many.parent().size(), many.parent().attr('id')]
  div.selectAppend('p.once'); div.selectAppend('p.once')
  out.selectAppend = div.selectAll('p.once').size()
  out.clamp = [d3.clamp(0, -1, 5), d3.clamp(0, 9, 5), d3.clamp(0, 3, 5)]
  out.nestBy = d3.nestBy([1, 2, 3, 4, 5], d => d % 2).map(g => [g.key, g.slice()])

  var host = body.append('div').st({width: 400, height: 300})
  var c = d3.conventions({sel: host, margin: {left: 30, bottom: 85}, layers: 'sccd'})
  var s = window.devicePixelRatio || 1, box = host.node().getBoundingClientRect()
  var canvas = host.selectAll('canvas').nodes(), svgs = host.selectAll('svg').nodes()
  out.conventions = {
    size: [c.width, c.height, c.totalWidth, c.totalHeight, host.style('position')],
    svg: [c.svg === c.layers[0], c.svg.attr('transform'), svgs[0].getAttribute('width'),
      svgs[0].style.position],
    canvas: [canvas.length, canvas[0].width == 400 * s, canvas[0].style.width, canvas[0].style.position,
      c.layers[1].getTransform().e == 30 * s, c.layers[1].getTransform().f == 20 * s],
    div: [c.layers[3].style('left'), c.layers[3].style('top'), c.layers[3].style('width'),
      c.layers[3].style('height'), c.layers[3].style('position')],
    stacked: [svgs[0], ...canvas].map(e => e.getBoundingClientRect())
      .map(b => [b.x - box.x, b.y - box.y]),
    range: [c.x.range(), c.y.range()],
  }
  var axes = c.drawAxis()
  out.drawAxis = [c.svg.select('.x.axis').attr('transform'), c.svg.selectAll('.y.axis').size(),
    axes.xAxisSel.size(), c.svg.selectAll('.x .tick').size() > 0]
  var plain = d3.conventions({sel: body.append('div').st({width: 200, height: 100})})
  out.plain = [plain.layers.length, plain.sel.select('svg').node().style.position, plain.width]

  var tip = body.append('div.tooltip.tooltip-hidden')
  var items = body.appendMany('div.item', [{a: 1}]).call(d3.attachTooltip, tip, [d => 'A' + d.a])
  var node = items.node()
  node.dispatchEvent(new MouseEvent('mouseover', {clientX: 100, clientY: 50}))
  out.tooltipShown = [tip.classed('tooltip-hidden'), tip.text(), items.classed('tooltipped')]
  node.dispatchEvent(new MouseEvent('mousemove', {clientX: 100, clientY: 50}))
  out.tooltipMoved = [tip.style('left') != '', tip.style('top')]
  node.dispatchEvent(new MouseEvent('mouseout'))
  out.tooltipHidden = [tip.classed('tooltip-hidden'), items.classed('tooltipped')]
  return out
})()"""


def test_jetpack_shim_in_chromium(browser, tmp_path):
    """Each function of pipeline/web/jetpack-shim.js on d3 v7, as the page calls it."""
    from tests.test_serve import make_site, start

    web = frontend_dir()
    page = "".join(f"<script src='{url}'></script>" for url in list(CDN)[:2]) + "<body></body>"
    server = start(make_site(tmp_path / "site", node_modules=web / "node_modules", index_html=page))
    try:
        browser.navigate(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        browser.wait_for("!!(window.d3 && d3.conventions && document.body)")
        out = browser.evaluate(SHIM_CHECKS)
    finally:
        server.shutdown()
        server.server_close()
    assert out["append"] == ["DIV", "a b", "c"]
    assert out["svgNamespace"] == "http://www.w3.org/2000/svg"
    assert out["appendMany"] == [3, "s", [1, 2, 3]]
    assert out["at"] == ["2", "0 0 1 1", "0.5", "2"]
    assert out["st"] == ["5px", "0.5", "3", "10px", "2em", "4px"]
    assert out["translate"] == [
        "translate(1,2)",
        "translate(0,-16)",
        "translate(7,0)",
        "translate(3,4)",
        "translate(3px, 4px)",
    ]
    assert out["parent"] == [1, "m"]
    assert out["selectAppend"] == 1
    assert out["clamp"] == [0, 5, 3]
    assert out["nestBy"] == [["1", [1, 3, 5]], ["0", [2, 4]]]
    conventions = out["conventions"]
    assert conventions["size"] == [350, 195, 400, 300, "relative"]
    assert conventions["svg"] == [True, "translate(30,20)", "400", "absolute"]
    assert conventions["canvas"] == [2, True, "400px", "absolute", True, True]
    assert conventions["div"] == ["30px", "20px", "350px", "195px", "absolute"]
    assert conventions["stacked"] == [[0, 0]] * 3  # the layers lie over each other
    assert conventions["range"] == [[0, 350], [195, 0]]
    assert out["drawAxis"] == ["translate(0,195)", 1, 1, True]
    assert out["plain"] == [1, "", 160]
    assert out["tooltipShown"] == [False, "A1", True]
    assert out["tooltipMoved"][0] and out["tooltipMoved"][1] == "70px"
    assert out["tooltipHidden"] == [True, False]
