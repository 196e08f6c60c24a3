"""The frontend's pages as `clt serve` sends them: each CDN `<script>` tag of circuit-tracer
0.5.0's pages replaced by local scripts (`CDN`), any other external script or stylesheet left
out, so a browser loads nothing from outside this server (`localize_html`)."""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

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
