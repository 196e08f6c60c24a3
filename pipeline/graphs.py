"""The `graphs` stage: an attribution graph for every prompt file, incrementally.

Prompt files (`paths.prompts`/*.txt, UTF-8): the prompt is the file's text without its
final newline; the file name without `.txt` is the graph's slug. To attribute chosen
tokens instead of the most likely ones, end the file with a line `---` followed by one
target per line, each a JSON string holding exactly one token, e.g.

    The capital of France is
    ---
    " Paris"
    " Lyon"

(JSON strings make a leading space visible.) BOS is prepended, as circuit-tracer does.

Graphs are computed in float32 whatever `model.dtype` is: bf16 edges would be off by ~0.4%.

Output (`paths.graphs`), a persistent DVC output (kept between runs):
- `{slug}.json` in circuit-tracer's graph format (docs/formats.md, "Graphs"), `{slug}.png` (with
  `graphs.png`) and `graph-metadata.json`;
  each feature node's `clerp` is an automatic label from its packed record (`pipeline/labels.py`);
- `.cache/{slug}.safetensors` + `.cache/{slug}.json`: the unpruned graph
  (`export.save_graph`), so that pruning and drawing re-run without attribution;
- `manifest.json`: the output key of each graph.
Each graph's `metadata.scores` holds its replacement and completeness scores and the
error share of its logits' input (`attribution/scores.py`, on the unpruned graph), and how
well the graph predicts ablations of its 20 most influential features in the real model
(`intervention_pearson`, `intervention_sign_agreement`: `pipeline/intervene.py`; cached in
`.cache/{slug}.json` with their own key, so a re-prune reuses them), and
`paths.metrics`/graphs.json (a DVC metric) holds every graph's scores and their means.

`metadata.scan` is the transcoder's `scan` (its config.yaml; circuit-tracer also takes a
graph's scan from its transcoder): a portable name `./feature-data/<name>` (docs/formats.md)
where `export_transcoder` makes <name> from the model's name (`model.name` without folders
or `.gguf`, e.g. `./feature-data/smollm2-135m-instruct`). No artifact holds a path, so two
checkouts write the same bytes.

Each graph has two keys, each a hash of exactly what its result depends on:
- the attribution key (kept in `.cache/{slug}.json`): the model files, the transcoder
  files, the prompt text and targets, the attribution code (`ATTRIBUTION_CODE`) and
  `graphs.{max_n_logits, desired_logit_prob, max_feature_nodes, batch_size,
  update_interval}`. `batch_size` and `update_interval` belong there: with fewer
  `max_feature_nodes` than active features, features get rows `update_interval *
  batch_size` at a time between influence re-estimates, which decides which are selected
  (and batching changes float rounding). `max_n_pos` only rejects long prompts, and
  `runtime.device` is no dependency of any stage, so neither is in it.
- the output key (`manifest.json`): the attribution key, `node_threshold`,
  `edge_threshold`, `png`, the scan, the pruning, scoring, export, drawing and labelling code
  (`OUTPUT_CODE`) and a hash of the packed features folder (`paths.features`, all its
  files: ~30 ms for the default model's 35 MB), which the feature nodes' labels are read
  from (`pipeline/labels.py`), so re-packing re-labels every graph without re-attributing.
A run re-attributes graphs whose attribution key changed ("computed"), re-prunes and
re-draws from the cache those whose output key alone changed ("pruned"), keeps the others
("kept"), and deletes every file of removed prompts, their cache included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import pipeline.attribution.attribute
import pipeline.attribution.export
import pipeline.attribution.figure
import pipeline.attribution.prune
import pipeline.attribution.replacement
import pipeline.attribution.scores
import pipeline.clt
import pipeline.intervene
import pipeline.labels
import pipeline.model
import pipeline.splice
import pipeline.supernodes
from pipeline.atomic import staged, write_json
from pipeline.attribution.attribute import Graph, attribute
from pipeline.attribution.export import (
    graph_json,
    load_graph,
    save_graph,
    write_graph_metadata,
)
from pipeline.attribution.figure import draw_graph
from pipeline.attribution.prune import prune
from pipeline.attribution.scores import graph_scores, mean_scores
from pipeline.config import GraphsConfig, Params
from pipeline.distributed import all_gather_objects, barrier, broadcast_object, wait_for_ranks, world
from pipeline.featpack import FeatureReader
from pipeline.intervene import check_graph
from pipeline.labels import feature_reader, label_features
from pipeline.model import max_context
from pipeline.runtime import resolve_device
from pipeline.splice import load_for_splicing
from pipeline.supernodes import suggest_supernodes

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE = ".cache"
PROGRESS = "progress"
"""Folder of `CACHE` where each rank records the graphs it wrote (`read_manifest`)."""
ATTRIBUTION_CODE = [
    pipeline.attribution.attribute,
    pipeline.attribution.replacement,
    pipeline.clt,
    pipeline.model,
    pipeline.splice,
]
"""Modules whose code decides an unpruned graph (loading the model and transcoder included)."""
OUTPUT_CODE = [
    pipeline.attribution.export,
    pipeline.attribution.figure,
    pipeline.attribution.prune,
    pipeline.attribution.scores,
    pipeline.intervene,
    pipeline.labels,
    pipeline.supernodes,
]
ATTRIBUTION_SETTINGS = (
    "max_n_logits",
    "desired_logit_prob",
    "max_feature_nodes",
    "batch_size",
    "update_interval",
)
"""The `graphs` parameters that `attribute` reads (see the module docstring)."""
INTERVENTION_CODE = [pipeline.intervene, pipeline.attribution.prune]
"""Modules whose code decides a graph's intervention check, besides its attribution's."""
N_CHECKED = 20
"""Features per graph that `check_graph` ablates."""


@dataclass(frozen=True)
class Prompt:
    slug: str
    text: str
    targets: list[str] | None
    path: Path


def parse_prompt(path: Path) -> Prompt:
    """One prompt file (see the module docstring), with errors that name the file."""
    if path.stem in ("manifest", "graph-metadata"):
        raise ValueError(
            f"prompt file {path}: the slug {path.stem!r} is reserved for an index file; rename it"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"prompt file {path} is not valid UTF-8 (byte {e.start}: {e.object[e.start : e.start + 4]!r}); "
            "save it as UTF-8"
        ) from None
    text = text.removesuffix("\n")
    targets = None
    lines = text.split("\n")
    if "---" in lines:
        cut = lines.index("---")
        text = "\n".join(lines[:cut])
        targets = []
        for line in lines[cut + 1 :]:
            if not line.strip():
                continue
            try:
                target = json.loads(line)
            except json.JSONDecodeError:
                target = None
            if not isinstance(target, str) or not target:
                raise ValueError(
                    f"prompt file {path}: target line {line!r} after `---` must be a JSON string "
                    'holding one token, e.g. " Paris"'
                )
            targets.append(target)
        if not targets:
            raise ValueError(f"prompt file {path} has a `---` line but no target tokens after it")
    if not text.strip():
        raise ValueError(f"prompt file {path} is empty; write a prompt in it or delete it")
    return Prompt(path.stem, text, targets, path)


def read_prompts(folder: str | Path) -> list[Prompt]:
    """Every `*.txt` prompt of `folder`, sorted by slug."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"prompts folder {folder} does not exist; create it with one prompt per .txt file "
            "(or point `paths.prompts` at one)"
        )
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ValueError(f"prompts folder {folder} has no .txt files; add one prompt per .txt file")
    return [parse_prompt(path) for path in files]


def target_token_ids(tokenizer, prompt: Prompt) -> list[int] | None:
    if prompt.targets is None:
        return None
    ids = []
    for target in prompt.targets:
        tokens = tokenizer(target, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(
                f"prompt file {prompt.path}: target {target!r} is {len(tokens)} tokens "
                f"({[tokenizer.decode([t]) for t in tokens]}); each target must be exactly one token"
            )
        ids.append(tokens[0])
    return ids


def hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _sha256(data) -> str:
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()


def attribution_base(params: Params) -> str:
    """What every unpruned graph depends on besides its prompt."""
    files = [p for p in Path(params.paths.transcoder).iterdir() if p.is_file()]
    files += [p for p in Path(params.paths.model_dir).iterdir() if p.is_file()]
    files += [Path(module.__file__) for module in ATTRIBUTION_CODE]
    return _sha256([hash_files(files), {k: getattr(params.graphs, k) for k in ATTRIBUTION_SETTINGS}])


def attribution_key(base: str, prompt: Prompt) -> str:
    return _sha256([base, prompt.text, prompt.targets])


def output_key(attribution: str, cfg: GraphsConfig, scan: str, features: str) -> str:
    """What a graph's JSON and PNG depend on; `features` is `features_hash`."""
    code = hash_files([Path(module.__file__) for module in OUTPUT_CODE])
    return _sha256([attribution, cfg.node_threshold, cfg.edge_threshold, cfg.png, scan, code, features])


def features_hash(folder: str | Path) -> str:
    """A hash of every file of the packed features folder (of nothing if there is none)."""
    folder = Path(folder)
    return hash_files([p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else [])


def transcoder_scan(folder: str | Path) -> str:
    """The `scan` of the transcoder's config.yaml, which every graph repeats."""
    path = Path(folder) / "config.yaml"
    scan = (yaml.safe_load(path.read_text()) or {}).get("scan")
    if not isinstance(scan, str) or not scan or os.path.isabs(scan):
        raise ValueError(
            f"{path} has `scan: {scan!r}`; graphs need a portable name such as ./feature-data/<name> "
            "(docs/formats.md): re-run `dvc repro train`, or set it in that file"
        )
    return scan


def check_length(tokenizer, model, prompt: Prompt, max_n_pos: int) -> None:
    n_pos = 1 + len(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
    context = max_context(model.config)
    limit = min(max_n_pos, context) if context else max_n_pos
    if n_pos > limit:
        raise ValueError(
            f"prompt file {prompt.path} is {n_pos} tokens (BOS included), more than the limit {limit} "
            f"(`graphs.max_n_pos` {max_n_pos}, model context {context}); shorten the prompt "
            "or raise `graphs.max_n_pos`"
        )


def remove_stale(out: Path, keep: set[str]) -> list[str]:
    """Delete the files (cache included) of slugs not in `keep` (prompts that were removed),
    and staging files left by an interrupted run."""
    removed = []
    for folder in (out, out / CACHE):
        for path in sorted(folder.iterdir()):
            if path.is_dir() or (folder == out and path.name in (MANIFEST, "graph-metadata.json")):
                continue
            slug = path.name.removesuffix(".tmp").rsplit(".", 1)[0]
            if slug not in keep or path.name.endswith(".tmp"):
                path.unlink()
                removed.append(str(path.relative_to(out)))
    return removed


def unpruned_graph(model, tokenizer, transcoder, prompt: Prompt, cfg: GraphsConfig, cache: Path, key: str):
    """`(graph, "pruned")` from the cache when it holds `key`, else `(graph, "computed")`
    by attribution, saved to the cache; its intervention check is cached too (`check_cached`)."""
    graph = load_graph(cache, prompt.slug, key=key)
    if graph is not None:
        check_cached(model, transcoder, graph, cache, prompt.slug, key)
        return graph, "pruned"
    graph = attribute(
        model,
        tokenizer,
        transcoder,
        prompt.text,
        **{k: getattr(cfg, k) for k in ATTRIBUTION_SETTINGS},
        target_token_ids=target_token_ids(tokenizer, prompt),
    )
    save_graph(graph, cache, prompt.slug, key=key)
    check_cached(model, transcoder, graph, cache, prompt.slug, key)
    return graph, "computed"


def check_cached(model, transcoder, graph: Graph, cache: Path, slug: str, key: str) -> dict[str, float]:
    """The graph's intervention scores (`intervene.check_graph` of its `N_CHECKED` most
    influential features), kept in its cache entry `.cache/{slug}.json` under
    `interventions` with their own key (the attribution `key` and `INTERVENTION_CODE`):
    they depend on the attribution only, so a re-prune reuses them."""
    path = cache / f"{slug}.json"
    entry = json.loads(path.read_text())
    check_key = _sha256([key, hash_files([Path(m.__file__) for m in INTERVENTION_CODE]), N_CHECKED])
    cached = entry.get("interventions", {})
    if cached.get("key") == check_key:
        return cached["scores"]
    scores = check_graph(model, transcoder, graph, n_features=N_CHECKED)
    write_json(path, {**entry, "interventions": {"key": check_key, "scores": scores}})
    return scores


def cached_checks(cache: Path, slug: str) -> dict[str, float]:
    """The scores `check_cached` stored for `slug` (none if it did not run)."""
    path = cache / f"{slug}.json"
    entry = json.loads(path.read_text()) if path.is_file() else {}
    return entry.get("interventions", {}).get("scores", {})


def write_outputs(
    graph: Graph,
    tokenizer,
    prompt: Prompt,
    cfg: GraphsConfig,
    scan: str,
    out: Path,
    features: FeatureReader | None = None,
    transcoder=None,
) -> dict:
    """Prune `graph` and write `{slug}.json` (and `{slug}.png`), its feature nodes labelled
    from the packed `features` (none without) and, with the `transcoder`, its suggested
    supernodes in `metadata.supernode_suggestions` (`pipeline/supernodes.py`); returns the JSON."""

    pruned = prune(graph, node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold)
    data = graph_json(
        graph, pruned, tokenizer, slug=prompt.slug, scan=scan, node_threshold=cfg.node_threshold
    )
    label_features(data, features)
    if transcoder is not None:
        data["metadata"]["supernode_suggestions"] = suggest_supernodes(data, list(transcoder.W_dec))
    checks = cached_checks(out / CACHE, prompt.slug)
    data["metadata"]["scores"] = {**graph_scores(graph), **checks}  # of the unpruned graph
    write_json(out / f"{prompt.slug}.json", data)
    png = out / f"{prompt.slug}.png"
    if cfg.png:
        with staged(png, suffix=".tmp") as tmp:
            draw_graph(data, tmp)
    else:
        png.unlink(missing_ok=True)
    return data


def run(params: Params, *, progress: bool = True) -> dict[str, str]:
    """The `graphs` stage; returns {slug: "computed" | "pruned" | "kept"}.

    Under `torchrun` the prompts to write are split over the ranks (`pipeline.distributed`);
    rank 0 reads the manifest and removes stale files first, and writes the manifest, the
    metadata and the metrics once every rank is done, so the files do not depend on N."""
    cfg = params.graphs
    ranks = world(resolve_device(params.runtime.device))  # on CUDA, also this rank's GPU
    prompts = read_prompts(params.paths.prompts)
    out = Path(params.paths.graphs)
    cache = out / CACHE
    cache.mkdir(parents=True, exist_ok=True)
    model, tokenizer, transcoder = load_for_splicing(params, dtype=torch.float32)
    model.requires_grad_(False)
    for prompt in prompts:  # every bad prompt stops the stage before any work
        check_length(tokenizer, model, prompt, cfg.max_n_pos)
        target_token_ids(tokenizer, prompt)
    scan = transcoder_scan(params.paths.transcoder)
    base = attribution_base(params)
    attribution_keys = {p.slug: attribution_key(base, p) for p in prompts}
    packed = features_hash(params.paths.features)
    keys = {slug: output_key(key, cfg, scan, packed) for slug, key in attribution_keys.items()}
    todo = broadcast_object(graphs_to_write(out, keys, cfg.png, ranks.size) if ranks.main else None)
    mine = [p for i, p in enumerate(p for p in prompts if p.slug in todo) if ranks.owns(i)]
    status, done = {}, {}
    features = feature_reader(params.paths.features) if mine else None
    if mine:
        (cache / PROGRESS).mkdir(exist_ok=True)
    for prompt in tqdm(mine, desc="graphs", unit="graph", disable=not (progress and ranks.main)):
        key = attribution_keys[prompt.slug]
        graph, status[prompt.slug] = unpruned_graph(model, tokenizer, transcoder, prompt, cfg, cache, key)
        data = write_outputs(graph, tokenizer, prompt, cfg, scan, out, features, transcoder)
        done[prompt.slug] = keys[prompt.slug]
        write_json(cache / PROGRESS / f"rank-{ranks.rank}.json", done)  # a killed run keeps it
        logger.info(
            "%s (%s): %d nodes, %d links",
            prompt.slug,
            status[prompt.slug],
            len(data["nodes"]),
            len(data["links"]),
        )
    wait_for_ranks("graphs: every graph written")
    status = {slug: s for part in all_gather_objects(status) for slug, s in part.items()}
    for prompt in prompts:
        status.setdefault(prompt.slug, "kept")
    if ranks.main:
        read_manifest(out, keys)
        write_graph_metadata(out, [p.slug for p in prompts])
        write_score_metrics(out, [p.slug for p in prompts], Path(params.paths.metrics))
    barrier("graphs: manifest written")
    return dict(sorted(status.items()))


def graphs_to_write(out: Path, keys: dict[str, str], png: bool, n_ranks: int) -> list[str]:
    """The slugs of `keys` (slug -> output key, in prompt order) whose graph is missing or
    out of date, after the manifest is brought up to date and stale files are removed."""
    manifest = read_manifest(out, keys)
    removed = remove_stale(out, set(keys))
    if removed:
        logger.info("removed %d stale files: %s", len(removed), ", ".join(removed))
    expected = [".json", ".png"] if png else [".json"]
    todo = [
        slug
        for slug, key in keys.items()
        if manifest.get(slug) != key or not all((out / f"{slug}{x}").is_file() for x in expected)
    ]
    logger.info(
        "%d prompts: %d graphs to write, %d up to date on %d process(es)",
        len(keys),
        len(todo),
        len(keys) - len(todo),
        n_ranks,
    )
    return todo


def read_manifest(out: Path, keys: dict[str, str]) -> dict[str, str]:
    """Rewrite the manifest with its entries that are still current (their output key is
    in `keys`) and the graphs each rank recorded in `.cache/progress/` since (`run`), then
    drop those records: a killed run, on any number of processes, loses no finished graph."""
    path = out / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    progress = out / CACHE / PROGRESS
    for part in sorted(progress.glob("*.json")) if progress.is_dir() else ():
        manifest.update(json.loads(part.read_text()))
    manifest = {slug: key for slug, key in manifest.items() if keys.get(slug) == key}
    write_json(path, dict(sorted(manifest.items())))
    if progress.is_dir():
        shutil.rmtree(progress)
    return manifest


def write_score_metrics(out: Path, slugs: list[str], metrics: Path) -> dict:
    """`graphs.json` in `metrics`: each graph's scores (from its JSON) and their means."""
    per_prompt = {
        slug: json.loads((out / f"{slug}.json").read_text())["metadata"]["scores"] for slug in slugs
    }
    result = {
        "n_graphs": len(slugs),
        "mean": mean_scores(list(per_prompt.values())),
        "per_prompt": per_prompt,
    }
    metrics.mkdir(parents=True, exist_ok=True)
    write_json(metrics / "graphs.json", result)
    logger.info("graph scores, mean over %d graphs: %s", len(slugs), result["mean"])
    return result
