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

Output (`paths.graphs`): `{slug}.json` in circuit-tracer's graph format (FORMATS.md §2)
with `metadata.scan` = the absolute path of the packed features (`paths.features`),
`{slug}.png` (with `graphs.png`), and `graph-metadata.json`. The folder is a persistent
DVC output: `manifest.json` records, per slug, a key hashing the prompt, the transcoder,
the model, the `graphs` parameters and the attribution code, so a re-run computes only
graphs whose key changed (a new prompt, or everything after the transcoder or a
parameter changed) and deletes the graphs of removed prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import pipeline.attribution.attribute
import pipeline.attribution.export
import pipeline.attribution.prune
import pipeline.attribution.replacement
import pipeline.clt
import pipeline.evaluate
import pipeline.model
from pipeline.attribution.attribute import attribute
from pipeline.attribution.export import draw_graph, graph_json, write_graph_metadata, write_json_atomic
from pipeline.attribution.prune import prune
from pipeline.config import Params
from pipeline.evaluate import load_for_splicing
from pipeline.model import max_context

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CODE = [
    pipeline.attribution.attribute,
    pipeline.attribution.export,
    pipeline.attribution.prune,
    pipeline.attribution.replacement,
    pipeline.clt,
    pipeline.evaluate,
    pipeline.model,
]


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


def base_key(params: Params) -> str:
    """What every graph depends on besides its prompt."""
    files = [p for p in Path(params.paths.transcoder).iterdir() if p.is_file()]
    files += [p for p in Path(params.paths.model_dir).iterdir() if p.is_file()]
    files += [Path(module.__file__) for module in _CODE]
    settings = json.dumps([asdict(params.graphs), str(Path(params.paths.features).resolve())])
    return hashlib.sha256((hash_files(files) + settings).encode()).hexdigest()


def prompt_key(base: str, prompt: Prompt) -> str:
    return hashlib.sha256(json.dumps([base, prompt.text, prompt.targets]).encode()).hexdigest()


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
    """Delete graph files of slugs not in `keep` (prompts that were removed)."""
    removed = []
    for path in sorted(out.iterdir()):
        if path.name in (MANIFEST, "graph-metadata.json"):
            continue
        slug = path.name.removesuffix(".tmp").rsplit(".", 1)[0]
        if slug not in keep or path.name.endswith(".tmp"):
            path.unlink()
            removed.append(path.name)
    return removed


def run(params: Params, *, progress: bool = True) -> dict[str, str]:
    """The `graphs` stage; returns {slug: "computed" | "kept"}."""
    cfg = params.graphs
    prompts = read_prompts(params.paths.prompts)
    out = Path(params.paths.graphs)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, transcoder = load_for_splicing(params, dtype=torch.float32)
    model.requires_grad_(False)
    for prompt in prompts:  # every bad prompt stops the stage before any work
        check_length(tokenizer, model, prompt, cfg.max_n_pos)
        target_token_ids(tokenizer, prompt)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    base = base_key(params)
    keys = {p.slug: prompt_key(base, p) for p in prompts}
    manifest = {slug: key for slug, key in manifest.items() if keys.get(slug) == key}
    removed = remove_stale(out, set(manifest) | set(keys))
    if removed:
        logger.info("removed %d stale files: %s", len(removed), ", ".join(removed))
    scan = str(Path(params.paths.features).resolve())
    status = {}
    todo = [
        p for p in prompts if manifest.get(p.slug) != keys[p.slug] or not (out / f"{p.slug}.json").is_file()
    ]
    logger.info(
        "%d prompts: %d graphs to compute, %d up to date", len(prompts), len(todo), len(prompts) - len(todo)
    )
    for prompt in tqdm(todo, desc="graphs", unit="graph", disable=not progress):
        graph = attribute(
            model,
            tokenizer,
            transcoder,
            prompt.text,
            max_n_logits=cfg.max_n_logits,
            desired_logit_prob=cfg.desired_logit_prob,
            batch_size=cfg.batch_size,
            max_feature_nodes=cfg.max_feature_nodes,
            update_interval=cfg.update_interval,
            target_token_ids=target_token_ids(tokenizer, prompt),
        )
        pruned = prune(graph, node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold)
        data = graph_json(
            graph, pruned, tokenizer, slug=prompt.slug, scan=scan, node_threshold=cfg.node_threshold
        )
        write_json_atomic(out / f"{prompt.slug}.json", data)
        if cfg.png:
            tmp = out / f"{prompt.slug}.png.tmp"
            draw_graph(data, tmp)
            os.replace(tmp, out / f"{prompt.slug}.png")
        elif (out / f"{prompt.slug}.png").exists():
            (out / f"{prompt.slug}.png").unlink()
        manifest[prompt.slug] = keys[prompt.slug]
        write_json_atomic(manifest_path, dict(sorted(manifest.items())))
        status[prompt.slug] = "computed"
        logger.info("%s: %d nodes, %d links", prompt.slug, len(data["nodes"]), len(data["links"]))
    for prompt in prompts:
        status.setdefault(prompt.slug, "kept")
    write_json_atomic(manifest_path, dict(sorted(manifest.items())))
    write_graph_metadata(out, [p.slug for p in prompts])
    return status
