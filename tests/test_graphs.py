"""The `graphs` stage: prompt files, graph JSON, incremental runs, and agreement with circuit-tracer."""

import gzip
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from pipeline.attribution.attribute import attribute
from pipeline.attribution.export import cantor, graph_json
from pipeline.attribution.prune import prune
from pipeline.clt import export_transcoder, load_transcoder
from pipeline.config import parse_params
from pipeline.graphs import parse_prompt, read_prompts, run
from pipeline.model import _make_loadable_by_transformers_4, load_pretrained
from tests.tiny import make_transcoder

ROOT = Path(__file__).resolve().parents[1]
CT_PYTHON = Path(os.environ.get("CT_PYTHON", ROOT / ".ct-venv" / "bin" / "python"))
needs_ct = pytest.mark.skipif(
    not CT_PYTHON.exists(), reason="circuit-tracer venv not built (bash scripts/ct_venv.sh)"
)


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

    def make(**graphs):
        raw = {
            "paths": {
                "model_dir": str(model_dir),
                "transcoder": str(tmp_path / "tc"),
                "prompts": str(prompts),
                "graphs": str(tmp_path / "graphs"),
                "features": str(tmp_path / "features"),
            },
            "graphs": {"max_feature_nodes": 40, "batch_size": 16, **graphs},
            "runtime": {"device": "cpu"},
        }
        return parse_params(raw)

    return make, prompts, tmp_path / "graphs"


def test_stage_is_incremental(tiny_params):
    make, prompts, out = tiny_params
    assert run(make(), progress=False) == {"count": "computed", "france": "computed"}
    assert {p.name for p in out.iterdir()} == {
        "count.json",
        "count.png",
        "france.json",
        "france.png",
        "graph-metadata.json",
        "manifest.json",
    }
    meta = json.loads((out / "graph-metadata.json").read_text())
    assert [g["slug"] for g in meta["graphs"]] == ["count", "france"]
    assert meta["graphs"][0]["scan"] == str(Path(make().paths.features).resolve())
    before = (out / "france.json").read_bytes()
    (prompts / "new.txt").write_text("A stitch in time\n")
    assert run(make(), progress=False) == {"count": "kept", "france": "kept", "new": "computed"}
    assert (out / "france.json").read_bytes() == before
    (prompts / "count.txt").unlink()
    assert run(make(), progress=False) == {"france": "kept", "new": "computed"} | {"new": "kept"}
    assert not (out / "count.json").exists() and not (out / "count.png").exists()
    assert [g["slug"] for g in json.loads((out / "graph-metadata.json").read_text())["graphs"]] == [
        "france",
        "new",
    ]
    assert run(make(node_threshold=0.7), progress=False) == {"france": "computed", "new": "computed"}


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
    cmd = [str(CT_PYTHON), str(ROOT / "scripts" / "ct_attribute.py"), str(model_dir), str(tmp_path / "tc")]
    cmd += [prompt, str(tmp_path / "ct.pt"), "--max-feature-nodes", "30", "--batch-size", "16"]
    cmd += ["--graph-dir", str(tmp_path / "ct_graphs"), "--slug", "s", "--scan", "/x"]
    subprocess.run(cmd, check=True, capture_output=True)
    theirs = torch.load(tmp_path / "ct.pt")
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
