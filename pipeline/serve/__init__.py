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
The user's Accept / Reject of each suggested supernode (`metadata.supernode_suggestions`,
`pipeline/supernodes.py`) is saved there too, as `qParams.suggestions` (`{id: state}`).

Modules, one per concern:

    site.py          where the files live: the `Site` (graphs, features, annotations, web folder)
    annotations.py   the annotation files: normalize, merge, stale detection, merge into a graph
    page.py          the frontend's HTML with its CDN tags rewritten (`CDN`, `localize_html`)
    handler.py       the HTTP routes and what a request must pass (`Handler`, `HTTPError`)
    server.py        the threading server of one `Site`, and whether a host is loopback
"""

from pipeline.serve.annotations import (
    graph_with_annotations,
    merge_annotations,
    normalize_qparams,
    split_stale,
    to_frontend,
)
from pipeline.serve.handler import (
    MAX_POST_BYTES,
    SCAN_PREFIX,
    STALE_HEADER,
    Handler,
    HTTPError,
    feature_json,
)
from pipeline.serve.page import CDN, localize_html
from pipeline.serve.server import LOCAL_HOSTS, Server, is_loopback
from pipeline.serve.site import FRONTEND_DIR, OWN_SCRIPTS, OWN_WEB, SETUP_HINT, VENDOR, Site, site_for

__all__ = [
    "CDN",
    "FRONTEND_DIR",
    "LOCAL_HOSTS",
    "MAX_POST_BYTES",
    "OWN_SCRIPTS",
    "OWN_WEB",
    "SCAN_PREFIX",
    "SETUP_HINT",
    "STALE_HEADER",
    "VENDOR",
    "HTTPError",
    "Handler",
    "Server",
    "Site",
    "feature_json",
    "graph_with_annotations",
    "is_loopback",
    "localize_html",
    "merge_annotations",
    "normalize_qparams",
    "site_for",
    "split_stale",
    "to_frontend",
]
