"""Fine-tune a trained transcoder on the replacement model's next-token predictions.

The MSE objective of `pipeline.train` fits each layer's reconstruction on the original
model's activations; once spliced in, the transcoder reads the replacement model's own
residual stream and its errors compound over 30 layers (top-1 agreement ~30%). This phase
trains the exported (raw-space) transcoder through the spliced model (`pipeline.splice`),
the language model frozen, on

    KL(original || replacement)  +  mse_coef * mean over layers of FVU_l

KL averaged over the next-token predictions made at positions >= 1 of training sequences
(`pipeline.evaluate.split_sequences`); FVU_l, layer l's squared reconstruction error on
the original model's activations over their variance (the batch's tokens at positions
>= 1), anchors the local fit the graphs' error nodes measure. Thresholds stay fixed (no
straight-through gradient), so a feature that fires on no token of a batch is untouched.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.checkpoint import Checkpoint, adam, adam_tensors, load_adam
from pipeline.clt import CrossLayerTranscoder
from pipeline.config import Params
from pipeline.dump import _Target, capture_activations
from pipeline.evaluate import next_token_logprobs, split_sequences
from pipeline.model import load_model
from pipeline.runtime import resolve_device, torch_dtype
from pipeline.splice import check_fits, splice
from pipeline.store import ACTIVATIONS, ActivationStore

logger = logging.getLogger(__name__)


def original_pass(model: nn.Module, ids: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, dict]:
    """The original model on `ids` (batch, T): its next-token log-probabilities
    (`next_token_logprobs`) and every layer's MLP input and output at positions >= 1, float32
    (batch * (T - 1), n_layers, d_model)."""
    batch, T = ids.shape
    d_model = model.config.hidden_size
    target = _Target("float32")
    target.buffers = {
        name: torch.empty(batch * T, n_layers, d_model, device=ids.device) for name in ACTIVATIONS
    }
    with torch.no_grad(), capture_activations(model, target):
        logp = next_token_logprobs(model, ids)
    after_bos = {
        name: t.view(batch, T, n_layers, d_model)[:, 1:].reshape(-1, n_layers, d_model)
        for name, t in target.buffers.items()
    }
    return logp, after_bos


def layer_fvu(
    transcoder: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over layers of each layer's fraction of variance unexplained by the
    transcoder, and its L0 (active features per layer and token), from MLP inputs and
    outputs (n, n_layers, d_model) float32; the transcoder computes in `dtype`.

    mean_l err_l / var_l is one fused squared error of outputs scaled by
    1 / sqrt(n_layers var_l): eager elementwise passes over (n, n_layers, d_model) float32
    tensors otherwise cost as much as the transcoder's matmuls."""
    with torch.no_grad():
        var = y.var(0, correction=0).sum(-1) * len(y)  # (n_layers,)
        scale = (var.clamp_min(1e-12) * len(var)).rsqrt()[:, None]
    acts = transcoder.encode(x.to(dtype))
    recon = transcoder.decode(acts)
    fvu = F.mse_loss(recon * scale, y * scale, reduction="sum")
    return fvu, (acts.detach() != 0).float().sum(-1).mean()


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Matmuls in `dtype` within the context (for float32: a no-op)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def kl_finetune(
    model: nn.Module,
    transcoder: CrossLayerTranscoder,
    sequences: torch.Tensor,
    *,
    n_steps: int,
    batch_size: int,
    lr: float,
    mse_coef: float,
    compute_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    checkpoint: Checkpoint | None = None,
    checkpoint_every: int = 50,
    progress: bool = True,
) -> list[dict]:
    """Fine-tune `transcoder` (raw space, on the model's device) in place for `n_steps` Adam
    steps of `batch_size` sequences drawn from `sequences` (n, T) without replacement
    (reshuffled each pass); the learning rate decays linearly to 0. With a `compute_dtype`
    below float32, the transcoder's matmuls run in it under autocast (its parameters and
    Adam stay float32). With a `checkpoint` (of one process), the state is saved every
    `checkpoint_every` steps and at the end, and a run started again with the same settings
    resumes from it exactly. Returns each step's
    loss, KL, mean FVU and L0 (on the original model's activations, as `layer_fvu`)."""
    device = next(model.parameters()).device
    n_layers = transcoder.shape.n_layers
    was_training = model.training
    model.eval().requires_grad_(False)
    trained = {name: p for name, p in transcoder.named_parameters() if name != "log_threshold"}
    optimizer = adam(trained.values(), lr, device)
    history = resume_phase(checkpoint, transcoder, optimizer, trained) if checkpoint else []
    if history:
        logger.info("resuming the KL phase at step %d/%d", len(history), n_steps)
    batches = itertools.islice(draws(len(sequences), batch_size, seed), len(history), None)
    bar = tqdm(total=n_steps, initial=len(history), desc="kl fine-tune", unit="step", disable=not progress)
    for step, rows in zip(range(len(history), n_steps), batches):
        ids = sequences[rows].to(device)
        logp_orig, acts = original_pass(model, ids, n_layers)
        p_orig = logp_orig.exp().flatten()
        with autocast(device, compute_dtype):
            with splice(model, transcoder, range(n_layers)):
                logp = next_token_logprobs(model, ids)
            fvu, l0 = layer_fvu(transcoder, acts["resid_mid"], acts["mlp_out"], compute_dtype)
        # sum p (log p - log q) as two dot products over the (predictions x vocab) elements:
        # no elementwise temporaries of that size, and a gradient of -p / n for log q
        n_predictions = logp.numel() // logp.shape[-1]
        kl = (p_orig @ logp_orig.flatten() - p_orig @ logp.flatten()) / n_predictions
        loss = kl + mse_coef * fvu
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - step / n_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        record = {
            "step": step,
            "loss": loss.item(),
            "kl": kl.item(),
            "fvu": fvu.item(),
            "l0": l0.item(),
        }
        history.append(record)
        bar.update(1)
        bar.set_postfix(kl=f"{record['kl']:.3f}", fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}")
        if checkpoint and (len(history) % checkpoint_every == 0 or len(history) == n_steps):
            save_phase(checkpoint, transcoder, optimizer, trained, history)
    bar.close()
    model.train(was_training)
    return history


def draws(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Batches of `batch_size` of range(n) without replacement, in a new random order each
    pass (a batch may span two passes): the same for a seed, so a resumed run skips ahead."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += rng.permutation(n).tolist()
        yield order[:batch_size]
        del order[:batch_size]


def _tensors(transcoder: CrossLayerTranscoder, optimizer, trained: dict) -> tuple[dict, dict]:
    tensors = {f"model.{name}": t.detach() for name, t in transcoder.state_dict().items()}
    moments, counts = adam_tensors(optimizer, trained)
    return {**tensors, **moments}, counts


def save_phase(checkpoint: Checkpoint, transcoder, optimizer, trained: dict, history: list[dict]) -> None:
    """The KL phase's state in `checkpoint`: the transcoder, its Adam state, the history."""
    tensors, counts = _tensors(transcoder, optimizer, trained)
    dims = dict.fromkeys(tensors)  # one process: every tensor whole
    features = (0, transcoder.shape.d_transcoder)
    checkpoint.save(tensors=tensors, feature_dims=dims, features=features, optimizer=counts, history=history)


@torch.no_grad()
def resume_phase(checkpoint: Checkpoint, transcoder, optimizer, trained: dict) -> list[dict]:
    """Load what `save_phase` wrote into `transcoder` and `optimizer`; returns the history so far
    (empty: no checkpoint of these settings)."""
    tensors, counts = _tensors(transcoder, optimizer, trained)
    features = (0, transcoder.shape.d_transcoder)
    template = {"tensors": tensors, "feature_dims": dict.fromkeys(tensors), "features": features}
    state = checkpoint.load(template)
    if state is None:
        return []
    for name, t in transcoder.state_dict().items():
        t.copy_(state["tensors"][f"model.{name}"])
    load_adam(optimizer, trained, state["tensors"], state["optimizer"])
    return state["history"]


def kl_phase(
    params: Params,
    transcoder: CrossLayerTranscoder,
    where: str,
    *,
    n_sequences: int = 100_000,
    checkpoint: Checkpoint | None = None,
    progress: bool = True,
) -> list[dict]:
    """`kl_finetune` as `params.train.kl_*` set it: the model of `paths.model_dir` on
    `runtime.device`, up to `n_sequences` training sequences of `paths.activations`; the
    raw-space `transcoder` (`where` names it in errors) is fine-tuned in place on the
    model's device, checkpointed every `train.checkpoint_every` steps to `checkpoint`."""
    cfg = params.train
    device = resolve_device(params.runtime.device)
    model, _ = load_model(params.paths.model_dir, dtype=torch_dtype(params.model.dtype), device=device)
    check_fits(transcoder, model, where)
    store = ActivationStore(params.paths.activations)
    sequences = torch.from_numpy(split_sequences(store, "train", cfg.val_fraction, n_sequences))
    logger.info(
        "KL phase: %d steps of %d of %d training sequences", cfg.kl_steps, cfg.kl_batch_size, len(sequences)
    )
    return kl_finetune(
        model,
        transcoder.to(device),
        sequences,
        n_steps=cfg.kl_steps,
        batch_size=cfg.kl_batch_size,
        lr=cfg.kl_lr,
        mse_coef=cfg.kl_mse_coef,
        compute_dtype=torch_dtype(cfg.compute_dtype, device),
        seed=cfg.seed,
        checkpoint=checkpoint,
        checkpoint_every=cfg.checkpoint_every,
        progress=progress,
    )


def phase_summary(history: list[dict], window: int = 10) -> dict:
    """The KL phase in `metrics/train.json`: its steps and the mean KL, FVU and L0 of its
    first and last `window` steps (on the training batches)."""
    first, last = history[:window], history[-window:]

    def mean(rows: list[dict], key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    return {
        "steps": len(history),
        **{
            f"{key}_{name}": mean(rows, key)
            for name, rows in (("first", first), ("last", last))
            for key in ("kl", "fvu", "l0")
        },
    }
