"""Suggested supernodes (pipeline/supernodes.py): the grouping on constructed cases, the
names, and the graph JSON that carries them (still valid for circuit-tracer's frontend)."""

import json
import subprocess

import numpy as np
import pytest
import torch

from pipeline.attribution.attribute import attribute
from pipeline.config import GraphsConfig
from pipeline.graphs import Prompt, write_outputs
from pipeline.model import load_pretrained
from pipeline.supernodes import group, name_group, suggest_supernodes, suggestion_id
from tests.ct import CT_PYTHON, CT_SKIP_REASON
from tests.tiny import make_transcoder


def feature(layer: int, f: int, pos: int, clerp: str = "", influence: float = 0.5) -> dict:
    return {
        "node_id": f"{layer}_{f}_{pos}",
        "feature_type": "cross layer transcoder",
        "ctx_idx": pos,
        "clerp": clerp,
        "influence": influence,
    }


def constructed(*, pos_b: int = 2) -> tuple[dict, list[torch.Tensor]]:
    """Features a = 0_0, b = 1_3 (identical decoder sums and edges), c = 0_1 and d = 1_4
    (unrelated decoders and edges), all at position 2 but b at `pos_b`."""
    d_model = 8
    W_dec = [torch.randn(5, 2, d_model), torch.randn(5, 1, d_model)]  # (d_tc, n_out, d_model)
    W_dec[1][3, 0] = W_dec[0][0].sum(0)  # b's one row is a's summed rows
    nodes = [
        feature(0, 0, 2, '"Paris" → " Paris" " France"', 0.1),
        feature(1, 3, pos_b, '"capital" → " Paris"', 0.2),
        feature(0, 1, 2, '"dog" → " bark"', 0.3),
        feature(1, 4, 2, '"two" → " three"', 0.4),
        {"node_id": "E_5_2", "feature_type": "embedding", "ctx_idx": 2, "clerp": "", "influence": 0.0},
        {"node_id": "3_9_2", "feature_type": "logit", "ctx_idx": 2, "clerp": "", "influence": None},
    ]
    links = [
        {"source": "E_5_2", "target": "0_0_2", "weight": 1.0},
        {"source": "E_5_2", "target": f"1_3_{pos_b}", "weight": 1.0},
        {"source": "0_0_2", "target": "3_9_2", "weight": 0.5},
        {"source": f"1_3_{pos_b}", "target": "3_9_2", "weight": 0.5},
        {"source": "0_1_2", "target": "1_4_2", "weight": -0.7},
        {"source": "1_4_2", "target": "3_9_2", "weight": -0.2},
    ]
    return {"nodes": nodes, "links": links}, W_dec


def test_identical_features_are_grouped_and_unrelated_ones_are_not():
    data, W_dec = constructed()
    suggestions = suggest_supernodes(data, W_dec)
    assert suggestions == [
        {
            "id": suggestion_id(["0_0_2", "1_3_2"]),
            "name": '→ " Paris"',
            "members": ["0_0_2", "1_3_2"],  # most influential first
            "similarity": 1.0,
        }
    ]
    assert suggest_supernodes(data, W_dec) == suggestions  # deterministic


def test_distant_positions_are_never_grouped():
    data, W_dec = constructed(pos_b=4)
    assert suggest_supernodes(data, W_dec) == []
    assert len(suggest_supernodes(data, W_dec, max_pos_gap=2)) == 1


def test_average_linkage():
    S = np.array(
        [
            [1.0, 0.9, 0.7, -np.inf],
            [0.9, 1.0, 0.6, 0.9],
            [0.7, 0.6, 1.0, 0.0],
            [-np.inf, 0.9, 0.0, 1.0],
        ]
    )
    # 0+1 (0.9); then {0,1}+2 at mean 0.65 >= 0.6; 3 can never join 0
    assert group(S, threshold=0.6) == [[0, 1, 2], [3]]
    assert group(S, threshold=0.95) == [[0], [1], [2], [3]]


def test_names_and_ids():
    assert name_group(['"a" → " x" " y"', '"b" → " y"']) == '→ " y"'
    assert name_group(['"a" → " x"', '"a" → " y"']) == '"a" →'
    assert name_group(["", '"a" → " x"', '"b" → " y"']) == '"a" → " x"'
    assert name_group(["", ""]) == "supernode"
    assert suggestion_id(["b", "a"]) == suggestion_id(["a", "b"]) != suggestion_id(["a", "c"])


def test_graph_json_carries_suggestions_and_validates(tmp_path, tiny_model_dir):
    model, tokenizer = load_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32)
    model.requires_grad_(False)
    transcoder = make_transcoder()
    graph = attribute(model, tokenizer, transcoder, "The capital of France is", batch_size=32)
    prompt = Prompt("france", "The capital of France is", None, tmp_path / "france.txt")
    (tmp_path / ".cache").mkdir()
    data = write_outputs(
        graph, tokenizer, prompt, GraphsConfig(png=False), "./feature-data/x", tmp_path, None, transcoder
    )
    written = json.loads((tmp_path / "france.json").read_text())
    assert written["metadata"]["supernode_suggestions"] == data["metadata"]["supernode_suggestions"]
    ids = {n["node_id"] for n in data["nodes"]}
    loose = suggest_supernodes(data, list(transcoder.W_dec), threshold=-1.0, max_pos_gap=100)
    assert loose and all(len(s["members"]) >= 2 and set(s["members"]) <= ids for s in loose)
    written["metadata"]["supernode_suggestions"] = loose
    (tmp_path / "loose.json").write_text(json.dumps(written))
    if not CT_PYTHON.exists():
        pytest.skip(CT_SKIP_REASON)
    validate = "import sys; from circuit_tracer.frontend.graph_models import Model; "
    validate += "[Model.model_validate_json(open(p).read()) for p in sys.argv[1:]]"
    paths = [str(tmp_path / "france.json"), str(tmp_path / "loose.json")]
    subprocess.run([str(CT_PYTHON), "-c", validate, *paths], check=True)
