"""How much of the model's next-token behaviour the spliced transcoder keeps.

1. `split_sequences`: packed sequences from the activation store whose every token
   (BOS aside) comes from a validation document (`train.val_fraction`), so the
   transcoder never trained on them.
2. `evaluate_transcoder`: per batch, the original model, the full replacement
   (`pipeline.splice.splice`, every MLP output replaced by the transcoder's
   reconstruction), the zero-ablated model and each single-layer splice; over the
   next-token predictions made at positions >= 1 (not from BOS) it accumulates
   cross-entropy, KL(original || intervened) and top-1 agreement with the original.
   CE-loss recovered is (CE_zero - CE) / (CE_zero - CE_original): 1 for a perfect
   transcoder, 0 for one no better than deleting the MLPs.

The model runs in `model.dtype`, the transcoder in float32, and log-softmax is taken in
float32.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.clt import CrossLayerTranscoder
from pipeline.config import Params
from pipeline.loader import split_mask
from pipeline.splice import load_for_splicing, splice, zero_ablate
from pipeline.store import ActivationStore

logger = logging.getLogger(__name__)


def split_sequences(store: ActivationStore, split: str, val_fraction: float, n_sequences: int) -> np.ndarray:
    """The first `n_sequences` stored sequences made only of `split` tokens ("train" or "val",
    `pipeline.loader.split_mask`; BOS aside): token ids (n, context_len) int64."""
    T = store.schema.context_len
    token_ids = store.array("token_ids")[:].reshape(-1, T)
    doc_ids, positions = store.array("doc_ids")[:], store.array("positions")[:]
    assert (positions.reshape(-1, T)[:, 0] == 0).all(), "every stored sequence starts with BOS"
    in_split = (split_mask(doc_ids, positions, split, val_fraction) | (positions == 0)).reshape(-1, T)
    chosen = np.flatnonzero(in_split.all(axis=1))
    if len(chosen) == 0:
        n_docs = len(np.unique(doc_ids))
        what, fix = ("validation", "raise") if split == "val" else ("training", "lower")
        raise ValueError(
            f"no stored sequence in {store.path} is entirely from {what} documents (of "
            f"{len(token_ids)} sequences of {T} tokens from {n_docs} documents, "
            f"`train.val_fraction` {val_fraction} held out); dump more tokens from more "
            f"documents, or {fix} `train.val_fraction` (which retrains the transcoder)"
        )
    return token_ids[chosen[:n_sequences]].astype(np.int64)


def next_token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities of the predictions made at positions 1..T-2 (those of tokens
    2..T-1): ids (batch, T) -> (batch, T - 2, vocab)."""
    logits = model(input_ids=ids, use_cache=False).logits
    return torch.log_softmax(logits[:, 1:-1], dim=-1, dtype=torch.float32)


def compare(logp: torch.Tensor, logp_orig: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Sums over predictions of CE, KL(original || this) and top-1 agreement with the original."""
    return {
        "ce": -logp.gather(-1, targets[..., None]).sum().item(),
        "kl": (logp_orig.exp() * (logp_orig - logp)).sum().item(),
        "top1": (logp.argmax(-1) == logp_orig.argmax(-1)).sum().item(),
    }


def recovered(ce: float, ce_original: float, ce_zero: float) -> float | None:
    """CE-loss recovered: (CE_zero - CE) / (CE_zero - CE_original); None if zero-ablation costs nothing."""
    gap = ce_zero - ce_original
    return (ce_zero - ce) / gap if abs(gap) > 1e-12 else None


@torch.inference_mode()
def evaluate_transcoder(
    model: nn.Module,
    transcoder: CrossLayerTranscoder,
    sequences: torch.Tensor,
    *,
    batch_size: int,
    progress: bool = True,
) -> dict:
    """Metrics of the spliced transcoder on `sequences` (n, T) of token ids (BOS first); the
    transcoder must be on the model's device."""
    device = next(model.parameters()).device
    n_layers = transcoder.shape.n_layers
    runs: dict[str, Callable[[], contextlib.AbstractContextManager] | None] = {
        "original": None,
        "replacement": lambda: splice(model, transcoder, range(n_layers)),
        "zero_ablation": lambda: zero_ablate(model),
        **{f"layer_{l}": (lambda l=l: splice(model, transcoder, [l])) for l in range(n_layers)},
    }
    sums = {name: {"ce": 0.0, "kl": 0.0, "top1": 0.0} for name in runs}
    bar = tqdm(total=len(sequences), desc="evaluate", unit="seq", disable=not progress)
    for b in range(0, len(sequences), batch_size):
        ids = sequences[b : b + batch_size].to(device)
        targets = ids[:, 2:]
        logp_orig = next_token_logprobs(model, ids)
        for name, intervention in runs.items():
            logp = logp_orig
            if intervention is not None:
                with intervention():
                    logp = next_token_logprobs(model, ids)
            for key, value in compare(logp, logp_orig, targets).items():
                sums[name][key] += value
        bar.update(len(ids))
    bar.close()
    n = sequences.shape[0] * (sequences.shape[1] - 2)
    mean = {name: {k: v / n for k, v in s.items()} for name, s in sums.items()}
    ce_orig, ce_zero = mean["original"]["ce"], mean["zero_ablation"]["ce"]
    return {
        "n_sequences": int(sequences.shape[0]),
        "n_predictions": n,
        "ce_original": ce_orig,
        "ce_replacement": mean["replacement"]["ce"],
        "ce_zero_ablation": ce_zero,
        "ce_recovered": recovered(mean["replacement"]["ce"], ce_orig, ce_zero),
        "kl_replacement": mean["replacement"]["kl"],
        "top1_agreement": mean["replacement"]["top1"],
        "per_layer": [
            {
                "layer": l,
                "ce": mean[f"layer_{l}"]["ce"],
                "ce_recovered": recovered(mean[f"layer_{l}"]["ce"], ce_orig, ce_zero),
                "kl": mean[f"layer_{l}"]["kl"],
                "top1_agreement": mean[f"layer_{l}"]["top1"],
            }
            for l in range(n_layers)
        ],
    }


def run(params: Params, *, progress: bool = True) -> dict:
    """The `evaluate` stage: metrics of the spliced transcoder, written to `evaluate.json`."""
    cfg = params.evaluate
    model, _, transcoder = load_for_splicing(params)
    store = ActivationStore(params.paths.activations)
    where, other = params.paths.transcoder, f"activation store {store.path}"
    transcoder.check_fits(store.schema.n_layers, store.schema.d_model, where=where, other=other)
    if store.schema.context_len < 3:
        raise ValueError(
            f"`corpus.context_len` is {store.schema.context_len}; evaluating needs >= 3 (BOS, then "
            "at least one prediction from a non-BOS position)"
        )
    sequences = torch.from_numpy(split_sequences(store, "val", params.train.val_fraction, cfg.n_sequences))
    logger.info("evaluating on %d held-out sequences of %d tokens", *sequences.shape)
    metrics = evaluate_transcoder(model, transcoder, sequences, batch_size=cfg.batch_size, progress=progress)
    logger.info(
        "CE original %.4f, replacement %.4f, zero-ablation %.4f; recovered %s, KL %.4f, top-1 %.3f",
        metrics["ce_original"],
        metrics["ce_replacement"],
        metrics["ce_zero_ablation"],
        metrics["ce_recovered"],
        metrics["kl_replacement"],
        metrics["top1_agreement"],
    )
    out = Path(params.paths.metrics)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluate.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
