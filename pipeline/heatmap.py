"""A feature's activations on any text, and their heatmap (`clt heatmap`).

Unlike the examples stage, which reads the stored MLP inputs, this runs the model: its MLP
input at the feature's layer is captured on the text, as the `dump` stage stores it, and
encoded with the transcoder (`CrossLayerTranscoder.encode_layer`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline.clt import CrossLayerTranscoder
from pipeline.model import bos_token_id, get_architecture, get_layers


@torch.inference_mode()
def feature_activations(model, transcoder: CrossLayerTranscoder, ids: list[int], layer: int, feature: int):
    """A feature's activation (float32) at every position of the sequence `ids` (BOS first;
    0 there, as everywhere in this pipeline). The model's MLP input at `layer` is captured by
    a forward pre-hook, as the `dump` stage stores it."""
    if not 0 <= layer < transcoder.shape.n_layers or not 0 <= feature < transcoder.shape.d_transcoder:
        raise ValueError(
            f"no layer {layer} feature {feature}: the transcoder has layers "
            f"0..{transcoder.shape.n_layers - 1} and features 0..{transcoder.shape.d_transcoder - 1}"
        )
    captured = {}

    def hook(module, args, kwargs):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).float()

    block = get_layers(model)[layer].get_submodule(get_architecture(model).mlp_input)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=torch.tensor([ids], device=next(model.parameters()).device), use_cache=False)
    finally:
        handle.remove()
    x = captured["x"][0].cpu()  # (n_tokens, d_model)
    acts = transcoder.encode_layer(x, layer)[:, feature]
    acts[0] = 0
    return acts.numpy()


def activations_on_text(
    model, tokenizer, transcoder: CrossLayerTranscoder, text: str, layer: int, feature: int
):
    """Token ids of `text` and the feature's activation at each (BOS prepended, then dropped)."""
    ids = [bos_token_id(tokenizer), *tokenizer(text, add_special_tokens=False)["input_ids"]]
    return ids[1:], feature_activations(model, transcoder, ids, layer, feature)[1:]


def render_heatmap(
    tokens: list[str], acts: np.ndarray, path: str | Path, *, title: str, vmax: float | None = None
):
    """A PNG of `tokens` laid out in rows, each cell coloured by its activation (palest: 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_row = 12
    n_rows = max(1, math.ceil(len(tokens) / per_row))
    grid = np.full(n_rows * per_row, np.nan)
    grid[: len(acts)] = acts
    top = vmax if vmax is not None and vmax > 0 else max(float(np.max(acts, initial=0)), 1e-6)
    fig, ax = plt.subplots(figsize=(per_row * 1.1, 0.55 * n_rows + 1.2))
    cmap = plt.get_cmap("Oranges").with_extremes(bad="white")
    image = ax.imshow(
        np.ma.masked_invalid(grid.reshape(n_rows, per_row)), cmap=cmap, vmin=0, vmax=top, aspect="auto"
    )
    for i, (token, act) in enumerate(zip(tokens, acts)):
        row, col = divmod(i, per_row)
        label = token.replace("\n", "\\n").replace("\t", "\\t")
        ax.text(col, row - 0.12, label, ha="center", va="center", fontsize=8)
        ax.text(
            col,
            row + 0.25,
            f"{act:.2f}" if act else "",
            ha="center",
            va="center",
            fontsize=6,
            color="dimgray",
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="activation", fraction=0.03)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
