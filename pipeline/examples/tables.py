"""The examples stage's Parquet tables: their schemas, the rows of each chunk of features,
the atomic write of both files (`write_tables`), and the read of one feature (`read_feature`).

`examples.parquet` (one row per example) and `features.parquet` (one row per feature) are
sorted by (layer, feature), with explicit schemas (`EXAMPLES_SCHEMA`, `FEATURES_SCHEMA`) and
row groups of `ROW_GROUP_FEATURES` features, so a reader that filters on (layer, feature)
reads one small row group.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from pipeline.atomic import staged
from pipeline.config import ExamplesConfig
from pipeline.examples.scan import Chunk, Scan
from pipeline.examples.stats import FeatureState
from pipeline.store import ActivationStore

ROW_GROUP_FEATURES = 32
"""Features per Parquet row group of the examples table (1024 for the features table)."""

EXAMPLES_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("group", pa.string(), nullable=False),  # top | interval_{i} (0 = highest) | random
        pa.field("rank", pa.int16(), nullable=False),  # order within the group, by activation
        pa.field("activation", pa.float32(), nullable=False),  # at the max token
        pa.field("token_index", pa.int64(), nullable=False),  # row of the max token in the store
        pa.field("doc_id", pa.int32(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),  # of the max token in its sequence
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),  # the window
        pa.field("token_acts", pa.list_(pa.float32()), nullable=False),  # per window token
        pa.field("max_index", pa.int16(), nullable=False),  # of the max token in the window
    ]
)
FEATURES_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("dead", pa.bool_(), nullable=False),  # never fired on the scanned tokens
        pa.field("n_firing", pa.int64(), nullable=False),  # tokens where it fires
        pa.field("frequency", pa.float64(), nullable=False),  # n_firing / scanned tokens (no BOS)
        pa.field("act_min", pa.float32(), nullable=False),  # smallest firing activation (0 if dead)
        pa.field("act_max", pa.float32(), nullable=False),
        pa.field("act_mean", pa.float32(), nullable=False),  # over firing tokens
        pa.field("quantile_values", pa.list_(pa.float32()), nullable=False),  # percentiles 1..100
        pa.field("histogram", pa.list_(pa.int64()), nullable=False),  # bins over [act_min, act_max]
        pa.field("interval_edges", pa.list_(pa.float32()), nullable=False),  # ascending; interval_0 last
        pa.field("top_logit_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("top_logit_values", pa.list_(pa.float32()), nullable=False),
        pa.field("bottom_logit_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("bottom_logit_values", pa.list_(pa.float32()), nullable=False),
    ]
)


def _list_array(values: np.ndarray, lengths: np.ndarray, type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, type_))


def _fixed_lists(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """(n, k) -> n lists of k."""
    n, k = values.shape
    return _list_array(values.reshape(-1), np.full(n, k), type_)


def example_table(
    columns: dict, cfg: ExamplesConfig, store_ids: dict[str, np.ndarray], context_len: int
) -> pa.Table:
    """Examples table rows from `FeatureState.finalize` columns: windows cut to their
    sequence, token ids and document ids looked up in the store's arrays."""
    n_intervals = cfg.n_intervals
    names = np.array(["top", *[f"interval_{i}" for i in range(n_intervals)], "random"], dtype=object)
    rows = columns["row"]
    offsets = np.arange(-cfg.context_before, cfg.context_after + 1)
    position = rows % context_len
    index = position[:, None] + offsets
    valid = (index >= 1) & (index < context_len)
    token_rows = (rows[:, None] + offsets)[valid]
    return pa.table(
        {
            "layer": columns["layer"],
            "feature": columns["feature"],
            "group": names[columns["group"]].tolist(),
            "rank": columns["rank"],
            "activation": columns["activation"].astype(np.float32),
            "token_index": rows,
            "doc_id": store_ids["doc_ids"][rows],
            "position": position.astype(np.int32),
            "token_ids": _list_array(store_ids["token_ids"][token_rows], valid.sum(1), pa.int32()),
            "token_acts": _list_array(
                columns["window"][valid].astype(np.float32), valid.sum(1), pa.float32()
            ),
            "max_index": (valid[:, : cfg.context_before]).sum(1).astype(np.int16),
        },
        schema=EXAMPLES_SCHEMA,
    )


def feature_table(features: dict, lens: list[dict[str, np.ndarray]], chunk: Chunk) -> pa.Table:
    """Features table rows of a chunk from `FeatureState.finalize`, with the logit lens of
    each layer (`logit_lens`)."""
    lens = {k: np.concatenate([lens[l][k][start:stop] for l, start, stop in chunk.parts]) for k in lens[0]}
    return pa.table(
        {
            **{k: features[k] for k in ("layer", "feature", "dead", "n_firing", "frequency")},
            **{k: features[k] for k in ("act_min", "act_max", "act_mean")},
            "quantile_values": _fixed_lists(features["quantile_values"], pa.float32()),
            "histogram": _fixed_lists(features["histogram"], pa.int64()),
            "interval_edges": _list_array(*features["interval_edges"], pa.float32()),
            "top_logit_ids": _fixed_lists(lens["top_ids"].astype(np.int32), pa.int32()),
            "top_logit_values": _fixed_lists(lens["top_values"], pa.float32()),
            "bottom_logit_ids": _fixed_lists(lens["bottom_ids"].astype(np.int32), pa.int32()),
            "bottom_logit_values": _fixed_lists(lens["bottom_values"], pa.float32()),
        },
        schema=FEATURES_SCHEMA,
    )


def _writer(path: Path, schema: pa.Schema, metadata: dict) -> pq.ParquetWriter:
    schema = schema.with_metadata({"clt_examples": json.dumps(metadata)})
    return pq.ParquetWriter(
        path,
        schema,
        compression="zstd",
        sorting_columns=[pq.SortingColumn(0), pq.SortingColumn(1)],
        write_page_index=True,
    )


def write_tables(
    out: str | Path,
    states: list[tuple[Chunk, FeatureState]],
    lens: list[dict[str, np.ndarray]],
    scan: Scan,
    cfg: ExamplesConfig,
    store: ActivationStore,
    metadata: dict,
) -> Path:
    """`examples.parquet` and `features.parquet` in folder `out`, written atomically."""
    out = Path(out)
    with staged(out, folder=True) as staging:
        _write_tables(staging, states, lens, scan, cfg, store, metadata)
    return out


def _write_tables(staging: Path, states, lens, scan: Scan, cfg: ExamplesConfig, store, metadata) -> None:
    store_ids = {name: store.array(name)[: scan.n_tokens] for name in ("token_ids", "doc_ids")}
    per_feature = cfg.top_k + cfg.n_intervals * cfg.examples_per_interval + cfg.n_random
    examples = _writer(staging / "examples.parquet", EXAMPLES_SCHEMA, metadata)
    features = _writer(staging / "features.parquet", FEATURES_SCHEMA, metadata)
    try:
        for chunk, state in states:
            columns, stats = state.finalize(chunk, scan.n_scanned)
            examples.write_table(
                example_table(columns, cfg, store_ids, scan.context_len),
                row_group_size=ROW_GROUP_FEATURES * per_feature,
            )
            features.write_table(feature_table(stats, lens, chunk), row_group_size=1024)
    finally:
        examples.close()
        features.close()


def read_feature(folder: str | Path, layer: int, feature: int) -> tuple[dict, list[dict]]:
    """A feature's row of `features.parquet` and its rows of `examples.parquet` (in table
    order: top, intervals from the highest, random), read through the row-group statistics
    so only the row groups that hold the feature are read."""
    folder = Path(folder)
    for name in ("features", "examples"):
        if not (folder / f"{name}.parquet").is_file():
            raise FileNotFoundError(f"{folder}/{name}.parquet does not exist; run `dvc repro examples` first")
    filters = [("layer", "==", layer), ("feature", "==", feature)]
    stats = pq.read_table(folder / "features.parquet", filters=filters).to_pylist()
    if not stats:
        table = pq.read_table(folder / "features.parquet", columns=["layer", "feature"])
        n_layers = pa.compute.max(table["layer"]).as_py() + 1
        n_features = pa.compute.max(table["feature"]).as_py() + 1
        raise ValueError(
            f"{folder} has no layer {layer} feature {feature}: layers are 0..{n_layers - 1}, "
            f"features 0..{n_features - 1}"
        )
    return stats[0], pq.read_table(folder / "examples.parquet", filters=filters).to_pylist()
