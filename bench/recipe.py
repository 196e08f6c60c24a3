"""Training recipes side by side: each run trains, evaluates and scores graphs.

    python -m bench.recipe --out /tmp/recipe RUN [RUN ...]
    python -m bench.recipe --list

A run is a named set of `train.*` changes to `params.yaml` (`RUNS`), or another run's
transcoder fine-tuned on KL (`FINETUNES`, `python -m bench.finetune` in place of `clt train`). Each runs
`clt train`, `clt evaluate` and `clt graphs` on a copy of the params whose outputs lie
under `--out/RUN` (the store, the model and the prompts are the repository's, so
`dvc repro dump` first), and writes `--out/RUN/row.json`: train time, validation NMSE,
L0 and dead fraction (`metrics/train.json`), CE recovered, KL and top-1
(`metrics/evaluate.json`), and the mean replacement and completeness scores of the
prompts' graphs (`metrics/graphs.json`, circuit-tracer's definitions). A run with a
`row.json` is not run again, but one whose graphs were scored with other `graphs:` params
than `params.yaml`'s runs `clt graphs` again. The table printed at the end is docs/results.md's format.
Runs are sequential: on a shared machine, runs side by side would time each other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

HALF = {"n_steps": 400, "layer0_weight": 1.0, "kl_steps": 0}
"""The comparison budget of the recipe rows, 400 MSE steps of 1,024 tokens, with the paper's
loss (every layer's error weighted alike) and no KL phase."""

RUNS: dict[str, tuple[str, dict]] = {
    "base": ("CLT, 256 features, 400 steps, layer 0 weighted 1x", HALF),
    "default": ("CLT, the defaults of params.yaml", {}),
    "steps-200": ("CLT, 256 features, 200 steps", {**HALF, "n_steps": 200}),
    "enc-transpose": ("encoder from the decoder's transpose", {**HALF, "encoder_init": "transpose"}),
    "batchtopk-16": ("BatchTopK k 16, exported as JumpReLU", {**HALF, "activation": "batchtopk", "k": 16}),
    "batchtopk-32": ("BatchTopK k 32, exported as JumpReLU", {**HALF, "activation": "batchtopk", "k": 32}),
    "lambda-0.5": ("sparsity_coef 0.5", {**HALF, "sparsity_coef": 0.5}),
    "d512-200": (
        "512 features, 200 steps (the time of 256 x 400)",
        {**HALF, "d_transcoder": 512, "n_steps": 200},
    ),
    "d512": ("512 features, 400 steps", {**HALF, "d_transcoder": 512}),
    "d1024": ("1024 features, 400 steps", {**HALF, "d_transcoder": 1024}),
    "plt": ("per-layer transcoders, sparsity_coef 2.5", {**HALF, "kind": "plt", "sparsity_coef": 2.5}),
    "layer0-x4": ("layer 0's reconstruction weighted 4x in the MSE", {**HALF, "layer0_weight": 4.0}),
    "layer0-x8": ("layer 0's reconstruction weighted 8x in the MSE", {**HALF, "layer0_weight": 8.0}),
    "layer0-x16": (
        "layer 0's reconstruction weighted 16x in the MSE (the default's MSE phase)",
        {**HALF, "layer0_weight": 16.0},
    ),
    "plt-layer0-x16": (
        "per-layer transcoders, sparsity_coef 2.5, layer 0 weighted 16x",
        {**HALF, "kind": "plt", "sparsity_coef": 2.5, "layer0_weight": 16.0},
    ),
    "steps-800": ("800 MSE steps (layer 0 weighted 16x), no KL phase", {"n_steps": 800, "kl_steps": 0}),
    "steps-400-kl-100": (
        "400 steps (layer 0 weighted 16x), then the KL phase: 100 steps of 8 sequences",
        {"n_steps": 400, "kl_steps": 100, "kl_batch_size": 8},
    ),
    "steps-400-kl-50": (
        "400 steps (layer 0 weighted 16x), then the KL phase: 50 steps of 8 sequences",
        {"n_steps": 400, "kl_steps": 50, "kl_batch_size": 8},
    ),
}

FINETUNES: dict[str, tuple[str, str, dict]] = {
    "kl-100": (
        "800 MSE steps, then 100 steps of KL fine-tuning (8 sequences, lr 1e-4, FVU weight 1)",
        "steps-800",
        {"steps": 100, "batch_size": 8, "lr": 1e-4, "mse_coef": 1.0},
    ),
    "kl-100-lr3e-4": (
        "800 MSE steps, then 100 steps of KL fine-tuning (8 sequences, lr 3e-4, FVU weight 1)",
        "steps-800",
        {"steps": 100, "batch_size": 8, "lr": 3e-4, "mse_coef": 1.0},
    ),
    "x16-kl-200": (
        "400 MSE steps (layer 0 weighted 16x), then 200 KL steps of 8 sequences",
        "layer0-x16",
        {"steps": 200, "batch_size": 8, "lr": 1e-4, "mse_coef": 1.0},
    ),
    "x16-kl-b4-200": (
        "400 MSE steps (layer 0 weighted 16x), then 200 KL steps of 4 sequences",
        "layer0-x16",
        {"steps": 200, "batch_size": 4, "lr": 1e-4, "mse_coef": 1.0},
    ),
}
"""Runs that fine-tune another run's transcoder on KL to the original model (`python -m
bench.finetune`, in place of `clt train`): name -> (description, source run, its options)."""

STAGES = ("train", "evaluate", "graphs")
OUTPUTS = ("transcoder", "metrics", "examples", "features", "graphs", "plots")


def write_params(run: str, changes: dict, out: Path) -> Path:
    """A copy of params.yaml with `changes` in `train` and every output under `out`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in ("model_dir", "activations", "prompts"):
        params["paths"][key] = str(ROOT / params["paths"][key])
    for key in OUTPUTS:
        params["paths"][key] = str(out / key)
    unknown = set(changes) - set(params["train"])
    if unknown:
        sys.exit(f"run {run}: unknown train keys {sorted(unknown)}")
    params["train"].update(changes)
    path = out / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_one(run: str, out: Path, previous: dict | None = None) -> dict:
    """Train, evaluate and score `run` under `out`; given the `previous` row (its graphs scored
    with other `graphs:` params), only `graphs` runs again."""
    if run in FINETUNES:
        description, source, options = FINETUNES[run]
        changes = {"finetune": {"source": source, **options}}
        if not (out.parent / source / "row.json").is_file():
            sys.exit(f"run {run} fine-tunes run {source}'s transcoder: run {source} first")
    else:
        description, changes = RUNS[run]
    out.mkdir(parents=True, exist_ok=True)
    if previous:
        # the transcoder stays the one trained on the params written then: only `graphs:` changes
        params = out / "params.yaml"
        written = yaml.safe_load(params.read_text())
        written["graphs"] = yaml.safe_load((ROOT / "params.yaml").read_text())["graphs"]
        params.write_text(yaml.safe_dump(written, sort_keys=False))
    else:
        params = write_params(run, {} if run in FINETUNES else changes, out)
    stages = ("graphs",) if previous else STAGES
    seconds = {stage: previous[f"{stage}_seconds"] for stage in STAGES} if previous else {}
    for stage in stages:
        start = time.perf_counter()
        log = (out / f"{stage}.log").open("w")
        cmd = [sys.executable, "-m", "pipeline.cli", stage, "--params", str(params)]
        if stage == "train" and run in FINETUNES:
            cmd = [sys.executable, "-m", "bench.finetune", "--params", str(params)]
            cmd += ["--source", str(out.parent / source / "transcoder")]
            cmd += [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
        if subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"run {run}: `{' '.join(cmd)}` failed, see {out / f'{stage}.log'}")
        seconds[stage] = time.perf_counter() - start
    metrics = {name: json.loads((out / "metrics" / f"{name}.json").read_text()) for name in STAGES}
    row = {
        "run": run,
        "description": description,
        "changes": changes,
        "train_seconds": seconds["train"],
        "evaluate_seconds": seconds["evaluate"],
        "graphs_seconds": seconds["graphs"],
        **{k: metrics["train"]["mean"][k] for k in ("nmse", "l0", "dead_fraction")},
        **{k: metrics["evaluate"][k] for k in ("ce_recovered", "kl_replacement", "top1_agreement")},
        **{k: metrics["graphs"]["mean"][k] for k in ("replacement_score", "completeness_score")},
        "graphs_params": yaml.safe_load(params.read_text())["graphs"],
    }
    (out / "row.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def table_row(row: dict) -> str:
    minutes, seconds = divmod(round(row["train_seconds"]), 60)
    return (
        f"| {row['description']} | {row['replacement_score']:.3f} | {row['completeness_score']:.3f} "
        f"| {row['top1_agreement']:.1%} | {row['kl_replacement']:.2f} | {row['ce_recovered']:.3f} "
        f"| {row['nmse']:.3f} | {row['l0']:.1f} | {row['dead_fraction']:.2%} | {minutes}m{seconds:02d}s |"
    )


HEADER = (
    "| run | replacement | completeness | top-1 | KL | CE recovered | val NMSE | L0 | dead | train time |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", metavar="RUN", help="runs to make (see --list)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/recipe"), help="folder of the runs")
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    args = parser.parse_args()
    if args.list or not args.runs:
        for name, (description, changes) in RUNS.items():
            print(f"{name:14} {description}  {changes}")
        for name, (description, source, options) in FINETUNES.items():
            print(f"{name:14} {description}  from {source}: {options}")
        return
    for run in args.runs:
        if run not in RUNS and run not in FINETUNES:
            sys.exit(f"unknown run {run!r}; --list shows them")
    graphs_params = yaml.safe_load((ROOT / "params.yaml").read_text())["graphs"]
    rows = []
    for run in args.runs:
        out = args.out.resolve() / run
        if not (out / "row.json").is_file():
            row = run_one(run, out)
        else:
            row = json.loads((out / "row.json").read_text())
            if row.get("graphs_params") != graphs_params:
                row = run_one(run, out, previous=row)
        rows.append(row)
        print(table_row(row), flush=True)
    print(HEADER)
    for row in rows:
        print(table_row(row))


if __name__ == "__main__":
    main()
