"""Run circuit-tracer's own `attribute` (nnsight backend) on one prompt (run with .ct-venv's python).

    .ct-venv/bin/python ct/attribute.py MODEL_DIR TRANSCODER_DIR PROMPT OUT.pt \
        [--max-feature-nodes N] [--batch-size B] [--max-n-logits K] [--desired-logit-prob P]

OUT.pt gets the unpruned graph (`adjacency`, `active_features`, `selected_features`,
`activation_values`, `input_tokens`, `logit_ids`, `logit_probs`), circuit-tracer's
`compute_graph_scores` of it (`replacement_score`, `completeness_score`), the attribution's wall
time `seconds` (model loading excluded) and the process's peak RSS `peak_rss_mb`. With
--graph-dir, circuit-tracer's `create_graph_files` also writes the pruned graph JSON there.
Paths must be absolute (offline loading in circuit-tracer needs that).
"""

import argparse
import os
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("transcoder_dir")
    parser.add_argument("prompt")
    parser.add_argument("out")
    parser.add_argument("--max-feature-nodes", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-n-logits", type=int, default=10)
    parser.add_argument("--desired-logit-prob", type=float, default=0.95)
    parser.add_argument("--graph-dir", help="also write the pruned graph JSON here (create_graph_files)")
    parser.add_argument("--slug", default="graph")
    parser.add_argument("--scan", default="scan")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from circuit_tracer import ReplacementModel, attribute

    model = ReplacementModel.from_pretrained(
        os.path.abspath(args.model_dir),
        os.path.abspath(args.transcoder_dir),
        backend="nnsight",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    start = time.perf_counter()
    graph = attribute(
        args.prompt,
        model,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        batch_size=args.batch_size,
        max_feature_nodes=args.max_feature_nodes,
    )
    seconds = time.perf_counter() - start
    from circuit_tracer.graph import compute_graph_scores

    replacement_score, completeness_score = compute_graph_scores(graph)
    torch.save(
        {
            "adjacency": graph.adjacency_matrix,
            "active_features": graph.active_features,
            "selected_features": graph.selected_features,
            "activation_values": graph.activation_values,
            "input_tokens": graph.input_tokens,
            "logit_ids": torch.tensor([t.vocab_idx for t in graph.logit_targets]),
            "logit_probs": graph.logit_probabilities,
            "replacement_score": replacement_score,
            "completeness_score": completeness_score,
            "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        args.out,
    )
    if args.graph_dir:
        from circuit_tracer.utils.create_graph_files import create_graph_files

        create_graph_files(graph, args.slug, args.graph_dir, scan=args.scan)


if __name__ == "__main__":
    main()
