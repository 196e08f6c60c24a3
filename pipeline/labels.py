"""Automatic feature labels: a short `clerp` for every feature node of a graph, read from the
feature's packed record (docs/formats.md, "Packed features"), with no model run.

The rule (`feature_label`), from one record:

1. the token where each of the feature's top examples peaks (the "Top activations" group,
   `tokens[train_token_ind]`): its up to `MAX_INPUTS` most frequent distinct ones, most
   frequent first (a tie goes to the better-ranked example);
2. the first up to `MAX_OUTPUTS` of its `top_logits` (the logit lens: the output tokens
   its decoder promotes most);
3. each token quoted, with whitespace and unprintable characters escaped (`"\\n"`, and a
   leading space shows between the quotes), and cut to `MAX_TOKEN_CHARS` characters with
   `…`; the inputs, `→`, the outputs: `"Paris" "France" → " Paris" " French"`. One input
   and one output always; the others are added in turn (2nd input, 2nd output, ...) while
   the label stays within `MAX_CHARS` characters.

A dead feature (no record) gets `""`, as does a record with neither examples nor logits.

The labels are computed once, by the `graphs` stage when it writes a graph's JSON
(`label_features`), from the packed folder `paths.features` rather than the examples
tables: the records already hold each example's tokens decoded as the frontend shows them
and the decoded logit lens, so no tokenizer or Parquet is needed, a graph's few hundred
features are a byte range each (~0.5 ms), and the stage depends on that folder already.

A user's own label wins over this one: `clt serve` merges the git-tracked
`annotations/{slug}.json` into the `qParams` of the graph it serves (`clerps`, [feature,
label] pairs), and the frontend shows a node's label saved there or in the browser before
its `clerp` (`localClerp || remoteClerp || clerp`, circuit-tracer's
`frontend/assets/attribution_graph/util-cg.js`). The graph files keep the automatic label in
`clerp`, so re-running the pipeline never overwrites an annotation, and removing one shows
the automatic label again.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from pipeline.featpack import GROUP_NAMES, FeatureReader

logger = logging.getLogger(__name__)

MAX_INPUTS = 3
MAX_OUTPUTS = 3
MAX_TOKEN_CHARS = 12
"""Characters of a token shown before `…` (quotes and escapes not counted)."""
MAX_CHARS = 60
FEATURE_TYPE = "cross layer transcoder"
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", '"': '\\"'}


def quote(token: str) -> str:
    """`token` in double quotes, whitespace other than a space and unprintable characters
    escaped, cut to `MAX_TOKEN_CHARS` characters."""
    cut = token[:MAX_TOKEN_CHARS] + ("…" if len(token) > MAX_TOKEN_CHARS else "")
    body = "".join(
        _ESCAPES.get(c) or (c if c.isprintable() else c.encode("unicode_escape").decode()) for c in cut
    )
    return f'"{body}"'


def top_tokens(record: dict) -> list[str]:
    """The distinct max tokens of the record's top examples, most frequent first."""
    groups = record.get("examples_quantiles") or []
    top = next((g for g in groups if g["quantile_name"] == GROUP_NAMES["top"]), None)
    examples = top["examples"] if top else []
    tokens = [
        e["tokens"][e["train_token_ind"]] for e in examples if 0 <= e["train_token_ind"] < len(e["tokens"])
    ]
    counts = Counter(tokens)
    first = {t: i for i, t in reversed(list(enumerate(tokens)))}
    return sorted(counts, key=lambda t: (-counts[t], first[t]))


def _join(inputs: list[str], outputs: list[str]) -> str:
    return " ".join([*inputs, *(["→", *outputs] if outputs else [])])


def feature_label(record: dict | None) -> str:
    """The automatic label of a feature record (see the module docstring); `""` for None."""
    if record is None:
        return ""
    inputs = [quote(t) for t in top_tokens(record)[:MAX_INPUTS]]
    outputs = [quote(t) for t in (record.get("top_logits") or [])[:MAX_OUTPUTS]]
    shown_in, shown_out = inputs[:1], outputs[:1]
    for k in range(1, max(MAX_INPUTS, MAX_OUTPUTS)):
        for shown, more in ((shown_in, inputs), (shown_out, outputs)):
            if k < len(more):
                shown.append(more[k])
                if len(_join(shown_in, shown_out)) > MAX_CHARS:
                    shown.pop()
    return _join(shown_in, shown_out)


def feature_reader(folder: str | Path) -> FeatureReader | None:
    """A reader of the packed features folder, or None (and a warning) when there is none:
    the graphs then have no automatic labels."""
    if not (Path(folder) / "index.json.gz").is_file():
        logger.warning(
            "no packed features in %s: feature nodes get no labels; run `dvc repro pack` to add them",
            folder,
        )
        return None
    return FeatureReader(folder)


def label_features(data: dict, reader: FeatureReader | None) -> dict:
    """Set the `clerp` of every feature node of graph JSON `data` from `reader` (in place;
    `""` without a reader); other nodes keep theirs. Returns `data`."""
    labels: dict[int, str] = {}
    for node in data["nodes"]:
        if node["feature_type"] != FEATURE_TYPE:
            continue
        z = node["feature"]
        if z not in labels:
            labels[z] = feature_label(_record(reader, z)) if reader is not None else ""
        node["clerp"] = labels[z]
    return data


def _record(reader: FeatureReader, z: int) -> dict | None:
    try:
        return reader.feature(z)
    except KeyError as e:
        raise ValueError(
            f"the packed features in {reader.location} do not match the transcoder ({e.args[0]}); "
            "re-pack them with `dvc repro pack` (or `clt examples` then `clt pack`)"
        ) from None
