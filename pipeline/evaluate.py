"""Splicing the transcoder into the language model and measuring what it preserves.

The replacement model of Ameisen et al., "Circuit Tracing" (2025),
https://transformer-circuits.pub/2025/attribution-graphs/methods.html#building-replacement-model:

1. `held_out_sequences`: packed sequences from the activation store whose every token
   (BOS aside) comes from a validation document (`train.val_fraction`), so the
   transcoder never trained on them.
2. `splice`: forward hooks replace MLP block outputs (`hook_mlp_out`) by the transcoder's
   reconstruction. A pre-hook on each layer's MLP input (`hook_resid_mid`) encodes that
   layer's features from the *replacement model's own* residual stream
   (`encode_layer`); the hook on the MLP output of layer l decodes the features of every
   layer <= l (`decode_layer`), which have all run by then. Splicing one layer only
   replaces that layer's output; its features still come from layers <= l of a model
   that is unchanged up to l. `zero_ablate` sets MLP outputs to 0 instead.
   Position 0 (BOS) always keeps the original MLP output: training excluded BOS rows, and
   circuit-tracer likewise zeroes features at position 0.
3. `evaluate_transcoder`: per batch, the original model, the full replacement, the
   zero-ablated model and each single-layer splice; over the next-token predictions made
   at positions >= 1 (not from BOS) it accumulates cross-entropy, KL(original ||
   intervened) and top-1 agreement with the original. CE-loss recovered is
   (CE_zero - CE) / (CE_zero - CE_original): 1 for a perfect transcoder, 0 for one no
   better than deleting the MLPs.

The model runs in `model.dtype`; the transcoder runs in float32 (inputs cast up, its
reconstructions cast back to the model dtype), and log-softmax is taken in float32.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.clt import CrossLayerTranscoder, load_transcoder
from pipeline.config import Params
from pipeline.loader import split_mask
from pipeline.model import (
    bos_token_id,
    get_architecture,
    get_layers,
    load_model,
    resolve_device,
    resolve_dtype,
)
from pipeline.store import ActivationStore

logger = logging.getLogger(__name__)


def encode_layer(transcoder: CrossLayerTranscoder, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Features of one layer from its MLP input (raw space, JumpReLU): x (..., d_model) -> (..., d_tc)."""
    h = x @ transcoder.W_enc[layer] + transcoder.b_enc[layer]
    return h * (h > transcoder.threshold[layer])


def source_layers(transcoder: CrossLayerTranscoder, target: int) -> range:
    """The layers whose decoders write to `target`: all layers <= target (clt), or target (plt)."""
    return range(target + 1) if transcoder.shape.kind == "clt" else range(target, target + 1)


def decode_layer(
    transcoder: CrossLayerTranscoder, acts: Mapping[int, torch.Tensor] | Sequence[torch.Tensor], target: int
) -> torch.Tensor:
    """Reconstruction of layer `target`'s MLP output: sum over source layers l of
    acts[l] @ W_dec[l][:, target - l] + b_dec[target]. acts[l] (..., d_tc) -> (..., d_model)."""
    out = transcoder.b_dec[target]
    for l in source_layers(transcoder, target):
        out = out + acts[l] @ transcoder.W_dec[l][:, target - l if transcoder.shape.kind == "clt" else 0]
    return out


def check_compatible(transcoder: CrossLayerTranscoder, model: nn.Module, where: str) -> None:
    """A clear error unless `transcoder` (loaded from `where`) is a raw-space JumpReLU
    transcoder with the model's n_layers and d_model."""
    n_layers, d_model = len(get_layers(model)), model.config.hidden_size
    shape = transcoder.shape
    if (shape.n_layers, shape.d_model) != (n_layers, d_model):
        raise ValueError(
            f"transcoder {where} has n_layers={shape.n_layers}, d_model={shape.d_model}, but the model "
            f"({model.config.name_or_path}) has n_layers={n_layers}, d_model={d_model}: it was trained "
            "for another model; re-run `dvc repro train` or point `paths.transcoder` at one for this model"
        )
    if shape.activation != "jumprelu":
        raise ValueError(f"transcoder {where} uses {shape.activation}; export it (JumpReLU) first")
    if not (bool((transcoder.input_scale == 1).all()) and bool((transcoder.output_scale == 1).all())):
        raise ValueError(
            f"transcoder {where} works in a normalised space; splice the one `load_transcoder` reads "
            "back from an exported folder (raw space)"
        )


def _replace_after_bos(output, new: torch.Tensor):
    """The module output with positions >= 1 of its hidden states (batch, seq, d_model) set to `new`."""
    hidden = output[0] if isinstance(output, tuple) else output
    spliced = torch.cat([hidden[:, :1], new[:, 1:].to(hidden.dtype)], dim=1)
    return (spliced, *output[1:]) if isinstance(output, tuple) else spliced


@contextlib.contextmanager
def splice(model: nn.Module, transcoder: CrossLayerTranscoder, layers: Sequence[int]) -> Iterator[None]:
    """Within the context, the MLP outputs of `layers` (positions >= 1) are the transcoder's
    reconstruction, from features computed on the running model's own MLP inputs."""
    arch = get_architecture(model)
    blocks = get_layers(model)
    sources = sorted({l for target in layers for l in source_layers(transcoder, target)})
    acts: dict[int, torch.Tensor] = {}  # layer -> (batch, seq, d_tc) float32, this forward pass
    handles = []

    def encode(module, args, kwargs, *, layer):
        x = args[0] if args else kwargs["hidden_states"]
        acts[layer] = encode_layer(transcoder, x.float(), layer)

    def reconstruct(module, args, output, *, layer):
        return _replace_after_bos(output, decode_layer(transcoder, acts, layer))

    try:
        for l in sources:
            mlp_input = blocks[l].get_submodule(arch.mlp_input)
            hook = functools.partial(encode, layer=l)
            handles.append(mlp_input.register_forward_pre_hook(hook, with_kwargs=True))
        for l in layers:
            mlp_output = blocks[l].get_submodule(arch.mlp_output)
            handles.append(mlp_output.register_forward_hook(functools.partial(reconstruct, layer=l)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def zero_ablate(model: nn.Module) -> Iterator[None]:
    """Within the context, every MLP output is 0 at positions >= 1 (BOS keeps the original)."""
    arch = get_architecture(model)

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        return _replace_after_bos(output, torch.zeros_like(hidden))

    handles = [b.get_submodule(arch.mlp_output).register_forward_hook(hook) for b in get_layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def held_out_sequences(store: ActivationStore, val_fraction: float, n_sequences: int) -> np.ndarray:
    """The first `n_sequences` stored sequences made only of validation tokens (BOS aside):
    token ids (n, context_len) int64."""
    T = store.schema.context_len
    token_ids = store.array("token_ids")[:].reshape(-1, T)
    doc_ids, positions = store.array("doc_ids")[:], store.array("positions")[:]
    assert (positions.reshape(-1, T)[:, 0] == 0).all(), "every stored sequence starts with BOS"
    is_val = (split_mask(doc_ids, positions, "val", val_fraction) | (positions == 0)).reshape(-1, T)
    held_out = np.flatnonzero(is_val.all(axis=1))
    if len(held_out) == 0:
        n_docs = len(np.unique(doc_ids))
        raise ValueError(
            f"no stored sequence in {store.path} is entirely from validation documents (of "
            f"{len(token_ids)} sequences of {T} tokens from {n_docs} documents, "
            f"`train.val_fraction` {val_fraction} held out); dump more tokens from more "
            "documents, or raise `train.val_fraction` (which retrains the transcoder)"
        )
    return token_ids[held_out[:n_sequences]].astype(np.int64)


def next_token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities of the predictions made at positions 1..T-2 (those of tokens
    2..T-1): ids (batch, T) -> (batch, T - 2, vocab)."""
    logits = model(input_ids=ids, use_cache=False).logits
    return torch.log_softmax(logits[:, 1:-1].float(), dim=-1)


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


def load_for_splicing(params: Params, *, dtype: torch.dtype | None = None) -> tuple:
    """`(model, tokenizer, transcoder)` on `runtime.device`, checked to fit each other; the
    model in `dtype` (default: `model.dtype`)."""
    device = resolve_device(params.runtime.device)
    transcoder = load_transcoder(params.paths.transcoder)
    dtype = dtype or resolve_dtype(params.model.dtype)
    model, tokenizer = load_model(params.paths.model_dir, dtype=dtype, device=device)
    check_compatible(transcoder, model, params.paths.transcoder)
    return model, tokenizer, transcoder.to(device)


def run(params: Params, *, progress: bool = True) -> dict:
    """The `evaluate` stage: metrics of the spliced transcoder, written to `evaluate.json`."""
    cfg = params.evaluate
    model, _, transcoder = load_for_splicing(params)
    store = ActivationStore(params.paths.activations)
    if (store.schema.n_layers, store.schema.d_model) != (transcoder.shape.n_layers, transcoder.shape.d_model):
        raise ValueError(
            f"activation store {store.path} was dumped from a model with n_layers={store.schema.n_layers}, "
            f"d_model={store.schema.d_model}, not the model in {params.paths.model_dir}; re-run `dvc repro`"
        )
    if store.schema.context_len < 3:
        raise ValueError(
            f"`corpus.context_len` is {store.schema.context_len}; evaluating needs >= 3 (BOS, then "
            "at least one prediction from a non-BOS position)"
        )
    sequences = torch.from_numpy(held_out_sequences(store, params.train.val_fraction, cfg.n_sequences))
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


@torch.inference_mode()
def greedy_continuation(model: nn.Module, ids: list[int], *, max_new_tokens: int, eos_token_id: int | None):
    """Greedy decoding that re-runs the whole sequence each step (no KV cache, so hooks see
    every position, BOS at 0 included); returns the new token ids."""
    device = next(model.parameters()).device
    ids = list(ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits
        token = int(logits[0, -1].argmax())
        ids.append(token)
        new.append(token)
        if token == eos_token_id:
            break
    return new


def generate(
    model: nn.Module, tokenizer, transcoder: CrossLayerTranscoder, prompt: str, *, max_new_tokens: int
) -> dict[str, str]:
    """Greedy continuations of `prompt` (BOS prepended) by the original and the replacement model."""
    ids = [bos_token_id(tokenizer), *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": tokenizer.eos_token_id}
    original = greedy_continuation(model, ids, **kwargs)
    with splice(model, transcoder, range(transcoder.shape.n_layers)):
        replacement = greedy_continuation(model, ids, **kwargs)
    return {
        "original": tokenizer.decode(original, skip_special_tokens=True),
        "replacement": tokenizer.decode(replacement, skip_special_tokens=True),
    }
