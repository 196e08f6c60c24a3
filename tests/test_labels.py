"""Automatic feature labels (`pipeline.labels`): the rule on constructed records, on packed
folders written here and by the `pack` stage, and which nodes they touch."""

import gzip
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from pipeline.cantor import cantor
from pipeline.featpack import FeatureReader, encode_record
from pipeline.labels import MAX_CHARS, feature_label, feature_reader, label_features, quote, top_tokens
from tests.test_examples import tiny  # noqa: F401  (the module-scoped tiny store and transcoder)
from tests.test_featpack import packed, shown_as  # noqa: F401


def example(token: str) -> dict:
    return {"tokens": ["a", token, "b"], "tokens_acts_list": [0.0, 2.0, 0.5], "train_token_ind": 1}


def record(top: list[str], logits: list[str], random: list[str] = ()) -> dict:
    """A feature record whose top examples peak at `top` (best first), with `top_logits`
    `logits` and random firing examples peaking at `random`."""
    return {
        "examples_quantiles": [
            {"quantile_name": "Top activations", "examples": [example(t) for t in top]},
            {"quantile_name": "Random firing examples", "examples": [example(t) for t in random]},
        ],
        "top_logits": logits,
        "bottom_logits": [" no"],
    }


def write_packed(folder: Path, layers: list[list[dict | None]]) -> Path:
    """A packed features folder (docs/formats.md) holding record `layers[l][f]` (None: dead)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {}
    for layer, records in enumerate(layers):
        data, offsets = b"", [0]
        for r in records:
            data += b"" if r is None else encode_record(r, 6)
            offsets.append(len(data))
        (folder / f"layer_{layer}.bin").write_bytes(data)
        index[str(layer)] = {"filename": f"layer_{layer}.bin", "offsets": offsets}
    (folder / "index.json.gz").write_bytes(gzip.compress(json.dumps(index).encode(), mtime=0))
    return folder


def test_label_is_frequent_top_tokens_then_logits():
    top = ["Paris", "France", "Paris", " Paris", "France", "Paris", " Lyon"]
    r = record(top, [" Paris", " French", " capital", " Lyon"], random=["x"] * 20)
    assert feature_label(r) == '"Paris" "France" " Paris" → " Paris" " French" " capital"'
    # equal counts: the better-ranked example first; random examples never count
    assert top_tokens(record(["b", "a", "a", "b", "c"], [], random=["x"] * 9)) == ["b", "a", "c"]


def test_label_shows_whitespace_and_stays_short():
    assert quote(" Paris") == '" Paris"'
    assert quote("\n") == '"\\n"' and quote("\t") == '"\\t"' and quote('"') == '"\\""'
    assert quote("\x1a") == '"\\x1a"' and quote("\xa0") == '"\\xa0"'
    assert quote("\\xe2") == '"\\xe2"'  # a partial UTF-8 character, as featpack writes it
    assert quote("abcdefghijklmnop") == '"abcdefghijkl…"'
    long = [f" token{i}abcdefgh" for i in range(5)]
    label = feature_label(record(long, long))
    assert len(label) <= MAX_CHARS
    inputs, outputs = label.split(" → ")
    assert inputs.startswith(quote(long[0])) and outputs.startswith(quote(long[0]))
    # one input and one output are always shown, however long
    assert feature_label(record(["x" * 40], ["y" * 40])) == f'"{"x" * 12}…" → "{"y" * 12}…"'


def test_dead_or_empty_features_get_no_label():
    assert feature_label(None) == ""
    assert feature_label(record([], [])) == ""
    assert feature_label({"index": 3}) == ""
    assert feature_label(record([], [" Paris", " French"])) == '→ " Paris" " French"'
    assert feature_label(record(["a", "a"], [])) == '"a"'


def graph(nodes: list[tuple[int, int, int]]) -> dict:
    """A graph JSON with feature nodes (layer, feature, position), an error, a token and a
    logit with their circuit-tracer clerps."""
    feature = [
        {"node_id": f"{l}_{f}_{p}", "feature": cantor(l, f), "feature_type": "cross layer transcoder"}
        for l, f, p in nodes
    ]
    others = [
        {"node_id": "0_1_2", "feature": -1, "feature_type": "mlp reconstruction error", "clerp": ""},
        {"node_id": "E_5_0", "feature": 0, "feature_type": "embedding", "clerp": ""},
        {"node_id": "4_7_2", "feature": 7, "feature_type": "logit", "clerp": 'Output " Paris" (p=0.500)'},
    ]
    return {"nodes": [{**n, "clerp": "old"} for n in feature] + others}


def test_label_features_labels_feature_nodes_only(tmp_path):
    folder = write_packed(
        tmp_path / "features",
        [[record(["Paris"], [" Paris"]), None], [record(["France", "France"], [" French"]), None]],
    )
    data = graph([(0, 0, 1), (0, 1, 1), (1, 0, 2), (1, 0, 3)])
    others = [dict(n) for n in data["nodes"][4:]]
    label_features(data, FeatureReader(folder))
    assert [n["clerp"] for n in data["nodes"][:4]] == [
        '"Paris" → " Paris"',
        "",  # dead
        '"France" → " French"',
        '"France" → " French"',  # the same feature at another position
    ]
    assert data["nodes"][4:] == others  # error, token and logit keep their clerps
    label_features(data, feature_reader(tmp_path / "none"))  # no packed folder: no labels
    assert [n["clerp"] for n in data["nodes"][:4]] == [""] * 4
    with pytest.raises(ValueError, match=r"do not match the transcoder.*dvc repro pack"):
        label_features(graph([(2, 0, 1)]), FeatureReader(folder))
    with pytest.raises(ValueError, match=r"do not match the transcoder.*dvc repro pack"):
        label_features(graph([(0, 5, 1)]), FeatureReader(folder))


def test_labels_from_the_pack_stage(packed):  # noqa: F811
    """Each live feature of a folder the `pack` stage wrote: its label starts with the most
    frequent max token of its top examples, read independently from the examples table."""
    tokenizer = AutoTokenizer.from_pretrained(packed.paths.model_dir)
    folder = Path(packed.paths.examples)
    examples = pd.read_parquet(folder / "examples.parquet")
    features = pd.read_parquet(folder / "features.parquet")
    reader = FeatureReader(packed.paths.features)
    n_live = 0
    for _, stats in features.iterrows():
        layer, f = int(stats["layer"]), int(stats["feature"])
        label = feature_label(reader.layer_feature(layer, f))
        if stats["dead"]:
            assert label == ""
            continue
        rows = examples[
            (examples["layer"] == layer) & (examples["feature"] == f) & (examples["group"] == "top")
        ]
        rows = rows.sort_values("rank")
        peaks = [shown_as(tokenizer, row["token_ids"][row["max_index"]]) for _, row in rows.iterrows()]
        counts = Counter(peaks)
        best = max(counts.values())
        first = next(t for t in peaks if counts[t] == best)
        assert label.startswith(quote(first)), (layer, f, label)
        assert f" → {quote(shown_as(tokenizer, stats['top_logit_ids'][0]))}" in label
        assert len(label) <= MAX_CHARS
        n_live += 1
    assert n_live > 0
