"""Where `clt serve`'s files live: the graph folder, the packed features, the annotations folder
and the web folder of scripts/setup.sh (`Site`), as a checkout's params.yaml places them
(`site_for`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.featpack import FeatureReader
from pipeline.serve.annotations import normalize_qparams

if TYPE_CHECKING:
    from pipeline.config import Params

logger = logging.getLogger(__name__)

FRONTEND_DIR = "circuit-tracer"
"""Folder of the web folder holding circuit-tracer's `frontend/assets/` (scripts/setup.sh)."""
OWN_WEB = Path(__file__).parents[1] / "web"
"""Our own static files: the jetpack shim and the page's helper."""
VENDOR = {
    "d3.min.js": "node_modules/d3/dist/d3.min.js",
    "dagre.min.js": "node_modules/dagre/dist/dagre.min.js",
    "pako.min.js": "node_modules/pako/dist/pako.min.js",
}
"""`/vendor/<name>` of each npm file, under the web folder."""
OWN_SCRIPTS = ("jetpack-shim.js", "clt-serve.js")
"""`/vendor/<name>` of each of our own scripts, in `OWN_WEB`."""
SETUP_HINT = "run `bash scripts/setup.sh` (it fetches circuit-tracer's frontend and d3, dagre and pako)"


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
