"""Packed features: circuit-tracer's binary feature format (docs/formats.md), written from the
examples tables (`pack_features`) and read back the way the frontend reads it (`FeatureReader`).

The packed folder:

    index.json.gz   gzip of {"<layer>": {"filename": "layer_<layer>.bin", "offsets": [o_0, ..., o_F]}}
    layer_<l>.bin   feature f's record is bytes [o_f, o_{f+1}): a 4-byte little-endian length N,
                    then N bytes of gzip-compressed UTF-8 JSON; a dead feature's range is empty.

Each record is a feature in the schema of circuit-tracer's `frontend/feature_models.py`
(`feature_record`): its examples grouped as `examples_quantiles` (top activations, the
activation intervals from the highest down, random firing examples), each example's tokens
decoded one by one as the frontend shows them (`token_strings`), the logit lens, the
activation range, histogram, percentiles and frequency. Everything is written to a staging
folder and renamed into place, and gzip gets a fixed mtime, so the same tables give the same
bytes.

`FeatureReader` follows the frontend (`frontend/assets/feature_examples/init-feature-examples.js`,
`loadFeatureFromBinary`, and `util.getFile`) step by step:

1. cantor-unpair the graph node's `feature` into (layer, f) (`cantor_unpair`);
2. fetch and gunzip `index.json.gz`, and take the layer's `filename` and `offsets`;
3. fetch that file with the header `Range: bytes={o_f}-{o_{f+1}}`, the frontend's verbatim (an
   HTTP range includes its end, so this asks for one byte past the record, which the length
   prefix makes harmless);
4. read the 4-byte little-endian length N and gunzip bytes [4, 4 + N);
5. parse the JSON.

It reads a folder on disk or an http(s) URL served by anything that honours Range requests
(e.g. `python -m http.server` does not; a real web server or object store does). At the top
it imports only the standard library and our standard-library-only `atomic` and `cantor`,
so circuit-tracer's own environment can use the reader
(`ct/check_features.py`).
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import struct
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.atomic import staged
from pipeline.cantor import cantor_unpair

if TYPE_CHECKING:
    from pipeline.config import Params

logger = logging.getLogger(__name__)

GROUP_NAMES = {"top": "Top activations", "random": "Random firing examples"}
"""`quantile_name` of each examples group; intervals are named by their activation range."""


class FeatureReader:
    """Features of a packed folder (a path) or of a server (an http(s) URL), fetched as the
    frontend fetches them."""

    def __init__(self, location: str | Path, *, timeout: float = 30):
        self.location = str(location)
        self.timeout = timeout
        self._index: dict | None = None

    @property
    def is_url(self) -> bool:
        return self.location.startswith(("http://", "https://"))

    def fetch(self, name: str, byte_range: tuple[int, int] | None = None) -> bytes:
        """File `name`, or its bytes `start..end` (both included, clamped at the end of the
        file, as an HTTP Range request)."""
        if self.is_url:
            headers = {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}
            url = f"{self.location.rstrip('/')}/{name}"
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=self.timeout
            ) as r:
                if byte_range is not None and r.status != 206:
                    raise ValueError(
                        f"{url} ignored the Range header (status {r.status}, not 206), so the frontend "
                        "would show the wrong feature; serve the folder with a server that honours Range "
                        "requests (nginx, an object store)"
                    )
                return r.read()
        path = Path(self.location) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; is {self.location} a packed features folder?")
        with path.open("rb") as f:
            if byte_range is None:
                return f.read()
            f.seek(byte_range[0])
            return f.read(byte_range[1] - byte_range[0] + 1)

    def index(self) -> dict:
        """The parsed `index.json.gz` (fetched once)."""
        if self._index is None:
            self._index = json.loads(gzip.decompress(self.fetch("index.json.gz")))
        return self._index

    def layer_feature(self, layer: int, feature: int) -> dict | None:
        """Feature `feature` of layer `layer` as a dict, or None for a dead feature."""
        entry = self.index().get(str(layer))
        if entry is None:
            raise KeyError(
                f"layer {layer} is not in {self.location}/index.json.gz (layers {sorted(self.index())})"
            )
        offsets, filename = entry["offsets"], entry["filename"]
        if not 0 <= feature < len(offsets) - 1:
            raise KeyError(f"layer {layer} of {self.location} has {len(offsets) - 1} features, not {feature}")
        start, end = offsets[feature], offsets[feature + 1]
        if start == end:
            return None
        data = self.fetch(filename, (start, end))
        (length,) = struct.unpack("<I", data[:4])
        return json.loads(gzip.decompress(data[4 : 4 + length]))

    def feature(self, node_feature: int) -> dict | None:
        """The feature of a graph node, by the node's `feature` field (cantor(layer, f))."""
        return self.layer_feature(*cantor_unpair(node_feature))

    def records(self):
        """Every (layer, feature, record or None) of the folder, in order."""
        for layer in sorted(self.index(), key=int):
            for f in range(len(self.index()[layer]["offsets"]) - 1):
                yield int(layer), f, self.layer_feature(int(layer), f)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2's): every byte as a printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


def _token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The raw bytes of a token, for byte-level BPE and SentencePiece byte-fallback tokens."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str):
        return None
    if match := _BYTE_TOKEN.fullmatch(piece):
        return bytes([int(match.group(1), 16)])
    if piece and all(c in _BYTE_OF_CHAR for c in piece):
        return bytes(_BYTE_OF_CHAR[c] for c in piece)
    return None


def token_strings(tokenizer, token_ids) -> dict[int, str]:
    """Each token decoded on its own (`tokenizer.decode([id])`), as the frontend shows them. A
    token that holds part of a multi-byte UTF-8 character decodes alone to U+FFFD; it is
    written as `\\xNN` escapes of its bytes instead, which the frontend merges back into the
    character (`mergeHexEscapedMax` in `init-feature-examples-list.js`)."""
    out = {}
    for token_id in {int(t) for t in token_ids}:
        text = tokenizer.decode([token_id])
        if "\ufffd" in text:
            raw = _token_bytes(tokenizer, token_id)
            if raw is not None:
                text = raw.decode("utf-8", errors="backslashreplace")
        out[token_id] = text
    return out


def _rounded(values, decimals: int = 4) -> list[float]:
    import numpy as np

    return np.round(np.asarray(values, dtype=np.float64), decimals).tolist()


def interval_name(k: int, edges: list[float]) -> str:
    """`quantile_name` of interval k (0 is the highest) given its feature's ascending edges."""
    return f"Subsample interval {k} (activations {edges[-2 - k]:.3g} to {edges[-1 - k]:.3g})"


def feature_record(
    transcoder_id: str, feature: int, stats: dict[str, Any], examples: list[dict[str, Any]]
) -> dict:
    """One feature in the schema of circuit-tracer's `feature_models.Model`. `stats` is the
    feature's row of the features table (logit ids already decoded to strings in
    `top_logits` / `bottom_logits`), `examples` its rows of the examples table in order
    (tokens decoded in `tokens`). An example whose token is shown earlier in the record, or
    whose text is, gets `is_repeated_datapoint` (the frontend dims it)."""
    quantiles: list[dict] = []
    shown_tokens: set[int] = set()
    shown_texts: set[tuple] = set()
    for row in examples:
        group = row["group"]
        name = GROUP_NAMES.get(group) or interval_name(int(group.split("_")[1]), stats["interval_edges"])
        if not quantiles or quantiles[-1]["quantile_name"] != name:
            quantiles.append({"quantile_name": name, "examples": []})
        text = tuple(row["token_ids"])
        quantiles[-1]["examples"].append(
            {
                "tokens": row["tokens"],
                "tokens_acts_list": row["token_acts"],
                "train_token_ind": int(row["max_index"]),
                "is_repeated_datapoint": row["token_index"] in shown_tokens or text in shown_texts,
            }
        )
        shown_tokens.add(row["token_index"])
        shown_texts.add(text)
    return {
        "transcoder_id": transcoder_id,
        "index": int(feature),
        "examples_quantiles": quantiles,
        "top_logits": stats["top_logits"],
        "bottom_logits": stats["bottom_logits"],
        "act_min": stats["act_min"],
        "act_max": stats["act_max"],
        "quantile_values": stats["quantile_values"],
        "histogram": [float(c) for c in stats["histogram"]],
        "activation_frequency": stats["frequency"],
    }


def encode_record(record: dict, compresslevel: int) -> bytes:
    """4-byte little-endian length, then the gzip of the JSON (mtime 0: reproducible bytes)."""
    data = gzip.compress(
        json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8"),
        compresslevel=compresslevel,
        mtime=0,
    )
    return struct.pack("<I", len(data)) + data


def layer_records(features, examples, tokenizer, transcoder_id: str, strings: dict[int, str]):
    """(feature, record or None if dead) of one layer, from its rows of the features and
    examples tables (pyarrow tables sorted by feature). `strings` caches decoded tokens."""
    import numpy as np

    ids_column = examples.column("token_ids").combine_chunks()
    flat_ids = ids_column.values.to_numpy()
    strings.update(token_strings(tokenizer, [t for t in np.unique(flat_ids) if int(t) not in strings]))
    tokens_flat = [strings[int(t)] for t in flat_ids]
    acts_flat = _rounded(examples.column("token_acts").combine_chunks().values.to_numpy())
    offsets = ids_column.offsets.to_numpy()
    ex = {
        name: examples.column(name).to_pylist() for name in ("group", "token_index", "max_index", "token_ids")
    }
    ex_feature = examples.column("feature").to_numpy()
    f_column = features.column("feature").to_numpy()
    logit_ids = {k: features.column(f"{k}_logit_ids").to_pylist() for k in ("top", "bottom")}
    strings.update(
        token_strings(
            tokenizer, [t for k in logit_ids for ids in logit_ids[k] for t in ids if t not in strings]
        )
    )
    stats = {
        name: features.column(name).to_pylist()
        for name in ("dead", "frequency", "interval_edges", "histogram", "act_min", "act_max")
    }
    quantiles = features.column("quantile_values").to_pylist()
    bounds = np.searchsorted(ex_feature, f_column), np.searchsorted(ex_feature, f_column, side="right")
    for i, f in enumerate(f_column.tolist()):
        if stats["dead"][i]:
            yield f, None
            continue
        rows = []
        for r in range(bounds[0][i], bounds[1][i]):
            a, b = offsets[r], offsets[r + 1]
            rows.append(
                {
                    "group": ex["group"][r],
                    "token_index": ex["token_index"][r],
                    "max_index": ex["max_index"][r],
                    "token_ids": ex["token_ids"][r],
                    "tokens": tokens_flat[a:b],
                    "token_acts": acts_flat[a:b],
                }
            )
        feature_stats = {
            "frequency": stats["frequency"][i],
            "interval_edges": stats["interval_edges"][i],
            "histogram": stats["histogram"][i],
            "act_min": round(stats["act_min"][i], 6),
            "act_max": round(stats["act_max"][i], 6),
            "quantile_values": _rounded(quantiles[i], 6),
            "top_logits": [strings[t] for t in logit_ids["top"][i]],
            "bottom_logits": [strings[t] for t in logit_ids["bottom"][i]],
        }
        yield f, feature_record(transcoder_id, f, feature_stats, rows)


def pack_features(
    examples_dir: str | Path, tokenizer, out: str | Path, *, compresslevel: int = 6, progress: bool = True
) -> dict:
    """Write the packed folder `out` from the examples tables in `examples_dir`, atomically;
    returns counts, bytes and seconds."""
    import pyarrow.parquet as pq

    start = time.perf_counter()
    examples_dir, out = Path(examples_dir), Path(out)
    paths = {name: examples_dir / f"{name}.parquet" for name in ("examples", "features")}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist; run `dvc repro examples` (or `clt examples`) first"
            )
    meta = json.loads(pq.ParquetFile(paths["features"]).schema_arrow.metadata[b"clt_examples"])
    transcoder_id = f"{meta.get('model', 'model')}/{Path(meta['transcoder']).name}"
    layers = sorted(set(pq.read_table(paths["features"], columns=["layer"]).column("layer").to_pylist()))
    with staged(out, folder=True) as staging:
        counts = _write_layers(staging, paths, layers, tokenizer, transcoder_id, compresslevel, progress)
    seconds = time.perf_counter() - start
    return {**counts, "seconds": seconds}


def _write_layers(staging: Path, paths, layers, tokenizer, transcoder_id, compresslevel, progress) -> dict:
    """Every layer's `layer_{l}.bin` and the `index.json.gz` into folder `staging`."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    index, strings = {}, {}
    n_features = n_dead = 0
    bar = tqdm(total=len(layers), desc="pack", unit="layer", disable=not progress)
    for layer in layers:
        features = pq.read_table(paths["features"], filters=[("layer", "==", layer)])
        examples = pq.read_table(paths["examples"], filters=[("layer", "==", layer)])
        offsets = [0]
        filename = f"layer_{layer}.bin"
        with (staging / filename).open("wb") as f:
            for _, record in layer_records(features, examples, tokenizer, transcoder_id, strings):
                if record is not None:
                    offsets.append(offsets[-1] + f.write(encode_record(record, compresslevel)))
                else:
                    offsets.append(offsets[-1])
                    n_dead += 1
                n_features += 1
        index[str(layer)] = {"filename": filename, "offsets": offsets}
        bar.update()
    bar.close()
    (staging / "index.json.gz").write_bytes(gzip.compress(json.dumps(index).encode(), mtime=0))
    n_bytes = sum(p.stat().st_size for p in staging.iterdir())
    return {"n_features": n_features, "n_dead": n_dead, "bytes": n_bytes}


def run(params: Params, *, progress: bool = True) -> dict:
    """The `pack` stage: `paths.examples` to the packed folder `paths.features`."""
    from transformers import AutoTokenizer

    model_dir = Path(params.paths.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a materialised model folder; run `dvc repro model`")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stats = pack_features(
        params.paths.examples,
        tokenizer,
        params.paths.features,
        compresslevel=params.pack.compresslevel,
        progress=progress,
    )
    live = max(stats["n_features"] - stats["n_dead"], 1)
    logger.info(
        "packed %d features (%d dead) into %s: %.1f MB, %.0f bytes per live feature, %.1f s",
        stats["n_features"],
        stats["n_dead"],
        params.paths.features,
        stats["bytes"] / 1e6,
        stats["bytes"] / live,
        stats["seconds"],
    )
    return stats
