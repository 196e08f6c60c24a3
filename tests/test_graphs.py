"""The `graphs` stage: prompt files, graph JSON, incremental runs, and agreement with circuit-tracer."""

import dataclasses
import gzip
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.attribution.attribute import Graph, attribute
from pipeline.attribution.export import graph_json, load_graph, save_graph
from pipeline.attribution.figure import draw_graph, graph_figure, select_links, wrap_label
from pipeline.attribution.prune import prune
from pipeline.cantor import cantor
from pipeline.clt import export_transcoder, load_transcoder
from pipeline.config import parse_params
from pipeline.graphs import parse_prompt, read_prompts, run, transcoder_scan
from pipeline.labels import feature_label
from pipeline.model import _make_loadable_by_transformers_4, load_pretrained
from tests.ct import CT_DIR, CT_PYTHON, CT_SKIP_REASON
from tests.test_labels import record, write_packed
from tests.tiny import make_transcoder

needs_ct = pytest.mark.skipif(not CT_PYTHON.exists(), reason=CT_SKIP_REASON)


def test_prompt_files(tmp_path):
    (tmp_path / "plain.txt").write_text("The capital of France is\n")
    (tmp_path / "targets.txt").write_text('One dog, two\n---\n" dogs"\n\n" cats"\n')
    plain, targets = read_prompts(tmp_path)
    assert (plain.slug, plain.text, plain.targets) == ("plain", "The capital of France is", None)
    assert (targets.text, targets.targets) == ("One dog, two", [" dogs", " cats"])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"caf\xe9 au lait", "not valid UTF-8"),
        (b"prompt\n---\nParis\n", "must be a JSON string"),
        (b"prompt\n---\n", "no target tokens"),
    ],
)
def test_bad_prompt_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        parse_prompt(path)
    assert str(path) in str(info.value)


def test_missing_or_empty_prompts_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "nope")
    with pytest.raises(ValueError, match="no .txt files"):
        read_prompts(tmp_path)


@pytest.fixture
def tiny_params(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    export_transcoder(make_transcoder(), tmp_path / "tc", model_name="tiny")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "france.txt").write_text("The capital of France is\n")
    (prompts / "count.txt").write_text("One two three four\n")

    def make(out=tmp_path / "graphs", **graphs):
        raw = {
            "paths": {
                "model_dir": str(model_dir),
                "transcoder": str(tmp_path / "tc"),
                "prompts": str(prompts),
                "graphs": str(out),
                "features": str(tmp_path / "features"),
                "metrics": str(tmp_path / "metrics"),
            },
            "graphs": {"max_feature_nodes": 40, "batch_size": 16, **graphs},
            "runtime": {"device": "cpu"},
        }
        return parse_params(raw)

    return make, prompts, tmp_path / "graphs"


def test_stage_is_incremental(tiny_params):
    make, prompts, out = tiny_params
    assert run(make(), progress=False) == {"count": "computed", "france": "computed"}
    assert {str(p.relative_to(out)) for p in out.rglob("*")} == {
        "count.json",
        "count.png",
        "france.json",
        "france.png",
        "graph-metadata.json",
        "manifest.json",
        ".cache",
        ".cache/count.json",
        ".cache/count.safetensors",
        ".cache/france.json",
        ".cache/france.safetensors",
    }
    meta = json.loads((out / "graph-metadata.json").read_text())
    assert [g["slug"] for g in meta["graphs"]] == ["count", "france"]
    assert meta["graphs"][0]["scan"] == "./feature-data/tiny"  # the transcoder's, from model_name
    before = (out / "france.json").read_bytes()
    (prompts / "new.txt").write_text("A stitch in time\n")
    assert run(make(), progress=False) == {"count": "kept", "france": "kept", "new": "computed"}
    assert (out / "france.json").read_bytes() == before
    (prompts / "count.txt").unlink()
    assert run(make(), progress=False) == {"france": "kept", "new": "kept"}
    assert not [p.name for p in out.rglob("count.*")]
    assert [g["slug"] for g in json.loads((out / "graph-metadata.json").read_text())["graphs"]] == [
        "france",
        "new",
    ]
    assert run(make(node_threshold=0.7), progress=False) == {"france": "pruned", "new": "pruned"}
    assert run(make(node_threshold=0.7, png=False), progress=False) == {"france": "pruned", "new": "pruned"}
    assert not list(out.glob("*.png"))
    (prompts / "new.txt").write_text("A stitch in time saves\n")
    assert run(make(node_threshold=0.7, png=False), progress=False) == {"france": "kept", "new": "computed"}


def test_threshold_change_reprunes_from_the_cache(tiny_params, monkeypatch):
    """Pruning and drawing parameters re-run from the cached unpruned graph, without
    attribution, and give the same files as a fresh run with those parameters."""
    make, _, out = tiny_params
    run(make(), progress=False)

    def no_attribution(*args, **kwargs):
        raise AssertionError("attribute called")

    with monkeypatch.context() as m:
        m.setattr("pipeline.graphs.attribute", no_attribution)
        changed = dict(node_threshold=0.6, edge_threshold=0.9)
        assert run(make(**changed), progress=False) == {"count": "pruned", "france": "pruned"}
    fresh = out.with_name("fresh")
    assert run(make(out=fresh, **changed), progress=False) == {"count": "computed", "france": "computed"}
    assert file_bytes(out) == file_bytes(fresh)
    assert json.loads((out / "france.json").read_text())["metadata"]["node_threshold"] == 0.6


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "change", [{"max_feature_nodes": 20}, {"batch_size": 8}, {"update_interval": 1}, {"max_n_logits": 3}]
)
def test_attribution_setting_change_reattributes(tiny_params, monkeypatch, change):
    make, _, out = tiny_params
    run(make(), progress=False)
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return attribute(*args, **kwargs)

    monkeypatch.setattr("pipeline.graphs.attribute", counting)
    assert run(make(max_n_pos=64), progress=False) == {"count": "kept", "france": "kept"}
    assert run(make(**change), progress=False) == {"count": "computed", "france": "computed"}
    assert len(calls) == 2 and all(c.items() >= change.items() for c in calls)


def test_cached_graph_round_trips(tiny_model_dir, tmp_path):
    model, tokenizer = load_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    model.requires_grad_(False)
    graph = attribute(model, tokenizer, make_transcoder(), "The capital of France is", max_feature_nodes=20)
    save_graph(graph, tmp_path, "s", key="k1")
    assert {p.name for p in tmp_path.iterdir()} == {"s.json", "s.safetensors"}
    loaded = load_graph(tmp_path, "s", key="k1")
    for field in dataclasses.fields(Graph):
        a, b = getattr(graph, field.name), getattr(loaded, field.name)
        assert torch.equal(a, b) and a.dtype == b.dtype if isinstance(a, torch.Tensor) else a == b, field.name
    assert load_graph(tmp_path, "s", key="k2") is None
    assert load_graph(tmp_path, "other", key="k1") is None
    assert "/" not in (tmp_path / "s.json").read_text()


def test_scan_is_a_portable_name(tmp_path):
    for name, scan in [
        ("smollm2-135m-instruct", "./feature-data/smollm2-135m-instruct"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "./feature-data/SmolLM2-135M-Instruct"),
        (str(tmp_path / "models" / "tiny model.gguf"), "./feature-data/tiny-model"),
        (".", "./feature-data/model"),
    ]:
        export_transcoder(make_transcoder(), tmp_path / "tc", model_name=name)
        assert transcoder_scan(tmp_path / "tc") == scan
    with pytest.raises(ValueError, match="portable name"):
        export_transcoder(make_transcoder(), tmp_path / "tc", model_name="x", scan=str(tmp_path))
    config = tmp_path / "tc" / "config.yaml"
    config.write_text(config.read_text().replace("scan: ./feature-data/model", f"scan: {tmp_path}"))
    with pytest.raises(ValueError, match=r"config\.yaml.*portable name.*dvc repro train"):
        transcoder_scan(tmp_path / "tc")


def test_too_long_prompt_names_the_file(tiny_params):
    make, prompts, _ = tiny_params
    (prompts / "long.txt").write_text("word " * 50)
    with pytest.raises(ValueError, match=r"long\.txt.*graphs\.max_n_pos"):
        run(make(max_n_pos=20), progress=False)


def test_multi_token_target_is_refused(tiny_params):
    make, prompts, _ = tiny_params
    (prompts / "t.txt").write_text('The capital of France is\n---\n" Paris and London"\n')
    with pytest.raises(ValueError, match="exactly one token"):
        run(make(), progress=False)


def test_graph_json_nodes_and_links(tiny_model_dir):
    model, tokenizer = load_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    model.requires_grad_(False)
    graph = attribute(model, tokenizer, make_transcoder(), "The capital of France is", batch_size=32)
    pruned = prune(graph)
    data = graph_json(graph, pruned, tokenizer, slug="s", scan="/x", node_threshold=0.8)
    ids = {n["node_id"] for n in data["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    assert sum(n["feature_type"] == "embedding" for n in data["nodes"]) == graph.n_pos
    for n in data["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            layer, f, pos = map(int, n["node_id"].split("_"))
            assert n["feature"] == cantor(layer, f) and n["ctx_idx"] == pos
    # each link's weight is the adjacency entry A[target, source]
    logit = next(n for n in data["nodes"] if n["is_target_logit"])
    assert logit["clerp"].startswith('Output "') and "(p=" in logit["clerp"]


@needs_ct
def test_agrees_with_circuit_tracer(tmp_path, tiny_model_dir):
    """Same tiny model, transcoder and prompt: circuit-tracer's adjacency and pruned JSON."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    _make_loadable_by_transformers_4(model_dir)  # circuit-tracer pins transformers 4.x
    export_transcoder(make_transcoder(), tmp_path / "tc", model_name="tiny")
    transcoder = load_transcoder(tmp_path / "tc")
    # BOS written out: circuit-tracer would prepend the pad token, skipping BOS id 0 as falsy
    prompt = "<bos>The capital of France is"
    cmd = [str(CT_PYTHON), str(CT_DIR / "attribute.py"), str(model_dir), str(tmp_path / "tc")]
    cmd += [prompt, str(tmp_path / "ct.pt"), "--max-feature-nodes", "30", "--batch-size", "16"]
    cmd += ["--graph-dir", str(tmp_path / "ct_graphs"), "--slug", "s", "--scan", "/x"]
    subprocess.run(cmd, check=True, capture_output=True)
    theirs = torch.load(tmp_path / "ct.pt", weights_only=True)
    model, tokenizer = load_pretrained(str(model_dir), dtype=torch.float32)
    model.requires_grad_(False)
    graph = attribute(model, tokenizer, transcoder, prompt, max_feature_nodes=30, batch_size=16)
    assert torch.equal(graph.active_features, theirs["active_features"])
    assert torch.equal(graph.selected, theirs["selected_features"])
    assert torch.equal(graph.logit_ids, theirs["logit_ids"])
    torch.testing.assert_close(graph.adjacency, theirs["adjacency"], rtol=1e-4, atol=1e-5)
    ours = graph_json(graph, prune(graph), tokenizer, slug="s", scan="/x", node_threshold=0.8)
    reference = json.loads((tmp_path / "ct_graphs" / "s.json").read_text())
    assert ours["metadata"] == reference["metadata"]
    assert [n["node_id"] for n in ours["nodes"]] == [n["node_id"] for n in reference["nodes"]]
    assert [(e["source"], e["target"]) for e in ours["links"]] == [
        (e["source"], e["target"]) for e in reference["links"]
    ]
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    validate = "import sys; from circuit_tracer.frontend.graph_models import Model; "
    validate += "Model.model_validate_json(open(sys.argv[1]).read())"
    subprocess.run([str(CT_PYTHON), "-c", validate, str(tmp_path / "ours.json")], check=True)
    for a, b in zip(ours["nodes"], reference["nodes"]):
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if k not in ("influence", "activation")} == {
            k: v for k, v in b.items() if k not in ("influence", "activation")
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_ct
def test_circuit_tracer_server_serves_our_graphs(tiny_params):
    """circuit-tracer's own `start-server` serves our graph folder over HTTP."""
    make, _, out = tiny_params
    run(make(), progress=False)
    port = _free_port()
    server = subprocess.Popen(
        [
            str(CT_PYTHON.parent / "circuit-tracer"),
            "start-server",
            "--graph_file_dir",
            str(out),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/data/graph-metadata.json", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        with urllib.request.urlopen(base + "/data/graph-metadata.json") as response:
            listed = json.loads(response.read())
        assert [g["slug"] for g in listed["graphs"]] == ["count", "france"]
        with urllib.request.urlopen(base + "/graph_data/france.json") as response:
            served = response.read()
        if response.headers.get("Content-Encoding") == "gzip":
            served = gzip.decompress(served)
        assert json.loads(served) == json.loads((out / "france.json").read_text())
    finally:
        server.terminate()
        server.wait()


def test_repacking_relabels_without_attribution(tiny_params, monkeypatch):
    """Feature nodes' `clerp` comes from the packed features; a new pack re-labels every
    graph from the cache, without attribution."""
    make, _, out = tiny_params
    features = out.parent / "features"
    assert run(make(), progress=False) == {"count": "computed", "france": "computed"}
    nodes = json.loads((out / "france.json").read_text())["nodes"]
    assert all(n["clerp"] == "" for n in nodes if n["feature_type"] == "cross layer transcoder")
    assert any(n["clerp"].startswith("Output") for n in nodes if n["feature_type"] == "logit")

    def pack(tag: str):
        return write_packed(
            features, [[record([f"{tag}{l}.{f}"], [f" out{f}"]) for f in range(24)] for l in range(3)]
        )

    def no_attribution(*args, **kwargs):
        raise AssertionError("attribute called")

    monkeypatch.setattr("pipeline.graphs.attribute", no_attribution)
    pngs = set()
    for tag in ("a", "b"):
        pack(tag)
        assert run(make(), progress=False) == {"count": "pruned", "france": "pruned"}
        nodes = json.loads((out / "france.json").read_text())["nodes"]
        labelled = [n for n in nodes if n["feature_type"] == "cross layer transcoder"]
        assert labelled
        for n in labelled:
            f = n["node_id"].split("_")[1]
            assert n["clerp"] == f'"{tag}{n["layer"]}.{f}" → " out{f}"'
        pngs.add((out / "france.png").read_bytes())
        assert run(make(), progress=False) == {"count": "kept", "france": "kept"}
    assert len(pngs) == 2  # the labels are drawn


def synthetic_graph(*, n_layers=30, n_pos=6, n_features=333, n_errors=20, n_links=16972, seed=0) -> dict:
    """A graph JSON the size of the default model's capital-france graph (369 nodes, 16,972
    links), with random influences, labels and edges from lower to higher layers."""
    import random

    rng = random.Random(seed)
    words = [" Paris", "France", " capital", " of", "\n", " Lyon", " Europe", "ization", "  ", " 1789"]

    def node(node_id, feature, layer, pos, kind, **extra):
        return {
            "node_id": node_id,
            "feature": feature,
            "layer": layer,
            "ctx_idx": pos,
            "feature_type": kind,
            "token_prob": 0.0,
            "is_target_logit": False,
            "clerp": "",
            "influence": rng.random(),
            **extra,
        }

    nodes = [node(f"E_{p}_{p}", p, "E", p, "embedding") for p in range(n_pos)]
    cells = set()
    while len(cells) < n_features:
        cells.add(
            (rng.randrange(n_layers), rng.randrange(8192), min(n_pos - 1, int(n_pos * rng.random() ** 0.4)))
        )
    for l, f, p in sorted(cells):
        top = [rng.choice(words) for _ in range(rng.randint(1, 6))]
        clerp = feature_label(record(top, rng.sample(words, 3))) if rng.random() > 0.1 else ""
        nodes.append(node(f"{l}_{f}_{p}", cantor(l, f), str(l), p, "cross layer transcoder", clerp=clerp))
    for k in range(n_errors):
        l, p = k % n_layers, rng.randrange(n_pos)
        nodes.append(node(f"0_{l}_{p}", -1, str(l), p, "mlp reconstruction error"))
    for k in range(10):
        prob = 0.5 / (k + 1)
        nodes.append(
            node(
                f"{n_layers + 1}_{k}_{n_pos - 1}",
                k,
                str(n_layers + 1),
                n_pos - 1,
                "logit",
                token_prob=prob,
                clerp=f'Output "{words[k]}" (p={prob:.3f})',
                influence=None,
            )
        )
    nodes = list({n["node_id"]: n for n in nodes}.values())

    def rank(n):
        return -1 if n["layer"] == "E" else int(n["layer"])

    links = {}
    while len(links) < n_links:
        s, t = rng.choice(nodes), rng.choice(nodes)
        if rank(s) < rank(t) and s["feature_type"] != "logit" and s["ctx_idx"] <= t["ctx_idx"]:
            links[(s["node_id"], t["node_id"])] = rng.gauss(0, 1) * rng.random() ** 3
    tokens = ["<bos>", "The", " capital", " of", " France", " is", " a", " city"][:n_pos]
    metadata = {"slug": "synthetic", "prompt_tokens": tokens, "prompt": "".join(tokens)}
    return {
        "metadata": metadata,
        "nodes": nodes,
        "links": [{"source": s, "target": t, "weight": w} for (s, t), w in links.items()],
    }


def text_boxes(fig) -> list:
    """The window extent of every text of `fig`, its box included."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for ax in fig.axes for t in ax.texts]
    return [(t.get_bbox_patch() or t).get_window_extent(renderer) for t in texts]


@pytest.mark.parametrize(
    "shape",
    [
        {},  # the default model's size
        {"n_layers": 2, "n_pos": 3, "n_features": 60, "n_errors": 2, "n_links": 900},  # crowded cells
        {"n_layers": 6, "n_pos": 8, "n_features": 6, "n_errors": 1, "n_links": 40, "seed": 1},  # small
    ],
)
def test_png_draws_few_labelled_nodes_without_overlapping_text(shape):
    data = synthetic_graph(**shape)
    fig = graph_figure(data)
    texts = [t for t in fig.axes[0].texts]
    drawn = {t.get_gid(): t.get_text() for t in texts if t.get_gid()}
    assert 10 <= len(drawn) <= 40 or len(drawn) == len(data["nodes"])
    by_id = {n["node_id"]: n for n in data["nodes"]}
    assert {n["node_id"] for n in data["nodes"] if n["feature_type"] == "logit"} & set(drawn)
    for node_id, text in drawn.items():
        n = by_id[node_id]
        if n["feature_type"] == "cross layer transcoder" and n["clerp"]:
            assert text.startswith(n["clerp"].split(" ")[0])
    boxes = text_boxes(fig)
    width, height = fig.get_size_inches() * fig.dpi
    for i, a in enumerate(boxes):
        assert 0 <= a.x0 and a.x1 <= width and 0 <= a.y0 and a.y1 <= height, texts[i].get_text()
        for j in range(i):
            b = boxes[j]
            overlap = a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1
            assert not overlap, (texts[i].get_text(), texts[j].get_text())
    links = select_links(data, set(drawn), fraction=0.8, max_in=3)
    assert len(fig.axes[0].patches) == len(links) < 3 * len(drawn)
    assert max(Counter(link["target"] for link, _ in links).values()) <= 3


def test_png_labels_wrap_between_tokens():
    assert wrap_label('"b2.13" → " out13"') == ['"b2.13" → " out13"']
    label = '"Paris" "France" " Paris" → " Paris" " French" " capital"'
    assert wrap_label(label) == ['"Paris" "France" " Paris"', '→ " Paris" " French" " capital"']
    assert wrap_label(label, width=24) == ['"Paris" "France"', '" Paris"', '→ " Paris" " French"…']
    assert wrap_label(" ".join(["word"] * 40), width=20) == [
        "word word word word",
        "word word word word",
        "word word word word…",
    ]


def test_png_is_deterministic(tmp_path):
    data = synthetic_graph()
    draw_graph(data, tmp_path / "a.png")
    draw_graph(json.loads(json.dumps(data)), tmp_path / "b.png")
    png = (tmp_path / "a.png").read_bytes()
    assert png.startswith(b"\x89PNG") and png == (tmp_path / "b.png").read_bytes()
    assert b"matplotlib" not in png  # no software version in the file
