"""Compare our attribution graph with circuit-tracer's on the same model, transcoder and prompt.

    python -m ct.compare_graphs [--prompt "The capital of France is"] [--max-feature-nodes 256]

Builds circuit-tracer's separate venv if missing (`ct/venv.sh`), runs its
`attribute` (nnsight backend, float32, CPU) through `ct/attribute.py`, runs ours with
the same settings, matches nodes by identity (feature = (layer, pos, index), error =
(layer, pos), token = pos, logit = token id) and prints the agreement of the adjacency on
the shared nodes: the largest |ours - theirs| relative to the largest |edge|, and the
largest per-edge relative difference over edges above 1e-3 of the largest.
Exits non-zero if the relative difference exceeds --rtol (default 1e-3).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.attribution.attribute import attribute
from pipeline.clt import load_transcoder
from pipeline.model import load_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CT_PYTHON = ROOT / ".ct-venv" / "bin" / "python"


def node_keys(active, selected, n_layers, n_pos, logit_ids) -> list[tuple]:
    """Identity of each node of a graph, in its adjacency order."""
    keys = [("feature", *map(int, active[i])) for i in selected.tolist()]
    keys += [("error", l, p) for l in range(n_layers) for p in range(n_pos)]
    keys += [("token", p) for p in range(n_pos)]
    keys += [("logit", int(t)) for t in logit_ids]
    return keys


def compare(ours: dict, theirs: dict, n_layers: int) -> dict:
    n_pos = len(ours["input_tokens"])
    k_ours = node_keys(ours["active_features"], ours["selected_features"], n_layers, n_pos, ours["logit_ids"])
    k_theirs = node_keys(
        theirs["active_features"], theirs["selected_features"], n_layers, n_pos, theirs["logit_ids"]
    )
    index_theirs = {k: i for i, k in enumerate(k_theirs)}
    shared = [(i, index_theirs[k]) for i, k in enumerate(k_ours) if k in index_theirs]
    a = torch.tensor([i for i, _ in shared])
    b = torch.tensor([j for _, j in shared])
    A, B = ours["adjacency"][a][:, a], theirs["adjacency"][b][:, b]
    scale = B.abs().max()
    big = B.abs() > 1e-3 * scale
    per_edge = ((A - B).abs()[big] / B.abs()[big]).max()
    return {
        "nodes_ours": len(k_ours),
        "nodes_theirs": len(k_theirs),
        "nodes_shared": len(shared),
        "features_shared": sum(k[0] == "feature" for k in (k_ours[i] for i, _ in shared)),
        "same_tokens": bool(torch.equal(ours["input_tokens"], theirs["input_tokens"].cpu())),
        "same_logits": bool(torch.equal(ours["logit_ids"], theirs["logit_ids"].cpu())),
        "max_abs_diff_over_max_edge": float((A - B).abs().max() / scale),
        "max_rel_diff_edges_above_1e-3": float(per_edge),
        "n_edges_compared": int(big.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", default="data/model")
    parser.add_argument("--transcoder", default="data/transcoder")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-feature-nodes", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rtol", type=float, default=1e-3)
    args = parser.parse_args()
    if not CT_PYTHON.exists():
        subprocess.run(["bash", str(HERE / "venv.sh")], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ct.pt"
        cmd = [str(CT_PYTHON), str(HERE / "attribute.py"), str(Path(args.model_dir).resolve())]
        cmd += [str(Path(args.transcoder).resolve()), args.prompt, str(out)]
        cmd += ["--max-feature-nodes", str(args.max_feature_nodes), "--batch-size", str(args.batch_size)]
        subprocess.run(cmd, check=True)
        theirs = torch.load(out, weights_only=True)
    model, tokenizer = load_model(args.model_dir, dtype=torch.float32, device=torch.device("cpu"))
    model.requires_grad_(False)
    transcoder = load_transcoder(args.transcoder)
    start = time.perf_counter()
    graph = attribute(
        model,
        tokenizer,
        transcoder,
        args.prompt,
        max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
    )
    seconds = time.perf_counter() - start
    ours = {
        "adjacency": graph.adjacency,
        "active_features": graph.active_features,
        "selected_features": graph.selected,
        "input_tokens": graph.input_ids,
        "logit_ids": graph.logit_ids,
    }
    result = compare(ours, theirs, graph.n_layers)
    result |= {"seconds_ours": round(seconds, 2), "seconds_theirs": round(theirs["seconds"], 2)}
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["max_abs_diff_over_max_edge"] <= args.rtol else 1)


if __name__ == "__main__":
    main()
