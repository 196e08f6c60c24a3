"""Pictures of the dictionary (the `plots` stage): four PNGs, each with the CSV it is drawn
from, so that `dvc plots show` renders the same numbers (dvc.yaml, top-level `plots:`).

1. `decoder_spread`: where each source layer's features write. For source layer l and
   output layer k >= l, the share of a feature's squared decoder norm that goes to MLP
   output k, averaged over the layer's features with a nonzero decoder (rows sum to 1; a
   per-layer transcoder writes only to its own layer). CSV: per source layer, the share
   kept at its own layer, sent to the next one, and to all later ones.
2. `feature_density`: histogram of log10 firing frequency (the fraction of scanned tokens
   where a feature fires, `features.parquet`), all layers and per layer; dead features are
   counted in the title, since log10(0) is not on the axis.
3. `layer_metrics`: per layer, validation NMSE and L0 (`train.json`) and, where
   `evaluate.json` exists, the KL of the model with only that layer's MLP replaced.
4. `decoder_map`: a 2-D PCA map of each feature's decoder direction to its own layer
   (unit-normalised, so the map shows direction, not norm), for `plots.map_layers` layers
   evenly spaced from the first to the last, coloured by log10 firing frequency.

A feature's activation over a text is drawn by `clt heatmap` (`pipeline/heatmap.py`).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import staged
from pipeline.clt import CrossLayerTranscoder, load_transcoder
from pipeline.config import Params, PlotsConfig
from pipeline.virtual_weights import decoder_slice

logger = logging.getLogger(__name__)

DPI = 120
NAMES = ("decoder_spread", "feature_density", "layer_metrics", "decoder_map")
"""Each picture's file stem: `{name}.png` and `{name}.csv`."""


@torch.no_grad()
def decoder_spread(transcoder: CrossLayerTranscoder) -> np.ndarray:
    """(n_layers sources, n_layers outputs): the mean share of a source feature's squared
    decoder norm written to each output layer; 0 where the source does not write."""
    L = transcoder.shape.n_layers
    share = np.zeros((L, L))
    for l in range(L):
        sq = torch.zeros(transcoder.shape.d_transcoder, L, dtype=torch.float64)
        for k in range(l, L):
            dec = decoder_slice(transcoder, l, k)
            if dec is not None:
                sq[:, k] = dec.double().pow(2).sum(1)
        total = sq.sum(1, keepdim=True)
        live = total[:, 0] > 0
        if live.any():
            share[l] = (sq[live] / total[live]).mean(0).numpy()
    return share


def read_frequencies(examples_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(layer, feature, frequency) of every feature, from `features.parquet`."""
    import pyarrow.parquet as pq

    path = Path(examples_dir) / "features.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `dvc repro examples` first")
    table = pq.read_table(path, columns=["layer", "feature", "frequency"])
    columns = (table[name].to_numpy() for name in ("layer", "feature"))
    return *(c.astype(np.int64) for c in columns), table["frequency"].to_numpy()


def frequency_bins(frequency: np.ndarray, n_bins: int) -> np.ndarray:
    """Edges of `n_bins` bins of log10 frequency over the live features' range (whole decades)."""
    live = np.log10(frequency[frequency > 0])
    lo = np.floor(live.min()) if len(live) else -6.0
    hi = max(np.ceil(live.max()) if len(live) else 0.0, lo + 1)
    return np.linspace(lo, hi, n_bins + 1)


def layer_metrics(train_json: str | Path, evaluate_json: str | Path | None) -> list[dict]:
    """Per layer: `nmse`, `l0`, `dead_fraction` (train.json) and, when `evaluate_json` exists,
    `kl_alone`: the KL of the model with only that layer's MLP replaced (nats per token)."""
    train_json = Path(train_json)
    if not train_json.is_file():
        raise FileNotFoundError(f"{train_json} does not exist; run `dvc repro train` first")
    rows = [
        {k: r[k] for k in ("layer", "nmse", "l0", "dead_fraction")}
        for r in json.loads(train_json.read_text())["per_layer"]
    ]
    if evaluate_json is not None and Path(evaluate_json).is_file():
        kl = {r["layer"]: r["kl"] for r in json.loads(Path(evaluate_json).read_text())["per_layer"]}
        for r in rows:
            r["kl_alone"] = kl.get(r["layer"], float("nan"))
    return rows


@torch.no_grad()
def decoder_map(transcoder: CrossLayerTranscoder, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal components of layer `layer`'s unit decoder directions to its
    own MLP output: coordinates (d_transcoder, 2) and their explained variance ratios (2,)."""
    W = decoder_slice(transcoder, layer, layer).double()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    W = W - W.mean(0)
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    var = S.pow(2)
    return (U[:, :2] * S[:2]).numpy(), (var[:2] / var.sum().clamp_min(1e-30)).numpy()


def map_layers(n_layers: int, n: int) -> list[int]:
    """`n` layers evenly spaced from the first to the last (all when there are fewer)."""
    return sorted({round(x) for x in np.linspace(0, n_layers - 1, min(n, n_layers))})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(*axes) -> None:
    """Layer numbers (and counts) as whole numbers on these axes (`ax.xaxis`, a colorbar's)."""
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def draw_decoder_spread(share: np.ndarray, out: Path) -> None:
    plt = _pyplot()
    L = len(share)
    masked = np.ma.masked_where(np.tril(np.ones((L, L), bool), -1), share)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(masked, cmap=plt.get_cmap("viridis").with_extremes(bad="white"), vmin=0, origin="lower")
    ax.set_xlabel("output layer (MLP output written)")
    ax.set_ylabel("source layer (where the feature is encoded)")
    ax.set_title(
        "Where each layer's features write:\nmean share of a feature's squared decoder norm", fontsize=10
    )
    fig.colorbar(image, ax=ax, label="share of squared decoder norm (rows sum to 1)")
    _integer_ticks(ax.xaxis, ax.yaxis)
    fig.savefig(out / "decoder_spread.png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    rows = []
    for l in range(L):
        rows.append(
            {
                "source_layer": l,
                "own_layer": float(share[l, l]),
                "next_layer": float(share[l, l + 1]) if l + 1 < L else 0.0,
                "later_layers": float(share[l, l + 2 :].sum()),
            }
        )
    _write_csv(out / "decoder_spread.csv", rows)


def draw_feature_density(layers: np.ndarray, frequency: np.ndarray, n_bins: int, out: Path) -> None:
    plt = _pyplot()
    edges = frequency_bins(frequency, n_bins)
    live = frequency > 0
    logf = np.log10(frequency[live])
    L = int(layers.max()) + 1
    counts = np.stack([np.histogram(logf[layers[live] == l], edges)[0] for l in range(L)])  # (L, n_bins)
    centres = (edges[:-1] + edges[1:]) / 2
    n_dead = int((~live).sum())
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=[1, 1.3])
    left.bar(centres, counts.sum(0), width=edges[1] - edges[0], color="#4c72b0")
    left.set_xlabel("log10 firing frequency (fraction of tokens where the feature fires)")
    left.set_ylabel("features")
    left.set_title("All layers", fontsize=10)
    image = right.imshow(
        np.ma.masked_equal(counts, 0),
        aspect="auto",
        origin="lower",
        cmap="magma_r",
        extent=(edges[0], edges[-1], -0.5, L - 0.5),
    )
    right.set_xlabel("log10 firing frequency")
    right.set_ylabel("layer")
    right.set_title("Per layer", fontsize=10)
    bar = fig.colorbar(image, ax=right, label="features per bin")
    _integer_ticks(right.yaxis, bar.ax.yaxis, left.yaxis)
    fig.suptitle(
        f"Feature density: {live.sum():,} live features, {n_dead:,} dead (never fired on the scanned tokens)",
        fontsize=11,
    )
    fig.savefig(out / "feature_density.png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    rows = [
        {
            "log10_frequency": float(c),
            "n_features": int(n),
            **{f"layer_{l}": int(counts[l, i]) for l in range(L)},
        }
        for i, (c, n) in enumerate(zip(centres, counts.sum(0)))
    ]
    _write_csv(out / "feature_density.csv", rows)


def draw_layer_metrics(rows: list[dict], out: Path) -> None:
    plt = _pyplot()
    panels = [
        ("nmse", "NMSE (fraction of variance\nunexplained, held-out tokens)"),
        ("l0", "L0 (active features per token)"),
    ]
    if "kl_alone" in rows[0]:
        panels.append(("kl_alone", "KL with only this layer's MLP\nreplaced (nats per token)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    layers = [r["layer"] for r in rows]
    for ax, (key, label) in zip(np.atleast_1d(axes), panels):
        ax.bar(layers, [r[key] for r in rows], color="#4c72b0")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        _integer_ticks(ax.xaxis)
    fig.suptitle("Transcoder quality per layer", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "layer_metrics.png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    _write_csv(out / "layer_metrics.csv", rows)


def draw_decoder_map(
    transcoder: CrossLayerTranscoder, layers: list[int], frequency: np.ndarray | None, out: Path
) -> None:
    """`frequency`: (n_layers, d_transcoder) firing frequencies for the colours, or None."""
    plt = _pyplot()
    n = len(layers)
    cols = min(n, 4)
    rows_ = -(-n // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.6 * cols, 3.4 * rows_ + 0.6), squeeze=False)
    logf = None
    if frequency is not None:
        live = frequency[frequency > 0]
        logf = np.log10(np.where(frequency > 0, frequency, np.nan))
        vmin, vmax = (np.log10(live.min()), np.log10(live.max())) if len(live) else (-6, 0)
    rows, image = [], None
    for ax, layer in zip(axes.flat, layers):
        xy, ratio = decoder_map(transcoder, layer)
        if logf is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=6, color="#4c72b0", alpha=0.7)
        else:
            dead = np.isnan(logf[layer])
            ax.scatter(xy[dead, 0], xy[dead, 1], s=8, marker="x", color="0.6", label="dead")
            image = ax.scatter(
                xy[~dead, 0], xy[~dead, 1], s=6, c=logf[layer][~dead], cmap="viridis", vmin=vmin, vmax=vmax
            )
            if dead.any():
                ax.legend(loc="upper right", fontsize=7)
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}% of variance)")
        ax.set_xticks([])
        ax.set_yticks([])
        for f, (x, y) in enumerate(xy):
            rows.append({"layer": layer, "feature": f, "pc1": float(x), "pc2": float(y)})
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, label="log10 firing frequency", fraction=0.03)
    fig.suptitle("Decoder directions (to the feature's own layer), PCA per layer", fontsize=11)
    fig.savefig(out / "decoder_map.png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    _write_csv(out / "decoder_map.csv", rows)


def write_plots(
    transcoder: CrossLayerTranscoder,
    out: str | Path,
    *,
    examples_dir: str | Path,
    train_json: str | Path,
    evaluate_json: str | Path | None,
    cfg: PlotsConfig,
) -> Path:
    """All four pictures and their CSVs (`NAMES`) in the folder `out`, replaced atomically."""
    layers, features, frequency = read_frequencies(examples_dir)
    L, F = transcoder.shape.n_layers, transcoder.shape.d_transcoder
    if len(frequency) != L * F:
        raise ValueError(
            f"{examples_dir}/features.parquet has {len(frequency)} features but the transcoder has "
            f"{L} x {F}; re-run `dvc repro examples`"
        )
    per_layer = np.zeros((L, F))
    per_layer[layers, features] = frequency
    with staged(out, folder=True) as tmp:
        draw_decoder_spread(decoder_spread(transcoder), tmp)
        draw_feature_density(layers, frequency, cfg.density_bins, tmp)
        draw_layer_metrics(layer_metrics(train_json, evaluate_json), tmp)
        draw_decoder_map(transcoder, map_layers(L, cfg.map_layers), per_layer, tmp)
    logger.info("wrote %s: %s", out, ", ".join(f"{n}.png" for n in NAMES))
    return Path(out)


def run(params: Params) -> Path:
    """The `plots` stage."""
    metrics = Path(params.paths.metrics)
    return write_plots(
        load_transcoder(params.paths.transcoder),
        params.paths.plots,
        examples_dir=params.paths.examples,
        train_json=metrics / "train.json",
        evaluate_json=metrics / "evaluate.json",
        cfg=params.plots,
    )
