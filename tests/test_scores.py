"""Graph scores against a naive dense computation and against circuit-tracer's own
`compute_graph_scores` on the same model, transcoder and prompt."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from pipeline.attribution.attribute import attribute
from pipeline.attribution.scores import graph_scores
from pipeline.clt import export_transcoder, load_transcoder
from pipeline.model import _make_loadable_by_transformers_4, load_pretrained
from tests.ct import CT_DIR, CT_PYTHON, CT_SKIP_REASON
from tests.tiny import make_transcoder

PROMPT = "<bos>The capital of France is"  # BOS written out, as circuit-tracer needs for id 0


def naive_scores(graph) -> dict[str, float]:
    """The definitions with the total influence as w ((I - A)^-1 - I), in float64."""
    A = graph.adjacency.double().abs()
    A = A / A.sum(1, keepdim=True).clamp(min=1e-10)
    n, n_logits = len(A), len(graph.logit_ids)
    eye = torch.eye(n, dtype=torch.float64)
    w = torch.zeros(n, dtype=torch.float64)
    w[-n_logits:] = graph.logit_probs.double()
    influence = w @ (torch.linalg.inv(eye - A) - eye)
    error_start = len(graph.selected)
    token_start = error_start + graph.n_layers * graph.n_pos
    errors, tokens = slice(error_start, token_start), slice(token_start, token_start + graph.n_pos)
    logits = slice(n - n_logits, n)
    error_in = A[:, errors].sum(1)
    out = influence + w
    token_influence, error_influence = influence[tokens].sum(), influence[errors].sum()
    return {
        "replacement_score": float(token_influence / (token_influence + error_influence)),
        "completeness_score": float(((1 - error_in) * out).sum() / out.sum()),
        "logit_error_share": float((w[logits] * error_in[logits]).sum() / w[logits].sum()),
    }


@pytest.fixture
def tiny_graph(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    _make_loadable_by_transformers_4(model_dir)  # circuit-tracer pins transformers 4.x
    export_transcoder(make_transcoder(), tmp_path / "tc", model_name="tiny")
    model, tokenizer = load_pretrained(str(model_dir), dtype=torch.float32)
    model.requires_grad_(False)
    graph = attribute(
        model, tokenizer, load_transcoder(tmp_path / "tc"), PROMPT, max_feature_nodes=30, batch_size=16
    )
    return graph, model_dir, tmp_path / "tc"


def test_scores_match_the_naive_definition(tiny_graph):
    graph = tiny_graph[0]
    ours, naive = graph_scores(graph), naive_scores(graph)
    assert ours.keys() == naive.keys()
    for key in ours:
        assert ours[key] == pytest.approx(naive[key], abs=1e-5), key
    assert 0 < ours["replacement_score"] < 1 and 0 < ours["completeness_score"] < 1


def test_a_graph_without_errors_scores_one(tiny_graph):
    graph = tiny_graph[0]
    f = len(graph.selected)
    graph.adjacency[:, f : f + graph.n_layers * graph.n_pos] = 0  # no edge from any error node
    scores = graph_scores(graph)
    assert scores["replacement_score"] == pytest.approx(1.0)
    assert scores["completeness_score"] == pytest.approx(1.0)
    assert scores["logit_error_share"] == 0.0


@pytest.mark.skipif(not CT_PYTHON.exists(), reason=CT_SKIP_REASON)
def test_scores_equal_circuit_tracers(tiny_graph, tmp_path):
    graph, model_dir, transcoder_dir = tiny_graph
    cmd = [str(CT_PYTHON), str(CT_DIR / "attribute.py"), str(model_dir), str(transcoder_dir), PROMPT]
    cmd += [str(tmp_path / "ct.pt"), "--max-feature-nodes", "30", "--batch-size", "16"]
    subprocess.run(cmd, check=True, capture_output=True)
    theirs = torch.load(tmp_path / "ct.pt", weights_only=True)
    ours = graph_scores(graph)
    assert ours["replacement_score"] == pytest.approx(theirs["replacement_score"], abs=1e-4)
    assert ours["completeness_score"] == pytest.approx(theirs["completeness_score"], abs=1e-4)
