"""Attribution wall time and peak memory: ours vs circuit-tracer, side by side, per prompt.

    python -m bench.graphs [--max-feature-nodes 256] [--batch-size 128] [--rounds 1]

For a short (6 tokens with BOS) and a longer (~60 tokens) prompt, on the default model
(`data/model`, float32, CPU) and transcoder (`data/transcoder`), each side runs in its own
fresh process (circuit-tracer in its venv, built by ct/venv.sh if missing) so
peak RSS (`ru_maxrss`) is per side. Wall time excludes model loading on both sides.
Prints both times, both peak RSS and the ratios; rounds alternate the two sides.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CT_PYTHON = ROOT / ".ct-venv" / "bin" / "python"
CT_ATTRIBUTE = ROOT / "ct" / "attribute.py"
PROMPTS = {
    "short": "The capital of France is",
    "long": (
        "The war lasted from 1732 to 1738. During those years the small kingdom raised taxes, "
        "built three fortresses along the river and sent envoys to every court in the east, "
        "hoping that a treaty would end the war before the harvest of 17"
    ),
}


def ours(prompt: str, max_feature_nodes: int, batch_size: int) -> dict:
    """Run in this process (called through `--ours`)."""
    from pipeline.attribution.attribute import attribute
    from pipeline.clt import load_transcoder
    from pipeline.model import load_model

    model, tokenizer = load_model(ROOT / "data" / "model", dtype=torch.float32, device=torch.device("cpu"))
    model.requires_grad_(False)
    transcoder = load_transcoder(ROOT / "data" / "transcoder")
    start = time.perf_counter()
    graph = attribute(
        model, tokenizer, transcoder, prompt, max_feature_nodes=max_feature_nodes, batch_size=batch_size
    )
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "n_pos": graph.n_pos,
        "n_active": len(graph.active_features),
    }


def run_ours(prompt: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.graphs", "--ours", prompt]
    cmd += ["--max-feature-nodes", str(args.max_feature_nodes), "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_theirs(prompt: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(CT_PYTHON), str(CT_ATTRIBUTE), str(ROOT / "data" / "model")]
        cmd += [str(ROOT / "data" / "transcoder"), prompt, f"{tmp}/g.pt"]
        cmd += ["--max-feature-nodes", str(args.max_feature_nodes), "--batch-size", str(args.batch_size)]
        subprocess.run(cmd, check=True, capture_output=True)
        result = torch.load(f"{tmp}/g.pt", weights_only=True)
    return {"seconds": result["seconds"], "peak_rss_mb": result["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-feature-nodes", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ours", metavar="PROMPT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours is not None:
        print(json.dumps(ours(args.ours, args.max_feature_nodes, args.batch_size)))
        return
    if not CT_PYTHON.exists():
        subprocess.run(["bash", str(ROOT / "ct" / "venv.sh")], check=True)
    print(f"max_feature_nodes={args.max_feature_nodes} batch_size={args.batch_size} (float32, CPU)")
    for name, prompt in PROMPTS.items():
        for r in range(args.rounds):
            a = run_ours(prompt, args)
            b = run_theirs(prompt, args)
            print(
                f"{name:5s} n_pos={a['n_pos']:3d} active={a['n_active']:6d} round {r}: "
                f"ours {a['seconds']:7.1f} s {a['peak_rss_mb']:7.0f} MB | "
                f"circuit-tracer {b['seconds']:7.1f} s {b['peak_rss_mb']:7.0f} MB | "
                f"speed-up {b['seconds'] / a['seconds']:5.2f}x, "
                f"memory ratio {a['peak_rss_mb'] / b['peak_rss_mb']:4.2f}"
            )


if __name__ == "__main__":
    main()
