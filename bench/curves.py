"""Scaling curves from recipe runs: graph scores against tokens seen and features per layer.

    python -m bench.curves [--runs /tmp/recipe] [--out docs/curves] [--gpu-hours 1]

Reads each `RUN/row.json` and `RUN/params.yaml` under `--runs` (`python -m bench.recipe`
writes them). Runs whose `train:` sections differ only in `n_steps` and `d_transcoder` form
a family; tokens seen are `n_steps x batch_size`. For each family of three or more runs and
each metric, the gap to perfect (1 - score for the replacement score, completeness and
top-1; KL itself) is fitted by least squares in log space to

    gap = a * tokens^-alpha * features^-beta

and the script writes

- `out/tokens.csv`, `out/features.csv`: the runs along each axis (family, run, tokens,
  features, the metrics): the data of the DVC plots (`dvc.yaml`, top-level `plots:`;
  `dvc plots show`);
- `out/scaling.png`: each metric against tokens and against features per layer (each at
  the other axis's value where the family has the most runs), with the fit;
- `out/fits.json`: per family and metric, a, alpha, beta and the fit's largest residual.

Then, for `--gpu-hours` of one H100 at `bench.scale`'s MFU (the compute-bound paper model:
tokens/s from the CLT's FLOPs per token), it prints the predicted scores for each
dictionary size that fits the GPU's memory, and the size with the best predicted replacement
score. The fit spans the runs' range only (here a few hundred thousand tokens and a few
hundred features per layer); predictions far outside it are extrapolations, and a power law
has no floor, so they are optimistic. Tokens seen beyond the store's training tokens are
repeated passes over the same tokens, not new data.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import yaml

from bench.scale import GPU_MEMORY, Hardware, Model, scale_row

METRICS = {
    # name in row.json: (label, the gap to perfect)
    "replacement_score": ("replacement score", lambda v: 1 - v),
    "completeness_score": ("completeness score", lambda v: 1 - v),
    "top1_agreement": ("top-1 agreement", lambda v: 1 - v),
    "kl_replacement": ("KL(original || replacement)", lambda v: v),
}
SCALED = ("n_steps", "d_transcoder")
"""The train keys a family's runs may differ in."""
IGNORED = ("sparse_decoder", "compile", "checkpoint_every", "compute_dtype")
"""Train keys that change the speed of a run but not what it learns."""


def load_runs(folder: Path) -> list[dict]:
    runs = []
    for row_path in sorted(folder.glob("*/row.json")):
        row = json.loads(row_path.read_text())
        train = yaml.safe_load((row_path.parent / "params.yaml").read_text())["train"]
        rest = {k: v for k, v in train.items() if k not in SCALED + IGNORED}
        runs.append(
            {
                **row,
                "tokens": train["n_steps"] * train["batch_size"],
                "features": train["d_transcoder"],
                "family": json.dumps(rest, sort_keys=True),
            }
        )
    return runs


def fit(runs: list[dict], metric: str) -> dict:
    """gap = a T^-alpha F^-beta by least squares on log gap; a fixed exponent where an axis
    has a single value."""
    gap = METRICS[metric][1]
    y = np.log([gap(r[metric]) for r in runs])
    columns = [np.ones(len(runs))]
    names = ["log_a"]
    for axis, name in (("tokens", "alpha"), ("features", "beta")):
        values = np.log([r[axis] for r in runs])
        if np.ptp(values) > 0:
            columns.append(-values)
            names.append(name)
    coef, *_ = np.linalg.lstsq(np.stack(columns, 1), y, rcond=None)
    params = dict(zip(names, coef.tolist()))
    out = {"a": math.exp(params["log_a"]), "alpha": params.get("alpha"), "beta": params.get("beta")}
    residual = y - np.stack(columns, 1) @ coef
    out["max_abs_log_residual"] = float(np.abs(residual).max())
    out["n_runs"] = len(runs)
    return out


def predict_gap(f: dict, tokens: float, features: float) -> float:
    gap = f["a"]
    if f["alpha"] is not None:
        gap *= tokens ** -f["alpha"]
    if f["beta"] is not None:
        gap *= features ** -f["beta"]
    return gap


def score(metric: str, gap: float) -> float:
    return gap if metric == "kl_replacement" else 1 - gap


def widest(runs: list[dict], axis: str, other: str) -> int:
    """The value of `axis` at which `other` takes the most values (the smallest on a tie)."""
    counts = {}
    for r in runs:
        counts.setdefault(r[axis], set()).add(r[other])
    return max(sorted(counts), key=lambda v: len(counts[v]))


def plot(families: dict[str, list[dict]], fits: dict, path: Path) -> None:
    from pipeline.plots import DPI, _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(2, len(METRICS), figsize=(4 * len(METRICS), 7), squeeze=False)
    for i, (family, runs) in enumerate(families.items()):
        colour = f"C{i}"
        t0, f0 = widest(runs, "tokens", "features"), widest(runs, "features", "tokens")
        for j, (metric, (label, _)) in enumerate(METRICS.items()):
            for row, (axis, other, fixed) in enumerate(
                (("tokens", "features", f0), ("features", "tokens", t0))
            ):
                ax = axes[row, j]
                points = sorted((r[axis], r[metric]) for r in runs if r[other] == fixed)
                if not points:
                    continue
                xs, ys = zip(*points)
                ax.plot(xs, ys, "o", color=colour, label=f"family {i + 1}")
                grid = np.geomspace(min(xs), max(xs) * 2, 50)
                f = fits[family][metric]
                pairs = ((x, fixed) if axis == "tokens" else (fixed, x) for x in grid)
                line = [score(metric, predict_gap(f, t, n)) for t, n in pairs]
                ax.plot(grid, line, "-", color=colour, alpha=0.6)
                ax.set_xscale("log")
                ax.set_xlabel("tokens seen" if axis == "tokens" else "features per layer")
                ax.set_title(f"{label}\n({other} = {fixed:,})", fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def gpu_prediction(fits: dict, hours: float, batch: int) -> list[dict]:
    hw = Hardware()
    rows = []
    for exponent in range(8, 17):
        features = 2**exponent
        row = scale_row(Model("SmolLM2-135M", 30, 576, features), 1, batch, hw)
        if row["total GB"] * 1e9 > GPU_MEMORY:
            break
        tokens = row["tokens/s"] * 3600 * hours
        rows.append(
            {
                "features": features,
                "tokens": tokens,
                **{m: score(m, predict_gap(fits[m], tokens, features)) for m in METRICS},
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=Path("/tmp/recipe"), help="bench.recipe's --out")
    parser.add_argument("--out", type=Path, default=Path("docs/curves"), help="folder of the CSV and PNG")
    parser.add_argument("--gpu-hours", type=float, default=1.0, help="budget of the prediction")
    parser.add_argument("--gpu-batch", type=int, default=4096, help="tokens per step on the GPU")
    args = parser.parse_args()
    runs = load_runs(args.runs)
    families: dict[str, list[dict]] = {}
    for run in runs:
        families.setdefault(run["family"], []).append(run)
    families = {k: v for k, v in families.items() if len(v) >= 3}
    if not families:
        raise SystemExit(f"no family of three or more runs under {args.runs}")
    args.out.mkdir(parents=True, exist_ok=True)
    fits = {family: {m: fit(rs, m) for m in METRICS} for family, rs in families.items()}
    for axis, other in (("tokens", "features"), ("features", "tokens")):
        with (args.out / f"{axis}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["family", "run", "tokens", "features", *METRICS])
            for i, rs in enumerate(families.values()):
                fixed = widest(rs, other, axis)
                for r in sorted((r for r in rs if r[other] == fixed), key=lambda r: r[axis]):
                    metrics = (f"{r[m]:.4f}" for m in METRICS)
                    writer.writerow([i + 1, r["run"], r["tokens"], r["features"], *metrics])
    (args.out / "fits.json").write_text(
        json.dumps(
            [{"family": i + 1, "train": json.loads(k), "fits": fits[k]} for i, k in enumerate(families)],
            indent=2,
        )
        + "\n"
    )
    plot(families, fits, args.out / "scaling.png")
    for i, (family, rs) in enumerate(families.items()):
        print(f"family {i + 1}: {', '.join(sorted(r['run'] for r in rs))}")
        for m, f in fits[family].items():
            alpha = "" if f["alpha"] is None else f" T^{-f['alpha']:+.3f}"
            beta = "" if f["beta"] is None else f" F^{-f['beta']:+.3f}"
            print(
                f"  {METRICS[m][0]:28} gap = {f['a']:.3g}{alpha}{beta}"
                f"  (max |log residual| {f['max_abs_log_residual']:.3f}, {f['n_runs']} runs)"
            )
        if any(fits[family][m]["alpha"] is None or fits[family][m]["beta"] is None for m in METRICS):
            print("  (no prediction: the family varies only one axis)")
            continue
        print(f"  predicted for {args.gpu_hours:g} H100-hour(s), batch {args.gpu_batch} (extrapolated):")
        print("  | features/layer | tokens | replacement | completeness | top-1 | KL |")
        predictions = gpu_prediction(fits[family], args.gpu_hours, args.gpu_batch)
        for p in predictions:
            print(
                f"  | {p['features']:,} | {p['tokens']:.3g} | {p['replacement_score']:.3f} "
                f"| {p['completeness_score']:.3f} | {p['top1_agreement']:.1%} | {p['kl_replacement']:.2f} |"
            )
        best = max(predictions, key=lambda p: p["replacement_score"])
        print(f"  best predicted replacement: {best['features']:,} features per layer")


if __name__ == "__main__":
    main()
